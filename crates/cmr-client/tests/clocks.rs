//! Clocks: the server's clock is the only one that decides. A client whose clock is off by more than the
//! allowed skew is refused with `clock-skew`, and the message says which way and by how many seconds.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;

use cmr_client::ClientError;
use cmr_client::session::Session;
use cmr_core::identity::Role;
use common::now;

/// A server whose clock runs `offset` seconds from this machine's.
async fn server(dir: &std::path::Path, offset: i64) -> common::Server {
    let clock = Arc::new(move || now().saturating_add_signed(offset));
    common::serve_with_clock(dir, "clocks.test/log", 7, clock).await
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
    let s = server(dir.path(), 600).await;
    let e = Session::register(s.conn, Role::Customer, s.pinned, now())
        .await
        .err()
        .unwrap();
    let behind = seconds(&e, " s ago");
    assert!((599..=601).contains(&behind), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_clock_ahead_of_the_server_is_told_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), -600).await;
    let e = Session::register(s.conn, Role::Customer, s.pinned, now())
        .await
        .err()
        .unwrap();
    let ahead = seconds(&e, " s ahead");
    assert!((599..=601).contains(&ahead), "{e}");
}
