//! Key types: Ed25519 signing keys (RFC 8032, verified strictly) and X25519 KEM keys (RFC 7748).
//!
//! Owns the newtypes every other module uses, so that the rules live in one place:
//! - a [`VerifyingKey`] can only be built from bytes that are not a weak (small-order) point;
//! - every verification is ed25519-dalek's `verify_strict`;
//! - a [`KemPublicKey`] can only be built from a point that is not of low order, and an X25519 agreement
//!   with an all-zero result is an error;
//! - secret types zeroize on drop and print as `[redacted]`.
//!
//! It also owns the signed envelope: a body and the signature over exactly those bytes.

use std::fmt;

use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};

/// A key or signature could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The bytes are not a valid Ed25519 public key, or the key is a weak (small-order) point.
    #[error("invalid or weak Ed25519 public key")]
    WeakOrInvalidVerifyingKey,
    /// The X25519 public key is of low order: an agreement with it would be all zero.
    #[error("low-order X25519 public key")]
    LowOrderKemKey,
    /// A byte string had the wrong length for a key.
    #[error("a key must be 32 bytes, got {0}")]
    BadLength(usize),
}

/// A signature did not verify. Carries no detail on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("signature verification failed")]
pub struct BadSignature;

/// An Ed25519 signing key. Zeroized on drop; never printed.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// Draws a fresh key.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self(ed25519_dalek::SigningKey::generate(rng))
    }

    /// Rebuilds a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for sealing into a key file.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    /// Signs `message` (deterministic, RFC 8032).
    pub fn sign(&self, message: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey([redacted], public {:?})",
            self.verifying_key()
        )
    }
}

/// An Ed25519 public key that is canonical enough to decode and not of small order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl VerifyingKey {
    /// Parses a public key, refusing invalid encodings and weak keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::WeakOrInvalidVerifyingKey)?;
        if key.is_weak() {
            return Err(KeyError::WeakOrInvalidVerifyingKey);
        }
        Ok(Self(key))
    }

    /// Parses a public key from a slice of any length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadLength(bytes.len()))?;
        Self::from_bytes(arr)
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Verifies `signature` over `message` with `verify_strict`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), BadSignature> {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0
            .verify_strict(message, &sig)
            .map_err(|_| BadSignature)
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", hex::encode(self.to_bytes()))
    }
}

/// A 64-byte Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    /// Parses a signature from a slice, which must be 64 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

/// An X25519 secret key for receiving HPKE-wrapped keys. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct KemSecretKey(x25519_dalek::StaticSecret);

impl KemSecretKey {
    /// Draws a fresh key.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(rng))
    }

    /// Rebuilds a key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The 32 secret bytes, for sealing into a key file.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public_key(&self) -> KemPublicKey {
        KemPublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// X25519 agreement with `peer`. An all-zero result (a non-contributory peer key) is refused.
    pub fn agree(&self, peer: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(KeyError::LowOrderKemKey);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

impl fmt::Debug for KemSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KemSecretKey([redacted], public {:?})",
            self.public_key()
        )
    }
}

/// An X25519 public key that is not of low order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KemPublicKey([u8; 32]);

impl KemPublicKey {
    /// Parses a public key, refusing the low-order points (every agreement with them is all zero).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        // X25519 clamps scalars to a multiple of the cofactor 8, so any clamped scalar sends a point of
        // order dividing 8 (on the curve or its twist) to zero, and no other point.
        const PROBE: [u8; 32] = [0x42; 32];
        if x25519_dalek::x25519(PROBE, *bytes) == [0u8; 32] {
            return Err(KeyError::LowOrderKemKey);
        }
        Ok(Self(*bytes))
    }

    /// Parses a public key from a slice of any length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadLength(bytes.len()))?;
        Self::from_bytes(arr)
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KemPublicKey({})", hex::encode(self.0))
    }
}

/// A body and the Ed25519 signature over exactly those bytes.
///
/// Parsing an envelope does not verify it: the verifier must know which key to expect, which only the
/// format module of the body knows.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SignedEnvelope {
    /// The signed bytes, exactly as stored and sent.
    pub body: Vec<u8>,
    /// The signature over `body`.
    pub signature: Signature,
}

// A grant's sealed bundle and its other fields fit an envelope.
const _: () =
    assert!(SignedEnvelope::MAX_BODY >= crate::wrap::SealedBytes::MAX_CIPHERTEXT + 32 + 16 * 1024);

impl SignedEnvelope {
    /// The largest body accepted inside an envelope: room for a grant that carries the largest key
    /// bundle ([`crate::wrap::SealedBytes::MAX_CIPHERTEXT`]) and its other fields, whose base64 still
    /// fits the server's limit on a statement's request body (256 KiB).
    pub const MAX_BODY: usize = 160 * 1024;

    /// Signs `body` with `key`.
    pub fn sign(body: Vec<u8>, key: &SigningKey) -> Self {
        let signature = key.sign(&body);
        Self { body, signature }
    }

    /// Verifies the signature with `key`.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), BadSignature> {
        key.verify(&self.body, &self.signature)
    }

    /// Encodes as `CMRV 1 Signed || len || body || signature`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::Signed);
        w.bytes(&self.body).array(&self.signature.0);
        w.finish()
    }

    /// Decodes an envelope, without verifying it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Kind::Signed)?;
        let body = r.bytes("body", Self::MAX_BODY)?.to_vec();
        let signature = Signature(r.array()?);
        r.finish()?;
        Ok(Self { body, signature })
    }
}

/// Verifies many envelopes, each under its own key, faster than one by one.
///
/// Each item first gets the cheap checks `verify_strict` makes (S canonical, R canonical and not of small
/// order; weak keys were refused on parsing); items that pass are verified together with
/// ed25519-dalek's `verify_batch`, the others one by one with `verify_strict`. If the batch fails, every
/// item is checked with `verify_strict` to name the first bad one.
///
/// One difference from `verify_strict` remains, and it is documented in docs/formats.md: a signature whose
/// R has a small-order component can satisfy the batch equation while failing the strict one. Only the
/// holder of the signing key can make such a signature (the equation still cannot be forged), so it is a
/// malleability of the signer's own statements, never a forgery. Statements are checked with
/// `verify_strict` when they are accepted; this path serves readers and auditors.
pub fn verify_many(items: &[(&SignedEnvelope, VerifyingKey)]) -> Result<(), usize> {
    // One signature gains nothing from the batch equation: verify it strictly.
    if let [(env, key)] = items {
        return key.verify(&env.body, &env.signature).map_err(|_| 0);
    }
    let mut batchable = Vec::with_capacity(items.len());
    for (i, (env, key)) in items.iter().enumerate() {
        if batch_safe(env) {
            batchable.push(i);
        } else if key.verify(&env.body, &env.signature).is_err() {
            return Err(i);
        }
    }
    if batchable.len() < 2 {
        // Nothing to batch together: verify the one item, if any, strictly.
        return match batchable.first() {
            Some(&i) => items[i]
                .1
                .verify(&items[i].0.body, &items[i].0.signature)
                .map_err(|_| i),
            None => Ok(()),
        };
    }
    if batchable.is_empty() {
        return Ok(());
    }
    let messages: Vec<&[u8]> = batchable.iter().map(|&i| &items[i].0.body[..]).collect();
    let signatures: Vec<ed25519_dalek::Signature> = batchable
        .iter()
        .map(|&i| ed25519_dalek::Signature::from_bytes(&items[i].0.signature.0))
        .collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = batchable.iter().map(|&i| items[i].1.0).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return Ok(());
    }
    for &i in &batchable {
        let (env, key) = &items[i];
        if key.verify(&env.body, &env.signature).is_err() {
            return Err(i);
        }
    }
    // The batch failed yet every signature verifies alone (possible only with small-order components,
    // which the batch equation weighs randomly): `verify_strict` is the definition, so accept.
    Ok(())
}

/// The checks `verify_strict` makes besides the equation: S canonical, R canonical and not of small order.
fn batch_safe(env: &SignedEnvelope) -> bool {
    use curve25519_dalek::edwards::CompressedEdwardsY;
    use curve25519_dalek::scalar::Scalar;
    let sig = &env.signature.0;
    let r_bytes: [u8; 32] = sig[..32].try_into().expect("64-byte signature");
    let s_bytes: [u8; 32] = sig[32..].try_into().expect("64-byte signature");
    if Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)).is_none() {
        return false;
    }
    match CompressedEdwardsY(r_bytes).decompress() {
        Some(r) => r.compress().0 == r_bytes && !r.is_small_order(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_strictly() {
        let mut rng = rand::rng();
        let key = SigningKey::generate(&mut rng);
        let sig = key.sign(b"message");
        key.verifying_key().verify(b"message", &sig).unwrap();
        assert_eq!(
            key.verifying_key().verify(b"messagE", &sig),
            Err(BadSignature)
        );
        let other = SigningKey::generate(&mut rng);
        assert_eq!(
            other.verifying_key().verify(b"message", &sig),
            Err(BadSignature)
        );
    }

    #[test]
    fn weak_verifying_keys_are_refused() {
        // The identity point (y = 1) is of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            VerifyingKey::from_bytes(&identity),
            Err(KeyError::WeakOrInvalidVerifyingKey)
        );
        assert_eq!(
            VerifyingKey::from_slice(&[1u8; 31]),
            Err(KeyError::BadLength(31))
        );
    }

    #[test]
    fn low_order_kem_keys_are_refused() {
        // 0 and 1 are low-order u-coordinates on Curve25519.
        assert_eq!(
            KemPublicKey::from_bytes(&[0u8; 32]),
            Err(KeyError::LowOrderKemKey)
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            KemPublicKey::from_bytes(&one),
            Err(KeyError::LowOrderKemKey)
        );
        let sk = KemSecretKey::generate(&mut rand::rng());
        assert_eq!(sk.agree(&[0u8; 32]).unwrap_err(), KeyError::LowOrderKemKey);
        KemPublicKey::from_bytes(&sk.public_key().to_bytes()).unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let mut rng = rand::rng();
        let key = SigningKey::generate(&mut rng);
        let seed_hex = hex::encode(*key.seed());
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted") && !shown.contains(&seed_hex));
        let kem = KemSecretKey::generate(&mut rng);
        let secret_hex = hex::encode(*kem.to_bytes());
        let shown = format!("{kem:?}");
        assert!(shown.contains("redacted") && !shown.contains(&secret_hex));
    }

    #[test]
    fn envelope_round_trip_and_tamper() {
        let key = SigningKey::generate(&mut rand::rng());
        let env = SignedEnvelope::sign(b"body".to_vec(), &key);
        let decoded = SignedEnvelope::decode(&env.encode()).unwrap();
        assert_eq!(decoded, env);
        decoded.verify(&key.verifying_key()).unwrap();
        let mut bytes = env.encode();
        let n = bytes.len();
        bytes[n - 64 - 1] ^= 1; // the last byte of the body
        let tampered = SignedEnvelope::decode(&bytes).unwrap();
        assert_eq!(tampered.verify(&key.verifying_key()), Err(BadSignature));
    }
}
