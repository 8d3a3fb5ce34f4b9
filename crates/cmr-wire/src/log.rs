//! Log entries and acknowledgements on the wire.
//!
//! A proven entry (`{index, salt, body, proof}`) is how every route hands out a log entry a client is
//! allowed to open: key events, relationship and history pages, auditor reads, acknowledgements. An
//! acknowledgement adds the checkpoint that covers the entry and, when the client said which size it
//! knows, the consistency proof from there.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::merkle::Hash;
use serde::{Deserialize, Serialize};

use crate::{WireError, err};

/// A logged entry with its salt, body and inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EntryJson {
    /// Its log index.
    pub index: u64,
    /// The commitment's salt, base64.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub salt: String,
    /// The entry body, base64.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]*={0,2}$"))]
    pub body: String,
    /// The inclusion proof in the checkpoint served with it, base64 hashes.
    pub proof: Vec<String>,
    /// The entry's kind by name, where a listing says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The entry's server time (Unix seconds), where a listing says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
}

/// The parts of an [`EntryJson`], decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its log index.
    pub index: u64,
    /// The salt.
    pub salt: [u8; 32],
    /// The body.
    pub body: Vec<u8>,
    /// The inclusion proof.
    pub proof: Vec<Hash>,
}

/// Base64 hashes, for a proof.
pub fn hashes_b64(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|h| B64.encode(h)).collect()
}

/// A proof's base64 hashes, decoded.
pub fn parse_hashes(field: &'static str, hashes: &[String]) -> Result<Vec<Hash>, WireError> {
    hashes
        .iter()
        .map(|h| {
            B64.decode(h)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or(err(field, "not a base64 32-byte hash"))
        })
        .collect()
}

impl EntryJson {
    /// The wire form of an entry.
    pub fn new(index: u64, salt: &[u8; 32], body: &[u8], proof: &[Hash]) -> Self {
        Self {
            index,
            salt: B64.encode(salt),
            body: B64.encode(body),
            proof: hashes_b64(proof),
            kind: None,
            time: None,
        }
    }

    /// The entry, every field decoded (whether it is included is the reader's check).
    pub fn decode(&self) -> Result<Entry, WireError> {
        Ok(Entry {
            index: self.index,
            salt: B64
                .decode(&self.salt)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or(err("salt", "not a base64 32-byte salt"))?,
            body: B64
                .decode(&self.body)
                .map_err(|_| err("body", "not base64"))?,
            proof: parse_hashes("proof", &self.proof)?,
        })
    }
}

/// The consistency proof from the size the client said it knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConsistencyJson {
    /// The size the client knows.
    pub old: u64,
    /// The proof from it to the acknowledgement's size, base64 hashes.
    pub proof: Vec<String>,
}

/// An acknowledgement: where the operation was logged (none for an unlogged read), the checkpoint that
/// covers it, the logged entry, and what the store says of it. A read's answer carries more fields
/// beside these, so unknown fields are not refused here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AckJson {
    /// The log index.
    pub index: Option<u64>,
    /// The checkpoint's size.
    pub size: u64,
    /// From the size the client knows, when it said one.
    pub consistency: Option<ConsistencyJson>,
    /// The entry's inclusion proof, base64 hashes.
    pub proof: Vec<String>,
    /// The signed checkpoint.
    pub checkpoint: String,
    /// Whether this repeats an operation logged before.
    pub repeated: bool,
    /// The logged entry's salt and body, base64.
    pub entry: Option<SaltedJson>,
    /// After a batch, the family head it produced, hex.
    pub head: Option<String>,
}

/// A salt and a body, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SaltedJson {
    /// The salt.
    pub salt: String,
    /// The body.
    pub body: String,
}

/// An entry of a chain whose body was erased: only its place is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RedactedJson {
    /// Its log index.
    pub index: u64,
    /// Always true.
    pub redacted: bool,
}

/// One step of a customer's chain: an entry, or the place of an erased one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum ChainEntryJson {
    /// The place of an erased entry.
    Redacted(RedactedJson),
    /// An entry, with its kind and time.
    Entry(EntryJson),
}

/// A page of entries with the checkpoint their proofs lead to, and where the next page starts
/// (`/v1/vaults/{customer}/history`: newest first, `next` the index to start before;
/// `/v1/vaults/{customer}/relationship`: oldest first, `next` the index to start after).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PageOfEntriesJson {
    /// The signed checkpoint.
    pub checkpoint: String,
    /// The entries.
    pub entries: Vec<ChainEntryJson>,
    /// Where the next page starts, if there is one.
    pub next: Option<u64>,
}

/// A proof, base64 hashes (`/v1/log/proofs/inclusion`, `/v1/log/proofs/consistency`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProofJson {
    /// The hashes, base64.
    pub proof: Vec<String>,
}

/// Leaf commitments, base64 (`/v1/log/commitments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CommitmentsJson {
    /// The commitments, in log order, base64.
    pub commitments: Vec<String>,
}

/// Entries served with the checkpoint their proofs lead to (`/v1/auditors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EntriesJson {
    /// The signed checkpoint.
    pub checkpoint: String,
    /// The entries, oldest first.
    pub entries: Vec<EntryJson>,
}

/// A witness whose cosignature is now served with the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CosignerJson {
    /// The witness key's name.
    pub name: String,
    /// When it cosigned, Unix seconds.
    pub time: u64,
}

/// The checkpoint's cosigners after a cosignature was handed in (`/v1/log/cosignatures`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CosignedJson {
    /// The checkpoint's size.
    pub size: u64,
    /// Every cosigner verified over it.
    pub cosigners: Vec<CosignerJson>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_and_bad_fields_are_named() {
        let e = EntryJson::new(7, &[1; 32], b"body", &[[2; 32], [3; 32]]);
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains("kind"), "{text}");
        let back: EntryJson = serde_json::from_str(&text).unwrap();
        let d = back.decode().unwrap();
        assert_eq!(
            (d.index, d.salt, d.body.as_slice(), d.proof.len()),
            (7, [1; 32], &b"body"[..], 2)
        );
        let mut bad = e.clone();
        bad.salt = "AAAA".into();
        assert_eq!(bad.decode().unwrap_err().field, "salt");
        let mut bad = e;
        bad.proof.push("!".into());
        assert_eq!(bad.decode().unwrap_err().field, "proof");
    }
}
