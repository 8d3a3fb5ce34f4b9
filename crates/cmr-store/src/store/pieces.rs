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
//!
//! An entries piece is stored compressed (format 10): a zstd frame (RFC 8878) of its bytes, compressed
//! against the bytes of the pieces before it in its chunk (zstd's raw-content prefix). Entries repeat
//! much of one another (the same company, device, customer, grant and family, the same request's
//! shape), but a group's piece alone is too small for that to show; against its chunk's earlier pieces
//! a logged access stores about 60 % of its bytes (docs/durability.md, "Entries compressed"). Reading
//! an entry therefore reads its chunk up to its piece. A piece of an earlier format (its bytes as they
//! are) is read as before and serves as the prefix of a compressed one all the same.

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

/// A compressed piece is a zstd frame: it starts with zstd's magic number (little-endian). An entries
/// piece of an earlier format starts with its first salted body's length (big-endian), which would have
/// to be 683 MB to read as that.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// How much of a chunk's earlier bytes a piece is compressed against: its last this many bytes (the
/// same rule when reading, so the dictionary is the same).
const PREFIX_BYTES: usize = 64 * 1024;

/// zstd's level for entries pieces. Measured on this log's entries, levels 1 and 3 keep the same
/// bytes within 1 %; level 1 builds its tables over the dictionary faster.
const LEVEL: i32 = 1;

/// The most bytes a compressed entries piece may open to: a full piece and one more body of the largest
/// kind. A frame that claims more is damaged data, refused before anything is allocated.
const MAX_PIECE_BYTES: u64 = (PIECE_BYTES + 2 * cmr_log::entry::MAX_PAYLOAD + 64 * 1024) as u64;

/// The dictionary a piece is compressed against: a zero byte, then the last [`PREFIX_BYTES`] (or
/// fewer) of its chunk's earlier bytes. zstd takes a dictionary that starts with its dictionary magic
/// number (`37 a4 30 ec`) as one of its own format, and any other as raw content; the zero byte makes
/// it raw content whatever bytes the cut falls on (a body's bytes are partly the parties' own).
fn dictionary(earlier: &[u8]) -> Vec<u8> {
    let tail = &earlier[earlier.len().saturating_sub(PREFIX_BYTES)..];
    let mut dict = Vec::with_capacity(1 + tail.len());
    dict.push(0);
    dict.extend_from_slice(tail);
    dict
}

/// [`dictionary`] of a chunk's bytes kept after a zero byte (as [`ChunkReader`] keeps them): the
/// bytes themselves while they fit, so reading a chunk does not copy its bytes for every piece.
fn dictionary_after_zero(kept: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match kept.get(1..) {
        Some(earlier) if earlier.len() > PREFIX_BYTES => dictionary(earlier).into(),
        _ => kept.into(),
    }
}

fn zstd_error(what: &str, code: usize) -> StoreError {
    StoreError::Format(format!("{what}: {}", zstd::zstd_safe::get_error_name(code)))
}

thread_local! {
    /// Each thread's zstd contexts, made once: making one costs more than compressing a piece (a
    /// profile under `cmr bench` found a tenth of the server's time in `ZSTD_createDCtx`).
    static CCTX: std::cell::RefCell<Option<zstd::zstd_safe::CCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DCTX: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// An entries piece as stored: `plain` compressed against `earlier` (the chunk's bytes before it), or
/// `plain` itself if that is not smaller.
pub(crate) fn seal(plain: &[u8], earlier: &[u8]) -> Result<Vec<u8>, StoreError> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let failed = |c| zstd_error("compressing a piece of the log's entries", c);
    CCTX.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| StoreError::Io("the compression context is in use".into()))?;
        if slot.is_none() {
            let mut cctx = CCtx::try_create()
                .ok_or_else(|| StoreError::Io("no memory for a compression context".into()))?;
            cctx.set_parameter(CParameter::CompressionLevel(LEVEL))
                .map_err(failed)?;
            cctx.set_parameter(CParameter::ContentSizeFlag(true))
                .map_err(failed)?;
            // Four bytes a piece: a piece damaged on a database (which, unlike the entries file,
            // keeps no digest of it) fails to open instead of opening as other bytes.
            cctx.set_parameter(CParameter::ChecksumFlag(true))
                .map_err(failed)?;
            *slot = Some(cctx);
        }
        let Some(cctx) = slot.as_mut() else {
            return Err(StoreError::Io("no compression context".into()));
        };
        // Copied into the context (the dictionary stays until the next one is loaded).
        cctx.load_dictionary(&dictionary(earlier)).map_err(failed)?;
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()));
        cctx.compress2(&mut out, plain).map_err(failed)?;
        Ok(if out.len() < plain.len() {
            out
        } else {
            plain.to_vec()
        })
    })
}

/// The bytes of a stored entries piece, given its chunk's bytes before it.
#[cfg(test)]
fn open(value: &[u8], earlier: &[u8]) -> Result<Vec<u8>, StoreError> {
    open_with(value, &dictionary(earlier))
}

/// The bytes of a stored entries piece, given the [`dictionary`] of its chunk's bytes before it.
fn open_with(value: &[u8], dictionary: &[u8]) -> Result<Vec<u8>, StoreError> {
    use zstd::zstd_safe::DCtx;
    if !value.starts_with(&ZSTD_MAGIC) {
        return Ok(value.to_vec());
    }
    let damaged =
        || StoreError::Format("a compressed piece of the log's entries does not open".into());
    let size = match zstd::zstd_safe::get_frame_content_size(value) {
        Ok(Some(n)) if n <= MAX_PIECE_BYTES => n,
        _ => return Err(damaged()),
    };
    DCTX.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| StoreError::Io("the decompression context is in use".into()))?;
        if slot.is_none() {
            *slot =
                Some(DCtx::try_create().ok_or_else(|| {
                    StoreError::Io("no memory for a decompression context".into())
                })?);
        }
        let Some(dctx) = slot.as_mut() else {
            return Err(StoreError::Io("no decompression context".into()));
        };
        let mut out = Vec::with_capacity(usize::try_from(size).map_err(|_| damaged())?);
        let n = dctx
            .decompress_using_dict(&mut out, value, dictionary)
            .map_err(|_| damaged())?;
        if n as u64 != size {
            return Err(damaged());
        }
        Ok(out)
    })
}

/// Reads a chunk's entries pieces in order: each is opened against the bytes of the ones before it in
/// its chunk, which it keeps.
#[derive(Default)]
pub(crate) struct ChunkReader {
    /// The chunk being read, and a zero byte followed by its bytes so far (see
    /// [`dictionary_after_zero`]).
    chunk: Option<(u64, Vec<u8>)>,
}

impl ChunkReader {
    /// Opens the piece of row (`key`, `value`), the next one of its chunk (or the first of another
    /// chunk): its first index, and its bytes.
    pub(crate) fn open(&mut self, key: &[u8], value: &[u8]) -> Result<(u64, &[u8]), StoreError> {
        let first = first_of(key)?;
        let start = chunk_start(first);
        if self.chunk.as_ref().is_some_and(|(c, _)| *c != start) {
            self.chunk = None;
        }
        let (_, kept) = self.chunk.get_or_insert_with(|| (start, vec![0]));
        let at = kept.len();
        let opened = if value.starts_with(&ZSTD_MAGIC) {
            open_with(value, &dictionary_after_zero(kept))?
        } else {
            value.to_vec()
        };
        kept.extend(opened);
        Ok((first, &kept[at..]))
    }

    /// The chunk's bytes read so far.
    fn bytes(self) -> Vec<u8> {
        self.chunk
            .and_then(|(_, b)| b.get(1..).map(<[u8]>::to_vec))
            .unwrap_or_default()
    }

    /// The chunk's bytes read so far, borrowed.
    fn all(&self) -> &[u8] {
        self.chunk
            .as_ref()
            .and_then(|(_, b)| b.get(1..))
            .unwrap_or_default()
    }
}

/// A chunk of the log's entries opened for reading them one by one: the pieces from its start up to
/// `end`, and where each entry's salted body is. Reading entry `i` from the storage means opening its
/// chunk up to its piece; the node cache keeps the chunks read lately ([`OpenChunk::extend`] then
/// opens only the pieces written since), so a proof that needs many leaves of one chunk, or a history
/// page of its entries, opens each piece once.
pub(crate) struct OpenChunk {
    start: u64,
    end: u64,
    reader: ChunkReader,
    bodies: Vec<std::ops::Range<usize>>,
}

impl OpenChunk {
    /// The chunk that holds entry `i`, nothing of it opened yet.
    pub(crate) fn new(i: u64) -> Self {
        Self {
            start: chunk_start(i),
            end: chunk_start(i),
            reader: ChunkReader::default(),
            bodies: Vec::new(),
        }
    }

    /// Its first entry.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// The bytes it holds (what a cache counts).
    pub(crate) fn size(&self) -> usize {
        self.reader.all().len()
    }

    /// Opens its pieces from `rows` until entry `i` is held (or no piece holds it).
    pub(crate) fn extend(&mut self, rows: &dyn Storage, i: u64) -> Result<(), StoreError> {
        if i < self.end || chunk_start(i) != self.start {
            return Ok(());
        }
        for kv in rows.range(
            &layout::indexed(tag::ENTRIES, self.end),
            &layout::indexed(tag::ENTRIES, i.saturating_add(1)),
        ) {
            let (k, v) = kv?;
            let base = self.reader.all().len();
            let (first, piece) = self.reader.open(&k, &v)?;
            if first != self.end {
                return Err(StoreError::Format(format!(
                    "the log's entries pieces leave a gap before entry {first}: the stored data \
                     is damaged"
                )));
            }
            let spans = layout::piece_spans(piece, 32, "entries")?;
            self.end += spans.len() as u64;
            self.bodies
                .extend(spans.into_iter().map(|r| base + r.start..base + r.end));
        }
        Ok(())
    }

    /// Entry `i`'s salted body, if held.
    pub(crate) fn body(&self, i: u64) -> Option<Vec<u8>> {
        let at = usize::try_from(i.checked_sub(self.start)?).ok()?;
        let span = self.bodies.get(at)?.clone();
        self.reader.all().get(span).map(<[u8]>::to_vec)
    }
}

/// The bytes of the entries pieces of the chunk that holds `i`, before `i` (what a piece that starts
/// at `i` is compressed against).
fn chunk_before(rows: &dyn Storage, i: u64) -> Result<Vec<u8>, StoreError> {
    let mut reader = ChunkReader::default();
    for kv in rows.range(
        &layout::indexed(tag::ENTRIES, chunk_start(i)),
        &layout::indexed(tag::ENTRIES, i),
    ) {
        let (k, v) = kv?;
        reader.open(&k, &v)?;
    }
    let mut bytes = reader.bytes();
    trim(&mut bytes);
    Ok(bytes)
}

/// What a group wrote that the node cache keeps once the storage holds it: the tree nodes, as (level,
/// index, hash), and the log's end with the last bytes of its chunk (what the next group's first piece
/// is compressed against).
pub(crate) struct Logged {
    pub(crate) nodes: Vec<(u8, u64, Hash)>,
    pub(crate) tail: Tail,
}

/// The log's end, and the last bytes of its chunk before it (at least the last [`PREFIX_BYTES`] of
/// them, or all).
pub(crate) type Tail = (u64, Vec<u8>);

/// Keeps at most twice what a dictionary uses of a chunk's bytes (the last [`PREFIX_BYTES`] are
/// what it uses; cutting only past twice that moves the bytes once per [`PREFIX_BYTES`] added).
fn trim(bytes: &mut Vec<u8>) {
    if bytes.len() > 2 * PREFIX_BYTES {
        bytes.drain(..bytes.len() - PREFIX_BYTES);
    }
}

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

/// The salted body of entry `i` (salt, then the encoded body), if stored: its chunk read up to its
/// piece (without the node cache's open chunks: see [`super::overlay::NodeCache::entry`]).
pub(crate) fn entry(rows: &dyn Storage, i: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let mut chunk = OpenChunk::new(i);
    chunk.extend(rows, i)?;
    Ok(chunk.body(i))
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
        chunk: ChunkReader::default(),
        from,
        to,
    }
}

/// The iterator of [`entries`].
pub(crate) struct Entries<'a> {
    rows: Rows<'a>,
    buffered: VecDeque<(u64, Vec<u8>)>,
    /// The chunk being read.
    chunk: ChunkReader,
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
            let (first, opened) = match self.chunk.open(&k, &v) {
                Ok(o) => o,
                Err(e) => return Some(Err(e)),
            };
            match layout::piece_entries(opened) {
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

    /// Moves the pending entries and nodes into `writes` as pieces, and returns every node and the new
    /// tail (for the node cache, once the storage holds them). An entries piece is compressed against
    /// its chunk's earlier pieces: `tail` if it is the log's end where these entries start, else read
    /// back from `rows` (the storage is the one truth: another server on the same database may have
    /// written them), unless the first pending entry starts a chunk.
    pub(crate) fn write_into(
        &mut self,
        rows: &dyn Storage,
        tail: Option<Tail>,
        writes: &mut Writes,
    ) -> Result<Logged, StoreError> {
        let mut earlier = match tail {
            _ if self.entries.is_empty() || self.first.is_multiple_of(CHUNK) => Vec::new(),
            Some((end, bytes)) if end == self.first => bytes,
            _ => chunk_before(rows, self.first)?,
        };
        let entries = std::mem::take(&mut self.entries);
        let nodes = std::mem::take(&mut self.nodes);
        let (first, end) = (self.first, self.first + entries.len() as u64);
        self.first = end;
        // Entries: cut at every chunk boundary and when a piece grows past its bytes.
        let mut piece: Vec<u8> = Vec::new();
        let mut start = first;
        let mut close = |start: u64, piece: Vec<u8>, earlier: &mut Vec<u8>| {
            let sealed = seal(&piece, earlier)?;
            if (start + count(&piece)).is_multiple_of(CHUNK) {
                earlier.clear();
            } else {
                earlier.extend_from_slice(&piece);
                trim(earlier);
            }
            writes.insert(layout::indexed(tag::ENTRIES, start), Some(sealed));
            Ok::<_, StoreError>(())
        };
        for (i, salted) in (first..).zip(&entries) {
            if !piece.is_empty() && (i % CHUNK == 0 || piece.len() >= PIECE_BYTES) {
                close(start, std::mem::take(&mut piece), &mut earlier)?;
                start = i;
            }
            layout::push_piece_entry(&mut piece, salted);
        }
        if !piece.is_empty() {
            close(start, piece, &mut earlier)?;
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
        Ok(Logged {
            nodes: nodes.into_iter().map(|((l, i), h)| (l, i, h)).collect(),
            tail: (end, earlier),
        })
    }
}

/// How many entries the bytes of an entries piece hold (a piece being made: well formed).
fn count(piece: &[u8]) -> u64 {
    layout::piece_entries(piece).map_or(0, |e| e.len() as u64)
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
        pending.write_into(rows, None, &mut writes)?;
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

    /// A storage on sled in a folder of its own (the entries pieces then go to its file, as in use).
    fn storage() -> (tempfile::TempDir, crate::SledStorage) {
        let dir = tempfile::tempdir().unwrap();
        let rows = crate::SledStorage::open_folder(dir.path(), 8 << 20).unwrap();
        (dir, rows)
    }

    /// Logs `bodies` from `first` on as one group does: pending, then written as pieces.
    fn log_group(rows: &dyn Storage, first: u64, bodies: &[Vec<u8>]) -> Writes {
        let mut p = Pending::default();
        for (i, b) in (first..).zip(bodies) {
            p.push(i, b.clone());
        }
        let mut w = Writes::new();
        p.write_into(rows, None, &mut w).unwrap();
        rows.write(w.clone()).unwrap();
        w
    }

    /// The pieces of `w` opened, in order, each against its chunk's earlier pieces among them.
    fn opened(w: &Writes) -> Vec<(u64, Vec<u8>)> {
        let mut reader = ChunkReader::default();
        w.iter()
            .filter(|(k, _)| k[0] == tag::ENTRIES)
            .map(|(k, v)| {
                let (first, piece) = reader.open(k, v.as_ref().unwrap()).unwrap();
                (first, piece.to_vec())
            })
            .collect()
    }

    /// A salted body shaped like a logged access: a fresh salt and signature, the rest shared by the
    /// company's other accesses.
    fn access_like(i: u64) -> Vec<u8> {
        let mut b: Vec<u8> = (0..32).map(|k| (i * 31 + k) as u8 ^ 0x5a).collect();
        b.extend_from_slice(b"company 0123456789abcdef grant 0123456789abcdef family 0123456789");
        b.extend((0..64).map(|k| ((i * 7919 + k * 104_729) % 251) as u8));
        b.extend_from_slice(&i.to_be_bytes());
        b
    }

    #[test]
    fn pieces_never_cross_a_chunk_and_close_when_full() {
        let (_d, rows) = storage();
        let bodies: Vec<Vec<u8>> = (60..200u64).map(|i| vec![i as u8; 40]).collect();
        let w = log_group(&rows, 60, &bodies);
        let starts: Vec<u64> = opened(&w).iter().map(|(f, _)| *f).collect();
        assert_eq!(starts, [60, 64, 128, 192]);
        let (_d, rows) = storage();
        let w = log_group(&rows, 0, &vec![vec![1; PIECE_BYTES / 3]; 10]);
        let sizes: Vec<usize> = opened(&w)
            .iter()
            .map(|(_, p)| layout::piece_entries(p).unwrap().len())
            .collect();
        assert_eq!(sizes, [3, 3, 3, 1], "closed once past {PIECE_BYTES} bytes");
    }

    #[test]
    fn entries_are_compressed_against_their_chunk_and_read_back() {
        let (_d, rows) = storage();
        let all: Vec<Vec<u8>> = (0..300u64).map(access_like).collect();
        // Groups of every size, most of them starting inside a chunk.
        let mut stored = 0usize;
        let mut at = 0usize;
        for size in [1usize, 5, 17, 40, 3, 64, 100, 70] {
            let w = log_group(&rows, at as u64, &all[at..at + size]);
            stored += w
                .iter()
                .filter(|(k, _)| k[0] == tag::ENTRIES)
                .map(|(_, v)| v.as_ref().unwrap().len())
                .sum::<usize>();
            at += size;
        }
        assert_eq!(at, all.len());
        for (i, body) in all.iter().enumerate() {
            assert_eq!(entry(&rows, i as u64).unwrap().as_ref(), Some(body), "{i}");
        }
        assert_eq!(entry(&rows, 300).unwrap(), None);
        for (from, to) in [(0, 300), (63, 65), (100, 101), (130, 299)] {
            let read: Vec<(u64, Vec<u8>)> =
                entries(&rows, from, to).collect::<Result<_, _>>().unwrap();
            let expected: Vec<(u64, Vec<u8>)> =
                (from..to).map(|i| (i, all[i as usize].clone())).collect();
            assert_eq!(read, expected, "{from}..{to}");
        }
        // The shared part of each body goes; the salt, signature and index stay.
        let plain: usize = all.iter().map(|b| b.len() + 4).sum();
        assert!(stored * 10 < plain * 7, "{stored} bytes stored for {plain}");
        // A group alone in its chunk's tail is compressed against the pieces before it: the same
        // bodies again cost a fraction of a first copy.
        let (_d, rows) = storage();
        let first = log_group(&rows, 0, &all[..8]);
        let again = log_group(&rows, 8, &all[..8]);
        let size = |w: &Writes| {
            w.values()
                .map(|v| v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
        };
        assert!(
            size(&again) * 4 < size(&first),
            "{} {}",
            size(&again),
            size(&first)
        );
    }

    #[test]
    fn an_open_chunk_grows_with_its_pieces() {
        let (_d, rows) = storage();
        let all: Vec<Vec<u8>> = (0..150u64).map(access_like).collect();
        let mut chunk = OpenChunk::new(70);
        assert_eq!(chunk.start(), 64);
        let mut at = 0;
        for size in [10usize, 60, 3, 20, 57] {
            log_group(&rows, at as u64, &all[at..at + size]);
            at += size;
            // Opened as far as asked, then further as the chunk's later pieces are written.
            for i in 64..(at as u64).min(128) {
                chunk.extend(&rows, i).unwrap();
                assert_eq!(chunk.body(i).as_ref(), Some(&all[i as usize]), "{i}");
            }
        }
        // Nothing past the chunk, nor before it.
        chunk.extend(&rows, 140).unwrap();
        assert_eq!(chunk.body(140), None);
        assert_eq!(chunk.body(63), None);
    }

    #[test]
    fn a_plain_piece_of_an_earlier_format_reads_and_prefixes_the_next() {
        let (_d, rows) = storage();
        let all: Vec<Vec<u8>> = (0..20u64).map(access_like).collect();
        // Format 9 wrote a piece as its bytes.
        let mut plain = Vec::new();
        for b in &all[..10] {
            layout::push_piece_entry(&mut plain, b);
        }
        rows.write(Writes::from([(
            layout::indexed(tag::ENTRIES, 0),
            Some(plain),
        )]))
        .unwrap();
        let w = log_group(&rows, 10, &all[10..]);
        assert!(w.values().flatten().any(|v| v.starts_with(&ZSTD_MAGIC)));
        for (i, body) in all.iter().enumerate() {
            assert_eq!(entry(&rows, i as u64).unwrap().as_ref(), Some(body), "{i}");
        }
    }

    #[test]
    fn the_tail_a_group_leaves_is_what_the_next_would_read_back() {
        let all: Vec<Vec<u8>> = (0..200u64).map(access_like).collect();
        let (_d, rows) = storage();
        let mut first = Pending::default();
        for (i, b) in (0..).zip(&all[..100]) {
            first.push(i, b.clone());
        }
        let mut w = Writes::new();
        let logged = first.write_into(&rows, None, &mut w).unwrap();
        rows.write(w).unwrap();
        assert_eq!(logged.tail.0, 100);
        assert!(logged.tail.1.len() <= 2 * PREFIX_BYTES);
        let next = |tail: Option<Tail>| {
            let mut p = Pending::default();
            for (i, b) in (100..).zip(&all[100..]) {
                p.push(i, b.clone());
            }
            let mut w = Writes::new();
            let logged = p.write_into(&rows, tail, &mut w).unwrap();
            (w, logged.tail)
        };
        let (given, given_tail) = next(Some(logged.tail.clone()));
        let (read_back, read_tail) = next(None);
        assert_eq!(given, read_back);
        assert_eq!(given_tail, read_tail);
        // A tail of another end is not used.
        let (stale, _) = next(Some((99, b"other bytes".to_vec())));
        assert_eq!(stale, read_back);
    }

    #[test]
    fn a_dictionary_cut_on_zstds_own_magic_is_still_raw_content() {
        // The chunk's last 64 KiB start with the bytes zstd reads as its dictionary format.
        let mut earlier = vec![7u8; 100];
        earlier.extend_from_slice(&[0x37, 0xa4, 0x30, 0xec]);
        earlier.extend((0..PREFIX_BYTES - 4).map(|k| (k % 251) as u8));
        assert!(dictionary(&earlier)[1..].starts_with(&[0x37, 0xa4, 0x30, 0xec]));
        let mut plain = Vec::new();
        for i in 0..10 {
            layout::push_piece_entry(&mut plain, &access_like(i));
        }
        let sealed = seal(&plain, &earlier).unwrap();
        assert!(sealed.starts_with(&ZSTD_MAGIC));
        assert_eq!(open(&sealed, &earlier).unwrap(), plain);
    }

    #[test]
    fn a_damaged_compressed_piece_is_an_error() {
        let all: Vec<Vec<u8>> = (0..10u64).map(access_like).collect();
        let sealed = {
            let mut plain = Vec::new();
            for b in &all {
                layout::push_piece_entry(&mut plain, b);
            }
            seal(&plain, &[]).unwrap()
        };
        assert!(sealed.starts_with(&ZSTD_MAGIC));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        let mut cut = sealed.clone();
        cut.truncate(sealed.len() / 2);
        // A frame that claims more bytes than any piece holds is refused before anything is allocated.
        let mut huge = ZSTD_MAGIC.to_vec();
        huge.extend_from_slice(&[0xe0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        for bad in [flipped, cut, huge, ZSTD_MAGIC.to_vec()] {
            match open(&bad, &[]) {
                Err(StoreError::Format(m)) => assert!(m.contains("does not open"), "{m}"),
                other => panic!("a damaged piece gave {other:?}"),
            }
        }
        // Against another prefix than its own, a piece does not open either.
        let (_d, rows) = storage();
        log_group(&rows, 0, &all[..5]);
        let w = log_group(&rows, 5, &all[5..]);
        let (_, v) = w.iter().find(|(k, _)| k[0] == tag::ENTRIES).unwrap();
        assert!(open(v.as_ref().unwrap(), &[]).is_err());
        assert!(open(v.as_ref().unwrap(), b"other bytes").is_err());
    }
}
