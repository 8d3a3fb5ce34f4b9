//! `cmr company gateway`: the company's keys and every verification in a process the company runs,
//! behind a plain JSON API its backend calls in any language (docs/companies.md, design note 0008).
//!
//! What it owns: the gateway's HTTP edge (routes, the bearer token, problem details, its OpenAPI
//! document). What it does not own: what a request, a read or an append is (the SDK, through the same
//! functions as `cmr company`), or the JSON shapes (`cmr_wire::gateway`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use cmr_client::ClientError;
use cmr_core::consent::StatementId;
use cmr_core::hash::sha256;
use cmr_core::identity::IdentityId;
use cmr_wire::gateway::{
    AccessesJson, AppendRequest, Appended, GatewayEvent, GrantsJson, NewRequest, ReadRequest,
    RecordsJson, RequestCreated, RequestsJson,
};
use cmr_wire::problem::ProblemJson;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::company::{
    Loaded, access_request, access_rows, append_target, grant_rows, read_target, record_rows,
    request_rows, sync_all,
};
use crate::error::{CliError, CliResult};
use crate::home::Home;
use crate::out::now;

/// The token file, in the configuration folder.
pub const TOKEN_FILE: &str = "gateway.token";

/// `cmr company gateway`'s arguments.
#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The address to listen on: loopback only, unless --allow-remote.
    #[arg(long, env = "CMR_GATEWAY_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Listen on an address beyond loopback (put TLS and a firewall in front of it).
    #[arg(long)]
    allow_remote: bool,
    /// Listen on this Unix socket instead (created with mode 0600: only this user's processes reach
    /// it; the bearer token is still required).
    #[arg(long, env = "CMR_GATEWAY_SOCKET", conflicts_with_all = ["listen", "allow_remote"])]
    socket: Option<std::path::PathBuf>,
    /// Print the gateway's OpenAPI 3.1 document and exit (for client generators).
    #[arg(long)]
    openapi: bool,
    /// Also deliver every event to this URL of the company's backend: a POST of the event as JSON,
    /// signed by the gateway (RFC 9421), retried until it is answered 2xx.
    #[arg(long, env = "CMR_GATEWAY_WEBHOOK")]
    webhook: Option<String>,
}

/// The longest wait between two tries of a webhook.
const WEBHOOK_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Where and how the gateway signs its webhooks: the URL, and the company device's key.
struct Webhook {
    url: reqwest::Url,
    key: cmr_core::keys::SigningKey,
    keyid: String,
}

impl Webhook {
    /// One delivery of `e`: the event as JSON, signed over the profile's components with
    /// `Cmr-Event-Id`. The backend's status, or why there was none.
    async fn post(&self, client: &reqwest::Client, e: &GatewayEvent) -> Result<StatusCode, String> {
        let body = serde_json::to_vec(e).map_err(|e| e.to_string())?;
        let authority = match self.url.port() {
            Some(p) => format!("{}:{p}", self.url.host_str().unwrap_or_default()),
            None => self.url.host_str().unwrap_or_default().to_string(),
        };
        let target = match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        };
        let request =
            cmr_core::httpsig::Request::new("POST", self.url.scheme(), &authority, &target, vec![]);
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let created = i64::try_from(now()).unwrap_or(i64::MAX);
        let signed = cmr_core::httpsig::sign_request(
            &request,
            &body,
            &self.key,
            &self.keyid,
            &B64URL.encode(nonce),
            created,
        )
        .map_err(|e| e.to_string())?;
        let answer = client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("content-digest", signed.content_digest)
            .header("signature-input", signed.signature_input)
            .header("signature", signed.signature)
            .header("cmr-event-id", e.id.to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        StatusCode::from_u16(answer.status().as_u16()).map_err(|e| e.to_string())
    }
}

/// Delivers every event of this run, in order, to the backend's webhook: each is tried again, with
/// back-off up to [`WEBHOOK_BACKOFF_MAX`], until the backend answers 2xx, and only then the next. At
/// least once: a try whose answer was lost delivers the same `Cmr-Event-Id` again.
async fn deliver(g: Shared, hook: Webhook) {
    let Ok(client) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    else {
        tracing::error!("the webhook client could not be built");
        return;
    };
    let mut live = g.events.live.subscribe();
    let mut delivered = g.events.lock().delivered;
    loop {
        let (pending, lost) = g.events.after(delivered);
        if lost {
            tracing::error!(
                after = delivered,
                "events the webhook backend had not taken were dropped (over {MAX_UNDELIVERED} waited)"
            );
        }
        if pending.is_empty() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), live.recv()).await;
            continue;
        }
        for e in pending {
            let mut wait = std::time::Duration::from_millis(200);
            loop {
                match hook.post(&client, &e).await {
                    Ok(status) if status.is_success() => break,
                    outcome => {
                        tracing::warn!(event = e.id, ?outcome, "webhook not taken; trying again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(WEBHOOK_BACKOFF_MAX);
                    }
                }
            }
            delivered = e.id;
            g.events.delivered(delivered);
        }
    }
}

/// What every handler shares: the company (one operation at a time, as its state is one), where it is
/// saved, the digest of the bearer token, and the events.
struct Gateway {
    company: tokio::sync::Mutex<Loaded>,
    home: Home,
    token: [u8; 32],
    events: Events,
    /// A read changed the state and it is not saved yet (the watcher saves it).
    unsaved: std::sync::atomic::AtomicBool,
}

/// How many past events the gateway keeps for clients that resume (`Last-Event-ID`), at least.
const KEPT_EVENTS: usize = 4096;
/// The most events kept for a webhook backend that has not taken them (it is down): past this, the
/// oldest are dropped and the backend is told (`events-lost`).
const MAX_UNDELIVERED: usize = 65_536;
/// How often the gateway asks the vault server's feed what changed.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// The journal's file, in the configuration folder.
pub const JOURNAL_FILE: &str = "gateway.events.json";

/// What the gateway keeps between runs, in [`JOURNAL_FILE`] (mode 0600): the recent events, the id
/// the next one gets, how far the webhook backend took them, and what the company's grants looked like
/// at the last look. Event ids therefore increase across runs (a backend that keeps the last id it saw
/// never mistakes a new event for an old one), a restart resumes delivery where it stopped, and what
/// changed while the gateway was down becomes events when it starts.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Journal {
    events: std::collections::VecDeque<GatewayEvent>,
    next_id: u64,
    delivered: u64,
    /// Each grant's (status, customer) at the last look; `None` before the first look.
    grants: Option<std::collections::HashMap<String, (String, String)>>,
    disputes: usize,
    /// How many rotated keys each grant had received at the last look.
    #[serde(default)]
    rekeys: std::collections::HashMap<String, usize>,
}

/// The events: the journal, saved on every change, and a wake-up for the streams and the webhook.
struct Events {
    journal: std::sync::Mutex<Journal>,
    path: std::path::PathBuf,
    /// Whether a webhook backend takes the events (then undelivered ones are kept).
    webhook: bool,
    live: tokio::sync::broadcast::Sender<u64>,
}

impl Events {
    fn open(home: &Home, webhook: bool) -> CliResult<Self> {
        let path = home.file(JOURNAL_FILE);
        let journal = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CliError::local(
                    format!("{} is damaged: {e}", path.display()),
                    "remove it (event ids then start again at 1)",
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Journal {
                next_id: 1,
                ..Journal::default()
            },
            Err(e) => {
                return Err(CliError::local(
                    format!("{}: {e}", path.display()),
                    "check the configuration folder",
                ));
            }
        };
        Ok(Self {
            journal: std::sync::Mutex::new(journal),
            path,
            webhook,
            live: tokio::sync::broadcast::channel(64).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the journal (atomically); a failure is logged, the events stay in memory.
    fn save(&self, j: &Journal) {
        let saved = serde_json::to_vec(j)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::home::write_private_file(&self.path, &b).map_err(|e| e.message));
        if let Err(e) = saved {
            tracing::warn!(error = %e, "the gateway could not save its events");
        }
    }

    fn emit(&self, kind: &str, customer: String, grant: Option<String>, record: Option<String>) {
        let mut j = self.lock();
        let id = j.next_id.max(1);
        j.next_id = id + 1;
        j.events.push_back(GatewayEvent {
            id,
            kind: kind.to_string(),
            customer,
            grant,
            record,
        });
        while let Some(front) = j.events.front() {
            let taken = !self.webhook || front.id <= j.delivered;
            if (j.events.len() > KEPT_EVENTS && taken) || j.events.len() > MAX_UNDELIVERED {
                j.events.pop_front();
            } else {
                break;
            }
        }
        self.save(&j);
        drop(j);
        // Nobody listening is fine: the event is kept for the next one.
        let _ = self.live.send(id);
    }

    /// The kept events after `id`, and whether some after it were dropped already.
    fn after(&self, id: u64) -> (Vec<GatewayEvent>, bool) {
        let j = self.lock();
        let lost = j.events.front().is_some_and(|e| e.id > id + 1) && id + 1 < j.next_id;
        (
            j.events.iter().filter(|e| e.id > id).cloned().collect(),
            lost,
        )
    }

    /// The id of the newest event (0 if none yet).
    fn newest(&self) -> u64 {
        self.lock().next_id.saturating_sub(1)
    }

    /// What the watcher saw at its last look, for the next run to compare with.
    fn remember(&self, k: &Known) {
        let mut j = self.lock();
        j.grants = Some(k.grants.clone());
        j.rekeys = k.rekeys.clone();
        j.disputes = k.disputes;
        self.save(&j);
    }

    fn delivered(&self, id: u64) {
        let mut j = self.lock();
        j.delivered = id;
        self.save(&j);
    }
}

/// What the watcher knew at its last look: each grant's status, the rotated keys each received, and
/// the disputes seen.
#[derive(Default, PartialEq)]
struct Known {
    grants: std::collections::HashMap<String, (String, String)>,
    rekeys: std::collections::HashMap<String, usize>,
    disputes: usize,
}

impl Known {
    fn of(c: &cmr_client::company::Company) -> Self {
        Self {
            grants: grant_rows(c)
                .into_iter()
                .map(|g| (g.grant, (g.status, g.customer)))
                .collect(),
            rekeys: c
                .grants
                .values()
                .map(|g| (g.id.to_hex(), g.rekeys.len()))
                .collect(),
            disputes: c.disputes.len(),
        }
    }

    /// What the journal says the last run saw, if it saw anything.
    fn journaled(events: &Events) -> Option<Self> {
        let j = events.lock();
        j.grants.clone().map(|grants| Self {
            grants,
            rekeys: j.rekeys.clone(),
            disputes: j.disputes,
        })
    }
}

/// Watches the vault server's feed for this company and turns what changed into events: the vaults
/// the feed names are synced (verified, as every sync is), and every grant's status compared with the
/// last look (expiry needs no entry: time alone ends a grant). Every minute, every vault is synced
/// whatever the feed says, so that a server that leaves a statement out of the feed only delays it.
async fn watch(g: Shared, start: (Option<u64>, Known)) {
    let (mut cursor, mut known) = start;
    let mut last_full = std::time::Instant::now();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let mut l = g.company.lock().await;
        let full = last_full.elapsed() > std::time::Duration::from_secs(60);
        let synced = async {
            if full {
                sync_all(&mut l.company).await?;
                let (_, next) = l.company.changed_since(cursor).await?;
                cursor = next.or(cursor);
                return Ok(true);
            }
            let (changed, next) = l.company.changed_since(cursor).await?;
            for customer in &changed {
                l.company.sync(*customer).await?;
            }
            cursor = next.or(cursor);
            Ok::<bool, ClientError>(!changed.is_empty())
        }
        .await;
        let touched = match synced {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "the gateway could not read what changed; trying again");
                continue;
            }
        };
        if full {
            last_full = std::time::Instant::now();
        }
        let now_known = Known::of(&l.company);
        {
            let before = &known;
            for (grant, (status, customer)) in &now_known.grants {
                let was = before.grants.get(grant).map(|(s, _)| s.as_str());
                if was == Some(status.as_str()) {
                    continue;
                }
                let kind = match status.as_str() {
                    "active" if was.is_none() => "grant-new",
                    "revoked" => "grant-revoked",
                    "expired" => "grant-expired",
                    "used" => "grant-used",
                    _ if was.is_none() => "grant-new",
                    _ => continue,
                };
                g.events
                    .emit(kind, customer.clone(), Some(grant.clone()), None);
                let narrowed = cmr_core::hash::Digest::from_hex(grant)
                    .and_then(|d| l.company.narrowed(&StatementId(d.0)))
                    .unwrap_or(false);
                if kind == "grant-new" && narrowed {
                    g.events.emit(
                        "grant-narrowed",
                        customer.clone(),
                        Some(grant.clone()),
                        None,
                    );
                }
            }
            for (grant, n) in &now_known.rekeys {
                if *n > before.rekeys.get(grant).copied().unwrap_or(0)
                    && let Some((_, customer)) = now_known.grants.get(grant)
                {
                    g.events.emit(
                        "rotation-delivered",
                        customer.clone(),
                        Some(grant.clone()),
                        None,
                    );
                }
            }
            for d in l.company.disputes.iter().skip(before.disputes) {
                g.events
                    .emit("dispute", d.customer.clone(), None, Some(d.record.clone()));
            }
        }
        if now_known != known {
            g.events.remember(&now_known);
        }
        known = now_known;
        let unsaved = g.unsaved.swap(false, std::sync::atomic::Ordering::SeqCst);
        if (touched || unsaved)
            && let Err(e) = l.save(&g.home)
        {
            tracing::warn!(error = %e.message, "the gateway could not save the company's state");
        }
    }
}

/// What changed for the company, as server-sent events (event name = `kind`, data = the event as
/// JSON, id = its `id`); with `Last-Event-ID`, the kept events after it come first.
#[utoipa::path(get, path = "/v1/events", tag = "gateway",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses((status = 200, description = "A stream of events (text/event-stream); each data is a GatewayEvent", body = GatewayEvent, content_type = "text/event-stream"), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn events(
    State(g): State<Shared>,
    headers: axum::http::HeaderMap,
) -> axum::response::sse::Sse<
    impl tokio_stream::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Subscribed before the kept events are read: nothing falls between the two. The broadcast only
    // wakes the stream; the journal is what it sends from, so a slow reader that lagged behind the
    // broadcast still gets every kept event, in order.
    let mut live = g.events.live.subscribe();
    let mut cursor = after.unwrap_or_else(|| g.events.newest());
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let sse = |e: &GatewayEvent| {
        axum::response::sse::Event::default()
            .id(e.id.to_string())
            .event(e.kind.clone())
            .data(serde_json::to_string(e).unwrap_or_default())
    };
    tokio::spawn(async move {
        loop {
            let (pending, lost) = g.events.after(cursor);
            if lost {
                // Events after the client's last one were dropped: it must resynchronise (list the
                // grants) rather than believe it saw everything.
                let said = axum::response::sse::Event::default()
                    .event("events-lost")
                    .data(format!("{{\"after\":{cursor}}}"));
                if tx.send(Ok(said)).await.is_err() {
                    return;
                }
            }
            for e in &pending {
                if tx.send(Ok(sse(e))).await.is_err() {
                    return;
                }
                cursor = e.id;
            }
            tokio::select! {
                woke = live.recv() => {
                    if matches!(woke, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    axum::response::sse::Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(axum::response::sse::KeepAlive::default())
}

type Shared = Arc<Gateway>;

/// An answer refused, as problem details: the gateway's own codes (`unauthorized`, `bad-request`,
/// `verification-failed`, `unreachable`, `in-doubt`) or the vault's, passed through with its status.
#[derive(Debug)]
struct GatewayError {
    status: StatusCode,
    code: String,
    detail: String,
}

impl GatewayError {
    fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            detail: detail.into(),
        }
    }
}

impl From<ClientError> for GatewayError {
    fn from(e: ClientError) -> Self {
        let detail = e.to_string();
        match e {
            ClientError::Refused { status, code, .. } => Self {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                code,
                detail,
            },
            // The vault's answer did not verify: never data, always this.
            ClientError::Verification(_) | ClientError::Malformed(_) => {
                Self::new(StatusCode::BAD_GATEWAY, "verification-failed", detail)
            }
            ClientError::Transport(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unreachable", detail)
            }
            ClientError::InDoubt(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "in-doubt", detail)
            }
            ClientError::Local(_) => Self::new(StatusCode::BAD_REQUEST, "bad-request", detail),
        }
    }
}

impl From<CliError> for GatewayError {
    fn from(e: CliError) -> Self {
        let detail = match e.hint {
            Some(h) => format!("{} ({h})", e.message),
            None => e.message,
        };
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let problem = ProblemJson::new(&self.code, self.status.as_u16(), self.detail);
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            Json(problem),
        )
            .into_response()
    }
}

type Answer<T> = Result<Json<T>, GatewayError>;

fn hex_id(what: &str, s: &str) -> Result<[u8; 32], GatewayError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| {
        GatewayError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("{what} {s:?} is not an id (64 hex digits)"),
        )
    })?;
    Ok(out)
}

/// Saves the company's state after an operation changed it.
fn save(g: &Gateway, l: &mut Loaded) -> Result<(), GatewayError> {
    l.save(&g.home).map_err(GatewayError::from)
}

/// The grants this company holds, brought up to date from every vault it deals with.
#[utoipa::path(get, path = "/v1/grants", tag = "gateway",
    responses((status = 200, description = "Success", body = GrantsJson), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn grants(State(g): State<Shared>) -> Answer<GrantsJson> {
    let mut l = g.company.lock().await;
    sync_all(&mut l.company).await?;
    let grants = grant_rows(&l.company);
    save(&g, &mut l)?;
    Ok(Json(GrantsJson { grants }))
}

/// Which accesses to list.
#[derive(serde::Deserialize, utoipa::IntoParams)]
struct AccessesQuery {
    /// Only those to this customer's vault (64 hex digits).
    customer: Option<String>,
}

/// This company's own reads and appends, as the customers' chains logged them (verified), oldest
/// first: what the company can show an auditor or a customer of what it did.
#[utoipa::path(get, path = "/v1/accesses", tag = "gateway", params(AccessesQuery),
    responses((status = 200, description = "Success", body = AccessesJson), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn accesses(
    State(g): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<AccessesQuery>,
) -> Answer<AccessesJson> {
    let mut l = g.company.lock().await;
    sync_all(&mut l.company).await?;
    let accesses = access_rows(&l.company, q.customer.as_deref())?;
    save(&g, &mut l)?;
    Ok(Json(AccessesJson { accesses }))
}

/// The requests this company sent, and what became of each.
#[utoipa::path(get, path = "/v1/requests", tag = "gateway",
    responses((status = 200, description = "Success", body = RequestsJson), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn requests(State(g): State<Shared>) -> Answer<RequestsJson> {
    let mut l = g.company.lock().await;
    sync_all(&mut l.company).await?;
    let requests = request_rows(&l.company);
    save(&g, &mut l)?;
    Ok(Json(RequestsJson { requests }))
}

/// Asks a customer for access: logged in the customer's vault, answered there.
#[utoipa::path(post, path = "/v1/requests", tag = "gateway", request_body = NewRequest,
    responses((status = 200, description = "Success", body = RequestCreated), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn new_request(
    State(g): State<Shared>,
    Json(req): Json<NewRequest>,
) -> Answer<RequestCreated> {
    let customer = IdentityId(hex_id("customer", &req.customer)?);
    let asked = access_request(
        &req.scopes,
        req.purpose,
        req.duration.as_deref().unwrap_or("persistent"),
        req.lookback_months.unwrap_or(12),
    )?;
    let mut l = g.company.lock().await;
    let id = l.company.request(customer, asked, now()).await?;
    save(&g, &mut l)?;
    Ok(Json(RequestCreated {
        request: id.to_hex(),
    }))
}

/// The grant `gid`, learned from the vaults first if this gateway does not hold it yet (a new grant).
async fn held(g: &Gateway, l: &mut Loaded, gid: StatementId) -> Result<(), GatewayError> {
    if !l.company.grants.contains_key(&gid) {
        sync_all(&mut l.company).await?;
        save(g, l)?;
    }
    if l.company.grants.contains_key(&gid) {
        Ok(())
    } else {
        Err(GatewayError::new(
            StatusCode::NOT_FOUND,
            "no-grant",
            "this company holds no such grant",
        ))
    }
}

/// Reads a customer's records under a grant: the access is logged in the vault first, the answer is
/// proven complete against the family's head in the log, and decrypted here.
#[utoipa::path(post, path = "/v1/grants/{grant}/read", tag = "gateway", request_body = ReadRequest,
    params(("grant" = String, Path, description = "The grant's id (64 hex digits)")),
    responses((status = 200, description = "Success", body = RecordsJson), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn read(
    State(g): State<Shared>,
    Path(grant): Path<String>,
    Json(req): Json<ReadRequest>,
) -> Answer<RecordsJson> {
    let gid = StatementId(hex_id("grant", &grant)?);
    let mut l = g.company.lock().await;
    held(&g, &mut l, gid).await?;
    let t = read_target(
        &l.company,
        gid,
        &req.scope,
        req.from.as_deref(),
        req.to.as_deref(),
    )?;
    let (_, records) = l.company.read(gid, t.family, t.from, t.to).await?;
    // What a read changes in the state (the checkpoint seen, the access, a one-time grant used up) is
    // saved by the watcher within WATCH_EVERY, not here: a read's answer does not wait for a file's
    // fsync. A crash before then loses nothing the log does not hold; the next sync finds it again.
    g.unsaved.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(Json(RecordsJson {
        records: record_rows(&records, t.periodic),
    }))
}

/// Appends a record under a grant that allows it (to transactions, or to the inferred profile).
#[utoipa::path(post, path = "/v1/grants/{grant}/append", tag = "gateway", request_body = AppendRequest,
    params(("grant" = String, Path, description = "The grant's id (64 hex digits)")),
    responses((status = 200, description = "Success", body = Appended), (status = "default", description = "Refused: the gateway's code or the vault's", body = ProblemJson, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn append(
    State(g): State<Shared>,
    Path(grant): Path<String>,
    Json(req): Json<AppendRequest>,
) -> Answer<Appended> {
    let gid = StatementId(hex_id("grant", &grant)?);
    let mut l = g.company.lock().await;
    held(&g, &mut l, gid).await?;
    let (_, period) = append_target(&l.company, gid, req.month.as_deref())?;
    let acked = l
        .company
        .append_now(gid, period, &[req.text.as_bytes()])
        .await?;
    save(&g, &mut l)?;
    Ok(Json(Appended { index: acked.index }))
}

/// The routes and their document.
fn api() -> OpenApiRouter<Shared> {
    let mut doc = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("CMR Vault company gateway")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A company's access to its customers' vaults, as plain JSON: every answer has \
                     passed the SDK's verifications in the gateway, and a verification failure is \
                     an error (`verification-failed`), never data. See docs/companies.md.",
                ))
                .build(),
        )
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            utoipa::openapi::security::SecurityScheme::Http(
                utoipa::openapi::security::HttpBuilder::new()
                    .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                    .description(Some(format!(
                        "The token in the company's configuration folder ({TOKEN_FILE})"
                    )))
                    .build(),
            ),
        );
    OpenApiRouter::with_openapi(doc)
        .routes(routes!(grants))
        .routes(routes!(accesses))
        .routes(routes!(requests, new_request))
        .routes(routes!(read))
        .routes(routes!(append))
        .routes(routes!(events))
}

/// The gateway's OpenAPI document (`cmr company gateway --openapi`, and `GET /v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().split_for_parts().1
}

/// Every route but the document needs `Authorization: Bearer <token>`.
async fn bearer(State(g): State<Shared>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Digests compared, so the comparison's time says nothing of the token.
    match given {
        Some(t) if sha256(t.trim().as_bytes()).0 == g.token => next.run(req).await,
        _ => GatewayError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("send Authorization: Bearer <the token in {TOKEN_FILE}>"),
        )
        .into_response(),
    }
}

/// The bearer token: read from the configuration folder, or made (32 random bytes) and written there
/// with mode 0600 on the first start.
fn token(home: &Home) -> CliResult<String> {
    let path = home.file(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let mut raw = [0u8; 32];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut raw);
    let t = B64URL.encode(raw);
    crate::home::write_private_file(&path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

/// Runs the gateway until Ctrl-C or SIGTERM.
pub async fn run(home: &Home, args: GatewayArgs) -> CliResult {
    if args.openapi {
        crate::out::print(&serde_json::to_string_pretty(&openapi()).unwrap_or_default());
        return Ok(());
    }
    let addr = crate::serve::local_address(
        &args.listen,
        args.allow_remote,
        "127.0.0.1:7070",
        "the gateway holds the company's keys",
    )
    .await?;
    let webhook_url = args
        .webhook
        .as_deref()
        .map(|u| {
            reqwest::Url::parse(u)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| {
                    CliError::usage(
                        format!("{u:?} is not a webhook URL"),
                        "use http(s)://HOST[:PORT]/PATH",
                    )
                })
        })
        .transpose()?;
    // The state is this process's while it runs: a `cmr company` command started meanwhile says so
    // instead of overwriting what the gateway learnt (or the gateway what the command did).
    let _held = home.hold(cmr_core::identity::Role::Company, std::time::Duration::ZERO)?;
    let mut loaded = Loaded::open(home)?;
    let id = loaded.company.id();
    let webhook = webhook_url.map(|url| {
        let keys = &loaded.company.session.keys;
        Webhook {
            url,
            key: cmr_core::keys::SigningKey::from_seed(&keys.device.signing.seed()),
            keyid: keys.device.id().to_hex(),
        }
    });
    // The company's state brought up to date before the gateway listens.
    sync_all(&mut loaded.company).await?;
    let (_, cursor) = loaded.company.changed_since(None).await?;
    // What the last run saw is where events start from (what changed while the gateway was down
    // becomes events now); on a first run, what holds before the gateway listens.
    let events = Events::open(home, webhook.is_some())?;
    let known = Known::journaled(&events).unwrap_or_else(|| {
        let k = Known::of(&loaded.company);
        events.remember(&k);
        k
    });
    let start = (cursor, known);
    loaded.save(home)?;
    let token = token(home)?;
    let listener = match &args.socket {
        Some(path) => Listener::Unix(unix_listener(path)?),
        None => Listener::Tcp(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::local(
                format!("cannot listen on {addr}: {e}"),
                "choose another address with --listen",
            )
        })?),
    };
    let bound = match (&listener, &args.socket) {
        (Listener::Tcp(l), _) => format!(
            "http://{}",
            l.local_addr()
                .map_err(|e| CliError::local(e.to_string(), "check --listen"))?
        ),
        (Listener::Unix(_), Some(path)) => format!("the Unix socket {}", path.display()),
        (Listener::Unix(_), None) => String::new(),
    };
    let state = Arc::new(Gateway {
        company: tokio::sync::Mutex::new(loaded),
        home: home.clone(),
        token: sha256(token.as_bytes()).0,
        events,
        unsaved: std::sync::atomic::AtomicBool::new(false),
    });
    tokio::spawn(watch(state.clone(), start));
    if let Some(hook) = webhook {
        tokio::spawn(deliver(state.clone(), hook));
    }
    let (router, doc) = api().split_for_parts();
    let doc = Arc::new(doc);
    let app = router
        .layer(axum::middleware::from_fn_with_state(state.clone(), bearer))
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json((*doc).clone()) }
            }),
        )
        .with_state(state.clone());
    let say = |line: String| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!(
        "company gateway for {} listening on {bound}",
        id.to_hex()
    ));
    say(format!(
        "  bearer token in {} (send Authorization: Bearer <token>)",
        home.file(TOKEN_FILE).display()
    ));
    say("  API document: GET /v1/openapi.json".into());
    if let Some(url) = &args.webhook {
        say(format!("  events also delivered to {url}"));
    }
    let served = match listener {
        Listener::Tcp(l) => {
            axum::serve(l, app)
                .with_graceful_shutdown(crate::serve::shutdown_signal())
                .await
        }
        Listener::Unix(l) => {
            axum::serve(l, app)
                .with_graceful_shutdown(crate::serve::shutdown_signal())
                .await
        }
    };
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if state.unsaved.load(std::sync::atomic::Ordering::SeqCst) {
        state.company.lock().await.save(home)?;
    }
    served.map_err(|e| CliError::local(format!("gateway: {e}"), "see the log"))
}

/// Where the gateway listens.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A Unix socket at `path`, then set to mode 0600 (connecting needs write permission, which the
/// usual umask already withholds from others between the two). A socket left by a gateway that was
/// killed is replaced; a live one, or any other file there, is refused.
fn unix_listener(path: &std::path::Path) -> CliResult<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    let fail = |e: std::io::Error| {
        CliError::local(
            format!("cannot listen on {}: {e}", path.display()),
            "choose another path with --socket",
        )
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(CliError::local(
                format!("{} exists and is not a socket", path.display()),
                "choose another path with --socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(CliError::local(
                format!("a gateway already listens on {}", path.display()),
                "stop it first, or choose another path with --socket",
            ));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(fail)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented_and_needs_the_token() {
        let doc = serde_json::to_value(super::openapi()).unwrap_or_default();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for p in [
            "/v1/grants",
            "/v1/requests",
            "/v1/grants/{grant}/read",
            "/v1/grants/{grant}/append",
            "/v1/events",
        ] {
            let item = &paths[p];
            assert!(item.is_object(), "{p} undocumented");
            for (_, op) in item.as_object().cloned().unwrap_or_default() {
                assert!(op["security"].is_array(), "{p} without its token");
            }
        }
    }
}
