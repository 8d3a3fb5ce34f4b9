//! The customer's side: the key directory, the vault's families and their epoch secrets, records
//! written and read with proofs, answers to requests (narrowed grants sealed to the company's certified
//! key), revocation with the rotation it calls for, disputes, and the check of the customer's own chain.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::Head;
use cmr_core::consent::{
    Access, AccessRequest, Body, DisputeAction, ErasureTarget, Grant, GrantFamily, Initiator,
    Revocation, RotationCompletion, SignedStatement, Statement, StatementId,
};
use cmr_core::decision::{ConsentState, GrantStatus};
use cmr_core::directory::{
    Directory, DirectoryDevice, DirectoryFamily, DirectoryTracker, Keeper, SignedDirectory,
    rotate_family,
};
use cmr_core::epoch::{BundleEntry, EpochSecret, KeyBundle};
use cmr_core::export::{Export, FamilySource};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::IdentityId;
use cmr_core::identity::{DeviceCertificate, DeviceId, DeviceRequest, Signed};
use cmr_core::problem::Code;
use cmr_core::record::{FamilyKeys, RecordId, RecordSealer, SealedRecord};
use cmr_log::entry::ChainLink;
use serde_json::json;

use crate::error::{ClientError, VerifyError};
use crate::session::{Acked, Session};
use crate::verify::{ProvenEntry, prove, wire};
use crate::wellknown::CompanyProof;

/// A family the customer keeps: its scope and the secret of each epoch.
pub struct FamilyState {
    /// The family's name.
    pub name: FamilyName,
    /// The current epoch.
    pub epoch: u64,
    /// The secret of each epoch.
    pub secrets: HashMap<u64, EpochSecret>,
    /// The most batches this client has seen in the family (a head with fewer is a rollback).
    pub batches_seen: u64,
}

/// A grant this customer issued.
#[derive(Clone)]
pub struct IssuedGrant {
    /// The signed grant.
    pub statement: SignedStatement,
    /// Its log index.
    pub index: u64,
    /// The server time it was logged at.
    pub time: u64,
    /// Revoked since.
    pub revoked: bool,
}

impl IssuedGrant {
    /// The grant's body.
    pub fn grant(&self) -> Option<&Grant> {
        match &self.statement.statement().body {
            Body::Grant(g) => Some(g),
            _ => None,
        }
    }
}

/// A pending request, as verified by the client.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    /// The signed request.
    pub statement: SignedStatement,
    /// Its log index.
    pub index: u64,
}

impl PendingRequest {
    /// The request's body.
    pub fn request(&self) -> Option<&AccessRequest> {
        match &self.statement.statement().body {
            Body::Request(r) => Some(r),
            _ => None,
        }
    }
}

/// How the customer answers a request: what it grants, which may be narrower than what was asked.
#[derive(Debug, Clone)]
pub struct Approval {
    /// The scopes and access granted (each within what was asked).
    pub scopes: Vec<(Scope, Access)>,
    /// The look-back in months (at most what was asked).
    pub lookback_months: u32,
    /// The families of the company it covers (for a periodic or inferred scope, the customer's client
    /// names them; profile sections are found by name).
    pub families: Vec<FamilyName>,
    /// The family the company appends to, if it appends.
    pub append_family: Option<FamilyName>,
}

/// A customer's vault, as its client holds it.
pub struct Customer {
    /// The session.
    pub session: Session,
    /// The pseudonym key that names families without revealing counterparties.
    pub pseudonyms: PseudonymKey,
    /// The families.
    pub families: HashMap<FamilyId, FamilyState>,
    /// The latest directory published.
    pub directory: Option<SignedDirectory>,
    tracker: DirectoryTracker,
    /// The grants issued, by id.
    pub grants: HashMap<StatementId, IssuedGrant>,
    /// The consent state folded from the verified chain so far, and the entry it was folded up to:
    /// [`Customer::consent`] then reads and folds only the entries after it.
    folded: Option<(ConsentState, ChainLink)>,
}

/// A record opened by its reader.
#[derive(Debug, Clone)]
pub struct OpenedRecord {
    /// The record id.
    pub id: RecordId,
    /// The period.
    pub period: Period,
    /// Who wrote it.
    pub author: IdentityId,
    /// The epoch it is sealed under.
    pub epoch: u64,
    /// The content.
    pub content: Vec<u8>,
}

impl OpenedRecord {
    /// Opens `records` with `keys`; a record that does not open is a verification failure.
    pub fn open_all(
        keys: &mut FamilyKeys,
        records: &[SealedRecord],
    ) -> Result<Vec<Self>, ClientError> {
        records
            .iter()
            .map(|r| {
                let h = r.header();
                Ok(OpenedRecord {
                    id: h.id,
                    period: h.period,
                    author: h.author,
                    epoch: h.epoch,
                    content: keys
                        .open(r)
                        .map_err(|e| match e {
                            // A key this reader was never given is a gap in what it holds, not a sign
                            // of a faulty server: every record here is proven in the log.
                            cmr_core::record::RecordOpenError::NoKey => ClientError::Local(format!(
                                "record {} (epoch {}, written by {}) is sealed under a key this \
                                 reader does not hold; the customer's client gives readers every \
                                 author's keys from this version on",
                                h.id.to_hex(),
                                h.epoch,
                                h.author.to_hex()
                            )),
                            e => VerifyError::Read(format!("record {}: {e}", h.id.to_hex())).into(),
                        })?
                        .to_vec(),
                })
            })
            .collect()
    }
}

impl Customer {
    /// A customer around a registered session.
    pub fn new(session: Session, pseudonyms: PseudonymKey) -> Self {
        let tracker = DirectoryTracker::new(session.keys.identity);
        Self {
            session,
            pseudonyms,
            families: HashMap::new(),
            directory: None,
            tracker,
            grants: HashMap::new(),
            folded: None,
        }
    }

    /// Restores the latest directory this client published (from its saved state).
    pub fn restore_directory(&mut self, dir: SignedDirectory) {
        self.tracker = crate::state::tracker_of(&dir);
        self.directory = Some(dir);
    }

    /// The customer's id.
    pub fn id(&self) -> IdentityId {
        self.session.keys.identity
    }

    /// The id of a family of this vault.
    pub fn family_id(&self, name: &FamilyName) -> FamilyId {
        name.id(&self.id())
    }

    /// The transactions family with one counterparty.
    pub fn transactions_with(&self, company: &IdentityId) -> FamilyName {
        FamilyName::Transactions(self.pseudonyms.counterparty(company))
    }

    /// The family of attributes one company infers.
    pub fn inferred_by(&self, company: &IdentityId) -> FamilyName {
        FamilyName::Inferred(self.pseudonyms.inferred_by(company))
    }

    fn statement(&self, body: Body, now: u64) -> Statement {
        Statement {
            customer: self.id(),
            author: self.id(),
            device: self.session.keys.device.id(),
            issued_at: now,
            body,
        }
    }

    /// Publishes `next` (compare-and-swap on the previous digest) and moves the tracker on.
    async fn publish(&mut self, next: SignedDirectory) -> Result<Acked, ClientError> {
        let bytes = next.encode();
        let v = self
            .session
            .post(
                &format!("/v1/vaults/{}/directory", self.id().to_hex()),
                &json!({"directory": B64.encode(&bytes)}),
            )
            .await?;
        let acked = self.session.check_ack(&v, &bytes).await?;
        self.tracker
            .accept(std::slice::from_ref(&next), |_| Ok(()))
            .map_err(|e| VerifyError::Directory(e.to_string()))?;
        self.directory = Some(next);
        Ok(acked)
    }

    /// Declares families not declared yet, each with a fresh epoch secret, in one new directory.
    pub async fn declare(&mut self, names: &[FamilyName], now: u64) -> Result<(), ClientError> {
        let me = self.id();
        let device = &self.session.keys.device;
        let mut dir = match &self.directory {
            Some(d) => {
                let mut next = d.directory().clone();
                next.version += 1;
                next.prev = d.digest();
                next.signer = device.id();
                next.issued_at = now;
                next
            }
            None => Directory {
                customer: me,
                version: 1,
                prev: Digest([0; 32]),
                signer: device.id(),
                issued_at: now,
                devices: vec![DirectoryDevice {
                    device: device.id(),
                    signing_key: device.signing.verifying_key(),
                    kem_key: device.kem.public_key(),
                }],
                families: vec![],
            },
        };
        // The secrets are kept before the directory is published: if the answer is lost after the server
        // logged it, the families it lists must still have their secrets here.
        let mut added = false;
        for name in names {
            let id = name.id(&me);
            if dir.family(&id).is_some() {
                continue;
            }
            dir.families.push(DirectoryFamily {
                family: id,
                scope: name.scope(),
                epoch: 1,
                appenders: vec![],
            });
            self.families.entry(id).or_insert_with(|| FamilyState {
                name: *name,
                epoch: 1,
                secrets: HashMap::from([(1, EpochSecret::generate(&mut rand::rng()))]),
                batches_seen: 0,
            });
            added = true;
        }
        if !added {
            return Ok(());
        }
        dir.families.sort_by_key(|f| f.family);
        let signed = dir.sign(&self.session.keys.device.signing);
        self.publish(signed).await?;
        Ok(())
    }

    fn family(&self, id: &FamilyId) -> Result<&FamilyState, ClientError> {
        self.families.get(id).ok_or_else(|| {
            ClientError::Local("this vault has no such family; declare it first".into())
        })
    }

    /// Writes records into a family, at `period`, in one signed batch on the family's current head.
    pub async fn write(
        &mut self,
        family: FamilyId,
        period: Period,
        contents: &[&[u8]],
    ) -> Result<Acked, ClientError> {
        let records: Vec<(RecordId, &[u8])> = contents
            .iter()
            .map(|c| (RecordId::generate(&mut rand::rng()), *c))
            .collect();
        self.write_records(family, period, &records).await
    }

    /// [`Customer::write`] with record ids chosen by the caller (an import derives them, so running it
    /// again names the same records: [`cmr_core::family::PseudonymKey::import_record_id`]).
    pub async fn write_records(
        &mut self,
        family: FamilyId,
        period: Period,
        contents: &[(RecordId, &[u8])],
    ) -> Result<Acked, ClientError> {
        match self.write_under_epoch(family, period, contents).await {
            Err(e) if e.problem() == Some(Code::StaleEpoch) => {
                if !self.follow_logged_epoch(family).await? {
                    return Err(e);
                }
                self.write_under_epoch(family, period, contents).await
            }
            other => other,
        }
    }

    /// Moves `family` to the epoch the log names, if this client holds that epoch's secret: returns
    /// whether it moved. A rotation's completion can be logged while its answer is lost (the server or
    /// its database crashed under it and the retries ran out): the directory naming the new epoch was
    /// published and its secret kept before the completion was sent, so the secret is here, but this
    /// client still writes under the old epoch and is refused `stale-epoch`. The epoch is taken from the
    /// customer's verified chain ([`Customer::consent`]), never from the refusal.
    async fn follow_logged_epoch(&mut self, family: FamilyId) -> Result<bool, ClientError> {
        let logged = self.consent().await?.epoch(&family);
        let Some(f) = self.families.get_mut(&family) else {
            return Ok(false);
        };
        match logged {
            Some(epoch) if epoch > f.epoch && f.secrets.contains_key(&epoch) => {
                f.epoch = epoch;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// One attempt at [`Customer::write_records`], under the epoch this client holds for the family.
    async fn write_under_epoch(
        &mut self,
        family: FamilyId,
        period: Period,
        contents: &[(RecordId, &[u8])],
    ) -> Result<Acked, ClientError> {
        let me = self.id();
        let head = self.head(family).await?;
        let f = self.family(&family)?;
        let secret = f
            .secrets
            .get(&f.epoch)
            .ok_or_else(|| ClientError::Local("no secret for the current epoch".into()))?;
        let sealer = RecordSealer::new(
            me,
            family,
            f.epoch,
            me,
            &secret.read_key(Period::ORIGIN),
            period,
        )
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let (v, bytes) = self
            .session
            .send_batch(&sealer, me, family, head.digest(), contents, None)
            .await?;
        let acked = self.session.check_ack(&v, &bytes).await?;
        if let Some(f) = self.families.get_mut(&family) {
            f.batches_seen = f.batches_seen.max(head.batches + 1);
        }
        Ok(acked)
    }

    /// [`Customer::write`]; if the server answers `rotation-pending` (a grant on the family was used up,
    /// expired or revoked, or a device revoked, and the rotation is still owed), completes every owed
    /// rotation first ([`Customer::finish_rotations`]) and writes again, under the new epoch.
    pub async fn write_rotating(
        &mut self,
        family: FamilyId,
        period: Period,
        contents: &[&[u8]],
        now: u64,
    ) -> Result<Acked, ClientError> {
        let records: Vec<(RecordId, &[u8])> = contents
            .iter()
            .map(|c| (RecordId::generate(&mut rand::rng()), *c))
            .collect();
        self.write_records_rotating(family, period, &records, now)
            .await
    }

    /// [`Customer::write_records`], completing owed rotations first when the family waits for one.
    pub async fn write_records_rotating(
        &mut self,
        family: FamilyId,
        period: Period,
        contents: &[(RecordId, &[u8])],
        now: u64,
    ) -> Result<Acked, ClientError> {
        match self.write_records(family, period, contents).await {
            Err(e) if e.problem() == Some(Code::RotationPending) => {
                self.finish_rotations(now).await?;
                self.write_records(family, period, contents).await
            }
            other => other,
        }
    }

    /// The family's current head, from a verified own read of one page (one record) of its first period:
    /// the proof names the head, and the head must not have fewer batches than one seen before.
    async fn head(&mut self, family: FamilyId) -> Result<Head, ClientError> {
        let (head, _) = self
            .read_pages(family, Period::ORIGIN, Period::ORIGIN, Some(1))
            .await?;
        Ok(head)
    }

    /// Reads the customer's own records of `family` in `from..=to` (not logged), verifies completeness
    /// against the head, and opens them.
    pub async fn read(
        &mut self,
        family: FamilyId,
        from: Period,
        to: Period,
    ) -> Result<Vec<OpenedRecord>, ClientError> {
        let me = self.id();
        let (_, records) = self.read_raw(family, from, to).await?;
        let f = self.family(&family)?;
        let mut keys = family_keys(me, family, f, &records);
        OpenedRecord::open_all(&mut keys, &records)
    }

    async fn read_raw(
        &mut self,
        family: FamilyId,
        from: Period,
        to: Period,
    ) -> Result<(Head, Vec<SealedRecord>), ClientError> {
        self.read_pages(family, from, to, None).await
    }

    /// Reads `from..=to` page by page to the end, or only the first page of at most `first` records.
    async fn read_pages(
        &mut self,
        family: FamilyId,
        from: Period,
        to: Period,
        first: Option<u64>,
    ) -> Result<(Head, Vec<SealedRecord>), ClientError> {
        let me = self.id();
        let target = format!(
            "/v1/vaults/{}/families/{}/read",
            me.to_hex(),
            family.to_hex()
        );
        let mut cursor: Option<(Period, u64)> = None;
        let mut out = Vec::new();
        let mut head: Option<Head> = None;
        let mut restarts = 0;
        loop {
            let limit = first.unwrap_or(1000);
            let mut body = json!({"from": from.to_string(), "to": to.to_string(), "limit": limit});
            if let Some((p, i)) = cursor {
                body["cursor"] = json!([p.to_string(), i]);
            }
            let v = self.session.post(&target, &body).await?;
            let page = crate::company::parse_read(&v)?;
            let (h, verified) =
                crate::company::verify_page(&mut self.session, me, family, &page, cursor).await?;
            match head {
                Some(seen)
                    if seen != h
                        && h.batches > seen.batches
                        && restarts < crate::company::MAX_READ_RESTARTS =>
                {
                    // A write landed between two pages (the customer's own other device, or a company's
                    // append): read again from the start, against the newer head.
                    restarts += 1;
                    (cursor, head) = (None, None);
                    out.clear();
                    continue;
                }
                Some(seen) if seen != h => {
                    return Err(crate::company::changed_between_pages(seen, h));
                }
                _ => {}
            }
            out.extend(verified);
            head = Some(page.proof.head);
            if first.is_some() {
                break;
            }
            match page.proof.next {
                Some(n) if cursor.is_none_or(|c| n > c) => cursor = Some(n),
                Some(_) => {
                    return Err(
                        VerifyError::Read("a page cursor did not move forward".into()).into(),
                    );
                }
                None => break,
            }
        }
        let head = head.ok_or_else(|| ClientError::Malformed("no page".into()))?;
        if let Some(f) = self.families.get_mut(&family) {
            if head.batches < f.batches_seen {
                return Err(VerifyError::Read(format!(
                    "rollback: the head has {} batches, {} were seen",
                    head.batches, f.batches_seen
                ))
                .into());
            }
            f.batches_seen = head.batches;
        }
        Ok((head, out))
    }

    /// The requests not answered yet, each verified (signed by a device of its company, and logged).
    pub async fn pending(&mut self) -> Result<Vec<PendingRequest>, ClientError> {
        let v = self
            .session
            .post(
                &format!("/v1/vaults/{}/requests", self.id().to_hex()),
                &json!({}),
            )
            .await?;
        let answer: cmr_wire::vault::PendingJson = wire(&v, "pending requests")?;
        let cp = self.session.observe(&answer.checkpoint).await?;
        let mut out = Vec::new();
        for p in &answer.pending {
            // The request must be the logged entry at its index, proven in the checkpoint: its index is
            // the position its signature is checked at.
            let entry = prove(&p.entry, &cp)?;
            let index = entry.index;
            if entry.body.kind != cmr_log::entry::EntryKind::Statement
                || entry.body.customer != Some(self.id())
            {
                return Err(VerifyError::NotWhatWasSent(index).into());
            }
            let st = SignedStatement::decode(&entry.body.payload)
                .map_err(|e| ClientError::Malformed(e.to_string()))?;
            let author = st.statement().author;
            let company = self.session.identity(author).await?;
            st.verify(&company.state, index)
                .map_err(|e| VerifyError::Signature(e.to_string()))?;
            if st.statement().customer != self.id()
                || !matches!(st.statement().body, Body::Request(_))
            {
                return Err(VerifyError::Signature(
                    "a pending request that is not a request to this vault".into(),
                )
                .into());
            }
            out.push(PendingRequest {
                statement: st,
                index,
            });
        }
        Ok(out)
    }

    /// Grants `request` as narrowed by `approval`. The company's domain proof must name the requester;
    /// the keys are sealed to the newest certified device of the company, learnt from its key events.
    pub async fn approve(
        &mut self,
        request: &PendingRequest,
        proof: &CompanyProof,
        approval: &Approval,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        self.approve_for(request, proof, approval, None, now).await
    }

    /// [`Customer::approve`], lasting `duration` instead of what was asked when it is given: a shorter
    /// one (one read instead of thirty days, thirty days instead of until revoked). A longer one is
    /// refused here, as the log would refuse it.
    pub async fn approve_for(
        &mut self,
        request: &PendingRequest,
        proof: &CompanyProof,
        approval: &Approval,
        duration: Option<cmr_core::consent::Duration>,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        let company = request.statement.statement().author;
        if proof.identity != company {
            return Err(VerifyError::CompanyIdentity(format!(
                "the domain {} vouches for {}, but the request comes from {}",
                proof.domain,
                proof.identity.to_hex(),
                company.to_hex()
            ))
            .into());
        }
        let asked = request
            .request()
            .ok_or_else(|| ClientError::Local("not a request".into()))?
            .clone();
        let narrowed = Approval {
            lookback_months: approval.lookback_months.min(asked.lookback_months),
            ..approval.clone()
        };
        let duration = duration.unwrap_or(asked.duration);
        if !duration.within(asked.duration) {
            return Err(ClientError::Local(format!(
                "the company asked for {}; a grant may last as long or shorter, not {duration}",
                asked.duration
            )));
        }
        self.issue_grant(
            company,
            Some(request.statement.id()),
            &asked.purpose,
            duration,
            &narrowed,
            now,
        )
        .await
    }

    /// Grants `company` access it did not ask for (after checking its domain `proof`).
    pub async fn grant(
        &mut self,
        proof: &CompanyProof,
        purpose: &str,
        duration: cmr_core::consent::Duration,
        approval: &Approval,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        self.issue_grant(proof.identity, None, purpose, duration, approval, now)
            .await
    }

    /// Signs and sends a grant, its keys sealed to the newest certified device of `company`. A grant names
    /// each family's epoch; if one was moved by a rotation whose answer was lost, the grant is refused
    /// `stale-epoch`, and is made again under the logged epochs (as [`Customer::write_records`] does).
    async fn issue_grant(
        &mut self,
        company: IdentityId,
        request: Option<StatementId>,
        purpose: &str,
        duration: cmr_core::consent::Duration,
        approval: &Approval,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        match self
            .issue_grant_once(company, request, purpose, duration, approval, now)
            .await
        {
            Err(e) if e.problem() == Some(Code::StaleEpoch) => {
                let mut moved = false;
                for name in &approval.families {
                    let id = self.family_id(name);
                    moved |= self.follow_logged_epoch(id).await?;
                }
                if !moved {
                    return Err(e);
                }
                self.issue_grant_once(company, request, purpose, duration, approval, now)
                    .await
            }
            other => other,
        }
    }

    /// One attempt at [`Customer::issue_grant`], under the epochs this client holds.
    async fn issue_grant_once(
        &mut self,
        company: IdentityId,
        request: Option<StatementId>,
        purpose: &str,
        duration: cmr_core::consent::Duration,
        approval: &Approval,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        // The same rule a request is held to: one appending family, which the grantee also reads.
        AccessRequest {
            scopes: approval.scopes.clone(),
            purpose: purpose.to_owned(),
            duration,
            lookback_months: approval.lookback_months,
            counterparty: cmr_core::consent::Counterparty::OnlyRequester,
        }
        .check_approvable()
        .map_err(ClientError::Local)?;
        let kem = self
            .session
            .identity(company)
            .await?
            .kem_key()
            .ok_or_else(|| ClientError::Local("the company has no certified device".into()))?;
        let period = Period::from_unix(now as i64)
            .ok_or_else(|| ClientError::Local("clock before 2000".into()))?;
        let lookback_start = Period(period.0.saturating_sub(approval.lookback_months));
        let mut families = Vec::new();
        let mut entries = Vec::new();
        let append_family = approval.append_family.as_ref().map(|n| self.family_id(n));
        for name in &approval.families {
            let id = self.family_id(name);
            let f = self.family(&id)?;
            let access = approval
                .scopes
                .iter()
                .find(|(s, _)| *s == name.scope())
                .map(|(_, a)| *a)
                .ok_or_else(|| {
                    ClientError::Local(format!("scope {} is not granted", name.scope().name()))
                })?;
            let secret = f.secrets.get(&f.epoch).ok_or_else(|| {
                ClientError::Local("no secret for the family's current epoch".into())
            })?;
            // Profile sections and inferred attributes live in one period: their keys start there.
            let from = if name.scope().is_periodic() {
                lookback_start
            } else {
                Period::ORIGIN
            };
            if access.reads() {
                // The read key of every epoch (PRODUCT.md: K(e, max(look-back start, p0)) for each
                // epoch it may read): records stay under the epoch they were sealed in, so a grant
                // issued after a rotation still reads the look-back written before it.
                // And, as a rotation gives its readers, every appender's chain: readers of the family
                // open every author's appends (PRODUCT.md), the grantee's own included (it may have
                // appended under another grant).
                let appenders = self.appenders(id);
                let mut epochs: Vec<_> = f.secrets.iter().collect();
                epochs.sort_by_key(|(e, _)| **e);
                for (e, s) in epochs {
                    entries.push(BundleEntry {
                        family: id,
                        epoch: *e,
                        key: s.read_key(from),
                    });
                    for a in &appenders {
                        entries.push(BundleEntry {
                            family: id,
                            epoch: *e,
                            key: s.append_key(a, from),
                        });
                    }
                }
            }
            if access.appends()
                && append_family == Some(id)
                && !entries.iter().any(|e| {
                    e.family == id
                        && e.epoch == f.epoch
                        && e.key.chain() == cmr_core::epoch::Chain::Append(company)
                })
            {
                entries.push(BundleEntry {
                    family: id,
                    epoch: f.epoch,
                    key: secret.append_key(&company, from),
                });
            }
            families.push(GrantFamily {
                family: id,
                scope: name.scope(),
                epoch: f.epoch,
                access,
            });
        }
        families.sort_by_key(|f| f.family);
        // Every epoch times every appender: a family rotated very often, with many appenders, could need
        // more keys than a company opens. Refuse here rather than log a grant the company cannot use.
        if entries.len() > cmr_core::epoch::MAX_BUNDLE_ENTRIES {
            return Err(ClientError::Local(format!(
                "this grant would carry {} keys, more than a company opens ({}); grant fewer families",
                entries.len(),
                cmr_core::epoch::MAX_BUNDLE_ENTRIES
            )));
        }
        let g = Grant {
            grantee: company,
            request,
            purpose: purpose.to_string(),
            duration,
            not_before: now,
            expires: duration.expiry(now),
            lookback_start,
            window_months: None,
            scopes: approval.scopes.clone(),
            families,
            append_family,
            grantee_kem: kem,
        };
        let st = self.statement(Body::Grant(g), now);
        let gid = SignedStatement::grant_id(&st);
        // The same grant issued twice within a second has the same id: it is that grant (its keys sealed
        // afresh would be other bytes under the same id, which the log refuses).
        match self.grants.get(&gid) {
            Some(issued) if issued.revoked => {
                return Err(ClientError::Local(
                    "this exact grant was issued and revoked within the same second; issue it again \
                     a second later"
                        .into(),
                ));
            }
            Some(_) => return Ok(gid),
            None => {}
        }
        let bundle = KeyBundle { entries }.seal(&mut rand::rng(), self.id(), company, &kem, gid.0);
        let signed = SignedStatement::sign(st, Some(bundle), &self.session.keys.device.signing)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let acked = self.send_statement(&signed).await?;
        self.grants.insert(
            gid,
            IssuedGrant {
                statement: signed,
                index: acked.index,
                time: acked.body.time,
                revoked: false,
            },
        );
        Ok(gid)
    }

    /// Every company that this client ever let append to `family` (revoked grants included: their records
    /// stay under the epochs they wrote in), and those the directory names.
    fn appenders(&self, family: FamilyId) -> Vec<IdentityId> {
        let mut out: Vec<IdentityId> = self
            .grants
            .values()
            .filter_map(|g| g.grant())
            .filter(|g| g.append_family == Some(family))
            .map(|g| g.grantee)
            .chain(
                self.directory
                    .as_ref()
                    .and_then(|d| d.directory().family(&family).map(|f| f.appenders.clone()))
                    .unwrap_or_default(),
            )
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Signs a statement of this customer with this device, sends it, and checks its acknowledgement.
    async fn say(&mut self, body: Body, now: u64) -> Result<Acked, ClientError> {
        let st = self.statement(body, now);
        let signed = SignedStatement::sign(st, None, &self.session.keys.device.signing)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        self.send_statement(&signed).await
    }

    /// Sends a signed statement and checks its acknowledgement.
    pub async fn send_statement(&mut self, st: &SignedStatement) -> Result<Acked, ClientError> {
        let bytes = st.encode();
        let v = self
            .session
            .post(
                &format!("/v1/vaults/{}/statements", self.id().to_hex()),
                &json!({"statement": B64.encode(&bytes)}),
            )
            .await?;
        self.session.check_ack(&v, &bytes).await
    }

    /// Refuses a request.
    pub async fn deny(
        &mut self,
        request: &PendingRequest,
        reason: &str,
        now: u64,
    ) -> Result<Acked, ClientError> {
        self.say(
            Body::Denial {
                request: request.statement.id(),
                reason: reason.into(),
            },
            now,
        )
        .await
    }

    /// Blocks a company (its requests are refused from then on), or unblocks it.
    pub async fn block(
        &mut self,
        company: IdentityId,
        blocked: bool,
        now: u64,
    ) -> Result<Acked, ClientError> {
        self.say(Body::Block { company, blocked }, now).await
    }

    /// Sets the customer's own limits on unsolicited requests (replacing earlier ones): only companies
    /// holding an active grant, and or a cap per 24 hours. The server applies them by the log's rule from
    /// this statement's position on.
    pub async fn set_request_policy(
        &mut self,
        policy: cmr_core::consent::RequestPolicy,
        now: u64,
    ) -> Result<Acked, ClientError> {
        self.say(Body::RequestPolicy(policy), now).await
    }

    /// Certifies a new device from its signed request (this device must hold the identity key) and
    /// publishes the next directory listing it. Returns the certificate, for the new device to check.
    pub async fn add_device(
        &mut self,
        request: &DeviceRequest,
        now: u64,
    ) -> Result<Signed<DeviceCertificate>, ClientError> {
        let me = self.id();
        if request.identity != me {
            return Err(ClientError::Local(
                "the device asks to join another identity".into(),
            ));
        }
        // Certifying is idempotent: a device already certified under the current identity key (a run
        // that stopped after the certificate was logged) gets its certificate again, and is not certified
        // twice; the directory is published if that run stopped before it.
        self.session.forget_identity(&me);
        let known = self.session.identity(me).await?;
        let wanted = request.device();
        let current = known.current_devices().any(|c| c.device() == wanted);
        let revoked = known
            .devices
            .iter()
            .any(|(c, revoked)| c.device() == wanted && *revoked);
        let cert = match known.certificates.get(&wanted).filter(|_| current) {
            Some(bytes) => Signed::<DeviceCertificate>::decode(bytes)
                .map_err(|e| ClientError::Malformed(e.to_string()))?,
            None if revoked => {
                return Err(ClientError::Local(
                    "this device was revoked, and a revoked device cannot join again: make a new \
                     one with `cmr customer device new`"
                        .into(),
                ));
            }
            None => {
                let (seq, key) = self.session.keys.identity()?;
                let cert = request.certify(seq, key, now);
                self.session.certify(&cert.encode()).await?;
                self.session.forget_identity(&me);
                cert
            }
        };
        let listed = self
            .directory
            .as_ref()
            .is_some_and(|d| d.directory().devices.iter().any(|x| x.device == wanted));
        if !listed {
            let device = cert.body().clone();
            self.next_directory(now, |d| {
                d.devices.push(DirectoryDevice {
                    device: device.device(),
                    signing_key: device.signing_key,
                    kem_key: device.kem_key,
                });
                d.devices.sort_by_key(|x| x.device);
                d.devices.dedup_by_key(|x| x.device);
            })
            .await?;
        }
        Ok(cert)
    }

    /// The customer's devices, from its verified key events: each certificate and whether it was revoked.
    pub async fn devices(&mut self) -> Result<Vec<(DeviceCertificate, bool)>, ClientError> {
        let me = self.id();
        self.session.forget_identity(&me);
        Ok(self.session.identity(me).await?.devices.clone())
    }

    /// Revokes a device (this device must hold the identity key), publishes the directory without it,
    /// and rotates every family: the revoked device held the vault key, so every current epoch is exposed.
    /// Returns the revocation's and the rotations' acknowledgements.
    pub async fn revoke_device(
        &mut self,
        device: DeviceId,
        now: u64,
    ) -> Result<(Acked, Vec<Acked>), ClientError> {
        let (mut revoked, rotations) = self.revoke_devices(&[device], now).await?;
        let acked = revoked
            .pop()
            .ok_or_else(|| ClientError::Local("no revocation".into()))?;
        Ok((acked, rotations))
    }

    /// Publishes the next directory, changed by `change`.
    async fn next_directory(
        &mut self,
        now: u64,
        change: impl FnOnce(&mut Directory),
    ) -> Result<Acked, ClientError> {
        let current = self
            .directory
            .clone()
            .ok_or_else(|| ClientError::Local("no directory yet; register first".into()))?;
        let mut next = current.directory().clone();
        next.version += 1;
        next.prev = current.digest();
        next.signer = self.session.keys.device.id();
        next.issued_at = now;
        change(&mut next);
        let signed = next.sign(&self.session.keys.device.signing);
        self.publish(signed).await
    }

    /// Erases a family (its records are deleted; the log keeps only that an erasure happened) or, with
    /// `None`, the whole vault.
    pub async fn erase(
        &mut self,
        family: Option<FamilyId>,
        now: u64,
    ) -> Result<Acked, ClientError> {
        let target = match family {
            Some(f) => ErasureTarget::Family(f),
            None => ErasureTarget::Vault,
        };
        let acked = self.say(Body::Erasure(target), now).await?;
        // An erased family's secrets protect nothing any more: forget them.
        match family {
            Some(f) => {
                self.families.remove(&f);
            }
            None => self.families.clear(),
        }
        Ok(acked)
    }

    /// The whole vault decrypted, as a portable export (`cmr_core::export`). `companies` are the companies
    /// this client knows: a family named by a pseudonym is attributed to the one whose pseudonym matches.
    pub async fn export(
        &mut self,
        companies: &[IdentityId],
        blocked: &[IdentityId],
    ) -> Result<Export, ClientError> {
        let me = self.id();
        let mut ids: Vec<FamilyId> = self.families.keys().copied().collect();
        ids.sort();
        let mut loaded = Vec::new();
        // Every period a record can be in (the API's months are four-digit years).
        let last = Period::from_year_month(9999, 12).unwrap_or(Period::ORIGIN);
        for fid in ids {
            let (_, records) = self.read_raw(fid, Period::ORIGIN, last).await?;
            let f = self.family(&fid)?;
            let company = companies.iter().copied().find(|c| {
                matches!(f.name, FamilyName::Transactions(p) if p == self.pseudonyms.counterparty(c))
                    || matches!(f.name, FamilyName::Inferred(p) if p == self.pseudonyms.inferred_by(c))
            });
            let keys = family_keys(me, fid, f, &records);
            loaded.push((f.name.scope(), company, records, keys));
        }
        let sources = loaded
            .iter_mut()
            .map(|(scope, company, records, keys)| FamilySource {
                scope: *scope,
                company: *company,
                records,
                keys,
            })
            .collect();
        Export::build(me, sources, blocked).map_err(|e| VerifyError::Read(e.to_string()).into())
    }

    /// Stores `backup` on the server as version `version` (the current one plus one).
    pub async fn put_backup(
        &mut self,
        backup: &crate::state::KeyBackup,
        version: u64,
    ) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(backup).map_err(|e| ClientError::Local(e.to_string()))?;
        self.session
            .post(
                &format!("/v1/vaults/{}/backup", self.id().to_hex()),
                &json!({"version": version, "backup": B64.encode(bytes)}),
            )
            .await?;
        Ok(())
    }

    /// The latest key backup on the server and its version.
    pub async fn get_backup(
        session: &Session,
    ) -> Result<Option<(u64, crate::state::KeyBackup)>, ClientError> {
        let r = session
            .post(
                &format!(
                    "/v1/vaults/{}/backup/latest",
                    session.keys.identity.to_hex()
                ),
                &json!({}),
            )
            .await;
        let v = match r {
            Err(ClientError::Refused { status: 404, .. }) => return Ok(None),
            other => other?,
        };
        let answer: cmr_wire::vault::BackupJson = wire(&v, "backup")?;
        let version = answer.version;
        let bytes = B64
            .decode(&answer.backup)
            .map_err(|_| ClientError::Malformed("the backup is not base64".into()))?;
        let backup = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Malformed(format!("the backup does not parse: {e}")))?;
        Ok(Some((version, backup)))
    }

    /// Revokes several devices, publishes the directory without them, then rotates every family once.
    pub async fn revoke_devices(
        &mut self,
        devices: &[DeviceId],
        now: u64,
    ) -> Result<(Vec<Acked>, Vec<Acked>), ClientError> {
        let me = self.id();
        if devices.contains(&self.session.keys.device.id()) {
            return Err(ClientError::Local(
                "this device cannot revoke itself; revoke it from another device".into(),
            ));
        }
        let (seq, key) = self.session.keys.identity()?;
        // A copy: the session is borrowed mutably while the revocations are acknowledged.
        let key = cmr_core::keys::SigningKey::from_seed(&key.seed());
        let mut revocations = Vec::new();
        for device in devices {
            let rev = cmr_core::identity::revoke_device(me, seq, &key, *device, now).encode();
            let v = self
                .session
                .conn
                .post(
                    &format!("/v1/identities/{}/devices/revoke", me.to_hex()),
                    &json!({"revocation": B64.encode(&rev)}),
                    crate::transport::Signer::Identity(me, &key),
                )
                .await?;
            revocations.push(self.session.check_ack(&v, &rev).await?);
        }
        self.session.forget_identity(&me);
        let gone = devices.to_vec();
        self.next_directory(now, |d| d.devices.retain(|x| !gone.contains(&x.device)))
            .await?;
        let rotations = self.finish_rotations(now).await?;
        Ok((revocations, rotations))
    }

    /// Recovery, step one, on a new device: rotates the identity key to the one the recovery secret
    /// reveals (pre-committed in the current key event) and certifies this device with it. Returns the
    /// session, which now holds the new identity key, and the next recovery secret. From here on the old
    /// phrase no longer rotates anything, so the caller keeps both at once (key file, phrase shown)
    /// before step two.
    pub async fn recover_identity(
        conn: crate::transport::Connection,
        log_key: cmr_log::note::NoteVerifier,
        identity: IdentityId,
        recovery: &cmr_core::identity::RecoverySecret,
        now: u64,
    ) -> Result<(Session, cmr_core::identity::RecoverySecret), ClientError> {
        let device = cmr_core::identity::DeviceKeys::generate(&mut rand::rng());
        let mut session = Session::new(
            conn,
            crate::session::Keys {
                identity,
                role: cmr_core::identity::Role::Customer,
                device,
                identity_key: None,
            },
            log_key,
        );
        // The new device has no registered key yet: it proves the phrase's next identity key instead.
        let history = session
            .fetch_key_events(identity, Some(&recovery.identity_key()))
            .await
            .map_err(|e| match e {
                ClientError::Refused { status: 404, .. } => ClientError::Local(
                    "this recovery phrase does not belong to this identity's current key, or the \
                     identity does not exist"
                        .into(),
                ),
                e => e,
            })?
            .state
            .keys()
            .clone();
        if history.current().next_key_digest
            != cmr_core::identity::next_key_digest(&recovery.identity_key().verifying_key())
        {
            return Err(ClientError::Local(
                "this recovery phrase does not belong to this identity's current key".into(),
            ));
        }
        let rotated = cmr_core::identity::rotate_identity(&mut rand::rng(), &history, recovery);
        let event = rotated.inception.encode();
        let v = session
            .conn
            .post(
                &format!("/v1/identities/{}/rotate", identity.to_hex()),
                &json!({"event": B64.encode(&event)}),
                crate::transport::Signer::Identity(identity, &rotated.identity_key),
            )
            .await?;
        session.check_ack(&v, &event).await?;
        let seq = rotated.inception.event().seq;
        let cert = session
            .keys
            .device
            .certify(identity, seq, &rotated.identity_key, now)
            .encode();
        session.keys.identity_key = Some((seq, rotated.identity_key));
        session.certify(&cert).await?;
        session.forget_identity(&identity);
        Ok((session, rotated.recovery))
    }

    /// Recovery, step two: opens the vault key from the server's key backup with the recovery secret it
    /// is wrapped to (the phrase used in step one), restores the client state, marks the grants revoked
    /// since, revokes every other device and rotates every family. Returns the customer, the old vault
    /// key and the backup's version; the caller replaces the vault key and stores a new backup. It can be
    /// run again after a failure.
    pub async fn restore_from_backup(
        session: Session,
        recovery: &cmr_core::identity::RecoverySecret,
        now: u64,
    ) -> Result<(Customer, cmr_core::vault::VaultKey, u64), ClientError> {
        let identity = session.keys.identity;
        let (version, backup) = Self::get_backup(&session).await?.ok_or_else(|| {
            ClientError::Local("the server holds no key backup for this vault".into())
        })?;
        let wrapped = B64
            .decode(&backup.vault_key)
            .ok()
            .and_then(|b| cmr_core::wrap::WrappedKey::from_slice(&b).ok())
            .ok_or_else(|| ClientError::Malformed("the backup's vault key".into()))?;
        // The wrap is bound to the key event it names: only that event's recovery secret opens it.
        let vault = cmr_core::vault::VaultKey::unwrap_with_recovery(
            identity,
            backup.recovery_seq,
            recovery,
            &wrapped,
        )
        .map_err(|_| {
            ClientError::Local("the backup's vault key does not open with this phrase".into())
        })?;
        let state = backup.open(&vault, identity)?;
        let mut customer = state.restore(session, &vault)?;
        // The server may have served an older backup: the verified chain says which grants ended since.
        customer.refresh_revocations().await?;
        let mine = customer.session.keys.device.id();
        let lost: Vec<DeviceId> = customer
            .devices()
            .await?
            .into_iter()
            .filter(|(c, revoked)| !revoked && c.device() != mine)
            .map(|(c, _)| c.device())
            .collect();
        if !lost.is_empty() {
            customer.revoke_devices(&lost, now).await?;
        }
        Ok((customer, vault, version))
    }

    /// Disputes a record a company appended (an inferred attribute): rejects it.
    pub async fn dispute(
        &mut self,
        family: FamilyId,
        record: RecordId,
        now: u64,
    ) -> Result<Acked, ClientError> {
        self.say(
            Body::Dispute {
                family,
                record,
                action: DisputeAction::Reject,
            },
            now,
        )
        .await
    }

    /// Revokes a grant, then completes every rotation owed (the revoked grant's families, and any owed
    /// before): a fresh epoch secret, the next directory, and one HPKE seal for each grant that is still
    /// active on the family. Returns the revocation's and the rotations' acknowledgements.
    ///
    /// The revocation is logged before any rotation starts; if a rotation then fails, it stays owed and
    /// [`Customer::finish_rotations`] completes it later (use [`Customer::revoke_grant`] and that to
    /// report the two steps apart).
    pub async fn revoke(
        &mut self,
        grant: StatementId,
        reason: &str,
        now: u64,
    ) -> Result<(Acked, Vec<Acked>), ClientError> {
        let (revoked, _) = self.revoke_grant(grant, reason, now).await?;
        let rotations = self.finish_rotations(now).await?;
        Ok((revoked, rotations))
    }

    /// The vault's consent state as the log says, folded from this customer's verified chain by the
    /// log's own rule ([`cmr_log::consent::fold`]): which grants are active, used, expired or revoked,
    /// each family's epoch, and which rotations are owed.
    pub async fn consent(&mut self) -> Result<ConsentState, ClientError> {
        // Only the entries after the last fold are read and verified: they must link down to it, so the
        // whole chain stays verified without walking it again (a long chain made every revocation slow).
        let since = self.folded.as_ref().map(|(_, link)| *link);
        let (newer, size) = self.chain_walk(since).await?;
        let seen: std::collections::HashSet<u64> = newer.iter().map(|e| e.index).collect();
        let floor = since.map_or(0, |l| l.index + 1);
        for i in &self.session.acked {
            if *i >= floor && *i < size && !seen.contains(i) {
                return Err(VerifyError::Chain(format!(
                    "acknowledged entry {i} is missing from the chain"
                ))
                .into());
            }
        }
        let (mut state, mut link) = match self.folded.take() {
            Some((state, link)) => (state, Some(link)),
            None => (ConsentState::new(self.id()), None),
        };
        for e in newer.iter().rev() {
            cmr_log::consent::fold(&mut state, e.index, &e.body)
                .map_err(|x| VerifyError::Chain(x.to_string()))?;
            link = Some(ChainLink {
                index: e.index,
                hash: cmr_log::entry::EntryBody::hash(&e.salted.body),
            });
        }
        if let Some(link) = link {
            self.folded = Some((state.clone(), link));
        }
        Ok(state)
    }

    /// Completes every rotation the log says is owed at `now` (a grant revoked, used up or expired, or a
    /// device revoked, whose families were not rotated since) for the families this client holds, and
    /// returns their acknowledgements. Until then the server answers appends to them `rotation-pending`.
    pub async fn finish_rotations(&mut self, now: u64) -> Result<Vec<Acked>, ClientError> {
        let consent = self.consent().await?;
        let mut rotations = Vec::new();
        for family in consent.pending_rotations(now) {
            if self.families.contains_key(&family) {
                rotations.push(self.rotate_with(&consent, family, now).await?);
            }
        }
        Ok(rotations)
    }

    /// Logs the revocation of `grant` alone, and returns the families it could read: each must then be
    /// rotated ([`Customer::rotate`]); until then, appends to them wait (`rotation-pending`).
    pub async fn revoke_grant(
        &mut self,
        grant: StatementId,
        reason: &str,
        now: u64,
    ) -> Result<(Acked, Vec<FamilyId>), ClientError> {
        let issued = self
            .grants
            .get(&grant)
            .cloned()
            .ok_or_else(|| ClientError::Local("no such grant issued by this client".into()))?;
        let revoked = self
            .say(
                Body::Revocation(Revocation {
                    grant,
                    initiator: Initiator::Customer,
                    reason: reason.into(),
                }),
                now,
            )
            .await?;
        if let Some(g) = self.grants.get_mut(&grant) {
            g.revoked = true;
        }
        let families = issued
            .grant()
            .map(|g| {
                g.families
                    .iter()
                    .filter(|f| f.access.reads())
                    .map(|f| f.family)
                    .collect()
            })
            .unwrap_or_default();
        Ok((revoked, families))
    }

    /// Rotates `family`: the grants still active on it keep access with fresh keys.
    pub async fn rotate(&mut self, family: FamilyId, now: u64) -> Result<Acked, ClientError> {
        let consent = self.consent().await?;
        match self.rotate_with(&consent, family, now).await {
            // An earlier rotation's directory was logged but its answer was lost (the server died
            // under it): this client's directory is behind the log's. Take the logged one (verified on
            // the chain) and rotate again from it; its epoch's unused secret is replaced.
            Err(e) if e.code() == Some("directory-conflict") => {
                self.directory = Some(self.check_directory().await?);
                let consent = self.consent().await?;
                self.rotate_with(&consent, family, now).await
            }
            done => done,
        }
    }

    /// Rotates `family` as `consent` (the log's state, from [`Customer::consent`]) says: the new epoch
    /// is the one after the family's epoch in the log (a directory that already names it, from a
    /// rotation whose completion was never logged, is replaced along with its unused secret), and only
    /// grants active at `now` that hold the family keep it: a used, expired or revoked one does not.
    async fn rotate_with(
        &mut self,
        consent: &ConsentState,
        family: FamilyId,
        now: u64,
    ) -> Result<Acked, ClientError> {
        let current = self
            .directory
            .clone()
            .ok_or_else(|| ClientError::Local("no directory yet".into()))?;
        let logged_epoch = consent
            .epoch(&family)
            .ok_or_else(|| ClientError::Local("the log names no such family".into()))?;
        let mut keepers = Vec::new();
        let mut keeper_grants = Vec::new();
        let grants: Vec<(StatementId, IssuedGrant)> =
            self.grants.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, g) in &grants {
            let Some(body) = g.grant() else { continue };
            let active = consent
                .grant_status(id, now)
                .is_some_and(GrantStatus::is_active);
            if !active || !consent.holds(id, &family) {
                continue;
            }
            let Some(gf) = body.families.iter().find(|f| f.family == family) else {
                continue;
            };
            let from = if gf.scope.is_periodic() {
                body.lookback_start
            } else {
                Period::ORIGIN
            };
            // Seal to a key the grantee's verified key events (as this session last fetched them) still
            // certify: the grant's own if its device is still valid, else its newest device's; a grantee
            // with none keeps nothing.
            let grantee = self.session.identity(body.grantee).await?;
            let still = grantee
                .current_devices()
                .any(|c| c.kem_key == body.grantee_kem);
            let Some(kem_key) = (if still {
                Some(body.grantee_kem)
            } else {
                grantee.kem_key()
            }) else {
                continue;
            };
            keepers.push(Keeper {
                grantee: body.grantee,
                kem_key,
                grant: id.0,
                read_from: gf.access.reads().then_some(from),
                append_from: (gf.access.appends() && body.append_family == Some(family))
                    .then_some(from),
            });
            keeper_grants.push(*id);
        }
        let device = &self.session.keys.device;
        let rotation = rotate_family(
            &mut rand::rng(),
            &current,
            family,
            logged_epoch + 1,
            &keepers,
            (device.id(), &device.signing),
            now,
        )
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let digest = rotation.directory.digest();
        let epoch = rotation
            .directory
            .directory()
            .family(&family)
            .map(|f| f.epoch)
            .ok_or_else(|| ClientError::Local("the rotated family is missing".into()))?;
        // Keep the new secret before anything is published: if the completion then fails, the directory
        // already names the epoch, and its secret must not be lost.
        if let Some(f) = self.families.get_mut(&family) {
            f.secrets.insert(epoch, rotation.secret);
        }
        self.publish(rotation.directory).await?;
        let rc = RotationCompletion {
            family,
            epoch,
            directory: digest,
            keepers: rotation
                .bundles
                .into_iter()
                .map(|(_, g, b)| (StatementId(g), b))
                .collect(),
        };
        let acked = self.say(Body::RotationCompletion(rc), now).await?;
        if let Some(f) = self.families.get_mut(&family) {
            f.epoch = epoch;
        }
        Ok(acked)
    }

    /// Marks revoked every grant this client issued whose revocation is on the customer's verified chain
    /// (after restoring an older state, a grant revoked since must not be re-keyed at the next rotation).
    pub async fn refresh_revocations(&mut self) -> Result<(), ClientError> {
        let chain = self.history().await?;
        for e in chain
            .iter()
            .filter(|e| e.body.kind == cmr_log::entry::EntryKind::Statement)
        {
            // Marking a grant revoked only ever removes a keeper, so any revocation on the chain counts.
            if let Ok(st) = SignedStatement::decode(&e.body.payload)
                && let Body::Revocation(r) = &st.statement().body
                && let Some(g) = self.grants.get_mut(&r.grant)
            {
                g.revoked = true;
            }
        }
        Ok(())
    }

    /// Accepts the vault's log after a restore from a backup, once the customer decided to
    /// ([`Session::accept_restore`]), and forgets what the restore took back: grants issued past the
    /// restored size, the families' batch counts and the directory seen since (learned again from the
    /// verified chain). Returns the restored size.
    pub async fn accept_restore(&mut self) -> Result<u64, ClientError> {
        let size = self.session.accept_restore().await?;
        self.grants.retain(|_, g| g.index < size);
        for f in self.families.values_mut() {
            f.batches_seen = 0;
        }
        self.folded = None;
        self.tracker = DirectoryTracker::new(self.id());
        let dir = self.check_directory().await?;
        self.directory = Some(dir);
        Ok(size)
    }

    /// Checks the server's view of the key directory: the newest directory on the customer's verified
    /// chain must be signed by a device of the customer valid at its position, and be no older than (and
    /// chain to) the newest this client has seen. Another device learns the directory this way.
    pub async fn check_directory(&mut self) -> Result<SignedDirectory, ClientError> {
        let (chain, size) = self.chain().await?;
        let newest = chain
            .iter()
            .find(|e| e.body.kind == cmr_log::entry::EntryKind::Directory)
            .ok_or_else(|| VerifyError::Directory("no directory on the chain".into()))?;
        let dir = SignedDirectory::decode(&newest.body.payload)
            .map_err(|e| VerifyError::Directory(e.to_string()))?;
        let me = self.id();
        let position = newest.index;
        let identity = self.session.identity(me).await?;
        dir.verify(&identity.state, position)
            .map_err(|e| VerifyError::Directory(e.to_string()))?;
        self.tracker
            .accept(std::slice::from_ref(&dir), |_| Ok(()))
            .map_err(|e| VerifyError::Directory(e.to_string()))?;
        self.check_acked(&chain, size)?;
        Ok(dir)
    }

    /// Opens the stream of this customer's chain as it grows (`/v1/vaults/{me}/events`): each
    /// [`ChainEvents::next`] waits for the next change of the chain's newest entry. `after` is the
    /// newest entry this client knows (an event comes at once if the chain's is another). An event is a
    /// hint to look: [`Customer::history`] (or any call) then verifies what changed.
    pub async fn watch(&self, after: Option<u64>) -> Result<ChainEvents, ClientError> {
        let resp = self
            .session
            .conn
            .post_stream(
                &format!("/v1/vaults/{}/events", self.id().to_hex()),
                &json!({ "after": after }),
                crate::transport::Signer::Device(&self.session.keys.device),
            )
            .await?;
        Ok(ChainEvents {
            resp,
            buf: Vec::new(),
        })
    }

    /// Walks the customer's own chain from its newest entry and checks it: every entry included in the
    /// checkpoint, each linked to the one before by hash, and every entry this client had acknowledged
    /// present. Returns the entries, newest first.
    pub async fn history(&mut self) -> Result<Vec<ProvenEntry>, ClientError> {
        let (chain, size) = self.chain().await?;
        self.check_acked(&chain, size)?;
        Ok(chain)
    }

    /// Every entry this client had acknowledged below `size` must be on the chain.
    fn check_acked(&self, chain: &[ProvenEntry], size: u64) -> Result<(), ClientError> {
        let seen: std::collections::HashSet<u64> = chain.iter().map(|e| e.index).collect();
        for i in &self.session.acked {
            if *i < size && !seen.contains(i) {
                return Err(VerifyError::Chain(format!(
                    "acknowledged entry {i} is missing from the chain"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// The chain, verified link by link, and the size of the checkpoint it was checked against.
    async fn chain(&mut self) -> Result<(Vec<ProvenEntry>, u64), ClientError> {
        self.chain_walk(None).await
    }

    /// The chain's entries after `since` (all of them for `None`), newest first, verified link by link
    /// down to `since` (which must be on the chain, with the same hash) or to the chain's start.
    async fn chain_walk(
        &mut self,
        since: Option<ChainLink>,
    ) -> Result<(Vec<ProvenEntry>, u64), ClientError> {
        let me = self.id();
        let mut reached = false;
        let mut before: Option<u64> = None;
        let mut out: Vec<ProvenEntry> = Vec::new();
        let mut cp = None;
        loop {
            let mut body = json!({"limit": 1000});
            if let Some(b) = before {
                body["before"] = json!(b);
            }
            // The server stops at the entry verified last (the page includes it): a customer's chain
            // holds every access to the vault, and walking it further down only to stop here made a
            // vault's every change cost a thousand entries and their proofs.
            if let Some(base) = since {
                body["down_to"] = json!(base.index);
            }
            let v = self
                .session
                .post(&format!("/v1/vaults/{}/history", me.to_hex()), &body)
                .await?;
            let page: cmr_wire::log::PageOfEntriesJson = wire(&v, "history")?;
            // Each page's entries are proven in the checkpoint it came with. The log may grow between
            // pages (under load, a long chain's walk always sees it grow): a later checkpoint is
            // checked consistent with the earlier ones, so what an earlier page proved stays proven,
            // and the later pages hold only entries older than the first page's. The walk is the
            // chain as of the first page's checkpoint, whose size it returns.
            let this = self.session.observe(&page.checkpoint).await?;
            if cp.is_none() {
                cp = Some(this.clone());
            }
            for e in &page.entries {
                let e = match e {
                    cmr_wire::log::ChainEntryJson::Redacted(r) => {
                        return Err(
                            VerifyError::Chain(format!("entry {} is redacted", r.index)).into()
                        );
                    }
                    cmr_wire::log::ChainEntryJson::Entry(e) => e,
                };
                let p = prove(e, &this)?;
                if let Some(base) = since
                    && p.index <= base.index
                {
                    // The walk meets the entry folded last: it must be the same entry, and the newer ones
                    // link down to it (checked below like every link).
                    let hash = cmr_log::entry::EntryBody::hash(&p.salted.body);
                    if p.index != base.index || hash != base.hash {
                        return Err(VerifyError::Chain(format!(
                            "the chain no longer holds entry {} as this client verified it",
                            base.index
                        ))
                        .into());
                    }
                    if let Some(newer) = out.last()
                        && newer.body.prev != Some(base)
                    {
                        return Err(VerifyError::Chain(format!(
                            "entry {} does not link to entry {}",
                            newer.index, base.index
                        ))
                        .into());
                    }
                    reached = true;
                    break;
                }
                if p.body.customer != Some(me) {
                    return Err(VerifyError::Chain(format!(
                        "entry {} is not on this chain",
                        p.index
                    ))
                    .into());
                }
                if let Some(newer) = out.last() {
                    let link = newer.body.prev;
                    let expected = ChainLink {
                        index: p.index,
                        hash: cmr_log::entry::EntryBody::hash(&p.salted.body),
                    };
                    if link != Some(expected) {
                        return Err(VerifyError::Chain(format!(
                            "entry {} does not link to entry {}",
                            newer.index, p.index
                        ))
                        .into());
                    }
                }
                out.push(p);
            }
            if reached {
                break;
            }
            match (page.next, page.entries.is_empty()) {
                (Some(n), false) => before = Some(n),
                _ => break,
            }
        }
        if let Some(base) = since {
            if !reached
                && out
                    .last()
                    .is_none_or(|oldest| oldest.body.prev != Some(base))
            {
                return Err(VerifyError::Chain(format!(
                    "the chain no longer reaches entry {}, which this client verified",
                    base.index
                ))
                .into());
            }
        } else if let Some(oldest) = out.last()
            && oldest.body.prev.is_some()
        {
            return Err(VerifyError::Chain(format!(
                "the chain stops at entry {} before its start",
                oldest.index
            ))
            .into());
        }
        Ok((out, cp.map_or(0, |c| c.size)))
    }
}

/// The keys that open every record of a family the customer holds: each epoch's read chain, and the
/// append chain of each company that wrote one of `records`.
fn family_keys(
    me: IdentityId,
    family: FamilyId,
    f: &FamilyState,
    records: &[SealedRecord],
) -> FamilyKeys {
    let mut keys = FamilyKeys::new(me, family);
    let mut authors: Vec<IdentityId> = records.iter().map(|r| r.header().author).collect();
    authors.sort();
    authors.dedup();
    for (epoch, secret) in &f.secrets {
        keys.insert(*epoch, secret.read_key(Period::ORIGIN));
        for a in authors.iter().filter(|a| **a != me) {
            keys.insert(*epoch, secret.append_key(a, Period::ORIGIN));
        }
    }
    keys
}

/// The stream of a customer's chain as it grows (see [`Customer::watch`]).
pub struct ChainEvents {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

/// The longest event the stream accepts (a `head` event is a few dozen bytes).
const MAX_EVENT: usize = 4096;

impl ChainEvents {
    /// The index of the chain's newest entry the next time it changes; `None` once the server ended
    /// the stream (it stopped; open it again).
    pub async fn next(&mut self) -> Result<Option<u64>, ClientError> {
        loop {
            if let Some(head) = self.take_event()? {
                return Ok(Some(head));
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(ClientError::Transport(e.to_string())),
            }
            if self.buf.len() > MAX_EVENT && !self.buf.windows(2).any(|w| w == b"\n\n") {
                return Err(ClientError::Malformed(
                    "an event stream line is too long".into(),
                ));
            }
        }
    }

    /// The first complete `head` event in the buffer, if any (comments and other events are skipped).
    fn take_event(&mut self) -> Result<Option<u64>, ClientError> {
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            let mut name = "message";
            let mut data = String::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if name != "head" {
                continue;
            }
            let ev: cmr_wire::vault::ChainHeadJson = serde_json::from_str(&data)
                .map_err(|e| ClientError::Malformed(format!("an event: {e}")))?;
            return Ok(Some(ev.head));
        }
        Ok(None)
    }
}
