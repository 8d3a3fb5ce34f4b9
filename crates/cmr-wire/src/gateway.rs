//! The company gateway's JSON API (`cmr company gateway`, docs/companies.md): what a company's
//! backend sends and receives, in any language, without cryptography. Every answer has passed the
//! SDK's verifications in the gateway; ids are lowercase hex, months `YYYY-MM`.

use serde::{Deserialize, Serialize};

/// A grant this company holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GrantHeld {
    /// The grant's id.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub grant: String,
    /// The customer who issued it.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// `active`, `revoked`, `expired`, or `used` (a one-time grant read once).
    pub status: String,
    /// `SCOPE:ACCESS`, such as `transactions:read`.
    pub scopes: Vec<String>,
    /// How long it lasts, in words (`persistent`, `once`, `30 days, until 2026-12-31`).
    pub duration: String,
    /// When it expires, Unix seconds, if it does.
    pub expires: Option<u64>,
    /// The first month it opens.
    pub lookback_start: String,
    /// The purpose the customer agreed to.
    pub purpose: String,
    /// Whether the customer granted less than the request asked for (fewer scopes or less access, a
    /// shorter duration or look-back); `null` for a grant that answers no request this company kept.
    pub narrowed: Option<bool>,
}

/// A request this company sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RequestSent {
    /// The request's id.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub request: String,
    /// The customer asked.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// `pending`, `granted: grant <id>`, or `denied: <reason>`.
    pub status: String,
}

/// The grants held (`GET /v1/grants`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GrantsJson {
    /// Every grant held, ended ones included.
    pub grants: Vec<GrantHeld>,
}

/// One of the company's own accesses, as the customer's chain logged it (`GET /v1/accesses`, `cmr
/// company history --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccessJson {
    /// The customer whose vault was read or written.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// The access's log index.
    pub index: u64,
    /// Its server time (Unix seconds).
    pub time: u64,
    /// `read` or `append`.
    pub kind: String,
    /// The grant it was made under.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub grant: String,
    /// The families and periods, as `FAMILY:FROM..TO` (family hex, months YYYY-MM).
    pub families: Vec<String>,
}

/// The company's own accesses, oldest first (`GET /v1/accesses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccessesJson {
    /// The accesses.
    pub accesses: Vec<AccessJson>,
}

/// The requests sent (`GET /v1/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RequestsJson {
    /// Every request sent, and what became of it.
    pub requests: Vec<RequestSent>,
}

/// A new access request (`POST /v1/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    /// The customer to ask.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// `SCOPE:ACCESS`: scopes `profile.identity`, `profile.contact`, `profile.address`,
    /// `profile.preferences`, `profile.inferred`, `transactions`; access `read`, `append` or
    /// `read+append`.
    pub scopes: Vec<String>,
    /// Why, in words the customer reads.
    pub purpose: String,
    /// `once`, `persistent` (the default), or a number of days.
    #[serde(default)]
    pub duration: Option<String>,
    /// How many months of history (default 12).
    #[serde(default)]
    pub lookback_months: Option<u32>,
}

/// A request sent (`POST /v1/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RequestCreated {
    /// Its id.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub request: String,
}

/// A read under a grant (`POST /v1/grants/{grant}/read`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// The scope to read, such as `transactions` or `profile.contact`.
    pub scope: String,
    /// The first month (default: the grant's look-back start).
    #[serde(default)]
    pub from: Option<String>,
    /// The last month (default: this month).
    #[serde(default)]
    pub to: Option<String>,
}

/// A record read, verified and decrypted in the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecordRead {
    /// The record's id.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{32}$"))]
    pub record: String,
    /// Its month, for transactions.
    pub month: Option<String>,
    /// Who wrote it (the customer, or a company).
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub author: String,
    /// Its content as text (invalid UTF-8 replaced).
    pub text: String,
}

/// The records read (`POST /v1/grants/{grant}/read`): complete for the months asked, proven against
/// the family's head in the log, decrypted in the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecordsJson {
    /// The records, by month then in the order they were written.
    pub records: Vec<RecordRead>,
}

/// An append under a grant (`POST /v1/grants/{grant}/append`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AppendRequest {
    /// The month, for transactions (default: this month).
    #[serde(default)]
    pub month: Option<String>,
    /// The record, in words.
    pub text: String,
}

/// An append made durable (`POST /v1/grants/{grant}/append`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Appended {
    /// The log index of the append's entry.
    pub index: u64,
}

/// Something that changed for the company (`GET /v1/events`, server-sent events; the event's `id` is
/// the SSE id, and `kind` its event name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayEvent {
    /// Increasing, across the gateway's runs too (it keeps its events in the company's configuration
    /// folder); send it back as `Last-Event-ID` to resume.
    pub id: u64,
    /// `grant-new`, `grant-narrowed` (after `grant-new`, for a grant narrower than the request it
    /// answers), `grant-revoked`, `grant-expired`, `grant-used`, `rotation-delivered` (the customer
    /// rotated a family the grant reads and sealed its new key to the company), or `dispute`.
    pub kind: String,
    /// The customer.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
    pub customer: String,
    /// The grant, for a grant's event.
    pub grant: Option<String>,
    /// The disputed record, for a dispute.
    pub record: Option<String>,
}
