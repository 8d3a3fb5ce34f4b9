//! # cmr-store
//!
//! CMR Vault's durable state on sled (0.34): identities, devices and key directories; records and family
//! heads; consent statements with their wrapped keys; and the log (leaves, bodies, nodes, checkpoints).
//!
//! What it owns: the key layout, the format version, the sequencer that orders every state-changing
//! operation and commits them in groups, the durability step (flush, then `fdatasync`), idempotency, and
//! rebuilding the in-memory state from the log when it opens.
//!
//! What it does not own: request authentication (the server), cryptographic rules (`cmr-core`), log
//! formats and proofs (`cmr-log`).
//!
//! The server depends on the [`Backend`] trait, not on sled: [`Store`] is its sled implementation, and a
//! later PostgreSQL backend implements the same trait (see `backend`).
#![forbid(unsafe_code)]

pub mod backend;
#[cfg(feature = "testkit")]
pub mod conformance;
pub mod layout;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::Backend;
pub use store::{
    ACK_MARK, Ack, DEFAULT_CACHE, KeyIndex, MAX_BACKUP, Op, ReadResult, Store, StoreConfig,
    StoreError,
};
