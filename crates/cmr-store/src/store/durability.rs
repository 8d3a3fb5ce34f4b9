//! Durability: the syncer that makes written groups durable through the storage engine and acknowledges
//! them in order, and the durable view readers see (docs/durability.md).

use super::*;

/// The latest group known to be durable. Readers of the log see only this: the storage already holds
/// the group in progress after [`Storage::write`], but until [`Storage::sync`] returns, a crash can take
/// it back, and a checkpoint served in that window would later look like a fork.
#[derive(Default)]
pub(super) struct Durable {
    pub(super) size: u64,
    pub(super) checkpoint: Option<String>,
}
/// Moves the durable view up to `size` and its checkpoint, never down: this store's syncer and the
/// following of other stores' groups may report out of order.
pub(super) fn raise(view: &RwLock<Durable>, size: u64, checkpoint: &str) {
    let mut d = view.write().unwrap_or_else(|p| p.into_inner());
    if size >= d.size {
        d.size = size;
        d.checkpoint = Some(checkpoint.to_string());
    }
}

/// What the sequencer hands the syncer, in order.
pub(super) enum ToSyncer {
    /// A group to make durable and acknowledge.
    Group(Written),
    /// After the store recovered from a failure: every group before this one was answered; start
    /// afresh (forget the failure), and say so.
    Reset(mpsc::SyncSender<()>),
}

/// A group written to the storage, not yet durable.
pub(super) struct Written {
    pub(super) size: u64,
    pub(super) root: Hash,
    pub(super) ack: Acknowledgement,
}
/// Makes written groups durable, in order: the storage's sync; then the durable view readers see; then
/// the acknowledgements.
pub(super) struct Syncer {
    pub(super) rows: Arc<dyn Storage>,
    pub(super) nodes: Arc<NodeCache>,
    pub(super) durable: Arc<RwLock<Durable>>,
    pub(super) poisoned: Arc<AtomicBool>,
    /// Set after a group failed to become durable: every later group is in doubt too.
    pub(super) failed: Option<String>,
    pub(super) metrics: crate::metrics::StoreMetrics,
}
impl Syncer {
    pub(super) fn finish(&mut self, group: Written) {
        if let Some(why) = &self.failed {
            group.ack.fail(&StoreError::InDoubt(format!(
                "an earlier group could not be made durable: {why}"
            )));
            return;
        }
        let started = std::time::Instant::now();
        let synced = self.rows.sync(group.size, &group.root, &group.ack.note);
        self.metrics
            .sync_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = synced {
            // The in-memory state is ahead of the disk: stop, and let a reopen rebuild it.
            self.poisoned.store(true, Ordering::SeqCst);
            self.failed = Some(e.to_string());
            group.ack.fail(&StoreError::InDoubt(e.to_string()));
            return;
        }
        raise(&self.durable, group.size, &group.ack.note);
        group.ack.send(&*self.rows, &self.nodes);
    }
}
/// A durable group's replies, to be sent with their inclusion proofs.
pub(super) struct Acknowledgement {
    pub(super) size: u64,
    pub(super) note: String,
    pub(super) replies: Vec<(Reply, Result<Pending, StoreError>)>,
}
impl Acknowledgement {
    /// Answers every operation of the group with `e`.
    pub(super) fn fail(self, e: &StoreError) {
        for (reply, _) in self.replies {
            let _ = reply.send(Err(e.clone()));
        }
    }

    /// Sends each reply, with the inclusion proof of its entry in the group's checkpoint. The tree's
    /// nodes up to `size` never change, so this may run beside the sequencer's next group.
    pub(super) fn send(self, rows: &dyn Storage, nodes: &NodeCache) {
        let committed = Tree::new(Committed(rows, nodes, self.size));
        for (reply, result) in self.replies {
            let ack = result.and_then(|p| {
                let proof = match p.index {
                    Some(i) => committed.inclusion_proof(i, self.size).map_err(tree_err)?,
                    None => Vec::new(),
                };
                Ok(Ack {
                    index: p.index,
                    proof,
                    checkpoint: self.note.clone(),
                    size: self.size,
                    read: p.read,
                    repeated: p.repeated,
                    head: p.head,
                    entry: p.entry,
                })
            });
            let _ = reply.send(ack);
        }
    }
}
