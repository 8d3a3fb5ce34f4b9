//! Races decided by log order: every state-changing operation goes through the one sequencer.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cmr_core::batch::Head;
use cmr_core::consent::{Body, RotationCompletion};
use cmr_core::decision::DenyReason;
use cmr_core::hash::Digest;
use cmr_store::{Op, StoreError};
use common::{T0, World, open, p};

#[test]
fn a_read_racing_a_revocation_is_served_only_if_it_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), Arc::new(AtomicU64::new(T0))));
    let mut w = World::setup(&store);
    let g = w.grant(&store);
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
    let rc = RotationCompletion {
        family: w.tx,
        epoch: 2,
        directory: Digest([0; 32]),
        keepers: vec![],
    };
    store
        .execute(Op::Statement(
            w.statement(true, Body::RotationCompletion(rc), None)
                .encode(),
        ))
        .unwrap();
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
