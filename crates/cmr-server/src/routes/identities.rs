//! Identities and devices. Registration is signed by the inception key being registered (`keyid` =
//! `id:<identity>`); a device is certified by a request signed with the identity key or one of its
//! devices.

use cmr_core::problem::Code;
use std::sync::Arc;

use crate::extract::Path;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cmr_core::identity::{
    DeviceCertificate, DeviceRevocation, IdentityId, Role, Signed, SignedKeyEvent,
};
use cmr_core::keys::VerifyingKey;
use cmr_log::entry::EntryBody;
use cmr_log::keyhead::KeyHead;
use cmr_store::Op;
use serde::Deserialize;

#[allow(unused_imports)] // Named in the OpenAPI annotations.
use super::{FamilyPath, IdentityPath, Problem, VaultPath};
use super::{
    ack_json, b64, current_checkpoint, entry_json, hex_id, json_body, optional_json_body, run,
};
use crate::AppState;
use crate::auth::{Owner, Unverified};
use crate::error::ApiError;
use cmr_wire::log::AckJson;
use cmr_wire::vault::{KeyEventsJson, VaultsJson};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The identity routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(certify))
        .routes(routes!(revoke_device))
        .routes(routes!(rotate))
        .routes(routes!(events))
        .routes(routes!(vaults))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    /// A recovering device, which has no registered key yet, signs with the next identity key its
    /// recovery phrase gives and shows it here (base64): the identity's current key event commits to it.
    #[serde(default)]
    reveal: Option<String>,
}

/// An identity's key events (inception, rotations, device certificates and revocations), oldest first,
/// each with its salt and inclusion proof in the checkpoint returned with them, and the key-event head at
/// that checkpoint's size signed with the log key (`cmr_log::keyhead`): a counterparty replays the events
/// to learn which device keys the identity had at each log position, trusting only the log key, and
/// checks that none was left out.
///
/// A company's or an auditor's events are for any registered caller. A customer's events name the
/// customer's chain (each entry links the previous one), so they go only to the customer, to a party
/// the customer's chain involves, to an admitted auditor, and to a device recovering with the phrase;
/// anyone else is answered as if the identity did not exist.
#[utoipa::path(
    post,
    path = "/v1/identities/{id}/events",
    tag = "identities",
    summary = "An identity's key events with inclusion proofs and the signed key-event head",
    params(IdentityPath),
    request_body = EventsBody,
    responses(
        (status = 200, description = "Success", body = KeyEventsJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    raw: Unverified,
) -> Result<Json<KeyEventsJson>, ApiError> {
    let id = IdentityId(hex_id("identity", &id)?);
    let req: EventsBody = optional_json_body(&raw.body)?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "no such identity");
    let caller = match &req.reveal {
        None => raw.authenticate(&state, None)?,
        Some(key) => {
            let key: [u8; 32] = b64("reveal", key)?
                .try_into()
                .map_err(|_| ApiError::malformed("reveal is a 32-byte key"))?;
            let key = VerifyingKey::from_bytes(&key)
                .map_err(|_| ApiError::malformed("reveal is not a valid Ed25519 key"))?;
            if !state.store.is_next_key(&id, &key) {
                return Err(not_found());
            }
            raw.authenticate(&state, Some((id, key)))?
        }
    };
    let visible = caller.identity == id
        || match state.store.role(&id) {
            None => false,
            Some(Role::Customer) => {
                state.store.is_admitted_auditor(&caller.identity)
                    || !state
                        .store
                        .party_entries(&id, &caller.identity, None, 1)?
                        .0
                        .is_empty()
            }
            Some(_) => true,
        };
    if !visible {
        return Err(not_found());
    }
    let (checkpoint, size) = current_checkpoint(&state)?;
    let mut events = Vec::new();
    let mut head = KeyHead::start(id, size);
    for index in state.store.key_events(&id)? {
        if index >= size {
            break;
        }
        // Key events are never erased; a body missing here is a damaged store, and the head says so by
        // not matching what a client recomputes.
        if let Some(stored) = state.store.body(index)? {
            head.extend(index, &EntryBody::hash(&stored.body))
                .map_err(|e| cmr_store::StoreError::Format(e.to_string()))?;
            events.push(entry_json(&state, index, &stored, size)?);
        }
    }
    if events.is_empty() {
        return Err(not_found());
    }
    let head = state.store.sign_key_head(&head);
    Ok(Json(KeyEventsJson {
        checkpoint,
        events,
        head,
    }))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct VaultsBody {
    /// Only customers after this id (what the caller already has).
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

/// The customers whose chains concern the caller (a request it sent, a grant to it with or without a
/// request, a block naming it, …), in id order, paged with `after`: how a company discovers the vaults
/// that granted it something. From the store's vaults-of index, O(page). Only the identity itself may ask.
#[utoipa::path(
    post,
    path = "/v1/identities/{id}/vaults",
    tag = "identities",
    summary = "The customers whose chains concern the calling identity (how a company discovers grants)",
    params(IdentityPath),
    request_body = VaultsBody,
    responses(
        (status = 200, description = "Success", body = VaultsJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn vaults(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: id,
        caller: _,
        body: req,
    }: Owner<VaultsBody>,
) -> Result<Json<VaultsJson>, ApiError> {
    let after = req
        .after
        .as_deref()
        .map(|a| hex_id("after", a).map(IdentityId))
        .transpose()?;
    let limit = req.limit.unwrap_or(1000).clamp(1, 1000) as usize;
    let (vaults, more) = state.store.vaults_of(&id, after.as_ref(), limit)?;
    let next = more
        .then(|| vaults.last().map(IdentityId::to_hex))
        .flatten();
    Ok(Json(VaultsJson {
        vaults: vaults.iter().map(IdentityId::to_hex).collect(),
        next,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    /// The signed inception, base64.
    event: String,
}

#[utoipa::path(
    post,
    path = "/v1/identities",
    tag = "identities",
    summary = "Register an identity (signed by its inception key)",
    request_body = RegisterBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn register(
    State(state): State<Arc<AppState>>,
    raw: Unverified,
) -> Result<Json<AckJson>, ApiError> {
    let req: RegisterBody = json_body(&raw.body)?;
    let bytes = b64("event", &req.event)?;
    let event = SignedKeyEvent::decode(&bytes).map_err(|e| ApiError::malformed(e.to_string()))?;
    if event.event().seq != 0 {
        return Err(ApiError::malformed(
            "registration takes an inception (sequence 0)",
        ));
    }
    let id = event.identity();
    let caller = raw.authenticate(&state, Some((id, event.event().signing_key)))?;
    if caller.identity != id {
        return Err(ApiError::forbidden(
            "registration is signed by the inception key being registered",
        ));
    }
    let ack = run(&state, Op::Register(event)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CertifyBody {
    /// The signed device certificate, base64.
    certificate: String,
}

#[utoipa::path(
    post,
    path = "/v1/identities/{id}/devices",
    tag = "identities",
    summary = "Certify a device",
    params(IdentityPath),
    request_body = CertifyBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn certify(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: id,
        caller,
        body: req,
    }: Owner<CertifyBody>,
) -> Result<Json<AckJson>, ApiError> {
    let bytes = b64("certificate", &req.certificate)?;
    let cert = Signed::<DeviceCertificate>::decode(&bytes)
        .map_err(|e| ApiError::malformed(e.to_string()))?;
    if cert.body().identity != id {
        return Err(ApiError::forbidden(
            "the certificate is for another identity",
        ));
    }
    let ack = run(&state, Op::Certify(cert)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// The signed device revocation, base64.
    revocation: String,
}

#[utoipa::path(
    post,
    path = "/v1/identities/{id}/devices/revoke",
    tag = "identities",
    summary = "Revoke a device",
    params(IdentityPath),
    request_body = RevokeBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn revoke_device(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: id,
        caller,
        body: req,
    }: Owner<RevokeBody>,
) -> Result<Json<AckJson>, ApiError> {
    let bytes = b64("revocation", &req.revocation)?;
    let rev = Signed::<DeviceRevocation>::decode(&bytes)
        .map_err(|e| ApiError::malformed(e.to_string()))?;
    if rev.body().identity != id {
        return Err(ApiError::forbidden(
            "the revocation is for another identity",
        ));
    }
    let ack = run(&state, Op::RevokeDevice(rev)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// The signed rotation (signed by the newly revealed key), base64.
    event: String,
}

/// Recovery: the rotation is signed by the pre-committed key it reveals, so the request is signed by that
/// key too (`keyid` = `id:<identity>`, verified against the revealed key).
#[utoipa::path(
    post,
    path = "/v1/identities/{id}/rotate",
    tag = "identities",
    summary = "Rotate the identity key (recovery: signed by the key it reveals)",
    params(IdentityPath),
    request_body = RotateBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn rotate(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    raw: Unverified,
) -> Result<Json<AckJson>, ApiError> {
    let id = IdentityId(hex_id("identity", &id)?);
    let req: RotateBody = json_body(&raw.body)?;
    let bytes = b64("event", &req.event)?;
    let event = SignedKeyEvent::decode(&bytes).map_err(|e| ApiError::malformed(e.to_string()))?;
    if event.event().seq == 0 || event.identity() != id {
        return Err(ApiError::malformed("a rotation of this identity"));
    }
    let caller = raw.authenticate(&state, Some((id, event.event().signing_key)))?;
    if caller.identity != id {
        return Err(ApiError::forbidden(
            "a rotation is signed by the key it reveals",
        ));
    }
    let ack = run(&state, Op::Rotate(event)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}
