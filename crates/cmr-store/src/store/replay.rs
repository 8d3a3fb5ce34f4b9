//! Rebuilding the sequencer's state from the stored log when the store opens.

use super::*;

/// Whether the log erased `customer`'s `family` (or the whole vault).
fn erased(ledger: &Ledger, customer: &IdentityId, family: &FamilyId) -> bool {
    ledger
        .consent(customer)
        .and_then(|c| c.erased_at(family))
        .is_some()
}

/// A replayed entry's body longer than this is hashed (for its customer's chain head) only if it is
/// the customer's last entry.
const DEFERRED_HASH_BYTES: usize = 4096;

impl Sequencer {
    /// Rebuilds the in-memory state from the stored log; with `add_indexes`, also writes the index rows
    /// of every entry (a store from before the indexes), made durable with the rest of the open.
    pub(super) fn rebuild(&mut self, add_indexes: bool) -> Result<(), StoreError> {
        let size = meta_u64(&*self.rows, layout::META_SIZE)?;
        // The families' trees are caught up once at the end from their stored nodes, rather than two
        // hashes a record as the batches replay (unless every record is read back and checked).
        self.skipping = !self.verify_records;
        // The party index's postings from its mark on are held in memory, taken again from the log.
        *self.party.write().unwrap_or_else(|p| p.into_inner()) =
            party::PartyTail::starting_at(party::stored_mark(&*self.rows)?);
        let followed = self.follow(size, add_indexes);
        self.skipping = false;
        followed?;
        self.catch_up_families()?;
        let root = Tree::new(Committed(&*self.rows, &self.nodes, size))
            .root(size)
            .map_err(tree_err)?;
        if let Some(note) = self.rows.get(layout::META_CHECKPOINT)? {
            let note = String::from_utf8_lossy(&note).into_owned();
            let cp = cmr_log::checkpoint::open(&note, &self.log_key.verifier(), &[], 0)
                .map_err(|e| StoreError::Format(format!("stored checkpoint: {e}")))?;
            if cp.checkpoint.size != size || cp.checkpoint.root != root {
                return Err(StoreError::Format(
                    "the stored checkpoint does not match the stored tree".into(),
                ));
            }
        }
        Ok(())
    }

    /// Applies the stored log's entries from this store's size up to `to`: all of them at open, and
    /// those other stores logged since (on an engine several share) before a group is decided. Their
    /// bodies are read by range; each goes through the rule engine and into the chains, the published
    /// keys and the family ledgers, exactly as when it was logged. With `add_indexes`, also writes the
    /// index rows of every entry (a store from before the indexes).
    pub(super) fn follow(&mut self, to: u64, add_indexes: bool) -> Result<(), StoreError> {
        let from = self.state.size;
        // Another store sharing the engine may have written the postings in memory as runs.
        let mark = party::stored_mark(&*self.rows)?;
        let mut tail = self.party.write().unwrap_or_else(|p| p.into_inner());
        tail.advance_to(mark);
        let tail_from = tail.from();
        drop(tail);
        let mut postings = Vec::new();
        let mut index_rows = Writes::new();
        // Batches whose records are not all stored: right only for a family erased later in the log.
        let mut without_records = Vec::new();
        let rows = self.rows.clone();
        let mut next = from;
        let missing = |i: u64| {
            StoreError::Format(format!(
                "log entry {i} has no stored body: the stored data is damaged"
            ))
        };
        // A chain head's hash is needed only for each customer's last entry: a large body (a batch of
        // records) is hashed once the replay knows it is the last.
        let mut unhashed: HashMap<IdentityId, u64> = HashMap::new();
        for kv in pieces::entries(&*rows, from, to) {
            let (i, v) = kv?;
            if i != next {
                return Err(missing(next));
            }
            next += 1;
            let body = EntryBody::decode(v.get(32..).unwrap_or_default())
                .map_err(|e| StoreError::Format(format!("entry {i}: {e}")))?;
            if let Some(c) = body.customer {
                if v.len() > DEFERRED_HASH_BYTES {
                    unhashed.insert(c, i);
                } else {
                    unhashed.remove(&c);
                    self.state.heads.insert(
                        c,
                        ChainLink {
                            index: i,
                            hash: EntryBody::hash(&v[32..]),
                        },
                    );
                }
            }
            self.state.last_time = self.state.last_time.max(body.time);
            self.note_key_event(body.kind, body.subject, i);
            // The index rows from the consent state before the entry applies: all of them when the
            // open adds the indexes, else the party postings past the mark, which go back into memory.
            if add_indexes || i >= tail_from {
                let consent = body.customer.and_then(|c| self.state.ledger.consent(&c));
                let changes = index_changes(
                    consent,
                    i,
                    body.kind,
                    body.subject,
                    body.customer,
                    &body.payload,
                );
                if add_indexes {
                    for k in changes.deletes {
                        index_rows.insert(k, None);
                    }
                    for (k, v) in changes.puts {
                        index_rows.insert(k, Some(v));
                    }
                    // Written as they come, in chunks, so that adding the indexes of a large log does
                    // not hold them all in memory. Safe to cut anywhere: until the format row is
                    // written (after the whole replay) the next open adds them all again, and puts and
                    // deletes applied in log order again give the same rows.
                    if index_rows.len() >= self.index_chunk_rows {
                        self.rows.write(std::mem::take(&mut index_rows))?;
                    }
                } else {
                    postings.extend(changes.puts.iter().filter_map(|(k, _)| layout::party_of(k)));
                }
            }
            let replayed = self
                .replay(i, &body, add_indexes.then_some(&mut index_rows))
                .map_err(|e| match e {
                    // The storage failing under the replay says nothing of the entry.
                    StoreError::Unavailable(_) | StoreError::Io(_) => e,
                    e => StoreError::Format(format!("entry {i} does not replay: {e}")),
                })?;
            if let Some(family) = replayed {
                without_records.push((i, family));
            }
        }
        if next != to {
            return Err(missing(next));
        }
        let mut tail = self.party.write().unwrap_or_else(|p| p.into_inner());
        for (customer, party, i) in postings {
            tail.add(customer, party, i);
        }
        drop(tail);
        for (customer, i) in unhashed {
            let (_, v) = pieces::entries(&*rows, i, i + 1)
                .next()
                .ok_or_else(|| missing(i))??;
            let hash = EntryBody::hash(v.get(32..).unwrap_or_default());
            self.state
                .heads
                .insert(customer, ChainLink { index: i, hash });
        }
        if next > from {
            for family in self.state.ledgers.values_mut() {
                family.ids.settle();
            }
        }
        for (i, (customer, family)) in without_records {
            if !erased(&self.state.ledger, &customer, &family) {
                return Err(StoreError::Format(format!(
                    "the records of the batch logged at {i} are missing, and its family was never \
                     erased: the stored data is damaged"
                )));
            }
        }
        if !index_rows.is_empty() {
            self.rows.write(index_rows)?;
        }
        self.state.size = to;
        Ok(())
    }

    /// Brings every family's trees up to the batches the open skipped ([`FamilyState::catch_up`]),
    /// from the trees saved after each batch (`FRONTIER` rows, one range read a family): a saved tree
    /// whose size is not what the log counts refuses the open. An erased family has none: it starts
    /// empty again, as nothing of it is served or written any more.
    fn catch_up_families(&mut self) -> Result<(), StoreError> {
        // An open that hashed every record (`verify_on_open`) saves every tree again: a damaged
        // saved tree is then repaired.
        let mut resaved = Writes::new();
        for (&(customer, family), Family { state, .. }) in &mut self.state.ledgers {
            if erased(&self.state.ledger, &customer, &family) {
                *state = FamilyState::new(customer, family, state.scope());
                continue;
            }
            let number = self
                .state
                .family_numbers
                .get(&(customer, family))
                .copied()
                .ok_or_else(|| StoreError::NotFound("family".into()))?;
            if self.verify_records {
                for (p, tree) in state.trees() {
                    resaved.insert(layout::frontier(number, p), Some(encode_tree(tree)));
                }
                continue;
            }
            let prefix = layout::key(tag::FRONTIER, &[&number.to_be_bytes()]);
            let mut saved: HashMap<Period, cmr_core::merkle::CompactRange> = HashMap::new();
            for kv in self.rows.scan_prefix(&prefix) {
                let (k, v) = kv?;
                let period = k
                    .get(9..13)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| Period(u32::from_be_bytes(b)));
                if let (Some(period), Some(tree)) = (period, decode_tree(&v)) {
                    saved.insert(period, tree);
                }
            }
            state.catch_up(|p| saved.remove(&p)).map_err(|p| {
                StoreError::Format(format!(
                    "the saved tree of family {number}'s {p} does not match the log: the stored \
                     data is damaged (`cmr serve --verify-on-open` opens it from the records, and \
                     saves the trees again)"
                ))
            })?;
        }
        if !resaved.is_empty() {
            self.rows.write(resaved)?;
        }
        Ok(())
    }

    /// Checks that every stored record is one a batch in the log wrote and that no erasure removed:
    /// its family is known, its place (period, number) is within what the family's batches wrote, and
    /// its family was not erased after its batch. Run after a restore (and an upgrade), whose rows came
    /// from outside this store: a record nothing accounts for would be served, and one of an erased
    /// family would bring erased data back. (Each record a batch accounts for was checked against it
    /// during the replay.)
    pub(super) fn check_records(&self) -> Result<(), StoreError> {
        let owner: HashMap<u64, (IdentityId, FamilyId)> = self
            .state
            .family_numbers
            .iter()
            .map(|(k, n)| (*n, *k))
            .collect();
        let bad = |what: String| StoreError::Format(format!("a stored record {what}"));
        for kv in self.rows.scan_prefix(&[tag::RECORDS]) {
            let (k, v) = kv?;
            let Some((number, period, first)) = layout::family_piece_of(&k) else {
                return Err(bad("piece has a malformed key".into()));
            };
            for (n, value) in (first..).zip(layout::piece_records(&v)?) {
                let batch = value
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| bad("names no batch".into()))?;
                let (customer, family) = owner.get(&number).ok_or_else(|| {
                    bad(format!("of family number {number} the log never declared"))
                })?;
                let erased = self
                    .state
                    .ledger
                    .consent(customer)
                    .and_then(|c| c.erased_at(family));
                if erased.is_some_and(|at| batch < at) {
                    return Err(bad(format!(
                        "of a family the log erased (written at {batch}): restoring it would bring erased data back"
                    )));
                }
                let written = self
                    .state
                    .ledgers
                    .get(&(*customer, *family))
                    .map_or(0, |l| l.state.period_count(period));
                if n >= written {
                    return Err(bad(format!(
                        "({period}, number {n}) that no batch in the log wrote"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Replays one log entry into the in-memory state; with `add_to`, adds there the record index
    /// rows of a batch (a folder written before the record index). For a batch whose records are not
    /// all stored, returns its family, which the caller checks was erased later in the log.
    pub(super) fn replay(
        &mut self,
        index: u64,
        body: &EntryBody,
        add_to: Option<&mut Writes>,
    ) -> Result<Option<(IdentityId, FamilyId)>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Format(e.to_string());
        let parsed = Parsed::decode(body.kind, &body.payload, &self.log_key.verifier())
            .map_err(|e| m(&e))?;
        // Signatures were checked when the entry was logged; the rules are applied again in full.
        let (_, effect) = self
            .state
            .ledger
            .apply(
                &parsed,
                index,
                body.time,
                Some(Header::of(body)),
                Signatures::Checked,
            )
            .map_err(|e| m(&e))?;
        self.publish(&parsed, &effect, index);
        // The family ledger (the sealed records' chain) is the store's own: the ledger checked who
        // may write the batch; here the stored records must match it.
        let Parsed::FamilyHead(signed) = parsed else {
            return Ok(None);
        };
        let b = signed.batch();
        let number = self.state.family_number(&b.customer, &b.family)?;
        let ledger = self
            .state
            .ledgers
            .get_mut(&(b.customer, b.family))
            .ok_or_else(|| m(&"unknown family"))?;
        if !self.verify_records {
            // The records were written in the same atomic group as this entry: the ledger follows the
            // batch alone, and no record is read (`StoreConfig::verify_on_open` reads and checks them).
            // (An open that adds rows always verifies: `add_to` is only given with it.)
            debug_assert!(add_to.is_none());
            if self.skipping {
                ledger.state.skip(b);
            } else {
                ledger.state.advance(b);
            }
            for e in &b.entries {
                ledger.ids.insert_logged(&e.id);
            }
            return Ok(None);
        }
        // Records of an erased family are gone; its ledger is then not rebuilt.
        let placements = ledger.state.placements(b);
        let mut runs: BTreeMap<Period, (u64, u64)> = BTreeMap::new();
        for (period, n) in &placements {
            let run = runs.entry(*period).or_insert((*n, *n));
            run.1 = *n + 1;
        }
        let view = Overlay::new(&*self.rows, &self.nodes, self.state.size);
        let mut stored: HashMap<(Period, u64), Vec<u8>> = HashMap::new();
        for (period, run) in runs {
            let (found, _) = read_records(&view, number, period, run, usize::MAX)?;
            stored.extend(found.into_iter().map(|(n, v)| ((period, n), v)));
        }
        let mut records = Vec::with_capacity(b.entries.len());
        let mut complete = true;
        for place in &placements {
            match stored.remove(place) {
                // A record names the batch that wrote it: this one, or it is not this batch's.
                Some(v) if v.len() > 8 && v[..8] == index.to_be_bytes() => {
                    records.push(SealedRecord::decode(v[8..].to_vec()).map_err(|e| m(&e))?)
                }
                Some(v) if v.len() > 8 => {
                    return Err(m(&format_args!(
                        "a record of the batch logged at {index} names the batch at {}",
                        u64::from_be_bytes(v[..8].try_into().unwrap_or_default())
                    )));
                }
                _ => complete = false,
            }
        }
        if !complete {
            return Ok(Some((b.customer, b.family)));
        }
        // The ids were found new when the batch was logged; the rest is checked again.
        ledger.state.check_logged(b, &records).map_err(|e| m(&e))?;
        let applied = ledger.state.advance(b);
        for e in &b.entries {
            ledger.ids.insert_logged(&e.id);
        }
        if let Some(writes) = add_to {
            stage_ledger(writes, &*self.rows, number, b, &applied)?;
            for (k, v) in tree_rows(number, &ledger.state, &applied) {
                writes.insert(k, Some(v));
            }
        }
        Ok(None)
    }
}
