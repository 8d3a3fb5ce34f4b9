//! Writes the seed corpus: `cargo run -p cmr-fuzz --example write-seeds -- fuzz/corpus`.
//!
//! The seeds are the bytes a real flow produces, as the tests drive it: a server over a temporary store
//! (its log key is the note target's known key), a customer, a bank and a reader through the SDK —
//! registration, directory, request, grant, records, appends, reads, a revocation and its rotation — and
//! then every log entry as stored (log bodies), every payload by kind (statements, key events, device
//! certificates, directories, signed batches, access records), the checkpoint note and the C2SP keys,
//! sealed records, signed RFC 9421 headers, a key file, request bodies for every route, and the
//! request-body harness's own valid requests (`cmr_fuzz::valid_requests`) and honest read answers
//! (`cmr_fuzz::read_proof_seeds`). Each file is
//! named by the SHA-256 of its content, so writing twice changes nothing.
#![allow(clippy::unwrap_used)] // A developer tool: a panic names what failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_client::Connection;
use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::session::Session;
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration};
use cmr_core::epoch::EpochSecret;
use cmr_core::family::{FamilyId, Period, PseudonymKey, Scope};
use cmr_core::hash::sha256;
use cmr_core::httpsig;
use cmr_core::identity::{DeviceKeys, IdentityId, Role};
use cmr_core::keyfile::{self, KdfParams, KeyFileContents};
use cmr_core::record::{RecordId, RecordSealer};
use cmr_log::entry::{EntryBody, EntryKind};
use cmr_server::{AppState, Config};
use cmr_store::{Store, StoreConfig};
use serde_json::json;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Corpus {
    root: PathBuf,
    written: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let name = hex::encode(&sha256(bytes).0[..16]);
        std::fs::write(dir.join(name), bytes).unwrap();
        self.written += 1;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus"));
    let mut corpus = Corpus { root, written: 0 };
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(Store::open(StoreConfig::new(dir.path(), cmr_fuzz::note_signer())).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Config::default()
    };
    tokio::spawn(cmr_server::serve(
        listener,
        Arc::new(AppState::new(store, config)),
        std::future::pending(),
    ));
    let conn = Connection::new(&format!("http://{addr}")).unwrap();
    let pinned = cmr_fuzz::note_signer().verifier();
    let t = now();
    let month = Period::from_unix(t as i64).unwrap();
    let register = |role| {
        let (conn, pinned) = (conn.clone(), pinned.clone());
        async move { Session::register(conn, role, pinned, t).await.unwrap().0 }
    };

    // The flow.
    let mut bank = Company::new(register(Role::Company).await);
    let mut reader = Company::new(register(Role::Company).await);
    let auditor = register(Role::Auditor).await;
    let admission = cmr_log::admission::Admission {
        auditor: auditor.keys.identity,
        admit: true,
        time: t,
    };
    cmr_client::auditor::submit_admission(&conn, &admission.sign(&cmr_fuzz::note_signer()))
        .await
        .unwrap();
    let mut alex = Customer::new(
        register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let tx = alex.transactions_with(&bank.id());
    alex.declare(&[tx], t).await.unwrap();
    let fam = alex.family_id(&tx);
    let asked = AccessRequest {
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        purpose: "statements".into(),
        duration: Duration::Persistent,
        lookback_months: 1,
        counterparty: Counterparty::OnlyRequester,
    };
    bank.request(alex.id(), asked, t).await.unwrap();
    let pending = alex.pending().await.unwrap();
    let proof = |id, name: &str| CompanyProof {
        domain: "seeds.invalid".into(),
        name: name.into(),
        identity: id,
    };
    let approval = Approval {
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        lookback_months: 1,
        families: vec![tx],
        append_family: Some(tx),
    };
    let g = alex
        .approve(&pending[0], &proof(bank.id(), "bank"), &approval, t)
        .await
        .unwrap();
    alex.write(fam, month, &[b"coffee 3.20", b"rent 900.00"])
        .await
        .unwrap();
    bank.sync(alex.id()).await.unwrap();
    let (head, _) = bank.read(g, fam, month, month).await.unwrap();
    bank.append(g, &head, month, &[b"fee 1.00"]).await.unwrap();
    let read_only = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 1,
        families: vec![tx],
        append_family: None,
    };
    let rg = alex
        .grant(
            &proof(reader.id(), "reader"),
            "a look",
            Duration::Persistent,
            &read_only,
            t,
        )
        .await
        .unwrap();
    reader.sync(alex.id()).await.unwrap();
    reader.read(rg, fam, month, month).await.unwrap();
    alex.revoke(rg, "enough", t).await.unwrap();

    // Every log entry, and its payload by kind.
    let note = auditor.conn.get_text("/v1/log/checkpoint").await.unwrap();
    let size: u64 = note.lines().nth(1).unwrap().parse().unwrap();
    let mut statements = Vec::new();
    for i in 0..size {
        let v = auditor
            .post(&format!("/v1/log/entries/{i}"), &json!({}))
            .await
            .unwrap();
        let body = B64.decode(v["body"].as_str().unwrap()).unwrap();
        corpus.put("log_body", &body);
        let entry = EntryBody::decode(&body).unwrap();
        match entry.kind {
            EntryKind::Directory => corpus.put("directory", &entry.payload),
            EntryKind::FamilyHead => corpus.put("record", &entry.payload),
            EntryKind::Access => corpus.put("log_body", &entry.payload),
            EntryKind::Statement => {
                statements.push(entry.payload.clone());
                corpus.put("statement", &entry.payload);
            }
            EntryKind::KeyEvent | EntryKind::DeviceCertificate | EntryKind::DeviceRevocation => {
                corpus.put("statement", &entry.payload)
            }
            EntryKind::Admission => corpus.put("note", &entry.payload),
        }
    }
    let device = DeviceKeys::generate(&mut rand::rng());
    corpus.put(
        "statement",
        &cmr_core::identity::DeviceRequest::sign(alex.id(), &device),
    );

    // Notes, checkpoints and keys.
    corpus.put("note", note.as_bytes());
    let cp_text = note.split("\n\n").next().unwrap().to_string() + "\n";
    corpus.put("note", cp_text.as_bytes());
    corpus.put("note", pinned.to_vkey().as_bytes());
    corpus.put("note", cmr_fuzz::note_signer().to_skey().as_bytes());

    // Sealed records of the customer and of an appending company.
    let secret = EpochSecret::generate(&mut rand::rng());
    let family = FamilyId([9; 32]);
    let customer = IdentityId([1; 32]);
    let company = IdentityId([2; 32]);
    for (author, key) in [
        (customer, secret.read_key(Period::ORIGIN)),
        (company, secret.append_key(&company, Period::ORIGIN)),
    ] {
        let sealer = RecordSealer::new(customer, family, 1, author, &key, month).unwrap();
        let r = sealer
            .seal(&mut rand::rng(), RecordId([5; 16]), b"a transaction")
            .unwrap();
        corpus.put("record", r.as_bytes());
    }

    // Signed RFC 9421 headers, and a refused one.
    for body in [&b"{}"[..], b"{\"statement\":\"AAAA\"}"] {
        let req = httpsig::Request::new("POST", "http", "vault.test", "/v1/fuzz", vec![]);
        let h = httpsig::sign_request(
            &req,
            body,
            &cmr_fuzz::http_signer(),
            "device-1",
            "nonce-1",
            cmr_fuzz::HTTP_NOW,
        )
        .unwrap();
        let text = format!(
            "{}\n{}\n{}\n{}",
            h.signature_input,
            h.signature,
            h.content_digest,
            String::from_utf8_lossy(body)
        );
        corpus.put("httpsig", text.as_bytes());
    }

    // A key file at the weakest accepted parameters, without its checksum (the target appends it).
    let contents = KeyFileContents {
        role: Role::Customer,
        identity: customer,
        device: DeviceKeys::generate(&mut rand::rng()),
        identity_key: None,
    };
    let file = keyfile::seal(
        &mut rand::rng(),
        &contents,
        cmr_fuzz::KEY_FILE_PASSPHRASE,
        KdfParams::MINIMUM,
    )
    .unwrap();
    corpus.put("keyfile", &file[..file.len() - 32]);

    // Merkle proofs: a tree size, a range, an index and an old size, with no edits and with some.
    for seed in [
        &[10u8, 3, 4, 5, 6][..],
        &[63, 0, 63, 62, 1],
        &[0, 0, 0, 0, 0],
        &[20, 5, 2, 7, 9, 0, 1, 5, 4, 2, 0],
    ] {
        corpus.put("range_proof", seed);
    }

    // Request bodies: [route, signer] then the body, for every route (see `server::ROUTES`).
    let st = B64.encode(&statements[0]);
    let bodies: [(u8, serde_json::Value); 14] = [
        (0, json!({"event": "AAAA"})),
        (1, json!({"certificate": "AAAA"})),
        (2, json!({"revocation": "AAAA"})),
        (3, json!({"event": "AAAA"})),
        (4, json!({"directory": "AAAA"})),
        (5, json!({"statement": st})),
        (
            6,
            json!({"batch": "AAAA", "records": ["AAAA"], "grant": hex::encode([1u8; 32])}),
        ),
        (
            7,
            json!({"from": month.to_string(), "to": month.to_string(), "grant": hex::encode([1u8; 32]), "limit": 10}),
        ),
        (8, json!({"limit": 10})),
        (9, json!({})),
        (10, json!({})),
        (11, json!({"version": 1, "backup": "AAAA"})),
        (12, json!({})),
        (13, json!({})),
    ];
    for (route, body) in bodies {
        for who in [0u8, 1] {
            let mut bytes = vec![route, who];
            bytes.extend_from_slice(&serde_json::to_vec(&body).unwrap());
            corpus.put("request_body", &bytes);
        }
    }
    // And requests the harness's own identities make on its state, which its server accepts.
    // (The harness runs its own runtime, so it is built on a thread of its own.)
    let valid = std::thread::spawn(cmr_fuzz::valid_requests).join().unwrap();
    for bytes in valid {
        corpus.put("request_body", &bytes);
    }
    // Honest read answers, as a reader's SDK gets them.
    for bytes in cmr_fuzz::read_proof_seeds() {
        corpus.put("read_proof", &bytes);
    }
    println!(
        "wrote {} seed files under {}",
        corpus.written,
        corpus.root.display()
    );
}
