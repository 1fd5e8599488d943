//! Web Push message encryption (RFC 8291) in the `aes128gcm` content coding (RFC 8188): the
//! push service relays the body without being able to read it, only the subscribed browser
//! (holder of the `p256dh` private key and the `auth` secret) can.
//!
//! One record of at most 4096 bytes, padding delimiter `0x02` and no padding: Web Push
//! messages are small, push services limit the body to 4096 bytes, and a single record is
//! what every browser accepts.

use p256::{PublicKey, SecretKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf;

/// Record size announced in the header (RFC 8188 `rs`).
pub(crate) const RECORD_SIZE: u32 = 4096;
/// `salt(16) || rs(4) || idlen(1) || keyid(65)`.
const HEADER_LEN: usize = 16 + 4 + 1 + 65;
/// AES-GCM tag.
const TAG_LEN: usize = 16;
/// Push services accept bodies up to 4096 bytes (RFC 8030 §7.2 lets them refuse more, and the
/// major ones do), header included.
pub(crate) const MAX_BODY: usize = 4096;
/// The longest plaintext that fits: body limit − header − delimiter − tag.
pub(crate) const MAX_PLAINTEXT: usize = MAX_BODY - HEADER_LEN - 1 - TAG_LEN;

/// Why a message could not be encrypted (or, for the stand-ins, decrypted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EceError {
    #[error("subscription key p256dh is not a P-256 public key")]
    BadPublicKey,
    #[error("subscription auth secret must be 16 bytes")]
    BadAuthSecret,
    #[error("payload too large ({0} bytes; at most {MAX_PLAINTEXT} fit into one Web Push record)")]
    TooLarge(usize),
    #[error("encryption failed")]
    Crypto,
    #[cfg(any(test, feature = "stand-ins"))]
    #[error("malformed aes128gcm body")]
    Malformed,
}

/// The subscription's keys, as the browser handed them out.
pub(crate) struct Receiver {
    pub public: PublicKey,
    pub auth: [u8; 16],
}

impl Receiver {
    /// From the subscription's raw `p256dh` (65-byte uncompressed point) and `auth` values.
    pub(crate) fn from_raw(p256dh: &[u8], auth: &[u8]) -> Result<Receiver, EceError> {
        let public = PublicKey::from_sec1_bytes(p256dh).map_err(|_| EceError::BadPublicKey)?;
        let auth: [u8; 16] = auth.try_into().map_err(|_| EceError::BadAuthSecret)?;
        Ok(Receiver { public, auth })
    }
}

/// Encrypts `plaintext` for `to` with a fresh sender key and salt.
pub(crate) fn encrypt(plaintext: &[u8], to: &Receiver) -> Result<Vec<u8>, EceError> {
    let sender = SecretKey::random(&mut rand::rngs::OsRng);
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    encrypt_with(plaintext, to, &sender, salt)
}

/// [`encrypt`] with the sender key and salt given, so the RFC's example can be reproduced.
pub(crate) fn encrypt_with(
    plaintext: &[u8],
    to: &Receiver,
    sender: &SecretKey,
    salt: [u8; 16],
) -> Result<Vec<u8>, EceError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EceError::TooLarge(plaintext.len()));
    }
    let as_public = sender.public_key().to_sec1_bytes();
    let ua_public = to.public.to_sec1_bytes();
    let shared = p256::ecdh::diffie_hellman(sender.to_nonzero_scalar(), to.public.as_affine());
    let (cek, nonce) = derive(
        shared.raw_secret_bytes(),
        &to.auth,
        &ua_public,
        &as_public,
        &salt,
    )?;
    let mut body = Vec::with_capacity(HEADER_LEN + plaintext.len() + 1 + TAG_LEN);
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(65);
    body.extend_from_slice(&as_public);
    let mut record = Vec::with_capacity(plaintext.len() + 1 + TAG_LEN);
    record.extend_from_slice(plaintext);
    // the padding delimiter of the last (and only) record
    record.push(0x02);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| EceError::Crypto)?);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::empty(),
        &mut record,
    )
    .map_err(|_| EceError::Crypto)?;
    body.extend_from_slice(&record);
    Ok(body)
}

/// Decrypts a single-record `aes128gcm` body as the browser would, with the subscription's
/// private key. Only the stand-ins and tests need it.
#[cfg(any(test, feature = "stand-ins"))]
pub(crate) fn decrypt(body: &[u8], ua: &SecretKey, auth: &[u8; 16]) -> Result<Vec<u8>, EceError> {
    if body.len() < 21 {
        return Err(EceError::Malformed);
    }
    let salt: [u8; 16] = body[..16].try_into().map_err(|_| EceError::Malformed)?;
    let rs = u32::from_be_bytes(body[16..20].try_into().map_err(|_| EceError::Malformed)?);
    let idlen = usize::from(body[20]);
    let keyid = body.get(21..21 + idlen).ok_or(EceError::Malformed)?;
    let ciphertext = &body[21 + idlen..];
    if ciphertext.len() < TAG_LEN + 1 || ciphertext.len() > rs as usize {
        return Err(EceError::Malformed);
    }
    let as_public = PublicKey::from_sec1_bytes(keyid).map_err(|_| EceError::BadPublicKey)?;
    let shared = p256::ecdh::diffie_hellman(ua.to_nonzero_scalar(), as_public.as_affine());
    let ua_public = ua.public_key().to_sec1_bytes();
    let (cek, nonce) = derive(shared.raw_secret_bytes(), auth, &ua_public, keyid, &salt)?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| EceError::Crypto)?);
    let mut record = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut record,
        )
        .map_err(|_| EceError::Crypto)?;
    // strip the padding: zeros, then the delimiter, which must say "last record"
    let end = plain
        .iter()
        .rposition(|b| *b != 0)
        .ok_or(EceError::Malformed)?;
    if plain[end] != 0x02 {
        return Err(EceError::Malformed);
    }
    Ok(plain[..end].to_vec())
}

/// RFC 8291 §3.3–3.4 and RFC 8188 §2.2: the content encryption key and nonce.
fn derive(
    ecdh_secret: &[u8],
    auth: &[u8; 16],
    ua_public: &[u8],
    as_public: &[u8],
    salt: &[u8; 16],
) -> Result<([u8; 16], [u8; 12]), EceError> {
    // key_info = "WebPush: info" || 0x00 || ua_public || as_public
    let mut key_info = Vec::with_capacity(14 + ua_public.len() + as_public.len());
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(as_public);
    let mut ikm = [0u8; 32];
    hkdf_sha256(auth, ecdh_secret, &key_info, &mut ikm)?;
    let mut cek = [0u8; 16];
    hkdf_sha256(salt, &ikm, b"Content-Encoding: aes128gcm\0", &mut cek)?;
    let mut nonce = [0u8; 12];
    hkdf_sha256(salt, &ikm, b"Content-Encoding: nonce\0", &mut nonce)?;
    Ok((cek, nonce))
}

/// HKDF-SHA-256 (RFC 5869) extract-then-expand into `out`.
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), EceError> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| EceError::Crypto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::jwt::{b64url, b64url_decode};

    fn d(s: &str) -> Vec<u8> {
        b64url_decode(s).expect("test vector is base64url")
    }

    /// RFC 8291 §5 and Appendix A.
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AS_PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const SHARED: &str = "kyrL1jIIOHEzg3sM2ZWRHDRB62YACZhhSlknJ672kSs";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    fn receiver() -> Receiver {
        Receiver::from_raw(&d(UA_PUBLIC), &d(AUTH)).expect("receiver keys")
    }

    #[test]
    fn rfc8291_appendix_a_vector() {
        let sender = SecretKey::from_slice(&d(AS_PRIVATE)).expect("sender key");
        assert_eq!(b64url(&sender.public_key().to_sec1_bytes()), AS_PUBLIC);
        let ua = SecretKey::from_slice(&d(UA_PRIVATE)).expect("receiver key");
        let shared =
            p256::ecdh::diffie_hellman(sender.to_nonzero_scalar(), ua.public_key().as_affine());
        assert_eq!(b64url(shared.raw_secret_bytes()), SHARED);
        let salt: [u8; 16] = d(SALT).try_into().expect("16-byte salt");
        let body =
            encrypt_with(PLAINTEXT.as_bytes(), &receiver(), &sender, salt).expect("encrypts");
        assert_eq!(b64url(&body), BODY);
        let auth: [u8; 16] = d(AUTH).try_into().expect("16-byte auth");
        assert_eq!(
            decrypt(&d(BODY), &ua, &auth).ok(),
            Some(PLAINTEXT.as_bytes().to_vec())
        );
    }

    #[test]
    fn fresh_encryptions_differ_and_round_trip() {
        let ua = SecretKey::random(&mut rand::rngs::OsRng);
        let auth = [7u8; 16];
        let to = Receiver::from_raw(&ua.public_key().to_sec1_bytes(), &auth).expect("keys");
        let a = encrypt(b"hello", &to).expect("encrypts");
        let b = encrypt(b"hello", &to).expect("encrypts");
        assert_ne!(a, b);
        assert_eq!(decrypt(&a, &ua, &auth).ok(), Some(b"hello".to_vec()));
        // the wrong auth secret or a flipped bit does not decrypt
        assert_eq!(decrypt(&a, &ua, &[8u8; 16]), Err(EceError::Crypto));
        let mut flipped = a.clone();
        if let Some(last) = flipped.last_mut() {
            *last ^= 1;
        }
        assert_eq!(decrypt(&flipped, &ua, &auth), Err(EceError::Crypto));
    }

    #[test]
    fn the_body_limit_is_enforced_exactly() {
        let to = receiver();
        let fits = vec![b'x'; MAX_PLAINTEXT];
        assert_eq!(encrypt(&fits, &to).map(|b| b.len()).ok(), Some(MAX_BODY));
        assert_eq!(
            encrypt(&[b'x'; MAX_PLAINTEXT + 1], &to).err(),
            Some(EceError::TooLarge(MAX_PLAINTEXT + 1))
        );
    }

    #[test]
    fn bad_subscription_keys_are_named() {
        assert!(matches!(
            Receiver::from_raw(&[4u8; 65], &[0u8; 16]),
            Err(EceError::BadPublicKey)
        ));
        assert!(matches!(
            Receiver::from_raw(&d(UA_PUBLIC), &[0u8; 15]),
            Err(EceError::BadAuthSecret)
        ));
    }
}
