//! A customer's vault: the key directory, consent statements, record batches and reads. A customer acts
//! only on their own vault; a company acts through its grants.

use cmr_core::problem::Code;
use std::sync::Arc;

use crate::extract::Path;
use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::SignedBatch;
use cmr_core::consent::{SignedStatement, StatementId};
use cmr_core::decision::AccessKind;
use cmr_core::directory::SignedDirectory;
use cmr_core::family::{FamilyId, Period};
use cmr_core::identity::IdentityId;
use cmr_core::record::SealedRecord;
use cmr_log::entry::{AccessRecord, AccessedFamily};
use cmr_store::Op;
use serde::Deserialize;

#[allow(unused_imports)] // Named in the OpenAPI annotations.
use super::{FamilyPath, IdentityPath, Problem, VaultPath};
use super::{ack_json, b64, current_checkpoint, entry_json, hex_id, run};
use crate::AppState;
use crate::auth::{Caller, NoBody, Owner, Signed as SignedBody};
use crate::error::ApiError;
use cmr_wire::bytes::Base64;
use cmr_wire::log::{AckJson, ChainEntryJson, PageOfEntriesJson, RedactedJson};
use cmr_wire::read::{ReadAnswerJson, ReadProofJson};
use cmr_wire::vault::{
    BackupJson, BackupStoredJson, HeadDigestJson, PendingJson, PendingRequestJson, ScopeJson,
};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// The vault routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(directory))
        .routes(routes!(statement))
        // Record batches may be large (up to the server's body limit); every other route stays small.
        .routes(routes!(batch).layer(axum::extract::DefaultBodyLimit::disable()))
        .routes(routes!(read))
        .routes(routes!(head))
        .routes(routes!(history))
        .routes(routes!(pending_requests))
        .routes(routes!(relationship))
        .routes(routes!(feed))
        .routes(routes!(chain_events))
        // A key backup is at most 1 MiB of base64 (cmr_store::MAX_BACKUP); not the small-body route.
        .routes(routes!(put_backup).layer(axum::extract::DefaultBodyLimit::max(2 * 1024 * 1024)))
        .routes(routes!(get_backup))
}

fn access_record(
    caller: &Caller,
    grant: StatementId,
    kind: AccessKind,
    epoch: Option<u64>,
    family: FamilyId,
    from: Period,
    to: Period,
) -> AccessRecord {
    AccessRecord {
        grant,
        kind,
        epoch,
        families: vec![AccessedFamily { family, from, to }],
        records: vec![],
        keyid: caller.keyid.clone(),
        signature_base: caller.signature_base.clone(),
        signature: caller.signature,
        head: None,
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DirectoryBody {
    directory: String,
}

#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/directory",
    tag = "vaults",
    summary = "Publish the next key directory (compare-and-swap)",
    params(VaultPath),
    request_body = DirectoryBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn directory(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer,
        caller,
        body: req,
    }: Owner<DirectoryBody>,
) -> Result<Json<AckJson>, ApiError> {
    let bytes = b64("directory", &req.directory)?;
    let dir = SignedDirectory::decode(&bytes).map_err(|e| ApiError::malformed(e.to_string()))?;
    if dir.directory().customer != customer {
        return Err(ApiError::forbidden("the directory is for another vault"));
    }
    let ack = run(&state, Op::PublishDirectory(dir)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct StatementBody {
    statement: String,
}

#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/statements",
    tag = "vaults",
    summary = "Record a consent statement",
    params(VaultPath),
    request_body = StatementBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn statement(
    State(state): State<Arc<AppState>>,
    Path(customer): Path<String>,
    SignedBody { caller, body: req }: SignedBody<StatementBody>,
) -> Result<Json<AckJson>, ApiError> {
    let customer = IdentityId(hex_id("customer", &customer)?);
    let bytes = b64("statement", &req.statement)?;
    let st = SignedStatement::decode(&bytes).map_err(|e| ApiError::malformed(e.to_string()))?;
    if st.statement().customer != customer {
        return Err(ApiError::forbidden("the statement is about another vault"));
    }
    if st.statement().author != caller.identity {
        return Err(ApiError::forbidden("a statement is sent by its author"));
    }
    let ack = run(&state, Op::Statement(st)).await?;
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    batch: String,
    records: Vec<String>,
    /// For a company's append: the grant it appends under.
    #[serde(default)]
    grant: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/families/{family}/batches",
    tag = "vaults",
    summary = "Write a signed batch of records",
    params(FamilyPath),
    request_body = BatchBody,
    responses(
        (status = 200, description = "Success", body = AckJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn batch(
    State(state): State<Arc<AppState>>,
    Path((customer, family)): Path<(String, String)>,
    SignedBody { caller, body: req }: SignedBody<BatchBody>,
) -> Result<Json<AckJson>, ApiError> {
    let customer = IdentityId(hex_id("customer", &customer)?);
    let family = FamilyId(hex_id("family", &family)?);
    let batch = b64("batch", &req.batch)?;
    // Decoded once, here: the store gets the decoded batch and records.
    let records = req
        .records
        .iter()
        .map(|r| {
            SealedRecord::decode(b64("record", r)?).map_err(|e| ApiError::malformed(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let signed = SignedBatch::decode(&batch).map_err(|e| ApiError::malformed(e.to_string()))?;
    let b = signed.batch();
    if b.customer != customer || b.family != family {
        return Err(ApiError::forbidden(
            "the batch is for another vault or family",
        ));
    }
    if b.author != caller.identity {
        return Err(ApiError::forbidden("a batch is sent by its author"));
    }
    let access = if caller.identity == customer {
        None
    } else {
        let grant = StatementId(hex_id(
            "grant",
            req.grant
                .as_deref()
                .ok_or_else(|| ApiError::malformed("a company appends under a grant"))?,
        )?);
        let periods: Vec<Period> = records.iter().map(|r| r.header().period).collect();
        let from = periods
            .iter()
            .min()
            .copied()
            .ok_or_else(|| ApiError::malformed("no records"))?;
        let to = periods.iter().max().copied().unwrap_or(from);
        Some(access_record(
            &caller,
            grant,
            AccessKind::Append,
            Some(b.epoch),
            family,
            from,
            to,
        ))
    };
    let ack = match run(
        &state,
        Op::WriteBatch {
            batch: signed,
            records,
            access,
        },
    )
    .await
    {
        // Writes wait for the customer's client to rotate. The customer's own refused write carries its
        // current signed directory (PRODUCT.md, "Rotation"), to rotate from. A company's does not: the
        // directory names every family and every company appending to each, which would tell one company
        // the customer's other relationships.
        Err(e) if e.code == Code::RotationPending && caller.identity == customer => {
            return Err(match state.store.directory(&customer).ok().flatten() {
                Some(d) => e.with("directory", serde_json::Value::String(B64.encode(d))),
                None => e,
            });
        }
        other => other?,
    };
    Ok(Json(ack_json(&state, &ack, caller.known_size)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    from: String,
    to: String,
    #[serde(default)]
    grant: Option<String>,
    #[serde(default)]
    cursor: Option<(String, u64)>,
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    1000
}

fn period(s: &str) -> Result<Period, ApiError> {
    let bad = || ApiError::malformed(format!("{s:?} is not a month (YYYY-MM from 2000-01)"));
    Period::parse(s).ok_or_else(bad)
}

#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/families/{family}/read",
    tag = "vaults",
    summary = "Read records with a completeness proof (a company's read is logged first)",
    params(FamilyPath),
    request_body = ReadBody,
    responses(
        (status = 200, description = "Success", body = ReadAnswerJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn read(
    State(state): State<Arc<AppState>>,
    Path((customer, family)): Path<(String, String)>,
    SignedBody { caller, body: req }: SignedBody<ReadBody>,
) -> Result<Json<ReadAnswerJson>, ApiError> {
    let customer = IdentityId(hex_id("customer", &customer)?);
    let family = FamilyId(hex_id("family", &family)?);
    let periods = (period(&req.from)?, period(&req.to)?);
    let cursor = req
        .cursor
        .as_ref()
        .map(|(p, i)| period(p).map(|p| (p, *i)))
        .transpose()?;
    let access = if caller.identity == customer {
        None
    } else {
        let grant = StatementId(hex_id(
            "grant",
            req.grant
                .as_deref()
                .ok_or_else(|| ApiError::forbidden("a company reads under a grant"))?,
        )?);
        Some(access_record(
            &caller,
            grant,
            AccessKind::Read,
            None,
            family,
            periods.0,
            periods.1,
        ))
    };
    let mut ack = run(
        &state,
        Op::Read {
            customer,
            family,
            periods,
            cursor,
            limit: req.limit.clamp(1, 10_000),
            access,
        },
    )
    .await?;
    let result = ack
        .read
        .take()
        .ok_or_else(|| ApiError::malformed("no read result"))?;
    Ok(Json(ReadAnswerJson {
        ack: ack_json(&state, &ack, caller.known_size),
        proof_of_read: ReadProofJson::from_proof(&result.proof),
        records: result.records.into_iter().map(Base64).collect(),
        batches: result.batches.into_iter().map(Base64).collect(),
    }))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct HeadBody {
    /// The grant a company appends under.
    #[serde(default)]
    grant: Option<String>,
}

/// The digest of a family's current head: what the next batch extends. For the customer, and for a
/// company that may append to the family under its grant now (the rule is `ConsentState::may_append`):
/// an append-only grant reads nothing, so this is how its appends learn where to go. Not logged, and it
/// names no record: a digest, nothing more.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/families/{family}/head",
    tag = "vaults",
    summary = "The digest of a family's head, for the customer or a company that may append to it",
    params(FamilyPath),
    request_body = HeadBody,
    responses(
        (status = 200, description = "Success", body = HeadDigestJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn head(
    State(state): State<Arc<AppState>>,
    Path((customer, family)): Path<(String, String)>,
    SignedBody { caller, body: req }: SignedBody<HeadBody>,
) -> Result<Json<HeadDigestJson>, ApiError> {
    let customer = IdentityId(hex_id("customer", &customer)?);
    let family = FamilyId(hex_id("family", &family)?);
    let grant = req
        .grant
        .as_deref()
        .map(|g| hex_id("grant", g).map(StatementId))
        .transpose()?;
    let ack = run(
        &state,
        Op::Head {
            customer,
            family,
            caller: caller.identity,
            grant,
        },
    )
    .await?;
    let head = ack.head.ok_or_else(|| ApiError::malformed("no head"))?;
    Ok(Json(HeadDigestJson {
        head: head.to_hex(),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    /// Start from this entry (newest first); the customer's latest entry if absent.
    #[serde(default)]
    before: Option<u64>,
    /// Stop at the first entry at or below this index, which the page includes: the newest entry the
    /// caller has verified, so that it checks the newer ones link down to it without fetching the
    /// chain below it again.
    #[serde(default)]
    down_to: Option<u64>,
    #[serde(default = "default_history")]
    limit: u64,
}

fn default_history() -> u64 {
    100
}

/// The customer's own chain of entries, newest first: every read and write any company made, every
/// statement. Each entry comes with its salt (so the customer checks the commitment), its inclusion proof
/// in the current checkpoint, and the link to the entry before it.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/history",
    tag = "vaults",
    summary = "The customer's chain of entries, newest first",
    params(VaultPath),
    request_body = HistoryBody,
    responses(
        (status = 200, description = "Success", body = PageOfEntriesJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn history(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer,
        caller: _,
        body: req,
    }: Owner<HistoryBody>,
) -> Result<Json<PageOfEntriesJson>, ApiError> {
    let (checkpoint, size) = current_checkpoint(&state)?;
    let start = match req.before {
        // A page starts at one of the customer's own readable entries. Another customer's entry and an
        // erased one (whose owner the server can no longer tell) get the same answer, so the route says
        // nothing about entries that are not the caller's.
        Some(i) => {
            let own = i < size
                && state
                    .store
                    .body(i)?
                    .and_then(|b| decode_entry(&b).ok())
                    .is_some_and(|e| e.customer == Some(customer));
            if !own {
                return Err(ApiError::forbidden(
                    "the entry is not on this customer's chain",
                ));
            }
            Some(i)
        }
        None => state.store.customer_head(&customer)?,
    };
    let walk = walk_chain(
        &state,
        start,
        size,
        req.limit.clamp(1, 1000) as usize,
        req.down_to,
    )?;
    let mut entries = Vec::new();
    for step in &walk.steps {
        let Step::Entry(index, stored, entry) = step else {
            let Step::Redacted(index) = step else {
                continue;
            };
            entries.push(ChainEntryJson::Redacted(RedactedJson {
                index: *index,
                redacted: true,
            }));
            continue;
        };
        if entry.customer != Some(customer) {
            return Err(ApiError::forbidden(
                "the entry is not on this customer's chain",
            ));
        }
        let mut e = entry_json(&state, *index, stored, size)?;
        e.kind = Some(entry.kind.name().to_owned());
        e.time = Some(entry.time);
        entries.push(ChainEntryJson::Entry(e));
    }
    Ok(Json(PageOfEntriesJson {
        checkpoint,
        entries,
        next: walk.next,
    }))
}

fn decode_entry(
    stored: &cmr_log::entry::SaltedBody,
) -> Result<cmr_log::entry::EntryBody, ApiError> {
    cmr_log::entry::EntryBody::decode(&stored.body)
        .map_err(|_| ApiError::malformed("a stored entry does not decode"))
}

/// One step of a walk down a customer's chain.
enum Step {
    /// An entry, with its salt and body.
    Entry(
        u64,
        cmr_log::entry::SaltedBody,
        Box<cmr_log::entry::EntryBody>,
    ),
    /// An erased entry: the walk stops there (its link to the one before is gone with it).
    Redacted(u64),
}

/// A walk down a customer's chain, newest first, and where the next page would start.
struct Walk {
    steps: Vec<Step>,
    next: Option<u64>,
}

/// Walks a customer's chain from `start`, newest first, for at most `max` entries of the checkpoint of
/// `size`. Entries logged after that checkpoint (the head may have moved since it was read) are passed
/// over by following their links, so the walk always starts inside the checkpoint the client verifies.
/// With `down_to`, the walk also stops after the first entry at or below it.
fn walk_chain(
    state: &AppState,
    start: Option<u64>,
    size: u64,
    max: usize,
    down_to: Option<u64>,
) -> Result<Walk, ApiError> {
    let mut steps = Vec::new();
    let mut next = start;
    while let Some(index) = next {
        if index < size && steps.len() >= max {
            break;
        }
        let Some(stored) = state.store.body(index)? else {
            if index < size {
                steps.push(Step::Redacted(index));
            }
            next = None;
            break;
        };
        let entry = decode_entry(&stored)?;
        next = entry.prev.map(|p| p.index);
        if index < size {
            steps.push(Step::Entry(index, stored, Box::new(entry)));
            if down_to.is_some_and(|d| index <= d) {
                break;
            }
        }
    }
    Ok(Walk { steps, next })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RelationshipBody {
    /// Only entries after this log index (what the caller already has).
    #[serde(default)]
    after: Option<u64>,
    #[serde(default = "default_history")]
    limit: u64,
}

/// What of a vault concerns the calling company, oldest first: its requests and their answers, grants to
/// it with their sealed keys, revocations of them, rotations that re-key it, key deliveries, blocks that
/// name it, and its own reads and appends. Each entry comes with its salt and inclusion proof. From the
/// store's party index (kept as entries are applied): O(page), paged with `after`, whatever the length of
/// the chain. A party the chain does not involve gets an empty page: a company may poll a customer who
/// has not answered yet, or granted nothing yet, and learns no more than that nothing concerns it.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/relationship",
    tag = "vaults",
    summary = "What of this vault concerns the calling company, with inclusion proofs",
    params(VaultPath),
    request_body = RelationshipBody,
    responses(
        (status = 200, description = "Success", body = PageOfEntriesJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn relationship(
    State(state): State<Arc<AppState>>,
    Path(customer): Path<String>,
    SignedBody { caller, body: req }: SignedBody<RelationshipBody>,
) -> Result<Json<PageOfEntriesJson>, ApiError> {
    let customer = IdentityId(hex_id("customer", &customer)?);
    let (checkpoint, size) = current_checkpoint(&state)?;
    let (indices, more) = state.store.party_entries(
        &customer,
        &caller.identity,
        req.after,
        req.limit.clamp(1, 1000) as usize,
    )?;
    let mut entries = Vec::with_capacity(indices.len());
    for index in indices.into_iter().filter(|i| *i < size) {
        // An erased body is simply not served.
        if let Some(stored) = state.store.body(index)? {
            let entry = decode_entry(&stored)?;
            let mut e = entry_json(&state, index, &stored, size)?;
            e.kind = Some(entry.kind.name().to_owned());
            entries.push(e);
        }
    }
    let next = if more {
        entries.last().map(|e| e.index)
    } else {
        None
    };
    Ok(Json(PageOfEntriesJson {
        checkpoint,
        entries: entries.into_iter().map(ChainEntryJson::Entry).collect(),
        next,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    /// The newest entry of the chain the client knows; an event comes at once if the chain's is
    /// another.
    #[serde(default)]
    after: Option<u64>,
}

/// How often an event stream looks at the customer's chain (an index lookup in this process).
const EVENTS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// One open event stream of an identity, counted while it lives.
struct StreamSlot {
    state: Arc<AppState>,
    identity: cmr_core::identity::IdentityId,
}

impl StreamSlot {
    fn take(state: &Arc<AppState>, identity: cmr_core::identity::IdentityId) -> Option<Self> {
        let mut open = state.streams.lock().ok()?;
        let n = open.entry(identity).or_insert(0);
        if *n >= crate::MAX_STREAMS_PER_IDENTITY {
            return None;
        }
        *n += 1;
        Some(Self {
            state: state.clone(),
            identity,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.state.streams.lock()
            && let Some(n) = open.get_mut(&self.identity)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// The customer's chain as it grows, as server-sent events: an event `head` (its `id` the index) each
/// time the newest entry on the chain changes — a request arrived, a company read or appended, a
/// statement was logged. A hint for the customer's client to read its chain again (which it verifies as
/// always), so that a dashboard shows what happens without asking every few seconds. At most
/// `MAX_STREAMS_PER_IDENTITY` streams per identity; every stream ends when the server stops.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/events",
    tag = "vaults",
    summary = "The customer's chain as it grows (server-sent events)",
    params(VaultPath),
    request_body = EventsBody,
    responses(
        (status = 200, description = "A stream of `head` events", content_type = "text/event-stream", body = cmr_wire::vault::ChainHeadJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn chain_events(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer,
        caller: _,
        body: req,
    }: Owner<EventsBody>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let slot = StreamSlot::take(&state, customer).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            "too many event streams open for this identity; close one",
        )
    })?;
    // A first look now, so a store that fails says so in the answer rather than in a silent stream.
    let mut known = req.after;
    let first = state.store.customer_head(&customer)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(8);
    let mut closing = state.closing.subscribe();
    let store = state.store.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut head = first;
        let mut tick = tokio::time::interval(EVENTS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(h) = head
                && known != Some(h)
            {
                known = Some(h);
                let data = serde_json::to_string(&cmr_wire::vault::ChainHeadJson { head: h })
                    .unwrap_or_default();
                let event = Event::default().event("head").id(h.to_string()).data(data);
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = closing.changed() => return,
                () = tx.closed() => return,
            }
            if *closing.borrow() {
                return;
            }
            // A failing store is retried on the next tick; the stream's keep-alive goes on meanwhile.
            if let Ok(h) = store.customer_head(&customer) {
                head = h;
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The consent statements that concern the caller across every vault, oldest first, after `after`:
/// grants to it, their revocations, answers to its requests, key deliveries, disputes of what it wrote
/// (not its own reads and appends). One page of the store's feed index: a company learns which vaults
/// changed for it without asking each one; it then reads each through its verified relationship view.
#[utoipa::path(
    post,
    path = "/v1/feed",
    tag = "vaults",
    summary = "The consent statements that concern the caller, across every vault",
    request_body = RelationshipBody,
    responses(
        (status = 200, description = "Success", body = cmr_wire::vault::FeedJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn feed(
    State(state): State<Arc<AppState>>,
    SignedBody { caller, body: req }: SignedBody<RelationshipBody>,
) -> Result<Json<cmr_wire::vault::FeedJson>, ApiError> {
    let (checkpoint, size) = current_checkpoint(&state)?;
    let (entries, more) = state.store.feed(
        &caller.identity,
        req.after,
        req.limit.clamp(1, 1000) as usize,
    )?;
    let entries: Vec<cmr_wire::vault::FeedEntryJson> = entries
        .into_iter()
        .filter(|(i, _)| *i < size)
        .map(|(index, customer)| cmr_wire::vault::FeedEntryJson {
            index,
            customer: customer.to_hex(),
        })
        .collect();
    let next = if more {
        entries.last().map(|e| e.index)
    } else {
        None
    };
    Ok(Json(cmr_wire::vault::FeedJson {
        checkpoint,
        entries,
        next,
    }))
}

/// The access requests the customer has not answered yet, oldest first: who asks, for what, why, for how
/// long, with which look-back. From the store's pending index: at most
/// `cmr_core::decision::MAX_PENDING_PER_VAULT` requests wait, so one answer holds them all.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/requests",
    tag = "vaults",
    summary = "The customer's unanswered access requests, oldest first",
    params(VaultPath),
    responses(
        (status = 200, description = "Success", body = PendingJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn pending_requests(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer, ..
    }: Owner<NoBody>,
) -> Result<Json<PendingJson>, ApiError> {
    use cmr_core::consent::Body as St;
    let (checkpoint, size) = current_checkpoint(&state)?;
    let mut pending = Vec::new();
    for index in state.store.pending_requests(&customer)? {
        let Some(stored) = state.store.body(index)? else {
            continue;
        };
        let entry = decode_entry(&stored)?;
        let Ok(st) = SignedStatement::decode(&entry.payload) else {
            continue;
        };
        let St::Request(r) = &st.statement().body else {
            continue;
        };
        pending.push(PendingRequestJson {
            id: st.id().to_hex(),
            index,
            company: st.statement().author.to_hex(),
            purpose: r.purpose.clone(),
            scopes: r
                .scopes
                .iter()
                .map(|(s, a)| ScopeJson {
                    scope: s.name().to_owned(),
                    access: a.name().to_owned(),
                })
                .collect(),
            duration: r.duration.to_string(),
            lookback_months: r.lookback_months,
            statement: B64.encode(&entry.payload),
            entry: entry_json(&state, index, &stored, size)?,
        });
    }
    Ok(Json(PendingJson {
        checkpoint,
        pending,
        truncated: false,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    version: u64,
    backup: String,
}

/// Replaces the customer's key backup (compare-and-swap on the version): bytes sealed by the customer's
/// client (the vault key wrapped to the recovery key, secrets sealed under the vault key), which the
/// server cannot open. Only the customer, with a device or the identity key, may write or read it.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/backup",
    tag = "vaults",
    summary = "Replace the customer's key backup (client-sealed; compare-and-swap on the version)",
    params(VaultPath),
    request_body = BackupBody,
    responses(
        (status = 200, description = "Success", body = BackupStoredJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn put_backup(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer,
        caller: _,
        body: req,
    }: Owner<BackupBody>,
) -> Result<Json<BackupStoredJson>, ApiError> {
    let bytes = b64("backup", &req.backup)?;
    let ack = run(
        &state,
        Op::PutBackup {
            customer,
            version: req.version,
            bytes,
        },
    )
    .await?;
    Ok(Json(BackupStoredJson {
        version: req.version,
        checkpoint: ack.checkpoint,
    }))
}

/// The customer's latest key backup.
#[utoipa::path(
    post,
    path = "/v1/vaults/{customer}/backup/latest",
    tag = "vaults",
    summary = "The customer's latest key backup",
    params(VaultPath),
    responses(
        (status = 200, description = "Success", body = BackupJson),
        Problem
    ),
    security(("rfc9421" = []))
)]
async fn get_backup(
    State(state): State<Arc<AppState>>,
    Owner {
        owner: customer, ..
    }: Owner<NoBody>,
) -> Result<Json<BackupJson>, ApiError> {
    let (version, bytes) = state.store.backup(&customer)?.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            Code::NotFound,
            "no key backup yet",
        )
    })?;
    Ok(Json(BackupJson {
        version,
        backup: B64.encode(bytes),
    }))
}
