//! The test kit: a customer, a company and their keys, with the operations they send, driving any
//! [`Backend`]. The store's tests, the backend conformance suite ([`crate::conformance`]) and a later
//! backend's tests share it. Test code: it panics on what a test would fail on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use crate::{Ack, Backend, Op, StoreError};
use cmr_core::batch::{Batch, SignedBatch};
use cmr_core::consent::{
    Access, AccessRequest, Body, Counterparty, Duration, Grant, GrantFamily, Initiator, Revocation,
    SignedStatement, Statement, StatementId,
};
use cmr_core::decision::AccessKind;
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyId, FamilyName, Period, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig::{self, Request};
use cmr_core::identity::{
    DeviceCertificate, DeviceKeys, IdentityId, Role, Signed, SignedKeyEvent, create_identity,
};
use cmr_core::keys::{KemSecretKey, SigningKey};
use cmr_core::record::{RecordId, RecordSealer};
use cmr_log::entry::{AccessRecord, AccessedFamily};
use cmr_log::note::{NoteSigner, TYPE_ED25519};

/// The clock's start in every test: 2026-11-15 00:00 UTC.
pub const T0: u64 = 1_794_700_800;

/// A month.
pub fn p(y: u32, m: u32) -> Period {
    Period::from_year_month(y, m).unwrap()
}

/// The log key of every test store (a fixed seed).
pub fn log_key() -> NoteSigner {
    NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap()
}

/// Submits an operation and waits for its acknowledgement or refusal.
pub fn execute(backend: &dyn Backend, op: Op) -> Result<Ack, StoreError> {
    backend
        .submit(op)
        .blocking_recv()
        .unwrap_or(Err(StoreError::Closed))
}

/// The store's latest served checkpoint, verified under the log key.
pub fn latest_checkpoint(store: &dyn Backend) -> cmr_log::checkpoint::Checkpoint {
    let note = store.checkpoint().unwrap().unwrap();
    cmr_log::checkpoint::open(&note, &log_key().verifier(), &[], 0)
        .unwrap()
        .checkpoint
}

/// An identity with one device.
pub struct Party {
    /// Its identity.
    pub id: IdentityId,
    /// Its device's keys.
    pub device: DeviceKeys,
    /// A KEM key that grants are sealed to.
    pub kem: KemSecretKey,
}

/// Deterministic keys, so a child process and its parent agree on them; with the party's signed
/// inception and device certificate.
pub fn party(role: Role, seed: u8) -> (Party, SignedKeyEvent, Signed<DeviceCertificate>) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::from_seed([seed; 32]);
    let n = create_identity(&mut rng, role);
    let id = n.inception.identity();
    let device = DeviceKeys::generate(&mut rng);
    let cert = device.certify(id, 0, &n.identity_key, T0);
    let kem = KemSecretKey::generate(&mut rng);
    (Party { id, device, kem }, n.inception, cert)
}

/// A customer with two families (transactions with Acme, and contact details) and a company, Acme.
pub struct World {
    /// The customer.
    pub customer: Party,
    /// The company.
    pub acme: Party,
    /// The customer's transactions with Acme (Acme may append).
    pub tx: FamilyId,
    /// The customer's contact details.
    pub contact: FamilyId,
    /// The epoch secret of `tx`.
    pub secret_tx: EpochSecret,
    /// The epoch secret of `contact`.
    pub secret_contact: EpochSecret,
    /// The next request nonce.
    pub nonce: u64,
}

impl World {
    /// Registers both parties, their devices, and the customer's directory with two families.
    pub fn setup(store: &dyn Backend) -> World {
        let (w, ops) = Self::with_ops();
        for op in ops {
            execute(store, op).unwrap();
        }
        w
    }

    /// The same world, for a store where it is already registered.
    pub fn existing() -> World {
        Self::with_ops().0
    }

    fn with_ops() -> (World, Vec<Op>) {
        use rand::SeedableRng;
        let (customer, ci, cc) = party(Role::Customer, 1);
        let (acme, ai, ac) = party(Role::Company, 2);
        let mut ops = vec![
            Op::Register(ci),
            Op::Certify(cc),
            Op::Register(ai),
            Op::Certify(ac),
        ];
        let pk = cmr_core::family::PseudonymKey::from_bytes([3; 32]);
        let tx = FamilyName::Transactions(pk.counterparty(&acme.id)).id(&customer.id);
        let contact = FamilyName::profile(Scope::ProfileContact)
            .unwrap()
            .id(&customer.id);
        let mut families = vec![
            DirectoryFamily {
                family: tx,
                scope: Scope::Transactions,
                epoch: 1,
                appenders: vec![acme.id],
            },
            DirectoryFamily {
                family: contact,
                scope: Scope::ProfileContact,
                epoch: 1,
                appenders: vec![],
            },
        ];
        families.sort_by_key(|f| f.family);
        let dir = Directory {
            customer: customer.id,
            version: 1,
            prev: Digest([0; 32]),
            signer: customer.device.id(),
            issued_at: T0,
            devices: vec![DirectoryDevice {
                device: customer.device.id(),
                signing_key: customer.device.signing.verifying_key(),
                kem_key: customer.device.kem.public_key(),
            }],
            families,
        }
        .sign(&customer.device.signing);
        ops.push(Op::PublishDirectory(dir));
        let mut rng = rand::rngs::StdRng::from_seed([4; 32]);
        let w = World {
            customer,
            acme,
            tx,
            contact,
            secret_tx: EpochSecret::generate(&mut rng),
            secret_contact: EpochSecret::generate(&mut rng),
            nonce: 0,
        };
        (w, ops)
    }

    /// A statement by the customer's device.
    pub fn statement(
        &self,
        by_customer: bool,
        body: Body,
        bundle: Option<cmr_core::wrap::SealedBytes>,
    ) -> SignedStatement {
        let party = if by_customer {
            &self.customer
        } else {
            &self.acme
        };
        let st = Statement {
            customer: self.customer.id,
            author: party.id,
            device: party.device.id(),
            issued_at: T0,
            body,
        };
        SignedStatement::sign(st, bundle, &party.device.signing).unwrap()
    }

    /// A request from acme and the customer's grant: read + append on acme's transactions family.
    pub fn grant(&self, store: &dyn Backend) -> StatementId {
        let g = self.grant_statement(store);
        let id = g.id();
        execute(store, Op::Statement(g)).unwrap();
        id
    }

    /// Logs acme's request and returns the customer's signed grant answering it (not yet logged). Each
    /// call seals a fresh bundle: same grant id, different bytes.
    pub fn grant_statement(&self, store: &dyn Backend) -> SignedStatement {
        let req = AccessRequest {
            scopes: vec![(Scope::Transactions, Access::ReadAppend)],
            purpose: "statements".into(),
            duration: Duration::Persistent,
            lookback_months: 36,
            counterparty: Counterparty::OnlyRequester,
        };
        let r = self.statement(false, Body::Request(req), None);
        execute(store, Op::Statement(r.clone())).unwrap();
        let g = Grant {
            grantee: self.acme.id,
            request: Some(r.id()),
            purpose: "statements".into(),
            duration: Duration::Persistent,
            not_before: T0,
            expires: None,
            lookback_start: p(2025, 1),
            window_months: None,
            scopes: vec![(Scope::Transactions, Access::ReadAppend)],
            families: vec![GrantFamily {
                family: self.tx,
                scope: Scope::Transactions,
                epoch: 1,
                access: Access::ReadAppend,
            }],
            append_family: Some(self.tx),
            grantee_kem: self.acme.kem.public_key(),
        };
        self.signed_grant(
            g,
            vec![
                BundleEntry {
                    family: self.tx,
                    epoch: 1,
                    key: self.secret_tx.read_key(p(2025, 1)),
                },
                BundleEntry {
                    family: self.tx,
                    epoch: 1,
                    key: self.secret_tx.append_key(&self.acme.id, p(2025, 1)),
                },
            ],
        )
    }

    /// The customer's signed grant `g` to acme, its key bundle sealed to acme's device.
    fn signed_grant(&self, g: Grant, entries: Vec<BundleEntry>) -> SignedStatement {
        let st = Statement {
            customer: self.customer.id,
            author: self.customer.id,
            device: self.customer.device.id(),
            issued_at: T0,
            body: Body::Grant(g.clone()),
        };
        let id = SignedStatement::grant_id(&st);
        let bundle = KeyBundle { entries }.seal(
            &mut rand::rng(),
            self.customer.id,
            self.acme.id,
            &self.acme.kem.public_key(),
            id.0,
        );
        self.statement(true, Body::Grant(g), Some(bundle))
    }

    /// Another signed copy of `grant` with a freshly sealed bundle: the same id, other bytes.
    pub fn reseal(&self, grant: &SignedStatement) -> SignedStatement {
        let Body::Grant(g) = &grant.statement().body else {
            panic!("not a grant")
        };
        let bundle = KeyBundle {
            entries: vec![BundleEntry {
                family: self.tx,
                epoch: 1,
                key: self.secret_tx.read_key(p(2025, 1)),
            }],
        }
        .seal(
            &mut rand::rng(),
            self.customer.id,
            self.acme.id,
            &self.acme.kem.public_key(),
            grant.id().0,
        );
        self.statement(true, Body::Grant(g.clone()), Some(bundle))
    }

    /// The current head of one of the customer's families, from the customer's own read.
    pub fn head_of(
        &self,
        store: &dyn Backend,
        family: FamilyId,
        periods: (Period, Period),
    ) -> Digest {
        let own = Op::Read {
            customer: self.customer.id,
            family,
            periods,
            cursor: None,
            limit: 1,
            access: None,
        };
        execute(store, own)
            .unwrap()
            .read
            .unwrap()
            .proof
            .head
            .digest()
    }

    /// The customer revokes a grant.
    pub fn revoke(&self, grant: StatementId) -> Op {
        Op::Statement(self.statement(
            true,
            Body::Revocation(Revocation {
                grant,
                initiator: Initiator::Customer,
                reason: "done".into(),
            }),
            None,
        ))
    }

    /// A batch of `n` customer records in `period` of the transactions family, extending `head`.
    pub fn customer_batch(&self, head: Digest, period: Period, n: usize, tag: u64) -> Op {
        self.batch_in(self.tx, &self.secret_tx, head, period, n, tag)
    }

    /// A batch of `n` customer records in the contact family (no grant reads it), extending `head`.
    pub fn contact_batch(&self, head: Digest, n: usize, tag: u64) -> Op {
        self.batch_in(
            self.contact,
            &self.secret_contact,
            head,
            Period::ORIGIN,
            n,
            tag,
        )
    }

    fn batch_in(
        &self,
        family: FamilyId,
        secret: &EpochSecret,
        head: Digest,
        period: Period,
        n: usize,
        tag: u64,
    ) -> Op {
        let key = secret.read_key(Period::ORIGIN);
        let sealer =
            RecordSealer::new(self.customer.id, family, 1, self.customer.id, &key, period).unwrap();
        let records: Vec<_> = (0..n)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&tag.to_be_bytes());
                id[8..].copy_from_slice(&(i as u64).to_be_bytes());
                sealer
                    .seal(
                        &mut rand::rng(),
                        RecordId(id),
                        format!("tx {tag}/{i}").as_bytes(),
                    )
                    .unwrap()
            })
            .collect();
        let batch = Batch::for_records(self.customer.device.id(), head, &records).unwrap();
        Op::WriteBatch {
            batch: SignedBatch::sign(batch, &self.customer.device.signing),
            records,
            access: None,
        }
    }

    /// An access record for a request signed by acme's device (an append at epoch 1).
    pub fn access(
        &mut self,
        grant: StatementId,
        kind: AccessKind,
        family: FamilyId,
        from: Period,
        to: Period,
        created: u64,
    ) -> AccessRecord {
        let epoch = (kind == AccessKind::Append).then_some(1);
        self.access_at(grant, kind, family, (from, to), epoch, created)
    }

    /// An access record for a request signed by acme's device, naming `epoch`.
    pub fn access_at(
        &mut self,
        grant: StatementId,
        kind: AccessKind,
        family: FamilyId,
        (from, to): (Period, Period),
        epoch: Option<u64>,
        created: u64,
    ) -> AccessRecord {
        self.nonce += 1;
        let keyid = self.acme.device.id().to_hex();
        let target = cmr_log::entry::access_target(
            &self.customer.id,
            &family,
            kind,
            &grant,
            epoch,
            from,
            to,
        );
        let req = Request::new("POST", "https", "vault.example", &target, vec![]);
        let h = httpsig::sign_request(
            &req,
            b"{}",
            &self.acme.device.signing,
            &keyid,
            &format!("n{}", self.nonce),
            created as i64,
        )
        .unwrap();
        let parsed = httpsig::parse_signatures(&h.signature_input, &h.signature).unwrap();
        let with_digest = Request::new(
            "POST",
            "https",
            "vault.example",
            &target,
            vec![("content-digest", h.content_digest.as_str())],
        );
        AccessRecord {
            grant,
            kind,
            epoch,
            families: vec![AccessedFamily { family, from, to }],
            records: vec![],
            keyid,
            signature_base: httpsig::signature_base(&with_digest, &parsed[0].params).unwrap(),
            signature: parsed[0].signature.clone().try_into().unwrap(),
            head: None,
        }
    }

    /// A read-only grant to acme on the transactions family at `epoch`, answering no request (`purpose`
    /// makes it another grant than the others), not yet logged.
    pub fn read_grant(&self, purpose: &str, epoch: u64) -> SignedStatement {
        let g = Grant {
            grantee: self.acme.id,
            request: None,
            purpose: purpose.into(),
            duration: Duration::Persistent,
            not_before: T0,
            expires: None,
            lookback_start: p(2025, 1),
            window_months: None,
            scopes: vec![(Scope::Transactions, Access::Read)],
            families: vec![GrantFamily {
                family: self.tx,
                scope: Scope::Transactions,
                epoch,
                access: Access::Read,
            }],
            append_family: None,
            grantee_kem: self.acme.kem.public_key(),
        };
        self.signed_grant(
            g,
            vec![BundleEntry {
                family: self.tx,
                epoch,
                key: self.secret_tx.read_key(p(2025, 1)),
            }],
        )
    }

    /// Acme's append of `n` records in `period` of the transactions family under `grant`, sealed to
    /// `epoch`, extending `head`.
    pub fn acme_append(
        &mut self,
        grant: StatementId,
        head: Digest,
        period: Period,
        epoch: u64,
        tag: u64,
    ) -> Op {
        let key = self.secret_tx.append_key(&self.acme.id, period);
        let sealer =
            RecordSealer::new(self.customer.id, self.tx, epoch, self.acme.id, &key, period)
                .unwrap();
        let mut id = [0xac; 16];
        id[..8].copy_from_slice(&tag.to_be_bytes());
        let record = sealer
            .seal(&mut rand::rng(), RecordId(id), b"invoice")
            .unwrap();
        let batch =
            Batch::for_records(self.acme.device.id(), head, std::slice::from_ref(&record)).unwrap();
        let access = self.access_at(
            grant,
            AccessKind::Append,
            self.tx,
            (period, period),
            Some(epoch),
            T0,
        );
        Op::WriteBatch {
            batch: SignedBatch::sign(batch, &self.acme.device.signing),
            records: vec![record],
            access: Some(access),
        }
    }

    /// The customer reads one of its own families over `periods` (no grant, nothing logged).
    pub fn own_read(&self, family: FamilyId, periods: (Period, Period)) -> Op {
        Op::Read {
            customer: self.customer.id,
            family,
            periods,
            cursor: None,
            limit: 100,
            access: None,
        }
    }

    /// Acme reads `tx` from `from` to 2026-12 under `grant`, with a request signed at `created`.
    pub fn read(&mut self, grant: StatementId, from: Period, created: u64) -> Op {
        let access = self.access(grant, AccessKind::Read, self.tx, from, p(2026, 12), created);
        Op::Read {
            customer: self.customer.id,
            family: self.tx,
            periods: (from, p(2026, 12)),
            cursor: None,
            limit: 1000,
            access: Some(access),
        }
    }
}
