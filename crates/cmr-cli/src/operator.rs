//! `cmr operator`: what only the holder of the log key does on a running server (admitting auditors).

use std::path::PathBuf;

use clap::Subcommand;
use cmr_core::identity::IdentityId;
use cmr_log::admission::Admission;
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::out::{Out, now};

/// Where the operator's log key and server are.
#[derive(clap::Args)]
pub struct OperatorArgs {
    /// The log signing key file (the one `cmr serve` uses).
    #[arg(long, env = "CMR_LOG_KEY", default_value = "cmr-log.key")]
    log_key: PathBuf,
    /// The server's data folder (the log key must be outside it).
    #[arg(long, env = "CMR_DATA", default_value = "cmr-data")]
    data: PathBuf,
    /// The vault server.
    #[arg(long, env = "CMR_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
}

/// The operator's commands.
#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Admit an auditor: it may then read log entry bodies. The admission is signed with the log key and
    /// logged, so every auditor and customer sees who is one and since when.
    #[command(
        after_help = "Example:\n  cmr operator admit-auditor \"$(cmr --home ./audit audit id)\""
    )]
    AdmitAuditor {
        /// The auditor's identity (it registered first with `cmr audit register`).
        auditor: String,
        #[command(flatten)]
        at: OperatorArgs,
    },
    /// Dismiss an admitted auditor: from then on it reads no entry body it is not a party to.
    #[command(after_help = "Example:\n  cmr operator dismiss-auditor 3f1a…")]
    DismissAuditor {
        /// The auditor's identity.
        auditor: String,
        #[command(flatten)]
        at: OperatorArgs,
    },
}

/// Runs an operator command.
pub async fn run(out: Out, cmd: OperatorCmd) -> CliResult {
    let (auditor, at, admit) = match cmd {
        OperatorCmd::AdmitAuditor { auditor, at } => (auditor, at, true),
        OperatorCmd::DismissAuditor { auditor, at } => (auditor, at, false),
    };
    let auditor = IdentityId::from_hex(auditor.trim()).ok_or_else(|| {
        CliError::usage(
            format!("{auditor:?} is not an identity id (64 hex digits)"),
            "the auditor prints it with `cmr audit id`",
        )
    })?;
    let key = cmr_server::logkey::load(&at.log_key, Some(&at.data)).map_err(|e| {
        CliError::local(
            format!("log key {}: {e}", at.log_key.display()),
            "run this where `cmr serve` keeps its log key, or pass --log-key",
        )
    })?;
    let conn = crate::home::connection(&at.server)?;
    // A statement must be later than the last one about this auditor: two within one second (admit,
    // then dismiss at once) take the next second.
    let last = last_statement_time(&conn, &auditor, &key.verifier()).await?;
    let statement = Admission {
        auditor,
        admit,
        time: now().max(last.map_or(0, |t| t + 1)),
    }
    .sign(&key);
    let index = cmr_client::auditor::submit_admission(&conn, &statement).await?;
    let verb = if admit { "admitted" } else { "dismissed" };
    out.line(format!(
        "auditor {} {verb} at log index {index}",
        auditor.to_hex()
    ));
    out.value(&json!({"auditor": auditor.to_hex(), "admitted": admit, "index": index}));
    Ok(())
}

/// The time of the newest admission statement about `auditor` on the server, if any. The operator reads
/// its own server here, and opens each statement under its own log key.
async fn last_statement_time(
    conn: &cmr_client::transport::Connection,
    auditor: &IdentityId,
    log_key: &cmr_log::note::NoteVerifier,
) -> CliResult<Option<u64>> {
    use base64::Engine as _;
    let v = conn.get_json("/v1/auditors").await?;
    let mut last = None;
    for e in v["entries"].as_array().cloned().unwrap_or_default() {
        let body = e["body"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| cmr_log::entry::EntryBody::decode(&b).ok());
        let Some(body) = body else { continue };
        let Ok(note) = std::str::from_utf8(&body.payload) else {
            continue;
        };
        if let Ok(a) = Admission::open(note, log_key)
            && a.auditor == *auditor
        {
            last = last.max(Some(a.time));
        }
    }
    Ok(last)
}
