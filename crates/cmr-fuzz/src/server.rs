//! The request-body target: the real router over a real store in a temporary folder. Each input picks a
//! route and a signer and is sent, properly signed (RFC 9421, its Content-Digest over the fuzzed bytes),
//! so that it reaches the route's body parser.
//!
//! The harness is deterministic: its identities, keys and first state come from a fixed seed and fixed
//! times, so the same customer, company, family, directory, grant and head exist in every process. The
//! seeds of [`valid_requests`] are therefore valid requests of these very identities, on this very
//! state, and reach past the parsers into the sequencer's decisions (a grant's evaluation, a stale head,
//! an idempotent repeat) instead of stopping at a signature check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

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
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily, SignedDirectory};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig;
use cmr_core::identity::{DeviceId, DeviceKeys, IdentityId, NewIdentity, Role, create_identity};
use cmr_core::keys::{SigningKey, VerifyingKey};
use cmr_core::record::{RecordId, RecordSealer};
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};
use http_body_util::BodyExt as _;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::Outcome;

/// The time the harness signs its own statements, certificates and directories at (2026-01-01).
const T0: u64 = 1_767_225_600;
/// The seed of the harness's keys and first state.
const SETUP_SEED: [u8; 32] = [0x5e; 32];
/// The seed of the keys and nonces inside [`valid_requests`].
const REQUESTS_SEED: [u8; 32] = [0x5f; 32];
/// The seed of the records [`read_world`] adds.
const READS_SEED: [u8; 32] = [0x60; 32];

/// A signed request's signer.
enum Signer<'a> {
    Device(&'a DeviceKeys),
    Identity(IdentityId, &'a SigningKey),
}

struct Party {
    id: IdentityId,
    device: DeviceKeys,
}

/// A server over a store, with a customer and a company, and between them: the customer's directory
/// (version 1) declaring a transactions family, the company's request, the customer's grant answering
/// it (read and append), and a first batch of two records.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
    customer: Party,
    company: Party,
    family: FamilyId,
    secret: EpochSecret,
    directory: SignedDirectory,
    request: StatementId,
    grant: StatementId,
    head: Digest,
    nonce: AtomicU64,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn month(y: u32, m: u32) -> Period {
    Period::from_year_month(y, m).expect("a valid month")
}

impl Harness {
    /// A fresh harness in a temporary folder, in the same state in every process.
    pub fn new() -> Self {
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
        // Every key and the first directory come from the seed; then the server learns of them.
        let rng = &mut StdRng::from_seed(SETUP_SEED);
        let customer = create_identity(rng, Role::Customer);
        let company = create_identity(rng, Role::Company);
        let parties = [&customer, &company].map(|new| Party {
            id: new.inception.identity(),
            device: DeviceKeys::generate(rng),
        });
        let [customer_party, company_party] = parties;
        let family =
            FamilyName::Transactions(PseudonymKey::generate(rng).counterparty(&company_party.id))
                .id(&customer_party.id);
        let directory = Directory {
            customer: customer_party.id,
            version: 1,
            prev: Digest([0; 32]),
            signer: customer_party.device.id(),
            issued_at: T0,
            devices: vec![DirectoryDevice {
                device: customer_party.device.id(),
                signing_key: customer_party.device.signing.verifying_key(),
                kem_key: customer_party.device.kem.public_key(),
            }],
            families: vec![DirectoryFamily {
                family,
                scope: Scope::Transactions,
                epoch: 1,
                appenders: vec![],
            }],
        }
        .sign(&customer_party.device.signing);
        let mut h = Harness {
            rt,
            app,
            store,
            _dir: dir,
            head: Head::empty(customer_party.id, family).digest(),
            customer: customer_party,
            company: company_party,
            family,
            secret: EpochSecret::generate(rng),
            directory,
            // Set below, once logged.
            request: StatementId([0; 32]),
            grant: StatementId([0; 32]),
            nonce: AtomicU64::new(0),
        };
        h.enroll(&customer, &h.customer);
        h.enroll(&company, &h.company);
        h.expect_ok(
            0,
            json!({"directory": B64.encode(h.directory.encode())}),
            "/v1/vaults/{c}/directory",
        );
        let request = h.statement(
            &h.company,
            StBody::Request(AccessRequest {
                scopes: vec![(Scope::Transactions, Access::ReadAppend)],
                purpose: "statements".into(),
                duration: Duration::Persistent,
                lookback_months: 12,
                counterparty: Counterparty::OnlyRequester,
            }),
            None,
        );
        h.request = request.id();
        h.expect_ok(
            1,
            json!({"statement": B64.encode(request.encode())}),
            "/v1/vaults/{c}/statements",
        );
        let grant = h.grant_statement(rng, Some(h.request), Access::ReadAppend, "statements");
        h.grant = grant.id();
        h.expect_ok(
            0,
            json!({"statement": B64.encode(grant.encode())}),
            "/v1/vaults/{c}/statements",
        );
        let first = h.batch_body(rng, &h.customer, h.head, 0, month(2026, 2));
        let v = h.expect_ok(0, first, "/v1/vaults/{c}/families/{f}/batches");
        h.head = v["head"]
            .as_str()
            .and_then(Digest::from_hex)
            .expect("a batch's acknowledgement names its head");
        h
    }

    /// Registers an identity and certifies its device, as the SDK does.
    fn enroll(&self, new: &NewIdentity, party: &Party) {
        let id = party.id;
        let event = json!({"event": B64.encode(new.inception.encode())});
        let (s, _) = self.send(
            "/v1/identities",
            &serde_json::to_vec(&event).expect("json"),
            Signer::Identity(id, &new.identity_key),
        );
        assert_eq!(s, StatusCode::OK, "registration");
        let cert = party.device.certify(id, 0, &new.identity_key, T0).encode();
        let body = json!({"certificate": B64.encode(cert)});
        let (s, _) = self.send(
            &format!("/v1/identities/{}/devices", id.to_hex()),
            &serde_json::to_vec(&body).expect("json"),
            Signer::Identity(id, &new.identity_key),
        );
        assert_eq!(s, StatusCode::OK, "certification");
    }

    /// A route with the harness's customer (`{c}`), company (`{k}`) and family (`{f}`) filled in.
    fn target(&self, route: &str) -> String {
        route
            .replace("{c}", &self.customer.id.to_hex())
            .replace("{k}", &self.company.id.to_hex())
            .replace("{f}", &self.family.to_hex())
    }

    /// The request target for `body` on `route`: a company's read or append (a body naming a grant) is
    /// sent, as an honest client sends it, to the target that names its grant, epoch and periods
    /// (`access_target`), so that the access it logs is bound to the signed request. A body that does not
    /// parse goes to the bare route.
    fn target_for(&self, route: &str, body: &[u8]) -> String {
        let target = self.target(route);
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return target;
        };
        let grant = v["grant"]
            .as_str()
            .and_then(Digest::from_hex)
            .map(|d| StatementId(d.0));
        let Some(grant) = grant else { return target };
        let period = |k: &str| v[k].as_str().and_then(Period::parse);
        let (kind, epoch, from, to) = if route.ends_with("/read") {
            (AccessKind::Read, None, period("from"), period("to"))
        } else if route.ends_with("/batches") {
            let records: Vec<cmr_core::record::SealedRecord> = v["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().and_then(|r| B64.decode(r).ok()))
                .filter_map(|r| cmr_core::record::SealedRecord::decode(r).ok())
                .collect();
            let periods = records.iter().map(|r| r.header().period);
            (
                AccessKind::Append,
                records.first().map(|r| r.header().epoch),
                periods.clone().min(),
                periods.max(),
            )
        } else {
            return target;
        };
        match (from, to) {
            (Some(from), Some(to)) => cmr_log::entry::access_target(
                &self.customer.id,
                &self.family,
                kind,
                &grant,
                epoch,
                from,
                to,
            ),
            _ => target,
        }
    }

    /// The signer an input's second byte picks: even the customer's device, odd the company's.
    fn party(&self, who: u8) -> &Party {
        if who.is_multiple_of(2) {
            &self.customer
        } else {
            &self.company
        }
    }

    /// Sends a setup step, which must succeed; its answer.
    fn expect_ok(&self, who: u8, body: Value, route: &str) -> Value {
        let bytes = serde_json::to_vec(&body).expect("json");
        let target = self.target_for(route, &bytes);
        let (s, answer) = self.send(&target, &bytes, Signer::Device(&self.party(who).device));
        assert_eq!(
            s,
            StatusCode::OK,
            "{target}: {}",
            String::from_utf8_lossy(&answer)
        );
        serde_json::from_slice(&answer).expect("a JSON answer")
    }

    fn statement(
        &self,
        author: &Party,
        body: StBody,
        bundle: Option<BundleSeal>,
    ) -> SignedStatement {
        let st = Statement {
            customer: self.customer.id,
            author: author.id,
            device: author.device.id(),
            issued_at: T0,
            body,
        };
        let sealed = bundle.map(|(rng, entries)| {
            KeyBundle { entries }.seal(
                rng,
                self.customer.id,
                self.company.id,
                &self.company.device.kem.public_key(),
                SignedStatement::grant_id(&st).0,
            )
        });
        SignedStatement::sign(st, sealed, &author.device.signing)
            .expect("a statement within limits")
    }

    /// A grant to the company on the family, with its keys (read, and append when `access` appends).
    fn grant_statement(
        &self,
        rng: &mut StdRng,
        request: Option<StatementId>,
        access: Access,
        purpose: &str,
    ) -> SignedStatement {
        let from = month(2026, 1);
        let mut entries = vec![BundleEntry {
            family: self.family,
            epoch: 1,
            key: self.secret.read_key(from),
        }];
        if access.appends() {
            entries.push(BundleEntry {
                family: self.family,
                epoch: 1,
                key: self.secret.append_key(&self.company.id, from),
            });
        }
        let grant = Grant {
            grantee: self.company.id,
            request,
            purpose: purpose.into(),
            duration: Duration::Persistent,
            not_before: T0,
            expires: None,
            lookback_start: from,
            window_months: None,
            scopes: vec![(Scope::Transactions, access)],
            families: vec![GrantFamily {
                family: self.family,
                scope: Scope::Transactions,
                epoch: 1,
                access,
            }],
            append_family: access.appends().then_some(self.family),
            grantee_kem: self.company.device.kem.public_key(),
        };
        self.statement(&self.customer, StBody::Grant(grant), Some((rng, entries)))
    }

    /// A batch of two records by `author` on `head` (an append under the grant when the author is the
    /// company), as a request body.
    fn batch_body(
        &self,
        rng: &mut StdRng,
        author: &Party,
        head: Digest,
        n: u8,
        period: Period,
    ) -> Value {
        let key = if author.id == self.customer.id {
            self.secret.read_key(Period::ORIGIN)
        } else {
            self.secret.append_key(&author.id, period)
        };
        let sealer = RecordSealer::new(self.customer.id, self.family, 1, author.id, &key, period)
            .expect("a record sealer");
        let records: Vec<_> = (0..2u8)
            .map(|i| {
                sealer
                    .seal(
                        rng,
                        RecordId([n.wrapping_mul(2).wrapping_add(i); 16]),
                        b"a transaction",
                    )
                    .expect("a record within limits")
            })
            .collect();
        let batch = SignedBatch::sign(
            Batch::for_records(author.device.id(), head, &records).expect("a batch within limits"),
            &author.device.signing,
        );
        let mut body = json!({
            "batch": B64.encode(batch.encode()),
            "records": records.iter().map(|r| B64.encode(r.as_bytes())).collect::<Vec<_>>(),
        });
        if author.id != self.customer.id {
            body["grant"] = json!(self.grant.to_hex());
        }
        body
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

    /// Sends one fuzz input (route byte, signer byte, body) and checks the invariants: no 5xx, and a
    /// refusal leaves the log as it was.
    pub fn input(&self, data: &[u8]) -> Outcome {
        let (Some(&route), Some(&who)) = (data.first(), data.get(1)) else {
            return Outcome::Rejected;
        };
        let body = &data[2..];
        let target = self.target_for(ROUTES[usize::from(route) % ROUTES.len()], body);
        let before = self.store.checkpoint().expect("the store answers");
        let (status, answer) = self.send(&target, body, Signer::Device(&self.party(who).device));
        assert!(
            !status.is_server_error(),
            "{target} answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        if status.is_success() {
            return Outcome::Accepted;
        }
        assert_eq!(
            self.store.checkpoint().expect("the store answers"),
            before,
            "{target} refused with {status} but the log changed"
        );
        Outcome::Rejected
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// What the read-proof target checks against: honest answers to the customer's reads of a family with
/// records in three periods, by two authors, and the keys of the devices that signed its batches.
pub(crate) struct ReadWorld {
    /// The whole family in one page.
    pub full: Value,
    /// The first page of three records.
    pub paged: Value,
    /// The devices that signed batches, and their keys.
    pub devices: Vec<(DeviceId, VerifyingKey)>,
}

/// Grows a fresh harness's family (batches by the customer in 2025-12 and 2026-03, an append by the
/// company in 2026-03) and reads it back, as the customer. Deterministic, like the harness.
pub(crate) fn read_world() -> ReadWorld {
    let mut h = Harness::new();
    let rng = &mut StdRng::from_seed(READS_SEED);
    let batches = "/v1/vaults/{c}/families/{f}/batches";
    for (who, n, period) in [
        (0, 3, month(2025, 12)),
        (0, 4, month(2026, 3)),
        (1, 5, month(2026, 3)),
    ] {
        let body = h.batch_body(rng, h.party(who), h.head, n, period);
        let v = h.expect_ok(who, body, batches);
        h.head = v["head"]
            .as_str()
            .and_then(Digest::from_hex)
            .expect("a batch's acknowledgement names its head");
    }
    let read = "/v1/vaults/{c}/families/{f}/read";
    let full = h.expect_ok(0, json!({"from": "2025-01", "to": "2026-12"}), read);
    let paged = h.expect_ok(
        0,
        json!({"from": "2025-01", "to": "2026-12", "limit": 3}),
        read,
    );
    let devices = [&h.customer, &h.company]
        .map(|p| (p.device.id(), p.device.signing.verifying_key()))
        .to_vec();
    ReadWorld {
        full,
        paged,
        devices,
    }
}

/// A bundle's sealing randomness and entries.
type BundleSeal<'a> = (&'a mut StdRng, Vec<BundleEntry>);

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::new)
}

/// The routes that take a JSON body; `{c}` is the customer, `{k}` the company, `{f}` the family.
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

/// Inputs that a fresh harness accepts, each on its own: for each route a customer or company can use
/// with a device key, a request that is valid for the harness's identities and first state (the seeds of
/// the corpus; `cmr-fuzz`'s tests check that each is still accepted).
pub fn valid_requests() -> Vec<Vec<u8>> {
    let h = Harness::new();
    let rng = &mut StdRng::from_seed(REQUESTS_SEED);
    let (customer, company) = (0u8, 1u8);
    let mut out: Vec<(u8, u8, Value)> = Vec::new();
    // Directory version 2, adding the contact profile family.
    let contact = FamilyName::profile(Scope::ProfileContact)
        .expect("a profile scope")
        .id(&h.customer.id);
    let v2 = h
        .directory
        .directory()
        .next_with_family(
            &h.directory,
            h.customer.device.id(),
            T0 + 1,
            DirectoryFamily {
                family: contact,
                scope: Scope::ProfileContact,
                epoch: 1,
                appenders: vec![],
            },
        )
        .sign(&h.customer.device.signing);
    out.push((4, customer, json!({"directory": B64.encode(v2.encode())})));
    // Statements: another request by the company, a read-only grant, and the revocation of the
    // setup's grant by the customer and by the company giving it up.
    let request = h.statement(
        &h.company,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::Transactions, Access::Read)],
            purpose: "a second look".into(),
            duration: Duration::OneTime,
            lookback_months: 3,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    out.push((
        5,
        company,
        json!({"statement": B64.encode(request.encode())}),
    ));
    let grant = h.grant_statement(rng, None, Access::Read, "a look");
    out.push((
        5,
        customer,
        json!({"statement": B64.encode(grant.encode())}),
    ));
    for (who, initiator) in [
        (customer, Initiator::Customer),
        (company, Initiator::Grantee),
    ] {
        let author = h.party(who);
        let revocation = h.statement(
            author,
            StBody::Revocation(Revocation {
                grant: h.grant,
                initiator,
                reason: "done".into(),
            }),
            None,
        );
        out.push((
            5,
            who,
            json!({"statement": B64.encode(revocation.encode())}),
        ));
    }
    // A batch by the customer, and an append by the company under its grant, on the head.
    out.push((
        6,
        customer,
        h.batch_body(rng, &h.customer, h.head, 1, month(2026, 2)),
    ));
    out.push((
        6,
        company,
        h.batch_body(rng, &h.company, h.head, 2, month(2026, 2)),
    ));
    // Reads: the company's under its grant, the customer's own.
    out.push((
        7,
        company,
        json!({"from": "2026-01", "to": "2026-12", "grant": h.grant.to_hex(), "limit": 10}),
    ));
    out.push((7, customer, json!({"from": "2026-01", "to": "2026-12"})));
    // Histories, listings, the relationship view, a key backup, and a log entry.
    out.push((8, customer, json!({"limit": 10})));
    out.push((9, customer, json!({})));
    out.push((10, company, json!({})));
    out.push((
        11,
        customer,
        json!({"version": 1, "backup": B64.encode(b"sealed by the client")}),
    ));
    out.push((13, customer, json!({})));
    out.into_iter()
        .map(|(route, who, body)| {
            let mut bytes = vec![route, who];
            bytes.extend_from_slice(&serde_json::to_vec(&body).expect("json"));
            bytes
        })
        .collect()
}

/// Request bodies: the first byte picks the route, the second the signer (the customer's device or the
/// company's); the rest is the body, signed. No answer is a 5xx, nothing panics, and an answer that
/// refuses (4xx) leaves the log exactly as it was. `Accepted` when the server answered 2xx.
pub fn request_body(data: &[u8]) -> Outcome {
    harness().input(data)
}
