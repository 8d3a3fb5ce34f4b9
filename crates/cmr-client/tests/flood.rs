//! A flood of requests whose bodies arrive one byte a second cannot stop a customer from revoking (promise
//! 3): the server-wide limit sheds the flood, the share reserved for a customer's own emergency routes
//! takes the revocation at once, every body has a deadline, and the server recovers by itself.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::time::{Duration as Wait, Instant};

use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, Duration};
use cmr_core::family::{PseudonymKey, Scope};
use cmr_core::httpsig;
use cmr_core::identity::Role;
use common::now;
use tokio::io::AsyncWriteExt;

/// Opens a connection that sends a signed statement's headers and the first bytes of its body, then one
/// byte a second.
async fn slow_statement(
    addr: std::net::SocketAddr,
    path: String,
    device: &cmr_core::identity::DeviceKeys,
    nonce: String,
) -> tokio::task::JoinHandle<()> {
    let body = vec![b' '; 1000];
    let authority = addr.to_string();
    let req = httpsig::Request::new("POST", "http", &authority, &path, vec![]);
    let h = httpsig::sign_request(
        &req,
        &body,
        &device.signing,
        &device.id().to_hex(),
        &nonce,
        now() as i64,
    )
    .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         content-digest: {}\r\nsignature-input: {}\r\nsignature: {}\r\n\r\n",
        body.len(),
        h.content_digest,
        h.signature_input,
        h.signature
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..10]).await.unwrap();
    tokio::spawn(async move {
        for b in &body[10..] {
            tokio::time::sleep(Wait::from_secs(1)).await;
            if s.write_all(std::slice::from_ref(b)).await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_flood_cannot_stop_a_revocation() {
    let dir = tempfile::tempdir().unwrap();
    const LIMIT: usize = 24;
    let server = common::serve_configured(dir.path(), "flood.test/log", 9, Arc::new(now), |c| {
        c.max_in_flight = LIMIT;
        c.max_reserved = 4;
    })
    .await;
    let mut bank = Company::new(server.register(Role::Company).await);
    let mut alex = Customer::new(
        server.register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let tx = alex.transactions_with(&bank.id());
    alex.declare(&[tx], now()).await.unwrap();
    let approval = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 1,
        families: vec![tx],
        append_family: None,
    };
    let proof = CompanyProof {
        domain: "flood.invalid".into(),
        name: "bank".into(),
        identity: bank.id(),
    };
    let grant = alex
        .grant(&proof, "flood", Duration::Persistent, &approval, now())
        .await
        .unwrap();
    bank.sync(alex.id()).await.unwrap();

    // The bank floods the customer's statements route: more slow bodies than the server-wide limit.
    let path = format!("/v1/vaults/{}/statements", alex.id().to_hex());
    let mut flood = Vec::new();
    for i in 0..LIMIT + 8 {
        flood.push(
            slow_statement(
                server.addr,
                path.clone(),
                &bank.session.keys.device,
                format!("flood-{i}"),
            )
            .await,
        );
    }
    tokio::time::sleep(Wait::from_millis(300)).await;
    // Every other route is at capacity now...
    let shed = bank.sync(alex.id()).await.err().unwrap();
    assert_eq!(shed.code(), Some("unavailable"), "{shed}");
    // ...but the customer's revocation takes the reserved share, at once.
    let started = Instant::now();
    let (revoked, _) = alex.revoke_grant(grant, "flooded", now()).await.unwrap();
    let took = started.elapsed();
    assert!(revoked.index > 0);
    assert!(took < Wait::from_secs(1), "the revocation took {took:?}");

    // The slow bodies miss their deadline, the flood's slots come back, and the server takes work again
    // by itself; the revocation stands.
    tokio::time::sleep(Wait::from_secs(6)).await;
    alex.finish_rotations(now()).await.unwrap();
    let refused = bank
        .read(
            grant,
            alex.family_id(&tx),
            cmr_core::family::Period::from_unix(now() as i64).unwrap(),
            cmr_core::family::Period::from_unix(now() as i64).unwrap(),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Some("grant-revoked"), "{refused}");
    for f in flood {
        f.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_verify_is_refused_before_its_body() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "flood.test/log", 10).await;
    let alex = server.register(Role::Customer).await;
    let path = format!("/v1/vaults/{}/statements", alex.keys.identity.to_hex());
    // A device no one certified, and a registered one whose `created` is ten minutes old: the headers say
    // enough, and the answer comes though the body never does.
    let stranger = cmr_core::identity::DeviceKeys::generate(&mut rand::rng());
    for (device, created, code) in [
        (&stranger, now(), "unknown-key"),
        (&alex.keys.device, now() - 600, "clock-skew"),
    ] {
        let authority = server.addr.to_string();
        let req = httpsig::Request::new("POST", "http", &authority, &path, vec![]);
        let h = httpsig::sign_request(
            &req,
            b"{}",
            &device.signing,
            &device.id().to_hex(),
            "early",
            created as i64,
        )
        .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: 100000\r\n\
             content-digest: {}\r\nsignature-input: {}\r\nsignature: {}\r\n\r\n",
            h.content_digest, h.signature_input, h.signature
        );
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Wait::from_secs(2), s.read(&mut answer))
            .await
            .expect("answered before the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains(code), "{answer}");
    }
}
