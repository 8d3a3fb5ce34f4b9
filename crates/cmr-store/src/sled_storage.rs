//! The embedded storage engine: sled (0.34) in a local folder, made durable with `fdatasync`.
//!
//! What it owns: opening sled (and waiting for a lock a closing handle still holds), applying a group of
//! writes as one sled batch, the durability step (sled's flush, then an `fdatasync` of every file sled
//! changed, since sled's own flush does not survive power loss), and the acknowledgement mark beside
//! sled's files, which turns sled's silent recovery of an older state into a clear error at open.
//!
//! It also keeps the log's entries (the `ENTRIES` pieces, written once and never changed) out of sled,
//! in an append-only file beside it ([`ENTRIES_FILE`]): sled holds a short pointer for each piece.
//! sled rewrites its pages as rows are added and keeps memory for every page it holds, so the log's
//! bodies, most of what a vault stores, made sled's files and the server's memory grow several times
//! faster than the log (docs/durability.md, "How the log is stored").
//!
//! What it does not own: anything the store decides (the sequencer, the rules, the tree, the indexes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};

use cmr_core::hash::sha256;
use cmr_core::merkle::Hash;

use crate::layout::tag;
use crate::storage::{Acknowledged, Row, Rows, Storage, Writes};
use crate::{StoreConfig, StoreError};

/// The file, beside sled's, that holds the log's entries (see [`EntriesFile`]).
pub const ENTRIES_FILE: &str = "entries";

fn io(e: std::io::Error) -> StoreError {
    disk(&e)
}

/// An I/O error of the data folder's disk: one that ends when the operator acts (a full disk, a file
/// system remounted read-only, a quota) is `Unavailable`, so the store stops, clients are told to retry,
/// and the store reopens by itself once it passes; anything else is a failure of the storage.
fn disk(e: &std::io::Error) -> StoreError {
    use std::io::ErrorKind;
    // By kind: sled hands on a copy of the error it met, without the OS code.
    match e.kind() {
        ErrorKind::StorageFull => {
            StoreError::Unavailable(format!("the data folder's disk is full ({e})"))
        }
        ErrorKind::ReadOnlyFilesystem => {
            StoreError::Unavailable(format!("the data folder is read-only ({e})"))
        }
        ErrorKind::QuotaExceeded => {
            StoreError::Unavailable(format!("the data folder's quota is used up ({e})"))
        }
        _ => StoreError::Io(e.to_string()),
    }
}

/// A sled error, as [`disk`] classes the I/O ones.
fn sled_err(e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io) => disk(io),
        _ => StoreError::Io(e.to_string()),
    }
}

/// sled in a local folder, as a [`Storage`].
pub struct SledStorage {
    /// sled and its tree; `None` only while [`Storage::reconnect`] reopens them.
    open: RwLock<Option<(sled::Db, sled::Tree)>>,
    path: PathBuf,
    cache_capacity: u64,
    /// What the last sync saw of sled's files, and the mark: only the syncer syncs, one at a time.
    sync: Mutex<(FileStates, AckMark)>,
    acknowledged: Option<(u64, Hash)>,
    /// The log's entries, outside sled.
    entries: EntriesFile,
}

impl SledStorage {
    /// Opens (or creates) sled in `config.path` with `config.cache_capacity`, and reads the
    /// acknowledgement mark beside it.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_folder(&config.path, config.cache_capacity)
    }

    /// Opens (or creates) sled in `path` with a page cache of `cache_capacity` bytes.
    pub fn open_folder(path: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        let db = open_sled(path, cache_capacity)?;
        let rows = db.open_tree("cmr").map_err(sled_err)?;
        let (mark, acknowledged) = AckMark::open(path)?;
        let entries = EntriesFile::open(path)?;
        Ok(Self {
            open: RwLock::new(Some((db, rows))),
            path: path.to_path_buf(),
            cache_capacity,
            sync: Mutex::new((FileStates::new(), mark)),
            acknowledged,
            entries,
        })
    }

    /// sled's tree (a cheap handle), unless it is being reopened.
    fn tree(&self) -> Result<sled::Tree, StoreError> {
        self.open
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, t)| t.clone())
            .ok_or_else(|| StoreError::Unavailable("the data folder is being reopened".into()))
    }

    /// sled itself, unless it is being reopened.
    fn db(&self) -> Result<sled::Db, StoreError> {
        self.open
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(db, _)| db.clone())
            .ok_or_else(|| StoreError::Unavailable("the data folder is being reopened".into()))
    }
}

/// sled's rows, with each entries piece read from the entries file in place of its pointer.
fn rows<'a>(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a,
    entries: &'a EntriesFile,
) -> Rows<'a> {
    Box::new(iter.map(move |kv| {
        let (k, v) = kv.map_err(sled_err)?;
        let v = entries.resolve(&k, v.to_vec())?;
        Ok((k.to_vec(), v))
    }))
}

impl SledStorage {
    /// The rows of `f(tree)`, or the one error of a store being reopened.
    fn rows_of<'a, I>(&'a self, f: impl FnOnce(&sled::Tree) -> I) -> Rows<'a>
    where
        I: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a,
    {
        match self.tree() {
            Ok(t) => rows(f(&t), &self.entries),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }
}

impl Storage for SledStorage {
    fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        let sled = self.db()?.size_on_disk().map_err(sled_err)?;
        Ok(Some(sled + self.entries.len()))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree()?.get(key).map_err(sled_err)? {
            Some(v) => Ok(Some(self.entries.resolve(key, v.to_vec())?)),
            None => Ok(None),
        }
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Rows<'_> {
        self.rows_of(|t| t.range(from.to_vec()..to.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Rows<'_> {
        self.rows_of(|t| t.scan_prefix(prefix))
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Row>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        match self.tree()?.range(from.to_vec()..to.to_vec()).next_back() {
            Some(kv) => {
                let (k, v) = kv.map_err(sled_err)?;
                let v = self.entries.resolve(&k, v.to_vec())?;
                Ok(Some((k.to_vec(), v)))
            }
            None => Ok(None),
        }
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.tree()?.iter().next().is_none())
    }

    fn reconnects(&self) -> bool {
        true
    }

    /// Reopens sled after a failure (a full disk, a file system remounted read-only): sled refuses
    /// every operation once one write failed, and only a reopen reads its files again. What was
    /// written and not synced may be gone; the store rebuilds from what sled recovers.
    fn reconnect(&self) -> Result<(), StoreError> {
        // No sync runs on a store being reopened.
        let mut sync = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        // The old handles go first, under the write lock only while they are taken: readers then get
        // `unavailable` at once instead of waiting on the lock for the reopen. sled lets go of its
        // folder lock only once every handle is dropped (a reader's iterator still running holds one);
        // the open below waits for that, up to 2 s, without holding anything readers need.
        let old = self.open.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        let db = open_sled(&self.path, self.cache_capacity)?;
        let rows = db.open_tree("cmr").map_err(sled_err)?;
        let (mark, _) = AckMark::open(&self.path)?;
        self.entries.reopen(&self.path)?;
        *sync = (FileStates::new(), mark);
        *self.open.write().unwrap_or_else(|p| p.into_inner()) = Some((db, rows));
        Ok(())
    }

    fn write(&self, writes: Writes) -> Result<(), StoreError> {
        let tree = self.tree()?;
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                // The entries go to their file first: the pointer sled keeps is to bytes written.
                Some(v) if k.first() == Some(&tag::ENTRIES) => {
                    batch.insert(k, self.entries.append(&v)?);
                }
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        tree.apply_batch(batch).map_err(sled_err)
    }

    fn sync(&self, size: u64, root: &Hash, _checkpoint: &str) -> Result<(), StoreError> {
        let mut guard = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, mark) = &mut *guard;
        // The entries before sled's rows that point to them: sled flushes only here (its own flusher
        // is off), so its rows never reach the disk ahead of the bytes they point to through a flush.
        self.entries.sync()?;
        self.db()?.flush().map_err(sled_err)?;
        sync_dir(&self.path, seen)?;
        // The group is durable; without the mark the store could not vouch for it at the next open.
        mark.write(size, root)
    }

    fn acknowledged(&self) -> Option<Acknowledged> {
        self.acknowledged.map(|(size, root)| Acknowledged {
            size,
            root,
            remedy: format!(
                "sled's files were damaged or replaced by an older copy. Restore a backup of the whole \
                 folder (with its `{ACK_MARK}` file); to accept the loss instead, remove {} and open again",
                self.path.join(ACK_MARK).display()
            ),
        })
    }
}

/// What the last durability step saw of each file in the data folder: its length and modification time.
type FileStates = HashMap<PathBuf, (u64, std::time::SystemTime)>;
/// The file, beside sled's, that records the newest acknowledged log size and root.
pub const ACK_MARK: &str = "acknowledged";
/// The acknowledgement mark: after each group is durable (sled's flush and the `fdatasync`s) and before
/// it is acknowledged, the group's size and root are written to [`ACK_MARK`], in place, without a sync.
/// sled treats damage in its files as a torn tail and silently opens an older state; the mark makes that a
/// clear error instead: a store that opens with fewer entries than it acknowledged, or another root at
/// that size, is refused. The mark is never ahead of what sled made durable (it is written after), so a
/// power loss can only leave it behind (it then checks less) or torn (its checksum fails: it is ignored).
struct AckMark {
    file: std::fs::File,
}
/// magic, size, root, SHA-256 of the first 44 bytes.
const MARK_LEN: usize = 4 + 8 + 32 + 32;
const MARK_MAGIC: &[u8; 4] = b"CMRa";
impl AckMark {
    fn open(dir: &Path) -> Result<(Self, Option<(u64, Hash)>), StoreError> {
        let file = open_beside(dir, ACK_MARK)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        let mark = (bytes.len() == MARK_LEN
            && &bytes[..4] == MARK_MAGIC
            && sha256(&bytes[..44]).0[..] == bytes[44..])
            .then(|| {
                let size = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
                let root: Hash = bytes[12..44].try_into().expect("32 bytes");
                (size, root)
            });
        Ok((AckMark { file }, mark))
    }

    fn write(&self, size: u64, root: &Hash) -> Result<(), StoreError> {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut bytes = Vec::with_capacity(MARK_LEN);
        bytes.extend_from_slice(MARK_MAGIC);
        bytes.extend_from_slice(&size.to_be_bytes());
        bytes.extend_from_slice(root);
        let sum = sha256(&bytes);
        bytes.extend_from_slice(&sum.0);
        let mut file = &self.file;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&bytes).map_err(io)
    }
}
/// `fdatasync` every file sled changed in the data folder since the last call, and the folders whose set
/// of files changed: sled's own flush uses `sync_file_range`, which does not survive power loss (sled
/// issue 1452). An fsync costs about 0.2 ms here even on a clean file, so unchanged files are skipped.
fn sync_dir(path: &Path, seen: &mut FileStates) -> Result<(), StoreError> {
    fn walk(p: &Path, seen: &mut FileStates, present: &mut Vec<PathBuf>) -> std::io::Result<bool> {
        let mut dir_changed = false;
        for entry in std::fs::read_dir(p)? {
            let entry = entry?;
            let path = entry.path();
            let result = (|| -> std::io::Result<()> {
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    if walk(&path, seen, present)? {
                        std::fs::File::open(&path)?.sync_all()?;
                    }
                    return Ok(());
                }
                // Only files hold data: a socket (the server's control socket) cannot be opened.
                if !meta.is_file() {
                    return Ok(());
                }
                // The acknowledgement mark is written, never synced, after each group (see
                // `AckMark`): syncing it would double the cost of every group.
                if path.file_name() == Some(std::ffi::OsStr::new(ACK_MARK)) {
                    return Ok(());
                }
                // The entries file is synced on its own, before sled's flush.
                if path.file_name() == Some(std::ffi::OsStr::new(ENTRIES_FILE)) {
                    return Ok(());
                }
                present.push(path.clone());
                let state = (meta.len(), meta.modified()?);
                // sled rewrites its main file in place, often at the same length, and a modification
                // time may not move between two groups (coarse timestamps): it is synced every time.
                // The other files are written once under new names (snapshots, blobs), so a file not
                // seen before, or with another length or time, is what needs syncing there.
                let rewritten_in_place = path.file_name() == Some(std::ffi::OsStr::new("db"));
                match seen.get(&path) {
                    Some(s) if *s == state && !rewritten_in_place => {}
                    previous => {
                        dir_changed |= previous.is_none();
                        std::fs::File::open(&path)?.sync_data()?;
                        seen.insert(path.clone(), state);
                    }
                }
                Ok(())
            })();
            match result {
                // sled replaces old snapshot files as it goes: a file gone has nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir_changed = true,
                other => other?,
            }
        }
        Ok(dir_changed)
    }
    let mut present = Vec::new();
    let changed = walk(path, seen, &mut present).map_err(io)?;
    if changed || present.len() != seen.len() {
        seen.retain(|p, _| present.contains(p));
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
    }
    Ok(())
}
/// Opens sled. sled releases its folder lock only when its I/O threads let go of the files, a moment
/// after the last handle is dropped: a reopen in the same process waits up to two seconds for that,
/// and a folder still locked after it belongs to another process.
fn open_sled(path: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            // Only the store's sync flushes, after the entries file (see `Storage::sync`).
            .flush_every_ms(None)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Format(
                    "the data folder is in use by another process".into(),
                ));
            }
            Err(e) => {
                return Err(StoreError::Format(format!(
                    "cannot open the data folder: {e}"
                )));
            }
        }
    }
}

/// The log's entries outside sled: an append-only file of entries pieces, each written once, at its
/// end. sled keeps, as the piece's value, a pointer ([`POINTER_LEN`] bytes: offset, length, and the
/// first 8 bytes of the piece's SHA-256), and [`SledStorage`] hands the piece itself to every read, so
/// the store above sees rows as on any other engine.
///
/// Bytes past the last pointer (a group written and then lost with sled's unsynced tail, or one
/// abandoned) are never read; a group logged again is appended again. A pointer whose bytes are missing
/// or differ (the file damaged, truncated or replaced) is an error that names the file: the store then
/// refuses to open rather than serve a log it cannot vouch for.
struct EntriesFile {
    /// The file (replaced only by a reconnect). Reads and appends use positioned I/O on a shared handle.
    file: RwLock<std::sync::Arc<std::fs::File>>,
    /// Where the next piece goes: the file's length. Only the sequencer appends.
    end: std::sync::atomic::AtomicU64,
    /// Whether bytes were appended since the last sync.
    dirty: std::sync::atomic::AtomicBool,
}

/// Offset (8), length (4), first 8 bytes of the SHA-256 of the piece (8).
const POINTER_LEN: usize = 20;

impl EntriesFile {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let (file, end) = open_entries(dir)?;
        Ok(Self {
            file: RwLock::new(std::sync::Arc::new(file)),
            end: end.into(),
            dirty: false.into(),
        })
    }

    fn reopen(&self, dir: &Path) -> Result<(), StoreError> {
        let (file, end) = open_entries(dir)?;
        *self.file.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(file);
        self.end.store(end, Ordering::SeqCst);
        self.dirty.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn file(&self) -> std::sync::Arc<std::fs::File> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn len(&self) -> u64 {
        self.end.load(Ordering::SeqCst)
    }

    /// Appends a piece; returns its pointer.
    fn append(&self, piece: &[u8]) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        let len = u32::try_from(piece.len())
            .map_err(|_| StoreError::Format("a piece of entries past 4 GiB".into()))?;
        // A failed write leaves a hole no pointer names; the store stops and reopens (which reads the
        // file's length again).
        let at = self.end.fetch_add(u64::from(len), Ordering::SeqCst);
        self.file().write_all_at(piece, at).map_err(io)?;
        self.dirty.store(true, Ordering::SeqCst);
        let mut pointer = Vec::with_capacity(POINTER_LEN);
        pointer.extend_from_slice(&at.to_be_bytes());
        pointer.extend_from_slice(&len.to_be_bytes());
        pointer.extend_from_slice(&sha256(piece).0[..8]);
        Ok(pointer)
    }

    /// The value of a row: for an entries piece, the piece its pointer names.
    fn resolve(&self, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        if key.first() != Some(&tag::ENTRIES) {
            return Ok(value);
        }
        let damaged = |what: &str| {
            StoreError::Format(format!(
                "the piece of entries at {key:02x?} {what} in the `{ENTRIES_FILE}` file: the stored \
                 data is damaged"
            ))
        };
        let Ok(pointer) = <[u8; POINTER_LEN]>::try_from(value.as_slice()) else {
            return Err(damaged("has no pointer"));
        };
        let offset = u64::from_be_bytes(pointer[..8].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(pointer[8..12].try_into().unwrap_or_default());
        if offset.saturating_add(u64::from(len)) > self.len() {
            return Err(damaged("is past the end"));
        }
        let mut piece = vec![0; len as usize];
        self.file().read_exact_at(&mut piece, offset).map_err(io)?;
        if sha256(&piece).0[..8] != pointer[12..] {
            return Err(damaged("does not match its checksum"));
        }
        Ok(piece)
    }

    /// Makes every appended piece durable.
    fn sync(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::SeqCst)
            && let Err(e) = self.file().sync_data()
        {
            self.dirty.store(true, Ordering::SeqCst);
            return Err(io(e));
        }
        Ok(())
    }
}

/// Opens (or creates) the entries file in `dir`; returns it and its length.
fn open_entries(dir: &Path) -> Result<(std::fs::File, u64), StoreError> {
    let file = open_beside(dir, ENTRIES_FILE)?;
    let end = file.metadata().map_err(io)?.len();
    Ok((file, end))
}

/// Opens file `name` in the data folder `dir` for reading and writing; a file it creates is made
/// durable with its folder entry before it is used.
fn open_beside(dir: &Path, name: &str) -> Result<std::fs::File, StoreError> {
    let path = dir.join(name);
    let existed = path.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    if !existed {
        file.sync_all().map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(file)
}
