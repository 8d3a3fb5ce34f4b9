//! Export and restore of a whole vault (consent issue, item 4).
//!
//! Owns the export document: everything in a customer's vault, decrypted by the customer's own client, in
//! one JSON form that does not depend on the vault it came from (no customer id, family ids, pseudonyms or
//! keys), so that exporting, restoring into a fresh vault and exporting again gives an identical document.
//! Restoring seals every record again under fresh epoch secrets, as the new vault's customer.
//!
//! A record a company wrote cannot be signed again by that company, so a restored copy is written by the
//! customer and carries its original author inside its content (kind `RestoredRecord`); exporting
//! unwraps it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::batch::{Batch, FamilyLedger, MAX_BATCH_RECORDS, SignedBatch};
use crate::encoding::{Kind, Reader, Writer};
use crate::epoch::EpochSecret;
use crate::family::{FamilyName, Period, PseudonymKey, Scope};
use crate::identity::{DeviceKeys, IdentityId};
use crate::record::{FamilyKeys, RecordId, RecordOpenError, RecordSealer, SealedRecord};

/// The document's format name.
pub const FORMAT: &str = "cmr-vault-export";
/// The document's version.
pub const VERSION: u32 = 1;

/// Who wrote a record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Author {
    /// The customer.
    Customer,
    /// A company, by its identity id (hex).
    Company(String),
}

/// One record, decrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The record id (hex).
    pub id: String,
    /// The month, `YYYY-MM`.
    pub period: String,
    /// Who wrote it.
    pub author: Author,
    /// The content, base64.
    pub content: String,
}

/// One family, decrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFamily {
    /// The scope's name.
    pub scope: String,
    /// For inferred attributes and transactions: the company (hex identity id).
    pub company: Option<String>,
    /// The records, by period, then in the order they were appended.
    pub records: Vec<ExportRecord>,
}

/// The whole export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The families, by scope, then company.
    pub families: Vec<ExportFamily>,
    /// The companies the customer blocked (hex), sorted.
    pub blocked: Vec<String>,
}

/// Why an export could not be built or restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExportError {
    /// A record did not open.
    #[error("a record could not be opened: {0}")]
    Open(#[from] RecordOpenError),
    /// The document is not an export this build reads.
    #[error("not a CMR Vault export of a supported version")]
    Format,
    /// A field is malformed.
    #[error("malformed export field {0}")]
    Field(&'static str),
}

/// A family as the customer's client knows it: its name, the company behind the pseudonym, its records in
/// ledger order, and the keys to open them.
pub struct FamilySource<'a> {
    /// The scope.
    pub scope: Scope,
    /// The company, for inferred and transactions families.
    pub company: Option<IdentityId>,
    /// The records, in ledger order (period, then append order).
    pub records: &'a [SealedRecord],
    /// Keys that open them (the customer derives them from the epoch secrets).
    pub keys: &'a mut FamilyKeys,
}

fn restored_content(author: &IdentityId, content: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(Kind::RestoredRecord, 48 + content.len());
    w.array(&author.0).bytes(content);
    w.finish()
}

fn unwrap_restored(content: &[u8]) -> Option<(IdentityId, Vec<u8>)> {
    let mut r = Reader::new(content, Kind::RestoredRecord).ok()?;
    let author = IdentityId(r.array().ok()?);
    let inner = r
        .bytes("content", crate::record::MAX_CONTENT)
        .ok()?
        .to_vec();
    r.finish().ok()?;
    Some((author, inner))
}

impl Export {
    /// Builds the export from the customer's families and blocked companies.
    pub fn build(
        customer: IdentityId,
        families: Vec<FamilySource<'_>>,
        blocked: &[IdentityId],
    ) -> Result<Self, ExportError> {
        let mut out = Vec::with_capacity(families.len());
        for fam in families {
            let mut records = Vec::with_capacity(fam.records.len());
            for rec in fam.records {
                let content = fam.keys.open(rec)?;
                let h = rec.header();
                let (author, content) = match unwrap_restored(&content) {
                    Some((orig, inner)) if h.author == customer => (orig, inner),
                    _ => (h.author, content.to_vec()),
                };
                records.push(ExportRecord {
                    id: h.id.to_hex(),
                    period: h.period.to_string(),
                    author: if author == customer {
                        Author::Customer
                    } else {
                        Author::Company(author.to_hex())
                    },
                    content: B64.encode(content),
                });
            }
            out.push(ExportFamily {
                scope: fam.scope.name().to_string(),
                company: fam.company.map(|c| c.to_hex()),
                records,
            });
        }
        out.sort_by(|a, b| {
            let key = |f: &ExportFamily| {
                (
                    Scope::from_name(&f.scope).map(|s| s as u8),
                    f.company.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut blocked: Vec<String> = blocked.iter().map(IdentityId::to_hex).collect();
        blocked.sort();
        Ok(Self {
            format: FORMAT.into(),
            version: VERSION,
            families: out,
            blocked,
        })
    }

    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an export always serializes")
    }

    /// Parses a JSON document.
    pub fn from_json(json: &str) -> Result<Self, ExportError> {
        let e: Export = serde_json::from_str(json).map_err(|_| ExportError::Format)?;
        if e.format != FORMAT || e.version != VERSION {
            return Err(ExportError::Format);
        }
        Ok(e)
    }
}

/// A family rebuilt in a fresh vault.
#[derive(Debug)]
pub struct RestoredFamily {
    /// Its name in the new vault.
    pub name: FamilyName,
    /// The company behind it, if any.
    pub company: Option<IdentityId>,
    /// The epoch-1 secret.
    pub secret: EpochSecret,
    /// The records, sealed again.
    pub records: Vec<SealedRecord>,
    /// The signed batches that wrote them.
    pub batches: Vec<SignedBatch>,
    /// The family's ledger after the batches.
    pub ledger: FamilyLedger,
}

fn parse_hex<const N: usize>(s: &str, field: &'static str) -> Result<[u8; N], ExportError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| ExportError::Field(field))?;
    Ok(out)
}

fn parse_period(s: &str) -> Result<Period, ExportError> {
    let (y, m) = s.split_once('-').ok_or(ExportError::Field("period"))?;
    let y: u32 = y.parse().map_err(|_| ExportError::Field("period"))?;
    let m: u32 = m.parse().map_err(|_| ExportError::Field("period"))?;
    Period::from_year_month(y, m).ok_or(ExportError::Field("period"))
}

/// Restores `export` into the fresh vault of `customer`: new pseudonyms, new epoch secrets, every record
/// sealed again by the customer and written in signed batches by `device`.
pub fn restore<R: CryptoRng + ?Sized>(
    rng: &mut R,
    export: &Export,
    customer: IdentityId,
    device: &DeviceKeys,
    pseudonyms: &PseudonymKey,
) -> Result<Vec<RestoredFamily>, ExportError> {
    let mut out = Vec::with_capacity(export.families.len());
    for fam in &export.families {
        let scope = Scope::from_name(&fam.scope).ok_or(ExportError::Field("scope"))?;
        let company = fam
            .company
            .as_deref()
            .map(|c| parse_hex::<32>(c, "company").map(IdentityId))
            .transpose()?;
        let name = match (scope, company) {
            (Scope::Transactions, Some(c)) => FamilyName::Transactions(pseudonyms.counterparty(&c)),
            (Scope::ProfileInferred, Some(c)) => FamilyName::Inferred(pseudonyms.inferred_by(&c)),
            (s, None) => FamilyName::profile(s).ok_or(ExportError::Field("scope"))?,
            _ => return Err(ExportError::Field("company")),
        };
        let family = name.id(&customer);
        let secret = EpochSecret::generate(rng);
        let origin = secret.read_key(Period::ORIGIN);
        let mut records = Vec::with_capacity(fam.records.len());
        for rec in &fam.records {
            let id = RecordId(parse_hex::<16>(&rec.id, "id")?);
            let period = parse_period(&rec.period)?;
            let content = B64
                .decode(&rec.content)
                .map_err(|_| ExportError::Field("content"))?;
            let content = match &rec.author {
                Author::Customer => content,
                Author::Company(c) => {
                    restored_content(&IdentityId(parse_hex::<32>(c, "author")?), &content)
                }
            };
            let sealer = RecordSealer::new(customer, family, 1, customer, &origin, period)
                .map_err(|_| ExportError::Field("period"))?;
            records.push(
                sealer
                    .seal(rng, id, &content)
                    .map_err(|_| ExportError::Field("content"))?,
            );
        }
        let mut ledger = FamilyLedger::new(customer, family, scope);
        let mut batches = Vec::new();
        for chunk in records.chunks(MAX_BATCH_RECORDS) {
            let batch = Batch::for_records(device.id(), ledger.head().digest(), chunk)
                .map_err(|_| ExportError::Field("records"))?;
            ledger
                .apply(&batch, chunk)
                .map_err(|_| ExportError::Field("records"))?;
            batches.push(SignedBatch::sign(batch, &device.signing));
        }
        out.push(RestoredFamily {
            name,
            company,
            secret,
            records,
            batches,
            ledger,
        });
    }
    Ok(out)
}
