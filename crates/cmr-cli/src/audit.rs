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
    #[command(
        after_help = "Example:\n  cmr audit init --server http://127.0.0.1:8080 --log-vkey \"$(cat cmr-log.pub)\""
    )]
    Init {
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// Register the auditor with the server. It reads entry bodies (never records) only once the
    /// operator admits it (`cmr operator admit-auditor`).
    #[command(after_help = "Example:\n  cmr audit register")]
    Register,
    /// Print this auditor's identity; needs no passphrase.
    #[command(after_help = "Example:\n  cmr operator admit-auditor \"$(cmr audit id)\"")]
    Id,
    /// Verify the log: from the last saved state (incremental), or from the start with --full.
    ///
    /// Prints a report; exits 3 on any violation or fork.
    #[command(after_help = "Example:\n  cmr audit verify")]
    Verify {
        /// Start from the first entry, ignoring the saved state.
        #[arg(long)]
        full: bool,
    },
    /// Create a witness key (C2SP tlog-cosignature) and print its verifier key for the operator's
    /// `cmr serve --witness`. Witnessing needs no auditor identity.
    #[command(
        after_help = "Example:\n  cmr audit witness-init --name witness.example/w1 --log-vkey \"$(cat cmr-log.pub)\""
    )]
    WitnessInit {
        /// The witness's name, such as witness.example/w1.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// Cosign the log's current checkpoint, if it is consistent with the last one this witness cosigned.
    #[command(after_help = "Example:\n  cmr audit witness")]
    Witness,
    /// Check a single entry: its inclusion in the latest verified checkpoint, and what it records.
    #[command(after_help = "Example:\n  cmr audit proof 42")]
    Proof {
        /// The log index.
        index: u64,
    },
}

/// Runs an audit command.
pub async fn run(home: &Home, out: Out, cmd: AuditCmd) -> CliResult {
    if let AuditCmd::Init { at } = &cmd {
        let (server, log_vkey) = (&at.server, &at.log_vkey);
        home::check_server(server, log_vkey)?;
        home.refuse_existing(Role::Auditor)?;
        let (keys, inception, _) = cmr_client::session::Session::create(Role::Auditor);
        let id = keys.identity;
        let passphrase = home::passphrase(
            true,
            &format!("auditor {}", crate::out::short(&id.to_hex())),
        )?;
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
    if let AuditCmd::WitnessInit { name, at } = &cmd {
        return witness_init(home, out, name, &at.server, &at.log_vkey);
    }
    if let AuditCmd::Witness = cmd {
        return witness(home, out).await;
    }
    if let AuditCmd::Id = cmd {
        return crate::customer::print_id(home, out, Role::Auditor);
    }
    let (mut session, mut saved) = home::open_session::<AuditorRole>(home, Role::Auditor)?;
    saved.session.apply(&mut session)?;
    let result = match cmd {
        AuditCmd::Init { .. } | AuditCmd::Id | AuditCmd::WitnessInit { .. } | AuditCmd::Witness => {
            Err(CliError::local(
                "this command runs on its own",
                "report this",
            ))
        }
        AuditCmd::Register => {
            home::register(&mut session, &mut saved, "audit").await?;
            out.line("auditor registered");
            out.value(&json!({"registered": true}));
            Ok(())
        }
        AuditCmd::Verify { full } => {
            let me = session.keys.identity;
            if !session.auditors().await?.is_admitted(&me) {
                return Err(CliError::with_code(
                    code::REFUSED,
                    format!(
                        "this auditor ({}) is not admitted by the operator",
                        me.to_hex()
                    ),
                    Some(
                        "ask the operator to run `cmr operator admit-auditor <your id>`; `cmr audit id` prints it",
                    ),
                ));
            }
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

/// A witness's state: its server, the log it witnesses, and the last checkpoint it cosigned.
#[derive(Serialize, Deserialize)]
struct WitnessState {
    server: String,
    log_vkey: String,
    last: Option<String>,
}

fn witness_init(home: &Home, out: Out, name: &str, server: &str, log_vkey: &str) -> CliResult {
    home::check_server(server, log_vkey)?;
    if home.witness_key_path().exists() {
        return Err(CliError::local(
            "a witness key already exists here",
            "use it, or choose another --home",
        ));
    }
    let seed = cmr_log::entry::draw_salt(&mut rand::rng());
    let signer = cmr_log::note::NoteSigner::new(
        name,
        cmr_log::note::TYPE_COSIGNATURE,
        cmr_core::keys::SigningKey::from_seed(&seed),
    )
    .map_err(|e| {
        CliError::local(
            format!("the witness name {name:?} does not work: {e}"),
            "use a name like witness.example/w1",
        )
    })?;
    let state = WitnessState {
        server: server.into(),
        log_vkey: log_vkey.into(),
        last: None,
    };
    home.write_witness(
        signer.to_skey().as_bytes(),
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
    )?;
    let vkey = signer.verifier().to_vkey();
    out.line(format!("witness key created; give the operator this verifier key for `cmr serve --witness`:\n  {vkey}"));
    out.value(&json!({"witness_vkey": vkey}));
    Ok(())
}

async fn witness(home: &Home, out: Out) -> CliResult {
    let (skey, state) = home.read_witness()?;
    let mut state: WitnessState = serde_json::from_slice(&state).map_err(|e| {
        CliError::local(
            format!("the witness state is damaged: {e}"),
            "run `cmr audit witness-init` in a new --home",
        )
    })?;
    let signer =
        cmr_log::note::NoteSigner::from_skey(std::str::from_utf8(&skey).unwrap_or_default())
            .map_err(|e| {
                CliError::local(
                    format!("the witness key is damaged: {e}"),
                    "run `cmr audit witness-init` in a new --home",
                )
            })?;
    let log_key = cmr_log::note::NoteVerifier::from_vkey(&state.log_vkey)
        .map_err(|e| CliError::local(e.to_string(), "check the log key"))?;
    let mut w = match &state.last {
        Some(last) => cmr_log::witness::Witness::resume(signer, log_key, last),
        None => cmr_log::witness::Witness::new(signer, log_key),
    }
    .map_err(|e| CliError::local(e.to_string(), "check the witness state"))?;
    let conn = crate::home::connection(&crate::home::server_for(&state.server))?;
    let note = conn.get_text("/v1/log/checkpoint").await?;
    let bad = |e: String| {
        CliError::with_code(
            code::VERIFICATION,
            format!("the checkpoint does not parse: {e}"),
            Some("keep it as evidence"),
        )
    };
    let text = cmr_log::note::Note::parse(&note)
        .map_err(|e| bad(e.to_string()))?
        .text;
    let cp = cmr_log::checkpoint::Checkpoint::parse_text(&text).map_err(|e| bad(e.to_string()))?;
    let proof: Vec<[u8; 32]> = match w.last() {
        Some(last) if last.size > 0 && cp.size > last.size => {
            let v = conn
                .get_json(&format!(
                    "/v1/log/proofs/consistency?old={}&new={}",
                    last.size, cp.size
                ))
                .await?;
            v["proof"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| B64.decode(h.as_str()?).ok()?.try_into().ok())
                        .collect()
                })
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let line = w.cosign(&note, &proof, now()).map_err(|e| {
        CliError::with_code(
            code::VERIFICATION,
            format!("refusing to cosign: {e}"),
            Some("the log may have forked or rolled back: keep this checkpoint as evidence"),
        )
    })?;
    let v = conn
        .post_unsigned("/v1/log/cosignatures", &json!({"line": line}))
        .await?;
    state.last = Some(note);
    home.write_witness_state(&serde_json::to_vec_pretty(&state).unwrap_or_default())?;
    out.line(format!(
        "cosigned the checkpoint of size {} ({} cosigners now)",
        cp.size,
        v["cosigners"].as_array().map_or(0, Vec::len)
    ));
    out.value(&json!({"size": cp.size, "cosigners": v["cosigners"]}));
    Ok(())
}
