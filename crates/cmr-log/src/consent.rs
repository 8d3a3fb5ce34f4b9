//! How the log's entries change a customer's consent state: one function, [`fold`], used wherever a
//! consent state is rebuilt from entries already checked (the store's replay at open, and the customer's
//! client, which folds its own verified chain to know which grants ended and which rotations are owed).
//!
//! It does not check signatures: its callers fold entries whose signatures were checked when they were
//! logged (the store) or whose inclusion and chain the client verified (its own statements, and accesses
//! it cannot forge anyway since the store checked them). The auditor checks every signature first, then
//! applies the same `ConsentState` operations.

use cmr_core::consent::SignedStatement;
use cmr_core::decision::{ApplyError, ConsentState};
use cmr_core::directory::SignedDirectory;
use thiserror::Error;

use crate::entry::{AccessRecord, EntryBody, EntryKind};

/// An entry that cannot be folded.
#[derive(Debug, Error)]
pub enum FoldError {
    /// Its payload does not decode.
    #[error("entry {0}: {1}")]
    Decode(u64, String),
    /// The consent state refuses it (out of order, an unknown grant, ...).
    #[error("entry {0}: {1}")]
    Refused(u64, ApplyError),
    /// An access that names no family, or an entry about another customer.
    #[error("entry {0}: {1}")]
    Malformed(u64, &'static str),
}

/// A directory declares its families, at their current epochs, to the customer's consent state.
pub fn declare(consent: &mut ConsentState, dir: &SignedDirectory) {
    for f in &dir.directory().families {
        consent.declare_family(f.family, f.scope, f.epoch);
    }
}

/// Folds entry `index` (about this state's customer) into `consent`: a directory declares its families;
/// a statement is applied; an access is recorded (a one-time grant's first read uses it up); the
/// revocation of one of the customer's devices exposes every family. Other kinds change no consent.
pub fn fold(consent: &mut ConsentState, index: u64, body: &EntryBody) -> Result<(), FoldError> {
    let decode = |e: &dyn std::fmt::Display| FoldError::Decode(index, e.to_string());
    let refused = |e: ApplyError| FoldError::Refused(index, e);
    if body.customer != Some(consent.customer()) {
        return Err(FoldError::Malformed(
            index,
            "the entry is about another customer",
        ));
    }
    match body.kind {
        EntryKind::Directory => {
            let dir = SignedDirectory::decode(&body.payload).map_err(|e| decode(&e))?;
            declare(consent, &dir);
        }
        EntryKind::Statement => {
            let st = SignedStatement::decode(&body.payload).map_err(|e| decode(&e))?;
            consent.apply(&st, index, body.time).map_err(refused)?;
        }
        EntryKind::Access => {
            let rec = AccessRecord::decode(&body.payload).map_err(|e| decode(&e))?;
            let attempt = rec
                .attempt(body.subject)
                .ok_or(FoldError::Malformed(index, "an access to no family"))?;
            // The decision was made when the access was logged (and the auditor reports one that no
            // grant allowed); folding only records its effects.
            let _decision = consent
                .record_access(&attempt, index, body.time)
                .map_err(refused)?;
        }
        EntryKind::DeviceRevocation => {
            consent.device_revoked(index, body.time).map_err(refused)?;
        }
        EntryKind::KeyEvent
        | EntryKind::DeviceCertificate
        | EntryKind::FamilyHead
        | EntryKind::Admission => {}
    }
    Ok(())
}
