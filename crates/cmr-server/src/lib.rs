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
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use cmr_store::Store;

/// The server's configuration. One struct, filled from flags and the environment by the binary.
#[derive(Debug, Clone)]
pub struct Config {
    /// The authority clients address (used when a request has no Host header).
    pub authority: String,
    /// `https` behind the reverse proxy that terminates TLS, `http` in tests.
    pub scheme: String,
    /// The largest request body, in bytes.
    pub max_body: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            authority: "127.0.0.1:8080".into(),
            scheme: "https".into(),
            max_body: 16 * 1024 * 1024,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    /// The store.
    pub store: Arc<Store>,
    /// The configuration.
    pub config: Config,
    /// The nonces seen within the replay window.
    pub nonces: auth::NonceCache,
    /// The server clock, Unix seconds.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Builds the whole application.
pub fn app(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .merge(routes::log::router())
        .merge(routes::identities::router())
        .merge(routes::vaults::router())
        .layer(DefaultBodyLimit::max(max_body))
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
