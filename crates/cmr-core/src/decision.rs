//! Consent state in log order, and the decision function (design note 0003).
//!
//! Owns [`ConsentState`], folded from statements in log order with their positions and server times, and
//! [`ConsentState::evaluate`], which says whether an access is allowed at a position and time, with the
//! exact families, epochs and periods, or denied with a precise reason. Statement signatures are checked
//! before folding ([`crate::consent::SignedStatement::verify`]); this module trusts what it is given to be
//! authentic and checks only what it means.

use crate::problem::Code;
use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::consent::{
    AccessRequest, Body, Duration, ErasureTarget, Grant, GrantFamily, Initiator, NarrowError,
    RequestPolicy, SignedStatement, StatementId,
};
use crate::family::{FamilyId, Period, Scope};
use crate::identity::{IdentityId, Position};
use crate::record::RecordId;

/// Read or append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    /// Read records of families and periods.
    Read,
    /// Append records to one family.
    Append,
}

/// An access a company attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessAttempt {
    /// The company.
    pub company: IdentityId,
    /// The grant it claims.
    pub grant: StatementId,
    /// Read or append.
    pub kind: AccessKind,
    /// The families.
    pub families: Vec<FamilyId>,
    /// For a read: the first and last period, inclusive. For an append: the periods written.
    pub periods: (Period, Period),
    /// For an append: the epoch the records are sealed to.
    pub epoch: Option<u64>,
}

/// Why an access is denied. Each has a stable code for problem details.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DenyReason {
    /// No such grant in this vault.
    #[error("no such grant")]
    NoGrant,
    /// The grant belongs to another company.
    #[error("the grant belongs to another company")]
    WrongCompany,
    /// Before the grant's not-before time.
    #[error("the grant is not valid yet")]
    NotYetValid,
    /// At or after the grant's expiry.
    #[error("the grant expired at {0}")]
    GrantExpired(u64),
    /// The grant was revoked at an earlier log position.
    #[error("the grant was revoked at log position {0}")]
    GrantRevoked(Position),
    /// The one-time grant was already used.
    #[error("the one-time grant was already used at log position {0}")]
    GrantConsumed(Position),
    /// The family (or the vault) was erased.
    #[error("the family was erased at log position {0}")]
    FamilyErased(Position),
    /// The grant holds no keys for a family asked for.
    #[error("the grant does not cover family {}", .0.to_hex())]
    FamilyNotGranted(FamilyId),
    /// The grant covers the family, but not for this kind of access.
    #[error("the grant does not allow this access to family {}", .0.to_hex())]
    AccessNotGranted(FamilyId),
    /// A period before the look-back start, or outside the sliding window.
    #[error("period {requested} is before the look-back start {start}")]
    OutsideLookback {
        /// The earliest period asked for.
        requested: Period,
        /// The earliest period allowed.
        start: Period,
    },
    /// A rotation of the family is pending: appends wait for the customer's client.
    #[error("a rotation of the family is pending")]
    RotationPending(FamilyId),
    /// The append is sealed to an epoch that is not current.
    #[error("stale epoch: the family is at epoch {current}")]
    StaleEpoch {
        /// The family's current epoch.
        current: u64,
    },
    /// A company appends only to its own counterparty (or inferred) family.
    #[error("a company appends only to its own family")]
    NotOwnFamily,
    /// Malformed attempt (no family, or periods reversed).
    #[error("malformed access: {0}")]
    Malformed(&'static str),
}

impl DenyReason {
    /// The stable problem code.
    pub fn code(&self) -> Code {
        match self {
            DenyReason::NoGrant => Code::NoGrant,
            DenyReason::WrongCompany => Code::WrongCompany,
            DenyReason::NotYetValid => Code::NotYetValid,
            DenyReason::GrantExpired(_) => Code::GrantExpired,
            DenyReason::GrantRevoked(_) => Code::GrantRevoked,
            DenyReason::GrantConsumed(_) => Code::GrantConsumed,
            DenyReason::FamilyErased(_) => Code::FamilyErased,
            DenyReason::FamilyNotGranted(_) => Code::FamilyNotGranted,
            DenyReason::AccessNotGranted(_) => Code::AccessNotGranted,
            DenyReason::OutsideLookback { .. } => Code::OutsideLookBack,
            DenyReason::RotationPending(_) => Code::RotationPending,
            DenyReason::StaleEpoch { .. } => Code::StaleEpoch,
            DenyReason::NotOwnFamily => Code::NotOwnFamily,
            DenyReason::Malformed(_) => Code::MalformedAccess,
        }
    }
}

/// One family of an allowed access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedFamily {
    /// The family.
    pub family: FamilyId,
    /// The epochs the grantee holds keys for: first to current, inclusive.
    pub epochs: (u64, u64),
    /// The periods to serve, inclusive (clamped to the look-back).
    pub periods: (Period, Period),
}

/// An allowed access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The grant.
    pub grant: StatementId,
    /// Exactly what may be served or written.
    pub families: Vec<AllowedFamily>,
    /// Whether this access uses up a one-time grant.
    pub consumes: bool,
}

/// The outcome of [`ConsentState::evaluate`].
pub type Decision = Result<Allowed, DenyReason>;

/// Why a statement cannot be applied: it is refused and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApplyError {
    /// The statement is about another vault.
    #[error("statement is for another customer")]
    WrongCustomer,
    /// Positions must increase.
    #[error("log position {0} is not after the last one")]
    PositionNotIncreasing(Position),
    /// Server times never decrease.
    #[error("server time {got} is before the last one, {last}")]
    TimeWentBackwards {
        /// The last time applied.
        last: u64,
        /// The time offered.
        got: u64,
    },
    /// The company is blocked.
    #[error("the company is blocked")]
    Blocked,
    /// Too many requests wait for the customer's answer: from this company ([`MAX_PENDING_PER_COMPANY`])
    /// or in all ([`MAX_PENDING_PER_VAULT`]).
    #[error(
        "too many requests wait for this customer's answer ({waiting}, at most {limit}{}); wait for an answer",
        if *from_company { " from one company" } else { " in all" }
    )]
    TooManyRequests {
        /// How many wait.
        waiting: u32,
        /// The limit reached.
        limit: u32,
        /// Whether the per-company limit was reached (else the vault's).
        from_company: bool,
    },
    /// The customer's request policy accepts requests only from companies it granted to.
    #[error("this customer accepts requests only from companies holding an active grant")]
    NotAccepted,
    /// The customer's daily cap on requests is reached.
    #[error("this customer accepts at most {cap} requests a day; try again tomorrow")]
    DailyCapReached {
        /// The cap the customer set.
        cap: u32,
    },
    /// The vault was erased.
    #[error("the vault was erased")]
    VaultErased,
    /// No such request.
    #[error("no such request")]
    UnknownRequest,
    /// The request was already answered.
    #[error("the request was already answered")]
    RequestAnswered,
    /// The grant is wider than the request.
    #[error("the grant is wider than the request: {0}")]
    Widened(NarrowError),
    /// The grant goes to another company than the one that asked.
    #[error("the grant goes to another company than the requester")]
    WrongGrantee,
    /// No such grant.
    #[error("no such grant")]
    UnknownGrant,
    /// Only the customer or the grantee may revoke.
    #[error("only the customer or the grantee may revoke this grant")]
    NotGrantee,
    /// The grant already ended.
    #[error("the grant already ended")]
    GrantEnded,
    /// The family is unknown.
    #[error("unknown family")]
    UnknownFamily,
    /// The family was erased.
    #[error("the family was erased")]
    FamilyErased,
    /// The statement names an epoch that is not the family's current one (or next, for a rotation).
    #[error("stale epoch: the family is at epoch {current}")]
    StaleEpoch {
        /// The family's current epoch.
        current: u64,
    },
    /// The family's scope does not match, or the grant does not cover it.
    #[error("the family is not covered")]
    NotCovered,
    /// A time-bound grant without a valid expiry, or an inconsistent grant.
    #[error("inconsistent grant: {0}")]
    InconsistentGrant(&'static str),
}

#[derive(Debug, Clone)]
struct FamilyState {
    scope: Scope,
    epoch: u64,
    erased_at: Option<Position>,
    /// The highest epoch whose key an ended party (grant or device) still holds.
    exposed: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    first_epoch: u64,
    epoch: u64,
    access: crate::consent::Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndReason {
    Revoked,
    Erased,
}

/// A grant as the rules hold it. Once it ended (revoked, or its family or vault erased) it keeps only
/// what the rules still ask of it: whose it was (an access under it by another company is refused as
/// such, a statement naming it concerns its grantee), the family its grantee appended to (a dispute of
/// that family concerns the grantee), and when and why it ended. The grant itself and the keys it held
/// are dropped then: nothing reads them after, and a vault that churns grants would otherwise keep each
/// one whole for ever (about 1.2 KB of memory each, docs/performance.md).
#[derive(Debug, Clone)]
enum GrantState {
    Live(Box<LiveGrant>),
    Ended(EndedGrant),
}

#[derive(Debug, Clone)]
struct LiveGrant {
    grant: Grant,
    held: BTreeMap<FamilyId, Held>,
    /// A one-time grant's read, at this position.
    consumed_at: Option<Position>,
}

#[derive(Debug, Clone, Copy)]
struct EndedGrant {
    grantee: IdentityId,
    append_family: Option<FamilyId>,
    at: Position,
    reason: EndReason,
}

impl GrantState {
    fn grantee(&self) -> IdentityId {
        match self {
            Self::Live(l) => l.grant.grantee,
            Self::Ended(e) => e.grantee,
        }
    }

    fn append_family(&self) -> Option<FamilyId> {
        match self {
            Self::Live(l) => l.grant.append_family,
            Self::Ended(e) => e.append_family,
        }
    }

    fn live(&self) -> Option<&LiveGrant> {
        match self {
            Self::Live(l) => Some(l),
            Self::Ended(_) => None,
        }
    }

    fn live_mut(&mut self) -> Option<&mut LiveGrant> {
        match self {
            Self::Live(l) => Some(l),
            Self::Ended(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
struct RequestState {
    company: IdentityId,
    /// What was asked, while it waits for an answer. Dropped once it is answered (granted, denied, or
    /// dismissed by a block): the rules then ask only whose it was, as they do of an ended grant.
    waiting: Option<Box<AccessRequest>>,
}

/// A dispute the company that wrote the attribute can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisputeRecord {
    /// Where it was logged.
    pub position: Position,
    /// The inferred family.
    pub family: FamilyId,
    /// The disputed record.
    pub record: RecordId,
    /// Reject or annotate.
    pub action: crate::consent::DisputeAction,
}

/// Where a grant stands at a given server time, as the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    /// It may be used.
    Active,
    /// Its not-before is still ahead.
    NotYetValid,
    /// A one-time grant, used by the read logged at this position.
    Used(Position),
    /// A time-bound grant that expired at this server time.
    Expired(u64),
    /// Revoked at this position (by the customer, or given up by the company).
    Revoked(Position),
    /// Its family or the whole vault was erased at this position.
    Erased(Position),
}

impl GrantStatus {
    /// Whether the grant may still be used.
    pub fn is_active(self) -> bool {
        self == GrantStatus::Active
    }

    /// One word for listings: active, not-yet-valid, used, expired, revoked, erased.
    pub fn word(self) -> &'static str {
        match self {
            GrantStatus::Active => "active",
            GrantStatus::NotYetValid => "not-yet-valid",
            GrantStatus::Used(_) => "used",
            GrantStatus::Expired(_) => "expired",
            GrantStatus::Revoked(_) => "revoked",
            GrantStatus::Erased(_) => "erased",
        }
    }
}

/// The most access requests one company may have waiting for one customer's answer. A request is answered
/// by a grant or a denial; the customer may also block the company.
pub const MAX_PENDING_PER_COMPANY: u32 = 5;
/// The most access requests that may wait for one customer's answer, from every company together, so
/// that new identities cannot fill a customer's chain and listing with requests.
pub const MAX_PENDING_PER_VAULT: u32 = 100;

/// A customer's consent state, folded in log order.
#[derive(Debug, Clone)]
pub struct ConsentState {
    customer: IdentityId,
    last: Option<(Position, u64)>,
    blocked: BTreeSet<IdentityId>,
    families: BTreeMap<FamilyId, FamilyState>,
    grants: BTreeMap<StatementId, GrantState>,
    requests: BTreeMap<StatementId, RequestState>,
    vault_erased: Option<Position>,
    disputes: Vec<DisputeRecord>,
    /// Requests waiting for an answer, per company.
    waiting: BTreeMap<IdentityId, u32>,
    /// The customer's limits on unsolicited requests.
    policy: RequestPolicy,
    /// The server times of the requests logged in the last 24 hours (for the daily cap).
    recent_requests: std::collections::VecDeque<u64>,
}

/// The window of a customer's daily cap on requests, seconds.
pub const REQUEST_CAP_WINDOW: u64 = 24 * 3600;

impl ConsentState {
    /// The empty state of `customer`'s vault.
    pub fn new(customer: IdentityId) -> Self {
        Self {
            customer,
            last: None,
            blocked: BTreeSet::new(),
            families: BTreeMap::new(),
            grants: BTreeMap::new(),
            requests: BTreeMap::new(),
            vault_erased: None,
            disputes: Vec::new(),
            waiting: BTreeMap::new(),
            policy: RequestPolicy::default(),
            recent_requests: std::collections::VecDeque::new(),
        }
    }

    /// The customer's limits on unsolicited requests, as the log last set them.
    pub fn request_policy(&self) -> RequestPolicy {
        self.policy
    }

    /// Whether `company` holds a grant active at `time`.
    pub fn has_active_grant(&self, company: &IdentityId, time: u64) -> bool {
        self.grants.iter().any(|(id, g)| {
            g.grantee() == *company
                && matches!(self.grant_status(id, time), Some(GrantStatus::Active))
        })
    }

    /// The customer whose vault this is.
    pub fn customer(&self) -> IdentityId {
        self.customer
    }

    fn check_order(&self, position: Position, time: u64) -> Result<(), ApplyError> {
        if let Some((p, t)) = self.last {
            if position <= p {
                return Err(ApplyError::PositionNotIncreasing(position));
            }
            if time < t {
                return Err(ApplyError::TimeWentBackwards { last: t, got: time });
            }
        }
        Ok(())
    }

    /// Declares a family (from the customer's directory): its scope and current epoch. A family already
    /// known keeps its epoch; epochs change only by rotation completion.
    pub fn declare_family(&mut self, family: FamilyId, scope: Scope, epoch: u64) {
        self.families.entry(family).or_insert(FamilyState {
            scope,
            epoch,
            erased_at: None,
            exposed: None,
        });
    }

    /// The family's current epoch.
    pub fn epoch(&self, family: &FamilyId) -> Option<u64> {
        self.families.get(family).map(|f| f.epoch)
    }

    /// The log position at which the family (or the whole vault) was erased, if it was.
    pub fn erased_at(&self, family: &FamilyId) -> Option<Position> {
        self.families.get(family).and_then(|f| f.erased_at)
    }

    /// Whether `company` is blocked.
    pub fn is_blocked(&self, company: &IdentityId) -> bool {
        self.blocked.contains(company)
    }

    /// The disputes logged so far.
    pub fn disputes(&self) -> &[DisputeRecord] {
        &self.disputes
    }

    /// The grant, if the log has it and it has not ended (an ended grant keeps only its standing:
    /// [`ConsentState::grant_status`]).
    pub fn grant(&self, id: &StatementId) -> Option<&Grant> {
        self.grants.get(id)?.live().map(|l| &l.grant)
    }

    /// Where grant `id` stands at server time `time`, after everything folded so far; `None` if the log
    /// has no such grant.
    pub fn grant_status(&self, id: &StatementId, time: u64) -> Option<GrantStatus> {
        Some(match self.grants.get(id)? {
            GrantState::Ended(e) => match e.reason {
                EndReason::Revoked => GrantStatus::Revoked(e.at),
                EndReason::Erased => GrantStatus::Erased(e.at),
            },
            GrantState::Live(l) => match (l.consumed_at, l.grant.expires) {
                (Some(at), _) => GrantStatus::Used(at),
                (None, Some(e)) if time >= e => GrantStatus::Expired(e),
                _ if time < l.grant.not_before => GrantStatus::NotYetValid,
                _ => GrantStatus::Active,
            },
        })
    }

    /// Whether grant `id` holds keys of `family` (granted with it, or delivered since).
    pub fn holds(&self, id: &StatementId, family: &FamilyId) -> bool {
        self.grants
            .get(id)
            .and_then(GrantState::live)
            .is_some_and(|l| l.held.contains_key(family))
    }

    /// Every family whose rotation is pending at server time `time` ([`ConsentState::rotation_pending`]).
    pub fn pending_rotations(&self, time: u64) -> Vec<FamilyId> {
        self.families
            .iter()
            .filter(|(f, s)| s.erased_at.is_none() && self.rotation_pending(f, time))
            .map(|(f, _)| *f)
            .collect()
    }

    /// A device of the customer was revoked at `position`: it held the vault key, so every family's
    /// current epoch is exposed and a rotation is pending for all of them.
    pub fn device_revoked(&mut self, position: Position, time: u64) -> Result<(), ApplyError> {
        self.check_order(position, time)?;
        for f in self.families.values_mut() {
            f.exposed = Some(f.exposed.map_or(f.epoch, |e| e.max(f.epoch)));
        }
        self.last = Some((position, time));
        Ok(())
    }

    /// Applies a verified statement logged at `position` with server time `time`. On error nothing changes.
    pub fn apply(
        &mut self,
        signed: &SignedStatement,
        position: Position,
        time: u64,
    ) -> Result<(), ApplyError> {
        let st = signed.statement();
        if st.customer != self.customer {
            return Err(ApplyError::WrongCustomer);
        }
        self.check_order(position, time)?;
        if self.vault_erased.is_some() {
            return Err(ApplyError::VaultErased);
        }
        match &st.body {
            Body::Request(req) => {
                if self.blocked.contains(&st.author) {
                    return Err(ApplyError::Blocked);
                }
                if self.policy.granted_only && !self.has_active_grant(&st.author, time) {
                    return Err(ApplyError::NotAccepted);
                }
                let recent = self
                    .recent_requests
                    .iter()
                    .filter(|t| **t + REQUEST_CAP_WINDOW > time)
                    .count();
                if let Some(cap) = self.policy.daily_cap
                    && recent >= cap as usize
                {
                    return Err(ApplyError::DailyCapReached { cap });
                }
                let from_company = self.waiting.get(&st.author).copied().unwrap_or(0);
                let total: u32 = self.waiting.values().sum();
                if from_company >= MAX_PENDING_PER_COMPANY {
                    return Err(ApplyError::TooManyRequests {
                        waiting: from_company,
                        limit: MAX_PENDING_PER_COMPANY,
                        from_company: true,
                    });
                }
                if total >= MAX_PENDING_PER_VAULT {
                    return Err(ApplyError::TooManyRequests {
                        waiting: total,
                        limit: MAX_PENDING_PER_VAULT,
                        from_company: false,
                    });
                }
                *self.waiting.entry(st.author).or_insert(0) += 1;
                while self
                    .recent_requests
                    .front()
                    .is_some_and(|t| t + REQUEST_CAP_WINDOW <= time)
                {
                    self.recent_requests.pop_front();
                }
                self.recent_requests.push_back(time);
                self.requests.insert(
                    signed.id(),
                    RequestState {
                        company: st.author,
                        waiting: Some(Box::new(req.clone())),
                    },
                );
            }
            Body::Grant(g) => self.apply_grant(signed.id(), g, time)?,
            Body::Denial { request, .. } => {
                let r = self
                    .requests
                    .get_mut(request)
                    .ok_or(ApplyError::UnknownRequest)?;
                if r.waiting.take().is_none() {
                    return Err(ApplyError::RequestAnswered);
                }
                let company = r.company;
                self.answered(&company);
            }
            Body::Revocation(rev) => {
                let g = self
                    .grants
                    .get(&rev.grant)
                    .ok_or(ApplyError::UnknownGrant)?;
                if rev.initiator == Initiator::Grantee && st.author != g.grantee() {
                    return Err(ApplyError::NotGrantee);
                }
                if g.live().is_none() {
                    return Err(ApplyError::GrantEnded);
                }
                self.end_grant(rev.grant, position, EndReason::Revoked);
            }
            Body::RotationCompletion(rc) => {
                let fam = self
                    .families
                    .get(&rc.family)
                    .ok_or(ApplyError::UnknownFamily)?;
                if fam.erased_at.is_some() {
                    return Err(ApplyError::FamilyErased);
                }
                if rc.epoch != fam.epoch + 1 {
                    return Err(ApplyError::StaleEpoch { current: fam.epoch });
                }
                for (grant, _) in &rc.keepers {
                    if !self.usable(grant, time)?.held.contains_key(&rc.family) {
                        return Err(ApplyError::NotCovered);
                    }
                }
                for (grant, _) in &rc.keepers {
                    if let Some(h) = self
                        .grants
                        .get_mut(grant)
                        .and_then(GrantState::live_mut)
                        .and_then(|l| l.held.get_mut(&rc.family))
                    {
                        h.epoch = rc.epoch;
                    }
                }
                if let Some(f) = self.families.get_mut(&rc.family) {
                    f.epoch = rc.epoch;
                }
            }
            Body::KeyDelivery { grant, family, .. } => {
                let g = self.usable(grant, time)?;
                let covered = g
                    .grant
                    .scopes
                    .iter()
                    .any(|(s, a)| *s == family.scope && family.access.within(*a));
                if !covered || g.held.contains_key(&family.family) {
                    return Err(ApplyError::NotCovered);
                }
                self.check_family(family)?;
                self.declare_family(family.family, family.scope, family.epoch);
                if let Some(g) = self.grants.get_mut(grant).and_then(GrantState::live_mut) {
                    g.held.insert(
                        family.family,
                        Held {
                            first_epoch: family.epoch,
                            epoch: family.epoch,
                            access: family.access,
                        },
                    );
                }
            }
            Body::Block { company, blocked } => {
                if *blocked {
                    self.blocked.insert(*company);
                    // Blocking dismisses the company's waiting requests: none can be granted now.
                    for r in self.requests.values_mut() {
                        if r.company == *company {
                            r.waiting = None;
                        }
                    }
                    self.waiting.remove(company);
                } else {
                    self.blocked.remove(company);
                }
            }
            Body::RequestPolicy(p) => self.policy = *p,
            Body::Erasure(target) => match target {
                ErasureTarget::Family(f) => {
                    let fam = self.families.get(f).ok_or(ApplyError::UnknownFamily)?;
                    if fam.erased_at.is_some() {
                        return Err(ApplyError::FamilyErased);
                    }
                    let on_it: Vec<StatementId> = self
                        .grants
                        .iter()
                        .filter(|(_, g)| g.live().is_some_and(|l| l.held.contains_key(f)))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in on_it {
                        self.end_grant(id, position, EndReason::Erased);
                    }
                    if let Some(fam) = self.families.get_mut(f) {
                        fam.erased_at = Some(position);
                    }
                }
                ErasureTarget::Vault => {
                    let live: Vec<StatementId> = self
                        .grants
                        .iter()
                        .filter(|(_, g)| g.live().is_some())
                        .map(|(id, _)| *id)
                        .collect();
                    for id in live {
                        self.end_grant(id, position, EndReason::Erased);
                    }
                    for f in self.families.values_mut() {
                        f.erased_at.get_or_insert(position);
                    }
                    self.vault_erased = Some(position);
                }
            },
            Body::Dispute {
                family,
                record,
                action,
            } => {
                let fam = self.families.get(family).ok_or(ApplyError::UnknownFamily)?;
                if fam.scope != Scope::ProfileInferred {
                    return Err(ApplyError::NotCovered);
                }
                if fam.erased_at.is_some() {
                    return Err(ApplyError::FamilyErased);
                }
                self.disputes.push(DisputeRecord {
                    position,
                    family: *family,
                    record: *record,
                    action: *action,
                });
            }
        }
        self.last = Some((position, time));
        Ok(())
    }

    fn check_family(&self, f: &GrantFamily) -> Result<(), ApplyError> {
        match self.families.get(&f.family) {
            None => Ok(()),
            Some(state) if state.erased_at.is_some() => Err(ApplyError::FamilyErased),
            Some(state) if state.scope != f.scope => Err(ApplyError::NotCovered),
            Some(state) if state.epoch != f.epoch => Err(ApplyError::StaleEpoch {
                current: state.epoch,
            }),
            Some(_) => Ok(()),
        }
    }

    fn apply_grant(&mut self, id: StatementId, g: &Grant, time: u64) -> Result<(), ApplyError> {
        if self.blocked.contains(&g.grantee) {
            return Err(ApplyError::Blocked);
        }
        if let Some(req_id) = g.request {
            let req = self
                .requests
                .get(&req_id)
                .ok_or(ApplyError::UnknownRequest)?;
            let Some(asked) = &req.waiting else {
                return Err(ApplyError::RequestAnswered);
            };
            if req.company != g.grantee {
                return Err(ApplyError::WrongGrantee);
            }
            let now = Period::from_unix(time as i64).unwrap_or(Period::ORIGIN);
            g.check_narrows(req_id, asked, now)
                .map_err(ApplyError::Widened)?;
        }
        match (g.duration, g.expires) {
            (Duration::TimeBound { .. }, None) => {
                return Err(ApplyError::InconsistentGrant(
                    "a time-bound grant needs an expiry",
                ));
            }
            (Duration::Persistent | Duration::OneTime, Some(_)) => {
                return Err(ApplyError::InconsistentGrant(
                    "only time-bound grants expire",
                ));
            }
            _ => {}
        }
        if let Some(append) = g.append_family {
            let ok = g
                .families
                .iter()
                .any(|f| f.family == append && f.access.appends());
            if !ok {
                return Err(ApplyError::InconsistentGrant(
                    "the append family must be granted with append access",
                ));
            }
        }
        if g.families
            .iter()
            .any(|f| f.access.appends() && Some(f.family) != g.append_family)
        {
            return Err(ApplyError::InconsistentGrant(
                "append access is only for the grantee's own family",
            ));
        }
        for f in &g.families {
            let covered = g
                .scopes
                .iter()
                .any(|(s, a)| *s == f.scope && f.access.within(*a));
            if !covered {
                return Err(ApplyError::NotCovered);
            }
            self.check_family(f)?;
        }
        for f in &g.families {
            self.declare_family(f.family, f.scope, f.epoch);
        }
        if let Some(req_id) = g.request
            && let Some(r) = self.requests.get_mut(&req_id)
        {
            r.waiting = None;
            let company = r.company;
            self.answered(&company);
        }
        let held = g
            .families
            .iter()
            .map(|f| {
                (
                    f.family,
                    Held {
                        first_epoch: f.epoch,
                        epoch: f.epoch,
                        access: f.access,
                    },
                )
            })
            .collect();
        self.grants.insert(
            id,
            GrantState::Live(Box::new(LiveGrant {
                grant: g.clone(),
                held,
                consumed_at: None,
            })),
        );
        Ok(())
    }

    /// The company that sent request `id`, if the log has it.
    pub fn requester(&self, id: &StatementId) -> Option<IdentityId> {
        self.requests.get(id).map(|r| r.company)
    }

    /// `company`'s requests that still wait for an answer.
    pub fn waiting_requests(&self, company: &IdentityId) -> Vec<StatementId> {
        self.requests
            .iter()
            .filter(|(_, r)| r.company == *company && r.waiting.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// One of `company`'s waiting requests was answered.
    fn answered(&mut self, company: &IdentityId) {
        if let Some(n) = self.waiting.get_mut(company) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(company);
            }
        }
    }

    /// The parties besides the customer that a statement concerns, judged against the state before it is
    /// applied: its author; the grantee of a grant and of what follows from it (its revocation, the
    /// rotations that keep it, key deliveries to it); the company whose request a denial answers; the
    /// company a block names; the companies appending to a disputed family. A company is handed exactly
    /// these (its relationship view).
    pub fn concerned(&self, signed: &SignedStatement) -> Vec<IdentityId> {
        let st = signed.statement();
        let grantee = |g: &StatementId| self.grants.get(g).map(GrantState::grantee);
        let mut out = vec![st.author];
        match &st.body {
            Body::Grant(g) => out.push(g.grantee),
            Body::Denial { request, .. } => {
                out.extend(self.requests.get(request).map(|r| r.company));
            }
            Body::Revocation(r) => out.extend(grantee(&r.grant)),
            Body::KeyDelivery { grant, .. } => out.extend(grantee(grant)),
            Body::RotationCompletion(rc) => {
                out.extend(rc.keepers.iter().filter_map(|(g, _)| grantee(g)));
            }
            Body::Block { company, .. } => out.push(*company),
            // A dispute concerns the companies that append to the disputed family: they wrote it.
            Body::Dispute { family, .. } => out.extend(
                self.grants
                    .values()
                    .filter(|g| g.append_family() == Some(*family))
                    .map(GrantState::grantee),
            ),
            Body::Request(_) | Body::Erasure(_) | Body::RequestPolicy(_) => {}
        }
        out.retain(|p| *p != self.customer);
        out.sort();
        out.dedup();
        out
    }

    /// Ends a grant at `position`, exposing the current epochs of the families it reads.
    fn end_grant(&mut self, id: StatementId, position: Position, reason: EndReason) {
        let Some(GrantState::Live(l)) = self.grants.get(&id) else {
            return;
        };
        let exposed: Vec<(FamilyId, u64)> = l
            .held
            .iter()
            .filter(|(_, h)| h.access.reads())
            .map(|(f, h)| (*f, h.epoch))
            .collect();
        let ended = EndedGrant {
            grantee: l.grant.grantee,
            append_family: l.grant.append_family,
            at: position,
            reason,
        };
        self.grants.insert(id, GrantState::Ended(ended));
        self.expose(&exposed);
    }

    /// A grant that may still be used at server time `time` (not ended, consumed or expired), for the
    /// statements that name one: a rotation keeping it, a key delivered to it.
    fn usable(&self, id: &StatementId, time: u64) -> Result<&LiveGrant, ApplyError> {
        match self.grants.get(id).ok_or(ApplyError::UnknownGrant)? {
            GrantState::Live(l) if l.consumed_at.is_none() && !expired(&l.grant, time) => Ok(l),
            _ => Err(ApplyError::GrantEnded),
        }
    }

    fn expose(&mut self, held: &[(FamilyId, u64)]) {
        for (f, epoch) in held {
            if let Some(fam) = self.families.get_mut(f)
                && fam.epoch == *epoch
            {
                fam.exposed = Some(fam.exposed.map_or(*epoch, |e| e.max(*epoch)));
            }
        }
    }

    /// Whether a rotation of `family` is pending at server time `time`: a party that holds the current
    /// epoch's key has ended (revoked, consumed, expired, or a revoked device).
    pub fn rotation_pending(&self, family: &FamilyId, time: u64) -> bool {
        let Some(fam) = self.families.get(family) else {
            return false;
        };
        if fam.exposed.is_some_and(|e| e >= fam.epoch) {
            return true;
        }
        self.grants.values().filter_map(GrantState::live).any(|g| {
            g.held
                .get(family)
                .is_some_and(|h| h.access.reads() && h.epoch == fam.epoch)
                && (g.consumed_at.is_some() || expired(&g.grant, time))
        })
    }

    /// Whether `company` may learn `family`'s head to append to it under `grant` now: exactly when an
    /// append there now would be allowed ([`ConsentState::evaluate`] on that append, at the family's
    /// current epoch and the current period). An append-only grantee reads nothing, but its batch extends
    /// the head, so it is told the head's digest.
    pub fn may_append(
        &self,
        company: IdentityId,
        grant: StatementId,
        family: FamilyId,
        position: Position,
        time: u64,
    ) -> Decision {
        let fam = self
            .families
            .get(&family)
            .ok_or(DenyReason::FamilyNotGranted(family))?;
        let period = if fam.scope.is_periodic() {
            Period::from_unix(time as i64).unwrap_or(Period::ORIGIN)
        } else {
            Period::ORIGIN
        };
        self.evaluate(
            &AccessAttempt {
                company,
                grant,
                kind: AccessKind::Append,
                families: vec![family],
                periods: (period, period),
                epoch: Some(fam.epoch),
            },
            position,
            time,
        )
    }

    /// Decides an access at `position` and server `time`, in log order: allowed with exactly the families,
    /// epochs and periods it may touch, or denied with the reason.
    pub fn evaluate(&self, attempt: &AccessAttempt, position: Position, time: u64) -> Decision {
        if attempt.families.is_empty() {
            return Err(DenyReason::Malformed("no family"));
        }
        if attempt.periods.0 > attempt.periods.1 {
            return Err(DenyReason::Malformed("periods reversed"));
        }
        if let Some(at) = self.vault_erased
            && at < position
        {
            return Err(DenyReason::FamilyErased(at));
        }
        let g = self.grants.get(&attempt.grant).ok_or(DenyReason::NoGrant)?;
        if g.grantee() != attempt.company {
            return Err(DenyReason::WrongCompany);
        }
        // Accesses are decided in log order, after everything before them was folded: a grant that
        // ended did so before this position.
        let g = match g {
            GrantState::Ended(e) => {
                return Err(match e.reason {
                    EndReason::Revoked => DenyReason::GrantRevoked(e.at),
                    EndReason::Erased => DenyReason::FamilyErased(e.at),
                });
            }
            GrantState::Live(l) => l,
        };
        let grant = &g.grant;
        if time < grant.not_before {
            return Err(DenyReason::NotYetValid);
        }
        if let Some(e) = grant.expires
            && time >= e
        {
            return Err(DenyReason::GrantExpired(e));
        }
        if let Some(at) = g.consumed_at
            && at < position
        {
            return Err(DenyReason::GrantConsumed(at));
        }
        let mut families = Vec::with_capacity(attempt.families.len());
        for f in &attempt.families {
            let fam = self
                .families
                .get(f)
                .ok_or(DenyReason::FamilyNotGranted(*f))?;
            if let Some(at) = fam.erased_at
                && at < position
            {
                return Err(DenyReason::FamilyErased(at));
            }
            let held = g.held.get(f).ok_or(DenyReason::FamilyNotGranted(*f))?;
            let allowed = match attempt.kind {
                AccessKind::Read => held.access.reads(),
                AccessKind::Append => held.access.appends(),
            };
            if !allowed {
                return Err(DenyReason::AccessNotGranted(*f));
            }
            let periods = match attempt.kind {
                AccessKind::Read => {
                    let now = Period::from_unix(time as i64).unwrap_or(Period::ORIGIN);
                    let window_start = grant
                        .window_months
                        .map(|m| Period(now.0.saturating_sub(m)))
                        .unwrap_or(Period::ORIGIN);
                    let start = grant.lookback_start.max(window_start);
                    if attempt.periods.0 < start && fam.scope.is_periodic() {
                        return Err(DenyReason::OutsideLookback {
                            requested: attempt.periods.0,
                            start,
                        });
                    }
                    attempt.periods
                }
                AccessKind::Append => {
                    if grant.append_family != Some(*f) || attempt.families.len() != 1 {
                        return Err(DenyReason::NotOwnFamily);
                    }
                    if self.rotation_pending(f, time) {
                        return Err(DenyReason::RotationPending(*f));
                    }
                    if attempt.epoch != Some(fam.epoch) {
                        return Err(DenyReason::StaleEpoch { current: fam.epoch });
                    }
                    if attempt.periods.0 < grant.lookback_start && fam.scope.is_periodic() {
                        return Err(DenyReason::OutsideLookback {
                            requested: attempt.periods.0,
                            start: grant.lookback_start,
                        });
                    }
                    attempt.periods
                }
            };
            families.push(AllowedFamily {
                family: *f,
                epochs: (held.first_epoch, held.epoch),
                periods,
            });
        }
        Ok(Allowed {
            grant: attempt.grant,
            families,
            consumes: attempt.kind == AccessKind::Read && grant.duration == Duration::OneTime,
        })
    }

    /// Evaluates an access and records its effects: a one-time grant is consumed by its first allowed
    /// read, which exposes its families' keys (rotation pending).
    pub fn record_access(
        &mut self,
        attempt: &AccessAttempt,
        position: Position,
        time: u64,
    ) -> Result<Decision, ApplyError> {
        self.check_order(position, time)?;
        let decision = self.evaluate(attempt, position, time);
        if let Ok(allowed) = &decision
            && allowed.consumes
            && let Some(g) = self
                .grants
                .get_mut(&attempt.grant)
                .and_then(GrantState::live_mut)
        {
            g.consumed_at = Some(position);
            let held: Vec<(FamilyId, u64)> = g
                .held
                .iter()
                .filter(|(_, h)| h.access.reads())
                .map(|(f, h)| (*f, h.epoch))
                .collect();
            self.expose(&held);
        }
        self.last = Some((position, time));
        Ok(decision)
    }
}

fn expired(g: &Grant, time: u64) -> bool {
    g.expires.is_some_and(|e| time >= e)
}

#[cfg(test)]
mod tests {
    /// An ended grant stays in its vault's state for good: it must stay a few dozen bytes, not the
    /// kilobyte a live grant with its scopes, families and keys takes.
    #[test]
    fn an_ended_grant_is_small() {
        assert!(std::mem::size_of::<super::GrantState>() <= 88);
        assert!(std::mem::size_of::<super::EndedGrant>() <= 80);
    }
}
