//! Signed batches, family heads and provably complete reads (design note 0002, "Batches and heads").
//!
//! Owns:
//! - [`Batch`]: the statement an author signs for the records it writes;
//! - [`FamilyState`]: a family's head and each period's tree as its perfect subtrees, and the rules a
//!   batch must meet to be applied (previous head current, ids new, periods allowed); what grows with the
//!   records (leaves, tree nodes, ids) it reads through a [`RecordIndex`], which a store keeps in its rows;
//! - [`FamilyLedger`]: the same state with its records' index in memory, and each batch's additions, so it
//!   also proves reads against earlier heads (a client's export, tests);
//! - [`ReadProof`] and [`verify_read`]: what a reader receives and checks, so that a dropped, injected,
//!   reordered, moved or stale record is detected.
//!
//! It is pure: the store persists what the ledger holds, and decides who may write (grants, epochs).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;

use thiserror::Error;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::epoch::Chain;
use crate::family::{FamilyId, Period, Scope};
use crate::hash::{Digest, tagged_hash};
use crate::identity::{DeviceId, IdentityId};
use crate::keys::{BadSignature, SignedEnvelope, SigningKey, VerifyingKey};
use crate::merkle::{self, Hash, RangeProofError};
use crate::record::{RecordId, SealedRecord};

/// The most records one batch may carry.
pub const MAX_BATCH_RECORDS: usize = 4096;

/// One record named by a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    /// The record id.
    pub id: RecordId,
    /// Its period.
    pub period: Period,
    /// Its digest.
    pub digest: Digest,
}

/// A batch statement: an author's signed list of the records it writes to one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The vault.
    pub customer: IdentityId,
    /// The family.
    pub family: FamilyId,
    /// The epoch the records are sealed to.
    pub epoch: u64,
    /// The identity that writes.
    pub author: IdentityId,
    /// The device that signs.
    pub device: DeviceId,
    /// The head this batch extends.
    pub prev_head: Digest,
    /// The records, in the order they are appended.
    pub entries: Vec<BatchEntry>,
}

impl Batch {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Kind::Batch, 180 + self.entries.len() * 52);
        w.array(&self.customer.0)
            .array(&self.family.0)
            .u64(self.epoch)
            .array(&self.author.0)
            .array(&self.device.0)
            .array(&self.prev_head.0)
            .u32(self.entries.len() as u32);
        for e in &self.entries {
            w.array(&e.id.0).u32(e.period.0).array(&e.digest.0);
        }
        w.finish()
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, Kind::Batch)?;
        let customer = IdentityId(r.array()?);
        let family = FamilyId(r.array()?);
        let epoch = r.u64()?;
        let author = IdentityId(r.array()?);
        let device = DeviceId(r.array()?);
        let prev_head = Digest(r.array()?);
        let n = r.u32()? as usize;
        if n == 0 || n > MAX_BATCH_RECORDS {
            return Err(DecodeError::Invalid {
                field: "entries",
                reason: "a batch holds 1 to 4096 records",
            });
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(BatchEntry {
                id: RecordId(r.array()?),
                period: Period(r.u32()?),
                digest: Digest(r.array()?),
            });
        }
        r.finish()?;
        Ok(Self {
            customer,
            family,
            epoch,
            author,
            device,
            prev_head,
            entries,
        })
    }

    /// The batch for `records`, all of one family and epoch by one author, extending `prev_head`.
    pub fn for_records(
        device: DeviceId,
        prev_head: Digest,
        records: &[SealedRecord],
    ) -> Result<Self, BatchError> {
        let first = records.first().ok_or(BatchError::Empty)?.header();
        let entries = records
            .iter()
            .map(|r| {
                let h = r.header();
                if (h.customer, h.family, h.epoch, h.author)
                    != (first.customer, first.family, first.epoch, first.author)
                {
                    return Err(BatchError::RecordMismatch(h.id));
                }
                Ok(BatchEntry {
                    id: h.id,
                    period: h.period,
                    digest: r.digest(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            customer: first.customer,
            family: first.family,
            epoch: first.epoch,
            author: first.author,
            device,
            prev_head,
            entries,
        })
    }
}

/// A batch with its author's signature over the exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBatch {
    envelope: SignedEnvelope,
    batch: Batch,
}

impl SignedBatch {
    /// Signs `batch` with the author's device key.
    pub fn sign(batch: Batch, device_key: &SigningKey) -> Self {
        Self {
            envelope: SignedEnvelope::sign(batch.encode(), device_key),
            batch,
        }
    }

    /// Parses the wire form (not verified).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let batch = Batch::decode(&envelope.body)?;
        Ok(Self { envelope, batch })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode()
    }

    /// The batch.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// The signed envelope, for batch verification.
    pub fn envelope(&self) -> &SignedEnvelope {
        &self.envelope
    }

    /// `H("batch", body)`.
    pub fn digest(&self) -> Digest {
        tagged_hash("batch", &self.envelope.body)
    }

    /// Verifies the signature with the device's key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), BadSignature> {
        self.envelope.verify(key)
    }
}

/// Why a batch cannot be applied, or a read does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    /// A batch with no records.
    #[error("a batch must name at least one record")]
    Empty,
    /// The batch's previous head is not the family's current head (409 `stale-head`).
    #[error("stale head: the batch extends {claimed}, the family is at {current}")]
    StaleHead {
        /// The head the batch names.
        claimed: Digest,
        /// The family's head.
        current: Digest,
    },
    /// The batch is for another customer or family than the ledger's.
    #[error("batch is for another customer or family")]
    WrongFamily,
    /// A record id already exists in the family, or twice in the batch.
    #[error("record {0:?} already exists")]
    DuplicateRecord(RecordId),
    /// A period this family cannot hold (profile families hold only the origin period).
    #[error("period {0} is not allowed in this family")]
    BadPeriod(Period),
    /// A record does not match its batch entry (customer, family, epoch, author, id, period or digest).
    #[error("record {0:?} does not match the batch")]
    RecordMismatch(RecordId),
    /// The author's chain does not fit: a company writes with its append chain, the customer with the read
    /// chain.
    #[error("record {0:?} is sealed under another author's chain")]
    WrongChain(RecordId),
    /// The read does not match the head.
    #[error("the read does not match the named head")]
    HeadMismatch,
    /// A range proof failed.
    #[error("completeness proof failed: {0}")]
    Proof(#[from] RangeProofError),
    /// The period leaves do not cover the requested range.
    #[error("the periods served do not cover the requested range")]
    IncompleteRange,
    /// A record is not named by any batch served.
    #[error("record {0:?} is not named by a signed batch")]
    Unbatched(RecordId),
    /// A batch signature is missing or wrong.
    #[error("bad signature on batch by device {0:?}")]
    BadBatchSignature(DeviceId),
}

/// The leaf for one period in a head's tree of periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodLeaf {
    /// The period.
    pub period: Period,
    /// How many records it holds.
    pub count: u64,
    /// The RFC 6962 root over their digests, in append order.
    pub root: Hash,
}

impl PeriodLeaf {
    /// `leaf_hash(period u32 || count u64 || root)`.
    pub fn hash(&self) -> Hash {
        let mut data = [0u8; 44];
        data[..4].copy_from_slice(&self.period.0.to_be_bytes());
        data[4..12].copy_from_slice(&self.count.to_be_bytes());
        data[12..].copy_from_slice(&self.root);
        merkle::leaf_hash(&data)
    }
}

/// What a head commits to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The vault.
    pub customer: IdentityId,
    /// The family.
    pub family: FamilyId,
    /// Batches applied so far.
    pub batches: u64,
    /// Records so far.
    pub records: u64,
    /// Periods holding records.
    pub periods: u64,
    /// The RFC 6962 root over the period leaves, in period order.
    pub periods_root: Hash,
}

impl Head {
    /// `H("family-head", customer || family || batches || records || periods || periods root)`.
    pub fn digest(&self) -> Digest {
        let mut data = Vec::with_capacity(32 * 3 + 24);
        data.extend_from_slice(&self.customer.0);
        data.extend_from_slice(&self.family.0);
        data.extend_from_slice(&self.batches.to_be_bytes());
        data.extend_from_slice(&self.records.to_be_bytes());
        data.extend_from_slice(&self.periods.to_be_bytes());
        data.extend_from_slice(&self.periods_root);
        tagged_hash("family-head", &data)
    }

    /// The head of a family with no records.
    pub fn empty(customer: IdentityId, family: FamilyId) -> Self {
        Self {
            customer,
            family,
            batches: 0,
            records: 0,
            periods: 0,
            periods_root: merkle::empty_root(),
        }
    }
}

/// Where the part of a family ledger that grows with its records lives: each period's tree (the record
/// leaves and the perfect subtrees above them) and the ids in use. [`FamilyState`] keeps the rest (each
/// period's tree as its perfect subtrees, the head), so a store keeps this in its rows, read through
/// its cache, and a client in memory ([`FamilyLedger`]). The errors are the storage's own.
pub trait RecordIndex {
    /// The storage's error.
    type Error;
    /// The root of `period`'s perfect subtree of 2^`level` records from record `index`·2^`level`; at
    /// level 0, the record's leaf hash (`merkle::leaf_hash` of its digest).
    fn node(&self, period: Period, level: u8, index: u64) -> Result<Hash, Self::Error>;
    /// The ids of `period`'s records `start..end`, in order.
    fn ids(&self, period: Period, start: u64, end: u64) -> Result<Vec<RecordId>, Self::Error>;
    /// Whether the family holds a record with this id (as [`IdSet`] answers it).
    fn contains(&self, id: &RecordId) -> Result<bool, Self::Error>;
}

/// What applying a batch adds to the [`RecordIndex`], for its owner to store with the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new head.
    pub head: Head,
    /// Where each record of the batch went, in batch order: its period and its index in the period.
    pub placements: Vec<(Period, u64)>,
    /// The perfect subtrees of two records or more that the batch completed, as (period, level, index,
    /// root): see [`RecordIndex::node`].
    pub nodes: Vec<(Period, u8, u64, Hash)>,
}

fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

/// The part of a family ledger that does not grow with its records: each period's tree as its perfect
/// subtrees (O(log n) hashes, [`merkle::CompactRange`]), and the current head with its period leaves.
/// With a [`RecordIndex`] it checks and applies batches and proves reads against the current head: the
/// one set of rules for the store (over its rows) and for [`FamilyLedger`] (in memory).
#[derive(Debug, Clone)]
pub struct FamilyState {
    customer: IdentityId,
    family: FamilyId,
    scope: Scope,
    batches: u64,
    periods: BTreeMap<Period, merkle::CompactRange>,
    /// The current head's period leaves, in period order, kept up to date by `advance`: reads against
    /// the current head then cost nothing per period.
    current: Vec<PeriodLeaf>,
    current_head: Head,
    /// Records counted by [`FamilyState::skip`] and not yet in their periods' trees, by period.
    unhashed: BTreeMap<Period, u64>,
}

impl FamilyState {
    /// An empty family.
    pub fn new(customer: IdentityId, family: FamilyId, scope: Scope) -> Self {
        Self {
            customer,
            family,
            scope,
            batches: 0,
            periods: BTreeMap::new(),
            current: Vec::new(),
            current_head: Head::empty(customer, family),
            unhashed: BTreeMap::new(),
        }
    }

    /// The family's scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The current head.
    pub fn head(&self) -> Head {
        debug_assert!(self.unhashed.is_empty(), "a head asked for before catch_up");
        self.current_head
    }

    /// How many records `period` holds now.
    pub fn period_count(&self, period: Period) -> u64 {
        self.periods
            .get(&period)
            .map_or(0, merkle::CompactRange::size)
            + self.unhashed.get(&period).copied().unwrap_or(0)
    }

    /// Where each record of `batch` goes when it is applied, in batch order: its period and its index in
    /// the period.
    pub fn placements(&self, batch: &Batch) -> Vec<(Period, u64)> {
        let mut next: BTreeMap<Period, u64> = BTreeMap::new();
        batch
            .entries
            .iter()
            .map(|e| {
                let n = next
                    .entry(e.period)
                    .or_insert_with(|| self.period_count(e.period));
                let at = *n;
                *n += 1;
                (e.period, at)
            })
            .collect()
    }

    /// Checks `batch` and the records it names, without applying them; `index` says which ids the family
    /// already holds. The signature and the author's right to write are the caller's to check. The outer
    /// error is the index's.
    pub fn check<R: RecordIndex>(
        &self,
        index: &R,
        batch: &Batch,
        records: &[SealedRecord],
    ) -> Result<Result<(), BatchError>, R::Error> {
        self.check_with(batch, records, |id| index.contains(id))
    }

    /// The checks of a batch the log already holds (a replay): all of [`FamilyState::check`] but
    /// whether its ids were new, which was settled when it was logged.
    pub fn check_logged(&self, batch: &Batch, records: &[SealedRecord]) -> Result<(), BatchError> {
        infallible(self.check_with(batch, records, |_| Ok(false)))
    }

    fn check_with<E>(
        &self,
        batch: &Batch,
        records: &[SealedRecord],
        mut held: impl FnMut(&RecordId) -> Result<bool, E>,
    ) -> Result<Result<(), BatchError>, E> {
        if batch.customer != self.customer || batch.family != self.family {
            return Ok(Err(BatchError::WrongFamily));
        }
        let current = self.head().digest();
        if batch.prev_head != current {
            return Ok(Err(BatchError::StaleHead {
                claimed: batch.prev_head,
                current,
            }));
        }
        if batch.entries.is_empty() {
            return Ok(Err(BatchError::Empty));
        }
        if records.len() != batch.entries.len() {
            return Ok(Err(BatchError::RecordMismatch(batch.entries[0].id)));
        }
        let mut seen = HashSet::with_capacity(batch.entries.len());
        for (e, r) in batch.entries.iter().zip(records) {
            if !seen.insert(e.id) || held(&e.id)? {
                return Ok(Err(BatchError::DuplicateRecord(e.id)));
            }
            let periodic_ok = if self.scope.is_periodic() {
                e.period >= Period::ORIGIN
            } else {
                e.period == Period::ORIGIN
            };
            if !periodic_ok {
                return Ok(Err(BatchError::BadPeriod(e.period)));
            }
            let h = r.header();
            let matches = h.customer == batch.customer
                && h.family == batch.family
                && h.epoch == batch.epoch
                && h.author == batch.author
                && h.id == e.id
                && h.period == e.period
                && r.digest() == e.digest;
            if !matches {
                return Ok(Err(BatchError::RecordMismatch(e.id)));
            }
            let chain_ok = match h.chain {
                Chain::Read => batch.author == batch.customer,
                Chain::Append(c) => c == batch.author,
            };
            if !chain_ok {
                return Ok(Err(BatchError::WrongChain(e.id)));
            }
        }
        Ok(Ok(()))
    }

    /// Checks and applies `batch`: what it adds to the index, for the caller to store. A refusal
    /// changes nothing. The outer error is the index's.
    pub fn apply<R: RecordIndex>(
        &mut self,
        index: &R,
        batch: &Batch,
        records: &[SealedRecord],
    ) -> Result<Result<Applied, BatchError>, R::Error> {
        if let Err(e) = self.check(index, batch, records)? {
            return Ok(Err(e));
        }
        Ok(Ok(self.advance(batch)))
    }

    /// Applies a batch already checked (by [`FamilyState::apply`], or when it was logged): the periods'
    /// trees and the head move on.
    pub fn advance(&mut self, batch: &Batch) -> Applied {
        debug_assert!(self.unhashed.is_empty(), "advance before catch_up");
        let placements = self.placements(batch);
        let mut nodes = Vec::new();
        let mut added = BTreeSet::new();
        for e in &batch.entries {
            let tree = self.periods.entry(e.period).or_default();
            tree.push_completing(merkle::leaf_hash(&e.digest.0), |level, i, root| {
                nodes.push((e.period, level, i, root));
            });
            added.insert(e.period);
        }
        for p in added {
            self.refresh_period(p);
        }
        self.batches += 1;
        self.refresh_head();
        Applied {
            head: self.current_head,
            placements,
            nodes,
        }
    }

    /// Sets a period's leaf in the current head from its tree.
    fn refresh_period(&mut self, p: Period) {
        let tree = &self.periods[&p];
        let leaf = PeriodLeaf {
            period: p,
            count: tree.size(),
            root: tree.root(),
        };
        match self.current.binary_search_by(|l| l.period.cmp(&p)) {
            Ok(i) => self.current[i] = leaf,
            Err(i) => self.current.insert(i, leaf),
        }
    }

    fn refresh_head(&mut self) {
        let hashes: Vec<Hash> = self.current.iter().map(PeriodLeaf::hash).collect();
        self.current_head = Head {
            customer: self.customer,
            family: self.family,
            batches: self.batches,
            records: self.current.iter().map(|l| l.count).sum(),
            periods: self.current.len() as u64,
            periods_root: merkle::root(&hashes),
        };
    }

    /// Counts a batch the log already holds without hashing its records into the periods' trees: an
    /// open that replays a long log does this for every batch, then [`FamilyState::catch_up`] once,
    /// instead of two hashes a record. Until then only [`FamilyState::period_count`] and
    /// [`FamilyState::placements`] may be asked.
    pub fn skip(&mut self, batch: &Batch) {
        for e in &batch.entries {
            *self.unhashed.entry(e.period).or_default() += 1;
        }
        self.batches += 1;
    }

    /// Every period's tree, in period order.
    pub fn trees(&self) -> impl Iterator<Item = (Period, &merkle::CompactRange)> {
        self.periods.iter().map(|(p, t)| (*p, t))
    }

    /// A period's tree (its perfect subtrees), for its owner to save after each batch that touches it
    /// and give back to [`FamilyState::catch_up`].
    pub fn tree(&self, period: Period) -> Option<&merkle::CompactRange> {
        self.periods.get(&period)
    }

    /// Brings the periods' trees up to the records [`FamilyState::skip`] counted, from each period's
    /// tree as its owner saved it after its last batch (`saved`). A saved tree that is missing, or
    /// whose size is not the count the log gives, is refused: the period is returned.
    pub fn catch_up(
        &mut self,
        mut saved: impl FnMut(Period) -> Option<merkle::CompactRange>,
    ) -> Result<(), Period> {
        for (period, extra) in std::mem::take(&mut self.unhashed) {
            let n = self.period_count(period) + extra;
            let tree = saved(period).filter(|t| t.size() == n).ok_or(period)?;
            self.periods.insert(period, tree);
            self.refresh_period(period);
        }
        self.refresh_head();
        Ok(())
    }

    /// The proof for a read of periods `from..=to` against the current head, paged: at most `limit`
    /// records, starting at `cursor` (a period and an index within it). `None` if `from` is after `to`.
    /// The outer error is the index's.
    pub fn prove_read<R: RecordIndex>(
        &self,
        index: &R,
        from: Period,
        to: Period,
        cursor: Option<(Period, u64)>,
        limit: u64,
    ) -> Result<Option<ReadProof>, R::Error> {
        prove(
            index,
            self.current_head,
            &self.current,
            (from, to),
            cursor,
            limit,
        )
    }
}

/// The proof for a read of `periods` against `head`, whose period leaves are `leaves`: the period
/// leaves around the range with their proof, then pages of records with their proofs against their
/// period roots, read from `index` (O(log n) nodes a page, whatever the period's size).
fn prove<R: RecordIndex>(
    index: &R,
    head: Head,
    leaves: &[PeriodLeaf],
    (from, to): (Period, Period),
    cursor: Option<(Period, u64)>,
    limit: u64,
) -> Result<Option<ReadProof>, R::Error> {
    if from > to {
        return Ok(None);
    }
    let hashes: Vec<Hash> = leaves.iter().map(PeriodLeaf::hash).collect();
    // The run of leaves inside [from, to], widened by one neighbour on each side.
    let first_in = leaves.partition_point(|l| l.period < from);
    let end_in = leaves.partition_point(|l| l.period <= to);
    let lo = first_in.saturating_sub(1);
    let hi = (end_in + 1).min(leaves.len());
    let (run, proof) = if lo < hi {
        (
            leaves[lo..hi].to_vec(),
            merkle::range_proof(&hashes, lo, hi).expect("lo < hi <= len"),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut pages = Vec::new();
    let mut budget = limit.max(1);
    let mut next = None;
    for leaf in &leaves[first_in..end_in] {
        let start = match cursor {
            Some((p, _)) if leaf.period < p => continue,
            Some((p, i)) if leaf.period == p => i.min(leaf.count),
            _ => 0,
        };
        if start == leaf.count {
            continue;
        }
        if budget == 0 {
            next = Some((leaf.period, start));
            break;
        }
        let end = (start + budget).min(leaf.count);
        let mut node = |level: u8, i: u64| index.node(leaf.period, level, i);
        let proof = merkle::range_proof_over(leaf.count, start, end, |offset, len| {
            merkle::subtree_root(offset, len, &mut node)
        })?
        .expect("start < end <= count");
        pages.push(PageProof {
            period: leaf.period,
            start,
            ids: index.ids(leaf.period, start, end)?,
            proof,
        });
        budget -= end - start;
        if end < leaf.count {
            next = Some((leaf.period, end));
            break;
        }
    }
    Ok(Some(ReadProof {
        head,
        from,
        to,
        periods_lo: lo as u64,
        periods: run,
        periods_proof: proof,
        pages,
        next,
    }))
}

/// The ids a family holds, as their first 8 bytes: 8 bytes a record, in a sorted vector with a small
/// set of the newest beside it (merged into the vector once it passes an eighth of it). A repeated
/// id always matches; a new id whose first 8 bytes match a held one's (one chance in 2^64 per record
/// held) is refused, and its client writes it again under another id. The store and [`FamilyLedger`]
/// both answer [`RecordIndex::contains`] from one. A replay of logged batches takes their ids in bulk
/// ([`IdSet::insert_logged`], then [`IdSet::settle`]: one sort instead of a set insert each).
#[derive(Debug, Clone, Default)]
pub struct IdSet {
    sorted: Vec<u64>,
    newest: HashSet<u64>,
    /// Ids taken in bulk, unsorted until [`IdSet::settle`].
    logged: Vec<u64>,
}

impl IdSet {
    fn key(id: &RecordId) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&id.0[..8]);
        u64::from_be_bytes(b)
    }

    /// Whether an id with the same first 8 bytes is held. (Ids taken in bulk and not settled yet are
    /// searched one by one: a replay settles before the set is asked.)
    pub fn contains(&self, id: &RecordId) -> bool {
        let k = Self::key(id);
        self.newest.contains(&k)
            || self.sorted.binary_search(&k).is_ok()
            || self.logged.contains(&k)
    }

    /// Holds `id`.
    pub fn insert(&mut self, id: &RecordId) {
        if !self.newest.insert(Self::key(id)) {
            return;
        }
        if self.newest.len() > (self.sorted.len() / 8).max(1024) {
            let mut newest: Vec<u64> = self.newest.drain().collect();
            newest.sort_unstable();
            self.merge(&newest);
        }
    }

    /// Holds `id`, an id of a batch the log holds, without looking whether it is held: the ids of a
    /// replay are taken this way, then [`IdSet::settle`]d once.
    pub fn insert_logged(&mut self, id: &RecordId) {
        self.logged.push(Self::key(id));
    }

    /// Sorts the ids taken by [`IdSet::insert_logged`] into the set.
    pub fn settle(&mut self) {
        if self.logged.is_empty() {
            return;
        }
        let mut logged = std::mem::take(&mut self.logged);
        logged.sort_unstable();
        if self.sorted.is_empty() {
            logged.dedup();
            logged.shrink_to_fit();
            self.sorted = logged;
        } else {
            self.merge(&logged);
        }
    }

    /// Merges sorted ids into the vector in place, from the back (O(n)), then drops any id held
    /// twice; the vector grows by exactly what it takes.
    fn merge(&mut self, newer: &[u64]) {
        let old = self.sorted.len();
        self.sorted.reserve_exact(newer.len());
        self.sorted.resize(old + newer.len(), 0);
        let (mut i, mut j) = (old, newer.len());
        for w in (0..self.sorted.len()).rev() {
            if j == 0 {
                break;
            }
            if i > 0 && self.sorted[i - 1] > newer[j - 1] {
                self.sorted[w] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[w] = newer[j - 1];
                j -= 1;
            }
        }
        self.sorted.dedup();
    }

    /// How many ids are held (ids taken in bulk count once settled).
    pub fn len(&self) -> usize {
        let newer = self
            .newest
            .iter()
            .filter(|k| self.sorted.binary_search(k).is_err())
            .count();
        self.sorted.len() + newer + self.logged.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A family's records held in memory: each period's leaves and ids, and every id.
#[derive(Debug, Clone, Default)]
struct MemoryIndex {
    periods: BTreeMap<Period, (Vec<Hash>, Vec<RecordId>)>,
    ids: IdSet,
}

impl MemoryIndex {
    fn leaves(&self, period: Period) -> &[Hash] {
        self.periods.get(&period).map_or(&[], |(l, _)| l)
    }
}

impl RecordIndex for MemoryIndex {
    type Error = Infallible;
    fn node(&self, period: Period, level: u8, index: u64) -> Result<Hash, Infallible> {
        let n = 1usize << level;
        let start = index as usize * n;
        Ok(merkle::root(&self.leaves(period)[start..start + n]))
    }
    fn ids(&self, period: Period, start: u64, end: u64) -> Result<Vec<RecordId>, Infallible> {
        Ok(self
            .periods
            .get(&period)
            .map(|(_, ids)| ids[start as usize..end as usize].to_vec())
            .unwrap_or_default())
    }
    fn contains(&self, id: &RecordId) -> Result<bool, Infallible> {
        Ok(self.ids.contains(id))
    }
}

/// A family ledger held in memory, for a client (an export) and for tests: [`FamilyState`] with its
/// records' leaves and ids beside it, and each batch's additions, so that it also proves reads
/// against earlier heads. The store keeps the same [`FamilyState`] over its rows instead.
#[derive(Debug, Clone)]
pub struct FamilyLedger {
    state: FamilyState,
    records: MemoryIndex,
    /// For each applied batch, how many records it added to each period (for reads against older heads).
    history: Vec<Vec<(Period, u64)>>,
}

impl FamilyLedger {
    /// An empty family.
    pub fn new(customer: IdentityId, family: FamilyId, scope: Scope) -> Self {
        Self {
            state: FamilyState::new(customer, family, scope),
            records: MemoryIndex::default(),
            history: Vec::new(),
        }
    }

    /// The current head.
    pub fn head(&self) -> Head {
        self.state.head()
    }

    /// How many records `period` holds now.
    pub fn period_count(&self, period: Period) -> u64 {
        self.state.period_count(period)
    }

    /// Where each record of `batch` goes when it is applied ([`FamilyState::placements`]).
    pub fn placements(&self, batch: &Batch) -> Vec<(Period, u64)> {
        self.state.placements(batch)
    }

    /// Period counts as they were after `batches` batches.
    fn counts_at(&self, batches: u64) -> Option<BTreeMap<Period, u64>> {
        if batches > self.state.batches {
            return None;
        }
        let mut counts: BTreeMap<Period, u64> = self
            .state
            .periods
            .iter()
            .map(|(p, t)| (*p, t.size()))
            .collect();
        for later in &self.history[batches as usize..] {
            for (p, n) in later {
                let c = counts
                    .get_mut(p)
                    .expect("history names only existing periods");
                *c -= n;
            }
        }
        counts.retain(|_, c| *c > 0);
        Some(counts)
    }

    fn leaves_at(&self, counts: &BTreeMap<Period, u64>) -> Vec<PeriodLeaf> {
        counts
            .iter()
            .map(|(p, c)| PeriodLeaf {
                period: *p,
                count: *c,
                root: merkle::root(&self.records.leaves(*p)[..*c as usize]),
            })
            .collect()
    }

    /// The head as it was after `batches` batches.
    pub fn head_at(&self, batches: u64) -> Option<Head> {
        if batches == self.state.batches {
            return Some(self.head());
        }
        let counts = self.counts_at(batches)?;
        let leaves = self.leaves_at(&counts);
        let hashes: Vec<Hash> = leaves.iter().map(PeriodLeaf::hash).collect();
        Some(Head {
            customer: self.state.customer,
            family: self.state.family,
            batches,
            records: counts.values().sum(),
            periods: leaves.len() as u64,
            periods_root: merkle::root(&hashes),
        })
    }

    /// Checks `batch` and the records it names, without applying them ([`FamilyState::check`]).
    pub fn check(&self, batch: &Batch, records: &[SealedRecord]) -> Result<(), BatchError> {
        infallible(self.state.check(&self.records, batch, records))
    }

    /// Checks and applies `batch`; returns the new head.
    pub fn apply(&mut self, batch: &Batch, records: &[SealedRecord]) -> Result<Head, BatchError> {
        let applied = infallible(self.state.apply(&self.records, batch, records))?;
        let mut added: BTreeMap<Period, u64> = BTreeMap::new();
        for e in &batch.entries {
            let (leaves, ids) = self.records.periods.entry(e.period).or_default();
            leaves.push(merkle::leaf_hash(&e.digest.0));
            ids.push(e.id);
            self.records.ids.insert(&e.id);
            *added.entry(e.period).or_default() += 1;
        }
        self.history.push(added.into_iter().collect());
        Ok(applied.head)
    }

    /// The proof for a read of periods `from..=to` against the head after `batches` batches (the named
    /// head), paged: at most `limit` records, starting at `cursor` (a period and an index within it).
    /// `None` if there is no such head, or if `from` is after `to`.
    pub fn prove_read(
        &self,
        batches: u64,
        from: Period,
        to: Period,
        cursor: Option<(Period, u64)>,
        limit: u64,
    ) -> Option<ReadProof> {
        if batches == self.state.batches {
            return infallible(
                self.state
                    .prove_read(&self.records, from, to, cursor, limit),
            );
        }
        let counts = self.counts_at(batches)?;
        let leaves = self.leaves_at(&counts);
        let head = self.head_at(batches)?;
        infallible(prove(
            &self.records,
            head,
            &leaves,
            (from, to),
            cursor,
            limit,
        ))
    }
}

/// One page: a contiguous run of records of one period, and its proof against the period root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageProof {
    /// The period.
    pub period: Period,
    /// Index of the first record in the period.
    pub start: u64,
    /// The ids of the records in the page, in order (the store fetches them by id).
    pub ids: Vec<RecordId>,
    /// Range proof of the page's record digests against the period root.
    pub proof: Vec<Hash>,
}

/// What proves a read complete: the named head, the period leaves around the requested range with their
/// proof, and one page proof per period served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadProof {
    /// The named head.
    pub head: Head,
    /// First period asked for.
    pub from: Period,
    /// Last period asked for.
    pub to: Period,
    /// Index of the first period leaf served.
    pub periods_lo: u64,
    /// The period leaves served: those in the range plus one neighbour each side (where one exists).
    pub periods: Vec<PeriodLeaf>,
    /// Range proof of those leaves against the head's periods root.
    pub periods_proof: Vec<Hash>,
    /// The pages.
    pub pages: Vec<PageProof>,
    /// Where the next page starts, if the read continues.
    pub next: Option<(Period, u64)>,
}

/// A verified read: the records, grouped by page, all proven to belong to the named head.
#[derive(Debug)]
pub struct VerifiedRead<'a> {
    /// The head the read was checked against.
    pub head: Head,
    /// The records, in order.
    pub records: Vec<&'a SealedRecord>,
    /// Where the next page starts.
    pub next: Option<(Period, u64)>,
}

/// Verifies a read. `expected_head` is the head digest the reader trusts (from the log); `records` are the
/// records served for the proof's pages, in order; `batches` the signed batches naming them; `device_key`
/// resolves the key of the device that signed a batch (the caller checks, with the identity state, that the
/// device may sign for the author at that position).
pub fn verify_read<'a>(
    expected_head: &Digest,
    proof: &ReadProof,
    records: &'a [SealedRecord],
    batches: &[SignedBatch],
    device_key: impl Fn(&Batch) -> Option<VerifyingKey>,
    cursor: Option<(Period, u64)>,
) -> Result<VerifiedRead<'a>, BatchError> {
    let head = proof.head;
    if head.digest() != *expected_head {
        return Err(BatchError::HeadMismatch);
    }
    // 1. The period leaves: a contiguous run proven against the head, covering [from, to].
    let leaves = &proof.periods;
    let size = head.periods as usize;
    if leaves.is_empty() {
        if size != 0 {
            return Err(BatchError::IncompleteRange);
        }
    } else {
        let hashes: Vec<Hash> = leaves.iter().map(PeriodLeaf::hash).collect();
        let lo = proof.periods_lo as usize;
        merkle::verify_range(&head.periods_root, size, lo, &hashes, &proof.periods_proof)?;
        if leaves.windows(2).any(|w| w[0].period >= w[1].period) {
            return Err(BatchError::IncompleteRange);
        }
        let first = &leaves[0];
        let last = &leaves[leaves.len() - 1];
        // Left edge: either the tree starts here, or the first leaf is before the range.
        if lo != 0 && first.period >= proof.from {
            return Err(BatchError::IncompleteRange);
        }
        // Right edge: either the tree ends here, or the last leaf is after the range.
        if lo + leaves.len() != size && last.period <= proof.to {
            return Err(BatchError::IncompleteRange);
        }
    }
    // 2. Pages: every period in range with records past the cursor is served, in order, each page proven
    //    against its period root, until `next`.
    let in_range: Vec<&PeriodLeaf> = leaves
        .iter()
        .filter(|l| proof.from <= l.period && l.period <= proof.to)
        .collect();
    let mut expected_pages = Vec::new();
    for leaf in &in_range {
        let start = match cursor {
            Some((p, _)) if leaf.period < p => continue,
            Some((p, i)) if leaf.period == p => i.min(leaf.count),
            _ => 0,
        };
        if start < leaf.count {
            expected_pages.push((**leaf, start));
        }
    }
    if proof.pages.is_empty() && !expected_pages.is_empty() {
        return Err(BatchError::IncompleteRange);
    }
    let mut offset = 0usize;
    let mut served = Vec::with_capacity(records.len());
    for (i, page) in proof.pages.iter().enumerate() {
        let Some(&(leaf, start)) = expected_pages.get(i) else {
            return Err(BatchError::IncompleteRange);
        };
        if page.period != leaf.period || page.start != start || page.ids.is_empty() {
            return Err(BatchError::IncompleteRange);
        }
        let n = page.ids.len();
        let page_records = records
            .get(offset..offset + n)
            .ok_or(BatchError::IncompleteRange)?;
        offset += n;
        let hashes: Vec<Hash> = page_records
            .iter()
            .map(|r| merkle::leaf_hash(&r.digest().0))
            .collect();
        merkle::verify_range(
            &leaf.root,
            leaf.count as usize,
            start as usize,
            &hashes,
            &page.proof,
        )?;
        for (r, id) in page_records.iter().zip(&page.ids) {
            let h = r.header();
            if h.id != *id
                || h.period != leaf.period
                || h.customer != head.customer
                || h.family != head.family
            {
                return Err(BatchError::RecordMismatch(h.id));
            }
        }
        served.extend(page_records.iter());
        // A page that stops short of its period's end must be the last, and `next` must point past it.
        let end = start + n as u64;
        let is_last = i + 1 == proof.pages.len();
        if end < leaf.count && !(is_last && proof.next == Some((leaf.period, end))) {
            return Err(BatchError::IncompleteRange);
        }
    }
    if offset != records.len() {
        return Err(BatchError::IncompleteRange);
    }
    // Every expected page was served, unless the read says where it continues.
    if proof.pages.len() < expected_pages.len() {
        let (leaf, start) = expected_pages[proof.pages.len()];
        let resumes_here = proof.next == Some((leaf.period, start))
            || proof
                .pages
                .last()
                .is_some_and(|p| proof.next == Some((p.period, p.start + p.ids.len() as u64)));
        if !resumes_here {
            return Err(BatchError::IncompleteRange);
        }
    }
    // 3. Each record is named, with its digest, by a batch whose signature verifies.
    let mut named: HashMap<RecordId, (Digest, usize)> = HashMap::new();
    for (bi, b) in batches.iter().enumerate() {
        let batch = b.batch();
        if batch.customer != head.customer || batch.family != head.family {
            continue;
        }
        for e in &batch.entries {
            named.insert(e.id, (e.digest, bi));
        }
    }
    let mut used = vec![false; batches.len()];
    for r in &served {
        let h = r.header();
        let &(digest, bi) = named.get(&h.id).ok_or(BatchError::Unbatched(h.id))?;
        let batch = batches[bi].batch();
        if digest != r.digest() || batch.author != h.author || batch.epoch != h.epoch {
            return Err(BatchError::RecordMismatch(h.id));
        }
        used[bi] = true;
    }
    verify_batch_signatures(
        batches
            .iter()
            .zip(&used)
            .filter(|(_, u)| **u)
            .map(|(b, _)| b),
        device_key,
    )?;
    Ok(VerifiedRead {
        head,
        records: served,
        next: proof.next,
    })
}

/// Verifies batch signatures together: strict per-key and per-signature checks first, then one batch
/// verification; on failure, per-signature `verify_strict` names the bad one.
pub fn verify_batch_signatures<'b>(
    batches: impl Iterator<Item = &'b SignedBatch>,
    device_key: impl Fn(&Batch) -> Option<VerifyingKey>,
) -> Result<(), BatchError> {
    let mut items = Vec::new();
    for b in batches {
        let key = device_key(b.batch()).ok_or(BatchError::BadBatchSignature(b.batch().device))?;
        items.push((b, key));
    }
    let envelopes: Vec<(&SignedEnvelope, VerifyingKey)> =
        items.iter().map(|(b, k)| (b.envelope(), *k)).collect();
    match crate::keys::verify_many(&envelopes) {
        Ok(()) => Ok(()),
        Err(i) => Err(BatchError::BadBatchSignature(items[i].0.batch().device)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Batches skipped and caught up from saved trees give the same head and the same proofs as
    /// batches advanced one by one, and the family goes on from there alike.
    #[test]
    fn skipped_batches_caught_up_from_the_index_are_as_if_advanced() {
        let (customer, family) = (IdentityId([1; 32]), FamilyId([2; 32]));
        let batch = |state: &FamilyState, tag: u64, sizes: &[(u32, u64)]| Batch {
            customer,
            family,
            epoch: 1,
            author: customer,
            device: DeviceId([3; 32]),
            prev_head: state.current_head.digest(),
            entries: sizes
                .iter()
                .flat_map(|(m, n)| (0..*n).map(move |i| (Period(202_600 + m), i)))
                .map(|(period, i)| {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&tag.to_be_bytes());
                    id[8..].copy_from_slice(&(u64::from(period.0) << 20 | i).to_be_bytes());
                    BatchEntry {
                        id: RecordId(id),
                        period,
                        digest: crate::hash::sha256(&id),
                    }
                })
                .collect(),
        };
        let mut advanced = FamilyLedger::new(customer, family, Scope::Transactions);
        let mut skipped = FamilyState::new(customer, family, Scope::Transactions);
        let shapes: [&[(u32, u64)]; 5] = [
            &[(1, 5)],
            &[(1, 64), (2, 3)],
            &[(3, 1)],
            &[(1, 100)],
            &[(2, 29), (3, 2)],
        ];
        for (tag, shape) in shapes.iter().enumerate() {
            let b = batch(&advanced.state, tag as u64, shape);
            let applied = advanced.state.advance(&b);
            for e in &b.entries {
                let (leaves, ids) = advanced.records.periods.entry(e.period).or_default();
                leaves.push(merkle::leaf_hash(&e.digest.0));
                ids.push(e.id);
                advanced.records.ids.insert(&e.id);
            }
            assert_eq!(skipped.placements(&b), applied.placements);
            skipped.skip(&b);
        }
        // A saved tree of the wrong size is refused; the right ones catch up.
        let mut wrong = skipped.clone();
        let short = |p: Period| {
            let mut t = advanced.state.tree(p).cloned()?;
            t.push(Hash::default());
            Some(t)
        };
        assert!(wrong.catch_up(short).is_err());
        skipped
            .catch_up(|p| advanced.state.tree(p).cloned())
            .unwrap();
        assert_eq!(skipped.head(), advanced.head());
        assert_eq!(skipped.current, advanced.state.current);
        let (from, to) = (Period(202_601), Period(202_603));
        assert_eq!(
            infallible(skipped.prove_read(&advanced.records, from, to, None, 50)),
            infallible(
                advanced
                    .state
                    .prove_read(&advanced.records, from, to, None, 50)
            ),
        );
        let next = batch(&advanced.state, 9, &[(1, 7), (4, 1)]);
        assert_eq!(skipped.advance(&next), advanced.state.advance(&next));
    }

    proptest! {
        /// The id set answers as a set of the ids' first 8 bytes would, across its merges, with ids
        /// taken one by one and in bulk (as a replay takes them), settled at any point.
        #[test]
        fn the_id_set_is_a_set_of_prefixes(
            ids in prop::collection::vec(any::<[u8; 16]>(), 0..3000),
            probe in any::<[u8; 16]>(),
            settle_every in 1usize..2000,
        ) {
            let mut set = IdSet::default();
            let mut model = HashSet::new();
            for (i, id) in ids.iter().enumerate() {
                if i % 5 < 2 {
                    set.insert_logged(&RecordId(*id));
                } else {
                    set.insert(&RecordId(*id));
                }
                // Every third id is inserted again: held once.
                if i % 3 == 0 {
                    set.insert(&RecordId(*id));
                }
                if i % settle_every == 0 {
                    set.settle();
                }
                model.insert(id[..8].to_vec());
                prop_assert!(set.contains(&RecordId(*id)));
            }
            set.settle();
            prop_assert_eq!(set.len(), model.len());
            prop_assert_eq!(set.contains(&RecordId(probe)), model.contains(&probe[..8]));
            for id in &ids {
                let mut other = *id;
                other[15] ^= 1;
                prop_assert!(set.contains(&RecordId(other)));
            }
        }
    }
}
