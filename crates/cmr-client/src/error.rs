//! The SDK's errors: what the server refused, and what the SDK refused to believe.

use thiserror::Error;

/// Why an operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server could not be reached, or the answer was cut.
    #[error("cannot reach the vault server: {0}")]
    Transport(String),
    /// The request may have reached the server, but no answer came back (after sending it again for the
    /// retry budget, where that is safe): it may or may not have been carried out. A write can be sent
    /// again (it is idempotent); a company's read under a grant may have been logged as an access.
    #[error("no answer from the vault server; the request may have been carried out: {0}")]
    InDoubt(String),
    /// The server refused, with its Problem Details.
    #[error("the server refused ({status} {code}): {detail}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The problem code, the last part of its `type` (for example `grant-revoked`).
        code: String,
        /// The server's explanation.
        detail: String,
    },
    /// The server's answer does not parse.
    #[error("malformed answer from the server: {0}")]
    Malformed(String),
    /// The server's answer does not verify: the server is faulty or malicious.
    #[error("verification failed: {0}")]
    Verification(#[from] VerifyError),
    /// A local precondition is missing (for example a grant's keys).
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// The problem code if the server refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The refusal's code as one of the stable codes (`cmr_core::problem::Code`); `None` for anything
    /// else, and for a code this build does not know (a newer server's).
    pub fn problem(&self) -> Option<cmr_core::problem::Code> {
        self.code().and_then(cmr_core::problem::Code::parse)
    }
}

/// What the SDK refused to believe.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The checkpoint is not signed by the pinned log key, or does not parse.
    #[error("checkpoint refused: {0}")]
    Checkpoint(String),
    /// A checkpoint older than one already seen: a rollback.
    #[error("stale checkpoint: size {got} after size {seen} was already seen")]
    StaleCheckpoint {
        /// The largest size seen.
        seen: u64,
        /// The size offered.
        got: u64,
    },
    /// Two checkpoints that are not consistent: a fork.
    #[error("the log forked: checkpoint of size {new} is not consistent with size {old}")]
    Inconsistent {
        /// The earlier size.
        old: u64,
        /// The later size.
        new: u64,
    },
    /// The log is shorter than this client saw, or forked from it, and the log says, in a note signed
    /// with its key, that it was restored from a backup taken at a smaller size: what this client saw
    /// past that size is gone. Still a refusal: accepting the restored log is the user's decision
    /// ([`crate::session::Session::accept_restore`]).
    #[error(
        "the vault was restored from a backup: its log went back to size {restored} (restored at \
         Unix time {time}) and this client had seen size {seen}, so what it saw past size \
         {restored} is gone; the log is refused until the restore is accepted"
    )]
    Restored {
        /// The largest size this client saw.
        seen: u64,
        /// The size the log was restored to.
        restored: u64,
        /// When the restore ran, Unix seconds.
        time: u64,
    },
    /// An entry is not in the checkpoint it was served with.
    #[error("entry {0} is not included in the checkpoint")]
    NotIncluded(u64),
    /// The checkpoint does not cover the acknowledged entry.
    #[error("the checkpoint does not cover entry {0}")]
    NotCovered(u64),
    /// The logged entry is not what this client sent.
    #[error("entry {0} does not carry what was sent")]
    NotWhatWasSent(u64),
    /// An identity's key events do not replay from its inception, or name another identity.
    #[error("key events of {identity} refused: {reason}")]
    KeyEvents {
        /// The identity (hex).
        identity: String,
        /// Why.
        reason: String,
    },
    /// A read does not verify: wrong vault or family, missing, extra or changed records.
    #[error("read refused: {0}")]
    Read(String),
    /// A signature by a counterparty does not verify.
    #[error("signature refused: {0}")]
    Signature(String),
    /// The directory rolled back or forked.
    #[error("directory refused: {0}")]
    Directory(String),
    /// The customer's chain of entries has a gap or hides an acknowledged entry.
    #[error("the customer's chain is broken: {0}")]
    Chain(String),
    /// A company's domain proof failed.
    #[error("company identity refused: {0}")]
    CompanyIdentity(String),
    /// An auditor admission is not signed by the log key, or breaks the admission rule.
    #[error("auditor list refused: {0}")]
    Admission(String),
}
