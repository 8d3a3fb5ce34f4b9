//! # cmr-store
//!
//! CMR Vault's durable state: identities, devices and key directories; records and their family
//! ledgers (in pieces, so that memory does not grow with the records); consent statements with their
//! wrapped keys; and the log (entries and tree nodes in pieces, checkpoints).
//!
//! What it owns: the key layout, the format version, the sequencer that orders every state-changing
//! operation and commits them in groups, idempotency, the durable view and the acknowledgements, and
//! rebuilding the in-memory state from the log when it opens ([`Store`]); the boundary to a storage
//! engine ([`Storage`]: ordered rows, groups of writes applied all or nothing, a sync that makes them
//! durable) and the embedded engine, sled (0.34) in a local folder with `fdatasync`, the log's entries
//! and tree nodes and the sealed records in append-only files beside it, their pointers bundled 64 to a
//! row of sled's ([`SledStorage`]).
//!
//! What it does not own: request authentication (the server), the vault's rules (`cmr_log::ledger`),
//! cryptographic rules (`cmr-core`), log formats and proofs (`cmr-log`).
//!
//! Modules: `backend` (the server's view, [`Backend`]), `storage` (the engine's, [`Storage`]),
//! `sled_storage`, `store`, `layout` (row keys), `metrics` (what the store measures of itself), and
//! with the `testkit` feature `testkit` and
//! `conformance` (the suite every backend passes).
#![forbid(unsafe_code)]

pub mod backend;
#[cfg(feature = "testkit")]
pub mod conformance;
pub mod layout;
pub mod metrics;
pub mod sled_storage;
pub mod storage;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::Backend;
pub use sled_storage::{ACK_MARK, SledStorage};
pub use storage::Storage;
pub use store::{
    Ack, DEFAULT_CACHE, KeyIndex, MAX_BACKUP, Op, ReadResult, Store, StoreConfig, StoreError,
};
