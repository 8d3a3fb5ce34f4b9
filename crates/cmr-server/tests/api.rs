//! The API through the router, without a socket: the flow, and the attacks answered with the right
//! problem code and the state unchanged.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::{Batch, Head, SignedBatch};
use cmr_core::consent::{
    Access, AccessRequest, Body as StBody, Counterparty, Duration, Grant, GrantFamily, Initiator,
    Revocation, SignedStatement, Statement, StatementId,
};
use cmr_core::decision::AccessKind;
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig;
use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity};
use cmr_core::keys::{KemSecretKey, SigningKey};
use cmr_core::record::{RecordId, RecordSealer};
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use cmr_server::{AppState, Config, app};
use cmr_store::{Store, StoreConfig};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const T0: u64 = 1_794_700_800;

struct Env {
    _dir: tempfile::TempDir,
    app: axum::Router,
    clock: Arc<AtomicU64>,
    store: Arc<Store>,
    nonce: u64,
}

fn log_key() -> NoteSigner {
    NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap()
}

fn witness_key() -> NoteSigner {
    NoteSigner::new(
        "witness.test/w1",
        cmr_log::note::TYPE_COSIGNATURE,
        SigningKey::from_seed(&[9; 32]),
    )
    .unwrap()
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let mut cfg = StoreConfig::new(dir.path(), log_key());
    cfg.cache_capacity = 16 * 1024 * 1024;
    let c = clock.clone();
    cfg.clock = Arc::new(move || c.load(Ordering::SeqCst));
    let store = Arc::new(Store::open(cfg).unwrap());
    // Requests are accepted from the start time plus 5 s on.
    clock.store(T0 + 100, Ordering::SeqCst);
    let c = clock.clone();
    let config = Config {
        authority: "vault.test".into(),
        scheme: "http".into(),
        max_body: 1024 * 1024,
        max_small_body: 64 * 1024,
        rate_per_identity: 5.0,
        burst_per_identity: 40.0,
        witnesses: vec![witness_key().verifier()],
        ..Config::default()
    };
    let state = Arc::new(AppState::with_clock(
        store.clone(),
        config,
        Arc::new(move || c.load(Ordering::SeqCst)),
    ));
    Env {
        _dir: dir,
        app: app(state),
        clock,
        store,
        nonce: 0,
    }
}

enum Signer<'a> {
    Identity(&'a IdentityId, &'a SigningKey),
    Device(&'a DeviceKeys),
    None,
}

impl Env {
    fn now(&self) -> i64 {
        self.clock.load(Ordering::SeqCst) as i64
    }

    /// Builds a request signed with the CMR profile (or not), with `created` offset from the clock. A
    /// company's read or append (a body naming a grant, on a bare route) goes, as the SDK sends it, to the
    /// target that names its grant, epoch and periods.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &Value,
        signer: Signer<'_>,
        created_offset: i64,
    ) -> Request<Body> {
        let bound = bound_target(path, body);
        let path = bound.as_deref().unwrap_or(path);
        let bytes = serde_json::to_vec(body).unwrap();
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vault.test")
            .header("content-type", "application/json");
        let (keyid, key) = match signer {
            Signer::Identity(id, k) => (format!("id:{}", id.to_hex()), Some(k)),
            Signer::Device(d) => (d.id().to_hex(), Some(&d.signing)),
            Signer::None => (String::new(), None),
        };
        if let Some(key) = key {
            self.nonce += 1;
            let req = httpsig::Request::new(method, "http", "vault.test", path, vec![]);
            let h = httpsig::sign_request(
                &req,
                &bytes,
                key,
                &keyid,
                &format!("n{}", self.nonce),
                self.now() + created_offset,
            )
            .unwrap();
            b = b
                .header("content-digest", h.content_digest)
                .header("signature-input", h.signature_input)
                .header("signature", h.signature);
        }
        b.body(Body::from(bytes)).unwrap()
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Value,
        signer: Signer<'_>,
    ) -> (StatusCode, Value) {
        let req = self.request(method, path, &body, signer, 0);
        self.send(req).await
    }
}

/// The bound target of a company's read or append on a bare `…/families/{f}/read` or `…/batches` path
/// (`cmr_log::entry::access_target`, from the body's grant, periods and records), or `None`.
fn bound_target(path: &str, body: &Value) -> Option<String> {
    let grant = body["grant"].as_str().and_then(Digest::from_hex)?;
    let mut parts = path.strip_prefix("/v1/vaults/")?.split('/');
    let (customer, _, family, route) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if path.contains('?') || parts.next().is_some() {
        return None;
    }
    let (customer, family) = (
        IdentityId::from_hex(customer)?,
        FamilyId(Digest::from_hex(family)?.0),
    );
    let period = |k: &str| body[k].as_str().and_then(Period::parse);
    let (kind, epoch, from, to) = match route {
        "read" => (AccessKind::Read, None, period("from")?, period("to")?),
        "batches" => {
            let records: Vec<cmr_core::record::SealedRecord> = body["records"]
                .as_array()?
                .iter()
                .filter_map(|r| B64.decode(r.as_str()?).ok())
                .filter_map(|r| cmr_core::record::SealedRecord::decode(r).ok())
                .collect();
            let periods = records.iter().map(|r| r.header().period);
            (
                AccessKind::Append,
                Some(records.first()?.header().epoch),
                periods.clone().min()?,
                periods.max()?,
            )
        }
        _ => return None,
    };
    Some(cmr_log::entry::access_target(
        &customer,
        &family,
        kind,
        &StatementId(grant.0),
        epoch,
        from,
        to,
    ))
}

struct Party {
    identity_key: SigningKey,
    id: IdentityId,
    device: DeviceKeys,
}

async fn register(env: &mut Env, role: Role) -> Party {
    let mut r = rand::rng();
    let new = create_identity(&mut r, role);
    let id = new.inception.identity();
    let (s, v) = env
        .call(
            "POST",
            "/v1/identities",
            json!({"event": B64.encode(new.inception.encode())}),
            Signer::Identity(&id, &new.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let device = DeviceKeys::generate(&mut r);
    let cert = device.certify(id, 0, &new.identity_key, T0);
    let path = format!("/v1/identities/{}/devices", id.to_hex());
    let (s, v) = env
        .call(
            "POST",
            &path,
            json!({"certificate": B64.encode(cert.encode())}),
            Signer::Identity(&id, &new.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    Party {
        identity_key: new.identity_key,
        id,
        device,
    }
}

fn statement(
    p: &Party,
    customer: IdentityId,
    body: StBody,
    bundle: Option<cmr_core::wrap::SealedBytes>,
) -> SignedStatement {
    let st = Statement {
        customer,
        author: p.id,
        device: p.device.id(),
        issued_at: T0,
        body,
    };
    SignedStatement::sign(st, bundle, &p.device.signing).unwrap()
}

struct Flow {
    env: Env,
    customer: Party,
    acme: Party,
    tx: FamilyId,
    grant: StatementId,
    kem: KemSecretKey,
}

/// The customer writes one record on the transaction family, extending the head a read of it shows.
/// Returns the answer: 200, or the refusal (a `rotation-pending` one tells that a rotation is owed).
async fn customer_writes_one(f: &mut Flow, id: u8) -> (StatusCode, Value) {
    let base = format!(
        "/v1/vaults/{}/families/{}",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/read"),
            json!({"from": "2026-01", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let head = Digest::from_hex(v["proof_of_read"]["head"]["digest"].as_str().unwrap()).unwrap();
    let rec = RecordSealer::new(
        f.customer.id,
        f.tx,
        1,
        f.customer.id,
        &EpochSecret::generate(&mut rand::rng()).read_key(Period::ORIGIN),
        Period::from_year_month(2026, 3).unwrap(),
    )
    .unwrap()
    .seal(&mut rand::rng(), RecordId([id; 16]), b"tx")
    .unwrap();
    let batch = SignedBatch::sign(
        Batch::for_records(f.customer.device.id(), head, std::slice::from_ref(&rec)).unwrap(),
        &f.customer.device.signing,
    );
    f.env
        .call(
            "POST",
            &format!("{base}/batches"),
            json!({"batch": B64.encode(batch.encode()), "records": [B64.encode(rec.as_bytes())]}),
            Signer::Device(&f.customer.device),
        )
        .await
}

fn rotation_pending(answer: &(StatusCode, Value)) -> bool {
    answer.0 == StatusCode::CONFLICT
        && answer.1["type"].as_str() == Some("urn:cmr-vault:problem:rotation-pending")
}

async fn flow() -> Flow {
    let mut env = env();
    let customer = register(&mut env, Role::Customer).await;
    let acme = register(&mut env, Role::Company).await;
    let tx =
        FamilyName::Transactions(PseudonymKey::generate(&mut rand::rng()).counterparty(&acme.id))
            .id(&customer.id);
    let contact = FamilyName::profile(Scope::ProfileContact)
        .unwrap()
        .id(&customer.id);
    let dir = Directory {
        customer: customer.id,
        version: 1,
        prev: Digest([0; 32]),
        signer: customer.device.id(),
        issued_at: T0,
        devices: vec![DirectoryDevice {
            device: customer.device.id(),
            signing_key: customer.device.signing.verifying_key(),
            kem_key: customer.device.kem.public_key(),
        }],
        families: {
            let mut f = vec![
                DirectoryFamily {
                    family: tx,
                    scope: Scope::Transactions,
                    epoch: 1,
                    appenders: vec![],
                },
                DirectoryFamily {
                    family: contact,
                    scope: Scope::ProfileContact,
                    epoch: 1,
                    appenders: vec![],
                },
            ];
            f.sort_by_key(|x| x.family);
            f
        },
    }
    .sign(&customer.device.signing);
    let base = format!("/v1/vaults/{}", customer.id.to_hex());
    let (s, v) = env
        .call(
            "POST",
            &format!("{base}/directory"),
            json!({"directory": B64.encode(dir.encode())}),
            Signer::Device(&customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The company asks; the customer grants, narrowed (read only, from 2025-06).
    let req = statement(
        &acme,
        customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::Transactions, Access::ReadAppend)],
            purpose: "statements".into(),
            duration: Duration::Persistent,
            lookback_months: 36,
            counterparty: Counterparty::OnlyRequester,
        }),
        None,
    );
    let (s, v) = env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(req.encode())}),
            Signer::Device(&acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let kem = KemSecretKey::generate(&mut rand::rng());
    let secret = EpochSecret::generate(&mut rand::rng());
    let g = Grant {
        grantee: acme.id,
        request: Some(req.id()),
        purpose: "statements".into(),
        duration: Duration::Persistent,
        not_before: T0,
        expires: None,
        lookback_start: Period::from_year_month(2025, 6).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::Read)],
        families: vec![GrantFamily {
            family: tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: kem.public_key(),
    };
    let st = Statement {
        customer: customer.id,
        author: customer.id,
        device: customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g.clone()),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle {
        entries: vec![BundleEntry {
            family: tx,
            epoch: 1,
            key: secret.read_key(g.lookback_start),
        }],
    }
    .seal(
        &mut rand::rng(),
        customer.id,
        acme.id,
        &kem.public_key(),
        gid.0,
    );
    let grant = SignedStatement::sign(st, Some(bundle), &customer.device.signing).unwrap();
    let (s, v) = env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The customer writes transactions.
    let period = Period::from_year_month(2026, 1).unwrap();
    let sealer = RecordSealer::new(
        customer.id,
        tx,
        1,
        customer.id,
        &secret.read_key(Period::ORIGIN),
        period,
    )
    .unwrap();
    let records: Vec<_> = (0..3u8)
        .map(|i| {
            sealer
                .seal(&mut rand::rng(), RecordId([i; 16]), b"tx")
                .unwrap()
        })
        .collect();
    let batch = SignedBatch::sign(
        Batch::for_records(
            customer.device.id(),
            Head::empty(customer.id, tx).digest(),
            &records,
        )
        .unwrap(),
        &customer.device.signing,
    );
    let body = json!({"batch": B64.encode(batch.encode()), "records": records.iter().map(|r| B64.encode(r.as_bytes())).collect::<Vec<_>>()});
    let (s, v) = env
        .call(
            "POST",
            &format!("{base}/families/{}/batches", tx.to_hex()),
            body,
            Signer::Device(&customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // And the profile: a contact record, in the contact family's only period.
    let contact_secret = EpochSecret::generate(&mut rand::rng());
    let sealer = RecordSealer::new(
        customer.id,
        contact,
        1,
        customer.id,
        &contact_secret.read_key(Period::ORIGIN),
        Period::ORIGIN,
    )
    .unwrap();
    let rec = sealer
        .seal(
            &mut rand::rng(),
            RecordId([7; 16]),
            b"email: me@example.org",
        )
        .unwrap();
    let batch = SignedBatch::sign(
        Batch::for_records(
            customer.device.id(),
            Head::empty(customer.id, contact).digest(),
            std::slice::from_ref(&rec),
        )
        .unwrap(),
        &customer.device.signing,
    );
    let body =
        json!({"batch": B64.encode(batch.encode()), "records": [B64.encode(rec.as_bytes())]});
    let (s, v) = env
        .call(
            "POST",
            &format!("{base}/families/{}/batches", contact.to_hex()),
            body,
            Signer::Device(&customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    Flow {
        env,
        customer,
        acme,
        tx,
        grant: gid,
        kem,
    }
}

#[tokio::test]
async fn the_flow_through_the_api() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call(
            "POST",
            &read_path,
            read.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["records"].as_array().unwrap().len(), 3);
    assert!(v["index"].is_u64());
    // The company verifies, from the JSON alone, that the read is complete against the named head and
    // that every record is in a batch signed by the customer's device, then opens the records.
    let (proof, records, batches) = parse_read(&v);
    let customer_key = f.customer.device.signing.verifying_key();
    let verified = cmr_core::batch::verify_read(
        &proof.head.digest(),
        &proof,
        &records,
        &batches,
        |_| Some(customer_key),
        None,
    )
    .unwrap();
    assert_eq!(verified.records.len(), 3);
    // Outside the look-back, or another family: refused with the decision's code.
    let early = json!({"from": "2025-01", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &read_path, early, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:outside-look-back"
        )
    );
    // The profile's contact family was not granted.
    let contact = FamilyName::profile(Scope::ProfileContact)
        .unwrap()
        .id(&f.customer.id);
    let contact_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        contact.to_hex()
    );
    let body = json!({"from": "2000-01", "to": "2000-01", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &contact_path, body, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:family-not-granted"
        )
    );
    // The customer revokes; the next read is 403 grant-revoked.
    let rev = statement(
        &f.customer,
        f.customer.id,
        StBody::Revocation(Revocation {
            grant: f.grant,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .env
        .call("POST", &read_path, read, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:grant-revoked")
    );
    // The public log: checkpoint, and an auditor finds nothing wrong.
    let resp = f
        .env
        .app
        .clone()
        .oneshot(
            Request::get("/v1/log/checkpoint")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut auditor = cmr_log::auditor::Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &*f.env.store).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    let _ = &f.kem;
}

#[tokio::test]
async fn signature_attacks_are_refused_and_change_nothing() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let before = f.env.store.checkpoint().unwrap();
    let code = |v: &Value| {
        v["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:cmr-vault:problem:")
            .to_string()
    };

    let (s, v) = f.env.call("POST", &path, body.clone(), Signer::None).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "missing-signature")
    );

    // A body changed after signing.
    let mut req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 0);
    *req.body_mut() = Body::from(
        serde_json::to_vec(&json!({"from": "2025-01", "to": "2026-12", "grant": f.grant.to_hex()}))
            .unwrap(),
    );
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "content-digest")
    );

    // Replayed: the same signed request twice.
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 0);
    let (parts, b) = req.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    let first = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
    let again = Request::from_parts(parts, Body::from(bytes));
    assert_eq!(f.env.send(first).await.0, StatusCode::OK);
    let (s, v) = f.env.send(again).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "replayed")
    );

    // Stale and future `created`, and one before the server started.
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), -61);
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "clock-skew")
    );
    assert!(v["detail"].as_str().unwrap().contains("61 s ago"));
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 6);
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "clock-skew")
    );
    let req = f.env.request(
        "POST",
        &path,
        &body,
        Signer::Device(&f.acme.device),
        -(f.env.now() - T0 as i64) + 1,
    );
    let (s, v) = f.env.send(req).await;
    assert!(
        s == StatusCode::UNAUTHORIZED
            && (code(&v) == "created-before-start" || code(&v) == "clock-skew"),
        "{v}"
    );

    // An unknown key, and a signature by another key under a known keyid.
    let stranger = DeviceKeys::generate(&mut rand::rng());
    let (s, v) = f
        .env
        .call("POST", &path, body.clone(), Signer::Device(&stranger))
        .await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "unknown-key")
    );
    let mut req = f
        .env
        .request("POST", &path, &body, Signer::Device(&stranger), 0);
    let sig_input = req
        .headers()
        .get("signature-input")
        .unwrap()
        .to_str()
        .unwrap()
        .replace(&stranger.id().to_hex(), &f.acme.device.id().to_hex());
    req.headers_mut()
        .insert("signature-input", sig_input.parse().unwrap());
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "bad-signature")
    );

    // Only the one allowed read above was logged.
    let after = f.env.store.checkpoint().unwrap();
    assert_ne!(before, after);
    let size = |n: &Option<String>| {
        cmr_log::checkpoint::Checkpoint::parse_text(
            &cmr_log::note::Note::parse(n.as_ref().unwrap())
                .unwrap()
                .text,
        )
        .unwrap()
        .size
    };
    assert_eq!(size(&after), size(&before) + 1);
}

#[tokio::test]
async fn bad_input_and_other_vaults() {
    let mut f = flow().await;
    let code = |v: &Value| {
        v["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:cmr-vault:problem:")
            .to_string()
    };
    // The company acting on the customer's directory; the customer on another vault.
    let path = format!("/v1/vaults/{}/directory", f.customer.id.to_hex());
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"directory": ""}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let other = format!(
        "/v1/vaults/{}/families/{}/read",
        f.acme.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &other,
            json!({"from": "2025-06", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert!(s == StatusCode::FORBIDDEN || s == StatusCode::NOT_FOUND);
    // Malformed JSON fields, unknown fields, bad base64, overlong or traversal ids.
    let st = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    for body in [
        json!({"statement": "!!!"}),
        json!({"statement": "AAAA", "extra": 1}),
        json!({"nope": 1}),
    ] {
        let (s, v) = f
            .env
            .call("POST", &st, body, Signer::Device(&f.customer.device))
            .await;
        assert_eq!(
            (s, code(&v).as_str()),
            (StatusCode::BAD_REQUEST, "malformed"),
            "{v}"
        );
    }
    for id in ["..%2F..%2Fetc", &"a".repeat(65), "zz"] {
        let (s, _) = f
            .env
            .call(
                "POST",
                &format!("/v1/vaults/{id}/statements"),
                json!({"statement": "AAAA"}),
                Signer::Device(&f.customer.device),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{id}");
    }
    // An oversized body.
    let big = json!({"statement": "A".repeat(100 * 1024)});
    let (s, v) = f
        .env
        .call("POST", &st, big, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "urn:cmr-vault:problem:too-large"
        )
    );
    let _ = (&f.kem, f.grant);
}

#[tokio::test]
async fn log_bodies_only_for_the_parties_involved_and_admitted_auditors() {
    let mut f = flow().await;
    let other = register(&mut f.env, Role::Company).await;
    let auditor = register(&mut f.env, Role::Auditor).await;
    // Entry 0 is the customer's registration.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&other.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:forbidden")
    );
    // Registering as an auditor gives nothing: the operator has not admitted it.
    let body_of_0 = |env: &mut Env, who: &DeviceKeys| {
        let req = env.request(
            "POST",
            "/v1/log/entries/0",
            &json!({}),
            Signer::Device(who),
            0,
        );
        let app = env.app.clone();
        async move { app.oneshot(req).await.unwrap().status() }
    };
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // Nor does an admission it signs itself, with any key but the log key.
    let admission = |admit: bool, time: u64, key: &NoteSigner| json!({"statement": cmr_log::admission::Admission { auditor: auditor.id, admit, time }.sign(key)});
    let forged = NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[66; 32]),
    )
    .unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &forged),
            Signer::None,
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:bad-signature"
        )
    );
    // A company cannot be admitted as an auditor.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            json!({"statement": cmr_log::admission::Admission { auditor: other.id, admit: true, time: T0 }.sign(&log_key())}),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // The operator admits it with the log key.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let admitted_at = v["index"].as_u64().unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&auditor.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // What the auditor gets opens the public commitment.
    let salt: [u8; 32] = B64
        .decode(v["salt"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let body = B64.decode(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        cmr_log::entry::commitment(&salt, &body),
        f.env.store.commitments(0, 1).unwrap()[0]
    );
    // An unsigned request for a body is refused.
    let (s, _) = f
        .env
        .call("POST", "/v1/log/entries/0", json!({}), Signer::None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Anyone sees who is an auditor and since when: the admission entry, with its inclusion proof.
    let (s, v) = f
        .env
        .call("GET", "/v1/auditors", json!({}), Signer::None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["index"].as_u64(), Some(admitted_at));
    // The same admission sent again is answered with its original index, and changes nothing.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(
        (s, v["index"].as_u64()),
        (StatusCode::OK, Some(admitted_at))
    );
    // A dismissal signed before the admission cannot be played after it.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(false, T0 - 1, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body_of_0(&mut f.env, &auditor.device).await, StatusCode::OK);
    // Dismissed, it reads no body it is not a party to.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(false, T0 + 1, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // And replaying the old admission does not bring it back.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!((s, v["repeated"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_revoked_device_can_no_longer_act() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, _) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Acme's identity key revokes its device.
    let rev = cmr_core::identity::revoke_device(
        f.acme.id,
        0,
        &f.acme.identity_key,
        f.acme.device.id(),
        T0,
    );
    let revoke_path = format!("/v1/identities/{}/devices/revoke", f.acme.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &revoke_path,
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Identity(&f.acme.id, &f.acme.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The device's requests still verify cryptographically, but its key no longer authenticates.
    let (s, v) = f
        .env
        .call("POST", &path, read, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:unknown-key"
        ),
        "{v}"
    );
    // Another identity cannot revoke acme's devices.
    let (s, _) = f
        .env
        .call(
            "POST",
            &revoke_path,
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_revoked_customer_device_can_no_longer_read_its_vault() {
    let mut f = flow().await;
    // A second device of the customer reads the customer's own records (not logged)...
    let laptop = DeviceKeys::generate(&mut rand::rng());
    let cert = laptop.certify(f.customer.id, 0, &f.customer.identity_key, T0);
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/identities/{}/devices", f.customer.id.to_hex()),
            json!({"certificate": B64.encode(cert.encode())}),
            Signer::Identity(&f.customer.id, &f.customer.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2026-01", "to": "2026-12"});
    let (s, v) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&laptop))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // ...until the identity key revokes it.
    let rev = cmr_core::identity::revoke_device(
        f.customer.id,
        0,
        &f.customer.identity_key,
        laptop.id(),
        T0,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/identities/{}/devices/revoke", f.customer.id.to_hex()),
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Identity(&f.customer.id, &f.customer.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&laptop))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:unknown-key"
        ),
        "{v}"
    );
    // The other device carries on.
    let (s, _) = f
        .env
        .call("POST", &path, read, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_flood_from_one_company_gets_429_while_others_are_served() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let mut limited = 0;
    for _ in 0..60 {
        let (s, v) = f
            .env
            .call("POST", &path, body.clone(), Signer::Device(&f.acme.device))
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["type"], "urn:cmr-vault:problem:rate-limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "the flood was never limited");
    // The customer is still served.
    let own = json!({"from": "2025-06", "to": "2026-12"});
    let (s, v) = f
        .env
        .call("POST", &path, own, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn appends_wait_for_the_rotation_after_a_revocation() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // The customer also grants acme appends to its own transactions family (not answering a request).
    let secret = EpochSecret::generate(&mut rand::rng());
    let g = Grant {
        grantee: f.acme.id,
        request: None,
        purpose: "invoices".into(),
        duration: Duration::Persistent,
        not_before: T0,
        expires: None,
        lookback_start: Period::from_year_month(2026, 1).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        families: vec![GrantFamily {
            family: f.tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::ReadAppend,
        }],
        append_family: Some(f.tx),
        grantee_kem: f.kem.public_key(),
    };
    let st = Statement {
        customer: f.customer.id,
        author: f.customer.id,
        device: f.customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g.clone()),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle {
        entries: vec![BundleEntry {
            family: f.tx,
            epoch: 1,
            key: secret.append_key(&f.acme.id, g.lookback_start),
        }],
    }
    .seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    // The same grant with its keys sealed again: other bytes under the same id.
    let resealed = KeyBundle {
        entries: vec![BundleEntry {
            family: f.tx,
            epoch: 1,
            key: secret.append_key(&f.acme.id, g.lookback_start),
        }],
    }
    .seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    let other =
        SignedStatement::sign(st.clone(), Some(resealed), &f.customer.device.signing).unwrap();
    let grant = SignedStatement::sign(st, Some(bundle), &f.customer.device.signing).unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Idempotent over HTTP: the same bytes again give the original index; other bytes under the same id
    // get 409 `conflict` and change nothing.
    let first = v["index"].as_u64().unwrap();
    let before = f.env.store.checkpoint().unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["index"].as_u64(), v["repeated"].as_bool()),
        (StatusCode::OK, Some(first), Some(true)),
        "{v}"
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(other.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (StatusCode::CONFLICT, "urn:cmr-vault:problem:conflict"),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    // Acme appends an invoice, extending the head its read showed.
    let read_path = format!("{base}/families/{}/read", f.tx.to_hex());
    let (_, v) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2026-01", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    let head = Digest::from_hex(v["proof_of_read"]["head"]["digest"].as_str().unwrap()).unwrap();
    let period = Period::from_year_month(2026, 2).unwrap();
    let key = secret.append_key(&f.acme.id, period);
    let rec = RecordSealer::new(f.customer.id, f.tx, 1, f.acme.id, &key, period)
        .unwrap()
        .seal(&mut rand::rng(), RecordId([9; 16]), b"invoice 7")
        .unwrap();
    let append = |head| {
        let b = SignedBatch::sign(
            Batch::for_records(f.acme.device.id(), head, std::slice::from_ref(&rec)).unwrap(),
            &f.acme.device.signing,
        );
        json!({"batch": B64.encode(b.encode()), "records": [B64.encode(rec.as_bytes())], "grant": gid.to_hex()})
    };
    let batches = format!("{base}/families/{}/batches", f.tx.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The customer sees the append.
    let (_, v) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2026-01", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 4);
    let head = Digest::from_hex(v["proof_of_read"]["head"]["digest"].as_str().unwrap()).unwrap();
    // The first (read) grant is revoked: the family's keys are exposed, appends wait for the rotation.
    let rev = statement(
        &f.customer,
        f.customer.id,
        StBody::Revocation(Revocation {
            grant: f.grant,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::CONFLICT,
            "urn:cmr-vault:problem:rotation-pending"
        ),
        "{v}"
    );
    // A company's refusal does not carry the directory (it names the customer's other relationships)...
    assert!(v.get("directory").is_none(), "{v}");
    // ...the customer's own refused write does, to rotate from.
    let mine = RecordSealer::new(
        f.customer.id,
        f.tx,
        1,
        f.customer.id,
        &secret.read_key(Period::ORIGIN),
        period,
    )
    .unwrap()
    .seal(&mut rand::rng(), RecordId([10; 16]), b"mine")
    .unwrap();
    let own = SignedBatch::sign(
        Batch::for_records(f.customer.device.id(), head, std::slice::from_ref(&mine)).unwrap(),
        &f.customer.device.signing,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            json!({"batch": B64.encode(own.encode()), "records": [B64.encode(mine.as_bytes())]}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::CONFLICT,
            "urn:cmr-vault:problem:rotation-pending"
        ),
        "{v}"
    );
    let dir = cmr_core::directory::SignedDirectory::decode(
        &B64.decode(v["directory"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(dir.directory().customer, f.customer.id);
    // The customer's client completes the rotation, keeping the append grant.
    let rc = cmr_core::consent::RotationCompletion {
        family: f.tx,
        epoch: 2,
        directory: Digest([0; 32]),
        keepers: vec![(gid, grant.bundle().unwrap().clone())],
    };
    let s2 = statement(
        &f.customer,
        f.customer.id,
        StBody::RotationCompletion(rc),
        None,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(s2.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // An append still sealed to epoch 1 is stale.
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::CONFLICT, "urn:cmr-vault:problem:stale-epoch"),
        "{v}"
    );
}

#[test]
fn no_input_makes_a_handler_panic_or_answer_500() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(flow());
    let customer = f.customer.id.to_hex();
    let family = f.tx.to_hex();
    let paths = [
        "/v1/identities".to_string(),
        format!("/v1/identities/{customer}/devices"),
        format!("/v1/identities/{customer}/rotate"),
        format!("/v1/vaults/{customer}/directory"),
        format!("/v1/vaults/{customer}/statements"),
        format!("/v1/vaults/{customer}/families/{family}/batches"),
        format!("/v1/vaults/{customer}/families/{family}/read"),
        "/v1/log/entries/0".to_string(),
    ];
    let env = std::sync::Mutex::new(f.env);
    let device = f.customer.device;
    proptest!(ProptestConfig::with_cases(64), |(which in 0usize..8, body in "\\PC{0,200}", field in "[a-z]{1,10}", value in "\\PC{0,80}", signed in any::<bool>())| {
        let json_body = if body.len() % 2 == 0 { json!({ field: value }) } else { Value::String(body.clone()) };
        let mut env = env.lock().unwrap();
        let req = if signed {
            env.request("POST", &paths[which], &json_body, Signer::Device(&device), 0)
        } else {
            Request::post(paths[which].as_str()).header("host", "vault.test").body(Body::from(body.clone())).unwrap()
        };
        let (status, _) = rt.block_on(env.send(req));
        prop_assert!(status.as_u16() < 500, "{} on {}", status, paths[which]);
    });
}

#[tokio::test]
async fn the_customer_sees_every_access_in_the_history() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call("POST", &path, json!({}), Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let entries = v["entries"].as_array().unwrap();
    // Newest first: the company's read, the batch, the grant, the request, the directory, ...
    assert_eq!(entries[0]["kind"], "access");
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"statement")
            && kinds.contains(&"family-head")
            && kinds.contains(&"directory")
    );
    // Each entry opens its public commitment, is included in the checkpoint, and links to the one before.
    let cp = cmr_log::checkpoint::open(
        v["checkpoint"].as_str().unwrap(),
        &log_key().verifier(),
        &[],
        0,
    )
    .unwrap()
    .checkpoint;
    let mut expected_prev: Option<u64> = None;
    for e in entries.iter().rev() {
        let index = e["index"].as_u64().unwrap();
        let salt: [u8; 32] = B64
            .decode(e["salt"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let body = B64.decode(e["body"].as_str().unwrap()).unwrap();
        let c = cmr_log::entry::commitment(&salt, &body);
        let proof: Vec<[u8; 32]> = e["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| B64.decode(h.as_str().unwrap()).unwrap().try_into().unwrap())
            .collect();
        cmr_log::verify::verify_inclusion(
            index,
            cp.size,
            &cmr_log::entry::commitment_leaf(&c),
            &proof,
            &cp.root,
        )
        .unwrap();
        let entry = cmr_log::entry::EntryBody::decode(&body).unwrap();
        assert_eq!(entry.prev.map(|p| p.index), expected_prev);
        expected_prev = Some(index);
    }
    // Nobody else reads it.
    let (s, _) = f
        .env
        .call("POST", &path, json!({}), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let f = flow().await;
    let resp = f
        .env
        .app
        .clone()
        .oneshot(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // The router and the document are one registration (`routes::openapi::api`): a route cannot be
    // served undocumented. Here the other way: every documented operation is served (unsigned, a signed
    // route answers 401, a malformed one 400, never the router's 404 or 405), and its description is
    // complete: a typed success, the problem details, the signature scheme where it is signed.
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let concrete = path
                .replace("{index}", "0")
                .replace("{id}", &f.customer.id.to_hex())
                .replace("{customer}", &f.customer.id.to_hex())
                .replace("{family}", &f.tx.to_hex());
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&concrete)
                .header("host", "vault.test")
                .body(Body::empty())
                .unwrap();
            let resp = f.env.app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let routed = !String::from_utf8_lossy(&body).contains("no such route")
                && status != StatusCode::METHOD_NOT_ALLOWED;
            assert!(
                routed,
                "{method} {path} is documented but not served ({status})"
            );
            let ok = &op["responses"]["200"];
            assert!(
                ok["content"].is_object(),
                "{method} {path}: no typed success"
            );
            assert!(
                op["responses"]["default"]["content"]["application/problem+json"].is_object(),
                "{method} {path}: no problem details"
            );
            let signed = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if signed {
                // Refused unsigned (a registration or recovery reads its key from the body first).
                assert!(
                    status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST,
                    "{method} {path}: signed, but answered an unsigned request with {status}"
                );
            }
        }
    }
    assert!(operations >= 26, "{operations} operations documented");
    // Every schema reference resolves, and the wire types are described field by field.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling reference to {name}");
    }
    for (name, fields) in [
        (
            "AckJson",
            &["index", "size", "proof", "checkpoint", "entry"][..],
        ),
        (
            "ReadProofJson",
            &["head", "from", "to", "pages", "next"][..],
        ),
        ("ProblemJson", &["type", "title", "status", "detail"][..]),
        ("ReadBody", &["from", "to", "grant", "cursor", "limit"][..]),
    ] {
        for field in fields {
            assert!(
                schemas[name]["properties"][field].is_object(),
                "{name}.{field} is not described"
            );
        }
    }
    // Ids are typed down to their pattern.
    assert_eq!(
        schemas["HeadJson"]["properties"]["customer"]["pattern"],
        "^[0-9a-f]{64}$"
    );
}

#[tokio::test]
async fn an_expired_grant_at_the_server_clock() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // A 10-day grant on the same family.
    let g = Grant {
        grantee: f.acme.id,
        request: None,
        purpose: "a short look".into(),
        duration: Duration::TimeBound {
            seconds: 10 * 86_400,
        },
        not_before: T0,
        expires: Some(T0 + 10 * 86_400),
        lookback_start: Period::from_year_month(2025, 6).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::Read)],
        families: vec![GrantFamily {
            family: f.tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: f.kem.public_key(),
    };
    let st = Statement {
        customer: f.customer.id,
        author: f.customer.id,
        device: f.customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g.clone()),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle { entries: vec![] }.seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    let grant = SignedStatement::sign(st, Some(bundle), &f.customer.device.signing).unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let path = format!("{base}/families/{}/read", f.tx.to_hex());
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": gid.to_hex()});
    // One second before expiry: served, and no rotation is owed yet. At the expiry instant: refused (the
    // bound is exclusive), and the grant's end makes a rotation owed (PRODUCT.md, "Rotation").
    f.env.clock.store(T0 + 10 * 86_400 - 1, Ordering::SeqCst);
    let (s, _) = f
        .env
        .call("POST", &path, body.clone(), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::OK);
    let w = customer_writes_one(&mut f, 20).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
    f.env.clock.store(T0 + 10 * 86_400, Ordering::SeqCst);
    let w = customer_writes_one(&mut f, 21).await;
    assert!(rotation_pending(&w), "{w:?}");
    let (s, v) = f
        .env
        .call("POST", &path, body, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:grant-expired"),
        "{v}"
    );
}

#[tokio::test]
async fn a_witness_cosigns_and_clients_require_it() {
    let f = flow().await;
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let resp = f
        .env
        .app
        .clone()
        .oneshot(get("/v1/log/checkpoint"))
        .await
        .unwrap();
    let note = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // The witness checks consistency from nothing (its first checkpoint) and cosigns.
    let mut witness = cmr_log::witness::Witness::new(witness_key(), log_key().verifier()).unwrap();
    let line = witness.cosign(&note, &[], T0 + 100).unwrap();
    let post = |body: Value| {
        Request::post("/v1/log/cosignatures")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = f
        .env
        .app
        .clone()
        .oneshot(post(json!({"line": line})))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Clients that require one witness now accept the served checkpoint.
    let resp = f
        .env
        .app
        .clone()
        .oneshot(get("/v1/log/checkpoint"))
        .await
        .unwrap();
    let cosigned = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let v = cmr_log::checkpoint::open(
        &cosigned,
        &log_key().verifier(),
        &[witness_key().verifier()],
        1,
    )
    .unwrap();
    assert_eq!(v.cosigners.len(), 1);
    // A cosignature by an unknown key, or over another checkpoint, is refused.
    let stranger = NoteSigner::new(
        "witness.test/w1",
        cmr_log::note::TYPE_COSIGNATURE,
        SigningKey::from_seed(&[8; 32]),
    )
    .unwrap();
    let text = cmr_log::note::Note::parse(&note).unwrap().text;
    for bad in [
        stranger.signature_line(&text, T0),
        witness_key().signature_line("other\n1\nAAAA\n", T0),
    ] {
        let resp = f
            .env
            .app
            .clone()
            .oneshot(post(json!({"line": bad})))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}

#[tokio::test]
async fn the_customer_lists_unanswered_requests() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // The flow's request was answered by the grant; a new one is pending.
    let req = statement(
        &f.acme,
        f.customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "delivery address".into(),
            duration: Duration::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(req.encode())}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let pending = v["pending"].as_array().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["id"], req.id().to_hex());
    assert_eq!(pending[0]["purpose"], "delivery address");
    assert_eq!(pending[0]["company"], f.acme.id.to_hex());
    // Denied, it is no longer pending; and nobody else lists them.
    let denial = statement(
        &f.customer,
        f.customer.id,
        StBody::Denial {
            request: req.id(),
            reason: "no".into(),
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(denial.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert!(v["pending"].as_array().unwrap().is_empty());
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// Rebuilds a read's proof, records and batches from the API's JSON, as a client would.
fn parse_read(
    v: &Value,
) -> (
    cmr_core::batch::ReadProof,
    Vec<cmr_core::record::SealedRecord>,
    Vec<SignedBatch>,
) {
    // The one wire form the server writes and every reader parses (`cmr-wire`).
    let b64 = |x: &Value| B64.decode(x.as_str().unwrap()).unwrap();
    let wire: cmr_wire::read::ReadProofJson =
        serde_json::from_value(v["proof_of_read"].clone()).unwrap();
    let proof = wire.to_proof().unwrap();
    assert_eq!(proof.head.digest().to_hex(), wire.head.digest);
    let records = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| cmr_core::record::SealedRecord::decode(b64(r)).unwrap())
        .collect();
    let batches = v["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| SignedBatch::decode(&b64(b)).unwrap())
        .collect();
    (proof, records, batches)
}

#[tokio::test]
async fn a_blocked_company_is_refused() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    let block = statement(
        &f.customer,
        f.customer.id,
        StBody::Block {
            company: f.acme.id,
            blocked: true,
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(block.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let req = statement(
        &f.acme,
        f.customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "again".into(),
            duration: Duration::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(req.encode())}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:company-blocked"
        )
    );
}

/// Rules `evaluate` enforces, checked in `cmr-core`, hold over HTTP too: another company presenting a
/// grant id is refused; a one-time grant serves one read and then none. A refusal logs nothing.
#[tokio::test]
async fn another_companys_grant_and_a_one_time_grants_second_read_are_refused_over_http() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let eve = register(&mut f.env, Role::Company).await;
    let before = f.env.store.checkpoint().unwrap();
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &read_path, read, Signer::Device(&eve.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:wrong-company"),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);

    // A one-time grant to acme.
    let g = Grant {
        grantee: f.acme.id,
        request: None,
        purpose: "one look".into(),
        duration: Duration::OneTime,
        not_before: T0,
        expires: None,
        lookback_start: Period::from_year_month(2025, 6).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::Read)],
        families: vec![GrantFamily {
            family: f.tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: f.kem.public_key(),
    };
    let st = Statement {
        customer: f.customer.id,
        author: f.customer.id,
        device: f.customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle {
        entries: vec![BundleEntry {
            family: f.tx,
            epoch: 1,
            key: EpochSecret::generate(&mut rand::rng())
                .read_key(Period::from_year_month(2025, 6).unwrap()),
        }],
    }
    .seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    let grant = SignedStatement::sign(st, Some(bundle), &f.customer.device.signing).unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/vaults/{}/statements", f.customer.id.to_hex()),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let once = json!({"from": "2025-06", "to": "2026-12", "grant": gid.to_hex()});
    // Before the one read, nothing is owed.
    let w = customer_writes_one(&mut f, 30).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
    let (s, v) = f
        .env
        .call(
            "POST",
            &read_path,
            once.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let before = f.env.store.checkpoint().unwrap();
    let (s, v) = f
        .env
        .call("POST", &read_path, once, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:grant-consumed"
        ),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    // The read used the grant up: its keys were exposed, so a rotation is owed and stays owed.
    let w = customer_writes_one(&mut f, 31).await;
    assert!(rotation_pending(&w), "{w:?}");
}

/// A read whose months run backwards gets 400 and changes nothing; the server stays healthy and keeps
/// taking writes (the read once panicked inside the sequencer, after which every write got 503 while
/// `/healthz` still said ok).
#[tokio::test]
async fn a_backwards_read_gets_400_and_the_server_carries_on() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let before = f.env.store.checkpoint().unwrap();
    for (who, body) in [
        (0, json!({"from": "2026-12", "to": "2025-01"})),
        (
            1,
            json!({"from": "2026-12", "to": "2025-01", "grant": f.grant.to_hex()}),
        ),
    ] {
        let device = if who == 0 {
            &f.customer.device
        } else {
            &f.acme.device
        };
        let (s, v) = f
            .env
            .call("POST", &path, body, Signer::Device(device))
            .await;
        assert_eq!(
            (s, v["type"].as_str().unwrap_or_default()),
            (StatusCode::BAD_REQUEST, "urn:cmr-vault:problem:malformed"),
            "{v}"
        );
    }
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    let resp = f
        .env
        .app
        .clone()
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let w = customer_writes_one(&mut f, 40).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
}

/// A write that runs past the server's timeout is answered 503 `in-doubt` (it may still be queued in the
/// store), not a plain failure; sent again, it is logged exactly once.
#[tokio::test]
async fn a_write_past_the_timeout_is_in_doubt_and_logged_once_when_sent_again() {
    let mut f = flow().await;
    let statements = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    // The same store behind a server with a 1 s timeout, on a paused clock: once the handler waits for
    // the store, the runtime is idle and the clock jumps past the timeout while the write is queued.
    let normal = f.env.app.clone();
    let c = f.env.clock.clone();
    f.env.app = app(Arc::new(AppState::with_clock(
        f.env.store.clone(),
        Config {
            authority: "vault.test".into(),
            scheme: "http".into(),
            timeout: std::time::Duration::from_secs(1),
            ..Config::default()
        },
        Arc::new(move || c.load(Ordering::SeqCst)),
    )));
    // On a loaded machine the store may answer before the runtime goes idle: try a few requests.
    let mut in_doubt = None;
    for attempt in 0..5 {
        let req = statement(
            &f.acme,
            f.customer.id,
            StBody::Request(AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: format!("look {attempt}"),
                duration: Duration::OneTime,
                lookback_months: 3,
                counterparty: Counterparty::OnlyRequester,
            }),
            None,
        );
        let body = json!({"statement": B64.encode(req.encode())});
        tokio::time::pause();
        let (s, v) = f
            .env
            .call(
                "POST",
                &statements,
                body.clone(),
                Signer::Device(&f.acme.device),
            )
            .await;
        tokio::time::resume();
        if s == StatusCode::OK {
            continue;
        }
        assert_eq!(
            (s, v["type"].as_str().unwrap_or_default()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cmr-vault:problem:in-doubt"
            ),
            "{v}"
        );
        in_doubt = Some((req, body));
        break;
    }
    let (req, body) = in_doubt.expect("no request ran past the timeout in five tries");
    // Sent again to the normal server: one result, and the statement is in the log once.
    f.env.app = normal;
    let (s, v) = f
        .env
        .call(
            "POST",
            &statements,
            body.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    // It had been applied after the 503: the server recognises it.
    assert_eq!(
        (s, v["repeated"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    let index = v["index"].as_u64().unwrap();
    let size = f.env.store.checkpoint().unwrap().unwrap();
    let size: u64 = size.lines().nth(1).unwrap().parse().unwrap();
    let logged = (0..size)
        .filter(|i| {
            let b = f.env.store.body(*i).unwrap().unwrap();
            cmr_log::entry::EntryBody::decode(&b.body).unwrap().payload == req.encode()
        })
        .collect::<Vec<_>>();
    assert_eq!(logged, vec![index]);
}

#[tokio::test]
async fn a_request_signed_for_another_deployment_is_refused_whatever_its_host() {
    let mut f = flow().await;
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let body = serde_json::to_vec(&json!({})).unwrap();
    // Signed for `other.test`, and sent with Host `other.test`: the server verifies for its own
    // configured authority, `vault.test`, and refuses, saying which authority it expects.
    let send = |env: &mut Env, authority: &'static str, host: &'static str| {
        env.nonce += 1;
        let req = httpsig::Request::new("POST", "http", authority, &path, vec![]);
        let h = httpsig::sign_request(
            &req,
            &body,
            &f.customer.device.signing,
            &f.customer.device.id().to_hex(),
            &format!("auth{}", env.nonce),
            env.now(),
        )
        .unwrap();
        Request::builder()
            .method("POST")
            .uri(&path)
            .header("host", host)
            .header("content-type", "application/json")
            .header("content-digest", h.content_digest)
            .header("signature-input", h.signature_input)
            .header("signature", h.signature)
            .body(Body::from(body.clone()))
            .unwrap()
    };
    let req = send(&mut f.env, "other.test", "other.test");
    let (s, v) = f.env.send(req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("vault.test"), "{v}");
    // Signed for this deployment, the request passes even if a proxy rewrote its Host.
    let req = send(&mut f.env, "vault.test", "10.0.0.7:8080");
    let (s, v) = f.env.send(req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn malformed_paths_queries_unknown_routes_and_methods_are_problem_details() {
    let mut f = flow().await;
    let problem = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    for (method, path, status, code) in [
        ("GET", "/v1/log/commitments?from=x&to=2", 400, "malformed"),
        ("GET", "/v1/log/commitments", 400, "malformed"),
        (
            "GET",
            "/v1/log/proofs/inclusion?index=-1&size=2",
            400,
            "malformed",
        ),
        ("GET", "/v1/log/proofs/consistency?old=1", 400, "malformed"),
        ("GET", "/v1/no/such/route", 404, "not-found"),
        ("DELETE", "/v1/log/checkpoint", 405, "method-not-allowed"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vault.test")
            .body(Body::empty())
            .unwrap();
        let resp = f.env.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            problem(&v),
            format!("urn:cmr-vault:problem:{code}"),
            "{method} {path}"
        );
    }
    // A signed request to a path whose number does not parse.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/seven",
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(problem(&v), "urn:cmr-vault:problem:malformed");
}

#[tokio::test]
async fn a_history_page_starts_only_at_the_callers_own_entry() {
    let mut f = flow().await;
    let other = register(&mut f.env, Role::Customer).await;
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let own = f.env.store.customer_head(&f.customer.id).unwrap().unwrap();
    let theirs = f.env.store.customer_head(&other.id).unwrap().unwrap();
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"before": own}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Another customer's entry, an entry of no one (a company's registration), and an index past the
    // log all get the same answer: the route says nothing about entries that are not the caller's.
    let (s0, v0) = f
        .env
        .call(
            "POST",
            &path,
            json!({"before": theirs}),
            Signer::Device(&f.customer.device),
        )
        .await;
    for before in [2u64, 1_000_000] {
        let (s, v) = f
            .env
            .call(
                "POST",
                &path,
                json!({"before": before}),
                Signer::Device(&f.customer.device),
            )
            .await;
        assert_eq!((s, &v["detail"]), (s0, &v0["detail"]), "before {before}");
    }
    assert_eq!(s0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn new_identities_cannot_flood_a_customer_with_requests() {
    use cmr_core::decision::{MAX_PENDING_PER_COMPANY, MAX_PENDING_PER_VAULT};
    let mut f = flow().await;
    // The identity limit is generous here: the flood is many companies, each within its own budget.
    let path = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    let request = |p: &Party, i: u32| {
        statement(
            p,
            f.customer.id,
            StBody::Request(AccessRequest {
                scopes: vec![(Scope::ProfileContact, Access::Read)],
                purpose: format!("ask {i}"),
                duration: Duration::OneTime,
                lookback_months: 0,
                counterparty: Counterparty::Any,
            }),
            None,
        )
    };
    let mut sent = 0u32;
    let mut refused = Vec::new();
    let companies = MAX_PENDING_PER_VAULT / MAX_PENDING_PER_COMPANY + 2;
    for c in 0..companies {
        let company = register(&mut f.env, Role::Company).await;
        for i in 0..=MAX_PENDING_PER_COMPANY {
            let st = request(&company, c * 100 + i);
            let (s, v) = f
                .env
                .call(
                    "POST",
                    &path,
                    json!({"statement": B64.encode(st.encode())}),
                    Signer::Device(&company.device),
                )
                .await;
            match s {
                StatusCode::OK => sent += 1,
                _ => refused.push((s, v)),
            }
            // Keep within this company's own rate budget.
            f.env.clock.fetch_add(1, Ordering::SeqCst);
        }
    }
    assert_eq!(sent, MAX_PENDING_PER_VAULT);
    // Each company's sixth request, and every request once the vault's share is full, is 429.
    for (s, v) in &refused {
        assert_eq!(*s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(v["type"], "urn:cmr-vault:problem:too-many-requests");
    }
    assert!(
        refused
            .iter()
            .any(|(_, v)| v["detail"].as_str().unwrap().contains("from one company"))
    );
    assert!(
        refused
            .iter()
            .any(|(_, v)| v["detail"].as_str().unwrap().contains("in all"))
    );
    // The customer's listing holds exactly the waiting ones, every duration and access in words.
    let listing = format!("/v1/vaults/{}/requests", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &listing,
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let pending = v["pending"].as_array().unwrap();
    assert_eq!(pending.len() as u32, MAX_PENDING_PER_VAULT);
    assert_eq!(pending[0]["duration"], "one read");
    assert_eq!(pending[0]["scopes"][0]["access"], "read");
    // Denying one frees a place.
    let first = StatementId(
        Digest::from_hex(pending[0]["id"].as_str().unwrap())
            .unwrap()
            .0,
    );
    let deny = statement(
        &f.customer,
        f.customer.id,
        StBody::Denial {
            request: first,
            reason: "no".into(),
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"statement": B64.encode(deny.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f
        .env
        .call(
            "POST",
            &listing,
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        v["pending"].as_array().unwrap().len() as u32,
        MAX_PENDING_PER_VAULT - 1
    );
    // A stranger sees nothing of the vault's relationships.
    let stranger = register(&mut f.env, Role::Company).await;
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/vaults/{}/relationship", f.customer.id.to_hex()),
            json!({}),
            Signer::Device(&stranger.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["entries"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["next"].is_null());
}

/// A customer's key events (whose bodies link the customer's chain) go only to the customer, a party its
/// chain involves, an admitted auditor and a device recovering with the phrase; anyone else is answered
/// as if the identity did not exist. A company's go to any registered caller. Every answer carries the
/// key-event head signed with the log key.
#[tokio::test]
async fn a_customers_key_events_only_for_those_who_need_them() {
    let mut f = flow().await;
    let stranger = register(&mut f.env, Role::Company).await;
    let auditor = register(&mut f.env, Role::Auditor).await;
    let events = |id: &IdentityId| format!("/v1/identities/{}/events", id.to_hex());
    let customer_events = events(&f.customer.id);
    // The customer itself, and the company it granted to.
    for device in [&f.customer.device, &f.acme.device] {
        let (s, v) = call(
            &mut f.env,
            &customer_events,
            json!({}),
            Signer::Device(device),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let head =
            cmr_log::keyhead::KeyHead::open(v["head"].as_str().unwrap(), &log_key().verifier())
                .unwrap();
        assert_eq!(head.identity, f.customer.id);
        assert_eq!(head.count as usize, v["events"].as_array().unwrap().len());
    }
    // A stranger, an auditor not admitted, and an unsigned caller learn nothing.
    for device in [&stranger.device, &auditor.device] {
        let (s, v) = call(
            &mut f.env,
            &customer_events,
            json!({}),
            Signer::Device(device),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let unknown = events(&IdentityId([9; 32]));
        let (s2, v2) = call(&mut f.env, &unknown, json!({}), Signer::Device(device)).await;
        assert_eq!((s2, v2["detail"].clone()), (s, v["detail"].clone()));
    }
    let (s, _) = call(&mut f.env, &customer_events, json!({}), Signer::None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Admitted, the auditor may.
    let (s, v) = call(
        &mut f.env,
        "/v1/auditors",
        json!({"statement": cmr_log::admission::Admission { auditor: auditor.id, admit: true, time: T0 }.sign(&log_key())}),
        Signer::None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = call(
        &mut f.env,
        &customer_events,
        json!({}),
        Signer::Device(&auditor.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A company finds the vaults that concern it; nobody else may list them.
    let vaults = |id: &IdentityId| format!("/v1/identities/{}/vaults", id.to_hex());
    let (s, v) = call(
        &mut f.env,
        &vaults(&f.acme.id),
        json!({}),
        Signer::Device(&f.acme.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["vaults"], json!([f.customer.id.to_hex()]));
    let (s, _) = call(
        &mut f.env,
        &vaults(&f.acme.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = call(
        &mut f.env,
        &vaults(&stranger.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!((s, v["vaults"].clone()), (StatusCode::OK, json!([])));
    // A company's events are for any registered caller.
    let (s, _) = call(
        &mut f.env,
        &events(&f.acme.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A device recovering with the phrase signs with the next identity key it reveals; a key the
    // current event does not commit to is answered as if the identity did not exist.
    let new = create_identity(&mut rand::rng(), Role::Customer);
    let id = new.inception.identity();
    let (s, v) = call(
        &mut f.env,
        "/v1/identities",
        json!({"event": B64.encode(new.inception.encode())}),
        Signer::Identity(&id, &new.identity_key),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let next = new.recovery.identity_key();
    let reveal = |k: &SigningKey| json!({"reveal": B64.encode(k.verifying_key().to_bytes())});
    let (s, v) = call(
        &mut f.env,
        &events(&id),
        reveal(&next),
        Signer::Identity(&id, &next),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    let wrong = SigningKey::generate(&mut rand::rng());
    let (s, _) = call(
        &mut f.env,
        &events(&id),
        reveal(&wrong),
        Signer::Identity(&id, &wrong),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Revealing the right key but signing with another is a bad signature.
    let (s, _) = call(
        &mut f.env,
        &events(&id),
        reveal(&next),
        Signer::Identity(&id, &wrong),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

async fn call(env: &mut Env, path: &str, body: Value, signer: Signer<'_>) -> (StatusCode, Value) {
    env.call("POST", path, body, signer).await
}

/// A family's head digest goes to the customer and to a company that may append to the family now; a
/// reader, a stranger with another's grant, and a company without a grant are refused, and nothing is
/// logged.
#[tokio::test]
async fn a_familys_head_only_for_the_customer_and_its_appenders() {
    let mut f = flow().await;
    let stranger = register(&mut f.env, Role::Company).await;
    let path = format!(
        "/v1/vaults/{}/families/{}/head",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let history = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let (_, before) = call(
        &mut f.env,
        &history,
        json!({"limit": 1000}),
        Signer::Device(&f.customer.device),
    )
    .await;
    let (s, v) = call(
        &mut f.env,
        &path,
        json!({}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["head"].as_str().unwrap().len(), 64);
    let grant = json!({"grant": f.grant.to_hex()});
    // The flow's grant reads only: no head for appending.
    let (s, v) = call(
        &mut f.env,
        &path,
        grant.clone(),
        Signer::Device(&f.acme.device),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = call(&mut f.env, &path, grant, Signer::Device(&stranger.device)).await;
    assert_eq!(
        (s, v["title"].clone()),
        (StatusCode::FORBIDDEN, json!("wrong-company")),
        "{v}"
    );
    let (s, _) = call(
        &mut f.env,
        &path,
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, after) = call(
        &mut f.env,
        &history,
        json!({"limit": 1000}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert!(before["entries"].as_array().is_some_and(|e| !e.is_empty()));
    assert_eq!(before["entries"], after["entries"], "nothing is logged");
}
