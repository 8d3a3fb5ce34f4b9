//! Records, batches, heads, directories and rotation: every attack of the records issue, each in its own
//! test, plus property tests.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::batch::{Batch, BatchError, FamilyLedger, SignedBatch, verify_read};
use cmr_core::directory::{
    Directory, DirectoryDevice, DirectoryError, DirectoryFamily, DirectoryTracker, Keeper,
    SignedDirectory, rotate_family,
};
use cmr_core::epoch::{Chain, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::{
    DeviceKeys, IdentityId, IdentityState, KeyHistory, Role, create_identity, revoke_device,
};
use cmr_core::keys::{KemSecretKey, VerifyingKey};
use cmr_core::record::{FamilyKeys, RecordId, RecordOpenError, RecordSealer, SealedRecord};
use proptest::prelude::*;

fn p(y: u32, m: u32) -> Period {
    Period::from_year_month(y, m).unwrap()
}

/// A customer with one device, a company with one device, and the customer's transactions family with
/// that company.
struct World {
    customer: IdentityId,
    customer_device: DeviceKeys,
    customer_state: IdentityState,
    identity_key: cmr_core::keys::SigningKey,
    company: IdentityId,
    company_device: DeviceKeys,
    company_kem: KemSecretKey,
    family: FamilyId,
    secret: EpochSecret,
}

fn world() -> World {
    let mut r = rand::rng();
    let c = create_identity(&mut r, Role::Customer);
    let customer = c.inception.identity();
    let mut customer_state = IdentityState::new(KeyHistory::incept(&c.inception, 1).unwrap());
    let customer_device = DeviceKeys::generate(&mut r);
    customer_state
        .certify(&customer_device.certify(customer, 0, &c.identity_key, 0), 2)
        .unwrap();
    let company = create_identity(&mut r, Role::Company).inception.identity();
    let pk = PseudonymKey::generate(&mut r);
    let family = FamilyName::Transactions(pk.counterparty(&company)).id(&customer);
    World {
        customer,
        customer_device,
        customer_state,
        identity_key: c.identity_key,
        company,
        company_device: DeviceKeys::generate(&mut r),
        company_kem: KemSecretKey::generate(&mut r),
        family,
        secret: EpochSecret::generate(&mut r),
    }
}

impl World {
    fn customer_sealer(&self, period: Period) -> RecordSealer {
        let key = self.secret.read_key(Period::ORIGIN);
        RecordSealer::new(self.customer, self.family, 1, self.customer, &key, period).unwrap()
    }

    fn company_sealer(&self, period: Period) -> RecordSealer {
        let key = self.secret.append_key(&self.company, period);
        RecordSealer::new(self.customer, self.family, 1, self.company, &key, period).unwrap()
    }

    fn reader_keys(&self, from: Period) -> FamilyKeys {
        let mut k = FamilyKeys::new(self.customer, self.family);
        k.insert(1, self.secret.read_key(from));
        k.insert(1, self.secret.append_key(&self.company, from));
        k
    }

    fn seal(&self, period: Period, n: usize) -> Vec<SealedRecord> {
        let s = self.customer_sealer(period);
        let mut r = rand::rng();
        (0..n)
            .map(|i| {
                let id = RecordId::generate(&mut r);
                s.seal(&mut r, id, format!("tx {i} in {period}").as_bytes())
                    .unwrap()
            })
            .collect()
    }

    fn batch(&self, ledger: &FamilyLedger, records: &[SealedRecord]) -> SignedBatch {
        let b =
            Batch::for_records(self.customer_device.id(), ledger.head().digest(), records).unwrap();
        SignedBatch::sign(b, &self.customer_device.signing)
    }

    fn device_key(&self) -> impl Fn(&Batch) -> Option<VerifyingKey> + '_ {
        move |b: &Batch| {
            if b.device == self.customer_device.id() && b.author == self.customer {
                Some(self.customer_device.signing.verifying_key())
            } else if b.device == self.company_device.id() && b.author == self.company {
                Some(self.company_device.signing.verifying_key())
            } else {
                None
            }
        }
    }
}

/// A ledger with records in three periods, written in several batches.
fn populated(w: &World) -> (FamilyLedger, Vec<SealedRecord>, Vec<SignedBatch>) {
    let mut ledger = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
    let mut all = Vec::new();
    let mut batches = Vec::new();
    for (period, n) in [
        (p(2026, 1), 3),
        (p(2026, 3), 4),
        (p(2026, 5), 2),
        (p(2026, 3), 2),
    ] {
        let recs = w.seal(period, n);
        let b = w.batch(&ledger, &recs);
        ledger.apply(b.batch(), &recs).unwrap();
        all.extend(recs);
        batches.push(b);
    }
    (ledger, all, batches)
}

/// The records a server returns for a proof, in page order.
fn serve(proof: &cmr_core::batch::ReadProof, all: &[SealedRecord]) -> Vec<SealedRecord> {
    proof
        .pages
        .iter()
        .flat_map(|pg| pg.ids.iter())
        .map(|id| all.iter().find(|r| r.header().id == *id).unwrap().clone())
        .collect()
}

// ---- Records ----

#[test]
fn seal_open_round_trip_customer_and_company() {
    let w = world();
    let mut r = rand::rng();
    let mine = w
        .customer_sealer(p(2026, 2))
        .seal(&mut r, RecordId([1; 16]), b"coffee 3.20")
        .unwrap();
    let theirs = w
        .company_sealer(p(2026, 2))
        .seal(&mut r, RecordId([2; 16]), b"invoice 42")
        .unwrap();
    let mut keys = w.reader_keys(p(2026, 1));
    assert_eq!(&**keys.open(&mine).unwrap(), b"coffee 3.20");
    assert_eq!(&**keys.open(&theirs).unwrap(), b"invoice 42");
    let again = SealedRecord::decode(mine.as_bytes().to_vec()).unwrap();
    assert_eq!(again, mine);
    // The company can open its own append, and nothing the customer wrote.
    let mut company_keys = FamilyKeys::new(w.customer, w.family);
    company_keys.insert(1, w.secret.append_key(&w.company, p(2026, 1)));
    assert_eq!(&**company_keys.open(&theirs).unwrap(), b"invoice 42");
    assert_eq!(
        company_keys.open(&mine).unwrap_err(),
        RecordOpenError::NoKey
    );
}

/// Rewrites one header field of a sealed record and returns the result, re-parsed.
fn edit_header(rec: &SealedRecord, offset: usize, value: &[u8]) -> Option<SealedRecord> {
    let mut bytes = rec.as_bytes().to_vec();
    bytes[offset..offset + value.len()].copy_from_slice(value);
    SealedRecord::decode(bytes).ok()
}

#[test]
fn a_record_moved_between_customers_families_periods_epochs_or_ids_fails() {
    let w = world();
    let rec = w.seal(p(2026, 2), 1).remove(0);
    let mut keys = w.reader_keys(p(2026, 1));
    // Header layout after the 6-byte frame: customer 32, family 32, epoch 8, period 4, id 16, author 32.
    let moved = [
        ("customer", 6, vec![9u8; 32]),
        ("family", 38, vec![9u8; 32]),
        ("epoch", 70, 2u64.to_be_bytes().to_vec()),
        ("period", 78, p(2026, 3).0.to_be_bytes().to_vec()),
        ("id", 82, vec![9u8; 16]),
    ];
    for (what, offset, value) in moved {
        // Either the edited record no longer parses, or it parses and does not open.
        match edit_header(&rec, offset, &value) {
            None => assert_ne!(what, "id", "an id edit keeps the structure valid"),
            Some(edited) => {
                let got = keys.open(&edited).unwrap_err();
                assert!(
                    matches!(
                        got,
                        RecordOpenError::Decrypt
                            | RecordOpenError::Misplaced
                            | RecordOpenError::NoKey
                    ),
                    "{what}: {got:?}"
                );
                assert_ne!(edited.digest(), rec.digest(), "{what}");
            }
        }
    }
    // The period and id edits reach the AEAD, which refuses them.
    for (offset, value) in [
        (78, p(2026, 3).0.to_be_bytes().to_vec()),
        (82, vec![9u8; 16]),
    ] {
        let edited = edit_header(&rec, offset, &value).unwrap();
        assert_eq!(keys.open(&edited).unwrap_err(), RecordOpenError::Decrypt);
    }
    // Moved whole into another customer's family listing.
    let other = world();
    let mut other_keys = other.reader_keys(p(2026, 1));
    assert_eq!(
        other_keys.open(&rec).unwrap_err(),
        RecordOpenError::Misplaced
    );
}

#[test]
fn a_forged_author_fails() {
    let w = world();
    let mut r = rand::rng();
    // The company claims the customer wrote its record: the header must change, which breaks the AEAD.
    let rec = w
        .company_sealer(p(2026, 2))
        .seal(&mut r, RecordId([3; 16]), b"x")
        .unwrap();
    let mut keys = w.reader_keys(p(2026, 1));
    let author_offset = 6 + 32 + 32 + 8 + 4 + 16;
    let forged = edit_header(&rec, author_offset, &[7u8; 32]).unwrap();
    assert!(keys.open(&forged).is_err());
    // Claiming the customer as author makes the header inconsistent (a company record on the read
    // chain), which does not even parse.
    assert!(edit_header(&rec, author_offset, &w.customer.0).is_none());
    // A sealer cannot be built for someone else's chain.
    let key = w.secret.append_key(&w.company, p(2026, 2));
    assert!(
        RecordSealer::new(
            w.customer,
            w.family,
            1,
            IdentityId([7; 32]),
            &key,
            p(2026, 2)
        )
        .is_err()
    );
    assert!(RecordSealer::new(w.customer, w.family, 1, w.customer, &key, p(2026, 2)).is_err());
    // A batch by the company's device naming the customer as author is refused by the reader's key lookup.
    let mut ledger = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
    let recs = w.seal(p(2026, 2), 1);
    let mut b = Batch::for_records(w.company_device.id(), ledger.head().digest(), &recs).unwrap();
    b.author = w.customer;
    let forged = SignedBatch::sign(b, &w.company_device.signing);
    ledger.apply(forged.batch(), &recs).unwrap();
    let proof = ledger
        .prove_read(1, p(2026, 1), p(2026, 12), None, 100)
        .unwrap();
    let served = serve(&proof, &recs);
    assert_eq!(
        verify_read(
            &ledger.head().digest(),
            &proof,
            &served,
            &[forged],
            w.device_key(),
            None
        )
        .unwrap_err(),
        BatchError::BadBatchSignature(w.company_device.id())
    );
}

#[test]
fn a_tampered_ciphertext_tag_or_nonce_fails() {
    let w = world();
    let rec = w.seal(p(2026, 2), 1).remove(0);
    let mut keys = w.reader_keys(p(2026, 1));
    let len = rec.as_bytes().len();
    let header = 6 + 32 + 32 + 8 + 4 + 16 + 32 + 1;
    let places = [
        ("wrap nonce", header),
        ("wrapped key", header + 12 + 5),
        ("wrap tag", header + 12 + 40),
        ("content", header + 12 + 48 + 4 + 1),
        ("content tag", len - 1),
    ];
    for (what, i) in places {
        let mut bytes = rec.as_bytes().to_vec();
        bytes[i] ^= 0x01;
        let edited = SealedRecord::decode(bytes).unwrap();
        assert_eq!(
            keys.open(&edited).unwrap_err(),
            RecordOpenError::Decrypt,
            "{what}"
        );
    }
    let mut truncated = rec.as_bytes().to_vec();
    truncated.pop();
    assert!(SealedRecord::decode(truncated).is_err());
}

#[test]
fn a_company_append_key_used_on_another_family_fails() {
    let w = world();
    let mut r = rand::rng();
    let other_family = FamilyName::profile(Scope::ProfileContact)
        .unwrap()
        .id(&w.customer);
    let key = w.secret.append_key(&w.company, p(2026, 2));
    // Sealed as if for the other family with this family's key: the other family's readers cannot open.
    let sealer =
        RecordSealer::new(w.customer, other_family, 1, w.company, &key, p(2026, 2)).unwrap();
    let rec = sealer.seal(&mut r, RecordId([4; 16]), b"x").unwrap();
    let other_secret = EpochSecret::generate(&mut r);
    let mut other_keys = FamilyKeys::new(w.customer, other_family);
    other_keys.insert(1, other_secret.read_key(Period::ORIGIN));
    other_keys.insert(1, other_secret.append_key(&w.company, Period::ORIGIN));
    assert_eq!(other_keys.open(&rec).unwrap_err(), RecordOpenError::Decrypt);
}

#[test]
fn a_period_key_opens_later_periods_only() {
    let w = world();
    let early = w.seal(p(2026, 1), 1).remove(0);
    let late = w.seal(p(2026, 6), 1).remove(0);
    let mut keys = w.reader_keys(p(2026, 3));
    assert!(keys.open(&late).is_ok());
    assert!(matches!(
        keys.open(&early).unwrap_err(),
        RecordOpenError::Backwards(_)
    ));
}

// ---- Rotation ----

fn directory(w: &World) -> SignedDirectory {
    Directory {
        customer: w.customer,
        version: 1,
        prev: Digest([0; 32]),
        signer: w.customer_device.id(),
        issued_at: 0,
        devices: vec![DirectoryDevice {
            device: w.customer_device.id(),
            signing_key: w.customer_device.signing.verifying_key(),
            kem_key: w.customer_device.kem.public_key(),
        }],
        families: vec![DirectoryFamily {
            family: w.family,
            scope: Scope::Transactions,
            epoch: 1,
            appenders: vec![w.company],
        }],
    }
    .sign(&w.customer_device.signing)
}

#[test]
fn rotation_gives_keepers_fresh_keys_and_the_revoked_grantee_nothing() {
    let w = world();
    let mut r = rand::rng();
    let dir = directory(&w);
    let kept = DeviceKeys::generate(&mut r);
    let kept_id = IdentityId([42; 32]);
    let keepers = [Keeper {
        grantee: kept_id,
        kem_key: kept.kem.public_key(),
        grant: [1; 32],
        read_from: Some(p(2026, 4)),
        append_from: None,
    }];
    let rotation = rotate_family(
        &mut r,
        &dir,
        w.family,
        2,
        &keepers,
        (w.customer_device.id(), &w.customer_device.signing),
        10,
    )
    .unwrap();
    let new_dir = rotation.directory.directory();
    assert_eq!(new_dir.version, 2);
    assert_eq!(new_dir.prev, dir.digest());
    assert_eq!(new_dir.family(&w.family).unwrap().epoch, 2);
    assert!(new_dir.family(&w.family).unwrap().appenders.is_empty());
    assert_eq!(rotation.bundles.len(), 1);

    // Written after the rotation, under epoch 2.
    let key2 = rotation.secret.read_key(Period::ORIGIN);
    let after = RecordSealer::new(w.customer, w.family, 2, w.customer, &key2, p(2026, 7))
        .unwrap()
        .seal(&mut r, RecordId([5; 16]), b"after")
        .unwrap();
    let before_lookback = RecordSealer::new(w.customer, w.family, 2, w.customer, &key2, p(2026, 2))
        .unwrap()
        .seal(&mut r, RecordId([6; 16]), b"old month")
        .unwrap();

    // The revoked company's epoch-1 keys, chained forward as far as it likes, open nothing of epoch 2.
    let mut revoked = w.reader_keys(p(2026, 1));
    assert_eq!(revoked.open(&after).unwrap_err(), RecordOpenError::NoKey);
    let mut relabelled = FamilyKeys::new(w.customer, w.family);
    relabelled.insert(2, w.secret.read_key(p(2026, 1)));
    assert_eq!(
        relabelled.open(&after).unwrap_err(),
        RecordOpenError::Decrypt
    );

    // The keeper opens its bundle and reads from its look-back start on, never before it.
    let (grantee, grant, sealed) = &rotation.bundles[0];
    let bundle = KeyBundle::open(sealed, w.customer, *grantee, &kept.kem, *grant).unwrap();
    let mut keeper_keys = FamilyKeys::new(w.customer, w.family);
    keeper_keys.insert(2, bundle.key(&w.family, 2, Chain::Read).unwrap().clone());
    assert_eq!(&**keeper_keys.open(&after).unwrap(), b"after");
    assert!(matches!(
        keeper_keys.open(&before_lookback).unwrap_err(),
        RecordOpenError::Backwards(_)
    ));
    // The revoked company cannot open the keeper's bundle.
    assert!(KeyBundle::open(sealed, w.customer, *grantee, &w.company_kem, *grant).is_err());
}

#[test]
fn rotation_keeps_appenders_and_lets_readers_open_their_appends() {
    let w = world();
    let mut r = rand::rng();
    let dir = directory(&w);
    let reader = KemSecretKey::generate(&mut r);
    let reader_id = IdentityId([43; 32]);
    let keepers = [
        Keeper {
            grantee: w.company,
            kem_key: w.company_kem.public_key(),
            grant: [2; 32],
            read_from: None,
            append_from: Some(p(2026, 5)),
        },
        Keeper {
            grantee: reader_id,
            kem_key: reader.public_key(),
            grant: [3; 32],
            read_from: Some(p(2026, 1)),
            append_from: None,
        },
    ];
    let rot = rotate_family(
        &mut r,
        &dir,
        w.family,
        2,
        &keepers,
        (w.customer_device.id(), &w.customer_device.signing),
        10,
    )
    .unwrap();
    assert_eq!(
        rot.directory
            .directory()
            .family(&w.family)
            .unwrap()
            .appenders,
        vec![w.company]
    );
    let company_bundle = KeyBundle::open(
        &rot.bundles[0].2,
        w.customer,
        w.company,
        &w.company_kem,
        [2; 32],
    )
    .unwrap();
    assert!(
        company_bundle.key(&w.family, 2, Chain::Read).is_none(),
        "an appender gets no read key"
    );
    let append = company_bundle
        .key(&w.family, 2, Chain::Append(w.company))
        .unwrap();
    let rec = RecordSealer::new(w.customer, w.family, 2, w.company, append, p(2026, 6))
        .unwrap()
        .seal(&mut r, RecordId([7; 16]), b"appended")
        .unwrap();
    let reader_bundle =
        KeyBundle::open(&rot.bundles[1].2, w.customer, reader_id, &reader, [3; 32]).unwrap();
    let mut keys = FamilyKeys::new(w.customer, w.family);
    for e in reader_bundle.entries {
        keys.insert(e.epoch, e.key);
    }
    assert_eq!(&**keys.open(&rec).unwrap(), b"appended");
}

// ---- Directory ----

#[test]
fn directory_rollback_fork_and_substitution_are_refused() {
    let w = world();
    let mut r = rand::rng();
    let v1 = directory(&w);
    let position = 10;
    let verify = |d: &SignedDirectory| d.verify(&w.customer_state, position);
    let mut tracker = DirectoryTracker::new(w.customer);
    tracker.accept(std::slice::from_ref(&v1), verify).unwrap();
    let family2 = DirectoryFamily {
        family: FamilyId([8; 32]),
        scope: Scope::ProfileContact,
        epoch: 1,
        appenders: vec![],
    };
    let v2 = v1
        .directory()
        .next_with_family(&v1, w.customer_device.id(), 1, family2.clone())
        .sign(&w.customer_device.signing);
    tracker.accept(std::slice::from_ref(&v2), verify).unwrap();
    // Same version again is fine; the older one is a rollback.
    tracker.accept(std::slice::from_ref(&v2), verify).unwrap();
    assert_eq!(
        tracker
            .accept(std::slice::from_ref(&v1), verify)
            .unwrap_err(),
        DirectoryError::Rollback { seen: 2, got: 1 }
    );
    // Another version 2: a fork.
    let fork = v1
        .directory()
        .next_with_family(
            &v1,
            w.customer_device.id(),
            2,
            DirectoryFamily {
                epoch: 5,
                ..family2
            },
        )
        .sign(&w.customer_device.signing);
    assert_eq!(
        tracker
            .accept(std::slice::from_ref(&fork), verify)
            .unwrap_err(),
        DirectoryError::Fork(2)
    );
    // A version 3 that skips what we saw (built on the fork) does not chain.
    let v3_on_fork = fork
        .directory()
        .next_with_family(
            &fork,
            w.customer_device.id(),
            3,
            DirectoryFamily {
                family: FamilyId([9; 32]),
                scope: Scope::ProfileAddress,
                epoch: 1,
                appenders: vec![],
            },
        )
        .sign(&w.customer_device.signing);
    assert_eq!(
        tracker
            .accept(std::slice::from_ref(&v3_on_fork), verify)
            .unwrap_err(),
        DirectoryError::Broken(3)
    );
    // Substituted: signed by a key that is not a customer device (the operator's, say).
    let rogue = DeviceKeys::generate(&mut r);
    let mut sub = v2.directory().next_with_family(
        &v2,
        rogue.id(),
        3,
        DirectoryFamily {
            family: FamilyId([9; 32]),
            scope: Scope::ProfileAddress,
            epoch: 1,
            appenders: vec![],
        },
    );
    sub.signer = rogue.id();
    let sub = sub.sign(&rogue.signing);
    assert!(matches!(
        tracker
            .accept(std::slice::from_ref(&sub), verify)
            .unwrap_err(),
        DirectoryError::Signature(_)
    ));
    // Claiming a real device but signed by another key.
    let mut claimed = v2.directory().next_with_family(
        &v2,
        w.customer_device.id(),
        3,
        DirectoryFamily {
            family: FamilyId([9; 32]),
            scope: Scope::ProfileAddress,
            epoch: 1,
            appenders: vec![],
        },
    );
    claimed.signer = w.customer_device.id();
    let claimed = claimed.sign(&rogue.signing);
    assert!(matches!(
        tracker
            .accept(std::slice::from_ref(&claimed), verify)
            .unwrap_err(),
        DirectoryError::Signature(_)
    ));
    // An unsigned directory (zero signature) is refused.
    let mut bytes = v2.encode();
    let n = bytes.len();
    bytes[n - 64..].fill(0);
    let unsigned = SignedDirectory::decode(&bytes).unwrap();
    assert!(matches!(
        unsigned.verify(&w.customer_state, position).unwrap_err(),
        DirectoryError::Signature(_)
    ));
    // A device revoked before the position can no longer sign directories.
    let mut state = w.customer_state.clone();
    state
        .revoke(
            &revoke_device(w.customer, 0, &w.identity_key, w.customer_device.id(), 0),
            11,
        )
        .unwrap();
    assert!(v2.verify(&state, 12).is_err());
    assert_eq!(tracker.latest().unwrap().0, 2);
    let round = SignedDirectory::decode(&v2.encode()).unwrap();
    assert_eq!(round, v2);
}

// ---- Batches, heads and complete reads ----

#[test]
fn a_complete_read_verifies() {
    let w = world();
    let (ledger, all, batches) = populated(&w);
    let head = ledger.head().digest();
    let proof = ledger
        .prove_read(ledger.head().batches, p(2026, 2), p(2026, 5), None, 100)
        .unwrap();
    let served = serve(&proof, &all);
    let read = verify_read(&head, &proof, &served, &batches, w.device_key(), None).unwrap();
    assert_eq!(read.records.len(), 8);
    let mut keys = w.reader_keys(p(2026, 2));
    for rec in read.records {
        keys.open(rec).unwrap();
    }
}

#[test]
fn a_stale_head_is_refused() {
    let w = world();
    let (mut ledger, all, batches) = populated(&w);
    // A writer that did not see the last batch.
    let recs = w.seal(p(2026, 6), 1);
    let b = Batch::for_records(
        w.customer_device.id(),
        ledger.head_at(2).unwrap().digest(),
        &recs,
    )
    .unwrap();
    assert!(matches!(
        ledger.apply(&b, &recs).unwrap_err(),
        BatchError::StaleHead { .. }
    ));
    // A server that serves an older head than the one the reader trusts.
    let old_proof = ledger
        .prove_read(3, p(2026, 1), p(2026, 12), None, 100)
        .unwrap();
    let served = serve(&old_proof, &all);
    assert_eq!(
        verify_read(
            &ledger.head().digest(),
            &old_proof,
            &served,
            &batches,
            w.device_key(),
            None
        )
        .unwrap_err(),
        BatchError::HeadMismatch
    );
    // Paging against the older, named head works.
    let old_head = ledger.head_at(3).unwrap().digest();
    verify_read(
        &old_head,
        &old_proof,
        &served,
        &batches,
        w.device_key(),
        None,
    )
    .unwrap();
}

#[test]
fn dropped_injected_or_reordered_records_are_detected() {
    let w = world();
    let (ledger, all, batches) = populated(&w);
    let head = ledger.head().digest();
    let proof = ledger
        .prove_read(ledger.head().batches, p(2026, 1), p(2026, 12), None, 100)
        .unwrap();
    let served = serve(&proof, &all);

    let mut dropped = served.clone();
    dropped.remove(4);
    assert!(verify_read(&head, &proof, &dropped, &batches, w.device_key(), None).is_err());

    let mut injected = served.clone();
    injected.insert(2, w.seal(p(2026, 1), 1).remove(0));
    assert!(verify_read(&head, &proof, &injected, &batches, w.device_key(), None).is_err());

    let mut reordered = served.clone();
    reordered.swap(3, 4);
    assert!(verify_read(&head, &proof, &reordered, &batches, w.device_key(), None).is_err());

    // The proof edited to hide a record: its page claims one id fewer.
    let mut short = proof.clone();
    short.pages[1].ids.pop();
    let served_short = serve(&short, &all);
    assert!(verify_read(&head, &short, &served_short, &batches, w.device_key(), None).is_err());
}

#[test]
fn batches_dropped_injected_or_reordered_are_detected() {
    let w = world();
    let (ledger, all, batches) = populated(&w);
    let head = ledger.head().digest();
    let proof = ledger
        .prove_read(ledger.head().batches, p(2026, 1), p(2026, 12), None, 100)
        .unwrap();
    let served = serve(&proof, &all);
    // A batch withheld: its records are not named by any signed batch.
    let mut fewer = batches.clone();
    fewer.remove(1);
    assert!(matches!(
        verify_read(&head, &proof, &served, &fewer, w.device_key(), None).unwrap_err(),
        BatchError::Unbatched(_)
    ));
    // A batch injected into the ledger out of order (not extending the head) is refused on write.
    let mut ledger2 = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
    let a = w.seal(p(2026, 1), 1);
    let b = w.seal(p(2026, 1), 1);
    let ba = w.batch(&ledger2, &a);
    let bb = w.batch(&ledger2, &b);
    ledger2.apply(ba.batch(), &a).unwrap();
    assert!(matches!(
        ledger2.apply(bb.batch(), &b).unwrap_err(),
        BatchError::StaleHead { .. }
    ));
    // A batch whose signature was altered.
    let mut bytes = batches[0].encode();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    let mut bad = batches.clone();
    bad[0] = SignedBatch::decode(&bytes).unwrap();
    assert_eq!(
        verify_read(&head, &proof, &served, &bad, w.device_key(), None).unwrap_err(),
        BatchError::BadBatchSignature(w.customer_device.id())
    );
    // Batches served in another order still verify: order is the ledger's, proven by the head.
    let mut shuffled = batches.clone();
    shuffled.reverse();
    verify_read(&head, &proof, &served, &shuffled, w.device_key(), None).unwrap();
}

#[test]
fn a_range_proof_that_leaves_out_a_period_fails() {
    let w = world();
    let (ledger, all, batches) = populated(&w);
    let head = ledger.head().digest();
    let proof = ledger
        .prove_read(ledger.head().batches, p(2026, 2), p(2026, 12), None, 100)
        .unwrap();
    // Periods served: 2026-01 (left neighbour), 03, 05. Drop 05 and its page.
    let mut cut = proof.clone();
    cut.periods.pop();
    cut.pages.pop();
    let served = serve(&cut, &all);
    assert!(verify_read(&head, &cut, &served, &batches, w.device_key(), None).is_err());
    // Drop the middle page only (period 03), keeping the leaves.
    let mut cut = proof.clone();
    cut.pages.remove(0);
    let served = serve(&cut, &all);
    assert_eq!(
        verify_read(&head, &cut, &served, &batches, w.device_key(), None).unwrap_err(),
        BatchError::IncompleteRange
    );
    // Drop the left neighbour: the range could then hide an earlier period inside [from, to].
    let full = ledger
        .prove_read(ledger.head().batches, p(2026, 3), p(2026, 12), None, 100)
        .unwrap();
    let mut no_neighbour = full.clone();
    no_neighbour.periods.remove(0);
    no_neighbour.periods_lo += 1;
    let served = serve(&no_neighbour, &all);
    assert!(
        verify_read(
            &head,
            &no_neighbour,
            &served,
            &batches,
            w.device_key(),
            None
        )
        .is_err()
    );
}

#[test]
fn paged_reads_follow_one_named_head() {
    let w = world();
    let (mut ledger, all, mut batches) = populated(&w);
    let named = ledger.head();
    let mut cursor = None;
    let mut got = 0;
    let mut pages = 0;
    // Another batch lands mid-read: pages keep verifying against the named head.
    let extra = w.seal(p(2026, 3), 2);
    let eb = w.batch(&ledger, &extra);
    ledger.apply(eb.batch(), &extra).unwrap();
    let mut everything = all.clone();
    everything.extend(extra);
    batches.push(eb);
    loop {
        let proof = ledger
            .prove_read(named.batches, p(2026, 1), p(2026, 12), cursor, 3)
            .unwrap();
        let served = serve(&proof, &everything);
        let read = verify_read(
            &named.digest(),
            &proof,
            &served,
            &batches,
            w.device_key(),
            cursor,
        )
        .unwrap();
        got += read.records.len();
        pages += 1;
        match read.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(got, 11);
    assert_eq!(pages, 4);
}

#[test]
fn ledger_refuses_bad_batches() {
    let w = world();
    let mut ledger = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
    let recs = w.seal(p(2026, 1), 2);
    let b = w.batch(&ledger, &recs);
    // Records that do not match the batch.
    let other = w.seal(p(2026, 1), 2);
    assert!(matches!(
        ledger.apply(b.batch(), &other).unwrap_err(),
        BatchError::RecordMismatch(_)
    ));
    ledger.apply(b.batch(), &recs).unwrap();
    // The same ids again.
    let again = Batch {
        prev_head: ledger.head().digest(),
        ..b.batch().clone()
    };
    assert!(matches!(
        ledger.apply(&again, &recs).unwrap_err(),
        BatchError::DuplicateRecord(_)
    ));
    // A profile family holds only the origin period.
    let profile = FamilyName::profile(Scope::ProfileContact)
        .unwrap()
        .id(&w.customer);
    let mut pl = FamilyLedger::new(w.customer, profile, Scope::ProfileContact);
    let key = w.secret.read_key(Period::ORIGIN);
    let rec = RecordSealer::new(w.customer, profile, 1, w.customer, &key, p(2026, 1))
        .unwrap()
        .seal(&mut rand::rng(), RecordId([1; 16]), b"x")
        .unwrap();
    let pb = Batch::for_records(
        w.customer_device.id(),
        pl.head().digest(),
        std::slice::from_ref(&rec),
    )
    .unwrap();
    assert_eq!(
        pl.apply(&pb, &[rec]).unwrap_err(),
        BatchError::BadPeriod(p(2026, 1))
    );
    // Another family's batch.
    assert_eq!(
        pl.apply(b.batch(), &recs).unwrap_err(),
        BatchError::WrongFamily
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn seal_open_round_trip(content in proptest::collection::vec(any::<u8>(), 0..3000), month in 1u32..=12) {
        let w = world();
        let mut r = rand::rng();
        let id = RecordId::generate(&mut r);
        let rec = w.customer_sealer(p(2025, month)).seal(&mut r, id, &content).unwrap();
        let mut keys = w.reader_keys(Period::ORIGIN);
        prop_assert_eq!(&**keys.open(&rec).unwrap(), &content[..]);
    }

    #[test]
    fn completeness_verifies_exactly_when_nothing_changed(
        sizes in proptest::collection::vec((1u32..=6, 1usize..4), 1..5),
        from in 1u32..=6, span in 0u32..6,
        edit in 0usize..4, at in any::<prop::sample::Index>(),
    ) {
        let w = world();
        let mut ledger = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
        let mut all = Vec::new();
        let mut batches = Vec::new();
        for (month, n) in sizes {
            let recs = w.seal(p(2026, month), n);
            let b = w.batch(&ledger, &recs);
            ledger.apply(b.batch(), &recs).unwrap();
            all.extend(recs);
            batches.push(b);
        }
        let (a, z) = (p(2026, from), p(2026, (from + span).min(12)));
        let proof = ledger.prove_read(ledger.head().batches, a, z, None, 1000).unwrap();
        let served = serve(&proof, &all);
        let head = ledger.head().digest();
        prop_assert!(verify_read(&head, &proof, &served, &batches, w.device_key(), None).is_ok());
        let expected = all.iter().filter(|r| a <= r.header().period && r.header().period <= z).count();
        prop_assert_eq!(served.len(), expected);
        if served.is_empty() { return Ok(()); }
        let i = at.index(served.len());
        let mut changed = served.clone();
        match edit {
            0 => { changed.remove(i); }
            1 => { changed.insert(i, w.seal(served[i].header().period, 1).remove(0)); }
            2 => { if changed.len() > 1 { changed.swap(i, (i + 1) % served.len()); } else { changed.clear(); } }
            _ => { changed[i] = w.seal(served[i].header().period, 1).remove(0); }
        }
        prop_assert!(verify_read(&head, &proof, &changed, &batches, w.device_key(), None).is_err());
    }
}

#[test]
fn the_current_head_kept_by_apply_matches_the_head_recomputed_from_history() {
    // The ledger keeps the current head's period leaves as it applies batches; every older head is
    // recomputed from the history. The head each apply returned must be the one recomputed later.
    let w = world();
    let mut ledger = FamilyLedger::new(w.customer, w.family, Scope::Transactions);
    let mut heads = vec![ledger.head()];
    for (period, n) in [
        (p(2026, 2), 3),
        (p(2026, 1), 1),
        (p(2026, 2), 2),
        (p(2026, 7), 4),
        (p(2026, 1), 2),
    ] {
        let recs = w.seal(period, n);
        let b = w.batch(&ledger, &recs);
        heads.push(ledger.apply(b.batch(), &recs).unwrap());
    }
    assert_eq!(ledger.head(), *heads.last().unwrap());
    for (k, h) in heads.iter().enumerate() {
        assert_eq!(
            ledger.head_at(k as u64).unwrap(),
            *h,
            "head after {k} batches"
        );
    }
    assert_eq!(
        heads[0].digest(),
        cmr_core::batch::Head::empty(w.customer, w.family).digest()
    );
}
