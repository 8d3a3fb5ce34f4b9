//! Log entries and their commitments (PRODUCT.md, "The log is private").
//!
//! Owns the entry body format (one kind for each statement that goes into the log, plus accesses), the
//! per-customer chain link, and the commitment that is the public leaf: `H("log-commitment", salt ||
//! body)` with a fresh 32-byte salt drawn by the sequencer. The salt is stored with the body and released
//! only with it; erasing both leaves the leaf unopenable, and the auditor reports the entry as redacted.

use base64::Engine as _;
use cmr_core::consent::StatementId;
use cmr_core::decision::{AccessAttempt, AccessKind};
use cmr_core::encoding::{DecodeError, Kind, Reader, Writer};
use cmr_core::family::{FamilyId, Period};
use cmr_core::hash::{Digest, tagged_hash};
use cmr_core::identity::IdentityId;
use cmr_core::merkle::{Hash, leaf_hash};
use cmr_core::record::RecordId;
use rand_core::CryptoRng;

/// The largest payload an entry may carry.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// The most families or record ids in one access record.
pub const MAX_ACCESS_ITEMS: usize = 4096;

/// What an entry records. Each carries the exact signed bytes of its statement as payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum EntryKind {
    /// An identity key event (inception or rotation).
    KeyEvent = 1,
    /// A device certificate.
    DeviceCertificate = 2,
    /// A device revocation.
    DeviceRevocation = 3,
    /// A key directory.
    Directory = 4,
    /// A family head after a batch (payload: the signed batch).
    FamilyHead = 5,
    /// A consent statement.
    Statement = 6,
    /// An access (payload: an [`AccessRecord`]).
    Access = 7,
    /// An auditor admitted or dismissed by the operator (payload: the statement signed with the log key,
    /// [`crate::admission`]; subject: the auditor).
    Admission = 8,
}

impl EntryKind {
    /// Every kind.
    pub const ALL: [EntryKind; 8] = [
        EntryKind::KeyEvent,
        EntryKind::DeviceCertificate,
        EntryKind::DeviceRevocation,
        EntryKind::Directory,
        EntryKind::FamilyHead,
        EntryKind::Statement,
        EntryKind::Access,
        EntryKind::Admission,
    ];

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        EntryKind::ALL
            .into_iter()
            .find(|k| *k as u8 == v)
            .ok_or(DecodeError::Invalid {
                field: "kind",
                reason: "unknown entry kind",
            })
    }

    /// The kind's name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::KeyEvent => "key-event",
            EntryKind::DeviceCertificate => "device-certificate",
            EntryKind::DeviceRevocation => "device-revocation",
            EntryKind::Directory => "directory",
            EntryKind::FamilyHead => "family-head",
            EntryKind::Statement => "statement",
            EntryKind::Access => "access",
            EntryKind::Admission => "auditor-admission",
        }
    }
}

/// A link to a customer's previous entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    /// Its log index.
    pub index: u64,
    /// Its entry hash.
    pub hash: Digest,
}

/// An entry body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryBody {
    /// What it records.
    pub kind: EntryKind,
    /// The server time stamped by the sequencer, Unix seconds. Never decreases along the log.
    pub time: u64,
    /// The identity whose statement or access it is.
    pub subject: IdentityId,
    /// The customer the entry is about, if any (a company's own key events are about no customer).
    pub customer: Option<IdentityId>,
    /// That customer's previous entry, if it has one.
    pub prev: Option<ChainLink>,
    /// The exact signed bytes (or the access record).
    pub payload: Vec<u8>,
}

impl EntryBody {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Kind::LogEntry, 128 + self.payload.len());
        w.u8(self.kind as u8)
            .u64(self.time)
            .array(&self.subject.0)
            .option_array(self.customer.as_ref().map(|c| &c.0));
        match &self.prev {
            None => w.u8(0),
            Some(l) => w.u8(1).u64(l.index).array(&l.hash.0),
        };
        w.bytes(&self.payload);
        w.finish()
    }

    /// Parses the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Kind::LogEntry)?;
        let kind = EntryKind::from_u8(r.u8()?)?;
        let time = r.u64()?;
        let subject = IdentityId(r.array()?);
        let customer = r.option_array("customer")?.map(IdentityId);
        let prev = match r.u8()? {
            0 => None,
            1 => Some(ChainLink {
                index: r.u64()?,
                hash: Digest(r.array()?),
            }),
            _ => {
                return Err(DecodeError::Invalid {
                    field: "prev",
                    reason: "presence byte is neither 0 nor 1",
                });
            }
        };
        let payload = r.bytes("payload", MAX_PAYLOAD)?.to_vec();
        r.finish()?;
        if prev.is_some() && customer.is_none() {
            return Err(DecodeError::Invalid {
                field: "prev",
                reason: "only an entry about a customer links to a previous one",
            });
        }
        Ok(Self {
            kind,
            time,
            subject,
            customer,
            prev,
            payload,
        })
    }

    /// `H("log-entry", body)`: what the customer's next entry names.
    pub fn hash(encoded: &[u8]) -> Digest {
        tagged_hash("log-entry", encoded)
    }
}

/// An entry body with the salt of its commitment, as stored and as released to those who may read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaltedBody {
    /// The salt drawn by the sequencer.
    pub salt: [u8; 32],
    /// The encoded body.
    pub body: Vec<u8>,
}

/// A fresh 32-byte salt, drawn by the sequencer for each entry.
pub fn draw_salt<R: CryptoRng + ?Sized>(rng: &mut R) -> [u8; 32] {
    let mut salt = [0u8; 32];
    rng.fill_bytes(&mut salt);
    salt
}

/// The public commitment to an entry: `H("log-commitment", salt || body)`. It is the leaf data.
pub fn commitment(salt: &[u8; 32], encoded_body: &[u8]) -> Digest {
    let mut data = Vec::with_capacity(32 + encoded_body.len());
    data.extend_from_slice(salt);
    data.extend_from_slice(encoded_body);
    tagged_hash("log-commitment", &data)
}

/// The Merkle leaf hash of a commitment: `SHA-256(0x00 || commitment)`.
pub fn commitment_leaf(commitment: &Digest) -> Hash {
    leaf_hash(&commitment.0)
}

/// What a compact access record stores besides the access itself: the fields its signature base is
/// rebuilt from.
struct ProfileFields {
    /// The vault named in the request's path.
    customer: IdentityId,
    /// The `@authority` signed.
    authority: String,
    /// The SHA-256 of the request body (its `content-digest`).
    digest: [u8; 32],
    /// `created`, Unix seconds.
    created: u64,
    /// `nonce`.
    nonce: String,
    /// The device whose key signed (`keyid`, in hex).
    device: [u8; 32],
}

/// One family served or written by an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessedFamily {
    /// The family.
    pub family: FamilyId,
    /// First period, inclusive.
    pub from: Period,
    /// Last period, inclusive.
    pub to: Period,
}

/// What the log records of an access: the company's RFC 9421 signature with its exact signature base,
/// what was served or written under which grant, and the server time (in the entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// The grant used.
    pub grant: StatementId,
    /// Read or append.
    pub kind: AccessKind,
    /// For an append: the epoch the records were sealed to.
    pub epoch: Option<u64>,
    /// The families and periods.
    pub families: Vec<AccessedFamily>,
    /// The records served or written.
    pub records: Vec<RecordId>,
    /// The `keyid` of the request signature (the company device id, hex).
    pub keyid: String,
    /// The exact RFC 9421 signature base the company signed.
    pub signature_base: String,
    /// The Ed25519 signature over it.
    pub signature: [u8; 64],
    /// For a read: the digest of the family's head the read was served against, as the store held it
    /// at this entry's log position. A company's client checks it is the head of the answer it got, so
    /// a server cannot answer with an older head without saying so in the log. Written after the
    /// signature, and only when present (records logged before it had none).
    pub head: Option<Digest>,
}

/// The request target (path and query) that the signed request of an access must name, built from what
/// the access claims: `POST /v1/vaults/{customer}/families/{family}/read?grant=G&from=P&to=Q` for a read,
/// `…/batches?grant=G&epoch=E&from=P&to=Q` for an append. One function for every party: the SDK sends its
/// request to it, and [`AccessRecord::check_binding`] (the store before logging, the auditor after)
/// refuses a record whose signed request names anything else. RFC 9421 covers `@path` and `@query`, so
/// what a company signed says exactly which vault, family, route, grant, epoch and periods it asked for.
pub fn access_target(
    customer: &IdentityId,
    family: &FamilyId,
    kind: AccessKind,
    grant: &StatementId,
    epoch: Option<u64>,
    from: Period,
    to: Period,
) -> String {
    let route = match kind {
        AccessKind::Read => "read",
        AccessKind::Append => "batches",
    };
    let epoch = epoch.map(|e| format!("&epoch={e}")).unwrap_or_default();
    format!(
        "/v1/vaults/{}/families/{}/{route}?grant={}{epoch}&from={from}&to={to}",
        customer.to_hex(),
        family.to_hex(),
        grant.to_hex()
    )
}

impl AccessRecord {
    /// Checks that the signed request says exactly what this record claims, for `customer`: a `POST` to
    /// [`access_target`] of its one family, grant, kind, epoch and periods. A record that fails was not
    /// caused by such a request (an operator cannot log a company's other request, such as a
    /// relationship poll, as a read of a family).
    pub fn check_binding(&self, customer: &IdentityId) -> Result<(), String> {
        let [f] = self.families.as_slice() else {
            return Err("an access names exactly one family".into());
        };
        let target = access_target(
            customer,
            &f.family,
            self.kind,
            &self.grant,
            self.epoch,
            f.from,
            f.to,
        );
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let query = format!("?{query}");
        for (name, expected) in [("@method", "POST"), ("@path", path), ("@query", &query)] {
            let prefix = format!("\"{name}\": ");
            let signed = self
                .signature_base
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()));
            if signed != Some(expected) {
                return Err(format!(
                    "the signed request's {name} is {}, but the access claims {expected}",
                    signed.unwrap_or("missing")
                ));
            }
        }
        Ok(())
    }

    /// The vault the signed request names (`@path` `/v1/vaults/{customer}/…`), which the record must then
    /// be bound to ([`AccessRecord::check_binding`]). `None` if it names none.
    pub fn bound_customer(&self) -> Option<IdentityId> {
        let path = self
            .signature_base
            .lines()
            .find_map(|l| l.strip_prefix("\"@path\": "))?;
        let rest = path.strip_prefix("/v1/vaults/")?;
        IdentityId::from_hex(rest.split('/').next()?)
    }

    /// The access this record claims, by `company`, for `evaluate`: its families, and the span of their
    /// periods. `None` if it names no family.
    pub fn attempt(&self, company: IdentityId) -> Option<AccessAttempt> {
        let from = self.families.iter().map(|f| f.from).min()?;
        let to = self.families.iter().map(|f| f.to).max()?;
        Some(AccessAttempt {
            company,
            grant: self.grant,
            kind: self.kind,
            families: self.families.iter().map(|f| f.family).collect(),
            periods: (from, to),
            epoch: self.epoch,
        })
    }

    /// The canonical encoding: compact ([`Kind::AccessRecordCompact`]) when the signed request
    /// followed the signing profile exactly, so that its signature base is rebuilt from a few fields;
    /// else in full, with the signature base as signed.
    pub fn encode(&self) -> Vec<u8> {
        match self.profile_fields() {
            Some(p) => self.encode_compact(&p),
            None => self.encode_full(),
        }
    }

    /// The fields the signature base is rebuilt from, if it is exactly the signing profile's over
    /// this record's request: a `POST` to [`access_target`], covering the profile's components,
    /// with `created`, `keyid` (this record's device id) and `nonce`, and nothing else.
    fn profile_fields(&self) -> Option<ProfileFields> {
        let line = |name: &str| {
            let prefix = format!("\"{name}\": ");
            self.signature_base
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
        };
        let digest = line("content-digest")?
            .strip_prefix("sha-256=:")?
            .strip_suffix(':')?;
        let digest: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(digest)
            .ok()?
            .try_into()
            .ok()?;
        let params = line("@signature-params")?;
        let after = |key: &str| params.split_once(key).map(|(_, rest)| rest);
        let created = after(";created=")?.split(';').next()?.parse::<u64>().ok()?;
        let nonce = after(";nonce=\"")?.split('"').next()?.to_string();
        let mut device = [0u8; 32];
        hex::decode_to_slice(&self.keyid, &mut device).ok()?;
        let fields = ProfileFields {
            customer: self.bound_customer()?,
            authority: line("@authority")?.to_string(),
            digest,
            created,
            nonce,
            device,
        };
        // Compact only if the rebuilt base is byte for byte the one signed.
        (self.profile_base(&fields)? == self.signature_base && hex::encode(device) == self.keyid)
            .then_some(fields)
    }

    /// The signature base of a request that followed the signing profile, from `p` and this record.
    fn profile_base(&self, p: &ProfileFields) -> Option<String> {
        let [f] = self.families.as_slice() else {
            return None;
        };
        let target = access_target(
            &p.customer,
            &f.family,
            self.kind,
            &self.grant,
            self.epoch,
            f.from,
            f.to,
        );
        let (path, query) = target.split_once('?')?;
        let keyid = hex::encode(p.device);
        let created = i64::try_from(p.created).ok()?;
        let params = cmr_core::httpsig::SignatureParams::profile(created, &keyid, &p.nonce).ok()?;
        // The decoder takes at most 255 bytes of authority: a longer one is stored in full.
        if p.authority.contains(['\n', '\r']) || p.authority.len() > 255 {
            return None;
        }
        Some(format!(
            "\"@method\": POST\n\"@authority\": {}\n\"@path\": {path}\n\"@query\": ?{query}\n\
             \"content-digest\": sha-256=:{}:\n\"@signature-params\": {}",
            p.authority,
            base64::engine::general_purpose::STANDARD.encode(p.digest),
            params.serialize()
        ))
    }

    /// The access part both encodings share: grant, kind, epoch, families, records.
    fn write_access(&self, w: &mut Writer) {
        w.array(&self.grant.0)
            .u8(match self.kind {
                AccessKind::Read => 1,
                AccessKind::Append => 2,
            })
            .option_array(self.epoch.map(u64::to_be_bytes).as_ref())
            .u32(self.families.len() as u32);
        for f in &self.families {
            w.array(&f.family.0).u32(f.from.0).u32(f.to.0);
        }
        w.u32(self.records.len() as u32);
        for r in &self.records {
            w.array(&r.0);
        }
    }

    fn encode_compact(&self, p: &ProfileFields) -> Vec<u8> {
        let mut w = Writer::with_capacity(Kind::AccessRecordCompact, 320 + 16 * self.records.len());
        self.write_access(&mut w);
        w.array(&p.customer.0)
            .bytes(p.authority.as_bytes())
            .array(&p.digest)
            .u64(p.created)
            .bytes(p.nonce.as_bytes())
            .array(&p.device)
            .array(&self.signature);
        self.write_head(&mut w);
        w.finish()
    }

    /// The head, after the signature, only if there is one.
    fn write_head(&self, w: &mut Writer) {
        if let Some(h) = &self.head {
            w.option_array(Some(&h.0));
        }
    }

    fn encode_full(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Kind::AccessRecord, 256 + self.signature_base.len());
        self.write_access(&mut w);
        w.bytes(self.keyid.as_bytes())
            .bytes(self.signature_base.as_bytes())
            .array(&self.signature);
        self.write_head(&mut w);
        w.finish()
    }

    /// Parses the canonical encoding (compact or full).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let compact = bytes.get(5) == Some(&(Kind::AccessRecordCompact as u8));
        let mut r = Reader::new(
            bytes,
            if compact {
                Kind::AccessRecordCompact
            } else {
                Kind::AccessRecord
            },
        )?;
        let grant = StatementId(r.array()?);
        let kind = match r.u8()? {
            1 => AccessKind::Read,
            2 => AccessKind::Append,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "kind",
                    reason: "unknown access kind",
                });
            }
        };
        let epoch = r.option_array::<8>("epoch")?.map(u64::from_be_bytes);
        let count = |r: &mut Reader<'_>, field| -> Result<usize, DecodeError> {
            let n = r.u32()? as usize;
            if n > MAX_ACCESS_ITEMS {
                return Err(DecodeError::TooLong {
                    field,
                    len: n,
                    max: MAX_ACCESS_ITEMS,
                });
            }
            Ok(n)
        };
        let n = count(&mut r, "families")?;
        let mut families = Vec::with_capacity(n);
        for _ in 0..n {
            families.push(AccessedFamily {
                family: FamilyId(r.array()?),
                from: Period(r.u32()?),
                to: Period(r.u32()?),
            });
        }
        let n = count(&mut r, "records")?;
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            records.push(RecordId(r.array()?));
        }
        let mut record = Self {
            grant,
            kind,
            epoch,
            families,
            records,
            keyid: String::new(),
            signature_base: String::new(),
            signature: [0; 64],
            head: None,
        };
        if compact {
            let p = ProfileFields {
                customer: IdentityId(r.array()?),
                authority: r.string("authority", 255)?.to_string(),
                digest: r.array()?,
                created: r.u64()?,
                nonce: r
                    .string("nonce", cmr_core::httpsig::MAX_NONCE_LEN)?
                    .to_string(),
                device: r.array()?,
            };
            record.signature_base = record.profile_base(&p).ok_or(DecodeError::Invalid {
                field: "access",
                reason: "a compact access record names exactly one family and a valid request",
            })?;
            record.keyid = hex::encode(p.device);
        } else {
            record.keyid = r.string("keyid", 256)?.to_string();
            record.signature_base = r.string("signature_base", 8192)?.to_string();
        }
        record.signature = r.array()?;
        if r.remaining() > 0 {
            // Present only when there is a head: an absent marker here would not be canonical.
            record.head = Some(Digest(r.option_array::<32>("head")?.ok_or(
                DecodeError::Invalid {
                    field: "head",
                    reason: "an absent head is not written",
                },
            )?));
        }
        r.finish()?;
        Ok(record)
    }
}
