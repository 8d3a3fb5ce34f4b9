//! The family ledgers over the store's rows. What grows with a family's records is kept out of memory,
//! and out of sled's page table too: sled 0.34 keeps about 45 bytes of memory for every row it holds,
//! so a row per record id and per tree node would cost more than the ledger it replaces. Each period's
//! ids, leaves and tree nodes go into ledger pieces instead (`LEDGER` rows), as the log's own entries
//! and nodes do (`store::pieces`):
//!
//! - a piece holds consecutive records of one period, from `first` on: a 2-byte count `m`, then for each
//!   record its id (16 bytes) and leaf hash (32), then the tree nodes above level 0 those records'
//!   appends completed (32 bytes each), in completion order;
//! - no piece crosses a multiple of [`CHUNK`] records, so the piece that holds record `j` is the last one
//!   starting in `[j − j mod 64, j]`: one short range read;
//! - a batch's records extend the period's open piece (rewritten, at most 64 records and their nodes)
//!   and start a new one at each multiple of 64: about one row per 64 records, however they are batched.
//!
//! Node (`l`, `k`) is completed by record `(k + 1)·2^l − 1` and sits at place `c(j) − c(f) + l − 1`
//! among the nodes of the piece starting at `f` that holds it (`pieces::place`). The ids a family holds
//! are answered from memory ([`IdSet`], 8 bytes a record), rebuilt at open from the batches in the log.

use cmr_core::batch::{Applied, Batch, FamilyState, IdSet, RecordIndex};
use cmr_core::record::RecordId;

use super::pieces::{CHUNK, chunk_start, completed, completed_by, completing_leaf, place};
use super::*;

/// A family as the sequencer holds it: its ledger state, and the ids it holds.
pub(super) struct Family {
    pub(super) state: FamilyState,
    pub(super) ids: IdSet,
}

impl Family {
    pub(super) fn new(state: FamilyState) -> Self {
        Family {
            state,
            ids: IdSet::default(),
        }
    }
}

fn damaged(what: String) -> StoreError {
    StoreError::Format(format!("{what}: the stored data is damaged"))
}

/// Bytes per record in a piece: id and leaf hash.
const RECORD: usize = 16 + 32;

/// A ledger piece, parsed: its first record, its records (id, leaf) and its nodes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Piece {
    first: u64,
    records: Vec<(RecordId, Hash)>,
    nodes: Vec<Hash>,
}

impl Piece {
    fn decode(first: u64, v: &[u8]) -> Result<Self, StoreError> {
        let bad = || damaged(format!("the ledger piece at record {first}"));
        let (m, rest) = v.split_first_chunk::<2>().ok_or_else(bad)?;
        let m = u64::from(u16::from_be_bytes(*m));
        let nodes = completed(first + m) - completed(first);
        let expected = m as usize * RECORD + nodes as usize * 32;
        if m == 0 || rest.len() != expected || chunk_start(first) != chunk_start(first + m - 1) {
            return Err(bad());
        }
        let (records, nodes) = rest.split_at(m as usize * RECORD);
        let hash = |b: &[u8]| Hash::try_from(b).map_err(|_| bad());
        Ok(Piece {
            first,
            records: records
                .chunks_exact(RECORD)
                .map(|r| {
                    let id = <[u8; 16]>::try_from(&r[..16]).map_err(|_| bad())?;
                    Ok((RecordId(id), hash(&r[16..])?))
                })
                .collect::<Result<_, StoreError>>()?,
            nodes: nodes.chunks_exact(32).map(hash).collect::<Result<_, _>>()?,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(2 + self.records.len() * RECORD + self.nodes.len() * 32);
        v.extend_from_slice(&(self.records.len() as u16).to_be_bytes());
        for (id, leaf) in &self.records {
            v.extend_from_slice(&id.0);
            v.extend_from_slice(leaf);
        }
        for n in &self.nodes {
            v.extend_from_slice(n);
        }
        v
    }

    fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

/// The first record of a ledger piece's key.
fn first_of(key: &[u8]) -> Result<u64, StoreError> {
    layout::family_piece_of(key)
        .map(|(_, _, first)| first)
        .ok_or_else(|| damaged("a ledger piece's key".into()))
}

/// The last row with a key in `from..to`, as `writes` over `rows` show it.
fn last_in(
    writes: &Writes,
    rows: &dyn Storage,
    from: &[u8],
    to: &[u8],
) -> Result<Option<Row>, StoreError> {
    let mut pending = writes.range(from.to_vec()..to.to_vec()).peekable();
    if pending.peek().is_none() {
        return rows.last(from, to);
    }
    // This group (or this replay) wrote here: merge, newest last. At most a chunk's worth of pieces.
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = rows.range(from, to).collect::<Result<_, _>>()?;
    for (k, v) in pending {
        match v {
            Some(v) => merged.insert(k.clone(), v.clone()),
            None => merged.remove(k),
        };
    }
    Ok(merged.pop_last())
}

/// The piece of family `number`'s `period` that holds record `j`, if any.
fn piece_holding(
    writes: &Writes,
    rows: &dyn Storage,
    number: u64,
    period: Period,
    j: u64,
) -> Result<Option<Piece>, StoreError> {
    let Some(end) = j.checked_add(1) else {
        return Ok(None);
    };
    let from = layout::ledger_piece(number, period, chunk_start(j));
    let to = layout::ledger_piece(number, period, end);
    match last_in(writes, rows, &from, &to)? {
        Some((k, v)) => {
            let piece = Piece::decode(first_of(&k)?, &v)?;
            Ok((j < piece.end()).then_some(piece))
        }
        None => Ok(None),
    }
}

/// One family's [`RecordIndex`] over a group's overlay.
pub(super) struct FamilyRows<'a, 'o> {
    overlay: &'a Overlay<'o>,
    number: u64,
    ids: &'a IdSet,
    /// The ledger pieces this index read last, with their periods. A read's proof asks for a handful of
    /// nodes and its page's ids, most of them in the same two or three pieces; each lookup was a
    /// reverse range scan of the storage and a piece decoded again. The overlay is borrowed for as long
    /// as this lives, so what it holds cannot change under these.
    read: std::cell::RefCell<Vec<(Period, Piece)>>,
}

/// How many pieces [`FamilyRows`] keeps: a proof of a page of the period's first records reads about
/// four (the page's, and one for each larger subtree to its right in the period's first chunk).
const PIECES_KEPT: usize = 4;

impl<'a, 'o> FamilyRows<'a, 'o> {
    pub(super) fn new(overlay: &'a Overlay<'o>, number: u64, ids: &'a IdSet) -> Self {
        Self {
            overlay,
            number,
            ids,
            read: std::cell::RefCell::new(Vec::with_capacity(PIECES_KEPT)),
        }
    }

    /// `f` of the piece that holds record `j` of `period`.
    fn with_holding<R>(
        &self,
        period: Period,
        j: u64,
        f: impl FnOnce(&Piece) -> R,
    ) -> Result<R, StoreError> {
        let mut read = self.read.borrow_mut();
        // Pieces never overlap, so a kept piece that covers `j` is the one that holds it.
        if let Some((_, piece)) = read
            .iter()
            .find(|(p, piece)| *p == period && piece.first <= j && j < piece.end())
        {
            return Ok(f(piece));
        }
        let piece = piece_holding(
            &self.overlay.writes,
            self.overlay.rows,
            self.number,
            period,
            j,
        )?
        .ok_or_else(|| damaged(format!("the ledger piece holding record {j} of {period}")))?;
        let out = f(&piece);
        if read.len() == PIECES_KEPT {
            read.remove(0);
        }
        read.push((period, piece));
        Ok(out)
    }
}

impl RecordIndex for FamilyRows<'_, '_> {
    type Error = StoreError;

    fn node(&self, period: Period, level: u8, index: u64) -> Result<Hash, StoreError> {
        let missing = || damaged(format!("the tree node ({level}, {index}) of {period}"));
        if level == 0 {
            return self
                .with_holding(period, index, |piece| {
                    piece
                        .records
                        .get((index - piece.first) as usize)
                        .map(|(_, leaf)| *leaf)
                })?
                .ok_or_else(missing);
        }
        let j = completing_leaf(level, index).ok_or_else(missing)?;
        self.with_holding(period, j, |piece| {
            place(level, index, piece.first).and_then(|at| piece.nodes.get(at as usize).copied())
        })?
        .ok_or_else(missing)
    }

    fn ids(&self, period: Period, start: u64, end: u64) -> Result<Vec<RecordId>, StoreError> {
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut j = start;
        while j < end {
            j = self.with_holding(period, j, |piece| {
                let upto = piece.end().min(end);
                out.extend(
                    piece.records[(j - piece.first) as usize..(upto - piece.first) as usize]
                        .iter()
                        .map(|(id, _)| *id),
                );
                upto
            })?;
        }
        Ok(out)
    }

    fn contains(&self, id: &RecordId) -> Result<bool, StoreError> {
        Ok(self.ids.contains(id))
    }
}

/// A batch extends the ledger piece an earlier batch left open only while it holds fewer records than
/// this, and otherwise starts one: an append of one record then rewrites at most this many records'
/// ids, leaves and nodes (about 1.3 KiB) instead of up to 64 (5 KiB). A batch of many records still
/// fills its own pieces up to a multiple of [`CHUNK`], so bulk writes keep few rows.
const EXTEND_AT_MOST: usize = 16;

/// Adds a batch applied as `applied` to family `number`'s ledger pieces in `writes` (over `rows`): each
/// record extends its period's open piece or starts one at a multiple of [`CHUNK`] (or once an earlier
/// batch's piece holds [`EXTEND_AT_MOST`] records), with the nodes its append completed. One function
/// for the sequencer and for a replay that adds the pieces to a folder written before them.
pub(super) fn stage_ledger(
    writes: &mut Writes,
    rows: &dyn Storage,
    number: u64,
    batch: &Batch,
    applied: &Applied,
) -> Result<(), StoreError> {
    // The nodes each period's appends completed, in order.
    let mut nodes: HashMap<Period, std::collections::VecDeque<Hash>> = HashMap::new();
    for (period, _, _, hash) in &applied.nodes {
        nodes.entry(*period).or_default().push_back(*hash);
    }
    let mut open: HashMap<Period, Piece> = HashMap::new();
    for (e, (period, j)) in batch.entries.iter().zip(&applied.placements) {
        let (period, j) = (*period, *j);
        let piece = match open.remove(&period) {
            Some(p) if p.end() == j && j % CHUNK != 0 => p,
            Some(p) => {
                writes.insert(
                    layout::ledger_piece(number, period, p.first),
                    Some(p.encode()),
                );
                Piece {
                    first: j,
                    ..Piece::default()
                }
            }
            None if j % CHUNK != 0 => match piece_holding(writes, rows, number, period, j - 1)? {
                Some(p) if p.end() == j && p.records.len() < EXTEND_AT_MOST => p,
                Some(p) if p.end() == j => Piece {
                    first: j,
                    ..Piece::default()
                },
                _ => return Err(damaged(format!("the ledger piece before record {j}"))),
            },
            None => Piece {
                first: j,
                ..Piece::default()
            },
        };
        let mut piece = piece;
        piece
            .records
            .push((e.id, cmr_core::merkle::leaf_hash(&e.digest.0)));
        let queue = nodes.entry(period).or_default();
        for _ in completed_by(j) {
            let h = queue
                .pop_front()
                .ok_or_else(|| StoreError::Format("a batch's tree nodes".into()))?;
            piece.nodes.push(h);
        }
        open.insert(period, piece);
    }
    for (period, p) in open {
        writes.insert(
            layout::ledger_piece(number, period, p.first),
            Some(p.encode()),
        );
    }
    Ok(())
}

/// A period's tree saved as a `FRONTIER` row: its size, then (leaves, root) for each perfect subtree.
pub(super) fn encode_tree(tree: &cmr_core::merkle::CompactRange) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + tree.subtrees().len() * 40);
    v.extend_from_slice(&tree.size().to_be_bytes());
    for (leaves, root) in tree.subtrees() {
        v.extend_from_slice(&leaves.to_be_bytes());
        v.extend_from_slice(root);
    }
    v
}

/// A `FRONTIER` row's tree; `None` if it does not decode to a valid one.
pub(super) fn decode_tree(v: &[u8]) -> Option<cmr_core::merkle::CompactRange> {
    let (size, rest) = v.split_first_chunk::<8>()?;
    if rest.len() % 40 != 0 {
        return None;
    }
    let subtrees = rest
        .chunks_exact(40)
        .map(|c| {
            Some((
                u64::from_be_bytes(c[..8].try_into().ok()?),
                Hash::try_from(&c[8..]).ok()?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    cmr_core::merkle::CompactRange::from_parts(u64::from_be_bytes(*size), subtrees)
}

/// The saved trees of the periods `applied` added to, as `FRONTIER` rows of family `number`.
pub(super) fn tree_rows(
    number: u64,
    state: &FamilyState,
    applied: &Applied,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut periods: Vec<Period> = applied.placements.iter().map(|(p, _)| *p).collect();
    periods.sort_unstable();
    periods.dedup();
    periods
        .into_iter()
        .filter_map(|p| Some((layout::frontier(number, p), encode_tree(state.tree(p)?))))
        .collect()
}

/// A records piece is closed once its records pass this many bytes (a record larger than this is a
/// piece by itself). A read checks whole pieces (the engine's checksum, then each record against its
/// leaf), so a piece stays near the size of a read's page of records; fewer, larger pieces are fewer
/// rows for the engine to index (sled keeps memory for every page of rows it holds, and keeps a
/// 16-byte pointer a piece, the piece itself in a file beside it). At 16 KiB a piece holds about
/// fourteen records of 1 KiB. (Format 7 kept pieces in sled's rows, at 4 KiB: sled writes a page past
/// 128 KiB to a file of its own, which made pieces of 32 KiB there seed eight times slower.)
const RECORD_PIECE_BYTES: usize = 16 * 1024;

/// A records piece being built: its first index and its value so far.
struct RecordsPiece {
    first: u64,
    count: u64,
    value: Vec<u8>,
}

impl RecordsPiece {
    fn new(first: u64) -> Self {
        RecordsPiece {
            first,
            count: 0,
            value: Vec::new(),
        }
    }

    fn decode(first: u64, value: Vec<u8>) -> Result<Self, StoreError> {
        let count = layout::piece_records(&value)?.len() as u64;
        Ok(RecordsPiece {
            first,
            count,
            value,
        })
    }

    fn end(&self) -> u64 {
        self.first + self.count
    }

    /// Whether record `n` may join this piece: it comes next, in the same chunk, and the piece is
    /// not full.
    fn takes(&self, n: u64) -> bool {
        n == self.end()
            && (self.count == 0 || !n.is_multiple_of(CHUNK))
            && self.value.len() < RECORD_PIECE_BYTES
    }

    fn push(&mut self, record: &[u8]) {
        layout::push_piece_entry(&mut self.value, record);
        self.count += 1;
    }
}

/// Adds records to family `number`'s pieces in `writes` (over `rows`): `records` are (period, index,
/// value) in the order they were placed, each value what a `RECORD` row holds (the batch's log index,
/// then the sealed record). A record extends its period's open piece, or starts one at a multiple of
/// [`CHUNK`] or once the open one is full. With `reopen`, the first record of a period may extend a
/// piece an earlier call wrote (a move of many rows, done in parts); the sequencer does not, so that
/// an append of one record never rewrites the records before it. One function for the sequencer, an
/// upgrade and a restore.
pub(super) fn stage_records<'r>(
    writes: &mut Writes,
    rows: &dyn Storage,
    number: u64,
    records: impl IntoIterator<Item = (Period, u64, &'r [u8])>,
    reopen: bool,
) -> Result<(), StoreError> {
    let mut open: HashMap<Period, RecordsPiece> = HashMap::new();
    for (period, n, value) in records {
        let mut piece = match open.remove(&period) {
            Some(p) if p.takes(n) => p,
            Some(p) => {
                writes.insert(
                    layout::records_piece(number, period, p.first),
                    Some(p.value),
                );
                RecordsPiece::new(n)
            }
            None => match n.checked_sub(1) {
                Some(before) if reopen && n % CHUNK != 0 => {
                    let from = layout::records_piece(number, period, chunk_start(before));
                    let to = layout::records_piece(number, period, n);
                    match last_in(writes, rows, &from, &to)? {
                        Some((k, v)) => {
                            let (_, _, first) = layout::family_piece_of(&k)
                                .ok_or_else(|| damaged("a records piece's key".into()))?;
                            let p = RecordsPiece::decode(first, v)?;
                            if p.end() != n {
                                return Err(damaged(format!(
                                    "the records of {period} before record {n}"
                                )));
                            }
                            if p.takes(n) { p } else { RecordsPiece::new(n) }
                        }
                        None => RecordsPiece::new(n),
                    }
                }
                _ => RecordsPiece::new(n),
            },
        };
        piece.push(value);
        open.insert(period, piece);
    }
    for (period, p) in open {
        writes.insert(
            layout::records_piece(number, period, p.first),
            Some(p.value),
        );
    }
    Ok(())
}

/// A record's index in its period, and what a `RECORD` row holds for it.
pub(super) type Numbered = (u64, Vec<u8>);

/// Records `start..end` of family `number`'s `period` as `overlay` shows them, in order, as (index,
/// value), each value what a `RECORD` row holds: read from their pieces, stopping after the record
/// that brings the values' total past `max_bytes`; and whether it stopped there. A record that is not
/// stored is left out: the caller, which knows how many there must be, tells damage from the budget.
pub(super) fn read_records(
    overlay: &Overlay<'_>,
    number: u64,
    period: Period,
    (start, end): (u64, u64),
    max_bytes: usize,
) -> Result<(Vec<Numbered>, bool), StoreError> {
    let mut out = Vec::new();
    if start >= end {
        return Ok((out, false));
    }
    let from = layout::records_piece(number, period, chunk_start(start));
    let to = layout::records_piece(number, period, start + 1);
    let Some((k, _)) = last_in(&overlay.writes, overlay.rows, &from, &to)? else {
        return Ok((out, false));
    };
    let to = layout::records_piece(number, period, end);
    let (mut total, mut stopped) = (0usize, false);
    'pieces: for (k, v) in overlay.range_within(&k, &to, max_bytes)? {
        let (_, _, first) =
            layout::family_piece_of(&k).ok_or_else(|| damaged("a records piece's key".into()))?;
        for (n, record) in (first..).zip(layout::piece_records(&v)?) {
            if n < start {
                continue;
            }
            if n >= end {
                break 'pieces;
            }
            out.push((n, record.to_vec()));
            total = total.saturating_add(record.len());
            if total > max_bytes {
                stopped = true;
                break 'pieces;
            }
        }
    }
    Ok((out, stopped))
}

/// Records moved per atomic write when a folder of format 6 or earlier (a row per record) is moved
/// into pieces.
const MIGRATE_RECORDS: usize = 1024;

/// Moves the records kept a row each (`RECORD`: a folder of format 6 or earlier, or a restored
/// snapshot) into pieces, a bounded number per atomic write (each write adds the pieces and deletes
/// the rows they hold), so a move that is cut short resumes where it stopped. Returns how many moved.
pub(super) fn migrate(rows: &dyn Storage) -> Result<u64, StoreError> {
    let mut moved = 0u64;
    loop {
        let mut batch: Vec<(u64, Period, u64, Vec<u8>)> = Vec::new();
        let mut deletes = Vec::new();
        for kv in rows.scan_prefix(&[tag::RECORD]).take(MIGRATE_RECORDS) {
            let (k, v) = kv?;
            let (number, period, n) =
                layout::family_piece_of(&k).ok_or_else(|| damaged("a record's key".into()))?;
            batch.push((number, period, n, v));
            deletes.push(k);
        }
        if batch.is_empty() {
            return Ok(moved);
        }
        let mut writes = Writes::new();
        let mut i = 0;
        while i < batch.len() {
            let number = batch[i].0;
            let j = i + batch[i..].iter().take_while(|r| r.0 == number).count();
            stage_records(
                &mut writes,
                rows,
                number,
                batch[i..j]
                    .iter()
                    .map(|(_, p, n, v)| (*p, *n, v.as_slice())),
                true,
            )?;
            i = j;
        }
        for k in deletes {
            writes.insert(k, None);
        }
        moved += batch.len() as u64;
        rows.write(writes)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Test code: a panic is a failed test.
mod tests {
    use super::*;
    use cmr_core::batch::BatchEntry;
    use cmr_core::family::{FamilyId, Scope};
    use cmr_core::hash::Digest;
    use cmr_core::identity::{DeviceId, IdentityId};

    fn batch(state: &FamilyState, period: Period, n: usize, tag: u64) -> Batch {
        Batch {
            customer: IdentityId([1; 32]),
            family: FamilyId([2; 32]),
            epoch: 1,
            author: IdentityId([1; 32]),
            device: DeviceId([3; 32]),
            prev_head: state.head().digest(),
            entries: (0..n as u64)
                .map(|i| {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&tag.to_be_bytes());
                    id[8..].copy_from_slice(&i.to_be_bytes());
                    BatchEntry {
                        id: RecordId(id),
                        period,
                        digest: Digest(cmr_core::hash::sha256(&id).0),
                    }
                })
                .collect(),
        }
    }

    /// Batches of every size, into two periods, staged as pieces: every piece stays inside its chunk,
    /// and the pieces answer every node and id the way the leaves in memory do.
    #[test]
    fn pieces_answer_every_node_and_id_the_leaves_would() {
        let dir = tempfile::tempdir().unwrap();
        let rows = crate::SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
        let mut writes = Writes::new();
        let mut state =
            FamilyState::new(IdentityId([1; 32]), FamilyId([2; 32]), Scope::Transactions);
        let (a, b) = (Period(202_601), Period(202_602));
        let mut leaves: HashMap<Period, Vec<(RecordId, Hash)>> = HashMap::new();
        for (tag, (period, n)) in [
            (a, 1),
            (a, 62),
            (b, 3),
            (a, 1),
            (a, 1),
            (a, 130),
            (b, 64),
            (b, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let batch = batch(&state, period, n, tag as u64);
            let applied = state.advance(&batch);
            stage_ledger(&mut writes, &rows, 7, &batch, &applied).unwrap();
            for e in &batch.entries {
                leaves
                    .entry(period)
                    .or_default()
                    .push((e.id, cmr_core::merkle::leaf_hash(&e.digest.0)));
            }
            // Half the time the group is written before the next batch.
            if tag % 2 == 0 {
                rows.write(std::mem::take(&mut writes)).unwrap();
            }
        }
        rows.write(std::mem::take(&mut writes)).unwrap();
        let cache = NodeCache::new();
        let overlay = Overlay::new(&rows, &cache, 0);
        let ids = IdSet::default();
        let index = FamilyRows::new(&overlay, 7, &ids);
        for (period, held) in &leaves {
            let hashes: Vec<Hash> = held.iter().map(|(_, h)| *h).collect();
            let n = held.len() as u64;
            for level in 0..8u8 {
                for k in 0..(n >> level) {
                    let w = 1usize << level;
                    let expected =
                        cmr_core::merkle::root(&hashes[k as usize * w..(k as usize + 1) * w]);
                    assert_eq!(
                        index.node(*period, level, k).unwrap(),
                        expected,
                        "{period} ({level}, {k})"
                    );
                }
            }
            let all: Vec<RecordId> = held.iter().map(|(id, _)| *id).collect();
            assert_eq!(index.ids(*period, 0, n).unwrap(), all);
            assert_eq!(
                index.ids(*period, 60, 70.min(n)).unwrap(),
                all[60..70.min(n) as usize]
            );
        }
        let mut pieces = 0;
        for kv in rows.range(&[tag::LEDGER], &[tag::LEDGER + 1]) {
            let (k, v) = kv.unwrap();
            let piece = Piece::decode(first_of(&k).unwrap(), &v).unwrap();
            assert_eq!(chunk_start(piece.first), chunk_start(piece.end() - 1));
            pieces += 1;
        }
        // 195 records in a: one piece a chunk, except that the fourth batch (one record, at 63)
        // starts its own instead of extending the 63 records before it; 68 in b: one a chunk,
        // however the batches and groups fell.
        assert_eq!(pieces, 5 + 2);
        let first_of_63 = layout::ledger_piece(7, a, 63);
        assert!(rows.get(&first_of_63).unwrap().is_some());
    }

    /// Records of every size staged batch by batch (and some as the rows of an earlier format, moved
    /// by `migrate`) read back whole, in any range, in pieces that never cross a chunk and close past
    /// their bytes; a byte budget stops a read after the record that passes it.
    #[test]
    fn records_pieces_read_back_in_any_range_within_a_budget() {
        let dir = tempfile::tempdir().unwrap();
        let rows = crate::SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
        let period = Period(202_603);
        let value = |n: u64| -> Vec<u8> {
            // A batch index, then a "record" of 1 KiB, or 40 KiB for every 37th.
            let len = if n % 37 == 5 { 40 * 1024 } else { 1024 };
            let mut v = (n / 10).to_be_bytes().to_vec();
            v.extend(std::iter::repeat_n((n % 251) as u8, len));
            v
        };
        let mut n = 0;
        for size in [1, 3, 60, 1, 1, 200, 7] {
            let batch: Vec<(u64, Vec<u8>)> = (n..n + size).map(|i| (i, value(i))).collect();
            let mut writes = Writes::new();
            stage_records(
                &mut writes,
                &rows,
                9,
                batch.iter().map(|(i, v)| (period, *i, v.as_slice())),
                true,
            )
            .unwrap();
            rows.write(writes).unwrap();
            n += size;
        }
        // Then 30 more as a row each (a folder of format 6), moved into pieces.
        let mut writes = Writes::new();
        for i in n..n + 30 {
            writes.insert(layout::record(9, period, i), Some(value(i)));
        }
        rows.write(writes).unwrap();
        assert_eq!(migrate(&rows).unwrap(), 30);
        assert_eq!(migrate(&rows).unwrap(), 0);
        n += 30;
        let cache = NodeCache::new();
        let overlay = Overlay::new(&rows, &cache, 0);
        for (start, end) in [(0, n), (5, 6), (63, 65), (100, 190), (n - 1, n)] {
            let (got, stopped) =
                read_records(&overlay, 9, period, (start, end), usize::MAX).unwrap();
            assert!(!stopped);
            let expected: Vec<(u64, Vec<u8>)> = (start..end).map(|i| (i, value(i))).collect();
            assert_eq!(got, expected, "{start}..{end}");
        }
        // A budget of 10 KiB from record 0: five records of 1 KiB, then record 5 (40 KiB) passes it,
        // and the read says it stopped.
        let (got, stopped) = read_records(&overlay, 9, period, (0, n), 10 * 1024).unwrap();
        assert!(stopped);
        assert_eq!(got.len(), 6, "record 5 is 40 KiB");
        for kv in rows.range(&[tag::RECORDS], &[tag::RECORDS + 1]) {
            let (k, v) = kv.unwrap();
            let (_, _, first) = layout::family_piece_of(&k).unwrap();
            let count = layout::piece_records(&v).unwrap().len() as u64;
            assert_eq!(chunk_start(first), chunk_start(first + count - 1));
            assert!(
                count == 1 || v.len() < RECORD_PIECE_BYTES + 42 * 1024,
                "{first}: {}",
                v.len()
            );
        }
    }
}
