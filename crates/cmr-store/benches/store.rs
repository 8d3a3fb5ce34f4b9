//! Store benchmarks with their references in the same run (one pass each, printed as a table):
//! - 64 concurrent single-record durable writers (each on its own family) against the same write made
//!   durable one at a time;
//! - batched writes (64 records of 1 KiB per batch) against raw sled `apply_batch(64)` + `flush`;
//! - RSS after 1,000,000 records, in a fresh process with the store's default configuration.
//!
//! Run: `cargo bench -p cmr-store --bench store` (CMR_BENCH_RECORDS changes the 1,000,000, CMR_BENCH_ROUNDS
//! the 3 interleaved rounds of the batched comparison).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use cmr_core::batch::{Batch, FamilyLedger, SignedBatch};
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::EpochSecret;
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity};
use cmr_core::keys::SigningKey;
use cmr_core::record::{RecordId, RecordSealer, SealedRecord};
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use cmr_store::{Op, Store, StoreConfig};

const T0: u64 = 1_794_700_800;

struct Vault {
    customer: IdentityId,
    device: DeviceKeys,
    families: Vec<FamilyId>,
    secret: EpochSecret,
}

fn open(path: &std::path::Path) -> Store {
    open_with(path, Some(256 * 1024 * 1024))
}

/// A store with `cache` bytes of sled cache, or the store's default (`StoreConfig::new`) for `None`.
fn open_with(path: &std::path::Path, cache: Option<u64>) -> Store {
    let key = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .expect("valid name");
    let mut cfg = StoreConfig::new(path, key);
    if let Some(cache) = cache {
        cfg.cache_capacity = cache;
    }
    let clock = Arc::new(AtomicU64::new(T0));
    cfg.clock = Arc::new(move || clock.load(std::sync::atomic::Ordering::Relaxed));
    Store::open(cfg).expect("opens")
}

fn vault(store: &Store, families: usize) -> Vault {
    let mut rng = rand::rng();
    let c = create_identity(&mut rng, Role::Customer);
    let customer = c.inception.identity();
    let device = DeviceKeys::generate(&mut rng);
    store.execute(Op::Register(c.inception)).expect("register");
    store
        .execute(Op::Certify(device.certify(customer, 0, &c.identity_key, 0)))
        .expect("certify");
    let pk = PseudonymKey::generate(&mut rng);
    let mut fams: Vec<DirectoryFamily> = (0..families)
        .map(|i| DirectoryFamily {
            family: FamilyName::Transactions(pk.counterparty(&IdentityId([i as u8; 32])))
                .id(&customer),
            scope: Scope::Transactions,
            epoch: 1,
            appenders: vec![],
        })
        .collect();
    fams.sort_by_key(|f| f.family);
    let dir = Directory {
        customer,
        version: 1,
        prev: Digest([0; 32]),
        signer: device.id(),
        issued_at: 0,
        devices: vec![DirectoryDevice {
            device: device.id(),
            signing_key: device.signing.verifying_key(),
            kem_key: device.kem.public_key(),
        }],
        families: fams.clone(),
    }
    .sign(&device.signing);
    store.execute(Op::PublishDirectory(dir)).expect("directory");
    Vault {
        customer,
        device,
        families: fams.iter().map(|f| f.family).collect(),
        secret: EpochSecret::generate(&mut rng),
    }
}

/// A writer of one family: keeps its own ledger copy to know the head.
struct Writer<'a> {
    v: &'a Vault,
    family: FamilyId,
    ledger: FamilyLedger,
    next: u64,
}

impl<'a> Writer<'a> {
    fn new(v: &'a Vault, i: usize) -> Self {
        Writer {
            v,
            family: v.families[i],
            ledger: FamilyLedger::new(v.customer, v.families[i], Scope::Transactions),
            next: 0,
        }
    }

    fn op(&mut self, n: usize, size: usize) -> Op {
        let period = Period::from_year_month(2026, 11).expect("valid");
        let key = self.v.secret.read_key(Period::ORIGIN);
        let sealer = RecordSealer::new(
            self.v.customer,
            self.family,
            1,
            self.v.customer,
            &key,
            period,
        )
        .expect("sealer");
        let content = vec![0x5a; size];
        let mut rng = rand::rng();
        let records: Vec<SealedRecord> = (0..n)
            .map(|_| {
                self.next += 1;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.next.to_be_bytes());
                sealer.seal(&mut rng, RecordId(id), &content).expect("seal")
            })
            .collect();
        let batch = Batch::for_records(self.v.device.id(), self.ledger.head().digest(), &records)
            .expect("batch");
        self.ledger.apply(&batch, &records).expect("local ledger");
        Op::WriteBatch {
            batch: SignedBatch::sign(batch, &self.v.device.signing),
            records,
            access: None,
        }
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() {
    if let Some(total) = std::env::var(RSS_CHILD).ok().and_then(|v| v.parse().ok()) {
        return rss_child(total);
    }
    println!("store benchmarks");
    // 1. Durable single-record writes: one at a time, then 64 concurrent writers.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let v = vault(&store, 65);
    let n = 300;
    let mut w = Writer::new(&v, 0);
    let start = Instant::now();
    for _ in 0..n {
        store.execute(w.op(1, 1024)).expect("write");
    }
    let one = n as f64 / start.elapsed().as_secs_f64();
    println!("| single-record durable writes, one at a time | {n} | {one:.0}/s |");
    let per = 100;
    let start = Instant::now();
    std::thread::scope(|s| {
        for i in 1..=64 {
            let store = &store;
            let v = &v;
            s.spawn(move || {
                // Family 0 is the sequential writer's; each concurrent writer has its own.
                let mut w = Writer::new(v, i);
                for _ in 0..per {
                    store.execute(w.op(1, 1024)).expect("write");
                }
            });
        }
    });
    let many = (64 * per) as f64 / start.elapsed().as_secs_f64();
    println!(
        "| single-record durable writes, 64 concurrent writers | {} | {many:.0}/s = {:.1}x one at a time |",
        64 * per,
        many / one
    );
    drop(store);

    // 2. Batched writes against raw sled apply_batch + flush. The machine is noisy, so the three are
    // interleaved, round after round, and each round's ratios come from that round's own references.
    let rounds: usize = std::env::var("CMR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let raw_dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(raw_dir.path())
        .cache_capacity(256 * 1024 * 1024)
        .open()
        .expect("sled");
    let log_file = std::fs::File::open(raw_dir.path().join("db")).expect("sled's log file");
    let batches = 320;
    let value = vec![0x5a; 1024 + 250];
    let mut next_key = 0u64;
    let mut raw_round = |sync: bool| {
        let start = Instant::now();
        for _ in 0..batches {
            let mut batch = sled::Batch::default();
            for _ in 0..64 {
                next_key += 1;
                batch.insert(&next_key.to_be_bytes(), value.clone());
            }
            db.apply_batch(batch).expect("apply");
            db.flush().expect("flush");
            if sync {
                // Made durable against power loss as the store does: fdatasync of sled's log file.
                log_file.sync_data().expect("fdatasync");
            }
        }
        (batches * 64) as f64 / start.elapsed().as_secs_f64()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let v = vault(&store, 1);
    let mut w = Writer::new(&v, 0);
    let dir8 = tempfile::tempdir().expect("tempdir");
    let store8 = open(dir8.path());
    let v8 = vault(&store8, 8);
    let mut writers8: Vec<Writer> = (0..8).map(|i| Writer::new(&v8, i)).collect();
    let (mut single, mut eight) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let raw = raw_round(false);
        let raw_sync = raw_round(true);
        // Sealing and signing are the client's work: the operations are built before the clock starts.
        let ops: Vec<Op> = (0..batches).map(|_| w.op(64, 1024)).collect();
        let start = Instant::now();
        for op in ops {
            store.execute(op).expect("write");
        }
        let ours = (batches * 64) as f64 / start.elapsed().as_secs_f64();
        // The same batches from 8 concurrent writers (each on its own family): group commit shares the
        // flush and the fdatasync.
        let ops8: Vec<Vec<Op>> = writers8
            .iter_mut()
            .map(|w| (0..batches / 8).map(|_| w.op(64, 1024)).collect())
            .collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for ops in ops8 {
                let store8 = &store8;
                s.spawn(move || {
                    for op in ops {
                        store8.execute(op).expect("write");
                    }
                });
            }
        });
        let concurrent = (batches / 8 * 8 * 64) as f64 / start.elapsed().as_secs_f64();
        println!(
            "| round {round}: raw sled apply_batch(64) + flush (1.25 KiB values) | {} | {raw:.0} records/s |",
            batches * 64
        );
        println!(
            "| round {round}: raw sled apply_batch(64) + flush + fdatasync | {} | {raw_sync:.0} records/s |",
            batches * 64
        );
        println!(
            "| round {round}: store, signed batches of 64 x 1 KiB records, one writer | {} | {ours:.0} records/s = {:.0}% of raw, {:.0}% of raw + fdatasync |",
            batches * 64,
            100.0 * ours / raw,
            100.0 * ours / raw_sync
        );
        println!(
            "| round {round}: store, the same batches from 8 concurrent writers | {} | {concurrent:.0} records/s = {:.0}% of raw, {:.0}% of raw + fdatasync |",
            batches / 8 * 8 * 64,
            100.0 * concurrent / raw,
            100.0 * concurrent / raw_sync
        );
        single.push((ours / raw, ours / raw_sync));
        eight.push((concurrent / raw, concurrent / raw_sync));
    }
    let median = |v: &mut Vec<(f64, f64)>| {
        let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        (100.0 * a[a.len() / 2], 100.0 * b[b.len() / 2])
    };
    let (s_raw, s_sync) = median(&mut single);
    let (e_raw, e_sync) = median(&mut eight);
    println!(
        "| median over {rounds} rounds: one writer | | {s_raw:.0}% of raw, {s_sync:.0}% of raw + fdatasync |"
    );
    println!(
        "| median over {rounds} rounds: 8 writers | | {e_raw:.0}% of raw, {e_sync:.0}% of raw + fdatasync |"
    );
    drop(store8);
    drop(store);
    drop(db);

    // 3. RSS at N records, in a fresh process with the store's default configuration (what `cmr serve`
    // runs with), so that nothing of the phases above counts.
    let total: usize = std::env::var("CMR_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let out = std::process::Command::new(std::env::current_exe().expect("this bench"))
        .env(RSS_CHILD, total.to_string())
        .output()
        .expect("the RSS child runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set in the child process that measures RSS: the number of records to write.
const RSS_CHILD: &str = "CMR_BENCH_RSS_CHILD";

/// The RSS child: writes `total` records of 1 KiB in batches of 1,000 into a store with the default
/// cache, reopens it (as a restarted server would, rebuilding its state from the log), and reports RSS
/// after each.
fn rss_child(total: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), None);
    let v = vault(&store, 1);
    let mut w = Writer::new(&v, 0);
    let start = Instant::now();
    let mut written = 0;
    while written < total {
        let n = 1000.min(total - written);
        store.execute(w.op(n, 1024)).expect("write");
        written += n;
    }
    println!(
        "| write {total} records of 1 KiB (batches of 1,000) | | {:.1} s |",
        start.elapsed().as_secs_f64()
    );
    let mib = cmr_store::DEFAULT_CACHE / (1024 * 1024);
    println!(
        "| RSS with {total} records, default cache_capacity {mib} MiB, after writing | | {:.0} MiB |",
        rss_mib()
    );
    drop(store);
    let start = Instant::now();
    let store = open_with(dir.path(), None);
    println!(
        "| reopen (replay the log) | | {:.1} s |",
        start.elapsed().as_secs_f64()
    );
    println!(
        "| RSS with {total} records, default cache_capacity {mib} MiB, after a reopen | | {:.0} MiB |",
        rss_mib()
    );
    drop(store);
}
