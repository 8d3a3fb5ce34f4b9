//! The shared test kit (`cmr_store::testkit`), and what is particular to sled.
#![allow(dead_code, clippy::unwrap_used)] // Shared test code: a panic is a failed test.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cmr_store::testkit::*;
use cmr_store::{Store, StoreConfig};

/// Opens a store whose clock starts at T0 and moves only when the test says so.
pub fn open(path: &Path, clock: Arc<AtomicU64>) -> Store {
    let mut cfg = StoreConfig::new(path, log_key());
    cfg.cache_capacity = 32 * 1024 * 1024;
    cfg.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    Store::open(cfg).unwrap()
}

/// sled itself, on the folder of a closed store. sled lets go of its folder lock a moment after the store
/// is dropped (its I/O threads still hold the files): wait for it, as `Store::open` does.
pub fn raw_sled(path: &std::path::Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if tries < 200 => {
                assert!(e.to_string().contains("could not acquire lock"), "{e}");
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}
