//! Bundles: how sled holds the pointers of the log's entries and tree nodes and of the sealed records,
//! a row for each run of 64 pieces' keys instead of a row for each piece (data folder format 11).
//!
//! sled 0.34 keeps memory for every page it holds, cached or not (its page table, each page's list of
//! fragments on disk), splits a leaf page past 16 rows, and rewrites pages as rows are added, so its
//! memory and its files follow the number of rows. A group of the log wrote two rows that stay for ever
//! (its entries piece and its nodes piece; docs/durability.md, "Pointers in bundles"). A bundle holds
//! the pointers of every piece whose key falls in one run of 64 values of the key's last field (the
//! pieces of one chunk: no piece crosses a multiple of 64): about two rows per 64 log entries.
//!
//! This module is pure: the keys (where a piece's pointer lives, which physical rows belong to one
//! chunk, the physical range a logical range needs) and the bundle's bytes. [`super::SledStorage`]
//! reads and writes through it; the store above sees a row per piece, as on any engine.
//!
//! A bundle's key is the key of the chunk's last possible piece followed by [`SUFFIX`]: it sorts after
//! every piece key of its chunk (so rows of format 10 and earlier, a row per piece, still read, in the
//! same range scans) and before the next chunk. Its value is [`VERSION`], then for each piece in key
//! order the low 6 bits of its key's last byte and its pointer ([`POINTER_LEN`] bytes).

use std::collections::BTreeMap;

use crate::StoreError;
use crate::layout::tag;

/// A pointer to a piece in its file (offset, length, CRC-32); see `super::PieceFile`.
pub const POINTER_LEN: usize = 16;
/// A pointer as a bundle holds it.
pub type Pointer = [u8; POINTER_LEN];
/// The byte after a bundle's key.
pub const SUFFIX: u8 = 0xb0;
/// The first byte of a bundle's value.
pub const VERSION: u8 = 1;
/// The pieces of one chunk: the low bits of a piece key's last byte.
const IN_CHUNK: u8 = 0x3f;

/// The length of a piece's key in a table whose pointers are bundled, or `None` for another table.
pub fn width(table: u8) -> Option<usize> {
    match table {
        // tag, first entry (or first leaf) u64
        tag::ENTRIES | tag::NODES => Some(9),
        // tag, family number u64, period u32, first record u64
        tag::RECORDS => Some(21),
        _ => None,
    }
}

/// Whether `key` is a piece's key (in a bundled table, of its width).
pub fn is_piece(key: &[u8]) -> bool {
    key.first()
        .and_then(|&t| width(t))
        .is_some_and(|w| key.len() == w)
}

/// Whether `key` is a bundle's key.
pub fn is_bundle(key: &[u8]) -> bool {
    key.first()
        .and_then(|&t| width(t))
        .is_some_and(|w| key.len() == w + 1 && key[w] == SUFFIX)
}

/// The key of the bundle that holds the pointer of the piece `key`, and the piece's place in it.
pub fn bundle_of(key: &[u8]) -> Option<(Vec<u8>, u8)> {
    if !is_piece(key) {
        return None;
    }
    let mut b = key.to_vec();
    let last = b.len() - 1;
    let place = b[last] & IN_CHUNK;
    b[last] |= IN_CHUNK;
    b.push(SUFFIX);
    Some((b, place))
}

/// The key of the piece at `place` in the bundle `bundle`.
pub fn piece_key(bundle: &[u8], place: u8) -> Vec<u8> {
    let mut k = bundle[..bundle.len() - 1].to_vec();
    let last = k.len() - 1;
    k[last] = (k[last] & !IN_CHUNK) | (place & IN_CHUNK);
    k
}

/// The chunk a physical row belongs to (its first piece key), for a piece's row or a bundle: the rows
/// of one chunk are next to each other in key order, and are read together.
pub fn chunk_of(key: &[u8]) -> Option<Vec<u8>> {
    let w = if is_piece(key) {
        key.len()
    } else if is_bundle(key) {
        key.len() - 1
    } else {
        return None;
    };
    let mut c = key[..w].to_vec();
    c[w - 1] &= !IN_CHUNK;
    Some(c)
}

/// The piece key a bound falls on or just after: its first bytes, if it is at least a piece key's
/// length in a bundled table (a piece's key, a bundle's, or a longer key).
fn piece_part(bound: &[u8]) -> Option<&[u8]> {
    let w = width(*bound.first()?)?;
    bound.get(..w)
}

/// Where a physical scan for the logical range that starts at `from` starts: at the chunk of the
/// piece key `from` falls on (the chunk's bundle may hold pieces from `from` on), or at `from`. A
/// shorter `from` (a table's or a period's start) sorts before every row of the chunks after it.
pub fn scan_from(from: &[u8]) -> Vec<u8> {
    match piece_part(from).and_then(chunk_of) {
        Some(c) => c,
        None => from.to_vec(),
    }
}

/// Where a physical scan for the logical range that ends before `to` ends (exclusive): past the
/// bundle of the chunk of the piece key `to` falls on, which may hold pieces before `to`, unless `to`
/// is the first key of its chunk (then nothing in the chunk is before it); or at `to`. A shorter `to`
/// (a table's or a period's end) already sorts after the bundles of the pieces before it: a bundle
/// shares all but the last byte of its pieces' keys.
pub fn scan_to(to: &[u8]) -> Vec<u8> {
    match piece_part(to).and_then(bundle_of) {
        Some((_, 0)) if is_piece(to) => to.to_vec(),
        Some((mut b, _)) => {
            b.push(0);
            b
        }
        None => to.to_vec(),
    }
}

/// The pointers a bundle holds, by place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub pieces: BTreeMap<u8, Pointer>,
}

impl Bundle {
    /// Reads a bundle's value; `key` names it in an error.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<Self, StoreError> {
        let damaged = || {
            StoreError::Format(format!(
                "the bundle of pointers at {key:02x?} is damaged: the stored data is damaged"
            ))
        };
        let Some((&VERSION, mut rest)) = value.split_first() else {
            return Err(damaged());
        };
        let mut pieces = BTreeMap::new();
        while let Some((&place, after)) = rest.split_first() {
            let (pointer, after) = after
                .split_first_chunk::<POINTER_LEN>()
                .ok_or_else(damaged)?;
            // In key order, each place once, within the chunk.
            if place > IN_CHUNK || pieces.last_key_value().is_some_and(|(&p, _)| p >= place) {
                return Err(damaged());
            }
            pieces.insert(place, *pointer);
            rest = after;
        }
        if pieces.is_empty() {
            return Err(damaged());
        }
        Ok(Self { pieces })
    }

    /// The bundle's value.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.pieces.len() * (1 + POINTER_LEN));
        v.push(VERSION);
        for (&place, pointer) in &self.pieces {
            v.push(place);
            v.extend_from_slice(pointer);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(i: u64) -> Vec<u8> {
        crate::layout::key(tag::ENTRIES, &[&i.to_be_bytes()])
    }

    #[test]
    fn a_bundle_sorts_after_its_chunks_pieces_and_before_the_next_chunk() {
        for i in [0u64, 1, 63, 64, 65, 127, 128, 4095, u64::MAX - 63, u64::MAX] {
            let (b, place) = bundle_of(&entries(i)).unwrap();
            assert!(is_bundle(&b) && !is_piece(&b));
            assert_eq!(u64::from(place), i % 64);
            assert_eq!(piece_key(&b, place), entries(i));
            let start = i - i % 64;
            assert!(entries(start + 63) < b);
            assert_eq!(chunk_of(&b).unwrap(), entries(start));
            assert_eq!(chunk_of(&entries(i)).unwrap(), entries(start));
            if let Some(next) = start.checked_add(64) {
                assert!(b < entries(next));
            }
            assert!(scan_from(&entries(i)) <= entries(start));
            if i % 64 == 0 {
                // Nothing of the chunk is before its first key: the scan stops there.
                assert_eq!(scan_to(&entries(i)), entries(i));
            } else {
                assert!(scan_to(&entries(i)) > b);
            }
            // A bound past a piece key (a bundle's own key, or longer) still covers the bundle.
            let mut longer = entries(i);
            longer.push(0);
            assert!(scan_to(&longer) > b && scan_to(&b) > b);
            assert!(scan_from(&longer) <= entries(start) && scan_from(&b) <= entries(start));
        }
        // A record piece's key is 21 bytes; other tables are not bundled.
        let r = crate::layout::records_piece(7, cmr_core::family::Period(3), 130);
        let (b, place) = bundle_of(&r).unwrap();
        assert_eq!((place, piece_key(&b, place)), (2, r.clone()));
        assert!(bundle_of(&[tag::IDEMPOTENCY; 33]).is_none());
        assert!(
            bundle_of(&r[..20]).is_none(),
            "a period's prefix is not a piece"
        );
        // A period's end sorts after the bundles of its pieces.
        let end = crate::layout::key(tag::RECORDS, &[&7u64.to_be_bytes(), &4u32.to_be_bytes()]);
        assert!(b < end && scan_to(&end) == end);
    }

    #[test]
    fn a_bundle_reads_back_and_damage_is_refused() {
        let mut bundle = Bundle::default();
        for place in [0u8, 5, 63] {
            bundle.pieces.insert(place, [place; POINTER_LEN]);
        }
        let v = bundle.encode();
        assert_eq!(v.len(), 1 + 3 * 17);
        assert_eq!(Bundle::decode(b"k", &v).unwrap(), bundle);
        let damaged = |v: &[u8]| matches!(Bundle::decode(b"k", v), Err(StoreError::Format(_)));
        assert!(damaged(&[]), "empty");
        assert!(damaged(&[VERSION]), "no piece");
        assert!(damaged(&[2, 0]), "another version");
        assert!(damaged(&v[..v.len() - 1]), "cut short");
        let mut swapped = v.clone();
        swapped[1] = 9; // place 9 before place 5
        assert!(damaged(&swapped), "out of order");
        let mut outside = v.clone();
        outside[35] = 64;
        assert!(damaged(&outside), "outside the chunk");
    }
}
