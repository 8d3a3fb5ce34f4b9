//! Consent statements (design note 0003): access requests, grants, denials, revocations, rotation
//! completions, key deliveries, blocks, erasures and disputes.
//!
//! Owns the byte format of each statement, which identity may author which statement, how ids are
//! computed, and whether a grant narrows the request it answers. Each statement is signed by a device of
//! its author over the exact bytes stored and sent. What statements mean together, in log order, is
//! [`crate::decision`]'s job.

use std::fmt;

use thiserror::Error;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::family::{FamilyId, Period, Scope};
use crate::hash::{Digest, tagged_hash};
use crate::identity::{DeviceId, IdentityError, IdentityId, IdentityState, Position};
use crate::keys::{KemPublicKey, SignedEnvelope, SigningKey};
use crate::record::RecordId;
use crate::wrap::SealedBytes;

/// The longest purpose or reason text, in bytes.
pub const MAX_TEXT: usize = 1024;
/// The most entries in any list of a statement.
pub const MAX_LIST: usize = 256;

/// A statement's id: `H("statement", body)`; for a grant, the body without its key bundle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatementId(pub [u8; 32]);

impl StatementId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for StatementId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StatementId({})", self.to_hex())
    }
}

/// What a grant or request allows on a scope or family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Access {
    /// Read.
    Read = 1,
    /// Append.
    Append = 2,
    /// Read and append.
    ReadAppend = 3,
}

impl Access {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Access::Read,
            2 => Access::Append,
            3 => Access::ReadAppend,
            _ => return Err(invalid("access", "unknown access")),
        })
    }

    /// The access's name as people and the command line write it: `read`, `append`, `read+append`.
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Append => "append",
            Access::ReadAppend => "read+append",
        }
    }

    /// Whether this access allows reading.
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadAppend)
    }

    /// Whether this access allows appending.
    pub fn appends(self) -> bool {
        matches!(self, Access::Append | Access::ReadAppend)
    }

    /// Whether `self` allows no more than `other`.
    pub fn within(self, other: Access) -> bool {
        (!self.reads() || other.reads()) && (!self.appends() || other.appends())
    }
}

/// How long a consent lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duration {
    /// Used up by the first allowed read.
    OneTime,
    /// Valid for this many seconds from not-before.
    TimeBound {
        /// Seconds.
        seconds: u64,
    },
    /// Until revoked.
    Persistent,
}

impl Duration {
    fn write(&self, w: &mut Writer) {
        match self {
            Duration::OneTime => w.u8(1),
            Duration::TimeBound { seconds } => w.u8(2).u64(*seconds),
            Duration::Persistent => w.u8(3),
        };
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => Duration::OneTime,
            2 => Duration::TimeBound { seconds: r.u64()? },
            3 => Duration::Persistent,
            _ => return Err(invalid("duration", "unknown duration type")),
        })
    }

    /// When a consent of this duration that starts at `not_before` expires: `not_before + seconds` for a
    /// time-bound one, never for the others (a one-time grant ends when used). A grant's `expires` field
    /// must be exactly this.
    pub fn expiry(self, not_before: u64) -> Option<u64> {
        match self {
            Duration::TimeBound { seconds } => Some(not_before.saturating_add(seconds)),
            Duration::OneTime | Duration::Persistent => None,
        }
    }

    /// Whether `self` lasts no longer than `other`.
    pub fn within(self, other: Duration) -> bool {
        match (self, other) {
            (_, Duration::Persistent) => true,
            (Duration::OneTime, _) => true,
            (Duration::TimeBound { seconds: a }, Duration::TimeBound { seconds: b }) => a <= b,
            _ => false,
        }
    }
}

/// In words, for people: "one read", "until revoked", "30 days", "12 hours", "90 seconds".
impl std::fmt::Display for Duration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u64, unit: &str| {
            if n == 1 {
                format!("1 {unit}")
            } else {
                format!("{n} {unit}s")
            }
        };
        match *self {
            Duration::OneTime => f.write_str("one read"),
            Duration::Persistent => f.write_str("until revoked"),
            Duration::TimeBound { seconds } if seconds % 86_400 == 0 => {
                f.write_str(&plural(seconds / 86_400, "day"))
            }
            Duration::TimeBound { seconds } if seconds % 3_600 == 0 => {
                f.write_str(&plural(seconds / 3_600, "hour"))
            }
            Duration::TimeBound { seconds } => f.write_str(&plural(seconds, "second")),
        }
    }
}

/// Which counterparties' transactions a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Counterparty {
    /// Transactions with any counterparty.
    Any = 1,
    /// Only the transactions with the requesting company itself.
    OnlyRequester = 2,
}

/// A company's access request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// Scopes and the access asked for each.
    pub scopes: Vec<(Scope, Access)>,
    /// Why.
    pub purpose: String,
    /// For how long.
    pub duration: Duration,
    /// How many months of transaction history, back from the grant.
    pub lookback_months: u32,
    /// Which counterparties' transactions.
    pub counterparty: Counterparty,
}

impl AccessRequest {
    /// Whether a customer can approve this request as asked: a grant appends to one family only (the
    /// requester's own transactions, or the attributes it infers). The SDK refuses a request that breaks
    /// this before sending it; the log itself accepts any well-formed request (a customer may still
    /// narrow it).
    pub fn check_approvable(&self) -> Result<(), String> {
        let appending: Vec<Scope> = self
            .scopes
            .iter()
            .filter(|(_, a)| a.appends())
            .map(|(s, _)| *s)
            .collect();
        if appending.len() > 1 {
            return Err(format!(
                "a grant appends to one family only; this asks to append to {}",
                appending
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
        for (scope, access) in &self.scopes {
            if access.appends() && !matches!(scope, Scope::Transactions | Scope::ProfileInferred) {
                return Err(format!(
                    "a company appends only to transactions or profile.inferred, not {}",
                    scope.name()
                ));
            }
        }
        Ok(())
    }
}

/// A family a grant holds keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFamily {
    /// The family.
    pub family: FamilyId,
    /// Its scope.
    pub scope: Scope,
    /// The epoch whose keys the grant carries.
    pub epoch: u64,
    /// What the grantee may do.
    pub access: Access,
}

/// A customer's grant to a company.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The company.
    pub grantee: IdentityId,
    /// The request it answers, if any.
    pub request: Option<StatementId>,
    /// Why, in the customer's words (normally the request's purpose).
    pub purpose: String,
    /// The duration type.
    pub duration: Duration,
    /// Valid from this server time (inclusive), Unix seconds.
    pub not_before: u64,
    /// Valid until this server time (exclusive), Unix seconds; `None` for persistent and one-time grants.
    pub expires: Option<u64>,
    /// The first period the grantee may read (absolute).
    pub lookback_start: Period,
    /// A sliding window in months, enforced by the server only, if any.
    pub window_months: Option<u32>,
    /// The scopes the grant covers, so that families created later can be delivered to it.
    pub scopes: Vec<(Scope, Access)>,
    /// The families the grant carries keys for, sorted by id.
    pub families: Vec<GrantFamily>,
    /// The one family the grantee may append to: its own counterparty or inferred family.
    pub append_family: Option<FamilyId>,
    /// The grantee's KEM key the bundle is sealed to, as the customer's client verified it.
    pub grantee_kem: KemPublicKey,
}

/// Who ended a grant by revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Initiator {
    /// The customer.
    Customer = 1,
    /// The grantee gave up its own grant.
    Grantee = 2,
}

/// A revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The grant it ends.
    pub grant: StatementId,
    /// Who revokes.
    pub initiator: Initiator,
    /// The reason, in words.
    pub reason: String,
}

/// The end of a rotation: the family's new epoch, and the keepers' new keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationCompletion {
    /// The family.
    pub family: FamilyId,
    /// The new epoch (the old one plus one).
    pub epoch: u64,
    /// The digest of the directory that lists it.
    pub directory: Digest,
    /// The grants that keep access, each with its sealed bundle.
    pub keepers: Vec<(StatementId, SealedBytes)>,
}

/// What an erasure removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErasureTarget {
    /// One family.
    Family(FamilyId),
    /// The whole vault.
    Vault,
}

/// What a dispute does to an inferred attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeAction {
    /// The customer rejects it.
    Reject,
    /// The customer annotates it; the annotation is an encrypted record, named here by id and digest.
    Annotate {
        /// The annotation record.
        record: RecordId,
        /// Its digest.
        digest: Digest,
    },
}

/// The statement types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Company → customer.
    Request(AccessRequest),
    /// Customer → company.
    Grant(Grant),
    /// The customer refuses a request.
    Denial {
        /// The request.
        request: StatementId,
        /// Why.
        reason: String,
    },
    /// Ends a grant.
    Revocation(Revocation),
    /// Completes a rotation.
    RotationCompletion(RotationCompletion),
    /// Delivers the keys of a family created after the grant.
    KeyDelivery {
        /// The grant that covers the family.
        grant: StatementId,
        /// The family and its epoch.
        family: GrantFamily,
        /// The keys, sealed to the grantee.
        bundle: SealedBytes,
    },
    /// Blocks or unblocks a company: a blocked company's requests are refused.
    Block {
        /// The company.
        company: IdentityId,
        /// True to block, false to unblock.
        blocked: bool,
    },
    /// Erases a family or the vault.
    Erasure(ErasureTarget),
    /// Disputes an inferred attribute.
    Dispute {
        /// The inferred family.
        family: FamilyId,
        /// The disputed record.
        record: RecordId,
        /// Reject or annotate.
        action: DisputeAction,
    },
    /// The customer's own limits on unsolicited requests, replacing any earlier ones.
    RequestPolicy(RequestPolicy),
}

/// Which unsolicited requests a customer accepts, on top of the vault limits every vault has
/// ([`crate::decision::MAX_PENDING_PER_COMPANY`], [`crate::decision::MAX_PENDING_PER_VAULT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestPolicy {
    /// Only companies holding an active grant may ask (for more); anyone else is refused.
    pub granted_only: bool,
    /// At most this many requests in any 24 hours of server time (log entry times).
    pub daily_cap: Option<u32>,
}

impl RequestPolicy {
    /// The policy in words, as shown.
    pub fn describe(&self) -> String {
        let who = if self.granted_only {
            "only companies with an active grant may ask"
        } else {
            "any company may ask"
        };
        match self.daily_cap {
            Some(n) => format!("{who}, at most {n} requests a day"),
            None => format!("{who}, with no daily cap beyond the vault limits"),
        }
    }
}

impl Body {
    fn tag(&self) -> u8 {
        match self {
            Body::Request(_) => 1,
            Body::Grant(_) => 2,
            Body::Denial { .. } => 3,
            Body::Revocation(_) => 4,
            Body::RotationCompletion(_) => 5,
            Body::KeyDelivery { .. } => 6,
            Body::Block { .. } => 7,
            Body::Erasure(_) => 8,
            Body::Dispute { .. } => 9,
            Body::RequestPolicy(_) => 10,
        }
    }

    /// The statement type's name, as logged and shown.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Request(_) => "access-request",
            Body::Grant(_) => "grant",
            Body::Denial { .. } => "denial",
            Body::Revocation(_) => "revocation",
            Body::RotationCompletion(_) => "rotation-completion",
            Body::KeyDelivery { .. } => "key-delivery",
            Body::Block { .. } => "block",
            Body::Erasure(_) => "erasure",
            Body::Dispute { .. } => "dispute",
            Body::RequestPolicy(_) => "request-policy",
        }
    }
}

/// A statement: who says what about which vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The vault it is about.
    pub customer: IdentityId,
    /// Who says it.
    pub author: IdentityId,
    /// The author's device that signs it.
    pub device: DeviceId,
    /// When the author's client issued it, Unix seconds (informative; validity follows the log).
    pub issued_at: u64,
    /// What it says.
    pub body: Body,
}

fn invalid(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

fn write_text(w: &mut Writer, s: &str) {
    w.bytes(s.as_bytes());
}

fn count(r: &mut Reader<'_>, field: &'static str) -> Result<usize, DecodeError> {
    let n = r.u32()? as usize;
    if n > MAX_LIST {
        return Err(DecodeError::TooLong {
            field,
            len: n,
            max: MAX_LIST,
        });
    }
    Ok(n)
}

fn write_scopes(w: &mut Writer, scopes: &[(Scope, Access)]) {
    w.u32(scopes.len() as u32);
    for (s, a) in scopes {
        w.u8(*s as u8).u8(*a as u8);
    }
}

fn read_scopes(r: &mut Reader<'_>) -> Result<Vec<(Scope, Access)>, DecodeError> {
    let n = count(r, "scopes")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push((Scope::from_u8(r.u8()?)?, Access::from_u8(r.u8()?)?));
    }
    if out.is_empty() {
        return Err(invalid("scopes", "at least one scope"));
    }
    let mut sorted: Vec<u8> = out.iter().map(|(s, _)| *s as u8).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("scopes", "a scope is listed twice"));
    }
    Ok(out)
}

fn write_grant_family(w: &mut Writer, f: &GrantFamily) {
    w.array(&f.family.0)
        .u8(f.scope as u8)
        .u64(f.epoch)
        .u8(f.access as u8);
}

fn read_grant_family(r: &mut Reader<'_>) -> Result<GrantFamily, DecodeError> {
    Ok(GrantFamily {
        family: FamilyId(r.array()?),
        scope: Scope::from_u8(r.u8()?)?,
        epoch: r.u64()?,
        access: Access::from_u8(r.u8()?)?,
    })
}

fn read_sealed(r: &mut Reader<'_>, field: &'static str) -> Result<SealedBytes, DecodeError> {
    SealedBytes::from_slice(r.bytes(field, SealedBytes::MAX_CIPHERTEXT + 32)?)
}

impl Statement {
    /// Encodes the body; for a grant, the part its id covers (everything but the bundle).
    fn encode_core(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::Consent);
        w.u8(self.body.tag())
            .array(&self.customer.0)
            .array(&self.author.0)
            .array(&self.device.0)
            .u64(self.issued_at);
        match &self.body {
            Body::Request(req) => {
                write_scopes(&mut w, &req.scopes);
                write_text(&mut w, &req.purpose);
                req.duration.write(&mut w);
                w.u32(req.lookback_months).u8(req.counterparty as u8);
            }
            Body::Grant(g) => {
                w.array(&g.grantee.0)
                    .option_array(g.request.as_ref().map(|i| &i.0));
                write_text(&mut w, &g.purpose);
                g.duration.write(&mut w);
                w.u64(g.not_before)
                    .option_array(g.expires.map(u64::to_be_bytes).as_ref())
                    .u32(g.lookback_start.0)
                    .option_array(g.window_months.map(u32::to_be_bytes).as_ref());
                write_scopes(&mut w, &g.scopes);
                w.u32(g.families.len() as u32);
                for f in &g.families {
                    write_grant_family(&mut w, f);
                }
                w.option_array(g.append_family.as_ref().map(|f| &f.0))
                    .array(&g.grantee_kem.to_bytes());
            }
            Body::Denial { request, reason } => {
                w.array(&request.0);
                write_text(&mut w, reason);
            }
            Body::Revocation(rev) => {
                w.array(&rev.grant.0).u8(rev.initiator as u8);
                write_text(&mut w, &rev.reason);
            }
            Body::RotationCompletion(rc) => {
                w.array(&rc.family.0)
                    .u64(rc.epoch)
                    .array(&rc.directory.0)
                    .u32(rc.keepers.len() as u32);
                for (grant, sealed) in &rc.keepers {
                    w.array(&grant.0).bytes(&sealed.to_bytes());
                }
            }
            Body::KeyDelivery {
                grant,
                family,
                bundle,
            } => {
                w.array(&grant.0);
                write_grant_family(&mut w, family);
                w.bytes(&bundle.to_bytes());
            }
            Body::Block { company, blocked } => {
                w.array(&company.0).u8(u8::from(*blocked));
            }
            Body::Erasure(target) => match target {
                ErasureTarget::Family(f) => {
                    w.u8(1).array(&f.0);
                }
                ErasureTarget::Vault => {
                    w.u8(2);
                }
            },
            Body::Dispute {
                family,
                record,
                action,
            } => {
                w.array(&family.0).array(&record.0);
                match action {
                    DisputeAction::Reject => w.u8(1),
                    DisputeAction::Annotate { record, digest } => {
                        w.u8(2).array(&record.0).array(&digest.0)
                    }
                };
            }
            Body::RequestPolicy(p) => {
                w.u8(u8::from(p.granted_only));
                match p.daily_cap {
                    None => w.u8(0),
                    Some(n) => w.u8(1).u32(n),
                };
            }
        }
        w.finish()
    }

    /// Parses a body; returns the statement and, for a grant, where the id-covered part ends and the
    /// sealed bundle.
    fn decode(bytes: &[u8]) -> Result<(Self, usize, Option<SealedBytes>), DecodeError> {
        let mut r = Reader::new(bytes, Kind::Consent)?;
        let tag = r.u8()?;
        let customer = IdentityId(r.array()?);
        let author = IdentityId(r.array()?);
        let device = DeviceId(r.array()?);
        let issued_at = r.u64()?;
        let mut bundle = None;
        let mut core_end = None;
        let body = match tag {
            1 => {
                let scopes = read_scopes(&mut r)?;
                let purpose = r.string("purpose", MAX_TEXT)?.to_string();
                let duration = Duration::read(&mut r)?;
                let lookback_months = r.u32()?;
                let counterparty = match r.u8()? {
                    1 => Counterparty::Any,
                    2 => Counterparty::OnlyRequester,
                    _ => return Err(invalid("counterparty", "unknown restriction")),
                };
                Body::Request(AccessRequest {
                    scopes,
                    purpose,
                    duration,
                    lookback_months,
                    counterparty,
                })
            }
            2 => {
                let grantee = IdentityId(r.array()?);
                let request = r.option_array("request")?.map(StatementId);
                let purpose = r.string("purpose", MAX_TEXT)?.to_string();
                let duration = Duration::read(&mut r)?;
                let not_before = r.u64()?;
                let expires = r.option_array::<8>("expires")?.map(u64::from_be_bytes);
                let lookback_start = Period(r.u32()?);
                let window_months = r.option_array::<4>("window")?.map(u32::from_be_bytes);
                let scopes = read_scopes(&mut r)?;
                let n = count(&mut r, "families")?;
                let mut families = Vec::with_capacity(n);
                for _ in 0..n {
                    families.push(read_grant_family(&mut r)?);
                }
                if families.windows(2).any(|w| w[0].family >= w[1].family) {
                    return Err(invalid("families", "must be sorted and unique"));
                }
                let append_family = r.option_array("append_family")?.map(FamilyId);
                let grantee_kem = KemPublicKey::from_bytes(&r.array()?)
                    .map_err(|_| invalid("grantee_kem", "low-order X25519 key"))?;
                if expires != duration.expiry(not_before) {
                    return Err(invalid(
                        "expires",
                        "a time-bound grant expires at not-before plus its duration; no other grant expires",
                    ));
                }
                core_end = Some(r.position());
                bundle = Some(read_sealed(&mut r, "bundle")?);
                Body::Grant(Grant {
                    grantee,
                    request,
                    purpose,
                    duration,
                    not_before,
                    expires,
                    lookback_start,
                    window_months,
                    scopes,
                    families,
                    append_family,
                    grantee_kem,
                })
            }
            3 => Body::Denial {
                request: StatementId(r.array()?),
                reason: r.string("reason", MAX_TEXT)?.to_string(),
            },
            4 => {
                let grant = StatementId(r.array()?);
                let initiator = match r.u8()? {
                    1 => Initiator::Customer,
                    2 => Initiator::Grantee,
                    _ => return Err(invalid("initiator", "unknown initiator")),
                };
                let reason = r.string("reason", MAX_TEXT)?.to_string();
                Body::Revocation(Revocation {
                    grant,
                    initiator,
                    reason,
                })
            }
            5 => {
                let family = FamilyId(r.array()?);
                let epoch = r.u64()?;
                let directory = Digest(r.array()?);
                let n = count(&mut r, "keepers")?;
                let mut keepers = Vec::with_capacity(n);
                for _ in 0..n {
                    let grant = StatementId(r.array()?);
                    keepers.push((grant, read_sealed(&mut r, "bundle")?));
                }
                Body::RotationCompletion(RotationCompletion {
                    family,
                    epoch,
                    directory,
                    keepers,
                })
            }
            6 => Body::KeyDelivery {
                grant: StatementId(r.array()?),
                family: read_grant_family(&mut r)?,
                bundle: read_sealed(&mut r, "bundle")?,
            },
            7 => Body::Block {
                company: IdentityId(r.array()?),
                blocked: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(invalid("blocked", "must be 0 or 1")),
                },
            },
            8 => Body::Erasure(match r.u8()? {
                1 => ErasureTarget::Family(FamilyId(r.array()?)),
                2 => ErasureTarget::Vault,
                _ => return Err(invalid("erasure", "unknown target")),
            }),
            9 => {
                let family = FamilyId(r.array()?);
                let record = RecordId(r.array()?);
                let action = match r.u8()? {
                    1 => DisputeAction::Reject,
                    2 => DisputeAction::Annotate {
                        record: RecordId(r.array()?),
                        digest: Digest(r.array()?),
                    },
                    _ => return Err(invalid("dispute", "unknown action")),
                };
                Body::Dispute {
                    family,
                    record,
                    action,
                }
            }
            10 => {
                let granted_only = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(invalid("granted_only", "must be 0 or 1")),
                };
                let daily_cap = match r.u8()? {
                    0 => None,
                    1 => Some(r.u32()?),
                    _ => return Err(invalid("daily_cap", "must be absent (0) or present (1)")),
                };
                Body::RequestPolicy(RequestPolicy {
                    granted_only,
                    daily_cap,
                })
            }
            _ => return Err(invalid("statement", "unknown statement type")),
        };
        let end = core_end.unwrap_or(r.position());
        r.finish()?;
        let statement = Statement {
            customer,
            author,
            device,
            issued_at,
            body,
        };
        statement.check_author()?;
        Ok((statement, end, bundle))
    }

    /// Which identity may author this statement.
    fn check_author(&self) -> Result<(), DecodeError> {
        let by_customer = self.author == self.customer;
        let ok = match &self.body {
            Body::Request(_) => !by_customer,
            // A revocation may come from the grantee; the decision function checks it is the grantee.
            Body::Revocation(r) => (r.initiator == Initiator::Customer) == by_customer,
            _ => by_customer,
        };
        if ok {
            Ok(())
        } else {
            Err(invalid(
                "author",
                "this identity cannot author this statement",
            ))
        }
    }
}

/// Why a statement could not be made or verified.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StatementError {
    /// Malformed bytes.
    #[error("malformed statement: {0}")]
    Decode(#[from] DecodeError),
    /// The signature is not by a device of the author valid at that position.
    #[error("statement signature refused: {0}")]
    Signature(IdentityError),
    /// The identity state given is not the author's.
    #[error("statement is checked against another identity than its author")]
    WrongAuthor,
    /// A grant without its bundle, or a bundle on another statement.
    #[error("a grant must carry its key bundle, and only a grant may")]
    Bundle,
}

/// A statement with its author's signature over the exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatement {
    envelope: SignedEnvelope,
    statement: Statement,
    id: StatementId,
    bundle: Option<SealedBytes>,
}

impl SignedStatement {
    /// Signs `statement` with the author's device key. A grant must come with its sealed key bundle, which
    /// its client seals to the grantee bound to [`SignedStatement::grant_id`].
    pub fn sign(
        statement: Statement,
        bundle: Option<SealedBytes>,
        device_key: &SigningKey,
    ) -> Result<Self, StatementError> {
        statement.check_author()?;
        let is_grant = matches!(statement.body, Body::Grant(_));
        if is_grant != bundle.is_some() {
            return Err(StatementError::Bundle);
        }
        let mut body = statement.encode_core();
        let id = StatementId(tagged_hash("statement", &body).0);
        if let Some(b) = &bundle {
            let mut w = Vec::with_capacity(4 + 32 + b.ciphertext.len());
            let sealed = b.to_bytes();
            w.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
            w.extend_from_slice(&sealed);
            body.extend_from_slice(&w);
        }
        Ok(Self {
            envelope: SignedEnvelope::sign(body, device_key),
            statement,
            id,
            bundle,
        })
    }

    /// The id a grant will have: computed before sealing its bundle, which binds to it.
    pub fn grant_id(statement: &Statement) -> StatementId {
        StatementId(tagged_hash("statement", &statement.encode_core()).0)
    }

    /// Parses the wire form (not verified).
    pub fn decode(bytes: &[u8]) -> Result<Self, StatementError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let (statement, core_end, bundle) = Statement::decode(&envelope.body)?;
        let id = StatementId(tagged_hash("statement", &envelope.body[..core_end]).0);
        Ok(Self {
            envelope,
            statement,
            id,
            bundle,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode()
    }

    /// The statement.
    pub fn statement(&self) -> &Statement {
        &self.statement
    }

    /// Its id.
    pub fn id(&self) -> StatementId {
        self.id
    }

    /// The sealed key bundle, for a grant.
    pub fn bundle(&self) -> Option<&SealedBytes> {
        self.bundle.as_ref()
    }

    /// The signed envelope.
    pub fn envelope(&self) -> &SignedEnvelope {
        &self.envelope
    }

    /// Verifies that `author` (the author's identity state) signed it with a device valid at `position`.
    pub fn verify(&self, author: &IdentityState, position: Position) -> Result<(), StatementError> {
        if author.keys().id() != self.statement.author {
            return Err(StatementError::WrongAuthor);
        }
        author
            .verify_device_signature(
                &self.statement.device,
                position,
                &self.envelope.body,
                &self.envelope.signature,
            )
            .map_err(StatementError::Signature)
    }
}

/// How a grant widens the request it answers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarrowError {
    /// The grant answers another request.
    #[error("the grant answers another request")]
    OtherRequest,
    /// A scope that was not requested, or more access than requested.
    #[error("scope {0} was not requested with that access")]
    Scope(Scope),
    /// A longer duration than requested.
    #[error("the grant lasts longer than requested")]
    Duration,
    /// A longer look-back than requested.
    #[error("the grant looks back further than requested")]
    Lookback,
    /// A family outside the granted scopes.
    #[error("family is outside the granted scopes")]
    Family,
}

impl Grant {
    /// Checks that this grant, made at server time `now`, is no wider than `request` (with id
    /// `request_id`): fewer scopes, no more access, no longer duration, no longer look-back.
    pub fn check_narrows(
        &self,
        request_id: StatementId,
        request: &AccessRequest,
        now_period: Period,
    ) -> Result<(), NarrowError> {
        if self.request != Some(request_id) {
            return Err(NarrowError::OtherRequest);
        }
        for (scope, access) in &self.scopes {
            let asked = request
                .scopes
                .iter()
                .find(|(s, _)| s == scope)
                .ok_or(NarrowError::Scope(*scope))?;
            if !access.within(asked.1) {
                return Err(NarrowError::Scope(*scope));
            }
        }
        if !self.duration.within(request.duration) {
            return Err(NarrowError::Duration);
        }
        let earliest =
            Period(now_period.0.saturating_sub(request.lookback_months)).max(Period::ORIGIN);
        if self.lookback_start < earliest {
            return Err(NarrowError::Lookback);
        }
        for f in &self.families {
            let covered = self
                .scopes
                .iter()
                .any(|(s, a)| *s == f.scope && f.access.within(*a));
            if !covered {
                return Err(NarrowError::Family);
            }
        }
        Ok(())
    }
}
