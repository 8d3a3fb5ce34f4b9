//! Cross-crate end-to-end tests for CMR Vault live in `tests/tests/`. This library is empty on purpose:
//! the package exists so that tests spanning several crates have a home of their own.
