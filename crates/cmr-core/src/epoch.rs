//! Epoch secrets and the forward key chains (PRODUCT.md "Partition families, epochs and periods", design
//! note 0002).
//!
//! Owns:
//! - [`EpochSecret`]: a fresh random S_e per family epoch, never derived from another;
//! - [`ChainKey`]: a key on the read chain `K(e, p)` or on an author's append chain `A(c, e, p)`, which only
//!   moves forward in time;
//! - [`KeyBundle`]: the keys one grantee receives, sealed in one HPKE seal;
//! - sealing epoch secrets under the vault key for storage.
//!
//! It does not decide who gets which key: that is consent's job.

use std::fmt;

use rand_core::CryptoRng;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::family::{FamilyId, Period};
use crate::identity::IdentityId;
use crate::keys::{KemPublicKey, KemSecretKey};
use crate::vault::VaultKey;
use crate::wrap::{SealedBytes, UnwrapError, WrapContext, WrapPurpose, open_bytes, seal_bytes};

/// A chain key was asked to move backwards in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "a period key opens only its own period and later ones: cannot go from {from} back to {to}"
)]
pub struct BackwardsError {
    /// The period of the key held.
    pub from: Period,
    /// The earlier period asked for.
    pub to: Period,
}

/// HKDF-Expand (RFC 5869 §2.3) of a 32-byte PRK with `info`, to 32 bytes.
pub(crate) fn expand(prk: &[u8; 32], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk);
    let okm = prk
        .expand(info, Len32)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    let mut out = Zeroizing::new([0u8; 32]);
    okm.fill(out.as_mut())
        .expect("the buffer matches the requested length");
    out
}

/// A family epoch's secret S_e. Zeroized on drop; never printed.
pub struct EpochSecret(Zeroizing<[u8; 32]>);

impl EpochSecret {
    /// Draws a fresh secret. Never derived from a previous epoch's.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut s = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(s.as_mut());
        Self(s)
    }

    /// `K(e, p)`: the read-chain key at `period` (S_e itself at the origin; earlier periods are clamped
    /// to the origin, which holds no records).
    pub fn read_key(&self, period: Period) -> ChainKey {
        ChainKey {
            chain: Chain::Read,
            period: Period::ORIGIN,
            key: Zeroizing::new(*self.0),
        }
        .advance_to(period.max(Period::ORIGIN))
        .expect("target is at or after the origin")
    }

    /// `A(author, e, period)`: the author's append-chain key at `period`.
    pub fn append_key(&self, author: &IdentityId, period: Period) -> ChainKey {
        let origin = ChainKey {
            chain: Chain::Append(*author),
            period: Period::ORIGIN,
            key: expand(&self.0, &[b"cmr-append", &author.0]),
        };
        let target = period.max(Period::ORIGIN);
        origin
            .advance_to(target)
            .expect("target is at or after the origin")
    }
}

impl fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EpochSecret([redacted])")
    }
}

/// Which forward chain a key is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chain {
    /// The read chain `K(e, p)`; the customer writes under it.
    Read,
    /// One company's append chain `A(c, e, p)`.
    Append(IdentityId),
}

/// A key on a forward chain, at one period. It derives the keys of later periods, never earlier ones.
#[derive(Clone)]
pub struct ChainKey {
    chain: Chain,
    period: Period,
    key: Zeroizing<[u8; 32]>,
}

impl ChainKey {
    /// The chain.
    pub fn chain(&self) -> Chain {
        self.chain
    }

    /// The period this key is at.
    pub fn period(&self) -> Period {
        self.period
    }

    /// The key of a later (or the same) period: `HKDF-Expand(K(p−1), "cmr-period")` per step.
    pub fn advance_to(&self, target: Period) -> Result<ChainKey, BackwardsError> {
        if target < self.period {
            return Err(BackwardsError {
                from: self.period,
                to: target,
            });
        }
        let mut key = Zeroizing::new(*self.key);
        for _ in self.period.0..target.0 {
            key = expand(&key, &[b"cmr-period"]);
        }
        Ok(ChainKey {
            chain: self.chain,
            period: target,
            key,
        })
    }

    /// The key-wrapping key for this period: `HKDF-Expand(K, "cmr-wrap")`. The chain key itself never keys
    /// an AEAD.
    pub fn wrap_key(&self) -> Zeroizing<[u8; 32]> {
        expand(&self.key, &[b"cmr-wrap"])
    }

    fn from_parts(chain: Chain, period: Period, key: [u8; 32]) -> Self {
        Self {
            chain,
            period,
            key: Zeroizing::new(key),
        }
    }
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChainKey({:?} at {}, [redacted])",
            self.chain, self.period
        )
    }
}

/// One key in a bundle: for a family's epoch, a chain key at its starting period.
#[derive(Debug, Clone)]
pub struct BundleEntry {
    /// The family.
    pub family: FamilyId,
    /// The epoch.
    pub epoch: u64,
    /// The key.
    pub key: ChainKey,
}

/// The keys one grantee receives from one statement (a grant, a rotation or a key delivery), sealed to it
/// in one HPKE seal.
#[derive(Debug, Clone, Default)]
pub struct KeyBundle {
    /// The keys.
    pub entries: Vec<BundleEntry>,
}

/// The most entries a bundle may hold.
pub const MAX_BUNDLE_ENTRIES: usize = 1024;

impl KeyBundle {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::new(Kind::KeyBundle);
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            w.array(&e.family.0).u64(e.epoch);
            match e.key.chain {
                Chain::Read => w.u8(0),
                Chain::Append(author) => w.u8(1).array(&author.0),
            };
            w.u32(e.key.period.0).array(&e.key.key);
        }
        Zeroizing::new(w.finish())
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Kind::KeyBundle)?;
        let n = r.u32()? as usize;
        if n > MAX_BUNDLE_ENTRIES {
            return Err(DecodeError::TooLong {
                field: "bundle entries",
                len: n,
                max: MAX_BUNDLE_ENTRIES,
            });
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let family = FamilyId(r.array()?);
            let epoch = r.u64()?;
            let chain = match r.u8()? {
                0 => Chain::Read,
                1 => Chain::Append(IdentityId(r.array()?)),
                _ => {
                    return Err(DecodeError::Invalid {
                        field: "chain",
                        reason: "unknown chain",
                    });
                }
            };
            let period = Period(r.u32()?);
            let key = Zeroizing::new(r.array::<32>()?);
            entries.push(BundleEntry {
                family,
                epoch,
                key: ChainKey::from_parts(chain, period, *key),
            });
        }
        r.finish()?;
        Ok(Self { entries })
    }

    /// The context a bundle is bound to: customer, grantee and the statement (grant) id.
    fn context(customer: IdentityId, grantee: IdentityId, statement: [u8; 32]) -> WrapContext {
        WrapContext {
            purpose: WrapPurpose::KeyBundle,
            customer: customer.0,
            recipient: grantee.0,
            family: None,
            epoch: None,
            period: None,
            subject: Some(statement),
        }
    }

    /// Seals the bundle to `grantee`'s KEM key in one HPKE seal, bound to the statement id.
    pub fn seal<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        customer: IdentityId,
        grantee: IdentityId,
        grantee_key: &KemPublicKey,
        statement: [u8; 32],
    ) -> SealedBytes {
        seal_bytes(
            rng,
            grantee_key,
            &Self::context(customer, grantee, statement),
            &self.encode(),
        )
    }

    /// Opens a bundle sealed to this grantee.
    pub fn open(
        sealed: &SealedBytes,
        customer: IdentityId,
        grantee: IdentityId,
        grantee_key: &KemSecretKey,
        statement: [u8; 32],
    ) -> Result<Self, UnwrapError> {
        let pt = open_bytes(
            grantee_key,
            &Self::context(customer, grantee, statement),
            sealed,
        )?;
        Self::decode(&pt).map_err(|_| UnwrapError)
    }

    /// The key for `family`, `epoch` and `chain`, if the bundle holds it.
    pub fn key(&self, family: &FamilyId, epoch: u64, chain: Chain) -> Option<&ChainKey> {
        self.entries
            .iter()
            .find(|e| e.family == *family && e.epoch == epoch && e.key.chain == chain)
            .map(|e| &e.key)
    }
}

/// An epoch secret sealed under the vault key, for storage on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEpochSecret {
    /// The family.
    pub family: FamilyId,
    /// The epoch.
    pub epoch: u64,
    nonce: [u8; 12],
    ciphertext: [u8; 48],
}

impl SealedEpochSecret {
    fn aad(customer: IdentityId, family: &FamilyId, epoch: u64) -> Vec<u8> {
        let mut w = Writer::new(Kind::SealedEpochSecret);
        w.array(&customer.0).array(&family.0).u64(epoch);
        w.finish()
    }

    fn cipher(vault: &VaultKey) -> LessSafeKey {
        let key = expand(vault.expose_secret(), &[b"cmr-epoch-secrets"]);
        LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key.as_ref())
                .expect("32 bytes is the ChaCha20-Poly1305 key length"),
        )
    }

    /// Seals `secret` under the vault key, bound to customer, family and epoch.
    pub fn seal<R: CryptoRng + ?Sized>(
        rng: &mut R,
        vault: &VaultKey,
        customer: IdentityId,
        family: FamilyId,
        epoch: u64,
        secret: &EpochSecret,
    ) -> Self {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let mut buf = [0u8; 48];
        buf[..32].copy_from_slice(secret.0.as_ref());
        let tag = Self::cipher(vault)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(customer, &family, epoch)),
                &mut buf[..32],
            )
            .expect("sealing 32 bytes cannot fail");
        buf[32..].copy_from_slice(tag.as_ref());
        Self {
            family,
            epoch,
            nonce,
            ciphertext: buf,
        }
    }

    /// Opens it with the vault key.
    pub fn open(&self, vault: &VaultKey, customer: IdentityId) -> Result<EpochSecret, UnwrapError> {
        let mut buf = Zeroizing::new(self.ciphertext);
        let pt = Self::cipher(vault)
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(Self::aad(customer, &self.family, self.epoch)),
                buf.as_mut(),
            )
            .map_err(|_| UnwrapError)?;
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(pt);
        Ok(EpochSecret(secret))
    }

    /// Wire form: `family [32] | epoch u64 | nonce [12] | ciphertext [48]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(100);
        out.extend_from_slice(&self.family.0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses the wire form.
    pub fn from_slice(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != 100 {
            return Err(DecodeError::Invalid {
                field: "sealed epoch secret",
                reason: "must be 100 bytes",
            });
        }
        let mut family = [0u8; 32];
        let mut epoch = [0u8; 8];
        let mut nonce = [0u8; 12];
        let mut ciphertext = [0u8; 48];
        family.copy_from_slice(&b[..32]);
        epoch.copy_from_slice(&b[32..40]);
        nonce.copy_from_slice(&b[40..52]);
        ciphertext.copy_from_slice(&b[52..]);
        Ok(Self {
            family: FamilyId(family),
            epoch: u64::from_be_bytes(epoch),
            nonce,
            ciphertext,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(y: u32, m: u32) -> Period {
        Period::from_year_month(y, m).unwrap()
    }

    #[test]
    fn chain_matches_the_definition() {
        let s = EpochSecret(Zeroizing::new([7; 32]));
        // K(e, p0) = S_e
        assert_eq!(*s.read_key(Period::ORIGIN).key, [7; 32]);
        // K(e, p0 + 1) = HKDF-Expand(S_e, "cmr-period")
        let k1 = s.read_key(Period(Period::ORIGIN.0 + 1));
        assert_eq!(*k1.key, *expand(&[7; 32], &[b"cmr-period"]));
        // Chaining forward from an intermediate key gives the same key as from the origin.
        let mid = s.read_key(p(2024, 1));
        assert_eq!(
            *mid.advance_to(p(2026, 11)).unwrap().key,
            *s.read_key(p(2026, 11)).key
        );
    }

    #[test]
    fn a_period_key_cannot_derive_an_earlier_period() {
        let s = EpochSecret::generate(&mut rand::rng());
        let k = s.read_key(p(2025, 6));
        assert_eq!(
            k.advance_to(p(2025, 5)).unwrap_err(),
            BackwardsError {
                from: p(2025, 6),
                to: p(2025, 5)
            }
        );
        let a = s.append_key(&IdentityId([1; 32]), p(2025, 6));
        assert!(a.advance_to(p(2025, 1)).is_err());
    }

    #[test]
    fn append_chains_are_per_author_and_apart_from_the_read_chain() {
        let s = EpochSecret::generate(&mut rand::rng());
        let at = p(2026, 1);
        let a1 = s.append_key(&IdentityId([1; 32]), at);
        let a2 = s.append_key(&IdentityId([2; 32]), at);
        let r = s.read_key(at);
        assert_ne!(*a1.wrap_key(), *a2.wrap_key());
        assert_ne!(*a1.wrap_key(), *r.wrap_key());
        let t = EpochSecret::generate(&mut rand::rng());
        assert_ne!(*t.read_key(at).wrap_key(), *r.wrap_key());
    }

    #[test]
    fn bundle_seal_open_and_binding() {
        let mut rng = rand::rng();
        let s = EpochSecret::generate(&mut rng);
        let fam = FamilyId([9; 32]);
        let acme = IdentityId([1; 32]);
        let bundle = KeyBundle {
            entries: vec![
                BundleEntry {
                    family: fam,
                    epoch: 3,
                    key: s.read_key(p(2025, 1)),
                },
                BundleEntry {
                    family: fam,
                    epoch: 3,
                    key: s.append_key(&acme, p(2025, 1)),
                },
            ],
        };
        let sk = KemSecretKey::generate(&mut rng);
        let customer = IdentityId([5; 32]);
        let sealed = bundle.seal(&mut rng, customer, acme, &sk.public_key(), [4; 32]);
        let opened = KeyBundle::open(&sealed, customer, acme, &sk, [4; 32]).unwrap();
        let k = opened.key(&fam, 3, Chain::Read).unwrap();
        assert_eq!(*k.wrap_key(), *s.read_key(p(2025, 1)).wrap_key());
        assert!(opened.key(&fam, 3, Chain::Append(acme)).is_some());
        assert!(opened.key(&fam, 2, Chain::Read).is_none());
        // Bound to the statement, the grantee and the customer.
        assert!(KeyBundle::open(&sealed, customer, acme, &sk, [5; 32]).is_err());
        assert!(KeyBundle::open(&sealed, customer, IdentityId([2; 32]), &sk, [4; 32]).is_err());
        assert!(KeyBundle::open(&sealed, IdentityId([6; 32]), acme, &sk, [4; 32]).is_err());
    }

    /// The largest bundle a grant may carry (every key an append chain's, the largest kind) seals to
    /// bytes that a statement accepts and opens again; one key more is refused when opened.
    #[test]
    fn the_largest_bundle_fits_a_sealed_statement_field() {
        let mut rng = rand::rng();
        let s = EpochSecret::generate(&mut rng);
        let acme = IdentityId([1; 32]);
        let entry = |epoch: u64| BundleEntry {
            family: FamilyId([9; 32]),
            epoch,
            key: s.append_key(&acme, p(2025, 1)),
        };
        let bundle = KeyBundle {
            entries: (0..MAX_BUNDLE_ENTRIES as u64).map(entry).collect(),
        };
        let sk = KemSecretKey::generate(&mut rng);
        let customer = IdentityId([5; 32]);
        let sealed = bundle.seal(&mut rng, customer, acme, &sk.public_key(), [4; 32]);
        let back = SealedBytes::from_slice(&sealed.to_bytes()).unwrap();
        let opened = KeyBundle::open(&back, customer, acme, &sk, [4; 32]).unwrap();
        assert_eq!(opened.entries.len(), MAX_BUNDLE_ENTRIES);
        let mut over = bundle;
        over.entries.push(entry(MAX_BUNDLE_ENTRIES as u64));
        let sealed = over.seal(&mut rng, customer, acme, &sk.public_key(), [4; 32]);
        let back = SealedBytes::from_slice(&sealed.to_bytes()).unwrap();
        assert!(KeyBundle::open(&back, customer, acme, &sk, [4; 32]).is_err());
    }

    #[test]
    fn sealed_epoch_secret_round_trip_and_binding() {
        let mut rng = rand::rng();
        let vault = VaultKey::generate(&mut rng);
        let s = EpochSecret::generate(&mut rng);
        let c = IdentityId([1; 32]);
        let sealed = SealedEpochSecret::seal(&mut rng, &vault, c, FamilyId([2; 32]), 7, &s);
        let back = SealedEpochSecret::from_slice(&sealed.to_bytes()).unwrap();
        assert_eq!(*back.open(&vault, c).unwrap().0, *s.0);
        assert!(back.open(&vault, IdentityId([3; 32])).is_err());
        let mut moved = back.clone();
        moved.epoch = 8;
        assert!(moved.open(&vault, c).is_err());
        let mut moved = back;
        moved.family = FamilyId([3; 32]);
        assert!(moved.open(&vault, c).is_err());
        assert!(sealed.open(&VaultKey::generate(&mut rng), c).is_err());
    }
}
