//! Server side of SASL SCRAM-SHA-256 (RFC 5802, RFC 7677) and PLAIN (RFC 4616), checked
//! against the stored verifier only (the password is never stored).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pushgate_core::credentials::hmac_sha256;
use pushgate_core::ScramCredentials;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why an authentication exchange failed; maps to a SASL failure condition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("malformed SASL message: {0}")]
    Malformed(&'static str),
    #[error("credentials rejected")]
    NotAuthorized,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("account temporarily locked after failed logins")]
    Locked,
}

impl SaslError {
    /// The `<failure/>` child (RFC 6120 §6.5).
    pub fn condition(&self) -> &'static str {
        match self {
            SaslError::Malformed(_) => "malformed-request",
            SaslError::NotAuthorized => "not-authorized",
            SaslError::ChannelBinding => "encryption-required",
            SaslError::Locked => "temporary-auth-failure",
        }
    }
}

fn decode_b64(s: &str) -> Result<Vec<u8>, SaslError> {
    let s = s.trim();
    if s == "=" {
        return Ok(vec![]);
    }
    STANDARD
        .decode(s)
        .map_err(|_| SaslError::Malformed("invalid base64"))
}

/// The user name out of a SCRAM `saslname` or PLAIN authcid: `local` or `local@domain`.
pub fn username_local(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// First step of SCRAM: the client-first message, parsed.
#[derive(Debug)]
pub struct ScramStart {
    pub username: String,
    client_first_bare: String,
    gs2_header: String,
    client_nonce: String,
}

/// Parses `n,,n=user,r=nonce` (base64-decoded already).
pub fn scram_client_first(msg: &[u8]) -> Result<ScramStart, SaslError> {
    let s = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let mut parts = s.splitn(3, ',');
    let cb = parts
        .next()
        .ok_or(SaslError::Malformed("missing gs2 header"))?;
    let authz = parts
        .next()
        .ok_or(SaslError::Malformed("missing gs2 header"))?;
    let bare = parts
        .next()
        .ok_or(SaslError::Malformed("missing client-first-bare"))?;
    match cb {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(SaslError::ChannelBinding),
        _ => return Err(SaslError::Malformed("bad gs2 channel binding flag")),
    }
    let mut username = None;
    let mut nonce = None;
    for attr in bare.split(',') {
        if let Some(v) = attr.strip_prefix("n=") {
            username = Some(v.replace("=2C", ",").replace("=3D", "="));
        } else if let Some(v) = attr.strip_prefix("r=") {
            nonce = Some(v.to_string());
        } else if attr.starts_with("m=") {
            return Err(SaslError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
    }
    let username = username
        .filter(|u| !u.is_empty())
        .ok_or(SaslError::Malformed("missing user name"))?;
    let client_nonce = nonce
        .filter(|n| !n.is_empty())
        .ok_or(SaslError::Malformed("missing nonce"))?;
    Ok(ScramStart {
        username,
        client_first_bare: bare.to_string(),
        gs2_header: format!("{cb},{authz},"),
        client_nonce,
    })
}

/// Server state between the challenge and the client's final message.
#[derive(Debug)]
pub struct ScramPending {
    auth_prefix: String,
    nonce: String,
    gs2_header: String,
    creds: ScramCredentials,
}

/// Builds the server-first message for known credentials.
pub fn scram_server_first(start: &ScramStart, creds: &ScramCredentials) -> (String, ScramPending) {
    let mut r = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut r);
    let nonce = format!("{}{}", start.client_nonce, STANDARD.encode(r));
    let server_first = format!("r={nonce},s={},i={}", creds.salt, creds.iterations);
    let pending = ScramPending {
        auth_prefix: format!("{},{server_first}", start.client_first_bare),
        nonce,
        gs2_header: start.gs2_header.clone(),
        creds: creds.clone(),
    };
    (server_first, pending)
}

/// Checks the client-final message; returns the server-final message (`v=…`).
pub fn scram_client_final(p: &ScramPending, msg: &[u8]) -> Result<String, SaslError> {
    let s = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let (without_proof, proof) = s
        .rsplit_once(",p=")
        .ok_or(SaslError::Malformed("missing proof"))?;
    let mut cbind = None;
    let mut nonce = None;
    for attr in without_proof.split(',') {
        if let Some(v) = attr.strip_prefix("c=") {
            cbind = Some(v);
        } else if let Some(v) = attr.strip_prefix("r=") {
            nonce = Some(v);
        }
    }
    let expected_cbind = STANDARD.encode(p.gs2_header.as_bytes());
    if cbind != Some(expected_cbind.as_str()) {
        return Err(SaslError::Malformed("channel binding data does not match"));
    }
    if nonce != Some(p.nonce.as_str()) {
        return Err(SaslError::NotAuthorized);
    }
    let proof = decode_b64(proof)?;
    let stored_key = decode_b64(&p.creds.stored_key)?;
    let server_key = decode_b64(&p.creds.server_key)?;
    if proof.len() != 32 || stored_key.len() != 32 {
        return Err(SaslError::NotAuthorized);
    }
    let auth_message = format!("{},{without_proof}", p.auth_prefix);
    let client_sig = hmac_sha256(&stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof
        .iter()
        .zip(client_sig.iter())
        .map(|(a, b)| a ^ b)
        .collect();
    let computed: [u8; 32] = Sha256::digest(&client_key).into();
    if !bool::from(computed.ct_eq(stored_key.as_slice())) {
        return Err(SaslError::NotAuthorized);
    }
    let server_sig = hmac_sha256(&server_key, auth_message.as_bytes());
    Ok(format!("v={}", STANDARD.encode(server_sig)))
}

/// Parses PLAIN (`authzid NUL authcid NUL password`) into (authcid, password).
pub fn plain_parse(msg: &[u8]) -> Result<(String, String), SaslError> {
    let mut parts = msg.split(|b| *b == 0);
    let _authz = parts
        .next()
        .ok_or(SaslError::Malformed("PLAIN needs three fields"))?;
    let user = parts
        .next()
        .ok_or(SaslError::Malformed("PLAIN needs three fields"))?;
    let pass = parts
        .next()
        .ok_or(SaslError::Malformed("PLAIN needs three fields"))?;
    if parts.next().is_some() {
        return Err(SaslError::Malformed("PLAIN has too many fields"));
    }
    let user = String::from_utf8(user.to_vec()).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let pass = String::from_utf8(pass.to_vec()).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    Ok((user, pass))
}

/// Checks a PLAIN password against the SCRAM verifier.
pub fn plain_verify(creds: &ScramCredentials, password: &str) -> Result<(), SaslError> {
    if pushgate_core::credentials::verify_password(creds, password) {
        Ok(())
    } else {
        Err(SaslError::NotAuthorized)
    }
}

/// Decodes the base64 payload of `<auth>`/`<response>`.
pub fn payload(text: &str) -> Result<Vec<u8>, SaslError> {
    decode_b64(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::credentials::{salted_password, scram_credentials};

    /// A client computing its proof the RFC 5802 way.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> String {
        let attrs: Vec<&str> = server_first.split(',').collect();
        let nonce = &attrs[0][2..];
        let salt = STANDARD.decode(&attrs[1][2..]).unwrap_or_default();
        let iters: u32 = attrs[2][2..].parse().unwrap_or(0);
        let salted = salted_password(password.as_bytes(), &salt, iters);
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac_sha256(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(sig.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        format!("{without_proof},p={}", STANDARD.encode(proof))
    }

    #[test]
    fn scram_round_trip() {
        let creds = scram_credentials("pencil", b"0123456789abcdef", 4096);
        let start = scram_client_first(b"n,,n=dabc@pushgate.local,r=fyko+d2lbbFgONRv9qkxdawL")
            .expect("parse");
        assert_eq!(username_local(&start.username), "dabc");
        let (server_first, pending) = scram_server_first(&start, &creds);
        let fin = client_final(
            "pencil",
            "n=dabc@pushgate.local,r=fyko+d2lbbFgONRv9qkxdawL",
            &server_first,
        );
        let v = scram_client_final(&pending, fin.as_bytes()).expect("accepted");
        assert!(v.starts_with("v="));
        let bad = client_final(
            "wrong",
            "n=dabc@pushgate.local,r=fyko+d2lbbFgONRv9qkxdawL",
            &server_first,
        );
        assert_eq!(
            scram_client_final(&pending, bad.as_bytes()),
            Err(SaslError::NotAuthorized)
        );
    }

    #[test]
    fn scram_refuses_bad_input() {
        assert_eq!(
            scram_client_first(b"p=tls-unique,,n=a,r=b").err(),
            Some(SaslError::ChannelBinding)
        );
        assert!(scram_client_first(b"n,,r=b").is_err());
        assert!(scram_client_first(b"garbage").is_err());
    }

    #[test]
    fn plain() {
        let creds = scram_credentials("pw", b"salt-salt-salt-1", 4096);
        let (u, p) = plain_parse(b"\0dev1\0pw").expect("parse");
        assert_eq!(u, "dev1");
        assert!(plain_verify(&creds, &p).is_ok());
        assert_eq!(plain_verify(&creds, "nope"), Err(SaslError::NotAuthorized));
        assert!(plain_parse(b"only-one").is_err());
    }
}
