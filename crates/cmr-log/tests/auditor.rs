//! The auditor against an in-memory log: a clean log verifies, and every attack of the log issue is
//! detected and named in the report.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::consent::{
    Access, AccessRequest, Body, Counterparty, Duration, Grant, GrantFamily, Initiator, Revocation,
    SignedStatement, Statement, StatementId,
};
use cmr_core::decision::AccessKind;
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig::{self, Request};
use cmr_core::identity::{DeviceKeys, IdentityId, Role, create_identity, revoke_device};
use cmr_core::keys::{KemSecretKey, SigningKey};
use cmr_log::auditor::{Auditor, Violation};
use cmr_log::entry::{AccessRecord, AccessedFamily, EntryBody, EntryKind, access_target};
use cmr_log::memlog::{MemoryLog, MemorySource};
use cmr_log::note::{NoteSigner, TYPE_ED25519};

const T0: u64 = 1_794_700_800;

fn p(y: u32, m: u32) -> Period {
    Period::from_year_month(y, m).unwrap()
}

struct Party {
    id: IdentityId,
    identity_key: SigningKey,
    device: DeviceKeys,
}

struct World {
    log: MemoryLog,
    signer: NoteSigner,
    customer: Party,
    acme: Party,
    other: Party,
    tx: FamilyId,
    contact: FamilyId,
    time: u64,
    nonce: u64,
}

impl World {
    fn new() -> Self {
        let signer = NoteSigner::new(
            "vault.example/log",
            TYPE_ED25519,
            SigningKey::from_seed(&[1; 32]),
        )
        .unwrap();
        let mut w = Self {
            log: MemoryLog::new(),
            signer,
            customer: Self::party_keys(Role::Customer),
            acme: Self::party_keys(Role::Company),
            other: Self::party_keys(Role::Company),
            tx: FamilyId([0; 32]),
            contact: FamilyId([0; 32]),
            time: T0,
            nonce: 0,
        };
        w.customer = w.register(Role::Customer);
        w.acme = w.register(Role::Company);
        w.other = w.register(Role::Company);
        let pk = PseudonymKey::generate(&mut rand::rng());
        w.tx = FamilyName::Transactions(pk.counterparty(&w.acme.id)).id(&w.customer.id);
        w.contact = FamilyName::profile(Scope::ProfileContact)
            .unwrap()
            .id(&w.customer.id);
        let dir = Directory {
            customer: w.customer.id,
            version: 1,
            prev: Digest([0; 32]),
            signer: w.customer.device.id(),
            issued_at: T0,
            devices: vec![DirectoryDevice {
                device: w.customer.device.id(),
                signing_key: w.customer.device.signing.verifying_key(),
                kem_key: w.customer.device.kem.public_key(),
            }],
            families: {
                let mut f = vec![
                    DirectoryFamily {
                        family: w.tx,
                        scope: Scope::Transactions,
                        epoch: 1,
                        appenders: vec![],
                    },
                    DirectoryFamily {
                        family: w.contact,
                        scope: Scope::ProfileContact,
                        epoch: 1,
                        appenders: vec![],
                    },
                ];
                f.sort_by_key(|x| x.family);
                f
            },
        }
        .sign(&w.customer.device.signing);
        let c = w.customer.id;
        w.append(EntryKind::Directory, c, Some(c), dir.encode());
        w
    }

    fn party_keys(role: Role) -> Party {
        let mut r = rand::rng();
        let n = create_identity(&mut r, role);
        Party {
            id: n.inception.identity(),
            identity_key: n.identity_key,
            device: DeviceKeys::generate(&mut r),
        }
    }

    fn register(&mut self, role: Role) -> Party {
        let mut r = rand::rng();
        let n = create_identity(&mut r, role);
        let id = n.inception.identity();
        let customer = (role == Role::Customer).then_some(id);
        self.append(EntryKind::KeyEvent, id, customer, n.inception.encode());
        let device = DeviceKeys::generate(&mut r);
        let cert = device.certify(id, 0, &n.identity_key, T0);
        self.append(EntryKind::DeviceCertificate, id, customer, cert.encode());
        Party {
            id,
            identity_key: n.identity_key,
            device,
        }
    }

    fn append(
        &mut self,
        kind: EntryKind,
        subject: IdentityId,
        customer: Option<IdentityId>,
        payload: Vec<u8>,
    ) -> u64 {
        self.time += 1;
        self.log
            .append(
                &mut rand::rng(),
                kind,
                self.time,
                subject,
                customer,
                payload,
            )
            .unwrap()
            .index
    }

    fn statement(
        &mut self,
        author: &str,
        body: Body,
        bundle: Option<cmr_core::wrap::SealedBytes>,
    ) -> (u64, StatementId) {
        let party = match author {
            "customer" => &self.customer,
            "acme" => &self.acme,
            _ => &self.other,
        };
        let st = Statement {
            customer: self.customer.id,
            author: party.id,
            device: party.device.id(),
            issued_at: self.time,
            body,
        };
        let s = SignedStatement::sign(st, bundle, &party.device.signing).unwrap();
        let (subject, c) = (party.id, self.customer.id);
        (
            self.append(EntryKind::Statement, subject, Some(c), s.encode()),
            s.id(),
        )
    }

    fn grant(&mut self) -> StatementId {
        self.grant_for(Duration::Persistent, None)
    }

    /// A grant to acme (answering its request) lasting `duration`, until `expires` if given.
    fn grant_for(&mut self, duration: Duration, expires: Option<u64>) -> StatementId {
        let req = AccessRequest {
            scopes: vec![(Scope::Transactions, Access::Read)],
            purpose: "statements".into(),
            duration,
            lookback_months: 24,
            counterparty: Counterparty::OnlyRequester,
        };
        let (_, req_id) = self.statement("acme", Body::Request(req), None);
        let kem = KemSecretKey::generate(&mut rand::rng());
        let g = Grant {
            grantee: self.acme.id,
            request: Some(req_id),
            purpose: "statements".into(),
            duration,
            not_before: T0,
            expires,
            lookback_start: p(2025, 6),
            window_months: None,
            scopes: vec![(Scope::Transactions, Access::Read)],
            families: vec![GrantFamily {
                family: self.tx,
                scope: Scope::Transactions,
                epoch: 1,
                access: Access::Read,
            }],
            append_family: None,
            grantee_kem: kem.public_key(),
        };
        let st = Statement {
            customer: self.customer.id,
            author: self.customer.id,
            device: self.customer.device.id(),
            issued_at: self.time,
            body: Body::Grant(g.clone()),
        };
        let id = SignedStatement::grant_id(&st);
        let secret = EpochSecret::generate(&mut rand::rng());
        let bundle = KeyBundle {
            entries: vec![BundleEntry {
                family: self.tx,
                epoch: 1,
                key: secret.read_key(p(2025, 6)),
            }],
        }
        .seal(
            &mut rand::rng(),
            self.customer.id,
            self.acme.id,
            &kem.public_key(),
            id.0,
        );
        let (_, gid) = self.statement("customer", Body::Grant(g), Some(bundle));
        assert_eq!(gid, id);
        gid
    }

    /// An access by acme's device (or `signer`), with a real RFC 9421 signature over the request the
    /// access claims (or over `signed`, another request of the company's).
    fn access_signed_by(
        &mut self,
        grant: StatementId,
        family: FamilyId,
        from: Period,
        nonce: Option<String>,
        device: &DeviceKeys,
        company: IdentityId,
    ) -> u64 {
        self.access_of_request(grant, family, from, nonce, device, company, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn access_of_request(
        &mut self,
        grant: StatementId,
        family: FamilyId,
        from: Period,
        nonce: Option<String>,
        device: &DeviceKeys,
        company: IdentityId,
        signed: Option<String>,
    ) -> u64 {
        self.nonce += 1;
        let nonce = nonce.unwrap_or_else(|| format!("n{}", self.nonce));
        let keyid = device.id().to_hex();
        let target = signed.unwrap_or_else(|| {
            access_target(
                &self.customer.id,
                &family,
                AccessKind::Read,
                &grant,
                None,
                from,
                p(2026, 11),
            )
        });
        let req = Request::new("POST", "https", "vault.example", &target, vec![]);
        let created = (self.time + 1) as i64;
        let h =
            httpsig::sign_request(&req, b"{}", &device.signing, &keyid, &nonce, created).unwrap();
        let parsed = httpsig::parse_signatures(&h.signature_input, &h.signature).unwrap();
        let with_digest = Request::new(
            "POST",
            "https",
            "vault.example",
            &target,
            vec![("content-digest", h.content_digest.as_str())],
        );
        let base = httpsig::signature_base(&with_digest, &parsed[0].params).unwrap();
        let rec = AccessRecord {
            grant,
            kind: AccessKind::Read,
            epoch: None,
            families: vec![AccessedFamily {
                family,
                from,
                to: p(2026, 11),
            }],
            records: vec![],
            keyid,
            signature_base: base,
            signature: parsed[0].signature.clone().try_into().unwrap(),
            head: None,
        };
        let c = self.customer.id;
        self.append(EntryKind::Access, company, Some(c), rec.encode())
    }

    fn access(
        &mut self,
        grant: StatementId,
        family: FamilyId,
        from: Period,
        nonce: Option<String>,
    ) -> u64 {
        let device = DeviceKeys {
            signing: SigningKey::from_seed(&self.acme.device.signing.seed()),
            kem: self.acme.device.kem.clone(),
        };
        let id = self.acme.id;
        self.access_signed_by(grant, family, from, nonce, &device, id)
    }

    /// Logs a batch of one record that acme's device signed (`n` tells batches apart), as the operator
    /// could, with nothing after it.
    fn acme_batch(&mut self, n: u8) -> u64 {
        let batch = cmr_core::batch::SignedBatch::sign(
            cmr_core::batch::Batch {
                customer: self.customer.id,
                family: self.tx,
                epoch: 1,
                author: self.acme.id,
                device: self.acme.device.id(),
                prev_head: Digest([n; 32]),
                entries: vec![cmr_core::batch::BatchEntry {
                    id: cmr_core::record::RecordId([n; 16]),
                    period: p(2026, 2),
                    digest: Digest([n; 32]),
                }],
            },
            &self.acme.device.signing,
        );
        let (acme, c) = (self.acme.id, self.customer.id);
        self.append(EntryKind::FamilyHead, acme, Some(c), batch.encode())
    }

    fn audit(&self) -> cmr_log::auditor::Report {
        let mut a = Auditor::new(self.signer.verifier());
        a.run(&mut MemorySource {
            log: &self.log,
            checkpoint: self.log.checkpoint(&self.signer),
        })
        .unwrap()
    }
}

#[test]
fn a_clean_log_verifies_and_runs_are_incremental() {
    let mut w = World::new();
    let g = w.grant();
    w.access(g, w.tx, p(2025, 6), None);
    let mut a = Auditor::new(w.signer.verifier());
    let r1 = a
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(r1.is_clean(), "{:?}", r1.violations);
    assert_eq!(r1.counts["access"], 1);
    assert_eq!(r1.counts["statement"], 2);
    assert_eq!(r1.counts["key-event"], 3);
    // New entries: only they are checked in the next run.
    w.access(g, w.tx, p(2026, 1), None);
    let (_, _) = w.statement(
        "customer",
        Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let r2 = a
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(r2.is_clean(), "{:?}", r2.violations);
    assert_eq!(r2.counts.values().sum::<u64>(), 2);
    assert_eq!(a.verified().unwrap().size, w.log.size());
}

#[test]
fn a_rollback_is_detected_with_both_checkpoints() {
    let mut w = World::new();
    let old = w.log.checkpoint(&w.signer);
    w.grant();
    let mut a = Auditor::new(w.signer.verifier());
    assert!(
        a.run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer)
        })
        .unwrap()
        .is_clean()
    );
    let r = a
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: old.clone(),
        })
        .unwrap();
    assert!(matches!(&r.violations[..], [Violation::Rollback { current, .. }] if *current == old));
}

#[test]
fn a_fork_is_detected_with_both_checkpoints() {
    let w = World::new();
    let mut a = Auditor::new(w.signer.verifier());
    assert!(
        a.run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer)
        })
        .unwrap()
        .is_clean()
    );
    let size = w.log.size();
    // The operator shows another view: a different log of the same size, signed with the same key.
    let mut other = MemoryLog::new();
    for _ in 0..size {
        other
            .append(
                &mut rand::rng(),
                EntryKind::Access,
                T0,
                w.acme.id,
                None,
                vec![1],
            )
            .unwrap();
    }
    let forked = other.checkpoint(&w.signer);
    let r = a
        .run(&mut MemorySource {
            log: &other,
            checkpoint: forked,
        })
        .unwrap();
    assert!(
        matches!(&r.violations[..], [Violation::Fork { .. }]),
        "{:?}",
        r.violations
    );
    // A larger view whose prefix differs is a fork too.
    other
        .append(
            &mut rand::rng(),
            EntryKind::Access,
            T0,
            w.acme.id,
            None,
            vec![1],
        )
        .unwrap();
    let r = a
        .run(&mut MemorySource {
            log: &other,
            checkpoint: other.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(
        matches!(&r.violations[..], [Violation::Fork { .. }]),
        "{:?}",
        r.violations
    );
}

#[test]
fn dropped_reordered_or_edited_entries_are_detected() {
    let mut w = World::new();
    w.grant();
    let cp = w.log.checkpoint(&w.signer);
    // A leaf replaced (edited entry, or two swapped): the leaves no longer lead to the signed root.
    let mut edited = MemoryLog::new();
    std::mem::swap(&mut edited, &mut w.log);
    let c5 = edited.commitments(5, 6)[0];
    let c6 = edited.commitments(6, 7)[0];
    edited.tamper_commitment(5, c6);
    edited.tamper_commitment(6, c5);
    let mut a = Auditor::new(w.signer.verifier());
    let r = a
        .run(&mut MemorySource {
            log: &edited,
            checkpoint: cp.clone(),
        })
        .unwrap();
    assert!(
        matches!(&r.violations[..], [Violation::RootMismatch { .. }]),
        "{:?}",
        r.violations
    );
    // A dropped entry: the same entries but one, served under the checkpoint of the full log.
    edited.tamper_commitment(5, c5);
    edited.tamper_commitment(6, c6);
    let mut shorter = MemoryLog::new();
    for i in (0..edited.size()).filter(|i| *i != 4) {
        let stored = edited.body(i).unwrap();
        shorter.append_body(&mut rand::rng(), &EntryBody::decode(&stored.body).unwrap());
    }
    let mut a = Auditor::new(w.signer.verifier());
    let r = a
        .run(&mut MemorySource {
            log: &shorter,
            checkpoint: cp,
        })
        .unwrap();
    assert!(
        matches!(&r.violations[..], [Violation::RootMismatch { .. }]),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_body_that_does_not_match_its_commitment() {
    let mut w = World::new();
    w.grant();
    let stored = w.log.body(3).unwrap().clone();
    let (salt, body) = (stored.salt, stored.body);
    let mut edited = body.clone();
    let n = edited.len();
    edited[n - 1] ^= 1;
    w.log.tamper_body(3, salt, edited);
    let r = w.audit();
    assert!(
        r.violations.contains(&Violation::CommitmentMismatch(3)),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_forged_grant_or_revocation() {
    let mut w = World::new();
    let g = w.grant();
    // A "grant" in the customer's name, signed by acme's device.
    let st = Statement {
        customer: w.customer.id,
        author: w.customer.id,
        device: w.acme.device.id(),
        issued_at: 0,
        body: Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "forged".into(),
        }),
    };
    let forged = SignedStatement::sign(st, None, &w.acme.device.signing).unwrap();
    let (acme, c) = (w.acme.id, w.customer.id);
    let at = w.append(EntryKind::Statement, acme, Some(c), forged.encode());
    // Another company "gives up" acme's grant.
    let (at2, _) = w.statement(
        "other",
        Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Grantee,
            reason: "x".into(),
        }),
        None,
    );
    let r = w.audit();
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, Violation::BadSignature(i, _) if *i == at)),
        "{:?}",
        r.violations
    );
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, Violation::RefusedStatement(i, _) if *i == at2)),
        "{:?}",
        r.violations
    );
}

#[test]
fn an_access_after_a_revocation() {
    let mut w = World::new();
    let g = w.grant();
    let ok = w.access(g, w.tx, p(2025, 6), None);
    w.statement(
        "customer",
        Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let late = w.access(g, w.tx, p(2025, 6), None);
    let r = w.audit();
    assert_eq!(
        r.violations,
        vec![Violation::AccessDenied(late, "grant-revoked".into())]
    );
    assert!(ok < late);
}

#[test]
fn an_access_after_expiry_a_second_use_of_a_one_time_grant_and_another_companys_use() {
    let mut w = World::new();
    // Expiry is judged at the entry's (server) time.
    let seconds = w.time + 10 - T0;
    let expires = T0 + seconds;
    let g = w.grant_for(Duration::TimeBound { seconds }, Some(expires));
    let in_time = w.access(g, w.tx, p(2025, 6), None);
    w.time = expires + 5;
    let expired = w.access(g, w.tx, p(2025, 6), None);
    // A one-time grant is consumed by its first access.
    let once = w.grant_for(Duration::OneTime, None);
    let first = w.access(once, w.tx, p(2025, 6), None);
    let second = w.access(once, w.tx, p(2025, 6), None);
    // Another company using acme's grant, with its own real signature.
    let other = DeviceKeys {
        signing: SigningKey::from_seed(&w.other.device.signing.seed()),
        kem: w.other.device.kem.clone(),
    };
    let other_id = w.other.id;
    let stolen = {
        let g2 = w.grant();
        w.access_signed_by(g2, w.tx, p(2025, 6), None, &other, other_id)
    };
    let r = w.audit();
    let denied: Vec<(u64, String)> = r
        .violations
        .iter()
        .filter_map(|v| match v {
            Violation::AccessDenied(i, why) => Some((*i, why.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        denied,
        vec![
            (expired, "grant-expired".to_string()),
            (second, "grant-consumed".to_string()),
            (stolen, "wrong-company".to_string()),
        ],
        "{:?}",
        r.violations
    );
    assert!(in_time < expired && first < second);
}

#[test]
fn an_access_outside_its_families_or_periods() {
    let mut w = World::new();
    let g = w.grant();
    let fam = w.access(g, w.contact, p(2025, 6), None);
    let early = w.access(g, w.tx, p(2024, 1), None);
    let r = w.audit();
    assert_eq!(
        r.violations,
        vec![
            Violation::AccessDenied(fam, "family-not-granted".into()),
            Violation::AccessDenied(early, "outside-look-back".into())
        ]
    );
}

#[test]
fn a_replayed_keyid_and_nonce() {
    let mut w = World::new();
    let g = w.grant();
    w.access(g, w.tx, p(2025, 6), Some("same".into()));
    let again = w.access(g, w.tx, p(2025, 6), Some("same".into()));
    let r = w.audit();
    assert!(
        matches!(&r.violations[..], [Violation::ReplayedNonce(i, _)] if *i == again),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_signature_by_a_device_revoked_before_that_position() {
    let mut w = World::new();
    let g = w.grant();
    let rev = revoke_device(w.acme.id, 0, &w.acme.identity_key, w.acme.device.id(), 0);
    let acme = w.acme.id;
    w.append(EntryKind::DeviceRevocation, acme, None, rev.encode());
    let late = w.access(g, w.tx, p(2025, 6), None);
    let r = w.audit();
    assert!(
        matches!(&r.violations[..], [Violation::BadSignature(i, e)] if *i == late && e.contains("revoked")),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_time_that_goes_backwards_and_a_broken_chain() {
    let mut w = World::new();
    let c = w.customer.id;
    let head = w.log.head(&c);
    let back = EntryBody {
        kind: EntryKind::Directory,
        time: T0 - 100,
        subject: c,
        customer: None,
        prev: None,
        payload: vec![],
    };
    let b = w.log.append_body(&mut rand::rng(), &back);
    // An entry about the customer that skips its chain (names no previous entry).
    let broken = EntryBody {
        kind: EntryKind::Directory,
        time: T0 + 1000,
        subject: c,
        customer: Some(c),
        prev: None,
        payload: vec![],
    };
    let bi = w.log.append_body(&mut rand::rng(), &broken).index;
    assert!(head.is_some());
    let r = w.audit();
    assert!(
        r.violations
            .contains(&Violation::TimeWentBackwards(b.index)),
        "{:?}",
        r.violations
    );
    assert!(
        r.violations.contains(&Violation::BrokenChain(bi)),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_checkpoint_signed_by_an_unknown_key() {
    let w = World::new();
    let impostor = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[2; 32]),
    )
    .unwrap();
    let mut a = Auditor::new(w.signer.verifier());
    let r = a
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&impostor),
        })
        .unwrap();
    assert!(
        matches!(&r.violations[..], [Violation::BadCheckpoint(_)]),
        "{:?}",
        r.violations
    );
    assert!(a.verified().is_none());
}

#[test]
fn an_erased_entry_is_reported_as_redacted() {
    let mut w = World::new();
    let g = w.grant();
    let i = w.access(g, w.tx, p(2025, 6), None);
    w.access(g, w.tx, p(2025, 7), None);
    w.log.redact(i);
    let r = w.audit();
    assert!(r.is_clean(), "{:?}", r.violations);
    assert_eq!(r.redacted, vec![i]);
}

#[test]
fn the_witness_cosigns_only_consistent_checkpoints() {
    use cmr_log::note::{NoteSigner, TYPE_COSIGNATURE};
    use cmr_log::witness::{Witness, WitnessError};
    let mut w = World::new();
    let ws = NoteSigner::new(
        "witness.example/w1",
        TYPE_COSIGNATURE,
        SigningKey::from_seed(&[3; 32]),
    )
    .unwrap();
    let wv = ws.verifier();
    let mut witness = Witness::new(ws, w.signer.verifier()).unwrap();
    let first = w.log.checkpoint(&w.signer);
    let s1 = w.log.size();
    let line = witness.cosign(&first, &[], T0).unwrap();
    cmr_log::checkpoint::open(&format!("{first}{line}"), &w.signer.verifier(), &[wv], 1).unwrap();
    w.grant();
    let second = w.log.checkpoint(&w.signer);
    let proof = w.log.tree().consistency_proof(s1, w.log.size()).unwrap();
    witness.cosign(&second, &proof, T0 + 1).unwrap();
    // A fork at a larger size, or an older checkpoint, is refused.
    let mut other = MemoryLog::new();
    for _ in 0..w.log.size() + 1 {
        other
            .append(
                &mut rand::rng(),
                EntryKind::Access,
                T0,
                w.acme.id,
                None,
                vec![1],
            )
            .unwrap();
    }
    let bad_proof = other
        .tree()
        .consistency_proof(w.log.size(), other.size())
        .unwrap();
    assert!(matches!(
        witness.cosign(&other.checkpoint(&w.signer), &bad_proof, T0 + 2),
        Err(WitnessError::Inconsistent(_))
    ));
    assert!(matches!(
        witness.cosign(&first, &[], T0 + 3),
        Err(WitnessError::Rollback { .. })
    ));
    // A witness resumed from its saved checkpoint keeps refusing the rollback; a saved state that is not
    // signed by the log is refused.
    let ws = || {
        NoteSigner::new(
            "witness.example/w1",
            TYPE_COSIGNATURE,
            SigningKey::from_seed(&[3; 32]),
        )
        .unwrap()
    };
    let mut resumed = Witness::resume(ws(), w.signer.verifier(), &second).unwrap();
    assert!(matches!(
        resumed.cosign(&first, &[], T0 + 4),
        Err(WitnessError::Rollback { .. })
    ));
    assert!(Witness::resume(ws(), w.signer.verifier(), &second.replace('\n', "\n\n")).is_err());
}

#[test]
fn one_bad_signature_among_many_is_named() {
    let mut w = World::new();
    let g = w.grant();
    let mut last = 0;
    for _ in 0..300 {
        last = w.access(g, w.tx, p(2025, 6), None);
    }
    // Flip one bit of one access's signature: the batch fails, and the strict fallback names it.
    let victim = last - 150;
    let stored = w.log.body(victim).unwrap().clone();
    let mut body = EntryBody::decode(&stored.body).unwrap();
    let mut rec = AccessRecord::decode(&body.payload).unwrap();
    rec.signature[10] ^= 1;
    body.payload = rec.encode();
    // Re-log everything with the edited entry, as a server that forged it would have to.
    let mut forged = MemoryLog::new();
    for i in 0..w.log.size() {
        let b = if i == victim {
            body.clone()
        } else {
            EntryBody::decode(&w.log.body(i).unwrap().body).unwrap()
        };
        forged.append_body(&mut rand::rng(), &b);
    }
    let mut a = Auditor::new(w.signer.verifier());
    let r = a
        .run(&mut MemorySource {
            log: &forged,
            checkpoint: forged.checkpoint(&w.signer),
        })
        .unwrap();
    // The edit also changed the entry's hash, so the customer's next entry no longer links to it.
    assert_eq!(
        r.violations,
        vec![
            Violation::BrokenChain(victim + 1),
            Violation::BadSignature(victim, "signature verification failed".into())
        ]
    );
    assert_eq!(r.counts["access"], 300);
}

#[test]
fn a_saved_auditor_resumes_where_it_stopped() {
    let mut w = World::new();
    let g = w.grant();
    w.access(g, w.tx, p(2025, 6), Some("first".into()));
    let mut a = Auditor::new(w.signer.verifier());
    assert!(
        a.run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer)
        })
        .unwrap()
        .is_clean()
    );
    let saved = a.snapshot();
    let old_cp = w.log.checkpoint(&w.signer);

    // More happens: a replayed nonce, a revocation, and an access after it.
    let replay = w.access(g, w.tx, p(2025, 6), Some("first".into()));
    w.statement(
        "customer",
        Body::Revocation(Revocation {
            grant: g,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let late = w.access(g, w.tx, p(2025, 6), None);

    let mut restored = Auditor::restore(w.signer.verifier(), &saved).unwrap();
    let r = restored
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
    assert!(matches!(&r.violations[0], Violation::ReplayedNonce(i, _) if *i == replay));
    assert_eq!(
        r.violations[1],
        Violation::AccessDenied(late, "grant-revoked".into())
    );
    assert_eq!(
        r.counts.values().sum::<u64>(),
        3,
        "only the new entries are checked"
    );
    // The restored auditor still remembers the old checkpoint: serving it now is a rollback.
    let mut again = Auditor::restore(w.signer.verifier(), &restored.snapshot()).unwrap();
    let r = again
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: old_cp,
        })
        .unwrap();
    assert!(matches!(&r.violations[..], [Violation::Rollback { .. }]));
    // A snapshot checked against another log key, or edited, is refused.
    let other = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[5; 32]),
    )
    .unwrap();
    assert!(Auditor::restore(other.verifier(), &saved).is_err());
    assert!(
        Auditor::restore(
            w.signer.verifier(),
            &saved.replace("\"range_size\":", "\"range_size\":1")
        )
        .is_err()
    );
    assert!(Auditor::restore(w.signer.verifier(), "{}").is_err());
}

#[test]
fn auditor_admissions_are_checked_against_the_log_key_and_the_rule() {
    use cmr_log::admission::Admission;
    let mut w = World::new();
    let auditor = w.register(Role::Auditor);
    let admit = |id, admit, time, key: &NoteSigner| {
        Admission {
            auditor: id,
            admit,
            time,
        }
        .sign(key)
        .into_bytes()
    };
    // The operator's admission, signed with the log key: clean.
    let good = admit(auditor.id, true, T0, &w.signer);
    w.append(EntryKind::Admission, auditor.id, None, good);
    let report = w.audit();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.counts["auditor-admission"], 1);
    let mut a = Auditor::new(w.signer.verifier());
    a.run(&mut MemorySource {
        log: &w.log,
        checkpoint: w.log.checkpoint(&w.signer),
    })
    .unwrap();
    assert!(a.auditors().is_admitted(&auditor.id));
    // The admission survives a saved and restored auditor.
    let restored = Auditor::restore(w.signer.verifier(), &a.snapshot()).unwrap();
    assert!(restored.auditors().is_admitted(&auditor.id));

    // An operator that logs an admission signed with another key, admits a company, or names another
    // identity as the entry's subject than the statement's is reported.
    let stranger = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[77; 32]),
    )
    .unwrap();
    let second = w.register(Role::Auditor);
    let forged = w.append(
        EntryKind::Admission,
        second.id,
        None,
        admit(second.id, true, T0, &stranger),
    );
    let company = w.append(
        EntryKind::Admission,
        w.other.id,
        None,
        admit(w.other.id, true, T0, &w.signer),
    );
    let swapped = w.append(
        EntryKind::Admission,
        second.id,
        None,
        admit(auditor.id, false, T0 + 1, &w.signer),
    );
    let report = w.audit();
    let named: Vec<u64> = report
        .violations
        .iter()
        .filter_map(|v| match v {
            Violation::BadSignature(i, _)
            | Violation::RefusedStatement(i, _)
            | Violation::Malformed(i, _) => Some(*i),
            _ => None,
        })
        .collect();
    assert_eq!(
        named,
        vec![forged, company, swapped],
        "{:?}",
        report.violations
    );
}

#[test]
fn an_access_not_bound_to_its_signed_request() {
    // The operator takes requests the company really signed (a relationship poll, a read of another
    // family, a read of other months) and logs each as a read it claims the company made.
    let mut w = World::new();
    let g = w.grant();
    let device = DeviceKeys {
        signing: SigningKey::from_seed(&w.acme.device.signing.seed()),
        kem: w.acme.device.kem.clone(),
    };
    let (c, acme) = (w.customer.id, w.acme.id);
    let poll = format!("/v1/vaults/{}/relationship", c.to_hex());
    let other_family = access_target(
        &c,
        &w.contact,
        AccessKind::Read,
        &g,
        None,
        p(2025, 6),
        p(2026, 11),
    );
    let other_months = access_target(
        &c,
        &w.tx,
        AccessKind::Read,
        &g,
        None,
        p(2025, 7),
        p(2026, 11),
    );
    let forged: Vec<u64> = [poll, other_family, other_months]
        .into_iter()
        .map(|signed| w.access_of_request(g, w.tx, p(2025, 6), None, &device, acme, Some(signed)))
        .collect();
    // And one honest read, which stays clean.
    w.access(g, w.tx, p(2025, 6), None);
    let report = w.audit();
    let unbound: Vec<u64> = report
        .violations
        .iter()
        .filter_map(|v| match v {
            Violation::Unbound(i, _) => Some(*i),
            _ => None,
        })
        .collect();
    assert_eq!(unbound, forged, "{:?}", report.violations);
    assert_eq!(
        report.violations.len(),
        forged.len(),
        "{:?}",
        report.violations
    );
}

#[test]
fn a_forged_copy_of_a_request_does_not_make_the_genuine_access_a_replay() {
    // The operator logs, before the genuine read, a copy of the company's signed request claimed as a
    // read of another family: the copy is the violation, and the genuine read (same keyid and nonce)
    // stays clean: a nonce is used up only by an access bound to its request.
    let mut w = World::new();
    let g = w.grant();
    let device = DeviceKeys {
        signing: SigningKey::from_seed(&w.acme.device.signing.seed()),
        kem: w.acme.device.kem.clone(),
    };
    let acme = w.acme.id;
    let genuine_target = access_target(
        &w.customer.id,
        &w.tx,
        AccessKind::Read,
        &g,
        None,
        p(2025, 6),
        p(2026, 11),
    );
    let copy = w.access_of_request(
        g,
        w.contact,
        p(2025, 6),
        Some("once".into()),
        &device,
        acme,
        Some(genuine_target),
    );
    w.access(g, w.tx, p(2025, 6), Some("once".into()));
    let report = w.audit();
    assert!(
        matches!(&report.violations[..], [Violation::Unbound(i, _)] if *i == copy),
        "{:?}",
        report.violations
    );
}

/// A key-event head the operator signed is checked against the whole log: a true one passes, one that
/// leaves out a device revocation is named with the signed head as evidence.
#[test]
fn a_key_event_head_that_leaves_out_a_revocation_is_a_violation() {
    use cmr_log::auditor::KeyHeadCheckError;
    use cmr_log::keyhead::KeyHead;
    let mut w = World::new();
    let acme = w.acme.id;
    // Acme certifies a second device, then revokes it.
    let lost = DeviceKeys::generate(&mut rand::rng());
    let cert = lost.certify(acme, 0, &w.acme.identity_key, T0);
    w.append(EntryKind::DeviceCertificate, acme, None, cert.encode());
    let rev = cmr_core::identity::revoke_device(acme, 0, &w.acme.identity_key, lost.id(), T0);
    let revoked_at = w.append(EntryKind::DeviceRevocation, acme, None, rev.encode());
    let size = w.log.size();
    let mut a = Auditor::new(w.signer.verifier());
    let report = a
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    let acme_events: Vec<(u64, Digest)> = (0..size)
        .filter_map(|i| {
            let b = w.log.body(i)?;
            let body = EntryBody::decode(&b.body).ok()?;
            (body.subject == acme && cmr_log::keyhead::is_key_event(body.kind))
                .then(|| (i, EntryBody::hash(&b.body)))
        })
        .collect();
    assert_eq!(acme_events.len(), 4);
    let head = |events: &[(u64, Digest)]| {
        KeyHead::over(acme, size, events.iter().map(|(i, h)| (*i, h)))
            .unwrap()
            .sign(&w.signer)
    };
    // The true head, and the true head at an earlier size, pass.
    assert_eq!(a.check_key_head(&head(&acme_events)).unwrap(), None);
    let earlier = KeyHead::over(
        acme,
        revoked_at,
        acme_events[..3].iter().map(|(i, h)| (*i, h)),
    )
    .unwrap()
    .sign(&w.signer);
    assert_eq!(a.check_key_head(&earlier).unwrap(), None);
    // The revocation left out at the full size: the signed head is the evidence.
    let lie = head(&acme_events[..3]);
    match a.check_key_head(&lie).unwrap() {
        Some(Violation::FalseKeyHead { head, actual }) => {
            assert_eq!(head, lie);
            assert!(actual.contains("events 4"), "{actual}");
        }
        other => panic!("expected a false head, got {other:?}"),
    }
    // A head beyond what the auditor verified waits; one not signed by the log key proves nothing.
    let ahead = KeyHead::over(acme, size + 5, acme_events.iter().map(|(i, h)| (*i, h)))
        .unwrap()
        .sign(&w.signer);
    assert!(matches!(
        a.check_key_head(&ahead),
        Err(KeyHeadCheckError::NotYetVerified { .. })
    ));
    let stranger = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[9; 32]),
    )
    .unwrap();
    let forged = KeyHead::over(acme, size, acme_events[..3].iter().map(|(i, h)| (*i, h)))
        .unwrap()
        .sign(&stranger);
    assert!(matches!(
        a.check_key_head(&forged),
        Err(KeyHeadCheckError::Unopenable(_))
    ));
}

#[test]
fn a_company_batch_without_its_signed_append() {
    // The operator logs records as if acme had appended them: a batch acme's device signed once, with no
    // signed append after it, or followed by a request acme signed for something else (a read).
    let mut w = World::new();
    let g = w.grant();
    // A batch, then a statement by the customer where the append should be.
    w.acme_batch(1);
    let (after_first, _) = w.statement(
        "customer",
        Body::Block {
            company: w.other.id,
            blocked: true,
        },
        None,
    );
    // A batch, then a read acme really signed.
    w.acme_batch(2);
    let after_second = w.access(g, w.tx, p(2025, 6), None);
    // A batch as the last entry: nothing follows it yet, which is not a violation until something
    // other than its append does.
    w.acme_batch(3);
    let report = w.audit();
    let unbound: Vec<u64> = report
        .violations
        .iter()
        .filter_map(|v| match v {
            Violation::Unbound(i, _) => Some(*i),
            _ => None,
        })
        .collect();
    assert_eq!(
        unbound,
        vec![after_first, after_second],
        "{:?}",
        report.violations
    );
    assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
}

#[test]
fn a_saved_auditor_judges_the_entry_after_a_company_batch_as_before() {
    // A checkpoint right after a company batch (an honest operator never publishes one there, but the
    // auditor must not depend on it): the auditor saved there still requires the signed append next.
    let mut w = World::new();
    w.grant();
    w.acme_batch(1);
    let mut first = Auditor::new(w.signer.verifier());
    let report = first
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    let saved = first.snapshot();
    let (next, _) = w.statement(
        "customer",
        Body::Block {
            company: w.other.id,
            blocked: true,
        },
        None,
    );
    let mut restored = Auditor::restore(w.signer.verifier(), &saved).unwrap();
    let report = restored
        .run(&mut MemorySource {
            log: &w.log,
            checkpoint: w.log.checkpoint(&w.signer),
        })
        .unwrap();
    assert!(
        matches!(report.violations.as_slice(), [Violation::Unbound(i, _)] if *i == next),
        "{:?}",
        report.violations
    );
}
