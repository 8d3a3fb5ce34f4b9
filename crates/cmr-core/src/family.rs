//! Families, scopes, counterparty pseudonyms and periods (design note 0002).
//!
//! Owns how a family is named and identified, the pseudonym key that hides which company a family is
//! about, and the month periods that split transactions. It does not own keys (see [`crate::epoch`]) or
//! records (see [`crate::record`]).

use std::fmt;

use rand_core::CryptoRng;
use ring::hmac;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::hash::tagged_hash;
use crate::identity::IdentityId;

/// What a grant can cover. The vocabulary of PRODUCT.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Scope {
    /// `profile.identity`
    ProfileIdentity = 1,
    /// `profile.contact`
    ProfileContact = 2,
    /// `profile.address`
    ProfileAddress = 3,
    /// `profile.preferences`: channels and times, and payment preferences.
    ProfilePreferences = 4,
    /// `profile.inferred`: attributes a company inferred (segments, learned preferences).
    ProfileInferred = 5,
    /// `transactions`
    Transactions = 6,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 6] = [
        Scope::ProfileIdentity,
        Scope::ProfileContact,
        Scope::ProfileAddress,
        Scope::ProfilePreferences,
        Scope::ProfileInferred,
        Scope::Transactions,
    ];

    /// The scope's name, as used in the API and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Scope::ProfileIdentity => "profile.identity",
            Scope::ProfileContact => "profile.contact",
            Scope::ProfileAddress => "profile.address",
            Scope::ProfilePreferences => "profile.preferences",
            Scope::ProfileInferred => "profile.inferred",
            Scope::Transactions => "transactions",
        }
    }

    /// Parses a scope name.
    pub fn from_name(name: &str) -> Option<Self> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Parses the scope's byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Scope::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .ok_or(DecodeError::Invalid {
                field: "scope",
                reason: "unknown scope",
            })
    }

    /// Whether this scope is split into monthly periods.
    pub fn is_periodic(self) -> bool {
        self == Scope::Transactions
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A company as it appears in a family name: an HMAC the operator cannot reverse.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym(pub [u8; 32]);

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({})", hex::encode(self.0))
    }
}

/// The customer's pseudonym key: random, separate from the vault key, never rotated.
pub struct PseudonymKey(Zeroizing<[u8; 32]>);

impl PseudonymKey {
    /// Draws a fresh key.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(k.as_mut());
        Self(k)
    }

    /// Rebuilds the key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes, for wrapping to the customer's devices.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, label: &[u8], company: &IdentityId) -> Pseudonym {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.as_ref());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(label);
        ctx.update(&company.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Pseudonym(out)
    }

    /// The pseudonym of `company` as a counterparty of transactions.
    pub fn counterparty(&self, company: &IdentityId) -> Pseudonym {
        self.mac(b"cmr-vault/v1 counterparty\0", company)
    }

    /// The pseudonym of `company` as the writer of inferred attributes.
    pub fn inferred_by(&self, company: &IdentityId) -> Pseudonym {
        self.mac(b"cmr-vault/v1 inferred-by\0", company)
    }

    /// The record id of an imported row: a keyed hash of the family, the period, the content and its
    /// occurrence among identical rows of that period (0 for the first), so the same file imported again
    /// names the same records (and two identical purchases in one month stay two records). Keyed with this
    /// customer's secret, it tells the server nothing about the content.
    pub fn import_record_id(
        &self,
        family: &FamilyId,
        period: Period,
        content: &[u8],
        occurrence: u32,
    ) -> crate::record::RecordId {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.as_ref());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"cmr-vault/v1 import-record-id\0");
        ctx.update(&family.0);
        ctx.update(&period.0.to_be_bytes());
        ctx.update(&occurrence.to_be_bytes());
        ctx.update(content);
        let mut out = [0u8; 16];
        out.copy_from_slice(&ctx.sign().as_ref()[..16]);
        crate::record::RecordId(out)
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey([redacted])")
    }
}

/// A family: a scope, narrowed by counterparty (transactions) or by writer (inferred attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FamilyName {
    /// One profile section. The scope must be one of the four sections.
    Profile(Scope),
    /// The attributes inferred by one company.
    Inferred(Pseudonym),
    /// The transactions with one counterparty.
    Transactions(Pseudonym),
}

impl FamilyName {
    /// The scope this family belongs to.
    pub fn scope(&self) -> Scope {
        match self {
            FamilyName::Profile(s) => *s,
            FamilyName::Inferred(_) => Scope::ProfileInferred,
            FamilyName::Transactions(_) => Scope::Transactions,
        }
    }

    /// The pseudonym of the company this family is about, if any.
    pub fn pseudonym(&self) -> Option<Pseudonym> {
        match self {
            FamilyName::Profile(_) => None,
            FamilyName::Inferred(p) | FamilyName::Transactions(p) => Some(*p),
        }
    }

    /// A profile section's family. `None` for the inferred and transactions scopes, which need a company.
    pub fn profile(scope: Scope) -> Option<Self> {
        matches!(
            scope,
            Scope::ProfileIdentity
                | Scope::ProfileContact
                | Scope::ProfileAddress
                | Scope::ProfilePreferences
        )
        .then_some(FamilyName::Profile(scope))
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::FamilyName);
        w.u8(self.scope() as u8)
            .option_array(self.pseudonym().as_ref().map(|p| &p.0));
        w.finish()
    }

    /// Parses the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Kind::FamilyName)?;
        let scope = Scope::from_u8(r.u8()?)?;
        let pseudonym = r.option_array::<32>("pseudonym")?.map(Pseudonym);
        r.finish()?;
        let invalid = DecodeError::Invalid {
            field: "family",
            reason: "scope and pseudonym do not match",
        };
        match (scope, pseudonym) {
            (Scope::ProfileInferred, Some(p)) => Ok(FamilyName::Inferred(p)),
            (Scope::Transactions, Some(p)) => Ok(FamilyName::Transactions(p)),
            (s, None) => FamilyName::profile(s).ok_or(invalid),
            _ => Err(invalid),
        }
    }

    /// The family's id in `customer`'s vault.
    pub fn id(&self, customer: &IdentityId) -> FamilyId {
        let mut data = customer.0.to_vec();
        data.extend_from_slice(&self.encode());
        FamilyId(tagged_hash("family", &data).0)
    }
}

/// A family's id: bound to the customer and the family name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FamilyId(pub [u8; 32]);

impl FamilyId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for FamilyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FamilyId({})", self.to_hex())
    }
}

/// A month: `year × 12 + (month − 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period(pub u32);

impl Period {
    /// The chain origin p0 of every epoch: January 2000.
    pub const ORIGIN: Period = Period(2000 * 12);

    /// Parses `YYYY-MM` (from 2000-01 on).
    pub fn parse(s: &str) -> Option<Self> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        Self::from_year_month(y.parse().ok()?, m.parse().ok()?)
    }

    /// The period of a calendar month (`month` from 1 to 12). `None` before the origin or for a bad month.
    pub fn from_year_month(year: u32, month: u32) -> Option<Self> {
        if !(1..=12).contains(&month) {
            return None;
        }
        let p = Period(year.checked_mul(12)?.checked_add(month - 1)?);
        (p >= Self::ORIGIN).then_some(p)
    }

    /// The period that contains a Unix time (seconds, UTC). `None` before the origin.
    pub fn from_unix(seconds: i64) -> Option<Self> {
        let days = seconds.div_euclid(86_400);
        let (y, m, _) = civil_from_days(days);
        Self::from_year_month(u32::try_from(y).ok()?, m)
    }

    /// The year and month (1–12).
    pub fn year_month(self) -> (u32, u32) {
        (self.0 / 12, self.0 % 12 + 1)
    }

    /// Steps from the origin to this period.
    pub fn steps_from_origin(self) -> u32 {
        self.0.saturating_sub(Self::ORIGIN.0)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m) = self.year_month();
        write!(f, "{y:04}-{m:02}")
    }
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        assert_eq!(Period::from_year_month(2000, 1), Some(Period::ORIGIN));
        assert_eq!(Period::from_year_month(1999, 12), None);
        assert_eq!(Period::from_year_month(2026, 13), None);
        // 2026-11-27T23:39:23Z
        let p = Period::from_unix(1_795_563_563).unwrap();
        assert_eq!(p.to_string(), "2026-11");
        assert_eq!(
            Period::from_unix(951_782_400).unwrap().to_string(),
            "2000-02"
        ); // 2000-02-29
        assert_eq!(Period::from_unix(0), None);
        assert_eq!(p.steps_from_origin(), 26 * 12 + 10);
    }

    #[test]
    fn family_names_round_trip_and_ids_bind_the_customer() {
        let key = PseudonymKey::generate(&mut rand::rng());
        let acme = IdentityId([1; 32]);
        let names = [
            FamilyName::profile(Scope::ProfileContact).unwrap(),
            FamilyName::Inferred(key.inferred_by(&acme)),
            FamilyName::Transactions(key.counterparty(&acme)),
        ];
        for n in names {
            assert_eq!(FamilyName::decode(&n.encode()).unwrap(), n);
        }
        assert_ne!(names[1].pseudonym(), names[2].pseudonym());
        assert_ne!(
            names[0].id(&IdentityId([2; 32])),
            names[0].id(&IdentityId([3; 32]))
        );
        assert!(FamilyName::profile(Scope::Transactions).is_none());
        // A pseudonym on a profile section, or none on transactions, is refused.
        let mut w = Writer::new(Kind::FamilyName);
        w.u8(Scope::Transactions as u8).option_array::<32>(None);
        assert!(FamilyName::decode(&w.finish()).is_err());
    }

    #[test]
    fn pseudonyms_depend_on_the_key() {
        let acme = IdentityId([1; 32]);
        let a = PseudonymKey::from_bytes([1; 32]);
        let b = PseudonymKey::from_bytes([2; 32]);
        assert_ne!(a.counterparty(&acme), b.counterparty(&acme));
        assert_eq!(
            a.counterparty(&acme),
            PseudonymKey::from_bytes([1; 32]).counterparty(&acme)
        );
        assert!(!format!("{a:?}").contains("01"));
        for s in Scope::ALL {
            assert_eq!(Scope::from_name(s.name()), Some(s));
        }
    }
}
