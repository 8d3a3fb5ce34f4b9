//! A company's domain proof. A company serves its key document at `https://DOMAIN/.well-known/cmr-vault`:
//! `{"identity": "<64 hex>", "name": "<display name>"}`. The customer's client fetches it before it
//! approves a request and checks that it names the requester; it then shows the verified domain and the
//! identity's fingerprint. Only TLS proves a domain, so plain http is refused unless the caller opts into
//! test mode explicitly.

use cmr_core::identity::IdentityId;
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, VerifyError};

/// The well-known path.
pub const PATH: &str = "/.well-known/cmr-vault";

/// The key document a company serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDocument {
    /// The company's identity, 64 hex digits.
    pub identity: String,
    /// Its display name.
    pub name: String,
}

/// A verified domain proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompanyProof {
    /// The domain that vouches.
    pub domain: String,
    /// The display name it gives.
    pub name: String,
    /// The identity it vouches for.
    pub identity: IdentityId,
}

impl CompanyProof {
    /// A short fingerprint of the identity, for people to compare: four groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.identity)
    }
}

/// A short fingerprint of an identity.
pub fn fingerprint(id: &IdentityId) -> String {
    fingerprint_of(&id.0)
}

/// A short fingerprint of 32 bytes (an identity or a device id), for people to compare: the first 16 hex
/// digits in groups of four.
pub fn fingerprint_of(bytes: &[u8; 32]) -> String {
    let h = hex::encode(&bytes[..8]);
    format!("{} {} {} {}", &h[0..4], &h[4..8], &h[8..12], &h[12..16])
}

/// Whether plain http is allowed (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// https only.
    Tls,
    /// http allowed: an explicit test mode, never for real domains.
    InsecureTestHttp,
}

/// Fetches and checks `domain`'s key document; `domain` may carry a port.
pub async fn fetch(domain: &str, mode: Mode) -> Result<CompanyProof, ClientError> {
    crate::transport::tls_provider();
    // A bare host, optionally with a port: nothing that could change the URL's meaning.
    let host_ok = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !host_ok {
        return Err(VerifyError::CompanyIdentity(format!("{domain:?} is not a domain")).into());
    }
    let scheme = match mode {
        Mode::Tls => "https",
        Mode::InsecureTestHttp => "http",
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    let resp = http
        .get(format!("{scheme}://{domain}{PATH}"))
        .send()
        .await
        .map_err(|e| VerifyError::CompanyIdentity(format!("cannot fetch {domain}{PATH}: {e}")))?;
    if !resp.status().is_success() {
        return Err(VerifyError::CompanyIdentity(format!(
            "{domain}{PATH} answered {}",
            resp.status()
        ))
        .into());
    }
    let mut resp = resp;
    let mut bytes = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| VerifyError::CompanyIdentity(e.to_string()))?
    {
        if bytes.len() + chunk.len() > 16 * 1024 {
            return Err(VerifyError::CompanyIdentity(
                "the key document is larger than 16 KiB".into(),
            )
            .into());
        }
        bytes.extend_from_slice(&chunk);
    }
    let doc: KeyDocument = serde_json::from_slice(&bytes).map_err(|e| {
        VerifyError::CompanyIdentity(format!("the key document does not parse: {e}"))
    })?;
    let identity = IdentityId::from_hex(&doc.identity).ok_or_else(|| {
        VerifyError::CompanyIdentity("the key document's identity is not 64 hex digits".into())
    })?;
    Ok(CompanyProof {
        domain: domain.to_string(),
        name: doc.name,
        identity,
    })
}
