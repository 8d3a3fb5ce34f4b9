//! The boundary between the server and the storage behind it.
//!
//! The server sees the vault's state only through [`Backend`]: it submits operations ([`Op`]) to be
//! sequenced and acknowledged once durable, and it reads the durable log and a few indexes. [`Store`]
//! (sled in a local folder) implements it. A later backend on PostgreSQL, or on a distributed
//! PostgreSQL-compatible engine, implements the same trait with the same vocabulary (`Op`, `Ack`,
//! `StoreError`) and the same contract, and the server does not change:
//! - one order: every operation is decided against the state its predecessors left, in the order it is
//!   logged (`evaluate`, expected head and epoch, compare-and-swap on directories and backups), so races
//!   are decided by log position;
//! - an acknowledgement only once the operation is durable, carrying its index, inclusion proof and the
//!   signed checkpoint that covers it; a refusal changes nothing; `InDoubt` when the backend cannot know;
//! - reads see only what is durable (the latest acknowledged checkpoint and below);
//! - idempotency by the operation's bytes.
//!
//! See docs/durability.md for how `Store` keeps this contract.

use cmr_core::hash::Digest;
use cmr_core::identity::{IdentityId, Role};
use cmr_core::keys::VerifyingKey;
use cmr_core::merkle::Hash;
use cmr_log::entry::SaltedBody;
use cmr_log::note::NoteVerifier;

use crate::{Ack, Op, Store, StoreError};

/// What the server needs from storage. Every method is cheap to call from an async handler except
/// where it says otherwise; [`Backend::submit`] never blocks.
pub trait Backend: Send + Sync {
    /// Queues an operation; the receiver gets its acknowledgement once it is durable, or its refusal.
    fn submit(&self, op: Op) -> tokio::sync::oneshot::Receiver<Result<Ack, StoreError>>;
    /// Whether the backend takes operations (a health check reports this).
    fn healthy(&self) -> bool;
    /// Stops taking operations after those already queued.
    fn close(&self);
    /// The verifier key of the log key that signs the checkpoints.
    fn log_verifier(&self) -> &NoteVerifier;
    /// The server time when the backend opened (the later of the clock and the last time in the log).
    fn start_time(&self) -> u64;
    /// Whether the log was empty when the backend opened (no request can be replayed across its start).
    fn opened_empty(&self) -> bool;
    /// The identity and key a request's `keyid` names (a device id, or `id:` and an identity id).
    fn signer_key(&self, keyid: &str) -> Option<(IdentityId, VerifyingKey)>;
    /// The role of a registered identity.
    fn role(&self, id: &IdentityId) -> Option<Role>;
    /// Whether an identity is an auditor the operator admitted, as of the durable log.
    fn is_admitted_auditor(&self, id: &IdentityId) -> bool;
    /// The durable entries of a customer's chain that concern `party`, oldest first, after `after`, at
    /// most `limit`, and whether more follow: O(page) from an index kept as entries are applied.
    fn party_entries(
        &self,
        customer: &IdentityId,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError>;
    /// The log indices of the requests waiting for a customer's answer, oldest first.
    fn pending_requests(&self, customer: &IdentityId) -> Result<Vec<u64>, StoreError>;
    /// The log indices of the durable auditor admission entries, oldest first.
    fn admissions(&self) -> Result<Vec<u64>, StoreError>;
    /// The log index of a customer's latest durable entry.
    fn customer_head(&self, customer: &IdentityId) -> Result<Option<u64>, StoreError>;
    /// The log indices of an identity's durable key events, oldest first.
    fn key_events(&self, id: &IdentityId) -> Result<Vec<u64>, StoreError>;
    /// The customers whose chains concern `party`, in id order after `after`, at most `limit`, and whether
    /// more follow.
    fn vaults_of(
        &self,
        party: &IdentityId,
        after: Option<&IdentityId>,
        limit: usize,
    ) -> Result<(Vec<IdentityId>, bool), StoreError>;
    /// Whether `key` is the next identity key that `id`'s current key event commits to.
    fn is_next_key(&self, id: &IdentityId, key: &cmr_core::keys::VerifyingKey) -> bool;
    /// A key-event head signed with the log key.
    fn sign_key_head(&self, head: &cmr_log::keyhead::KeyHead) -> String;
    /// A customer's current signed key directory, as stored.
    fn directory(&self, customer: &IdentityId) -> Result<Option<Vec<u8>>, StoreError>;
    /// A customer's key backup and its version.
    fn backup(&self, customer: &IdentityId) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// The latest durable checkpoint (a signed note).
    fn checkpoint(&self) -> Result<Option<String>, StoreError>;
    /// A client has verified the log up to `size`: on a backend several servers share, catch up with
    /// what the others made durable first, so that this server never answers with less than the client
    /// saw elsewhere. Blocks for at most a database round trip or two.
    fn follow_to(&self, size: u64);
    /// The inclusion proof of entry `index` in the tree of `size` entries.
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError>;
    /// The consistency proof between two tree sizes.
    fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError>;
    /// The root of the first `size` entries.
    fn root(&self, size: u64) -> Result<Hash, StoreError>;
    /// The leaf commitments `from..to`.
    fn commitments(&self, from: u64, to: u64) -> Result<Vec<Digest>, StoreError>;
    /// The salt and body of an entry, unless erased.
    fn body(&self, index: u64) -> Result<Option<SaltedBody>, StoreError>;
    /// What the store measures of itself, for `/metrics`.
    fn metrics(&self) -> &crate::metrics::StoreMetrics;
    /// The bytes the storage takes on disk, if it can tell.
    fn size_on_disk(&self) -> Result<Option<u64>, StoreError>;
    /// The note, signed with the log key, saying the store was restored from a snapshot (and to which
    /// log size), if it was.
    fn restored(&self) -> Result<Option<String>, StoreError>;
    /// The consent statements that concern `party` across every vault, after `after`: see
    /// [`Store::feed`].
    fn feed(
        &self,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, IdentityId)>, bool), StoreError>;
}

impl Backend for Store {
    fn metrics(&self) -> &crate::metrics::StoreMetrics {
        Store::metrics(self)
    }
    fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        Store::size_on_disk(self)
    }
    fn restored(&self) -> Result<Option<String>, StoreError> {
        Store::restored(self)
    }
    fn feed(
        &self,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, IdentityId)>, bool), StoreError> {
        Store::feed(self, party, after, limit)
    }
    fn submit(&self, op: Op) -> tokio::sync::oneshot::Receiver<Result<Ack, StoreError>> {
        Store::submit(self, op)
    }
    fn healthy(&self) -> bool {
        Store::healthy(self)
    }
    fn close(&self) {
        Store::close(self)
    }
    fn log_verifier(&self) -> &NoteVerifier {
        Store::log_verifier(self)
    }
    fn start_time(&self) -> u64 {
        Store::start_time(self)
    }
    fn opened_empty(&self) -> bool {
        Store::opened_empty(self)
    }
    fn signer_key(&self, keyid: &str) -> Option<(IdentityId, VerifyingKey)> {
        Store::signer_key(self, keyid)
    }
    fn role(&self, id: &IdentityId) -> Option<Role> {
        Store::role(self, id)
    }
    fn is_admitted_auditor(&self, id: &IdentityId) -> bool {
        Store::is_admitted_auditor(self, id)
    }
    fn party_entries(
        &self,
        customer: &IdentityId,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        Store::party_entries(self, customer, party, after, limit)
    }
    fn pending_requests(&self, customer: &IdentityId) -> Result<Vec<u64>, StoreError> {
        Store::pending_requests(self, customer)
    }
    fn admissions(&self) -> Result<Vec<u64>, StoreError> {
        Store::admissions(self)
    }
    fn customer_head(&self, customer: &IdentityId) -> Result<Option<u64>, StoreError> {
        Store::customer_head(self, customer)
    }
    fn key_events(&self, id: &IdentityId) -> Result<Vec<u64>, StoreError> {
        Store::key_events(self, id)
    }
    fn is_next_key(&self, id: &IdentityId, key: &cmr_core::keys::VerifyingKey) -> bool {
        Store::is_next_key(self, id, key)
    }
    fn vaults_of(
        &self,
        party: &IdentityId,
        after: Option<&IdentityId>,
        limit: usize,
    ) -> Result<(Vec<IdentityId>, bool), StoreError> {
        Store::vaults_of(self, party, after, limit)
    }
    fn sign_key_head(&self, head: &cmr_log::keyhead::KeyHead) -> String {
        Store::sign_key_head(self, head)
    }
    fn directory(&self, customer: &IdentityId) -> Result<Option<Vec<u8>>, StoreError> {
        Store::directory(self, customer)
    }
    fn backup(&self, customer: &IdentityId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Store::backup(self, customer)
    }
    fn checkpoint(&self) -> Result<Option<String>, StoreError> {
        Store::checkpoint(self)
    }
    fn follow_to(&self, size: u64) {
        Store::follow_to(self, size)
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        Store::inclusion_proof(self, index, size)
    }
    fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError> {
        Store::consistency_proof(self, old, new)
    }
    fn root(&self, size: u64) -> Result<Hash, StoreError> {
        Store::root(self, size)
    }
    fn commitments(&self, from: u64, to: u64) -> Result<Vec<Digest>, StoreError> {
        Store::commitments(self, from, to)
    }
    fn body(&self, index: u64) -> Result<Option<SaltedBody>, StoreError> {
        Store::body(self, index)
    }
}
