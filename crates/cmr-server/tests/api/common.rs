//! The fixtures of the API tests: a router over a real store in a temporary folder, registered parties,
//! and the flow every area starts from.
pub use std::sync::Arc;
pub use std::sync::atomic::{AtomicU64, Ordering};

pub use axum::body::Body;
pub use axum::http::{Request, StatusCode};
pub use base64::Engine as _;
pub use base64::engine::general_purpose::STANDARD as B64;
pub use cmr_core::batch::{Batch, Head, SignedBatch};
pub use cmr_core::consent::{
    Access, AccessRequest, Body as StBody, Counterparty, Duration, Grant, GrantFamily, Initiator,
    Revocation, SignedStatement, Statement, StatementId,
};
pub use cmr_core::decision::AccessKind;
pub use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
pub use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
pub use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
pub use cmr_core::hash::Digest;
pub use cmr_core::httpsig;
pub use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity};
pub use cmr_core::keys::{KemSecretKey, SigningKey};
pub use cmr_core::record::{RecordId, RecordSealer};
pub use cmr_log::note::{NoteSigner, TYPE_ED25519};
pub use cmr_server::{AppState, Config, app};
pub use cmr_store::{Store, StoreConfig};
pub use http_body_util::BodyExt;
pub use serde_json::{Value, json};
pub use tower::ServiceExt;

pub const T0: u64 = 1_794_700_800;

pub struct Env {
    pub _dir: tempfile::TempDir,
    pub app: axum::Router,
    pub clock: Arc<AtomicU64>,
    pub store: Arc<Store>,
    pub nonce: u64,
}

pub fn log_key() -> NoteSigner {
    NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap()
}

pub fn witness_key() -> NoteSigner {
    NoteSigner::new(
        "witness.test/w1",
        cmr_log::note::TYPE_COSIGNATURE,
        SigningKey::from_seed(&[9; 32]),
    )
    .unwrap()
}

pub fn env() -> Env {
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

pub enum Signer<'a> {
    Identity(&'a IdentityId, &'a SigningKey),
    Device(&'a DeviceKeys),
    None,
}

impl Env {
    pub fn now(&self) -> i64 {
        self.clock.load(Ordering::SeqCst) as i64
    }

    /// Builds a request signed with the CMR profile (or not), with `created` offset from the clock. A
    /// company's read or append (a body naming a grant, on a bare route) goes, as the SDK sends it, to the
    /// target that names its grant, epoch and periods.
    pub fn request(
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

    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn call(
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
pub fn bound_target(path: &str, body: &Value) -> Option<String> {
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

pub struct Party {
    pub identity_key: SigningKey,
    pub id: IdentityId,
    pub device: DeviceKeys,
}

pub async fn register(env: &mut Env, role: Role) -> Party {
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

pub fn statement(
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

/// A grant from `customer` to `company` to read the transaction family `tx` (epoch 1) from 2025-06,
/// carrying the keys `keys` gives for it, sealed to `kem`: the statement and its id.
pub fn read_grant(
    customer: &Party,
    company: IdentityId,
    tx: FamilyId,
    kem: &KemSecretKey,
    request: Option<StatementId>,
    (purpose, duration): (&str, Duration),
    keys: impl FnOnce(&Grant) -> Vec<BundleEntry>,
) -> (SignedStatement, StatementId) {
    let g = Grant {
        grantee: company,
        request,
        purpose: purpose.into(),
        duration,
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
    let entries = keys(&g);
    let st = Statement {
        customer: customer.id,
        author: customer.id,
        device: customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle { entries }.seal(
        &mut rand::rng(),
        customer.id,
        company,
        &kem.public_key(),
        gid.0,
    );
    let grant = SignedStatement::sign(st, Some(bundle), &customer.device.signing).unwrap();
    (grant, gid)
}

pub struct Flow {
    pub env: Env,
    pub customer: Party,
    pub acme: Party,
    pub tx: FamilyId,
    pub grant: StatementId,
    pub kem: KemSecretKey,
}

/// The customer writes one record on the transaction family, extending the head a read of it shows.
/// Returns the answer: 200, or the refusal (a `rotation-pending` one tells that a rotation is owed).
pub async fn customer_writes_one(f: &mut Flow, id: u8) -> (StatusCode, Value) {
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

pub fn rotation_pending(answer: &(StatusCode, Value)) -> bool {
    answer.0 == StatusCode::CONFLICT
        && answer.1["type"].as_str() == Some("urn:cmr-vault:problem:rotation-pending")
}

pub async fn flow() -> Flow {
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
    let (grant, gid) = read_grant(
        &customer,
        acme.id,
        tx,
        &kem,
        Some(req.id()),
        ("statements", Duration::Persistent),
        |g| {
            vec![BundleEntry {
                family: tx,
                epoch: 1,
                key: secret.read_key(g.lookback_start),
            }]
        },
    );
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

/// Rebuilds a read's proof, records and batches from the API's JSON, as a client would.
pub fn parse_read(
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

pub async fn call(
    env: &mut Env,
    path: &str,
    body: Value,
    signer: Signer<'_>,
) -> (StatusCode, Value) {
    env.call("POST", path, body, signer).await
}
