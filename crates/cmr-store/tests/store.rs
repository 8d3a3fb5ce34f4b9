//! The store's whole API against real sled in temporary folders.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cmr_core::batch::verify_read;
use cmr_core::consent::{Access, AccessRequest, Body, Counterparty, Duration as Lasting};
use cmr_core::decision::{AccessKind, DenyReason};
use cmr_core::family::Period;
use cmr_core::family::Scope;
use cmr_core::identity::IdentityId;
use cmr_core::identity::Role;
use cmr_log::auditor::Auditor;
use cmr_log::note::NoteSigner;
use cmr_log::verify::verify_inclusion;
use cmr_store::{Op, Store, StoreConfig, StoreError};
use common::{T0, World, latest_checkpoint, log_key, open, p};

#[test]
fn the_whole_flow_is_logged_proven_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let store = open(dir.path(), clock.clone());
    let mut w = World::setup(&store);
    let g = w.grant(&store);

    // The customer writes a batch; the ack carries a proof into a durable checkpoint.
    let head0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    let ack = store
        .execute(w.customer_batch(head0, p(2026, 1), 5, 1))
        .unwrap();
    let cp = cmr_log::checkpoint::open(&ack.checkpoint, &log_key().verifier(), &[], 0)
        .unwrap()
        .checkpoint;
    let index = ack.index.unwrap();
    let leaf = cmr_log::entry::commitment_leaf(&store.commitments(index, index + 1).unwrap()[0]);
    verify_inclusion(index, cp.size, &leaf, &ack.proof, &cp.root).unwrap();

    // Acme reads: the access is logged first, and the read proves complete.
    let ack = store.execute(w.read(g, p(2025, 6), T0)).unwrap();
    assert!(ack.index.is_some());
    let read = ack.read.unwrap();
    assert_eq!(read.records.len(), 5);
    let cust_key = w.customer.device.signing.verifying_key();
    verify_read(
        &read.proof.head.digest(),
        &read.proof,
        &read.sealed_records().unwrap(),
        &read.signed_batches().unwrap(),
        |_| Some(cust_key),
        None,
    )
    .unwrap();

    // Acme appends to its own family.
    let head = read.proof.head.digest();
    let key = w.secret_tx.append_key(&w.acme.id, p(2026, 2));
    let rec =
        cmr_core::record::RecordSealer::new(w.customer.id, w.tx, 1, w.acme.id, &key, p(2026, 2))
            .unwrap()
            .seal(
                &mut rand::rng(),
                cmr_core::record::RecordId([9; 16]),
                b"invoice",
            )
            .unwrap();
    let batch =
        cmr_core::batch::Batch::for_records(w.acme.device.id(), head, std::slice::from_ref(&rec))
            .unwrap();
    let access = w.access(g, AccessKind::Append, w.tx, p(2026, 2), p(2026, 2), T0);
    store
        .execute(Op::WriteBatch {
            batch: cmr_core::batch::SignedBatch::sign(batch, &w.acme.device.signing),
            records: vec![rec],
            access: Some(access),
        })
        .unwrap();

    // Revocation: later reads are refused, appends wait for the rotation.
    store.execute(w.revoke(g)).unwrap();
    assert_eq!(
        store.execute(w.read(g, p(2025, 6), T0)).unwrap_err(),
        StoreError::Denied(DenyReason::GrantRevoked(ack.index.unwrap() + 3))
    );
    // The customer's own writes wait too: the revoked company holds the current epoch's keys.
    let current = store
        .execute(w.own_read(w.tx, (p(2025, 1), p(2026, 12))))
        .unwrap();
    let err = store
        .execute(w.customer_batch(current.read.unwrap().proof.head.digest(), p(2026, 3), 1, 2))
        .unwrap_err();
    assert_eq!(err, StoreError::Denied(DenyReason::RotationPending(w.tx)));

    // An auditor, reading the store, finds nothing wrong.
    let mut auditor = Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &store).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.counts["access"], 2);
    // The rules used only the working set they name, entry by entry.
    assert_eq!(
        common::replay_with_working_sets(&store),
        latest_checkpoint(&store).size
    );
}

#[test]
fn writes_are_idempotent_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let grant = w.grant_statement(&store);
    let first = store.execute(Op::Statement(grant.clone())).unwrap();
    // The same signed body again: the original index, nothing logged twice.
    let again = store.execute(Op::Statement(grant.clone())).unwrap();
    assert!(again.repeated);
    assert_eq!(again.index, first.index);
    assert_eq!(again.size, first.size);
    // Another body under the same id (the grant resealed): a conflict, and nothing changes.
    let other = w.reseal(&grant);
    assert_eq!(other.id(), grant.id());
    assert_eq!(
        store.execute(Op::Statement(other)).unwrap_err(),
        StoreError::Conflict
    );
    assert_eq!(store.checkpoint().unwrap().unwrap(), first.checkpoint);
}

#[test]
fn reopening_rebuilds_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (g, size) = {
        let store = open(dir.path(), clock.clone());
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        let head0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
        store
            .execute(w.customer_batch(head0, p(2026, 1), 4, 1))
            .unwrap();
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
        let ack = store.execute(w.revoke(g)).unwrap();
        (g, ack.size)
    };
    let store = open(dir.path(), clock);
    let mut w = World::existing();
    // The family's records and head came back: the customer's own read finds all four.
    let own = store
        .execute(w.own_read(w.tx, (p(2025, 1), p(2026, 12))))
        .unwrap();
    assert_eq!(own.read.unwrap().records.len(), 4);
    // The revoked grant stays revoked, and the stored checkpoint matches the stored tree.
    assert!(matches!(
        store.execute(w.read(g, p(2025, 6), T0)),
        Err(StoreError::Denied(DenyReason::GrantRevoked(_)))
    ));
    let cp = store.checkpoint().unwrap().unwrap();
    let v = cmr_log::checkpoint::open(&cp, &log_key().verifier(), &[], 0)
        .unwrap()
        .checkpoint;
    assert_eq!(v.size, size);
    assert_eq!(v.root, store.root(size).unwrap());
    let mut auditor = Auditor::new(log_key().verifier());
    assert!(auditor.run(&mut &store).unwrap().is_clean());
}

#[test]
fn bad_input_changes_nothing() {
    // Bytes that do not decode never become operations (the server refuses them at the edge); what
    // decodes but breaks a rule is refused here, and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let before = store.checkpoint().unwrap();
    let (_, stranger, stranger_cert) = common::party(cmr_core::identity::Role::Customer, 9);
    let head = w.head_of(&store, w.contact, (Period::ORIGIN, Period::ORIGIN));
    let Op::WriteBatch { batch, records, .. } = w.contact_batch(head, 2, 77) else {
        unreachable!()
    };
    let mut short = records.clone();
    short.pop();
    for (op, what) in [
        (
            Op::Certify(stranger_cert),
            "a device of an unknown identity",
        ),
        (Op::Rotate(stranger), "an inception sent as a rotation"),
        (
            Op::WriteBatch {
                batch,
                records: short,
                access: None,
            },
            "a batch without one of its records",
        ),
    ] {
        let e = store.execute(op).unwrap_err();
        assert!(!e.is_internal(), "{what}: {e}");
    }
    assert_eq!(store.checkpoint().unwrap(), before);
}

#[test]
fn a_newer_or_damaged_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    }
    {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        t.insert(cmr_store::layout::META_FORMAT, &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let mut cfg = cmr_store::StoreConfig::new(dir.path(), log_key());
    cfg.cache_capacity = 16 * 1024 * 1024;
    assert!(matches!(
        cmr_store::Store::open(cfg),
        Err(StoreError::Format(m)) if m.contains("format 99")
    ));
}

/// Rewrites a store's entries from index `from` on as formats 3 to 5 kept them (a row per body, per
/// leaf commitment and per tree node, level 0 included as format 3 wrote it), and marks the folder
/// `format`: with `from` past 0, the state of a move into pieces that was cut after its first chunks.
fn to_rows_per_entry(path: &std::path::Path, from: u64, format: u32) {
    use cmr_log::entry::{commitment, commitment_leaf};
    use cmr_log::tree::{MemoryNodes, NodeStore, Tree};
    use cmr_store::Storage as _;
    use cmr_store::layout::{self, tag};
    // Through the storage engine: the entries pieces live in their own file beside sled.
    let engine = cmr_store::SledStorage::open_folder(path, 16 << 20).unwrap();
    let mut writes = cmr_store::storage::Writes::new();
    let mut tree = Tree::new(MemoryNodes::default());
    let pieces = engine.scan_prefix(&[tag::ENTRIES]).map(Result::unwrap);
    for (i, salted) in layout::entries_of_pieces(pieces).unwrap() {
        let c = commitment(salted[..32].try_into().unwrap(), &salted[32..]);
        tree.append(commitment_leaf(&c)).unwrap();
        if i >= from {
            writes.insert(layout::indexed(tag::BODY, i), Some(salted.to_vec()));
            writes.insert(layout::indexed(tag::LEAF, i), Some(c.0.to_vec()));
        }
    }
    for table in [tag::ENTRIES, tag::NODES] {
        for kv in engine.scan_prefix(&[table]) {
            let (k, _) = kv.unwrap();
            if u64::from_be_bytes(k[1..9].try_into().unwrap()) >= from {
                writes.insert(k, None);
            }
        }
    }
    let size = tree.size().unwrap();
    for level in 0..64u8 {
        for index in 0..size >> level {
            let last = ((index + 1) << level) - 1;
            if last >= from {
                let h = tree.store().node(level, index).unwrap().unwrap();
                writes.insert(layout::node(level, index), Some(h.to_vec()));
            }
        }
    }
    writes.insert(
        layout::META_FORMAT.to_vec(),
        Some(format.to_be_bytes().to_vec()),
    );
    engine.write(writes).unwrap();
    engine.sync(size, &tree.root(size).unwrap(), "").unwrap();
}

/// A folder of an earlier format, which kept a row per entry, per leaf and per tree node, opens: its
/// rows are moved into pieces (also when an earlier move was cut short), the log, its root, its
/// proofs and its bodies are the same, and nothing of the old rows is left.
/// A store in `path` where the customer granted Acme and Acme read 150 times (enough entries for
/// several pieces and chunks), closed: its size, root, the grant, and every entry's body.
fn granted_and_read(
    path: &std::path::Path,
    clock: &Arc<AtomicU64>,
) -> (
    u64,
    cmr_core::merkle::Hash,
    cmr_core::consent::StatementId,
    Vec<Option<cmr_log::entry::SaltedBody>>,
) {
    let store = open(path, clock.clone());
    let mut w = World::setup(&store);
    let g = w.grant(&store);
    for _ in 0..150 {
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
    }
    let cp = latest_checkpoint(&store);
    let bodies = (0..cp.size).map(|i| store.body(i).unwrap()).collect();
    (cp.size, cp.root, g, bodies)
}

#[test]
fn a_folder_with_a_row_per_entry_is_moved_into_pieces() {
    use cmr_store::layout::{self, tag};
    for (from, format) in [(0u64, 5u32), (0, 3), (64, 5)] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let (size, root, _, bodies) = granted_and_read(dir.path(), &clock);
        assert!(size > 150);
        to_rows_per_entry(dir.path(), from, format);
        let store = open(dir.path(), clock.clone());
        let cp = latest_checkpoint(&store);
        assert_eq!(
            (cp.size, cp.root),
            (size, root),
            "from {from}, format {format}"
        );
        assert_eq!(store.root(size).unwrap(), root);
        for i in [0, 1, 63, 64, 65, 127, 128, size - 1] {
            assert_eq!(store.body(i).unwrap(), bodies[i as usize], "entry {i}");
            let proof = store.inclusion_proof(i, size).unwrap();
            let leaf = cmr_log::entry::commitment_leaf(&store.commitments(i, i + 1).unwrap()[0]);
            verify_inclusion(i, size, &leaf, &proof, &root).unwrap();
        }
        let mut auditor = Auditor::new(log_key().verifier());
        let report = auditor.run(&mut &store).unwrap();
        assert!(report.is_clean(), "{report:?}");
        drop(store);
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        for old in [tag::BODY, tag::LEAF, tag::NODE] {
            assert_eq!(t.scan_prefix([old]).count(), 0, "table {old} left behind");
        }
        assert_eq!(
            t.get(layout::META_FORMAT).unwrap().unwrap().as_ref(),
            &layout::FORMAT_VERSION.to_be_bytes()
        );
    }
}

/// A folder of format 9 kept its entries pieces as their bytes. Format 10 reads them as they are, and
/// compresses the pieces it writes after them, in the same chunk too (against the plain ones): every
/// entry reads back, proofs and the audit hold, and the folder is marked with the new format.
#[test]
fn a_folder_of_format_9_keeps_its_plain_pieces_and_compresses_the_next() {
    use cmr_store::Storage as _;
    use cmr_store::layout::{self, tag};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (size, root, g, bodies_before) = granted_and_read(dir.path(), &clock);
    {
        // As format 9 wrote them: each piece its bytes, under the same key.
        let engine = cmr_store::SledStorage::open_folder(dir.path(), 16 << 20).unwrap();
        let pieces: Vec<_> = engine
            .scan_prefix(&[tag::ENTRIES])
            .map(Result::unwrap)
            .collect();
        assert!(pieces.len() > 3);
        let firsts: Vec<u64> = pieces
            .iter()
            .map(|(k, _)| u64::from_be_bytes(k[1..9].try_into().unwrap()))
            .collect();
        let entries = layout::entries_of_pieces(pieces).unwrap();
        let mut writes = cmr_store::storage::Writes::new();
        for (n, first) in firsts.iter().enumerate() {
            let end = firsts.get(n + 1).copied().unwrap_or(u64::MAX);
            let mut plain = Vec::new();
            for (_, salted) in entries.iter().filter(|(i, _)| (*first..end).contains(i)) {
                layout::push_piece_entry(&mut plain, salted);
            }
            writes.insert(layout::indexed(tag::ENTRIES, *first), Some(plain));
        }
        writes.insert(
            layout::META_FORMAT.to_vec(),
            Some(9u32.to_be_bytes().to_vec()),
        );
        engine.write(writes).unwrap();
        engine.sync(size, &root, "").unwrap();
    }
    let store = open(dir.path(), clock.clone());
    assert_eq!(latest_checkpoint(&store).root, root);
    for i in 0..size {
        assert_eq!(
            store.body(i).unwrap(),
            bodies_before[i as usize],
            "entry {i}"
        );
    }
    // New entries after the plain ones, the first of them inside a chunk the plain pieces began.
    assert_ne!(size % 64, 0);
    let mut w = World::existing();
    // Fresh nonces: the auditor flags a request signed again.
    w.nonce = 1_000;
    for _ in 0..100 {
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
    }
    let cp = latest_checkpoint(&store);
    for i in (0..cp.size).step_by(7).chain([size, size + 1, cp.size - 1]) {
        let body = store.body(i).unwrap().unwrap();
        let proof = store.inclusion_proof(i, cp.size).unwrap();
        let leaf =
            cmr_log::entry::commitment_leaf(&cmr_log::entry::commitment(&body.salt, &body.body));
        verify_inclusion(i, cp.size, &leaf, &proof, &cp.root).unwrap();
    }
    let mut auditor = Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &store).unwrap();
    assert!(report.is_clean(), "{report:?}");
    drop(store);
    let values: Vec<Vec<u8>> = common::engine_rows(dir.path(), tag::ENTRIES)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let framed = |v: &Vec<u8>| v.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    assert!(values.iter().any(framed), "nothing compressed");
    assert!(
        !values.iter().all(framed),
        "the plain pieces were rewritten"
    );
    let db = common::raw_sled(dir.path());
    assert_current_format(&db.open_tree("cmr").unwrap());
}

/// sled takes damage in its files for a torn tail and opens an older state; the store refuses that (its
/// acknowledgement mark is ahead), names the cause, and opens again only once the operator removes the
/// mark to accept the loss.
#[test]
fn a_damaged_store_is_refused_not_silently_rolled_back() {
    for fraction in [0.3f64, 0.6, 0.95] {
        let dir = tempfile::tempdir().unwrap();
        let acknowledged = {
            let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
            let w = World::setup(&store);
            // 200 entries: requests from acme, each denied by the customer (at most a few may wait).
            for i in 0..100 {
                let req = AccessRequest {
                    scopes: vec![(Scope::ProfileContact, Access::Read)],
                    purpose: format!("request {i}"),
                    duration: Lasting::OneTime,
                    lookback_months: 0,
                    counterparty: Counterparty::Any,
                };
                let request = w.statement(false, Body::Request(req), None);
                store.execute(Op::Statement(request.clone())).unwrap();
                let denial = Body::Denial {
                    request: request.id(),
                    reason: format!("no {i}"),
                };
                store
                    .execute(Op::Statement(w.statement(true, denial, None)))
                    .unwrap();
            }
            latest_checkpoint(&store).size
        };
        // Flip 64 bytes of sled's log file, as a bad disk or a careless copy would.
        let db = dir.path().join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        let at = (bytes.len() as f64 * fraction) as usize;
        for b in &mut bytes[at..at + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&db, &bytes).unwrap();
        let mut cfg = cmr_store::StoreConfig::new(dir.path(), log_key());
        cfg.cache_capacity = 16 * 1024 * 1024;
        match cmr_store::Store::open(cfg) {
            Err(StoreError::Format(m)) => {
                assert!(m.contains(&format!("acknowledged {acknowledged}")), "{m}");
                assert!(m.contains("damaged or replaced"), "{m}");
            }
            Err(e) => panic!("at {fraction}: another error: {e}"),
            Ok(s) => panic!(
                "at {fraction}: opened at {} of {acknowledged} entries",
                latest_checkpoint(&s).size
            ),
        }
        // The operator accepts the loss: without the mark, the older state opens and audits clean.
        std::fs::remove_file(dir.path().join(cmr_store::ACK_MARK)).unwrap();
        let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
        let older = latest_checkpoint(&store).size;
        assert!(older < acknowledged);
        let report = Auditor::new(log_key().verifier()).run(&mut &store).unwrap();
        assert!(report.is_clean(), "{:?}", report.violations);
    }
}

#[test]
fn a_read_must_match_its_signed_request() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let mut w = World::setup(&store);
    let g = w.grant(&store);
    // The request signed for one span of periods, the read asking for a wider one.
    let Op::Read {
        customer,
        family,
        access,
        ..
    } = w.read(g, p(2025, 6), T0)
    else {
        unreachable!()
    };
    let wider = Op::Read {
        customer,
        family,
        periods: (p(2025, 1), p(2026, 12)),
        cursor: None,
        limit: 10,
        access: access.clone(),
    };
    assert!(matches!(
        store.execute(wider),
        Err(StoreError::Malformed(_))
    ));
    // Another family than the one signed for.
    let other = Op::Read {
        customer,
        family: w.contact,
        periods: (p(2025, 6), p(2026, 12)),
        cursor: None,
        limit: 10,
        access,
    };
    assert!(matches!(
        store.execute(other),
        Err(StoreError::Malformed(_))
    ));
    // A request the company really signed, but another one: a relationship poll, presented as this read.
    let Op::Read {
        access: Some(mut forged),
        periods,
        ..
    } = w.read(g, p(2025, 6), T0)
    else {
        unreachable!()
    };
    let poll = format!("/v1/vaults/{}/relationship", customer.to_hex());
    let req = cmr_core::httpsig::Request::new("POST", "https", "vault.example", &poll, vec![]);
    let keyid = w.acme.device.id().to_hex();
    let h = cmr_core::httpsig::sign_request(
        &req,
        b"{}",
        &w.acme.device.signing,
        &keyid,
        "poll-1",
        T0 as i64,
    )
    .unwrap();
    forged.signature_base = h.signature_base;
    let size = latest_checkpoint(&store).size;
    let err = store
        .execute(Op::Read {
            customer,
            family,
            periods,
            cursor: None,
            limit: 10,
            access: Some(forged),
        })
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Malformed(m) if m.contains("@path")),
        "{err}"
    );
    assert_eq!(latest_checkpoint(&store).size, size, "nothing was logged");
}

#[test]
fn a_batch_with_a_bad_signature_or_a_revoked_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let head0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    let Op::WriteBatch {
        batch,
        records,
        access,
    } = w.customer_batch(head0, p(2026, 1), 2, 1)
    else {
        unreachable!()
    };
    let mut bytes = batch.encode();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    let tampered = Op::WriteBatch {
        batch: cmr_core::batch::SignedBatch::decode(&bytes).unwrap(),
        records: records.clone(),
        access: access.clone(),
    };
    assert!(matches!(
        store.execute(tampered),
        Err(StoreError::BadSignature(_))
    ));
    // Revoke the customer's device: its batches are refused from then on, whatever was checked before.
    // The customer's identity key, regenerated from the same seed `common::party` used.
    let key = {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::from_seed([1; 32]);
        cmr_core::identity::create_identity(&mut rng, cmr_core::identity::Role::Customer)
            .identity_key
    };
    let rev = cmr_core::identity::revoke_device(w.customer.id, 0, &key, w.customer.device.id(), T0);
    store.execute(Op::RevokeDevice(rev)).unwrap();
    assert!(matches!(
        store.execute(Op::WriteBatch {
            batch,
            records,
            access
        }),
        Err(StoreError::BadSignature(_))
    ));
    assert_eq!(
        common::replay_with_working_sets(&store),
        latest_checkpoint(&store).size
    );
}

/// The number of stored records (in the records pieces) in a closed store.
fn stored_records(path: &std::path::Path) -> usize {
    common::engine_rows(path, cmr_store::layout::tag::RECORDS)
        .iter()
        .map(|(_, v)| cmr_store::layout::piece_records(v).unwrap().len())
        .sum()
}

fn erasure(w: &common::World, target: cmr_core::consent::ErasureTarget) -> Op {
    Op::Statement(w.statement(true, cmr_core::consent::Body::Erasure(target), None))
}

#[test]
fn erasing_a_family_deletes_its_records_and_closes_it_to_everyone() {
    use cmr_core::consent::ErasureTarget;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (g, erased_at) = {
        let store = open(dir.path(), clock.clone());
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
        let c0 = cmr_core::batch::Head::empty(w.customer.id, w.contact).digest();
        store
            .execute(w.customer_batch(tx0, p(2026, 1), 3, 1))
            .unwrap();
        store.execute(w.contact_batch(c0, 2, 2)).unwrap();
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
        let head = w.head_of(&store, w.tx, (p(2025, 1), p(2026, 12)));

        let at = store
            .execute(erasure(&w, ErasureTarget::Family(w.tx)))
            .unwrap()
            .index
            .unwrap();
        let erased = StoreError::Denied(DenyReason::FamilyErased(at));
        assert_eq!(
            store
                .execute(w.own_read(w.tx, (p(2025, 1), p(2026, 12))))
                .unwrap_err(),
            erased
        );
        assert_eq!(
            store
                .execute(w.customer_batch(head, p(2026, 2), 1, 3))
                .unwrap_err(),
            erased
        );
        assert!(matches!(
            store.execute(w.read(g, p(2025, 6), T0)),
            Err(StoreError::Denied(DenyReason::FamilyErased(_)))
        ));
        // The other family is untouched.
        let contact = store
            .execute(w.own_read(w.contact, (Period::ORIGIN, Period::ORIGIN)))
            .unwrap();
        assert_eq!(contact.read.unwrap().records.len(), 2);
        (g, at)
    };
    assert_eq!(stored_records(dir.path()), 2);
    assert_eq!(erased_bytes_left(dir.path()), 0);

    // After a reopen the erasure still holds, and the log still audits clean.
    let store = open(dir.path(), clock);
    let mut w = World::existing();
    assert_eq!(
        store
            .execute(w.own_read(w.tx, (p(2025, 1), p(2026, 12))))
            .unwrap_err(),
        StoreError::Denied(DenyReason::FamilyErased(erased_at))
    );
    assert!(matches!(
        store.execute(w.read(g, p(2025, 6), T0)),
        Err(StoreError::Denied(DenyReason::FamilyErased(_)))
    ));
    let mut auditor = Auditor::new(log_key().verifier());
    assert!(auditor.run(&mut &store).unwrap().is_clean());
    assert_eq!(
        common::replay_with_working_sets(&store),
        latest_checkpoint(&store).size
    );
    store.execute(erasure(&w, ErasureTarget::Vault)).unwrap();
    drop(store);
    assert_eq!(stored_records(dir.path()), 0);
    assert_eq!(erased_bytes_left(dir.path()), 0);
    let file = dir.path().join(cmr_store::sled_storage::RECORDS_FILE);
    assert!(std::fs::metadata(file).unwrap().len() > 0);
}

/// The bytes of the records file (beside sled's) that no stored records piece names and that are not
/// zero: an erased piece is overwritten once its deletion is durable.
fn erased_bytes_left(path: &std::path::Path) -> usize {
    // Every pointer in a row of its own, to be read here.
    common::unbundle(path);
    let bytes = std::fs::read(path.join(cmr_store::sled_storage::RECORDS_FILE)).unwrap();
    let mut named = vec![false; bytes.len()];
    for kv in common::raw_sled(path)
        .open_tree("cmr")
        .unwrap()
        .scan_prefix([cmr_store::layout::tag::RECORDS])
    {
        let v = kv.unwrap().1;
        assert_eq!(v.len(), 16, "a pointer: offset, length, checksum");
        let at = u64::from_be_bytes(v[..8].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(v[8..12].try_into().unwrap()) as usize;
        named[at..at + len].fill(true);
    }
    bytes
        .iter()
        .zip(named)
        .filter(|(b, named)| **b != 0 && !named)
        .count()
}

#[test]
fn records_written_in_the_same_group_as_the_erasure_are_deleted_too() {
    use cmr_core::consent::ErasureTarget;
    // Whether the batch and the erasure share a group depends on thread timing; five fresh stores make it
    // all but certain that at least one round does. The outcome must not depend on it.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        {
            let store = open(dir.path(), clock);
            let w = World::setup(&store);
            let c0 = cmr_core::batch::Head::empty(w.customer.id, w.contact).digest();
            let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
            let first = store.submit(w.contact_batch(c0, 1, 1));
            let batch = store.submit(w.customer_batch(tx0, p(2026, 1), 4, 2));
            let erase = store.submit(erasure(&w, ErasureTarget::Family(w.tx)));
            first.blocking_recv().unwrap().unwrap();
            let b = batch.blocking_recv().unwrap().unwrap().index.unwrap();
            let e = erase.blocking_recv().unwrap().unwrap().index.unwrap();
            assert!(b < e);
        }
        // Only the contact record remains: none of the four written before the erasure.
        assert_eq!(stored_records(dir.path()), 1);
    }
}

#[test]
fn readers_never_see_past_the_latest_durable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let store = Arc::new(open(dir.path(), clock));
    let w = World::setup(&*store);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done, customer) = (store.clone(), done.clone(), w.customer.id);
        std::thread::spawn(move || {
            let mut seen = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let cp = latest_checkpoint(&*store);
                assert!(cp.size >= seen, "checkpoints never go back");
                seen = cp.size;
                // The entry after the checkpoint is served only once a later checkpoint covers it.
                let body = store.body(cp.size).unwrap().is_some();
                let leaf = store.commitments(cp.size, cp.size + 1).is_ok();
                if body || leaf {
                    let now = latest_checkpoint(&*store);
                    assert!(now.size > cp.size);
                }
                assert_eq!(store.root(cp.size).unwrap(), cp.root);
                // The customer's chain head is always an entry a checkpoint covers.
                if let Some(head) = store.customer_head(&customer).unwrap() {
                    let now = latest_checkpoint(&*store);
                    assert!(head < now.size);
                }
            }
            seen
        })
    };
    let mut head = cmr_core::batch::Head::empty(w.customer.id, w.contact).digest();
    let mut last = 0;
    for tag in 0..40 {
        let ack = store.execute(w.contact_batch(head, 1, tag)).unwrap();
        last = ack.size;
        head = w.head_of(&*store, w.contact, (Period::ORIGIN, Period::ORIGIN));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() <= last);
}

#[test]
fn a_folder_in_use_is_refused_and_a_closed_one_reopens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let store = open(dir.path(), clock.clone());
    let mut cfg = cmr_store::StoreConfig::new(dir.path(), log_key());
    cfg.cache_capacity = 32 * 1024 * 1024;
    assert_eq!(
        cmr_store::Store::open(cfg).err(),
        Some(StoreError::Format(
            "the data folder is in use by another process".into()
        ))
    );
    // Closing and reopening in the same process works every time, although sled lets go of its lock a
    // moment after the last handle is dropped.
    World::setup(&store);
    let size = latest_checkpoint(&store).size;
    drop(store);
    for _ in 0..5 {
        let store = open(dir.path(), clock.clone());
        assert_eq!(latest_checkpoint(&store).size, size);
    }
}

#[test]
fn a_key_backup_is_replaced_only_in_order_survives_a_reopen_and_goes_with_the_vault() {
    use cmr_core::consent::ErasureTarget;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let w = {
        let store = open(dir.path(), clock.clone());
        let w = World::setup(&store);
        let put = |version, bytes: &[u8]| Op::PutBackup {
            customer: w.customer.id,
            version,
            bytes: bytes.to_vec(),
        };
        assert!(store.backup(&w.customer.id).unwrap().is_none());
        // Only version 1 may come first, then 2: a stale or skipped version is a conflict.
        assert!(matches!(
            store.execute(put(2, b"skipped")),
            Err(StoreError::BackupConflict { expected: 1 })
        ));
        store.execute(put(1, b"first")).unwrap();
        assert!(matches!(
            store.execute(put(1, b"stale")),
            Err(StoreError::BackupConflict { expected: 2 })
        ));
        store.execute(put(2, b"second")).unwrap();
        // Too large, or for a company: refused, nothing changes.
        let big = vec![0u8; cmr_store::MAX_BACKUP + 1];
        assert!(matches!(
            store.execute(put(3, &big)),
            Err(StoreError::Malformed(_))
        ));
        assert!(matches!(
            store.execute(Op::PutBackup {
                customer: w.acme.id,
                version: 1,
                bytes: b"company".to_vec(),
            }),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            store.backup(&w.customer.id).unwrap(),
            Some((2, b"second".to_vec()))
        );
        w
    };
    // Durable: a reopened store has it, and erasing the vault deletes it.
    let store = open(dir.path(), clock);
    assert_eq!(
        store.backup(&w.customer.id).unwrap(),
        Some((2, b"second".to_vec()))
    );
    store.execute(erasure(&w, ErasureTarget::Vault)).unwrap();
    assert!(store.backup(&w.customer.id).unwrap().is_none());
}

/// A read whose months run backwards is refused as malformed, the store stays healthy and keeps serving
/// (it once panicked inside the sequencer, which then refused every write), and the refusal logs nothing.
#[test]
fn a_read_from_after_to_is_refused_and_the_store_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let mut w = World::setup(&store);
    let g = w.grant(&store);
    let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    store
        .execute(w.customer_batch(tx0, p(2026, 3), 2, 1))
        .unwrap();
    let before = store.checkpoint().unwrap();
    for periods in [(p(2026, 12), p(2026, 1)), (p(2026, 4), p(2026, 2))] {
        assert!(
            matches!(
                store.execute(w.own_read(w.tx, periods)),
                Err(StoreError::Malformed(_))
            ),
            "{periods:?}"
        );
    }
    assert_eq!(store.checkpoint().unwrap(), before);
    assert!(store.healthy());
    // Still serving reads and writes.
    let read = store
        .execute(w.own_read(w.tx, (p(2026, 1), p(2026, 12))))
        .unwrap();
    assert_eq!(read.read.unwrap().records.len(), 2);
    store.execute(w.read(g, p(2025, 6), T0)).unwrap();
}

/// Erasing a declared family that never held a record is logged and holds, in memory and after a
/// reopen alike, and the log audits clean.
#[test]
fn erasing_a_family_that_never_held_a_record() {
    use cmr_core::consent::ErasureTarget;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let at = {
        let store = open(dir.path(), clock.clone());
        let w = World::setup(&store);
        let at = store
            .execute(erasure(&w, ErasureTarget::Family(w.contact)))
            .unwrap()
            .index
            .unwrap();
        assert_eq!(
            store
                .execute(w.own_read(w.contact, (Period::ORIGIN, Period::ORIGIN)))
                .unwrap_err(),
            StoreError::Denied(DenyReason::FamilyErased(at))
        );
        at
    };
    let store = open(dir.path(), clock);
    let w = World::existing();
    assert_eq!(
        store
            .execute(w.own_read(w.contact, (Period::ORIGIN, Period::ORIGIN)))
            .unwrap_err(),
        StoreError::Denied(DenyReason::FamilyErased(at))
    );
    let mut auditor = Auditor::new(log_key().verifier());
    assert!(auditor.run(&mut &store).unwrap().is_clean());
}

/// The log's entries live in their own append-only file beside sled. A file cut short, or with a
/// byte changed, is refused at open with an error that names it; bytes appended past what sled points
/// to (a group lost with sled's unsynced tail) are ignored, and the log goes on after them.
#[test]
fn a_damaged_entries_file_is_refused_and_a_stray_tail_is_ignored() {
    use std::io::Write as _;
    let file = |dir: &std::path::Path| dir.join(cmr_store::sled_storage::ENTRIES_FILE);
    let logged = |dir: &std::path::Path, clock: &Arc<AtomicU64>| {
        let store = open(dir, clock.clone());
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        for _ in 0..20 {
            store.execute(w.read(g, p(2025, 6), T0)).unwrap();
        }
        latest_checkpoint(&store)
    };
    for damage in ["cut", "flip"] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        logged(dir.path(), &clock);
        let bytes = std::fs::read(file(dir.path())).unwrap();
        let damaged = match damage {
            "cut" => bytes[..bytes.len() - 10].to_vec(),
            _ => {
                let mut b = bytes.clone();
                b[bytes.len() / 2] ^= 1;
                b
            }
        };
        std::fs::write(file(dir.path()), damaged).unwrap();
        let mut cfg = StoreConfig::new(dir.path(), log_key());
        cfg.clock = Arc::new(move || clock.load(std::sync::atomic::Ordering::SeqCst));
        match Store::open(cfg) {
            Err(StoreError::Format(e)) => {
                assert!(e.contains("`entries` file") && e.contains("damaged"), "{e}")
            }
            Err(other) => panic!("{damage}: {other}"),
            Ok(_) => panic!("{damage}: a store with a damaged entries file opened"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let before = logged(dir.path(), &clock);
    std::fs::OpenOptions::new()
        .append(true)
        .open(file(dir.path()))
        .unwrap()
        .write_all(&[0xee; 1000])
        .unwrap();
    let store = open(dir.path(), clock.clone());
    assert_eq!(latest_checkpoint(&store), before);
    let w = World::existing();
    let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    store
        .execute(w.customer_batch(tx0, p(2026, 1), 3, 1))
        .unwrap();
    assert_eq!(latest_checkpoint(&store).size, before.size + 1);
    drop(store);
    let store = open(dir.path(), clock.clone());
    let mut auditor = Auditor::new(log_key().verifier());
    assert!(auditor.run(&mut &store).unwrap().is_clean());
}

/// A stored record or log body that went missing (damage, or a hand edit) is refused at an open that
/// verifies, not replayed as if its family had been erased. A plain open reads only the log: it refuses
/// a missing body, and a missing record fails the read that needs it, with an error, not a wrong answer.
#[test]
fn a_missing_record_or_body_is_refused_at_open() {
    for victim in [
        cmr_store::layout::tag::RECORDS,
        cmr_store::layout::tag::ENTRIES,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        {
            let store = open(dir.path(), clock.clone());
            let w = World::setup(&store);
            let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
            store
                .execute(w.customer_batch(tx0, p(2026, 1), 3, 1))
                .unwrap();
        }
        // One piece's row gone (its own row, as format 10 kept it: a bundle holds several).
        common::unbundle(dir.path());
        {
            let db = common::raw_sled(dir.path());
            let tree = db.open_tree("cmr").unwrap();
            let (k, _) = tree.scan_prefix([victim]).last().unwrap().unwrap();
            tree.remove(k).unwrap();
            db.flush().unwrap();
        }
        let config = |verify: bool| common::config(dir.path(), clock.clone(), verify);
        match Store::open(config(true)) {
            Err(StoreError::Format(e)) => assert!(e.contains("damaged"), "{e}"),
            Err(other) => panic!("table {victim}: {other}"),
            Ok(_) => panic!("table {victim}: a store with a missing entry opened"),
        }
        if victim == cmr_store::layout::tag::ENTRIES {
            assert!(matches!(
                Store::open(config(false)),
                Err(StoreError::Format(_))
            ));
            continue;
        }
        let store = Store::open(config(false)).unwrap();
        let w = World::existing();
        let read = store.execute(w.own_read(w.tx, (p(2026, 1), p(2026, 1))));
        assert!(read.is_err(), "a read served without its missing record");
        let mut auditor = Auditor::new(log_key().verifier());
        assert!(auditor.run(&mut &store).unwrap().is_clean());
    }
}

/// A directory is published by compare-and-swap: the next version on the current one, or nothing. A
/// stale, skipped or forked version gets `DirectoryConflict` naming the version expected, and changes
/// nothing.
#[test]
fn a_directory_not_on_the_current_one_is_a_conflict() {
    use cmr_core::directory::SignedDirectory;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let v1 = SignedDirectory::decode(&store.directory(&w.customer.id).unwrap().unwrap()).unwrap();
    let next = |version: u64, prev: cmr_core::hash::Digest| {
        let mut d = v1.directory().clone();
        d.version = version;
        d.prev = prev;
        d.issued_at = T0 + version;
        Op::PublishDirectory(d.sign(&w.customer.device.signing))
    };
    let before = store.checkpoint().unwrap();
    for (op, what) in [
        (next(1, cmr_core::hash::Digest([0; 32])), "version 1 again"),
        (next(3, v1.digest()), "a skipped version"),
        (next(2, cmr_core::hash::Digest([7; 32])), "a fork"),
    ] {
        assert_eq!(
            store.execute(op).unwrap_err(),
            StoreError::DirectoryConflict { expected: 2 },
            "{what}"
        );
    }
    assert_eq!(store.checkpoint().unwrap(), before);
    store.execute(next(2, v1.digest())).unwrap();
}

/// Values past their limits are refused with a typed error before anything changes: more records than
/// the batch lists, a key backup over its cap. (Encodings past their limits — a grown record, a 1 MiB
/// statement — do not decode, so they never become operations: the server refuses them at the edge, and
/// `cmr-core`'s decoders are fuzzed.)
#[test]
fn oversized_values_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let tx0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    let Op::WriteBatch { batch, records, .. } = w.customer_batch(tx0, p(2026, 1), 1, 1) else {
        unreachable!()
    };
    let before = store.checkpoint().unwrap();
    for (op, what) in [
        (
            Op::WriteBatch {
                batch: batch.clone(),
                records: vec![records[0].clone(); cmr_core::batch::MAX_BATCH_RECORDS + 1],
                access: None,
            },
            "more records than the batch lists",
        ),
        (
            Op::PutBackup {
                customer: w.customer.id,
                version: 1,
                bytes: vec![1; cmr_store::MAX_BACKUP + 1],
            },
            "a backup over its cap",
        ),
    ] {
        let e = store.execute(op).unwrap_err();
        assert!(
            matches!(e, StoreError::Malformed(_) | StoreError::Refused(_)),
            "{what}: {e}"
        );
    }
    assert_eq!(store.checkpoint().unwrap(), before);
    assert_eq!(store.backup(&w.customer.id).unwrap(), None);
    // The batch itself, as it was, is still accepted.
    store
        .execute(Op::WriteBatch {
            batch,
            records,
            access: None,
        })
        .unwrap();
}

/// An auditor is admitted only by a statement signed with the log key, for a registered auditor; the
/// admission and a later dismissal are rebuilt at open.
#[test]
fn auditor_admissions_follow_the_log_key_and_survive_a_reopen() {
    use cmr_log::admission::Admission;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (auditor, inception, _) = common::party(Role::Auditor, 41);
    let (company, company_inception, _) = common::party(Role::Company, 42);
    let statement = |id, admit, time| {
        Op::Admission(
            Admission {
                auditor: id,
                admit,
                time,
            }
            .sign(&log_key())
            .into_bytes(),
        )
    };
    {
        let store = open(dir.path(), clock.clone());
        // Not registered yet: refused.
        assert!(matches!(
            store.execute(statement(auditor.id, true, T0)),
            Err(StoreError::Refused(_))
        ));
        store.execute(Op::Register(inception)).unwrap();
        store.execute(Op::Register(company_inception)).unwrap();
        assert!(!store.is_admitted_auditor(&auditor.id));
        assert!(matches!(
            store.execute(statement(company.id, true, T0)),
            Err(StoreError::Refused(_))
        ));
        let other_key = NoteSigner::new(
            "vault.test/log",
            cmr_log::note::TYPE_ED25519,
            cmr_core::keys::SigningKey::from_seed(&[99; 32]),
        )
        .unwrap();
        let forged = Admission {
            auditor: auditor.id,
            admit: true,
            time: T0,
        }
        .sign(&other_key);
        assert!(matches!(
            store.execute(Op::Admission(forged.into_bytes())),
            Err(StoreError::BadSignature(_))
        ));
        assert!(!store.is_admitted_auditor(&auditor.id));
        let at = store
            .execute(statement(auditor.id, true, T0))
            .unwrap()
            .index;
        assert!(store.is_admitted_auditor(&auditor.id));
        assert_eq!(store.admissions().unwrap(), vec![at.unwrap()]);
    }
    {
        let store = open(dir.path(), clock.clone());
        assert!(store.is_admitted_auditor(&auditor.id));
        store
            .execute(statement(auditor.id, false, T0 + 10))
            .unwrap();
    }
    let store = open(dir.path(), clock);
    assert!(!store.is_admitted_auditor(&auditor.id));
    assert_eq!(store.admissions().unwrap().len(), 2);
    let mut a = Auditor::new(log_key().verifier());
    let report = a.run(&mut &store).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert!(!a.auditors().is_admitted(&auditor.id));
    assert_eq!(common::replay_with_working_sets(&store), 4);
}

/// A customer's pending requests and a company's relationship come from indexes kept as entries are
/// applied: with 100,000 entries on the chain, each listing is one range scan, and a reopened store
/// answers the same.
#[test]
fn listings_come_from_indexes_whatever_the_chains_length() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (customer, acme, last) = {
        let store = open(dir.path(), clock.clone());
        let w = World::setup(&store);
        // 50,000 requests from acme, each denied, submitted together (group commit orders them).
        let mut replies = Vec::new();
        let mut last = None;
        for i in 0..50_000u32 {
            let req = AccessRequest {
                scopes: vec![(Scope::ProfileContact, Access::Read)],
                purpose: format!("request {i}"),
                duration: Lasting::OneTime,
                lookback_months: 0,
                counterparty: Counterparty::Any,
            };
            let request = w.statement(false, Body::Request(req), None);
            replies.push(store.submit(Op::Statement(request.clone())));
            if i == 49_999 {
                // The last one waits.
                last = Some(request.id());
                break;
            }
            let denial = Body::Denial {
                request: request.id(),
                reason: "no".into(),
            };
            replies.push(store.submit(Op::Statement(w.statement(true, denial, None))));
        }
        for r in replies {
            r.blocking_recv().unwrap().unwrap();
        }
        (w.customer.id, w.acme.id, last.unwrap())
    };
    let store = open(dir.path(), clock);
    assert!(latest_checkpoint(&store).size > 100_000);
    let started = std::time::Instant::now();
    let pending = store.pending_requests(&customer).unwrap();
    let pending_took = started.elapsed();
    assert_eq!(pending.len(), 1);
    let body =
        cmr_log::entry::EntryBody::decode(&store.body(pending[0]).unwrap().unwrap().body).unwrap();
    let st = cmr_core::consent::SignedStatement::decode(&body.payload).unwrap();
    assert_eq!(st.id(), last);
    let started = std::time::Instant::now();
    let (page, more) = store.party_entries(&customer, &acme, None, 1000).unwrap();
    let (next, _) = store
        .party_entries(&customer, &acme, page.last().copied(), 1000)
        .unwrap();
    let party_took = started.elapsed();
    assert_eq!((page.len(), more), (1000, true));
    assert!(next[0] > page[999]);
    println!("pending listing {pending_took:?}, two relationship pages {party_took:?}");
    assert!(pending_took < std::time::Duration::from_millis(100));
    assert!(party_took < std::time::Duration::from_millis(100));
}

/// A data folder written before the party and pending indexes (format 1) opens: the replay adds them, and
/// the folder is then format 2.
#[test]
fn a_store_from_before_the_indexes_gains_them_at_open() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (customer, acme, expected_pending, expected_party) = {
        let store = open(dir.path(), clock.clone());
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
        let req = AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "later".into(),
            duration: Lasting::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        };
        store
            .execute(Op::Statement(w.statement(false, Body::Request(req), None)))
            .unwrap();
        (
            w.customer.id,
            w.acme.id,
            store.pending_requests(&w.customer.id).unwrap(),
            store
                .party_entries(&w.customer.id, &w.acme.id, None, 100)
                .unwrap(),
        )
    };
    assert_eq!(expected_pending.len(), 1);
    assert!(expected_party.0.len() >= 4, "{expected_party:?}");
    // Make it a format-1 folder: no index rows, format 1.
    {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        for tag in [
            layout::tag::PARTY,
            layout::tag::PENDING,
            layout::tag::VAULTS_OF,
        ] {
            for kv in t.scan_prefix([tag]) {
                t.remove(kv.unwrap().0).unwrap();
            }
        }
        t.insert(layout::META_FORMAT, &1u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(dir.path(), clock.clone());
    assert_eq!(store.pending_requests(&customer).unwrap(), expected_pending);
    assert_eq!(
        store.party_entries(&customer, &acme, None, 100).unwrap(),
        expected_party
    );
    assert_eq!(
        store.vaults_of(&acme, None, 10).unwrap(),
        (vec![customer], false)
    );
    drop(store);
    let db = common::raw_sled(dir.path());
    let t = db.open_tree("cmr").unwrap();
    assert_current_format(&t);
}

/// A company's feed lists the consent statements that concern it, across vaults and in log order
/// (the grant, then its revocation), not its own accesses; it reads on from where it last looked, and
/// holds after a reopen.
#[test]
fn a_company_feed_lists_its_statements_in_log_order_and_not_its_reads() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let (grant_at, revoked_at) = {
        let store = open(dir.path(), clock.clone());
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        // The grant (and what came with it, the grant's key delivery) concern the company.
        let (feed, more) = store.feed(&w.acme.id, None, 100).unwrap();
        assert!(!more);
        assert!(!feed.is_empty());
        assert!(feed.iter().all(|(_, c)| *c == w.customer.id), "{feed:?}");
        let grant_at = feed.last().unwrap().0;
        let read_at = store
            .execute(w.read(g, p(2025, 6), T0))
            .unwrap()
            .index
            .unwrap();
        let revoked_at = store.execute(w.revoke(g)).unwrap().index.unwrap();
        let (feed, _) = store.feed(&w.acme.id, Some(grant_at), 100).unwrap();
        let indices: Vec<u64> = feed.iter().map(|(i, _)| *i).collect();
        assert!(indices.contains(&revoked_at), "{indices:?}");
        assert!(
            !indices.contains(&read_at),
            "a read in the feed: {indices:?}"
        );
        assert!(indices.windows(2).all(|w| w[0] < w[1]));
        // Another party's feed is its own.
        assert!(store.feed(&w.customer.id, None, 100).unwrap().0.is_empty());
        (grant_at, revoked_at)
    };
    let store = open(dir.path(), clock);
    let w = World::existing();
    let (feed, _) = store.feed(&w.acme.id, None, 100).unwrap();
    let indices: Vec<u64> = feed.iter().map(|(i, _)| *i).collect();
    assert!(
        indices.contains(&grant_at) && indices.contains(&revoked_at),
        "{indices:?}"
    );
    let (first, more) = store.feed(&w.acme.id, None, 1).unwrap();
    assert_eq!((first.len(), more), (1, true));
}

/// Pages the customer's own read of `period` in pages of `limit`, verifying each against the family's
/// head; returns every record's content, in order.
fn read_all_verified(store: &Store, w: &World, period: Period, limit: u64) -> Vec<Vec<u8>> {
    let key = w.customer.device.signing.verifying_key();
    let mut cursor = None;
    let mut ids = Vec::new();
    loop {
        let op = Op::Read {
            customer: w.customer.id,
            family: w.tx,
            periods: (period, period),
            cursor,
            limit,
            access: None,
        };
        let read = store.execute(op).unwrap().read.unwrap();
        let records = read.sealed_records().unwrap();
        let verified = verify_read(
            &read.proof.head.digest(),
            &read.proof,
            &records,
            &read.signed_batches().unwrap(),
            |_| Some(key),
            cursor,
        )
        .unwrap();
        ids.extend(verified.records.iter().map(|r| r.header().id.0.to_vec()));
        match verified.next {
            Some(next) => cursor = Some(next),
            None => return ids,
        }
    }
}

/// What grows with a family's records lives in the store's rows, not in memory: after a reopen, a
/// batch that repeats a record id from long before is still refused (and changes nothing), and a period
/// written by many batches of uneven sizes is read in pages of every size, each proven against the
/// head from the stored tree nodes.
#[test]
fn the_family_ledgers_records_live_in_the_rows_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let month = p(2026, 3);
    let written = {
        let store = open(dir.path(), clock.clone());
        let w = World::setup(&store);
        let mut head = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
        let mut written = 0;
        for (tag, n) in [(1, 37), (2, 1), (3, 64), (4, 5), (5, 100)] {
            let ack = store
                .execute(w.customer_batch(head, month, n, tag))
                .unwrap();
            head = ack.head.unwrap();
            written += n;
        }
        written
    };
    let store = open(dir.path(), clock);
    let w = World::existing();
    let head = w.head_of(&store, w.tx, (month, month));
    let before = store.checkpoint().unwrap();
    // Tag 1's first record again, among new ones: refused, nothing logged.
    let repeat = w.customer_batch(head, month, 3, 1);
    assert!(
        matches!(store.execute(repeat), Err(StoreError::Refused(ref m)) if m.contains("already exists")),
    );
    assert_eq!(store.checkpoint().unwrap(), before);
    for limit in [1, 7, 64, 100, 1000] {
        let ids = read_all_verified(&store, &w, month, limit);
        assert_eq!(ids.len(), written, "pages of {limit}");
    }
    // And the family goes on growing from the stored state.
    store.execute(w.customer_batch(head, month, 9, 6)).unwrap();
    assert_eq!(read_all_verified(&store, &w, month, 50).len(), written + 9);
}

/// The records of records pieces, as the rows of format 6 held them (key, value).
fn unpacked(pieces: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    use cmr_store::layout;
    let mut out = Vec::new();
    for (k, v) in pieces {
        let (number, period, first) = layout::family_piece_of(k).unwrap();
        for (n, record) in (first..).zip(layout::piece_records(v).unwrap()) {
            out.push((layout::record(number, period, n), record.to_vec()));
        }
    }
    out
}

/// A new store in `path` with two batches of the customer's transactions in `month`: 20 records, then
/// 13.
fn two_batches(path: &std::path::Path, clock: &Arc<AtomicU64>, month: Period) {
    let store = open(path, clock.clone());
    let w = World::setup(&store);
    let mut head = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
    for (tag, n) in [(1, 20), (2, 13)] {
        head = store
            .execute(w.customer_batch(head, month, n, tag))
            .unwrap()
            .head
            .unwrap();
    }
}

/// A folder of format 7 kept its records pieces in sled's rows: the open moves each into the records
/// file beside sled's (sled then holds a pointer), and serves the same records. Here half the pieces
/// are still in their rows, as an upgrade cut short leaves them: the open moves what is left.
#[test]
fn a_folder_of_format_7_moves_its_records_out_of_sled_at_open() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let month = p(2026, 4);
    let file = dir.path().join(cmr_store::sled_storage::RECORDS_FILE);
    two_batches(dir.path(), &clock, month);
    common::unbundle(dir.path());
    let pieces = common::engine_rows(dir.path(), layout::tag::RECORDS);
    assert!(pieces.len() >= 2);
    let before = std::fs::metadata(&file).unwrap().len();
    let inline = &pieces[..pieces.len() / 2];
    {
        // As format 7 wrote them: each piece in its row.
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        for (k, v) in inline {
            t.insert(k, v.as_slice()).unwrap();
        }
        t.insert(layout::META_FORMAT, &7u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    for _ in 0..2 {
        let store = open(dir.path(), clock.clone());
        let w = World::existing();
        assert_eq!(read_all_verified(&store, &w, month, 5).len(), 33);
    }
    assert_eq!(
        common::engine_rows(dir.path(), layout::tag::RECORDS),
        pieces
    );
    let db = common::raw_sled(dir.path());
    let t = db.open_tree("cmr").unwrap();
    for kv in t.scan_prefix([layout::tag::RECORDS]) {
        // A piece moved has its pointer in a bundle (a key one byte longer); one left has its own.
        let (k, v) = kv.unwrap();
        assert!(
            k.len() == 22 || v.len() == 16,
            "a bundle or a pointer into the records file"
        );
    }
    assert_eq!(
        t.get(layout::META_FORMAT).unwrap().unwrap().as_ref(),
        layout::FORMAT_VERSION.to_be_bytes()
    );
    let moved: usize = inline.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        before + moved as u64
    );
}

/// Formats 6 to 9 wrote a pointer into the pieces files with the first 8 bytes of the piece's SHA-256;
/// format 10 writes a CRC-32 instead. Both read, and a piece damaged behind either is refused.
#[test]
fn pointers_of_either_check_read_and_refuse_a_damaged_piece() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let month = p(2026, 4);
    two_batches(dir.path(), &clock, month);
    common::unbundle(dir.path());
    let file = dir.path().join(cmr_store::sled_storage::RECORDS_FILE);
    let bytes = std::fs::read(&file).unwrap();
    let pointers: Vec<(Vec<u8>, Vec<u8>)> = {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        let rows: Vec<_> = t
            .scan_prefix([layout::tag::RECORDS])
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect();
        // Half of them as format 9 wrote them.
        for (k, v) in rows.iter().step_by(2) {
            assert_eq!(v.len(), 16);
            let at = u64::from_be_bytes(v[..8].try_into().unwrap()) as usize;
            let len = u32::from_be_bytes(v[8..12].try_into().unwrap()) as usize;
            let mut old = v[..12].to_vec();
            old.extend_from_slice(&cmr_core::hash::sha256(&bytes[at..at + len]).0[..8]);
            t.insert(k, old).unwrap();
        }
        db.flush().unwrap();
        rows
    };
    assert!(pointers.len() >= 2);
    {
        let store = open(dir.path(), clock.clone());
        let w = World::existing();
        assert_eq!(read_all_verified(&store, &w, month, 5).len(), 33);
    }
    // One byte flipped inside a piece of each kind of pointer.
    for (n, (_, v)) in pointers.iter().take(2).enumerate() {
        let at = u64::from_be_bytes(v[..8].try_into().unwrap()) as usize;
        let mut damaged = bytes.clone();
        damaged[at + 20] ^= 1;
        std::fs::write(&file, &damaged).unwrap();
        let store = open(dir.path(), clock.clone());
        let w = World::existing();
        let op = Op::Read {
            customer: w.customer.id,
            family: w.tx,
            periods: (month, month),
            cursor: None,
            limit: 100,
            access: None,
        };
        match store.execute(op) {
            Err(StoreError::Format(e)) => assert!(
                e.contains("`records` file") && e.contains("checksum"),
                "pointer {n}: {e}"
            ),
            Err(e) => panic!("pointer {n}: {e}"),
            Ok(_) => panic!("pointer {n}: a damaged piece was read"),
        }
        std::fs::write(&file, &bytes).unwrap();
    }
}

/// A folder of format 6 (a row per record, and the family ledgers rebuilt in memory at each open) has
/// its records moved into pieces and gains its ledger pieces at open: the same rows the sequencer
/// writes.
#[test]
fn a_folder_from_before_the_ledger_pieces_gains_them_at_open() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let month = p(2026, 4);
    let index_rows = |db: &sled::Tree| -> Vec<(Vec<u8>, Vec<u8>)> {
        db.scan_prefix([layout::tag::LEDGER])
            .chain(db.scan_prefix([layout::tag::FRONTIER]))
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    };
    two_batches(dir.path(), &clock, month);
    common::unbundle(dir.path());
    let expected = {
        // Format 6 kept a row per record: unpack the records' pieces.
        let pieces = common::engine_rows(dir.path(), layout::tag::RECORDS);
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        for (k, v) in unpacked(&pieces) {
            t.insert(k, v).unwrap();
        }
        for (k, _) in &pieces {
            t.remove(k).unwrap();
        }
        let mut rows = index_rows(&t);
        // Two pieces, as the two batches wrote them (the second does not extend a piece of 16 records
        // or more): the first 20 records' ids and leaves and the 20 − popcount(20) = 18 nodes above
        // them, then the last 13 and the 31 − 18 = 13 nodes they completed; and the period's saved
        // tree: 33 = 32 + 1.
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1.len(), 2 + 20 * (16 + 32) + 18 * 32);
        assert_eq!(rows[1].1.len(), 2 + 13 * (16 + 32) + 13 * 32);
        assert_eq!(rows[2].1.len(), 8 + 2 * 40);
        for (k, _) in &rows {
            t.remove(k).unwrap();
        }
        rows.extend(unpacked(&pieces));
        rows.sort();
        t.insert(layout::META_FORMAT, &6u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
        rows
    };
    {
        let store = open(dir.path(), clock.clone());
        let w = World::existing();
        assert_eq!(read_all_verified(&store, &w, month, 5).len(), 33);
        let head = w.head_of(&store, w.tx, (month, month));
        assert!(store.execute(w.customer_batch(head, month, 1, 2)).is_err());
    }
    let pieces = common::engine_rows(dir.path(), layout::tag::RECORDS);
    let db = common::raw_sled(dir.path());
    let t = db.open_tree("cmr").unwrap();
    let mut rows = index_rows(&t);
    // The move may pack the records otherwise than the batches did: the same records, in order.
    rows.extend(unpacked(&pieces));
    rows.sort();
    assert_eq!(rows, expected);
    assert_eq!(t.scan_prefix([layout::tag::RECORD]).count(), 0);
    assert_current_format(&t);
}

/// An open takes each period's tree from where it was saved, checked against the count the log gives:
/// a saved tree that does not match refuses the open with an error that names the way out; an open
/// that verifies (`verify_on_open`) rebuilds the trees from the records and saves them again, and the
/// next plain open is served as before.
#[test]
fn a_damaged_saved_tree_is_refused_and_a_verifying_open_repairs_it() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let month = p(2026, 5);
    let head = {
        let store = open(dir.path(), clock.clone());
        let w = World::setup(&store);
        let head0 = cmr_core::batch::Head::empty(w.customer.id, w.tx).digest();
        store
            .execute(w.customer_batch(head0, month, 12, 1))
            .unwrap()
            .head
            .unwrap()
    };
    let saved = {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        let (k, v) = t
            .scan_prefix([layout::tag::FRONTIER])
            .next()
            .unwrap()
            .unwrap();
        // One record fewer: 11 = 8 + 2 + 1, under the same roots' bytes.
        let mut forged = v.to_vec();
        forged[..8].copy_from_slice(&11u64.to_be_bytes());
        t.insert(&k, forged).unwrap();
        db.flush().unwrap();
        v.to_vec()
    };
    let config = |verify: bool| common::config(dir.path(), clock.clone(), verify);
    match Store::open(config(false)) {
        Err(StoreError::Format(e)) => assert!(e.contains("--verify-on-open"), "{e}"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a store with a damaged saved tree opened"),
    }
    drop(Store::open(config(true)).unwrap());
    {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        let (_, v) = t
            .scan_prefix([layout::tag::FRONTIER])
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(v.to_vec(), saved);
    }
    let store = Store::open(config(false)).unwrap();
    let w = World::existing();
    assert_eq!(w.head_of(&store, w.tx, (month, month)), head);
    assert_eq!(read_all_verified(&store, &w, month, 5).len(), 12);
}

/// The closed store's folder says it is of this build's format.
fn assert_current_format(t: &sled::Tree) {
    assert_eq!(
        t.get(cmr_store::layout::META_FORMAT)
            .unwrap()
            .unwrap()
            .as_ref(),
        &cmr_store::layout::FORMAT_VERSION.to_be_bytes()
    );
}

/// A company's relationship view, page by page (three entries a page).
fn party_pages(store: &Store, customer: &IdentityId, party: &IdentityId) -> Vec<u64> {
    let (mut all, mut after) = (Vec::new(), None);
    loop {
        let (page, more) = store.party_entries(customer, party, after, 3).unwrap();
        assert!(page.len() <= 3);
        all.extend(&page);
        after = page.last().copied();
        if !more {
            break;
        }
        assert_eq!(page.len(), 3, "a full page before more");
    }
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    assert_eq!(
        store.party_entries(customer, party, None, 10_000).unwrap(),
        (all.clone(), false)
    );
    all
}

/// The party index holds its newest postings in memory and writes them as runs once there are
/// `party_tail` of them. A company's relationship view reads the same, page by page, before and after
/// the runs are written, across reopens (the postings after the mark are taken again from the log, with
/// the tail larger or smaller than they are), and after an upgrade from format 8, whose rows held one
/// posting each.
#[test]
fn the_party_index_reads_the_same_across_runs_reopens_and_an_upgrade() {
    use cmr_store::layout;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let opened = |tail: usize| {
        let mut cfg = common::config(dir.path(), clock.clone(), false);
        cfg.party_tail = tail;
        Store::open(cfg).unwrap()
    };
    let (customer, acme, grant, mut expected) = {
        let store = opened(1000);
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        store.execute(w.read(g, p(2025, 6), T0)).unwrap();
        let before = party_pages(&store, &w.customer.id, &w.acme.id);
        assert!(before.len() >= 2, "the grant and the read: {before:?}");
        (w.customer.id, w.acme.id, g, before)
    };
    {
        let store = opened(5);
        assert_eq!(party_pages(&store, &customer, &acme), expected);
        let mut w = World::existing();
        for i in 0..23 {
            let logged = store.execute(w.read(grant, p(2025, 6), T0)).unwrap();
            expected.push(logged.index.unwrap());
            if i % 4 == 0 {
                assert_eq!(party_pages(&store, &customer, &acme), expected);
            }
        }
        assert_eq!(party_pages(&store, &customer, &acme), expected);
    }
    {
        // Runs of several postings, and a mark.
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        assert!(
            t.scan_prefix([layout::tag::PARTY])
                .any(|kv| !kv.unwrap().1.is_empty())
        );
        let mark = t.get(layout::META_PARTY_FROM).unwrap().unwrap();
        assert!(u64::from_be_bytes(mark.as_ref().try_into().unwrap()) > expected[1]);
    }
    for tail in [5, 1000, 2] {
        let store = opened(tail);
        assert_eq!(
            party_pages(&store, &customer, &acme),
            expected,
            "tail {tail}"
        );
    }
    // As format 8 wrote them: a row per posting, no mark.
    {
        let db = common::raw_sled(dir.path());
        let t = db.open_tree("cmr").unwrap();
        for kv in t.scan_prefix([layout::tag::PARTY]) {
            t.remove(kv.unwrap().0).unwrap();
        }
        for i in &expected {
            t.insert(layout::party(&customer.0, &acme.0, *i), &[])
                .unwrap();
        }
        t.remove(layout::META_PARTY_FROM).unwrap();
        t.insert(layout::META_FORMAT, &8u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    {
        let store = opened(1000);
        assert_eq!(party_pages(&store, &customer, &acme), expected);
    }
    let db = common::raw_sled(dir.path());
    let t = db.open_tree("cmr").unwrap();
    assert_current_format(&t);
    let size = t.get(layout::META_SIZE).unwrap().unwrap();
    assert_eq!(t.get(layout::META_PARTY_FROM).unwrap().unwrap(), size);
}

/// A records file changed under the store (a byte flipped, or cut short) is never served: a read of
/// the damaged records fails with an error that names the file, and an open that verifies the records
/// refuses. Bytes appended after the last piece (a group lost with sled's tail) are ignored.
#[test]
fn a_damaged_records_file_is_never_served() {
    use std::io::Write as _;
    let month = p(2026, 4);
    let damaged_read = |store: &Store, w: &World| match store
        .execute(w.own_read(w.tx, (month, month)))
        .map(|a| a.read.map(|r| r.records.len()))
    {
        Err(StoreError::Format(e)) => {
            assert!(e.contains("`records` file") && e.contains("damaged"), "{e}")
        }
        other => panic!("a damaged records file was served: {other:?}"),
    };
    for damage in ["flip", "cut"] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        two_batches(dir.path(), &clock, month);
        let file = dir.path().join(cmr_store::sled_storage::RECORDS_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        match damage {
            "flip" => bytes[100] ^= 1,
            _ => bytes.truncate(bytes.len() - 10),
        }
        std::fs::write(&file, bytes).unwrap();
        // A plain open reads the log only, and opens; the read that needs the records fails.
        {
            let store = open(dir.path(), clock.clone());
            damaged_read(&store, &World::existing());
        }
        match Store::open(common::config(dir.path(), clock.clone(), true)) {
            Err(StoreError::Format(e)) => {
                assert!(e.contains("`records` file") && e.contains("damaged"), "{e}")
            }
            Err(other) => panic!("{damage}: {other}"),
            Ok(_) => panic!("{damage}: a verifying open accepted a damaged records file"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    two_batches(dir.path(), &clock, month);
    let file = dir.path().join(cmr_store::sled_storage::RECORDS_FILE);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(&[0xee; 1000])
        .unwrap();
    let store = common::open_checked(dir.path(), clock.clone(), true);
    let w = World::existing();
    assert_eq!(read_all_verified(&store, &w, month, 5).len(), 33);
}
