//! Log benchmarks, with their references measured in the same run. One pass each (these are large runs,
//! not micro-benchmarks), printed as a table.
//!
//! - appends per second into the tree (salt, commitment, leaf, nodes), up to N entries;
//! - inclusion and consistency proof generation at N entries;
//! - full audit of N entries (counted per signature) against strict-checked batch verification on both
//!   cores;
//! - incremental audit of 1,000 new entries on the N-entry log against 1,000 `verify_strict` calls.
//!
//! Run: `cargo bench -p cmr-log --bench log` (N = 1,000,000; set CMR_BENCH_ENTRIES to change it).

use std::hint::black_box;
use std::time::Instant;

use cmr_core::consent::{
    Access, Body, Duration, Grant, GrantFamily, SignedStatement, Statement, StatementId,
};
use cmr_core::decision::AccessKind;
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig::{self, Request};
use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity};
use cmr_core::keys::{KemSecretKey, SignedEnvelope, SigningKey, VerifyingKey, verify_many};
use cmr_log::auditor::Auditor;
use cmr_log::entry::{AccessRecord, AccessedFamily, EntryKind};
use cmr_log::memlog::{MemoryLog, MemorySource};
use cmr_log::note::{NoteSigner, TYPE_ED25519};

const T0: u64 = 1_794_700_800;

fn per_sec(n: u64, secs: f64) -> String {
    format!("{:.0}/s", n as f64 / secs)
}

struct Customer {
    id: IdentityId,
    grant: StatementId,
    family: FamilyId,
}

fn main() {
    let n: u64 = std::env::var("CMR_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut rng = rand::rng();
    println!("log benchmarks, N = {n}");

    // 1. Tree appends and proofs.
    let mut log = MemoryLog::new();
    let company = IdentityId([2; 32]);
    let start = Instant::now();
    for i in 0..n {
        log.append(
            &mut rng,
            EntryKind::FamilyHead,
            T0 + i / 1000,
            company,
            None,
            vec![0u8; 64],
        )
        .expect("time increases");
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "| appends (64-byte payload, salt + commitment + tree) | {n} | {:.2} s | {} |",
        t,
        per_sec(n, t)
    );
    let proofs = 10_000u64;
    let start = Instant::now();
    for i in 0..proofs {
        black_box(
            log.tree()
                .inclusion_proof((i * 7919) % n, n)
                .expect("in range"),
        );
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "| inclusion proofs at N | {proofs} | {:.3} s | {} |",
        t,
        per_sec(proofs, t)
    );
    let start = Instant::now();
    for i in 0..proofs {
        black_box(
            log.tree()
                .consistency_proof(1 + (i * 7919) % (n - 1), n)
                .expect("in range"),
        );
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "| consistency proofs at N | {proofs} | {:.3} s | {} |",
        t,
        per_sec(proofs, t)
    );
    drop(log);

    // 2. A realistic log of N entries: 100 customers, one company, one grant each, then accesses.
    let signer = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .expect("valid name");
    let mut log = MemoryLog::new();
    let mut time = T0;
    let mut next_time = || {
        time += 1;
        time / 100 * 100
    };
    let acme = create_identity(&mut rng, Role::Company);
    let acme_id = acme.inception.identity();
    let acme_device = DeviceKeys::generate(&mut rng);
    log.append(
        &mut rng,
        EntryKind::KeyEvent,
        next_time(),
        acme_id,
        None,
        acme.inception.encode(),
    )
    .expect("time");
    log.append(
        &mut rng,
        EntryKind::DeviceCertificate,
        next_time(),
        acme_id,
        None,
        acme_device
            .certify(acme_id, 0, &acme.identity_key, 0)
            .encode(),
    )
    .expect("time");
    let mut customers = Vec::new();
    for _ in 0..100 {
        let c = create_identity(&mut rng, Role::Customer);
        let id = c.inception.identity();
        let device = DeviceKeys::generate(&mut rng);
        log.append(
            &mut rng,
            EntryKind::KeyEvent,
            next_time(),
            id,
            Some(id),
            c.inception.encode(),
        )
        .expect("time");
        log.append(
            &mut rng,
            EntryKind::DeviceCertificate,
            next_time(),
            id,
            Some(id),
            device.certify(id, 0, &c.identity_key, 0).encode(),
        )
        .expect("time");
        let family =
            FamilyName::Transactions(PseudonymKey::generate(&mut rng).counterparty(&acme_id))
                .id(&id);
        let dir = Directory {
            customer: id,
            version: 1,
            prev: Digest([0; 32]),
            signer: device.id(),
            issued_at: 0,
            devices: vec![DirectoryDevice {
                device: device.id(),
                signing_key: device.signing.verifying_key(),
                kem_key: device.kem.public_key(),
            }],
            families: vec![DirectoryFamily {
                family,
                scope: Scope::Transactions,
                epoch: 1,
                appenders: vec![],
            }],
        }
        .sign(&device.signing);
        log.append(
            &mut rng,
            EntryKind::Directory,
            next_time(),
            id,
            Some(id),
            dir.encode(),
        )
        .expect("time");
        let kem = KemSecretKey::generate(&mut rng);
        let g = Grant {
            grantee: acme_id,
            request: None,
            purpose: "statements".into(),
            duration: Duration::Persistent,
            not_before: T0,
            expires: None,
            lookback_start: Period::ORIGIN,
            window_months: None,
            scopes: vec![(Scope::Transactions, Access::Read)],
            families: vec![GrantFamily {
                family,
                scope: Scope::Transactions,
                epoch: 1,
                access: Access::Read,
            }],
            append_family: None,
            grantee_kem: kem.public_key(),
        };
        let st = Statement {
            customer: id,
            author: id,
            device: device.id(),
            issued_at: 0,
            body: Body::Grant(g),
        };
        let gid = SignedStatement::grant_id(&st);
        let bundle = KeyBundle {
            entries: vec![BundleEntry {
                family,
                epoch: 1,
                key: EpochSecret::generate(&mut rng).read_key(Period::ORIGIN),
            }],
        }
        .seal(&mut rng, id, acme_id, &kem.public_key(), gid.0);
        let signed = SignedStatement::sign(st, Some(bundle), &device.signing)
            .expect("a grant with its bundle");
        log.append(
            &mut rng,
            EntryKind::Statement,
            next_time(),
            id,
            Some(id),
            signed.encode(),
        )
        .expect("time");
        customers.push(Customer {
            id,
            grant: gid,
            family,
        });
    }
    let keyid = acme_device.id().to_hex();
    let access = |log: &mut MemoryLog, i: u64, t: u64| {
        let c = &customers[(i % 100) as usize];
        let to = Period::from_year_month(2026, 11).expect("valid");
        let target = cmr_log::entry::access_target(
            &c.id,
            &c.family,
            AccessKind::Read,
            &c.grant,
            None,
            Period::ORIGIN,
            to,
        );
        let req = Request::new("POST", "https", "vault.example", &target, vec![]);
        let nonce = format!("n{i}");
        let h = httpsig::sign_request(&req, b"{}", &acme_device.signing, &keyid, &nonce, t as i64)
            .expect("valid params");
        let parsed =
            httpsig::parse_signatures(&h.signature_input, &h.signature).expect("own output parses");
        let with_digest = Request::new(
            "POST",
            "https",
            "vault.example",
            &target,
            vec![("content-digest", h.content_digest.as_str())],
        );
        let rec = AccessRecord {
            grant: c.grant,
            kind: AccessKind::Read,
            epoch: None,
            families: vec![AccessedFamily {
                family: c.family,
                from: Period::ORIGIN,
                to,
            }],
            records: vec![],
            keyid: keyid.clone(),
            signature_base: httpsig::signature_base(&with_digest, &parsed[0].params).expect("base"),
            signature: parsed[0].signature.clone().try_into().expect("64 bytes"),
            head: None,
        };
        log.append(
            &mut rand::rng(),
            EntryKind::Access,
            t,
            acme_id,
            Some(c.id),
            rec.encode(),
        )
        .expect("time");
    };
    let base = log.size();
    let start = Instant::now();
    let mut t = time / 100 * 100 + 100;
    for i in 0..n.saturating_sub(base) {
        if i % 1000 == 0 {
            t += 1;
        }
        access(&mut log, i, t);
    }
    println!(
        "| build the audit log ({} entries, signing each access) | | {:.1} s | |",
        log.size(),
        start.elapsed().as_secs_f64()
    );

    let last = log.body(log.size() - 1).expect("not erased").body.len();
    println!(
        "| bytes per access entry: body + salt + commitment | | {} + 32 + 32 | |",
        last
    );

    // Reference: strict-checked batch verification on both cores, same kind of messages.
    let refs = 200_000u64.min(n);
    let envs: Vec<SignedEnvelope> = (0..refs)
        .map(|i| {
            SignedEnvelope::sign(
                format!("reference {i} {}", "x".repeat(300)).into_bytes(),
                &acme_device.signing,
            )
        })
        .collect();
    let vk: VerifyingKey = acme_device.signing.verifying_key();
    let items: Vec<(&SignedEnvelope, VerifyingKey)> = envs.iter().map(|e| (e, vk)).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        let (a, b) = items.split_at(items.len() / 2);
        let h = s.spawn(|| a.chunks(4096).for_each(|c| verify_many(c).expect("valid")));
        b.chunks(4096).for_each(|c| verify_many(c).expect("valid"));
        h.join().expect("no panic");
    });
    let t_ref = start.elapsed().as_secs_f64();
    let ref_rate = refs as f64 / t_ref;
    println!(
        "| reference: batch verification, both cores | {refs} sigs | {:.2} s | {:.0} sigs/s |",
        t_ref, ref_rate
    );

    // 3. Full audit.
    let full = log.size() - 1000.min(log.size() / 2);
    let mut auditor = Auditor::new(signer.verifier());
    let start = Instant::now();
    let report = auditor
        .run(&mut MemorySource {
            log: &log,
            checkpoint: log.checkpoint_at(full, &signer),
        })
        .expect("in-memory source");
    let t_full = start.elapsed().as_secs_f64();
    assert!(
        report.is_clean(),
        "{:?}",
        &report.violations[..report.violations.len().min(5)]
    );
    let sigs: u64 = report.counts.values().sum();
    println!(
        "| full audit | {full} entries | {:.2} s | {:.0} sigs/s = {:.0}% of the reference |",
        t_full,
        sigs as f64 / t_full,
        100.0 * sigs as f64 / t_full / ref_rate
    );

    // 4. Incremental audit of the last 1,000 entries, against 1,000 verify_strict.
    let start = Instant::now();
    let report = auditor
        .run(&mut MemorySource {
            log: &log,
            checkpoint: log.checkpoint(&signer),
        })
        .expect("in-memory source");
    let t_inc = start.elapsed().as_secs_f64();
    assert!(report.is_clean());
    let start = Instant::now();
    for e in envs.iter().take(1000) {
        vk.verify(&e.body, &e.signature).expect("valid");
    }
    let t_strict = start.elapsed().as_secs_f64();
    println!(
        "| incremental audit | {} entries | {:.3} s | {:.2}× the time of 1,000 verify_strict ({:.3} s) |",
        log.size() - full,
        t_inc,
        t_inc / t_strict,
        t_strict
    );
}
