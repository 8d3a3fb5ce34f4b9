//! The sled store passes the backend conformance suite.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cmr_store::Backend;
use cmr_store::conformance::{Harness, run};

/// Each backend in a temporary folder of its own; a reopen opens the same folder again.
struct Sled {
    current: Option<tempfile::TempDir>,
    clock: Arc<AtomicU64>,
}

impl Harness for Sled {
    fn fresh(&mut self) -> Arc<dyn Backend> {
        let dir = tempfile::tempdir().unwrap();
        let store = common::open(dir.path(), self.clock.clone());
        self.current = Some(dir);
        Arc::new(store)
    }

    fn reopen(&mut self, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        backend.close();
        drop(backend);
        let dir = self.current.as_ref().expect("a backend was made");
        Arc::new(common::open(dir.path(), self.clock.clone()))
    }

    fn set_time(&mut self, time: u64) {
        self.clock.store(time, Ordering::SeqCst);
    }
}

#[test]
fn the_sled_store_passes_the_backend_conformance_suite() {
    run(&mut Sled {
        current: None,
        clock: Arc::new(AtomicU64::new(common::T0)),
    });
}
