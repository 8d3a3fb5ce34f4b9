//! What is particular to PostgreSQL, on a real server: a crash of the database loses nothing
//! acknowledged, one server writes at a time, and a writer that lost its lease writes nothing more.
//! Skipped with a note when PostgreSQL is not installed, unless `CMR_REQUIRE_POSTGRES` is set (CI).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cmr_core::batch::Head;
use cmr_postgres::PgStorage;
use cmr_postgres::cluster::Cluster;
use cmr_store::testkit::{T0, World, execute, latest_checkpoint, log_key, p};
use cmr_store::{Op, Store, StoreConfig, StoreError};

fn config() -> StoreConfig {
    let mut config = StoreConfig::new("", log_key());
    let clock = Arc::new(AtomicU64::new(T0));
    config.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    config
}

fn open(url: &str) -> Store {
    Store::open_on(Arc::new(PgStorage::connect(url).unwrap()), config()).unwrap()
}

fn cluster_with(name: &str) -> Option<(Cluster, String)> {
    let Some(cluster) = Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return None;
    };
    cluster.create_database(name).unwrap();
    let url = cluster.url(name);
    Some((cluster, url))
}

#[test]
fn nothing_acknowledged_is_lost_when_the_database_crashes_and_the_store_comes_back_by_itself() {
    let Some((cluster, url)) = cluster_with("crash") else {
        return;
    };
    let store = open(&url);
    let w = World::setup(&store);
    let mut head = Head::empty(w.customer.id, w.tx).digest();
    for tag in 1..=20 {
        let ack = execute(&store, w.customer_batch(head, p(2026, 1), 2, tag)).unwrap();
        head = ack.head.unwrap();
    }
    let acknowledged = latest_checkpoint(&store);
    // The database stops like a crash (no shutdown checkpoint), under a store that keeps running: its
    // next write fails (not taken, or in doubt), and it stops taking operations until it has
    // reconnected and rebuilt its state from the database, by itself.
    cluster.crash_and_restart().unwrap();
    let after = execute(&store, w.customer_batch(head, p(2026, 1), 2, 99));
    assert!(
        matches!(
            after,
            Err(StoreError::Io(_)
                | StoreError::Unavailable(_)
                | StoreError::InDoubt(_)
                | StoreError::Closed)
        ),
        "{after:?}"
    );
    for _ in 0..200 {
        if store.healthy() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(store.healthy(), "the store did not come back by itself");
    assert_eq!(store.root(acknowledged.size).unwrap(), acknowledged.root);
    let ack = execute(&store, w.customer_batch(head, p(2026, 1), 2, 21)).unwrap();
    head = ack.head.unwrap();
    store.close();
    drop(store);
    // Reopened, everything acknowledged is there, under the same root, and the log goes on from it.
    let store = open(&url);
    let reopened = latest_checkpoint(&store);
    assert!(reopened.size >= acknowledged.size);
    assert_eq!(store.root(acknowledged.size).unwrap(), acknowledged.root);
    let next = w.customer_batch(head, p(2026, 1), 2, 22);
    execute(&store, next).unwrap();
}

/// The checkpoint a store serves, opened.
fn served(store: &Store) -> cmr_log::checkpoint::Checkpoint {
    latest_checkpoint(store)
}

/// Waits until `store`'s durable view reaches `size` (an idle store follows what others made durable).
fn until_durable(store: &Store, size: u64) {
    for _ in 0..100 {
        if served(store).size >= size {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the store's durable view stayed at {} below {size}",
        served(store).size
    );
}

#[test]
fn two_servers_share_one_log() {
    let Some((_cluster, url)) = cluster_with("shared") else {
        return;
    };
    let (a, b) = (open(&url), open(&url));
    // Registered through one, granted through the other, written through the first, read through the
    // second: each decides on everything the other logged.
    let mut w = World::setup(&a);
    // A key registered through one is known to the other at once (it follows the log on demand).
    let acme_device = w.acme.device.id().to_hex();
    assert_eq!(
        b.signer_key(&acme_device).map(|(id, _)| id),
        Some(w.acme.id)
    );
    let g = w.grant(&b);
    let head = Head::empty(w.customer.id, w.tx).digest();
    execute(&a, w.customer_batch(head, p(2026, 1), 3, 1)).unwrap();
    let read = execute(&b, w.read(g, p(2025, 6), T0)).unwrap();
    assert_eq!(read.read.unwrap().records.len(), 3);
    // The revocation race across servers: revoked through one, no read served by the other after it.
    let revoked = execute(&a, w.revoke(g)).unwrap().index.unwrap();
    let refused = execute(&b, w.read(g, p(2025, 6), T0));
    assert_eq!(
        refused.unwrap_err(),
        StoreError::Denied(cmr_core::decision::DenyReason::GrantRevoked(revoked))
    );
    // A write sent again through the other server (as a client does when its first server dies) gets
    // its original result: idempotency is in the shared log.
    let block = w.statement(
        true,
        cmr_core::consent::Body::Block {
            company: w.acme.id,
            blocked: true,
        },
        None,
    );
    let first = execute(&a, Op::Statement(block.clone())).unwrap();
    let again = execute(&b, Op::Statement(block)).unwrap();
    assert_eq!(again.index, first.index);
    assert!(again.repeated);
    // One log: both serve the same tree, and an idle one catches up with what the other made durable.
    let size = served(&a).size.max(served(&b).size);
    until_durable(&a, size);
    until_durable(&b, size);
    assert_eq!(a.root(size).unwrap(), b.root(size).unwrap());
    let mut auditor = cmr_log::auditor::Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &b).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
}

#[test]
fn concurrent_writers_on_two_servers_log_every_write_once() {
    let Some((_cluster, url)) = cluster_with("busy") else {
        return;
    };
    let (a, b) = (Arc::new(open(&url)), Arc::new(open(&url)));
    let mut w = World::setup(&*a);
    let g = w.grant(&*a);
    let head = Head::empty(w.customer.id, w.tx).digest();
    execute(&*a, w.customer_batch(head, p(2026, 1), 2, 1)).unwrap();
    let start = served(&a).size;
    // Reads (each logged) through both servers at once, from four threads.
    let reads: Vec<_> = (0..160u64)
        .map(|n| (n, w.read(g, p(2025, 6), T0)))
        .collect();
    let mut indices: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = reads
            .chunks(40)
            .enumerate()
            .map(|(t, chunk)| {
                let store = if t % 2 == 0 { a.clone() } else { b.clone() };
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(_, op)| execute(&*store, op.clone()).unwrap().index.unwrap())
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(
        indices.len(),
        160,
        "every read logged once, at its own index"
    );
    assert_eq!(indices, (start..start + 160).collect::<Vec<_>>());
    let size = start + 160;
    until_durable(&a, size);
    until_durable(&b, size);
    assert_eq!(a.root(size).unwrap(), b.root(size).unwrap());
    let mut auditor = cmr_log::auditor::Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &*a).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
}

#[test]
fn a_sled_folder_moves_into_postgresql_with_the_same_log() {
    let Some((_cluster, url)) = cluster_with("moved") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (note, size, root) = {
        let mut config = config();
        config.path = dir.path().to_path_buf();
        let store = Store::open(config).unwrap();
        let mut w = World::setup(&store);
        let g = w.grant(&store);
        let head = Head::empty(w.customer.id, w.tx).digest();
        execute(&store, w.customer_batch(head, p(2026, 1), 5, 1)).unwrap();
        execute(&store, w.read(g, p(2025, 6), T0)).unwrap();
        execute(&store, w.revoke(g)).unwrap();
        let note = store.checkpoint().unwrap().unwrap();
        let cp = latest_checkpoint(&store);
        store.close();
        (note, cp.size, cp.root)
    };
    let from = cmr_store::SledStorage::open_folder(dir.path(), 16 << 20).unwrap();
    let to = PgStorage::connect(&url).unwrap();
    let mut heard = 0;
    let rows = cmr_store::storage::copy(&from, &to, 4096, |n| heard = n).unwrap();
    assert_eq!(heard, rows);
    drop(from);
    // Copying again is refused: the destination is no longer empty.
    let again = cmr_store::SledStorage::open_folder(dir.path(), 16 << 20).unwrap();
    assert!(cmr_store::storage::copy(&again, &to, 4096, |_| {}).is_err());
    drop(again);
    // The same log: size, root and the very checkpoint; and it audits clean and goes on.
    let store = Store::open_on(Arc::new(to), config()).unwrap();
    assert_eq!(store.checkpoint().unwrap().unwrap(), note);
    assert_eq!(latest_checkpoint(&store).size, size);
    assert_eq!(store.root(size).unwrap(), root);
    let mut auditor = cmr_log::auditor::Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &store).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    let w = World::existing();
    let contact = Head::empty(w.customer.id, w.contact).digest();
    let ack = execute(&store, w.contact_batch(contact, 2, 9)).unwrap();
    assert_eq!(ack.index, Some(size));
}

#[test]
fn a_database_with_a_newer_schema_is_refused() {
    let Some((cluster, url)) = cluster_with("newer") else {
        return;
    };
    drop(open(&url));
    cluster
        .psql("newer", "UPDATE cmr_schema SET version = version + 1")
        .unwrap();
    let refused = PgStorage::connect(&url);
    assert!(
        matches!(&refused, Err(StoreError::Format(why)) if why.contains("newer build")),
        "{:?}",
        refused.err()
    );
}

#[test]
fn a_server_with_another_log_key_is_refused() {
    let Some((_cluster, url)) = cluster_with("keys") else {
        return;
    };
    let first = open(&url);
    World::setup(&first);
    let other = cmr_log::note::NoteSigner::new(
        "vault.test/log",
        cmr_log::note::TYPE_ED25519,
        cmr_core::keys::SigningKey::from_seed(&[42; 32]),
    )
    .unwrap();
    let mut config = config();
    config.log_key = other;
    let refused = Store::open_on(Arc::new(PgStorage::connect(&url).unwrap()), config);
    assert!(
        matches!(&refused, Err(StoreError::Format(why)) if why.contains("log key")),
        "{:?}",
        refused.err()
    );
}

/// A budgeted range read on PostgreSQL (one query with a running total) returns exactly the rows the
/// storage boundary's own definition does on sled: in key order, up to and including the row whose value
/// brings the total past the budget.
#[test]
fn a_budgeted_range_read_returns_what_the_boundary_defines() {
    use cmr_store::Storage as _;
    let Some((_cluster, url)) = cluster_with("budget") else {
        return;
    };
    let pg = PgStorage::connect(&url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sled = cmr_store::SledStorage::open_folder(dir.path(), 8 * 1024 * 1024).unwrap();
    let sizes = [3usize, 5, 1, 8, 2, 13, 4];
    let rows: cmr_store::storage::Writes = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| (vec![0x42, i as u8], Some(vec![i as u8; *n])))
        .chain([(vec![0x43, 0], Some(vec![9; 4]))])
        .collect();
    pg.write(rows.clone()).unwrap();
    sled.write(rows).unwrap();
    for budget in [0, 1, 3, 7, 8, 9, 20, 35, 36, 1000] {
        for (from, to) in [
            ([0x42u8, 0], [0x42u8, 7]),
            ([0x42, 2], [0x42, 5]),
            ([0x42, 5], [0x42, 2]),
        ] {
            let expected = sled.range_within(&from, &to, budget).unwrap();
            assert_eq!(
                pg.range_within(&from, &to, budget).unwrap(),
                expected,
                "budget {budget}, {from:?}..{to:?}"
            );
        }
    }
    // The definition itself, once by hand: 3 + 5 passes 7 at the second row.
    let two = sled.range_within(&[0x42, 0], &[0x42, 7], 7).unwrap();
    assert_eq!(two.iter().map(|(_, v)| v.len()).collect::<Vec<_>>(), [3, 5]);
}
