//! # cmr-server
//!
//! CMR Vault's HTTP API on axum: every request but the public log and `/healthz` is signed (RFC 9421 with
//! RFC 9530 Content-Digest), every state-changing request goes through the store's sequencer, and errors
//! are Problem Details (RFC 9457) with stable codes.
//!
//! What it owns: routing, request authentication (profile, nonce memory, restart horizon), who may act
//! on which vault, and mapping results to HTTP. What it does not own: cryptographic rules (`cmr-core`),
//! ordering and durability (`cmr-store`), log formats (`cmr-log`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod error;
pub mod extract;
pub mod logkey;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use cmr_store::Backend;

/// The server's configuration. One struct, filled from flags and the environment by the binary.
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
    /// Requests in flight at most; more are shed with 503 and Retry-After.
    pub max_in_flight: usize,
    /// How long a request may take before it is answered 503.
    pub timeout: std::time::Duration,
    /// Requests per second one identity may make (sustained).
    pub rate_per_identity: f64,
    /// How many requests one identity may make in a burst.
    pub burst_per_identity: f64,
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
            timeout: std::time::Duration::from_secs(30),
            rate_per_identity: 200.0,
            burst_per_identity: 400.0,
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
}

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
            store,
            nonces: auth::NonceCache::default(),
            limits: auth::RateLimits::new(config.rate_per_identity, config.burst_per_identity),
            cosignatures: std::sync::Mutex::new((0, Vec::new())),
            config,
            clock,
        }
    }
}

/// Builds the whole application: the routers, the body limit, a timeout, and load shedding past the
/// concurrency limit (503 with Retry-After).
pub fn app(state: Arc<AppState>) -> Router {
    use axum::error_handling::HandleErrorLayer;
    use axum::http::StatusCode;
    use tower::ServiceBuilder;
    let (max_body, small, in_flight, timeout) = (
        state.config.max_body,
        state.config.max_small_body,
        state.config.max_in_flight,
        state.config.timeout,
    );
    Router::new()
        .merge(routes::log::router())
        .merge(routes::identities::router())
        .merge(routes::vaults::router())
        .merge(routes::openapi::router())
        // Unknown routes and methods are Problem Details too.
        .fallback(|| async {
            error::ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such route")
        })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
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
                        // Shed before the handler ran: nothing was applied.
                        error::ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "unavailable",
                            "the server is at capacity; retry later",
                        )
                    }
                }))
                .load_shed()
                .concurrency_limit(in_flight)
                .timeout(timeout),
        )
        .with_state(state)
}

/// Serves the application on `listener` until `shutdown` resolves, then stops taking connections and
/// lets in-flight requests finish (their durable writes are acknowledged before the process ends).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "cmr-server listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
