//! The per-user configuration folder: one sub-folder per role, each with a passphrase-sealed key file and
//! a state file. Folders are created with mode 0700 and files with mode 0600; a key file or state file
//! that others can read is refused.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use cmr_client::session::{Keys, Session};
use cmr_client::{Connection, state::SessionState};
use cmr_core::identity::{DeviceKeys, Role};
use cmr_core::keyfile::{self, KdfParams, KeyFileContents};
use cmr_core::keys::SigningKey;
use cmr_log::note::NoteVerifier;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{CliError, CliResult};

/// The passphrase's environment variable (for scripts; people get a prompt).
pub const PASSPHRASE_ENV: &str = "CMR_PASSPHRASE";

/// Where a user's files are.
#[derive(Clone)]
pub struct Home {
    root: PathBuf,
}

/// The server a new identity or witness talks to, and the log key it pins.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The vault server.
    #[arg(long, env = "CMR_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The server's log verifier key, which every answer is checked against (from `cmr serve`).
    #[arg(long, env = "CMR_LOG_VKEY")]
    pub log_vkey: String,
}

/// Registers `session`'s identity with the inception kept in `saved` (once; again is a no-op).
pub async fn register<T>(
    session: &mut cmr_client::session::Session,
    saved: &mut Saved<T>,
    command: &str,
) -> CliResult {
    if saved.registered {
        return Ok(());
    }
    use base64::Engine as _;
    let inception = saved
        .inception
        .as_deref()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| {
            CliError::local(
                "the inception is missing from the state",
                format!("run `cmr {command} init` again in a new --home"),
            )
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    session.register_identity(&inception, now).await?;
    saved.registered = true;
    Ok(())
}

/// What every role's state file holds, plus the role's own part.
#[derive(Serialize, Deserialize)]
pub struct Saved<T> {
    /// The identity (public), hex.
    pub identity: String,
    /// The server, `scheme://host:port`.
    pub server: String,
    /// The pinned log verifier key.
    pub log_vkey: String,
    /// The signed inception, base64, kept until registration succeeds.
    pub inception: Option<String>,
    /// Whether the identity is registered.
    pub registered: bool,
    /// The session's state.
    pub session: SessionState,
    /// The role's own state.
    pub role: T,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::Company => "company",
        Role::Auditor => "auditor",
    }
}

impl Home {
    /// `--home` (or `$CMR_HOME`), else `$XDG_CONFIG_HOME/cmr`, else `$HOME/.config/cmr`.
    pub fn locate(flag: Option<PathBuf>) -> CliResult<Self> {
        let root = flag
            .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|x| PathBuf::from(x).join("cmr")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/cmr")))
            .ok_or_else(|| CliError::local("no configuration folder", "set --home or CMR_HOME"))?;
        Ok(Self { root })
    }

    fn dir(&self, role: Role) -> PathBuf {
        self.root.join(role_name(role))
    }

    fn key_path(&self, role: Role) -> PathBuf {
        self.dir(role).join("identity.key")
    }

    fn state_path(&self, role: Role) -> PathBuf {
        self.dir(role).join("state.json")
    }

    /// Holds `role`'s state in this folder against every other `cmr` process until the file returned
    /// is dropped: a command reads the state file, talks to the server and writes the file back, and two
    /// at once would each overwrite what the other learnt. Waits up to `wait` for another holder (a
    /// command finishing) before it says who holds it.
    pub fn hold(&self, role: Role, wait: std::time::Duration) -> CliResult<std::fs::File> {
        self.ensure(role)?;
        let path = self.dir(role).join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err(&path, &e))?;
        let until = std::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(CliError::local(
                        format!(
                            "another cmr process is using this {} state (the web app, the gateway, or a command still running)",
                            role_name(role)
                        ),
                        "use the web app or the gateway while it runs, or stop it first (Ctrl-C)",
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, &e)),
            }
        }
    }

    /// A file of this configuration folder (its own, not a role's).
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The witness's key file.
    pub fn witness_key_path(&self) -> PathBuf {
        self.root.join("witness").join("witness.key")
    }

    /// Writes a new witness's key and state.
    pub fn write_witness(&self, skey: &[u8], state: &[u8]) -> CliResult {
        let dir = self.root.join("witness");
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io_err(&dir, &e))?;
        }
        check_private(&dir, true)?;
        write_private(&self.witness_key_path(), skey)?;
        write_private(&dir.join("state.json"), state)
    }

    /// Replaces the witness's state.
    pub fn write_witness_state(&self, state: &[u8]) -> CliResult {
        write_private(&self.root.join("witness").join("state.json"), state)
    }

    /// Reads the witness's key and state.
    pub fn read_witness(&self) -> CliResult<(Zeroizing<Vec<u8>>, Vec<u8>)> {
        let key = self.witness_key_path();
        if !key.exists() {
            return Err(CliError::local(
                "no witness key in this configuration folder",
                "run `cmr audit witness-init` first (or check --home)",
            ));
        }
        check_private(&key, false)?;
        let skey = Zeroizing::new(std::fs::read(&key).map_err(|e| io_err(&key, &e))?);
        let state_path = self.root.join("witness").join("state.json");
        check_private(&state_path, false)?;
        let state = std::fs::read(&state_path).map_err(|e| io_err(&state_path, &e))?;
        Ok((skey, state))
    }

    /// Whether a `role` identity exists here.
    pub fn exists(&self, role: Role) -> bool {
        self.key_path(role).exists()
    }

    /// Creates the folders with mode 0700, and refuses a role folder that others can enter.
    fn ensure(&self, role: Role) -> CliResult {
        let dir = self.dir(role);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io_err(&dir, &e))?;
        }
        check_private(&dir, true)
    }

    /// Refuses to create a second identity of `role` here.
    pub fn refuse_existing(&self, role: Role) -> CliResult {
        if self.exists(role) {
            return Err(CliError::local(
                format!(
                    "a {} identity already exists in {}",
                    role_name(role),
                    self.dir(role).display()
                ),
                "use it, or choose another folder with --home",
            ));
        }
        Ok(())
    }

    /// Writes a new identity's key file, sealed with `passphrase`.
    pub fn write_key(&self, role: Role, keys: &Keys, passphrase: &str) -> CliResult {
        self.ensure(role)?;
        let path = self.key_path(role);
        if path.exists() {
            return Err(CliError::local(
                format!(
                    "a {} identity already exists in {}",
                    role_name(role),
                    self.dir(role).display()
                ),
                "use it, or choose another folder with --home",
            ));
        }
        let contents = contents_of(keys);
        let sealed = keyfile::seal(&mut rand::rng(), &contents, passphrase, KdfParams::DEFAULT)
            .map_err(|e| {
                CliError::local(
                    format!("cannot seal the key file: {e}"),
                    "choose a non-empty passphrase",
                )
            })?;
        write_private(&path, &sealed)
    }

    /// Opens the key file with `passphrase`.
    /// The unlocked session's key file for `role`: the same keys sealed under a random session key
    /// (`cmr unlock`), so commands need no passphrase until it expires or `cmr lock` removes it.
    fn session_path(&self, role: Role) -> PathBuf {
        self.dir(role).join("session.key")
    }

    /// Seals `role`'s keys (opened with `passphrase`) under a fresh session key valid until `until`
    /// (Unix seconds), and returns the session key to put in `CMR_SESSION`. The expiry is part of what
    /// opens the file, so editing it breaks the file instead of extending the session.
    pub fn unlock(&self, role: Role, passphrase: &str, until: u64) -> CliResult<String> {
        let keys = self.read_key(role, passphrase)?;
        let mut secret = [0u8; 32];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut secret);
        let token = format!("{}.{until}", hex::encode(secret));
        let sealed = keyfile::seal(
            &mut rand::rng(),
            &contents_of(&keys),
            &token,
            KdfParams::MINIMUM,
        )
        .map_err(|e| CliError::local(e.to_string(), "report this"))?;
        write_private(&self.session_path(role), &sealed)?;
        Ok(token)
    }

    /// Removes every unlocked session in this folder; true if there was one.
    pub fn lock(&self) -> CliResult<bool> {
        let mut any = false;
        for role in [Role::Customer, Role::Company, Role::Auditor] {
            let path = self.session_path(role);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| io_err(&path, &e))?;
                any = true;
            }
        }
        Ok(any)
    }

    /// The keys of an unlocked session named by `CMR_SESSION`, if there is one, it is for this folder and
    /// it has not expired (an expired one is removed).
    fn session_keys(&self, role: Role) -> Option<Keys> {
        let token = std::env::var(SESSION_ENV).ok()?;
        let until: u64 = token.rsplit_once('.')?.1.parse().ok()?;
        let path = self.session_path(role);
        if until <= crate::out::now() {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let bytes = read_private(&path, role).ok()?;
        let c = keyfile::open(&bytes, &token).ok()?;
        (c.role == role).then_some(Keys {
            identity: c.identity,
            role,
            device: c.device,
            identity_key: c.identity_key,
        })
    }

    pub fn read_key(&self, role: Role, passphrase: &str) -> CliResult<Keys> {
        let path = self.key_path(role);
        let bytes = read_private(&path, role)?;
        let c = keyfile::open(&bytes, passphrase).map_err(|e| {
            CliError::local(
                format!("cannot open {}: {e}", path.display()),
                "check the passphrase (CMR_PASSPHRASE, or the prompt)",
            )
        })?;
        if c.role != role {
            return Err(CliError::local(
                format!(
                    "{} holds a {:?} identity, not a {}",
                    path.display(),
                    c.role,
                    role_name(role)
                ),
                "check --home",
            ));
        }
        Ok(Keys {
            identity: c.identity,
            role,
            device: c.device,
            identity_key: c.identity_key,
        })
    }

    /// Writes the state file (atomically).
    pub fn write_state<T: Serialize>(&self, role: Role, saved: &Saved<T>) -> CliResult {
        self.ensure(role)?;
        let json = serde_json::to_vec_pretty(saved)
            .map_err(|e| CliError::local(e.to_string(), "report this"))?;
        write_private(&self.state_path(role), &json)
    }

    /// The identity kept here for `role` (public; no passphrase needed).
    pub fn identity(&self, role: Role) -> CliResult<String> {
        #[derive(Deserialize)]
        struct Id {
            identity: String,
        }
        let saved: Id = serde_json::from_slice(&read_private(&self.state_path(role), role)?)
            .map_err(|e| {
                CliError::local(
                    format!("the state file is damaged: {e}"),
                    "restore it from a backup",
                )
            })?;
        Ok(saved.identity)
    }

    /// Reads the state file.
    pub fn read_state<T: for<'de> Deserialize<'de>>(&self, role: Role) -> CliResult<Saved<T>> {
        let path = self.state_path(role);
        let bytes = read_private(&path, role)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::local(
                format!("{} is damaged: {e}", path.display()),
                "restore it from a backup",
            )
        })
    }
}

/// Where scripts keep the passphrase in a file (`--passphrase-file`, or `CMR_PASSPHRASE_FILE`), set once
/// by `main`.
pub static PASSPHRASE_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The weakest passphrase accepted for a new key file, on zxcvbn's 0–4 scale: 3 is "safely
/// unguessable: moderate protection from offline slow-hash scenario", which is what a stolen key file
/// under Argon2id faces.
pub const MIN_PASSPHRASE_SCORE: zxcvbn::Score = zxcvbn::Score::Three;

/// The key file contents of `keys` (a copy: the keys stay usable).
fn contents_of(keys: &Keys) -> KeyFileContents {
    let copy = |k: &SigningKey| SigningKey::from_seed(&k.seed());
    KeyFileContents {
        role: keys.role,
        identity: keys.identity,
        device: DeviceKeys {
            signing: copy(&keys.device.signing),
            kem: keys.device.kem.clone(),
        },
        identity_key: keys.identity_key.as_ref().map(|(s, k)| (*s, copy(k))),
    }
}

/// The environment variable that names an unlocked session (`eval "$(cmr unlock)"` sets it).
pub const SESSION_ENV: &str = "CMR_SESSION";

/// A passphrase for `who` (the identity it opens, named in the prompt): from `CMR_PASSPHRASE`, else the
/// passphrase file, else a prompt. A new one (`confirm`) is asked twice on a terminal and must be
/// strong enough (zxcvbn score 3 of 4), or it is refused with the estimator's reason.
pub fn passphrase(confirm: bool, who: &str) -> CliResult<Zeroizing<String>> {
    let given = if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        Some(Zeroizing::new(p))
    } else if let Some(path) = PASSPHRASE_FILE.get() {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            CliError::local(
                format!("the passphrase file {}: {e}", path.display()),
                "check --passphrase-file (or CMR_PASSPHRASE_FILE)",
            )
        })?);
        // One line: the trailing newline an editor or `echo` adds is not part of it.
        Some(Zeroizing::new(
            text.trim_end_matches(['\n', '\r']).to_string(),
        ))
    } else {
        None
    };
    let chosen = match given {
        Some(p) => p,
        None => {
            let ask = |prompt: &str| {
                rpassword::prompt_password(prompt)
                    .map(Zeroizing::new)
                    .map_err(|_| {
                        CliError::local(
                            "no passphrase: there is no terminal to ask on",
                            format!("set {PASSPHRASE_ENV}, or give --passphrase-file, for scripts"),
                        )
                    })
            };
            let first = ask(&format!("passphrase for {who}: "))?;
            if confirm && *ask(&format!("passphrase for {who}, again: "))? != *first {
                return Err(CliError::local("the passphrases differ", "try again"));
            }
            first
        }
    };
    if confirm {
        check_strength(&chosen)?;
    }
    Ok(chosen)
}

/// Refuses a passphrase an attacker with the key file would guess, saying why.
fn check_strength(p: &str) -> CliResult {
    let estimate = zxcvbn::zxcvbn(p, &[]);
    if estimate.score() >= MIN_PASSPHRASE_SCORE {
        return Ok(());
    }
    let feedback = estimate.feedback();
    let warning = feedback
        .and_then(|f| f.warning())
        .map(|w| w.to_string())
        .unwrap_or_else(|| "it would be guessed quickly".into());
    let suggestion = feedback
        .and_then(|f| f.suggestions().first())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "use four or more random words".into());
    Err(CliError::local(
        format!("this passphrase is too weak: {warning}"),
        suggestion,
    ))
}

/// Opens a session for `role`: the key file with the passphrase, the state file, the pinned log key.
pub fn open_session<T: for<'de> Deserialize<'de>>(
    home: &Home,
    role: Role,
) -> CliResult<(Session, Saved<T>)> {
    if !home.exists(role) {
        return Err(CliError::local(
            format!(
                "no {} identity in this configuration folder",
                role_name(role)
            ),
            format!("run `cmr {} init` first (or check --home)", role_name(role)),
        ));
    }
    let saved: Saved<T> = home.read_state(role)?;
    let who = format!("{} {}", role_name(role), crate::out::short(&saved.identity));
    let keys = match home.session_keys(role) {
        Some(keys) => keys,
        None => home.read_key(role, &passphrase(false, &who)?)?,
    };
    let session = new_session(&server_for(&saved.server), &saved.log_vkey, keys)?;
    Ok((session, saved))
}

/// The server a command talks to: `CMR_SERVER` when set, else the one saved at init (or by `cmr
/// config set --server`).
pub fn server_for(saved: &str) -> String {
    std::env::var("CMR_SERVER")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| saved.to_string())
}

/// The certificate authorities `--ca-file` names, if any: set once at start.
static CA_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Trusts only the CAs in `pem_file` for https servers (`--ca-file`, `CMR_CA_FILE`).
pub fn trust_only(pem_file: PathBuf) {
    let _ = CA_FILE.set(pem_file);
}

/// A connection to `server`: for https, verified against the system's roots, or against `--ca-file`.
pub fn connection(server: &str) -> CliResult<Connection> {
    let conn = Connection::new(server)?;
    let Some(path) = CA_FILE.get() else {
        return Ok(conn);
    };
    let pem = std::fs::read(path).map_err(|e| {
        CliError::local(
            format!("cannot read the CA file {}: {e}", path.display()),
            "check --ca-file (or CMR_CA_FILE)",
        )
    })?;
    conn.with_ca_pem(&pem).map_err(|e| {
        CliError::local(
            format!("the CA file {}: {e}", path.display()),
            "give --ca-file a PEM file of CA certificates",
        )
    })
}

/// Checks a server address and log key before anything is written.
pub fn check_server(server: &str, log_vkey: &str) -> CliResult {
    connection(server)?;
    NoteVerifier::from_vkey(log_vkey).map_err(|e| {
        CliError::local(
            format!("the log key {log_vkey:?} does not parse: {e}"),
            "copy it from the server's output or its .pub file",
        )
    })?;
    Ok(())
}

/// A session for `keys` against `server`, pinned to `log_vkey`.
pub fn new_session(server: &str, log_vkey: &str, keys: Keys) -> CliResult<Session> {
    // A lost answer is sent again for 30 s (CMR_RETRY_SECONDS changes it), saying so on stderr.
    let retry = std::env::var("CMR_RETRY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(
            cmr_client::transport::DEFAULT_RETRY,
            std::time::Duration::from_secs,
        );
    let conn = connection(server)?
        .with_retry(retry)
        .on_retry(|msg| eprintln!("{msg}"));
    let pinned = NoteVerifier::from_vkey(log_vkey).map_err(|e| {
        CliError::local(
            format!("the log key {log_vkey:?} does not parse: {e}"),
            "copy it from the server's output or its .pub file",
        )
    })?;
    Ok(Session::new(conn, keys, pinned))
}

fn io_err(path: &Path, e: &std::io::Error) -> CliError {
    CliError::local(
        format!("{}: {e}", path.display()),
        "check the folder's owner and permissions",
    )
}

/// Refuses a file or folder that others can read (or, for a folder, enter).
fn check_private(path: &Path, dir: bool) -> CliResult {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, &e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        let fix = if dir { "chmod 700" } else { "chmod 600" };
        return Err(CliError::local(
            format!(
                "warning: {} can be read by other users (mode {:o}); refusing to use it",
                path.display(),
                meta.permissions().mode() & 0o777
            ),
            format!("{fix} {}", path.display()),
        ));
    }
    Ok(())
}

fn read_private(path: &Path, role: Role) -> CliResult<Vec<u8>> {
    if !path.exists() {
        return Err(CliError::local(
            format!("{} is missing", path.display()),
            format!("run `cmr {} init` first (or check --home)", role_name(role)),
        ));
    }
    check_private(path, false)?;
    if let Some(parent) = path.parent() {
        check_private(parent, true)?;
    }
    std::fs::read(path).map_err(|e| io_err(path, &e))
}

/// Writes a file only its owner may read (exports, enrolments), replacing it atomically.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> CliResult {
    write_private(path, bytes)
}

/// Writes `bytes` to `path` with mode 0600: a temporary file, `fsync`, rename, then `fsync` the folder.
fn write_private(path: &Path, bytes: &[u8]) -> CliResult {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, &e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, &e))?;
    f.sync_all().map_err(|e| io_err(&tmp, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, &e))?;
    // A bare file name's parent is the empty path: the folder is the current one.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(parent, &e))?;
    Ok(())
}
