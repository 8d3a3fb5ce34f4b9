//! kill -9 crash test: a child process runs a mixed load against a real store and prints every
//! acknowledgement; the parent kills it at a random moment with SIGKILL, reopens the store, and checks
//! that nothing acknowledged was lost and that the log is consistent. Rounds: CMR_CRASH_ROUNDS (10).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cmr_core::batch::SignedBatch;
use cmr_core::consent::{Access, AccessRequest, Body, Counterparty, Duration as Lasting};
use cmr_core::decision::DenyReason;
use cmr_core::family::Scope;
use cmr_core::hash::sha256;
use cmr_core::record::{RecordId, SealedRecord};
use cmr_log::auditor::Auditor;
use cmr_log::entry::{EntryBody, EntryKind};
use cmr_store::{Op, Store, StoreError};
use common::{T0, World, latest_checkpoint, log_key, open, p};

const CHILD: &str = "CMR_CRASH_CHILD";

/// The child: runs until killed. Not a test on its own (it returns at once without the variable).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD) else {
        return;
    };
    let store = Arc::new(open(
        std::path::Path::new(&dir),
        Arc::new(AtomicU64::new(T0)),
    ));
    let fresh = store.checkpoint().unwrap().is_none();
    let mut w = if fresh {
        World::setup(&*store)
    } else {
        World::existing()
    };
    let g = w.grant_statement(&*store).id();
    if fresh {
        store
            .execute(Op::Statement(w.grant_statement(&*store)))
            .unwrap();
        store.execute(w.revoke(g)).unwrap();
        println!("revoked {}", hex::encode(g.0));
    }
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let seed: u64 = std::process::id() as u64;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            let out = out.clone();
            let w = World::existing();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let req = AccessRequest {
                        scopes: vec![(Scope::ProfileContact, Access::Read)],
                        purpose: format!("load {seed}/{t}/{i}"),
                        duration: Lasting::OneTime,
                        lookback_months: 0,
                        counterparty: Counterparty::Any,
                    };
                    let s = w.statement(false, Body::Request(req), None);
                    let bytes = s.encode();
                    let ack = store.execute(Op::Statement(s)).unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {} {}", ack.index.unwrap(), sha256(&bytes).to_hex()).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    // One writer of signed record batches, following the family's head.
    let batches = {
        let store = store.clone();
        let out = out.clone();
        let w = World::existing();
        std::thread::spawn(move || {
            for i in 0u64.. {
                let origin = cmr_core::family::Period::ORIGIN;
                let head = w.head_of(&*store, w.contact, (origin, origin));
                let Op::WriteBatch {
                    batch,
                    records,
                    access,
                } = w.contact_batch(head, 2, (seed << 32) | i)
                else {
                    unreachable!()
                };
                let ack = store
                    .execute(Op::WriteBatch {
                        batch: batch.clone(),
                        records,
                        access,
                    })
                    .unwrap();
                let mut o = out.lock().unwrap();
                let bytes = batch.encode();
                writeln!(o, "ack {} {}", ack.index.unwrap(), sha256(&bytes).to_hex()).unwrap();
                o.flush().unwrap();
            }
        })
    };
    // A reader of the public log: every checkpoint it is served must survive the kill unchanged.
    {
        let store = store.clone();
        let out = out.clone();
        std::thread::spawn(move || {
            let mut last = None;
            loop {
                let cp = latest_checkpoint(&*store);
                if last != Some(cp.size) {
                    last = Some(cp.size);
                    let mut o = out.lock().unwrap();
                    writeln!(o, "seen {} {}", cp.size, hex::encode(cp.root)).unwrap();
                    o.flush().unwrap();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
    }
    // Reads under the revoked grant keep being refused, even while everything else runs.
    loop {
        let r = store.execute(w.read(g, p(2025, 6), T0));
        assert!(matches!(
            r,
            Err(StoreError::Denied(DenyReason::GrantRevoked(_)))
        ));
        std::thread::sleep(Duration::from_millis(5));
        if threads.iter().all(|t| t.is_finished()) || batches.is_finished() {
            break;
        }
    }
}

#[test]
fn nothing_acknowledged_is_lost_after_kill_9() {
    let rounds: usize = std::env::var("CMR_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut revoked = None;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        // Let it run for a random while, then SIGKILL (Child::kill sends SIGKILL on Unix).
        let wait = 150 + (rand::random::<u64>() % 400);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(wait) {
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            // The test harness may print "test crash_child ... " before the child's first line.
            let line = ["ack ", "revoked ", "seen "]
                .iter()
                .find_map(|k| line.find(k).map(|i| &line[i..]))
                .unwrap_or("");
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some("ack"), Some(i), Some(h)) => acked.push((i.parse().unwrap(), h.to_string())),
                (Some("revoked"), Some(g), None) => revoked = Some(g.to_string()),
                (Some("seen"), Some(size), Some(root)) => {
                    seen.push((size.parse().unwrap(), root.to_string()));
                }
                _ => {}
            }
        }
        // Reopen, reading every record back against its batch: the stored checkpoint must match the
        // stored tree (checked by open), every acknowledged entry must be there with the same bytes,
        // and the auditor must find nothing wrong.
        let store = common::open_checked(dir.path(), Arc::new(AtomicU64::new(T0)), true);
        for (index, hash) in &acked {
            let body = store
                .body(*index)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: acknowledged entry {index} lost"));
            let entry = cmr_log::entry::EntryBody::decode(&body.body).unwrap();
            assert_eq!(
                sha256(&entry.payload).to_hex(),
                *hash,
                "round {round}: entry {index} changed"
            );
        }
        // Every checkpoint a reader was served is still the log's state at that size: no rollback, no
        // fork, even for checkpoints whose writers were killed before their acknowledgement.
        for (size, root) in &seen {
            let now = store
                .root(*size)
                .unwrap_or_else(|e| panic!("round {round}: served checkpoint {size} lost: {e}"));
            assert_eq!(
                hex::encode(now),
                *root,
                "round {round}: served checkpoint {size} forked"
            );
        }
        let mut auditor = Auditor::new(log_key().verifier());
        let report = auditor.run(&mut &store).unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.violations);
        // The revoked grant stays revoked.
        let mut w = World::existing();
        let g = cmr_core::consent::StatementId(
            hex::decode(revoked.as_ref().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
        );
        assert!(matches!(
            store.execute(w.read(g, p(2025, 6), T0)),
            Err(StoreError::Denied(DenyReason::GrantRevoked(_)))
        ));
        drop::<Store>(store);
        records_match_their_entries(dir.path(), round);
    }
    assert!(!seen.is_empty(), "the child's reader saw no checkpoint");
    assert!(
        acked.len() > rounds,
        "the child acknowledged {} operations",
        acked.len()
    );
    println!(
        "store killed {rounds} times: {} acknowledged operations all present, {} served checkpoints \
         unchanged, auditor clean every round",
        acked.len(),
        seen.len()
    );
}

/// No record without its log entry, and no log entry without its records: in the closed store's folder,
/// every stored record names a family-head entry whose signed batch lists it, and every family-head
/// entry's batch has each of its records stored (the load erases nothing).
fn records_match_their_entries(path: &std::path::Path, round: usize) {
    use cmr_store::layout::tag;
    // Through the storage engine: the entries and records pieces live in files beside sled.
    let rows = |t: u8| common::engine_rows(path, t);
    let mut by_entry: HashMap<u64, Vec<RecordId>> = HashMap::new();
    for (k, piece) in rows(tag::RECORDS) {
        for v in cmr_store::layout::piece_records(&piece).unwrap() {
            assert!(
                v.len() > 8,
                "round {round}: a record in {k:?} has no entry index"
            );
            let entry = u64::from_be_bytes(v[..8].try_into().unwrap());
            let record = SealedRecord::decode(v[8..].to_vec()).unwrap();
            by_entry.entry(entry).or_default().push(record.header().id);
        }
    }
    let mut batches = 0;
    let entries = cmr_store::layout::entries_of_pieces(rows(tag::ENTRIES)).unwrap();
    for (index, v) in entries {
        let body = EntryBody::decode(&v[32..]).unwrap();
        if body.kind != EntryKind::FamilyHead {
            continue;
        }
        batches += 1;
        let batch = SignedBatch::decode(&body.payload).unwrap();
        let mut listed: Vec<RecordId> = batch.batch().entries.iter().map(|e| e.id).collect();
        let mut stored = by_entry.remove(&index).unwrap_or_default();
        listed.sort();
        stored.sort();
        assert_eq!(stored, listed, "round {round}: entry {index}'s records");
    }
    assert!(batches > 0, "round {round}: no batch was logged");
    assert!(
        by_entry.is_empty(),
        "round {round}: records of no logged batch, naming entries {:?}",
        by_entry.keys().collect::<Vec<_>>()
    );
}
