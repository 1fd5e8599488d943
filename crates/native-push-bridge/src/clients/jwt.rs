//! Compact JWS (JWT) signing for the three tokens the providers ask for: APNs provider tokens
//! and VAPID tokens (ES256), and Google's service-account assertion (RS256).
//!
//! Written here rather than taken from `jsonwebtoken`: each token is a fixed two-part JSON
//! signed once, which is a few lines on top of the crypto the bridge has anyway (`p256` for
//! EC, `ring` for RSA), while `jsonwebtoken` 10 needs one of two whole crypto backends
//! chosen by feature (`aws_lc_rs`, which is not wanted here, or `rust_crypto`, which brings
//! the `rsa` crate and its Marvin timing advisory into production).

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde_json::Value;

/// base64url without padding, as JOSE and Web Push write it.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url with or without padding: subscriptions and keys arrive both ways,
/// depending on the browser or tool that produced them.
pub(crate) fn b64url_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s.trim())
}

/// `header.claims` as the signing input.
fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// An ES256 JWT: the signature is the raw 64-byte `r || s` (RFC 7518 §3.4), not DER.
pub(crate) fn es256(header: &Value, claims: &Value, key: &SigningKey) -> String {
    let input = signing_input(header, claims);
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", b64url(&sig.to_bytes()))
}

/// An RS256 JWT (RSASSA-PKCS1-v1_5 with SHA-256).
pub(crate) fn rs256(
    header: &Value,
    claims: &Value,
    key: &ring::signature::RsaKeyPair,
) -> Result<String, String> {
    let input = signing_input(header, claims);
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| "RSA signing failed".to_string())?;
    Ok(format!("{input}.{}", b64url(&sig)))
}

/// An EC P-256 private key as operators hold one: a PKCS#8 PEM (`BEGIN PRIVATE KEY`, Apple's
/// `.p8` files), a SEC1 PEM (`BEGIN EC PRIVATE KEY`, `openssl ecparam`), or the raw 32-byte
/// scalar in base64url (what Web Push libraries print as the VAPID private key).
pub(crate) fn parse_ec_key(text: &str) -> Result<SigningKey, String> {
    use p256::pkcs8::DecodePrivateKey;
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        if let Ok(k) = SigningKey::from_pkcs8_pem(text) {
            return Ok(k);
        }
        return p256::SecretKey::from_sec1_pem(text)
            .map(SigningKey::from)
            .map_err(|_| "not a P-256 private key in PKCS#8 or SEC1 PEM".to_string());
    }
    let raw = b64url_decode(text).map_err(|_| "not PEM and not base64url".to_string())?;
    if raw.len() != 32 {
        return Err(format!(
            "a raw P-256 private key has 32 bytes, this one {}",
            raw.len()
        ));
    }
    SigningKey::from_slice(&raw).map_err(|_| "not a valid P-256 private key".to_string())
}

/// An RSA private key in PEM (PKCS#8 as in Google service-account files, or PKCS#1).
pub(crate) fn parse_rsa_key(pem: &str) -> Result<ring::signature::RsaKeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("private_key is not a PEM private key: {e}"))?;
    let parsed = match &der {
        PrivateKeyDer::Pkcs8(k) => ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => return Err("private_key is not an RSA key".into()),
    };
    parsed.map_err(|e| format!("private_key is not a usable RSA key: {e}"))
}

/// Splits a JWT and decodes its header and claims, for the stand-ins' checks.
#[cfg(any(test, feature = "stand-ins"))]
pub(crate) fn decode_unverified(token: &str) -> Option<(Value, Value, String, Vec<u8>)> {
    let mut parts = token.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header = serde_json::from_slice(&b64url_decode(h).ok()?).ok()?;
    let claims = serde_json::from_slice(&b64url_decode(c).ok()?).ok()?;
    Some((header, claims, format!("{h}.{c}"), b64url_decode(s).ok()?))
}

/// Verifies an ES256 JWT with `key`; the header and claims when the signature holds.
#[cfg(any(test, feature = "stand-ins"))]
pub(crate) fn verify_es256(token: &str, key: &p256::ecdsa::VerifyingKey) -> Option<(Value, Value)> {
    use p256::ecdsa::signature::Verifier;
    let (header, claims, input, sig) = decode_unverified(token)?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return None;
    }
    let sig = Signature::from_slice(&sig).ok()?;
    key.verify(input.as_bytes(), &sig).ok()?;
    Some((header, claims))
}

/// Verifies an RS256 JWT with an RSA public key (PKCS#1 `RSAPublicKey` DER).
#[cfg(any(test, feature = "stand-ins"))]
pub(crate) fn verify_rs256(token: &str, pkcs1_public_der: &[u8]) -> Option<(Value, Value)> {
    let (header, claims, input, sig) = decode_unverified(token)?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return None;
    }
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        pkcs1_public_der,
    )
    .verify(input.as_bytes(), &sig)
    .ok()?;
    Some((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use serde_json::json;

    fn key() -> SigningKey {
        SigningKey::random(&mut rand::rngs::OsRng)
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key_only() {
        let k = key();
        let t = es256(
            &json!({"alg": "ES256", "kid": "K"}),
            &json!({"iss": "T", "iat": 1}),
            &k,
        );
        let (h, c) = verify_es256(&t, k.verifying_key()).expect("verifies");
        assert_eq!(
            (h["kid"].as_str(), c["iss"].as_str()),
            (Some("K"), Some("T"))
        );
        assert!(verify_es256(&t, key().verifying_key()).is_none());
        let tampered = t.replacen('.', ".e30", 1);
        assert!(verify_es256(&tampered, k.verifying_key()).is_none());
    }

    #[test]
    fn ec_keys_parse_from_every_form_operators_have() {
        let k = key();
        let pkcs8 = k.to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        let sec1 = p256::SecretKey::from(k.clone())
            .to_sec1_pem(LineEnding::LF)
            .expect("sec1");
        let raw = b64url(&k.to_bytes());
        for text in [pkcs8.as_str(), sec1.as_str(), raw.as_str()] {
            let parsed = parse_ec_key(text).expect("parses");
            assert_eq!(parsed.verifying_key(), k.verifying_key());
        }
        assert!(parse_ec_key("AAAA").is_err());
        assert!(
            parse_ec_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err()
        );
        assert!(parse_ec_key(&b64url(&[0u8; 32])).is_err());
    }

    #[test]
    fn padded_and_unpadded_base64url_both_decode() {
        assert_eq!(b64url_decode("AQI").ok(), Some(vec![1, 2]));
        assert_eq!(b64url_decode("AQI=").ok(), Some(vec![1, 2]));
        assert!(b64url_decode("A+I=").is_err());
    }

    #[test]
    fn rsa_keys_must_be_rsa() {
        let ec = key().to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        assert!(parse_rsa_key(&ec).is_err());
        assert!(parse_rsa_key("nope").is_err());
    }
}
