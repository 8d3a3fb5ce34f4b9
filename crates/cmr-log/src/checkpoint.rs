//! C2SP tlog-checkpoints (c2sp.org/tlog-checkpoint) inside signed notes, with witness cosignatures.
//!
//! Owns the checkpoint text (origin, size, base64 root, optional extension lines), signing it with the
//! log key, opening it with a pinned log key and optional witnesses (k of n), and the freshness rule a
//! client applies.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::merkle::Hash;
use thiserror::Error;

use crate::note::{self, Note, NoteError, NoteSigner, NoteVerifier};

/// A tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// The number of leaves.
    pub size: u64,
    /// The RFC 6962 root.
    pub root: Hash,
    /// Extension lines (none written by CMR Vault).
    pub extensions: Vec<String>,
}

/// A checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckpointError {
    /// The note is malformed or not signed by the log.
    #[error(transparent)]
    Note(#[from] NoteError),
    /// The text is not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    /// The origin is not the expected log's.
    #[error("checkpoint is for origin {0:?}")]
    WrongOrigin(String),
    /// The log key did not sign it.
    #[error("checkpoint is not signed by the log key")]
    NotSignedByLog,
    /// Too few witnesses cosigned it.
    #[error("{got} of the required {need} witnesses cosigned it")]
    TooFewWitnesses {
        /// Verified cosignatures.
        got: usize,
        /// Required.
        need: usize,
    },
}

impl Checkpoint {
    /// The note text.
    pub fn text(&self) -> String {
        let mut t = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Parses a note text.
    pub fn parse_text(text: &str) -> Result<Self, CheckpointError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::Malformed("text ends in newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or(CheckpointError::Malformed("origin"))?;
        let size_line = lines.next().ok_or(CheckpointError::Malformed("size"))?;
        if size_line.is_empty()
            || (size_line.len() > 1 && size_line.starts_with('0'))
            || !size_line.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(CheckpointError::Malformed(
                "size is a decimal without leading zeroes",
            ));
        }
        let size = size_line
            .parse()
            .map_err(|_| CheckpointError::Malformed("size"))?;
        let root: Hash = B64
            .decode(lines.next().ok_or(CheckpointError::Malformed("root"))?)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(CheckpointError::Malformed("root is a base64 32-byte hash"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(CheckpointError::Malformed("extension lines are non-empty"));
        }
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }

    /// Signs the checkpoint with the log's key: the signed note.
    pub fn sign(&self, log: &NoteSigner) -> String {
        note::sign(&self.text(), &[log], 0).expect("a checkpoint text ends in exactly one newline")
    }
}

/// A checkpoint whose log signature (and the witnesses asked for) verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The witnesses that cosigned it, with their cosignature times.
    pub cosigners: Vec<(String, u64)>,
}

/// Opens a signed checkpoint: signed by the pinned `log` key, for its origin, and cosigned by at least
/// `required` of `witnesses`.
pub fn open(
    signed: &str,
    log: &NoteVerifier,
    witnesses: &[NoteVerifier],
    required: usize,
) -> Result<VerifiedCheckpoint, CheckpointError> {
    let note = Note::parse(signed)?;
    let checkpoint = Checkpoint::parse_text(&note.text)?;
    if checkpoint.origin != log.name() {
        return Err(CheckpointError::WrongOrigin(checkpoint.origin));
    }
    let mut known = vec![log.clone()];
    known.extend(witnesses.iter().cloned());
    let verified = note.verify(&known)?;
    if !verified
        .iter()
        .any(|v| v.name == log.name() && v.timestamp.is_none())
    {
        return Err(CheckpointError::NotSignedByLog);
    }
    let cosigners: Vec<(String, u64)> = verified
        .into_iter()
        .filter_map(|v| v.timestamp.map(|t| (v.name, t)))
        .collect();
    if cosigners.len() < required {
        return Err(CheckpointError::TooFewWitnesses {
            got: cosigners.len(),
            need: required,
        });
    }
    Ok(VerifiedCheckpoint {
        checkpoint,
        cosigners,
    })
}

/// Whether a client may treat `checkpoint` as fresh (PRODUCT.md, "The log is private"): it covers the
/// client's latest acknowledged entry and is no smaller than any checkpoint it has seen, or a required
/// witness cosigned it within `max_age` seconds of `now`.
pub fn is_fresh(
    checkpoint: &VerifiedCheckpoint,
    own_latest_index: Option<u64>,
    largest_seen: u64,
    now: u64,
    max_age: u64,
) -> bool {
    let cp = &checkpoint.checkpoint;
    let covers_own = own_latest_index.is_some_and(|i| i < cp.size) && cp.size >= largest_seen;
    let recently_cosigned = checkpoint
        .cosigners
        .iter()
        .any(|(_, t)| *t <= now && now - t <= max_age);
    covers_own || recently_cosigned
}
