//! Cross-crate end-to-end tests for CMR Vault live in `tests/tests/`, with the format vectors
//! (`testdata/formats.json`, checked by `format_vectors.rs`). This library is empty on purpose:
//! the package exists so that tests spanning several crates have a home of their own.
