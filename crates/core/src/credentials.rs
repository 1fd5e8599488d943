//! Device credentials.
//!
//! A device's XMPP password is derived, not stored: `HMAC-SHA256(device_secret, app ‖ device ‖
//! generation)`. The ingress can show it again on every registration (the API contract returns
//! it on each `PUT`), the store keeps only the SCRAM verifier, and bumping the generation (the
//! device moved to another user) invalidates the old password at once.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::device::ScramCredentials;

type HmacSha256 = Hmac<Sha256>;

/// SCRAM iteration count for device verifiers (RFC 7677 minimum is 4096).
pub const SCRAM_ITERATIONS: u32 = 4096;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 as used by SCRAM and webhook signatures.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    hmac(key, data)
}

/// SHA-256, hex encoded (API key and idempotency key hashes).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The opaque local part of a device's JID: unique per (app, device), safe in any JID.
pub fn jid_local(app_id: &str, device_id: &str) -> String {
    let h = Sha256::digest(format!("{app_id}/{device_id}").as_bytes());
    format!("d{}", &hex::encode(h)[..30])
}

/// The device's XMPP password for this generation.
pub fn device_password(secret: &str, app_id: &str, device_id: &str, generation: u32) -> String {
    let mac = hmac(
        secret.as_bytes(),
        format!("{app_id}\n{device_id}\n{generation}").as_bytes(),
    );
    URL_SAFE_NO_PAD.encode(&mac[..24])
}

/// `SaltedPassword := Hi(password, salt, i)` (RFC 5802).
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// The server-side SCRAM-SHA-256 verifier for a password.
pub fn scram_credentials(password: &str, salt: &[u8], iterations: u32) -> ScramCredentials {
    let salted = salted_password(password.as_bytes(), salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    ScramCredentials {
        salt: STANDARD.encode(salt),
        iterations,
        stored_key: STANDARD.encode(stored_key),
        server_key: STANDARD.encode(server_key),
    }
}

/// Checks a password against a stored SCRAM verifier (XMPP PLAIN, HTTP Basic for devices).
/// Deliberately slow (PBKDF2): call it off the I/O threads.
pub fn verify_password(creds: &ScramCredentials, password: &str) -> bool {
    let (Ok(salt), Ok(stored)) = (
        STANDARD.decode(&creds.salt),
        STANDARD.decode(&creds.stored_key),
    ) else {
        return false;
    };
    let salted = salted_password(password.as_bytes(), &salt, creds.iterations);
    let client_key = hmac(&salted, b"Client Key");
    let computed: [u8; 32] = Sha256::digest(client_key).into();
    // constant-time: a timing difference must not reveal how much of the key matched
    computed.len() == stored.len()
        && computed
            .iter()
            .zip(stored.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil"
        let salt = STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap_or_default();
        let c = scram_credentials("pencil", &salt, 4096);
        let salted = salted_password(b"pencil", &salt, 4096);
        let server_key = hmac(&salted, b"Server Key");
        assert_eq!(c.server_key, STANDARD.encode(server_key));
        // ServerSignature from the RFC's exchange, recomputed from our ServerKey
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let sig = hmac(&server_key, auth.as_bytes());
        assert_eq!(
            STANDARD.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn passwords_change_with_generation() {
        let a = device_password("s3cret", "app_1", "dev", 0);
        let b = device_password("s3cret", "app_1", "dev", 1);
        assert_ne!(a, b);
        assert_eq!(a, device_password("s3cret", "app_1", "dev", 0));
        assert_eq!(jid_local("app_1", "dev").len(), 31);
        let c = scram_credentials(&a, b"0123456789abcdef", 4096);
        assert!(verify_password(&c, &a));
        assert!(!verify_password(&c, &b));
    }
}
