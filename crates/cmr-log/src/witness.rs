//! A witness: cosigns a checkpoint (C2SP tlog-cosignature, Ed25519) only after verifying that it is
//! consistent with the last one it cosigned.

use cmr_core::merkle::Hash;
use thiserror::Error;

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::note::{NoteSigner, NoteVerifier, TYPE_COSIGNATURE};
use crate::verify::{ProofError, verify_consistency};

/// The witness refused to cosign.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WitnessError {
    /// The checkpoint does not open under the log key.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Smaller than the last one cosigned.
    #[error("checkpoint of size {got} is older than the {seen} already cosigned")]
    Rollback {
        /// Last cosigned size.
        seen: u64,
        /// Offered size.
        got: u64,
    },
    /// Not consistent with the last one cosigned.
    #[error("checkpoint is not consistent with the last one cosigned: {0}")]
    Inconsistent(ProofError),
    /// The witness's key is not a cosigner key.
    #[error("a witness signs with a cosignature (type 0x04) key")]
    NotACosigner,
}

/// A witness for one log.
#[derive(Debug)]
pub struct Witness {
    signer: NoteSigner,
    log_key: NoteVerifier,
    last: Option<Checkpoint>,
}

impl Witness {
    /// A witness with `signer` (a type 0x04 key) for the log with `log_key`.
    pub fn new(signer: NoteSigner, log_key: NoteVerifier) -> Result<Self, WitnessError> {
        if !signer.verifier().is_cosigner() {
            return Err(WitnessError::NotACosigner);
        }
        Ok(Self {
            signer,
            log_key,
            last: None,
        })
    }

    /// A witness that resumes after `last`, the checkpoint it cosigned before (opened again under the log
    /// key, so a tampered saved state is refused).
    pub fn resume(
        signer: NoteSigner,
        log_key: NoteVerifier,
        last_signed: &str,
    ) -> Result<Self, WitnessError> {
        let last = checkpoint::open(last_signed, &log_key, &[], 0)?.checkpoint;
        let mut w = Self::new(signer, log_key)?;
        w.last = Some(last);
        Ok(w)
    }

    /// The checkpoint cosigned last.
    pub fn last(&self) -> Option<&Checkpoint> {
        self.last.as_ref()
    }

    /// Cosigns `signed` at time `now` if it is consistent with the last checkpoint cosigned (`proof` is
    /// the consistency proof from that one); returns the signature line to add to the note.
    pub fn cosign(
        &mut self,
        signed: &str,
        proof: &[Hash],
        now: u64,
    ) -> Result<String, WitnessError> {
        let cp = checkpoint::open(signed, &self.log_key, &[], 0)?.checkpoint;
        if let Some(last) = &self.last {
            if cp.size < last.size {
                return Err(WitnessError::Rollback {
                    seen: last.size,
                    got: cp.size,
                });
            }
            if last.size > 0 {
                verify_consistency(last.size, cp.size, &last.root, &cp.root, proof)
                    .map_err(WitnessError::Inconsistent)?;
            }
        }
        let line = self.signer.signature_line(&cp.text(), now);
        self.last = Some(cp);
        Ok(line)
    }
}

/// The signature type a witness key must have.
pub const WITNESS_KEY_TYPE: u8 = TYPE_COSIGNATURE;
