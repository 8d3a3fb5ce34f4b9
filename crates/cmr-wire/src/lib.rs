//! # cmr-wire
//!
//! The API's JSON shapes, written once and shared by the server (which serializes them), the SDK, the
//! load generator and the tests (which parse them), so the two sides of a format cannot drift.
//!
//! What it owns: the serde types of the answers and their conversion to and from the pure types of
//! `cmr-core` (hashes in base64, ids in hex, months as `YYYY-MM`). What it does not own: what the values
//! mean or whether they verify (`cmr-core`, `cmr-log`, the SDK), or HTTP (`cmr-server`).
//!
//! Modules: [`bytes`] (bytes as base64 strings), [`gateway`] (the company gateway's API), [`read`] (a read's answer and proof), [`log`] (proven entries and acknowledgements),
//! [`problem`] (problem details), [`vault`] (key histories, vaults, heads, pending requests, backups). With the `openapi` feature each type also describes its own schema,
//! from which the server's OpenAPI document is generated.
#![forbid(unsafe_code)]

pub mod bytes;
pub mod gateway;
pub mod log;
pub mod problem;
pub mod read;
pub mod vault;

use thiserror::Error;

/// A field of an answer does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct WireError {
    /// Which field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

pub(crate) fn err(field: &'static str, reason: &'static str) -> WireError {
    WireError { field, reason }
}
