//! The auditor, as a library.
//!
//! It starts from the last checkpoint it verified (or from nothing), fetches checkpoints, leaf commitments
//! and the bodies it may read through a [`LogSource`], and checks, without trusting the operator:
//! - each checkpoint's signature under the pinned log key, and that it extends the previous one (the
//!   auditor recomputes the root from every leaf, so a rollback, a fork or a rewritten, dropped or
//!   reordered leaf is caught, with both checkpoints as evidence);
//! - each body against its commitment, server times that never decrease, and every entry about a customer
//!   on that customer's chain;
//! - every signature, with devices chained to the identity key current at that position and not revoked;
//! - every consent statement, by folding it into the customer's consent state;
//! - every access, by replaying `evaluate` at its position, and every (keyid, nonce) for repeats.
//!
//! Its state stays in memory between runs, so a run costs O(new entries + log n).

use std::collections::{BTreeMap, HashMap, HashSet};

use cmr_core::batch::SignedBatch;
use cmr_core::consent::SignedStatement;
use cmr_core::decision::{AccessAttempt, ConsentState};
use cmr_core::directory::SignedDirectory;
use cmr_core::hash::{Digest, tagged_hash};
use cmr_core::httpsig;
use cmr_core::identity::{
    DeviceCertificate, DeviceId, DeviceRevocation, IdentityId, IdentityState, KeyHistory, Role,
    Signed, SignedKeyEvent,
};
use cmr_core::keys::Signature;
use cmr_core::merkle::{Hash, empty_root, node_hash};
use thiserror::Error;

use crate::checkpoint::{self, Checkpoint};
use crate::entry::{
    AccessRecord, ChainLink, EntryBody, EntryKind, SaltedBody, commitment, commitment_leaf,
};
use crate::note::NoteVerifier;

/// Where the auditor reads the log from.
pub trait LogSource {
    /// The source's error.
    type Error: std::fmt::Display;
    /// The latest signed checkpoint.
    fn checkpoint(&mut self) -> Result<String, Self::Error>;
    /// The leaf commitments `from..to`.
    fn commitments(&mut self, from: u64, to: u64) -> Result<Vec<Digest>, Self::Error>;
    /// The salt and body of entry `index`, or `None` if it was erased (redacted).
    fn body(&mut self, index: u64) -> Result<Option<SaltedBody>, Self::Error>;
}

/// The auditor could not run (the source failed). Violations are not errors: they are in the report.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("log source failed: {0}")]
pub struct SourceError(pub String);

/// What went wrong, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The checkpoint is not signed by the pinned log key, or is malformed.
    BadCheckpoint(String),
    /// A checkpoint smaller than one already verified.
    Rollback {
        /// The checkpoint verified before.
        previous: String,
        /// The smaller one.
        current: String,
    },
    /// Two checkpoints that cannot both be true: same size and different roots, or a larger one whose
    /// leaves do not extend the verified one.
    Fork {
        /// The checkpoint verified before.
        previous: String,
        /// The conflicting one.
        current: String,
    },
    /// The leaves served do not lead to the checkpoint's root: an entry was dropped, reordered or edited.
    RootMismatch {
        /// The checkpoint.
        checkpoint: String,
    },
    /// A body that does not match its commitment.
    CommitmentMismatch(u64),
    /// A body that does not parse.
    Malformed(u64, String),
    /// A server time earlier than the previous entry's.
    TimeWentBackwards(u64),
    /// An entry about a customer that does not extend that customer's chain.
    BrokenChain(u64),
    /// A statement whose signature or signer is not valid at its position.
    BadSignature(u64, String),
    /// A statement the consent state refuses (a forged revocation, a grant after a block, …).
    RefusedStatement(u64, String),
    /// An access that no grant allowed at its position.
    AccessDenied(u64, String),
    /// A (keyid, nonce) seen before.
    ReplayedNonce(u64, String),
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The tree size verified up to.
    pub size: u64,
    /// Entries checked in this run, by kind.
    pub counts: BTreeMap<&'static str, u64>,
    /// Entries that were erased (their bodies and salts deleted).
    pub redacted: Vec<u64>,
    /// Everything wrong, in log order.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether the log verified with no violation.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// An append-only tree kept as its perfect subtrees: enough to extend the root without the old leaves.
#[derive(Debug, Clone, Default)]
struct CompactRange {
    size: u64,
    subtrees: Vec<(u64, Hash)>,
}

impl CompactRange {
    fn push(&mut self, leaf: Hash) {
        let mut node = (1u64, leaf);
        while let Some(&(size, left)) = self.subtrees.last() {
            if size != node.0 {
                break;
            }
            self.subtrees.pop();
            node = (size * 2, node_hash(&left, &node.1));
        }
        self.subtrees.push(node);
        self.size += 1;
    }

    fn root(&self) -> Hash {
        let mut it = self.subtrees.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// The auditor's state between runs.
#[derive(Debug, Clone)]
pub struct Auditor {
    log_key: NoteVerifier,
    verified: Option<(Checkpoint, String)>,
    range: CompactRange,
    last_time: u64,
    identities: HashMap<IdentityId, IdentityState>,
    consent: HashMap<IdentityId, ConsentState>,
    chains: HashMap<IdentityId, ChainLink>,
    redacted: HashSet<u64>,
    nonces: HashSet<Digest>,
}

impl Auditor {
    /// An auditor that has verified nothing yet, pinned to the log's key.
    pub fn new(log_key: NoteVerifier) -> Self {
        Self {
            log_key,
            verified: None,
            range: CompactRange::default(),
            last_time: 0,
            identities: HashMap::new(),
            consent: HashMap::new(),
            chains: HashMap::new(),
            redacted: HashSet::new(),
            nonces: HashSet::new(),
        }
    }

    /// The checkpoint verified last.
    pub fn verified(&self) -> Option<&Checkpoint> {
        self.verified.as_ref().map(|(c, _)| c)
    }

    /// Fetches the latest checkpoint and checks every entry added since the last run.
    pub fn run<S: LogSource>(&mut self, source: &mut S) -> Result<Report, SourceError> {
        let err = |e: S::Error| SourceError(e.to_string());
        let note = source.checkpoint().map_err(err)?;
        let mut report = Report {
            size: self.range.size,
            ..Report::default()
        };
        let cp = match checkpoint::open(&note, &self.log_key, &[], 0) {
            Ok(v) => v.checkpoint,
            Err(e) => {
                report
                    .violations
                    .push(Violation::BadCheckpoint(e.to_string()));
                return Ok(report);
            }
        };
        if let Some((prev, prev_note)) = &self.verified {
            if cp.size < prev.size {
                report.violations.push(Violation::Rollback {
                    previous: prev_note.clone(),
                    current: note,
                });
                return Ok(report);
            }
            if cp.size == prev.size {
                if cp.root != prev.root {
                    report.violations.push(Violation::Fork {
                        previous: prev_note.clone(),
                        current: note,
                    });
                }
                return Ok(report);
            }
        }
        let from = self.range.size;
        let commitments = source.commitments(from, cp.size).map_err(err)?;
        if commitments.len() as u64 != cp.size - from {
            report
                .violations
                .push(Violation::RootMismatch { checkpoint: note });
            return Ok(report);
        }
        // Recompute the root before trusting any body: if the leaves do not lead to the signed root, the
        // log (or this view of it) was rewritten.
        let mut range = self.range.clone();
        for c in &commitments {
            range.push(commitment_leaf(c));
        }
        if range.root() != cp.root {
            let violation = match &self.verified {
                Some((_, prev_note)) => Violation::Fork {
                    previous: prev_note.clone(),
                    current: note,
                },
                None => Violation::RootMismatch { checkpoint: note },
            };
            report.violations.push(violation);
            return Ok(report);
        }
        for (i, c) in commitments.iter().enumerate() {
            let index = from + i as u64;
            match source.body(index).map_err(err)? {
                None => {
                    self.redacted.insert(index);
                    report.redacted.push(index);
                }
                Some(b) => self.check_entry(index, c, &b.salt, &b.body, &mut report),
            }
        }
        self.range = range;
        report.size = cp.size;
        self.verified = Some((cp, note));
        Ok(report)
    }

    fn check_entry(
        &mut self,
        index: u64,
        c: &Digest,
        salt: &[u8; 32],
        encoded: &[u8],
        report: &mut Report,
    ) {
        if commitment(salt, encoded) != *c {
            report.violations.push(Violation::CommitmentMismatch(index));
            return;
        }
        let body = match EntryBody::decode(encoded) {
            Ok(b) => b,
            Err(e) => {
                report
                    .violations
                    .push(Violation::Malformed(index, e.to_string()));
                return;
            }
        };
        *report.counts.entry(body.kind.name()).or_default() += 1;
        if body.time < self.last_time {
            report.violations.push(Violation::TimeWentBackwards(index));
        }
        self.last_time = self.last_time.max(body.time);
        if let Some(customer) = body.customer {
            let expected = self.chains.get(&customer).copied();
            let on_chain = match (expected, body.prev) {
                (None, None) => true,
                (Some(e), Some(p)) => {
                    e == p || (p.index > e.index && self.redacted.contains(&p.index))
                }
                _ => false,
            };
            if !on_chain {
                report.violations.push(Violation::BrokenChain(index));
            }
            self.chains.insert(
                customer,
                ChainLink {
                    index,
                    hash: EntryBody::hash(encoded),
                },
            );
        }
        if let Err(v) = self.apply(index, &body) {
            report.violations.push(v);
        }
    }

    fn identity(&self, id: &IdentityId, index: u64) -> Result<&IdentityState, Violation> {
        self.identities
            .get(id)
            .ok_or_else(|| Violation::BadSignature(index, format!("unknown identity {id}")))
    }

    fn apply(&mut self, index: u64, body: &EntryBody) -> Result<(), Violation> {
        let bad = |e: String| Violation::BadSignature(index, e);
        let malformed = |e: String| Violation::Malformed(index, e);
        match body.kind {
            EntryKind::KeyEvent => {
                let ev =
                    SignedKeyEvent::decode(&body.payload).map_err(|e| malformed(e.to_string()))?;
                if ev.identity() != body.subject {
                    return Err(bad("key event for another identity".into()));
                }
                if ev.event().seq == 0 {
                    if self.identities.contains_key(&body.subject) {
                        return Err(bad("identity registered twice".into()));
                    }
                    let history = KeyHistory::incept(&ev, index).map_err(|e| bad(e.to_string()))?;
                    if history.role() == Role::Customer {
                        self.consent
                            .insert(history.id(), ConsentState::new(history.id()));
                    }
                    self.identities
                        .insert(history.id(), IdentityState::new(history));
                } else {
                    let state = self
                        .identities
                        .get_mut(&body.subject)
                        .ok_or_else(|| bad("rotation of an unknown identity".into()))?;
                    state.rotate(&ev, index).map_err(|e| bad(e.to_string()))?;
                }
            }
            EntryKind::DeviceCertificate => {
                let cert = Signed::<DeviceCertificate>::decode(&body.payload)
                    .map_err(|e| malformed(e.to_string()))?;
                let state = self
                    .identities
                    .get_mut(&cert.body().identity)
                    .ok_or_else(|| bad("certificate for an unknown identity".into()))?;
                state
                    .certify(&cert, index)
                    .map_err(|e| bad(e.to_string()))?;
            }
            EntryKind::DeviceRevocation => {
                let rev = Signed::<DeviceRevocation>::decode(&body.payload)
                    .map_err(|e| malformed(e.to_string()))?;
                let id = rev.body().identity;
                let state = self
                    .identities
                    .get_mut(&id)
                    .ok_or_else(|| bad("revocation for an unknown identity".into()))?;
                state.revoke(&rev, index).map_err(|e| bad(e.to_string()))?;
                if let Some(consent) = self.consent.get_mut(&id) {
                    consent
                        .device_revoked(index, body.time)
                        .map_err(|e| Violation::RefusedStatement(index, e.to_string()))?;
                }
            }
            EntryKind::Directory => {
                let dir =
                    SignedDirectory::decode(&body.payload).map_err(|e| malformed(e.to_string()))?;
                let customer = dir.directory().customer;
                dir.verify(self.identity(&customer, index)?, index)
                    .map_err(|e| bad(e.to_string()))?;
                if let Some(consent) = self.consent.get_mut(&customer) {
                    for f in &dir.directory().families {
                        consent.declare_family(f.family, f.scope, f.epoch);
                    }
                }
            }
            EntryKind::FamilyHead => {
                let batch =
                    SignedBatch::decode(&body.payload).map_err(|e| malformed(e.to_string()))?;
                let b = batch.batch();
                let author = self.identity(&b.author, index)?;
                author
                    .verify_device_signature(
                        &b.device,
                        index,
                        &batch.envelope().body,
                        &batch.envelope().signature,
                    )
                    .map_err(|e| bad(e.to_string()))?;
            }
            EntryKind::Statement => {
                let st =
                    SignedStatement::decode(&body.payload).map_err(|e| malformed(e.to_string()))?;
                let author = st.statement().author;
                st.verify(self.identity(&author, index)?, index)
                    .map_err(|e| bad(e.to_string()))?;
                let customer = st.statement().customer;
                if body.customer != Some(customer) {
                    return Err(malformed("statement filed under another customer".into()));
                }
                let consent = self
                    .consent
                    .get_mut(&customer)
                    .ok_or_else(|| malformed("statement about an unknown customer".into()))?;
                consent
                    .apply(&st, index, body.time)
                    .map_err(|e| Violation::RefusedStatement(index, e.to_string()))?;
            }
            EntryKind::Access => self.check_access(index, body)?,
        }
        Ok(())
    }

    fn check_access(&mut self, index: u64, body: &EntryBody) -> Result<(), Violation> {
        let malformed = |e: String| Violation::Malformed(index, e);
        let rec = AccessRecord::decode(&body.payload).map_err(|e| malformed(e.to_string()))?;
        let customer = body
            .customer
            .ok_or_else(|| malformed("access about no customer".into()))?;
        // The request signature: by a device of the company, valid at this position.
        let device = cmr_core::hash::Digest::from_hex(&rec.keyid)
            .map(|d| DeviceId(d.0))
            .ok_or_else(|| malformed("keyid is not a device id".into()))?;
        let company = self.identity(&body.subject, index)?;
        company
            .verify_device_signature(
                &device,
                index,
                rec.signature_base.as_bytes(),
                &Signature(rec.signature),
            )
            .map_err(|e| Violation::BadSignature(index, e.to_string()))?;
        let params_line = rec
            .signature_base
            .rsplit('\n')
            .next()
            .and_then(|l| l.strip_prefix("\"@signature-params\": "))
            .ok_or_else(|| malformed("signature base has no @signature-params line".into()))?;
        let parsed = httpsig::parse_signatures(&format!("cmr={params_line}"), "cmr=:AAAA:")
            .map_err(|e| malformed(e.to_string()))?;
        let params = &parsed[0].params;
        let nonce = params.nonce().ok().flatten().unwrap_or_default();
        let created = params.created().ok().flatten().unwrap_or_default();
        if params.keyid().ok().flatten() != Some(rec.keyid.as_str()) {
            return Err(malformed("keyid differs from the signed one".into()));
        }
        let t = body.time as i64;
        if created < t - httpsig::MAX_AGE || created > t + httpsig::MAX_FUTURE {
            return Err(Violation::AccessDenied(
                index,
                format!("created {created} is outside the window at {t}"),
            ));
        }
        let key = tagged_hash("nonce", format!("{}\n{}", rec.keyid, nonce).as_bytes());
        if !self.nonces.insert(key) {
            return Err(Violation::ReplayedNonce(
                index,
                format!("{} {}", rec.keyid, nonce),
            ));
        }
        // Replay the decision at this position and time.
        let consent = self
            .consent
            .get_mut(&customer)
            .ok_or_else(|| malformed("access to an unknown customer".into()))?;
        let from = rec.families.iter().map(|f| f.from).min();
        let to = rec.families.iter().map(|f| f.to).max();
        let (Some(from), Some(to)) = (from, to) else {
            return Err(malformed("access to no family".into()));
        };
        let attempt = AccessAttempt {
            company: body.subject,
            grant: rec.grant,
            kind: rec.kind,
            families: rec.families.iter().map(|f| f.family).collect(),
            periods: (from, to),
            epoch: rec.epoch,
        };
        match consent.record_access(&attempt, index, body.time) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(reason)) => Err(Violation::AccessDenied(index, reason.code().to_string())),
            Err(e) => Err(Violation::RefusedStatement(index, e.to_string())),
        }
    }
}
