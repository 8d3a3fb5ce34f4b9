//! Snapshots taken while the store serves, and restores that check what they restore.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cmr_core::batch::Head;
use cmr_core::consent::{Body, ErasureTarget};
use cmr_core::family::Period;
use cmr_log::auditor::Auditor;
use cmr_log::restore::Restored;
use cmr_store::store::snapshot::SnapshotSummary;
use cmr_store::{Op, SledStorage, Store, StoreConfig, StoreError};
use common::{T0, World, latest_checkpoint, log_key, open, p};

fn config(path: &Path, clock: Arc<AtomicU64>) -> StoreConfig {
    let mut cfg = StoreConfig::new(path, log_key());
    cfg.cache_capacity = 16 * 1024 * 1024;
    cfg.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    cfg
}

fn restore_into(path: &Path, snapshot: &[u8]) -> Result<(Store, SnapshotSummary), StoreError> {
    let cfg = config(path, Arc::new(AtomicU64::new(T0 + 100)));
    let rows = Arc::new(SledStorage::open(&cfg)?);
    Store::restore(rows, snapshot, cfg)
}

/// The customer's own read of a whole family.
fn own_read(w: &World, family: cmr_core::family::FamilyId) -> Op {
    let periods = if family == w.contact {
        (Period::ORIGIN, Period::ORIGIN)
    } else {
        (p(2025, 1), p(2026, 12))
    };
    w.own_read(family, periods)
}

/// A vault with records in two families, a grant used by a read, a key backup, and one family erased.
fn vault(store: &Store) -> World {
    let mut w = World::setup(store);
    let g = w.grant(store);
    let tx0 = Head::empty(w.customer.id, w.tx).digest();
    let c0 = Head::empty(w.customer.id, w.contact).digest();
    store
        .execute(w.customer_batch(tx0, p(2026, 1), 4, 1))
        .unwrap();
    store.execute(w.contact_batch(c0, 2, 2)).unwrap();
    store.execute(w.read(g, p(2025, 6), T0)).unwrap();
    store
        .execute(Op::PutBackup {
            customer: w.customer.id,
            version: 1,
            bytes: b"sealed by the customer's client".to_vec(),
        })
        .unwrap();
    w
}

#[test]
fn a_snapshot_taken_while_serving_restores_the_same_log_and_says_it_was_restored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let store = open(&dir.path().join("live"), clock.clone());
    let w = vault(&store);
    let at_snapshot = latest_checkpoint(&store);
    let chain_head = store.customer_head(&w.customer.id).unwrap();
    let mut snapshot = Vec::new();
    let summary = store.snapshot(&mut snapshot).unwrap();
    assert_eq!(summary.size, at_snapshot.size);
    assert_eq!(summary.root, at_snapshot.root);
    assert_eq!(summary.records, 6);
    assert_eq!(summary.backups, 1);
    assert_eq!(summary.bytes, snapshot.len() as u64);
    // The vault goes on after the snapshot: these are lost by a restore.
    let head = w.head_of(&store, w.tx, (p(2025, 1), p(2026, 12)));
    store
        .execute(w.customer_batch(head, p(2026, 2), 3, 3))
        .unwrap();
    assert!(latest_checkpoint(&store).size > summary.size);

    let (restored, told) = restore_into(&dir.path().join("restored"), &snapshot).unwrap();
    assert_eq!(told, summary);
    let cp = latest_checkpoint(&restored);
    assert_eq!((cp.size, cp.root), (summary.size, summary.root));
    // The records of the prefix, the key backup, and the chain the company's read used are back.
    let read = restored.execute(own_read(&w, w.tx)).unwrap().read.unwrap();
    assert_eq!(read.records.len(), 4);
    let read = restored
        .execute(own_read(&w, w.contact))
        .unwrap()
        .read
        .unwrap();
    assert_eq!(read.records.len(), 2);
    assert_eq!(restored.backup(&w.customer.id).unwrap().unwrap().0, 1);
    assert_eq!(restored.customer_head(&w.customer.id).unwrap(), chain_head);
    assert_eq!(
        restored.directory(&w.customer.id).unwrap(),
        store.directory(&w.customer.id).unwrap()
    );
    // Its own note says so, signed with the log key.
    let note = restored.restored().unwrap().unwrap();
    let r = Restored::open(&note, &log_key().verifier()).unwrap();
    assert_eq!(
        (r.size, r.root, r.time),
        (summary.size, summary.root, T0 + 100)
    );
    assert!(store.restored().unwrap().is_none());
    // It serves on: the family's head is the one the snapshot held, and a new batch extends it.
    let head = w.head_of(&restored, w.tx, (p(2025, 1), p(2026, 12)));
    restored
        .execute(w.customer_batch(head, p(2026, 3), 1, 4))
        .unwrap();
    let mut auditor = Auditor::new(log_key().verifier());
    assert!(auditor.run(&mut &restored).unwrap().is_clean());
    // And it opens again like any store.
    drop(restored);
    let again = Store::open(config(
        &dir.path().join("restored"),
        Arc::new(AtomicU64::new(T0 + 200)),
    ))
    .unwrap();
    assert_eq!(latest_checkpoint(&again).size, summary.size + 1);
    assert!(again.restored().unwrap().is_some());
}

#[test]
fn an_erased_family_stays_erased_in_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("live"), Arc::new(AtomicU64::new(T0)));
    let w = vault(&store);
    store
        .execute(Op::Statement(w.statement(
            true,
            Body::Erasure(ErasureTarget::Family(w.tx)),
            None,
        )))
        .unwrap();
    let mut snapshot = Vec::new();
    let summary = store.snapshot(&mut snapshot).unwrap();
    assert_eq!(summary.records, 2);
    let (restored, _) = restore_into(&dir.path().join("restored"), &snapshot).unwrap();
    assert!(matches!(
        restored.execute(own_read(&w, w.tx)),
        Err(StoreError::Denied(_))
    ));
    assert_eq!(
        restored
            .execute(own_read(&w, w.contact))
            .unwrap()
            .read
            .unwrap()
            .records
            .len(),
        2
    );
}

/// Restoring `snapshot` into `path` must be refused with an error that says `says`.
fn refused_into(path: &Path, snapshot: &[u8], says: &str) {
    let err = restore_into(path, snapshot)
        .err()
        .unwrap_or_else(|| panic!("restored a snapshot that should fail with {says:?}"));
    assert!(
        err.to_string().contains(says),
        "expected {says:?} in: {err}"
    );
}

/// Every row frame of `tag` in the snapshot, whole.
fn row_frames(snapshot: &[u8], tag: u8) -> Vec<Vec<u8>> {
    let mut at = cmr_store::store::snapshot::MAGIC.len();
    let mut out = Vec::new();
    while at < snapshot.len() {
        let len = u32::from_be_bytes(snapshot[at + 1..at + 5].try_into().unwrap()) as usize;
        if snapshot[at] == b'r' && snapshot[at + 9] == tag {
            out.push(snapshot[at..at + 5 + len].to_vec());
        }
        at += 5 + len;
    }
    out
}

/// Adds row frames before the snapshot's end, counts them, and re-seals it, as a forger would.
fn smuggle(snapshot: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
    let end = snapshot.len() - (5 + 8 + 32);
    let mut out = snapshot[..end].to_vec();
    for f in frames {
        out.extend_from_slice(f);
    }
    out.extend_from_slice(&snapshot[end..]);
    let end = out.len() - (5 + 8 + 32);
    let rows = u64::from_be_bytes(out[end + 5..end + 13].try_into().unwrap()) + frames.len() as u64;
    out[end + 5..end + 13].copy_from_slice(&rows.to_be_bytes());
    reseal(&mut out);
    out
}

/// Records nothing in the log accounts for are refused: an erased family's records from an older
/// snapshot (erased data would come back), a record at a place no batch wrote, and a record that
/// names another batch than the one that wrote its place.
#[test]
fn records_no_batch_accounts_for_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("live"), Arc::new(AtomicU64::new(T0)));
    let w = vault(&store);
    let mut before = Vec::new();
    store.snapshot(&mut before).unwrap();
    store
        .execute(Op::Statement(w.statement(
            true,
            Body::Erasure(ErasureTarget::Family(w.tx)),
            None,
        )))
        .unwrap();
    let mut after = Vec::new();
    store.snapshot(&mut after).unwrap();
    let tag = cmr_store::layout::tag::RECORD;
    let kept = row_frames(&after, tag);
    let erased: Vec<Vec<u8>> = row_frames(&before, tag)
        .into_iter()
        .filter(|f| !kept.contains(f))
        .collect();
    assert_eq!(erased.len(), 4, "the transactions' records");
    let mut n = 0;
    let mut refused = |bytes: &[u8], says: &str| {
        n += 1;
        refused_into(&dir.path().join(format!("r{n}")), bytes, says);
    };
    refused(&smuggle(&after, &erased), "erased data back");
    // A copy of a kept record at a place past what its family's batches wrote (its last key byte).
    let mut extra = kept[0].clone();
    let klen = u32::from_be_bytes(extra[5..9].try_into().unwrap()) as usize;
    extra[9 + klen - 1] = 99;
    refused(&smuggle(&after, &[extra]), "no batch in the log wrote");
    // A kept record whose value names another batch (its first 8 bytes).
    let mut others = after.clone();
    let (_, value) = first_row(&others, tag);
    others[value + 7] ^= 1;
    reseal(&mut others);
    refused(&others, "names the batch at");
    // The honest snapshot still restores.
    restore_into(&dir.path().join("honest"), &after).unwrap();
}

/// Where in the snapshot a row of `tag` starts (the first one), and its value's offset in the frame.
fn first_row(snapshot: &[u8], tag: u8) -> (usize, usize) {
    let mut at = cmr_store::store::snapshot::MAGIC.len();
    loop {
        let len = u32::from_be_bytes(snapshot[at + 1..at + 5].try_into().unwrap()) as usize;
        if snapshot[at] == b'r' {
            let klen = u32::from_be_bytes(snapshot[at + 5..at + 9].try_into().unwrap()) as usize;
            if snapshot[at + 9] == tag {
                return (at, at + 9 + klen);
            }
        }
        at += 5 + len;
    }
}

/// Re-seals the snapshot's end (row count and digest) after a change, as a forger would.
fn reseal(snapshot: &mut [u8]) {
    let end = snapshot.len() - (5 + 8 + 32);
    let digest = cmr_core::hash::sha256(&snapshot[..end]);
    snapshot[end + 13..].copy_from_slice(&digest.0);
}

#[test]
fn a_damaged_cut_forged_or_foreign_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("live"), Arc::new(AtomicU64::new(T0)));
    vault(&store);
    let mut good = Vec::new();
    store.snapshot(&mut good).unwrap();
    let mut n = 0;
    let mut refused = |bytes: &[u8], says: &str| {
        n += 1;
        refused_into(&dir.path().join(format!("r{n}")), bytes, says);
    };
    // Cut short, or one byte flipped anywhere: the digest at the end.
    refused(&good[..good.len() - 1], "cut short");
    refused(&good[..good.len() / 2], "cut short");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    refused(&flipped, "digest");
    refused(b"not a snapshot at all", "not a whole snapshot");
    // A body changed and the digest re-sealed: the tree no longer has the signed root.
    let mut forged = good.clone();
    let (_, value) = first_row(&forged, cmr_store::layout::tag::BODY);
    forged[value] ^= 1;
    reseal(&mut forged);
    refused(&forged, "root");
    // A record changed and re-sealed: it no longer matches its batch.
    let mut forged = good.clone();
    let (frame, _) = first_row(&forged, cmr_store::layout::tag::RECORD);
    let len = u32::from_be_bytes(forged[frame + 1..frame + 5].try_into().unwrap()) as usize;
    forged[frame + 5 + len - 1] ^= 1;
    reseal(&mut forged);
    refused(&forged, "does not replay");
    // A record left out and re-sealed: its batch's records are missing and the family was not erased.
    let mut forged = good.clone();
    let (frame, _) = first_row(&forged, cmr_store::layout::tag::RECORD);
    let len = u32::from_be_bytes(forged[frame + 1..frame + 5].try_into().unwrap()) as usize;
    forged.drain(frame..frame + 5 + len);
    let end = forged.len() - (5 + 8 + 32);
    let rows = u64::from_be_bytes(forged[end + 5..end + 13].try_into().unwrap()) - 1;
    forged[end + 5..end + 13].copy_from_slice(&rows.to_be_bytes());
    reseal(&mut forged);
    refused(&forged, "missing");

    // Another log's key: the checkpoint does not open.
    let other = cmr_log::note::NoteSigner::new(
        "vault.example/log",
        cmr_log::note::TYPE_ED25519,
        cmr_core::keys::SigningKey::from_seed(&[9; 32]),
    )
    .unwrap();
    let path = dir.path().join("other");
    let mut cfg = StoreConfig::new(&path, other);
    cfg.cache_capacity = 16 * 1024 * 1024;
    let rows = Arc::new(SledStorage::open(&cfg).unwrap());
    let err = Store::restore(rows, &good[..], cfg).err().unwrap();
    assert!(err.to_string().contains("log key"), "{err}");

    // A destination that holds data is refused before anything is read.
    drop(store);
    let err = restore_into(&dir.path().join("live"), &good).err().unwrap();
    assert!(err.to_string().contains("already holds data"), "{err}");
}

#[test]
fn snapshots_taken_while_batches_keep_arriving_each_restore_a_consistent_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir.path().join("live"), Arc::new(AtomicU64::new(T0))));
    let w = vault(&store);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let w = World::existing();
            let mut n = 10;
            while !stop.load(Ordering::SeqCst) {
                let head = w.head_of(&*store, w.tx, (p(2025, 1), p(2026, 12)));
                store
                    .execute(w.customer_batch(head, p(2026, 4), 2, n))
                    .unwrap();
                n += 1;
            }
            n - 10
        })
    };
    let mut sizes = Vec::new();
    for i in 0..5 {
        let mut snapshot = Vec::new();
        let summary = store.snapshot(&mut snapshot).unwrap();
        let (restored, _) = restore_into(&dir.path().join(format!("r{i}")), &snapshot).unwrap();
        let records = restored
            .execute(own_read(&w, w.tx))
            .unwrap()
            .read
            .unwrap()
            .records
            .len();
        // Every batch of the prefix has its records, and none of a batch past it.
        assert_eq!((records - 4) % 2, 0, "{records}");
        sizes.push((summary.size, records));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let batches = writer.join().unwrap();
    assert!(batches > 0);
    assert!(sizes.windows(2).all(|s| s[0] <= s[1]), "{sizes:?}");
}

/// A restore writes the indexes it rebuilds in chunks (here of 3 rows, so every entry's rows are cut
/// across writes): the restored store answers every index as the live one does.
#[test]
fn indexes_rebuilt_in_small_chunks_answer_as_the_live_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("live"), Arc::new(AtomicU64::new(T0)));
    let w = vault(&store);
    let mut snapshot = Vec::new();
    store.snapshot(&mut snapshot).unwrap();
    let mut cfg = config(
        &dir.path().join("restored"),
        Arc::new(AtomicU64::new(T0 + 100)),
    );
    cfg.index_chunk_rows = 3;
    let rows = Arc::new(SledStorage::open(&cfg).unwrap());
    let (restored, _) = Store::restore(rows, &snapshot[..], cfg).unwrap();
    let (c, a) = (w.customer.id, w.acme.id);
    assert_eq!(
        restored.customer_head(&c).unwrap(),
        store.customer_head(&c).unwrap()
    );
    assert!(restored.customer_head(&c).unwrap().is_some());
    for party in [c, a] {
        assert_eq!(
            restored.party_entries(&c, &party, None, 1000).unwrap(),
            store.party_entries(&c, &party, None, 1000).unwrap()
        );
        assert_eq!(
            restored.key_events(&party).unwrap(),
            store.key_events(&party).unwrap()
        );
        assert_eq!(
            restored.feed(&party, None, 1000).unwrap(),
            store.feed(&party, None, 1000).unwrap()
        );
    }
    assert_eq!(
        restored.vaults_of(&a, None, 1000).unwrap(),
        store.vaults_of(&a, None, 1000).unwrap()
    );
    assert!(!store.feed(&a, None, 1000).unwrap().0.is_empty());
    assert_eq!(
        restored.pending_requests(&c).unwrap(),
        store.pending_requests(&c).unwrap()
    );
}
