//! Sealed records (design note 0002, "Records").
//!
//! Owns the record format: a header that is the associated data of both AEADs, the data key wrapped under
//! the period's wrap key, and the content sealed under the data key with ring's ChaCha20-Poly1305. Every
//! record has its own data key; there is no public-key work per record. The record digest, which batches
//! sign, covers every byte of the sealed record.
//!
//! It does not own batches or completeness (see [`crate::batch`]), nor which keys a reader holds.
//!
//! Wire form: `header (131) | wrap nonce [12] | wrapped data key [48] | content length u32 | content + tag`.

use std::collections::HashMap;
use std::fmt;

use rand_core::CryptoRng;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::epoch::{BackwardsError, Chain, ChainKey};
use crate::family::{FamilyId, Period};
use crate::hash::{Digest, tagged_hash};
use crate::identity::IdentityId;

/// A record's id, chosen by the writing client (16 random bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub [u8; 16]);

impl RecordId {
    /// A fresh random id.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({})", self.to_hex())
    }
}

/// Everything a record is bound to. Encoded, it is the associated data of both AEADs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The vault.
    pub customer: IdentityId,
    /// The family.
    pub family: FamilyId,
    /// The family epoch whose keys seal it.
    pub epoch: u64,
    /// The period it belongs to.
    pub period: Period,
    /// The record id.
    pub id: RecordId,
    /// The identity that wrote it: the customer, or an appending company.
    pub author: IdentityId,
    /// Which chain wraps its data key.
    pub chain: Chain,
}

/// The encoded header's length.
pub const HEADER_LEN: usize = 6 + 32 + 32 + 8 + 4 + 16 + 32 + 1;
const WRAPPED_LEN: usize = 32 + 16;
const PREFIX_LEN: usize = HEADER_LEN + NONCE_LEN + WRAPPED_LEN + 4;
/// The largest record content accepted.
pub const MAX_CONTENT: usize = 1024 * 1024;

impl RecordHeader {
    fn write(&self, w: &mut Writer) {
        let chain = match self.chain {
            Chain::Read => 0,
            Chain::Append(_) => 1,
        };
        w.array(&self.customer.0)
            .array(&self.family.0)
            .u64(self.epoch)
            .u32(self.period.0)
            .array(&self.id.0)
            .array(&self.author.0)
            .u8(chain);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let customer = IdentityId(r.array()?);
        let family = FamilyId(r.array()?);
        let epoch = r.u64()?;
        let period = Period(r.u32()?);
        let id = RecordId(r.array()?);
        let author = IdentityId(r.array()?);
        let chain = match r.u8()? {
            0 if author == customer => Chain::Read,
            1 if author != customer => Chain::Append(author),
            0 | 1 => {
                return Err(DecodeError::Invalid {
                    field: "chain",
                    reason: "the customer writes under the read chain, companies under their append chain",
                });
            }
            _ => {
                return Err(DecodeError::Invalid {
                    field: "chain",
                    reason: "unknown chain",
                });
            }
        };
        Ok(Self {
            customer,
            family,
            epoch,
            period,
            id,
            author,
            chain,
        })
    }
}

/// A sealed record, as stored and sent, with its parsed header and digest.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    bytes: Vec<u8>,
    header: RecordHeader,
    digest: Digest,
}

impl fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRecord")
            .field("header", &self.header)
            .field("len", &self.bytes.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl SealedRecord {
    /// Parses a sealed record. Only the structure is checked; opening checks the cryptography.
    pub fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&bytes, Kind::RecordHeader)?;
        let header = RecordHeader::read(&mut r)?;
        let _nonce: [u8; NONCE_LEN] = r.array()?;
        let _wrapped: [u8; WRAPPED_LEN] = r.array()?;
        let len = r.u32()? as usize;
        if !(16..=MAX_CONTENT + 16).contains(&len) {
            return Err(DecodeError::TooLong {
                field: "content",
                len,
                max: MAX_CONTENT + 16,
            });
        }
        if bytes.len() != PREFIX_LEN + len {
            return Err(if bytes.len() < PREFIX_LEN + len {
                DecodeError::Truncated
            } else {
                DecodeError::TrailingBytes(bytes.len() - PREFIX_LEN - len)
            });
        }
        let digest = record_digest(&bytes);
        Ok(Self {
            bytes,
            header,
            digest,
        })
    }

    /// The wire form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The header.
    pub fn header(&self) -> &RecordHeader {
        &self.header
    }

    /// The digest a batch signs: `H("record", every byte)`.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The digest of a sealed record's bytes, without decoding them ([`SealedRecord::digest`]): what a
    /// store that keeps the bytes needs to rebuild a record's leaf.
    pub fn digest_of(bytes: &[u8]) -> Digest {
        record_digest(bytes)
    }
}

fn record_digest(bytes: &[u8]) -> Digest {
    tagged_hash("record", bytes)
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key)
            .expect("32 bytes is the ChaCha20-Poly1305 key length"),
    )
}

/// The author's key does not fit the record being sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the customer seals with the read chain, and a company only with its own append chain")]
pub struct WrongChain;

/// Seals records for one family, epoch and period with one chain key.
pub struct RecordSealer {
    customer: IdentityId,
    family: FamilyId,
    epoch: u64,
    author: IdentityId,
    key: ChainKey,
    wrap: LessSafeKey,
}

impl RecordSealer {
    /// A sealer for records of `period`, written by `author` with `key` (the read chain for the customer,
    /// the author's own append chain for a company). The key is moved forward to `period`.
    pub fn new(
        customer: IdentityId,
        family: FamilyId,
        epoch: u64,
        author: IdentityId,
        key: &ChainKey,
        period: Period,
    ) -> Result<Self, RecordSealError> {
        let fits = match key.chain() {
            Chain::Read => author == customer,
            Chain::Append(c) => c == author && author != customer,
        };
        if !fits {
            return Err(RecordSealError::WrongChain(WrongChain));
        }
        let key = key.advance_to(period)?;
        let wrap = aead_key(&key.wrap_key());
        Ok(Self {
            customer,
            family,
            epoch,
            author,
            key,
            wrap,
        })
    }

    /// Seals `content` as record `id` with a fresh data key.
    pub fn seal<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        id: RecordId,
        content: &[u8],
    ) -> Result<SealedRecord, RecordSealError> {
        if content.len() > MAX_CONTENT {
            return Err(RecordSealError::TooLarge(content.len()));
        }
        let header = RecordHeader {
            customer: self.customer,
            family: self.family,
            epoch: self.epoch,
            period: self.key.period(),
            id,
            author: self.author,
            chain: self.key.chain(),
        };
        let mut w = Writer::with_capacity(Kind::RecordHeader, PREFIX_LEN + content.len() + 16);
        header.write(&mut w);
        let mut out = w.finish();
        debug_assert_eq!(out.len(), HEADER_LEN);

        // Fresh data key and wrap nonce, from the caller's user-space CSPRNG.
        let mut secrets = Zeroizing::new([0u8; 32 + NONCE_LEN]);
        rng.fill_bytes(secrets.as_mut());
        let (data_key, wrap_nonce) = secrets.split_at(32);
        let data_key: &[u8; 32] = data_key.try_into().expect("split at 32");
        let wrap_nonce: [u8; NONCE_LEN] = wrap_nonce.try_into().expect("the rest is the nonce");

        out.extend_from_slice(&wrap_nonce);
        let mut wrapped = [0u8; WRAPPED_LEN];
        wrapped[..32].copy_from_slice(data_key);
        let tag = self
            .wrap
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(wrap_nonce),
                Aad::from(&out[..HEADER_LEN]),
                &mut wrapped[..32],
            )
            .expect("sealing 32 bytes cannot fail");
        wrapped[32..].copy_from_slice(tag.as_ref());
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&((content.len() + 16) as u32).to_be_bytes());

        // The data key seals exactly one message, so the all-zero nonce is safe.
        let start = out.len();
        out.extend_from_slice(content);
        let (prefix, body) = out.split_at_mut(start);
        let tag: Tag = aead_key(data_key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                Aad::from(&prefix[..HEADER_LEN]),
                body,
            )
            .expect("content length is bounded far below ChaCha20's limit");
        out.extend_from_slice(tag.as_ref());
        let digest = record_digest(&out);
        Ok(SealedRecord {
            bytes: out,
            header,
            digest,
        })
    }
}

/// A record could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RecordSealError {
    /// The key is not the author's.
    #[error(transparent)]
    WrongChain(#[from] WrongChain),
    /// The key is for a later period than the record's.
    #[error(transparent)]
    Backwards(#[from] BackwardsError),
    /// The content exceeds [`MAX_CONTENT`].
    #[error("record content of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// A record could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RecordOpenError {
    /// The record belongs to another customer or family than the one being read.
    #[error("record belongs to another customer or family")]
    Misplaced,
    /// The reader holds no key for the record's epoch and chain.
    #[error("no key for this record's epoch and author")]
    NoKey,
    /// The reader's key starts after the record's period (outside the look-back).
    #[error(transparent)]
    Backwards(#[from] BackwardsError),
    /// Decryption failed: tampered, moved, or sealed under another key. Deliberately opaque.
    #[error("record decryption failed")]
    Decrypt,
}

/// The keys a reader holds for one family, and the wrap keys it derived from them.
pub struct FamilyKeys {
    customer: IdentityId,
    family: FamilyId,
    keys: HashMap<(u64, Chain), ChainKey>,
    wrap_cache: HashMap<(u64, Chain, Period), LessSafeKey>,
}

impl FamilyKeys {
    /// An empty key ring for `customer`'s `family`.
    pub fn new(customer: IdentityId, family: FamilyId) -> Self {
        Self {
            customer,
            family,
            keys: HashMap::new(),
            wrap_cache: HashMap::new(),
        }
    }

    /// Adds the key of `epoch` on its chain.
    pub fn insert(&mut self, epoch: u64, key: ChainKey) {
        self.keys.insert((epoch, key.chain()), key);
    }

    fn wrap_for(&mut self, h: &RecordHeader) -> Result<&LessSafeKey, RecordOpenError> {
        let slot = (h.epoch, h.chain, h.period);
        if !self.wrap_cache.contains_key(&slot) {
            let key = self
                .keys
                .get(&(h.epoch, h.chain))
                .ok_or(RecordOpenError::NoKey)?;
            let at = key.advance_to(h.period)?;
            self.wrap_cache.insert(slot, aead_key(&at.wrap_key()));
        }
        Ok(&self.wrap_cache[&slot])
    }

    /// Opens `record`, which must belong to this customer and family.
    pub fn open(&mut self, record: &SealedRecord) -> Result<Zeroizing<Vec<u8>>, RecordOpenError> {
        let h = record.header;
        if h.customer != self.customer || h.family != self.family {
            return Err(RecordOpenError::Misplaced);
        }
        let wrap = self.wrap_for(&h)?;
        let b = &record.bytes;
        let aad = &b[..HEADER_LEN];
        let nonce: [u8; NONCE_LEN] = b[HEADER_LEN..HEADER_LEN + NONCE_LEN]
            .try_into()
            .expect("decode checked the length");
        let mut wrapped = Zeroizing::new([0u8; WRAPPED_LEN]);
        wrapped.copy_from_slice(&b[HEADER_LEN + NONCE_LEN..HEADER_LEN + NONCE_LEN + WRAPPED_LEN]);
        let data_key = wrap
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                wrapped.as_mut(),
            )
            .map_err(|_| RecordOpenError::Decrypt)?;
        let data_key: &[u8; 32] = (&*data_key)
            .try_into()
            .map_err(|_| RecordOpenError::Decrypt)?;
        let mut content = Zeroizing::new(b[PREFIX_LEN..].to_vec());
        let len = aead_key(data_key)
            .open_in_place(
                Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                Aad::from(aad),
                content.as_mut_slice(),
            )
            .map_err(|_| RecordOpenError::Decrypt)?
            .len();
        content.truncate(len);
        Ok(content)
    }
}

impl fmt::Debug for FamilyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FamilyKeys")
            .field("family", &self.family)
            .field("keys", &self.keys.len())
            .finish()
    }
}
