//! The log's RFC 6962 / RFC 9162 Merkle tree over a node store.
//!
//! Owns incremental append and O(log n) proof generation from stored node hashes. A node at `(level,
//! index)` is the root of the perfect subtree of leaves `index·2^level .. (index+1)·2^level`; it is stored
//! as soon as the subtree is complete, and never changes. The store behind [`NodeStore`] is the caller's:
//! `cmr-store` writes nodes inside the same atomic write as the entry being logged.

use cmr_core::merkle::{Hash, empty_root, node_hash};
use thiserror::Error;

/// Where a tree keeps its node hashes and size.
pub trait NodeStore {
    /// The store's own error.
    type Error;
    /// The node at `(level, index)`, if stored.
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, Self::Error>;
    /// Stores a node. Nodes never change once written.
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), Self::Error>;
    /// The number of leaves.
    fn size(&self) -> Result<u64, Self::Error>;
    /// Records the number of leaves.
    fn set_size(&mut self, size: u64) -> Result<(), Self::Error>;
}

/// A tree operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TreeError<E> {
    /// The store failed.
    #[error("node store: {0}")]
    Store(E),
    /// A node the tree needs is missing: the store is damaged.
    #[error("missing node at level {level}, index {index}")]
    MissingNode {
        /// Level.
        level: u8,
        /// Index.
        index: u64,
    },
    /// A size or index outside the tree.
    #[error("{0} is outside the tree")]
    OutOfRange(u64),
}

/// An in-memory node store, for tests, clients and the auditor's scratch trees.
#[derive(Debug, Clone, Default)]
pub struct MemoryNodes {
    levels: Vec<Vec<Hash>>,
    size: u64,
}

impl NodeStore for MemoryNodes {
    type Error = std::convert::Infallible;

    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, Self::Error> {
        Ok(self
            .levels
            .get(level as usize)
            .and_then(|l| l.get(index as usize))
            .copied())
    }

    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), Self::Error> {
        let level = level as usize;
        if self.levels.len() <= level {
            self.levels.resize(level + 1, Vec::new());
        }
        let l = &mut self.levels[level];
        if l.len() == index as usize {
            l.push(hash);
        } else if (index as usize) < l.len() {
            l[index as usize] = hash;
        }
        Ok(())
    }

    fn size(&self) -> Result<u64, Self::Error> {
        Ok(self.size)
    }

    fn set_size(&mut self, size: u64) -> Result<(), Self::Error> {
        self.size = size;
        Ok(())
    }
}

/// The largest power of two strictly less than `n` (n ≥ 2).
pub(crate) fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// A Merkle tree over a node store.
#[derive(Debug, Clone, Default)]
pub struct Tree<S> {
    store: S,
}

impl<S: NodeStore> Tree<S> {
    /// A tree over `store` (empty or not).
    pub fn new(store: S) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (for the caller's transaction).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// The number of leaves.
    pub fn size(&self) -> Result<u64, TreeError<S::Error>> {
        self.store.size().map_err(TreeError::Store)
    }

    fn node(&self, level: u8, index: u64) -> Result<Hash, TreeError<S::Error>> {
        self.store
            .node(level, index)
            .map_err(TreeError::Store)?
            .ok_or(TreeError::MissingNode { level, index })
    }

    /// Appends a leaf hash; returns its index. Stores every perfect subtree it completes.
    pub fn append(&mut self, leaf: Hash) -> Result<u64, TreeError<S::Error>> {
        let index = self.size()?;
        self.store
            .set_node(0, index, leaf)
            .map_err(TreeError::Store)?;
        let (mut i, mut level, mut hash) = (index, 0u8, leaf);
        while i & 1 == 1 {
            let left = self.node(level, i - 1)?;
            hash = node_hash(&left, &hash);
            i >>= 1;
            level += 1;
            self.store
                .set_node(level, i, hash)
                .map_err(TreeError::Store)?;
        }
        self.store.set_size(index + 1).map_err(TreeError::Store)?;
        Ok(index)
    }

    /// The hash of leaves `start..end`, where the range is one that RFC 6962's recursion visits.
    fn subtree(&self, start: u64, end: u64) -> Result<Hash, TreeError<S::Error>> {
        let n = end - start;
        if n.is_power_of_two() && start.is_multiple_of(n) {
            return self.node(n.trailing_zeros() as u8, start >> n.trailing_zeros());
        }
        let k = split(n);
        Ok(node_hash(
            &self.subtree(start, start + k)?,
            &self.subtree(start + k, end)?,
        ))
    }

    /// The root of the first `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, TreeError<S::Error>> {
        if size > self.size()? {
            return Err(TreeError::OutOfRange(size));
        }
        if size == 0 {
            return Ok(empty_root());
        }
        self.subtree(0, size)
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, TreeError<S::Error>> {
        if size > self.size()? {
            return Err(TreeError::OutOfRange(size));
        }
        if index >= size {
            return Err(TreeError::OutOfRange(index));
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof)?;
        Ok(proof)
    }

    fn path(
        &self,
        m: u64,
        start: u64,
        n: u64,
        proof: &mut Vec<Hash>,
    ) -> Result<(), TreeError<S::Error>> {
        if n <= 1 {
            return Ok(());
        }
        let k = split(n);
        if m < k {
            self.path(m, start, k, proof)?;
            proof.push(self.subtree(start + k, start + n)?);
        } else {
            self.path(m - k, start + k, n - k, proof)?;
            proof.push(self.subtree(start, start + k)?);
        }
        Ok(())
    }

    /// The consistency proof from the tree of `old` leaves to the tree of `new` leaves (RFC 9162
    /// §2.1.4.1). Empty when the sizes are equal.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, TreeError<S::Error>> {
        if new > self.size()? {
            return Err(TreeError::OutOfRange(new));
        }
        if old == 0 || old > new {
            return Err(TreeError::OutOfRange(old));
        }
        let mut proof = Vec::new();
        if old < new {
            self.subproof(old, 0, new, true, &mut proof)?;
        }
        Ok(proof)
    }

    fn subproof(
        &self,
        m: u64,
        start: u64,
        n: u64,
        complete: bool,
        proof: &mut Vec<Hash>,
    ) -> Result<(), TreeError<S::Error>> {
        if m == n {
            if !complete {
                proof.push(self.subtree(start, start + n)?);
            }
            return Ok(());
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, k, complete, proof)?;
            proof.push(self.subtree(start + k, start + n)?);
        } else {
            self.subproof(m - k, start + k, n - k, false, proof)?;
            proof.push(self.subtree(start, start + k)?);
        }
        Ok(())
    }
}
