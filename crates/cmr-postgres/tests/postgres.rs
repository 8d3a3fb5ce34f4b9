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
use cmr_store::{Store, StoreConfig, StoreError};

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
fn nothing_acknowledged_is_lost_when_the_database_crashes() {
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
    // next write fails and it stops taking operations, in doubt, until it is reopened.
    cluster.crash_and_restart().unwrap();
    let after = execute(&store, w.customer_batch(head, p(2026, 1), 2, 99));
    assert!(
        matches!(after, Err(StoreError::Io(_) | StoreError::InDoubt(_))),
        "{after:?}"
    );
    assert!(!store.healthy());
    store.close();
    drop(store);
    // Everything acknowledged is there, under the same root, and the log goes on from it.
    let store = open(&url);
    let reopened = latest_checkpoint(&store);
    assert!(reopened.size >= acknowledged.size);
    assert_eq!(store.root(acknowledged.size).unwrap(), acknowledged.root);
    let next = w.customer_batch(head, p(2026, 1), 2, 21);
    execute(&store, next).unwrap();
}

#[test]
fn one_server_writes_to_a_database_at_a_time() {
    let Some((_cluster, url)) = cluster_with("lease") else {
        return;
    };
    let first = open(&url);
    World::setup(&first);
    // A second writer waits for the lease, which the first keeps renewing, and gives up.
    let second = PgStorage::connect_waiting(&url, Duration::from_secs(3));
    assert!(
        matches!(&second, Err(StoreError::Format(why)) if why.contains("write lease")),
        "{:?}",
        second.err()
    );
    // Once the first lets go, the next one opens at once, on everything the first acknowledged.
    let size = latest_checkpoint(&first).size;
    first.close();
    drop(first);
    let storage = PgStorage::connect_waiting(&url, Duration::from_secs(1)).unwrap();
    let store = Store::open_on(Arc::new(storage), config()).unwrap();
    assert_eq!(latest_checkpoint(&store).size, size);
}

#[test]
fn a_writer_that_lost_its_lease_writes_nothing() {
    let Some((cluster, url)) = cluster_with("fenced") else {
        return;
    };
    let store = open(&url);
    let w = World::setup(&store);
    let size = latest_checkpoint(&store).size;
    // Another holder takes the lease (as after a partition that outlasted it).
    cluster
        .psql(
            "fenced",
            "UPDATE cmr_lease SET holder = '\\x00', expires = now() + interval '1 hour'",
        )
        .unwrap();
    let head = Head::empty(w.customer.id, w.tx).digest();
    let refused = execute(&store, w.customer_batch(head, p(2026, 1), 2, 1));
    assert!(
        matches!(&refused, Err(StoreError::Io(why)) if why.contains("lease")),
        "{refused:?}"
    );
    assert!(!store.healthy());
    // Nothing of the refused group reached the database.
    let stored: u64 = cluster
        .psql("fenced", "SELECT size FROM cmr_mark WHERE id = 1")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(stored, size);
    let rows_past: u64 = cluster
        .psql(
            "fenced",
            &format!(
                "SELECT count(*) FROM cmr_rows WHERE k = '\\x{}'::bytea",
                hex::encode(cmr_store::layout::indexed(
                    cmr_store::layout::tag::BODY,
                    size
                ))
            ),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rows_past, 0);
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
