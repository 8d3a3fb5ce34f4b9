//! The public log: checkpoints, commitments and proofs. Unsigned, readable by anyone.

use cmr_core::problem::Code;
use std::sync::Arc;

use crate::extract::{Path, Query};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_wire::log::{
    AckJson, CommitmentsJson, CosignedJson, CosignerJson, EntriesJson, ProofJson, SaltedJson,
    hashes_b64,
};
use serde::Deserialize;

#[allow(unused_imports)] // Named in the OpenAPI annotations.
use super::{FamilyPath, IdentityPath, Problem, VaultPath};
use crate::AppState;
use crate::error::ApiError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The log's routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(checkpoint))
        .routes(routes!(restore_note))
        .routes(routes!(commitments))
        .routes(routes!(inclusion))
        .routes(routes!(consistency))
        .routes(routes!(entry))
        .routes(routes!(cosign))
        .routes(routes!(auditors, admit))
}

/// Every auditor admission and dismissal, oldest first, with salt and inclusion proof in the checkpoint
/// served with them. Public: an admission names only the auditor, and every customer may see who can
/// read log bodies and since when.
#[utoipa::path(
    get,
    path = "/v1/auditors",
    tag = "log",
    summary = "Every auditor admission and dismissal, with inclusion proofs",
    responses(
        (status = 200, description = "Success", body = EntriesJson),
        Problem
    ),
)]
async fn auditors(State(state): State<Arc<AppState>>) -> Result<Json<EntriesJson>, ApiError> {
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
    Ok(Json(EntriesJson {
        checkpoint,
        entries,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AdmitBody {
    /// The admission statement: a signed note, signed with the log key.
    statement: String,
}

/// The operator admits or dismisses an auditor. The statement is signed with the log key, so the request
/// needs no other signature; the same statement sent again is answered with its original index.
#[utoipa::path(
    post,
    path = "/v1/auditors",
    tag = "log",
    summary = "Admit or dismiss an auditor (a statement signed with the log key)",
    request_body = AdmitBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
)]
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
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "log",
    summary = "Liveness: `ok` while the process answers (see `/readyz` for whether it takes operations)",
    responses(
        (status = 200, description = "Success", body = String, content_type = "text/plain"),
        Problem
    ),
)]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "log",
    summary = "Readiness: `ok` while the store takes operations; 503 while it is stopped after a storage failure",
    responses(
        (status = 200, description = "Success", body = String, content_type = "text/plain"),
        Problem
    ),
)]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    if state.store.healthy() {
        Ok("ok")
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "the store stopped after a storage failure: on PostgreSQL it reconnects by itself once \
             the database answers again; on sled, restart the server to reopen it",
        ))
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "log",
    summary = "Metrics in the Prometheus text format (OpenMetrics): requests by route and status, latency, refusals by code, group commits, syncs, log and store size",
    responses(
        (status = 200, description = "Success", body = String, content_type = "application/openmetrics-text"),
        Problem
    ),
)]
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let size = state
        .store
        .checkpoint()
        .ok()
        .flatten()
        .map_or(0, |note| checkpoint_size(&note));
    // A storage out of reach leaves the size unknown; the rest is still worth serving.
    let bytes = state.store.size_on_disk().ok().flatten();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(size, bytes, state.connections.open()),
    )
}

#[utoipa::path(
    get,
    path = "/v1/log/checkpoint",
    tag = "log",
    summary = "The latest signed checkpoint (C2SP signed note), with the witness cosignatures collected for it",
    params(
        ("cmr-known-size" = Option<u64>, Header, description = "The log size the client verified last, perhaps through another server on the same database: this one catches up to it first")
    ),
    responses(
        (status = 200, description = "Success", body = String, content_type = "text/plain"),
        Problem
    ),
)]
async fn checkpoint(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    // A client that saw more of the log through another server sharing the database says so: this
    // one catches up first (a rollback would be the only other explanation).
    if let Some(size) = crate::auth::known_size(&headers)? {
        state.store.follow_to(size);
    }
    let mut note = state
        .store
        .checkpoint()?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "the log is empty"))?;
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

/// The note a restore from a snapshot signed with the log key: the log went back to the size it names,
/// and entries a client saw past it are gone. A client that finds the log shorter than it saw, or
/// forked from it, reads this to tell its user why (it still refuses the log).
#[utoipa::path(
    get,
    path = "/v1/log/restore",
    tag = "log",
    summary = "The signed note of the restore from a backup this log went through, if any",
    responses(
        (status = 200, description = "Success", body = String, content_type = "text/plain"),
        Problem
    ),
)]
async fn restore_note(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let note = state.store.restored()?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "this log was never restored from a backup",
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note))
}

fn checkpoint_size(note: &str) -> u64 {
    cmr_log::note::Note::parse(note)
        .ok()
        .and_then(|n| cmr_log::checkpoint::Checkpoint::parse_text(&n.text).ok())
        .map_or(0, |c| c.size)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CosignBody {
    /// The witness's signature line over the current checkpoint (C2SP tlog-cosignature).
    line: String,
}

/// A configured witness hands in its cosignature of the current checkpoint. The line must verify under
/// one of the configured witness keys over that checkpoint; it is then served with it.
#[utoipa::path(
    post,
    path = "/v1/log/cosignatures",
    tag = "log",
    summary = "A configured witness hands in its cosignature of the current checkpoint",
    request_body = CosignBody,
    responses(
        (status = 200, description = "Success", body = CosignedJson),
        Problem
    ),
)]
async fn cosign(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<CosignedJson>, ApiError> {
    let req: CosignBody = super::json_body(&body)?;
    let note = state
        .store
        .checkpoint()?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "the log is empty"))?;
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
            Code::BadCosignature,
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
    Ok(Json(CosignedJson {
        size,
        cosigners: verified
            .cosigners
            .iter()
            .map(|(name, time)| CosignerJson {
                name: name.clone(),
                time: *time,
            })
            .collect(),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Range {
    from: u64,
    to: u64,
}

/// The most commitments served at once.
const MAX_COMMITMENTS: u64 = 1000;

#[utoipa::path(
    get,
    path = "/v1/log/commitments",
    tag = "log",
    summary = "Leaf commitments from..to (at most 1,000)",
    params(
        Range
    ),
    responses(
        (status = 200, description = "Success", body = CommitmentsJson),
        Problem
    ),
)]
async fn commitments(
    State(state): State<Arc<AppState>>,
    Query(r): Query<Range>,
) -> Result<Json<CommitmentsJson>, ApiError> {
    if r.to < r.from || r.to - r.from > MAX_COMMITMENTS {
        return Err(ApiError::malformed(format!(
            "at most {MAX_COMMITMENTS} commitments, from <= to"
        )));
    }
    let c = state.store.commitments(r.from, r.to)?;
    Ok(Json(CommitmentsJson {
        commitments: c.iter().map(|d| B64.encode(d.0)).collect(),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    index: u64,
    size: u64,
}

#[utoipa::path(
    get,
    path = "/v1/log/proofs/inclusion",
    tag = "log",
    summary = "RFC 9162 inclusion proof (index, size)",
    params(
        InclusionQuery
    ),
    responses(
        (status = 200, description = "Success", body = ProofJson),
        Problem
    ),
)]
async fn inclusion(
    State(state): State<Arc<AppState>>,
    Query(q): Query<InclusionQuery>,
) -> Result<Json<ProofJson>, ApiError> {
    // A size this server has not seen yet may be durable through another server on the same
    // database: catch up first. Past that, a size or index outside the durable log is not found (and
    // the storage out of reach is not that).
    state.store.follow_to(q.size);
    let proof = state.store.inclusion_proof(q.index, q.size)?;
    Ok(Json(ProofJson {
        proof: hashes_b64(&proof),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    old: u64,
    new: u64,
}

#[utoipa::path(
    get,
    path = "/v1/log/proofs/consistency",
    tag = "log",
    summary = "RFC 9162 consistency proof (old, new)",
    params(
        ConsistencyQuery
    ),
    responses(
        (status = 200, description = "Success", body = ProofJson),
        Problem
    ),
)]
async fn consistency(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ConsistencyQuery>,
) -> Result<Json<ProofJson>, ApiError> {
    // As for inclusion proofs: catch up to a size another server made durable, then prove.
    state.store.follow_to(q.new);
    let proof = state.store.consistency_proof(q.old, q.new)?;
    Ok(Json(ProofJson {
        proof: hashes_b64(&proof),
    }))
}

/// An entry's body and salt: only for the parties it involves (its customer and its subject) and for
/// auditors the operator admitted. The request is signed (POST so that it carries a body digest like every other).
#[utoipa::path(
    post,
    path = "/v1/log/entries/{index}",
    tag = "log",
    summary = "An entry's salt and body, for the parties it involves and admitted auditors",
    params(
        ("index" = String, Path, description = "The log index")
    ),
    responses(
        (status = 200, description = "Success", body = SaltedJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn entry(
    State(state): State<Arc<AppState>>,
    Path(index): Path<u64>,
    crate::auth::SignedRequest { caller, .. }: crate::auth::SignedRequest,
) -> Result<Json<SaltedJson>, ApiError> {
    let stored = state.store.body(index)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "no such entry, or it was erased",
        )
    })?;
    let entry = cmr_log::entry::EntryBody::decode(&stored.body).map_err(|_| {
        tracing::error!(index, "stored entry does not decode");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal,
            "internal error",
        )
    })?;
    let involved = entry.subject == caller.identity || entry.customer == Some(caller.identity);
    let auditor = state.store.is_admitted_auditor(&caller.identity);
    if !involved && !auditor {
        return Err(ApiError::forbidden("this entry does not involve you"));
    }
    Ok(Json(SaltedJson {
        salt: B64.encode(stored.salt),
        body: B64.encode(&stored.body),
    }))
}
