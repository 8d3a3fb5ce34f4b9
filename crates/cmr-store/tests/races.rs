//! Races decided by log order: every state-changing operation goes through the one sequencer.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cmr_core::batch::Head;
use cmr_core::consent::{Body, RotationCompletion, StatementId};
use cmr_core::decision::DenyReason;
use cmr_core::hash::Digest;
use cmr_store::{Op, StoreError};
use common::{T0, World, open, p};

#[test]
fn a_read_racing_a_revocation_is_served_only_if_it_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), Arc::new(AtomicU64::new(T0))));
    let mut w = World::setup(&*store);
    let g = w.grant(&*store);
    let reads: Vec<_> = (0..40).map(|_| w.read(g, p(2025, 6), T0)).collect();
    // Submit the reads from two threads while the revocation goes in between.
    let (first, second) = reads.split_at(20);
    let (first, second) = (first.to_vec(), second.to_vec());
    let s1 = store.clone();
    let t1 = std::thread::spawn(move || {
        first
            .into_iter()
            .map(|op| s1.submit(op))
            .collect::<Vec<_>>()
    });
    let revocation = store.submit(w.revoke(g));
    let s2 = store.clone();
    let t2 = std::thread::spawn(move || {
        second
            .into_iter()
            .map(|op| s2.submit(op))
            .collect::<Vec<_>>()
    });
    let rev_index = revocation.blocking_recv().unwrap().unwrap().index.unwrap();
    let mut served = 0;
    let mut refused = 0;
    for rx in t1.join().unwrap().into_iter().chain(t2.join().unwrap()) {
        match rx.blocking_recv().unwrap() {
            Ok(ack) => {
                assert!(
                    ack.index.unwrap() < rev_index,
                    "a read was served after the revocation"
                );
                served += 1;
            }
            Err(StoreError::Denied(DenyReason::GrantRevoked(at))) => {
                assert_eq!(at, rev_index);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(served + refused, 40);
    // The second thread's reads were queued after the revocation: every one of them is refused, so the
    // test always sees the race's refusing side (the first thread's reads fall on either side).
    assert!(refused >= 20, "{refused} refused, {served} served");
}

#[test]
fn an_append_after_a_revocation_waits_for_the_rotation_and_then_must_use_the_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let g = w.grant(&store);
    let head0 = Head::empty(w.customer.id, w.tx).digest();
    // The revocation and an append race: the append comes second.
    let rev = store.submit(w.revoke(g));
    let append = store.submit(w.customer_batch(head0, p(2026, 1), 1, 1));
    rev.blocking_recv().unwrap().unwrap();
    assert_eq!(
        append.blocking_recv().unwrap().unwrap_err(),
        StoreError::Denied(DenyReason::RotationPending(w.tx))
    );
    // The customer's client completes the rotation to epoch 2.
    rotate(&store, &w, 2, None);
    // An append still sealed to epoch 1 is stale.
    assert_eq!(
        store
            .execute(w.customer_batch(head0, p(2026, 1), 1, 2))
            .unwrap_err(),
        StoreError::Denied(DenyReason::StaleEpoch { current: 2 })
    );
}

#[test]
fn two_appenders_racing_on_one_head() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let w = World::setup(&store);
    let head0 = Head::empty(w.customer.id, w.tx).digest();
    let a = store.submit(w.customer_batch(head0, p(2026, 1), 2, 1));
    let b = store.submit(w.customer_batch(head0, p(2026, 1), 2, 2));
    let results = [a.blocking_recv().unwrap(), b.blocking_recv().unwrap()];
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(StoreError::StaleHead)))
    );
}

/// Runs two operations from two threads released together: the sequencer alone decides their order.
fn race(store: &Arc<cmr_store::Store>, a: Op, b: Op) -> [Result<cmr_store::Ack, StoreError>; 2] {
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let run = |op: Op| {
        let (store, barrier) = (store.clone(), barrier.clone());
        std::thread::spawn(move || {
            barrier.wait();
            store.execute(op)
        })
    };
    let (ta, tb) = (run(a), run(b));
    [ta.join().unwrap(), tb.join().unwrap()]
}

/// A company's append racing the revocation of another read grant on the family (which exposes the
/// family's keys): served if it is logged first, `rotation-pending` if it comes after. Ten rounds, each
/// a real race between two threads; whichever way each falls, the log order decides.
#[test]
fn a_company_append_racing_a_revocation_is_decided_by_log_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), Arc::new(AtomicU64::new(T0))));
    let mut w = World::setup(&*store);
    let g = w.grant(&*store);
    let mut head = Head::empty(w.customer.id, w.tx).digest();
    let (mut before, mut after) = (0, 0);
    for round in 0..10u64 {
        let look = w.read_grant(&format!("a look {round}"), 1 + round);
        store.execute(Op::Statement(look.clone())).unwrap();
        let append = w.acme_append(g, head, p(2026, 1), 1 + round, round);
        let [rev, app] = race(&store, w.revoke(look.id()), append);
        let rev = rev.unwrap().index.unwrap();
        match app {
            Ok(ack) => {
                assert!(ack.index.unwrap() < rev, "round {round}: served after");
                before += 1;
            }
            Err(StoreError::Denied(DenyReason::RotationPending(f))) => {
                assert_eq!(f, w.tx);
                after += 1;
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        // The customer completes the rotation, keeping acme's append grant, then reads the new head.
        rotate(&store, &w, 2 + round, Some(g));
        head = w.head_of(&*store, w.tx, (p(2025, 1), p(2026, 12)));
    }
    assert_eq!(before + after, 10);
    println!("appends logged before the revocation: {before}, after it: {after}");
}

/// The customer's client completes the rotation of the transactions family to `epoch`, keeping `kept`
/// (acme's grant) with the new epoch's keys sealed to acme (their content does not matter to the store).
fn rotate(store: &cmr_store::Store, w: &World, epoch: u64, kept: Option<StatementId>) {
    let keepers = kept
        .map(|g| {
            let bundle = cmr_core::epoch::KeyBundle { entries: vec![] }.seal(
                &mut rand::rng(),
                w.customer.id,
                w.acme.id,
                &w.acme.kem.public_key(),
                g.0,
            );
            (g, bundle)
        })
        .into_iter()
        .collect();
    let rc = RotationCompletion {
        family: w.tx,
        epoch,
        directory: Digest([0; 32]),
        keepers,
    };
    store
        .execute(Op::Statement(w.statement(
            true,
            Body::RotationCompletion(rc),
            None,
        )))
        .unwrap();
}

/// After a rotation, a company's append still sealed to the old epoch is `stale-epoch`, and one sealed to
/// the new epoch under a kept grant is served.
#[test]
fn a_company_append_to_the_old_epoch_after_a_rotation_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(AtomicU64::new(T0)));
    let mut w = World::setup(&store);
    let g = w.grant(&store);
    let look = w.read_grant("a look", 1);
    store.execute(Op::Statement(look.clone())).unwrap();
    store.execute(w.revoke(look.id())).unwrap();
    rotate(&store, &w, 2, Some(g));
    let head = Head::empty(w.customer.id, w.tx).digest();
    let old = w.acme_append(g, head, p(2026, 1), 1, 1);
    assert_eq!(
        store.execute(old).unwrap_err(),
        StoreError::Denied(DenyReason::StaleEpoch { current: 2 })
    );
    let new = w.acme_append(g, head, p(2026, 1), 2, 2);
    store.execute(new).unwrap();
}

/// Two writers, the customer and the company, released together on one head: exactly one is logged, the
/// other gets `stale-head`. Ten rounds.
#[test]
fn two_writers_released_together_on_one_head() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), Arc::new(AtomicU64::new(T0))));
    let mut w = World::setup(&*store);
    let g = w.grant(&*store);
    for round in 0..10u64 {
        let head = w.head_of(&*store, w.tx, (p(2025, 1), p(2026, 12)));
        let mine = w.customer_batch(head, p(2026, 2), 1, 100 + round);
        let theirs = w.acme_append(g, head, p(2026, 2), 1, 200 + round);
        let results = race(&store, mine, theirs);
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {results:?}"
        );
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(StoreError::StaleHead))),
            "round {round}: {results:?}"
        );
    }
}
