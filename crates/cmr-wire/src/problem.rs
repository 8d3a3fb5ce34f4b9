//! A problem (RFC 9457): how every refusal and failure is answered, as `application/problem+json`.

use serde::{Deserialize, Serialize};

/// A problem. Its `type` is `urn:cmr-vault:problem:{code}` and its `title` the stable code itself
/// (docs/api.md lists them); some problems add members (a `rotation-pending` carries the current signed
/// directory), which readers keep or ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProblemJson {
    /// `urn:cmr-vault:problem:{code}`.
    #[serde(rename = "type")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^urn:cmr-vault:problem:[a-z-]+$")
    )]
    pub kind: String,
    /// The stable code.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z-]+$"))]
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for people (never internal details on a 5xx).
    pub detail: String,
}

impl ProblemJson {
    /// The problem of `code` at `status`.
    pub fn new(code: &str, status: u16, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:cmr-vault:problem:{code}"),
            title: code.to_owned(),
            status,
            detail: detail.into(),
        }
    }

    /// Its stable code.
    pub fn code(&self) -> &str {
        &self.title
    }
}
