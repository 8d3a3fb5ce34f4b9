//! Record sealing and opening against the raw primitives, measured in the same run.
//!
//! - `seal/*` and `open/*`: what a writer does (fresh data key, two AEADs, the digest for the batch) and
//!   what a reader does (unwrap, decrypt), at 64 B, 1 KiB and 16 KiB.
//! - `reference/*`: ring ChaCha20-Poly1305 seal plus SHA-256 of the same bytes, the floor for both.
//! - `read10/*`: verify and open a read of 10 × 1 KiB records written in one batch and in ten batches,
//!   next to one `verify_strict`.
//!
//! Run: `cargo bench -p cmr-core --bench records`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

use cmr_core::batch::{Batch, FamilyLedger, SignedBatch, verify_read};
use cmr_core::epoch::EpochSecret;
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::{DeviceKeys, IdentityId};
use cmr_core::keys::{SignedEnvelope, verify_many};
use cmr_core::record::{FamilyKeys, RecordId, RecordSealer, SealedRecord};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const SIZES: [usize; 3] = [64, 1024, 16 * 1024];

fn setup() -> (IdentityId, cmr_core::family::FamilyId, EpochSecret, Period) {
    let mut rng = rand::rng();
    let customer = IdentityId([1; 32]);
    let pk = PseudonymKey::generate(&mut rng);
    let family = FamilyName::Transactions(pk.counterparty(&IdentityId([2; 32]))).id(&customer);
    let period = Period::from_year_month(2026, 11).expect("a valid month");
    (customer, family, EpochSecret::generate(&mut rng), period)
}

fn seal_open(c: &mut Criterion) {
    let (customer, family, secret, period) = setup();
    let sealer = RecordSealer::new(
        customer,
        family,
        1,
        customer,
        &secret.read_key(period),
        period,
    )
    .expect("the customer seals with the read chain");
    let mut rng = rand::rng();
    let ring_key =
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).expect("32-byte key"));

    for size in SIZES {
        let content = vec![0xa5u8; size];
        let mut group = c.benchmark_group(format!("records/{size}B"));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("reference", "ring-aead+sha256"), |b| {
            let mut buf = content.clone();
            b.iter(|| {
                let tag = ring_key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([0; 12]),
                        Aad::empty(),
                        &mut buf,
                    )
                    .expect("seal");
                let d = ring::digest::digest(&ring::digest::SHA256, &buf);
                let _ = black_box((tag, d));
            })
        });
        group.bench_function(BenchmarkId::new("seal", "record+digest"), |b| {
            b.iter(|| {
                let id = RecordId::generate(&mut rng);
                black_box(sealer.seal(&mut rng, id, &content).expect("seal"))
            })
        });
        let record = sealer
            .seal(&mut rng, RecordId([9; 16]), &content)
            .expect("seal");
        let mut keys = FamilyKeys::new(customer, family);
        keys.insert(1, secret.read_key(period));
        keys.open(&record).expect("warm the wrap-key cache");
        group.bench_function(BenchmarkId::new("open", "record"), |b| {
            b.iter(|| black_box(keys.open(&record).expect("open")))
        });
        group.finish();
    }
}

fn read10(c: &mut Criterion) {
    let (customer, family, secret, period) = setup();
    let mut rng = rand::rng();
    let device = DeviceKeys::generate(&mut rng);
    let sealer = RecordSealer::new(
        customer,
        family,
        1,
        customer,
        &secret.read_key(period),
        period,
    )
    .expect("the customer seals with the read chain");
    let records: Vec<SealedRecord> = (0..10)
        .map(|i| {
            sealer
                .seal(&mut rng, RecordId([i; 16]), &[i; 1024])
                .expect("seal")
        })
        .collect();
    let vk = device.signing.verifying_key();
    // The reader holds its period key already; each read derives the wrap key afresh.
    let reader_key = secret.read_key(period);
    let mut group = c.benchmark_group("read10x1KiB");
    for batches_n in [1usize, 10] {
        let mut ledger = FamilyLedger::new(customer, family, Scope::Transactions);
        let mut batches = Vec::new();
        for chunk in records.chunks(10 / batches_n) {
            let b = Batch::for_records(device.id(), ledger.head().digest(), chunk).expect("batch");
            ledger.apply(&b, chunk).expect("apply");
            batches.push(SignedBatch::sign(b, &device.signing));
        }
        let head = ledger.head().digest();
        let proof = ledger
            .prove_read(ledger.head().batches, period, period, None, 100)
            .expect("proof");
        let id = format!("{batches_n}-batches");
        group.bench_function(BenchmarkId::new("verify+open", id), |b| {
            b.iter(|| {
                let read = verify_read(&head, &proof, &records, &batches, |_| Some(vk), None)
                    .expect("verifies");
                let mut keys = FamilyKeys::new(customer, family);
                keys.insert(1, reader_key.clone());
                for r in read.records {
                    black_box(keys.open(r).expect("open"));
                }
            })
        });
    }
    for n in [1usize, 10] {
        let envs: Vec<SignedEnvelope> = (0..n)
            .map(|i| SignedEnvelope::sign(vec![i as u8; 200], &device.signing))
            .collect();
        let items: Vec<_> = envs.iter().map(|e| (e, vk)).collect();
        group.bench_function(BenchmarkId::new("verify_many", n), |b| {
            b.iter(|| verify_many(black_box(&items)).expect("valid"))
        });
    }
    let msg = b"one statement";
    let sig = device.signing.sign(msg);
    group.bench_function(BenchmarkId::new("reference", "one-verify_strict"), |b| {
        b.iter(|| vk.verify(black_box(msg), &sig).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, seal_open, read10);
criterion_main!(benches);
