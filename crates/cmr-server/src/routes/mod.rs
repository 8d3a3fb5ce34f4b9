//! One router per area, merged in [`crate::app`]. Handlers extract, make one call, and map the result.

pub mod identities;
pub mod log;
pub mod openapi;
pub mod vaults;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_store::Ack;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Runs an operation through the store's sequencer and waits for its durable acknowledgement.
pub(crate) async fn run(state: &crate::AppState, op: cmr_store::Op) -> Result<Ack, ApiError> {
    Ok(state
        .store
        .submit(op)
        .await
        // The sequencer dropped the reply without answering (it stopped mid-group): the operation may
        // or may not have been applied.
        .map_err(|_| ApiError::in_doubt("the store stopped while handling this request"))??)
}

/// Parses a JSON body; unknown fields are refused by the types.
pub(crate) fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("body: {e}")))
}

/// [`json_body`] for a body whose fields are all optional: an empty body is the default.
pub(crate) fn optional_json_body<T: DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        json_body(body)
    }
}

/// Decodes a base64 field.
pub(crate) fn b64(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    B64.decode(s)
        .map_err(|_| ApiError::malformed(format!("{field} is not base64")))
}

/// An acknowledgement as JSON: index, inclusion proof, the checkpoint that covers it, and the logged
/// entry's salt and body, so that the submitter checks by itself that what it sent is what was logged;
/// with the consistency proof from the log size the client said it knows, which saves it a round trip.
pub(crate) fn ack_json(
    state: &crate::AppState,
    ack: &Ack,
    known: Option<u64>,
) -> cmr_wire::log::AckJson {
    use cmr_wire::log::{AckJson, ConsistencyJson, SaltedJson, hashes_b64};
    // The entry the operation logged comes with its acknowledgement; a repeat reads it back.
    let entry = ack
        .entry
        .clone()
        .or_else(|| ack.index.and_then(|i| state.store.body(i).ok().flatten()))
        .map(|e| SaltedJson {
            salt: B64.encode(e.salt),
            body: B64.encode(&e.body),
        });
    let consistency = known.filter(|k| *k > 0 && *k < ack.size).and_then(|k| {
        state
            .store
            .consistency_proof(k, ack.size)
            .ok()
            .map(|p| ConsistencyJson {
                old: k,
                proof: hashes_b64(&p),
            })
    });
    AckJson {
        index: ack.index,
        size: ack.size,
        consistency,
        proof: hashes_b64(&ack.proof),
        checkpoint: ack.checkpoint.clone(),
        repeated: ack.repeated,
        entry,
        head: ack.head.map(|h| h.to_hex()),
    }
}

/// The checkpoint clients verify against, and its size.
pub(crate) fn current_checkpoint(state: &crate::AppState) -> Result<(String, u64), ApiError> {
    let checkpoint = state.store.checkpoint()?.unwrap_or_default();
    let size = cmr_log::note::Note::parse(&checkpoint)
        .ok()
        .and_then(|n| cmr_log::checkpoint::Checkpoint::parse_text(&n.text).ok())
        .map_or(0, |c| c.size);
    Ok((checkpoint, size))
}

/// A logged entry for a client to verify: index, salt, body, and its inclusion proof at `size`.
pub(crate) fn entry_json(
    state: &crate::AppState,
    index: u64,
    stored: &cmr_log::entry::SaltedBody,
    size: u64,
) -> Result<cmr_wire::log::EntryJson, ApiError> {
    let proof = state.store.inclusion_proof(index, size)?;
    Ok(cmr_wire::log::EntryJson::new(
        index,
        &stored.salt,
        &stored.body,
        &proof,
    ))
}

/// Parses a 64-hex-digit id from a path.
pub(crate) fn hex_id(field: &str, s: &str) -> Result<[u8; 32], ApiError> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(ApiError::malformed(format!("{field} is 64 hex digits")));
    }
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| ApiError::malformed(format!("{field} is 64 hex digits")))?;
    Ok(out)
}

/// The problem details any route may answer with (RFC 9457), for the OpenAPI document.
#[allow(dead_code)] // Described only, for the OpenAPI document; the handlers extract it themselves.
#[derive(utoipa::IntoResponses)]
#[response(
    status = "default",
    description = "A problem (RFC 9457)",
    content_type = "application/problem+json"
)]
pub(crate) struct Problem(cmr_wire::problem::ProblemJson);

/// A vault's path, for the OpenAPI document.
#[allow(dead_code)] // Described only, for the OpenAPI document; the handlers extract it themselves.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct VaultPath {
    /// The vault (the customer's identity), 64 hex digits.
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub customer: String,
}

/// A family's path, for the OpenAPI document.
#[allow(dead_code)] // Described only, for the OpenAPI document; the handlers extract it themselves.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct FamilyPath {
    /// The vault (the customer's identity), 64 hex digits.
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub customer: String,
    /// The family, 64 hex digits.
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub family: String,
}

/// An identity's path, for the OpenAPI document.
#[allow(dead_code)] // Described only, for the OpenAPI document; the handlers extract it themselves.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct IdentityPath {
    /// The identity, 64 hex digits.
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub id: String,
}
