//! Replays every fuzz corpus and regression file through its target, on stable, as ordinary tests: a
//! panic (a crash the fuzzer found and that came back) fails the test. Each corpus must hold at least one
//! input its parser accepts, so that a corpus of junk cannot pass for coverage.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::path::{Path, PathBuf};

use cmr_fuzz::{Outcome, TARGETS};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(name: &str) {
    let target = TARGETS.iter().find(|(n, _)| *n == name).unwrap().1;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let corpus = files(&root.join("corpus").join(name));
    let regressions = files(&root.join("regressions").join(name));
    assert!(!corpus.is_empty(), "no corpus for {name}");
    let mut accepted = 0;
    for path in corpus.iter().chain(&regressions) {
        let bytes = std::fs::read(path).unwrap();
        if target(&bytes) == Outcome::Accepted {
            accepted += 1;
        }
    }
    assert!(accepted > 0, "nothing in the {name} corpus is accepted");
    println!(
        "{name}: {} corpus and {} regression files replayed, {accepted} accepted",
        corpus.len(),
        regressions.len()
    );
}

macro_rules! replay_tests {
    ($($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*
    };
}

replay_tests!(
    statement,
    record,
    range_proof,
    directory,
    note,
    httpsig,
    keyfile,
    log_body,
    request_body,
    read_proof
);

/// The request-body seeds are valid requests of the harness's deterministic identities: each one, sent
/// alone to a fresh harness, is accepted. If a change to the server or the formats breaks one, this
/// test names it, and the seeds are written again (`cargo run -p cmr-fuzz --example write-seeds`).
#[test]
fn request_body_seeds_are_accepted_by_a_fresh_harness() {
    let seeds = cmr_fuzz::valid_requests();
    assert!(seeds.len() >= 14, "{} seeds", seeds.len());
    for seed in &seeds {
        let h = cmr_fuzz::Harness::new();
        assert_eq!(
            h.input(seed),
            Outcome::Accepted,
            "route {} by {}: {}",
            seed[0],
            seed[1],
            String::from_utf8_lossy(&seed[2..])
        );
    }
    // The harness is the same in every process: the seeds built twice are the same bytes.
    assert_eq!(cmr_fuzz::valid_requests(), seeds);
}
