//! What the SDK's tests share: a real server over a real store in a temporary folder, on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used)] // Each test file uses part of it; a panic is a failed test.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cmr_client::Connection;
use cmr_client::session::Session;
use cmr_core::identity::Role;
use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, NoteVerifier, TYPE_ED25519};
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};

/// This machine's clock, in Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A running test server.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub conn: Connection,
    pub pinned: NoteVerifier,
    pub store: Arc<Store>,
    pub log_key: NoteSigner,
}

impl Server {
    /// Registers a new identity of `role` and returns its session.
    pub async fn register(&self, role: Role) -> Session {
        Session::register(self.conn.clone(), role, self.pinned.clone(), now())
            .await
            .unwrap()
            .0
    }
}

/// A log key named `name`, from a fixed seed.
pub fn log_key(name: &str, seed: u8) -> NoteSigner {
    NoteSigner::new(name, TYPE_ED25519, SigningKey::from_seed(&[seed; 32])).unwrap()
}

/// Serves a store in `dir` with the log key `name`/`seed`, on the real clock.
pub async fn serve(dir: &std::path::Path, name: &str, seed: u8) -> Server {
    serve_with_clock(dir, name, seed, Arc::new(now)).await
}

/// [`serve`], with the server's clock given.
pub async fn serve_with_clock(
    dir: &std::path::Path,
    name: &str,
    seed: u8,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
) -> Server {
    serve_configured(dir, name, seed, clock, |_| {}).await
}

/// [`serve_with_clock`], with the server's configuration changed by `configure`.
pub async fn serve_configured(
    dir: &std::path::Path,
    name: &str,
    seed: u8,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    configure: impl FnOnce(&mut Config),
) -> Server {
    let store = Arc::new(Store::open(StoreConfig::new(dir, log_key(name, seed))).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Config::default()
    };
    configure(&mut config);
    tokio::spawn(cmr_server::serve(
        listener,
        Arc::new(AppState::with_clock(store.clone(), config, clock)),
        std::future::pending(),
    ));
    Server {
        addr,
        conn: Connection::new(&format!("http://{addr}")).unwrap(),
        pinned: log_key(name, seed).verifier(),
        store,
        log_key: log_key(name, seed),
    }
}
