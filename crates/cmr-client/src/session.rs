//! A party's session with a vault server: its identity and device, the log view it verifies against,
//! and the identities it has verified.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::{Batch, SignedBatch};
use cmr_core::consent::StatementId;
use cmr_core::family::FamilyId;
use cmr_core::identity::{
    DeviceKeys, IdentityId, RecoverySecret, Role, SignedKeyEvent, create_identity,
};
use cmr_core::keys::SigningKey;
use cmr_core::record::{RecordId, RecordSealer, SealedRecord};
use cmr_log::checkpoint::Checkpoint;
use cmr_log::entry::{EntryBody, SaltedBody};
use cmr_log::note::NoteVerifier;
use serde_json::{Value, json};

use crate::error::{ClientError, VerifyError};
use crate::transport::{Connection, Signer};
use crate::verify::{LogView, Needs, VerifiedIdentity, b64, hashes, prove, proven_entry, wire};

impl Keys {
    /// The identity key and its sequence number, if this device holds it.
    pub fn identity(&self) -> Result<(u64, &SigningKey), ClientError> {
        self.identity_key
            .as_ref()
            .map(|(s, k)| (*s, k))
            .ok_or_else(|| ClientError::Local("this device does not hold the identity key".into()))
    }
}

/// An acknowledged, verified write: its log index and the checkpoint that covers it.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The entry's log index.
    pub index: u64,
    /// The entry as logged.
    pub body: EntryBody,
    /// Its salt and encoded body: with the index, what proves its inclusion in any later checkpoint.
    pub salted: SaltedBody,
    /// The checkpoint that covers it.
    pub checkpoint: Checkpoint,
    /// True when the server says it repeats an operation already logged.
    pub repeated: bool,
    /// After a batch: the family head it produced, as the server says (the next batch extends it; a
    /// wrong one only makes that batch fail as stale, and reads verify heads themselves).
    pub head: Option<cmr_core::hash::Digest>,
}

/// A party's keys as the SDK holds them.
pub struct Keys {
    /// The identity.
    pub identity: IdentityId,
    /// The role it registered with.
    pub role: Role,
    /// This device's keys.
    pub device: DeviceKeys,
    /// The identity key, on the device that holds it.
    pub identity_key: Option<(u64, SigningKey)>,
}

/// A session: keys, connection, log view, verified identities, and the entries this party had
/// acknowledged (a customer checks that its chain still holds every one of them).
pub struct Session {
    /// The connection.
    pub conn: Connection,
    /// The keys.
    pub keys: Keys,
    /// The log as verified so far.
    pub log: LogView,
    identities: HashMap<IdentityId, VerifiedIdentity>,
    /// The newest signed key-event head seen for each identity (evidence for an auditor).
    key_heads: HashMap<IdentityId, (cmr_log::keyhead::KeyHead, String)>,
    /// Indices of this party's acknowledged entries.
    pub acked: Vec<u64>,
    receipts: Option<Vec<Acked>>,
}

impl Session {
    /// A session for existing keys, pinned to `log_key`.
    pub fn new(conn: Connection, keys: Keys, log_key: NoteVerifier) -> Self {
        Self {
            conn,
            keys,
            log: LogView::new(log_key),
            identities: HashMap::new(),
            key_heads: HashMap::new(),
            acked: Vec::new(),
            receipts: None,
        }
    }

    /// From now on, keeps every verified acknowledgement (index, salted entry, checkpoint): with the
    /// log's public commitments they prove later that each write is still there, at the same index, under
    /// a checkpoint consistent with the one that acknowledged it.
    pub fn keep_receipts(&mut self) {
        self.receipts.get_or_insert_with(Vec::new);
    }

    /// The acknowledgements kept since the last call (see [`Session::keep_receipts`]).
    pub fn take_receipts(&mut self) -> Vec<Acked> {
        self.receipts
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Creates an identity with one device, registers both, and returns the session with the recovery
    /// secret's phrase (shown to the user once).
    pub async fn register(
        conn: Connection,
        role: Role,
        log_key: NoteVerifier,
        now: u64,
    ) -> Result<(Self, zeroize::Zeroizing<String>), ClientError> {
        let (keys, inception, recovery) = Self::create(role);
        let mut s = Session::new(conn, keys, log_key);
        s.register_identity(&inception.encode(), now).await?;
        Ok((s, recovery.to_phrase()))
    }

    /// Creates an identity and its first device locally: the keys, the signed inception to register, and
    /// the recovery secret (its phrase is shown once, then only its commitment remains in the inception).
    pub fn create(role: Role) -> (Keys, SignedKeyEvent, RecoverySecret) {
        let mut rng = rand::rng();
        let new = create_identity(&mut rng, role);
        let keys = Keys {
            identity: new.inception.identity(),
            role,
            device: DeviceKeys::generate(&mut rng),
            identity_key: Some((0, new.identity_key)),
        };
        (keys, new.inception, new.recovery)
    }

    /// Registers this session's identity (its signed `inception`) and certifies this device. Idempotent:
    /// registering again returns the original entries.
    pub async fn register_identity(
        &mut self,
        inception: &[u8],
        now: u64,
    ) -> Result<(), ClientError> {
        let id = self.keys.identity;
        let (_, key) = self.keys.identity()?;
        let v = self
            .conn
            .post(
                "/v1/identities",
                &json!({"event": B64.encode(inception)}),
                Signer::Identity(id, key),
            )
            .await?;
        let cert = self.keys.device.certify(id, 0, key, now).encode();
        self.check_ack(&v, inception).await?;
        self.certify(&cert).await?;
        Ok(())
    }

    /// Certifies a device (its signed certificate), signed by the identity key.
    pub async fn certify(&mut self, cert: &[u8]) -> Result<Acked, ClientError> {
        let id = self.keys.identity;
        let (_, key) = self.keys.identity()?;
        let v = self
            .conn
            .post(
                &format!("/v1/identities/{}/devices", id.to_hex()),
                &json!({"certificate": B64.encode(cert)}),
                Signer::Identity(id, key),
            )
            .await?;
        self.check_ack(&v, cert).await
    }

    /// Accepts a checkpoint the server handed over: verified under the pinned key and consistent with
    /// every checkpoint seen before (fetching the consistency proof when it grew).
    pub async fn observe(&mut self, note: &str) -> Result<Checkpoint, ClientError> {
        self.observe_with(note, &Value::Null).await
    }

    /// [`Session::observe`], using the consistency proof the server sent with an acknowledgement
    /// (`{"old", "proof"}`) when it starts from the size this client knows; otherwise it is fetched.
    pub async fn observe_with(
        &mut self,
        note: &str,
        hint: &Value,
    ) -> Result<Checkpoint, ClientError> {
        match self.observe_checked(note, hint).await {
            Err(ClientError::Verification(
                e @ (VerifyError::StaleCheckpoint { .. } | VerifyError::Inconsistent { .. }),
            )) => Err(self.explain_rollback(e).await.into()),
            other => other,
        }
    }

    /// The restore the log went through, if it says it went through one: its signed note, opened
    /// under the pinned key.
    async fn restore_note(
        &self,
    ) -> Result<Option<(cmr_log::restore::Restored, String)>, ClientError> {
        match self.conn.get_text("/v1/log/restore").await {
            Ok(note) => {
                let r = cmr_log::restore::Restored::open(&note, self.log.key())
                    .map_err(|e| VerifyError::Checkpoint(format!("the log's restore note: {e}")))?;
                Ok(Some((r, note)))
            }
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A rollback or fork, explained by the log's restore note when it names a size below what this
    /// client saw (anything else leaves the refusal as it was).
    async fn explain_rollback(&self, refusal: VerifyError) -> VerifyError {
        let Some(seen) = self.log.latest().map(|c| c.size) else {
            return refusal;
        };
        match self.restore_note().await {
            Ok(Some((r, _))) if r.size < seen => VerifyError::Restored {
                seen,
                restored: r.size,
                time: r.time,
            },
            _ => refusal,
        }
    }

    /// Accepts the log after a restore from a backup, once the user decided to: the log's restore
    /// note must verify under the pinned key, and the current checkpoint must extend the restored
    /// log (the note's size and root). What this client saw past the restored size is forgotten.
    /// Returns the note's size.
    pub async fn accept_restore(&mut self) -> Result<u64, ClientError> {
        let (r, _) = self.restore_note().await?.ok_or_else(|| {
            ClientError::Local("the server says this log was never restored from a backup".into())
        })?;
        let note = self.conn.get_text("/v1/log/checkpoint").await?;
        let mut view = LogView::new(self.log.key().clone());
        view.accept_trusted(
            Checkpoint {
                origin: self.log.key().name().to_string(),
                size: r.size,
                root: r.root,
                extensions: Vec::new(),
            },
            String::new(),
        );
        let log = std::mem::replace(&mut self.log, view);
        match self.observe_checked(&note, &Value::Null).await {
            Ok(_) => {
                // Entries acknowledged past the restored size are gone with it.
                self.acked.retain(|i| *i < r.size);
                Ok(r.size)
            }
            Err(e) => {
                self.log = log;
                Err(e)
            }
        }
    }

    /// [`Session::observe_with`], without explaining a refusal.
    async fn observe_checked(
        &mut self,
        note: &str,
        hint: &Value,
    ) -> Result<Checkpoint, ClientError> {
        let (cp, needs) = self.log.check(note)?;
        match needs {
            Needs::Nothing => self.log.accept(cp.clone(), note, None)?,
            Needs::Consistency { old, .. }
                if hint["old"].as_u64() == Some(old)
                    && hashes(&hint["proof"], "consistency proof")
                        .is_ok_and(|p| self.log.accept(cp.clone(), note, Some(&p)).is_ok()) => {}
            Needs::Consistency { old, new } => {
                // A server that cannot prove the new checkpoint extends the old one has forked.
                let v = match self
                    .conn
                    .get_json(&format!("/v1/log/proofs/consistency?old={old}&new={new}"))
                    .await
                {
                    // The server signed `new` and says it has no such sizes: it cannot prove the
                    // new checkpoint extends the old one. Any other failure (the server or its
                    // database out of reach) proves nothing either way, and is reported as such.
                    Err(ClientError::Refused { status: 404, .. }) => {
                        return Err(VerifyError::Inconsistent { old, new }.into());
                    }
                    other => other?,
                };
                let proof = hashes(&v["proof"], "consistency proof")?;
                self.log.accept(cp.clone(), note, Some(&proof))?;
            }
        }
        Ok(cp)
    }

    /// Fetches and verifies the latest checkpoint.
    pub async fn refresh(&mut self) -> Result<Checkpoint, ClientError> {
        let known = self.log.latest().map(|c| c.size);
        let note = self
            .conn
            .get_text_known("/v1/log/checkpoint", known)
            .await?;
        self.observe(&note).await
    }

    /// Checks an acknowledgement: the checkpoint, the entry's inclusion in it, and that the logged
    /// payload is exactly `sent`.
    pub async fn check_ack(&mut self, v: &Value, sent: &[u8]) -> Result<Acked, ClientError> {
        let acked = self.check_ack_with(v, |body| body.payload == sent).await?;
        Ok(acked)
    }

    /// Checks an acknowledgement whose payload the server builds (an access record): `matches` decides.
    pub async fn check_ack_with(
        &mut self,
        v: &Value,
        matches: impl Fn(&EntryBody) -> bool,
    ) -> Result<Acked, ClientError> {
        let ack: cmr_wire::log::AckJson = serde_json::from_value(v.clone())
            .map_err(|e| ClientError::Malformed(format!("acknowledgement: {e}")))?;
        let hint = ack
            .consistency
            .as_ref()
            .map_or(Value::Null, |c| json!({"old": c.old, "proof": c.proof}));
        let cp = self.observe_with(&ack.checkpoint, &hint).await?;
        let index = ack
            .index
            .ok_or_else(|| ClientError::Malformed("acknowledgement without an index".into()))?;
        if index >= cp.size {
            return Err(VerifyError::NotCovered(index).into());
        }
        let entry = ack
            .entry
            .as_ref()
            .ok_or_else(|| ClientError::Malformed("acknowledgement without its entry".into()))?;
        let e = proven_entry(
            &json!({"index": index, "salt": entry.salt, "body": entry.body, "proof": ack.proof}),
            &cp,
        )?;
        if !matches(&e.body) {
            return Err(VerifyError::NotWhatWasSent(index).into());
        }
        self.acked.push(index);
        let acked = Acked {
            index,
            body: e.body,
            salted: e.salted,
            checkpoint: cp,
            repeated: ack.repeated,
            head: ack
                .head
                .as_deref()
                .and_then(cmr_core::hash::Digest::from_hex),
        };
        if let Some(r) = self.receipts.as_mut() {
            r.push(acked.clone());
        }
        Ok(acked)
    }

    /// Another identity's keys, from its key events replayed from inception (cached).
    pub async fn identity(&mut self, id: IdentityId) -> Result<&VerifiedIdentity, ClientError> {
        if !self.identities.contains_key(&id) {
            let verified = self.fetch_identity(id).await?;
            self.identities.insert(id, verified);
        }
        Ok(&self.identities[&id])
    }

    /// Forgets a cached identity (to see devices certified since).
    pub fn forget_identity(&mut self, id: &IdentityId) {
        self.identities.remove(id);
    }

    async fn fetch_identity(&mut self, id: IdentityId) -> Result<VerifiedIdentity, ClientError> {
        self.fetch_key_events(id, None).await
    }

    /// Fetches `id`'s key events and replays them, after checking each is included in a checkpoint this
    /// session trusts and that together they are exactly the history the signed key-event head vouches
    /// for (`cmr_log::keyhead`): an event left out (a device revocation, an identity rotation) is refused
    /// here, and a head that leaves one out is the operator's signed lie that any auditor can show
    /// ([`Session::key_heads`]). A head older or shorter than one seen before is refused too. A device
    /// recovering with its phrase has no registered key yet: it signs with the `reveal`ed next identity
    /// key.
    pub(crate) async fn fetch_key_events(
        &mut self,
        id: IdentityId,
        reveal: Option<&SigningKey>,
    ) -> Result<VerifiedIdentity, ClientError> {
        let target = format!("/v1/identities/{}/events", id.to_hex());
        let v = match reveal {
            None => self.post(&target, &json!({})).await?,
            Some(key) => {
                self.conn
                    .post(
                        &target,
                        &json!({"reveal": B64.encode(key.verifying_key().to_bytes())}),
                        Signer::Identity(id, key),
                    )
                    .await?
            }
        };
        let refused = |reason: String| {
            ClientError::Verification(VerifyError::KeyEvents {
                identity: id.to_hex(),
                reason,
            })
        };
        // A history without its signed head (or otherwise not a key history) is refused as one.
        let answer: cmr_wire::vault::KeyEventsJson = wire(&v, "key events")
            .map_err(|e| refused(format!("the answer is not a key history: {e}")))?;
        let cp = self.observe(&answer.checkpoint).await?;
        let events = answer
            .events
            .iter()
            .map(|e| prove(e, &cp))
            .collect::<Result<Vec<_>, _>>()?;
        let signed = answer.head.as_str();
        let head = cmr_log::keyhead::KeyHead::open(signed, self.log.key())
            .map_err(|e| refused(e.to_string()))?;
        let hashes: Vec<(u64, cmr_core::hash::Digest)> = events
            .iter()
            .map(|e| (e.index, EntryBody::hash(&e.salted.body)))
            .collect();
        let served =
            cmr_log::keyhead::KeyHead::over(id, cp.size, hashes.iter().map(|(i, h)| (*i, h)))
                .map_err(|e| refused(e.to_string()))?;
        if head != served {
            return Err(refused(format!(
                "the events served are not the history the log's signed head vouches for ({} events \
                 served, {} in the head at size {})",
                served.count, head.count, head.size
            )));
        }
        if let Some((seen, _)) = self.key_heads.get(&id)
            && (head.size < seen.size || head.count < seen.count)
        {
            return Err(refused(format!(
                "the head at size {} has {} events; this client saw {} at size {}",
                head.size, head.count, seen.count, seen.size
            )));
        }
        let verified = VerifiedIdentity::replay(id, &events)?;
        self.key_heads.insert(id, (head, signed.to_owned()));
        Ok(verified)
    }

    /// The newest signed key-event head this session was served for each identity: what it trusted
    /// about each counterparty's keys. Hand them to an auditor (`cmr_log::auditor::Auditor::
    /// check_key_head`) to have them checked against the whole log.
    pub fn key_heads(&self) -> impl Iterator<Item = &str> {
        self.key_heads.values().map(|(_, s)| s.as_str())
    }

    /// The auditors the operator admitted: every admission and dismissal the server lists, each checked
    /// for inclusion in a checkpoint this session trusts, opened under the pinned log key (the operator
    /// signs admissions with it), and folded by the log's own rule ([`cmr_log::admission::Auditors`]),
    /// with each auditor's role taken from its verified key events. The list is proven, not complete: a
    /// server could leave an admission out, which a full audit (which reads every entry) would show.
    pub async fn auditors(&mut self) -> Result<cmr_log::admission::Auditors, ClientError> {
        let v = self.conn.get_json("/v1/auditors").await?;
        let answer: cmr_wire::log::EntriesJson = wire(&v, "auditors")?;
        let cp = self.observe(&answer.checkpoint).await?;
        let entries = answer
            .entries
            .iter()
            .map(|e| prove(e, &cp))
            .collect::<Result<Vec<_>, _>>()?;
        let mut auditors = cmr_log::admission::Auditors::default();
        let mut last = None;
        for e in entries {
            let refused = |why: String| {
                ClientError::Verification(VerifyError::Admission(format!(
                    "entry {}: {why}",
                    e.index
                )))
            };
            if e.body.kind != cmr_log::entry::EntryKind::Admission || last >= Some(e.index) {
                return Err(refused("not an admission, or out of order".into()));
            }
            last = Some(e.index);
            let note = std::str::from_utf8(&e.body.payload).map_err(|x| refused(x.to_string()))?;
            let a = cmr_log::admission::Admission::open(note, self.log.key())
                .map_err(|x| refused(x.to_string()))?;
            if a.auditor != e.body.subject {
                return Err(refused("the entry's subject is not its auditor".into()));
            }
            let role = self.identity(a.auditor).await?.state.keys().role();
            auditors
                .apply(&a, Some(role), e.index)
                .map_err(|x| refused(x.to_string()))?;
        }
        Ok(auditors)
    }

    /// Seals `contents` with `sealer` (each with its record id), signs them as one batch on `head` with
    /// this device, and sends it (under `grant` for a company's append). Returns the answer and the signed
    /// batch's bytes, which the acknowledged entry must carry.
    pub async fn send_batch(
        &self,
        sealer: &RecordSealer,
        customer: IdentityId,
        family: FamilyId,
        head: cmr_core::hash::Digest,
        contents: &[(RecordId, &[u8])],
        grant: Option<StatementId>,
    ) -> Result<(Value, Vec<u8>), ClientError> {
        let records: Vec<SealedRecord> = contents
            .iter()
            .map(|(id, c)| sealer.seal(&mut rand::rng(), *id, c))
            .collect::<Result<_, _>>()
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let device = &self.keys.device;
        let batch = Batch::for_records(device.id(), head, &records)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let bytes = SignedBatch::sign(batch, &device.signing).encode();
        let mut body = json!({
            "batch": B64.encode(&bytes),
            "records": records.iter().map(|r| B64.encode(r.as_bytes())).collect::<Vec<_>>(),
        });
        let target = match grant {
            // A company's append: the signed request names the grant, the epoch and the periods, so the
            // logged access is bound to it (cmr_log::entry::access_target).
            Some(g) => {
                body["grant"] = json!(g.to_hex());
                let periods = records.iter().map(|r| r.header().period);
                let (from, to) = (periods.clone().min(), periods.max());
                let (Some(from), Some(to), Some(first)) = (from, to, records.first()) else {
                    return Err(ClientError::Local(
                        "a batch holds at least one record".into(),
                    ));
                };
                cmr_log::entry::access_target(
                    &customer,
                    &family,
                    cmr_core::decision::AccessKind::Append,
                    &g,
                    Some(first.header().epoch),
                    from,
                    to,
                )
            }
            None => format!(
                "/v1/vaults/{}/families/{}/batches",
                customer.to_hex(),
                family.to_hex()
            ),
        };
        Ok((self.post(&target, &body).await?, bytes))
    }

    /// A signed POST as this device.
    pub async fn post(&self, target: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self.post_signed(target, body).await?.0)
    }

    /// [`Session::post`], also returning the signature base of the request that was answered (see
    /// [`Connection::post_known_signed`]).
    pub async fn post_signed(
        &self,
        target: &str,
        body: &Value,
    ) -> Result<(Value, String), ClientError> {
        let known = self.log.latest().map(|c| c.size);
        self.conn
            .post_known_signed(target, body, Signer::Device(&self.keys.device), known)
            .await
    }

    /// Decodes a base64 field of an answer.
    pub fn field(v: &Value, what: &str) -> Result<Vec<u8>, ClientError> {
        b64(v, what)
    }
}
