//! The key layout in sled. Every key starts with a one-byte table tag, followed by fixed-width binary
//! fields, so that ids never need separators or escaping, one family (or a range of its periods) is one
//! range scan, and no id can traverse into another table. Ids are parsed into fixed-size arrays before
//! they become keys, so an overlong or malformed id never reaches sled.

use cmr_core::family::Period;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 11;
/// Earlier formats whose folders this build opens by adding the index rows they lack (see
/// `Store::open`): 1 had no party and pending indexes, 2 no vaults-of-a-party index, 3 and 4 no feed,
/// 1 to 6 no family ledger pieces (`LEDGER`: the ledgers were rebuilt in memory).
pub const FORMATS_WITHOUT_INDEXES: [u32; 6] = [1, 2, 3, 4, 5, 6];
/// Earlier formats that kept a row per entry, per leaf and per tree node (`BODY`, `LEAF`, `NODE`):
/// the open moves them into pieces (`ENTRIES`, `NODES`) first. Format 3 also stored the level-0
/// nodes; the move drops them.
pub const FORMATS_WITHOUT_PIECES: [u32; 5] = [1, 2, 3, 4, 5];
/// Earlier formats whose engine kept some pieces its own way (format 7 kept the records pieces in
/// sled's rows, later ones in the file beside it): [`crate::Storage::upgrade`] moves them.
pub const FORMATS_BEFORE_ENGINE_PIECES: [u32; 7] = [1, 2, 3, 4, 5, 6, 7];
/// Earlier formats that wrote a party index row for every posting and have no party mark: their
/// open sets the mark to the log's size (every posting is in rows), and the rows read as runs of one.
pub const FORMATS_WITHOUT_PARTY_RUNS: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
/// Earlier formats in which, on sled, every piece had a row of its own (the pointers of the entries
/// and records pieces, and the tree nodes pieces themselves): those rows read as they are, and the
/// pieces written from now on have their pointers in bundles, a row for 64 pieces' keys, with the
/// tree nodes in a file beside sled's (`sled_storage`). Formats up to 9 also stored an entries piece as
/// its bytes, not compressed: such a piece reads as it is (and is the prefix of a compressed one after
/// it). Their open only writes the new format; a build of one of them refuses a folder of this format,
/// whose bundles (and compressed pieces) it cannot read.
pub const FORMATS_WITH_A_ROW_PER_PIECE: [u32; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

/// Table tags.
pub mod tag {
    /// `meta/…`: format version, last server time.
    pub const META: u8 = 0x01;
    /// Formats up to 5: log leaf commitments by index (moved into `ENTRIES` at open).
    pub const LEAF: u8 = 0x02;
    /// Formats up to 5: log tree nodes by (level, index) (moved into `NODES` at open).
    pub const NODE: u8 = 0x03;
    /// An entry's salted body (salt || body) by index: the rows of a snapshot file, and of a data
    /// folder up to format 5 (moved into `ENTRIES` at open).
    pub const BODY: u8 = 0x04;
    /// Pieces of consecutive entries by the first one's index: each a 4-byte length and the salted
    /// body, in order. No piece crosses a multiple of 64 entries (`store::pieces`).
    pub const ENTRIES: u8 = 0x11;
    /// Pieces of tree nodes above level 0, by the first leaf of the entries whose appends completed
    /// them: 32-byte hashes in the order the appends completed them, lowest level first.
    pub const NODES: u8 = 0x12;
    /// A record by (family number, period, index in period); the value is the log index (u64) of the
    /// family-head entry whose signed batch wrote the record, then the sealed record: the rows of a
    /// snapshot file, and of a data folder up to format 6 (moved into `RECORDS` at open). Family
    /// numbers follow the order in which directories declared the families, so a replay gives the
    /// same ones.
    pub const RECORD: u8 = 0x05;
    /// Pieces of consecutive records of a period, by (family number, period, first index): each a
    /// 4-byte length and what a `RECORD` row's value holds. No piece crosses a multiple of 64 records,
    /// and one is closed past 16 KiB (`store::records`).
    pub const RECORDS: u8 = 0x15;
    /// Each period's tree as its perfect subtrees, by (family number, period): count u64, then (leaves
    /// u64, root) for each subtree, largest first; rewritten by each batch that adds to the period. An
    /// open takes the family ledgers from these instead of hashing every record again.
    pub const FRONTIER: u8 = 0x16;
    /// Idempotency: (body digest, log index) by client operation id.
    pub const IDEMPOTENCY: u8 = 0x09;
    /// The latest directory of a customer.
    pub const DIRECTORY: u8 = 0x0a;
    /// The log index of a customer's latest entry.
    pub const CUSTOMER_HEAD: u8 = 0x0b;
    /// A customer's key backup: version (u64), then the client-sealed bytes.
    pub const BACKUP: u8 = 0x0c;
    /// The entries of a customer's chain that concern another party, in runs by (customer, party,
    /// first log index); the value holds the rest of the run (`party_run`; empty: a run of one). A
    /// company's relationship view is one range scan, and the newest postings are in memory
    /// (`store::party`).
    pub const PARTY: u8 = 0x0d;
    /// The requests waiting for a customer's answer, by (customer, company, request id); the value is
    /// the request's log index. The customer's pending listing is one range scan.
    pub const PENDING: u8 = 0x0e;
    /// The vaults whose chains concern a party, by (party, customer); empty values. A company finds the
    /// customers that granted it something (with or without its request) in one range scan.
    pub const VAULTS_OF: u8 = 0x0f;
    /// The consent statements that concern a party, across every vault, by (party, log index); the
    /// value is the customer. A company learns what changed for it (a grant, a revocation, a denial, a
    /// key delivery, a dispute) in one range scan from where it last looked. Accesses are not in it.
    pub const FEED: u8 = 0x10;
    /// Pieces of a family ledger, by (family number, period, first record): for consecutive records
    /// of the period, each one's id and leaf hash, then the tree nodes above level 0 their appends
    /// completed. No piece crosses a multiple of 64 records (`store::records`).
    pub const LEDGER: u8 = 0x13;
}

/// The key of a statement at `index` that concerns `party`, in its feed.
pub fn feed(party: &[u8; 32], index: u64) -> Vec<u8> {
    key(tag::FEED, &[party, &index.to_be_bytes()])
}

/// The key naming `customer` as a vault whose chain concerns `party`.
pub fn vault_of(party: &[u8; 32], customer: &[u8; 32]) -> Vec<u8> {
    key(tag::VAULTS_OF, &[party, customer])
}

/// The key of a chain entry that concerns `party`: the first of a run (`store::party`).
pub fn party(customer: &[u8; 32], party: &[u8; 32], index: u64) -> Vec<u8> {
    key(tag::PARTY, &[customer, party, &index.to_be_bytes()])
}

/// The customer, party and first index of a party index key.
pub fn party_of(key: &[u8]) -> Option<([u8; 32], [u8; 32], u64)> {
    if key.len() != 73 || key[0] != tag::PARTY {
        return None;
    }
    Some((
        key[1..33].try_into().ok()?,
        key[33..65].try_into().ok()?,
        u64::from_be_bytes(key[65..73].try_into().ok()?),
    ))
}

/// The value of a party index row holding the increasing indices `run` (its key holds the first):
/// each later index as its gap from the one before, in LEB128. A run of one is an empty value, as
/// every row was up to format 8.
pub fn party_run(run: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in run.windows(2) {
        let mut gap = w[1] - w[0];
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

/// The indices of a party index row whose key names `first`; `None` if the value is malformed (a gap
/// of zero, a cut or overlong number, an index past u64).
pub fn party_run_indices(first: u64, value: &[u8]) -> Option<Vec<u64>> {
    let mut out = vec![first];
    let (mut gap, mut shift) = (0u64, 0u32);
    for &b in value {
        if shift > 63 || (shift == 63 && b & 0x7e != 0) {
            return None;
        }
        gap |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 != 0 {
            shift += 7;
            continue;
        }
        let last = *out.last()?;
        if gap == 0 {
            return None;
        }
        out.push(last.checked_add(gap)?);
        (gap, shift) = (0, 0);
    }
    (shift == 0).then_some(out)
}

/// The key of a request waiting for `customer`'s answer.
pub fn pending(customer: &[u8; 32], company: &[u8; 32], request: &[u8; 32]) -> Vec<u8> {
    key(tag::PENDING, &[customer, company, request])
}

/// `meta` keys.
pub const META_FORMAT: &[u8] = &[tag::META, b'f'];
/// The tree size.
pub const META_SIZE: &[u8] = &[tag::META, b's'];
/// The latest signed checkpoint.
pub const META_CHECKPOINT: &[u8] = &[tag::META, b'c'];
/// The verifier key of the log key that signs the checkpoints (written by the first store to open).
pub const META_LOG_KEY: &[u8] = &[tag::META, b'k'];
/// The note, signed with the log key, that says the store was restored from a snapshot and to which
/// log size (written by a restore).
pub const META_RESTORED: &[u8] = &[tag::META, b'r'];
/// Where the party index's postings in memory start: those of entries before it are in rows (u64;
/// none: 0).
pub const META_PARTY_FROM: &[u8] = &[tag::META, b'p'];

/// A key of `tag` followed by `parts`.
pub fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// The key of log index `i` in table `tag`.
pub fn indexed(tag: u8, i: u64) -> Vec<u8> {
    key(tag, &[&i.to_be_bytes()])
}

/// The key of a tree node.
pub fn node(level: u8, index: u64) -> Vec<u8> {
    key(tag::NODE, &[&[level], &index.to_be_bytes()])
}

/// Adds a salted body to the value of an entries piece (`tag::ENTRIES`).
pub fn push_piece_entry(piece: &mut Vec<u8>, salted: &[u8]) {
    piece.extend_from_slice(
        &u32::try_from(salted.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    piece.extend_from_slice(salted);
}

/// The salted bodies in the value of an entries piece (`tag::ENTRIES`), in order.
pub fn piece_entries(value: &[u8]) -> Result<Vec<&[u8]>, crate::StoreError> {
    // A salted body is at least its 32-byte salt.
    split_piece(value, 32, "entries")
}

/// The salted bodies held by entries pieces (`tag::ENTRIES` rows, in key order, each chunk from its
/// start), with their log indices: each piece opened against its chunk's earlier pieces (a compressed
/// piece does not read alone; see `store/pieces.rs`).
pub fn entries_of_pieces(
    pieces: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<Vec<(u64, Vec<u8>)>, crate::StoreError> {
    let mut chunk = crate::store::pieces::ChunkReader::default();
    let mut out = Vec::new();
    for (k, v) in pieces {
        let (first, opened) = chunk.open(&k, &v)?;
        out.extend((first..).zip(piece_entries(opened)?.into_iter().map(<[u8]>::to_vec)));
    }
    Ok(out)
}

/// The records in the value of a records piece (`tag::RECORDS`), in order: each what a `RECORD`
/// row's value holds (the batch's log index, then the sealed record).
pub fn piece_records(value: &[u8]) -> Result<Vec<&[u8]>, crate::StoreError> {
    split_piece(value, 9, "records")
}

/// The parts of a piece: each a 4-byte length and at least `min` bytes.
fn split_piece<'a>(
    value: &'a [u8],
    min: usize,
    what: &str,
) -> Result<Vec<&'a [u8]>, crate::StoreError> {
    Ok(piece_spans(value, min, what)?
        .into_iter()
        .map(|r| &value[r])
        .collect())
}

/// Where the parts of a piece are in it: each a 4-byte length and at least `min` bytes.
pub(crate) fn piece_spans(
    value: &[u8],
    min: usize,
    what: &str,
) -> Result<Vec<std::ops::Range<usize>>, crate::StoreError> {
    let bad = || crate::StoreError::Format(format!("a stored piece of {what} does not decode"));
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < value.len() {
        let len = value
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(bad)?;
        let len = usize::try_from(len).map_err(|_| bad())?;
        let start = at + 4;
        if value.len() - start < len || len < min {
            return Err(bad());
        }
        out.push(start..start + len);
        at = start + len;
    }
    Ok(out)
}

/// The key of a records piece that starts at record `first` of `period`.
pub fn records_piece(family_number: u64, period: Period, first: u64) -> Vec<u8> {
    key(
        tag::RECORDS,
        &[
            &family_number.to_be_bytes(),
            &period.0.to_be_bytes(),
            &first.to_be_bytes(),
        ],
    )
}

/// A piece key's (family number, period, first index), for `RECORDS` and `LEDGER` keys alike.
pub fn family_piece_of(key: &[u8]) -> Option<(u64, Period, u64)> {
    if key.len() != 21 {
        return None;
    }
    Some((
        u64::from_be_bytes(key[1..9].try_into().ok()?),
        Period(u32::from_be_bytes(key[9..13].try_into().ok()?)),
        u64::from_be_bytes(key[13..21].try_into().ok()?),
    ))
}

/// The key of a record: the family's number, the period, and the index within the period.
pub fn record(family_number: u64, period: Period, n: u64) -> Vec<u8> {
    key(
        tag::RECORD,
        &[
            &family_number.to_be_bytes(),
            &period.0.to_be_bytes(),
            &n.to_be_bytes(),
        ],
    )
}

/// The prefixes of every row a family's records make: the records' and the ledger's pieces (and the
/// records' rows of an earlier format). An erasure deletes them all.
pub fn family_prefixes(family_number: u64) -> [Vec<u8>; 4] {
    let n = family_number.to_be_bytes();
    [
        key(tag::RECORDS, &[&n]),
        key(tag::LEDGER, &[&n]),
        key(tag::FRONTIER, &[&n]),
        key(tag::RECORD, &[&n]),
    ]
}

/// The key of a period's saved tree.
pub fn frontier(family_number: u64, period: Period) -> Vec<u8> {
    key(
        tag::FRONTIER,
        &[&family_number.to_be_bytes(), &period.0.to_be_bytes()],
    )
}

/// The key of a family ledger's piece that starts at record `first` of `period`.
pub fn ledger_piece(family_number: u64, period: Period, first: u64) -> Vec<u8> {
    key(
        tag::LEDGER,
        &[
            &family_number.to_be_bytes(),
            &period.0.to_be_bytes(),
            &first.to_be_bytes(),
        ],
    )
}

/// A table's name, by its tag (for reports).
pub fn table_name(t: u8) -> &'static str {
    match t {
        tag::META => "meta",
        tag::LEAF => "leaves (format 5)",
        tag::NODE => "tree nodes (format 5)",
        tag::BODY => "entry bodies (format 5)",
        tag::ENTRIES => "entries",
        tag::NODES => "tree nodes",
        tag::RECORD => "records (format 6)",
        tag::RECORDS => "records",
        tag::IDEMPOTENCY => "idempotency",
        tag::DIRECTORY => "directories",
        tag::CUSTOMER_HEAD => "chain heads",
        tag::BACKUP => "key backups",
        tag::PARTY => "party index",
        tag::PENDING => "pending requests",
        tag::VAULTS_OF => "vaults of a party",
        tag::FEED => "party feeds",
        tag::LEDGER => "family ledgers",
        tag::FRONTIER => "family ledger trees",
        _ => "other",
    }
}

/// What one table holds: rows, and the bytes of their keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSize {
    /// The table's tag.
    pub tag: u8,
    /// Rows.
    pub rows: u64,
    /// Bytes of keys.
    pub key_bytes: u64,
    /// Bytes of values.
    pub value_bytes: u64,
}

/// Counts every table's rows and bytes (a full scan: for reports, not for serving).
pub fn table_sizes(rows: &dyn crate::Storage) -> Result<Vec<TableSize>, crate::StoreError> {
    let mut out: Vec<TableSize> = Vec::new();
    for kv in rows.range(&[0], &[0xff]) {
        let (k, v) = kv?;
        let t = k.first().copied().unwrap_or(0);
        let i = match out.iter().position(|s| s.tag == t) {
            Some(i) => i,
            None => {
                out.push(TableSize {
                    tag: t,
                    ..TableSize::default()
                });
                out.len() - 1
            }
        };
        out[i].rows += 1;
        out[i].key_bytes += k.len() as u64;
        out[i].value_bytes += v.len() as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_round_trips_and_a_damaged_one_is_an_error_not_a_panic() {
        let mut piece = Vec::new();
        push_piece_entry(&mut piece, &[7; 40]);
        push_piece_entry(&mut piece, &[8; 32]);
        assert_eq!(piece_entries(&piece).unwrap(), [&[7u8; 40][..], &[8; 32]]);
        for bad in [
            &[0u8, 0, 0][..],
            &[0, 0, 0, 40, 1],
            &[0, 0, 0, 1, 7],
            &piece[..70],
        ] {
            assert!(piece_entries(bad).is_err(), "{bad:?}");
        }
    }
}
