//! # cmr-server
//!
//! CMR Vault's HTTP API on axum: every request but the public log, `/healthz`, `/readyz` and `/metrics`
//! is signed (RFC 9421 with RFC 9530 Content-Digest), every state-changing request goes through the
//! store's sequencer, and errors are Problem Details (RFC 9457) with stable codes.
//!
//! What it owns: routing, request authentication (profile, nonce memory, restart horizon), who may act
//! on which vault, mapping results to HTTP, and what it measures of itself (`metrics`). What it does not own: cryptographic rules (`cmr-core`),
//! ordering and durability (`cmr-store`), log formats (`cmr-log`), and a process of its own: it is a
//! library, and `cmr serve` (in `cmr-cli`) is the one entry point that opens a store and serves it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod backpressure;
pub mod conn;
pub mod error;
pub mod extract;
pub mod logkey;
pub mod metrics;
pub mod routes;
pub mod tls;

use cmr_core::problem::Code;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use cmr_store::Backend;

/// The server's configuration. One struct, filled from flags and the environment by `cmr serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The authority clients address (used when a request has no Host header).
    pub authority: String,
    /// `https` behind the reverse proxy that terminates TLS, `http` in tests.
    pub scheme: String,
    /// The largest request body for record batches, in bytes.
    pub max_body: usize,
    /// The largest request body for every other route, in bytes.
    pub max_small_body: usize,
    /// The witnesses whose cosignatures the log accepts (C2SP tlog-cosignature keys).
    pub witnesses: Vec<cmr_log::note::NoteVerifier>,
    /// Requests in flight at most, server-wide; more are shed with 503 and Retry-After.
    pub max_in_flight: usize,
    /// Requests in flight beyond `max_in_flight` that only a customer's own emergency routes may use
    /// (a statement such as a revocation, a device revocation).
    pub max_reserved: usize,
    /// Requests in flight at most from one source address (the reserved routes excepted).
    pub max_in_flight_per_source: usize,
    /// How long any request body may take at least; a body then has `len / min_body_rate` seconds more.
    pub body_deadline: std::time::Duration,
    /// The slowest body rate accepted, in bytes per second.
    pub min_body_rate: usize,
    /// How long a request may take before it is answered 503.
    pub timeout: std::time::Duration,
    /// Requests per second one identity may make (sustained).
    pub rate_per_identity: f64,
    /// How many requests one identity may make in a burst.
    pub burst_per_identity: f64,
    /// The most connections open at once; past it a new one is answered 503 and closed. `cmr serve`
    /// sets it from the process's descriptor limit, keeping room for the store's own files.
    pub max_connections: usize,
    /// A connection with nothing read or written for this long is closed ([`conn::IDLE_TIMEOUT`] by
    /// default), whatever its protocol.
    pub idle_timeout: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            authority: "127.0.0.1:8080".into(),
            scheme: "https".into(),
            max_body: 16 * 1024 * 1024,
            max_small_body: 256 * 1024,
            witnesses: Vec::new(),
            max_in_flight: 512,
            max_reserved: 64,
            max_in_flight_per_source: 256,
            body_deadline: std::time::Duration::from_secs(5),
            min_body_rate: 64 * 1024,
            timeout: std::time::Duration::from_secs(30),
            rate_per_identity: 200.0,
            burst_per_identity: 400.0,
            max_connections: 4096,
            idle_timeout: conn::IDLE_TIMEOUT,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    /// The storage behind the server: sled by default ([`cmr_store::Store`]), or any [`Backend`].
    pub store: Arc<dyn Backend>,
    /// The configuration.
    pub config: Config,
    /// The nonces seen within the replay window.
    pub nonces: auth::NonceCache,
    /// The server clock, Unix seconds.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Per-identity request budgets.
    pub limits: auth::RateLimits,
    /// Witness cosignature lines collected for the checkpoint of that size.
    pub cosignatures: std::sync::Mutex<(u64, Vec<String>)>,
    /// The server-wide limits on requests in flight.
    pub gate: backpressure::Gate,
    /// What the server measures, for `/metrics`.
    pub metrics: metrics::Metrics,
    /// The connections open now (capped at [`Config::max_connections`]).
    pub connections: conn::Connections,
    /// Set once the server stops taking requests: open event streams end then, so that draining
    /// does not wait for them.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// The event streams open per identity (capped at [`MAX_STREAMS_PER_IDENTITY`]).
    pub streams: std::sync::Mutex<std::collections::HashMap<cmr_core::identity::IdentityId, u32>>,
}

/// The most event streams one identity may hold open at once (a customer's devices and apps).
pub const MAX_STREAMS_PER_IDENTITY: u32 = 8;

impl AppState {
    /// The state for `store` with `config` and the system clock.
    pub fn new(store: Arc<dyn Backend>, config: Config) -> Self {
        Self::with_clock(
            store,
            config,
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
        )
    }

    /// The state with a given clock (tests move it by hand).
    pub fn with_clock(
        store: Arc<dyn Backend>,
        config: Config,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Self {
            metrics: metrics::Metrics::new(store.metrics()),
            connections: conn::Connections::default(),
            closing: tokio::sync::watch::channel(false).0,
            streams: std::sync::Mutex::default(),
            store,
            nonces: auth::NonceCache::default(),
            limits: auth::RateLimits::new(config.rate_per_identity, config.burst_per_identity),
            cosignatures: std::sync::Mutex::new((0, Vec::new())),
            gate: backpressure::Gate::new(
                config.max_in_flight,
                config.max_reserved,
                config.max_in_flight_per_source,
            ),
            config,
            clock,
        }
    }
}

/// Builds the whole application: the routers, the body limit, a timeout, and the server-wide gate
/// ([`backpressure`]: one limit on requests in flight with a share reserved for a customer's emergency
/// routes, a per-source limit, early refusal of what cannot verify, a body deadline; 503 with
/// Retry-After past the limits).
pub fn app(state: Arc<AppState>) -> Router {
    use axum::error_handling::HandleErrorLayer;
    use axum::http::StatusCode;
    use tower::ServiceBuilder;
    let (max_body, small, timeout) = (
        state.config.max_body,
        state.config.max_small_body,
        state.config.timeout,
    );
    // One registration gives the router and the OpenAPI document (`routes::openapi`).
    let (routes, _) = routes::openapi::api().split_for_parts();
    Router::new()
        .merge(routes)
        // Every matched route is counted and timed (`/metrics`).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        // Unknown routes and methods are Problem Details too.
        .fallback(|| async {
            error::ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::MethodNotAllowed,
                "this route does not take this method",
            )
        })
        .layer(DefaultBodyLimit::max(small))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|e: tower::BoxError| async move {
                    if e.is::<tower::timeout::error::Elapsed>() {
                        // A write may still be queued in the store, and applied after this answer.
                        error::ApiError::in_doubt("the request took too long")
                    } else {
                        error::ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            Code::Unavailable,
                            "the server could not take this request; retry later",
                        )
                    }
                }))
                .timeout(timeout),
        )
        // Outermost: the gate runs before anything reads the body.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            backpressure::gate,
        ))
        .with_state(state)
}

/// How long a client may take to send a request's headers: a connection that trickles them (slowloris)
/// is closed after this, so idle half-requests cannot pile up and hold the server's descriptors.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most bytes a request's head (request line and headers) may take; past it the answer is 431.
/// Signed requests need a few kilobytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves the application on `listener` until `shutdown` resolves, then stops taking connections and
/// lets in-flight requests finish (their durable writes are acknowledged before the process ends).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "cmr-server listening");
    let guard = conn::Guarded::new(
        axum_server::accept::DefaultAcceptor,
        state.connections.clone(),
        state.config.max_connections,
        true,
    )
    .idle_after(state.config.idle_timeout);
    let mut server = axum_server::from_tcp(listener.into_std()?).acceptor(guard);
    limit(server.http_builder());
    server
        .handle(drain_on(closing(&state, shutdown)))
        .serve(app(state).into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await
}

/// [`serve`] over HTTPS with `tls` (its certificate can be reloaded while serving, [`tls::Tls::reload`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    tls: &tls::Tls,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "cmr-server listening (https)");
    let guard = conn::Guarded::new(
        axum_server::accept::DefaultAcceptor,
        state.connections.clone(),
        state.config.max_connections,
        false,
    )
    .idle_after(state.config.idle_timeout);
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls.rustls()).acceptor(guard);
    let mut server = axum_server::from_tcp(listener.into_std()?).acceptor(acceptor);
    limit(server.http_builder());
    server
        .handle(drain_on(closing(&state, shutdown)))
        .serve(app(state).into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await
}

/// The connection limits: [`HEADER_READ_TIMEOUT`] and [`MAX_HEAD_BYTES`], on HTTP/1 and HTTP/2.
fn limit(builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
}

/// `shutdown`, then telling the open event streams to end ([`AppState::closing`]).
fn closing(
    state: &Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let state = state.clone();
    async move {
        shutdown.await;
        state.closing.send_replace(true);
    }
}

/// A handle that, once `shutdown` resolves, stops the server taking connections and lets those open
/// finish their requests.
fn drain_on(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> axum_server::Handle {
    let handle = axum_server::Handle::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.graceful_shutdown(None);
    });
    handle
}
