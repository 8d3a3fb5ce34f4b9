//! Key wrapping with HPKE (RFC 9180), base mode, suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
//! ChaCha20Poly1305.
//!
//! Owns the binding of a wrapped key to its context ([`WrapContext`]): format version, purpose, customer,
//! recipient, family, epoch, period and the grant or record id. The binding is the HPKE `info` (it enters
//! the key schedule) and the associated data. It does not own what is wrapped: callers pass 32-byte keys.
//! Every failure to open collapses into one opaque [`UnwrapError`], which leaks nothing.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::keys::{KemPublicKey, KemSecretKey};

type Kem = X25519HkdfSha256;

/// What a wrapped key is for. Part of the binding, so a key wrapped for one purpose never opens as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapPurpose {
    /// The customer's vault key, wrapped to a device or to the recovery key.
    VaultKey = 1,
    /// A family's period key, wrapped to a grantee.
    PeriodKey = 2,
    /// A company's append key for a family and epoch.
    AppendKey = 3,
    /// A bundle of chain keys for one grantee (grant, rotation or key delivery).
    KeyBundle = 4,
}

/// Everything a wrapped key is bound to. Fields that do not apply are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapContext {
    /// What the key is for.
    pub purpose: WrapPurpose,
    /// The customer whose vault the key belongs to.
    pub customer: [u8; 32],
    /// The recipient: a device id, a company id, or the recovery commitment.
    pub recipient: [u8; 32],
    /// The family, by its 32-byte family id.
    pub family: Option<[u8; 32]>,
    /// The family's epoch.
    pub epoch: Option<u64>,
    /// The period (months since the epoch of periods).
    pub period: Option<u32>,
    /// The grant or record id this wrap belongs to.
    pub subject: Option<[u8; 32]>,
}

impl WrapContext {
    /// The canonical encoding used as HPKE `info` and as associated data.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::WrapInfo);
        w.u8(self.purpose as u8)
            .array(&self.customer)
            .array(&self.recipient)
            .option_array(self.family.as_ref())
            .option_array(self.epoch.map(u64::to_be_bytes).as_ref())
            .option_array(self.period.map(u32::to_be_bytes).as_ref())
            .option_array(self.subject.as_ref());
        w.finish()
    }
}

/// A key sealed to one recipient: the HPKE encapsulated key and the ciphertext (key + 16-byte tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The encapsulated ephemeral public key.
    pub enc: [u8; 32],
    /// The sealed 32-byte key and its tag.
    pub ciphertext: [u8; 48],
}

impl WrappedKey {
    /// The 80-byte wire form: `enc || ciphertext`.
    pub fn to_bytes(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        out[..32].copy_from_slice(&self.enc);
        out[32..].copy_from_slice(&self.ciphertext);
        out
    }

    /// Parses the 80-byte wire form.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != 80 {
            return Err(DecodeError::Invalid {
                field: "wrapped key",
                reason: "must be 80 bytes",
            });
        }
        let mut enc = [0u8; 32];
        let mut ciphertext = [0u8; 48];
        enc.copy_from_slice(&bytes[..32]);
        ciphertext.copy_from_slice(&bytes[32..]);
        Ok(Self { enc, ciphertext })
    }

    /// Reads the wire form from inside a canonical body.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let bytes: [u8; 80] = r.array()?;
        Self::from_slice(&bytes)
    }
}

/// A byte string of any length sealed to one recipient: the HPKE encapsulated key and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBytes {
    /// The encapsulated ephemeral public key.
    pub enc: [u8; 32],
    /// The ciphertext and its 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl SealedBytes {
    /// The largest ciphertext accepted: room for the largest key bundle a grant may carry
    /// ([`crate::epoch::MAX_BUNDLE_ENTRIES`] keys of the largest kind, an append chain's, about 109 KiB).
    /// At 64 KiB a grant on a family rotated about 850 times was sealed by the client and refused by
    /// the server as malformed, under the client's own limit of keys.
    pub const MAX_CIPHERTEXT: usize = 128 * 1024;

    /// Wire form: `enc [32] || ciphertext`.
    pub fn to_bytes(&self) -> Vec<u8> {
        [&self.enc[..], &self.ciphertext].concat()
    }

    /// Parses the wire form.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < 32 + 16 || bytes.len() > 32 + Self::MAX_CIPHERTEXT {
            return Err(DecodeError::Invalid {
                field: "sealed bytes",
                reason: "length out of range",
            });
        }
        let mut enc = [0u8; 32];
        enc.copy_from_slice(&bytes[..32]);
        Ok(Self {
            enc,
            ciphertext: bytes[32..].to_vec(),
        })
    }
}

/// Seals `plaintext` to `recipient`, bound to `context`.
pub fn seal_bytes<R: CryptoRng + ?Sized>(
    rng: &mut R,
    recipient: &KemPublicKey,
    context: &WrapContext,
    plaintext: &[u8],
) -> SealedBytes {
    let info = context.encode();
    let (enc, ciphertext) = seal_raw(rng, &recipient.to_bytes(), &info, &info, plaintext)
        .expect("a KemPublicKey is never low order, so HPKE encapsulation cannot fail");
    SealedBytes { enc, ciphertext }
}

/// Opens bytes sealed by [`seal_bytes`] with the same `context`.
pub fn open_bytes(
    recipient: &KemSecretKey,
    context: &WrapContext,
    sealed: &SealedBytes,
) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
    let info = context.encode();
    open_raw(
        &recipient.to_bytes(),
        &sealed.enc,
        &info,
        &info,
        &sealed.ciphertext,
    )
}

/// A wrapped key could not be opened: wrong recipient, wrong context, or tampering. Deliberately opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the wrapped key could not be opened")]
pub struct UnwrapError;

/// Seals `key` to `recipient`, bound to `context`.
pub fn seal_key<R: CryptoRng + ?Sized>(
    rng: &mut R,
    recipient: &KemPublicKey,
    context: &WrapContext,
    key: &[u8; 32],
) -> WrappedKey {
    let info = context.encode();
    let (enc, ct) = seal_raw(rng, &recipient.to_bytes(), &info, &info, key)
        .expect("a KemPublicKey is never low order, so HPKE encapsulation cannot fail");
    let ciphertext: [u8; 48] = ct
        .as_slice()
        .try_into()
        .expect("ChaCha20Poly1305 output is plaintext (32) + tag (16)");
    WrappedKey { enc, ciphertext }
}

/// Opens a key sealed by [`seal_key`] with the same `context`.
pub fn open_key(
    recipient: &KemSecretKey,
    context: &WrapContext,
    wrapped: &WrappedKey,
) -> Result<Zeroizing<[u8; 32]>, UnwrapError> {
    let info = context.encode();
    let pt = open_raw(
        &recipient.to_bytes(),
        &wrapped.enc,
        &info,
        &info,
        &wrapped.ciphertext,
    )?;
    let key: [u8; 32] = pt.as_slice().try_into().map_err(|_| UnwrapError)?;
    Ok(Zeroizing::new(key))
}

/// Single-shot HPKE base-mode seal with our suite. Separate from [`seal_key`] so the RFC 9180 vectors can
/// drive it with their own `info` and `aad`.
fn seal_raw<R: CryptoRng + ?Sized>(
    rng: &mut R,
    pk_recip: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; 32], Vec<u8>), hpke::HpkeError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(pk_recip)?;
    let mut rng = RngRef(rng);
    let (enc, ct) = hpke::single_shot_seal_with_rng::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        &mut rng,
    )?;
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok((enc_bytes, ct))
}

/// Single-shot HPKE base-mode open with our suite.
fn open_raw(
    sk_recip: &[u8; 32],
    enc: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(sk_recip).map_err(|_| UnwrapError)?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| UnwrapError)?;
    let pt = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &sk,
        &enc,
        info,
        ciphertext,
        aad,
    )
    .map_err(|_| UnwrapError)?;
    Ok(Zeroizing::new(pt))
}

/// Lends a `?Sized` RNG to hpke, whose generic parameter must be sized.
struct RngRef<'a, R: ?Sized>(&'a mut R);

impl<R: CryptoRng + ?Sized> rand_core::TryRng for RngRef<'_, R> {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.0.next_u32())
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.0.next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl<R: CryptoRng + ?Sized> rand_core::TryCryptoRng for RngRef<'_, R> {}

/// Derives an HPKE key pair from input keying material (RFC 9180 §7.1.3), for the vectors.
#[cfg(test)]
fn derive_keypair(ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let (sk, pk) = <Kem as hpke::Kem>::derive_keypair(ikm);
    let mut s = [0u8; 32];
    let mut p = [0u8; 32];
    s.copy_from_slice(&sk.to_bytes());
    p.copy_from_slice(&pk.to_bytes());
    (s, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    fn ctx() -> WrapContext {
        WrapContext {
            purpose: WrapPurpose::PeriodKey,
            customer: [1; 32],
            recipient: [2; 32],
            family: Some([3; 32]),
            epoch: Some(4),
            period: Some(5),
            subject: Some([6; 32]),
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let mut rng = rand::rng();
        let sk = KemSecretKey::generate(&mut rng);
        let wrapped = seal_key(&mut rng, &sk.public_key(), &ctx(), &[9; 32]);
        assert_eq!(*open_key(&sk, &ctx(), &wrapped).unwrap(), [9; 32]);
        let again = WrappedKey::from_slice(&wrapped.to_bytes()).unwrap();
        assert_eq!(again, wrapped);
    }

    #[test]
    fn every_context_field_is_bound() {
        let mut rng = rand::rng();
        let sk = KemSecretKey::generate(&mut rng);
        let wrapped = seal_key(&mut rng, &sk.public_key(), &ctx(), &[9; 32]);
        let variants: Vec<WrapContext> = vec![
            WrapContext {
                purpose: WrapPurpose::AppendKey,
                ..ctx()
            },
            WrapContext {
                customer: [7; 32],
                ..ctx()
            },
            WrapContext {
                recipient: [7; 32],
                ..ctx()
            },
            WrapContext {
                family: Some([7; 32]),
                ..ctx()
            },
            WrapContext {
                family: None,
                ..ctx()
            },
            WrapContext {
                epoch: Some(5),
                ..ctx()
            },
            WrapContext {
                period: Some(4),
                ..ctx()
            },
            WrapContext {
                subject: Some([7; 32]),
                ..ctx()
            },
        ];
        for v in variants {
            assert_eq!(open_key(&sk, &v, &wrapped), Err(UnwrapError), "{v:?}");
        }
    }

    #[test]
    fn wrong_recipient_and_tampering_fail() {
        let mut rng = rand::rng();
        let sk = KemSecretKey::generate(&mut rng);
        let other = KemSecretKey::generate(&mut rng);
        let wrapped = seal_key(&mut rng, &sk.public_key(), &ctx(), &[9; 32]);
        assert_eq!(open_key(&other, &ctx(), &wrapped), Err(UnwrapError));
        for i in 0..80 {
            let mut bytes = wrapped.to_bytes();
            bytes[i] ^= 0x01;
            let tampered = WrappedKey::from_slice(&bytes).unwrap();
            assert_eq!(
                open_key(&sk, &ctx(), &tampered),
                Err(UnwrapError),
                "byte {i}"
            );
        }
        assert!(WrappedKey::from_slice(&[0u8; 79]).is_err());
    }

    /// An RNG that hands out fixed bytes: HPKE draws exactly the ephemeral IKM from it.
    struct FixedRng(Vec<u8>);
    impl rand_core::TryRng for FixedRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            unreachable!("HPKE only fills bytes")
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            unreachable!("HPKE only fills bytes")
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            let n = dst.len();
            dst.copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(())
        }
    }
    impl rand_core::TryCryptoRng for FixedRng {}

    #[test]
    fn rfc9180_vector_mode0_x25519_sha256_chacha20poly1305() {
        let v: serde_json::Value = testdata::json("hpke/mode0_x25519_sha256_chacha20poly1305.json");
        let h = |k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();
        assert_eq!(v["mode"], 0);
        assert_eq!(v["kem_id"], 0x20);
        assert_eq!(v["kdf_id"], 1);
        assert_eq!(v["aead_id"], 3);

        let (sk_r, pk_r) = derive_keypair(&h("ikmR"));
        // hpke stores X25519 scalars clamped (RFC 7748 §5); the vector gives them unclamped.
        let mut sk_expected = h("skRm");
        sk_expected[0] &= 248;
        sk_expected[31] &= 127;
        sk_expected[31] |= 64;
        assert_eq!(sk_r.to_vec(), sk_expected);
        assert_eq!(pk_r.to_vec(), h("pkRm"));
        let (_, pk_e) = derive_keypair(&h("ikmE"));
        assert_eq!(pk_e.to_vec(), h("pkEm"));

        // Sequence number 0 is what a single-shot seal produces: reproduce it byte for byte.
        let first = &v["encryptions"][0];
        let e = |k: &str| hex::decode(first[k].as_str().unwrap()).unwrap();
        let mut rng = FixedRng(h("ikmE"));
        let (enc, ct) = seal_raw(&mut rng, &pk_r, &h("info"), &e("aad"), &e("pt")).unwrap();
        assert_eq!(enc.to_vec(), h("enc"));
        assert_eq!(ct, e("ct"));
        let enc_arr: [u8; 32] = h("enc").try_into().unwrap();
        let pt = open_raw(&sk_r, &enc_arr, &h("info"), &e("aad"), &e("ct")).unwrap();
        assert_eq!(*pt, e("pt"));

        // The later sequence numbers, through a receiver context of the same suite.
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk_r).unwrap();
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc_arr).unwrap();
        let mut receiver = hpke::setup_receiver::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &sk,
            &encapped,
            &h("info"),
        )
        .unwrap();
        let encryptions = v["encryptions"].as_array().unwrap();
        assert!(encryptions.len() > 1);
        for (i, enc) in encryptions.iter().enumerate() {
            let f = |k: &str| hex::decode(enc[k].as_str().unwrap()).unwrap();
            let pt = receiver.open(&f("ct"), &f("aad")).unwrap();
            assert_eq!(pt, f("pt"), "encryption {i}");
        }
        // A tampered ciphertext of the first encryption is refused.
        let mut bad = e("ct");
        bad[0] ^= 1;
        assert!(open_raw(&sk_r, &enc_arr, &h("info"), &e("aad"), &bad).is_err());
    }
}
