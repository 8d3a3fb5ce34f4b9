//! Consent: statements, the decision function in log order, receipts and export. Every attack of the
//! consent issue has its own test; property tests check the three invariants.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::consent::{
    Access, AccessRequest, Body, Counterparty, Duration, ErasureTarget, Grant, GrantFamily,
    Initiator, Revocation, RotationCompletion, SignedStatement, Statement, StatementError,
    StatementId,
};
use cmr_core::decision::{
    AccessAttempt, AccessKind, ApplyError, ConsentState, DenyReason, GrantStatus,
};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::{
    DeviceKeys, IdentityId, IdentityState, KeyHistory, Role, create_identity,
};
use cmr_core::keys::KemSecretKey;
use cmr_core::wrap::SealedBytes;
use proptest::prelude::*;

fn p(y: u32, m: u32) -> Period {
    Period::from_year_month(y, m).unwrap()
}

/// 2026-11-15T00:00:00Z
const T0: u64 = 1_794_700_800;
const DAY: u64 = 86_400;

struct Party {
    id: IdentityId,
    device: DeviceKeys,
    state: IdentityState,
    kem: KemSecretKey,
}

fn party(role: Role) -> Party {
    let mut r = rand::rng();
    let new = create_identity(&mut r, role);
    let id = new.inception.identity();
    let mut state = IdentityState::new(KeyHistory::incept(&new.inception, 1).unwrap());
    let device = DeviceKeys::generate(&mut r);
    state
        .certify(&device.certify(id, 0, &new.identity_key, 0), 2)
        .unwrap();
    Party {
        id,
        device,
        state,
        kem: KemSecretKey::generate(&mut r),
    }
}

struct World {
    customer: Party,
    acme: Party,
    other: Party,
    contact: FamilyId,
    acme_tx: FamilyId,
    other_tx: FamilyId,
    secrets: std::collections::HashMap<FamilyId, EpochSecret>,
    state: ConsentState,
    position: u64,
}

impl World {
    fn new() -> Self {
        let customer = party(Role::Customer);
        let acme = party(Role::Company);
        let other = party(Role::Company);
        let pseudonyms = PseudonymKey::generate(&mut rand::rng());
        let contact = FamilyName::profile(Scope::ProfileContact)
            .unwrap()
            .id(&customer.id);
        let acme_tx = FamilyName::Transactions(pseudonyms.counterparty(&acme.id)).id(&customer.id);
        let other_tx =
            FamilyName::Transactions(pseudonyms.counterparty(&other.id)).id(&customer.id);
        let mut state = ConsentState::new(customer.id);
        let mut secrets = std::collections::HashMap::new();
        for (f, s) in [
            (contact, Scope::ProfileContact),
            (acme_tx, Scope::Transactions),
            (other_tx, Scope::Transactions),
        ] {
            state.declare_family(f, s, 1);
            secrets.insert(f, EpochSecret::generate(&mut rand::rng()));
        }
        Self {
            customer,
            acme,
            other,
            contact,
            acme_tx,
            other_tx,
            secrets,
            state,
            position: 10,
        }
    }

    fn next(&mut self) -> u64 {
        self.position += 1;
        self.position
    }

    fn sign(&self, author: &Party, body: Body, bundle: Option<SealedBytes>) -> SignedStatement {
        let st = Statement {
            customer: self.customer.id,
            author: author.id,
            device: author.device.id(),
            issued_at: T0,
            body,
        };
        let signed = SignedStatement::sign(st, bundle, &author.device.signing).unwrap();
        // Everything goes through the wire form and signature check, as the server does.
        let decoded = SignedStatement::decode(&signed.encode()).unwrap();
        decoded.verify(&author.state, 100).unwrap();
        decoded
    }

    fn apply(&mut self, s: &SignedStatement, time: u64) -> Result<u64, ApplyError> {
        let pos = self.next();
        self.state.apply(s, pos, time).map(|()| pos)
    }

    fn request(
        &mut self,
        company_is_acme: bool,
        scopes: Vec<(Scope, Access)>,
        duration: Duration,
        lookback_months: u32,
    ) -> (StatementId, AccessRequest) {
        let req = AccessRequest {
            scopes,
            purpose: "loyalty programme".into(),
            duration,
            lookback_months,
            counterparty: Counterparty::OnlyRequester,
        };
        let company = if company_is_acme {
            &self.acme
        } else {
            &self.other
        };
        let s = self.sign(company, Body::Request(req.clone()), None);
        self.apply(&s, T0).unwrap();
        (s.id(), req)
    }

    /// A grant to acme: its own transactions (read + append) and contact (read).
    fn grant(
        &mut self,
        request: Option<StatementId>,
        duration: Duration,
        lookback: Period,
        window: Option<u32>,
    ) -> SignedStatement {
        let expires = match duration {
            Duration::TimeBound { seconds } => Some(T0 + seconds),
            _ => None,
        };
        let g = Grant {
            grantee: self.acme.id,
            request,
            purpose: "loyalty programme".into(),
            duration,
            not_before: T0,
            expires,
            lookback_start: lookback,
            window_months: window,
            scopes: vec![
                (Scope::ProfileContact, Access::Read),
                (Scope::Transactions, Access::ReadAppend),
            ],
            families: sorted(vec![
                GrantFamily {
                    family: self.contact,
                    scope: Scope::ProfileContact,
                    epoch: 1,
                    access: Access::Read,
                },
                GrantFamily {
                    family: self.acme_tx,
                    scope: Scope::Transactions,
                    epoch: 1,
                    access: Access::ReadAppend,
                },
            ]),
            append_family: Some(self.acme_tx),
            grantee_kem: self.acme.kem.public_key(),
        };
        self.make_grant(g)
    }

    fn make_grant(&self, g: Grant) -> SignedStatement {
        let st = Statement {
            customer: self.customer.id,
            author: self.customer.id,
            device: self.customer.device.id(),
            issued_at: T0,
            body: Body::Grant(g.clone()),
        };
        let id = SignedStatement::grant_id(&st);
        let entries = g
            .families
            .iter()
            .map(|f| BundleEntry {
                family: f.family,
                epoch: f.epoch,
                key: self.secrets[&f.family].read_key(g.lookback_start),
            })
            .collect();
        let bundle = KeyBundle { entries }.seal(
            &mut rand::rng(),
            self.customer.id,
            g.grantee,
            &g.grantee_kem,
            id.0,
        );
        let signed = self.sign(&self.customer, Body::Grant(g), Some(bundle));
        assert_eq!(signed.id(), id);
        signed
    }

    fn read(
        &self,
        grant: StatementId,
        families: Vec<FamilyId>,
        from: Period,
        to: Period,
    ) -> AccessAttempt {
        AccessAttempt {
            company: self.acme.id,
            grant,
            kind: AccessKind::Read,
            families,
            periods: (from, to),
            epoch: None,
        }
    }

    fn append(
        &self,
        grant: StatementId,
        family: FamilyId,
        epoch: u64,
        period: Period,
    ) -> AccessAttempt {
        AccessAttempt {
            company: self.acme.id,
            grant,
            kind: AccessKind::Append,
            families: vec![family],
            periods: (period, period),
            epoch: Some(epoch),
        }
    }

    fn revoke(
        &mut self,
        grant: StatementId,
        by_customer: bool,
        time: u64,
    ) -> Result<u64, ApplyError> {
        let (author_is_customer, initiator) = if by_customer {
            (true, Initiator::Customer)
        } else {
            (false, Initiator::Grantee)
        };
        let body = Body::Revocation(Revocation {
            grant,
            initiator,
            reason: "no longer a customer".into(),
        });
        let s = if author_is_customer {
            self.sign(&self.customer, body, None)
        } else {
            self.sign(&self.acme, body, None)
        };
        self.apply(&s, time)
    }
}

fn sorted(mut v: Vec<GrantFamily>) -> Vec<GrantFamily> {
    v.sort_by_key(|f| f.family);
    v
}

fn persistent_grant(w: &mut World) -> StatementId {
    let g = w.grant(None, Duration::Persistent, p(2025, 1), None);
    w.apply(&g, T0).unwrap();
    g.id()
}

#[test]
fn a_valid_grant_allows_exactly_what_it_says() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    let ok = w
        .state
        .evaluate(
            &w.read(g, vec![w.acme_tx, w.contact], p(2025, 6), p(2026, 11)),
            pos,
            T0,
        )
        .unwrap();
    assert_eq!(ok.families.len(), 2);
    assert_eq!(ok.families[0].epochs, (1, 1));
    assert!(!ok.consumes);
    w.state
        .evaluate(&w.append(g, w.acme_tx, 1, p(2026, 11)), pos, T0)
        .unwrap();
}

#[test]
fn wrong_family() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    let address = FamilyName::profile(Scope::ProfileAddress)
        .unwrap()
        .id(&w.customer.id);
    assert_eq!(
        w.state
            .evaluate(&w.read(g, vec![address], p(2026, 1), p(2026, 1)), pos, T0),
        Err(DenyReason::FamilyNotGranted(address))
    );
}

#[test]
fn outside_the_look_back_window() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    assert_eq!(
        w.state.evaluate(
            &w.read(g, vec![w.acme_tx], p(2024, 12), p(2026, 1)),
            pos,
            T0
        ),
        Err(DenyReason::OutsideLookback {
            requested: p(2024, 12),
            start: p(2025, 1)
        })
    );
    // A sliding window of 6 months, enforced by the server against its own clock.
    let mut w = World::new();
    let s = w.grant(None, Duration::Persistent, p(2020, 1), Some(6));
    w.apply(&s, T0).unwrap();
    let pos = w.next();
    let now = Period::from_unix(T0 as i64).unwrap();
    let start = Period(now.0 - 6);
    w.state
        .evaluate(&w.read(s.id(), vec![w.acme_tx], start, now), pos, T0)
        .unwrap();
    assert_eq!(
        w.state.evaluate(
            &w.read(s.id(), vec![w.acme_tx], Period(start.0 - 1), now),
            pos,
            T0
        ),
        Err(DenyReason::OutsideLookback {
            requested: Period(start.0 - 1),
            start
        })
    );
    // A year later the window has slid.
    let later = T0 + 365 * DAY;
    assert!(
        w.state
            .evaluate(&w.read(s.id(), vec![w.acme_tx], start, now), pos, later)
            .is_err()
    );
}

#[test]
fn another_counterpartys_transactions() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    assert_eq!(
        w.state.evaluate(
            &w.read(g, vec![w.other_tx], p(2026, 1), p(2026, 1)),
            pos,
            T0
        ),
        Err(DenyReason::FamilyNotGranted(w.other_tx))
    );
    assert!(
        w.state
            .evaluate(&w.append(g, w.other_tx, 1, p(2026, 1)), pos, T0)
            .is_err()
    );
    // Appending to the contact family (granted for reading) is not its own family either.
    assert_eq!(
        w.state
            .evaluate(&w.append(g, w.contact, 1, p(2026, 1)), pos, T0),
        Err(DenyReason::AccessNotGranted(w.contact))
    );
}

#[test]
fn an_expired_grant_at_the_exact_boundary() {
    let mut w = World::new();
    let s = w.grant(
        None,
        Duration::TimeBound { seconds: 30 * DAY },
        p(2025, 1),
        None,
    );
    w.apply(&s, T0).unwrap();
    let pos = w.next();
    let expires = T0 + 30 * DAY;
    let a = w.read(s.id(), vec![w.acme_tx], p(2026, 1), p(2026, 1));
    w.state.evaluate(&a, pos, expires - 1).unwrap();
    assert_eq!(
        w.state.evaluate(&a, pos, expires),
        Err(DenyReason::GrantExpired(expires))
    );
    assert_eq!(
        w.state.evaluate(&a, pos, T0 - 1),
        Err(DenyReason::NotYetValid)
    );
    // Expiry ends a read grant: a rotation is pending, so appends wait.
    assert!(!w.state.rotation_pending(&w.acme_tx, expires - 1));
    assert!(w.state.rotation_pending(&w.acme_tx, expires));
}

#[test]
fn a_revoked_grant() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let a = w.read(g, vec![w.acme_tx], p(2026, 1), p(2026, 1));
    // Validity follows log order: before the revocation is logged, allowed; after, never.
    let before = w.next();
    w.state.evaluate(&a, before, T0 + 10).unwrap();
    let rev = w.revoke(g, true, T0 + 10).unwrap();
    assert_eq!(
        w.state.evaluate(&a, rev + 1, T0 + 10),
        Err(DenyReason::GrantRevoked(rev))
    );
    assert_eq!(
        w.revoke(g, true, T0 + 11).unwrap_err(),
        ApplyError::GrantEnded
    );
}

#[test]
fn an_ended_grant_keeps_its_standing_and_nothing_else() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    assert!(w.state.grant(&g).is_some());
    assert!(w.state.holds(&g, &w.acme_tx));
    let rev = w.revoke(g, true, T0 + 10).unwrap();
    // The grant itself and its keys are gone from the state; its standing, company and end are not.
    assert_eq!(w.state.grant(&g), None);
    assert!(!w.state.holds(&g, &w.acme_tx));
    assert!(!w.state.has_active_grant(&w.acme.id, T0 + 10));
    assert_eq!(
        w.state.grant_status(&g, T0 + 10),
        Some(GrantStatus::Revoked(rev))
    );
    // What it read is exposed: the families it read wait for a rotation.
    assert!(w.state.rotation_pending(&w.acme_tx, T0 + 10));
    assert!(w.state.rotation_pending(&w.contact, T0 + 10));
    // Another company using it is refused as another company; its own company as revoked.
    let mut a = w.read(g, vec![w.acme_tx], p(2026, 1), p(2026, 1));
    let pos = w.next();
    assert_eq!(
        w.state.evaluate(&a, pos, T0 + 10),
        Err(DenyReason::GrantRevoked(rev))
    );
    a.company = w.other.id;
    assert_eq!(
        w.state.evaluate(&a, pos, T0 + 10),
        Err(DenyReason::WrongCompany)
    );
    // A company cannot give up a grant that was another's, ended or not.
    let body = Body::Revocation(Revocation {
        grant: g,
        initiator: Initiator::Grantee,
        reason: "x".into(),
    });
    let forged = w.sign(&w.other, body, None);
    assert_eq!(
        w.apply(&forged, T0 + 11).unwrap_err(),
        ApplyError::NotGrantee
    );
    assert_eq!(
        w.revoke(g, false, T0 + 11).unwrap_err(),
        ApplyError::GrantEnded
    );
}

#[test]
fn the_grantee_may_give_up_its_own_grant() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let rev = w.revoke(g, false, T0).unwrap();
    let a = w.read(g, vec![w.acme_tx], p(2026, 1), p(2026, 1));
    assert_eq!(
        w.state.evaluate(&a, rev + 1, T0),
        Err(DenyReason::GrantRevoked(rev))
    );
}

#[test]
fn a_grant_used_by_another_company() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    let mut a = w.read(g, vec![w.acme_tx], p(2026, 1), p(2026, 1));
    a.company = w.other.id;
    assert_eq!(w.state.evaluate(&a, pos, T0), Err(DenyReason::WrongCompany));
}

#[test]
fn a_one_time_grant_used_twice() {
    let mut w = World::new();
    let s = w.grant(None, Duration::OneTime, p(2025, 1), None);
    w.apply(&s, T0).unwrap();
    let a = w.read(s.id(), vec![w.acme_tx], p(2026, 1), p(2026, 1));
    let first = w.next();
    let d = w.state.record_access(&a, first, T0).unwrap().unwrap();
    assert!(d.consumes);
    let second = w.next();
    assert_eq!(
        w.state.record_access(&a, second, T0).unwrap(),
        Err(DenyReason::GrantConsumed(first))
    );
    // Consumption ends the grant's read: a rotation is pending.
    assert!(w.state.rotation_pending(&w.acme_tx, T0));
}

#[test]
fn a_revocation_forged_or_backdated() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    // Another company tries to revoke acme's grant as "grantee".
    let body = Body::Revocation(Revocation {
        grant: g,
        initiator: Initiator::Grantee,
        reason: "x".into(),
    });
    let forged = w.sign(&w.other, body, None);
    assert_eq!(w.apply(&forged, T0).unwrap_err(), ApplyError::NotGrantee);
    // A revocation claiming to be the customer's but signed by a company device does not verify.
    let st = Statement {
        customer: w.customer.id,
        author: w.customer.id,
        device: w.other.device.id(),
        issued_at: T0,
        body: Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "x".into(),
        }),
    };
    let s = SignedStatement::sign(st, None, &w.other.device.signing).unwrap();
    assert!(matches!(
        s.verify(&w.customer.state, 100),
        Err(StatementError::Signature(_))
    ));
    assert_eq!(
        s.verify(&w.other.state, 100),
        Err(StatementError::WrongAuthor)
    );
    // Backdated: it claims an issue time before an access, but takes effect at its log position only.
    let a = w.read(g, vec![w.acme_tx], p(2026, 1), p(2026, 1));
    let access_pos = w.next();
    w.state.record_access(&a, access_pos, T0).unwrap().unwrap();
    let st = Statement {
        customer: w.customer.id,
        author: w.customer.id,
        device: w.customer.device.id(),
        issued_at: T0 - 30 * DAY,
        body: Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "backdated".into(),
        }),
    };
    let backdated = SignedStatement::sign(st, None, &w.customer.device.signing).unwrap();
    let rev = w.apply(&backdated, T0 + 5).unwrap();
    assert_eq!(
        w.state.evaluate(&a, rev + 1, T0 + 5),
        Err(DenyReason::GrantRevoked(rev))
    );
    // And a statement with a server time before the last one is refused.
    let body = Body::Block {
        company: w.other.id,
        blocked: true,
    };
    let s = w.sign(&w.customer, body, None);
    assert!(matches!(
        w.apply(&s, T0).unwrap_err(),
        ApplyError::TimeWentBackwards { .. }
    ));
}

#[test]
fn a_grant_issued_after_a_block() {
    let mut w = World::new();
    let block = w.sign(
        &w.customer,
        Body::Block {
            company: w.acme.id,
            blocked: true,
        },
        None,
    );
    w.apply(&block, T0).unwrap();
    let g = w.grant(None, Duration::Persistent, p(2025, 1), None);
    assert_eq!(w.apply(&g, T0).unwrap_err(), ApplyError::Blocked);
    // And its requests are refused.
    let req = AccessRequest {
        scopes: vec![(Scope::ProfileContact, Access::Read)],
        purpose: "x".into(),
        duration: Duration::OneTime,
        lookback_months: 0,
        counterparty: Counterparty::Any,
    };
    let r = w.sign(&w.acme, Body::Request(req), None);
    assert_eq!(w.apply(&r, T0).unwrap_err(), ApplyError::Blocked);
    // Unblocked, it may ask again.
    let unblock = w.sign(
        &w.customer,
        Body::Block {
            company: w.acme.id,
            blocked: false,
        },
        None,
    );
    w.apply(&unblock, T0).unwrap();
    w.apply(&r, T0).unwrap();
}

#[test]
fn appends_wait_while_a_rotation_is_pending() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    // Revoking acme's grant, which reads its transactions family, exposes the family's current epoch.
    let rev = w.revoke(g, true, T0).unwrap();
    assert!(w.state.rotation_pending(&w.acme_tx, T0));
    // The ended grantee gets grant-revoked.
    let a = w.append(g, w.acme_tx, 1, p(2026, 11));
    assert_eq!(
        w.state.evaluate(&a, rev + 1, T0),
        Err(DenyReason::GrantRevoked(rev))
    );
    // A new grant to acme (answering nothing) cannot append until the rotation completes.
    let g2 = w.grant(None, Duration::Persistent, p(2025, 1), None);
    w.apply(&g2, T0).unwrap();
    let pos = w.next();
    assert_eq!(
        w.state
            .evaluate(&w.append(g2.id(), w.acme_tx, 1, p(2026, 11)), pos, T0),
        Err(DenyReason::RotationPending(w.acme_tx))
    );
    // Reads by the new grant are not blocked by the pending rotation.
    w.state
        .evaluate(
            &w.read(g2.id(), vec![w.acme_tx], p(2026, 1), p(2026, 1)),
            pos,
            T0,
        )
        .unwrap();
    // The customer's client completes the rotation, keeping the new grant.
    let rc = RotationCompletion {
        family: w.acme_tx,
        epoch: 2,
        directory: Digest([1; 32]),
        keepers: vec![(
            g2.id(),
            SealedBytes {
                enc: [9; 32],
                ciphertext: vec![0; 48],
            },
        )],
    };
    let s = w.sign(&w.customer, Body::RotationCompletion(rc), None);
    w.apply(&s, T0 + 60).unwrap();
    assert!(!w.state.rotation_pending(&w.acme_tx, T0 + 60));
    let pos = w.next();
    w.state
        .evaluate(&w.append(g2.id(), w.acme_tx, 2, p(2026, 11)), pos, T0 + 60)
        .unwrap();
}

#[test]
fn an_append_to_a_stale_epoch() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    assert_eq!(
        w.state
            .evaluate(&w.append(g, w.acme_tx, 0, p(2026, 11)), pos, T0),
        Err(DenyReason::StaleEpoch { current: 1 })
    );
    // After a rotation that keeps acme, epoch 1 is stale.
    let rc = RotationCompletion {
        family: w.acme_tx,
        epoch: 2,
        directory: Digest([1; 32]),
        keepers: vec![(
            g,
            SealedBytes {
                enc: [9; 32],
                ciphertext: vec![0; 48],
            },
        )],
    };
    let s = w.sign(&w.customer, Body::RotationCompletion(rc.clone()), None);
    w.apply(&s, T0).unwrap();
    let pos = w.next();
    assert_eq!(
        w.state
            .evaluate(&w.append(g, w.acme_tx, 1, p(2026, 11)), pos, T0),
        Err(DenyReason::StaleEpoch { current: 2 })
    );
    w.state
        .evaluate(&w.append(g, w.acme_tx, 2, p(2026, 11)), pos, T0)
        .unwrap();
    // The same rotation again names a stale epoch.
    let again = w.sign(&w.customer, Body::RotationCompletion(rc), None);
    assert_eq!(
        w.apply(&again, T0).unwrap_err(),
        ApplyError::StaleEpoch { current: 2 }
    );
}

#[test]
fn access_to_an_erased_family() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let s = w.sign(
        &w.customer,
        Body::Erasure(ErasureTarget::Family(w.acme_tx)),
        None,
    );
    let at = w.apply(&s, T0).unwrap();
    let pos = w.next();
    // Every grant on it ended at the erasure.
    assert_eq!(
        w.state
            .evaluate(&w.read(g, vec![w.contact], p(2026, 1), p(2026, 1)), pos, T0),
        Err(DenyReason::FamilyErased(at))
    );
    // A fresh grant cannot name it.
    let g2 = w.grant(None, Duration::Persistent, p(2025, 1), None);
    assert_eq!(w.apply(&g2, T0).unwrap_err(), ApplyError::FamilyErased);
    // Erasing the vault ends everything and refuses every later statement.
    let s = w.sign(&w.customer, Body::Erasure(ErasureTarget::Vault), None);
    w.apply(&s, T0).unwrap();
    let b = w.sign(
        &w.customer,
        Body::Block {
            company: w.other.id,
            blocked: true,
        },
        None,
    );
    assert_eq!(w.apply(&b, T0).unwrap_err(), ApplyError::VaultErased);
}

#[test]
fn a_narrowed_grant_used_for_what_was_only_requested() {
    let mut w = World::new();
    let (req, _) = w.request(
        true,
        vec![
            (Scope::ProfileContact, Access::Read),
            (Scope::Transactions, Access::ReadAppend),
        ],
        Duration::TimeBound { seconds: 90 * DAY },
        24,
    );
    // The customer narrows: contact only, read, 30 days.
    let g = Grant {
        grantee: w.acme.id,
        request: Some(req),
        purpose: "loyalty programme".into(),
        duration: Duration::TimeBound { seconds: 30 * DAY },
        not_before: T0,
        expires: Some(T0 + 30 * DAY),
        lookback_start: p(2026, 1),
        window_months: None,
        scopes: vec![(Scope::ProfileContact, Access::Read)],
        families: vec![GrantFamily {
            family: w.contact,
            scope: Scope::ProfileContact,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: w.acme.kem.public_key(),
    };
    let s = w.make_grant(g.clone());
    w.apply(&s, T0).unwrap();
    let pos = w.next();
    // What was requested but not granted is denied.
    assert_eq!(
        w.state.evaluate(
            &w.read(s.id(), vec![w.acme_tx], p(2026, 1), p(2026, 1)),
            pos,
            T0
        ),
        Err(DenyReason::FamilyNotGranted(w.acme_tx))
    );
    assert!(
        w.state
            .evaluate(&w.append(s.id(), w.acme_tx, 1, p(2026, 11)), pos, T0)
            .is_err()
    );
    assert_eq!(
        w.state.evaluate(
            &w.read(s.id(), vec![w.contact], p(2026, 1), p(2026, 1)),
            pos,
            T0 + 31 * DAY
        ),
        Err(DenyReason::GrantExpired(T0 + 30 * DAY))
    );
    // A wider grant than the request is refused.
    let (req2, _) = w.request(
        true,
        vec![(Scope::ProfileContact, Access::Read)],
        Duration::OneTime,
        0,
    );
    let wide = Grant {
        request: Some(req2),
        duration: Duration::Persistent,
        expires: None,
        ..g.clone()
    };
    let s = w.make_grant(wide);
    assert!(matches!(
        w.apply(&s, T0).unwrap_err(),
        ApplyError::Widened(_)
    ));
    // Answering the other company's request is refused too.
    let (req3, _) = w.request(
        false,
        vec![(Scope::ProfileContact, Access::Read)],
        Duration::Persistent,
        0,
    );
    let s = w.make_grant(Grant {
        request: Some(req3),
        duration: Duration::Persistent,
        expires: None,
        lookback_start: p(2026, 11),
        ..g
    });
    assert_eq!(w.apply(&s, T0).unwrap_err(), ApplyError::WrongGrantee);
}

#[test]
fn a_device_revocation_makes_every_family_rotation_pending() {
    let mut w = World::new();
    let g = persistent_grant(&mut w);
    let pos = w.next();
    w.state.device_revoked(pos, T0).unwrap();
    let pos = w.next();
    assert_eq!(
        w.state
            .evaluate(&w.append(g, w.acme_tx, 1, p(2026, 11)), pos, T0),
        Err(DenyReason::RotationPending(w.acme_tx))
    );
    assert!(w.state.rotation_pending(&w.contact, T0));
}

#[test]
fn statements_round_trip_and_bind_the_bundle() {
    let mut w = World::new();
    let g = w.grant(None, Duration::Persistent, p(2025, 1), None);
    let bytes = g.encode();
    assert_eq!(SignedStatement::decode(&bytes).unwrap(), g);
    // The signature covers the bundle: swapping a bundle byte breaks it.
    let mut edited = bytes.clone();
    let n = edited.len();
    edited[n - 64 - 3] ^= 1;
    let e = SignedStatement::decode(&edited).unwrap();
    assert_eq!(e.id(), g.id(), "the id does not cover the bundle");
    assert!(e.verify(&w.customer.state, 100).is_err());
    // The grantee opens its keys; they are bound to this grant.
    let bundle = KeyBundle::open(
        g.bundle().unwrap(),
        w.customer.id,
        w.acme.id,
        &w.acme.kem,
        g.id().0,
    )
    .unwrap();
    assert_eq!(bundle.entries.len(), 2);
    assert!(
        KeyBundle::open(
            g.bundle().unwrap(),
            w.customer.id,
            w.acme.id,
            &w.acme.kem,
            [0; 32]
        )
        .is_err()
    );
    // A company cannot author a grant; the customer cannot author a request.
    let st = Statement {
        customer: w.customer.id,
        author: w.acme.id,
        device: w.acme.device.id(),
        issued_at: 0,
        body: Body::Denial {
            request: StatementId([0; 32]),
            reason: String::new(),
        },
    };
    assert!(SignedStatement::sign(st, None, &w.acme.device.signing).is_err());
    let _ = w.apply(&g, T0).unwrap();
}

#[test]
fn receipt_names_who_what_why_and_where() {
    use cmr_core::receipt::{CompanyInfo, ConsentReceipt};
    let mut w = World::new();
    let g = w.grant(
        None,
        Duration::TimeBound { seconds: 30 * DAY },
        p(2025, 1),
        Some(12),
    );
    let pos = w.apply(&g, T0).unwrap();
    let info = CompanyInfo {
        name: "Acme Stores".into(),
        domain: "acme.example".into(),
    };
    let r = ConsentReceipt::for_grant(&g, pos, T0, &info, w.acme.id).unwrap();
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["version"], "KI-CR-v1.1.0");
    assert_eq!(json["consentReceiptId"], g.id().to_hex());
    assert_eq!(json["log"]["logIndex"], pos);
    assert_eq!(
        json["services"][0]["purposes"][0]["purpose"],
        "loyalty programme"
    );
    let text = r.to_text();
    assert!(text.contains("Acme Stores (acme.example)"));
    assert!(text.contains("profile.contact (read)"));
    assert!(text.contains("from 2025-01 (and at most the last 12 months)"));
    assert!(text.contains("30 days"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For any sequence of revocations, times and accesses: nothing is allowed after a revocation's log
    /// position, nothing at or after expiry, and nothing outside the granted families and periods.
    #[test]
    fn invariants_hold_for_any_sequence(
        ops in proptest::collection::vec((0u8..4, 0u64..(40 * DAY), 0usize..3, 0u32..30), 1..40),
        seconds in (1u64..(60 * DAY)),
    ) {
        let mut w = World::new();
        let s = w.grant(None, Duration::TimeBound { seconds }, p(2025, 1), None);
        w.apply(&s, T0).unwrap();
        let g = s.id();
        let expires = T0 + seconds;
        let families = [w.acme_tx, w.contact, w.other_tx];
        let mut revoked_at = None;
        let mut time = T0;
        for (op, dt, fam, months_back) in ops {
            time = time.max(T0 + dt);
            match op {
                0 if revoked_at.is_none() => { revoked_at = w.revoke(g, true, time).ok(); }
                _ => {
                    let f = families[fam];
                    let from = Period(p(2026, 11).0 - months_back);
                    let pos = w.next();
                    let a = w.read(g, vec![f], from, p(2026, 11));
                    let d = w.state.record_access(&a, pos, time).unwrap();
                    if d.is_ok() {
                        prop_assert!(revoked_at.is_none_or(|r| pos < r), "allowed after revocation");
                        prop_assert!(time < expires, "allowed at or after expiry");
                        prop_assert!(f != w.other_tx, "allowed outside the granted families");
                        prop_assert!(from >= p(2025, 1) || f == w.contact, "allowed before the look-back");
                    }
                    if revoked_at.is_some_and(|r| pos > r) { prop_assert!(d.is_err()); }
                }
            }
        }
    }

    #[test]
    fn statement_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = SignedStatement::decode(&bytes);
    }
}

#[test]
fn export_restore_export_is_identical() {
    use cmr_core::export::{Export, FamilySource, restore};
    use cmr_core::record::{FamilyKeys, RecordId, RecordSealer};
    let w = World::new();
    let mut r = rand::rng();
    let c = w.customer.id;
    // The original vault: contact written by the customer, transactions by both the customer and acme.
    let contact_secret = &w.secrets[&w.contact];
    let tx_secret = &w.secrets[&w.acme_tx];
    let seal = |fam,
                secret: &EpochSecret,
                author,
                period,
                id: u8,
                text: &str,
                r: &mut rand::rngs::ThreadRng| {
        let key = if author == c {
            secret.read_key(Period::ORIGIN)
        } else {
            secret.append_key(&author, Period::ORIGIN)
        };
        RecordSealer::new(c, fam, 1, author, &key, period)
            .unwrap()
            .seal(r, RecordId([id; 16]), text.as_bytes())
            .unwrap()
    };
    let contact_records = vec![seal(
        w.contact,
        contact_secret,
        c,
        Period::ORIGIN,
        1,
        "email: a@b.example",
        &mut r,
    )];
    let tx_records = vec![
        seal(
            w.acme_tx,
            tx_secret,
            c,
            p(2026, 1),
            2,
            "coffee 3.20",
            &mut r,
        ),
        seal(
            w.acme_tx,
            tx_secret,
            w.acme.id,
            p(2026, 1),
            3,
            "invoice 42",
            &mut r,
        ),
        seal(
            w.acme_tx,
            tx_secret,
            c,
            p(2026, 2),
            4,
            "refund 1.00",
            &mut r,
        ),
    ];
    let mut contact_keys = FamilyKeys::new(c, w.contact);
    contact_keys.insert(1, contact_secret.read_key(Period::ORIGIN));
    let mut tx_keys = FamilyKeys::new(c, w.acme_tx);
    tx_keys.insert(1, tx_secret.read_key(Period::ORIGIN));
    tx_keys.insert(1, tx_secret.append_key(&w.acme.id, Period::ORIGIN));
    let first = Export::build(
        c,
        vec![
            FamilySource {
                scope: Scope::Transactions,
                company: Some(w.acme.id),
                records: &tx_records,
                keys: &mut tx_keys,
            },
            FamilySource {
                scope: Scope::ProfileContact,
                company: None,
                records: &contact_records,
                keys: &mut contact_keys,
            },
        ],
        &[w.other.id],
    )
    .unwrap();
    let json = first.to_json();
    assert!(json.contains("\"format\": \"cmr-vault-export\""));

    // A fresh vault: new customer, device, pseudonym key.
    let fresh = party(Role::Customer);
    let fresh_pseudonyms = PseudonymKey::generate(&mut r);
    let restored = restore(
        &mut r,
        &Export::from_json(&json).unwrap(),
        fresh.id,
        &fresh.device,
        &fresh_pseudonyms,
    )
    .unwrap();
    assert_eq!(restored.len(), 2);
    let mut keys: Vec<FamilyKeys> = restored
        .iter()
        .map(|f| {
            let mut k = FamilyKeys::new(fresh.id, f.name.id(&fresh.id));
            k.insert(1, f.secret.read_key(Period::ORIGIN));
            k
        })
        .collect();
    let mut sources = Vec::new();
    for (f, k) in restored.iter().zip(keys.iter_mut()) {
        assert_eq!(f.ledger.head().records as usize, f.records.len());
        sources.push(FamilySource {
            scope: f.name.scope(),
            company: f.company,
            records: &f.records,
            keys: k,
        });
    }
    let second = Export::build(fresh.id, sources, &[w.other.id]).unwrap();
    assert_eq!(second.to_json(), json);
    assert!(
        Export::from_json("{\"format\":\"other\",\"version\":1,\"families\":[],\"blocked\":[]}")
            .is_err()
    );
}

/// The customer's own request policy: only companies holding an active grant, and a cap per 24 hours of
/// log time; set and changed by the customer alone, applied from its position on.
#[test]
fn a_customers_request_policy_refuses_strangers_and_caps_a_day() {
    use cmr_core::consent::RequestPolicy;
    use cmr_core::decision::REQUEST_CAP_WINDOW;
    let mut w = World::new();
    let ask = |w: &World, company: &Party| {
        let req = AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "newsletter".into(),
            duration: Duration::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        };
        w.sign(company, Body::Request(req), None)
    };
    // A company cannot set the customer's policy.
    let st = Statement {
        customer: w.customer.id,
        author: w.acme.id,
        device: w.acme.device.id(),
        issued_at: T0,
        body: Body::RequestPolicy(RequestPolicy::default()),
    };
    assert!(SignedStatement::sign(st, None, &w.acme.device.signing).is_err());
    // Only companies with an active grant may ask.
    let g = w.grant(None, Duration::Persistent, p(2025, 1), None);
    w.apply(&g, T0).unwrap();
    let policy = RequestPolicy {
        granted_only: true,
        daily_cap: Some(2),
    };
    let set = w.sign(&w.customer, Body::RequestPolicy(policy), None);
    w.apply(&set, T0).unwrap();
    assert_eq!(w.state.request_policy(), policy);
    let r = ask(&w, &w.other);
    assert_eq!(w.apply(&r, T0 + 1).unwrap_err(), ApplyError::NotAccepted);
    // The grantee may, twice a day.
    let r = ask(&w, &w.acme);
    w.apply(&r, T0 + 2).unwrap();
    let r = ask(&w, &w.acme);
    w.apply(&r, T0 + 3).unwrap();
    let r = ask(&w, &w.acme);
    assert_eq!(
        w.apply(&r, T0 + 4).unwrap_err(),
        ApplyError::DailyCapReached { cap: 2 }
    );
    // A day after the first, one place is free again.
    let r = ask(&w, &w.acme);
    w.apply(&r, T0 + 2 + REQUEST_CAP_WINDOW).unwrap();
    // Opened to anyone, with no cap, the stranger's request is taken.
    let open = w.sign(
        &w.customer,
        Body::RequestPolicy(RequestPolicy::default()),
        None,
    );
    w.apply(&open, T0 + 3 + REQUEST_CAP_WINDOW).unwrap();
    let r = ask(&w, &w.other);
    w.apply(&r, T0 + 4 + REQUEST_CAP_WINDOW).unwrap();
    // The statement round-trips byte for byte.
    assert_eq!(
        SignedStatement::decode(&set.encode()).unwrap().encode(),
        set.encode()
    );
}

/// A request a customer could not approve as asked is named before it is sent: two appending families,
/// or appending to a profile section.
#[test]
fn requests_that_cannot_be_approved_as_asked_are_named() {
    let req = |scopes: Vec<(Scope, Access)>| AccessRequest {
        scopes,
        purpose: "x".into(),
        duration: Duration::Persistent,
        lookback_months: 1,
        counterparty: Counterparty::OnlyRequester,
    };
    assert!(
        req(vec![(Scope::Transactions, Access::ReadAppend)])
            .check_approvable()
            .is_ok()
    );
    assert!(
        req(vec![
            (Scope::ProfileContact, Access::Read),
            (Scope::ProfileInferred, Access::ReadAppend)
        ])
        .check_approvable()
        .is_ok()
    );
    let two = req(vec![
        (Scope::ProfileInferred, Access::ReadAppend),
        (Scope::Transactions, Access::ReadAppend),
    ])
    .check_approvable()
    .unwrap_err();
    assert!(two.contains("one family"), "{two}");
    let section = req(vec![(Scope::ProfileContact, Access::ReadAppend)])
        .check_approvable()
        .unwrap_err();
    assert!(section.contains("not profile.contact"), "{section}");
    // Appending without reading is fine: the appender is told the head, not the records.
    assert!(
        req(vec![(Scope::ProfileInferred, Access::Append)])
            .check_approvable()
            .is_ok()
    );
}
