//! The store: one sequencer thread over a storage engine, with group commit.
//!
//! Every state-changing operation goes through one queue. The sequencer takes a group of operations,
//! evaluates each against the current state (signatures, `evaluate`, epoch, head, directory), assigns log
//! indices and salts, writes the whole group as one atomic group of rows together with the tree nodes and
//! a newly signed checkpoint ([`Storage::write`]), makes it durable ([`Storage::sync`]: for sled, its
//! flush and then `fdatasync` of its files), and only then acknowledges every operation of the group
//! with its index, an inclusion proof and that checkpoint. An operation that is refused changes nothing.
//!
//! This module holds the API ([`Store`], [`Op`], [`Ack`], [`StoreError`]); by concern:
//! - `sequencer`: the thread that groups, decides (through `cmr_log::ledger`), stages and hands off;
//! - `durability`: the syncer (the storage's sync, the durable view, the acknowledgements);
//! - `overlay`: the group in progress over the storage, and the tree's node stores;
//! - `pieces`: the log's entries and tree nodes, stored a group's worth to a row, the entries compressed
//!   against their chunk;
//! - `indexes`: the party, pending and vaults-of index rows;
//! - `party`: the party index in runs, its newest postings in memory;
//! - `records`: the family ledgers' record index (ids, tree nodes) over the rows;
//! - `replay`: rebuilding the state from the log at open.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cmr_core::batch::{FamilyState, ReadProof, SignedBatch};
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
use cmr_log::ledger::{Decided, Effect, Header, Ledger, Parsed, Refusal, Signatures};
use cmr_log::note::NoteSigner;
use cmr_log::tree::{NodeStore, Tree};
use thiserror::Error;

use crate::layout::{self, tag};
use crate::storage::{Row, Storage, Writes};

mod durability;
mod indexes;
mod overlay;
mod party;
pub(crate) mod pieces;
mod records;
mod replay;
mod sequencer;
pub mod snapshot;

use durability::*;
use indexes::*;
use overlay::*;
use records::*;
use sequencer::*;

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
    /// The storage engine is out of reach (its database is down or restarting, a connection broke):
    /// the operation was not applied. A store on such an engine stops, reconnects and rebuilds from
    /// what the engine holds, by itself; clients retry.
    #[error("the storage is out of reach: {0}")]
    Unavailable(String),
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
        matches!(
            self,
            StoreError::Io(_) | StoreError::Format(_) | StoreError::Unavailable(_)
        )
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
    /// How many index rows an open that adds the indexes (an upgrade, a restore) holds before it
    /// writes them ([`INDEX_CHUNK_ROWS`] by default), so that a large log's indexes are never all in
    /// memory at once.
    pub index_chunk_rows: usize,
    /// Whether the open reads every stored record back and checks it against the batch that wrote it
    /// (`cmr serve --verify-on-open`). Without it the open trusts the record rows, which were written in
    /// the same atomic group as their batch's entry, and reads only the log: its time then grows with
    /// the log's entries, not with the records stored. An open that adds rows from outside (an
    /// upgrade, a restore) always checks.
    pub verify_on_open: bool,
    /// How many party index postings (about one a log entry) are held in memory before a group writes
    /// them as runs ([`PARTY_TAIL`] by default); an open replays that many entries at most to hold them
    /// again.
    pub party_tail: usize,
}

/// Party index postings held in memory before they are written as runs, by default: about 3 MB.
pub const PARTY_TAIL: usize = 65_536;

/// Index rows held by an open that adds the indexes before they are written, by default.
pub const INDEX_CHUNK_ROWS: usize = 50_000;

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
            index_chunk_rows: INDEX_CHUNK_ROWS,
            verify_on_open: false,
            party_tail: PARTY_TAIL,
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
        }
    }
}

/// How often a store on a shared engine follows the others on demand at most (a request naming a key
/// it does not know yet).
const FOLLOW_AT_MOST: std::time::Duration = std::time::Duration::from_millis(5);

/// Where an operation's acknowledgement or refusal goes.
type Reply = tokio::sync::oneshot::Sender<Result<Ack, StoreError>>;

/// What the sequencer is sent: an operation, or a request to follow what other stores sharing the
/// engine made durable (answered once done).
enum Work {
    Op(Box<Job>),
    Follow(mpsc::SyncSender<()>),
}

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
    tx: Mutex<Option<mpsc::Sender<Work>>>,
    /// Whether other stores write to the same engine, and when this one last asked to follow them.
    shared: bool,
    followed: Mutex<std::time::Instant>,
    handle: Mutex<Option<JoinHandle<()>>>,
    db: Arc<dyn Storage>,
    nodes: Arc<NodeCache>,
    durable: Arc<RwLock<Durable>>,
    start_time: u64,
    opened_empty: bool,
    device_keys: DeviceKeys,
    /// The party index's newest postings (see `store::party`).
    party: party::SharedTail,
    log_verifier: cmr_log::note::NoteVerifier,
    /// The log key, shared with the sequencer (which signs checkpoints with it).
    log_key: Arc<NoteSigner>,
    stopped: Arc<AtomicBool>,
    metrics: crate::metrics::StoreMetrics,
}

impl From<Refusal> for StoreError {
    /// The rules' refusals, as the store's callers (and the server's problem codes) know them.
    fn from(r: Refusal) -> Self {
        let text = r.to_string();
        match r {
            Refusal::Identity(_)
            | Refusal::BadSignature(_)
            | Refusal::DeviceOwned(_)
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
            // A statement naming an epoch a rotation has left is the same conflict as a batch naming
            // one: the client follows the logged epoch and sends it again.
            Refusal::Consent(ApplyError::StaleEpoch { current }) => {
                StoreError::Denied(DenyReason::StaleEpoch { current })
            }
            Refusal::Consent(_) | Refusal::Admission(_) => StoreError::Refused(text),
            Refusal::Denied(reason) => StoreError::Denied(reason),
        }
    }
}

impl Store {
    /// Opens (or creates) the store on sled in `config.path` ([`crate::SledStorage`]).
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let storage = crate::SledStorage::open(&config)?;
        Self::open_on(Arc::new(storage), config)
    }

    /// Opens (or creates) the store on a storage engine: checks the format version, rebuilds the state
    /// from the log, makes what the engine recovered durable, and starts the sequencer. `config.path`
    /// and `config.cache_capacity` are the sled engine's and are not read here.
    pub fn open_on(rows: Arc<dyn Storage>, config: StoreConfig) -> Result<Store, StoreError> {
        Self::open_with(rows, config, false)
    }

    /// [`Store::open_on`]; with `add_indexes`, the replay also writes every entry's index rows (a
    /// store from before the indexes, or a restore).
    fn open_with(
        rows: Arc<dyn Storage>,
        config: StoreConfig,
        mut add_indexes: bool,
    ) -> Result<Store, StoreError> {
        match rows.get(layout::META_FORMAT)? {
            None => {
                if !rows.is_empty()? {
                    return Err(StoreError::Format("data without a format version".into()));
                }
                // Made durable with everything else recovered, below, before anything is served.
                rows.write(format_row())?;
            }
            Some(v) => {
                let version = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Format("corrupted format version".into()))?;
                if layout::FORMATS_BEFORE_ENGINE_PIECES.contains(&version) {
                    // What the engine keeps its own way (resumes if cut).
                    rows.upgrade(version)?;
                }
                if layout::FORMATS_WITHOUT_PIECES.contains(&version) {
                    // A row per entry, leaf and node: moved into pieces first (resumes if cut).
                    pieces::migrate(&*rows)?;
                }
                if layout::FORMATS_WITHOUT_INDEXES.contains(&version) {
                    // Written before some of the indexes: the replay below adds them.
                    add_indexes = true;
                } else if layout::FORMATS_WITHOUT_PARTY_RUNS.contains(&version) {
                    // Every posting of the party index is a row of its own: the postings in memory
                    // start at the log's end.
                    rows.begin()?;
                    let size = meta_u64(&*rows, layout::META_SIZE)?;
                    rows.write(upgraded_format_row(size))?;
                } else if layout::FORMATS_WITH_A_ROW_PER_PIECE.contains(&version) {
                    // Pieces written from now on are compressed (formats up to 9 did not), and on
                    // sled bundled; the plain ones and the rows of a piece each read as they are.
                    rows.begin()?;
                    rows.write(format_row())?;
                } else if version != layout::FORMAT_VERSION {
                    return Err(StoreError::Format(format!(
                        "data folder has format {version}, this build reads {}",
                        layout::FORMAT_VERSION
                    )));
                }
            }
        }
        if add_indexes {
            // A row per record (format 6 or earlier, or a restored snapshot): moved into pieces first
            // (resumes if cut), so the replay below reads and checks them where they now are.
            records::migrate(&*rows)?;
        }
        // One log, one key: a store (on sled, or one of several servers on a database) opened with
        // another log key than the one the log is signed with is refused, before it signs anything.
        let vkey = config.log_key.verifier().to_vkey();
        match rows.get(layout::META_LOG_KEY)? {
            Some(stored) if stored != vkey.as_bytes() => {
                return Err(StoreError::Format(format!(
                    "this log is signed with the log key {}, not with {vkey}: give the server the \
                     log key file the log was started with",
                    String::from_utf8_lossy(&stored)
                )));
            }
            Some(_) => {}
            None => rows.write(Writes::from([(
                layout::META_LOG_KEY.to_vec(),
                Some(vkey.into_bytes()),
            )]))?,
        }
        let durable = Arc::new(RwLock::new(Durable::default()));
        let poisoned = Arc::new(AtomicBool::new(false));
        let nodes = Arc::new(NodeCache::new());
        let metrics = crate::metrics::StoreMetrics::default();
        let syncer = Syncer {
            rows: rows.clone(),
            nodes: nodes.clone(),
            durable: durable.clone(),
            poisoned: poisoned.clone(),
            failed: None,
            metrics: metrics.clone(),
        };
        let mut seq = Sequencer {
            durable: durable.clone(),
            rows: rows.clone(),
            nodes: nodes.clone(),
            batches: BatchCache::default(),
            log_key: Arc::new(config.log_key),
            clock: config.clock,
            max_group: config.max_group.max(1),
            max_page_bytes: config.max_page_bytes.max(1),
            index_chunk_rows: config.index_chunk_rows.max(1),
            verify_records: config.verify_on_open || add_indexes,
            skipping: false,
            state: State::default(),
            poisoned: poisoned.clone(),
            device_keys: DeviceKeys::default(),
            party: party::SharedTail::default(),
            party_tail: config.party_tail,
            syncer: None,
            to_syncer: None,
            last_recovery: None,
            was_stopped: false,
            metrics: metrics.clone(),
        };
        let device_keys = seq.device_keys.clone();
        let party = seq.party.clone();
        let log_verifier = seq.log_key.verifier();
        let log_key = seq.log_key.clone();
        // On an engine several stores share, the log holds still while it is read: the write lock.
        rows.begin()?;
        // Rows that came from outside this store (a restore, an upgrade) are also checked for records
        // no batch accounts for.
        let rebuilt = seq.rebuild(add_indexes).and_then(|()| {
            if add_indexes {
                seq.check_records()
            } else {
                Ok(())
            }
        });
        rows.abandon();
        rebuilt?;
        if add_indexes {
            // The replay wrote a party index row for every posting: the postings in memory start at
            // the log's end.
            let size = seq.state.size;
            rows.write(upgraded_format_row(size))?;
            *seq.party.write().unwrap_or_else(|p| p.into_inner()) =
                party::PartyTail::starting_at(size);
        }
        let held = seq.state.size;
        let root = Tree::new(Committed(&*rows, &nodes, held))
            .root(held)
            .map_err(tree_err)?;
        if let Some(ack) = rows.acknowledged() {
            let same = ack.size <= held
                && Tree::new(Committed(&*rows, &nodes, held))
                    .root(ack.size)
                    .map_err(tree_err)?
                    == ack.root;
            if !same {
                return Err(StoreError::Format(format!(
                    "the store holds {held} log entries, but it acknowledged {} with another history: {}",
                    ack.size, ack.remedy
                )));
            }
        }
        // What the engine recovered may not be durable yet (a kill -9 leaves sled's writes in the page
        // cache): make it durable before anything is served from it.
        let checkpoint = rows
            .get(layout::META_CHECKPOINT)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        rows.sync(held, &root, checkpoint.as_deref().unwrap_or_default())?;
        {
            let mut d = durable.write().unwrap_or_else(|p| p.into_inner());
            d.size = held;
            d.checkpoint = checkpoint;
        }
        // Following other stores' groups later trusts their records, as a plain open does.
        seq.verify_records = false;
        seq.syncer = Some(syncer);
        let stopped = poisoned;
        let start_time = seq.now();
        let opened_empty = held == 0;
        let (tx, rx) = mpsc::channel::<Work>();
        let handle = std::thread::Builder::new()
            .name("cmr-sequencer".into())
            .spawn(move || seq.run(rx))
            .map_err(io)?;
        Ok(Store {
            tx: Mutex::new(Some(tx)),
            shared: rows.shared(),
            followed: Mutex::new(
                std::time::Instant::now()
                    .checked_sub(FOLLOW_AT_MOST)
                    .unwrap_or_else(std::time::Instant::now),
            ),
            handle: Mutex::new(Some(handle)),
            db: rows,
            nodes,
            durable,
            start_time,
            opened_empty,
            device_keys,
            party,
            log_verifier,
            log_key,
            stopped,
            metrics,
        })
    }

    /// What the store measures of itself (group commits, syncs, stops and recoveries).
    pub fn metrics(&self) -> &crate::metrics::StoreMetrics {
        &self.metrics
    }

    /// The bytes the storage engine takes on disk, if it can tell.
    pub fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        self.db.size_on_disk()
    }

    /// Whether the store takes operations. After a storage failure, damaged data or a bug in the
    /// sequencer it stops (every operation is answered [`StoreError::Closed`]) until it is reopened,
    /// which rebuilds its state from what is durable, or, on an engine several servers share, until it
    /// has reconnected and rebuilt by itself; a readiness check reports this.
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
            && tx.send(Work::Op(Box::new(Job { op, pre, reply }))).is_ok()
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
        if let Some(found) = self.key_of(keyid) {
            return Some(found);
        }
        // A key another server registered a moment ago: follow the shared log, then look again.
        if self.shared && self.follow_others(None) {
            return self.key_of(keyid);
        }
        None
    }

    /// A client has verified the log up to `size`: on a shared engine, follow what other stores made
    /// durable before answering it, so that it never gets less from this store than it saw elsewhere.
    pub fn follow_to(&self, size: u64) {
        if self.shared && self.durable().size < size {
            self.follow_others(Some(size));
        }
    }

    /// Asks the sequencer to follow what other stores on the shared engine made durable, and waits for
    /// it (at most a second). At most once per [`FOLLOW_AT_MOST`], so that requests cannot make the
    /// store ask the database on each: a caller that needs the log up to `until` waits for the next
    /// turn (a few milliseconds), one that does not gives up. Whether it followed.
    fn follow_others(&self, until: Option<u64>) -> bool {
        loop {
            let mut last = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            let since = last.elapsed();
            if since >= FOLLOW_AT_MOST {
                *last = std::time::Instant::now();
                break;
            }
            drop(last);
            let Some(size) = until else {
                return false;
            };
            std::thread::sleep(FOLLOW_AT_MOST - since);
            if self.durable().size >= size {
                return true;
            }
        }
        let (done, wait) = mpsc::sync_channel(1);
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.send(Work::Follow(done)).is_ok());
        sent && wait.recv_timeout(std::time::Duration::from_secs(1)).is_ok()
    }

    fn key_of(&self, keyid: &str) -> Option<(IdentityId, cmr_core::keys::VerifyingKey)> {
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
            .get(&layout::key(tag::CUSTOMER_HEAD, &[&customer.0]))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes);
        // Entries past the durable view belong to a group still being synced: walk back to the newest
        // durable one (at most one group's worth of steps; each body was written with its head).
        while let Some(i) = head
            && i >= size
        {
            let Some(v) = self.nodes.entry(&*self.db, i)? else {
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
    /// range scan of the party index's runs and the postings in memory: O(page), whatever the chain's
    /// length.
    pub fn party_entries(
        &self,
        customer: &IdentityId,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let size = self.committed_size()?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        party::entries(
            &*self.db,
            &self.party,
            (&customer.0, &party.0),
            (start, size),
            limit,
        )
    }

    /// The consent statements that concern `party` across every vault (durable entries only), after log
    /// index `after`, at most `limit`: (index, customer) in log order; and whether more follow. One
    /// range scan of the feed index.
    pub fn feed(
        &self,
        party: &IdentityId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, IdentityId)>, bool), StoreError> {
        let size = self.committed_size()?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for kv in self.db.range(
            &layout::feed(&party.0, start),
            &layout::feed(&party.0, size),
        ) {
            let (k, v) = kv?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let index = k
                .get(33..41)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Format("feed key".into()))?;
            let customer = <[u8; 32]>::try_from(v.as_slice())
                .map(IdentityId)
                .map_err(|_| StoreError::Format("feed row".into()))?;
            out.push((index, customer));
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
        for kv in self.db.range(&from, &to) {
            let (k, _) = kv?;
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
            .scan_prefix(&layout::key(layout::tag::PENDING, &[&customer.0]))
        {
            let (_, v) = kv?;
            let index = <[u8; 8]>::try_from(v.as_slice())
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
        self.db.get(&layout::key(tag::DIRECTORY, &[&customer.0]))
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
        Tree::new(Committed(&*self.db, &self.nodes, committed))
            .inclusion_proof(index, size)
            .map_err(asked_err)
    }

    /// The consistency proof between two tree sizes.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError> {
        let committed = self.committed_size()?;
        Tree::new(Committed(&*self.db, &self.nodes, committed))
            .consistency_proof(old, new)
            .map_err(asked_err)
    }

    /// The root of the first `size` entries.
    pub fn root(&self, size: u64) -> Result<Hash, StoreError> {
        let committed = self.committed_size()?;
        Tree::new(Committed(&*self.db, &self.nodes, committed))
            .root(size)
            .map_err(asked_err)
    }

    /// The leaf commitments `from..to`.
    pub fn commitments(&self, from: u64, to: u64) -> Result<Vec<Digest>, StoreError> {
        let size = self.committed_size()?;
        if to > size {
            return Err(StoreError::NotFound(format!("leaf {}", size.max(from))));
        }
        let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
        for kv in pieces::entries(&*self.db, from, to) {
            let (i, salted) = kv?;
            if i != from + out.len() as u64 {
                break;
            }
            let (salt, body) = salted
                .split_first_chunk::<32>()
                .ok_or_else(|| StoreError::Format(format!("entry {i} has no salt")))?;
            out.push(commitment(salt, body));
        }
        if out.len() as u64 != to.saturating_sub(from) {
            return Err(StoreError::NotFound(format!(
                "leaf {}",
                from + out.len() as u64
            )));
        }
        Ok(out)
    }

    /// A customer's key backup and its version, if any.
    pub fn backup(&self, customer: &IdentityId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .db
            .get(&layout::key(tag::BACKUP, &[&customer.0]))?
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
        Ok(self.nodes.entry(&*self.db, index)?.and_then(|v| {
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

/// The row that names the format version of the stored data.
fn format_row() -> Writes {
    Writes::from([(
        layout::META_FORMAT.to_vec(),
        Some(layout::FORMAT_VERSION.to_be_bytes().to_vec()),
    )])
}

/// The format row of a folder upgraded from a format that wrote a party index row for every posting,
/// with the party mark at `size`, the log's end: every posting before it is in rows.
fn upgraded_format_row(size: u64) -> Writes {
    let mut rows = format_row();
    rows.insert(
        layout::META_PARTY_FROM.to_vec(),
        Some(size.to_be_bytes().to_vec()),
    );
    rows
}

/// A `meta` row holding a u64 (the tree size, the party mark); 0 if there is none.
fn meta_u64(rows: &dyn Storage, key: &[u8]) -> Result<u64, StoreError> {
    Ok(rows
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
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
