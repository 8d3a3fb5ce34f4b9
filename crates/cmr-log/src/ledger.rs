//! The vault's rules, once: a pure state machine over the log's entries.
//!
//! Every party that follows the log applies entries through [`Ledger::apply`]: the store's sequencer
//! (to decide an operation before it is logged), the store's replay when it opens, the auditor, and the
//! SDK (an identity's key events, before it trusts a key). The rules for identities, devices, key
//! directories, consent statements, accesses and auditor admissions live here and nowhere else; a new
//! statement kind is added to [`Parsed`], to [`Ledger::header`] and to [`Ledger::apply`], with its
//! tests.
//!
//! What it owns: the state those rules need (identities and their devices, each customer's consent
//! state and directory version, the auditors' standing, which identity owns each device), read and
//! changed only through [`LedgerState`] ([`InMemory`] holds it all; a state kept on disk loads the
//! working set [`Ledger::needs`] names for an entry, and writes back what changed); and the *header*
//! every entry must carry (its subject and the customer whose chain it joins), derived from the entry
//! itself so that no caller chooses it.
//!
//! What it does not own: the family ledgers of sealed records (the store holds the records; the auditor
//! never sees them), the Merkle tree, the customer chains' links, and the freshness checks of a request
//! signature (nonce, `created` window), which the server checks live and the auditor again afterwards.
//! No I/O, no clock: the caller gives each entry's position and time.

use cmr_core::problem::Code;
use std::collections::HashMap;

use cmr_core::batch::SignedBatch;
use cmr_core::consent::{Body, SignedStatement, StatementError};
use cmr_core::decision::{
    AccessAttempt, AccessKind, Allowed, ApplyError, ConsentState, DenyReason,
};
use cmr_core::directory::{DirectoryError, SignedDirectory};
use cmr_core::encoding::DecodeError;
use cmr_core::family::{FamilyId, Period};
use cmr_core::hash::Digest;
use cmr_core::identity::{
    DeviceCertificate, DeviceId, DeviceRevocation, IdentityError, IdentityId, IdentityState,
    KeyHistory, Role, Signed, SignedKeyEvent,
};
use cmr_core::keys::{Signature, SignedEnvelope, VerifyingKey};
use thiserror::Error;

use crate::admission::{Admission, AdmissionError, Auditors};
use crate::entry::{AccessRecord, EntryBody, EntryKind};
use crate::note::NoteVerifier;

/// An entry's payload, decoded once at the edge. Signatures inside it are not checked by decoding
/// (except an admission's, which is opened under the log key).
#[derive(Debug, Clone)]
pub enum Parsed {
    /// An identity's inception or key rotation.
    KeyEvent(SignedKeyEvent),
    /// A device certified by its identity key.
    Certificate(Signed<DeviceCertificate>),
    /// A device revoked by its identity key.
    Revocation(Signed<DeviceRevocation>),
    /// A customer's key directory.
    Directory(SignedDirectory),
    /// A consent statement.
    Statement(SignedStatement),
    /// A signed batch: the family-head entry.
    FamilyHead(SignedBatch),
    /// A company's read or append, with its signed request.
    Access(AccessRecord),
    /// The operator admits or dismisses an auditor.
    Admission(Admission),
}

impl Parsed {
    /// Decodes the payload of an entry of `kind`; an admission is opened under `log_key`.
    pub fn decode(
        kind: EntryKind,
        payload: &[u8],
        log_key: &NoteVerifier,
    ) -> Result<Self, Refusal> {
        match kind {
            EntryKind::Admission => {
                let note = std::str::from_utf8(payload)
                    .map_err(|_| Refusal::Admission(AdmissionError::Malformed("not text")))?;
                Ok(Parsed::Admission(
                    Admission::open(note, log_key).map_err(Refusal::Admission)?,
                ))
            }
            _ => Self::decode_signed(kind, payload),
        }
    }

    /// Decodes the payload of an entry of any kind but an admission (which needs the log key): what a
    /// party that follows identities and vaults, not the operator's statements, reads.
    pub fn decode_signed(kind: EntryKind, payload: &[u8]) -> Result<Self, Refusal> {
        let d = |e: DecodeError| Refusal::Decode(kind, e);
        Ok(match kind {
            EntryKind::KeyEvent => Parsed::KeyEvent(SignedKeyEvent::decode(payload).map_err(d)?),
            EntryKind::DeviceCertificate => {
                Parsed::Certificate(Signed::<DeviceCertificate>::decode(payload).map_err(d)?)
            }
            EntryKind::DeviceRevocation => {
                Parsed::Revocation(Signed::<DeviceRevocation>::decode(payload).map_err(d)?)
            }
            EntryKind::Directory => Parsed::Directory(SignedDirectory::decode(payload).map_err(d)?),
            EntryKind::Statement => {
                Parsed::Statement(SignedStatement::decode(payload).map_err(|e| match e {
                    StatementError::Decode(e) => d(e),
                    other => Refusal::Statement(other),
                })?)
            }
            EntryKind::FamilyHead => Parsed::FamilyHead(SignedBatch::decode(payload).map_err(d)?),
            EntryKind::Access => Parsed::Access(AccessRecord::decode(payload).map_err(d)?),
            EntryKind::Admission => {
                return Err(Refusal::Admission(AdmissionError::Malformed(
                    "an admission is opened with the log key",
                )));
            }
        })
    }

    /// The entry kind it is logged as.
    pub fn kind(&self) -> EntryKind {
        match self {
            Parsed::KeyEvent(_) => EntryKind::KeyEvent,
            Parsed::Certificate(_) => EntryKind::DeviceCertificate,
            Parsed::Revocation(_) => EntryKind::DeviceRevocation,
            Parsed::Directory(_) => EntryKind::Directory,
            Parsed::Statement(_) => EntryKind::Statement,
            Parsed::FamilyHead(_) => EntryKind::FamilyHead,
            Parsed::Access(_) => EntryKind::Access,
            Parsed::Admission(_) => EntryKind::Admission,
        }
    }
}

/// The part of an entry body that the rules fix: whose entry it is and which customer's chain it joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The identity whose statement or access it is.
    pub subject: IdentityId,
    /// The customer whose chain it joins, if any.
    pub customer: Option<IdentityId>,
}

impl Header {
    /// The header an entry body claims.
    pub fn of(body: &EntryBody) -> Self {
        Self {
            subject: body.subject,
            customer: body.customer,
        }
    }
}

/// Whether the caller still needs the ledger to check the signatures of statements, batches and
/// accesses. Identity events and directories are always checked: they change which keys are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signatures {
    /// Check every signature (the sequencer, before logging).
    Verify,
    /// The caller checked them already, against [`Ledger::signing_key`] (the auditor, in batches), or
    /// they were checked when the entry was logged (the store's replay).
    Checked,
}

/// Why the rules refuse an entry. The sequencer answers it as a refusal that changes nothing; the store's
/// replay treats it as damage; the auditor reports it as a violation. Each has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The payload does not decode.
    #[error("a {kind} does not decode: {error}", kind = .0.name(), error = .1)]
    Decode(EntryKind, DecodeError),
    /// The entry's subject or customer is not the one its payload fixes.
    #[error("the entry's {0} is not the one its payload names")]
    Header(&'static str),
    /// An identity is registered twice.
    #[error("identity {0} is already registered")]
    AlreadyRegistered(IdentityId),
    /// An identity (author, signer, customer) the log does not know.
    #[error("unknown identity {0}")]
    UnknownIdentity(IdentityId),
    /// A customer vault the log does not know (or an identity that is not a customer).
    #[error("unknown customer {0}")]
    UnknownCustomer(IdentityId),
    /// A family the customer's directory never declared.
    #[error("the family is not declared in the customer's directory")]
    UnknownFamily,
    /// A key event, certificate or revocation refused, or a signer not valid at the position.
    #[error("{0}")]
    Identity(IdentityError),
    /// A statement refused before its consent rule (wrong author, bundle rules).
    #[error("{0}")]
    Statement(StatementError),
    /// A directory refused (signature, customer).
    #[error("{0}")]
    Directory(DirectoryError),
    /// A directory that does not replace the current one.
    #[error("directory conflict: expected version {expected}")]
    DirectoryVersion {
        /// The version that would be accepted.
        expected: u64,
    },
    /// A signature that does not verify.
    #[error("the {0} signature does not verify")]
    BadSignature(&'static str),
    /// A device certificate for a device key another identity already certified.
    #[error("this device key belongs to identity {0}")]
    DeviceOwned(IdentityId),
    /// A consent statement the customer's consent state refuses.
    #[error("{0}")]
    Consent(ApplyError),
    /// An access the grants do not allow (or a customer's batch its own state refuses).
    #[error("denied: {0}")]
    Denied(DenyReason),
    /// An access record whose signed request says something else than the record.
    #[error("the access record is not bound to its request: {0}")]
    Unbound(String),
    /// An admission refused.
    #[error("{0}")]
    Admission(AdmissionError),
}

impl Refusal {
    /// The stable code, as problem details and audit reports name it.
    pub fn code(&self) -> Code {
        match self {
            Refusal::Decode(..) => Code::Malformed,
            Refusal::Header(_) => Code::WrongHeader,
            Refusal::AlreadyRegistered(_) => Code::AlreadyRegistered,
            Refusal::UnknownIdentity(_) => Code::UnknownIdentity,
            Refusal::UnknownCustomer(_) => Code::UnknownCustomer,
            Refusal::UnknownFamily => Code::UnknownFamily,
            Refusal::Identity(_) | Refusal::BadSignature(_) | Refusal::DeviceOwned(_) => {
                Code::BadSignature
            }
            Refusal::Statement(StatementError::Signature(_) | StatementError::WrongAuthor) => {
                Code::BadSignature
            }
            Refusal::Statement(_) => Code::Malformed,
            Refusal::Directory(DirectoryError::Signature(_)) => Code::BadSignature,
            Refusal::Directory(_) => Code::Malformed,
            Refusal::DirectoryVersion { .. } => Code::DirectoryConflict,
            Refusal::Consent(e) => match e {
                ApplyError::Blocked => Code::Blocked,
                ApplyError::TooManyRequests { .. } | ApplyError::DailyCapReached { .. } => {
                    Code::TooManyRequests
                }
                ApplyError::NotAccepted => Code::RequestsNotAccepted,
                ApplyError::StaleEpoch { .. } => Code::StaleEpoch,
                _ => Code::Refused,
            },
            Refusal::Denied(d) => d.code(),
            Refusal::Unbound(_) => Code::UnboundAccess,
            Refusal::Admission(AdmissionError::Malformed(_)) => Code::Malformed,
            Refusal::Admission(AdmissionError::NotSigned) => Code::BadSignature,
            Refusal::Admission(_) => Code::Refused,
        }
    }
}

/// An access [`Ledger::decide`] allowed, to be recorded by [`Ledger::record`] once what it serves is
/// gathered.
#[derive(Debug, Clone)]
pub struct Decided {
    header: Header,
    attempt: AccessAttempt,
    allowed: Allowed,
    position: u64,
    time: u64,
}

impl Decided {
    /// The entry's header: the company that signed, and the vault.
    pub fn header(&self) -> Header {
        self.header
    }

    /// What the signed request asked for.
    pub fn attempt(&self) -> &AccessAttempt {
        &self.attempt
    }

    /// What may be served or written.
    pub fn allowed(&self) -> &Allowed {
        &self.allowed
    }

    /// The log position it was decided for: the access must be logged there.
    pub fn position(&self) -> u64 {
        self.position
    }
}

/// What applying an entry changed, for the caller's own indexes (published keys, family storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An identity was registered.
    Registered(IdentityId),
    /// An identity key rotated; devices certified under an earlier key no longer sign.
    Rotated(IdentityId),
    /// A device was certified.
    Certified(IdentityId, DeviceId),
    /// A device was revoked.
    Revoked(IdentityId, DeviceId),
    /// A customer's directory replaced the previous one.
    Directory(IdentityId),
    /// A statement was applied; for an erasure, what it erased.
    Statement(Option<cmr_core::consent::ErasureTarget>),
    /// A batch was accepted.
    FamilyHead,
    /// An access was allowed and recorded.
    Access(Allowed),
    /// An auditor's standing changed.
    Admission(Admission),
}

/// Where the rules' state lives: the ledger reads and changes it only through this, as the log's tree
/// is read through its `NodeStore`. The ledger does no I/O: an implementation that keeps the state on
/// disk loads what an entry needs ([`Ledger::needs`]) into memory before the entry is applied, and writes
/// back what it changed afterwards; [`InMemory`] holds it all. Every method answers for the working set
/// the caller prepared; asking for anything else is a bug in [`Ledger::needs`], which the tests check
/// with a working set that holds nothing more.
pub trait LedgerState {
    /// An identity's state.
    fn identity(&self, id: &IdentityId) -> Option<&IdentityState>;
    /// An identity's state, to change it.
    fn identity_mut(&mut self, id: &IdentityId) -> Option<&mut IdentityState>;
    /// Sets an identity's state.
    fn put_identity(&mut self, id: IdentityId, state: IdentityState);
    /// A customer's consent state.
    fn consent(&self, customer: &IdentityId) -> Option<&ConsentState>;
    /// A customer's consent state, to change it.
    fn consent_mut(&mut self, customer: &IdentityId) -> Option<&mut ConsentState>;
    /// Sets a customer's consent state.
    fn put_consent(&mut self, customer: IdentityId, state: ConsentState);
    /// A customer's directory version and digest.
    fn directory(&self, customer: &IdentityId) -> Option<(u64, Digest)>;
    /// Sets a customer's directory version and digest.
    fn put_directory(&mut self, customer: IdentityId, version: u64, digest: Digest);
    /// The identity that certified a device key.
    fn device_owner(&self, device: &DeviceId) -> Option<IdentityId>;
    /// Records the identity that certified a device key.
    fn put_device_owner(&mut self, device: DeviceId, owner: IdentityId);
    /// The auditors' standing (one small value for the whole log).
    fn auditors(&self) -> &Auditors;
    /// The auditors' standing, to change it.
    fn auditors_mut(&mut self) -> &mut Auditors;
}

/// The whole state in memory: what the SDK, the auditor and the embedded store use.
#[derive(Debug, Clone, Default)]
pub struct InMemory {
    identities: HashMap<IdentityId, IdentityState>,
    consent: HashMap<IdentityId, ConsentState>,
    directories: HashMap<IdentityId, (u64, Digest)>,
    auditors: Auditors,
    device_owner: HashMap<DeviceId, IdentityId>,
}

impl LedgerState for InMemory {
    fn identity(&self, id: &IdentityId) -> Option<&IdentityState> {
        self.identities.get(id)
    }
    fn identity_mut(&mut self, id: &IdentityId) -> Option<&mut IdentityState> {
        self.identities.get_mut(id)
    }
    fn put_identity(&mut self, id: IdentityId, state: IdentityState) {
        self.identities.insert(id, state);
    }
    fn consent(&self, customer: &IdentityId) -> Option<&ConsentState> {
        self.consent.get(customer)
    }
    fn consent_mut(&mut self, customer: &IdentityId) -> Option<&mut ConsentState> {
        self.consent.get_mut(customer)
    }
    fn put_consent(&mut self, customer: IdentityId, state: ConsentState) {
        self.consent.insert(customer, state);
    }
    fn directory(&self, customer: &IdentityId) -> Option<(u64, Digest)> {
        self.directories.get(customer).copied()
    }
    fn put_directory(&mut self, customer: IdentityId, version: u64, digest: Digest) {
        self.directories.insert(customer, (version, digest));
    }
    fn device_owner(&self, device: &DeviceId) -> Option<IdentityId> {
        self.device_owner.get(device).copied()
    }
    fn put_device_owner(&mut self, device: DeviceId, owner: IdentityId) {
        self.device_owner.insert(device, owner);
    }
    fn auditors(&self) -> &Auditors {
        &self.auditors
    }
    fn auditors_mut(&mut self) -> &mut Auditors {
        &mut self.auditors
    }
}

/// What applying one entry reads and changes of the state: the working set a caller whose state is not
/// all in memory loads first. The owners of `devices` are needed too (the caller looks them up, then
/// loads those identities).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// Identities whose key history and devices are read or changed.
    pub identities: Vec<IdentityId>,
    /// Customers whose consent state and directory are read or changed.
    pub customers: Vec<IdentityId>,
    /// Device keys whose owner is read, or recorded.
    pub devices: Vec<DeviceId>,
}

/// A company's batch, logged at `position`: the entry right after it must be the signed append that
/// writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Append {
    position: u64,
    author: IdentityId,
    customer: IdentityId,
    family: FamilyId,
    epoch: u64,
    periods: (Period, Period),
}

/// The rules, over their state: built by applying the log in order.
#[derive(Debug, Clone, Default)]
pub struct Ledger<S = InMemory> {
    state: S,
    /// The company batch the next entry must write, if the last entry was one.
    append: Option<Append>,
}

impl Ledger {
    /// A ledger of an empty log, in memory.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S: LedgerState> Ledger<S> {
    /// A ledger over `state` (which holds the state of the log so far).
    pub fn over(state: S) -> Self {
        Self {
            state,
            append: None,
        }
    }

    /// The state, to load or write back a working set.
    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    /// An identity's state.
    pub fn identity(&self, id: &IdentityId) -> Option<&IdentityState> {
        self.state.identity(id)
    }

    /// A customer's consent state.
    pub fn consent(&self, customer: &IdentityId) -> Option<&ConsentState> {
        self.state.consent(customer)
    }

    /// A customer's directory version and digest.
    pub fn directory(&self, customer: &IdentityId) -> Option<(u64, Digest)> {
        self.state.directory(customer)
    }

    /// The auditors' standing.
    pub fn auditors(&self) -> &Auditors {
        self.state.auditors()
    }

    /// The identity that owns a device.
    pub fn device_owner(&self, device: &DeviceId) -> Option<IdentityId> {
        self.state.device_owner(device)
    }

    /// The position of the company batch the next entry must write (its signed append), if the last
    /// entry applied was one.
    pub fn awaiting_append(&self) -> Option<u64> {
        self.append.as_ref().map(|a| a.position)
    }

    /// What applying `parsed` reads and changes of the state (see [`Needs`]).
    pub fn needs(parsed: &Parsed) -> Needs {
        let n = |identities: Vec<IdentityId>, customers: Vec<IdentityId>, devices| Needs {
            identities,
            customers,
            devices,
        };
        match parsed {
            Parsed::KeyEvent(ev) => n(vec![ev.identity()], vec![ev.identity()], vec![]),
            Parsed::Certificate(c) => {
                let id = c.body().identity;
                n(vec![id], vec![id], vec![c.body().device()])
            }
            Parsed::Revocation(r) => {
                let id = r.body().identity;
                n(vec![id], vec![id], vec![])
            }
            Parsed::Directory(d) => {
                let c = d.directory().customer;
                n(vec![c], vec![c], vec![])
            }
            Parsed::Statement(st) => {
                let s = st.statement();
                n(vec![s.author], vec![s.customer], vec![])
            }
            Parsed::FamilyHead(b) => {
                let b = b.batch();
                n(vec![b.author], vec![b.customer], vec![])
            }
            Parsed::Access(rec) => n(
                vec![],
                rec.bound_customer().into_iter().collect(),
                Digest::from_hex(&rec.keyid)
                    .map(|d| DeviceId(d.0))
                    .into_iter()
                    .collect(),
            ),
            Parsed::Admission(a) => n(vec![a.auditor], vec![], vec![]),
        }
    }

    /// The identity that owns the device named by `keyid` (a device id in hex), if that device may sign
    /// at `position`.
    pub fn signer(&self, keyid: &str, position: u64) -> Result<IdentityId, Refusal> {
        let device = Digest::from_hex(keyid)
            .map(|d| DeviceId(d.0))
            .ok_or(Refusal::Header("keyid"))?;
        let owner = self
            .state
            .device_owner(&device)
            .ok_or(Refusal::Identity(IdentityError::UnknownDevice))?;
        self.known(&owner)?
            .device_at(&device, position)
            .map_err(Refusal::Identity)?;
        Ok(owner)
    }

    fn known(&self, id: &IdentityId) -> Result<&IdentityState, Refusal> {
        self.state.identity(id).ok_or(Refusal::UnknownIdentity(*id))
    }

    fn customer_state(&self, id: &IdentityId) -> Result<&ConsentState, Refusal> {
        self.state.consent(id).ok_or(Refusal::UnknownCustomer(*id))
    }

    /// Whose chain an identity's own entries join: its own, if it is a customer.
    fn own_chain(&self, id: &IdentityId) -> Option<IdentityId> {
        self.state.consent(id).is_some().then_some(*id)
    }

    /// The header the rules fix for `parsed` at `position`: every entry's subject and customer follow
    /// from its payload and the state, never from the caller.
    pub fn header(&self, parsed: &Parsed, position: u64) -> Result<Header, Refusal> {
        let h = |subject, customer| Ok(Header { subject, customer });
        match parsed {
            Parsed::KeyEvent(ev) => {
                let id = ev.identity();
                let customer = if ev.event().seq == 0 {
                    (ev.event().role == Role::Customer).then_some(id)
                } else {
                    self.own_chain(&id)
                };
                h(id, customer)
            }
            Parsed::Certificate(c) => h(c.body().identity, self.own_chain(&c.body().identity)),
            Parsed::Revocation(r) => h(r.body().identity, self.own_chain(&r.body().identity)),
            Parsed::Directory(d) => h(d.directory().customer, Some(d.directory().customer)),
            Parsed::Statement(s) => h(s.statement().author, Some(s.statement().customer)),
            Parsed::FamilyHead(b) => h(b.batch().author, Some(b.batch().customer)),
            Parsed::Access(rec) => {
                let customer = rec
                    .bound_customer()
                    .ok_or_else(|| Refusal::Unbound("the signed request names no vault".into()))?;
                h(self.signer(&rec.keyid, position)?, Some(customer))
            }
            Parsed::Admission(a) => h(a.auditor, None),
        }
    }

    /// The key that must have signed a statement, batch or access logged at `position`, and the envelope
    /// it signed: what a caller verifies in batches before [`Ledger::apply`] with
    /// [`Signatures::Checked`]. `None` for the kinds whose signatures the ledger always checks itself.
    pub fn signing_key(
        &self,
        parsed: &Parsed,
        position: u64,
    ) -> Result<Option<(SignedEnvelope, VerifyingKey)>, Refusal> {
        let device_key = |author: &IdentityId, device: &DeviceId| {
            self.known(author)?
                .device_at(device, position)
                .map(|c| c.signing_key)
                .map_err(Refusal::Identity)
        };
        Ok(match parsed {
            Parsed::Statement(st) => {
                let s = st.statement();
                Some((st.envelope().clone(), device_key(&s.author, &s.device)?))
            }
            Parsed::FamilyHead(b) => {
                let batch = b.batch();
                Some((
                    b.envelope().clone(),
                    device_key(&batch.author, &batch.device)?,
                ))
            }
            Parsed::Access(rec) => {
                let device = Digest::from_hex(&rec.keyid)
                    .map(|d| DeviceId(d.0))
                    .ok_or(Refusal::Header("keyid"))?;
                let owner = self.signer(&rec.keyid, position)?;
                Some((
                    SignedEnvelope {
                        body: rec.signature_base.clone().into_bytes(),
                        signature: Signature(rec.signature),
                    },
                    device_key(&owner, &device)?,
                ))
            }
            _ => None,
        })
    }

    /// Decides an access logged at `position` without recording it: the check half of applying it, for
    /// a caller that must gather what it serves before the access is recorded (a one-time grant is used
    /// up only by an access that is then logged). [`Ledger::record`] is the other half.
    pub fn decide(&self, rec: &AccessRecord, position: u64, time: u64) -> Result<Decided, Refusal> {
        let company = self.signer(&rec.keyid, position)?;
        let customer = rec
            .bound_customer()
            .ok_or_else(|| Refusal::Unbound("the signed request names no vault".into()))?;
        rec.check_binding(&customer).map_err(Refusal::Unbound)?;
        let header = Header {
            subject: company,
            customer: Some(customer),
        };
        let attempt = rec
            .attempt(company)
            .ok_or(Refusal::Denied(DenyReason::Malformed(
                "an access to no family",
            )))?;
        self.check_append(&attempt, &header, position)?;
        let allowed = self
            .customer_state(&customer)?
            .evaluate(&attempt, position, time)
            .map_err(Refusal::Denied)?;
        Ok(Decided {
            header,
            attempt,
            allowed,
            position,
            time,
        })
    }

    /// Records an access [`Ledger::decide`] allowed, at the position and time it was decided for (a
    /// one-time grant's first read uses it up). The consent state decides once more as it records, so
    /// a change in between cannot slip through. (`record_access` notes the position even when it denies;
    /// this stays all-or-nothing because `decide` has just allowed the same attempt on the same state.)
    pub fn record(&mut self, d: Decided) -> Result<Allowed, Refusal> {
        let customer = d.header.customer.ok_or(Refusal::Header("customer"))?;
        let allowed = self
            .state
            .consent_mut(&customer)
            .ok_or(Refusal::UnknownCustomer(customer))?
            .record_access(&d.attempt, d.position, d.time)
            .map_err(Refusal::Consent)?
            .map_err(Refusal::Denied);
        if allowed.is_ok() {
            self.append = None;
        }
        allowed
    }

    /// The company batch an entry at `position` must write: the one logged right before it, if any.
    fn append_before(&self, position: u64) -> Option<&Append> {
        self.append
            .as_ref()
            .filter(|a| a.position.checked_add(1) == Some(position))
    }

    /// A company writes only through a signed append logged right after its batch, naming it: the same
    /// company, vault, family and epoch, and periods that cover the batch's. Without this an operator
    /// could log records no request asked for, or a request's consent could be spent on another batch.
    fn check_append(
        &self,
        attempt: &AccessAttempt,
        header: &Header,
        position: u64,
    ) -> Result<(), Refusal> {
        let unbound = |why: &str| Err(Refusal::Unbound(why.into()));
        match (attempt.kind, self.append_before(position)) {
            (AccessKind::Append, Some(b)) => {
                if header.subject != b.author {
                    return unbound("the append is signed by another identity than its batch");
                }
                if header.customer != Some(b.customer)
                    || attempt.families != [b.family]
                    || attempt.epoch != Some(b.epoch)
                    || b.periods.0 < attempt.periods.0
                    || attempt.periods.1 < b.periods.1
                {
                    return unbound("the signed append does not name the batch before it");
                }
                Ok(())
            }
            (AccessKind::Append, None) => {
                unbound("an append is logged right after the batch it writes")
            }
            (_, Some(_)) => {
                unbound("a company's batch is followed by the signed append that writes it")
            }
            (_, None) => Ok(()),
        }
    }

    /// Checks a customer's own batch against its consent state: not to an erased family, not while a
    /// rotation of it is pending, and sealed to its current epoch. A company's batch is decided by the
    /// signed append that must be logged right after it ([`Ledger::decide`], `check_append`).
    fn check_own_batch(&self, b: &SignedBatch, time: u64) -> Result<(), Refusal> {
        let b = b.batch();
        let consent = self.customer_state(&b.customer)?;
        let current = consent.epoch(&b.family).ok_or(Refusal::UnknownFamily)?;
        if b.author != b.customer {
            return Ok(());
        }
        if let Some(at) = consent.erased_at(&b.family) {
            return Err(Refusal::Denied(DenyReason::FamilyErased(at)));
        }
        if consent.rotation_pending(&b.family, time) {
            return Err(Refusal::Denied(DenyReason::RotationPending(b.family)));
        }
        if b.epoch != current {
            return Err(Refusal::Denied(DenyReason::StaleEpoch { current }));
        }
        Ok(())
    }

    /// Checks `parsed` logged at `position` with server time `time` against the rules and applies it.
    /// `claimed` is the header the entry carries, if it is already logged: it must be the one the rules
    /// fix. Everything is checked before anything changes: on a refusal the ledger is as it was.
    pub fn apply(
        &mut self,
        parsed: &Parsed,
        position: u64,
        time: u64,
        claimed: Option<Header>,
        signatures: Signatures,
    ) -> Result<(Header, Effect), Refusal> {
        let header = self.header(parsed, position)?;
        if let Some(c) = claimed {
            if c.subject != header.subject {
                return Err(Refusal::Header("subject"));
            }
            if c.customer != header.customer {
                return Err(Refusal::Header("customer"));
            }
        }
        if self.append_before(position).is_some() && !matches!(parsed, Parsed::Access(_)) {
            return Err(Refusal::Unbound(
                "a company's batch is followed by the signed append that writes it".into(),
            ));
        }
        // The signer must be valid at this position even when its signature was checked elsewhere.
        let signed = self.signing_key(parsed, position)?;
        if signatures == Signatures::Verify
            && let Some((envelope, key)) = signed
            && envelope.verify(&key).is_err()
        {
            return Err(Refusal::BadSignature(parsed.kind().name()));
        }
        let effect = match parsed {
            Parsed::KeyEvent(ev) if ev.event().seq == 0 => {
                let history = KeyHistory::incept(ev, position).map_err(Refusal::Identity)?;
                let id = history.id();
                if self.state.identity(&id).is_some() {
                    return Err(Refusal::AlreadyRegistered(id));
                }
                if history.role() == Role::Customer {
                    self.state.put_consent(id, ConsentState::new(id));
                }
                self.state.put_identity(id, IdentityState::new(history));
                Effect::Registered(id)
            }
            Parsed::KeyEvent(ev) => {
                let id = ev.identity();
                let state = self
                    .state
                    .identity_mut(&id)
                    .ok_or(Refusal::UnknownIdentity(id))?;
                state.rotate(ev, position).map_err(Refusal::Identity)?;
                Effect::Rotated(id)
            }
            Parsed::Certificate(cert) => {
                let id = cert.body().identity;
                // A device key belongs to one identity: another's certificate for it would make the
                // owner's requests authenticate (and be logged and decided) as the claimant's.
                let device = cert.body().device();
                if let Some(owner) = self.state.device_owner(&device)
                    && owner != id
                {
                    return Err(Refusal::DeviceOwned(owner));
                }
                let device = self
                    .state
                    .identity_mut(&id)
                    .ok_or(Refusal::UnknownIdentity(id))?
                    .certify(cert, position)
                    .map_err(Refusal::Identity)?;
                self.state.put_device_owner(device, id);
                Effect::Certified(id, device)
            }
            Parsed::Revocation(rev) => {
                let id = rev.body().identity;
                let mut state = self.known(&id)?.clone();
                state.revoke(rev, position).map_err(Refusal::Identity)?;
                // A customer's device held the vault key: every family is exposed.
                if let Some(consent) = self.state.consent_mut(&id) {
                    consent
                        .device_revoked(position, time)
                        .map_err(Refusal::Consent)?;
                }
                self.state.put_identity(id, state);
                Effect::Revoked(id, rev.body().device)
            }
            Parsed::Directory(dir) => {
                let d = dir.directory();
                let customer = d.customer;
                dir.verify(self.known(&customer)?, position)
                    .map_err(Refusal::Directory)?;
                self.customer_state(&customer)?;
                let current = self.state.directory(&customer);
                let follows = match current {
                    None => d.version == 1,
                    Some((v, digest)) => d.version == v + 1 && d.prev == digest,
                };
                if !follows {
                    return Err(Refusal::DirectoryVersion {
                        expected: current.map_or(1, |(v, _)| v + 1),
                    });
                }
                let consent = self
                    .state
                    .consent_mut(&customer)
                    .ok_or(Refusal::UnknownCustomer(customer))?;
                crate::consent::declare(consent, dir);
                self.state.put_directory(customer, d.version, dir.digest());
                Effect::Directory(customer)
            }
            Parsed::Statement(st) => {
                let s = st.statement();
                let consent = self
                    .state
                    .consent_mut(&s.customer)
                    .ok_or(Refusal::UnknownCustomer(s.customer))?;
                consent
                    .apply(st, position, time)
                    .map_err(Refusal::Consent)?;
                Effect::Statement(match &s.body {
                    Body::Erasure(target) => Some(*target),
                    _ => None,
                })
            }
            Parsed::FamilyHead(b) => {
                self.check_own_batch(b, time)?;
                let batch = b.batch();
                if batch.author != batch.customer {
                    let periods = batch
                        .entries
                        .iter()
                        .map(|e| e.period)
                        .fold(None, |acc: Option<(Period, Period)>, p| {
                            Some(acc.map_or((p, p), |(a, z)| (a.min(p), z.max(p))))
                        })
                        .ok_or_else(|| Refusal::Unbound("a company batch of no records".into()))?;
                    self.append = Some(Append {
                        position,
                        author: batch.author,
                        customer: batch.customer,
                        family: batch.family,
                        epoch: batch.epoch,
                        periods,
                    });
                    return Ok((header, Effect::FamilyHead));
                }
                Effect::FamilyHead
            }
            Parsed::Access(rec) => {
                let decided = self.decide(rec, position, time)?;
                Effect::Access(self.record(decided)?)
            }
            Parsed::Admission(a) => {
                let role = self.state.identity(&a.auditor).map(|s| s.keys().role());
                self.state
                    .auditors_mut()
                    .apply(a, role, position)
                    .map_err(Refusal::Admission)?;
                Effect::Admission(*a)
            }
        };
        self.append = None;
        Ok((header, effect))
    }

    /// Decodes and applies a logged entry: its header must be the one the rules fix.
    pub fn apply_logged(
        &mut self,
        index: u64,
        body: &EntryBody,
        log_key: &NoteVerifier,
        signatures: Signatures,
    ) -> Result<Effect, Refusal> {
        let parsed = Parsed::decode(body.kind, &body.payload, log_key)?;
        self.apply(
            &parsed,
            index,
            body.time,
            Some(Header::of(body)),
            signatures,
        )
        .map(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use cmr_core::consent::{Body, Statement};
    use cmr_core::directory::Directory;
    use cmr_core::identity::{DeviceKeys, NewIdentity, create_identity, revoke_device};
    use cmr_core::keys::SigningKey;

    use super::*;

    const T: u64 = 1_800_000_000;

    struct Party {
        id: NewIdentity,
        device: DeviceKeys,
    }

    impl Party {
        fn new(role: Role) -> Self {
            let mut rng = rand::rng();
            Self {
                id: create_identity(&mut rng, role),
                device: DeviceKeys::generate(&mut rng),
            }
        }

        fn identity(&self) -> IdentityId {
            self.id.inception.identity()
        }

        fn certificate(&self) -> Parsed {
            Parsed::Certificate(
                self.device
                    .certify(self.identity(), 0, &self.id.identity_key, T),
            )
        }

        fn statement(&self, customer: IdentityId, body: Body, key: &SigningKey) -> Parsed {
            let st = Statement {
                customer,
                author: self.identity(),
                device: self.device.id(),
                issued_at: T,
                body,
            };
            Parsed::Statement(SignedStatement::sign(st, None, key).expect("a valid statement"))
        }

        fn directory(&self, version: u64, prev: Digest) -> Parsed {
            Parsed::Directory(
                Directory {
                    customer: self.identity(),
                    version,
                    prev,
                    signer: self.device.id(),
                    issued_at: T,
                    devices: vec![],
                    families: vec![],
                }
                .sign(&self.device.signing),
            )
        }
    }

    /// A ledger where a customer (entries 0 and 1) and a company (2 and 3) are registered with a device.
    fn world() -> (Ledger, Party, Party) {
        let (customer, company) = (Party::new(Role::Customer), Party::new(Role::Company));
        let mut l = Ledger::new();
        let mut at = 0;
        for p in [&customer, &company] {
            for parsed in [Parsed::KeyEvent(p.id.inception.clone()), p.certificate()] {
                l.apply(&parsed, at, T, None, Signatures::Verify)
                    .expect("a registration applies");
                at += 1;
            }
        }
        (l, customer, company)
    }

    fn block(customer: &Party, company: &Party) -> Parsed {
        customer.statement(
            customer.identity(),
            Body::Block {
                company: company.identity(),
                blocked: true,
            },
            &customer.device.signing,
        )
    }

    #[test]
    fn the_header_follows_from_the_entry_and_the_state() {
        let (l, customer, company) = world();
        let c = customer.identity();
        let of = |p: &Parsed| l.header(p, 10).expect("a header");
        // A customer's own entries join its chain; a company's key events join none.
        assert_eq!(of(&customer.certificate()).customer, Some(c));
        assert_eq!(of(&company.certificate()).customer, None);
        // A customer's statement joins its own chain, under its own name.
        assert_eq!(
            of(&block(&customer, &company)),
            Header {
                subject: c,
                customer: Some(c)
            }
        );
    }

    #[test]
    fn an_entry_filed_under_another_header_is_refused_and_changes_nothing() {
        let (mut l, customer, company) = world();
        let st = block(&customer, &company);
        for (claimed, what) in [
            (
                Header {
                    subject: company.identity(),
                    customer: Some(customer.identity()),
                },
                "subject",
            ),
            (
                Header {
                    subject: customer.identity(),
                    customer: None,
                },
                "customer",
            ),
        ] {
            assert_eq!(
                l.apply(&st, 10, T, Some(claimed), Signatures::Verify)
                    .unwrap_err(),
                Refusal::Header(what)
            );
        }
        assert!(
            !l.consent(&customer.identity())
                .unwrap()
                .is_blocked(&company.identity())
        );
        // Filed honestly, it applies.
        let honest = l.header(&st, 10).unwrap();
        l.apply(&st, 10, T, Some(honest), Signatures::Verify)
            .unwrap();
        assert!(
            l.consent(&customer.identity())
                .unwrap()
                .is_blocked(&company.identity())
        );
    }

    #[test]
    fn a_forged_statement_signature_is_refused_when_the_ledger_verifies() {
        let (mut l, customer, company) = world();
        // Signed by the company's device but claiming the customer's: the key the ledger resolves is
        // the customer's device, and the signature does not verify under it.
        let forged = customer.statement(
            customer.identity(),
            Body::Block {
                company: company.identity(),
                blocked: true,
            },
            &company.device.signing,
        );
        assert_eq!(
            l.apply(&forged, 10, T, None, Signatures::Verify)
                .unwrap_err(),
            Refusal::BadSignature("statement")
        );
        assert_eq!(
            l.apply(&forged, 10, T, None, Signatures::Verify)
                .unwrap_err()
                .code(),
            Code::BadSignature
        );
        assert!(
            !l.consent(&customer.identity())
                .unwrap()
                .is_blocked(&company.identity())
        );
    }

    #[test]
    fn a_statement_by_a_device_not_valid_at_its_position_is_refused_even_when_checked_elsewhere() {
        let (mut l, customer, company) = world();
        // At position 1 the customer's device is not certified yet (its certificate is entry 1).
        let st = block(&customer, &company);
        assert!(matches!(
            l.apply(&st, 1, T, None, Signatures::Checked),
            Err(Refusal::Identity(_)) | Err(Refusal::Consent(_))
        ));
        assert!(
            !l.consent(&customer.identity())
                .unwrap()
                .is_blocked(&company.identity())
        );
    }

    #[test]
    fn an_identity_registered_twice_is_refused() {
        let (mut l, customer, _) = world();
        let again = Parsed::KeyEvent(customer.id.inception.clone());
        assert_eq!(
            l.apply(&again, 10, T, None, Signatures::Verify)
                .unwrap_err(),
            Refusal::AlreadyRegistered(customer.identity())
        );
    }

    #[test]
    fn directories_chain_version_by_version() {
        let (mut l, customer, _) = world();
        let first = customer.directory(1, Digest([0; 32]));
        assert_eq!(
            l.apply(
                &customer.directory(2, Digest([0; 32])),
                10,
                T,
                None,
                Signatures::Verify
            )
            .unwrap_err(),
            Refusal::DirectoryVersion { expected: 1 }
        );
        l.apply(&first, 10, T, None, Signatures::Verify).unwrap();
        let (v, digest) = l.directory(&customer.identity()).unwrap();
        assert_eq!(v, 1);
        // The same version again, and a next version that names another predecessor, are refused.
        for wrong in [
            customer.directory(1, Digest([0; 32])),
            customer.directory(2, Digest([7; 32])),
        ] {
            assert_eq!(
                l.apply(&wrong, 11, T, None, Signatures::Verify)
                    .unwrap_err(),
                Refusal::DirectoryVersion { expected: 2 }
            );
        }
        l.apply(
            &customer.directory(2, digest),
            11,
            T,
            None,
            Signatures::Verify,
        )
        .unwrap();
        assert_eq!(l.directory(&customer.identity()).unwrap().0, 2);
    }

    #[test]
    fn a_revoked_device_no_longer_signs() {
        let (mut l, customer, company) = world();
        let rev = Parsed::Revocation(revoke_device(
            customer.identity(),
            0,
            &customer.id.identity_key,
            customer.device.id(),
            T,
        ));
        let (_, effect) = l.apply(&rev, 10, T, None, Signatures::Verify).unwrap();
        assert_eq!(
            effect,
            Effect::Revoked(customer.identity(), customer.device.id())
        );
        let st = block(&customer, &company);
        assert!(matches!(
            l.apply(&st, 11, T, None, Signatures::Verify),
            Err(Refusal::Identity(IdentityError::DeviceRevoked(10)))
        ));
    }

    #[test]
    fn a_device_key_belongs_to_one_identity() {
        let (mut l, customer, company) = world();
        // The company certifies the customer's device key under its own identity: the customer's requests
        // would then authenticate as the company's.
        let claim = Parsed::Certificate(customer.device.certify(
            company.identity(),
            0,
            &company.id.identity_key,
            T,
        ));
        assert_eq!(
            l.apply(&claim, 10, T, None, Signatures::Verify)
                .unwrap_err(),
            Refusal::DeviceOwned(customer.identity())
        );
        assert_eq!(
            l.device_owner(&customer.device.id()),
            Some(customer.identity())
        );
        // Its owner may certify it again (after a rotation of its identity key, for one).
        assert!(
            l.apply(&customer.certificate(), 11, T, None, Signatures::Verify)
                .is_ok()
        );
    }

    #[test]
    fn refusal_codes_are_stable() {
        assert_eq!(Refusal::UnknownFamily.code(), Code::UnknownFamily);
        assert_eq!(Refusal::Consent(ApplyError::Blocked).code(), Code::Blocked);
        // A statement on a rotated-away epoch is the conflict a batch on one is: the client follows.
        assert_eq!(
            Refusal::Consent(ApplyError::StaleEpoch { current: 2 }).code(),
            Code::StaleEpoch
        );
        assert_eq!(
            Refusal::Denied(DenyReason::NoGrant).code(),
            DenyReason::NoGrant.code()
        );
        assert_eq!(
            Refusal::DirectoryVersion { expected: 3 }.code(),
            Code::DirectoryConflict
        );
    }
}
