//! The log's entries and tree nodes, stored in pieces (docs/durability.md, "How the log is stored").
//!
//! A row per entry (its body, its leaf, its tree nodes) made the storage engine hold four rows for
//! every access a company made: sled keeps about a hundred bytes of memory for every page of 16 rows
//! whether or not the page is cached, and rewrites pages as rows are added to them, so both the
//! server's memory and the folder grew far faster than the log's own bytes. A group now writes the
//! entries it logged as one row, and the tree nodes they completed as another:
//! - an **entries piece** holds consecutive entries' salted bodies, keyed by the first one's index;
//! - a **nodes piece** holds the tree nodes above level 0 that consecutive leaves completed, keyed by
//!   the first leaf's index, in a fixed order, so that a node's place is computed, not stored. A
//!   level-0 node is the leaf hash of the entry's commitment, which the salted body gives.
//!
//! No piece crosses a multiple of [`CHUNK`], so the piece holding entry `i` is the last one that starts
//! between `i - i % CHUNK` and `i`: one short range read. Pieces are written once and never change
//! (a storage failure that loses a group loses its pieces with it, and the group is logged again).

use std::collections::{HashMap, VecDeque};

use cmr_core::merkle::Hash;
use cmr_log::entry::{commitment, commitment_leaf};

use crate::StoreError;
use crate::layout::{self, tag};
use crate::storage::{Rows, Storage, Writes};

/// No piece crosses a multiple of this many entries.
pub(crate) const CHUNK: u64 = 64;

/// An entries piece is closed once its bodies pass this many bytes (sled stores a value past about
/// 128 KiB in a file of its own; a body larger than this is a piece by itself).
const PIECE_BYTES: usize = 32 * 1024;

/// The first index of the chunk that holds `i`.
pub(crate) fn chunk_start(i: u64) -> u64 {
    i - i % CHUNK
}

/// How many tree nodes above level 0 the first `leaves` leaves complete: the sum over `m` in
/// `1..=leaves` of the trailing zeros of `m`, which is `leaves` minus its number of set bits.
pub(crate) fn completed(leaves: u64) -> u64 {
    leaves - u64::from(leaves.count_ones())
}

/// The nodes above level 0 that appending leaf `j` completes, lowest first: the order of a nodes piece.
pub(crate) fn completed_by(j: u64) -> impl Iterator<Item = (u8, u64)> {
    let n = j + 1;
    (1..=n.trailing_zeros() as u8).map(move |level| (level, (n >> level) - 1))
}

/// The leaf whose append completed node (`level`, `index`), `level` > 0.
pub(crate) fn completing_leaf(level: u8, index: u64) -> Option<u64> {
    index
        .checked_add(1)?
        .checked_mul(1u64.checked_shl(u32::from(level))?)?
        .checked_sub(1)
}

/// A node's offset among the nodes of a piece that starts at leaf `first`.
pub(crate) fn place(level: u8, index: u64, first: u64) -> Option<u64> {
    let last = completing_leaf(level, index)?;
    (completed(last) + u64::from(level))
        .checked_sub(completed(first))?
        .checked_sub(1)
}

/// The first index of a piece's key.
fn first_of(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Format("a piece's key".into()))
}

/// The row of the piece of table `t` that holds index `i`, if any.
fn piece(rows: &dyn Storage, t: u8, i: u64) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let Some(end) = i.checked_add(1) else {
        return Ok(None);
    };
    match rows.last(
        &layout::indexed(t, chunk_start(i)),
        &layout::indexed(t, end),
    )? {
        Some((k, v)) => Ok(Some((first_of(&k)?, v))),
        None => Ok(None),
    }
}

/// The salted body of entry `i` (salt, then the encoded body), if stored.
pub(crate) fn entry(rows: &dyn Storage, i: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let Some((first, value)) = piece(rows, tag::ENTRIES, i)? else {
        return Ok(None);
    };
    let offset = usize::try_from(i - first).unwrap_or(usize::MAX);
    Ok(layout::piece_entries(&value)?
        .get(offset)
        .map(|b| b.to_vec()))
}

/// The level-0 node of a salted body: the leaf hash of its commitment.
pub(crate) fn leaf_of(salted: &[u8]) -> Option<Hash> {
    let (salt, body) = salted.split_first_chunk::<32>()?;
    Some(commitment_leaf(&commitment(salt, body)))
}

/// A stored tree node: a level-0 one from its entry, a higher one from its nodes piece.
pub(crate) fn node(rows: &dyn Storage, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
    if level == 0 {
        return Ok(entry(rows, index)?.as_deref().and_then(leaf_of));
    }
    let Some(last) = completing_leaf(level, index) else {
        return Ok(None);
    };
    let Some((first, value)) = piece(rows, tag::NODES, last)? else {
        return Ok(None);
    };
    let Some(at) = place(level, index, first).and_then(|p| usize::try_from(p).ok()) else {
        return Ok(None);
    };
    Ok(value
        .get(at * 32..at * 32 + 32)
        .and_then(|h| Hash::try_from(h).ok()))
}

/// The stored entries `from..to`, in order, as (index, salted body): a range read of their pieces.
/// An entry that is not stored is skipped: the caller checks the indices follow each other.
pub(crate) fn entries(rows: &dyn Storage, from: u64, to: u64) -> Entries<'_> {
    Entries {
        rows: rows.range(
            &layout::indexed(tag::ENTRIES, chunk_start(from)),
            &layout::indexed(tag::ENTRIES, to),
        ),
        buffered: VecDeque::new(),
        from,
        to,
    }
}

/// The iterator of [`entries`].
pub(crate) struct Entries<'a> {
    rows: Rows<'a>,
    buffered: VecDeque<(u64, Vec<u8>)>,
    from: u64,
    to: u64,
}

impl Iterator for Entries<'_> {
    type Item = Result<(u64, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Some(Ok(e));
            }
            let (k, v) = match self.rows.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            let first = match first_of(&k) {
                Ok(f) => f,
                Err(e) => return Some(Err(e)),
            };
            match layout::piece_entries(&v) {
                Ok(bodies) => self.buffered.extend(
                    (first..)
                        .zip(bodies)
                        .filter(|(i, _)| (self.from..self.to).contains(i))
                        .map(|(i, b)| (i, b.to_vec())),
                ),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The entries and tree nodes a group logged, until they are written as pieces.
#[derive(Default)]
pub(crate) struct Pending {
    /// The index of the first entry.
    first: u64,
    /// Salted bodies, from `first` on.
    entries: Vec<Vec<u8>>,
    /// Every node the appends set, level 0 included.
    nodes: HashMap<(u8, u64), Hash>,
}

impl Pending {
    /// Adds entry `index`, which must follow the ones pending.
    pub(crate) fn push(&mut self, index: u64, salted: Vec<u8>) {
        if self.entries.is_empty() {
            self.first = index;
        }
        debug_assert_eq!(index, self.first + self.entries.len() as u64);
        self.entries.push(salted);
    }

    /// A pending entry's salted body.
    pub(crate) fn entry(&self, index: u64) -> Option<&[u8]> {
        let offset = usize::try_from(index.checked_sub(self.first)?).ok()?;
        self.entries.get(offset).map(Vec::as_slice)
    }

    /// Keeps a node an append set.
    pub(crate) fn set_node(&mut self, level: u8, index: u64, hash: Hash) {
        self.nodes.insert((level, index), hash);
    }

    /// A node an append set.
    pub(crate) fn node(&self, level: u8, index: u64) -> Option<Hash> {
        self.nodes.get(&(level, index)).copied()
    }

    /// Moves the pending entries and nodes into `writes` as pieces, and returns every node (for the
    /// node cache, once the storage holds them).
    pub(crate) fn write_into(&mut self, writes: &mut Writes) -> Vec<(u8, u64, Hash)> {
        let entries = std::mem::take(&mut self.entries);
        let nodes = std::mem::take(&mut self.nodes);
        let (first, end) = (self.first, self.first + entries.len() as u64);
        self.first = end;
        // Entries: cut at every chunk boundary and when a piece grows past its bytes.
        let mut piece: Vec<u8> = Vec::new();
        let mut start = first;
        for (i, salted) in (first..).zip(&entries) {
            if !piece.is_empty() && (i % CHUNK == 0 || piece.len() >= PIECE_BYTES) {
                writes.insert(
                    layout::indexed(tag::ENTRIES, start),
                    Some(std::mem::take(&mut piece)),
                );
                start = i;
            }
            layout::push_piece_entry(&mut piece, salted);
        }
        if !piece.is_empty() {
            writes.insert(layout::indexed(tag::ENTRIES, start), Some(piece));
        }
        // Nodes: the ones each leaf completed, in order, cut at every chunk boundary.
        let mut piece: Vec<u8> = Vec::new();
        let mut start = first;
        for j in first..end {
            if j % CHUNK == 0 && j != first {
                if !piece.is_empty() {
                    writes.insert(
                        layout::indexed(tag::NODES, start),
                        Some(std::mem::take(&mut piece)),
                    );
                }
                start = j;
            }
            for (level, index) in completed_by(j) {
                // Every node an append completes was set by it; one missing is a bug the tree's
                // own checks (the root) would show, so it is not papered over with zeros.
                if let Some(h) = nodes.get(&(level, index)) {
                    piece.extend_from_slice(h);
                }
            }
        }
        if !piece.is_empty() {
            writes.insert(layout::indexed(tag::NODES, start), Some(piece));
        }
        nodes.into_iter().map(|((l, i), h)| (l, i, h)).collect()
    }
}

/// How many entries of a folder written before pieces are moved into pieces in one write.
const MIGRATE_ENTRIES: u64 = 16 * CHUNK;

/// Moves the entries, leaves and tree nodes of a store written before pieces (format 5 and earlier:
/// a row each) into pieces, a few chunks per write, so that an interrupted move resumes where it
/// stopped. Returns the number of entries moved.
pub(crate) fn migrate(rows: &dyn Storage) -> Result<u64, StoreError> {
    let mut moved = 0;
    loop {
        // The first entry still in its own row: the move goes in whole chunks, so a chunk's start.
        let Some(first) = rows
            .scan_prefix(&[tag::BODY])
            .next()
            .transpose()?
            .map(|(k, _)| first_of(&k))
            .transpose()?
        else {
            break;
        };
        let end = chunk_start(first) + MIGRATE_ENTRIES;
        let mut pending = Pending::default();
        let mut writes = Writes::new();
        let mut next = first;
        for kv in rows.range(
            &layout::indexed(tag::BODY, first),
            &layout::indexed(tag::BODY, end),
        ) {
            let (k, v) = kv?;
            let i = first_of(&k)?;
            if i != next || v.len() < 32 {
                return Err(StoreError::Format(format!(
                    "log entry {next} has no stored body: the stored data is damaged"
                )));
            }
            next += 1;
            pending.push(i, v);
            writes.insert(k, None);
            writes.insert(layout::indexed(tag::LEAF, i), None);
            // Format 3 also stored the level-0 nodes.
            writes.insert(layout::node(0, i), None);
            for (level, index) in completed_by(i) {
                let key = layout::node(level, index);
                let hash = rows
                    .get(&key)?
                    .and_then(|v| Hash::try_from(v.as_slice()).ok())
                    .ok_or_else(|| {
                        StoreError::Format(format!(
                            "tree node {level}/{index} is not stored: the stored data is damaged"
                        ))
                    })?;
                pending.set_node(level, index, hash);
                writes.insert(key, None);
            }
        }
        moved += next - first;
        pending.write_into(&mut writes);
        rows.begin()?;
        rows.write(writes)?;
    }
    // Leaves and nodes of no entry (none in a sound store).
    for t in [tag::LEAF, tag::NODE] {
        let stray: Writes = rows
            .scan_prefix(&[t])
            .map(|kv| kv.map(|(k, _)| (k, None)))
            .collect::<Result<_, _>>()?;
        if !stray.is_empty() {
            rows.begin()?;
            rows.write(stray)?;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_place_is_the_count_of_nodes_completed_before_it() {
        // Walk leaves 0..300 from several piece starts, and check every node's computed place against
        // its position in the piece's order.
        for first in [0u64, 1, 5, 64, 100] {
            let mut order = Vec::new();
            for j in first..first + 200 {
                order.extend(completed_by(j));
            }
            for (at, (level, index)) in order.iter().enumerate() {
                assert_eq!(place(*level, *index, first), Some(at as u64));
            }
        }
        assert_eq!(completed(0), 0);
        assert_eq!(completed(8), 7);
        assert_eq!(
            completed_by(7).collect::<Vec<_>>(),
            [(1, 3), (2, 1), (3, 0)]
        );
        assert_eq!(completed_by(4).count(), 0);
        assert_eq!(place(60, u64::MAX, 0), None);
    }

    #[test]
    fn pieces_never_cross_a_chunk_and_close_when_full() {
        let mut p = Pending::default();
        for i in 60..200u64 {
            p.push(i, vec![i as u8; 40]);
        }
        let mut w = Writes::new();
        p.write_into(&mut w);
        let starts: Vec<u64> = w
            .keys()
            .filter(|k| k[0] == tag::ENTRIES)
            .map(|k| first_of(k).unwrap())
            .collect();
        assert_eq!(starts, [60, 64, 128, 192]);
        let mut big = Pending::default();
        for i in 0..10u64 {
            big.push(i, vec![1; PIECE_BYTES / 3]);
        }
        let mut w = Writes::new();
        big.write_into(&mut w);
        let sizes: Vec<usize> = w
            .iter()
            .filter(|(k, _)| k[0] == tag::ENTRIES)
            .map(|(_, v)| layout::piece_entries(v.as_ref().unwrap()).unwrap().len())
            .collect();
        assert_eq!(sizes, [3, 3, 3, 1], "closed once past {PIECE_BYTES} bytes");
    }
}
