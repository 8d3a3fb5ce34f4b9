//! The store: one sequencer thread over sled, with group commit.
//!
//! Every state-changing operation goes through one queue. The sequencer takes a group of operations,
//! evaluates each against the current state (signatures, `evaluate`, epoch, head, directory), assigns log
//! indices and salts, writes the whole group in one atomic sled batch together with the tree nodes and a
//! newly signed checkpoint, makes it durable (sled flush, then `fdatasync` of sled's files), and only then
//! acknowledges every operation of the group with its index, an inclusion proof and that checkpoint.
//! An operation that is refused changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cmr_core::batch::{FamilyLedger, ReadProof, SignedBatch};
use cmr_core::consent::{Body, ErasureTarget, SignedStatement, StatementError, StatementId};
use cmr_core::decision::{AccessKind, ApplyError, ConsentState, DenyReason};
use cmr_core::directory::DirectoryError;
use cmr_core::directory::SignedDirectory;
use cmr_core::family::{FamilyId, Period};
use cmr_core::hash::{Digest, sha256, tagged_hash};
use cmr_core::identity::{
    DeviceCertificate, DeviceId, DeviceRevocation, IdentityId, Role, Signed, SignedKeyEvent,
};
use cmr_core::merkle::Hash;
use cmr_core::record::SealedRecord;
use cmr_log::admission::{AdmissionError, Auditors};
use cmr_log::checkpoint::Checkpoint;
use cmr_log::entry::{
    AccessRecord, ChainLink, EntryBody, EntryKind, SaltedBody, commitment, commitment_leaf,
    draw_salt,
};
use cmr_log::ledger::{Effect, Header, Ledger, Parsed, Refusal, Signatures};
use cmr_log::note::NoteSigner;
use cmr_log::tree::{NodeStore, Tree};
use thiserror::Error;

use crate::layout::{self, tag};

/// Why an operation was refused or failed. Refusals change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// Malformed input.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A signature or signer is not valid.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// Refused by the consent rules (`evaluate`).
    #[error("denied: {0}")]
    Denied(DenyReason),
    /// Refused by the consent state (a statement that cannot apply).
    #[error("refused: {0}")]
    Refused(String),
    /// Too many requests wait for the customer's answer.
    #[error("{0}")]
    TooManyRequests(String),
    /// The customer blocked this company: its requests (and grants to it) are refused.
    #[error("the company is blocked")]
    Blocked,
    /// The customer's request policy does not accept requests from this company.
    #[error("{0}")]
    NotAccepted(String),
    /// Another body was already written under this operation id.
    #[error("conflict: another body under the same id")]
    Conflict,
    /// The batch does not extend the family's current head.
    #[error("stale head")]
    StaleHead,
    /// The key backup does not replace the current one (compare-and-swap failed).
    #[error("backup conflict: expected version {expected}")]
    BackupConflict {
        /// The version that would have been accepted.
        expected: u64,
    },
    /// The directory does not replace the current one (compare-and-swap failed).
    #[error("directory conflict: expected version {expected}")]
    DirectoryConflict {
        /// The version that would have been accepted.
        expected: u64,
    },
    /// Unknown identity, family or entry.
    #[error("not found: {0}")]
    NotFound(String),
    /// The data folder is from a newer version, or damaged.
    #[error("store format: {0}")]
    Format(String),
    /// Storage failed; the store stops taking writes until it is reopened.
    #[error("storage failure: {0}")]
    Io(String),
    /// The store is shut down or stopped after a storage failure; the operation was not applied.
    #[error("the store is not accepting operations")]
    Closed,
    /// The group was written, but making it durable (or recording that it was) failed: the operation
    /// may or may not survive a crash, and the store stops. Sending it again after the restart gives
    /// exactly one result, since writes are idempotent.
    #[error("the write may or may not be durable: {0}")]
    InDoubt(String),
}

impl StoreError {
    /// A failure of the store itself (storage, damaged data), not a refusal of the operation.
    pub fn is_internal(&self) -> bool {
        matches!(self, StoreError::Io(_) | StoreError::Format(_))
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The largest key backup a customer may store.
pub const MAX_BACKUP: usize = 1024 * 1024;

/// A state-changing operation (or a read, which is logged as an access). Its statements arrive decoded
/// (the server parses each request once, at the edge, and refuses what does not parse); the store checks
/// them against the rules and logs their exact encoding.
#[derive(Debug, Clone)]
pub enum Op {
    /// Register an identity: its signed inception.
    Register(SignedKeyEvent),
    /// Rotate an identity key: the signed rotation.
    Rotate(SignedKeyEvent),
    /// Certify a device.
    Certify(Signed<DeviceCertificate>),
    /// Revoke a device.
    RevokeDevice(Signed<DeviceRevocation>),
    /// Publish the next key directory (compare-and-swap on its previous digest).
    PublishDirectory(SignedDirectory),
    /// Record a consent statement.
    Statement(SignedStatement),
    /// Admit or dismiss an auditor: the operator's statement signed with the log key
    /// ([`cmr_log::admission`]), opened by the store under its own key.
    Admission(Vec<u8>),
    /// Write a signed batch of records; a company's append carries its access record.
    WriteBatch {
        /// The signed batch.
        batch: SignedBatch,
        /// The sealed records, in batch order.
        records: Vec<SealedRecord>,
        /// For a company: the access record of its signed request.
        access: Option<AccessRecord>,
    },
    /// Replace a customer's key backup (compare-and-swap on its version): bytes sealed by the customer's
    /// client, which the store keeps but cannot open. Not logged; durable like every other operation.
    PutBackup {
        /// The vault.
        customer: IdentityId,
        /// The new version: the current one plus one (1 for the first).
        version: u64,
        /// The sealed backup.
        bytes: Vec<u8>,
    },
    /// A company reads families under a grant; the access is logged before anything is served.
    Read {
        /// The vault.
        customer: IdentityId,
        /// The family.
        family: FamilyId,
        /// First and last period, inclusive.
        periods: (Period, Period),
        /// Where the page starts.
        cursor: Option<(Period, u64)>,
        /// At most this many records.
        limit: u64,
        /// The access record of the signed request (company reads); `None` for the customer's own.
        access: Option<AccessRecord>,
    },
    /// The digest of a family's head, for an appender to extend (not logged: it reveals no record).
    Head {
        /// The vault.
        customer: IdentityId,
        /// The family.
        family: FamilyId,
        /// Who asks: the customer, or a company with `grant`.
        caller: IdentityId,
        /// The grant a company appends under.
        grant: Option<StatementId>,
    },
}

impl Op {
    /// The exact bytes an operation logs as its statement (for a batch, the signed batch), if any.
    fn payload(&self) -> Option<Vec<u8>> {
        Some(match self {
            Op::Register(e) | Op::Rotate(e) => e.encode(),
            Op::Certify(c) => c.encode(),
            Op::RevokeDevice(r) => r.encode(),
            Op::PublishDirectory(d) => d.encode(),
            Op::Statement(s) => s.encode(),
            Op::Admission(b) => b.clone(),
            Op::WriteBatch { batch, .. } => batch.encode(),
            Op::Read { .. } | Op::Head { .. } | Op::PutBackup { .. } => return None,
        })
    }

    /// The id an operation is idempotent under, and the digest of its bytes: the same bytes again are a
    /// repeat, other bytes under the same id a conflict.
    fn idempotency_id(&self, payload: &[u8]) -> Option<(Digest, Digest)> {
        let id = match self {
            Op::Statement(s) => Digest(s.id().0),
            Op::WriteBatch { batch, .. } => batch.digest(),
            Op::Read { .. } | Op::Head { .. } | Op::PutBackup { .. } => return None,
            _ => tagged_hash("op-id", payload),
        };
        Some((id, sha256(payload)))
    }
}

/// What a read returns: the proof, and the records and batches exactly as stored (they were checked
/// when written; the reader decodes and verifies them, the server only passes them on).
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// The completeness proof against the named head.
    pub proof: ReadProof,
    /// The sealed records of the proof's pages, in order, encoded.
    pub records: Vec<Vec<u8>>,
    /// The signed batches naming them, encoded.
    pub batches: Vec<Vec<u8>>,
}

impl ReadResult {
    /// The records, decoded.
    pub fn sealed_records(&self) -> Result<Vec<SealedRecord>, cmr_core::encoding::DecodeError> {
        self.records
            .iter()
            .map(|r| SealedRecord::decode(r.clone()))
            .collect()
    }

    /// The batches, decoded.
    pub fn signed_batches(&self) -> Result<Vec<SignedBatch>, cmr_core::encoding::DecodeError> {
        self.batches
            .iter()
            .map(|b| SignedBatch::decode(b))
            .collect()
    }
}

/// An acknowledgement: the entry's index, its inclusion proof, and the checkpoint that covers it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The log index (`None` for a customer's own read, which is not logged).
    pub index: Option<u64>,
    /// The inclusion proof of the entry in the checkpoint.
    pub proof: Vec<Hash>,
    /// The signed checkpoint, durable before this acknowledgement.
    pub checkpoint: String,
    /// The checkpoint's size.
    pub size: u64,
    /// For reads.
    pub read: Option<ReadResult>,
    /// True when this repeats an operation already logged (idempotent retry).
    pub repeated: bool,
    /// After a batch: the digest of the family's head it produced (the next batch extends it).
    pub head: Option<Digest>,
    /// The salted body of the entry at `index`, when this operation logged it (not for a repeat): the
    /// answer carries it without reading it back.
    pub entry: Option<SaltedBody>,
}

/// How to open a store.
pub struct StoreConfig {
    /// The data folder.
    pub path: PathBuf,
    /// sled's page cache, in bytes (sled's default is 1 GiB; this store sets it on purpose).
    pub cache_capacity: u64,
    /// The log's signing key (kept outside the data folder by the caller).
    pub log_key: NoteSigner,
    /// The most operations in one group commit.
    pub max_group: usize,
    /// The server clock, Unix seconds.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The most record bytes one read answer carries ([`MAX_PAGE_BYTES`] by default); the reader
    /// follows the cursor for the rest.
    pub max_page_bytes: usize,
}

/// The most record bytes in one read answer by default: 4 MiB (about 5.4 MB of JSON with base64).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// sled's cache in a default configuration. sled's own default is 1 GiB. Its cache mostly repeats the OS
/// page cache, which holds the same files: 16 MiB served reads and appends as fast as 128 MiB, at a
/// million records too, with over 100 MiB less memory (docs/performance.md).
pub const DEFAULT_CACHE: u64 = 16 * 1024 * 1024;

impl StoreConfig {
    /// A configuration with [`DEFAULT_CACHE`], groups of up to 256 operations and the system clock.
    pub fn new(path: impl AsRef<Path>, log_key: NoteSigner) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            cache_capacity: DEFAULT_CACHE,
            log_key,
            max_group: 256,
            max_page_bytes: MAX_PAGE_BYTES,
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
        }
    }
}

/// Where an operation's acknowledgement or refusal goes.
type Reply = tokio::sync::oneshot::Sender<Result<Ack, StoreError>>;

struct Job {
    op: Op,
    pre: Option<PreparedBatch>,
    reply: Reply,
}

/// What the submitting thread checked of a batch, so that the sequencer only checks what depends on
/// the log position.
struct PreparedBatch {
    /// `Some(ok)` if the device's key was known when submitted (a device id fixes its key), else `None`.
    signature: Option<bool>,
}

/// The keys that may sign requests, shared by the sequencer (which adds them as it logs identities and
/// devices) and by submitters and the server (which verify). A device id fixes its key; an identity's
/// entry is its current identity key.
#[derive(Debug, Default)]
pub struct KeyIndex {
    devices: HashMap<DeviceId, (IdentityId, cmr_core::keys::VerifyingKey)>,
    /// Each identity's current key, its role, and the digest of its next key (which a recovering device
    /// reveals).
    identities: HashMap<IdentityId, (cmr_core::keys::VerifyingKey, Role, Digest)>,
    /// Each identity's key events (inception, rotations, device certificates and revocations), by log
    /// index in order: what a counterparty replays to learn the identity's keys.
    events: HashMap<IdentityId, Vec<u64>>,
    /// The admitted auditors, and the log indices of every admission entry, oldest first.
    auditors: Auditors,
    admissions: Vec<u64>,
}

type DeviceKeys = Arc<std::sync::RwLock<KeyIndex>>;

/// The store. Cloneable handle semantics through `Arc`; drop the last one to stop the sequencer.
pub struct Store {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    db: sled::Tree,
    durable: Arc<RwLock<Durable>>,
    start_time: u64,
    opened_empty: bool,
    device_keys: DeviceKeys,
    log_verifier: cmr_log::note::NoteVerifier,
    /// The log key, shared with the sequencer (which signs checkpoints with it).
    log_key: Arc<NoteSigner>,
    stopped: Arc<AtomicBool>,
}

/// The index rows an entry adds and removes ([`layout::tag::PARTY`], [`layout::tag::PENDING`]), judged
/// from the customer's consent state *before* the entry is applied. One function for the sequencer and
/// for the migration of a store written before the indexes existed.
#[derive(Default)]
struct IndexChanges {
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
}

fn index_changes(
    consent: Option<&ConsentState>,
    index: u64,
    kind: EntryKind,
    subject: IdentityId,
    customer: Option<IdentityId>,
    payload: &[u8],
) -> IndexChanges {
    let mut out = IndexChanges::default();
    let Some(c) = customer else { return out };
    let mut parties = Vec::new();
    match (kind, consent) {
        (EntryKind::Statement, Some(consent)) => {
            let Ok(st) = SignedStatement::decode(payload) else {
                return out;
            };
            parties = consent.concerned(&st);
            let pending = |company: IdentityId, request: StatementId| {
                layout::pending(&c.0, &company.0, &request.0)
            };
            match &st.statement().body {
                Body::Request(_) => out.puts.push((
                    pending(st.statement().author, st.id()),
                    index.to_be_bytes().to_vec(),
                )),
                Body::Grant(g) => {
                    if let Some(r) = g.request
                        && let Some(company) = consent.requester(&r)
                    {
                        out.deletes.push(pending(company, r));
                    }
                }
                Body::Denial { request, .. } => {
                    if let Some(company) = consent.requester(request) {
                        out.deletes.push(pending(company, *request));
                    }
                }
                Body::Block {
                    company,
                    blocked: true,
                } => {
                    for r in consent.waiting_requests(company) {
                        out.deletes.push(pending(*company, r));
                    }
                }
                _ => {}
            }
        }
        _ if subject != c => parties.push(subject),
        _ => {}
    }
    for p in parties {
        out.puts
            .push((layout::party(&c.0, &p.0, index), Vec::new()));
        out.puts.push((layout::vault_of(&p.0, &c.0), Vec::new()));
    }
    out
}

fn apply_index(overlay: &mut Overlay<'_>, changes: IndexChanges) {
    for k in changes.deletes {
        overlay.delete(k);
    }
    for (k, v) in changes.puts {
        overlay.put(k, v);
    }
}

/// The latest group known to be durable. Readers of the log see only this: sled already holds the
/// group in progress after `apply_batch`, but until its `fdatasync` returns, a crash can take it back,
/// and a checkpoint served in that window would later look like a fork.
#[derive(Default)]
struct Durable {
    size: u64,
    checkpoint: Option<String>,
}

/// What the sequencer owns.
struct Sequencer {
    tree: sled::Tree,
    log_key: Arc<NoteSigner>,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    max_group: usize,
    max_page_bytes: usize,
    state: State,
    /// Set when the sequencer stopped taking operations after a failure (shared with [`Store`]).
    poisoned: Arc<AtomicBool>,
    device_keys: DeviceKeys,
    /// What makes groups durable: moved onto its own thread when the sequencer runs.
    syncer: Option<Syncer>,
    /// Where written groups go to be made durable and acknowledged, once the sequencer runs.
    to_syncer: Option<mpsc::SyncSender<Written>>,
}

/// The in-memory state, rebuilt from the log when the store opens.
#[derive(Default)]
struct State {
    size: u64,
    last_time: u64,
    /// The rules' state: identities, devices, consent, directories, auditors ([`cmr_log::ledger`]).
    ledger: Ledger,
    ledgers: HashMap<(IdentityId, FamilyId), FamilyLedger>,
    heads: HashMap<IdentityId, ChainLink>,
    /// A short number for each family, in the order the families were declared (so the same after a
    /// replay): record keys carry it instead of two 32-byte ids.
    family_numbers: HashMap<(IdentityId, FamilyId), u64>,
}

impl State {
    /// Declares a family from a directory: its ledger and its number.
    fn ensure_family(
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
            .or_insert_with(|| FamilyLedger::new(customer, family, scope));
    }

    /// The family's number in record keys.
    fn family_number(&self, customer: &IdentityId, family: &FamilyId) -> Result<u64, StoreError> {
        self.family_numbers
            .get(&(*customer, *family))
            .copied()
            .ok_or_else(|| StoreError::NotFound("family".into()))
    }

    /// A customer's consent state.
    fn consent(&self, customer: &IdentityId) -> Result<&ConsentState, StoreError> {
        self.ledger
            .consent(customer)
            .ok_or_else(|| StoreError::NotFound("customer".into()))
    }
}

impl From<Refusal> for StoreError {
    /// The rules' refusals, as the store's callers (and the server's problem codes) know them.
    fn from(r: Refusal) -> Self {
        let text = r.to_string();
        match r {
            Refusal::Identity(_)
            | Refusal::BadSignature(_)
            | Refusal::Statement(StatementError::Signature(_) | StatementError::WrongAuthor)
            | Refusal::Directory(DirectoryError::Signature(_))
            | Refusal::Admission(AdmissionError::NotSigned) => StoreError::BadSignature(text),
            Refusal::Decode(..)
            | Refusal::Header(_)
            | Refusal::Unbound(_)
            | Refusal::Statement(_)
            | Refusal::Directory(_)
            | Refusal::Admission(AdmissionError::Malformed(_)) => StoreError::Malformed(text),
            Refusal::AlreadyRegistered(_) => StoreError::Conflict,
            Refusal::UnknownIdentity(id) => StoreError::NotFound(format!("identity {id}")),
            Refusal::UnknownCustomer(_) => StoreError::NotFound("customer".into()),
            Refusal::UnknownFamily => StoreError::NotFound("family".into()),
            Refusal::DirectoryVersion { expected } => StoreError::DirectoryConflict { expected },
            Refusal::Consent(ApplyError::Blocked) => StoreError::Blocked,
            Refusal::Consent(
                ApplyError::TooManyRequests { .. } | ApplyError::DailyCapReached { .. },
            ) => StoreError::TooManyRequests(text),
            Refusal::Consent(ApplyError::NotAccepted) => StoreError::NotAccepted(text),
            Refusal::Consent(_) | Refusal::Admission(_) => StoreError::Refused(text),
            Refusal::Denied(reason) => StoreError::Denied(reason),
        }
    }
}

/// A node store over sled plus the writes of the group in progress.
struct Overlay<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    size: u64,
    /// The bodies the operation in progress logged, by index, for its acknowledgement.
    logged: HashMap<u64, SaltedBody>,
}

impl Overlay<'_> {
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(k) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(k).map_err(io)?.map(|v| v.to_vec())),
        }
    }

    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }

    fn delete(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }
}

impl NodeStore for &mut Overlay<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        Ok(self
            .get(&layout::node(level, index))?
            .and_then(|v| v.try_into().ok()))
    }
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), StoreError> {
        self.put(layout::node(level, index), hash.to_vec());
        Ok(())
    }
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.size)
    }
    fn set_size(&mut self, size: u64) -> Result<(), StoreError> {
        self.size = size;
        self.put(layout::META_SIZE.to_vec(), size.to_be_bytes().to_vec());
        Ok(())
    }
}

/// Read-only node store over the committed sled tree.
struct Committed<'a>(&'a sled::Tree, u64);

impl NodeStore for Committed<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        Ok(self
            .0
            .get(layout::node(level, index))
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok()))
    }
    fn set_node(&mut self, _: u8, _: u64, _: Hash) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.1)
    }
    fn set_size(&mut self, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
}

fn tree_err(e: cmr_log::tree::TreeError<StoreError>) -> StoreError {
    match e {
        cmr_log::tree::TreeError::Store(e) => e,
        other => StoreError::Format(other.to_string()),
    }
}

/// What the last durability step saw of each file in the data folder: its length and modification time.
type FileStates = HashMap<PathBuf, (u64, std::time::SystemTime)>;

/// The file, beside sled's, that records the newest acknowledged log size and root.
pub const ACK_MARK: &str = "acknowledged";

/// The acknowledgement mark: after each group is durable (sled's flush and the `fdatasync`s) and before
/// it is acknowledged, the group's size and root are written to [`ACK_MARK`], in place, without a sync.
/// sled treats damage in its files as a torn tail and silently opens an older state; the mark makes that a
/// clear error instead: a store that opens with fewer entries than it acknowledged, or another root at
/// that size, is refused. The mark is never ahead of what sled made durable (it is written after), so a
/// power loss can only leave it behind (it then checks less) or torn (its checksum fails: it is ignored).
struct AckMark {
    file: std::fs::File,
}

/// magic, size, root, SHA-256 of the first 44 bytes.
const MARK_LEN: usize = 4 + 8 + 32 + 32;
const MARK_MAGIC: &[u8; 4] = b"CMRa";

impl AckMark {
    fn open(dir: &Path) -> Result<(Self, Option<(u64, Hash)>), StoreError> {
        let path = dir.join(ACK_MARK);
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        if !existed {
            file.sync_all().map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        let mark = (bytes.len() == MARK_LEN
            && &bytes[..4] == MARK_MAGIC
            && sha256(&bytes[..44]).0[..] == bytes[44..])
            .then(|| {
                let size = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
                let root: Hash = bytes[12..44].try_into().expect("32 bytes");
                (size, root)
            });
        Ok((AckMark { file }, mark))
    }

    fn write(&self, size: u64, root: &Hash) -> Result<(), StoreError> {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut bytes = Vec::with_capacity(MARK_LEN);
        bytes.extend_from_slice(MARK_MAGIC);
        bytes.extend_from_slice(&size.to_be_bytes());
        bytes.extend_from_slice(root);
        let sum = sha256(&bytes);
        bytes.extend_from_slice(&sum.0);
        let mut file = &self.file;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&bytes).map_err(io)
    }
}

/// `fdatasync` every file sled changed in the data folder since the last call, and the folders whose set
/// of files changed: sled's own flush uses `sync_file_range`, which does not survive power loss (sled
/// issue 1452). An fsync costs about 0.2 ms here even on a clean file, so unchanged files are skipped.
fn sync_dir(path: &Path, seen: &mut FileStates) -> Result<(), StoreError> {
    fn walk(p: &Path, seen: &mut FileStates, present: &mut Vec<PathBuf>) -> std::io::Result<bool> {
        let mut dir_changed = false;
        for entry in std::fs::read_dir(p)? {
            let entry = entry?;
            let path = entry.path();
            let result = (|| -> std::io::Result<()> {
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    if walk(&path, seen, present)? {
                        std::fs::File::open(&path)?.sync_all()?;
                    }
                    return Ok(());
                }
                // The acknowledgement mark is written, never synced, after each group (see
                // `AckMark`): syncing it would double the cost of every group.
                if path.file_name() == Some(std::ffi::OsStr::new(ACK_MARK)) {
                    return Ok(());
                }
                present.push(path.clone());
                let state = (meta.len(), meta.modified()?);
                // sled rewrites its main file in place, often at the same length, and a modification
                // time may not move between two groups (coarse timestamps): it is synced every time.
                // The other files are written once under new names (snapshots, blobs), so a file not
                // seen before, or with another length or time, is what needs syncing there.
                let rewritten_in_place = path.file_name() == Some(std::ffi::OsStr::new("db"));
                match seen.get(&path) {
                    Some(s) if *s == state && !rewritten_in_place => {}
                    previous => {
                        dir_changed |= previous.is_none();
                        std::fs::File::open(&path)?.sync_data()?;
                        seen.insert(path.clone(), state);
                    }
                }
                Ok(())
            })();
            match result {
                // sled replaces old snapshot files as it goes: a file gone has nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir_changed = true,
                other => other?,
            }
        }
        Ok(dir_changed)
    }
    let mut present = Vec::new();
    let changed = walk(path, seen, &mut present).map_err(io)?;
    if changed || present.len() != seen.len() {
        seen.retain(|p, _| present.contains(p));
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Opens sled. sled releases its folder lock only when its I/O threads let go of the files, a moment
/// after the last handle is dropped: a reopen in the same process waits up to two seconds for that,
/// and a folder still locked after it belongs to another process.
fn open_sled(config: &StoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Format(
                    "the data folder is in use by another process".into(),
                ));
            }
            Err(e) => {
                return Err(StoreError::Format(format!(
                    "cannot open the data folder: {e}"
                )));
            }
        }
    }
}

impl Store {
    /// Opens (or creates) the store: checks the format version, rebuilds the state from the log, and
    /// starts the sequencer.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let db = open_sled(&config)?;
        let tree = db.open_tree("cmr").map_err(io)?;
        let mut add_indexes = false;
        match tree.get(layout::META_FORMAT).map_err(io)? {
            None => {
                if tree.iter().next().is_some() {
                    return Err(StoreError::Format("data without a format version".into()));
                }
                // Made durable with everything else recovered, below, before anything is served.
                tree.insert(layout::META_FORMAT, &layout::FORMAT_VERSION.to_be_bytes())
                    .map_err(io)?;
            }
            Some(v) => {
                let version = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Format("corrupted format version".into()))?;
                if layout::FORMATS_WITHOUT_INDEXES.contains(&version) {
                    // Written before some of the indexes: the replay below adds them.
                    add_indexes = true;
                } else if version != layout::FORMAT_VERSION {
                    return Err(StoreError::Format(format!(
                        "data folder has format {version}, this build reads {}",
                        layout::FORMAT_VERSION
                    )));
                }
            }
        }
        let (mark, acknowledged) = AckMark::open(&config.path)?;
        let durable = Arc::new(RwLock::new(Durable::default()));
        let poisoned = Arc::new(AtomicBool::new(false));
        let mut syncer = Syncer {
            db,
            tree: tree.clone(),
            path: config.path.clone(),
            synced: FileStates::new(),
            mark,
            durable: durable.clone(),
            poisoned: poisoned.clone(),
            failed: None,
        };
        let mut seq = Sequencer {
            tree: tree.clone(),
            log_key: Arc::new(config.log_key),
            clock: config.clock,
            max_group: config.max_group.max(1),
            max_page_bytes: config.max_page_bytes.max(1),
            state: State::default(),
            poisoned: poisoned.clone(),
            device_keys: DeviceKeys::default(),
            syncer: None,
            to_syncer: None,
        };
        let device_keys = seq.device_keys.clone();
        let log_verifier = seq.log_key.verifier();
        let log_key = seq.log_key.clone();
        seq.rebuild(add_indexes)?;
        if add_indexes {
            tree.insert(layout::META_FORMAT, &layout::FORMAT_VERSION.to_be_bytes())
                .map_err(io)?;
        }
        if let Some((size, root)) = acknowledged {
            let held = seq.state.size;
            let same = size <= held
                && Tree::new(Committed(&seq.tree, held))
                    .root(size)
                    .map_err(tree_err)?
                    == root;
            if !same {
                return Err(StoreError::Format(format!(
                    "the data folder holds {held} log entries, but this store acknowledged {size} with \
                     another history: sled's files were damaged or replaced by an older copy. Restore \
                     a backup of the whole folder (with its `acknowledged` file); to accept the loss \
                     instead, remove {} and open again",
                    config.path.join(ACK_MARK).display()
                )));
            }
        }
        // What sled recovered may sit only in the page cache (a kill -9 does not flush it to the disk):
        // make it durable before anything is served from it.
        syncer.db.flush().map_err(io)?;
        sync_dir(&config.path, &mut syncer.synced)?;
        {
            let checkpoint = tree
                .get(layout::META_CHECKPOINT)
                .map_err(io)?
                .map(|v| String::from_utf8_lossy(&v).into_owned());
            let mut d = durable.write().unwrap_or_else(|p| p.into_inner());
            d.size = seq.state.size;
            d.checkpoint = checkpoint;
        }
        seq.syncer = Some(syncer);
        let stopped = poisoned;
        let start_time = seq.now();
        let opened_empty = seq.state.size == 0;
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("cmr-sequencer".into())
            .spawn(move || seq.run(rx))
            .map_err(io)?;
        Ok(Store {
            tx: Mutex::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
            db: tree,
            durable,
            start_time,
            opened_empty,
            device_keys,
            log_verifier,
            log_key,
            stopped,
        })
    }

    /// Whether the store takes operations. After a storage failure, damaged data or a bug in the
    /// sequencer it stops (every operation is answered [`StoreError::Closed`]) until it is reopened,
    /// which rebuilds its state from what is durable; a health check reports this.
    pub fn healthy(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst)
    }

    /// The verifier key of the log key that signs this store's checkpoints.
    pub fn log_verifier(&self) -> &cmr_log::note::NoteVerifier {
        &self.log_verifier
    }

    /// The server time when the store opened (the later of the clock and the last time in the log).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Whether the log was empty when the store opened. Such a store has never accepted a signed request
    /// (registration is the first one, and it is logged), so no request can be replayed across its start.
    pub fn opened_empty(&self) -> bool {
        self.opened_empty
    }

    /// Queues an operation; the receiver gets its acknowledgement once it is durable.
    pub fn submit(&self, op: Op) -> tokio::sync::oneshot::Receiver<Result<Ack, StoreError>> {
        let (op, pre) = self.prepare(op);
        let (reply, rx) = tokio::sync::oneshot::channel();
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.as_ref()
            && tx.send(Job { op, pre, reply }).is_ok()
        {
            return rx;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = reply.send(Err(StoreError::Closed));
        rx
    }

    /// Checks a batch's signature here, on the caller's thread, so that concurrent writers do this work
    /// in parallel (a device id fixes its key); whether the device may sign at the batch's position is
    /// checked again when it is sequenced.
    fn prepare(&self, op: Op) -> (Op, Option<PreparedBatch>) {
        let Op::WriteBatch { batch, .. } = &op else {
            return (op, None);
        };
        let key = self
            .device_keys
            .read()
            .ok()
            .and_then(|k| k.devices.get(&batch.batch().device).map(|(_, key)| *key));
        let signature = key.map(|k| batch.verify(&k).is_ok());
        (op, Some(PreparedBatch { signature }))
    }

    /// The identity and key a request's `keyid` names: a device id (64 hex digits) or an identity id
    /// prefixed `id:` (the identity's current key, for registration and device certification). `None` if
    /// unknown. Whether a device is still valid is checked again when the operation is sequenced.
    pub fn signer_key(&self, keyid: &str) -> Option<(IdentityId, cmr_core::keys::VerifyingKey)> {
        let keys = self.device_keys.read().ok()?;
        match keyid.strip_prefix("id:") {
            Some(id) => {
                let id = IdentityId::from_hex(id)?;
                keys.identities.get(&id).map(|(k, _, _)| (id, *k))
            }
            None => keys
                .devices
                .get(&DeviceId(Digest::from_hex(keyid)?.0))
                .copied(),
        }
    }

    /// The log index of a customer's latest durable entry.
    pub fn customer_head(&self, customer: &IdentityId) -> Result<Option<u64>, StoreError> {
        let size = self.committed_size()?;
        let mut head = self
            .db
            .get(layout::key(tag::CUSTOMER_HEAD, &[&customer.0]))
            .map_err(io)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        // Entries past the durable view belong to a group still being synced: walk back to the newest
        // durable one (at most one group's worth of steps; each body was written with its head).
        while let Some(i) = head
            && i >= size
        {
            let Some(v) = self.db.get(layout::indexed(tag::BODY, i)).map_err(io)? else {
                break;
            };
            let body = v
                .get(32..)
                .and_then(|b| EntryBody::decode(b).ok())
                .ok_or_else(|| StoreError::Format(format!("entry {i} does not decode")))?;
            head = body.prev.map(|p| p.index);
        }
        Ok(head)
    }

    /// The log indices of an identity's durable key events (inception, rotations, device certificates and
    /// revocations), oldest first. Empty for an unknown identity.
    pub fn key_events(&self, id: &IdentityId) -> Result<Vec<u64>, StoreError> {
        let size = self.committed_size()?;
        let keys = self.device_keys.read().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .events
            .get(id)
            .map(|v| v.iter().copied().filter(|i| *i < size).collect())
            .unwrap_or_default())
    }

    /// The log indices of the durable entries of `customer`'s chain that concern `party` (a company's
    /// relationship view), oldest first, after `after`, at most `limit`; and whether more follow. One
    /// range scan of the party index: O(page), whatever the chain's length.
    pub fn party_entries(
        &self,
        customer: &IdentityId,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let size = self.committed_size()?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let from = layout::party(&customer.0, &party.0, start);
        let to = layout::party(&customer.0, &party.0, size);
        let mut out = Vec::new();
        for kv in self.db.range(from..to) {
            let (k, _) = kv.map_err(io)?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let index = k
                .get(65..73)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Format("party index key".into()))?;
            out.push(index);
        }
        Ok((out, false))
    }

    /// The customers whose chains concern `party` (durable entries only), in id order after `after`, at
    /// most `limit`; and whether more follow. One range scan of the vaults-of index.
    pub fn vaults_of(
        &self,
        party: &IdentityId,
        after: Option<&IdentityId>,
        limit: usize,
    ) -> Result<(Vec<IdentityId>, bool), StoreError> {
        let from = match after {
            Some(a) => {
                let mut k = layout::vault_of(&party.0, &a.0);
                k.push(0);
                k
            }
            None => layout::vault_of(&party.0, &[0; 32]),
        };
        let to = layout::key(tag::VAULTS_OF, &[&party.0, &[0xff; 32], &[0xff]]);
        let mut out = Vec::new();
        for kv in self.db.range(from..to) {
            let (k, _) = kv.map_err(io)?;
            let customer = k
                .get(33..65)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(IdentityId)
                .ok_or_else(|| StoreError::Format("vaults-of index key".into()))?;
            // A row written by a group still being synced names a vault whose first entry about this
            // party is not durable yet: answer it only once one is.
            if self.party_entries(&customer, party, None, 1)?.0.is_empty() {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(customer);
        }
        Ok((out, false))
    }

    /// The log indices of the requests waiting for `customer`'s answer, oldest first (at most
    /// `cmr_core::decision::MAX_PENDING_PER_VAULT`: one range scan).
    pub fn pending_requests(&self, customer: &IdentityId) -> Result<Vec<u64>, StoreError> {
        let size = self.committed_size()?;
        let mut out = Vec::new();
        for kv in self
            .db
            .scan_prefix(layout::key(layout::tag::PENDING, &[&customer.0]))
        {
            let (_, v) = kv.map_err(io)?;
            let index = <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Format("pending index value".into()))?;
            if index < size {
                out.push(index);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Whether `id` is an auditor the operator admitted, as of the durable log.
    pub fn is_admitted_auditor(&self, id: &IdentityId) -> bool {
        let Ok(size) = self.committed_size() else {
            return false;
        };
        let keys = self.device_keys.read().unwrap_or_else(|p| p.into_inner());
        keys.auditors
            .all()
            .any(|(a, s)| a == id && s.admitted && s.since < size)
    }

    /// The log indices of the durable admission entries, oldest first: who was admitted or dismissed as
    /// an auditor, and when.
    pub fn admissions(&self) -> Result<Vec<u64>, StoreError> {
        let size = self.committed_size()?;
        let keys = self.device_keys.read().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .admissions
            .iter()
            .copied()
            .take_while(|i| *i < size)
            .collect())
    }

    /// The role of a registered identity.
    pub fn role(&self, id: &IdentityId) -> Option<Role> {
        self.device_keys
            .read()
            .ok()?
            .identities
            .get(id)
            .map(|(_, r, _)| *r)
    }

    /// Whether `key` is the next identity key `id`'s current key event commits to: a device recovering
    /// with the recovery phrase proves it holds that key before anything else of its identity is
    /// registered.
    pub fn is_next_key(&self, id: &IdentityId, key: &cmr_core::keys::VerifyingKey) -> bool {
        self.device_keys.read().ok().is_some_and(|keys| {
            keys.identities
                .get(id)
                .is_some_and(|(_, _, next)| *next == cmr_core::identity::next_key_digest(key))
        })
    }

    /// Signs a key-event head with the log key ([`cmr_log::keyhead`]): the operator's word that it is
    /// the identity's whole key history at its size.
    pub fn sign_key_head(&self, head: &cmr_log::keyhead::KeyHead) -> String {
        head.sign(&self.log_key)
    }

    /// A customer's current signed key directory, as stored (`None` before the first).
    pub fn directory(&self, customer: &IdentityId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(layout::key(tag::DIRECTORY, &[&customer.0]))
            .map_err(io)?
            .map(|v| v.to_vec()))
    }

    /// Runs an operation and waits for its acknowledgement (from a thread that may block).
    pub fn execute(&self, op: Op) -> Result<Ack, StoreError> {
        self.submit(op)
            .blocking_recv()
            .unwrap_or(Err(StoreError::Closed))
    }

    /// The latest durable checkpoint.
    pub fn checkpoint(&self) -> Result<Option<String>, StoreError> {
        Ok(self.durable().checkpoint.clone())
    }

    fn durable(&self) -> std::sync::RwLockReadGuard<'_, Durable> {
        self.durable.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The size of the latest durable checkpoint: nothing past it is served.
    fn committed_size(&self) -> Result<u64, StoreError> {
        Ok(self.durable().size)
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        let committed = self.committed_size()?;
        Tree::new(Committed(&self.db, committed))
            .inclusion_proof(index, size)
            .map_err(tree_err)
    }

    /// The consistency proof between two tree sizes.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError> {
        let committed = self.committed_size()?;
        Tree::new(Committed(&self.db, committed))
            .consistency_proof(old, new)
            .map_err(tree_err)
    }

    /// The root of the first `size` entries.
    pub fn root(&self, size: u64) -> Result<Hash, StoreError> {
        let committed = self.committed_size()?;
        Tree::new(Committed(&self.db, committed))
            .root(size)
            .map_err(tree_err)
    }

    /// The leaf commitments `from..to`.
    pub fn commitments(&self, from: u64, to: u64) -> Result<Vec<Digest>, StoreError> {
        let size = self.committed_size()?;
        if to > size {
            return Err(StoreError::NotFound(format!("leaf {}", size.max(from))));
        }
        (from..to)
            .map(|i| {
                self.db
                    .get(layout::indexed(tag::LEAF, i))
                    .map_err(io)?
                    .and_then(|v| <[u8; 32]>::try_from(v.as_ref()).ok())
                    .map(Digest)
                    .ok_or_else(|| StoreError::NotFound(format!("leaf {i}")))
            })
            .collect()
    }

    /// A customer's key backup and its version, if any.
    pub fn backup(&self, customer: &IdentityId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .db
            .get(layout::key(tag::BACKUP, &[&customer.0]))
            .map_err(io)?
            .and_then(|v| {
                let version = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
                Some((version, v[8..].to_vec()))
            }))
    }

    /// The salt and body of an entry, unless erased.
    pub fn body(&self, index: u64) -> Result<Option<SaltedBody>, StoreError> {
        if index >= self.committed_size()? {
            return Ok(None);
        }
        Ok(self
            .db
            .get(layout::indexed(tag::BODY, index))
            .map_err(io)?
            .and_then(|v| {
                let salt: [u8; 32] = v.get(..32)?.try_into().ok()?;
                Some(SaltedBody {
                    salt,
                    body: v[32..].to_vec(),
                })
            }))
    }

    /// Stops the sequencer after the operations already queued.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// A group written to sled, not yet durable.
struct Written {
    size: u64,
    root: Hash,
    ack: Acknowledgement,
}

/// Makes written groups durable, in order: sled's flush, then the `fdatasync`s; then the
/// acknowledgement mark; then the durable view readers see; then the acknowledgements.
struct Syncer {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
    synced: FileStates,
    mark: AckMark,
    durable: Arc<RwLock<Durable>>,
    poisoned: Arc<AtomicBool>,
    /// Set after a group failed to become durable: every later group is in doubt too.
    failed: Option<String>,
}

impl Syncer {
    fn finish(&mut self, group: Written) {
        if let Some(why) = &self.failed {
            group.ack.fail(&StoreError::InDoubt(format!(
                "an earlier group could not be made durable: {why}"
            )));
            return;
        }
        let durable = self
            .db
            .flush()
            .map_err(io)
            .and_then(|_| sync_dir(&self.path, &mut self.synced))
            // The group is durable, but the store cannot vouch for it at the next open.
            .and_then(|()| self.mark.write(group.size, &group.root));
        if let Err(e) = durable {
            // The in-memory state is ahead of the disk: stop, and let a reopen rebuild it.
            self.poisoned.store(true, Ordering::SeqCst);
            self.failed = Some(e.to_string());
            group.ack.fail(&StoreError::InDoubt(e.to_string()));
            return;
        }
        {
            let mut d = self.durable.write().unwrap_or_else(|p| p.into_inner());
            d.size = group.size;
            d.checkpoint = Some(group.ack.note.clone());
        }
        group.ack.send(&self.tree);
    }
}

/// A durable group's replies, to be sent with their inclusion proofs.
struct Acknowledgement {
    size: u64,
    note: String,
    replies: Vec<(Reply, Result<Pending, StoreError>)>,
}

impl Acknowledgement {
    /// Answers every operation of the group with `e`.
    fn fail(self, e: &StoreError) {
        for (reply, _) in self.replies {
            let _ = reply.send(Err(e.clone()));
        }
    }

    /// Sends each reply, with the inclusion proof of its entry in the group's checkpoint. The tree's
    /// nodes up to `size` never change, so this may run beside the sequencer's next group.
    fn send(self, tree: &sled::Tree) {
        let committed = Tree::new(Committed(tree, self.size));
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

/// The result of one operation inside a group, before the group is durable.
struct Pending {
    index: Option<u64>,
    read: Option<ReadResult>,
    repeated: bool,
    head: Option<Digest>,
    /// The salted body logged at `index`, when this operation logged it.
    entry: Option<SaltedBody>,
}

impl Sequencer {
    fn now(&self) -> u64 {
        (self.clock)().max(self.state.last_time)
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        // Groups are made durable and acknowledged on a thread of their own, in order, while the
        // sequencer decides the next group: its fsync no longer stalls the pipeline. At most one group
        // waits for durability while the next is prepared (a rendezvous channel).
        let (to_syncer, queue) = mpsc::sync_channel::<Written>(0);
        let syncer = self.syncer.take().and_then(|mut syncer| {
            std::thread::Builder::new()
                .name("cmr-syncer".into())
                .spawn(move || {
                    for group in queue {
                        syncer.finish(group);
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

    fn serve(&mut self, rx: &mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < self.max_group {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
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
        }
    }

    fn commit_group(&mut self, group: Vec<Job>) {
        if self.poisoned.load(Ordering::SeqCst) {
            for job in group {
                let _ = job.reply.send(Err(StoreError::Closed));
            }
            return;
        }
        let tree = self.tree.clone();
        let mut overlay = Overlay {
            tree: &tree,
            writes: BTreeMap::new(),
            size: self.state.size,
            logged: HashMap::new(),
        };
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
            let mut batch = sled::Batch::default();
            for (k, v) in std::mem::take(&mut overlay.writes) {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            self.tree.apply_batch(batch).map_err(io)?;
            Ok((note, root))
        })();
        let (note, root) = match outcome {
            Ok(done) => done,
            Err(e) => {
                // The in-memory state may now be ahead of sled: stop, and let a reopen rebuild it.
                self.poisoned.store(true, Ordering::SeqCst);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        // The next group builds on this one (in sled, not durable yet); the syncer makes it durable.
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
                if let Err(mpsc::SendError(written)) = to_syncer.send(written) {
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
    fn log(
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
        let index = overlay.size;
        let mut stored = salt.to_vec();
        stored.extend_from_slice(&encoded);
        overlay.put(layout::indexed(tag::BODY, index), stored);
        let hash = EntryBody::hash(&encoded);
        overlay.logged.insert(
            index,
            SaltedBody {
                salt,
                body: encoded,
            },
        );
        overlay.put(layout::indexed(tag::LEAF, index), c.0.to_vec());
        Tree::new(&mut *overlay)
            .append(commitment_leaf(&c))
            .map_err(tree_err)?;
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
            apply_index(overlay, changes);
        }
        Ok(index)
    }

    /// Indexes an identity's key event, so that counterparties can fetch the events and replay them.
    fn note_key_event(&self, kind: EntryKind, subject: IdentityId, index: u64) {
        if matches!(
            kind,
            EntryKind::KeyEvent | EntryKind::DeviceCertificate | EntryKind::DeviceRevocation
        ) && let Ok(mut keys) = self.device_keys.write()
        {
            keys.events.entry(subject).or_default().push(index);
        }
    }

    fn process(
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

    fn logged(index: u64) -> Pending {
        Pending {
            index: Some(index),
            read: None,
            repeated: false,
            head: None,
            entry: None,
        }
    }

    fn apply_op(
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
            apply_index(overlay, changes);
        }
        Ok(Self::logged(logged))
    }

    /// Applies what the ledger's verdict changes outside it: the keys that sign requests, the family
    /// ledgers a directory declares, the auditors the server admits. One step for the sequencer and for
    /// the replay at open.
    fn publish(&mut self, parsed: &Parsed, effect: &Effect, index: u64) {
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
    fn apply_unlogged(
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
    fn unpublish_superseded(&self, identity: &IdentityId, index: u64) {
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
    fn publish_device_key(&self, identity: &IdentityId, device: &DeviceId) {
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
    fn unpublish_device_key(&self, device: &DeviceId) {
        if let Ok(mut keys) = self.device_keys.write() {
            keys.devices.remove(device);
        }
    }

    /// Makes an identity's current key available to submitters.
    fn publish_identity_key(&self, identity: &IdentityId) {
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

    fn erase(
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
        for number in numbers {
            let prefix = layout::family_prefix(number);
            for kv in self.tree.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(io)?;
                overlay.delete(k.to_vec());
            }
            // Records written earlier in this same group are not in sled yet.
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

    #[allow(clippy::too_many_arguments)]
    fn write_batch(
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
        let periods = records
            .iter()
            .map(|r| r.header().period)
            .fold(None, |acc: Option<(Period, Period)>, p| {
                Some(acc.map_or((p, p), |(a, z)| (a.min(p), z.max(p))))
            })
            .ok_or_else(|| StoreError::Malformed("a batch with no records".into()))?;
        let mut append = None;
        if b.author != b.customer {
            let access = access.ok_or_else(|| {
                StoreError::Malformed("a company append carries its access record".into())
            })?;
            // The access is logged right after the batch: decided at that position, by the same rule
            // that records it below.
            let (header, attempt, _) = self.state.ledger.decide(&access, index + 1, time)?;
            // The signed request must name exactly this append: the auditor replays the decision from it.
            if header.subject != b.author {
                return Err(StoreError::BadSignature(
                    "the request is signed by another identity than the batch".into(),
                ));
            }
            if header.customer != Some(b.customer)
                || attempt.kind != AccessKind::Append
                || attempt.families != [b.family]
                || attempt.epoch != Some(b.epoch)
                || periods.0 < attempt.periods.0
                || attempt.periods.1 < periods.1
            {
                return Err(StoreError::Malformed(
                    "the access record does not match the batch".into(),
                ));
            }
            append = Some(access);
        }
        let number = self.state.family_number(&b.customer, &b.family)?;
        let ledger = self
            .state
            .ledgers
            .get_mut(&(b.customer, b.family))
            .ok_or_else(|| StoreError::NotFound("family".into()))?;
        let placements = ledger.placements(&b);
        // `apply` checks everything before it changes anything, so a refusal changes nothing.
        let new_head = ledger.apply(&b, &records).map_err(|e| match e {
            cmr_core::batch::BatchError::StaleHead { .. } => StoreError::StaleHead,
            other => StoreError::Refused(other.to_string()),
        })?;
        // The batch goes into the log once, as the family-head entry; each record names that entry.
        let head_index = overlay.size;
        for (r, (period, n)) in records.iter().zip(placements) {
            // One key per record: the index of the entry of its batch, then the sealed record.
            let mut value = Vec::with_capacity(8 + r.as_bytes().len());
            value.extend_from_slice(&head_index.to_be_bytes());
            value.extend_from_slice(r.as_bytes());
            overlay.put(layout::record(number, period, n), value);
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
        if let Some(access) = append {
            let at = overlay.size;
            let payload = access.encode();
            let (header, _) = self
                .state
                .ledger
                .apply(&Parsed::Access(access), at, time, None, Signatures::Checked)
                // `decide` allowed this very access: a refusal here, after the batch was applied, is a
                // bug, and the group is dropped rather than committed half-done.
                .map_err(|e| StoreError::Io(format!("append allowed, then refused: {e}")))?;
            return self
                .log(
                    overlay,
                    EntryKind::Access,
                    time,
                    header.subject,
                    header.customer,
                    payload,
                )
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
    fn read(
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
            let (header, attempt, _) = self.state.ledger.decide(access, index, time)?;
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
            allowed = Some(access);
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
        let prove = |limit: u64| {
            ledger
                .prove_read(ledger.head().batches, periods.0, periods.1, cursor, limit)
                .ok_or_else(|| StoreError::Malformed("bad read".into()))
        };
        let mut proof = prove(limit.clamp(1, 10_000))?;
        // The page is bounded by bytes as well as by count: records are gathered in order until the next
        // would pass the byte budget (at least one is always served), and the proof is then made again
        // for exactly those, so its cursor names where the next page starts. Memory per read is bounded
        // by the budget, not by the count asked for.
        let mut records = Vec::new();
        let mut record_batches = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        'pages: for page in &proof.pages {
            for (i, id) in page.ids.iter().enumerate() {
                let n = page.start + i as u64;
                let value = overlay
                    .get(&layout::record(number, page.period, n))?
                    .ok_or_else(|| StoreError::NotFound(format!("record {}", id.to_hex())))?;
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
            proof = prove(records.len() as u64)?;
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
                let stored = overlay
                    .get(&layout::indexed(tag::BODY, index))?
                    .ok_or_else(|| StoreError::NotFound("batch entry".into()))?;
                let body = EntryBody::decode(stored.get(32..).unwrap_or_default())
                    .map_err(|e| StoreError::Format(e.to_string()))?;
                Ok::<_, StoreError>(body.payload)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut logged = None;
        if let Some(access) = allowed {
            let payload = access.encode();
            let (header, _) = self
                .state
                .ledger
                .apply(
                    &Parsed::Access(access.clone()),
                    index,
                    time,
                    None,
                    Signatures::Checked,
                )
                // `decide` allowed this very access a moment ago: a refusal now is a bug, and the
                // group is dropped rather than committed half-done.
                .map_err(|e| StoreError::Io(format!("read allowed, then refused: {e}")))?;
            logged = Some(self.log(
                overlay,
                EntryKind::Access,
                time,
                header.subject,
                header.customer,
                payload,
            )?);
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

    /// Rebuilds the in-memory state by replaying the stored log (signatures were checked when logged).
    /// Rebuilds the in-memory state from the stored log; with `add_indexes`, also writes the index rows
    /// of every entry (a store from before the indexes), made durable with the rest of the open.
    fn rebuild(&mut self, add_indexes: bool) -> Result<(), StoreError> {
        let mut rows = sled::Batch::default();
        let size = self
            .tree
            .get(layout::META_SIZE)
            .map_err(io)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let mut heads = HashMap::new();
        // Batches whose records are not all stored: right only for a family erased later in the log.
        let mut without_records = Vec::new();
        for i in 0..size {
            let v = self
                .tree
                .get(layout::indexed(tag::BODY, i))
                .map_err(io)?
                .ok_or_else(|| {
                    StoreError::Format(format!(
                        "log entry {i} has no stored body: the data folder is damaged"
                    ))
                })?;
            let body = EntryBody::decode(v.get(32..).unwrap_or_default())
                .map_err(|e| StoreError::Format(format!("entry {i}: {e}")))?;
            if let Some(c) = body.customer {
                heads.insert(
                    c,
                    ChainLink {
                        index: i,
                        hash: EntryBody::hash(&v[32..]),
                    },
                );
            }
            self.state.last_time = self.state.last_time.max(body.time);
            self.note_key_event(body.kind, body.subject, i);
            if add_indexes {
                let consent = body.customer.and_then(|c| self.state.ledger.consent(&c));
                let changes = index_changes(
                    consent,
                    i,
                    body.kind,
                    body.subject,
                    body.customer,
                    &body.payload,
                );
                for k in changes.deletes {
                    rows.remove(k);
                }
                for (k, v) in changes.puts {
                    rows.insert(k, v);
                }
            }
            let replayed = self
                .replay(i, &body)
                .map_err(|e| StoreError::Format(format!("entry {i} does not replay: {e}")))?;
            if let Some(family) = replayed {
                without_records.push((i, family));
            }
        }
        for (i, (customer, family)) in without_records {
            let erased = self
                .state
                .ledger
                .consent(&customer)
                .and_then(|c| c.erased_at(&family))
                .is_some();
            if !erased {
                return Err(StoreError::Format(format!(
                    "the records of the batch logged at {i} are missing, and its family was never \
                     erased: the data folder is damaged"
                )));
            }
        }
        self.tree.apply_batch(rows).map_err(io)?;
        self.state.heads = heads;
        self.state.size = size;
        let root = Tree::new(Committed(&self.tree, size))
            .root(size)
            .map_err(tree_err)?;
        if let Some(note) = self.tree.get(layout::META_CHECKPOINT).map_err(io)? {
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

    /// Replays one log entry into the in-memory state. For a batch whose records are not all stored,
    /// returns its family, which the caller checks was erased later in the log.
    fn replay(
        &mut self,
        index: u64,
        body: &EntryBody,
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
        // Records of an erased family are gone; its ledger is then not rebuilt.
        let mut records = Vec::with_capacity(b.entries.len());
        let mut complete = true;
        let mut next: HashMap<Period, u64> = HashMap::new();
        for e in &b.entries {
            let n = next
                .entry(e.period)
                .or_insert_with(|| ledger.period_count(e.period));
            let key = layout::record(number, e.period, *n);
            *n += 1;
            match self.tree.get(key).map_err(io)? {
                Some(v) if v.len() > 8 => {
                    records.push(SealedRecord::decode(v[8..].to_vec()).map_err(|e| m(&e))?)
                }
                _ => complete = false,
            }
        }
        if !complete {
            return Ok(Some((b.customer, b.family)));
        }
        ledger.apply(b, &records).map_err(|e| m(&e))?;
        Ok(None)
    }
}

impl cmr_log::auditor::LogSource for &Store {
    type Error = StoreError;

    fn checkpoint(&mut self) -> Result<String, StoreError> {
        Store::checkpoint(self)?.ok_or_else(|| StoreError::NotFound("no checkpoint yet".into()))
    }

    fn commitments(&mut self, from: u64, to: u64) -> Result<Vec<Digest>, StoreError> {
        Store::commitments(self, from, to)
    }

    fn body(&mut self, index: u64) -> Result<Option<SaltedBody>, StoreError> {
        Store::body(self, index)
    }
}
