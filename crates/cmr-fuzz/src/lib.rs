//! The fuzz targets of CMR Vault: one function for every parser that sees untrusted bytes.
//!
//! Owns: the target bodies, each of which parses its input and, when the parser accepts it, checks an
//! invariant (a canonical encoding gives back the same bytes; a proof accepted for a root is the truth
//! about its leaves; a server answers bad input with a 4xx that changes nothing). cargo-fuzz runs them
//! (the `fuzz/` folder at the workspace root, outside the workspace, `RUSTC_BOOTSTRAP=1` on stable), and
//! `tests/replay.rs` runs every corpus and regression file through them as an ordinary test on stable.
//!
//! Does not own: the parsers themselves (cmr-core, cmr-log, cmr-server, and the SDK's read parser in cmr-client), nor the seed corpus's builder
//! (`examples/write-seeds.rs`, which drives a real flow and keeps the bytes it saw).
#![forbid(unsafe_code)]

mod read;
mod server;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::SignedBatch;
use cmr_core::consent::SignedStatement;
use cmr_core::directory::SignedDirectory;
use cmr_core::hash::sha256;
use cmr_core::httpsig;
use cmr_core::identity::{
    DeviceCertificate, DeviceRequest, DeviceRevocation, Signed, SignedKeyEvent,
};
use cmr_core::keyfile;
use cmr_core::keys::{SignedEnvelope, SigningKey};
use cmr_core::merkle;
use cmr_core::record::SealedRecord;
use cmr_log::checkpoint::{self, Checkpoint};
use cmr_log::entry::{AccessRecord, EntryBody};
use cmr_log::note::{Note, NoteSigner, NoteVerifier, TYPE_ED25519};

pub use read::{read_proof, read_proof_seeds};
pub use server::{Harness, request_body, valid_requests};

/// What a target made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A parser accepted it (and the target's invariant held).
    Accepted,
    /// Every parser refused it, with an error.
    Rejected,
}

impl Outcome {
    fn any(flags: &[bool]) -> Self {
        if flags.iter().any(|f| *f) {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        }
    }
}

/// A target: its input in, what it made of it out.
pub type Target = fn(&[u8]) -> Outcome;

/// Every target, by name, as cargo-fuzz and the corpus folders name them.
pub const TARGETS: [(&str, Target); 10] = [
    ("statement", statement),
    ("record", record),
    ("range_proof", range_proof),
    ("directory", directory),
    ("note", note),
    ("httpsig", httpsig_headers),
    ("keyfile", key_file),
    ("log_body", log_body),
    ("request_body", request_body),
    ("read_proof", read_proof),
];

/// Signed statements and the other signed identity objects: consent statements, key events, device
/// certificates and revocations, device requests, bare envelopes. Each canonical encoding re-encodes to
/// the input.
pub fn statement(data: &[u8]) -> Outcome {
    let st = SignedStatement::decode(data).map(|s| {
        assert_eq!(s.encode(), data, "a statement has one encoding");
        // The id is the hash of the core, whatever the bundle.
        let again = SignedStatement::decode(&s.encode()).expect("re-decodes");
        assert_eq!(again.id(), s.id());
    });
    let event = SignedKeyEvent::decode(data).map(|e| assert_eq!(e.encode(), data));
    let cert = Signed::<DeviceCertificate>::decode(data).map(|c| assert_eq!(c.encode(), data));
    let rev = Signed::<DeviceRevocation>::decode(data).map(|r| assert_eq!(r.encode(), data));
    let request = DeviceRequest::open(data);
    let envelope = SignedEnvelope::decode(data).map(|e| assert_eq!(e.encode(), data));
    Outcome::any(&[
        st.is_ok(),
        event.is_ok(),
        cert.is_ok(),
        rev.is_ok(),
        request.is_ok(),
        envelope.is_ok(),
    ])
}

/// Sealed records and signed batches: both re-encode to the input.
pub fn record(data: &[u8]) -> Outcome {
    let record = SealedRecord::decode(data.to_vec()).map(|r| assert_eq!(r.as_bytes(), data));
    let batch = SignedBatch::decode(data).map(|b| {
        assert_eq!(b.encode(), data, "a batch has one encoding");
    });
    Outcome::any(&[record.is_ok(), batch.is_ok()])
}

/// Signed key directories: re-encode to the input.
pub fn directory(data: &[u8]) -> Outcome {
    let dir = SignedDirectory::decode(data).map(|d| assert_eq!(d.encode(), data));
    Outcome::any(&[dir.is_ok()])
}

/// Log entry bodies and access records: re-encode to the input.
pub fn log_body(data: &[u8]) -> Outcome {
    let body = EntryBody::decode(data).map(|b| assert_eq!(b.encode(), data));
    let access = AccessRecord::decode(data).map(|a| assert_eq!(a.encode(), data));
    Outcome::any(&[body.is_ok(), access.is_ok()])
}

/// The log key the note target verifies against (its seeds are signed by it).
pub fn note_signer() -> NoteSigner {
    NoteSigner::new(
        "fuzz.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[3; 32]),
    )
    .expect("a valid key name")
}

/// Signed notes, checkpoints, and C2SP verifier and signer keys. A checkpoint text that parses prints back
/// the same; a key that parses prints back the same; a note that verifies was signed by the known key.
pub fn note(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    let known = note_signer().verifier();
    let parsed = Note::parse(text).map(|n| {
        // One way to write a note: its text, a blank line, a line per signature.
        let mut again = format!("{}\n", n.text);
        for sig in &n.signatures {
            let mut raw = sig.id.to_be_bytes().to_vec();
            raw.extend_from_slice(&sig.signature);
            again.push_str(&format!("\u{2014} {} {}\n", sig.name, B64.encode(raw)));
        }
        assert_eq!(again, text, "a note has one encoding");
        if let Ok(verified) = n.verify(std::slice::from_ref(&known)) {
            assert!(!verified.is_empty(), "a verified note names its signer");
        }
    });
    let cp = Checkpoint::parse_text(text).map(|c| assert_eq!(c.text(), text));
    let opened = checkpoint::open(text, &known, &[], 0).map(|v| {
        assert_eq!(v.checkpoint.origin, known.name());
    });
    // C2SP keys print back the same, but for the hex case of the key id: the id is a number, and the Go
    // reference (`strconv.ParseUint(…, 16, 32)`) reads either case too (the fuzzer's first finding).
    let vkey = NoteVerifier::from_vkey(text).map(|v| same_key_text(&v.to_vkey(), text));
    let skey = NoteSigner::from_skey(text).map(|s| same_key_text(&s.to_skey(), text));
    Outcome::any(&[
        parsed.is_ok(),
        cp.is_ok(),
        opened.is_ok(),
        vkey.is_ok(),
        skey.is_ok(),
    ])
}

/// `printed` is `parsed` with the key id's hex digits in lower case: `[PRIVATE+KEY+]name+id+key`, compared
/// part by part (names hold no `+`; the base64 key may).
fn same_key_text(printed: &str, parsed: &str) {
    let parts = |t: &str| -> Vec<String> {
        let (prefix, rest) = match t.strip_prefix("PRIVATE+KEY+") {
            Some(rest) => ("PRIVATE+KEY+", rest),
            None => ("", t),
        };
        let mut v = vec![prefix.to_string()];
        v.extend(rest.splitn(3, '+').map(str::to_string));
        v
    };
    let (a, b) = (parts(printed), parts(parsed));
    assert_eq!(a.len(), b.len(), "{printed} / {parsed}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if i == 2 {
            assert!(x.eq_ignore_ascii_case(y), "{printed} / {parsed}");
        } else {
            assert_eq!(x, y, "{printed} / {parsed}");
        }
    }
}

/// The device key the httpsig target's seeds are signed with.
pub fn http_signer() -> SigningKey {
    SigningKey::from_seed(&[4; 32])
}

/// The `created` time of the httpsig target's seeds, and its verifier's clock.
pub const HTTP_NOW: i64 = 1_794_700_800;

/// RFC 9421 headers: `Signature-Input`, `Signature` and `Content-Digest` (one line each) and the body
/// (the rest). Parsing and verification never panic; a request that verifies was signed by the known key
/// over exactly this body.
pub fn httpsig_headers(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Rejected;
    };
    let mut parts = text.splitn(4, '\n');
    let (input, sig, digest, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let parsed = httpsig::parse_signatures(input, sig);
    let digest_ok = httpsig::verify_content_digest(digest, body.as_bytes());
    let request = httpsig::Request::new(
        "POST",
        "http",
        "vault.test",
        "/v1/fuzz",
        vec![
            ("signature-input", input),
            ("signature", sig),
            ("content-digest", digest),
        ],
    );
    let key = http_signer().verifying_key();
    let window = httpsig::TimeWindow {
        now: HTTP_NOW,
        horizon: 0,
    };
    let verified = httpsig::verify_request(&request, body.as_bytes(), window, |_| Some(key));
    if verified.is_ok() {
        assert!(
            httpsig::verify_content_digest(digest, body.as_bytes()).is_ok(),
            "a verified request's body matches its digest"
        );
    }
    Outcome::any(&[parsed.is_ok(), digest_ok.is_ok(), verified.is_ok()])
}

/// The passphrase the keyfile target's seeds are sealed with.
pub const KEY_FILE_PASSPHRASE: &str = "fuzz passphrase";

/// Key files. The input is the file without its trailing SHA-256 checksum, which the target appends, so
/// that mutations reach the parser behind the checksum (the raw input is tried as is too). Unsafe KDF
/// parameters are refused before any Argon2 work.
pub fn key_file(data: &[u8]) -> Outcome {
    let raw = keyfile::open(data, KEY_FILE_PASSPHRASE);
    let mut fixed = data.to_vec();
    fixed.extend_from_slice(&sha256(data).0);
    let opened = keyfile::open(&fixed, KEY_FILE_PASSPHRASE);
    // What opens seals again and opens to the same keys.
    for contents in [&raw, &opened].into_iter().flatten() {
        let sealed = keyfile::seal(
            &mut rand::rng(),
            contents,
            KEY_FILE_PASSPHRASE,
            keyfile::KdfParams::MINIMUM,
        )
        .expect("sealing what was opened");
        let back = keyfile::open(&sealed, KEY_FILE_PASSPHRASE).expect("opening what was sealed");
        assert_eq!(
            (back.role, back.identity, back.device.id()),
            (contents.role, contents.identity, contents.device.id())
        );
    }
    Outcome::any(&[raw.is_ok(), opened.is_ok()])
}

/// Merkle proofs over a tree the target builds (1 to 64 leaves, from the first byte): range proofs of a
/// family's records, inclusion and consistency proofs of the log. The rest of the input edits a true
/// proof (flip a bit, drop, add or swap a hash, change the claimed range, a leaf or the old root); the
/// verifiers never panic, and whatever they accept for the true root and size is the truth.
pub fn range_proof(data: &[u8]) -> Outcome {
    let Some((&n, rest)) = data.split_first() else {
        return Outcome::Rejected;
    };
    let n = 1 + usize::from(n % 64);
    let leaves: Vec<merkle::Hash> = (0..n).map(|i| merkle::leaf_hash(&[i as u8])).collect();
    let root = merkle::root(&leaves);
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0);
    let lo = usize::from(byte(0)) % n;
    let hi = lo + 1 + usize::from(byte(1)) % (n - lo);
    let mut proof = merkle::range_proof(&leaves, lo, hi).expect("a valid range");
    let mut range = leaves[lo..hi].to_vec();
    let mut claimed_lo = lo;
    let index = usize::from(byte(2)) % n;
    let mut leaf = leaves[index];
    let mut inclusion = cmr_log_inclusion(&leaves, index);
    let old = 1 + usize::from(byte(3)) % n;
    let mut old_root = merkle::root(&leaves[..old]);
    let mut consistency = cmr_log_consistency(&leaves, old);
    for edit in rest.get(4..).unwrap_or_default().chunks(3) {
        let (op, a, b) = (
            edit[0],
            usize::from(*edit.get(1).unwrap_or(&0)),
            *edit.get(2).unwrap_or(&0),
        );
        let target = match op % 3 {
            0 => &mut proof,
            1 => &mut inclusion,
            _ => &mut consistency,
        };
        match (op / 3) % 7 {
            0 if !target.is_empty() => {
                let i = a % target.len();
                target[i][usize::from(b) % 32] ^= 1 << (b % 8);
            }
            1 if !target.is_empty() => {
                target.remove(a % target.len());
            }
            2 => target.push([b; 32]),
            3 if target.len() > 1 => {
                let len = target.len();
                target.swap(a % len, (a + 1) % len);
            }
            4 => claimed_lo = a % n,
            5 if !range.is_empty() => {
                let i = a % range.len();
                range[i][usize::from(b) % 32] ^= 1;
                leaf[usize::from(b) % 32] ^= 1;
            }
            6 => old_root[a % 32] ^= b | 1,
            _ => {}
        }
    }
    let r = merkle::verify_range(&root, n, claimed_lo, &range, &proof);
    if r.is_ok() {
        assert_eq!(
            range,
            leaves[claimed_lo..claimed_lo + range.len()],
            "a range proof accepted leaves that are not the tree's"
        );
    }
    let i = cmr_log::verify::verify_inclusion(index as u64, n as u64, &leaf, &inclusion, &root);
    if i.is_ok() {
        assert_eq!(
            leaf, leaves[index],
            "an inclusion proof accepted another leaf"
        );
    }
    let c =
        cmr_log::verify::verify_consistency(old as u64, n as u64, &old_root, &root, &consistency);
    if c.is_ok() {
        assert_eq!(
            old_root,
            merkle::root(&leaves[..old]),
            "a consistency proof accepted another old root"
        );
    }
    Outcome::any(&[r.is_ok(), i.is_ok(), c.is_ok()])
}

/// The log's inclusion proof of leaf `index`, from the log crate's in-memory tree.
fn cmr_log_inclusion(leaves: &[merkle::Hash], index: usize) -> Vec<merkle::Hash> {
    let tree = memory_tree(leaves);
    tree.inclusion_proof(index as u64, leaves.len() as u64)
        .expect("a valid index")
}

/// The log's consistency proof from `old` leaves to all of them.
fn cmr_log_consistency(leaves: &[merkle::Hash], old: usize) -> Vec<merkle::Hash> {
    let tree = memory_tree(leaves);
    tree.consistency_proof(old as u64, leaves.len() as u64)
        .expect("valid sizes")
}

fn memory_tree(leaves: &[merkle::Hash]) -> cmr_log::tree::Tree<cmr_log::tree::MemoryNodes> {
    let mut tree = cmr_log::tree::Tree::new(cmr_log::tree::MemoryNodes::default());
    for l in leaves {
        tree.append(*l).expect("in memory");
    }
    tree
}
