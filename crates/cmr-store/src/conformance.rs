//! The backend conformance suite: what every [`Backend`] must do, whatever it stores in.
//!
//! A backend's tests call [`run`] with a [`Harness`] that makes fresh backends and reopens them; each
//! check panics with its name and what it saw. The sled [`crate::Store`] passes it
//! (`tests/conformance.rs`); a PostgreSQL backend must pass the same checks before the server may use
//! it. The contract itself is written down in [`crate::backend`] and docs/durability.md:
//! - one order: every operation is decided against the state its predecessors left, in log order, and
//!   races are decided by log position;
//! - an acknowledgement only once durable, with its index, an inclusion proof and the checkpoint that
//!   covers it; a refusal changes nothing;
//! - reads see only what is durable;
//! - idempotency by the operation's bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::sync::Arc;

use cmr_core::consent::{Body, ErasureTarget};
use cmr_core::decision::DenyReason;
use cmr_core::merkle::leaf_hash;
use cmr_log::entry::{EntryBody, EntryKind, commitment};

use crate::testkit::{T0, World, execute, latest_checkpoint, log_key, p};
use crate::{Ack, Backend, Op, StoreError};

/// Makes the backends under test. The clock of every backend it makes reads [`T0`] until the checks
/// move it with [`Harness::set_time`].
pub trait Harness {
    /// A fresh, empty backend signing with [`log_key`].
    fn fresh(&mut self) -> Arc<dyn Backend>;
    /// The backend made last, closed and opened again (`backend` is its only handle): everything
    /// acknowledged must be there.
    fn reopen(&mut self, backend: Arc<dyn Backend>) -> Arc<dyn Backend>;
    /// Sets the clock of the backends (Unix seconds).
    fn set_time(&mut self, time: u64);
}

/// Runs every check.
pub fn run(h: &mut dyn Harness) {
    acknowledgements_are_durable_ordered_and_proven(h);
    the_same_bytes_are_logged_once_and_another_body_under_their_id_conflicts(h);
    a_refusal_changes_nothing(h);
    everything_acknowledged_is_there_after_a_reopen(h);
    a_race_is_decided_by_log_position(h);
    an_erased_family_is_closed_to_everyone_across_a_reopen(h);
    the_indexes_follow_the_log(h);
    server_time_never_goes_back_even_when_the_clock_does(h);
}

/// Checks an acknowledgement against the backend's own durable view: its checkpoint is the log key's,
/// the entry is there under its commitment, and the inclusion proof leads to the checkpoint's root.
fn check_ack(b: &dyn Backend, ack: &Ack, what: &str) {
    let note = b.checkpoint().unwrap().expect("a checkpoint after a write");
    let served = cmr_log::checkpoint::open(&note, &log_key().verifier(), &[], 0)
        .unwrap()
        .checkpoint;
    assert!(
        served.size >= ack.size,
        "{what}: acknowledged at size {} while the durable view is at {}",
        ack.size,
        served.size
    );
    let Some(index) = ack.index else { return };
    assert!(
        index < ack.size,
        "{what}: index {index} outside its checkpoint"
    );
    let body = b
        .body(index)
        .unwrap()
        .expect("the acknowledged entry is readable");
    let leaf = leaf_hash(&commitment(&body.salt, &body.body).0);
    let root = cmr_log::checkpoint::open(&ack.checkpoint, &log_key().verifier(), &[], 0)
        .unwrap()
        .checkpoint
        .root;
    assert!(
        cmr_log::verify::verify_inclusion(index, ack.size, &leaf, &ack.proof, &root).is_ok(),
        "{what}: the inclusion proof does not lead to the acknowledged checkpoint"
    );
    if let Some(entry) = &ack.entry {
        assert_eq!(
            entry.body, body.body,
            "{what}: the acknowledged body is not the stored one"
        );
    }
}

fn acknowledgements_are_durable_ordered_and_proven(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    let mut last = None;
    for i in 0..5 {
        let ack = execute(&*b, w.read(g, p(2025, 6), T0)).unwrap();
        check_ack(&*b, &ack, "a read");
        let index = ack.index.expect("a company read is logged");
        if let Some(prev) = last {
            assert!(index > prev, "read {i}: index {index} after {prev}");
        }
        last = Some(index);
    }
    // The customer's own read is not logged.
    let own = Op::Read {
        customer: w.customer.id,
        family: w.tx,
        periods: (p(2025, 1), p(2026, 12)),
        cursor: None,
        limit: 10,
        access: None,
    };
    assert_eq!(execute(&*b, own).unwrap().index, None);
    b.close();
}

fn the_same_bytes_are_logged_once_and_another_body_under_their_id_conflicts(h: &mut dyn Harness) {
    let b = h.fresh();
    let w = World::setup(&*b);
    let grant = w.grant_statement(&*b);
    let first = execute(&*b, Op::Statement(grant.clone())).unwrap();
    let again = execute(&*b, Op::Statement(grant.clone())).unwrap();
    assert!(again.repeated, "a repeat is marked as one");
    assert_eq!(again.index, first.index, "a repeat names the first index");
    check_ack(&*b, &again, "a repeat");
    let other = w.reseal(&grant);
    assert_eq!(
        execute(&*b, Op::Statement(other)).unwrap_err(),
        StoreError::Conflict
    );
    assert_eq!(b.checkpoint().unwrap().unwrap(), first.checkpoint);
    b.close();
}

fn a_refusal_changes_nothing(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    // (Building the grant logs the request it answers.)
    let g = w.grant_statement(&*b);
    let before = b.checkpoint().unwrap();
    // Wrongly signed, out of scope, out of order: each refused, none logged. (What does not decode
    // never becomes an operation: the server refuses it at the edge.)
    let mut forged = g.encode();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let forged = cmr_core::consent::SignedStatement::decode(&forged).unwrap();
    let e = execute(&*b, Op::Statement(forged)).unwrap_err();
    assert!(matches!(e, StoreError::BadSignature(_)), "{e}");
    let (_, inception, _) = crate::testkit::party(cmr_core::identity::Role::Customer, 1);
    let again = execute(&*b, Op::Register(inception.clone())).unwrap();
    assert!(
        again.repeated && again.index == Some(0),
        "the same registration again is a repeat of the first"
    );
    assert!(matches!(
        execute(&*b, Op::Rotate(inception)).unwrap_err(),
        StoreError::Malformed(_)
    ));
    let unknown = cmr_core::consent::StatementId([9; 32]);
    let e = execute(&*b, w.read(unknown, p(2025, 6), T0)).unwrap_err();
    assert_eq!(e, StoreError::Denied(DenyReason::NoGrant));
    assert_eq!(
        b.checkpoint().unwrap(),
        before,
        "the refusals logged nothing"
    );
    b.close();
}

fn everything_acknowledged_is_there_after_a_reopen(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    let read = execute(&*b, w.read(g, p(2025, 6), T0)).unwrap();
    let index = read.index.unwrap();
    let note = b.checkpoint().unwrap().unwrap();
    let events = b.key_events(&w.customer.id).unwrap();
    let head = b.customer_head(&w.customer.id).unwrap();
    let b = h.reopen(b);
    assert_eq!(
        b.checkpoint().unwrap().unwrap(),
        note,
        "the checkpoint survives"
    );
    assert_eq!(
        b.body(index).unwrap().unwrap().body,
        read.entry.expect("a fresh read carries its entry").body,
        "the entry survives"
    );
    assert_eq!(b.key_events(&w.customer.id).unwrap(), events);
    assert_eq!(b.customer_head(&w.customer.id).unwrap(), head);
    assert_eq!(b.role(&w.acme.id), Some(cmr_core::identity::Role::Company));
    // The state is rebuilt, not only the log: the grant still works, and a repeat is still a repeat.
    let again = execute(&*b, w.read(g, p(2025, 6), T0)).unwrap();
    assert!(again.index.unwrap() > index);
    check_ack(&*b, &again, "a read after the reopen");
    b.close();
}

fn a_race_is_decided_by_log_position(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    let reads: Vec<Op> = (0..20).map(|_| w.read(g, p(2025, 6), T0)).collect();
    let (before, after) = reads.split_at(10);
    let mut pending: Vec<_> = before.iter().map(|op| b.submit(op.clone())).collect();
    let revocation = b.submit(w.revoke(g));
    pending.extend(after.iter().map(|op| b.submit(op.clone())));
    let at = revocation.blocking_recv().unwrap().unwrap().index.unwrap();
    let mut refused = 0;
    for rx in pending {
        match rx.blocking_recv().unwrap() {
            Ok(ack) => assert!(
                ack.index.unwrap() < at,
                "a read logged at {:?} was served after the revocation at {at}",
                ack.index
            ),
            Err(StoreError::Denied(DenyReason::GrantRevoked(r))) => {
                assert_eq!(r, at);
                refused += 1;
            }
            Err(e) => panic!("a read in the race: {e}"),
        }
    }
    assert!(
        refused >= 10,
        "the reads sent after the revocation are refused"
    );
    b.close();
}

fn an_erased_family_is_closed_to_everyone_across_a_reopen(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    execute(&*b, w.read(g, p(2025, 6), T0)).unwrap();
    let erase = w.statement(true, Body::Erasure(ErasureTarget::Family(w.tx)), None);
    let at = execute(&*b, Op::Statement(erase)).unwrap().index.unwrap();
    let own = |w: &World| Op::Read {
        customer: w.customer.id,
        family: w.tx,
        periods: (p(2025, 1), p(2026, 12)),
        cursor: None,
        limit: 10,
        access: None,
    };
    let mut b = b;
    for reopened in [false, true] {
        if reopened {
            b = h.reopen(b);
        }
        assert_eq!(
            execute(&*b, w.read(g, p(2025, 6), T0)).unwrap_err(),
            StoreError::Denied(DenyReason::FamilyErased(at)),
            "a company read (reopened: {reopened})"
        );
        assert_eq!(
            execute(&*b, own(&w)).unwrap_err(),
            StoreError::Denied(DenyReason::FamilyErased(at)),
            "the customer's own read (reopened: {reopened})"
        );
    }
    b.close();
}

fn the_indexes_follow_the_log(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    let read = execute(&*b, w.read(g, p(2025, 6), T0)).unwrap();
    // The company's read is on its page of the customer's chain, and the customer is among its vaults.
    let (entries, _) = b
        .party_entries(&w.customer.id, &w.acme.id, None, 1000)
        .unwrap();
    assert!(entries.contains(&read.index.unwrap()));
    let (vaults, more) = b.vaults_of(&w.acme.id, None, 10).unwrap();
    assert_eq!((vaults, more), (vec![w.customer.id], false));
    // Each of the customer's key events is indexed, in order, and each is a key event about it.
    let events = b.key_events(&w.customer.id).unwrap();
    assert!(!events.is_empty() && events.windows(2).all(|p| p[0] < p[1]));
    for i in events {
        let body = EntryBody::decode(&b.body(i).unwrap().unwrap().body).unwrap();
        assert_eq!(body.subject, w.customer.id);
        assert!(matches!(
            body.kind,
            EntryKind::KeyEvent | EntryKind::DeviceCertificate | EntryKind::DeviceRevocation
        ));
    }
    // The customer's head is its latest entry.
    assert_eq!(
        b.customer_head(&w.customer.id).unwrap(),
        read.index,
        "the read is the customer's latest entry"
    );
    assert_eq!(latest_checkpoint(&*b).size, read.size);
    b.close();
}

fn server_time_never_goes_back_even_when_the_clock_does(h: &mut dyn Harness) {
    let b = h.fresh();
    let mut w = World::setup(&*b);
    let g = w.grant(&*b);
    h.set_time(T0 + 100);
    let later = execute(&*b, w.read(g, p(2025, 6), T0 + 100)).unwrap();
    let time_of = |b: &dyn Backend, ack: &Ack| {
        EntryBody::decode(&b.body(ack.index.unwrap()).unwrap().unwrap().body)
            .unwrap()
            .time
    };
    let t1 = time_of(&*b, &later);
    // The clock steps back, and the backend restarts.
    h.set_time(T0);
    let b = h.reopen(b);
    assert!(
        b.start_time() >= t1,
        "the start time is after the last logged time"
    );
    let next = execute(&*b, w.read(g, p(2025, 6), t1)).unwrap();
    assert!(time_of(&*b, &next) >= t1, "a logged time went back");
    h.set_time(T0);
    b.close();
}
