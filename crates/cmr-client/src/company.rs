//! The company's side: access requests, the grants it holds (their keys opened with its own device
//! key), reads verified for completeness and decrypted locally, and appends under a grant.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::batch::{Head, ReadProof, SignedBatch, verify_read};
use cmr_core::consent::{AccessRequest, Body, Duration, SignedStatement, Statement, StatementId};
use cmr_core::epoch::{Chain, KeyBundle};
use cmr_core::family::{FamilyId, Period};
use cmr_core::hash::Digest;
use cmr_core::identity::IdentityId;
use cmr_core::record::{FamilyKeys, RecordId, RecordSealer, SealedRecord};
use cmr_log::entry::{AccessRecord, EntryKind};
use serde_json::{Value, json};

use crate::customer::OpenedRecord;
use crate::error::{ClientError, VerifyError};
use crate::session::{Acked, Session};
use crate::verify::{prove, wire};

/// What a company holds of one grant: the grant and its opened keys.
pub struct HeldGrant {
    /// The vault.
    pub customer: IdentityId,
    /// The grant's id.
    pub id: StatementId,
    /// The grant (verified: signed by a device of the customer, logged).
    pub statement: SignedStatement,
    /// The keys, per family and epoch, opened from the grant and the rotations that kept it.
    pub keys: KeyBundle,
    /// Whether a revocation of it is logged.
    pub revoked: bool,
    /// For a one-time grant: the log index of the read that used it up.
    pub used: Option<u64>,
    /// The sealed bundles of the rotations that kept it (kept to re-open the keys later).
    pub rekeys: Vec<cmr_core::wrap::SealedBytes>,
}

impl HeldGrant {
    /// Where the grant stands at server time `now`, in one word: `revoked`, `used`, `expired`,
    /// `not-yet-valid` or `active` (the same words as the customer's listing).
    pub fn status(&self, now: u64) -> &'static str {
        let g = self.grant();
        if self.revoked {
            "revoked"
        } else if self.used.is_some() {
            "used"
        } else if g.and_then(|g| g.expires).is_some_and(|e| now >= e) {
            "expired"
        } else if g.is_some_and(|g| now < g.not_before) {
            "not-yet-valid"
        } else {
            "active"
        }
    }

    /// The grant's body.
    pub fn grant(&self) -> Option<&cmr_core::consent::Grant> {
        match &self.statement.statement().body {
            Body::Grant(g) => Some(g),
            _ => None,
        }
    }
}

/// What a request became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStatus {
    /// No answer yet.
    Pending,
    /// Granted, by this grant.
    Granted(StatementId),
    /// Denied, with the customer's reason.
    Denied(String),
}

/// A company, as its backend holds it.
pub struct Company {
    /// The session.
    pub session: Session,
    /// The grants held, by id.
    pub grants: HashMap<StatementId, HeldGrant>,
    /// What each request became.
    pub statuses: HashMap<StatementId, RequestStatus>,
    /// The vault each request was sent to.
    pub requests: HashMap<StatementId, IdentityId>,
    /// The requests as sent (signed), to tell whether the grant answering one is narrower.
    pub asked: HashMap<StatementId, SignedStatement>,
    /// Per vault, the newest entry already taken into account by [`Company::sync`].
    pub synced: HashMap<IdentityId, u64>,
    /// Customers' disputes of attributes this company appended, as logged.
    pub disputes: Vec<Dispute>,
    /// This company's own reads and appends, as the customers' chains logged them (verified in the
    /// relationship view, as everything there), in the order they were synced.
    pub accesses: Vec<cmr_wire::gateway::AccessJson>,
}

/// A customer's dispute of an attribute this company appended, as logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dispute {
    /// The vault, hex.
    pub customer: String,
    /// Where it was logged.
    pub index: u64,
    /// The disputed record, hex.
    pub record: String,
    /// Rejected (`true`) or annotated.
    pub rejected: bool,
}

/// A page of a read as parsed from the API.
pub struct ReadPage {
    /// The proof.
    pub proof: ReadProof,
    /// The records.
    pub records: Vec<SealedRecord>,
    /// The batches naming them.
    pub batches: Vec<SignedBatch>,
}

impl Company {
    /// A company around a registered session.
    pub fn new(session: Session) -> Self {
        Self {
            session,
            grants: HashMap::new(),
            statuses: HashMap::new(),
            requests: HashMap::new(),
            asked: HashMap::new(),
            synced: HashMap::new(),
            disputes: Vec::new(),
            accesses: Vec::new(),
        }
    }

    /// The company's id.
    pub fn id(&self) -> IdentityId {
        self.session.keys.identity
    }

    /// Asks `customer` for access. Returns the request's id.
    pub async fn request(
        &mut self,
        customer: IdentityId,
        request: AccessRequest,
        now: u64,
    ) -> Result<StatementId, ClientError> {
        request.check_approvable().map_err(ClientError::Local)?;
        let st = Statement {
            customer,
            author: self.id(),
            device: self.session.keys.device.id(),
            issued_at: now,
            body: Body::Request(request),
        };
        let signed = SignedStatement::sign(st, None, &self.session.keys.device.signing)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let bytes = signed.encode();
        let v = self
            .session
            .post(
                &format!("/v1/vaults/{}/statements", customer.to_hex()),
                &json!({"statement": B64.encode(&bytes)}),
            )
            .await?;
        self.session.check_ack(&v, &bytes).await?;
        self.statuses.insert(signed.id(), RequestStatus::Pending);
        self.requests.insert(signed.id(), customer);
        self.asked.insert(signed.id(), signed.clone());
        Ok(signed.id())
    }

    /// The customers whose vaults concern this company: every customer it asked, and every one that
    /// granted it something, with or without a request (the server's vaults-of index, paged). Each is
    /// then [`Company::sync`]ed, which verifies what it holds: a vault named here that concerns the
    /// company in no verified entry gives it nothing.
    pub async fn discover(&mut self) -> Result<Vec<IdentityId>, ClientError> {
        let me = self.id();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut body = json!({"limit": 1000});
            if let Some(a) = &after {
                body["after"] = json!(a);
            }
            let v = self
                .session
                .post(&format!("/v1/identities/{}/vaults", me.to_hex()), &body)
                .await?;
            let page: cmr_wire::vault::VaultsJson = wire(&v, "vaults")?;
            for c in &page.vaults {
                let id = IdentityId::from_hex(c)
                    .ok_or_else(|| ClientError::Malformed("a vault id is not an id".into()))?;
                out.push(id);
            }
            match page.next.as_deref() {
                Some(n) if after.as_deref() != Some(n) => after = Some(n.to_string()),
                Some(_) => {
                    return Err(ClientError::Malformed(
                        "the vault cursor did not move".into(),
                    ));
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// The vaults in which a consent statement concerning this company was logged after log index
    /// `after` (the server's feed: grants, revocations, answers, key deliveries, disputes), and the
    /// index to ask after next time. A hint of where to [`Company::sync`], which verifies: a server
    /// that leaves a statement out of the feed only delays what a full sync of every vault finds.
    pub async fn changed_since(
        &mut self,
        after: Option<u64>,
    ) -> Result<(Vec<IdentityId>, Option<u64>), ClientError> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let mut body = json!({"limit": 1000});
            if let Some(a) = cursor {
                body["after"] = json!(a);
            }
            let v = self.session.post("/v1/feed", &body).await?;
            let page: cmr_wire::vault::FeedJson = wire(&v, "feed")?;
            self.session.observe(&page.checkpoint).await?;
            for e in &page.entries {
                if cursor.is_some_and(|c| e.index <= c) {
                    return Err(ClientError::Malformed("the feed went backwards".into()));
                }
                cursor = Some(e.index);
                let id = IdentityId::from_hex(&e.customer).ok_or_else(|| {
                    ClientError::Malformed("a feed entry's vault is not an id".into())
                })?;
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            if page.next.is_none() || page.entries.is_empty() {
                break;
            }
        }
        Ok((out, cursor))
    }

    /// Accepts the log after a restore from a backup, once the company decided to
    /// ([`Session::accept_restore`]): what was synced past the restored size is learned again from the
    /// restored log, and a one-time grant used past it is unused again. Returns the restored size.
    pub async fn accept_restore(&mut self) -> Result<u64, ClientError> {
        let size = self.session.accept_restore().await?;
        self.synced.retain(|_, i| *i < size);
        for g in self.grants.values_mut() {
            if g.used.is_some_and(|i| i >= size) {
                g.used = None;
            }
        }
        self.disputes.retain(|d| d.index < size);
        Ok(size)
    }

    /// Fetches what of `customer`'s vault concerns this company, verifies each entry (included in the
    /// checkpoint, signed by a device of the customer valid at its position), and updates the grants held
    /// and the requests' statuses.
    pub async fn sync(&mut self, customer: IdentityId) -> Result<(), ClientError> {
        // Page by page from the newest entry already taken into account.
        loop {
            let mut body = json!({"limit": 1000});
            if let Some(after) = self.synced.get(&customer) {
                body["after"] = json!(after);
            }
            let v = self
                .session
                .post(
                    &format!("/v1/vaults/{}/relationship", customer.to_hex()),
                    &body,
                )
                .await?;
            let page: cmr_wire::log::PageOfEntriesJson = wire(&v, "relationship")?;
            let more = page.next.is_some();
            let before = self.synced.get(&customer).copied();
            self.sync_page(customer, &page).await?;
            if !more || self.synced.get(&customer).copied() == before {
                return Ok(());
            }
        }
    }

    /// Takes one page of the relationship view into account.
    async fn sync_page(
        &mut self,
        customer: IdentityId,
        page: &cmr_wire::log::PageOfEntriesJson,
    ) -> Result<(), ClientError> {
        let cp = self.session.observe(&page.checkpoint).await?;
        let me = self.id();
        let kem = self.session.keys.device.kem.clone();
        for e in &page.entries {
            let cmr_wire::log::ChainEntryJson::Entry(e) = e else {
                // The relationship view serves no erased entries.
                continue;
            };
            let p = prove(e, &cp)?;
            if self.synced.get(&customer).is_some_and(|s| p.index <= *s) {
                continue;
            }
            if p.body.customer != Some(customer) {
                return Err(VerifyError::Chain(format!(
                    "entry {} is about another vault",
                    p.index
                ))
                .into());
            }
            if p.body.kind == EntryKind::Access
                && p.body.subject == me
                && let Ok(rec) = AccessRecord::decode(&p.body.payload)
            {
                // This company's own read under a one-time grant used it up.
                if rec.kind == cmr_core::decision::AccessKind::Read
                    && let Some(g) = self.grants.get_mut(&rec.grant)
                    && g.grant().is_some_and(|b| b.duration == Duration::OneTime)
                {
                    g.used.get_or_insert(p.index);
                }
                let hex = customer.to_hex();
                if !self
                    .accesses
                    .iter()
                    .any(|a| a.index == p.index && a.customer == hex)
                {
                    self.accesses
                        .push(own_access(&hex, p.index, p.body.time, &rec));
                }
            }
            if p.body.kind != EntryKind::Statement {
                self.synced.insert(customer, p.index);
                continue;
            }
            let st = SignedStatement::decode(&p.body.payload)
                .map_err(|e| ClientError::Malformed(e.to_string()))?;
            let s = st.statement();
            if s.customer != customer {
                return Err(VerifyError::Chain(format!(
                    "entry {} is about another vault",
                    p.index
                ))
                .into());
            }
            // Only the customer (and this company, for its own requests and give-ups) speaks here, and
            // every statement is checked against its author's device valid at its log position.
            if s.author != customer && s.author != me {
                return Err(VerifyError::Signature(format!(
                    "statement at {} is by a third party",
                    p.index
                ))
                .into());
            }
            let author = self.session.identity(s.author).await?;
            st.verify(&author.state, p.index)
                .map_err(|e| VerifyError::Signature(format!("statement at {}: {e}", p.index)))?;
            let by_customer = s.author == customer;
            match &s.body {
                Body::Grant(g) if by_customer && g.grantee == me => {
                    let bundle = st
                        .bundle()
                        .ok_or_else(|| VerifyError::Signature("a grant without keys".into()))?;
                    let keys =
                        KeyBundle::open(bundle, customer, me, &kem, st.id().0).map_err(|_| {
                            VerifyError::Signature(
                                "the grant's keys do not open with this device's key".into(),
                            )
                        })?;
                    if let Some(r) = g.request {
                        self.statuses.insert(r, RequestStatus::Granted(st.id()));
                    }
                    self.grants.entry(st.id()).or_insert(HeldGrant {
                        customer,
                        id: st.id(),
                        statement: st.clone(),
                        keys,
                        revoked: false,
                        used: None,
                        rekeys: Vec::new(),
                    });
                }
                Body::Denial { request, reason } if by_customer => {
                    self.statuses
                        .insert(*request, RequestStatus::Denied(reason.clone()));
                }
                Body::Revocation(r) => {
                    if let Some(g) = self.grants.get_mut(&r.grant) {
                        g.revoked = true;
                    }
                }
                Body::Dispute { record, action, .. }
                    if by_customer && !self.disputes.iter().any(|d| d.index == p.index) =>
                {
                    self.disputes.push(Dispute {
                        customer: customer.to_hex(),
                        index: p.index,
                        record: record.to_hex(),
                        rejected: matches!(action, cmr_core::consent::DisputeAction::Reject),
                    });
                }
                Body::RotationCompletion(rc) if by_customer => {
                    for (gid, sealed) in &rc.keepers {
                        if let Some(g) = self.grants.get_mut(gid) {
                            let fresh = KeyBundle::open(sealed, customer, me, &kem, gid.0)
                                .map_err(|_| {
                                    VerifyError::Signature("rotated keys do not open".into())
                                })?;
                            g.keys.entries.extend(fresh.entries);
                            g.rekeys.push(sealed.clone());
                        }
                    }
                }
                _ => {}
            }
            // Only now is the entry taken into account: a failure above leaves it for the next sync.
            self.synced.insert(customer, p.index);
        }
        Ok(())
    }

    /// Takes this company's own read, verified in the log (its acknowledgement), into account at once:
    /// its access history, and a one-time grant it used up. (A sync finds the same entry later and
    /// takes it only once.)
    fn note_own_read(&mut self, customer: IdentityId, grant: StatementId, logged: &Acked) {
        let Ok(rec) = AccessRecord::decode(&logged.body.payload) else {
            return;
        };
        if let Some(g) = self.grants.get_mut(&grant)
            && g.grant().is_some_and(|b| b.duration == Duration::OneTime)
        {
            g.used.get_or_insert(logged.index);
        }
        let hex = customer.to_hex();
        if !self
            .accesses
            .iter()
            .any(|a| a.index == logged.index && a.customer == hex)
        {
            self.accesses
                .push(own_access(&hex, logged.index, logged.body.time, &rec));
        }
    }

    /// Whether grant `id` gives less than the request it answers asked for: fewer scopes or less
    /// access, a shorter duration, or a shorter look-back. `None` when it answers no request this
    /// company kept (an unsolicited grant, or a request sent before requests were kept).
    pub fn narrowed(&self, id: &StatementId) -> Option<bool> {
        let held = self.grants.get(id)?;
        let g = held.grant()?;
        let asked = self.asked.get(&g.request?)?;
        let Body::Request(r) = &asked.statement().body else {
            return None;
        };
        let fewer = r
            .scopes
            .iter()
            .any(|(s, a)| !g.scopes.iter().any(|(gs, ga)| gs == s && ga == a));
        let shorter = g.duration != r.duration;
        let widest =
            cmr_core::family::Period::from_unix(held.statement.statement().issued_at as i64)
                .map(|p| cmr_core::family::Period(p.0.saturating_sub(r.lookback_months)));
        let less_history = widest.is_some_and(|w| g.lookback_start > w);
        Some(fewer || shorter || less_history)
    }

    /// What a request became (after [`Company::sync`]).
    pub fn status(&self, request: &StatementId) -> RequestStatus {
        self.statuses
            .get(request)
            .cloned()
            .unwrap_or(RequestStatus::Pending)
    }

    /// Reads `family` in `from..=to` under `grant`: the access is logged first (the acknowledgement is
    /// checked), the read is verified complete against the head, each batch against the device of its
    /// author, and the records are opened with the grant's keys.
    pub async fn read(
        &mut self,
        grant: StatementId,
        family: FamilyId,
        from: Period,
        to: Period,
    ) -> Result<(Head, Vec<OpenedRecord>), ClientError> {
        let held = self
            .grants
            .get(&grant)
            .ok_or_else(|| ClientError::Local("no such grant held".into()))?;
        let customer = held.customer;
        // The signed request names the vault, family, grant and periods, so the logged access is
        // bound to it (cmr_log::entry::access_target).
        let target = cmr_log::entry::access_target(
            &customer,
            &family,
            cmr_core::decision::AccessKind::Read,
            &grant,
            None,
            from,
            to,
        );
        let keyid = self.session.keys.device.id().to_hex();
        // Page by page (each page's access is logged), every page against the same head, each cursor
        // strictly after the one before.
        let mut cursor: Option<(Period, u64)> = None;
        let mut head: Option<Head> = None;
        let mut records = Vec::new();
        let mut restarts = 0;
        loop {
            let mut body = json!({"from": from.to_string(), "to": to.to_string(), "grant": grant.to_hex(), "limit": 10000});
            if let Some((p, i)) = cursor {
                body["cursor"] = json!([p.to_string(), i]);
            }
            // The logged access must be this very request's (its signature base names our nonce and
            // time): an earlier read's answer, replayed, would show an older head without logging.
            let (v, sent) = self.session.post_signed(&target, &body).await?;
            let page = parse_read(&v)?;
            // The logged access names the head this answer is proven against: a server that answers
            // with an older head must log that it did.
            let served = page.proof.head.digest();
            let logged = self
                .session
                .check_ack_with(&v, |body| {
                    body.kind == EntryKind::Access
                        && AccessRecord::decode(&body.payload).is_ok_and(|a| {
                            a.grant == grant
                                && a.signature_base == sent
                                && a.keyid == keyid
                                && a.head == Some(served)
                                && a.families
                                    .iter()
                                    .any(|f| f.family == family && f.from == from && f.to == to)
                        })
                })
                .await?;
            self.note_own_read(customer, grant, &logged);
            let (h, mut got) =
                verify_page(&mut self.session, customer, family, &page, cursor).await?;
            match head {
                Some(seen)
                    if seen != h && h.batches > seen.batches && restarts < MAX_READ_RESTARTS =>
                {
                    // The customer wrote between two pages: read again from the start, against the newer
                    // head (each page is logged as an access, so this is bounded).
                    restarts += 1;
                    (cursor, head) = (None, None);
                    records.clear();
                    continue;
                }
                Some(seen) if seen != h => return Err(changed_between_pages(seen, h)),
                _ => {}
            }
            head = Some(h);
            records.append(&mut got);
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
        if !self.grants.contains_key(&grant) {
            return Err(ClientError::Local("no such grant held".into()));
        }
        // The keys this company holds for the family under any of its grants from this customer: its
        // own appends under another grant are its to read.
        let mut keys = FamilyKeys::new(customer, family);
        for held in self.grants.values().filter(|g| g.customer == customer) {
            for e in held.keys.entries.iter().filter(|e| e.family == family) {
                keys.insert(e.epoch, e.key.clone());
            }
        }
        let opened = OpenedRecord::open_all(&mut keys, &records)?;
        Ok((head, opened))
    }

    /// Appends records to the grant's append family at `period`, on `head` (from a read).
    pub async fn append(
        &mut self,
        grant: StatementId,
        head: &Head,
        period: Period,
        contents: &[&[u8]],
    ) -> Result<Acked, ClientError> {
        self.append_on(grant, head.digest(), period, contents).await
    }

    /// Appends records to the grant's append family at `period`, on the family's current head, which the
    /// server names for an appender (`…/head`): an append-only grant reads nothing. A head that is not
    /// the real one only gets the append refused (`stale-head`): the server checks the chain.
    pub async fn append_now(
        &mut self,
        grant: StatementId,
        period: Period,
        contents: &[&[u8]],
    ) -> Result<Acked, ClientError> {
        let (held, family) = self.appending(&grant)?;
        let customer = held.customer;
        let v = self
            .session
            .post(
                &format!(
                    "/v1/vaults/{}/families/{}/head",
                    customer.to_hex(),
                    family.to_hex()
                ),
                &json!({"grant": grant.to_hex()}),
            )
            .await?;
        let head: cmr_wire::vault::HeadDigestJson = wire(&v, "head")?;
        let head = Digest::from_hex(&head.head)
            .ok_or_else(|| ClientError::Malformed("head is not a digest".into()))?;
        self.append_on(grant, head, period, contents).await
    }

    /// A grant held, and the family it appends to.
    fn appending(&self, grant: &StatementId) -> Result<(&HeldGrant, FamilyId), ClientError> {
        let held = self
            .grants
            .get(grant)
            .ok_or_else(|| ClientError::Local("no such grant held".into()))?;
        let family = held
            .grant()
            .and_then(|g| g.append_family)
            .ok_or_else(|| ClientError::Local("the grant does not allow appends".into()))?;
        Ok((held, family))
    }

    async fn append_on(
        &mut self,
        grant: StatementId,
        head: Digest,
        period: Period,
        contents: &[&[u8]],
    ) -> Result<Acked, ClientError> {
        let me = self.id();
        let (held, family) = self.appending(&grant)?;
        let (epoch, key) = held
            .keys
            .entries
            .iter()
            .filter(|e| e.family == family && e.key.chain() == Chain::Append(me))
            .max_by_key(|e| e.epoch)
            .map(|e| (e.epoch, e.key.clone()))
            .ok_or_else(|| ClientError::Local("the grant holds no append key".into()))?;
        let customer = held.customer;
        let sealer = RecordSealer::new(customer, family, epoch, me, &key, period)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let records: Vec<(RecordId, &[u8])> = contents
            .iter()
            .map(|c| (RecordId::generate(&mut rand::rng()), *c))
            .collect();
        let (v, _) = self
            .session
            .send_batch(&sealer, customer, family, head, &records, Some(grant))
            .await?;
        // A company's append logs the family head, then its access record; the ack names the access, which
        // must be this append: under this grant, by this device, to this family, at the batch's epoch.
        let keyid = self.session.keys.device.id().to_hex();
        let epoch = Some(epoch);
        self.session
            .check_ack_with(&v, |body| {
                body.kind == EntryKind::Access
                    && body.subject == me
                    && AccessRecord::decode(&body.payload).is_ok_and(|a| {
                        a.kind == cmr_core::decision::AccessKind::Append
                            && a.grant == grant
                            && a.keyid == keyid
                            && a.epoch == epoch
                            && a.families.iter().any(|f| f.family == family)
                    })
            })
            .await
    }
}

/// Verifies one page of a read: it names `customer`'s `family`, it is complete against its head from
/// `cursor` on, and every batch is signed by its author's device, whose key comes from the author's
/// verified key events (looked up once per author and device). Returns the head and the records.
pub(crate) async fn verify_page(
    session: &mut Session,
    customer: IdentityId,
    family: FamilyId,
    page: &ReadPage,
    cursor: Option<(Period, u64)>,
) -> Result<(Head, Vec<SealedRecord>), ClientError> {
    if page.proof.head.customer != customer || page.proof.head.family != family {
        return Err(VerifyError::Read("the read names another vault or family".into()).into());
    }
    let mut keys = HashMap::new();
    for b in &page.batches {
        let (author, device) = (b.batch().author, b.batch().device);
        if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry((author, device)) {
            let id = session.identity(author).await?;
            slot.insert(id.state.device_key(&device));
        }
    }
    let verified = verify_read(
        &page.proof.head.digest(),
        &page.proof,
        &page.records,
        &page.batches,
        |b| keys.get(&(b.author, b.device)).copied().flatten(),
        cursor,
    )
    .map_err(|e| VerifyError::Read(e.to_string()))?;
    Ok((
        verified.head,
        verified.records.into_iter().cloned().collect(),
    ))
}

/// Rebuilds a read's proof, records and batches from the API's JSON.
pub fn parse_read(v: &Value) -> Result<ReadPage, ClientError> {
    read_page(&wire::<cmr_wire::read::ReadAnswerJson>(v, "read")?)
}

/// A read's page from its typed answer (`cmr-wire`): the proof, the records and the batches, decoded.
pub fn read_page(answer: &cmr_wire::read::ReadAnswerJson) -> Result<ReadPage, ClientError> {
    let bad = |w: &str| ClientError::Malformed(format!("read: {w}"));
    let proof = answer
        .proof_of_read
        .to_proof()
        .map_err(|e| bad(&e.to_string()))?;
    let records = answer
        .records
        .iter()
        .map(|r| SealedRecord::decode(r.as_bytes().to_vec()).map_err(|e| bad(&e.to_string())))
        .collect::<Result<_, _>>()?;
    let batches = answer
        .batches
        .iter()
        .map(|b| SignedBatch::decode(b.as_bytes()).map_err(|e| bad(&e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(ReadPage {
        proof,
        records,
        batches,
    })
}

/// How often a paged read starts again because the family grew between two of its pages.
pub(crate) const MAX_READ_RESTARTS: u32 = 5;

/// A head that changed between two pages of one read: a family that kept growing is a busy family, not
/// a faulty server, and the caller may read again; a head that went back is a rollback.
pub(crate) fn changed_between_pages(seen: Head, now: Head) -> ClientError {
    if now.batches > seen.batches {
        ClientError::Local(format!(
            "the family kept growing while it was read ({} batches, then {}); read it again",
            seen.batches, now.batches
        ))
    } else {
        VerifyError::Read(format!(
            "rollback between pages: the head had {} batches, then {}",
            seen.batches, now.batches
        ))
        .into()
    }
}

/// One of this company's accesses in the wire's shape (the gateway's and `cmr company history`'s).
fn own_access(
    customer: &str,
    index: u64,
    time: u64,
    rec: &AccessRecord,
) -> cmr_wire::gateway::AccessJson {
    cmr_wire::gateway::AccessJson {
        customer: customer.to_string(),
        index,
        time,
        kind: match rec.kind {
            cmr_core::decision::AccessKind::Read => "read",
            cmr_core::decision::AccessKind::Append => "append",
        }
        .into(),
        grant: rec.grant.to_hex(),
        families: rec
            .families
            .iter()
            .map(|f| format!("{}:{}..{}", f.family.to_hex(), f.from, f.to))
            .collect(),
    }
}
