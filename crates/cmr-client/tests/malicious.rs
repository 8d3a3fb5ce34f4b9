//! The SDK against a malicious server: a proxy in front of the real server rewrites its answers, one
//! attack at a time, and the SDK must refuse each with a clear verification error.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, Response};
use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::error::VerifyError;
use cmr_client::session::Session;
use cmr_client::wellknown::CompanyProof;
use cmr_client::{ClientError, Connection};
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration, StatementId};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::Role;
use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, NoteVerifier, TYPE_ED25519};
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// Rewrites an answer: (path, body as JSON, or as a JSON string for text answers).
type Tamper = Box<dyn Fn(&str, &mut Value) + Send + Sync>;

struct Proxy {
    inner: axum::Router,
    tamper: Mutex<Option<Tamper>>,
}

async fn forward(
    axum::extract::State(p): axum::extract::State<Arc<Proxy>>,
    req: Request<Body>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let resp = p.inner.clone().oneshot(req).await.unwrap();
    let (mut parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let guard = p.tamper.lock().unwrap();
    let Some(t) = guard.as_ref() else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let json = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("json"));
    let mut v = if json {
        serde_json::from_slice(&bytes).unwrap()
    } else {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    };
    t(&path, &mut v);
    let out = match v {
        Value::String(s) if !json => s.into_bytes(),
        other => serde_json::to_vec(&other).unwrap(),
    };
    parts.headers.remove("content-length");
    Response::from_parts(parts, Body::from(out))
}

struct World {
    _dir: tempfile::TempDir,
    proxy: Arc<Proxy>,
    log_key: NoteSigner,
    alex: Customer,
    bank: Company,
    eve: Company,
    grant: StatementId,
    tx: cmr_core::family::FamilyId,
    month: Period,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl World {
    fn tamper(&self, t: impl Fn(&str, &mut Value) + Send + Sync + 'static) {
        *self.proxy.tamper.lock().unwrap() = Some(Box::new(t));
    }

    fn honest(&self) {
        *self.proxy.tamper.lock().unwrap() = None;
    }
}

/// A customer with transactions, a bank holding a grant on them, and Eve, another company.
async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let key = || {
        NoteSigner::new(
            "malicious.test/log",
            TYPE_ED25519,
            SigningKey::from_seed(&[3; 32]),
        )
        .unwrap()
    };
    let log_key = key();
    let mut cfg = StoreConfig::new(dir.path(), key());
    cfg.cache_capacity = 16 * 1024 * 1024;
    let store = Arc::new(Store::open(cfg).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Config::default()
    };
    let inner = cmr_server::app(Arc::new(AppState::new(store, config)));
    let proxy = Arc::new(Proxy {
        inner,
        tamper: Mutex::new(None),
    });
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let conn = Connection::new(&format!("http://{addr}")).unwrap();
    let pinned = log_key.verifier();
    let t = now();
    let (cs, _) = Session::register(conn.clone(), Role::Customer, pinned.clone(), t)
        .await
        .unwrap();
    let mut alex = Customer::new(cs, PseudonymKey::generate(&mut rand::rng()));
    let (bs, _) = Session::register(conn.clone(), Role::Company, pinned.clone(), t)
        .await
        .unwrap();
    let mut bank = Company::new(bs);
    let (es, _) = Session::register(conn, Role::Company, pinned, t)
        .await
        .unwrap();
    let eve = Company::new(es);
    let name = alex.transactions_with(&bank.id());
    let tx = alex.family_id(&name);
    alex.declare(&[name], t).await.unwrap();
    let month = Period::from_unix(t as i64).unwrap();
    alex.write(tx, month, &[b"one", b"two", b"three"])
        .await
        .unwrap();
    let req = bank
        .request(
            alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: "statements".into(),
                duration: Duration::Persistent,
                lookback_months: 12,
                counterparty: Counterparty::OnlyRequester,
            },
            t,
        )
        .await
        .unwrap();
    let pending = alex.pending().await.unwrap();
    let p = pending.iter().find(|p| p.statement.id() == req).unwrap();
    let proof = CompanyProof {
        domain: "bank.test".into(),
        name: "Bank".into(),
        identity: bank.id(),
    };
    let approval = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 12,
        families: vec![name],
        append_family: None,
    };
    let grant = alex.approve(p, &proof, &approval, t).await.unwrap();
    bank.sync(alex.id()).await.unwrap();
    World {
        _dir: dir,
        proxy,
        log_key,
        alex,
        bank,
        eve,
        grant,
        tx,
        month,
    }
}

fn verification(r: Result<impl std::fmt::Debug, ClientError>) -> VerifyError {
    match r {
        Err(ClientError::Verification(v)) => v,
        other => panic!("expected a verification error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_server_passes_every_check() {
    let mut w = world().await;
    let (_, records) = w.bank.read(w.grant, w.tx, w.month, w.month).await.unwrap();
    let mut contents: Vec<_> = records.iter().map(|r| r.content.clone()).collect();
    contents.sort();
    assert_eq!(
        contents,
        vec![b"one".to_vec(), b"three".to_vec(), b"two".to_vec()]
    );
    w.alex.history().await.unwrap();
    w.alex.check_directory().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_substituted_company_key_is_refused() {
    let mut w = world().await;
    // The server answers the bank's key events with Eve's: the inception does not hash to the bank.
    let (bank, eve) = (w.bank.id().to_hex(), w.eve.id().to_hex());
    let eve_events = {
        let v = w
            .eve
            .session
            .post(&format!("/v1/identities/{eve}/events"), &json!({}))
            .await
            .unwrap();
        v["events"].clone()
    };
    w.tamper(move |path, v| {
        if path == format!("/v1/identities/{bank}/events") {
            v["events"] = eve_events.clone();
        }
    });
    w.alex.session.forget_identity(&w.bank.id());
    let e = verification(w.alex.session.identity(w.bank.id()).await.map(|_| ()));
    assert!(matches!(e, VerifyError::KeyEvents { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_spliced_into_genuine_key_events_is_refused() {
    let mut w = world().await;
    // The server keeps the bank's genuine events and appends a device certificate that really is in the
    // log (Eve's, included in the same checkpoint): the customer would seal grants to Eve's device.
    let (bank, eve) = (w.bank.id().to_hex(), w.eve.id().to_hex());
    let eve_cert = {
        let v = w
            .eve
            .session
            .post(&format!("/v1/identities/{eve}/events"), &json!({}))
            .await
            .unwrap();
        v["events"][1].clone()
    };
    w.tamper(move |path, v| {
        if path == format!("/v1/identities/{bank}/events") {
            let mut events = v["events"].as_array().cloned().unwrap_or_default();
            events.push(eve_cert.clone());
            v["events"] = serde_json::Value::Array(events);
        }
    });
    w.alex.session.forget_identity(&w.bank.id());
    let e = verification(w.alex.session.identity(w.bank.id()).await.map(|_| ()));
    assert!(matches!(e, VerifyError::KeyEvents { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_history_with_a_revocation_left_out_is_refused() {
    use base64::Engine as _;
    let mut w = world().await;
    let bank = w.bank.id();
    // The bank certifies a second device, then revokes it (it was lost).
    let key = SigningKey::from_seed(&w.bank.session.keys.identity().unwrap().1.seed());
    let lost = cmr_core::identity::DeviceKeys::generate(&mut rand::rng());
    let cert = lost.certify(bank, 0, &key, now()).encode();
    w.bank.session.certify(&cert).await.unwrap();
    let rev = cmr_core::identity::revoke_device(bank, 0, &key, lost.id(), now()).encode();
    w.bank
        .session
        .conn
        .post(
            &format!("/v1/identities/{}/devices/revoke", bank.to_hex()),
            &json!({"revocation": base64::engine::general_purpose::STANDARD.encode(&rev)}),
            cmr_client::transport::Signer::Identity(bank, &key),
        )
        .await
        .unwrap();
    // Honestly served, the customer never seals to the lost device.
    w.alex.session.forget_identity(&bank);
    let honest = w.alex.session.identity(bank).await.unwrap();
    assert!(honest.current_devices().all(|c| c.device() != lost.id()));
    assert!(honest.has_device(&lost.id()));
    // The server leaves the revocation out: each event left is genuine and included, and the lost device
    // would be the bank's newest. The signed head counts it, so the history is refused.
    let path = format!("/v1/identities/{}/events", bank.to_hex());
    let p = path.clone();
    w.tamper(move |target, v| {
        if target == p {
            v["events"].as_array_mut().unwrap().pop();
        }
    });
    w.alex.session.forget_identity(&bank);
    let e = verification(w.alex.session.identity(bank).await.map(|_| ()));
    assert!(
        matches!(&e, VerifyError::KeyEvents { reason, .. } if reason.contains("head")),
        "{e}"
    );
    // Without its head, or with another identity's genuine head, the events are refused as well.
    let eve_head = w
        .eve
        .session
        .post(
            &format!("/v1/identities/{}/events", w.eve.id().to_hex()),
            &json!({}),
        )
        .await
        .unwrap()["head"]
        .clone();
    for head in [Value::Null, eve_head] {
        let p = path.clone();
        w.tamper(move |target, v| {
            if target == p {
                v["head"] = head.clone();
            }
        });
        w.alex.session.forget_identity(&bank);
        let e = verification(w.alex.session.identity(bank).await.map(|_| ()));
        assert!(matches!(e, VerifyError::KeyEvents { .. }), "{e}");
    }
    // The head this session trusted is evidence an auditor can check.
    assert!(
        w.alex
            .session
            .key_heads()
            .any(|h| h.contains(&format!("identity {}", bank.to_hex())))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_substituted_company_identity_is_refused() {
    let mut w = world().await;
    let req = w
        .eve
        .request(
            w.alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: "totally the bank".into(),
                duration: Duration::Persistent,
                lookback_months: 12,
                counterparty: Counterparty::OnlyRequester,
            },
            now(),
        )
        .await
        .unwrap();
    let pending = w.alex.pending().await.unwrap();
    let p = pending.iter().find(|p| p.statement.id() == req).unwrap();
    // The bank's domain vouches for the bank, not for Eve, who asks.
    let proof = CompanyProof {
        domain: "bank.test".into(),
        name: "Bank".into(),
        identity: w.bank.id(),
    };
    let approval = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 12,
        families: vec![w.alex.transactions_with(&w.bank.id())],
        append_family: None,
    };
    let e = verification(w.alex.approve(p, &proof, &approval, now()).await);
    assert!(matches!(e, VerifyError::CompanyIdentity(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_injected_or_foreign_records_are_refused() {
    let mut w = world().await;
    let read = format!("/families/{}/read", w.tx.to_hex());
    // Drop one record (and its id from the page, so the page still lines up with the records).
    let r = read.clone();
    w.tamper(move |path, v| {
        if path.ends_with(&r) {
            v["records"].as_array_mut().unwrap().remove(1);
        }
    });
    let e = verification(w.bank.read(w.grant, w.tx, w.month, w.month).await);
    assert!(matches!(e, VerifyError::Read(_)), "{e}");
    // Inject a copy of a record.
    let r = read.clone();
    w.tamper(move |path, v| {
        if path.ends_with(&r) {
            let first = v["records"][0].clone();
            v["records"].as_array_mut().unwrap().push(first);
        }
    });
    let e = verification(w.bank.read(w.grant, w.tx, w.month, w.month).await);
    assert!(matches!(e, VerifyError::Read(_)), "{e}");
    // Swap in another customer's record: Bo's, from Bo's own read.
    w.honest();
    let (bs, _) = Session::register(
        w.alex.session.conn.clone(),
        Role::Customer,
        w.log_key.verifier(),
        now(),
    )
    .await
    .unwrap();
    let mut bo = Customer::new(bs, PseudonymKey::generate(&mut rand::rng()));
    let bo_tx = bo.transactions_with(&w.bank.id());
    bo.declare(&[bo_tx], now()).await.unwrap();
    let bo_family = bo.family_id(&bo_tx);
    bo.write(bo_family, w.month, &[b"not alex's"])
        .await
        .unwrap();
    let v = bo
        .session
        .post(
            &format!(
                "/v1/vaults/{}/families/{}/read",
                bo.id().to_hex(),
                bo_family.to_hex()
            ),
            &json!({"from": w.month.to_string(), "to": w.month.to_string()}),
        )
        .await
        .unwrap();
    let foreign = v["records"][0].clone();
    w.tamper(move |path, v| {
        if path.ends_with(&read) {
            v["records"][0] = foreign.clone();
        }
    });
    let e = verification(w.bank.read(w.grant, w.tx, w.month, w.month).await);
    assert!(matches!(e, VerifyError::Read(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_directory_is_refused() {
    let mut w = world().await;
    // Alex publishes directory v2; the server then serves the chain as it was before it.
    let contact = FamilyName::profile(Scope::ProfileContact).unwrap();
    w.alex.declare(&[contact], now()).await.unwrap();
    let history = format!("/v1/vaults/{}/history", w.alex.id().to_hex());
    let v2_index = *w.alex.session.acked.last().unwrap();
    w.tamper(move |path, v| {
        if path == history {
            // Keep only the entries before v2, as if the server had been rolled back.
            let entries = v["entries"].as_array_mut().unwrap();
            entries.retain(|e| e["index"].as_u64().unwrap() < v2_index);
        }
    });
    let e = verification(w.alex.check_directory().await);
    assert!(matches!(e, VerifyError::Directory(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_forked_or_foreign_checkpoints_are_refused() {
    let mut w = world().await;
    // An old checkpoint, after a newer one was seen.
    let old = w
        .alex
        .session
        .conn
        .get_text("/v1/log/checkpoint")
        .await
        .unwrap();
    w.alex.write(w.tx, w.month, &[b"four"]).await.unwrap();
    w.alex.session.refresh().await.unwrap();
    w.tamper(move |path, v| {
        if path == "/v1/log/checkpoint" {
            *v = Value::String(old.clone());
        }
    });
    let e = verification(w.alex.session.refresh().await);
    assert!(matches!(e, VerifyError::StaleCheckpoint { .. }), "{e}");
    // A fork: the same size as the latest seen, signed by the log key, with another root.
    let latest = w.alex.session.log.latest().unwrap().clone();
    let mut forked = latest.clone();
    forked.root = [0x42; 32];
    let note = forked.sign(&w.log_key);
    w.tamper(move |path, v| {
        if path == "/v1/log/checkpoint" {
            *v = Value::String(note.clone());
        }
    });
    let e = verification(w.alex.session.refresh().await);
    assert!(matches!(e, VerifyError::Inconsistent { .. }), "{e}");
    // A larger checkpoint whose consistency proof does not hold.
    let mut grown = latest.clone();
    grown.size += 5;
    grown.root = [0x43; 32];
    let note = grown.sign(&w.log_key);
    w.tamper(move |path, v| {
        if path == "/v1/log/checkpoint" {
            *v = Value::String(note.clone());
        }
    });
    let e = verification(w.alex.session.refresh().await);
    assert!(matches!(e, VerifyError::Inconsistent { .. }), "{e}");
    // A checkpoint signed by another key under the log's name.
    let other = NoteSigner::new(
        "malicious.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[4; 32]),
    )
    .unwrap();
    let note = latest.sign(&other);
    w.tamper(move |path, v| {
        if path == "/v1/log/checkpoint" {
            *v = Value::String(note.clone());
        }
    });
    let e = verification(w.alex.session.refresh().await);
    assert!(matches!(e, VerifyError::Checkpoint(_)), "{e}");
    let _ = NoteVerifier::from_vkey(&w.log_key.verifier().to_vkey()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_own_entry_is_refused() {
    let mut w = world().await;
    let history = format!("/v1/vaults/{}/history", w.alex.id().to_hex());
    // Hide one entry in the middle of the chain.
    w.tamper(move |path, v| {
        if path == history {
            v["entries"].as_array_mut().unwrap().remove(2);
        }
    });
    let e = verification(w.alex.history().await);
    assert!(matches!(e, VerifyError::Chain(_)), "{e}");
    // Hide the newest entries altogether: an acknowledged entry is missing.
    let history = format!("/v1/vaults/{}/history", w.alex.id().to_hex());
    w.tamper(move |path, v| {
        if path == history {
            v["entries"].as_array_mut().unwrap().remove(0);
        }
    });
    let e = verification(w.alex.history().await);
    assert!(matches!(e, VerifyError::Chain(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_hidden_after_the_last_fold_are_refused() {
    let mut w = world().await;
    // The consent state is folded once; later folds read only what came after, linked down to it.
    w.alex.consent().await.unwrap();
    let bank = w.bank.id();
    w.alex.block(bank, true, now()).await.unwrap();
    w.alex.block(bank, false, now()).await.unwrap();
    let history = format!("/v1/vaults/{}/history", w.alex.id().to_hex());
    // The block is hidden: the unblock no longer links to what was folded.
    let h = history.clone();
    w.tamper(move |path, v| {
        if path == h {
            v["entries"].as_array_mut().unwrap().remove(1);
        }
    });
    let e = verification(w.alex.consent().await);
    assert!(matches!(e, VerifyError::Chain(_)), "{e}");
    // Both hidden: the acknowledged entries are missing.
    w.tamper(move |path, v| {
        if path == history {
            let entries = v["entries"].as_array_mut().unwrap();
            entries.remove(0);
            entries.remove(0);
        }
    });
    let e = verification(w.alex.consent().await);
    assert!(matches!(e, VerifyError::Chain(_)), "{e}");
    // Served honestly, the fold goes on from where it was.
    w.honest();
    assert!(!w.alex.consent().await.unwrap().is_blocked(&bank));
}

/// A fold asks the server to stop at the entry it folded last (`down_to`). A page that stops above it
/// (says there is nothing older) leaves the newer entries unlinked to what was verified: refused. A
/// page that serves an older entry of the chain in its place: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_whose_walk_does_not_reach_the_last_fold_is_refused() {
    let mut w = world().await;
    w.alex.consent().await.unwrap();
    let bank = w.bank.id();
    w.alex.block(bank, true, now()).await.unwrap();
    w.alex.block(bank, false, now()).await.unwrap();
    // The whole chain as it is now, newest first: the unblock, the block, the entry folded last, older
    // ones.
    let history = format!("/v1/vaults/{}/history", w.alex.id().to_hex());
    let whole = w
        .alex
        .session
        .post(&history, &json!({"limit": 1000}))
        .await
        .unwrap();
    let h = history.clone();
    w.tamper(move |path, v| {
        if path == h {
            let entries = v["entries"].as_array_mut().unwrap();
            entries.truncate(1);
            v["next"] = Value::Null;
        }
    });
    let e = verification(w.alex.consent().await);
    assert!(
        matches!(&e, VerifyError::Chain(m) if m.contains("no longer reaches")),
        "{e}"
    );
    // The folded entry swapped for the one before it on the chain (served as the whole walk served it,
    // in the same checkpoint).
    let older = whole["entries"][3].clone();
    w.tamper(move |path, v| {
        if path == history {
            let entries = v["entries"].as_array_mut().unwrap();
            entries.truncate(2);
            entries.push(older.clone());
        }
    });
    let e = verification(w.alex.consent().await);
    assert!(
        matches!(&e, VerifyError::Chain(m) if m.contains("no longer holds")),
        "{e}"
    );
    w.honest();
    assert!(!w.alex.consent().await.unwrap().is_blocked(&bank));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_that_logged_something_else_is_refused() {
    let mut w = world().await;
    let batches = format!("/families/{}/batches", w.tx.to_hex());
    // The server claims another entry (the one before) is this write's.
    w.tamper(move |path, v| {
        if path.ends_with(&batches) {
            let i = v["index"].as_u64().unwrap();
            v["index"] = Value::from(i - 1);
        }
    });
    let e = verification(w.alex.write(w.tx, w.month, &[b"five"]).await);
    assert!(
        matches!(
            e,
            VerifyError::NotIncluded(_) | VerifyError::NotWhatWasSent(_)
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_partys_statement_in_a_relationship_is_refused() {
    let mut w = world().await;
    // Eve logs a request on Alex's vault; the server hands its (validly logged) entry to the bank as if it
    // concerned the bank.
    w.eve
        .request(
            w.alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: "eve".into(),
                duration: Duration::Persistent,
                lookback_months: 1,
                counterparty: Counterparty::OnlyRequester,
            },
            now(),
        )
        .await
        .unwrap();
    let eve_rel = w
        .eve
        .session
        .post(
            &format!("/v1/vaults/{}/relationship", w.alex.id().to_hex()),
            &json!({}),
        )
        .await
        .unwrap();
    let injected = eve_rel["entries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let path = format!("/v1/vaults/{}/relationship", w.alex.id().to_hex());
    w.tamper(move |p, v| {
        if p == path {
            v["entries"].as_array_mut().unwrap().push(injected.clone());
        }
    });
    let e = verification(w.bank.sync(w.alex.id()).await);
    assert!(
        matches!(e, VerifyError::Signature(_) | VerifyError::NotIncluded(_)),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_at_a_made_up_position_is_refused() {
    let mut w = world().await;
    w.eve
        .request(
            w.alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: "eve".into(),
                duration: Duration::Persistent,
                lookback_months: 1,
                counterparty: Counterparty::OnlyRequester,
            },
            now(),
        )
        .await
        .unwrap();
    let path = format!("/v1/vaults/{}/requests", w.alex.id().to_hex());
    w.tamper(move |p, v| {
        if p == path {
            let e = &mut v["pending"][0]["entry"];
            let i = e["index"].as_u64().unwrap();
            e["index"] = Value::from(i - 1);
        }
    });
    let e = verification(w.alex.pending().await);
    assert!(matches!(e, VerifyError::NotIncluded(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_carries_the_consistency_proof_and_a_bad_one_is_not_trusted() {
    let mut w = world().await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    w.tamper(move |path, _| s.lock().unwrap().push(path.to_string()));
    // The client tells the server the size it knows; the ack proves consistency from it: no extra fetch.
    w.alex.write(w.tx, w.month, &[b"four"]).await.unwrap();
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/v1/log/proofs/consistency")),
        "{:?}",
        seen.lock().unwrap()
    );
    // A wrong proof in the ack is not believed: the client fetches one and checks it.
    let batches = format!("/families/{}/batches", w.tx.to_hex());
    let s = seen.clone();
    w.tamper(move |path, v| {
        s.lock().unwrap().push(path.to_string());
        if path.ends_with(&batches) && v["consistency"].is_object() {
            use base64::Engine as _;
            let bogus = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
            v["consistency"]["proof"] = json!([bogus]);
        }
    });
    seen.lock().unwrap().clear();
    w.alex.write(w.tx, w.month, &[b"five"]).await.unwrap();
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/v1/log/proofs/consistency"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_read_replayed_is_refused() {
    let mut w = world().await;
    let read = format!("/families/{}/read", w.tx.to_hex());
    // The bank reads; the server keeps that answer.
    let kept = Arc::new(Mutex::new(None::<Value>));
    let (r, k) = (read.clone(), kept.clone());
    w.tamper(move |path, v| {
        if path.ends_with(&r) {
            *k.lock().unwrap() = Some(v.clone());
        }
    });
    let (first, records) = w.bank.read(w.grant, w.tx, w.month, w.month).await.unwrap();
    assert_eq!(records.len(), 3);
    // Alex writes more. The server answers the bank's next read with the earlier answer: a validly
    // logged access under the same grant for the same periods, and a head that was once current, but
    // not logged for this request, and without Alex's new records.
    w.honest();
    w.alex.write(w.tx, w.month, &[b"four"]).await.unwrap();
    let old = kept.lock().unwrap().clone().unwrap();
    w.tamper(move |path, v| {
        if path.ends_with(&read) {
            *v = old.clone();
        }
    });
    let e = verification(w.bank.read(w.grant, w.tx, w.month, w.month).await);
    assert!(matches!(e, VerifyError::NotWhatWasSent(_)), "{e}");
    // Honest again: the new read is logged for this request and shows the new head.
    w.honest();
    let (now_head, records) = w.bank.read(w.grant, w.tx, w.month, w.month).await.unwrap();
    assert_eq!(records.len(), 4);
    assert_eq!(now_head.batches, first.batches + 1);
}
