//! Online snapshots and restores (docs/operations.md "Backup and restore", docs/formats.md
//! "Snapshots").
//!
//! A snapshot is a log prefix and everything it refers to: the latest durable checkpoint (size `N`),
//! the bodies of entries `0..N`, the records the batches among them wrote, the idempotency rows of
//! operations logged before `N`, and the customers' key backups. Everything else (leaves, tree nodes,
//! chain heads, directories, the party and pending indexes) follows from those, so a restore rebuilds
//! it and checks it on the way: the tree's root against the signed checkpoint, then every entry through
//! the rules and every record against its batch, exactly as a store checks its log when it opens.
//!
//! Taking one needs no pause: entries below a durable size never change, and records change only by an
//! erasure. An erasure logged while the copy ran may have removed records the copy expected: the
//! snapshot is then left without its end, and is taken again.

use std::io::{Read, Write};

use cmr_log::restore::Restored;

use super::*;

/// The first bytes of a snapshot.
pub const MAGIC: &[u8] = b"cmr-vault snapshot 1\n";
/// The largest frame a restore accepts: a record is far smaller.
const MAX_FRAME: usize = 64 << 20;
/// Frame kinds.
const CHECKPOINT: u8 = b'c';
const ROW: u8 = b'r';
const END: u8 = b'e';
/// How many bytes of rows a restore writes per group.
const GROUP_BYTES: usize = 8 << 20;

/// What a snapshot or a restore held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// The log size of the snapshot's checkpoint.
    pub size: u64,
    /// Its root.
    pub root: Hash,
    /// The signed checkpoint.
    pub checkpoint: String,
    /// Rows in the snapshot (bodies, records, idempotency rows, key backups, the log key).
    pub rows: u64,
    /// Of which records.
    pub records: u64,
    /// Of which key backups.
    pub backups: u64,
    /// The snapshot's length in bytes.
    pub bytes: u64,
}

/// Writes frames and hashes everything written.
struct Framed<W> {
    out: W,
    hash: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Framed<W> {
    fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.hash.update(data);
        self.bytes += data.len() as u64;
        self.out.write_all(data).map_err(io)
    }

    fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), StoreError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| StoreError::Io("a row too large".into()))?;
        self.write(&[kind])?;
        self.write(&len.to_be_bytes())?;
        for p in parts {
            self.write(p)?;
        }
        Ok(())
    }

    fn row(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let klen =
            u32::try_from(key.len()).map_err(|_| StoreError::Io("a key too large".into()))?;
        self.frame(ROW, &[&klen.to_be_bytes(), key, value])
    }
}

/// The log index a row refers to, for the rows that name one: a record's batch, an idempotency row's
/// entry.
fn referred_index(key: &[u8], value: &[u8]) -> Option<u64> {
    let at = match key.first() {
        Some(&tag::RECORD) => 0,
        Some(&tag::IDEMPOTENCY) => 32,
        _ => return None,
    };
    Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?))
}

/// Whether entry `body` erases records.
fn erases(body: &[u8]) -> bool {
    let Ok(body) = EntryBody::decode(body) else {
        return false;
    };
    body.kind == EntryKind::Statement
        && SignedStatement::decode(&body.payload)
            .is_ok_and(|st| matches!(st.statement().body, Body::Erasure(_)))
}

impl Store {
    /// Writes a snapshot of the latest durable checkpoint to `out`, while the store keeps serving.
    /// If an erasure was logged while it copied, the snapshot is left without its end (a restore
    /// refuses it) and the error says to take it again.
    pub fn snapshot(&self, out: impl Write) -> Result<SnapshotSummary, StoreError> {
        let note = self
            .checkpoint()?
            .ok_or_else(|| StoreError::NotFound("no checkpoint yet".into()))?;
        let cp = cmr_log::checkpoint::open(&note, &self.log_verifier, &[], 0)
            .map_err(|e| StoreError::Format(format!("the durable checkpoint: {e}")))?
            .checkpoint;
        self.copy_prefix(&note, cp.size, cp.root, out)
    }

    /// Whether an entry logged from `from` on erased records.
    fn erased_since(&self, from: u64) -> Result<bool, StoreError> {
        let now = self.committed_size()?;
        for kv in pieces::entries(&*self.db, from, now) {
            let (_, v) = kv?;
            if erases(v.get(32..).unwrap_or_default()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes the snapshot of the log prefix of `size` entries.
    fn copy_prefix(
        &self,
        note: &str,
        size: u64,
        root: Hash,
        out: impl Write,
    ) -> Result<SnapshotSummary, StoreError> {
        let mut f = Framed {
            out: std::io::BufWriter::with_capacity(1 << 20, out),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        };
        let mut summary = SnapshotSummary {
            size,
            root,
            checkpoint: note.to_string(),
            rows: 0,
            records: 0,
            backups: 0,
            bytes: 0,
        };
        f.write(MAGIC)?;
        f.frame(CHECKPOINT, &[note.as_bytes()])?;
        if let Some(v) = self.db.get(layout::META_LOG_KEY)? {
            f.row(layout::META_LOG_KEY, &v)?;
            summary.rows += 1;
        }
        // Entries go into the snapshot a row each, whatever pieces they are stored in
        // (docs/formats.md: the snapshot file).
        let mut next = 0;
        for kv in pieces::entries(&*self.db, 0, size) {
            let (i, v) = kv?;
            if i != next {
                return Err(StoreError::Format(format!(
                    "log entry {next} has no stored body: the stored data is damaged"
                )));
            }
            next += 1;
            f.row(&layout::indexed(tag::BODY, i), &v)?;
            summary.rows += 1;
        }
        if next != size {
            return Err(StoreError::Format(format!(
                "log entry {next} has no stored body: the stored data is damaged"
            )));
        }
        // Records, a row each as the file keeps them, whatever pieces the store keeps them in.
        for kv in self.db.scan_prefix(&[tag::RECORDS]) {
            let (k, v) = kv?;
            let (number, period, first) = layout::family_piece_of(&k)
                .ok_or_else(|| StoreError::Format("a records piece's key".into()))?;
            for (n, value) in (first..).zip(layout::piece_records(&v)?) {
                let key = layout::record(number, period, n);
                if referred_index(&key, value).is_some_and(|i| i >= size) {
                    continue;
                }
                f.row(&key, value)?;
                summary.rows += 1;
                summary.records += 1;
            }
        }
        for t in [tag::IDEMPOTENCY, tag::BACKUP] {
            for kv in self.db.scan_prefix(&[t]) {
                let (k, v) = kv?;
                // Rows of entries past the checkpoint are not part of this prefix.
                if referred_index(&k, &v).is_some_and(|i| i >= size) {
                    continue;
                }
                f.row(&k, &v)?;
                summary.rows += 1;
                summary.backups += u64::from(t == tag::BACKUP);
            }
        }
        // Records an erasure removed while they were copied would be missing: no end, so no restore.
        if self.erased_since(size)? {
            return Err(StoreError::Unavailable(
                "an erasure was logged while the snapshot was copied: take it again".into(),
            ));
        }
        let digest = f.hash.clone().finish();
        let rows = summary.rows.to_be_bytes();
        f.frame(END, &[&rows, digest.as_ref()])?;
        f.out.flush().map_err(io)?;
        summary.bytes = f.bytes;
        Ok(summary)
    }

    /// Restores a snapshot into `rows`, an empty engine, and opens the store on it. The snapshot's
    /// checkpoint must be signed with `config.log_key`, its tree must have that checkpoint's root, and
    /// every entry and record must pass the checks of an open; otherwise nothing is served and the
    /// error says what did not match. The restored store serves a note, signed with the log key, that
    /// says it was restored and to which size, so clients that saw a longer log can tell why it is
    /// shorter ([`Store::restored`]).
    pub fn restore(
        rows: Arc<dyn Storage>,
        snapshot: impl Read,
        config: StoreConfig,
    ) -> Result<(Store, SnapshotSummary), StoreError> {
        if !rows.is_empty()? {
            return Err(StoreError::Format(
                "the destination already holds data: restore into an empty folder or database"
                    .into(),
            ));
        }
        let (mut r, note) = Reader::open(snapshot)?;
        let bad = |what: &str| StoreError::Format(format!("not a whole snapshot: {what}"));
        let verifier = config.log_key.verifier();
        let cp = cmr_log::checkpoint::open(&note, &verifier, &[], 0)
            .map_err(|e| {
                StoreError::Format(format!(
                    "the snapshot's checkpoint does not open with this log key ({e}): give the key \
                     the server signed with"
                ))
            })?
            .checkpoint;
        let nodes = NodeCache::new();
        let mut overlay = Overlay::new(&*rows, &nodes, 0);
        let mut pending_bytes = 0usize;
        let mut heads: HashMap<IdentityId, u64> = HashMap::new();
        let mut directories: HashMap<IdentityId, u64> = HashMap::new();
        let mut summary = SnapshotSummary {
            size: cp.size,
            root: cp.root,
            checkpoint: note.clone(),
            rows: 0,
            records: 0,
            backups: 0,
            bytes: 0,
        };
        while let Some(data) = r.next_row()? {
            let (key, value) = split_row(&data)?;
            pending_bytes += data.len();
            match key.first().copied() {
                Some(tag::BODY) => {
                    let i = overlay.size;
                    if key != layout::indexed(tag::BODY, i) {
                        return Err(StoreError::Format(format!(
                            "the snapshot lacks the body of entry {i}"
                        )));
                    }
                    if i >= cp.size {
                        return Err(bad("bodies past its checkpoint"));
                    }
                    let (salt, body) = value
                        .split_first_chunk::<32>()
                        .ok_or_else(|| bad("a body without its salt"))?;
                    let decoded = EntryBody::decode(body)
                        .map_err(|e| StoreError::Format(format!("entry {i}: {e}")))?;
                    if let Some(c) = decoded.customer {
                        heads.insert(c, i);
                        if decoded.kind == EntryKind::Directory {
                            directories.insert(c, i);
                        }
                    }
                    let leaf = commitment_leaf(&commitment(salt, body));
                    overlay.append_entry(value.to_vec(), leaf)?;
                }
                Some(tag::RECORD | tag::IDEMPOTENCY) => {
                    match referred_index(key, value) {
                        Some(i) if i < cp.size => {}
                        _ => return Err(bad("a row that refers past its checkpoint")),
                    }
                    summary.records += u64::from(key[0] == tag::RECORD);
                    overlay.put(key.to_vec(), value.to_vec());
                }
                Some(tag::BACKUP) => {
                    // Only the key backups of customers the restored log knows.
                    let known = key
                        .get(1..)
                        .and_then(|id| <[u8; 32]>::try_from(id).ok())
                        .is_some_and(|id| heads.contains_key(&IdentityId(id)));
                    if known && value.len() >= 8 {
                        summary.backups += 1;
                        overlay.put(key.to_vec(), value.to_vec());
                    }
                }
                _ if key == layout::META_LOG_KEY => {
                    if value != verifier.to_vkey().as_bytes() {
                        return Err(StoreError::Format(
                            "the snapshot is of a log signed with another key".into(),
                        ));
                    }
                }
                _ => return Err(bad("a row of a kind snapshots do not hold")),
            }
            if pending_bytes >= GROUP_BYTES {
                let (writes, logged) = overlay.take_writes()?;
                rows.write(writes)?;
                nodes.remember(logged);
                pending_bytes = 0;
            }
        }
        (summary.rows, summary.bytes) = (r.rows, r.bytes);
        if overlay.size != cp.size {
            return Err(StoreError::Format(format!(
                "the snapshot holds {} entries, its checkpoint {}",
                overlay.size, cp.size
            )));
        }
        let root = Tree::new(&mut overlay).root(cp.size).map_err(tree_err)?;
        if root != cp.root {
            return Err(StoreError::Format(
                "the snapshot's entries do not have its checkpoint's root: it is damaged or forged"
                    .into(),
            ));
        }
        for (c, i) in heads {
            overlay.put(
                layout::key(tag::CUSTOMER_HEAD, &[&c.0]),
                i.to_be_bytes().to_vec(),
            );
        }
        for (c, i) in directories {
            let body = overlay
                .entry(i)?
                .and_then(|v| EntryBody::decode(v.get(32..)?).ok())
                .ok_or_else(|| StoreError::Format(format!("entry {i}")))?;
            overlay.put(layout::key(tag::DIRECTORY, &[&c.0]), body.payload);
        }
        let restored = Restored {
            size: cp.size,
            root: cp.root,
            time: (config.clock)(),
        };
        let signed = cmr_log::note::sign(&restored.text(verifier.name()), &[&config.log_key], 0)
            .map_err(|e| StoreError::Format(e.to_string()))?;
        overlay.put(layout::META_RESTORED.to_vec(), signed.into_bytes());
        overlay.put(layout::META_CHECKPOINT.to_vec(), note.into_bytes());
        overlay.put(
            layout::META_LOG_KEY.to_vec(),
            verifier.to_vkey().into_bytes(),
        );
        overlay.put(
            layout::META_FORMAT.to_vec(),
            layout::FORMAT_VERSION.to_be_bytes().to_vec(),
        );
        rows.write(overlay.take_writes()?.0)?;
        // The open replays every entry through the rules, checks every record against its batch,
        // writes the party and pending indexes, and makes it all durable before serving.
        let store = Store::open_with(rows, config, true)?;
        Ok((store, summary))
    }

    /// The signed note saying this store was restored from a snapshot, if it was.
    pub fn restored(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(layout::META_RESTORED)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// Checks a snapshot's structure without restoring it: whole (its end, row count and digest match
/// what precedes them) and made of frames a restore knows. Returns its checkpoint (not verified: a
/// restore verifies it under the log key), its rows and its length.
pub fn check(snapshot: impl Read) -> Result<(String, u64, u64), StoreError> {
    let (mut r, note) = Reader::open(snapshot)?;
    while let Some(row) = r.next_row()? {
        split_row(&row)?;
    }
    Ok((note, r.rows, r.bytes))
}

/// A row frame's key and value.
fn split_row(data: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    let bad = || StoreError::Format("not a whole snapshot: a row frame".into());
    let (klen, rest) = data.split_first_chunk::<4>().ok_or_else(bad)?;
    let klen = u32::from_be_bytes(*klen) as usize;
    if klen > rest.len() {
        return Err(bad());
    }
    Ok(rest.split_at(klen))
}

/// Reads frames and hashes everything read.
struct Reader<R> {
    input: std::io::BufReader<R>,
    hash: ring::digest::Context,
    bytes: u64,
    rows: u64,
}

impl<R: Read> Reader<R> {
    /// Reads the start of a snapshot: its magic and its checkpoint.
    fn open(input: R) -> Result<(Self, String), StoreError> {
        let mut r = Reader {
            input: std::io::BufReader::with_capacity(1 << 20, input),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
            rows: 0,
        };
        let bad = |what: &str| StoreError::Format(format!("not a whole snapshot: {what}"));
        let mut magic = vec![0; MAGIC.len()];
        r.exact(&mut magic)?;
        if magic != MAGIC {
            return Err(bad("it does not start as one"));
        }
        let (kind, note) = r.frame()?;
        if kind != CHECKPOINT {
            return Err(bad("no checkpoint first"));
        }
        let note = String::from_utf8(note).map_err(|_| bad("the checkpoint is not text"))?;
        Ok((r, note))
    }

    /// The next row frame's content, or `None` at the end, once the end's row count and digest
    /// match what was read and nothing follows it.
    fn next_row(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        let bad = |what: &str| StoreError::Format(format!("not a whole snapshot: {what}"));
        let before = self.hash.clone().finish();
        let (kind, data) = self.frame()?;
        match kind {
            ROW => {
                self.rows += 1;
                Ok(Some(data))
            }
            END => {
                let (count, digest) = data
                    .split_first_chunk::<8>()
                    .ok_or_else(|| bad("the end frame"))?;
                if u64::from_be_bytes(*count) != self.rows || digest != before.as_ref() {
                    return Err(bad("its digest or row count does not match its content"));
                }
                let mut trailing = [0u8; 1];
                if self.input.read(&mut trailing).map_err(io)? != 0 {
                    return Err(bad("bytes after its end"));
                }
                Ok(None)
            }
            _ => Err(bad("an unknown frame")),
        }
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Format("not a whole snapshot: it is cut short".into())
            } else {
                io(e)
            }
        })?;
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn frame(&mut self) -> Result<(u8, Vec<u8>), StoreError> {
        let mut head = [0u8; 5];
        self.exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(StoreError::Format(
                "not a whole snapshot: a frame larger than any row".into(),
            ));
        }
        let mut data = vec![0; len];
        self.exact(&mut data)?;
        Ok((head[0], data))
    }
}
