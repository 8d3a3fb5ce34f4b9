//! `cmr config`: show and change the server and the pinned log key of every identity in a
//! configuration folder.

use clap::Subcommand;
use cmr_core::identity::Role;
use serde_json::{Value, json};

use crate::error::{CliError, CliResult};
use crate::home::{self, Home, Saved};
use crate::out::Out;

/// Configuration commands.
#[derive(Subcommand)]
pub enum ConfigCmd {
    /// The server and pinned log key of each identity here, and the server commands use now
    /// (`CMR_SERVER` overrides the saved one).
    #[command(after_help = "Example:\n  cmr config show")]
    Show,
    /// Change the server and/or the pinned log key (of one role, or of every identity here).
    #[command(
        after_help = "Examples:\n  cmr config set --server https://vault.example\n  cmr config set --log-vkey \"$(cat cmr-log.pub)\" --role customer"
    )]
    Set {
        /// The vault server, `scheme://host:port`.
        #[arg(long)]
        server: Option<String>,
        /// The server's log verifier key (what `cmr serve` printed and wrote to its `.pub` file).
        #[arg(long)]
        log_vkey: Option<String>,
        /// Only this role: customer, company or auditor.
        #[arg(long)]
        role: Option<String>,
    },
}

const ROLES: [(Role, &str); 3] = [
    (Role::Customer, "customer"),
    (Role::Company, "company"),
    (Role::Auditor, "auditor"),
];

/// Runs a config command.
pub fn run(home: &Home, out: Out, cmd: ConfigCmd) -> CliResult {
    match cmd {
        ConfigCmd::Show => {
            let mut rows = Vec::new();
            for (role, name) in ROLES {
                if !home.exists(role) {
                    continue;
                }
                let saved: Saved<Value> = home.read_state(role)?;
                let using = home::server_for(&saved.server);
                out.line(format!("{name} {}", saved.identity));
                out.line(format!("  server   {}", saved.server));
                if using != saved.server {
                    out.line(format!("  (CMR_SERVER overrides it: {using})"));
                }
                out.line(format!("  log key  {}", saved.log_vkey));
                rows.push(json!({"role": name, "identity": saved.identity, "server": saved.server, "using": using, "log_vkey": saved.log_vkey}));
            }
            if rows.is_empty() {
                out.line("no identity in this configuration folder yet (`cmr customer init`)");
            }
            out.value(&json!({"identities": rows}));
        }
        ConfigCmd::Set {
            server,
            log_vkey,
            role,
        } => {
            if server.is_none() && log_vkey.is_none() {
                return Err(CliError::usage(
                    "nothing to change",
                    "give --server, --log-vkey, or both",
                ));
            }
            let roles: Vec<(Role, &str)> = match role.as_deref() {
                None => ROLES.to_vec(),
                Some(r) => vec![ROLES.into_iter().find(|(_, n)| *n == r).ok_or_else(|| {
                    CliError::usage(
                        format!("unknown role {r:?}"),
                        "roles: customer, company, auditor",
                    )
                })?],
            };
            let mut changed = Vec::new();
            for (role, name) in roles {
                if !home.exists(role) {
                    continue;
                }
                let mut saved: Saved<Value> = home.read_state(role)?;
                let new_server = server.clone().unwrap_or_else(|| saved.server.clone());
                let new_key = log_vkey.clone().unwrap_or_else(|| saved.log_vkey.clone());
                home::check_server(&new_server, &new_key)?;
                saved.server = new_server;
                saved.log_vkey = new_key;
                home.write_state(role, &saved)?;
                out.line(format!(
                    "{name}: server {}, log key {}",
                    saved.server, saved.log_vkey
                ));
                changed.push(name);
            }
            if changed.is_empty() {
                return Err(CliError::local(
                    "no identity to change in this configuration folder",
                    "run `cmr customer init` (or check --home)",
                ));
            }
            out.value(&json!({"changed": changed}));
        }
    }
    Ok(())
}

/// `cmr unlock`: opens the key file once and keeps the keys, sealed under a random session key, for
/// `minutes`; prints the `export` line that names the session for the commands that follow.
pub fn unlock(home: &Home, out: Out, role: Option<&str>, minutes: u64) -> CliResult {
    let (role, name) = match role {
        Some(r) => ROLES.into_iter().find(|(_, n)| *n == r).ok_or_else(|| {
            CliError::usage(
                format!("unknown role {r:?}"),
                "roles: customer, company, auditor",
            )
        })?,
        None => ROLES
            .into_iter()
            .find(|(role, _)| home.exists(*role))
            .ok_or_else(|| {
                CliError::local(
                    "no identity in this configuration folder",
                    "run `cmr customer init` first (or check --home)",
                )
            })?,
    };
    let saved: Saved<Value> = home.read_state(role)?;
    let who = format!("{name} {}", crate::out::short(&saved.identity));
    let until = crate::out::now() + minutes.clamp(1, 24 * 60) * 60;
    let token = home.unlock(role, &home::passphrase(false, &who)?, until)?;
    if out.json {
        out.value(&json!({"session": token, "until": until, "role": name}));
    } else {
        crate::out::print(&format!("export {}={token}", home::SESSION_ENV));
        eprintln!(
            "{who} unlocked until {}: run the line above (or `eval \"$(cmr unlock)\"`); `cmr lock` ends it",
            crate::out::time(until)
        );
    }
    Ok(())
}

/// `cmr lock`: ends every unlocked session in the folder.
pub fn lock(home: &Home, out: Out) -> CliResult {
    let any = home.lock()?;
    out.line(if any {
        "locked: the next command asks for the passphrase again"
    } else {
        "nothing was unlocked"
    });
    out.value(&json!({"locked": any}));
    Ok(())
}
