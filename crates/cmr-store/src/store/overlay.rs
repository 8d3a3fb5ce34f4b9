//! The group in progress over the storage (the overlay), and read-only node stores for the log's tree.

use super::*;

/// The log tree's nodes written or read lately, shared by the sequencer, the syncer and the readers.
/// A node never changes once written, and the next appends, the group's root and the inclusion proofs
/// of recent entries read the same few thousand nodes again and again: on a database each would be a
/// round trip. Filled only with what the storage holds (after a group is written), oldest out first.
pub(super) struct NodeCache {
    inner: Mutex<Nodes>,
    /// The log's end as the last group wrote it, and its chunk's last bytes (see [`pieces::Tail`]):
    /// what the next group compresses its first piece against, without reading it back.
    tail: Mutex<Option<pieces::Tail>>,
    /// The chunks of entries read lately, opened (oldest first out).
    chunks: Mutex<std::collections::VecDeque<pieces::OpenChunk>>,
}

/// How many opened chunks the cache keeps: the log's last few (the next groups' proofs, the recent
/// entries clients fetch) and some others.
const OPEN_CHUNKS: usize = 64;

/// A chunk larger than this is opened for its read and not kept (its entries are large bodies).
const OPEN_CHUNK_BYTES: usize = 256 * 1024;

/// The cached nodes, and their order of arrival (the oldest leaves first).
type Nodes = (
    HashMap<(u8, u64), Hash>,
    std::collections::VecDeque<(u8, u64)>,
);

/// How many nodes the cache keeps: the right edge of any tree and the last groups' nodes. At most half
/// of what a table of 2^17 slots holds (7/8 of them): with one node in, one out, the table then reuses
/// the slots of the nodes it dropped instead of doubling, which 2^16 nodes made it do (a heap profile
/// under `cmr bench` found 15 MB here, now about 7.5 MB).
const NODE_CACHE: usize = (1 << 17) * 7 / 8 / 2;

impl NodeCache {
    pub(super) fn new() -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), std::collections::VecDeque::new())),
            tail: Mutex::new(None),
            chunks: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Entry `index`'s salted body from the storage, through the opened chunks: only the pieces
    /// written since its chunk was last opened are read and opened.
    pub(super) fn entry(
        &self,
        rows: &dyn Storage,
        index: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let start = pieces::chunk_start(index);
        // Taken out while it is extended (a concurrent reader of the same chunk opens its own).
        let cached = {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = chunks.iter().find(|c| c.start() == start)
                && let Some(body) = c.body(index)
            {
                return Ok(Some(body));
            }
            let at = chunks.iter().position(|c| c.start() == start);
            at.and_then(|at| chunks.remove(at))
        };
        let mut chunk = cached.unwrap_or_else(|| pieces::OpenChunk::new(index));
        chunk.extend(rows, index)?;
        let body = chunk.body(index);
        if chunk.size() <= OPEN_CHUNK_BYTES {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            if !chunks.iter().any(|c| c.start() == start) {
                if chunks.len() >= OPEN_CHUNKS {
                    chunks.pop_front();
                }
                chunks.push_back(chunk);
            }
        }
        Ok(body)
    }

    /// Keeps what a group wrote, once the storage holds it.
    pub(super) fn remember(&self, logged: pieces::Logged) {
        for (level, index, hash) in logged.nodes {
            self.put(level, index, hash);
        }
        *self.tail.lock().unwrap_or_else(|p| p.into_inner()) = Some(logged.tail);
    }

    /// The last group's tail, taken: only the next group uses it, and leaves its own (a group that
    /// fails leaves none, and the next one reads its chunk back).
    pub(super) fn take_tail(&self) -> Option<pieces::Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Forgets every node (after a recovery, the nodes of groups the storage lost would be wrong).
    pub(super) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0.clear();
        inner.1.clear();
        *self.tail.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(super) fn get(&self, level: u8, index: u64) -> Option<Hash> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0.get(&(level, index)).copied()
    }

    pub(super) fn put(&self, level: u8, index: u64, hash: Hash) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *inner;
        if map.contains_key(&(level, index)) {
            return;
        }
        // The oldest out before the new one in, so the table never holds more than `NODE_CACHE`.
        if order.len() >= NODE_CACHE
            && let Some(old) = order.pop_front()
        {
            map.remove(&old);
        }
        map.insert((level, index), hash);
        order.push_back((level, index));
    }

    /// A node, from the cache or else from the storage (then kept): see [`pieces::node`].
    pub(super) fn read(
        &self,
        rows: &dyn Storage,
        level: u8,
        index: u64,
    ) -> Result<Option<Hash>, StoreError> {
        if let Some(h) = self.get(level, index) {
            return Ok(Some(h));
        }
        let hash = if level == 0 {
            self.entry(rows, index)?
                .as_deref()
                .and_then(pieces::leaf_of)
        } else {
            pieces::node(rows, level, index)?
        };
        if let Some(h) = hash {
            self.put(level, index, h);
        }
        Ok(hash)
    }
}

/// A node store over the storage plus the writes of the group in progress.
pub(super) struct Overlay<'a> {
    pub(super) rows: &'a dyn Storage,
    pub(super) nodes: &'a NodeCache,
    pub(super) writes: Writes,
    pub(super) size: u64,
    /// The bodies the operation in progress logged, by index, for its acknowledgement.
    pub(super) logged: HashMap<u64, SaltedBody>,
    /// The entries and tree nodes logged and not yet among `writes` (as pieces).
    pub(super) pending: pieces::Pending,
}
impl<'a> Overlay<'a> {
    /// An overlay over `rows` holding a log of `size` entries, with nothing written yet.
    pub(super) fn new(rows: &'a dyn Storage, nodes: &'a NodeCache, size: u64) -> Self {
        Overlay {
            rows,
            nodes,
            writes: Writes::new(),
            size,
            logged: HashMap::new(),
            pending: pieces::Pending::default(),
        }
    }

    /// Appends an entry to the log: its salted body to the pending pieces, and `leaf` (the leaf hash
    /// of its commitment) to the tree.
    pub(super) fn append_entry(&mut self, salted: Vec<u8>, leaf: Hash) -> Result<u64, StoreError> {
        self.pending.push(self.size, salted);
        Tree::new(&mut *self).append(leaf).map_err(tree_err)
    }

    /// An entry's salted body, logged by this overlay or stored.
    pub(super) fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending.entry(index) {
            Some(e) => Ok(Some(e.to_vec())),
            None => self.nodes.entry(self.rows, index),
        }
    }

    /// The writes to hand to the storage: the pending entries and nodes become pieces among them.
    /// Returns the tree nodes written, for the node cache once the storage holds them.
    pub(super) fn take_writes(&mut self) -> Result<(Writes, pieces::Logged), StoreError> {
        let logged =
            self.pending
                .write_into(self.rows, self.nodes.take_tail(), &mut self.writes)?;
        Ok((std::mem::take(&mut self.writes), logged))
    }

    pub(super) fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(k) {
            Some(v) => Ok(v.clone()),
            None => self.rows.get(k),
        }
    }

    /// The rows with keys in `from..to`, as this group sees them (its own writes over the storage's),
    /// in key order: one range read of the storage instead of a read per key.
    pub(super) fn range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Row>, StoreError> {
        let mut rows = BTreeMap::new();
        for kv in self.rows.range(from, to) {
            let (k, v) = kv?;
            rows.insert(k, v);
        }
        for (k, v) in self.writes.range(from.to_vec()..to.to_vec()) {
            match v {
                Some(v) => rows.insert(k.clone(), v.clone()),
                None => rows.remove(k),
            };
        }
        Ok(rows.into_iter().collect())
    }

    /// [`Overlay::range`] up to and including the row that brings the values' total past `max_bytes`
    /// ([`Storage::range_within`]): one bounded read of the storage when this group wrote nothing there.
    pub(super) fn range_within(
        &self,
        from: &[u8],
        to: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<Row>, StoreError> {
        if self
            .writes
            .range(from.to_vec()..to.to_vec())
            .next()
            .is_none()
        {
            return self.rows.range_within(from, to, max_bytes);
        }
        let mut rows = Vec::new();
        let mut total = 0usize;
        for (k, v) in self.range(from, to)? {
            total = total.saturating_add(v.len());
            rows.push((k, v));
            if total > max_bytes {
                break;
            }
        }
        Ok(rows)
    }

    pub(super) fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }

    pub(super) fn delete(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }
}
impl NodeStore for &mut Overlay<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        match self.pending.node(level, index) {
            Some(h) => Ok(Some(h)),
            None => self.nodes.read(self.rows, level, index),
        }
    }
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), StoreError> {
        self.pending.set_node(level, index, hash);
        Ok(())
    }
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.size)
    }
    fn set_size(&mut self, size: u64) -> Result<(), StoreError> {
        self.size = size;
        self.put(layout::META_SIZE.to_vec(), size.to_be_bytes().to_vec());
        Ok(())
    }
}
/// Read-only node store over the stored tree (through the node cache), up to a size.
pub(super) struct Committed<'a>(
    pub(super) &'a dyn Storage,
    pub(super) &'a NodeCache,
    pub(super) u64,
);
impl NodeStore for Committed<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        self.1.read(self.0, level, index)
    }
    fn set_node(&mut self, _: u8, _: u64, _: Hash) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.2)
    }
    fn set_size(&mut self, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
}
/// For what a caller asked of the durable log (a proof, a root): a size or index outside it is not
/// found; a storage failure stays what it is.
pub(super) fn asked_err(e: cmr_log::tree::TreeError<StoreError>) -> StoreError {
    match e {
        cmr_log::tree::TreeError::OutOfRange(n) => {
            StoreError::NotFound(format!("{n} is outside the durable log"))
        }
        other => tree_err(other),
    }
}
pub(super) fn tree_err(e: cmr_log::tree::TreeError<StoreError>) -> StoreError {
    match e {
        cmr_log::tree::TreeError::Store(e) => e,
        other => StoreError::Format(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes flow through the cache for ever: its table must reuse the slots of the nodes it drops,
    /// never grow past the size `NODE_CACHE` was chosen for.
    #[test]
    fn the_node_cache_stays_within_its_table() {
        let cache = NodeCache::new();
        for i in 0..(3 * NODE_CACHE as u64) {
            cache.put((i % 3) as u8, i, [i as u8; 32]);
        }
        let inner = cache.inner.lock().unwrap();
        assert_eq!(inner.0.len(), NODE_CACHE);
        assert_eq!(inner.1.len(), NODE_CACHE);
        assert!(
            inner.0.capacity() < 2 * NODE_CACHE + 1,
            "{}",
            inner.0.capacity()
        );
        drop(inner);
        // The newest are kept, the oldest dropped.
        let last = 3 * NODE_CACHE as u64 - 1;
        assert_eq!(cache.get((last % 3) as u8, last), Some([last as u8; 32]));
        assert_eq!(cache.get(0, 0), None);
    }
}
