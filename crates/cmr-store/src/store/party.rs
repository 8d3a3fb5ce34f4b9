//! The party index (which entries of a customer's chain concern another party: a company's relationship
//! view) kept in runs, its newest part in memory.
//!
//! Every access is an entry that concerns its company, so the index gains a posting with almost every
//! log entry. A row per posting, at a random place in the key space (keyed by customer), made sled
//! rewrite a page for each: measured, about 1,150 of the 2,200 bytes the data folder grew per log entry
//! under `cmr bench`'s default mix (docs/performance.md). So the newest postings stay in memory
//! ([`PartyTail`], rebuilt from the log at open), and once there are [`StoreConfig::party_tail`] of them
//! the group being written also writes them as runs: one row per (customer, party), keyed by its first
//! index, holding the rest as gaps (`layout::party_run`), and moves the mark (`META_PARTY_FROM`:
//! postings of entries before it are in rows) to the group's end. Runs of one pair never overlap, so the
//! run that holds a given index is the last one that starts at or before it.
//!
//! [`StoreConfig::party_tail`]: crate::StoreConfig::party_tail

use std::collections::BTreeMap;

use super::*;

/// A (customer, party) pair.
type Pair = ([u8; 32], [u8; 32]);

/// The most indices in one run row; a pair with more postings at a flush gets several.
const RUN_MAX: usize = 512;

/// The postings of entries from [`PartyTail::from`] on, in memory.
#[derive(Debug, Default)]
pub(super) struct PartyTail {
    /// Postings of entries before this index are in rows.
    from: u64,
    postings: BTreeMap<Pair, Vec<u64>>,
    count: usize,
}

/// The tail, shared by the sequencer (which adds and flushes) and the readers.
pub(super) type SharedTail = Arc<RwLock<PartyTail>>;

impl PartyTail {
    /// An empty tail whose postings start at `from` (the mark read from the rows).
    pub(super) fn starting_at(from: u64) -> Self {
        PartyTail {
            from,
            ..PartyTail::default()
        }
    }

    /// Where the tail starts.
    pub(super) fn from(&self) -> u64 {
        self.from
    }

    /// Adds the posting of entry `index` of `customer`'s chain for `party` (a replay may add one the
    /// tail already holds: it is held once).
    pub(super) fn add(&mut self, customer: [u8; 32], party: [u8; 32], index: u64) {
        if index < self.from {
            return;
        }
        let list = self.postings.entry((customer, party)).or_default();
        match list.last() {
            Some(&last) if last == index => return,
            Some(&last) if last > index => {
                if let Err(at) = list.binary_search(&index) {
                    list.insert(at, index);
                } else {
                    return;
                }
            }
            _ => list.push(index),
        }
        self.count += 1;
    }

    /// Drops the postings before `mark` (another store sharing the engine wrote them as runs).
    pub(super) fn advance_to(&mut self, mark: u64) {
        if mark <= self.from {
            return;
        }
        self.from = mark;
        let mut count = 0;
        self.postings.retain(|_, list| {
            list.retain(|i| *i >= mark);
            count += list.len();
            !list.is_empty()
        });
        self.count = count;
    }

    /// The postings held for a pair, from `start` and before `end`.
    fn of(&self, pair: &Pair, start: u64, end: u64) -> Vec<u64> {
        self.postings.get(pair).map_or_else(Vec::new, |list| {
            list.iter()
                .copied()
                .filter(|i| (start..end).contains(i))
                .collect()
        })
    }
}

/// The postings a group's writes hold (the index rows its entries staged, `PARTY` keys with an empty
/// value), taken out of them.
pub(super) fn take_postings(writes: &mut Writes) -> Vec<(Pair, u64)> {
    let from = vec![tag::PARTY];
    let to = vec![tag::PARTY + 1];
    let keys: Vec<Vec<u8>> = writes
        .range(from..to)
        .filter(|(_, v)| v.as_deref().is_some_and(<[u8]>::is_empty))
        .map(|(k, _)| k.clone())
        .collect();
    keys.into_iter()
        .filter_map(|k| {
            writes.remove(&k);
            layout::party_of(&k).map(|(c, p, i)| ((c, p), i))
        })
        .collect()
}

/// The sequencer's step at a group's write: the group's postings join the tail after the write; if the
/// tail is then full, the write also carries the whole tail as runs and the mark moves to `size` (the
/// group's end). Returns what to do once the write succeeded.
pub(super) fn stage(tail: &SharedTail, writes: &mut Writes, size: u64, limit: usize) -> AfterWrite {
    let postings = take_postings(writes);
    let held = tail.read().unwrap_or_else(|p| p.into_inner());
    if held.count + postings.len() < limit.max(1) {
        return AfterWrite::Add(postings);
    }
    let mut all: BTreeMap<Pair, Vec<u64>> = held.postings.clone();
    drop(held);
    for (pair, i) in postings {
        all.entry(pair).or_default().push(i);
    }
    for ((customer, party), mut list) in all {
        list.sort_unstable();
        list.dedup();
        for run in list.chunks(RUN_MAX) {
            writes.insert(
                layout::party(&customer, &party, run[0]),
                Some(layout::party_run(run)),
            );
        }
    }
    writes.insert(
        layout::META_PARTY_FROM.to_vec(),
        Some(size.to_be_bytes().to_vec()),
    );
    AfterWrite::Flushed(size)
}

/// What [`stage`] leaves for after the write.
pub(super) enum AfterWrite {
    /// Add these postings to the tail.
    Add(Vec<(Pair, u64)>),
    /// The tail went to rows: it now starts at this index, empty.
    Flushed(u64),
}

impl AfterWrite {
    /// Applies it to the tail, once the write succeeded.
    pub(super) fn apply(self, tail: &SharedTail) {
        let mut tail = tail.write().unwrap_or_else(|p| p.into_inner());
        match self {
            AfterWrite::Add(postings) => {
                for ((customer, party), i) in postings {
                    tail.add(customer, party, i);
                }
            }
            AfterWrite::Flushed(size) => *tail = PartyTail::starting_at(size),
        }
    }
}

/// The mark stored in the rows (0 if none: a store that never flushed).
pub(super) fn stored_mark(rows: &dyn Storage) -> Result<u64, StoreError> {
    meta_u64(rows, layout::META_PARTY_FROM)
}

/// The log indices of the entries of `customer`'s chain that concern `party`, from `start` and before
/// `end`, at most `limit`, and whether more follow: the tail's, merged with the runs from the one that
/// holds `start` on. The tail is read first: a flush writes its runs before it empties the tail, so
/// every posting is seen in one or the other.
pub(super) fn entries(
    rows: &dyn Storage,
    tail: &SharedTail,
    (customer, party): (&[u8; 32], &[u8; 32]),
    (start, end): (u64, u64),
    limit: usize,
) -> Result<(Vec<u64>, bool), StoreError> {
    let pair = (*customer, *party);
    let newest = tail
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .of(&pair, start, end);
    let bad = || StoreError::Format("a party index row".into());
    let lowest = layout::party(customer, party, 0);
    let from = match rows.last(
        &lowest,
        &layout::party(customer, party, start.saturating_add(1)),
    )? {
        Some((k, _)) => k,
        None => layout::party(customer, party, start),
    };
    let mut stored = Vec::new();
    'rows: for kv in rows.range(&from, &layout::party(customer, party, end)) {
        let (k, v) = kv?;
        let (_, _, first) = layout::party_of(&k).ok_or_else(bad)?;
        for i in layout::party_run_indices(first, &v).ok_or_else(bad)? {
            if i >= end {
                break 'rows;
            }
            if i >= start {
                stored.push(i);
                if stored.len() > limit {
                    break 'rows;
                }
            }
        }
    }
    stored.extend(newest);
    stored.sort_unstable();
    stored.dedup();
    let more = stored.len() > limit;
    stored.truncate(limit);
    Ok((stored, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_holds_its_indices_and_an_empty_value_is_one() {
        for run in [
            vec![7u64],
            vec![7, 8],
            vec![0, 1, 300, 70_000, u64::MAX / 2],
        ] {
            let v = layout::party_run(&run);
            assert_eq!(layout::party_run_indices(run[0], &v).unwrap(), run);
        }
        assert!(layout::party_run(&[9]).is_empty(), "a row of format 8");
        // A gap of zero (an index twice) or one past u64 is refused.
        assert_eq!(layout::party_run_indices(1, &[0]), None);
        assert_eq!(layout::party_run_indices(u64::MAX, &[1]), None);
        assert_eq!(layout::party_run_indices(1, &[0x80]), None, "cut varint");
    }

    #[test]
    fn the_tail_holds_each_posting_once_in_order_and_drops_what_runs_hold() {
        let (c, p) = ([1; 32], [2; 32]);
        let mut tail = PartyTail::starting_at(10);
        for i in [12, 11, 15, 12, 9, 14] {
            tail.add(c, p, i);
        }
        assert_eq!(tail.of(&(c, p), 0, 100), [11, 12, 14, 15]);
        assert_eq!(tail.count, 4);
        assert_eq!(tail.of(&(c, p), 12, 15), [12, 14]);
        tail.advance_to(14);
        assert_eq!(tail.of(&(c, p), 0, 100), [14, 15]);
        assert_eq!((tail.from(), tail.count), (14, 2));
    }
}
