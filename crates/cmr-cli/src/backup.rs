//! `cmr backup` and `cmr restore`, and the control socket through which a running server on sled
//! hands out a snapshot (docs/operations.md "Backup and restore").
//!
//! A server on sled holds its folder locked, so the snapshot must come from it: it listens on
//! `control.sock` in its data folder (mode 0600, in a folder only its owner may enter), which gives
//! nobody more than reading the folder would. A stopped folder, or a PostgreSQL database, is read
//! directly.

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cmr_store::Store;
use cmr_store::store::snapshot;
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::out::Out;
use crate::serve::Location;

/// The control socket's name in a sled data folder.
pub const SOCKET: &str = "control.sock";
/// What a client asks on the control socket.
const ASK_SNAPSHOT: &str = "snapshot\n";
/// How many times `cmr backup` takes a snapshot again when one is left without its end (an erasure
/// logged while it was copied).
const ATTEMPTS: usize = 3;

/// The control socket of a running server; closed (and its file removed) on drop.
pub struct Control {
    path: PathBuf,
    /// The address it is reached at (see [`Address`]).
    at: Address,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The longest path a Unix socket address holds here (108 bytes with its NUL on Linux), with room.
const MAX_SOCKET_PATH: usize = 100;

/// An address for `folder/control.sock` that fits a Unix socket address: the path itself, or, for a
/// folder deeper than that allows (a long data-folder path made `cmr serve` refuse to start), the same
/// file reached through this process's open handle on the folder, `/proc/self/fd/N/control.sock`
/// (Linux). The handle lives as long as the address.
struct Address {
    path: PathBuf,
    _folder: Option<std::fs::File>,
}

impl Address {
    fn of(folder: &Path) -> std::io::Result<Address> {
        let path = folder.join(SOCKET);
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(Address {
                path,
                _folder: None,
            });
        }
        let dir = std::fs::File::open(folder)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        Ok(Address {
            path: PathBuf::from(format!("/proc/self/fd/{fd}/{SOCKET}")),
            _folder: Some(dir),
        })
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(&self.path)
    }
}

impl Control {
    /// Listens on `folder/control.sock` and answers snapshot requests from `store`, one at a time.
    pub fn listen(folder: &Path, store: Arc<Store>) -> CliResult<Control> {
        let path = folder.join(SOCKET);
        let fail = |e: std::io::Error| {
            CliError::local(
                format!("cannot open the control socket {}: {e}", path.display()),
                "another server may be using this data folder",
            )
        };
        let at = Address::of(folder).map_err(fail)?;
        // A socket left by a server that was killed: nobody answers on it.
        if path.exists() && at.connect().is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&at.path).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cmr-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        answer(conn, &store);
                    }
                }
            })
            .map_err(fail)?;
        Ok(Control {
            path,
            at,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept, which then sees the flag.
        let _ = self.at.connect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one request on the control socket.
fn answer(conn: UnixStream, store: &Store) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    // A client that stops reading must not hold the socket (and the server's shutdown) forever.
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    let mut reader = std::io::BufReader::new((&conn).take(64));
    if reader.read_line(&mut line).is_err() || line != ASK_SNAPSHOT {
        let _ = (&conn).write_all(b"error: this socket answers `snapshot` only\n");
        return;
    }
    match store.snapshot(std::io::BufWriter::new(&conn)) {
        Ok(s) => tracing::info!(
            size = s.size,
            rows = s.rows,
            bytes = s.bytes,
            "snapshot handed out on the control socket"
        ),
        // The snapshot is left without its end: the client sees it is not whole.
        Err(e) => tracing::warn!(error = %e, "snapshot not finished"),
    }
}

/// `cmr backup`'s arguments.
#[derive(clap::Args)]
pub struct BackupArgs {
    /// The file to write the snapshot to (it must not exist yet).
    dest: PathBuf,
    /// The data folder (sled) of the server to back up: a running server hands the snapshot out on
    /// its control socket; a stopped folder is read directly.
    #[arg(long, env = "CMR_DATA", default_value = "cmr-data")]
    data: PathBuf,
    /// Back up this store instead of --data: `postgres://USER@HOST/DB` (read directly, while its
    /// servers keep serving).
    #[arg(long, env = "CMR_STORE")]
    store: Option<String>,
    /// The log key (needed to open a stopped folder or a database, not a running server's socket).
    #[arg(long, env = "CMR_LOG_KEY", default_value = "cmr-log.key")]
    log_key: PathBuf,
}

/// `cmr restore`'s arguments.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot `cmr backup` wrote.
    snapshot: PathBuf,
    /// The data folder to restore into (sled): it must not exist, or be empty.
    #[arg(long, env = "CMR_DATA", default_value = "cmr-data")]
    data: PathBuf,
    /// Restore into this store instead of --data: an empty PostgreSQL database.
    #[arg(long, env = "CMR_STORE")]
    store: Option<String>,
    /// The log key the snapshot's checkpoint must be signed with (the server's).
    #[arg(long, env = "CMR_LOG_KEY", default_value = "cmr-log.key")]
    log_key: PathBuf,
}

fn key(path: &Path, data: Option<&Path>) -> CliResult<cmr_log::note::NoteSigner> {
    cmr_server::logkey::load(path, data).map_err(|e| {
        CliError::local(
            format!("log key {}: {e}", path.display()),
            "give the key the server signs with: --log-key (or CMR_LOG_KEY)",
        )
    })
}

/// Writes one snapshot of the store at `at` into `file`.
fn take(at: &Location, args: &BackupArgs, file: &mut std::fs::File) -> CliResult {
    let local = |what: String| CliError::local(what, "check --data or --store, and --log-key");
    if let Location::Sled(folder) = at {
        match Address::of(folder).and_then(|a| a.connect()) {
            Ok(mut conn) => {
                conn.write_all(ASK_SNAPSHOT.as_bytes())
                    .map_err(|e| local(format!("the server's control socket: {e}")))?;
                std::io::copy(&mut conn, file)
                    .map_err(|e| local(format!("reading the snapshot from the server: {e}")))?;
                return Ok(());
            }
            Err(_) if !folder.join("db").exists() => {
                return Err(local(format!("{} holds no vault", folder.display())));
            }
            // No server answers: the folder is read directly (refused if a server holds it).
            Err(_) => {}
        }
    }
    let store = at.open_existing(
        key(&args.log_key, at.folder())?,
        crate::serve::Opening::default(),
    )?;
    store
        .snapshot(std::io::BufWriter::new(&mut *file))
        .map_err(|e| local(format!("snapshot: {e}")))?;
    store.close();
    Ok(())
}

/// `cmr backup`: an online snapshot, written to a new file only once it is whole.
pub fn backup(out: Out, args: BackupArgs) -> CliResult {
    let at = Location::parse(args.store.as_deref(), &args.data)?;
    if args.dest.exists() {
        return Err(CliError::local(
            format!("{} exists", args.dest.display()),
            "give a new file: a backup never overwrites another",
        ));
    }
    let partial = args.dest.with_extension("partial");
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        CliError::local(
            format!("{what} {}: {e}", partial.display()),
            "check the destination folder",
        )
    };
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| fail("cannot write", &e))?;
        take(&at, &args, &mut file)?;
        file.sync_all().map_err(|e| fail("cannot sync", &e))?;
        drop(file);
        let read = std::fs::File::open(&partial).map_err(|e| fail("cannot read", &e))?;
        match snapshot::check(read) {
            Ok((note, rows, bytes)) => {
                std::fs::rename(&partial, &args.dest).map_err(|e| fail("cannot rename", &e))?;
                if let Some(parent) = args.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                    let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
                }
                let cp = cmr_log::note::Note::parse(&note)
                    .ok()
                    .and_then(|n| cmr_log::checkpoint::Checkpoint::parse_text(&n.text).ok());
                let (size, root) = cp.map_or((0, String::new()), |c| (c.size, hex::encode(c.root)));
                out.line(format!(
                    "backed up the log at size {size} (root {root}): {rows} rows, {bytes} bytes, in {}",
                    args.dest.display()
                ));
                out.line(format!(
                    "restore it with: cmr restore {} --data <an empty folder> --log-key <the server's key>",
                    args.dest.display()
                ));
                out.value(&json!({
                    "file": args.dest,
                    "size": size,
                    "root": root,
                    "checkpoint": note,
                    "rows": rows,
                    "bytes": bytes,
                }));
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    let _ = std::fs::remove_file(&partial);
    Err(CliError::local(
        format!(
            "the snapshot was not whole {ATTEMPTS} times: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
        "see the server's log; erasures arriving during the copy make it start again",
    ))
}

/// `cmr restore`: checks a snapshot while writing it into an empty store, and only then leaves it
/// where a server will open it.
pub fn restore(out: Out, args: RestoreArgs) -> CliResult {
    let at = Location::parse(args.store.as_deref(), &args.data)?;
    let file = std::fs::File::open(&args.snapshot).map_err(|e| {
        CliError::local(
            format!("{}: {e}", args.snapshot.display()),
            "give the file `cmr backup` wrote",
        )
    })?;
    let log_key = key(&args.log_key, at.folder())?;
    let (store, summary) = match &at {
        Location::Sled(folder) => {
            let empty = std::fs::read_dir(folder).map_or(true, |mut d| d.next().is_none());
            if !empty {
                return Err(CliError::local(
                    format!("{} is not empty", folder.display()),
                    "restore into a new folder, then point the server at it",
                ));
            }
            // Written beside the folder, then moved into place whole: a refused restore leaves
            // nothing a server would open.
            let name = folder.file_name().unwrap_or_default().to_string_lossy();
            let work = folder.with_file_name(format!(".{name}.restoring"));
            let _ = std::fs::remove_dir_all(&work);
            let restored = Location::Sled(work.clone())
                .restore(file, log_key)
                .and_then(|(store, summary)| {
                    store.close();
                    drop(store);
                    let _ = std::fs::remove_dir(folder);
                    std::fs::rename(&work, folder).map_err(|e| {
                        CliError::local(
                            format!("cannot move the restored folder into place: {e}"),
                            "check the parent folder",
                        )
                    })?;
                    Ok(summary)
                });
            match restored {
                Ok(summary) => (None, summary),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&work);
                    return Err(e);
                }
            }
        }
        Location::Postgres(_) => {
            let (store, summary) = at.restore(file, log_key).map_err(|e| {
                CliError::local(
                    e.to_string(),
                    "the database may hold part of the snapshot now: drop and create it again \
                     before another restore",
                )
            })?;
            (Some(store), summary)
        }
    };
    if let Some(store) = store {
        store.close();
    }
    out.line(format!(
        "restored the log at size {} (root {}): {} rows, {} records, {} key backups; every entry \
         and record checked",
        summary.size,
        hex::encode(summary.root),
        summary.rows,
        summary.records,
        summary.backups
    ));
    out.line(
        "clients that saw a longer log will refuse it and say it was restored from a backup; \
         serve it with: cmr serve (the same --data or --store, the same --log-key)",
    );
    out.value(&json!({
        "size": summary.size,
        "root": hex::encode(summary.root),
        "rows": summary.rows,
        "records": summary.records,
        "backups": summary.backups,
    }));
    Ok(())
}
