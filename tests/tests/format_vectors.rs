//! Vectors for the project's own formats (testdata/formats.json, described in docs/formats.md), mostly
//! negative: each case is the hex of one encoded object and whether a reader must accept it. Another
//! implementation checks itself against the same file; this test checks ours.
//!
//! What "accept" means per kind, so that an implementation can apply the same judgement:
//! - `key-event`: decodes, and is a valid self-signed inception (`KeyHistory::incept` at position 0);
//! - `device-certificate`: decodes, and is signed by the identity key of the file's `key-event` vector;
//! - `statement`, `batch`: decode, and are signed by the device of the file's `device-certificate`;
//! - `record`: decodes (header, nonce, wrapped key, bounded content);
//! - `entry-body`: decodes (known kind, canonical framing, nothing trailing);
//! - `checkpoint`: a C2SP signed note that opens under the file's `log_vkey`;
//! - `access-record`: decodes (compact, its signature base rebuilt from its fields, or in full), its
//!   signature verifies over that base under the file's device key, and the signed request is bound
//!   to what the record claims for the vault its path names.
//!
//! `CMR_UPDATE_VECTORS=1 cargo test -p cmr-tests --test format_vectors` writes the file again (new keys
//! and salts: every byte changes, every verdict stays).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use cmr_core::batch::{Batch, SignedBatch};
use cmr_core::consent::{Body, SignedStatement, Statement};
use cmr_core::epoch::EpochSecret;
use cmr_core::family::{FamilyId, FamilyName, Period, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::{
    DeviceCertificate, DeviceKeys, IdentityState, KeyHistory, Role, Signed, SignedKeyEvent,
    create_identity,
};
use cmr_core::keys::SigningKey;
use cmr_core::record::{RecordId, RecordSealer, SealedRecord};
use cmr_log::checkpoint::Checkpoint;
use cmr_log::entry::{AccessRecord, AccessedFamily, EntryBody, EntryKind, access_target};
use cmr_log::note::{NoteSigner, NoteVerifier, TYPE_ED25519};
use serde_json::{Value, json};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/formats.json");

/// What the file's valid objects refer to.
struct Keys {
    identity: IdentityState,
    device: cmr_core::keys::VerifyingKey,
    log: NoteVerifier,
}

/// The verdict on one case: `Ok` if a reader must accept it.
fn judge(kind: &str, bytes: &[u8], keys: &Keys) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        "key-event" => {
            let ev = SignedKeyEvent::decode(bytes).map_err(|x| e(&x))?;
            KeyHistory::incept(&ev, 0).map(|_| ()).map_err(|x| e(&x))
        }
        "device-certificate" => {
            let c = Signed::<DeviceCertificate>::decode(bytes).map_err(|x| e(&x))?;
            keys.identity
                .clone()
                .certify(&c, 1)
                .map(|_| ())
                .map_err(|x| e(&x))
        }
        "statement" => {
            let s = SignedStatement::decode(bytes).map_err(|x| e(&x))?;
            s.envelope()
                .verify(&keys.device)
                .map_err(|_| "signature".into())
        }
        "batch" => {
            let b = SignedBatch::decode(bytes).map_err(|x| e(&x))?;
            b.verify(&keys.device).map_err(|_| "signature".into())
        }
        "record" => SealedRecord::decode(bytes.to_vec())
            .map(|_| ())
            .map_err(|x| e(&x)),
        "entry-body" => EntryBody::decode(bytes).map(|_| ()).map_err(|x| e(&x)),
        "access-record" => {
            let r = AccessRecord::decode(bytes).map_err(|x| e(&x))?;
            keys.device
                .verify(
                    r.signature_base.as_bytes(),
                    &cmr_core::keys::Signature(r.signature),
                )
                .map_err(|_| "signature".to_string())?;
            let customer = r.bound_customer().ok_or("no vault in the signed path")?;
            r.check_binding(&customer)
        }
        "checkpoint" => {
            let note = std::str::from_utf8(bytes).map_err(|x| e(&x))?;
            cmr_log::checkpoint::open(note, &keys.log, &[], 0)
                .map(|_| ())
                .map_err(|x| e(&x))
        }
        other => Err(format!("unknown kind {other}")),
    }
}

/// The generic damage every binary object must survive being refused for.
fn damaged(valid: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    out.push(("truncated by one byte", valid[..valid.len() - 1].to_vec()));
    out.push(("cut in half", valid[..valid.len() / 2].to_vec()));
    let mut trailing = valid.to_vec();
    trailing.push(0);
    out.push(("a trailing byte", trailing));
    let mut magic = valid.to_vec();
    magic[0] ^= 0xff;
    out.push(("bad magic", magic));
    out.push(("empty", Vec::new()));
    out
}

/// A signed object with one bit of its signature (its last 64 bytes) flipped: it still decodes.
fn bad_signature(valid: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    let n = v.len();
    v[n - 1] ^= 1;
    v
}

fn generate() -> Value {
    let mut rng = rand::rng();
    let customer = create_identity(&mut rng, Role::Customer);
    let id = customer.inception.identity();
    let device = DeviceKeys::generate(&mut rng);
    let cert = device.certify(id, 0, &customer.identity_key, 1_800_000_000);
    let other = create_identity(&mut rng, Role::Company);
    let forged_cert = device.certify(id, 0, &other.identity_key, 1_800_000_000);
    let statement = SignedStatement::sign(
        Statement {
            customer: id,
            author: id,
            device: device.id(),
            issued_at: 1_800_000_000,
            body: Body::Block {
                company: other.inception.identity(),
                blocked: true,
            },
        },
        None,
        &device.signing,
    )
    .unwrap();
    let family: FamilyId = FamilyName::profile(Scope::ProfileContact).unwrap().id(&id);
    let secret = EpochSecret::generate(&mut rng);
    let period = Period::ORIGIN;
    let sealer = RecordSealer::new(id, family, 1, id, &secret.read_key(period), period).unwrap();
    let record = sealer
        .seal(&mut rng, RecordId([7; 16]), b"a vector's content")
        .unwrap();
    let batch = SignedBatch::sign(
        Batch::for_records(device.id(), Digest([0; 32]), std::slice::from_ref(&record)).unwrap(),
        &device.signing,
    );
    let entry = EntryBody {
        kind: EntryKind::Statement,
        time: 1_800_000_000,
        subject: id,
        customer: Some(id),
        prev: None,
        payload: statement.encode(),
    }
    .encode();
    let log = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::generate(&mut rng),
    )
    .unwrap();
    let impostor = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::generate(&mut rng),
    )
    .unwrap();
    let cp = Checkpoint {
        origin: "vault.example/log".into(),
        size: 42,
        root: [9; 32],
        extensions: vec![],
    };
    let note = cp.sign(&log);
    // A company's read as its client signs it (compact), and as a generic client with one more
    // parameter signs it (in full).
    let access = |extra: &str| {
        let (from, to) = (
            Period::from_year_month(2025, 6).unwrap(),
            Period::from_year_month(2026, 11).unwrap(),
        );
        let grant = cmr_core::consent::StatementId([5; 32]);
        let target = access_target(
            &id,
            &family,
            cmr_core::decision::AccessKind::Read,
            &grant,
            None,
            from,
            to,
        );
        let digest = cmr_core::httpsig::content_digest(b"{}");
        let req = cmr_core::httpsig::Request::new(
            "POST",
            "https",
            "vault.example",
            &target,
            vec![("content-digest", digest.as_str())],
        );
        let keyid = device.id().to_hex();
        let params =
            cmr_core::httpsig::SignatureParams::profile(1_800_000_000, &keyid, "vector-nonce")
                .unwrap();
        let base = cmr_core::httpsig::signature_base(&req, &params)
            .unwrap()
            .replace(";nonce=", &format!("{extra};nonce="));
        AccessRecord {
            grant,
            kind: cmr_core::decision::AccessKind::Read,
            epoch: None,
            families: vec![AccessedFamily { family, from, to }],
            records: vec![RecordId([7; 16])],
            keyid,
            signature: device.signing.sign(base.as_bytes()).0,
            signature_base: base,
            head: None,
        }
        .encode()
    };
    let (compact, full) = (access(""), access(";alg=\"ed25519\""));

    let mut cases = Vec::new();
    let mut case = |kind: &str, name: &str, bytes: &[u8], accept: bool| {
        cases.push(json!({
            "kind": kind, "name": name, "hex": hex::encode(bytes), "accept": accept
        }));
    };
    let binary: [(&str, Vec<u8>, bool); 8] = [
        ("key-event", customer.inception.encode(), true),
        ("device-certificate", cert.encode(), true),
        ("statement", statement.encode(), true),
        ("batch", batch.encode(), true),
        ("record", record.as_bytes().to_vec(), false),
        ("entry-body", entry.clone(), false),
        ("access-record", compact.clone(), true),
        ("access-record", full.clone(), true),
    ];
    for (kind, valid, signed) in &binary {
        case(kind, "valid", valid, true);
        for (name, bytes) in damaged(valid) {
            case(kind, name, &bytes, false);
        }
        if *signed {
            case(
                kind,
                "one bit of the signature flipped",
                &bad_signature(valid),
                false,
            );
        }
    }
    // Kind-specific negatives.
    case(
        "key-event",
        "another identity's inception (valid in itself, still accepted)",
        &other.inception.encode(),
        true,
    );
    case(
        "device-certificate",
        "signed by another identity's key",
        &forged_cert.encode(),
        false,
    );
    let mut unknown_kind = entry.clone();
    // The entry kind is the first field after the 6-byte framing header.
    unknown_kind[6] = 99;
    case("entry-body", "an unknown entry kind", &unknown_kind, false);
    let mut long_content = record.as_bytes().to_vec();
    let at = long_content.len() - (b"a vector's content".len() + 16) - 4;
    long_content[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    case(
        "record",
        "a content length past the limit",
        &long_content,
        false,
    );
    // A compact record whose signed authority was changed: the rebuilt base no longer verifies.
    let authority = compact
        .windows(b"vault.example".len())
        .position(|w| w == b"vault.example")
        .unwrap();
    let mut moved = compact.clone();
    moved[authority] = b'V';
    case(
        "access-record",
        "compact, the authority changed",
        &moved,
        false,
    );
    case("checkpoint", "valid", note.as_bytes(), true);
    case(
        "checkpoint",
        "signed by another key under the same name",
        cp.sign(&impostor).as_bytes(),
        false,
    );
    case(
        "checkpoint",
        "size changed after signing",
        note.replacen("\n42\n", "\n43\n", 1).as_bytes(),
        false,
    );
    case(
        "checkpoint",
        "without the blank line before the signatures",
        note.replacen("\n\n", "\n", 1).as_bytes(),
        false,
    );
    json!({
        "about": "CMR Vault format vectors: hex-encoded objects and whether a reader must accept them. \
                  See docs/formats.md for the formats and tests/tests/format_vectors.rs for what \
                  accepting means per kind.",
        "identity_key_event": hex::encode(customer.inception.encode()),
        "device_certificate": hex::encode(cert.encode()),
        "log_vkey": log.verifier().to_vkey(),
        "cases": cases,
    })
}

fn keys(file: &Value) -> Keys {
    let inception =
        SignedKeyEvent::decode(&hex::decode(file["identity_key_event"].as_str().unwrap()).unwrap())
            .unwrap();
    let identity = IdentityState::new(KeyHistory::incept(&inception, 0).unwrap());
    let cert = Signed::<DeviceCertificate>::decode(
        &hex::decode(file["device_certificate"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    Keys {
        identity,
        device: cert.body().signing_key,
        log: NoteVerifier::from_vkey(file["log_vkey"].as_str().unwrap()).unwrap(),
    }
}

#[test]
fn our_readers_agree_with_every_format_vector() {
    if std::env::var_os("CMR_UPDATE_VECTORS").is_some() {
        let fresh = generate();
        std::fs::write(FILE, serde_json::to_string_pretty(&fresh).unwrap() + "\n").unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(FILE).unwrap()).unwrap();
    let keys = keys(&file);
    let cases = file["cases"].as_array().unwrap();
    let mut negatives = 0;
    for c in cases {
        let (kind, name) = (c["kind"].as_str().unwrap(), c["name"].as_str().unwrap());
        let bytes = hex::decode(c["hex"].as_str().unwrap()).unwrap();
        let accept = c["accept"].as_bool().unwrap();
        let verdict = judge(kind, &bytes, &keys);
        assert_eq!(
            verdict.is_ok(),
            accept,
            "{kind} / {name}: expected {}, got {verdict:?}",
            if accept { "accept" } else { "refuse" }
        );
        negatives += usize::from(!accept);
    }
    assert!(
        negatives * 2 > cases.len(),
        "mostly negative: {negatives} of {}",
        cases.len()
    );
    // Each valid binary object round-trips byte for byte: the encoding is canonical.
    for c in cases.iter().filter(|c| c["accept"] == true) {
        let bytes = hex::decode(c["hex"].as_str().unwrap()).unwrap();
        let again = match c["kind"].as_str().unwrap() {
            "key-event" => SignedKeyEvent::decode(&bytes).unwrap().encode(),
            "device-certificate" => Signed::<DeviceCertificate>::decode(&bytes)
                .unwrap()
                .encode(),
            "statement" => SignedStatement::decode(&bytes).unwrap().encode(),
            "batch" => SignedBatch::decode(&bytes).unwrap().encode(),
            "record" => SealedRecord::decode(bytes.clone())
                .unwrap()
                .as_bytes()
                .to_vec(),
            "entry-body" => EntryBody::decode(&bytes).unwrap().encode(),
            "access-record" => AccessRecord::decode(&bytes).unwrap().encode(),
            _ => continue,
        };
        assert_eq!(again, bytes, "{} does not round-trip", c["kind"]);
    }
}
