//! The request-body target: the real router over a real store in a temporary folder, with a customer and
//! a company registered. Each input picks a route and a signer and is sent, properly signed (RFC 9421,
//! its Content-Digest over the fuzzed bytes), so that it reaches the route's body parser.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::httpsig;
use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity};
use cmr_core::keys::SigningKey;
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::Outcome;

/// A signed request's signer.
enum Signer<'a> {
    Device(&'a DeviceKeys),
    Identity(IdentityId, &'a SigningKey),
}

struct Party {
    id: IdentityId,
    device: DeviceKeys,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
    customer: Party,
    company: Party,
    nonce: AtomicU64,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let key = crate::note_signer();
        let mut cfg = StoreConfig::new(dir.path(), key);
        cfg.cache_capacity = 8 * 1024 * 1024;
        let store = Arc::new(Store::open(cfg).expect("a fresh store"));
        let config = Config {
            authority: "vault.test".into(),
            scheme: "http".into(),
            rate_per_identity: 1e9,
            burst_per_identity: 1e9,
            ..Config::default()
        };
        let app = cmr_server::app(Arc::new(AppState::new(store.clone(), config)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut h = Harness {
            rt,
            app,
            store,
            _dir: dir,
            customer: Party {
                id: IdentityId([0; 32]),
                device: DeviceKeys::generate(&mut rand::rng()),
            },
            company: Party {
                id: IdentityId([0; 32]),
                device: DeviceKeys::generate(&mut rand::rng()),
            },
            nonce: AtomicU64::new(0),
        };
        h.customer = h.register(Role::Customer);
        h.company = h.register(Role::Company);
        h
    }

    /// Registers an identity and certifies one device, as the SDK does.
    fn register(&self, role: Role) -> Party {
        let new = create_identity(&mut rand::rng(), role);
        let id = new.inception.identity();
        let device = DeviceKeys::generate(&mut rand::rng());
        let event = serde_json::json!({"event": B64.encode(new.inception.encode())});
        let (s, _) = self.send(
            "/v1/identities",
            &serde_json::to_vec(&event).expect("json"),
            Signer::Identity(id, &new.identity_key),
        );
        assert_eq!(s, StatusCode::OK, "registration");
        let cert = device
            .certify(id, 0, &new.identity_key, now() as u64)
            .encode();
        let body = serde_json::json!({"certificate": B64.encode(cert)});
        let (s, _) = self.send(
            &format!("/v1/identities/{}/devices", id.to_hex()),
            &serde_json::to_vec(&body).expect("json"),
            Signer::Identity(id, &new.identity_key),
        );
        assert_eq!(s, StatusCode::OK, "certification");
        Party { id, device }
    }

    fn send(&self, target: &str, body: &[u8], signer: Signer<'_>) -> (StatusCode, Vec<u8>) {
        let (keyid, key) = match signer {
            Signer::Device(d) => (d.id().to_hex(), &d.signing),
            Signer::Identity(id, k) => (format!("id:{}", id.to_hex()), k),
        };
        let nonce = format!("fuzz{}", self.nonce.fetch_add(1, Ordering::Relaxed));
        let req = httpsig::Request::new("POST", "http", "vault.test", target, vec![]);
        let h = httpsig::sign_request(&req, body, key, &keyid, &nonce, now())
            .expect("a well-formed profile");
        let request = Request::builder()
            .method("POST")
            .uri(target)
            .header("host", "vault.test")
            .header("content-type", "application/json")
            .header("content-digest", h.content_digest)
            .header("signature-input", h.signature_input)
            .header("signature", h.signature)
            .body(Body::from(body.to_vec()))
            .expect("a valid request");
        self.rt.block_on(async {
            let resp = self
                .app
                .clone()
                .oneshot(request)
                .await
                .expect("the router is infallible");
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            (status, bytes)
        })
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::new)
}

/// The routes that take a JSON body; `{c}` is the customer, `{k}` the company, `{f}` a family id.
const ROUTES: [&str; 14] = [
    "/v1/identities",
    "/v1/identities/{c}/devices",
    "/v1/identities/{c}/devices/revoke",
    "/v1/identities/{c}/rotate",
    "/v1/vaults/{c}/directory",
    "/v1/vaults/{c}/statements",
    "/v1/vaults/{c}/families/{f}/batches",
    "/v1/vaults/{c}/families/{f}/read",
    "/v1/vaults/{c}/history",
    "/v1/vaults/{c}/requests",
    "/v1/vaults/{c}/relationship",
    "/v1/vaults/{c}/backup",
    "/v1/vaults/{c}/backup/latest",
    "/v1/log/entries/0",
];

/// Request bodies: the first byte picks the route, the second the signer (the customer's device or the
/// company's); the rest is the body, signed. No answer is a 5xx, nothing panics, and an answer that
/// refuses (4xx) leaves the log exactly as it was. `Accepted` when the server answered 2xx.
pub fn request_body(data: &[u8]) -> Outcome {
    let (Some(&route), Some(&who)) = (data.first(), data.get(1)) else {
        return Outcome::Rejected;
    };
    let body = &data[2..];
    let h = harness();
    let target = ROUTES[usize::from(route) % ROUTES.len()]
        .replace("{c}", &h.customer.id.to_hex())
        .replace("{k}", &h.company.id.to_hex())
        .replace("{f}", &hex::encode([7u8; 32]));
    let signer = if who % 2 == 0 {
        &h.customer.device
    } else {
        &h.company.device
    };
    let before = h.store.checkpoint().expect("the store answers");
    let (status, answer) = h.send(&target, body, Signer::Device(signer));
    assert!(
        !status.is_server_error(),
        "{target} answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
    if status.is_success() {
        return Outcome::Accepted;
    }
    assert_eq!(
        h.store.checkpoint().expect("the store answers"),
        before,
        "{target} refused with {status} but the log changed"
    );
    Outcome::Rejected
}
