//! The store when its disk fills up: a clear refusal, nothing acknowledged lost, and back by itself once
//! there is room again. On a real file system of limited size (a tmpfs mounted for the test: root only;
//! skipped with a note otherwise, unless `CMR_REQUIRE_MOUNT` is set, as in CI).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cmr_store::{Store, StoreError};
use common::{T0, World, open, p};

/// A tmpfs of a given size, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .output()
            .is_ok_and(|o| o.status.success());
        if !mounted {
            assert!(
                std::env::var_os("CMR_REQUIRE_MOUNT").is_none(),
                "cannot mount a tmpfs (CMR_REQUIRE_MOUNT is set)"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        Some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system at `dir` with `dir/filler` until no byte is left, then frees `keep` bytes.
fn fill(dir: &Path, keep: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    let len = std::fs::metadata(&path).unwrap().len();
    f.set_len(len.saturating_sub(keep)).unwrap();
    path
}

/// The records the family's head counts (the read proves the head).
fn records(store: &Store, w: &World) -> u64 {
    store
        .execute(w.own_read(w.tx, (p(2026, 1), p(2026, 1))))
        .unwrap()
        .read
        .unwrap()
        .proof
        .head
        .records
}

#[test]
fn a_full_disk_refuses_writes_loses_nothing_acknowledged_and_the_store_comes_back_by_itself() {
    let Some(fs) = Tmpfs::mount(48) else { return };
    let data = fs.path.join("data");
    let clock = Arc::new(AtomicU64::new(T0));
    let store = open(&data, clock.clone());
    let w = World::setup(&store);
    let filler = fill(&fs.path, 2 << 20);

    // Writes until the disk is full: each acknowledged batch holds 8 records.
    let mut acked = 0;
    let mut head = w.head_of(&store, w.tx, (p(2026, 1), p(2026, 1)));
    let refusal = loop {
        match store.execute(w.customer_batch(head, p(2026, 1), 8, acked + 1)) {
            Ok(ack) => {
                acked += 8;
                head = ack.head.unwrap();
            }
            Err(e) => break e,
        }
        assert!(acked < 400_000, "the disk never filled");
    };
    eprintln!("disk full after {acked} records: {refusal}");
    // A clear refusal (retry later), never a failure of the store itself.
    assert!(
        matches!(
            refusal,
            StoreError::Unavailable(_) | StoreError::InDoubt(_) | StoreError::Closed
        ),
        "{refusal:?}"
    );
    assert!(!store.healthy());
    assert!(matches!(
        store.execute(w.customer_batch(head, p(2026, 1), 1, 1_000_000)),
        Err(StoreError::Closed | StoreError::Unavailable(_))
    ));

    // Room again: the store reopens its files and rebuilds by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.healthy() {
        assert!(Instant::now() < deadline, "the store did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every acknowledged record is there (a batch answered in doubt may be too), and writes go on.
    let held = records(&store, &w);
    assert!((acked..=acked + 8).contains(&held), "{held} of {acked}");
    let head = w.head_of(&store, w.tx, (p(2026, 1), p(2026, 1)));
    store
        .execute(w.customer_batch(head, p(2026, 1), 8, 2_000_000))
        .unwrap();
    assert_eq!(records(&store, &w), held + 8);
    drop(store);
    let store = open(&data, clock);
    assert_eq!(records(&store, &w), held + 8);
}
