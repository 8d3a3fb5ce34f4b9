//! One-line errors with a hint, and the documented exit codes (docs/guide.md, "Exit codes").

use std::fmt;

use cmr_client::ClientError;

/// Exit codes.
pub mod code {
    /// The server refused the operation (a Problem Details answer): denied, conflict, not found.
    pub const REFUSED: u8 = 1;
    /// Bad usage: clap's own code for unknown flags or missing arguments, and ours for a malformed value.
    pub const USAGE: u8 = 2;
    /// Something did not verify: the server is faulty or malicious, or the audit found a violation.
    pub const VERIFICATION: u8 = 3;
    /// A local problem: missing or unsafe key file, wrong passphrase, unreadable input.
    pub const LOCAL: u8 = 4;
    /// The server could not be reached.
    pub const UNREACHABLE: u8 = 5;
    /// The demo saw a step that did not behave as promised.
    pub const DEMO_FAILED: u8 = 6;
}

/// An error for people: the cause, a hint, and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong, in one line.
    pub message: String,
    /// What to try.
    pub hint: Option<String>,
    /// The exit code.
    pub code: u8,
}

impl CliError {
    /// A local problem.
    pub fn local(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: Some(hint.into()),
            code: code::LOCAL,
        }
    }

    /// A usage mistake (a malformed argument).
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: Some(hint.into()),
            code: code::USAGE,
        }
    }

    /// An error with a chosen code.
    pub fn with_code(code: u8, message: impl Into<String>, hint: Option<&str>) -> Self {
        Self {
            message: message.into(),
            hint: hint.map(str::to_string),
            code,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let (code, hint) = match &e {
            ClientError::Transport(_) => (
                code::UNREACHABLE,
                Some(
                    "is the server running? `cmr config show` says which one this folder uses (CMR_SERVER overrides it)",
                ),
            ),
            ClientError::InDoubt(_) => (
                code::UNREACHABLE,
                Some(
                    "run the same command again once the server is back: a write is not made twice",
                ),
            ),
            ClientError::Refused { code: c, .. } => (
                code::REFUSED,
                Some(match c.as_str() {
                    "clock-skew" => "set this computer's clock right (the server's clock decides)",
                    "unknown-key" => "register first, or check that this device was not revoked",
                    "rate-limited" | "unavailable" => "wait a moment and try again",
                    "outside-look-back" => {
                        "read from the grant's look-back start on (see `cmr company status`)"
                    }
                    "grant-revoked" | "grant-expired" | "grant-consumed" => {
                        "the grant has ended; ask again with `cmr company request`"
                    }
                    "family-not-granted" | "access-not-granted" | "no-grant" => {
                        "the grant does not cover this; see `cmr company status`"
                    }
                    "stale-epoch" => {
                        "the family was rotated; run `cmr company status` to fetch the new keys"
                    }
                    "rotation-pending" => {
                        "the customer's client has not finished the rotation yet; retry shortly"
                    }
                    "stale-head" => "someone wrote first; run the command again",
                    "company-blocked" => "this customer blocked your company",
                    "requests-not-accepted" => {
                        "this customer accepts requests only from companies it granted access to"
                    }
                    "too-many-requests" => {
                        "the customer's request limits are reached; wait for an answer, or try tomorrow"
                    }
                    _ => "the server says why; docs/api.md lists every problem code",
                }),
            ),
            ClientError::Verification(cmr_client::error::VerifyError::CompanyIdentity(_)) => (
                code::VERIFICATION,
                Some(
                    "the company's domain must serve its key document at https://DOMAIN/.well-known/cmr-vault naming the requester",
                ),
            ),
            ClientError::Verification(cmr_client::error::VerifyError::Checkpoint(m))
                if m.contains("this client pinned") =>
            {
                (
                    code::VERIFICATION,
                    Some(
                        "if the operator really changed the log key, pin the new one with `cmr config set --log-vkey \"$(cat cmr-log.pub)\"`; otherwise this is not your server",
                    ),
                )
            }
            ClientError::Malformed(_) | ClientError::Verification(_) => (
                code::VERIFICATION,
                Some("the server's answer did not verify; do not trust it, and report it"),
            ),
            ClientError::Local(_) => (
                code::LOCAL,
                Some("check the command's arguments and this device's state (`--help`)"),
            ),
        };
        Self {
            message: e.to_string(),
            hint: hint.map(str::to_string),
            code,
        }
    }
}

/// The result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// `cmr bench`'s errors, with the exit codes of the rest of the command line.
pub fn from_bench(e: cmr_bench::BenchError) -> CliError {
    match e {
        cmr_bench::BenchError::Local { message, hint } => CliError::local(message, hint),
        cmr_bench::BenchError::Verification { message, hint } => {
            CliError::with_code(code::VERIFICATION, message, hint.as_deref())
        }
        cmr_bench::BenchError::Client(e) => e.into(),
    }
}
