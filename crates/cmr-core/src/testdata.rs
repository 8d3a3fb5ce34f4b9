//! Loads the third-party vectors kept under `testdata/vectors` at the workspace root.

use std::path::PathBuf;

/// The path of a vector file, relative to `testdata/vectors`.
pub(crate) fn path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/vectors")
        .join(rel)
}

/// A vector file parsed as JSON.
pub(crate) fn json(rel: &str) -> serde_json::Value {
    let p = path(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
