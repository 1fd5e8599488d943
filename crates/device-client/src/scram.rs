//! SCRAM-SHA-256 (RFC 5802, RFC 7677), client side, without channel binding (the edge offers
//! no `-PLUS` mechanism). Kept free of I/O so the proof can be checked against the RFC vector.
//!
//! The client also verifies the server's signature: only a server that knows the verifier
//! derived from our password can produce it, so a successful login proves we talk to the real
//! service even beyond what TLS already says.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::ClientError;

/// Iteration counts a server may ask for. RFC 7677 asks for at least 4096; the upper bound
/// keeps a hostile or broken server from making the client burn minutes of CPU per login.
const MIN_ITERATIONS: u32 = 4096;
const MAX_ITERATIONS: u32 = 1_000_000;

/// The GS2 header for "no channel binding": `n,,`, base64 in the final message.
const GS2_HEADER: &str = "n,,";

/// A login in progress, after the client-first message.
pub(crate) struct ScramClient {
    client_first_bare: String,
    cnonce: String,
}

/// What the client-final step produced.
pub(crate) struct ClientFinal {
    /// The client-final message to send.
    pub message: String,
    /// The server signature a genuine server will send back.
    server_signature: [u8; 32],
}

/// RFC 5802 `saslname`: `=` and `,` are escaped so a username cannot inject attributes.
fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    pushgate_core::credentials::hmac_sha256(key, data)
}

fn protocol(what: &str) -> ClientError {
    ClientError::Protocol(format!("SCRAM: {what}"))
}

impl ScramClient {
    /// Starts a login with a fresh random client nonce.
    pub fn new(username: &str) -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self::with_nonce(username, &STANDARD.encode(bytes))
    }

    /// Starts a login with a given nonce (the RFC test vector fixes it).
    pub fn with_nonce(username: &str, cnonce: &str) -> Self {
        ScramClient {
            client_first_bare: format!("n={},r={cnonce}", saslname(username)),
            cnonce: cnonce.to_string(),
        }
    }

    /// The client-first message (GS2 header included).
    pub fn client_first(&self) -> String {
        format!("{GS2_HEADER}{}", self.client_first_bare)
    }

    /// Answers the server-first message from the password. Runs PBKDF2, so it is slow by
    /// design: call it off the async I/O threads.
    #[cfg(test)]
    pub fn client_final(
        &self,
        password: &str,
        server_first: &str,
    ) -> Result<ClientFinal, ClientError> {
        let sf = self.server_first(server_first)?;
        let keys = Keys::derive(password, &sf.salt, sf.iterations);
        Ok(self.client_final_with(&keys, &sf))
    }

    /// Reads and checks the server-first message: the nonce must extend ours, the iteration
    /// count must be sane, and no mandatory extension may be asked for.
    pub fn server_first(&self, server_first: &str) -> Result<ServerFirst, ClientError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => {
                    salt = Some(
                        STANDARD
                            .decode(v)
                            .map_err(|_| protocol("salt is not base64"))?,
                    )
                }
                Some(("i", v)) => {
                    iterations = Some(
                        v.parse::<u32>()
                            .map_err(|_| protocol("iteration count is not a number"))?,
                    )
                }
                // RFC 5802: an unknown mandatory extension must make the client give up
                Some(("m", _)) => return Err(protocol("unsupported mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| protocol("server-first without nonce"))?;
        let salt = salt.ok_or_else(|| protocol("server-first without salt"))?;
        let iterations =
            iterations.ok_or_else(|| protocol("server-first without iteration count"))?;
        // the server's nonce must extend ours, or this answer belongs to another exchange
        if nonce.len() <= self.cnonce.len() || !nonce.starts_with(&self.cnonce) {
            return Err(protocol("server nonce does not extend the client nonce"));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(protocol(&format!(
                "iteration count {iterations} outside {MIN_ITERATIONS}..={MAX_ITERATIONS}"
            )));
        }
        Ok(ServerFirst {
            raw: server_first.to_string(),
            nonce: nonce.to_string(),
            salt,
            iterations,
        })
    }

    /// The client-final message from keys derived for this salt and iteration count (fresh,
    /// or kept from an earlier login: see [`Keys`]).
    pub fn client_final_with(&self, keys: &Keys, sf: &ServerFirst) -> ClientFinal {
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let without_proof = format!("c={},r={}", STANDARD.encode(GS2_HEADER), sf.nonce);
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, sf.raw);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(client_signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        ClientFinal {
            message: format!("{without_proof},p={}", STANDARD.encode(proof)),
            server_signature: hmac(&keys.server_key, auth_message.as_bytes()),
        }
    }
}

/// The server-first message, checked.
pub(crate) struct ServerFirst {
    raw: String,
    nonce: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// What the client derives from its password for one salt and iteration count.
///
/// RFC 5802 §5.1 lets a client keep the ClientKey and ServerKey instead of deriving them at
/// every login: on a phone that reconnects after every network change, that is thousands of
/// HMAC rounds (battery, and delay before the session is back) saved per reconnect. Kept only
/// in memory, for as long as the client lives; a new salt or count (the password was changed,
/// the device re-registered) derives them again.
#[derive(Clone)]
pub(crate) struct Keys {
    salt: Vec<u8>,
    iterations: u32,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    /// PBKDF2 (slow by design: call it off the async I/O threads) and the two HMACs.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Keys {
        let salted =
            pushgate_core::credentials::salted_password(password.as_bytes(), salt, iterations);
        Keys {
            salt: salt.to_vec(),
            iterations,
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Whether these keys answer this server-first message.
    pub fn fit(&self, sf: &ServerFirst) -> bool {
        self.iterations == sf.iterations && self.salt == sf.salt
    }
}

impl ClientFinal {
    /// Checks the server-final message (`v=…`), which proves the server knows our verifier.
    pub fn verify_server_final(&self, server_final: &str) -> Result<(), ClientError> {
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(ClientError::Auth(format!("server reported {e}")));
        }
        let v = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or_else(|| protocol("server-final without signature"))?;
        let got = STANDARD
            .decode(v)
            .map_err(|_| protocol("server signature is not base64"))?;
        if got.as_slice() != self.server_signature.as_slice() {
            return Err(ClientError::Auth(
                "the server's SCRAM signature does not verify (not the real server?)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3: user "user", password "pencil".
    const CNONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    #[test]
    fn rfc7677_vector() -> Result<(), ClientError> {
        let c = ScramClient::with_nonce("user", CNONCE);
        assert_eq!(c.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let fin = c.client_final("pencil", SERVER_FIRST)?;
        assert_eq!(fin.message, CLIENT_FINAL);
        fin.verify_server_final(SERVER_FINAL)?;
        Ok(())
    }

    #[test]
    fn wrong_server_signature_is_refused() -> Result<(), ClientError> {
        let c = ScramClient::with_nonce("user", CNONCE);
        // a server that does not know the password cannot produce the signature
        let fin = c.client_final("not-pencil", SERVER_FIRST)?;
        assert!(matches!(
            fin.verify_server_final(SERVER_FINAL),
            Err(ClientError::Auth(_))
        ));
        assert!(matches!(
            fin.verify_server_final("e=invalid-proof"),
            Err(ClientError::Auth(_))
        ));
        Ok(())
    }

    #[test]
    fn hostile_server_first_is_refused() {
        let c = ScramClient::with_nonce("user", CNONCE);
        for bad in [
            // nonce not extending ours
            "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            // nonce not extended at all
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            // absurd work factors
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4294967295",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
            "m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,i=4096",
        ] {
            assert!(
                matches!(c.client_final("pencil", bad), Err(ClientError::Protocol(_))),
                "{bad}"
            );
        }
    }

    /// Keys kept from one login answer the next exchange (new nonces) exactly as the
    /// password would, and only fit the same salt and count.
    #[test]
    fn kept_keys_answer_like_the_password() -> Result<(), ClientError> {
        let first = ScramClient::with_nonce("user", CNONCE);
        let sf = first.server_first(SERVER_FIRST)?;
        let keys = Keys::derive("pencil", &sf.salt, sf.iterations);
        assert_eq!(first.client_final_with(&keys, &sf).message, CLIENT_FINAL);

        let again = ScramClient::with_nonce("user", "anothernonce");
        let server_first = "r=anothernonceXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let sf2 = again.server_first(server_first)?;
        assert!(keys.fit(&sf2));
        let kept = again.client_final_with(&keys, &sf2);
        let fresh = again.client_final("pencil", server_first)?;
        assert_eq!(kept.message, fresh.message);
        assert_eq!(kept.server_signature, fresh.server_signature);

        let other_salt = again.server_first("r=anothernonceXYZ,s=c2FsdA==,i=4096")?;
        assert!(!keys.fit(&other_salt));
        let other_count =
            again.server_first("r=anothernonceXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=8192")?;
        assert!(!keys.fit(&other_count));
        Ok(())
    }

    #[test]
    fn username_cannot_inject_attributes() {
        let c = ScramClient::with_nonce("a,r=x=y", "n");
        assert_eq!(c.client_first(), "n,,n=a=2Cr=3Dx=3Dy,r=n");
    }
}
