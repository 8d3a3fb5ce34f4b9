//! # cmr-bench
//!
//! `cmr bench`: the load generator. It seeds customers, companies and grants through the SDK, then runs
//! a bounded mix of signed operations with concurrent clients against a server on 127.0.0.1 (its own
//! `cmr serve` child in a temporary folder or on a given store, or one already running), and reports
//! throughput, latency percentiles, errors by kind (expected refusals apart), the server's memory, and
//! reference figures measured in the same run. `--race-rounds` adds the revocation race: readers hammer
//! a grant while the customer revokes it, and no read may be served at a log position after the
//! revocation.
//!
//! What it owns: the workload, the sampled full verification of answers (through the SDK), the race, the
//! report. What it does not own: the server (it starts the `cmr` binary it runs in, `cmr serve`), the
//! command line around it (`cmr-cli` parses [`BenchArgs`] and maps [`BenchError`] to exit codes).
//!
//! Modules: `run` (everything above).
#![forbid(unsafe_code)]

mod run;

pub use run::{BenchArgs, run};

use cmr_client::ClientError;

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A local problem: an argument, the temporary folder, the server that would not start.
    #[error("{message}")]
    Local {
        /// What went wrong.
        message: String,
        /// What to try.
        hint: String,
    },
    /// The server broke a promise: an unexpected error, a read served after a revocation, an answer
    /// that did not verify.
    #[error("{message}")]
    Verification {
        /// What went wrong.
        message: String,
        /// What to try, if anything.
        hint: Option<String>,
    },
    /// The SDK's own error, as it came.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl BenchError {
    fn local(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Local {
            message: message.into(),
            hint: hint.into(),
        }
    }

    fn verification(message: impl Into<String>, hint: Option<&str>) -> Self {
        Self::Verification {
            message: message.into(),
            hint: hint.map(str::to_string),
        }
    }
}

/// A run's result.
pub type Result<T = (), E = BenchError> = std::result::Result<T, E>;

/// Where the report goes: lines for people, or one JSON document (`--json`).
#[derive(Clone, Copy)]
pub struct Out {
    /// Print JSON instead of lines.
    pub json: bool,
}

impl Out {
    fn line(&self, s: impl AsRef<str>) {
        if !self.json {
            print(s.as_ref());
        }
    }

    fn value(&self, v: &serde_json::Value) {
        if self.json {
            print(&serde_json::to_string_pretty(v).unwrap_or_default());
        }
    }
}

/// A line on standard output; a reader that went away ends the output quietly.
fn print(s: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{s}").is_err() {
        std::process::exit(0);
    }
}

/// Now, in Unix seconds.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
