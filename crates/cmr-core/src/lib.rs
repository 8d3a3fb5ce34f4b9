//! # cmr-core
//!
//! The pure core of CMR Vault: identities, keys, byte formats and the request-signing profile.
//!
//! What this crate owns:
//! - the canonical binary encoding of every signed or hashed body ([`encoding`]) and tagged hashes
//!   ([`hash`]);
//! - Ed25519 (strict) and X25519 key types, and the signed envelope ([`keys`]);
//! - HPKE key wrapping bound to its context ([`wrap`]);
//! - identities with pre-rotation, device certificates and revocations, recovery ([`identity`]);
//! - the customer's vault key ([`vault`]);
//! - passphrase-sealed key files ([`keyfile`]);
//! - RFC 9421 HTTP Message Signatures with RFC 9530 Content-Digest, and the CMR request profile
//!   ([`httpsig`]).
//!
//! What it does not do: no file, network or clock access, and no global state. Time and log positions are
//! arguments; randomness comes from a caller-supplied CSPRNG. Storage, HTTP and the command line are
//! thin edges in other crates around this one.
#![forbid(unsafe_code)]

pub mod batch;
pub mod consent;
pub mod decision;
pub mod directory;
pub mod encoding;
pub mod epoch;
pub mod export;
pub mod family;
pub mod hash;
pub mod httpsig;
pub mod identity;
pub mod keyfile;
pub mod keys;
pub mod merkle;
pub mod problem;
pub mod receipt;
pub mod record;
pub mod vault;
pub mod wrap;

#[cfg(test)]
pub(crate) mod testdata;
