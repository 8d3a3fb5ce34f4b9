//! The store on PostgreSQL passes the backend conformance suite, on a real server (a temporary cluster
//! of Debian's `postgresql` package; skipped with a note when it is not installed, unless
//! `CMR_REQUIRE_POSTGRES` is set, as in CI).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cmr_postgres::PgStorage;
use cmr_postgres::cluster::Cluster;
use cmr_store::conformance::{Harness, run};
use cmr_store::testkit::{T0, log_key};
use cmr_store::{Backend, Store, StoreConfig};

fn open(url: &str, clock: Arc<AtomicU64>) -> Store {
    let storage = PgStorage::connect(url).unwrap();
    let mut config = StoreConfig::new("", log_key());
    config.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    Store::open_on(Arc::new(storage), config).unwrap()
}

/// Each backend in a database of its own; a reopen connects to the same database again.
struct Postgres {
    cluster: Cluster,
    made: u32,
    current: Option<String>,
    clock: Arc<AtomicU64>,
}

impl Harness for Postgres {
    fn fresh(&mut self) -> Arc<dyn Backend> {
        self.made += 1;
        let name = format!("conformance_{}", self.made);
        self.cluster.create_database(&name).unwrap();
        let url = self.cluster.url(&name);
        let store = open(&url, self.clock.clone());
        self.current = Some(url);
        Arc::new(store)
    }

    fn reopen(&mut self, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        backend.close();
        drop(backend);
        let url = self.current.as_ref().expect("a backend was made");
        Arc::new(open(url, self.clock.clone()))
    }

    fn set_time(&mut self, time: u64) {
        self.clock.store(time, Ordering::SeqCst);
    }
}

#[test]
fn the_store_on_postgresql_passes_the_backend_conformance_suite() {
    let Some(cluster) = Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    run(&mut Postgres {
        cluster,
        made: 0,
        current: None,
        clock: Arc::new(AtomicU64::new(T0)),
    });
}
