//! Consent receipts: what the customer keeps for each grant.
//!
//! Owns the receipt's machine-readable form (JSON, with the Kantara Consent Receipt v1.1 field names where
//! they fit) and its readable text. It reads a signed grant and where it was logged; it does not fetch
//! anything.

use serde::Serialize;

use crate::consent::{Access, Body, Duration, SignedStatement};
use crate::family::Period;
use crate::identity::{IdentityId, Position};

/// Who the company is, as the customer's client verified it (its domain document and fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompanyInfo {
    /// Display name.
    pub name: String,
    /// The verified domain.
    pub domain: String,
}

/// A Kantara-style purpose entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Purpose {
    /// The purpose, in the words of the grant.
    pub purpose: String,
    /// `explicit`: the customer approved this grant.
    pub consent_type: String,
    /// The scopes (PII categories) and their access.
    pub pii_category: Vec<String>,
    /// How it ends.
    pub termination: String,
    /// Always false: a grant discloses to its grantee only.
    pub third_party_disclosure: bool,
}

/// A Kantara-style service entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The company's display name.
    pub service: String,
    /// The purposes.
    pub purposes: Vec<Purpose>,
}

/// A Kantara-style controller entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Controller {
    /// The company's name.
    pub pii_controller: String,
    /// Its verified domain.
    pub contact: String,
    /// Its CMR identity id.
    pub identity: String,
}

/// Where the grant sits in the log, so the customer can prove it later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLink {
    /// The grant's id.
    pub grant_id: String,
    /// The log index of the grant's entry.
    pub log_index: u64,
}

/// A consent receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentReceipt {
    /// `KI-CR-v1.1.0`.
    pub version: String,
    /// Server time of the grant, Unix seconds.
    pub consent_timestamp: u64,
    /// How consent was collected.
    pub collection_method: String,
    /// The receipt's id: the grant id.
    pub consent_receipt_id: String,
    /// The customer's id.
    pub pii_principal_id: String,
    /// The company.
    pub pii_controllers: Vec<Controller>,
    /// The services and purposes.
    pub services: Vec<Service>,
    /// Whether sensitive categories are covered (identity data counts).
    pub sensitive: bool,
    /// Valid from (server time).
    pub not_before: u64,
    /// Valid until (server time, exclusive), if it expires.
    pub expires: Option<u64>,
    /// The first month of history the company may read.
    pub look_back_start: String,
    /// A sliding window in months, enforced by the server, if any.
    pub window_months: Option<u32>,
    /// The request this grant answered, if any.
    pub answers_request: Option<String>,
    /// Where the grant is in the log.
    pub log: LogLink,
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Read => "read",
        Access::Append => "append",
        Access::ReadAppend => "read+append",
    }
}

impl ConsentReceipt {
    /// The receipt for `grant`, logged at `position` with server time `time`. `None` if it is not a grant.
    pub fn for_grant(
        grant: &SignedStatement,
        position: Position,
        time: u64,
        company: &CompanyInfo,
        grantee: IdentityId,
    ) -> Option<Self> {
        let Body::Grant(g) = &grant.statement().body else {
            return None;
        };
        let termination = match g.duration {
            Duration::OneTime => {
                "one-time: ends after the first read; revocable at any time".to_string()
            }
            Duration::TimeBound { seconds } => format!(
                "time-bound: {} days, until {}; revocable at any time",
                seconds / 86_400,
                g.expires.unwrap_or_default()
            ),
            Duration::Persistent => "persistent: until revoked".to_string(),
        };
        Some(Self {
            version: "KI-CR-v1.1.0".into(),
            consent_timestamp: time,
            collection_method: "CMR Vault grant, signed by the customer's device".into(),
            consent_receipt_id: grant.id().to_hex(),
            pii_principal_id: grant.statement().customer.to_hex(),
            pii_controllers: vec![Controller {
                pii_controller: company.name.clone(),
                contact: company.domain.clone(),
                identity: grantee.to_hex(),
            }],
            services: vec![Service {
                service: company.name.clone(),
                purposes: vec![Purpose {
                    purpose: g.purpose.clone(),
                    consent_type: "explicit".into(),
                    pii_category: g
                        .scopes
                        .iter()
                        .map(|(s, a)| format!("{} ({})", s.name(), access_name(*a)))
                        .collect(),
                    termination,
                    third_party_disclosure: false,
                }],
            }],
            sensitive: g
                .scopes
                .iter()
                .any(|(s, _)| *s == crate::family::Scope::ProfileIdentity),
            not_before: g.not_before,
            expires: g.expires,
            look_back_start: g.lookback_start.to_string(),
            window_months: g.window_months,
            answers_request: g.request.map(|r| r.to_hex()),
            log: LogLink {
                grant_id: grant.id().to_hex(),
                log_index: position,
            },
        })
    }

    /// The machine-readable form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a receipt always serializes")
    }

    /// The readable form.
    pub fn to_text(&self) -> String {
        let c = &self.pii_controllers[0];
        let p = &self.services[0].purposes[0];
        let mut out = String::new();
        out.push_str("Consent receipt\n");
        out.push_str(&format!(
            "  who:      {} ({}), id {}\n",
            c.pii_controller, c.contact, c.identity
        ));
        out.push_str(&format!("  what:     {}\n", p.pii_category.join(", ")));
        out.push_str(&format!("  why:      {}\n", p.purpose));
        out.push_str(&format!("  how long: {}\n", p.termination));
        out.push_str(&format!("  history:  from {}", self.look_back_start));
        if let Some(m) = self.window_months {
            out.push_str(&format!(" (and at most the last {m} months)"));
        }
        out.push('\n');
        out.push_str(&format!(
            "  grant:    {} at log index {}\n",
            self.log.grant_id, self.log.log_index
        ));
        out
    }
}

/// The period a look-back of `months` starts at, from server time `now`.
pub fn lookback_start(now: u64, months: u32) -> Period {
    let p = Period::from_unix(now as i64).unwrap_or(Period::ORIGIN);
    Period(p.0.saturating_sub(months)).max(Period::ORIGIN)
}
