//! The storage engine under the store: what a database must do for the log, and none of the rules.
//!
//! [`crate::Store`] is the server's [`crate::Backend`] over any storage engine: the sequencer, the rule
//! engine (`cmr_log::ledger`), the log's tree, the indexes, idempotency, the durable view and the
//! acknowledgements are the same whatever holds the rows. A storage engine holds ordered key-value rows
//! (their keys are in [`crate::layout`]) and does four things, as a transparency log's storage layer
//! persists what its one integration step decided:
//! - apply a group of writes all or nothing, in the order the sequencer hands them over ([`Storage::write`]);
//!   the rows are then visible to reads, so that the next group builds on them, but not durable yet;
//! - make every group written so far durable ([`Storage::sync`]), and only then return: the store
//!   acknowledges a group only after this;
//! - read a row, and rows by key range in key order;
//! - when several stores share the engine (several servers on one database), serialize their groups:
//!   a group begins by taking the log's write lock and learning the log's size, so that a store applies
//!   what the others logged before it decides ([`Storage::begin`]);
//! - remember the newest size and root it made durable, if it can, so that a store which comes back
//!   with less (damaged or replaced files) is refused at open rather than served
//!   ([`Storage::acknowledged`]).
//!
//! Nothing here decides anything: a storage engine never sees a statement, a signature or a refusal.
//! [`crate::SledStorage`] (sled in a local folder) is the embedded one.

use std::collections::BTreeMap;

use cmr_core::merkle::Hash;

use crate::StoreError;

/// A row: its key and its value.
pub type Row = (Vec<u8>, Vec<u8>);

/// Rows in key order, as a storage engine reads them.
pub type Rows<'a> = Box<dyn Iterator<Item = Result<Row, StoreError>> + 'a>;

/// A group of writes: each key set to a value, or removed (`None`). Applied all or nothing.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What the store needs from a storage engine. Reads may run on any thread beside the writes; writes and
/// syncs come from the store's own threads, in order.
pub trait Storage: Send + Sync {
    /// A row, as last written (durable or not).
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The rows with keys in `from..to`, in key order.
    fn range(&self, from: &[u8], to: &[u8]) -> Rows<'_>;
    /// The rows with keys in `from..to`, in key order, up to and including the one whose value brings
    /// their total past `max_bytes`: one read (one round trip to a database) whose memory the budget
    /// bounds, however large the values.
    fn range_within(
        &self,
        from: &[u8],
        to: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let mut rows = Vec::new();
        let mut total = 0usize;
        for kv in self.range(from, to) {
            let (k, v) = kv?;
            total = total.saturating_add(v.len());
            rows.push((k, v));
            if total > max_bytes {
                break;
            }
        }
        Ok(rows)
    }
    /// The row with the greatest key in `from..to`, if any (where a piece of the log that holds an
    /// index starts). An engine that can read a range backwards reads just that row.
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Row>, StoreError> {
        let mut last = None;
        for kv in self.range(from, to) {
            last = Some(kv?);
        }
        Ok(last)
    }
    /// The rows whose keys start with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Rows<'_>;
    /// Whether no row is stored at all (a new store).
    fn is_empty(&self) -> Result<bool, StoreError>;
    /// Applies a group of writes all or nothing; visible to reads on return, durable only after the
    /// next [`Storage::sync`].
    fn write(&self, writes: Writes) -> Result<(), StoreError>;
    /// Makes every group written so far durable. `size`, `root` and `checkpoint` are what the log then
    /// holds: an engine that can lose a tail silently records them, after the data, for
    /// [`Storage::acknowledged`]; an engine several stores share records the newest for
    /// [`Storage::durable`].
    fn sync(&self, size: u64, root: &Hash, checkpoint: &str) -> Result<(), StoreError>;
    /// Moves what the engine itself keeps differently since the data format `from` (the store's open
    /// calls it on an older folder, before anything else, and then writes the new format): durable
    /// on return, and safe to cut and run again.
    fn upgrade(&self, _from: u32) -> Result<(), StoreError> {
        Ok(())
    }
    /// Opens the engine afresh after a failure (a database that restarted, a disk that was full):
    /// what was written and not synced may be gone, so the store rebuilds its state from the engine
    /// afterwards.
    fn reconnect(&self) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    /// Whether [`Storage::reconnect`] is worth trying: a store stopped by a failure then tries to
    /// come back by itself.
    fn reconnects(&self) -> bool {
        false
    }
    /// The bytes the engine's data takes on disk, if it can tell (for monitoring).
    fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Whether several stores may write to this engine at once (several servers on one database).
    fn shared(&self) -> bool {
        false
    }
    /// Starts a group. An engine several stores write to at once takes the log's write lock here (held
    /// until [`Storage::write`] or [`Storage::abandon`]) and returns the log size it holds, which is past
    /// this store's when another store logged since: the store then applies those entries before it
    /// decides anything. An engine only this store writes to returns `None`.
    fn begin(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Ends a group begun and not written: nothing of it is kept, and the write lock is released.
    fn abandon(&self) {}
    /// For an engine several stores share: the newest log size and signed checkpoint any of them made
    /// durable, so that a store that logged nothing lately still serves them. `None` otherwise.
    fn durable(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(None)
    }
    /// The log size and root recorded by the last [`Storage::sync`] before this engine was opened, if
    /// any: the store refuses to open a log that does not contain them.
    fn acknowledged(&self) -> Option<Acknowledged>;
}

/// Copies every row of `from` into `to`, which must hold none, in groups of about `group_bytes`, and
/// makes them durable; `progress` hears the rows copied so far. The rows are the whole state, the
/// same on every engine, so the copy is the whole vault: a store opened on `to` rebuilds the same log,
/// root and checkpoint (the caller checks that by opening both). `size` and `root` are the log's, for
/// the engine's acknowledgement mark. Returns the number of rows.
pub fn copy(
    from: &dyn Storage,
    to: &dyn Storage,
    group_bytes: usize,
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    if !to.is_empty()? {
        return Err(StoreError::Format(
            "the destination already holds data: copy into an empty one".into(),
        ));
    }
    let (mut group, mut bytes, mut rows) = (Writes::new(), 0usize, 0u64);
    for row in from.scan_prefix(&[]) {
        let (k, v) = row?;
        bytes += k.len() + v.len();
        group.insert(k, Some(v));
        rows += 1;
        if bytes >= group_bytes {
            to.write(std::mem::take(&mut group))?;
            bytes = 0;
            progress(rows);
        }
    }
    if !group.is_empty() {
        to.write(group)?;
    }
    progress(rows);
    Ok(rows)
}

/// What a storage engine recorded it had made durable, read back when it opens.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    /// The log size.
    pub size: u64,
    /// The log's root at that size.
    pub root: Hash,
    /// What an operator does when the log came back without it: where the damage is, and how to accept
    /// the loss instead of restoring a backup.
    pub remedy: String,
}
