//! Clocks: the server's clock is the only one that decides. A client whose clock is off by more than the
//! allowed skew is refused with `clock-skew`, and the message says which way and by how many seconds.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cmr_client::session::Session;
use cmr_client::{ClientError, Connection};
use cmr_core::identity::Role;
use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A server whose clock runs `offset` seconds from this machine's; returns a connection and its key.
async fn server(dir: &std::path::Path, offset: i64) -> (Connection, cmr_log::note::NoteVerifier) {
    let key = NoteSigner::new(
        "clocks.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[7; 32]),
    )
    .unwrap();
    let pinned = key.verifier();
    let store = Arc::new(Store::open(StoreConfig::new(dir, key)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Config::default()
    };
    let clock = Arc::new(move || now().saturating_add_signed(offset));
    tokio::spawn(cmr_server::serve(
        listener,
        Arc::new(AppState::with_clock(store, config, clock)),
        std::future::pending(),
    ));
    (Connection::new(&format!("http://{addr}")).unwrap(), pinned)
}

/// The seconds named in a `clock-skew` refusal's detail, before `unit`.
fn seconds(e: &ClientError, unit: &str) -> i64 {
    let ClientError::Refused { code, detail, .. } = e else {
        panic!("not a refusal: {e}");
    };
    assert_eq!(code, "clock-skew", "{detail}");
    assert!(detail.contains("check the client clock"), "{detail}");
    let before = detail.split(unit).next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_clock_behind_the_server_is_told_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, pinned) = server(dir.path(), 600).await;
    let e = Session::register(conn, Role::Customer, pinned, now())
        .await
        .err()
        .unwrap();
    let behind = seconds(&e, " s ago");
    assert!((599..=601).contains(&behind), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_clock_ahead_of_the_server_is_told_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, pinned) = server(dir.path(), -600).await;
    let e = Session::register(conn, Role::Customer, pinned, now())
        .await
        .err()
        .unwrap();
    let ahead = seconds(&e, " s ahead");
    assert!((599..=601).contains(&ahead), "{e}");
}
