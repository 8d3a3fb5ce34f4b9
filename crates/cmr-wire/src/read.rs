//! A read's proof on the wire (`proof_of_read` in a read's answer): the named head, the period leaves
//! around the range with their range proof, one page proof per period served, and the next cursor.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::{Head, PageProof, PeriodLeaf, ReadProof};
use cmr_core::family::{FamilyId, Period};
use cmr_core::identity::IdentityId;
use cmr_core::merkle::Hash;
use cmr_core::record::RecordId;
use serde::{Deserialize, Serialize};

use crate::{WireError, err};

/// A family head: ids in hex, the periods root in base64, and its digest (hex; for reading by people,
/// recomputed by whoever checks it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeadJson {
    /// The vault, hex.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// The family, hex.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub family: String,
    /// Batches applied so far.
    pub batches: u64,
    /// Records so far.
    pub records: u64,
    /// Periods holding records.
    pub periods: u64,
    /// The root over the period leaves, base64.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub periods_root: String,
    /// The head's digest, hex.
    #[serde(default)]
    pub digest: String,
}

/// A period leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PeriodLeafJson {
    /// `YYYY-MM`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$"))]
    pub period: String,
    /// Records in it.
    pub count: u64,
    /// The root over their digests, base64.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub root: String,
}

/// One page of one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PageJson {
    /// `YYYY-MM`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$"))]
    pub period: String,
    /// Index of the first record in the period.
    pub start: u64,
    /// The record ids, hex, in order.
    pub ids: Vec<String>,
    /// The range proof, base64 hashes.
    pub proof: Vec<String>,
}

/// A read's proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReadProofJson {
    /// The named head.
    pub head: HeadJson,
    /// First period asked for, `YYYY-MM`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$"))]
    pub from: String,
    /// Last period asked for, `YYYY-MM`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$"))]
    pub to: String,
    /// Index of the first period leaf served.
    pub periods_lo: u64,
    /// The period leaves served.
    pub periods: Vec<PeriodLeafJson>,
    /// Their range proof, base64 hashes.
    pub periods_proof: Vec<String>,
    /// The pages.
    pub pages: Vec<PageJson>,
    /// Where the next page starts: `[YYYY-MM, index]`, or null.
    pub next: Option<(String, u64)>,
}

/// A read's answer: its acknowledgement (the access entry, for a company), the proof, the sealed records
/// of the proof's pages in order, and the signed batches that name them, all base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadAnswerJson {
    /// Where the access was logged, and the checkpoint that covers it.
    #[serde(flatten)]
    pub ack: crate::log::AckJson,
    /// The completeness proof.
    pub proof_of_read: ReadProofJson,
    /// The sealed records.
    pub records: Vec<crate::bytes::Base64>,
    /// The signed batches.
    pub batches: Vec<crate::bytes::Base64>,
}

fn hash_b64(h: &Hash) -> String {
    B64.encode(h)
}

fn parse_hash(field: &'static str, s: &str) -> Result<Hash, WireError> {
    B64.decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(err(field, "not a base64 32-byte hash"))
}

fn parse_id32(field: &'static str, s: &str) -> Result<[u8; 32], WireError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(err(field, "not 64 hex digits"))
}

fn parse_period(field: &'static str, s: &str) -> Result<Period, WireError> {
    Period::parse(s).ok_or(err(field, "not a month (YYYY-MM from 2000-01)"))
}

impl ReadProofJson {
    /// The wire form of `p`.
    pub fn from_proof(p: &ReadProof) -> Self {
        let h = &p.head;
        Self {
            head: HeadJson {
                customer: h.customer.to_hex(),
                family: h.family.to_hex(),
                batches: h.batches,
                records: h.records,
                periods: h.periods,
                periods_root: hash_b64(&h.periods_root),
                digest: h.digest().to_hex(),
            },
            from: p.from.to_string(),
            to: p.to.to_string(),
            periods_lo: p.periods_lo,
            periods: p
                .periods
                .iter()
                .map(|l| PeriodLeafJson {
                    period: l.period.to_string(),
                    count: l.count,
                    root: hash_b64(&l.root),
                })
                .collect(),
            periods_proof: p.periods_proof.iter().map(hash_b64).collect(),
            pages: p
                .pages
                .iter()
                .map(|pg| PageJson {
                    period: pg.period.to_string(),
                    start: pg.start,
                    ids: pg.ids.iter().map(RecordId::to_hex).collect(),
                    proof: pg.proof.iter().map(hash_b64).collect(),
                })
                .collect(),
            next: p.next.map(|(per, i)| (per.to_string(), i)),
        }
    }

    /// The proof, every field parsed (whether it verifies is the reader's check).
    pub fn to_proof(&self) -> Result<ReadProof, WireError> {
        let h = &self.head;
        Ok(ReadProof {
            head: Head {
                customer: IdentityId(parse_id32("head.customer", &h.customer)?),
                family: FamilyId(parse_id32("head.family", &h.family)?),
                batches: h.batches,
                records: h.records,
                periods: h.periods,
                periods_root: parse_hash("head.periods_root", &h.periods_root)?,
            },
            from: parse_period("from", &self.from)?,
            to: parse_period("to", &self.to)?,
            periods_lo: self.periods_lo,
            periods: self
                .periods
                .iter()
                .map(|l| {
                    Ok(PeriodLeaf {
                        period: parse_period("periods.period", &l.period)?,
                        count: l.count,
                        root: parse_hash("periods.root", &l.root)?,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            periods_proof: self
                .periods_proof
                .iter()
                .map(|x| parse_hash("periods_proof", x))
                .collect::<Result<_, _>>()?,
            pages: self
                .pages
                .iter()
                .map(|pg| {
                    Ok(PageProof {
                        period: parse_period("pages.period", &pg.period)?,
                        start: pg.start,
                        ids: pg
                            .ids
                            .iter()
                            .map(|i| {
                                hex::decode(i)
                                    .ok()
                                    .and_then(|b| b.try_into().ok())
                                    .map(RecordId)
                                    .ok_or(err("pages.ids", "not 32 hex digits"))
                            })
                            .collect::<Result<_, _>>()?,
                        proof: pg
                            .proof
                            .iter()
                            .map(|x| parse_hash("pages.proof", x))
                            .collect::<Result<_, _>>()?,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            next: self
                .next
                .as_ref()
                .map(|(p, i)| parse_period("next", p).map(|p| (p, *i)))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof() -> ReadProof {
        ReadProof {
            head: Head {
                customer: IdentityId([1; 32]),
                family: FamilyId([2; 32]),
                batches: 3,
                records: 7,
                periods: 2,
                periods_root: [4; 32],
            },
            from: Period::parse("2026-01").unwrap(),
            to: Period::parse("2026-03").unwrap(),
            periods_lo: 0,
            periods: vec![PeriodLeaf {
                period: Period::parse("2026-02").unwrap(),
                count: 7,
                root: [5; 32],
            }],
            periods_proof: vec![[6; 32]],
            pages: vec![PageProof {
                period: Period::parse("2026-02").unwrap(),
                start: 0,
                ids: vec![RecordId([9; 16])],
                proof: vec![[7; 32], [8; 32]],
            }],
            next: Some((Period::parse("2026-02").unwrap(), 1)),
        }
    }

    #[test]
    fn a_proof_round_trips_through_json() {
        let p = proof();
        let text = serde_json::to_string(&ReadProofJson::from_proof(&p)).unwrap();
        let back: ReadProofJson = serde_json::from_str(&text).unwrap();
        let q = back.to_proof().unwrap();
        assert_eq!(
            serde_json::to_string(&ReadProofJson::from_proof(&q)).unwrap(),
            text
        );
        assert!(text.contains("\"next\":[\"2026-02\",1]"), "{text}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut j = ReadProofJson::from_proof(&proof());
        j.head.family = "zz".into();
        assert_eq!(j.to_proof().unwrap_err().field, "head.family");
        let mut j = ReadProofJson::from_proof(&proof());
        j.pages[0].proof[1] = "AAAA".into();
        assert_eq!(j.to_proof().unwrap_err().field, "pages.proof");
        let mut j = ReadProofJson::from_proof(&proof());
        j.next = Some(("2026-13".into(), 0));
        assert_eq!(j.to_proof().unwrap_err().field, "next");
        // An unknown field is refused, not ignored.
        let text = serde_json::to_string(&ReadProofJson::from_proof(&proof()))
            .unwrap()
            .replacen("{", "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<ReadProofJson>(&text).is_err());
    }
}
