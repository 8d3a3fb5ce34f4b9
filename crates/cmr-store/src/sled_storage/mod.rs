//! The embedded storage engine: sled (0.34) in a local folder, made durable with `fdatasync`.
//!
//! What it owns: opening sled (and waiting for a lock a closing handle still holds), applying a group of
//! writes as one sled batch, the durability step (sled's flush, then an `fdatasync` of every file sled
//! changed, since sled's own flush does not survive power loss), and the acknowledgement mark beside
//! sled's files, which turns sled's silent recovery of an older state into a clear error at open.
//!
//! It also keeps the log's entries and the sealed records (the `ENTRIES` and `RECORDS` pieces, each
//! written once) out of sled, in append-only files beside it ([`ENTRIES_FILE`], [`RECORDS_FILE`]):
//! sled holds a short pointer for each piece. sled rewrites its pages as rows are added and keeps
//! memory for every page it holds, so the log's bodies and the records, most of what a vault stores,
//! made sled's files and the server's memory grow several times faster than what they hold
//! (docs/durability.md, "How the log is stored" and "Records and family ledgers in pieces"). The bytes
//! of an erased records piece are overwritten with zeros once its deletion is durable. Since format 11
//! the log's tree nodes are in a file too ([`NODES_FILE`]), and the pointers of 64 consecutive pieces
//! share one row of sled's, a bundle (`bundle`): sled's memory follows its number of rows.
//!
//! What it does not own: anything the store decides (the sequencer, the rules, the tree, the indexes).

mod bundle;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};

use cmr_core::hash::sha256;
use cmr_core::merkle::Hash;

use crate::layout::tag;
use crate::storage::{Acknowledged, Row, Rows, Storage, Writes};
use crate::{StoreConfig, StoreError};

/// The file, beside sled's, that holds the log's entries (see [`PieceFile`]).
pub const ENTRIES_FILE: &str = "entries";
/// The file, beside sled's, that holds the sealed records (see [`PieceFile`]).
pub const RECORDS_FILE: &str = "records";
/// The file, beside sled's, that holds the log's tree nodes since format 11 (see [`PieceFile`]).
pub const NODES_FILE: &str = "nodes";

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
    entries: PieceFile,
    /// The sealed records, outside sled.
    records: PieceFile,
    /// The log's tree nodes, outside sled (format 11; earlier ones are in sled's rows).
    nodes: PieceFile,
    /// Held by a write: a bundle is read, changed and written back.
    writing: Mutex<()>,
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
        Ok(Self {
            open: RwLock::new(Some((db, rows))),
            path: path.to_path_buf(),
            cache_capacity,
            sync: Mutex::new((FileStates::new(), mark)),
            acknowledged,
            entries: PieceFile::open(path, ENTRIES_FILE, tag::ENTRIES)?,
            records: PieceFile::open(path, RECORDS_FILE, tag::RECORDS)?,
            nodes: PieceFile::open(path, NODES_FILE, tag::NODES)?,
            writing: Mutex::new(()),
        })
    }

    /// The file that holds the pieces of the table `key` belongs to, if a row of sled's of that table
    /// (not a bundle) holds a pointer: the entries and records of formats 6 to 10. (The tree nodes of
    /// those formats are in their rows.)
    fn file_of(&self, key: &[u8]) -> Option<&PieceFile> {
        match key.first() {
            Some(&tag::ENTRIES) => Some(&self.entries),
            Some(&tag::RECORDS) => Some(&self.records),
            _ => None,
        }
    }

    /// The file of the pieces whose pointers the bundles of table `table` hold.
    fn bundled_file(&self, table: u8) -> Result<&PieceFile, StoreError> {
        match table {
            tag::ENTRIES => Ok(&self.entries),
            tag::RECORDS => Ok(&self.records),
            tag::NODES => Ok(&self.nodes),
            _ => Err(StoreError::Format(format!(
                "no file holds the pieces of table {table:#04x}"
            ))),
        }
    }

    /// The value of a logical row not read yet.
    fn read_held(&self, key: &[u8], held: Held) -> Result<Vec<u8>, StoreError> {
        match held {
            Held::Row(v) => self.resolve(key, v),
            Held::Piece(p) => self
                .bundled_file(key.first().copied().unwrap_or_default())?
                .resolve(key, p.to_vec()),
        }
    }

    /// The value of a row as the store sees it: a piece kept outside sled in place of its pointer.
    fn resolve(&self, key: &[u8], value: sled::IVec) -> Result<Vec<u8>, StoreError> {
        match self.file_of(key) {
            Some(file) => file.resolve(key, value.to_vec()),
            None => Ok(value.to_vec()),
        }
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

/// A logical row not read yet: a row of sled's (of any table but a bundle: a piece of formats 6 to
/// 10 has a row of its own), or a piece a bundle points to.
enum Held {
    Row(sled::IVec),
    Piece(bundle::Pointer),
}

type Physical = sled::Result<(sled::IVec, sled::IVec)>;
/// A piece's write, as a bundle takes it: its place in the bundle, its key, its new value (or none).
type PieceWrite = (u8, Vec<u8>, Option<Vec<u8>>);
type HeldRow = (Vec<u8>, Held);

/// The next physical row of `rows` as logical rows in key order: a row of another table as it is, or
/// every row of one chunk (the pieces' own rows of formats 6 to 10 and the chunk's bundle, which are
/// next to each other in key order, whichever way `rows` goes), their pieces sorted by key.
fn next_chunk(
    rows: &mut std::iter::Peekable<impl Iterator<Item = Physical>>,
) -> Option<Result<Vec<HeldRow>, StoreError>> {
    let (k, v) = match rows.next()? {
        Ok(kv) => kv,
        Err(e) => return Some(Err(sled_err(e))),
    };
    let Some(chunk) = bundle::chunk_of(&k) else {
        return Some(Ok(vec![(k.to_vec(), Held::Row(v))]));
    };
    let mut held = Vec::new();
    let mut row = Some((k, v));
    while let Some((k, v)) = row.take() {
        if bundle::is_bundle(&k) {
            match bundle::Bundle::decode(&k, &v) {
                Ok(b) => held.extend(
                    b.pieces
                        .into_iter()
                        .map(|(place, p)| (bundle::piece_key(&k, place), Held::Piece(p))),
                ),
                Err(e) => return Some(Err(e)),
            }
        } else {
            held.push((k.to_vec(), Held::Row(v)));
        }
        // An error is left for the next call to report.
        if let Some(Ok((next, _))) = rows.peek()
            && bundle::chunk_of(next).as_ref() == Some(&chunk)
        {
            row = rows.next().and_then(Result::ok);
        }
    }
    held.sort_by(|a, b| a.0.cmp(&b.0));
    Some(Ok(held))
}

/// Which logical keys a scan wants.
enum Wanted {
    /// `from <= key < to`.
    Range(Vec<u8>, Vec<u8>),
    /// Keys that start with the prefix.
    Prefix(Vec<u8>),
}

impl Wanted {
    fn holds(&self, key: &[u8]) -> bool {
        match self {
            Wanted::Range(from, to) => from.as_slice() <= key && key < to.as_slice(),
            Wanted::Prefix(p) => key.starts_with(p),
        }
    }
}

/// The logical rows of a physical scan, in key order, each read (from its file, for a piece) only
/// when it is reached.
struct Logical<'a, I: Iterator<Item = Physical>> {
    storage: &'a SledStorage,
    rows: std::iter::Peekable<I>,
    wanted: Wanted,
    ready: std::collections::VecDeque<HeldRow>,
}

impl<I: Iterator<Item = Physical>> Iterator for Logical<'_, I> {
    type Item = Result<Row, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, held)) = self.ready.pop_front() {
                return Some(self.storage.read_held(&k, held).map(|v| (k, v)));
            }
            match next_chunk(&mut self.rows)? {
                Ok(held) => self
                    .ready
                    .extend(held.into_iter().filter(|(k, _)| self.wanted.holds(k))),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl SledStorage {
    /// The logical rows `wanted` of the physical rows `f(tree)`, or the one error of a store being
    /// reopened.
    fn rows_of<'a, I>(&'a self, wanted: Wanted, f: impl FnOnce(&sled::Tree) -> I) -> Rows<'a>
    where
        I: Iterator<Item = Physical> + 'a,
    {
        match self.tree() {
            Ok(t) => Box::new(Logical {
                storage: self,
                rows: f(&t).peekable(),
                wanted,
                ready: Default::default(),
            }),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }
}

impl Storage for SledStorage {
    fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        let sled = self.db()?.size_on_disk().map_err(sled_err)?;
        Ok(Some(
            sled + self.entries.len() + self.records.len() + self.nodes.len(),
        ))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if bundle::is_bundle(key) {
            // Not a row the store wrote.
            return Ok(None);
        }
        let tree = self.tree()?;
        if let Some((b, place)) = bundle::bundle_of(key)
            && let Some(v) = tree.get(&b).map_err(sled_err)?
            && let Some(p) = bundle::Bundle::decode(&b, &v)?.pieces.remove(&place)
        {
            return self.read_held(key, Held::Piece(p)).map(Some);
        }
        // Any other table's row, or a piece's own row (formats 6 to 10).
        match tree.get(key).map_err(sled_err)? {
            Some(v) => Ok(Some(self.resolve(key, v)?)),
            None => Ok(None),
        }
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Rows<'_> {
        let scan = bundle::scan_from(from)..bundle::scan_to(to);
        self.rows_of(Wanted::Range(from.to_vec(), to.to_vec()), |t| t.range(scan))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Rows<'_> {
        // A bundle shares all but the last byte of its pieces' keys: a prefix shorter than a piece's
        // key finds the bundles of the pieces it finds. A piece's whole key finds only that piece.
        if bundle::is_piece(prefix) {
            let key = prefix.to_vec();
            return Box::new(
                self.get(prefix)
                    .map(|v| v.map(|v| (key, v)))
                    .transpose()
                    .into_iter(),
            );
        }
        self.rows_of(Wanted::Prefix(prefix.to_vec()), |t| t.scan_prefix(prefix))
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Row>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        let wanted = Wanted::Range(from.to_vec(), to.to_vec());
        let scan = bundle::scan_from(from)..bundle::scan_to(to);
        let mut rows = self.tree()?.range(scan).rev().peekable();
        while let Some(held) = next_chunk(&mut rows) {
            if let Some((k, held)) = held?.into_iter().rev().find(|(k, _)| wanted.holds(k)) {
                let v = self.read_held(&k, held)?;
                return Ok(Some((k, v)));
            }
        }
        Ok(None)
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
        self.nodes.reopen(&self.path)?;
        // Deletions not yet known durable are not scrubbed: they may be gone with sled's tail.
        self.records.reopen(&self.path)?;
        *sync = (FileStates::new(), mark);
        *self.open.write().unwrap_or_else(|p| p.into_inner()) = Some((db, rows));
        Ok(())
    }

    fn write(&self, writes: Writes) -> Result<(), StoreError> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let tree = self.tree()?;
        let mut batch = sled::Batch::default();
        let mut deleted = Vec::new();
        // The pieces' writes, by the bundle that holds their pointers.
        let mut bundled: BTreeMap<Vec<u8>, Vec<PieceWrite>> = BTreeMap::new();
        for (k, v) in writes {
            if let Some((b, place)) = bundle::bundle_of(&k) {
                bundled.entry(b).or_default().push((place, k, v));
                continue;
            }
            // Any other table's row (every key of a table kept in files is a piece's, bundled above).
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        // Every chunk as it is, its bundle and the pieces' own rows of formats 6 to 10, read before
        // anything is appended: a damaged bundle fails the group with nothing written.
        let mut chunks = Vec::with_capacity(bundled.len());
        for (b, changes) in bundled {
            let file = self.bundled_file(b[0])?;
            let chunk = bundle::chunk_of(&b).unwrap_or_default();
            let mut pieces = bundle::Bundle::default();
            let mut own_rows = BTreeMap::new();
            for kv in tree.range(chunk..=b.clone()) {
                let (k, v) = kv.map_err(sled_err)?;
                if k == b {
                    pieces = bundle::Bundle::decode(&b, &v)?;
                } else {
                    own_rows.insert(k.to_vec(), v);
                }
            }
            chunks.push((b, file, pieces, own_rows, changes));
        }
        for (b, file, mut pieces, mut own_rows, changes) in chunks {
            for (place, k, v) in changes {
                // A piece of an earlier format written again or deleted: its own row goes.
                if let Some(old) = own_rows.remove(&k) {
                    batch.remove(k);
                    if v.is_none()
                        && file.scrubs
                        && let Some((offset, len, _)) = pointed(&old)
                    {
                        deleted.push((offset, len));
                    }
                }
                match v {
                    // A piece goes to its file first: the pointer sled keeps is to bytes written.
                    Some(v) => {
                        let pointer = file.append(&v)?;
                        pieces.pieces.insert(place, pointer);
                    }
                    None => {
                        // A deleted records piece (an erasure) is scrubbed once its deletion is durable.
                        if let Some(p) = pieces.pieces.remove(&place)
                            && file.scrubs
                            && let Some((offset, len, _)) = pointed(&p)
                        {
                            deleted.push((offset, len));
                        }
                    }
                }
            }
            if pieces.pieces.is_empty() {
                batch.remove(b);
            } else {
                batch.insert(b, pieces.encode());
            }
        }
        tree.apply_batch(batch).map_err(sled_err)?;
        self.records.deleted(deleted);
        Ok(())
    }

    fn upgrade(&self, from: u32) -> Result<(), StoreError> {
        // Format 7 kept the records pieces in sled's rows: each is moved into the records file, a
        // thousand a write (an upgrade cut short goes on from where it was: a moved piece's row is a
        // pointer).
        if from > 7 {
            return Ok(());
        }
        let tree = self.tree()?;
        let mut moving = Writes::new();
        for kv in tree.scan_prefix([tag::RECORDS]) {
            let (k, v) = kv.map_err(sled_err)?;
            if bundle::is_piece(&k) && pointed(&v).is_none() {
                moving.insert(k.to_vec(), Some(v.to_vec()));
            }
            if moving.len() >= 1024 {
                self.write(std::mem::take(&mut moving))?;
            }
        }
        if !moving.is_empty() {
            self.write(moving)?;
        }
        // Made durable here, before the store writes its new format: a pointer never reaches the
        // disk ahead of the bytes it names.
        self.records.sync()?;
        self.db()?.flush().map_err(sled_err)?;
        Ok(())
    }

    fn sync(&self, size: u64, root: &Hash, _checkpoint: &str) -> Result<(), StoreError> {
        let mut guard = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, mark) = &mut *guard;
        // Deletions this flush makes durable: every one noted so far was applied to sled before it.
        let deleted = self.records.take_deleted();
        // The pieces before sled's rows that point to them: sled flushes only here (its own flusher
        // is off), so its rows never reach the disk ahead of the bytes they point to through a flush.
        self.entries.sync()?;
        self.records.sync()?;
        self.nodes.sync()?;
        self.db()?.flush().map_err(sled_err)?;
        sync_dir(&self.path, seen)?;
        // No pointer names these bytes any more, durably: they are overwritten with zeros (made
        // durable with the next group's sync).
        self.records.scrub(deleted);
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

#[cfg(feature = "testkit")]
impl SledStorage {
    /// Test support: keeps every piece as format 10 kept it, in a row of sled's of its own (a pointer
    /// for the entries and records, the tree nodes themselves), in place of the bundles, and flushes:
    /// a test builds the folder of an earlier format from a new store this way.
    pub fn unbundle(&self) -> Result<(), StoreError> {
        let tree = self.tree()?;
        let mut batch = sled::Batch::default();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            if !bundle::is_bundle(&k) {
                continue;
            }
            for (place, p) in bundle::Bundle::decode(&k, &v)?.pieces {
                let key = bundle::piece_key(&k, place);
                let row = match k.first() {
                    Some(&tag::NODES) => self.nodes.resolve(&key, p.to_vec())?,
                    _ => p.to_vec(),
                };
                batch.insert(key, row);
            }
            batch.remove(k);
        }
        tree.apply_batch(batch).map_err(sled_err)?;
        self.db()?.flush().map_err(sled_err)?;
        Ok(())
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
                // The files of pieces are synced on their own, before sled's flush.
                if [ENTRIES_FILE, RECORDS_FILE, NODES_FILE]
                    .iter()
                    .any(|f| path.file_name() == Some(std::ffi::OsStr::new(f)))
                {
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
            // Only the store's sync flushes, after the files of pieces (see `Storage::sync`).
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

/// Pieces outside sled: an append-only file of pieces (the log's entries or tree nodes, or the sealed
/// records), each written once, at its end. sled keeps a pointer to each piece ([`POINTER_LEN`] bytes:
/// offset, length, and the piece's CRC-32), in its chunk's bundle since format 11 (the piece's own row
/// before), and [`SledStorage`] hands the piece itself to every read, so the store above sees rows as
/// on any other engine.
///
/// Bytes past the last pointer (a group written and then lost with sled's unsynced tail, or one
/// abandoned) are never read; a group logged again is appended again. A pointer whose bytes are missing
/// or differ (the file damaged, truncated or replaced) is an error that names the file: the store then
/// refuses to open rather than serve data it cannot vouch for.
///
/// The records file also forgets: the bytes of a records piece whose row was deleted (an erasure) are
/// overwritten with zeros once the deletion is durable. (A deletion a crash cuts short of that leaves
/// bytes no pointer names, as sled's own files keep the old versions of its pages until it reuses
/// them; docs/durability.md.)
struct PieceFile {
    /// The file's name in the data folder.
    name: &'static str,
    /// The table whose pieces it holds.
    tag: u8,
    /// Whether a deleted piece's bytes are overwritten (the records).
    scrubs: bool,
    /// The file (replaced only by a reconnect). Reads and appends use positioned I/O on a shared handle.
    file: RwLock<std::sync::Arc<std::fs::File>>,
    /// Where the next piece goes: the file's length. Only the sequencer appends.
    end: std::sync::atomic::AtomicU64,
    /// Whether bytes were written since the last sync.
    dirty: std::sync::atomic::AtomicBool,
    /// Deleted pieces (offset, length) whose deletion is not known durable yet.
    deleted: Mutex<Vec<(u64, u32)>>,
}

/// A pointer since format 10: offset (8), length (4), the piece's CRC-32 (4).
use bundle::POINTER_LEN;

/// A pointer of formats 6 to 9: offset (8), length (4), the first 8 bytes of the piece's SHA-256 (8).
/// A profile under `cmr bench` found a tenth of the sequencer's time in those digests (every read
/// checks the records pieces it reads); the check is against damage (a file cut short, overwritten or
/// replaced), not against someone who can write the folder (who could write the pointers too), so a
/// CRC does it at a fraction of the cost.
const SHA_POINTER_LEN: usize = 20;

/// How a pointer checks its piece.
#[derive(Clone, Copy)]
enum Check {
    Crc32(u32),
    Sha256([u8; 8]),
}

impl Check {
    fn of(piece: &[u8]) -> u32 {
        crc32fast::hash(piece)
    }

    fn holds(self, piece: &[u8]) -> bool {
        match self {
            Check::Crc32(c) => Self::of(piece) == c,
            Check::Sha256(d) => sha256(piece).0[..8] == d,
        }
    }
}

/// Where the pointer `value` says its piece is, and its check, if it is a pointer. No piece is
/// [`POINTER_LEN`] or [`SHA_POINTER_LEN`] bytes long (an entries piece holds a 4-byte length, a
/// 32-byte salt and a body; a records piece a 4-byte length, an 8-byte log index and a sealed record
/// of at least 52 bytes), so a value of either length is a pointer, and any other a piece kept in
/// sled's row itself (a records piece of format 7).
fn pointed(value: &[u8]) -> Option<(u64, u32, Check)> {
    let (place, check) = match value.len() {
        POINTER_LEN | SHA_POINTER_LEN => value.split_at(12),
        _ => return None,
    };
    let offset = u64::from_be_bytes(place[..8].try_into().ok()?);
    let len = u32::from_be_bytes(place[8..12].try_into().ok()?);
    let check = match check.len() {
        4 => Check::Crc32(u32::from_be_bytes(check.try_into().ok()?)),
        _ => Check::Sha256(check.try_into().ok()?),
    };
    Some((offset, len, check))
}

impl PieceFile {
    fn open(dir: &Path, name: &'static str, tag: u8) -> Result<Self, StoreError> {
        let (file, end) = open_pieces(dir, name)?;
        Ok(Self {
            name,
            tag,
            scrubs: tag == tag::RECORDS,
            file: RwLock::new(std::sync::Arc::new(file)),
            end: end.into(),
            dirty: false.into(),
            deleted: Mutex::new(Vec::new()),
        })
    }

    fn reopen(&self, dir: &Path) -> Result<(), StoreError> {
        let (file, end) = open_pieces(dir, self.name)?;
        *self.file.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(file);
        self.end.store(end, Ordering::SeqCst);
        self.dirty.store(false, Ordering::SeqCst);
        self.take_deleted();
        Ok(())
    }

    fn file(&self) -> std::sync::Arc<std::fs::File> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn len(&self) -> u64 {
        self.end.load(Ordering::SeqCst)
    }

    /// Appends a piece; returns its pointer.
    fn append(&self, piece: &[u8]) -> Result<bundle::Pointer, StoreError> {
        use std::os::unix::fs::FileExt as _;
        let len = u32::try_from(piece.len())
            .map_err(|_| StoreError::Format(format!("a piece of {} past 4 GiB", self.name)))?;
        // A failed write leaves a hole no pointer names; the store stops and reopens (which reads the
        // file's length again).
        let at = self.end.fetch_add(u64::from(len), Ordering::SeqCst);
        self.file().write_all_at(piece, at).map_err(io)?;
        self.dirty.store(true, Ordering::SeqCst);
        let mut pointer = [0; POINTER_LEN];
        pointer[..8].copy_from_slice(&at.to_be_bytes());
        pointer[8..12].copy_from_slice(&len.to_be_bytes());
        pointer[12..].copy_from_slice(&Check::of(piece).to_be_bytes());
        Ok(pointer)
    }

    /// The value of one of this file's rows: the piece its pointer names. (A records piece that is
    /// not a pointer was written by format 7 into sled's row itself, and is the piece.)
    fn resolve(&self, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        debug_assert_eq!(key.first(), Some(&self.tag));
        let damaged = |what: &str| {
            StoreError::Format(format!(
                "the piece of {} at {key:02x?} {what} in the `{}` file: the stored data is damaged",
                self.name, self.name
            ))
        };
        let Some((offset, len, check)) = pointed(&value) else {
            return if self.tag == tag::RECORDS {
                Ok(value)
            } else {
                Err(damaged("has no pointer"))
            };
        };
        if offset.saturating_add(u64::from(len)) > self.len() {
            return Err(damaged("is past the end"));
        }
        let mut piece = vec![0; len as usize];
        self.file().read_exact_at(&mut piece, offset).map_err(io)?;
        if !check.holds(&piece) {
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

    /// Notes pieces whose rows a write applied to sled has deleted.
    fn deleted(&self, places: Vec<(u64, u32)>) {
        if !places.is_empty() {
            let mut deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
            deleted.extend(places);
        }
    }

    /// The deleted pieces noted so far.
    fn take_deleted(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.deleted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Overwrites with zeros the bytes of pieces whose deletion is durable. A failure is logged and
    /// the pieces are tried again at the next sync: the deletion itself stands either way.
    fn scrub(&self, places: Vec<(u64, u32)>) {
        use std::os::unix::fs::FileExt as _;
        let file = self.file();
        let mut failed = Vec::new();
        for (offset, len) in places {
            let end = offset.saturating_add(u64::from(len));
            if end > self.len() {
                continue;
            }
            match file.write_all_at(&vec![0; len as usize], offset) {
                Ok(()) => self.dirty.store(true, Ordering::SeqCst),
                Err(e) => {
                    tracing::warn!(error = %e, file = self.name, "an erased piece is not overwritten yet");
                    failed.push((offset, len));
                }
            }
        }
        self.deleted(failed);
    }
}

/// Opens (or creates) the file of pieces `name` in `dir`; returns it and its length.
fn open_pieces(dir: &Path, name: &str) -> Result<(std::fs::File, u64), StoreError> {
    let file = open_beside(dir, name)?;
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
