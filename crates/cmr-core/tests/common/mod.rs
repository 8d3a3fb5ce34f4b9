//! Shared helpers for cmr-core's integration tests.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.
#![allow(dead_code)]

use std::path::PathBuf;

/// A vector file under `testdata/vectors`, parsed as JSON.
pub fn vector(rel: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/vectors")
        .join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Hex-decodes a JSON string field.
pub fn hex_field(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex::decode(v[name].as_str().unwrap_or_else(|| panic!("field {name}")))
        .unwrap_or_else(|e| panic!("field {name}: {e}"))
}
