//! `cmr customer`: a customer's vault from the command line.
//!
//! This module holds the commands' definitions, loading the customer, and the commands that run on
//! their own (init, id, recover, a new or joining device); the others run in their group's module:
//! `records` (profile, transactions), `consent` (requests, grants, revocations, rotation, blocks, policy,
//! receipts, disputes), `devices`, `vault` (registration, history, auditors, export, erasure).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use cmr_client::ClientError;
use cmr_client::customer::{Approval, Customer};
use cmr_client::state::{CustomerState, KeyBackup};
use cmr_client::wellknown::{self, Mode};
use cmr_core::consent::{Access, Body, StatementId};
use cmr_core::decision::GrantStatus;
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::{IdentityId, Role};
use cmr_core::record::RecordId;
use cmr_core::vault::VaultKey;
use cmr_core::wrap::WrappedKey;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::home::{self, Home, Saved};
use crate::out::{Out, now, parse_id, short};

mod consent;
mod devices;
mod records;
mod ui;
mod vault;

/// The customer's part of the state file.
#[derive(Serialize, Deserialize)]
pub struct CustomerRole {
    /// The vault key wrapped to this device (HPKE), base64.
    pub vault_key: String,
    /// The SDK's state (secrets sealed under the vault key); none on a new device until it joins.
    pub sdk: Option<CustomerState>,
    /// Companies whose domain proof the customer checked: (identity hex, domain, name).
    pub companies: Vec<(String, String, String)>,
    /// The vault key wrapped to the recovery key of key event `recovery_seq`, base64 (for the backup).
    #[serde(default)]
    pub recovery_wrap: String,
    /// The key event whose recovery key `recovery_wrap` is wrapped to.
    #[serde(default)]
    pub recovery_seq: u64,
    /// The version of the key backup last stored on the server.
    #[serde(default)]
    pub backup_version: u64,
    /// What that backup held (a digest of its families, epochs, directory and grants), to store a new
    /// one only when it changes.
    #[serde(default)]
    pub backup_digest: String,
    /// The log index of this vault's erasure, once `erase --vault` ran here: nothing more can be done.
    #[serde(default)]
    pub vault_erased_at: Option<u64>,
}

impl CustomerRole {
    /// A device that has no vault yet (a new device before it joins, or a recovery before its second
    /// step).
    fn not_joined() -> Self {
        Self {
            vault_key: String::new(),
            sdk: None,
            companies: vec![],
            recovery_wrap: String::new(),
            recovery_seq: 0,
            backup_version: 0,
            backup_digest: String::new(),
            vault_erased_at: None,
        }
    }
}

/// The customer's commands.
#[derive(Subcommand)]
pub enum CustomerCmd {
    /// Create the identity, the first device and the vault key, sealed with a passphrase.
    ///
    /// The recovery phrase is shown once: write it down and keep it offline. Nothing is sent yet; run
    /// `cmr customer register` next.
    #[command(
        after_help = "Example:\n  cmr customer init --server http://127.0.0.1:8080 --log-vkey \"$(cat cmr-log.pub)\""
    )]
    Init {
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// Register the identity and the device, and publish the key directory with the profile sections.
    #[command(after_help = "Example:\n  cmr customer register")]
    Register,
    /// Print this customer's identity (to give to companies); needs no passphrase.
    #[command(after_help = "Example:\n  cmr customer id")]
    Id,
    /// The profile: identity, contact, address, preferences.
    #[command(
        after_help = "Example:\n  cmr customer profile set contact \"email: alex@example.org\""
    )]
    Profile {
        #[command(subcommand)]
        cmd: ProfileCmd,
    },
    /// Transactions with one company.
    #[command(after_help = "Example:\n  cmr customer tx add --company 6f51… \"coffee 3.20\"")]
    Tx {
        #[command(subcommand)]
        cmd: TxCmd,
    },
    /// The access requests not answered yet: who asks, what, why, for how long, with which look-back.
    #[command(after_help = "Example:\n  cmr customer requests")]
    Requests,
    /// Approve a request, as asked or narrowed, after checking the company's domain.
    #[command(
        after_help = "Examples:\n  cmr customer approve 3f2a… --domain bank.example\n  cmr customer approve 3f2a… --domain bank.example --lookback 3 --only transactions:read --duration 30"
    )]
    Approve {
        /// The request's id (from `cmr customer requests`).
        request: String,
        /// The company's domain: its key document at https://DOMAIN/.well-known/cmr-vault must name it.
        #[arg(long)]
        domain: String,
        /// Narrow the look-back to this many months.
        #[arg(long)]
        lookback: Option<u32>,
        /// Grant only these scopes, as SCOPE:ACCESS (read, append, read+append); repeatable.
        #[arg(long = "only")]
        only: Vec<String>,
        /// Last shorter than asked: once, a number of days, or persistent (no longer than asked).
        #[arg(long)]
        duration: Option<String>,
        /// Fetch the key document over plain http (tests only; proves nothing about a real domain).
        #[arg(long)]
        insecure_http_for_tests: bool,
    },
    /// Grant a company access it did not ask for, after checking its domain.
    #[command(
        after_help = "Example:\n  cmr customer grant --company 6f51… --domain bank.example --scope transactions:read --purpose \"mortgage\" --lookback 6"
    )]
    Grant {
        /// The company's identity.
        #[arg(long)]
        company: String,
        /// The company's domain (its key document must name it).
        #[arg(long)]
        domain: String,
        /// SCOPE:ACCESS, repeatable. Scopes: profile.identity, profile.contact, profile.address,
        /// profile.preferences, profile.inferred, transactions. Access: read, append or read+append
        /// (appending only to one of transactions and profile.inferred).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Why, in words (the company and the receipt show it).
        #[arg(long)]
        purpose: String,
        /// How many months of history.
        #[arg(long, default_value_t = 12)]
        lookback: u32,
        /// once, persistent, or a number of days.
        #[arg(long, default_value = "persistent")]
        duration: String,
        /// Fetch the key document over plain http (tests only).
        #[arg(long)]
        insecure_http_for_tests: bool,
    },
    /// Deny a request.
    #[command(after_help = "Example:\n  cmr customer deny 3f2a… --reason \"not now\"")]
    Deny {
        /// The request's id.
        request: String,
        /// Why, in words (the company sees it).
        #[arg(long, default_value = "declined")]
        reason: String,
    },
    /// The grants issued, and whether each is active.
    #[command(after_help = "Example:\n  cmr customer grants")]
    Grants,
    /// Revoke a grant, then rotate the families it could read (one new key seal per remaining grantee).
    #[command(after_help = "Example:\n  cmr customer revoke 8c1d… --reason \"moved banks\"")]
    Revoke {
        /// The grant's id.
        grant: String,
        /// Why, in words.
        #[arg(long, default_value = "revoked by the customer")]
        reason: String,
    },
    /// Block a company (its requests are refused), or unblock it.
    #[command(after_help = "Example:\n  cmr customer block 6f51…")]
    Block {
        /// The company's identity.
        company: String,
        /// Unblock instead.
        #[arg(long)]
        unblock: bool,
    },
    /// Which unsolicited requests this vault accepts, beyond the vault limits (5 waiting from one
    /// company, 100 in all): show it, or set it (the new policy replaces the old one)
    #[command(
        after_help = "Examples:\n  cmr customer policy\n  cmr customer policy --granted-only --daily-cap 10\n  cmr customer policy --anyone --no-cap"
    )]
    Policy {
        /// Accept requests only from companies holding an active grant.
        #[arg(long, conflicts_with = "anyone")]
        granted_only: bool,
        /// Accept requests from any company (the default).
        #[arg(long)]
        anyone: bool,
        /// Accept at most this many requests in any 24 hours.
        #[arg(long, conflicts_with = "no_cap", value_parser = clap::value_parser!(u32).range(1..))]
        daily_cap: Option<u32>,
        /// Remove the daily cap.
        #[arg(long)]
        no_cap: bool,
    },
    /// The companies this vault knows (it granted, or whose domain it checked): each one's verified
    /// domain and fingerprint, its active grants, and whether it is blocked.
    #[command(after_help = "Example:\n  cmr customer companies")]
    Companies,
    /// What this client verified: the newest log checkpoint (consistent with every one it saw before),
    /// and this vault's own chain, complete and linked, with every entry it acknowledged on it.
    #[command(after_help = "Example:\n  cmr customer status")]
    Status,
    /// Who read or wrote what, when, and under which grant: the verified chain of the vault's entries.
    #[command(after_help = "Example:\n  cmr customer history")]
    History,
    /// Follow the vault as it changes: each new entry on your chain (a request, a company's read or
    /// append, a consent statement) is printed as it is logged, after the same checks as `history`.
    /// Runs until Ctrl-C; with --json, one JSON object a line.
    #[command(after_help = "Example:\n  cmr customer watch")]
    Watch,
    /// Accept the vault's log after the operator restored it from a backup. The client refuses a log
    /// shorter than the one it saw; when the log says it was restored, and you accept that what
    /// happened after the backup is gone (grants, records, changes), this takes the restored log as
    /// the one to check from now on.
    #[command(after_help = "Example:\n  cmr customer accept-restore")]
    AcceptRestore,
    /// Finish every rotation the log says is owed: after a grant was used up, expired or revoked, or a
    /// device revoked, its families get fresh keys; until then companies' appends to them wait. Other
    /// commands do this by themselves when they meet a family that waits.
    #[command(after_help = "Example:\n  cmr customer rotate")]
    Rotate,
    /// The auditors the operator admitted (they may read log entry bodies, never records), and since
    /// when: each admission checked in the log and signed with the log key.
    #[command(after_help = "Example:\n  cmr customer auditors")]
    Auditors,
    /// A consent receipt (Kantara style) for a grant.
    #[command(after_help = "Example:\n  cmr customer receipt 8c1d…")]
    Receipt {
        /// The grant's id.
        grant: String,
    },
    /// Devices: a new device asks to join, a device with the identity key adds it, and the new device
    /// joins with the file it gets; list and revoke.
    #[command(after_help = "Example:\n  cmr customer device list")]
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Export the whole vault, decrypted, as JSON (to a file with --out).
    #[command(after_help = "Example:\n  cmr customer export --out vault.json")]
    Export {
        /// Write here (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Erase a family's records (the log keeps only that an erasure happened), or the whole vault.
    #[command(
        after_help = "Examples:\n  cmr customer erase --scope transactions --company 6f51… --yes\n  cmr customer erase --vault --yes"
    )]
    Erase {
        /// The family's scope: identity, contact, address, preferences, inferred or transactions.
        #[arg(long, required_unless_present = "vault")]
        scope: Option<String>,
        /// For transactions and inferred attributes: the company.
        #[arg(long)]
        company: Option<String>,
        /// Erase the whole vault.
        #[arg(long, conflicts_with = "scope")]
        vault: bool,
        /// Confirm: erasure cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Recover the vault on a new device with the recovery phrase, after losing every device.
    ///
    /// The phrase is asked for (or read from CMR_RECOVERY_PHRASE in scripts), never given as a flag. The
    /// identity key rotates to the one the phrase reveals, this device is certified, the vault key is
    /// opened from the server's key backup, every other device is revoked, every family rotates, and a
    /// new recovery phrase is shown once.
    #[command(
        after_help = "Example:\n  cmr --home ./new-phone customer recover --identity 9e78… --log-vkey \"$(cat cmr-log.pub)\""
    )]
    Recover {
        /// The identity to recover.
        #[arg(long)]
        identity: String,
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// Open the consent dashboard: a web app on this machine (127.0.0.1) that does what these commands
    /// do, with the key unlocked here. It prints a link with a one-session token; open it in a browser.
    #[command(after_help = "Example:\n  cmr customer ui            # then open the link it prints")]
    Ui(ui::UiArgs),
    /// Dispute (reject) an inferred attribute a company appended.
    #[command(after_help = "Example:\n  cmr customer dispute --company 6f51… 0c4e…")]
    Dispute {
        /// The company that inferred it.
        #[arg(long)]
        company: String,
        /// The record's id (from `cmr customer profile show`).
        record: String,
    },
}

/// Device commands.
#[derive(Subcommand)]
pub enum DeviceCmd {
    /// On the new device: create its keys and print its request to join the identity.
    #[command(
        after_help = "Example (on the new device):\n  cmr --home ./laptop customer device new --identity 9e78… --log-vkey \"$(cat cmr-log.pub)\""
    )]
    New {
        /// The identity to join.
        #[arg(long)]
        identity: String,
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// On the device with the identity key: certify a new device and write its enrolment file.
    #[command(
        after_help = "Example:\n  cmr customer device add \"$(cat request.txt)\" --out enrol.json"
    )]
    Add {
        /// The request printed by `cmr customer device new`.
        request: String,
        /// The enrolment file to carry to the new device (mode 0600; its secrets are sealed to it).
        #[arg(long)]
        out: PathBuf,
    },
    /// On the new device: join with the enrolment file.
    #[command(after_help = "Example:\n  cmr --home ./laptop customer device join enrol.json")]
    Join {
        /// The file from `cmr customer device add`.
        file: PathBuf,
    },
    /// The devices, from the verified key events.
    #[command(after_help = "Example:\n  cmr customer device list")]
    List,
    /// Revoke a device, then rotate every family (it held the vault key) and replace the vault key.
    #[command(after_help = "Example:\n  cmr customer device revoke 41b7…")]
    Revoke {
        /// The device's id.
        device: String,
    },
}

/// What a new device receives to join its vault: the certificate, the vault key wrapped to the device,
/// and the client state (its secrets sealed under the vault key).
#[derive(Serialize, Deserialize)]
struct Enrolment {
    certificate: String,
    vault_key: String,
    sdk: CustomerState,
    companies: Vec<(String, String, String)>,
    recovery_wrap: String,
    recovery_seq: u64,
    backup_version: u64,
}

/// Profile commands.
#[derive(Subcommand)]
pub enum ProfileCmd {
    /// Set a section: identity, contact, address or preferences.
    #[command(
        after_help = "Example:\n  cmr customer profile set address \"1 Main St, Springfield\""
    )]
    Set {
        /// The section.
        section: String,
        /// The text.
        text: String,
    },
    /// Show every section, and the attributes companies inferred.
    #[command(after_help = "Example:\n  cmr customer profile show")]
    Show,
}

/// Transaction commands.
#[derive(Subcommand)]
pub enum TxCmd {
    /// Add a transaction.
    #[command(
        after_help = "Example:\n  cmr customer tx add --company 6f51… --month 2026-11 \"coffee 3.20\""
    )]
    Add {
        /// The counterparty company.
        #[arg(long)]
        company: String,
        /// The month, YYYY-MM (default: this month).
        #[arg(long)]
        month: Option<String>,
        /// The transaction, in words.
        text: String,
    },
    /// Import transactions from CSV (month,text) or JSON ([{"month": "YYYY-MM", "text": "..."}]).
    #[command(
        after_help = "Example:\n  cmr customer tx import --company 6f51… statement.csv   # month,text lines; safe to run again"
    )]
    Import {
        /// The counterparty company.
        #[arg(long)]
        company: String,
        /// The file.
        file: PathBuf,
    },
    /// List transactions.
    #[command(after_help = "Example:\n  cmr customer tx list --company 6f51… --from 2026-01")]
    List {
        /// The counterparty company.
        #[arg(long)]
        company: String,
        /// From this month (default: 2000-01).
        #[arg(long)]
        from: Option<String>,
        /// To this month (default: this month).
        #[arg(long)]
        to: Option<String>,
    },
}

pub(crate) fn parse_month(s: &str) -> CliResult<Period> {
    Period::parse(s).ok_or_else(|| {
        CliError::local(
            format!("{s:?} is not a month"),
            "write YYYY-MM, from 2000-01",
        )
    })
}

pub(crate) fn this_month() -> CliResult<Period> {
    Period::from_unix(now() as i64)
        .ok_or_else(|| CliError::local("the clock is before 2000", "set the clock"))
}

/// A transaction's month: not after the current one (in the earliest time zone, UTC+14, so that nobody's
/// "this month" is refused). A future month is refused at entry, so every stored transaction is listed by
/// `tx list`, whose range ends at the current month.
pub(crate) fn transaction_month(m: Period) -> CliResult<Period> {
    let latest = Period::from_unix(now() as i64 + 14 * 3600)
        .ok_or_else(|| CliError::local("the clock is before 2000", "set the clock"))?;
    if m > latest {
        return Err(CliError::usage(
            format!("{m} is a future month"),
            format!("a transaction is recorded in the month it happened, {latest} at the latest"),
        ));
    }
    Ok(m)
}

pub(crate) fn parse_scope_access(s: &str) -> CliResult<(Scope, Access)> {
    let (scope, access) = s.split_once(':').unwrap_or((s, "read"));
    let scope = Scope::from_name(scope).ok_or_else(|| {
        CliError::local(
            format!("unknown scope {scope:?}"),
            "scopes: profile.identity, profile.contact, profile.address, profile.preferences, profile.inferred, transactions",
        )
    })?;
    let access = match access {
        "read" => Access::Read,
        "append" => Access::Append,
        "read+append" => Access::ReadAppend,
        other => {
            return Err(CliError::local(
                format!("unknown access {other:?}"),
                "use read, append or read+append",
            ));
        }
    };
    Ok((scope, access))
}

fn section(s: &str) -> CliResult<Scope> {
    let scope = Scope::from_name(&format!("profile.{s}")).or_else(|| Scope::from_name(s));
    match scope {
        Some(sc) if FamilyName::profile(sc).is_some() => Ok(sc),
        _ => Err(CliError::local(
            format!("unknown profile section {s:?}"),
            "sections: identity, contact, address, preferences",
        )),
    }
}

const SECTIONS: [Scope; 4] = [
    Scope::ProfileIdentity,
    Scope::ProfileContact,
    Scope::ProfileAddress,
    Scope::ProfilePreferences,
];

/// A loaded customer, saved back when dropped through [`Loaded::save`].
struct Loaded {
    customer: Customer,
    vault: VaultKey,
    saved: Saved<CustomerRole>,
    /// The vault key this run replaced (after revoking a device, or in recovery): other devices' backups
    /// are still sealed under it, and this device's state, under the new one, supersedes them.
    replaced: Option<VaultKey>,
}

impl Loaded {
    fn open(home: &Home) -> CliResult<Self> {
        let (session, saved) = home::open_session::<CustomerRole>(home, Role::Customer)?;
        if saved.role.sdk.is_none() {
            return Err(not_joined());
        }
        let wrapped = B64
            .decode(&saved.role.vault_key)
            .ok()
            .and_then(|b| WrappedKey::from_slice(&b).ok())
            .ok_or_else(|| {
                CliError::local(
                    "the wrapped vault key is damaged",
                    "restore the state file from a backup",
                )
            })?;
        let vault =
            VaultKey::unwrap_as_device(session.keys.identity, &session.keys.device, &wrapped)
                .map_err(|_| {
                    CliError::local(
                        "the vault key does not open with this device",
                        "check --home",
                    )
                })?;
        let customer = saved
            .role
            .sdk
            .as_ref()
            .ok_or_else(not_joined)?
            .restore(session, &vault)?;
        Ok(Self {
            customer,
            vault,
            saved,
            replaced: None,
        })
    }

    /// Saves the state file, then keeps the server's key backup up to date: a new version whenever the
    /// families, their epochs, the directory or the grants changed (so recovery finds every secret).
    async fn save(&mut self, home: &Home) -> CliResult {
        let sdk = CustomerState::save(&self.customer, &self.vault);
        self.saved.session = sdk.session.clone();
        let digest = backup_digest(&sdk);
        self.saved.role.sdk = Some(sdk.clone());
        home.write_state(Role::Customer, &self.saved)?;
        if !self.saved.registered
            || self.saved.role.vault_erased_at.is_some()
            || self.customer.directory.is_none()
            || digest == self.saved.role.backup_digest
        {
            return Ok(());
        }
        let backup = KeyBackup::seal(
            self.saved.role.recovery_seq,
            self.saved.role.recovery_wrap.clone(),
            &sdk,
            &self.vault,
            self.customer.id(),
        );
        let mut version = self.saved.role.backup_version + 1;
        if let Err(e) = self.customer.put_backup(&backup, version).await {
            if e.problem() != Some(cmr_core::problem::Code::BackupConflict) {
                return Err(CliError::from(e));
            }
            // Another device stored one since: merge what it knows into this device's state, then store
            // the union (a backup under another vault key means this device was cut off: stop).
            let (theirs, remote) = Customer::get_backup(&self.customer.session)
                .await?
                .ok_or_else(|| {
                    CliError::local("the key backup vanished", "run the command again")
                })?;
            let mut merged = self.saved.role.sdk.clone().ok_or_else(not_joined)?;
            match (remote.open(&self.vault, self.customer.id()), &self.replaced) {
                (Ok(remote), _) => merged.merge(&remote),
                // This run replaced the vault key: the other backup is under the old one, and the
                // devices that wrote it must join again. This device's state stands.
                (Err(_), Some(_)) => {}
                (Err(_), None) => {
                    return Err(CliError::local(
                        "another device replaced the vault key: this device no longer holds it",
                        "join again from a device that does (`cmr customer device add`)",
                    ));
                }
            }
            let backup = KeyBackup::seal(
                self.saved.role.recovery_seq,
                self.saved.role.recovery_wrap.clone(),
                &merged,
                &self.vault,
                self.customer.id(),
            );
            version = theirs + 1;
            self.customer.put_backup(&backup, version).await?;
            self.saved.role.sdk = Some(merged);
        }
        self.saved.role.backup_version = version;
        self.saved.role.backup_digest = digest;
        home.write_state(Role::Customer, &self.saved)
    }
}

/// Runs a customer command.
pub async fn run(home: &Home, out: Out, cmd: CustomerCmd) -> CliResult {
    if let CustomerCmd::Init { at } = cmd {
        return init(home, out, &at.server, &at.log_vkey);
    }
    if let CustomerCmd::Id = cmd {
        return print_id(home, out, Role::Customer);
    }
    if let CustomerCmd::Device {
        cmd: DeviceCmd::New { identity, at },
    } = &cmd
    {
        return device_new(home, out, identity, &at.server, &at.log_vkey);
    }
    if let CustomerCmd::Device {
        cmd: DeviceCmd::Join { file },
    } = &cmd
    {
        return device_join(home, out, file).await;
    }
    if let CustomerCmd::Ui(args) = cmd {
        return ui::run(home, args).await;
    }
    if let CustomerCmd::Recover { identity, at } = &cmd {
        return recover(home, out, identity, &at.server, &at.log_vkey).await;
    }
    if home.exists(Role::Customer)
        && let Ok(saved) = home.read_state::<CustomerRole>(Role::Customer)
        && let Some(at) = saved.role.vault_erased_at
    {
        return Err(CliError::local(
            format!("this vault was erased (log index {at}): its records and keys are gone"),
            "`cmr customer id` still prints the identity; start over with `cmr customer init` in a new --home",
        ));
    }
    let _held = home.hold(Role::Customer, std::time::Duration::from_secs(10))?;
    let mut l = Loaded::open(home)?;
    let result = step(&mut l, out, cmd).await;
    // Whatever happened, what was verified so far is kept.
    l.save(home).await?;
    result
}

fn init(home: &Home, out: Out, server: &str, log_vkey: &str) -> CliResult {
    home::check_server(server, log_vkey)?;
    home.refuse_existing(Role::Customer)?;
    let (keys, inception, recovery) = cmr_client::session::Session::create(Role::Customer);
    let id = keys.identity;
    let (seq, identity_key) = keys
        .identity_key
        .as_ref()
        .map(|(s, k)| (*s, k))
        .ok_or_else(|| CliError::local("no identity key", "report this"))?;
    let cert = keys.device.certify(id, seq, identity_key, now());
    let vault = VaultKey::generate(&mut rand::rng());
    let wrapped = vault.wrap_to_device(&mut rand::rng(), cert.body());
    let record = cmr_core::identity::KeyHistory::incept(&inception, 0)
        .map_err(|e| CliError::local(e.to_string(), "report this"))?
        .current()
        .clone();
    let recovery_wrap = vault.wrap_to_recovery(&mut rand::rng(), id, &record);
    let passphrase = home::passphrase(
        true,
        &format!("customer {}", crate::out::short(&id.to_hex())),
    )?;
    home.write_key(Role::Customer, &keys, &passphrase)?;
    let session = home::new_session(server, log_vkey, keys)?;
    let customer = Customer::new(session, PseudonymKey::generate(&mut rand::rng()));
    let sdk = CustomerState::save(&customer, &vault);
    let saved = Saved {
        identity: id.to_hex(),
        server: server.to_string(),
        log_vkey: log_vkey.to_string(),
        inception: Some(B64.encode(inception.encode())),
        registered: false,
        session: sdk.session.clone(),
        role: CustomerRole {
            vault_key: B64.encode(wrapped.to_bytes()),
            sdk: Some(sdk),
            companies: vec![],
            recovery_wrap: B64.encode(recovery_wrap.to_bytes()),
            recovery_seq: record.seq,
            backup_version: 0,
            backup_digest: String::new(),
            vault_erased_at: None,
        },
    };
    home.write_state(Role::Customer, &saved)?;
    let phrase = recovery.to_phrase();
    out.line(format!(
        "customer identity {} created, with one device and a vault key",
        id.to_hex()
    ));
    out.line("RECOVERY PHRASE (shown once; write it down, keep it offline; it is the only way back if every device is lost):");
    out.line(format!("  {}", phrase.as_str()));
    out.line("next: cmr customer register");
    out.value(&json!({"identity": id.to_hex(), "recovery_phrase": phrase.as_str()}));
    Ok(())
}

async fn step(l: &mut Loaded, out: Out, cmd: CustomerCmd) -> CliResult {
    match cmd {
        CustomerCmd::Init { .. }
        | CustomerCmd::Id
        | CustomerCmd::Ui(_)
        | CustomerCmd::Recover { .. }
        | CustomerCmd::Device {
            cmd: DeviceCmd::New { .. } | DeviceCmd::Join { .. },
        } => Err(CliError::local(
            "this command runs on its own",
            "report this",
        )),
        cmd @ (CustomerCmd::Profile { .. } | CustomerCmd::Tx { .. }) => {
            records::step(l, out, cmd).await
        }
        cmd @ (CustomerCmd::Approve { .. }
        | CustomerCmd::Block { .. }
        | CustomerCmd::Companies
        | CustomerCmd::Deny { .. }
        | CustomerCmd::Dispute { .. }
        | CustomerCmd::Grant { .. }
        | CustomerCmd::Grants
        | CustomerCmd::Policy { .. }
        | CustomerCmd::Receipt { .. }
        | CustomerCmd::Requests
        | CustomerCmd::Revoke { .. }
        | CustomerCmd::Rotate) => consent::step(l, out, cmd).await,
        cmd @ CustomerCmd::Device { .. } => devices::step(l, out, cmd).await,
        cmd @ (CustomerCmd::Auditors
        | CustomerCmd::Erase { .. }
        | CustomerCmd::Export { .. }
        | CustomerCmd::History
        | CustomerCmd::Watch
        | CustomerCmd::Status
        | CustomerCmd::AcceptRestore
        | CustomerCmd::Register) => vault::step(l, out, cmd).await,
    }
}

pub(crate) fn access_name(a: Access) -> &'static str {
    a.name()
}

pub(crate) fn duration(d: cmr_core::consent::Duration) -> String {
    d.to_string()
}

/// How long a grant lasts, in words: "one read", "until revoked", "30 days, until 2027-01-04".
pub(crate) fn lasting(g: &cmr_core::consent::Grant) -> String {
    match g.expires {
        Some(e) => format!("{}, until {}", g.duration, crate::out::day(e)),
        None => g.duration.to_string(),
    }
}

fn rotated_words(n: usize) -> String {
    match n {
        0 => "no rotation was owed".into(),
        1 => "1 family rotated to a fresh epoch".into(),
        n => format!("{n} families rotated to fresh epochs"),
    }
}

/// A rotation failed after the revocation was logged: say both.
fn rotation_unfinished(e: ClientError, revoked_at: u64) -> CliError {
    let mut err = CliError::from(e);
    err.message = format!(
        "the revocation is logged (index {revoked_at}), but the rotation did not finish: {}",
        err.message
    );
    err.hint = Some(
        "run `cmr customer rotate` to finish it; companies' appends to the family wait until then"
            .into(),
    );
    err
}

/// Who an identity is, for people: "you" for this customer, the verified name and domain of a company
/// whose domain proof this customer checked, else "company" and the short id.
pub(crate) struct Names<'a> {
    me: IdentityId,
    checked: &'a [(String, String, String)],
}

impl<'a> Names<'a> {
    pub(crate) fn new(me: IdentityId, checked: &'a [(String, String, String)]) -> Self {
        Self { me, checked }
    }

    pub(crate) fn of(&self, id: &IdentityId) -> String {
        if *id == self.me {
            return "you".into();
        }
        let hex = id.to_hex();
        match self.checked.iter().find(|(i, _, _)| *i == hex) {
            Some((_, domain, name)) => format!("{name} ({domain})"),
            None => format!("company {}", short(&hex)),
        }
    }
}

fn describe(body: &cmr_log::entry::EntryBody, names: &Names<'_>) -> String {
    use cmr_log::entry::{AccessRecord, EntryKind};
    match body.kind {
        EntryKind::Access => match AccessRecord::decode(&body.payload) {
            Ok(a) => {
                let fams: Vec<String> = a
                    .families
                    .iter()
                    .map(|f| format!("{}…{}..{}", &f.family.to_hex()[..8], f.from, f.to))
                    .collect();
                let kind = match a.kind {
                    cmr_core::decision::AccessKind::Read => "read",
                    cmr_core::decision::AccessKind::Append => "append",
                };
                format!(
                    "{kind} by {} under grant {}: {}",
                    names.of(&body.subject),
                    short(&a.grant.to_hex()),
                    fams.join(", ")
                )
            }
            Err(_) => "access (undecodable)".into(),
        },
        EntryKind::Statement => match cmr_core::consent::SignedStatement::decode(&body.payload) {
            Ok(st) => {
                let who = names.of(&st.statement().author);
                let extra = match &st.statement().body {
                    Body::Grant(g) => format!(" to {}", names.of(&g.grantee)),
                    Body::Revocation(r) => format!(" of {}", short(&r.grant.to_hex())),
                    Body::Block { company, blocked } => format!(
                        " {} {}",
                        if *blocked { "of" } else { "lifted for" },
                        names.of(company)
                    ),
                    _ => String::new(),
                };
                format!("{}{extra} by {who}", st.statement().body.name())
            }
            Err(_) => "statement (undecodable)".into(),
        },
        EntryKind::FamilyHead => format!("records written by {}", names.of(&body.subject)),
        k => k.name().to_string(),
    }
}

/// The most rows, and the most bytes of text, in one imported batch: a batch's request (records sealed,
/// then base64 in JSON) stays well under the server's 16 MiB limit for record batches.
const IMPORT_BATCH_ROWS: usize = 500;
const IMPORT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Splits one month's rows into batches of at most [`IMPORT_BATCH_ROWS`] rows and [`IMPORT_BATCH_BYTES`]
/// bytes (a single larger row is a batch of its own, which the server judges).
fn import_batches(rows: &[String]) -> Vec<&[String]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let full = i - start == IMPORT_BATCH_ROWS || bytes + row.len() > IMPORT_BATCH_BYTES;
        if full && i > start {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += row.len();
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

fn read_import(file: &std::path::Path) -> CliResult<Vec<(Period, String)>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::local(format!("{}: {e}", file.display()), "check the path"))?;
    let bad = |line: usize, why: &str| {
        CliError::local(
            format!("{}:{line}: {why}", file.display()),
            "CSV lines are month,text (YYYY-MM,...); JSON is [{\"month\": \"YYYY-MM\", \"text\": \"...\"}]",
        )
    };
    if text.trim_start().starts_with('[') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Row {
            month: String,
            text: String,
        }
        let rows: Vec<Row> =
            serde_json::from_str(&text).map_err(|e| bad(e.line(), &e.to_string()))?;
        return rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let m = Period::parse(&r.month).ok_or_else(|| bad(i + 1, "not a month"))?;
                transaction_month(m).map_err(|e| bad(i + 1, &e.message))?;
                Ok((m, r.text))
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || (i == 0 && line.to_ascii_lowercase().starts_with("month,")) {
            continue;
        }
        let (m, t) = line.split_once(',').ok_or_else(|| bad(i + 1, "no comma"))?;
        let t = t.trim().trim_matches('"');
        let m = Period::parse(m.trim()).ok_or_else(|| bad(i + 1, "not a month"))?;
        transaction_month(m).map_err(|e| bad(i + 1, &e.message))?;
        out.push((m, t.to_string()));
    }
    Ok(out)
}

fn not_joined() -> CliError {
    CliError::local(
        "this device has not joined its vault yet",
        "run `cmr customer device join FILE` with the file from `cmr customer device add`",
    )
}

/// `id`: the identity kept in the configuration folder.
pub(crate) fn print_id(home: &Home, out: Out, role: Role) -> CliResult {
    if !home.exists(role) {
        return Err(CliError::local(
            "no identity in this configuration folder",
            "run `init` first (or check --home)",
        ));
    }
    let id = home.identity(role)?;
    out.line(&id);
    out.value(&json!({"identity": id}));
    Ok(())
}

fn device_new(home: &Home, out: Out, identity: &str, server: &str, log_vkey: &str) -> CliResult {
    home.refuse_existing(Role::Customer)?;
    home::check_server(server, log_vkey)?;
    let id = IdentityId(parse_id(identity, "identity")?);
    let device = cmr_core::identity::DeviceKeys::generate(&mut rand::rng());
    let request = cmr_core::identity::DeviceRequest::sign(id, &device);
    let keys = cmr_client::session::Keys {
        identity: id,
        role: Role::Customer,
        device,
        identity_key: None,
    };
    let passphrase = home::passphrase(
        true,
        &format!("customer {}", crate::out::short(&id.to_hex())),
    )?;
    home.write_key(Role::Customer, &keys, &passphrase)?;
    let saved = Saved {
        identity: id.to_hex(),
        server: server.to_string(),
        log_vkey: log_vkey.to_string(),
        inception: None,
        registered: true,
        session: Default::default(),
        role: CustomerRole::not_joined(),
    };
    home.write_state(Role::Customer, &saved)?;
    let d = keys.device.id();
    out.line(format!(
        "new device {} (fingerprint {}) for identity {}",
        d.to_hex(),
        wellknown::fingerprint_of(&d.0),
        id.to_hex()
    ));
    out.line("on a device that holds the identity key, run:");
    out.line(format!(
        "  cmr customer device add {} --out enrol.json",
        B64.encode(&request)
    ));
    out.value(&json!({"device": d.to_hex(), "request": B64.encode(&request)}));
    Ok(())
}

async fn device_join(home: &Home, out: Out, file: &std::path::Path) -> CliResult {
    let (mut session, mut saved) = home::open_session::<CustomerRole>(home, Role::Customer)?;
    if saved.role.sdk.is_some() {
        return Err(CliError::local(
            "this device has already joined",
            "nothing to do",
        ));
    }
    let bytes = std::fs::read(file)
        .map_err(|e| CliError::local(format!("{}: {e}", file.display()), "check the path"))?;
    let e: Enrolment = serde_json::from_slice(&bytes).map_err(|e| {
        CliError::local(
            format!("{} is not an enrolment file: {e}", file.display()),
            "use the file from `cmr customer device add`",
        )
    })?;
    let cert = B64
        .decode(&e.certificate)
        .ok()
        .and_then(|b| {
            cmr_core::identity::Signed::<cmr_core::identity::DeviceCertificate>::decode(&b).ok()
        })
        .ok_or_else(|| {
            CliError::local("the enrolment's certificate is damaged", "make a new one")
        })?;
    let me = session.keys.identity;
    if cert.body().identity != me
        || cert.body().device() != session.keys.device.id()
        || cert.body().kem_key != session.keys.device.kem.public_key()
    {
        return Err(CliError::local(
            "the enrolment is for another device",
            "run `cmr customer device add` with this device's request",
        ));
    }
    // The server must have logged the certificate: this device's keys come from the verified key events.
    let this_device = session.keys.device.id();
    let id = session.identity(me).await?;
    if !id.has_device(&this_device) {
        return Err(CliError::with_code(
            crate::error::code::VERIFICATION,
            "the server's key events do not certify this device",
            Some("the enrolment did not reach the log; add the device again"),
        ));
    }
    let wrapped = B64
        .decode(&e.vault_key)
        .ok()
        .and_then(|b| WrappedKey::from_slice(&b).ok())
        .ok_or_else(|| CliError::local("the enrolment's vault key is damaged", "make a new one"))?;
    let vault = VaultKey::unwrap_as_device(me, &session.keys.device, &wrapped).map_err(|_| {
        CliError::local(
            "the vault key does not open with this device",
            "make a new enrolment for this device",
        )
    })?;
    let customer = e.sdk.restore(session, &vault)?;
    saved.role.vault_key = e.vault_key;
    saved.role.companies = e.companies;
    saved.role.recovery_wrap = e.recovery_wrap;
    saved.role.recovery_seq = e.recovery_seq;
    saved.role.backup_version = e.backup_version;
    let sdk = CustomerState::save(&customer, &vault);
    saved.session = sdk.session.clone();
    saved.role.sdk = Some(sdk);
    home.write_state(Role::Customer, &saved)?;
    out.line(format!("this device joined the vault of {}", me.to_hex()));
    out.value(&json!({"identity": me.to_hex(), "joined": true}));
    Ok(())
}

/// A digest of what a backup must hold: families and their epochs, the directory, the grants. (The sealed
/// secrets themselves are drawn with fresh nonces at each save, so they are not compared.)
fn backup_digest(sdk: &CustomerState) -> String {
    let families: Vec<(&str, u64, usize)> = sdk
        .families
        .iter()
        .map(|f| (f.name.as_str(), f.epoch, f.secrets.len()))
        .collect();
    let grants: Vec<(&str, bool)> = sdk
        .grants
        .iter()
        .map(|g| (g.statement.as_str(), g.revoked))
        .collect();
    let text = serde_json::to_string(&(families, &sdk.directory, grants)).unwrap_or_default();
    cmr_core::hash::sha256(text.as_bytes()).to_hex()
}

async fn recover(home: &Home, out: Out, identity: &str, server: &str, log_vkey: &str) -> CliResult {
    let id = IdentityId(parse_id(identity, "identity")?);
    // A recovery interrupted after its first step resumes: the key file holds the new identity key.
    if home.exists(Role::Customer) {
        let (session, saved) = home::open_session::<CustomerRole>(home, Role::Customer)?;
        if saved.role.sdk.is_some() || session.keys.identity != id {
            return Err(CliError::local(
                "this configuration folder already holds a customer",
                "recover into a new --home",
            ));
        }
        let secret = recovery_secret("the recovery phrase you started this recovery with: ")?;
        return finish_recovery(home, out, session, saved, &secret).await;
    }
    home::check_server(server, log_vkey)?;
    let secret = recovery_secret("recovery phrase: ")?;
    let conn = crate::home::connection(server)?;
    let pinned = cmr_log::note::NoteVerifier::from_vkey(log_vkey).map_err(|e| {
        CliError::local(
            format!("the log key does not parse: {e}"),
            "copy it from the server",
        )
    })?;
    let (session, next) = Customer::recover_identity(conn, pinned, id, &secret, now()).await?;
    // The old phrase rotates nothing any more: keep the new identity key and show the new phrase now.
    let passphrase = home::passphrase(
        true,
        &format!("customer {}", crate::out::short(&id.to_hex())),
    )?;
    home.write_key(Role::Customer, &session.keys, &passphrase)?;
    let saved = Saved {
        identity: id.to_hex(),
        server: server.to_string(),
        log_vkey: log_vkey.to_string(),
        inception: None,
        registered: true,
        session: cmr_client::state::SessionState::of(&session),
        role: CustomerRole::not_joined(),
    };
    home.write_state(Role::Customer, &saved)?;
    let phrase = next.to_phrase();
    out.line(format!(
        "identity {} rotated to the key your phrase revealed; this device is certified",
        id.to_hex()
    ));
    out.line("NEW RECOVERY PHRASE (shown once; the old one no longer works):");
    out.line(format!("  {}", phrase.as_str()));
    finish_recovery(home, out, session, saved, &secret)
        .await
        .map_err(|e| CliError {
            message: if out.json {
                format!(
                    "{}; your new recovery phrase: {}",
                    e.message,
                    phrase.as_str()
                )
            } else {
                e.message
            },
            hint: Some(
                "the identity is yours again: run the same `cmr customer recover` to finish".into(),
            ),
            code: e.code,
        })?;
    out.value(&json!({"identity": id.to_hex(), "recovery_phrase": phrase.as_str()}));
    Ok(())
}

/// A recovery phrase from `CMR_RECOVERY_PHRASE` or a prompt.
fn recovery_secret(prompt: &str) -> CliResult<cmr_core::identity::RecoverySecret> {
    let phrase = match std::env::var("CMR_RECOVERY_PHRASE") {
        Ok(p) => zeroize::Zeroizing::new(p),
        Err(_) => zeroize::Zeroizing::new(rpassword::prompt_password(prompt).map_err(|_| {
            CliError::local(
                "no recovery phrase: there is no terminal to ask on",
                "set CMR_RECOVERY_PHRASE for scripts",
            )
        })?),
    };
    cmr_core::identity::RecoverySecret::from_phrase(phrase.trim()).map_err(|e| {
        CliError::local(
            format!("the recovery phrase is not valid: {e}"),
            "check each of the 24 words",
        )
    })
}

/// Recovery, step two: the vault from the key backup (opened with the phrase it is wrapped to), a fresh
/// vault key wrapped to this device and to the new recovery key, and a new backup.
async fn finish_recovery(
    home: &Home,
    out: Out,
    session: cmr_client::session::Session,
    mut saved: Saved<CustomerRole>,
    secret: &cmr_core::identity::RecoverySecret,
) -> CliResult {
    let id = session.keys.identity;
    let (mut customer, old, version) =
        Customer::restore_from_backup(session, secret, now()).await?;
    // A fresh vault key: the lost devices knew the old one.
    let vault = VaultKey::generate(&mut rand::rng());
    let mine = customer.session.keys.device.id();
    let cert = customer
        .devices()
        .await?
        .into_iter()
        .find(|(c, revoked)| !revoked && c.device() == mine)
        .map(|(c, _)| c)
        .ok_or_else(|| {
            CliError::with_code(
                crate::error::code::VERIFICATION,
                "the server's key events do not certify this device",
                None,
            )
        })?;
    let record = customer
        .session
        .identity(id)
        .await?
        .state
        .keys()
        .current()
        .clone();
    let sdk = CustomerState::save(&customer, &vault);
    saved.session = sdk.session.clone();
    saved.role = CustomerRole {
        vault_key: B64.encode(vault.wrap_to_device(&mut rand::rng(), &cert).to_bytes()),
        sdk: Some(sdk),
        companies: vec![],
        recovery_wrap: B64.encode(
            vault
                .wrap_to_recovery(&mut rand::rng(), id, &record)
                .to_bytes(),
        ),
        recovery_seq: record.seq,
        backup_version: version,
        backup_digest: String::new(),
        vault_erased_at: None,
    };
    Loaded {
        customer,
        vault,
        saved,
        replaced: Some(old),
    }
    .save(home)
    .await?;
    out.line(format!(
        "vault {} recovered on this device; every other device was revoked and every family rotated",
        id.to_hex()
    ));
    Ok(())
}

/// The families a grant of `scopes` to `company` covers (declared if new), and the one it appends to.
async fn approval_for(
    c: &mut Customer,
    company: IdentityId,
    scopes: &[(Scope, Access)],
    lookback_months: u32,
    now: u64,
) -> CliResult<Approval> {
    let mut families = Vec::new();
    let mut append_family = None;
    for (scope, access) in scopes {
        let name = match scope {
            Scope::Transactions => c.transactions_with(&company),
            Scope::ProfileInferred => c.inferred_by(&company),
            s => FamilyName::profile(*s)
                .ok_or_else(|| CliError::local("not a section", "see --help"))?,
        };
        if access.appends() {
            append_family = Some(name);
        }
        families.push(name);
    }
    c.declare(&families, now).await?;
    Ok(Approval {
        scopes: scopes.to_vec(),
        lookback_months,
        families,
        append_family,
    })
}

/// `once`, `persistent`, or a number of days.
pub(crate) fn parse_duration(s: &str) -> CliResult<cmr_core::consent::Duration> {
    use cmr_core::consent::Duration;
    Ok(match s {
        "once" | "one-time" => Duration::OneTime,
        "persistent" => Duration::Persistent,
        days => Duration::TimeBound {
            seconds: days
                .parse::<u64>()
                .ok()
                .and_then(|d| d.checked_mul(86_400))
                .ok_or_else(|| {
                    CliError::local(
                        format!("unknown duration {days:?}"),
                        "use once, persistent, or a number of days",
                    )
                })?,
        },
    })
}

/// A company typed on the command line, whole or as a unique prefix of one this customer dealt with
/// (a checked domain, a grant), checked to be a company registered on the server before anything is
/// done for it: a typo is refused, not taken for a new counterparty.
async fn company_id(
    c: &mut Customer,
    checked: &[(String, String, String)],
    typed: &str,
) -> CliResult<IdentityId> {
    let known: Vec<[u8; 32]> = checked
        .iter()
        .filter_map(|(id, _, _)| IdentityId::from_hex(id).map(|i| i.0))
        .chain(
            c.grants
                .values()
                .filter_map(|g| g.grant())
                .map(|g| g.grantee.0),
        )
        .collect();
    let id = IdentityId(crate::out::resolve_id(typed, "company", known)?);
    let not_a_company = || {
        CliError::local(
            format!("no company {} is registered on this server", id.to_hex()),
            "check the id with the company (`cmr company id` prints it)",
        )
    };
    match c.session.identity(id).await {
        Ok(v) if v.state.keys().role() == Role::Company => Ok(id),
        Ok(_) => Err(not_a_company()),
        Err(cmr_client::ClientError::Refused { status: 404, .. }) => Err(not_a_company()),
        Err(e) => Err(e.into()),
    }
}

/// The request `id` (whole, or a unique prefix) among those waiting for an answer (each verified by the
/// SDK).
async fn waiting(c: &mut Customer, id: &str) -> CliResult<cmr_client::customer::PendingRequest> {
    let pending = c.pending().await?;
    let rid = StatementId(crate::out::resolve_id(
        id,
        "request",
        pending.iter().map(|p| p.statement.id().0),
    )?);
    pending
        .into_iter()
        .find(|p| p.statement.id() == rid)
        .ok_or_else(|| {
            CliError::local(
                "no such request waiting",
                "list them with `cmr customer requests`",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_split_by_rows_and_by_bytes() {
        let small: Vec<String> = (0..1201).map(|i| format!("row {i}")).collect();
        let sizes: Vec<usize> = import_batches(&small).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![500, 500, 201]);
        let big: Vec<String> = (0..10).map(|_| "x".repeat(1024 * 1024)).collect();
        let batches = import_batches(&big);
        assert!(
            batches
                .iter()
                .all(|b| b.iter().map(String::len).sum::<usize>() <= IMPORT_BATCH_BYTES)
        );
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 10);
        assert_eq!(import_batches(&[]).len(), 0);
    }
}
