//! `cmr customer ui`: the customer's consent dashboard, a web app on the customer's own machine.
//!
//! What it owns: the local HTTP edge (the session token and its cookie, the Host check against DNS
//! rebinding, the CSRF token on every action, the security headers), the pages (`pages`), and the live
//! relay of new entries on the customer's chain. What it does not own: any action or any view of the
//! vault. Every page and every button runs the same command as `cmr customer …` (through
//! [`crate::out::capture`]), on the key this process unlocked, so the page can do what the command line
//! does, and both verify the same way. The keys and the plaintext stay in this process; the browser
//! talks only to it (design note 0009).

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use cmr_core::hash::sha256;
use serde_json::Value;

use super::{CustomerCmd, DeviceCmd, Loaded, ProfileCmd, TxCmd};
use crate::error::{CliError, CliResult};
use crate::home::Home;
use crate::out::{Captured, Out, capture};

mod pages;

/// `cmr customer ui`'s arguments.
#[derive(clap::Args)]
pub struct UiArgs {
    /// The address to listen on: loopback only, unless --allow-remote (port 0 picks a free one).
    #[arg(long, env = "CMR_UI_LISTEN", default_value = "127.0.0.1:7171")]
    listen: String,
    /// Listen beyond loopback. Anyone who reaches the address and has the link can act as you: only
    /// behind TLS on a network you trust.
    #[arg(long)]
    allow_remote: bool,
    /// Fetch companies' key documents over plain http when approving (tests only: proves nothing
    /// about a real domain).
    #[arg(long)]
    insecure_http_for_tests: bool,
}

/// The session cookie's name.
const COOKIE: &str = "cmr_ui";
/// The largest form accepted (a profile section's text is the largest field).
const MAX_FORM: usize = 256 * 1024;
/// How long the app waits before opening the vault's event stream again after it ended.
const RETRY_WATCH: std::time::Duration = std::time::Duration::from_secs(1);

/// A message for the next page: what an action did, or why it failed.
#[derive(Clone)]
pub(crate) struct Flash {
    ok: bool,
    lines: Vec<String>,
}

/// The running app.
pub(crate) struct Ui {
    home: Home,
    loaded: tokio::sync::Mutex<Loaded>,
    /// The digest of the session token (the URL's token, then the cookie's value).
    token: [u8; 32],
    /// The token every form carries back (the double-submit pattern's secret, never in a cookie).
    csrf: String,
    /// The Host headers this app answers to.
    hosts: Vec<String>,
    insecure_http: bool,
    flash: std::sync::Mutex<Option<Flash>>,
    live: tokio::sync::broadcast::Sender<String>,
}

impl Ui {
    /// Runs a customer command as the command line would, with what it says kept: the state is saved
    /// after it, whatever happened.
    pub(crate) async fn run(&self, cmd: CustomerCmd) -> CliResult<Captured> {
        let mut l = self.loaded.lock().await;
        if let Some(at) = l.saved.role.vault_erased_at {
            return Err(CliError::local(
                format!("this vault was erased (log index {at}): its records and keys are gone"),
                "start over with `cmr customer init` in a new --home",
            ));
        }
        let (result, captured) = capture(super::step(&mut l, Out { json: true }, cmd)).await;
        let saved = l.save(&self.home).await;
        result?;
        saved?;
        Ok(captured)
    }

    /// A command's JSON result.
    pub(crate) async fn value(&self, cmd: CustomerCmd) -> CliResult<Value> {
        Ok(self.run(cmd).await?.value.unwrap_or(Value::Null))
    }

    /// The companies whose domain the customer checked: identity hex → (name, domain).
    pub(crate) async fn checked(&self) -> std::collections::HashMap<String, (String, String)> {
        let l = self.loaded.lock().await;
        l.saved
            .role
            .companies
            .iter()
            .map(|(i, d, n)| (i.clone(), (n.clone(), d.clone())))
            .collect()
    }

    pub(crate) async fn me(&self) -> String {
        self.loaded.lock().await.customer.id().to_hex()
    }

    fn take_flash(&self) -> Option<Flash> {
        self.flash.lock().ok().and_then(|mut f| f.take())
    }

    fn set_flash(&self, f: Flash) {
        if let Ok(mut slot) = self.flash.lock() {
            *slot = Some(f);
        }
    }

    /// After an action: what it said (or its error) on the next page, and back to `to`.
    fn done(&self, result: CliResult<Captured>, to: &str) -> Response {
        let flash = match result {
            Ok(c) => Flash {
                ok: true,
                lines: if c.lines.is_empty() {
                    vec!["done".into()]
                } else {
                    c.lines
                },
            },
            Err(e) => Flash {
                ok: false,
                lines: std::iter::once(e.message).chain(e.hint).collect(),
            },
        };
        self.set_flash(flash);
        Redirect::to(to).into_response()
    }
}

/// What a page needs from the app besides its data: the CSRF token for its forms, the flash, and
/// which page it is.
pub(crate) struct Frame {
    pub csrf: String,
    pub flash: Option<Flash>,
    pub path: &'static str,
    /// Whether the page may fetch itself again when something new arrives (a page answering a form,
    /// such as the confirmation of a revocation, has no address to fetch).
    pub live: bool,
}

type App = Arc<Ui>;

/// A posted form, after its CSRF token was checked: every field, repeated ones kept in order.
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    /// The first value of `name`, trimmed; empty counts as absent.
    pub(crate) fn one(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// Every value of `name` (checkboxes).
    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl FromRequest<App> for Fields {
    type Rejection = Response;

    async fn from_request(req: Request, ui: &App) -> Result<Self, Self::Rejection> {
        let form_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        if !form_type {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "actions are forms (application/x-www-form-urlencoded)",
            ));
        }
        let body = axum::body::to_bytes(req.into_body(), MAX_FORM)
            .await
            .map_err(|_| refuse(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "the form is malformed"))?;
        let sent = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_bytes());
        // Digests compared, so the comparison's time says nothing of the token.
        if sent.map(sha256) != Some(sha256(ui.csrf.as_bytes())) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "this action did not come from the app's own page (no or wrong CSRF token): nothing was done",
            ));
        }
        Ok(Fields(fields))
    }
}

/// A refusal: a short plain page, never the vault's data.
fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response()
}

/// Every response: the headers a local app needs (a strict CSP: scripts, styles and everything else
/// only from this app, no inline script or style, no frames; no caching of pages with private data).
async fn headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    // Same-origin: the browser then sends our own origin with our forms (with no-referrer it sends
    // "Origin: null", which the origin check refuses) and nothing to other sites.
    set(h, "referrer-policy", "same-origin");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    set(h, "cache-control", "no-store");
    res
}

/// The Host check (against DNS rebinding: a page of another site whose name now points at 127.0.0.1
/// sends its own name), then the session: the token in the URL once, a cookie after.
async fn guard(State(ui): State<App>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !ui.hosts.contains(&host) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this app answers only to its own address (wrong Host header)",
        );
    }
    // An action must come from this app's own pages: the browser says where a request came from.
    if req.method() != axum::http::Method::GET {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if let Some(o) = origin
            && o != format!("http://{host}")
        {
            return refuse(
                StatusCode::FORBIDDEN,
                "a request from another site: nothing was done",
            );
        }
        let site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|o| o.to_str().ok());
        if matches!(site, Some("cross-site" | "same-site")) {
            return refuse(
                StatusCode::FORBIDDEN,
                "a request from another site: nothing was done",
            );
        }
    }
    if req.uri().path().starts_with("/assets/") {
        return next.run(req).await;
    }
    let query_token = req.uri().query().and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    });
    if let Some(t) = query_token {
        if sha256(t.as_bytes()).0 != ui.token {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this link's token is not this app's: open the link `cmr customer ui` printed",
            );
        }
        // The token leaves the address bar (and the history) at once; the cookie carries it from now.
        let mut res = Redirect::to(req.uri().path()).into_response();
        if let Ok(v) =
            HeaderValue::from_str(&format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"))
        {
            res.headers_mut().insert(header::SET_COOKIE, v);
        }
        return res;
    }
    let cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string());
    match cookie {
        Some(c) if sha256(c.as_bytes()).0 == ui.token => next.run(req).await,
        _ => refuse(
            StatusCode::UNAUTHORIZED,
            "no session: open the link `cmr customer ui` printed (it holds this app's token)",
        ),
    }
}

/// Runs the app until Ctrl-C or SIGTERM.
pub async fn run(home: &Home, args: UiArgs) -> CliResult {
    let addr = crate::serve::local_address(
        &args.listen,
        args.allow_remote,
        "127.0.0.1:7171",
        "the app holds your unlocked key",
    )
    .await?;
    // The state is this process's while it runs: a command started meanwhile says so and waits.
    let _held = home.hold(
        cmr_core::identity::Role::Customer,
        std::time::Duration::ZERO,
    )?;
    let loaded = Loaded::open(home)?;
    if let Some(at) = loaded.saved.role.vault_erased_at {
        return Err(CliError::local(
            format!("this vault was erased (log index {at})"),
            "start over with `cmr customer init` in a new --home",
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CliError::local(
            format!("cannot listen on {addr}: {e}"),
            "choose another address with --listen",
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::local(e.to_string(), "check --listen"))?;
    let secret = |n: usize| {
        let mut b = vec![0u8; n];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
        B64URL.encode(b)
    };
    let token = secret(32);
    let port = bound.port();
    let mut hosts = vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    if args.allow_remote {
        hosts.push(bound.to_string());
    }
    let (live, _) = tokio::sync::broadcast::channel(64);
    let ui = Arc::new(Ui {
        home: home.clone(),
        loaded: tokio::sync::Mutex::new(loaded),
        token: sha256(token.as_bytes()).0,
        csrf: secret(32),
        hosts,
        insecure_http: args.insecure_http_for_tests,
        flash: std::sync::Mutex::new(None),
        live,
    });
    tokio::spawn(watch(ui.clone()));
    let app = router(ui.clone());
    let say = |line: String| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let host = if bound.ip().is_loopback() {
        format!("127.0.0.1:{port}")
    } else {
        bound.to_string()
    };
    say(format!(
        "your consent dashboard: http://{host}/?token={token}"
    ));
    say("  open it in your browser; it works only with this link's token. Ctrl-C stops it.".into());
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::serve::shutdown_signal())
        .await
        .map_err(|e| CliError::local(format!("ui: {e}"), "see the log"))
}

fn router(ui: App) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/requests", get(requests))
        .route("/requests/{id}/approve", post(approve))
        .route("/requests/{id}/deny", post(deny))
        .route("/grants", get(grants))
        .route("/grants/new", post(grant))
        .route("/grants/{id}/revoke", post(revoke))
        .route("/grants/{id}/receipt", post(receipt))
        .route("/companies", get(companies))
        .route("/companies/{id}/block", post(block))
        .route("/history", get(history))
        .route("/profile", get(profile))
        .route("/profile/dispute", post(dispute))
        .route("/profile/{section}", post(set_section))
        .route("/transactions", get(transactions).post(add_transaction))
        .route("/settings", get(settings))
        .route("/settings/policy", post(policy))
        .route("/settings/devices/{id}/revoke", post(revoke_device))
        .route("/settings/export", post(export))
        .route("/settings/erase", post(erase))
        .route("/audit", get(audit))
        .route("/audit/rotate", post(rotate))
        .route("/audit/accept-restore", post(accept_restore))
        .route("/events", get(events))
        .route("/assets/ui.css", get(css))
        .route("/assets/ui.js", get(js))
        .route("/assets/icon.svg", get(icon))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn_with_state(ui.clone(), guard))
        .layer(axum::middleware::from_fn(headers))
        .with_state(ui)
}

/// Follows the customer's chain on the vault server's event stream (`Customer::watch`) and tells the
/// open pages when its newest entry changed (a request arrived, a company read or appended). The pages
/// then fetch themselves again, which verifies everything as usual: an event is a hint to look, never
/// evidence. A stream that ends (the server restarted) is opened again.
async fn watch(ui: App) {
    let mut known: Option<u64> = None;
    loop {
        let opened = {
            let l = ui.loaded.lock().await;
            l.customer.watch(known).await
        };
        if let Ok(mut events) = opened {
            while let Ok(Some(head)) = events.next().await {
                // The first event says where the chain is; only later ones are news.
                if known.is_some() {
                    let _ = ui
                        .live
                        .send(serde_json::json!({ "index": head }).to_string());
                }
                known = Some(head);
            }
        }
        tokio::time::sleep(RETRY_WATCH).await;
    }
}

async fn events(State(ui): State<App>) -> impl IntoResponse {
    let rx = tokio_stream::wrappers::BroadcastStream::new(ui.live.subscribe());
    let stream = tokio_stream::StreamExt::filter_map(rx, |m| {
        m.ok().map(|data| {
            Ok::<_, std::convert::Infallible>(Event::default().event("change").data(data))
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("ui.css"),
    )
}

async fn icon() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        include_str!("icon.svg"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("ui.js"),
    )
}

fn frame(ui: &Ui, path: &'static str) -> Frame {
    Frame {
        csrf: ui.csrf.clone(),
        flash: ui.take_flash(),
        path,
        live: true,
    }
}

/// A page, or the page that says why it could not be shown.
fn page(r: CliResult<maud::Markup>, f: &Frame, title: &str) -> Response {
    match r {
        Ok(m) => Html(m.into_string()).into_response(),
        Err(e) => (
            StatusCode::OK,
            Html(pages::failed(f, title, &e).into_string()),
        )
            .into_response(),
    }
}

async fn overview(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/");
    let r = async {
        let requests = ui.value(CustomerCmd::Requests).await?;
        let grants = ui.value(CustomerCmd::Grants).await?;
        let history = ui.value(CustomerCmd::History).await?;
        Ok(pages::overview(
            &f,
            &ui.checked().await,
            &requests,
            &grants,
            &history,
        ))
    }
    .await;
    page(r, &f, "Overview")
}

async fn requests(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/requests");
    let r = async {
        let requests = ui.value(CustomerCmd::Requests).await?;
        Ok(pages::requests(&f, &ui.checked().await, &requests))
    }
    .await;
    page(r, &f, "Requests")
}

async fn approve(State(ui): State<App>, Path(id): Path<String>, fields: Fields) -> Response {
    let Some(domain) = fields.one("domain") else {
        return ui.done(
            Err(CliError::usage(
                "no domain given",
                "type the company's domain: its key document there must name it",
            )),
            "/requests",
        );
    };
    let only = fields.all("scope");
    if only.is_empty() {
        return ui.done(
            Err(CliError::usage(
                "no scope chosen",
                "tick at least one scope, or deny the request",
            )),
            "/requests",
        );
    }
    let cmd = CustomerCmd::Approve {
        request: id,
        domain,
        lookback: fields.one("lookback").and_then(|l| l.parse().ok()),
        only,
        duration: fields.one("duration").filter(|d| d != "asked"),
        insecure_http_for_tests: ui.insecure_http,
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/grants")
}

async fn deny(State(ui): State<App>, Path(id): Path<String>, fields: Fields) -> Response {
    let cmd = CustomerCmd::Deny {
        request: id,
        reason: fields.one("reason").unwrap_or_else(|| "declined".into()),
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/requests")
}

async fn grants(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/grants");
    let r = async {
        let grants = ui.value(CustomerCmd::Grants).await?;
        let companies = ui.value(CustomerCmd::Companies).await?;
        Ok(pages::grants(&f, &ui.checked().await, &grants, &companies))
    }
    .await;
    page(r, &f, "Grants")
}

async fn grant(State(ui): State<App>, fields: Fields) -> Response {
    let (Some(company), Some(domain), Some(purpose)) = (
        fields.one("company"),
        fields.one("domain"),
        fields.one("purpose"),
    ) else {
        return ui.done(
            Err(CliError::usage(
                "a grant needs the company, its domain and a purpose",
                "fill in every field",
            )),
            "/grants",
        );
    };
    let scopes = fields.all("scope");
    if scopes.is_empty() {
        return ui.done(
            Err(CliError::usage(
                "no scope chosen",
                "tick at least one scope",
            )),
            "/grants",
        );
    }
    let cmd = CustomerCmd::Grant {
        company,
        domain,
        scopes,
        purpose,
        lookback: fields
            .one("lookback")
            .and_then(|l| l.parse().ok())
            .unwrap_or(12),
        duration: fields
            .one("duration")
            .unwrap_or_else(|| "persistent".into()),
        insecure_http_for_tests: ui.insecure_http,
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/grants")
}

async fn revoke(State(ui): State<App>, Path(id): Path<String>, fields: Fields) -> Response {
    if fields.one("confirm").as_deref() != Some("yes") {
        // One click asks, the second one (on this page) revokes.
        let f = Frame {
            live: false,
            ..frame(&ui, "/grants")
        };
        let r = async {
            let grants = ui.value(CustomerCmd::Grants).await?;
            Ok(pages::confirm_revoke(&f, &ui.checked().await, &grants, &id))
        }
        .await;
        return page(r, &f, "Revoke");
    }
    let cmd = CustomerCmd::Revoke {
        grant: id,
        reason: fields
            .one("reason")
            .unwrap_or_else(|| "revoked by the customer".into()),
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/grants")
}

/// A download: what a command printed, as a file.
fn download(r: CliResult<Captured>, name: &str, ui: &Ui, back: &str) -> Response {
    match r {
        Ok(c) => (
            [
                (header::CONTENT_TYPE, "application/json".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}\""),
                ),
            ],
            c.printed,
        )
            .into_response(),
        Err(e) => ui.done(Err(e), back),
    }
}

async fn receipt(State(ui): State<App>, Path(id): Path<String>, _fields: Fields) -> Response {
    let name = format!(
        "consent-receipt-{}.json",
        id.chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect::<String>()
    );
    let r = ui.run(CustomerCmd::Receipt { grant: id }).await;
    download(r, &name, &ui, "/grants")
}

async fn companies(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/companies");
    let r = async {
        let companies = ui.value(CustomerCmd::Companies).await?;
        Ok(pages::companies(&f, &companies))
    }
    .await;
    page(r, &f, "Companies")
}

async fn block(State(ui): State<App>, Path(id): Path<String>, fields: Fields) -> Response {
    let cmd = CustomerCmd::Block {
        company: id,
        unblock: fields.one("unblock").as_deref() == Some("yes"),
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/companies")
}

async fn history(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/history");
    let r = async {
        let history = ui.value(CustomerCmd::History).await?;
        Ok(pages::history(&f, &history))
    }
    .await;
    page(r, &f, "Access history")
}

async fn profile(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/profile");
    let r = async {
        let profile = ui
            .value(CustomerCmd::Profile {
                cmd: ProfileCmd::Show,
            })
            .await?;
        Ok(pages::profile(
            &f,
            &ui.checked().await,
            &ui.me().await,
            &profile,
        ))
    }
    .await;
    page(r, &f, "Profile")
}

async fn set_section(
    State(ui): State<App>,
    Path(section): Path<String>,
    fields: Fields,
) -> Response {
    let cmd = CustomerCmd::Profile {
        cmd: ProfileCmd::Set {
            section,
            text: fields.one("text").unwrap_or_default(),
        },
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/profile")
}

async fn dispute(State(ui): State<App>, fields: Fields) -> Response {
    let cmd = CustomerCmd::Dispute {
        company: fields.one("company").unwrap_or_default(),
        record: fields.one("record").unwrap_or_default(),
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/profile")
}

#[derive(serde::Deserialize)]
struct Which {
    company: Option<String>,
}

async fn transactions(State(ui): State<App>, Query(which): Query<Which>) -> Response {
    let f = frame(&ui, "/transactions");
    let r = async {
        let companies = ui.value(CustomerCmd::Companies).await?;
        let chosen = which.company.filter(|c| !c.is_empty()).or_else(|| {
            companies["companies"][0]["company"]
                .as_str()
                .map(str::to_string)
        });
        let list = match &chosen {
            Some(company) => Some(
                ui.value(CustomerCmd::Tx {
                    cmd: TxCmd::List {
                        company: company.clone(),
                        from: None,
                        to: None,
                    },
                })
                .await?,
            ),
            None => None,
        };
        Ok(pages::transactions(
            &f,
            &companies,
            chosen.as_deref(),
            list.as_ref(),
            &ui.me().await,
        ))
    }
    .await;
    page(r, &f, "Transactions")
}

async fn add_transaction(State(ui): State<App>, fields: Fields) -> Response {
    let company = fields.one("company").unwrap_or_default();
    let cmd = CustomerCmd::Tx {
        cmd: TxCmd::Add {
            company: company.clone(),
            month: fields.one("month"),
            text: fields.one("text").unwrap_or_default(),
        },
    };
    let r = ui.run(cmd).await;
    let back = format!(
        "/transactions?company={}",
        company
            .chars()
            .filter(char::is_ascii_hexdigit)
            .collect::<String>()
    );
    ui.done(r, &back)
}

async fn settings(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/settings");
    let r = async {
        let policy = ui
            .value(CustomerCmd::Policy {
                granted_only: false,
                anyone: false,
                daily_cap: None,
                no_cap: false,
            })
            .await?;
        let devices = ui
            .value(CustomerCmd::Device {
                cmd: DeviceCmd::List,
            })
            .await?;
        let auditors = ui.value(CustomerCmd::Auditors).await?;
        let companies = ui.value(CustomerCmd::Companies).await?;
        Ok(pages::settings(
            &f, &policy, &devices, &auditors, &companies,
        ))
    }
    .await;
    page(r, &f, "Settings")
}

async fn policy(State(ui): State<App>, fields: Fields) -> Response {
    let granted_only = fields.one("who").as_deref() == Some("granted");
    let daily_cap = fields.one("cap").and_then(|c| c.parse().ok());
    let cmd = CustomerCmd::Policy {
        granted_only,
        anyone: !granted_only,
        daily_cap,
        no_cap: daily_cap.is_none(),
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/settings")
}

async fn revoke_device(State(ui): State<App>, Path(id): Path<String>, fields: Fields) -> Response {
    if fields.one("confirm").as_deref() != Some("yes") {
        return ui.done(
            Err(CliError::usage(
                "the device was not revoked",
                "tick the box to confirm: every family rotates and the vault key is replaced",
            )),
            "/settings",
        );
    }
    let cmd = CustomerCmd::Device {
        cmd: DeviceCmd::Revoke { device: id },
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/settings")
}

async fn export(State(ui): State<App>, _fields: Fields) -> Response {
    let r = ui.run(CustomerCmd::Export { out: None }).await;
    download(r, "vault-export.json", &ui, "/settings")
}

async fn erase(State(ui): State<App>, fields: Fields) -> Response {
    let what = fields.one("family").unwrap_or_default();
    let typed = fields.one("typed").unwrap_or_default();
    // The family is "vault", a section ("contact"), or SCOPE@COMPANY for a company's family.
    let (scope, company) = match what.split_once('@') {
        Some((s, c)) => (s.to_string(), Some(c.to_string())),
        None => (what.clone(), None),
    };
    let expected = if company.is_some() {
        scope.clone()
    } else {
        what.clone()
    };
    if what.is_empty() || typed != expected {
        return ui.done(
            Err(CliError::usage(
                "nothing was erased",
                format!("type {expected:?} exactly to confirm: erasure cannot be undone"),
            )),
            "/settings",
        );
    }
    let vault = what == "vault";
    let cmd = CustomerCmd::Erase {
        scope: (!vault).then_some(scope),
        company,
        vault,
        yes: true,
    };
    let r = ui.run(cmd).await;
    ui.done(r, "/settings")
}

async fn audit(State(ui): State<App>) -> Response {
    let f = frame(&ui, "/audit");
    let status = ui.value(CustomerCmd::Status).await;
    Html(pages::audit(&f, &status).into_string()).into_response()
}

async fn rotate(State(ui): State<App>, _fields: Fields) -> Response {
    let r = ui.run(CustomerCmd::Rotate).await;
    ui.done(r, "/audit")
}

async fn accept_restore(State(ui): State<App>, _fields: Fields) -> Response {
    let r = ui.run(CustomerCmd::AcceptRestore).await;
    ui.done(r, "/audit")
}
