//! # cmr-log
//!
//! CMR Vault's verifiable, private log, as pure code.
//!
//! What this crate owns:
//! - the RFC 6962 / RFC 9162 Merkle tree over a small node-store trait, with incremental append and
//!   O(log n) inclusion and consistency proofs ([`tree`]);
//! - proof verification as pure functions over hashes ([`verify`]);
//! - C2SP signed notes, tlog-checkpoints and Ed25519 tlog-cosignatures ([`note`], [`checkpoint`]), and
//!   the note a restored log signs ([`restore`]);
//! - entry bodies, salted commitments and access records ([`entry`]);
//! - **the rule engine** ([`ledger`]): the one state machine that decides and applies every entry, called by
//!   the store's sequencer and replay, the auditor and the SDK; the consent fold of a customer's own chain
//!   ([`consent`]); auditor admissions ([`admission`]) and key-event heads ([`keyhead`]);
//! - the auditor ([`auditor`]), the witness ([`witness`]) and an in-memory log ([`memlog`]).
//!
//! What it does not do: no file, network or clock access. The store persists the tree's nodes inside its
//! own atomic writes; fetching checkpoints and proofs is the client's job.
#![forbid(unsafe_code)]

pub mod admission;
pub mod auditor;
pub mod checkpoint;
pub mod consent;
pub mod entry;
pub mod keyhead;
pub mod ledger;
pub mod memlog;
pub mod note;
pub mod restore;
pub mod tree;
pub mod verify;
pub mod witness;
