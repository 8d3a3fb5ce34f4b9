//! # cmr-client
//!
//! CMR Vault's client SDK. Everything secret stays on the user's side: records are sealed and opened
//! here, grants' keys are sealed here to the grantee's own certified key, and the server only ever sees
//! ciphertext and signatures.
//!
//! What it owns:
//! - [`transport`]: signed HTTP requests (RFC 9421, the profile of `cmr_core::httpsig`) and Problem
//!   Details answers turned into typed errors;
//! - [`verify`]: what the SDK checks in every answer — checkpoints under the pinned log key, consistency
//!   between all checkpoints seen, inclusion of every entry it relies on, that a logged entry carries
//!   exactly what was sent, key events replayed from inception, the customer's own chain without gaps;
//! - [`customer`], [`company`], [`auditor`]: the three users' operations;
//! - [`wellknown`]: a company's domain proof, `https://DOMAIN/.well-known/cmr-vault`.
//!
//! What it does not own: key files and configuration folders (the CLI), the formats and the pure
//! checks themselves (`cmr-core`, `cmr-log`), and storage or policy (the server).
#![forbid(unsafe_code)]

pub mod auditor;
pub mod company;
pub mod customer;
pub mod error;
pub mod session;
pub mod state;
pub mod transport;
pub mod verify;
pub mod wellknown;

pub use error::ClientError;
pub use transport::Connection;
pub use verify::LogView;
