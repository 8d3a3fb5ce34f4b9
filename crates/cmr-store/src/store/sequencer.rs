//! The sequencer: one thread that takes operations in groups, decides each by the rule engine, stages
//! the group's writes and hands it to the syncer.

use super::*;

/// A bounded map of log index to a batch's signed bytes; the oldest leave first.
#[derive(Default)]
pub(super) struct BatchCache {
    map: HashMap<u64, Vec<u8>>,
    order: std::collections::VecDeque<u64>,
    bytes: usize,
}

/// At most this many bytes of batches are kept.
const BATCH_CACHE_BYTES: usize = 8 * 1024 * 1024;

impl BatchCache {
    fn get(&self, index: u64) -> Option<Vec<u8>> {
        self.map.get(&index).cloned()
    }

    fn put(&mut self, index: u64, payload: Vec<u8>) {
        if payload.len() > BATCH_CACHE_BYTES / 8 {
            return;
        }
        self.bytes += payload.len();
        if let Some(old) = self.map.insert(index, payload) {
            self.bytes -= old.len();
            return;
        }
        self.order.push_back(index);
        while self.bytes > BATCH_CACHE_BYTES
            && let Some(oldest) = self.order.pop_front()
        {
            if let Some(gone) = self.map.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
    }
}

/// How often an idle store on a shared engine looks for what other stores made durable.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a store stopped by a failure of a shared engine tries to reconnect and rebuild.
const RECOVER_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// What the sequencer owns.
pub(super) struct Sequencer {
    /// The durable view readers see: raised by the syncer for this store's groups, and by the
    /// sequencer for what other stores sharing the engine made durable.
    pub(super) durable: Arc<RwLock<Durable>>,
    pub(super) rows: Arc<dyn Storage>,
    pub(super) nodes: Arc<NodeCache>,
    /// Signed batches a read serves, by the log index of their entry (entries never change): each read
    /// names its records' batches, and a database would be asked for the same few again and again.
    pub(super) batches: BatchCache,
    pub(super) log_key: Arc<NoteSigner>,
    pub(super) clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    pub(super) max_group: usize,
    pub(super) max_page_bytes: usize,
    pub(super) index_chunk_rows: usize,
    /// Whether the replay reads each batch's records back and checks them against it
    /// ([`StoreConfig::verify_on_open`]).
    pub(super) verify_records: bool,
    /// Set while the open replays the log without reading records: batches are counted
    /// ([`FamilyState::skip`]) and the families caught up at the end.
    pub(super) skipping: bool,
    pub(super) state: State,
    /// Set when the sequencer stopped taking operations after a failure (shared with [`Store`]).
    pub(super) poisoned: Arc<AtomicBool>,
    pub(super) device_keys: DeviceKeys,
    /// The party index's newest postings (shared with [`Store`]'s readers), and how many it holds
    /// before a group writes them as runs.
    pub(super) party: party::SharedTail,
    pub(super) party_tail: usize,
    /// What makes groups durable: moved onto its own thread when the sequencer runs.
    pub(super) syncer: Option<Syncer>,
    /// Where written groups go to be made durable and acknowledged, once the sequencer runs.
    pub(super) to_syncer: Option<mpsc::SyncSender<ToSyncer>>,
    /// When this store last tried to come back after a failure of a shared engine.
    pub(super) last_recovery: Option<std::time::Instant>,
    /// Whether the store was stopped when last looked at (to count each stop once).
    pub(super) was_stopped: bool,
    pub(super) metrics: crate::metrics::StoreMetrics,
}
/// The in-memory state, rebuilt from the log when the store opens.
#[derive(Default)]
pub(super) struct State {
    pub(super) size: u64,
    pub(super) last_time: u64,
    /// The rules' state: identities, devices, consent, directories, auditors ([`cmr_log::ledger`]).
    pub(super) ledger: Ledger,
    /// Each family's ledger state and ids; the rest of what grows with its records is in the rows
    /// ([`FamilyRows`]).
    pub(super) ledgers: HashMap<(IdentityId, FamilyId), Family>,
    pub(super) heads: HashMap<IdentityId, ChainLink>,
    /// The vaults-of index rows written since the store opened (see `apply_index`).
    pub(super) vaults_written: std::collections::HashSet<Vec<u8>>,
    /// A short number for each family, in the order the families were declared (so the same after a
    /// replay): record keys carry it instead of two 32-byte ids.
    pub(super) family_numbers: HashMap<(IdentityId, FamilyId), u64>,
}
impl State {
    /// Declares a family from a directory: its ledger and its number.
    pub(super) fn ensure_family(
        &mut self,
        customer: IdentityId,
        family: FamilyId,
        scope: cmr_core::family::Scope,
    ) {
        let next = self.family_numbers.len() as u64;
        self.family_numbers
            .entry((customer, family))
            .or_insert(next);
        self.ledgers
            .entry((customer, family))
            .or_insert_with(|| Family::new(FamilyState::new(customer, family, scope)));
    }

    /// The family's number in record keys.
    pub(super) fn family_number(
        &self,
        customer: &IdentityId,
        family: &FamilyId,
    ) -> Result<u64, StoreError> {
        self.family_numbers
            .get(&(*customer, *family))
            .copied()
            .ok_or_else(|| StoreError::NotFound("family".into()))
    }

    /// A customer's consent state.
    pub(super) fn consent(&self, customer: &IdentityId) -> Result<&ConsentState, StoreError> {
        self.ledger
            .consent(customer)
            .ok_or_else(|| StoreError::NotFound("customer".into()))
    }
}
/// The result of one operation inside a group, before the group is durable.
pub(super) struct Pending {
    pub(super) index: Option<u64>,
    pub(super) read: Option<ReadResult>,
    pub(super) repeated: bool,
    pub(super) head: Option<Digest>,
    /// The salted body logged at `index`, when this operation logged it.
    pub(super) entry: Option<SaltedBody>,
}
impl Sequencer {
    pub(super) fn now(&self) -> u64 {
        (self.clock)().max(self.state.last_time)
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Work>) {
        // Groups are made durable and acknowledged on a thread of their own, in order, while the
        // sequencer decides the next group: its fsync no longer stalls the pipeline. At most one group
        // waits for durability while the next is prepared (a rendezvous channel).
        let (to_syncer, queue) = mpsc::sync_channel::<ToSyncer>(0);
        let syncer = self.syncer.take().and_then(|mut syncer| {
            std::thread::Builder::new()
                .name("cmr-syncer".into())
                .spawn(move || {
                    for work in queue {
                        match work {
                            ToSyncer::Group(group) => syncer.finish(group),
                            ToSyncer::Reset(done) => {
                                syncer.failed = None;
                                let _ = done.send(());
                            }
                        }
                    }
                })
                .ok()
        });
        if syncer.is_some() {
            self.to_syncer = Some(to_syncer);
        } else {
            // Without its syncer nothing can be made durable: report unhealthy, answer Closed.
            self.poisoned.store(true, Ordering::SeqCst);
        }
        self.serve(&rx);
        // Closing: the groups handed off are made durable and answered before the store lets go.
        self.to_syncer = None;
        if let Some(handle) = syncer {
            let _ = handle.join();
        }
    }

    pub(super) fn serve(&mut self, rx: &mpsc::Receiver<Work>) {
        let shared = self.rows.shared();
        loop {
            // Stopped by a failure of a shared engine: come back once it is reachable again.
            let stopped = self.poisoned.load(Ordering::SeqCst);
            if stopped && !self.was_stopped {
                self.metrics.stopped.inc();
            }
            self.was_stopped = stopped;
            self.recover_when_due();
            let first = match rx.recv_timeout(FOLLOW_EVERY) {
                Ok(Work::Op(job)) => *job,
                Ok(Work::Follow(done)) => {
                    if shared && !self.poisoned.load(Ordering::SeqCst) {
                        self.follow_durable();
                    }
                    let _ = done.send(());
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Idle on an engine other stores write to: follow what they made durable, so that
                    // this store's readers see it too.
                    if shared && !self.poisoned.load(Ordering::SeqCst) {
                        self.follow_durable();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut group = vec![first];
            // Who asked to follow while this group formed: the group's start follows the others'
            // entries anyway, so they are answered once it is committed.
            let mut followers = Vec::new();
            while group.len() < self.max_group {
                match rx.try_recv() {
                    Ok(Work::Op(job)) => group.push(*job),
                    Ok(Work::Follow(done)) => followers.push(done),
                    Err(_) => break,
                }
            }
            // A panic is a bug, but it must not leave the server half alive: the group's replies are
            // dropped (the server answers them as unavailable), nothing more is taken, and the store
            // reports itself unhealthy until it is reopened from what is durable.
            let stopped = self.poisoned.clone();
            let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.commit_group(group);
            }));
            if committed.is_err() {
                stopped.store(true, Ordering::SeqCst);
            }
            for done in followers {
                let _ = done.send(());
            }
        }
    }

    /// On an engine that reopens, a stopped store tries to come back at most this often.
    pub(super) fn recover_when_due(&mut self) {
        if !self.rows.reconnects() || !self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let now = std::time::Instant::now();
        if self
            .last_recovery
            .is_some_and(|at| now.duration_since(at) < RECOVER_EVERY)
        {
            return;
        }
        self.last_recovery = Some(now);
        // A failure leaves the store stopped; the next attempt comes after RECOVER_EVERY.
        if self.recover().is_ok() {
            self.metrics.recovered.inc();
            self.was_stopped = false;
        }
    }

    /// After a failure on a shared engine (its database restarted, a connection broke): opens the
    /// connections afresh and rebuilds the whole state from what the database holds, as a restart
    /// would, then takes operations again. What was written and not made durable may be gone; nothing
    /// of it was acknowledged (those operations were answered in doubt, and their clients resend).
    pub(super) fn recover(&mut self) -> Result<(), StoreError> {
        // First the syncer answers every group handed to it before this, on the connections that
        // broke (so in doubt): a group written before the failure must never be made "durable" by a
        // sync on the new connections, since the database may have lost it. Then it starts afresh.
        if let Some(to_syncer) = &self.to_syncer {
            let (done, wait) = mpsc::sync_channel(1);
            to_syncer
                .send(ToSyncer::Reset(done))
                .map_err(|_| StoreError::Closed)?;
            wait.recv().map_err(|_| StoreError::Closed)?;
        }
        self.rows.reconnect()?;
        // Everything derived from the log is rebuilt from the database: the caches too, since nodes
        // and batches of groups the database lost may sit in them. The published keys are rebuilt
        // aside and swapped in whole, so that requests keep being authenticated meanwhile.
        self.nodes.clear();
        self.batches = BatchCache::default();
        self.state = State::default();
        let published = std::mem::take(&mut self.device_keys);
        // The party index's postings in memory too: listings keep reading the old ones meanwhile.
        let listed = std::mem::take(&mut self.party);
        self.rows.begin()?;
        let rebuilt = self.rebuild(false);
        self.rows.abandon();
        let fresh = std::mem::replace(&mut self.device_keys, published);
        let fresh_party = std::mem::replace(&mut self.party, listed);
        rebuilt?;
        // The database must still hold everything this store showed as durable (not, say, a replica
        // that was behind): else stay stopped, and a restart names the loss.
        let shown = self
            .durable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .checkpoint
            .clone();
        if let Some(note) = shown {
            let cp = cmr_log::checkpoint::open(&note, &self.log_key.verifier(), &[], 0)
                .map_err(|e| StoreError::Format(format!("durable checkpoint: {e}")))?;
            let (size, root) = (cp.checkpoint.size, cp.checkpoint.root);
            let held = (size <= self.state.size)
                .then(|| Tree::new(Committed(&*self.rows, &self.nodes, self.state.size)).root(size))
                .transpose()
                .map_err(tree_err)?;
            if held != Some(root) {
                return Err(StoreError::Format(format!(
                    "the database no longer holds the {size} log entries this server showed as durable"
                )));
            }
        }
        let fresh = std::mem::take(&mut *fresh.write().unwrap_or_else(|p| p.into_inner()));
        *self.device_keys.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        let fresh_party =
            std::mem::take(&mut *fresh_party.write().unwrap_or_else(|p| p.into_inner()));
        *self.party.write().unwrap_or_else(|p| p.into_inner()) = fresh_party;
        self.poisoned.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// While idle on a shared engine: catches up on the log other stores made durable, and shows it to
    /// this store's readers. A failure here is left to the next group, which meets it again.
    pub(super) fn follow_durable(&mut self) {
        let Ok(Some((size, note))) = self.rows.durable() else {
            return;
        };
        let seen = self.durable.read().map(|d| d.size).unwrap_or(0);
        if size <= seen {
            return;
        }
        if size > self.state.size {
            let caught = match self.rows.begin() {
                Ok(Some(held)) if held >= size => self.follow(held, false),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            self.rows.abandon();
            if caught.is_err() {
                // The state may be half caught up: stop, and let a reopen rebuild it.
                self.poisoned.store(true, Ordering::SeqCst);
                return;
            }
        }
        if self.state.size >= size {
            raise(&self.durable, size, &note);
        }
    }

    pub(super) fn commit_group(&mut self, group: Vec<Job>) {
        if self.poisoned.load(Ordering::SeqCst) {
            for job in group {
                let _ = job.reply.send(Err(StoreError::Closed));
            }
            return;
        }
        // On an engine several stores share: take the log's write lock, and apply first what the others
        // logged since this store's last group.
        let begun = match self.rows.begin() {
            Ok(Some(held)) if held > self.state.size => {
                self.follow(held, false).inspect_err(|_| {
                    // Half caught up: stop, and let a reopen rebuild the state.
                    self.poisoned.store(true, Ordering::SeqCst);
                })
            }
            Ok(Some(held)) if held < self.state.size => {
                // The database lost a group this store wrote (it crashed before the group was
                // durable, so nothing of it was acknowledged): the state here is ahead of it.
                self.poisoned.store(true, Ordering::SeqCst);
                Err(StoreError::InDoubt(format!(
                    "the database holds {held} log entries, fewer than this server wrote ({}): \
                     restart the server to rebuild from it",
                    self.state.size
                )))
            }
            Ok(_) => Ok(()),
            // Nothing was written (so the operations are answered as not taken: retry later); but an
            // engine that cannot start a group (its database went away) may have lost what this store
            // wrote last: stop, and let a reopen rebuild from it.
            Err(_) => {
                self.poisoned.store(true, Ordering::SeqCst);
                Err(StoreError::Closed)
            }
        };
        if let Err(e) = begun {
            self.rows.abandon();
            for job in group {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
        let started = std::time::Instant::now();
        self.metrics.group_operations.observe(group.len() as f64);
        let rows = self.rows.clone();
        let nodes = self.nodes.clone();
        let mut overlay = Overlay::new(&*rows, &nodes, self.state.size);
        let time = self.now();
        let mut replies = Vec::with_capacity(group.len());
        let mut results = Vec::with_capacity(group.len());
        for job in group {
            results.push(self.process(job.op, job.pre, &mut overlay, time));
            replies.push(job.reply);
        }
        // A storage failure or damaged data met while processing may have left an operation half-done
        // in the overlay and in memory: commit nothing of this group (nothing of it was acknowledged),
        // and stop, so that a reopen rebuilds the state from what is durable.
        if results
            .iter()
            .any(|r| r.as_ref().is_err_and(StoreError::is_internal))
        {
            self.rows.abandon();
            self.poisoned.store(true, Ordering::SeqCst);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Err(match result {
                    Err(own) if own.is_internal() => own,
                    _ => StoreError::Closed,
                }));
            }
            return;
        }
        let size = overlay.size;
        let outcome = (|| -> Result<(String, Hash), StoreError> {
            let root = Tree::new(&mut overlay).root(size).map_err(tree_err)?;
            let note = Checkpoint {
                origin: self.log_key.name().to_string(),
                size,
                root,
                extensions: vec![],
            }
            .sign(&self.log_key);
            overlay.put(layout::META_CHECKPOINT.to_vec(), note.clone().into_bytes());
            let (mut writes, logged) = overlay.take_writes()?;
            let postings = party::stage(&self.party, &mut writes, size, self.party_tail);
            self.rows.write(writes)?;
            postings.apply(&self.party);
            self.nodes.remember(logged);
            Ok((note, root))
        })();
        let (note, root) = match outcome {
            Ok(done) => done,
            Err(e) => {
                // The in-memory state may now be ahead of the storage: stop, and let a reopen rebuild it.
                self.rows.abandon();
                self.poisoned.store(true, Ordering::SeqCst);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        self.metrics
            .group_seconds
            .observe(started.elapsed().as_secs_f64());
        // The next group builds on this one (written, not durable yet); the syncer makes it durable.
        self.state.size = size;
        let written = Written {
            size,
            root,
            ack: Acknowledgement {
                size,
                note,
                replies: replies.into_iter().zip(results).collect(),
            },
        };
        match (&self.to_syncer, &mut self.syncer) {
            (Some(to_syncer), _) => {
                if let Err(mpsc::SendError(ToSyncer::Group(written))) =
                    to_syncer.send(ToSyncer::Group(written))
                {
                    // The syncer is gone (it panicked): nothing can be made durable any more.
                    self.poisoned.store(true, Ordering::SeqCst);
                    written.ack.fail(&StoreError::InDoubt(
                        "the store stopped while making this durable".into(),
                    ));
                }
            }
            (None, Some(syncer)) => syncer.finish(written),
            (None, None) => written.ack.fail(&StoreError::Closed),
        }
    }

    /// Appends a log entry to the overlay and the in-memory chain heads.
    pub(super) fn log(
        &mut self,
        overlay: &mut Overlay<'_>,
        kind: EntryKind,
        time: u64,
        subject: IdentityId,
        customer: Option<IdentityId>,
        payload: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let body = EntryBody {
            kind,
            time,
            subject,
            customer,
            prev: customer.and_then(|c| self.state.heads.get(&c).copied()),
            payload,
        };
        let encoded = body.encode();
        let salt = draw_salt(&mut rand::rng());
        let c = commitment(&salt, &encoded);
        let mut stored = salt.to_vec();
        stored.extend_from_slice(&encoded);
        let index = overlay.append_entry(stored, commitment_leaf(&c))?;
        let hash = EntryBody::hash(&encoded);
        overlay.logged.insert(
            index,
            SaltedBody {
                salt,
                body: encoded,
            },
        );
        if let Some(c) = customer {
            overlay.put(
                layout::key(tag::CUSTOMER_HEAD, &[&c.0]),
                index.to_be_bytes().to_vec(),
            );
            self.state.heads.insert(c, ChainLink { index, hash });
        }
        self.state.last_time = self.state.last_time.max(time);
        self.note_key_event(kind, subject, index);
        // A statement's rows are judged before it is applied (the caller writes them).
        if kind != EntryKind::Statement {
            let changes = index_changes(None, index, kind, subject, customer, &[]);
            apply_index(overlay, changes, &mut self.state.vaults_written);
        }
        Ok(index)
    }

    /// Indexes an identity's key event, so that counterparties can fetch the events and replay them.
    pub(super) fn note_key_event(&self, kind: EntryKind, subject: IdentityId, index: u64) {
        if matches!(
            kind,
            EntryKind::KeyEvent | EntryKind::DeviceCertificate | EntryKind::DeviceRevocation
        ) && let Ok(mut keys) = self.device_keys.write()
        {
            keys.events.entry(subject).or_default().push(index);
        }
    }

    pub(super) fn process(
        &mut self,
        op: Op,
        pre: Option<PreparedBatch>,
        overlay: &mut Overlay<'_>,
        time: u64,
    ) -> Result<Pending, StoreError> {
        // A registration is an inception, a rotation is not: checked before anything else, so that the
        // one is never answered as a repeat of the other.
        if let Op::Register(ev) | Op::Rotate(ev) = &op
            && (ev.event().seq == 0) != matches!(op, Op::Register(_))
        {
            return Err(StoreError::Malformed(
                "a registration is an inception, a rotation is not".into(),
            ));
        }
        // Idempotency: the same body under the same id returns the original index.
        let payload = op.payload();
        let idem = payload.as_deref().and_then(|p| op.idempotency_id(p));
        if let Some((id, digest)) = &idem
            && let Some(v) = overlay.get(&layout::key(tag::IDEMPOTENCY, &[&id.0]))?
        {
            if v.len() == 40 && v[..32] == digest.0 {
                let index = u64::from_be_bytes(
                    v[32..40]
                        .try_into()
                        .map_err(|_| StoreError::Format("idempotency record".into()))?,
                );
                return Ok(Pending {
                    index: Some(index),
                    read: None,
                    repeated: true,
                    head: None,
                    entry: None,
                });
            }
            return Err(StoreError::Conflict);
        }
        let index = overlay.size;
        let mut pending = self.apply_op(op, payload, pre, overlay, index, time)?;
        if let Some(i) = pending.index {
            pending.entry = overlay.logged.remove(&i);
        }
        overlay.logged.clear();
        if let (Some((id, digest)), Some(i)) = (idem, pending.index) {
            let mut v = digest.0.to_vec();
            v.extend_from_slice(&i.to_be_bytes());
            overlay.put(layout::key(tag::IDEMPOTENCY, &[&id.0]), v);
        }
        Ok(pending)
    }

    pub(super) fn logged(index: u64) -> Pending {
        Pending {
            index: Some(index),
            read: None,
            repeated: false,
            head: None,
            entry: None,
        }
    }

    pub(super) fn apply_op(
        &mut self,
        op: Op,
        payload: Option<Vec<u8>>,
        pre: Option<PreparedBatch>,
        overlay: &mut Overlay<'_>,
        index: u64,
        time: u64,
    ) -> Result<Pending, StoreError> {
        let parsed = match op {
            Op::Register(e) | Op::Rotate(e) => Parsed::KeyEvent(e),
            Op::Certify(c) => Parsed::Certificate(c),
            Op::RevokeDevice(r) => Parsed::Revocation(r),
            Op::PublishDirectory(d) => Parsed::Directory(d),
            Op::Statement(s) => Parsed::Statement(s),
            Op::Admission(b) => Parsed::decode(EntryKind::Admission, &b, &self.log_key.verifier())?,
            other => return self.apply_unlogged(other, payload, pre, overlay, index, time),
        };
        let kind = parsed.kind();
        let bytes =
            payload.ok_or_else(|| StoreError::Io("a statement without its bytes".into()))?;
        // A statement's index rows are judged from the consent state before it applies.
        let changes = match &parsed {
            Parsed::Statement(st) => {
                let s = st.statement();
                let consent = self.state.ledger.consent(&s.customer);
                Some(index_changes(
                    consent,
                    index,
                    EntryKind::Statement,
                    s.author,
                    Some(s.customer),
                    &bytes,
                ))
            }
            _ => None,
        };
        let (header, effect) =
            self.state
                .ledger
                .apply(&parsed, index, time, None, Signatures::Verify)?;
        self.publish(&parsed, &effect, index);
        match (&parsed, &effect) {
            (Parsed::Directory(dir), _) => {
                let customer = dir.directory().customer;
                overlay.put(layout::key(tag::DIRECTORY, &[&customer.0]), bytes.clone());
            }
            (Parsed::Statement(st), Effect::Statement(Some(target))) => {
                self.erase(overlay, st.statement().customer, *target)?;
            }
            _ => {}
        }
        let logged = self.log(overlay, kind, time, header.subject, header.customer, bytes)?;
        if let Some(changes) = changes {
            apply_index(overlay, changes, &mut self.state.vaults_written);
        }
        Ok(Self::logged(logged))
    }

    /// Applies what the ledger's verdict changes outside it: the keys that sign requests, the family
    /// ledgers a directory declares, the auditors the server admits. One step for the sequencer and for
    /// the replay at open.
    pub(super) fn publish(&mut self, parsed: &Parsed, effect: &Effect, index: u64) {
        match effect {
            Effect::Registered(id) => self.publish_identity_key(id),
            Effect::Rotated(id) => {
                self.publish_identity_key(id);
                self.unpublish_superseded(id, index);
            }
            Effect::Certified(id, device) => self.publish_device_key(id, device),
            Effect::Revoked(_, device) => self.unpublish_device_key(device),
            Effect::Directory(customer) => {
                // In the directory's order: family numbers must come out the same at every replay.
                if let Parsed::Directory(dir) = parsed {
                    for f in &dir.directory().families {
                        self.state.ensure_family(*customer, f.family, f.scope);
                    }
                }
            }
            Effect::Admission(_) => {
                if let Ok(mut keys) = self.device_keys.write() {
                    keys.auditors = self.state.ledger.auditors().clone();
                    keys.admissions.push(index);
                }
            }
            Effect::Statement(_) | Effect::FamilyHead | Effect::Access(_) => {}
        }
    }

    /// The operations that log no statement of their own: batches, reads, backups and head queries.
    pub(super) fn apply_unlogged(
        &mut self,
        op: Op,
        payload: Option<Vec<u8>>,
        pre: Option<PreparedBatch>,
        overlay: &mut Overlay<'_>,
        index: u64,
        time: u64,
    ) -> Result<Pending, StoreError> {
        match op {
            Op::WriteBatch {
                batch,
                records,
                access,
            } => {
                let bytes =
                    payload.ok_or_else(|| StoreError::Io("a batch without its bytes".into()))?;
                let checked = pre.and_then(|p| p.signature);
                self.write_batch(overlay, index, time, batch, bytes, records, access, checked)
            }
            Op::PutBackup {
                customer,
                version,
                bytes,
            } => {
                if bytes.len() > MAX_BACKUP {
                    return Err(StoreError::Malformed(format!(
                        "a key backup is at most {MAX_BACKUP} bytes"
                    )));
                }
                if self.state.ledger.consent(&customer).is_none() {
                    return Err(StoreError::NotFound(format!("customer {customer}")));
                }
                let key = layout::key(tag::BACKUP, &[&customer.0]);
                let current = overlay
                    .get(&key)?
                    .and_then(|v| v.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()))
                    .map_or(0, u64::from_be_bytes);
                if version != current + 1 {
                    return Err(StoreError::BackupConflict {
                        expected: current + 1,
                    });
                }
                let mut v = version.to_be_bytes().to_vec();
                v.extend_from_slice(&bytes);
                overlay.put(key, v);
                Ok(Pending {
                    index: None,
                    read: None,
                    repeated: false,
                    head: None,
                    entry: None,
                })
            }
            Op::Head {
                customer,
                family,
                caller,
                grant,
            } => {
                if caller != customer {
                    let grant = grant.ok_or_else(|| {
                        StoreError::Malformed("a company appends under a grant".into())
                    })?;
                    self.state
                        .consent(&customer)?
                        .may_append(caller, grant, family, index, time)
                        .map_err(StoreError::Denied)?;
                }
                let head = self
                    .state
                    .ledgers
                    .get(&(customer, family))
                    .ok_or_else(|| StoreError::NotFound("family".into()))?
                    .state
                    .head()
                    .digest();
                Ok(Pending {
                    index: None,
                    read: None,
                    repeated: false,
                    head: Some(head),
                    entry: None,
                })
            }
            Op::Read {
                customer,
                family,
                periods,
                cursor,
                limit,
                access,
            } => self.read(
                overlay,
                index,
                time,
                customer,
                family,
                periods,
                cursor,
                limit,
                access.as_ref(),
            ),
            Op::Register(_)
            | Op::Rotate(_)
            | Op::Certify(_)
            | Op::RevokeDevice(_)
            | Op::PublishDirectory(_)
            | Op::Statement(_)
            | Op::Admission(_) => Err(StoreError::Io(
                "a logged statement reached the unlogged operations".into(),
            )),
        }
    }

    /// After the identity key rotated at `index`: its devices certified under an earlier key no longer
    /// sign requests (a thief's device among them) until certified again under the new key.
    pub(super) fn unpublish_superseded(&self, identity: &IdentityId, index: u64) {
        let Some(state) = self.state.ledger.identity(identity) else {
            return;
        };
        let gone: Vec<DeviceId> = state
            .devices()
            .filter(|d| state.device_at(d, index + 1).is_err())
            .copied()
            .collect();
        for d in gone {
            self.unpublish_device_key(&d);
        }
    }

    /// Makes a certified device's key available to submitters (a device id fixes its key).
    pub(super) fn publish_device_key(&self, identity: &IdentityId, device: &DeviceId) {
        let key = self
            .state
            .ledger
            .identity(identity)
            .and_then(|s| s.device_key(device));
        if let (Some(key), Ok(mut keys)) = (key, self.device_keys.write()) {
            keys.devices.insert(*device, (*identity, key));
        }
    }

    /// Withdraws a revoked device's key: from then on no request signed by it authenticates. (Logged
    /// accesses are also checked against the device's validity at their own position when sequenced.)
    pub(super) fn unpublish_device_key(&self, device: &DeviceId) {
        if let Ok(mut keys) = self.device_keys.write() {
            keys.devices.remove(device);
        }
    }

    /// Makes an identity's current key available to submitters.
    pub(super) fn publish_identity_key(&self, identity: &IdentityId) {
        let key = self.state.ledger.identity(identity).map(|s| {
            let current = s.keys().current();
            (
                current.signing_key,
                s.keys().role(),
                current.next_key_digest,
            )
        });
        if let (Some(key), Ok(mut keys)) = (key, self.device_keys.write()) {
            keys.identities.insert(*identity, key);
        }
    }

    pub(super) fn erase(
        &mut self,
        overlay: &mut Overlay<'_>,
        customer: IdentityId,
        target: ErasureTarget,
    ) -> Result<(), StoreError> {
        let numbers: Vec<u64> = match target {
            // A family that never held a record has nothing stored to delete.
            ErasureTarget::Family(f) => self
                .state
                .family_number(&customer, &f)
                .ok()
                .into_iter()
                .collect(),
            ErasureTarget::Vault => self
                .state
                .family_numbers
                .iter()
                .filter(|((c, _), _)| *c == customer)
                .map(|(_, n)| *n)
                .collect(),
        };
        if target == ErasureTarget::Vault {
            overlay.delete(layout::key(tag::BACKUP, &[&customer.0]));
        }
        for prefix in numbers.into_iter().flat_map(layout::family_prefixes) {
            for kv in self.rows.scan_prefix(&prefix) {
                let (k, _) = kv?;
                overlay.delete(k);
            }
            // Records written earlier in this same group are not in the storage yet.
            let pending: Vec<Vec<u8>> = overlay
                .writes
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in pending {
                overlay.delete(k);
            }
        }
        Ok(())
    }

    /// Records an access the ledger already decided ([`Ledger::decide`]) at the next log position, and
    /// logs it. A refusal here is a bug (the same rule allowed it a moment ago): the group is then
    /// dropped rather than committed half-done.
    pub(super) fn log_access(
        &mut self,
        overlay: &mut Overlay<'_>,
        access: &AccessRecord,
        decided: Decided,
        time: u64,
    ) -> Result<u64, StoreError> {
        if decided.position() != overlay.size {
            return Err(StoreError::Io(format!(
                "an access decided for position {} would be logged at {}",
                decided.position(),
                overlay.size
            )));
        }
        let header = decided.header();
        let payload = access.encode();
        self.state
            .ledger
            .record(decided)
            .map_err(|e| StoreError::Io(format!("an access allowed, then refused: {e}")))?;
        self.log(
            overlay,
            EntryKind::Access,
            time,
            header.subject,
            header.customer,
            payload,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_batch(
        &mut self,
        overlay: &mut Overlay<'_>,
        index: u64,
        time: u64,
        signed: SignedBatch,
        batch_bytes: Vec<u8>,
        records: Vec<SealedRecord>,
        access: Option<AccessRecord>,
        checked: Option<bool>,
    ) -> Result<Pending, StoreError> {
        let b = signed.batch().clone();
        // The batch's own rules (signer valid here, a customer's epoch and rotation), by the ledger; a
        // signature already checked on the submitting thread is not checked again.
        let signatures = match checked {
            Some(true) => Signatures::Checked,
            Some(false) => return Err(StoreError::BadSignature("batch signature".into())),
            None => Signatures::Verify,
        };
        let head = Parsed::FamilyHead(signed);
        self.state
            .ledger
            .apply(&head, index, time, None, signatures)?;
        if records.is_empty() {
            return Err(StoreError::Malformed("a batch with no records".into()));
        }
        let mut append = None;
        if b.author != b.customer {
            let access = access.ok_or_else(|| {
                StoreError::Malformed("a company append carries its access record".into())
            })?;
            // The access is logged right after the batch: decided at that position, by the same rule
            // that records it below and that binds it to the batch (`cmr_log::ledger`).
            let decided = self.state.ledger.decide(&access, index + 1, time)?;
            append = Some((access, decided));
        }
        let number = self.state.family_number(&b.customer, &b.family)?;
        let Family { state, ids } = self
            .state
            .ledgers
            .get_mut(&(b.customer, b.family))
            .ok_or_else(|| StoreError::NotFound("family".into()))?;
        // `apply` checks everything before it changes anything, so a refusal changes nothing.
        let rows = FamilyRows::new(overlay, number, ids);
        let applied = state.apply(&rows, &b, &records)?.map_err(|e| match e {
            cmr_core::batch::BatchError::StaleHead { .. } => StoreError::StaleHead,
            other => StoreError::Refused(other.to_string()),
        })?;
        let new_head = applied.head;
        // The batch goes into the log once, as the family-head entry; each record names that entry.
        let head_index = overlay.size;
        // Each record is stored with the index of the entry of its batch, then its sealed bytes.
        let values: Vec<Vec<u8>> = records
            .iter()
            .map(|r| [&head_index.to_be_bytes()[..], r.as_bytes()].concat())
            .collect();
        stage_records(
            &mut overlay.writes,
            overlay.rows,
            number,
            applied
                .placements
                .iter()
                .zip(&values)
                .map(|((period, n), v)| (*period, *n, v.as_slice())),
            false,
        )?;
        for e in &b.entries {
            ids.insert(&e.id);
        }
        stage_ledger(&mut overlay.writes, overlay.rows, number, &b, &applied)?;
        for (k, v) in tree_rows(number, state, &applied) {
            overlay.put(k, v);
        }
        let logged = self.log(
            overlay,
            EntryKind::FamilyHead,
            time,
            b.author,
            Some(b.customer),
            batch_bytes,
        )?;
        debug_assert_eq!(logged, head_index);
        if let Some((access, decided)) = append {
            return self
                .log_access(overlay, &access, decided, time)
                .map(|i| Pending {
                    head: Some(new_head.digest()),
                    ..Self::logged(i)
                });
        }
        Ok(Pending {
            head: Some(new_head.digest()),
            ..Self::logged(head_index)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        &mut self,
        overlay: &mut Overlay<'_>,
        index: u64,
        time: u64,
        customer: IdentityId,
        family: FamilyId,
        periods: (Period, Period),
        cursor: Option<(Period, u64)>,
        limit: u64,
        access: Option<&AccessRecord>,
    ) -> Result<Pending, StoreError> {
        if periods.0 > periods.1 {
            return Err(StoreError::Malformed(format!(
                "the read runs from {} to {}: from is after to",
                periods.0, periods.1
            )));
        }
        // First decide and gather everything that can fail; only then log the access (and use up a
        // one-time grant), so that a refused read leaves no trace.
        let mut allowed = None;
        if let Some(access) = access {
            let decided = self.state.ledger.decide(access, index, time)?;
            let (header, attempt) = (decided.header(), decided.attempt());
            // The signed request must name exactly this read: the auditor replays the decision from it.
            if header.customer != Some(customer)
                || attempt.kind != AccessKind::Read
                || attempt.families != [family]
                || attempt.periods != periods
            {
                return Err(StoreError::Malformed(
                    "the access record does not match the read".into(),
                ));
            }
            allowed = Some((access, decided));
        } else if let Some(at) = self
            .state
            .ledger
            .consent(&customer)
            .and_then(|c| c.erased_at(&family))
        {
            return Err(StoreError::Denied(DenyReason::FamilyErased(at)));
        }
        let number = self.state.family_number(&customer, &family)?;
        let ledger = self
            .state
            .ledgers
            .get(&(customer, family))
            .ok_or_else(|| StoreError::NotFound("family".into()))?;
        let prove = |overlay: &Overlay<'_>, limit: u64| {
            let rows = FamilyRows::new(overlay, number, &ledger.ids);
            ledger
                .state
                .prove_read(&rows, periods.0, periods.1, cursor, limit)?
                .ok_or_else(|| StoreError::Malformed("bad read".into()))
        };
        let mut proof = prove(&*overlay, limit.clamp(1, 10_000))?;
        // The page is bounded by bytes as well as by count: records are gathered in order until the next
        // would pass the byte budget (at least one is always served), and the proof is then made again
        // for exactly those, so its cursor names where the next page starts. Memory per read is bounded
        // by the budget, not by the count asked for.
        let mut records = Vec::new();
        let mut record_batches = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        'pages: for page in &proof.pages {
            // A page's records are in consecutive pieces: one range read (one round trip to a
            // database) fetches them, stopping once past the byte budget left, so that what it holds
            // in memory stays near the budget however large the records.
            let room = self.max_page_bytes.saturating_sub(bytes);
            let end = page.start + page.ids.len() as u64;
            // Whether the read stopped at the budget (rather than at the page's end).
            let (rows, stopped) =
                read_records(overlay, number, page.period, (page.start, end), room)?;
            let mut rows = rows.into_iter();
            for (i, id) in page.ids.iter().enumerate() {
                let value = match rows.next() {
                    Some((n, v)) if n == page.start + i as u64 => v,
                    // The read stopped at the budget: the page ends here.
                    None if stopped => {
                        truncated = true;
                        break 'pages;
                    }
                    _ => return Err(StoreError::NotFound(format!("record {}", id.to_hex()))),
                };
                if value.len() <= 8 {
                    return Err(StoreError::Format("record value".into()));
                }
                if !records.is_empty() && bytes + value.len() - 8 > self.max_page_bytes {
                    truncated = true;
                    break 'pages;
                }
                bytes += value.len() - 8;
                record_batches.push(value[..8].to_vec());
                records.push(value[8..].to_vec());
            }
        }
        if truncated {
            proof = prove(&*overlay, records.len() as u64)?;
        }
        let mut batch_digests: Vec<Vec<u8>> = Vec::new();
        for d in record_batches {
            if !batch_digests.contains(&d) {
                batch_digests.push(d);
            }
        }
        let batches = batch_digests
            .iter()
            .map(|d| {
                let index = u64::from_be_bytes(
                    d.as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Format("record value".into()))?,
                );
                if let Some(payload) = self.batches.get(index) {
                    return Ok(payload);
                }
                let stored = overlay
                    .entry(index)?
                    .ok_or_else(|| StoreError::NotFound("batch entry".into()))?;
                let body = EntryBody::decode(stored.get(32..).unwrap_or_default())
                    .map_err(|e| StoreError::Format(e.to_string()))?;
                if body.kind != EntryKind::FamilyHead {
                    return Err(StoreError::Format(format!("entry {index} is not a batch")));
                }
                self.batches.put(index, body.payload.clone());
                Ok::<_, StoreError>(body.payload)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut logged = None;
        if let Some((access, decided)) = allowed {
            // The head the answer is proven against goes into the log with the access: the company's
            // client checks it is this answer's, so an older head would have to be logged as such.
            let mut access = access.clone();
            access.head = Some(proof.head.digest());
            logged = Some(self.log_access(overlay, &access, decided, time)?);
        }
        Ok(Pending {
            index: logged,
            head: None,
            read: Some(ReadResult {
                proof,
                records,
                batches,
            }),
            repeated: false,
            entry: None,
        })
    }
}
