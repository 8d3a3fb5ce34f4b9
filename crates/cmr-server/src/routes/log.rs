//! The public log: checkpoints, commitments and proofs. Unsigned, readable by anyone.

use std::sync::Arc;

use crate::extract::{Path, Query};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// The log's routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/log/checkpoint", get(checkpoint))
        .route("/v1/log/commitments", get(commitments))
        .route("/v1/log/proofs/inclusion", get(inclusion))
        .route("/v1/log/proofs/consistency", get(consistency))
        .route("/v1/log/entries/{index}", axum::routing::post(entry))
        .route("/v1/log/cosignatures", axum::routing::post(cosign))
        .route("/v1/auditors", get(auditors).post(admit))
}

/// Every auditor admission and dismissal, oldest first, with salt and inclusion proof in the checkpoint
/// served with them. Public: an admission names only the auditor, and every customer may see who can
/// read log bodies and since when.
async fn auditors(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let (checkpoint, size) = super::current_checkpoint(&state)?;
    let mut entries = Vec::new();
    for index in state.store.admissions()? {
        if index >= size {
            break;
        }
        if let Some(stored) = state.store.body(index)? {
            entries.push(super::entry_json(&state, index, &stored, size)?);
        }
    }
    Ok(Json(
        json!({ "checkpoint": checkpoint, "entries": entries }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmitBody {
    /// The admission statement: a signed note, signed with the log key.
    statement: String,
}

/// The operator admits or dismisses an auditor. The statement is signed with the log key, so the request
/// needs no other signature; the same statement sent again is answered with its original index.
async fn admit(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<cmr_wire::log::AckJson>, ApiError> {
    let req: AdmitBody = super::json_body(&body)?;
    let ack = super::run(&state, cmr_store::Op::Admission(req.statement.into_bytes())).await?;
    Ok(Json(super::ack_json(&state, &ack, None)))
}

/// `ok` while the store takes operations; 503 once it stopped after a failure (a supervisor restarts
/// the server, and the store reopens from what is durable).
async fn healthz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    if state.store.healthy() {
        Ok("ok")
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the store stopped after a failure; restart the server to reopen it",
        ))
    }
}

async fn checkpoint(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let mut note = state
        .store
        .checkpoint()?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not-found", "the log is empty"))?;
    // Add the witness cosignatures collected for this very checkpoint.
    let size = checkpoint_size(&note);
    let cosigned = state.cosignatures.lock().unwrap_or_else(|p| p.into_inner());
    if cosigned.0 == size {
        for line in &cosigned.1 {
            note.push_str(line);
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note))
}

fn checkpoint_size(note: &str) -> u64 {
    cmr_log::note::Note::parse(note)
        .ok()
        .and_then(|n| cmr_log::checkpoint::Checkpoint::parse_text(&n.text).ok())
        .map_or(0, |c| c.size)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CosignBody {
    /// The witness's signature line over the current checkpoint (C2SP tlog-cosignature).
    line: String,
}

/// A configured witness hands in its cosignature of the current checkpoint. The line must verify under
/// one of the configured witness keys over that checkpoint; it is then served with it.
async fn cosign(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: CosignBody = super::json_body(&body)?;
    let note = state
        .store
        .checkpoint()?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not-found", "the log is empty"))?;
    let line = if req.line.ends_with('\n') {
        req.line.clone()
    } else {
        format!("{}\n", req.line)
    };
    let with = cmr_log::note::add_signature(&note, &line);
    let verified = cmr_log::checkpoint::open(
        &with,
        state.store.log_verifier(),
        &state.config.witnesses,
        1,
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad-cosignature",
            e.to_string(),
        )
    })?;
    let size = verified.checkpoint.size;
    let mut cosigned = state.cosignatures.lock().unwrap_or_else(|p| p.into_inner());
    if cosigned.0 != size {
        *cosigned = (size, Vec::new());
    }
    if !cosigned.1.contains(&line) {
        cosigned.1.push(line);
    }
    Ok(Json(
        json!({ "size": size, "cosigners": verified.cosigners.iter().map(|(n, t)| json!({"name": n, "time": t})).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    from: u64,
    to: u64,
}

/// The most commitments served at once.
const MAX_COMMITMENTS: u64 = 1000;

async fn commitments(
    State(state): State<Arc<AppState>>,
    Query(r): Query<Range>,
) -> Result<Json<Value>, ApiError> {
    if r.to < r.from || r.to - r.from > MAX_COMMITMENTS {
        return Err(ApiError::malformed(format!(
            "at most {MAX_COMMITMENTS} commitments, from <= to"
        )));
    }
    let c = state.store.commitments(r.from, r.to)?;
    Ok(Json(
        json!({ "commitments": c.iter().map(|d| B64.encode(d.0)).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    index: u64,
    size: u64,
}

async fn inclusion(
    State(state): State<Arc<AppState>>,
    Query(q): Query<InclusionQuery>,
) -> Result<Json<Value>, ApiError> {
    let proof = state
        .store
        .inclusion_proof(q.index, q.size)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such index or size"))?;
    Ok(Json(
        json!({ "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    old: u64,
    new: u64,
}

async fn consistency(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ConsistencyQuery>,
) -> Result<Json<Value>, ApiError> {
    let proof = state
        .store
        .consistency_proof(q.old, q.new)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such sizes"))?;
    Ok(Json(
        json!({ "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>() }),
    ))
}

/// An entry's body and salt: only for the parties it involves (its customer and its subject) and for
/// auditors the operator admitted. The request is signed (POST so that it carries a body digest like every other).
async fn entry(
    State(state): State<Arc<AppState>>,
    Path(index): Path<u64>,
    crate::auth::SignedRequest { caller, .. }: crate::auth::SignedRequest,
) -> Result<Json<Value>, ApiError> {
    let stored = state.store.body(index)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such entry, or it was erased",
        )
    })?;
    let entry = cmr_log::entry::EntryBody::decode(&stored.body).map_err(|_| {
        tracing::error!(index, "stored entry does not decode");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    })?;
    let involved = entry.subject == caller.identity || entry.customer == Some(caller.identity);
    let auditor = state.store.is_admitted_auditor(&caller.identity);
    if !involved && !auditor {
        return Err(ApiError::forbidden("this entry does not involve you"));
    }
    Ok(Json(
        json!({ "salt": B64.encode(stored.salt), "body": B64.encode(&stored.body) }),
    ))
}
