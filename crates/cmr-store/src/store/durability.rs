//! Durability: the acknowledgement mark, the `fdatasync` of sled's files, opening sled, and the syncer that
//! makes written groups durable and acknowledges them in order (docs/durability.md).

use super::*;

/// The latest group known to be durable. Readers of the log see only this: sled already holds the
/// group in progress after `apply_batch`, but until its `fdatasync` returns, a crash can take it back,
/// and a checkpoint served in that window would later look like a fork.
#[derive(Default)]
pub(super) struct Durable {
    pub(super) size: u64,
    pub(super) checkpoint: Option<String>,
}
/// What the last durability step saw of each file in the data folder: its length and modification time.
pub(super) type FileStates = HashMap<PathBuf, (u64, std::time::SystemTime)>;
/// The file, beside sled's, that records the newest acknowledged log size and root.
pub const ACK_MARK: &str = "acknowledged";
/// The acknowledgement mark: after each group is durable (sled's flush and the `fdatasync`s) and before
/// it is acknowledged, the group's size and root are written to [`ACK_MARK`], in place, without a sync.
/// sled treats damage in its files as a torn tail and silently opens an older state; the mark makes that a
/// clear error instead: a store that opens with fewer entries than it acknowledged, or another root at
/// that size, is refused. The mark is never ahead of what sled made durable (it is written after), so a
/// power loss can only leave it behind (it then checks less) or torn (its checksum fails: it is ignored).
pub(super) struct AckMark {
    pub(super) file: std::fs::File,
}
/// magic, size, root, SHA-256 of the first 44 bytes.
pub(super) const MARK_LEN: usize = 4 + 8 + 32 + 32;
pub(super) const MARK_MAGIC: &[u8; 4] = b"CMRa";
impl AckMark {
    pub(super) fn open(dir: &Path) -> Result<(Self, Option<(u64, Hash)>), StoreError> {
        let path = dir.join(ACK_MARK);
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        if !existed {
            file.sync_all().map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
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

    pub(super) fn write(&self, size: u64, root: &Hash) -> Result<(), StoreError> {
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
pub(super) fn sync_dir(path: &Path, seen: &mut FileStates) -> Result<(), StoreError> {
    pub(super) fn walk(
        p: &Path,
        seen: &mut FileStates,
        present: &mut Vec<PathBuf>,
    ) -> std::io::Result<bool> {
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
                // The acknowledgement mark is written, never synced, after each group (see
                // `AckMark`): syncing it would double the cost of every group.
                if path.file_name() == Some(std::ffi::OsStr::new(ACK_MARK)) {
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
pub(super) fn open_sled(config: &StoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
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
/// A group written to sled, not yet durable.
pub(super) struct Written {
    pub(super) size: u64,
    pub(super) root: Hash,
    pub(super) ack: Acknowledgement,
}
/// Makes written groups durable, in order: sled's flush, then the `fdatasync`s; then the
/// acknowledgement mark; then the durable view readers see; then the acknowledgements.
pub(super) struct Syncer {
    pub(super) db: sled::Db,
    pub(super) tree: sled::Tree,
    pub(super) path: PathBuf,
    pub(super) synced: FileStates,
    pub(super) mark: AckMark,
    pub(super) durable: Arc<RwLock<Durable>>,
    pub(super) poisoned: Arc<AtomicBool>,
    /// Set after a group failed to become durable: every later group is in doubt too.
    pub(super) failed: Option<String>,
}
impl Syncer {
    pub(super) fn finish(&mut self, group: Written) {
        if let Some(why) = &self.failed {
            group.ack.fail(&StoreError::InDoubt(format!(
                "an earlier group could not be made durable: {why}"
            )));
            return;
        }
        let durable = self
            .db
            .flush()
            .map_err(io)
            .and_then(|_| sync_dir(&self.path, &mut self.synced))
            // The group is durable, but the store cannot vouch for it at the next open.
            .and_then(|()| self.mark.write(group.size, &group.root));
        if let Err(e) = durable {
            // The in-memory state is ahead of the disk: stop, and let a reopen rebuild it.
            self.poisoned.store(true, Ordering::SeqCst);
            self.failed = Some(e.to_string());
            group.ack.fail(&StoreError::InDoubt(e.to_string()));
            return;
        }
        {
            let mut d = self.durable.write().unwrap_or_else(|p| p.into_inner());
            d.size = group.size;
            d.checkpoint = Some(group.ack.note.clone());
        }
        group.ack.send(&self.tree);
    }
}
/// A durable group's replies, to be sent with their inclusion proofs.
pub(super) struct Acknowledgement {
    pub(super) size: u64,
    pub(super) note: String,
    pub(super) replies: Vec<(Reply, Result<Pending, StoreError>)>,
}
impl Acknowledgement {
    /// Answers every operation of the group with `e`.
    pub(super) fn fail(self, e: &StoreError) {
        for (reply, _) in self.replies {
            let _ = reply.send(Err(e.clone()));
        }
    }

    /// Sends each reply, with the inclusion proof of its entry in the group's checkpoint. The tree's
    /// nodes up to `size` never change, so this may run beside the sequencer's next group.
    pub(super) fn send(self, tree: &sled::Tree) {
        let committed = Tree::new(Committed(tree, self.size));
        for (reply, result) in self.replies {
            let ack = result.and_then(|p| {
                let proof = match p.index {
                    Some(i) => committed.inclusion_proof(i, self.size).map_err(tree_err)?,
                    None => Vec::new(),
                };
                Ok(Ack {
                    index: p.index,
                    proof,
                    checkpoint: self.note.clone(),
                    size: self.size,
                    read: p.read,
                    repeated: p.repeated,
                    head: p.head,
                    entry: p.entry,
                })
            });
            let _ = reply.send(ack);
        }
    }
}
