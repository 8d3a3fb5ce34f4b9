//! The answers about identities and vaults that are not log entries: key histories, the vaults a party
//! is involved in, a family's head, pending requests, key backups.

use serde::{Deserialize, Serialize};

use crate::log::EntryJson;

/// An identity's key events with the checkpoint their proofs lead to and the key-event head at its
/// size, signed with the log key (`/v1/identities/{id}/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KeyEventsJson {
    /// The signed checkpoint.
    pub checkpoint: String,
    /// The events, oldest first.
    pub events: Vec<EntryJson>,
    /// The key-event head, a signed note.
    pub head: String,
}

/// The customers whose chains concern a party, in id order (`/v1/identities/{id}/vaults`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VaultsJson {
    /// The customers' ids, hex.
    pub vaults: Vec<String>,
    /// The id to page after, if more follow.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub next: Option<String>,
}

/// A family head's digest (`/v1/vaults/{customer}/families/{family}/head`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeadDigestJson {
    /// The digest, hex.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub head: String,
}

/// One scope a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScopeJson {
    /// The scope's name.
    pub scope: String,
    /// `read`, `append` or `read-append`.
    pub access: String,
}

/// A request waiting for the customer's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PendingRequestJson {
    /// The request's statement id, hex.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub id: String,
    /// Its log index.
    pub index: u64,
    /// The company asking, hex.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub company: String,
    /// Why, in the company's words.
    pub purpose: String,
    /// What it asks for.
    pub scopes: Vec<ScopeJson>,
    /// For how long.
    pub duration: String,
    /// How many months back.
    pub lookback_months: u32,
    /// The signed statement, base64.
    pub statement: String,
    /// Its log entry, proven.
    pub entry: EntryJson,
}

/// The customer's unanswered requests (`/v1/vaults/{customer}/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PendingJson {
    /// The signed checkpoint the entries' proofs lead to.
    pub checkpoint: String,
    /// The requests, oldest first.
    pub pending: Vec<PendingRequestJson>,
    /// Whether more wait than were listed (never, while the store caps waiting requests).
    pub truncated: bool,
}

/// A key backup stored (`/v1/vaults/{customer}/backup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackupStoredJson {
    /// The version now stored.
    pub version: u64,
    /// The checkpoint current when it became durable.
    pub checkpoint: String,
}

/// The customer's latest key backup (`/v1/vaults/{customer}/backup/latest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackupJson {
    /// Its version.
    pub version: u64,
    /// The sealed backup, base64.
    pub backup: String,
}

/// A statement in a party's feed: where it is in the log, and whose vault it is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FeedEntryJson {
    /// The entry's log index.
    pub index: u64,
    /// The customer whose vault it is in.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
}

/// The consent statements that concern the caller across every vault, in log order (`/v1/feed`): a
/// hint of which vaults to read again, each then verified through that vault's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FeedJson {
    /// The checkpoint the entries are within.
    pub checkpoint: String,
    /// The statements, oldest first.
    pub entries: Vec<FeedEntryJson>,
    /// Where the next page starts (`after`), if more follow.
    pub next: Option<u64>,
}

/// One event of a customer's chain stream (`/v1/vaults/{customer}/events`, server-sent events named
/// `head`): the newest entry on the chain changed. A hint to read the chain again, which the client then
/// verifies as always; never evidence on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChainHeadJson {
    /// The log index of the newest entry on the customer's chain.
    pub head: u64,
}
