//! The group in progress over the storage (the overlay), and read-only node stores for the log's tree.

use super::*;

/// A node store over the storage plus the writes of the group in progress.
pub(super) struct Overlay<'a> {
    pub(super) rows: &'a dyn Storage,
    pub(super) writes: Writes,
    pub(super) size: u64,
    /// The bodies the operation in progress logged, by index, for its acknowledgement.
    pub(super) logged: HashMap<u64, SaltedBody>,
}
impl Overlay<'_> {
    pub(super) fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(k) {
            Some(v) => Ok(v.clone()),
            None => self.rows.get(k),
        }
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
        Ok(self
            .get(&layout::node(level, index))?
            .and_then(|v| v.try_into().ok()))
    }
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), StoreError> {
        self.put(layout::node(level, index), hash.to_vec());
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
/// Read-only node store over the stored tree, up to a size.
pub(super) struct Committed<'a>(pub(super) &'a dyn Storage, pub(super) u64);
impl NodeStore for Committed<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        Ok(self
            .0
            .get(&layout::node(level, index))?
            .and_then(|v| v.try_into().ok()))
    }
    fn set_node(&mut self, _: u8, _: u64, _: Hash) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.1)
    }
    fn set_size(&mut self, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
}
pub(super) fn tree_err(e: cmr_log::tree::TreeError<StoreError>) -> StoreError {
    match e {
        cmr_log::tree::TreeError::Store(e) => e,
        other => StoreError::Format(other.to_string()),
    }
}
