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

use cmr_core::hash::{Digest, tagged_hash};
use cmr_core::httpsig;
use cmr_core::identity::IdentityId;
use cmr_core::keys::{SignedEnvelope, VerifyingKey, verify_many};
use cmr_core::merkle::CompactRange;
use thiserror::Error;

use crate::admission::Auditors;
use crate::checkpoint::{self, Checkpoint};
use crate::entry::{
    AccessRecord, ChainLink, EntryBody, EntryKind, SaltedBody, commitment, commitment_leaf,
};
use crate::ledger::{Effect, Header, Ledger, Parsed, Refusal, Signatures};
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
    /// An access whose signed request does not say what the access claims (another vault, family,
    /// route, grant, epoch or periods): it was not caused by such a request.
    Unbound(u64, String),
    /// A (keyid, nonce) seen before.
    ReplayedNonce(u64, String),
    /// A key-event head signed with the log key that does not match the identity's key events in the
    /// log at its size: the operator vouched for an incomplete (or altered) key history. The evidence is
    /// the signed head.
    FalseKeyHead {
        /// The signed head.
        head: String,
        /// What the log holds at that size.
        actual: String,
    },
}

/// A key-event head cannot be judged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyHeadCheckError {
    /// It does not open under the log key: it is no evidence of anything.
    #[error(transparent)]
    Unopenable(#[from] crate::keyhead::KeyHeadError),
    /// It speaks for a size this auditor has not verified yet: run again later.
    #[error("the head speaks for size {head}, and this auditor has verified up to {verified}")]
    NotYetVerified {
        /// The head's size.
        head: u64,
        /// The size verified.
        verified: u64,
    },
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

/// The auditor's state between runs.
#[derive(Debug, Clone)]
pub struct Auditor {
    log_key: NoteVerifier,
    verified: Option<(Checkpoint, String)>,
    range: CompactRange,
    last_time: u64,
    ledger: Ledger,
    chains: HashMap<IdentityId, ChainLink>,
    redacted: HashSet<u64>,
    nonces: HashSet<Digest>,
    /// The entries that built the identity and consent states, to rebuild them from a snapshot.
    journal: Vec<(u64, EntryBody)>,
    /// The company batch applied last, while its signed append has not followed yet: a snapshot carries
    /// it, so that a restored auditor judges the next entry as this one would.
    awaiting: Option<(u64, EntryBody)>,
}

impl Auditor {
    /// An auditor that has verified nothing yet, pinned to the log's key.
    pub fn new(log_key: NoteVerifier) -> Self {
        Self {
            log_key,
            verified: None,
            range: CompactRange::default(),
            last_time: 0,
            ledger: Ledger::new(),
            chains: HashMap::new(),
            redacted: HashSet::new(),
            nonces: HashSet::new(),
            journal: Vec::new(),
            awaiting: None,
        }
    }

    /// The checkpoint verified last.
    pub fn verified(&self) -> Option<&Checkpoint> {
        self.verified.as_ref().map(|(c, _)| c)
    }

    /// The auditors the operator admitted, as the log verified so far says.
    pub fn auditors(&self) -> &Auditors {
        self.ledger.auditors()
    }

    /// Judges a key-event head a client was served ([`crate::keyhead`]): recomputes the identity's
    /// key-event chain from the log at the head's size. `Ok(None)` when it is true; a
    /// [`Violation::FalseKeyHead`] when the operator signed a history that is not the log's.
    pub fn check_key_head(&self, signed: &str) -> Result<Option<Violation>, KeyHeadCheckError> {
        let head = crate::keyhead::KeyHead::open(signed, &self.log_key)?;
        let verified = self.verified().map_or(0, |c| c.size);
        if head.size > verified {
            return Err(KeyHeadCheckError::NotYetVerified {
                head: head.size,
                verified,
            });
        }
        let hashes: Vec<(u64, Digest)> = self
            .journal
            .iter()
            .filter(|(index, body)| {
                *index < head.size
                    && body.subject == head.identity
                    && crate::keyhead::is_key_event(body.kind)
            })
            .map(|(index, body)| (*index, EntryBody::hash(&body.encode())))
            .collect();
        let actual = crate::keyhead::KeyHead::over(
            head.identity,
            head.size,
            hashes.iter().map(|(i, h)| (*i, h)),
        )?;
        Ok((actual != head).then(|| Violation::FalseKeyHead {
            head: signed.to_owned(),
            actual: actual.text(),
        }))
    }

    /// Fetches the latest checkpoint and checks every entry added since the last run.
    pub fn run<S: LogSource>(&mut self, source: &mut S) -> Result<Report, SourceError> {
        let err = |e: S::Error| SourceError(e.to_string());
        let note = source.checkpoint().map_err(err)?;
        let mut report = Report {
            size: self.range.size(),
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
        let from = self.range.size();
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
        let mut segment = Vec::new();
        for (i, c) in commitments.iter().enumerate() {
            let index = from + i as u64;
            match source.body(index).map_err(err)? {
                None => {
                    self.redacted.insert(index);
                    report.redacted.push(index);
                }
                Some(b) => {
                    let Some(body) = self.check_entry(index, c, &b.salt, &b.body, &mut report)
                    else {
                        continue;
                    };
                    if is_identity_entry(body.kind) {
                        // Identity entries change which keys are valid: verify what came before first.
                        self.flush(&mut segment, &mut report);
                        match self.ledger.apply_logged(
                            index,
                            &body,
                            &self.log_key,
                            Signatures::Verify,
                        ) {
                            Ok(_) => self.journal.push((index, body)),
                            Err(r) => report.violations.push(violation(index, body.kind, r)),
                        }
                    } else {
                        segment.push((index, body));
                        if segment.len() >= SEGMENT {
                            self.flush(&mut segment, &mut report);
                        }
                    }
                }
            }
        }
        self.flush(&mut segment, &mut report);
        self.range = range;
        report.size = cp.size;
        self.verified = Some((cp, note));
        Ok(report)
    }

    /// Checks what needs no signature: commitment, format, time, chain. Returns the body to process.
    fn check_entry(
        &mut self,
        index: u64,
        c: &Digest,
        salt: &[u8; 32],
        encoded: &[u8],
        report: &mut Report,
    ) -> Option<EntryBody> {
        if commitment(salt, encoded) != *c {
            report.violations.push(Violation::CommitmentMismatch(index));
            return None;
        }
        let body = match EntryBody::decode(encoded) {
            Ok(b) => b,
            Err(e) => {
                report
                    .violations
                    .push(Violation::Malformed(index, e.to_string()));
                return None;
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
        Some(body)
    }

    /// Verifies the signatures of a segment of statements, batch heads and accesses together (both
    /// cores, batch equation, strict fallback), then applies them in log order.
    fn flush(&mut self, segment: &mut Vec<(u64, EntryBody)>, report: &mut Report) {
        let mut prepared: Vec<(u64, Prepared)> = Vec::with_capacity(segment.len());
        let mut items: Vec<(SignedEnvelope, VerifyingKey)> = Vec::with_capacity(segment.len());
        for (index, body) in segment.drain(..) {
            match self.prepare(index, body) {
                Ok((p, envelope, key)) => {
                    items.push((envelope, key));
                    prepared.push((index, p));
                }
                Err(v) => report.violations.push(v),
            }
        }
        let refs: Vec<(&SignedEnvelope, VerifyingKey)> =
            items.iter().map(|(e, k)| (e, *k)).collect();
        let bad: HashSet<usize> = verify_parallel(&refs).into_iter().collect();
        for (i, (index, p)) in prepared.into_iter().enumerate() {
            if bad.contains(&i) {
                report.violations.push(Violation::BadSignature(
                    index,
                    "signature verification failed".into(),
                ));
                continue;
            }
            match self.apply_prepared(index, p) {
                Ok(Some(body)) => self.journal.push((index, body)),
                Ok(None) => {}
                Err(v) => report.violations.push(v),
            }
        }
    }

    /// Parses a non-identity entry and resolves, by the ledger's rule, the key that must have signed it
    /// at its position.
    fn prepare(
        &self,
        index: u64,
        body: EntryBody,
    ) -> Result<(Prepared, SignedEnvelope, VerifyingKey), Violation> {
        let parsed = Parsed::decode(body.kind, &body.payload, &self.log_key)
            .map_err(|r| violation(index, body.kind, r))?;
        let (envelope, key) = self
            .ledger
            .signing_key(&parsed, index)
            .map_err(|r| violation(index, body.kind, r))?
            .ok_or_else(|| Violation::Malformed(index, "an identity entry in a segment".into()))?;
        Ok((Prepared { parsed, body }, envelope, key))
    }

    /// Applies an entry whose signature verified; returns it when it changed the ledger in a way a
    /// snapshot must replay (statements, and accesses that used up a one-time grant).
    fn apply_prepared(&mut self, index: u64, p: Prepared) -> Result<Option<EntryBody>, Violation> {
        let nonce = match &p.parsed {
            Parsed::Access(rec) => Some(self.check_freshness(index, rec, &p.body)?),
            _ => None,
        };
        let applied = self.ledger.apply(
            &p.parsed,
            index,
            p.body.time,
            Some(Header::of(&p.body)),
            Signatures::Checked,
        );
        // A request's nonce is used up by an access bound to it (allowed or denied by the grants), not by
        // a malformed or unbound copy logged under another vault: the genuine one is then not a replay.
        if let Some(nonce) = nonce
            && matches!(applied, Ok(_) | Err(Refusal::Denied(_)))
        {
            self.nonces.insert(nonce);
        }
        let (_, effect) = applied.map_err(|r| violation(index, p.parsed.kind(), r))?;
        self.awaiting =
            (self.ledger.awaiting_append() == Some(index)).then(|| (index, p.body.clone()));
        Ok(match effect {
            Effect::FamilyHead => None,
            Effect::Access(allowed) if !allowed.consumes => None,
            _ => Some(p.body),
        })
    }

    /// Checks what the ledger leaves to the edges for an access whose signature verified: the signed
    /// parameters name its keyid, it was created within the window around its server time, and its
    /// (keyid, nonce) was never seen before.
    fn check_freshness(
        &mut self,
        index: u64,
        rec: &AccessRecord,
        body: &EntryBody,
    ) -> Result<Digest, Violation> {
        let malformed = |e: String| Violation::Malformed(index, e);
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
        if self.nonces.contains(&key) {
            return Err(Violation::ReplayedNonce(
                index,
                format!("{} {}", rec.keyid, nonce),
            ));
        }
        Ok(key)
    }
}

/// What the ledger's refusal of entry `index` (of `kind`) means in a report.
fn violation(index: u64, kind: EntryKind, r: Refusal) -> Violation {
    use crate::admission::AdmissionError;
    let text = r.to_string();
    match r {
        // An access filed under another vault than the one its signed request names.
        Refusal::Header("customer") if kind == EntryKind::Access => Violation::Unbound(index, text),
        // An entry filed under another identity than the one that signed it.
        Refusal::Header("subject") | Refusal::AlreadyRegistered(_) => {
            Violation::BadSignature(index, text)
        }
        Refusal::Admission(AdmissionError::NotSigned) => Violation::BadSignature(index, text),
        Refusal::Admission(AdmissionError::Malformed(_)) | Refusal::UnknownCustomer(_) => {
            Violation::Malformed(index, text)
        }
        Refusal::Decode(..) | Refusal::Header(_) => Violation::Malformed(index, text),
        Refusal::Unbound(e) => Violation::Unbound(index, e),
        Refusal::Denied(reason) => Violation::AccessDenied(index, reason.code().to_string()),
        Refusal::Consent(_)
        | Refusal::Admission(_)
        | Refusal::DirectoryVersion { .. }
        | Refusal::UnknownFamily => Violation::RefusedStatement(index, text),
        Refusal::Identity(_)
        | Refusal::Statement(_)
        | Refusal::Directory(_)
        | Refusal::BadSignature(_)
        | Refusal::DeviceOwned(_)
        | Refusal::UnknownIdentity(_) => Violation::BadSignature(index, text),
    }
}

/// How many entries are verified together at most.
const SEGMENT: usize = 4096;

/// Entries that change which keys are valid; they are checked one by one, in order.
fn is_identity_entry(kind: EntryKind) -> bool {
    matches!(
        kind,
        EntryKind::KeyEvent
            | EntryKind::DeviceCertificate
            | EntryKind::DeviceRevocation
            | EntryKind::Directory
            | EntryKind::Admission
    )
}

/// A parsed entry whose signature is checked with its segment.
struct Prepared {
    parsed: Parsed,
    body: EntryBody,
}

/// The indices of the bad signatures among `items`, using both cores for large sets.
fn verify_parallel(items: &[(&SignedEnvelope, VerifyingKey)]) -> Vec<usize> {
    if items.len() < 128 {
        return find_bad(items);
    }
    let mid = items.len() / 2;
    let (left, right) = items.split_at(mid);
    std::thread::scope(|s| {
        let handle = s.spawn(|| find_bad(left));
        let mut bad_right: Vec<usize> = find_bad(right).into_iter().map(|i| i + mid).collect();
        // A panicked verifier thread proves nothing: count its whole half as bad.
        let mut bad = handle.join().unwrap_or_else(|_| (0..mid).collect());
        bad.append(&mut bad_right);
        bad
    })
}

fn find_bad(items: &[(&SignedEnvelope, VerifyingKey)]) -> Vec<usize> {
    let mut bad = Vec::new();
    let mut offset = 0;
    while offset < items.len() {
        match verify_many(&items[offset..]) {
            Ok(()) => break,
            Err(i) => {
                bad.push(offset + i);
                offset += i + 1;
            }
        }
    }
    bad
}

/// What an auditor saves between runs (JSON). Bodies in the journal are base64; hashes are hex.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Snapshot {
    format: String,
    checkpoint: Option<String>,
    range_size: u64,
    range: Vec<(u64, String)>,
    last_time: u64,
    chains: Vec<(String, u64, String)>,
    redacted: Vec<u64>,
    nonces: Vec<String>,
    journal: Vec<(u64, String)>,
    /// A company batch whose signed append has not followed yet (see `Auditor::awaiting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awaiting: Option<(u64, String)>,
}

/// A saved auditor state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RestoreError {
    /// Not a snapshot of this version.
    #[error("not an auditor snapshot: {0}")]
    Format(String),
    /// The saved checkpoint is not signed by the log key given.
    #[error("the saved checkpoint does not verify: {0}")]
    Checkpoint(String),
    /// A journal entry no longer replays: the snapshot was edited.
    #[error("journal entry {0} does not replay")]
    Journal(u64),
}

const SNAPSHOT_FORMAT: &str = "cmr-auditor/1";

fn hex32(s: &str) -> Result<[u8; 32], RestoreError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| RestoreError::Format("bad hex".into()))?;
    Ok(out)
}

impl Auditor {
    /// Saves the state, so that the next run (after [`Auditor::restore`]) costs O(new entries + log n).
    /// The journal holds the identity entries, statements and one-time consumptions that built the
    /// identity and consent states; accesses otherwise leave only their nonce.
    pub fn snapshot(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut chains: Vec<(String, u64, String)> = self
            .chains
            .iter()
            .map(|(c, l)| (c.to_hex(), l.index, l.hash.to_hex()))
            .collect();
        chains.sort();
        let mut redacted: Vec<u64> = self.redacted.iter().copied().collect();
        redacted.sort_unstable();
        let mut nonces: Vec<String> = self.nonces.iter().map(Digest::to_hex).collect();
        nonces.sort();
        let snap = Snapshot {
            format: SNAPSHOT_FORMAT.into(),
            checkpoint: self.verified.as_ref().map(|(_, n)| n.clone()),
            range_size: self.range.size(),
            range: self
                .range
                .subtrees()
                .iter()
                .map(|(n, h)| (*n, hex::encode(h)))
                .collect(),
            last_time: self.last_time,
            chains,
            redacted,
            nonces,
            journal: self
                .journal
                .iter()
                .map(|(i, b)| (*i, b64.encode(b.encode())))
                .collect(),
            awaiting: self
                .awaiting
                .as_ref()
                .filter(|(i, _)| self.ledger.awaiting_append() == Some(*i))
                .map(|(i, b)| (*i, b64.encode(b.encode()))),
        };
        serde_json::to_string(&snap).expect("a snapshot always serializes")
    }

    /// Restores a saved state: checks the saved checkpoint under `log_key` and the compact range against
    /// it, then rebuilds identities and consent by replaying the journal (identity signatures are checked
    /// again; statements were checked when first audited).
    pub fn restore(log_key: NoteVerifier, saved: &str) -> Result<Self, RestoreError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let snap: Snapshot =
            serde_json::from_str(saved).map_err(|e| RestoreError::Format(e.to_string()))?;
        if snap.format != SNAPSHOT_FORMAT {
            return Err(RestoreError::Format(snap.format));
        }
        let mut a = Auditor::new(log_key);
        let subtrees = snap
            .range
            .iter()
            .map(|(n, h)| Ok((*n, hex32(h)?)))
            .collect::<Result<Vec<_>, RestoreError>>()?;
        a.range = CompactRange::from_parts(snap.range_size, subtrees)
            .ok_or_else(|| RestoreError::Format("the saved tree is not a compact range".into()))?;
        if let Some(note) = snap.checkpoint {
            let cp = checkpoint::open(&note, &a.log_key, &[], 0)
                .map_err(|e| RestoreError::Checkpoint(e.to_string()))?
                .checkpoint;
            if cp.size != a.range.size() || cp.root != a.range.root() {
                return Err(RestoreError::Checkpoint(
                    "the saved tree does not match it".into(),
                ));
            }
            a.verified = Some((cp, note));
        }
        a.last_time = snap.last_time;
        for (c, index, h) in &snap.chains {
            a.chains.insert(
                IdentityId(hex32(c)?),
                ChainLink {
                    index: *index,
                    hash: Digest(hex32(h)?),
                },
            );
        }
        a.redacted = snap.redacted.into_iter().collect();
        a.nonces = snap
            .nonces
            .iter()
            .map(|n| Ok(Digest(hex32(n)?)))
            .collect::<Result<_, RestoreError>>()?;
        for (index, encoded) in &snap.journal {
            let bytes = b64
                .decode(encoded)
                .map_err(|_| RestoreError::Journal(*index))?;
            let body = EntryBody::decode(&bytes).map_err(|_| RestoreError::Journal(*index))?;
            a.replay(*index, &body)
                .map_err(|_| RestoreError::Journal(*index))?;
            a.journal.push((*index, body));
        }
        if let Some((index, encoded)) = &snap.awaiting {
            let body = b64
                .decode(encoded)
                .ok()
                .and_then(|bytes| EntryBody::decode(&bytes).ok())
                .ok_or(RestoreError::Journal(*index))?;
            a.replay(*index, &body)
                .map_err(|_| RestoreError::Journal(*index))?;
            a.awaiting = Some((*index, body));
        }
        Ok(a)
    }

    /// Re-applies a journal entry; the signatures of statements and accesses were checked when it was
    /// first audited (identity events are always checked again).
    fn replay(&mut self, index: u64, body: &EntryBody) -> Result<(), Violation> {
        self.ledger
            .apply_logged(index, body, &self.log_key, Signatures::Checked)
            .map(|_| ())
            .map_err(|r| violation(index, body.kind, r))
    }
}
