//! `cmr audit`: verifying the log without trusting the operator.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use cmr_core::identity::Role;
use cmr_log::auditor::Auditor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{CliError, CliResult, code};
use crate::home::{self, Home, Saved};
use crate::out::{Out, now};

/// The auditor's part of the state file.
#[derive(Default, Serialize, Deserialize)]
pub struct AuditorRole {
    /// The auditor's snapshot after the last verification (incremental runs start from it).
    pub snapshot: Option<String>,
}

/// The auditor's commands.
#[derive(Subcommand)]
pub enum AuditCmd {
    /// Create an auditor identity, sealed with a passphrase.
    Init {
        /// The vault server.
        #[arg(long, env = "CMR_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// The server's log verifier key.
        #[arg(long, env = "CMR_LOG_VKEY")]
        log_vkey: String,
    },
    /// Register the auditor with the server (auditors may fetch entry bodies, never records).
    Register,
    /// Print this auditor's identity; needs no passphrase.
    Id,
    /// Verify the log: from the last saved state (incremental), or from the start with --full.
    ///
    /// Prints a report; exits 3 on any violation or fork.
    Verify {
        /// Start from the first entry, ignoring the saved state.
        #[arg(long)]
        full: bool,
    },
    /// Check a single entry: its inclusion in the latest verified checkpoint, and what it records.
    Proof {
        /// The log index.
        index: u64,
    },
}

/// Runs an audit command.
pub async fn run(home: &Home, out: Out, cmd: AuditCmd) -> CliResult {
    if let AuditCmd::Init { server, log_vkey } = &cmd {
        home::check_server(server, log_vkey)?;
        home.refuse_existing(Role::Auditor)?;
        let (keys, inception, _) = cmr_client::session::Session::create(Role::Auditor);
        let id = keys.identity;
        let passphrase = home::passphrase(true)?;
        home.write_key(Role::Auditor, &keys, &passphrase)?;
        home.write_state(
            Role::Auditor,
            &Saved {
                identity: id.to_hex(),
                server: server.clone(),
                log_vkey: log_vkey.clone(),
                inception: Some(B64.encode(inception.encode())),
                registered: false,
                session: Default::default(),
                role: AuditorRole::default(),
            },
        )?;
        out.line(format!(
            "auditor identity {} created; next: cmr audit register",
            id.to_hex()
        ));
        out.value(&json!({"identity": id.to_hex()}));
        return Ok(());
    }
    if let AuditCmd::Id = cmd {
        return crate::customer::print_id(home, out, Role::Auditor);
    }
    let (mut session, mut saved) = home::open_session::<AuditorRole>(home, Role::Auditor)?;
    saved.session.apply(&mut session)?;
    let result = match cmd {
        AuditCmd::Init { .. } | AuditCmd::Id => Err(CliError::local(
            "this command runs on its own",
            "report this",
        )),
        AuditCmd::Register => {
            if !saved.registered {
                let inception = saved
                    .inception
                    .as_deref()
                    .and_then(|s| B64.decode(s).ok())
                    .ok_or_else(|| {
                        CliError::local(
                            "the inception is missing from the state",
                            "run `cmr audit init` again in a new --home",
                        )
                    })?;
                session.register_identity(&inception, now()).await?;
                saved.registered = true;
            }
            out.line("auditor registered");
            out.value(&json!({"registered": true}));
            Ok(())
        }
        AuditCmd::Verify { full } => {
            let pinned = session.log.key().clone();
            let mut auditor = match (&saved.role.snapshot, full) {
                (Some(s), false) => Auditor::restore(pinned, s).map_err(|e| {
                    CliError::local(
                        format!("the saved audit state does not load: {e}"),
                        "run `cmr audit verify --full`",
                    )
                })?,
                _ => Auditor::new(pinned),
            };
            let from = auditor.verified().map_or(0, |c| c.size);
            let report = cmr_client::auditor::audit(&mut auditor, &session).map_err(|e| {
                CliError::with_code(
                    code::UNREACHABLE,
                    format!("the audit could not run: {e}"),
                    Some("check the server"),
                )
            })?;
            saved.role.snapshot = Some(auditor.snapshot());
            for (kind, n) in &report.counts {
                out.line(format!("  {kind:<20} {n}"));
            }
            out.line(format!("verified entries {from}..{} against the signed checkpoint; {} redacted (erased); {} violations", report.size, report.redacted.len(), report.violations.len()));
            for v in &report.violations {
                out.line(format!("  VIOLATION: {v:?}"));
            }
            out.value(&json!({"from": from, "size": report.size, "counts": report.counts, "redacted": report.redacted, "violations": report.violations.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>()}));
            if report.is_clean() {
                Ok(())
            } else {
                Err(CliError::with_code(
                    code::VERIFICATION,
                    format!("{} violations in the log", report.violations.len()),
                    Some("keep this report: it is evidence"),
                ))
            }
        }
        AuditCmd::Proof { index } => proof(&mut session, out, index).await,
    };
    saved.session = cmr_client::state::SessionState::of(&session);
    home.write_state(Role::Auditor, &saved)?;
    result
}

async fn proof(session: &mut cmr_client::session::Session, out: Out, index: u64) -> CliResult {
    let cp = session.refresh().await?;
    if index >= cp.size {
        return Err(CliError::local(
            format!("entry {index} is beyond the checkpoint (size {})", cp.size),
            "check the index",
        ));
    }
    let body = session
        .post(&format!("/v1/log/entries/{index}"), &json!({}))
        .await?;
    let proof = session
        .conn
        .get_json(&format!(
            "/v1/log/proofs/inclusion?index={index}&size={}",
            cp.size
        ))
        .await?;
    let entry = json!({"index": index, "salt": body["salt"], "body": body["body"], "proof": proof["proof"]});
    let salt = B64
        .decode(entry["salt"].as_str().unwrap_or_default())
        .ok()
        .and_then(|s| <[u8; 32]>::try_from(s).ok());
    let bytes = B64.decode(entry["body"].as_str().unwrap_or_default()).ok();
    let hashes: Option<Vec<[u8; 32]>> = entry["proof"].as_array().map(|a| {
        a.iter()
            .filter_map(|h| B64.decode(h.as_str()?).ok()?.try_into().ok())
            .collect()
    });
    let (Some(salt), Some(bytes), Some(hashes)) = (salt, bytes, hashes) else {
        return Err(CliError::with_code(
            code::VERIFICATION,
            "the server's answer is malformed",
            None,
        ));
    };
    let salted = cmr_log::entry::SaltedBody { salt, body: bytes };
    let e = cmr_client::verify::check_inclusion(&cp, index, &salted, &hashes).map_err(|e| {
        CliError::with_code(
            code::VERIFICATION,
            e.to_string(),
            Some("the server's answer did not verify"),
        )
    })?;
    out.line(format!(
        "entry {index}: {} at server time {}, by {}",
        e.kind.name(),
        e.time,
        e.subject.to_hex()
    ));
    out.line(format!(
        "included in the checkpoint of size {} (root {}), signed by the pinned log key",
        cp.size,
        hex::encode(cp.root)
    ));
    out.value(&json!({"index": index, "kind": e.kind.name(), "time": e.time, "subject": e.subject.to_hex(), "size": cp.size, "root": hex::encode(cp.root)}));
    Ok(())
}
