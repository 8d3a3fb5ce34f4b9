//! `cmr serve`, and the embedded server the demo starts: the API over sled in a local folder (the
//! default), or over PostgreSQL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cmr_log::note::NoteSigner;
use cmr_server::{AppState, Config, serve};
use cmr_store::{Store, StoreConfig};

use crate::error::{CliError, CliResult, code};

/// Where the vault's state lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// sled in a local folder.
    Sled(PathBuf),
    /// A PostgreSQL database (its connection string).
    Postgres(String),
}

impl Location {
    /// `--store`: `postgres://…` (or `postgresql://…`), or `sled:PATH`; without it, sled in `data`.
    pub fn parse(store: Option<&str>, data: &Path) -> CliResult<Self> {
        let Some(store) = store else {
            return Ok(Location::Sled(data.to_path_buf()));
        };
        if store.starts_with("postgres://") || store.starts_with("postgresql://") {
            return Ok(Location::Postgres(store.to_string()));
        }
        match store.strip_prefix("sled:") {
            Some(path) if !path.is_empty() => Ok(Location::Sled(PathBuf::from(path))),
            _ => Err(CliError::local(
                format!("{store:?} is not a store this build knows"),
                "use --store postgres://USER@HOST/DB or --store sled:PATH (or leave it out for --data)",
            )),
        }
    }

    /// The data folder, for a store on sled.
    pub fn folder(&self) -> Option<&Path> {
        match self {
            Location::Sled(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }

    /// How the operator named it, without a password.
    fn describe(&self) -> String {
        match self {
            Location::Sled(p) => p.display().to_string(),
            Location::Postgres(url) => match url.split_once('@') {
                Some((_, host)) => format!("PostgreSQL at {host}"),
                None => "PostgreSQL".into(),
            },
        }
    }

    /// Opens the store here if it holds a vault already (nothing is created).
    pub fn open_existing(&self, log_key: NoteSigner, opening: Opening) -> CliResult<Store> {
        if let Some(folder) = self.folder()
            && !folder.join("db").exists()
        {
            return Err(CliError::local(
                format!("{} holds no vault", folder.display()),
                "check --data (or CMR_DATA)",
            ));
        }
        self.open(log_key, opening)
    }

    /// Restores a snapshot here (an empty folder or database) and opens the store on it: see
    /// [`Store::restore`].
    pub fn restore(
        &self,
        snapshot: impl std::io::Read,
        log_key: NoteSigner,
    ) -> CliResult<(Store, cmr_store::store::snapshot::SnapshotSummary)> {
        let refused = |e: cmr_store::StoreError| {
            CliError::local(
                format!("restore refused: {e}"),
                "nothing is served from it; check the snapshot file and --log-key",
            )
        };
        match self {
            Location::Sled(data) => {
                create_data_folder(data)?;
                let config = StoreConfig::new(data, log_key);
                let rows = cmr_store::SledStorage::open(&config).map_err(refused)?;
                Store::restore(Arc::new(rows), snapshot, config).map_err(refused)
            }
            Location::Postgres(url) => {
                let rows = cmr_postgres::PgStorage::connect(url).map_err(refused)?;
                Store::restore(Arc::new(rows), snapshot, StoreConfig::new("", log_key))
                    .map_err(refused)
            }
        }
    }

    /// Opens the store here.
    fn open(&self, log_key: NoteSigner, opening: Opening) -> CliResult<Store> {
        match self {
            Location::Sled(data) => {
                create_data_folder(data)?;
                let mut config = StoreConfig::new(data, log_key);
                config.cache_capacity = opening.cache_mib.max(8) * 1024 * 1024;
                config.verify_on_open = opening.verify;
                Store::open(config).map_err(|e| {
                    CliError::local(
                        format!("cannot open the data folder {}: {e}", data.display()),
                        "check --data (or CMR_DATA); another server may be using it",
                    )
                })
            }
            Location::Postgres(url) => {
                let mut config = StoreConfig::new("", log_key);
                config.verify_on_open = opening.verify;
                let opened = cmr_postgres::PgStorage::connect(url)
                    .and_then(|storage| Store::open_on(Arc::new(storage), config));
                opened.map_err(|e| {
                    CliError::local(
                        format!("cannot open the store in {}: {e}", self.describe()),
                        "check --store (or CMR_STORE): the database must exist and accept this user",
                    )
                })
            }
        }
    }
}

/// How the store is opened: sled's page cache, and whether every stored record is read back and
/// checked against its batch (`--verify-on-open`; a plain open reads only the log).
#[derive(Debug, Clone, Copy)]
pub struct Opening {
    /// sled's page cache, in MiB.
    pub cache_mib: u64,
    /// Check every stored record at open.
    pub verify: bool,
}

impl Default for Opening {
    fn default() -> Self {
        Opening {
            cache_mib: 16,
            verify: false,
        }
    }
}

/// A server running in this process.
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The log's verifier key, which clients pin.
    pub log_vkey: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Arc<Store>,
    /// The control socket in a sled data folder (`cmr backup` asks it for snapshots).
    control: Option<crate::backup::Control>,
}

impl Running {
    /// Stops taking connections, lets requests in flight finish, then closes the store.
    pub async fn stop(self) -> CliResult {
        let _ = self.stop.send(());
        let served = self.task.await;
        drop(self.control);
        self.store.close();
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CliError::with_code(
                code::LOCAL,
                format!("server: {e}"),
                None,
            )),
            Err(e) => Err(CliError::with_code(
                code::LOCAL,
                format!("server task: {e}"),
                None,
            )),
        }
    }
}

/// Opens the store in `data` and serves it on `listen` (port 0 picks one).
pub async fn start(
    data: &Path,
    log_key: NoteSigner,
    listen: &str,
    scheme: &str,
    witnesses: Vec<cmr_log::note::NoteVerifier>,
) -> CliResult<Running> {
    let listener = bind(listen).await?;
    let at = Location::Sled(data.to_path_buf());
    start_in(
        &at,
        log_key,
        listener,
        scheme,
        witnesses,
        None,
        Opening::default(),
        None,
        None,
        None,
    )
    .await
}

/// Binds the listening address: first, so that nothing is created when it fails. The queue of
/// connections not yet accepted holds 4,096 (the kernel may cap it lower, `net.core.somaxconn`), so a
/// burst of clients reconnecting after a restart waits instead of being dropped.
async fn bind(listen: &str) -> CliResult<tokio::net::TcpListener> {
    let fail = |e: std::io::Error| {
        CliError::local(
            format!("cannot listen on {listen}: {e}"),
            "choose another address with --listen (or CMR_LISTEN)",
        )
    };
    let addr = tokio::net::lookup_host(listen)
        .await
        .map_err(fail)?
        .next()
        .ok_or_else(|| fail(std::io::Error::other("the address resolves to nothing")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(4096).map_err(fail)
}

/// Creates the data folder, readable only by its owner (0700), if it does not exist.
fn create_data_folder(data: &Path) -> CliResult {
    use std::os::unix::fs::DirBuilderExt as _;
    if data.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data)
        .map_err(|e| {
            CliError::local(
                format!("cannot create the data folder {}: {e}", data.display()),
                "check --data (or CMR_DATA) and the parent folder's permissions",
            )
        })
}

/// [`start`] on the store at `at`, with the per-identity rate limits, sled's page cache (MiB) and the
/// authority clients sign for (the listening address if `None`) given.
#[allow(clippy::too_many_arguments)]
pub async fn start_in(
    at: &Location,
    log_key: NoteSigner,
    listener: tokio::net::TcpListener,
    scheme: &str,
    witnesses: Vec<cmr_log::note::NoteVerifier>,
    rate: Option<(f64, f64)>,
    opening: Opening,
    authority: Option<&str>,
    tls: Option<cmr_server::tls::Tls>,
    max_connections: Option<usize>,
) -> CliResult<Running> {
    let log_vkey = log_key.verifier().to_vkey();
    let store = Arc::new(at.open(log_key, opening)?);
    let control = match at.folder() {
        Some(folder) => Some(crate::backup::Control::listen(folder, store.clone())?),
        None => None,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::local(e.to_string(), "check --listen"))?;
    // Serving HTTPS itself, the server is what clients sign for: `https`.
    let scheme = if tls.is_some() { "https" } else { scheme };
    let mut config = Config {
        authority: authority.map_or_else(|| addr.to_string(), str::to_string),
        scheme: scheme.into(),
        witnesses,
        ..Config::default()
    };
    if let Some((rate, burst)) = rate {
        config.rate_per_identity = rate;
        config.burst_per_identity = burst;
    }
    config.max_connections = max_connections.unwrap_or_else(connection_cap);
    let state = Arc::new(AppState::new(store.clone(), config));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async {
        let _ = stopped.await;
    };
    let task = match &tls {
        Some(tls) => {
            let tls = tls.clone();
            tokio::spawn(async move { cmr_server::serve_tls(listener, state, &tls, stopped).await })
        }
        None => tokio::spawn(serve(listener, state, stopped)),
    };
    Ok(Running {
        base: format!("{scheme}://{addr}"),
        log_vkey,
        stop,
        task,
        store,
        control,
    })
}

/// Raises this process's descriptor limit to its hard limit, and says how many connections fit under
/// it: all but 256 descriptors, kept for the store's files, its database connections and the rest.
fn connection_cap() -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    usize::try_from(limit.saturating_sub(256))
        .unwrap_or(usize::MAX)
        .clamp(64, 1 << 20)
}

/// What `cmr serve` is told besides its folders.
pub struct Options {
    /// The address to listen on.
    pub listen: String,
    /// The log's origin, for a new log key.
    pub origin: String,
    /// The scheme clients sign (`https` behind a TLS proxy).
    pub scheme: String,
    /// Witness verifier keys.
    pub witnesses: Vec<String>,
    /// Requests per second per identity, sustained and in a burst.
    pub rate: (f64, f64),
    /// How the store is opened (sled's page cache, `--verify-on-open`).
    pub opening: Opening,
    /// The authority clients sign for (`vault.example.com` behind a proxy); the listening address if
    /// `None`.
    pub authority: Option<String>,
    /// The certificate chain and key (PEM files) to serve HTTPS with, if any.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The most connections open at once; by default what the descriptor limit leaves room for.
    pub max_connections: Option<usize>,
}

/// `cmr serve`: runs until Ctrl-C. The log key lives outside the data folder; a new one is created
/// (mode 0600) if the path does not exist, and its verifier key is written beside it as `.pub`.
pub async fn run(at: &Location, log_key: &Path, opts: &Options) -> CliResult {
    let (listen, origin) = (opts.listen.as_str(), opts.origin.as_str());
    let witnesses = opts
        .witnesses
        .iter()
        .map(|w| {
            cmr_log::note::NoteVerifier::from_vkey(w)
                .ok()
                .filter(|v| v.is_cosigner())
                .ok_or_else(|| {
                    CliError::local(
                        format!("{w:?} is not a witness verifier key"),
                        "use the key `cmr audit witness-init` printed",
                    )
                })
        })
        .collect::<CliResult<Vec<_>>>()?;
    // The certificate, then the address: when either fails, no key, folder or file is created.
    let tls = match &opts.tls {
        Some((cert, key)) => Some(cmr_server::tls::Tls::load(cert, key).map_err(|e| {
            CliError::local(
                format!("cannot serve HTTPS: {e}"),
                "give --tls-cert a PEM certificate chain (leaf first) and --tls-key its PEM private key",
            )
        })?),
        None => None,
    };
    let listener = bind(listen).await?;
    let key = if log_key.exists() {
        cmr_server::logkey::load(log_key, at.folder())
    } else {
        cmr_server::logkey::create(log_key, at.folder(), origin)
    }
    .map_err(|e| {
        CliError::local(
            format!("log key {}: {e}", log_key.display()),
            "keep the log key outside the data folder, readable only by you (chmod 600)",
        )
    })?;
    let running = start_in(
        at,
        key,
        listener,
        &opts.scheme,
        witnesses,
        Some(opts.rate),
        opts.opening,
        opts.authority.as_deref(),
        tls.clone(),
        opts.max_connections,
    )
    .await?;
    let pub_path = log_key.with_extension("pub");
    std::fs::write(&pub_path, format!("{}\n", running.log_vkey)).map_err(|e| {
        CliError::local(
            format!("cannot write {}: {e}", pub_path.display()),
            "check the folder of --log-key",
        )
    })?;
    // The server keeps running when its standard output goes away: these lines are best effort.
    let say = |line: String| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!(
        "CMR Vault serving {} on {}",
        at.describe(),
        running.base
    ));
    say(format!(
        "log verifier key (clients pin it): {}",
        running.log_vkey
    ));
    say(format!("  also written to {}", pub_path.display()));
    say("stop with Ctrl-C or SIGTERM".into());
    if let Some(tls) = tls {
        // SIGHUP reads the certificate and key again (a renewed certificate), keeping connections.
        tokio::spawn(reload_on_hangup(tls));
    }
    shutdown_signal().await;
    say("stopping: finishing requests in flight".into());
    running.stop().await
}

/// On each SIGHUP, reads the certificate and key files again; a failure is logged and the certificate
/// served so far stays.
async fn reload_on_hangup(tls: cmr_server::tls::Tls) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: the TLS certificate and key were read again"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: the TLS certificate was not reloaded"),
        }
    }
}

/// The address a local process that holds unlocked keys (the dashboard, the company gateway) listens
/// on: `listen` resolved, and refused unless it is loopback or `allow_remote` says otherwise.
pub(crate) async fn local_address(
    listen: &str,
    allow_remote: bool,
    example: &str,
    why: &str,
) -> CliResult<std::net::SocketAddr> {
    let addr = tokio::net::lookup_host(listen)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            CliError::usage(
                format!("{listen:?} is not an address to listen on"),
                format!("use HOST:PORT, such as {example}"),
            )
        })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(CliError::usage(
            format!("{addr} is not a loopback address"),
            format!("{why}: keep it on 127.0.0.1, or say --allow-remote"),
        ));
    }
    Ok(addr)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, which a service manager sends: both drain alike.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
