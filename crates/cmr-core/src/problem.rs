//! The stable problem codes.

/// Every stable problem code, named in problem details (`urn:cmr-vault:problem:{code}`), refusals and
/// audit reports. One list: the server, the rule engine and the consent rules name codes only through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    /// `access-not-granted`.
    AccessNotGranted,
    /// `already-registered`.
    AlreadyRegistered,
    /// `backup-conflict`.
    BackupConflict,
    /// `bad-cosignature`.
    BadCosignature,
    /// `bad-signature`.
    BadSignature,
    /// `bad-signature-input`.
    BadSignatureInput,
    /// `blocked`.
    Blocked,
    /// `body-too-slow`.
    BodyTooSlow,
    /// `clock-skew`.
    ClockSkew,
    /// `company-blocked`.
    CompanyBlocked,
    /// `conflict`.
    Conflict,
    /// `content-digest`.
    ContentDigest,
    /// `created-before-start`.
    CreatedBeforeStart,
    /// `directory-conflict`.
    DirectoryConflict,
    /// `family-erased`.
    FamilyErased,
    /// `family-not-granted`.
    FamilyNotGranted,
    /// `forbidden`.
    Forbidden,
    /// `grant-consumed`.
    GrantConsumed,
    /// `grant-expired`.
    GrantExpired,
    /// `grant-revoked`.
    GrantRevoked,
    /// `in-doubt`.
    InDoubt,
    /// `internal`.
    Internal,
    /// `malformed`.
    Malformed,
    /// `malformed-access`.
    MalformedAccess,
    /// `method-not-allowed`.
    MethodNotAllowed,
    /// `missing-signature`.
    MissingSignature,
    /// `no-grant`.
    NoGrant,
    /// `not-found`.
    NotFound,
    /// `not-own-family`.
    NotOwnFamily,
    /// `not-yet-valid`.
    NotYetValid,
    /// `outside-look-back`.
    OutsideLookBack,
    /// `rate-limited`.
    RateLimited,
    /// `refused`.
    Refused,
    /// `replayed`.
    Replayed,
    /// `requests-not-accepted`.
    RequestsNotAccepted,
    /// `rotation-pending`.
    RotationPending,
    /// `stale-epoch`.
    StaleEpoch,
    /// `stale-head`.
    StaleHead,
    /// `too-large`.
    TooLarge,
    /// `too-many-requests`.
    TooManyRequests,
    /// `unavailable`.
    Unavailable,
    /// `unbound-access`.
    UnboundAccess,
    /// `unknown-customer`.
    UnknownCustomer,
    /// `unknown-family`.
    UnknownFamily,
    /// `unknown-identity`.
    UnknownIdentity,
    /// `unknown-key`.
    UnknownKey,
    /// `wrong-company`.
    WrongCompany,
    /// `wrong-header`.
    WrongHeader,
}

impl Code {
    /// Every code.
    pub const ALL: [Code; 48] = [
        Code::AccessNotGranted,
        Code::AlreadyRegistered,
        Code::BackupConflict,
        Code::BadCosignature,
        Code::BadSignature,
        Code::BadSignatureInput,
        Code::Blocked,
        Code::BodyTooSlow,
        Code::ClockSkew,
        Code::CompanyBlocked,
        Code::Conflict,
        Code::ContentDigest,
        Code::CreatedBeforeStart,
        Code::DirectoryConflict,
        Code::FamilyErased,
        Code::FamilyNotGranted,
        Code::Forbidden,
        Code::GrantConsumed,
        Code::GrantExpired,
        Code::GrantRevoked,
        Code::InDoubt,
        Code::Internal,
        Code::Malformed,
        Code::MalformedAccess,
        Code::MethodNotAllowed,
        Code::MissingSignature,
        Code::NoGrant,
        Code::NotFound,
        Code::NotOwnFamily,
        Code::NotYetValid,
        Code::OutsideLookBack,
        Code::RateLimited,
        Code::Refused,
        Code::Replayed,
        Code::RequestsNotAccepted,
        Code::RotationPending,
        Code::StaleEpoch,
        Code::StaleHead,
        Code::TooLarge,
        Code::TooManyRequests,
        Code::Unavailable,
        Code::UnboundAccess,
        Code::UnknownCustomer,
        Code::UnknownFamily,
        Code::UnknownIdentity,
        Code::UnknownKey,
        Code::WrongCompany,
        Code::WrongHeader,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::AccessNotGranted => "access-not-granted",
            Code::AlreadyRegistered => "already-registered",
            Code::BackupConflict => "backup-conflict",
            Code::BadCosignature => "bad-cosignature",
            Code::BadSignature => "bad-signature",
            Code::BadSignatureInput => "bad-signature-input",
            Code::Blocked => "blocked",
            Code::BodyTooSlow => "body-too-slow",
            Code::ClockSkew => "clock-skew",
            Code::CompanyBlocked => "company-blocked",
            Code::Conflict => "conflict",
            Code::ContentDigest => "content-digest",
            Code::CreatedBeforeStart => "created-before-start",
            Code::DirectoryConflict => "directory-conflict",
            Code::FamilyErased => "family-erased",
            Code::FamilyNotGranted => "family-not-granted",
            Code::Forbidden => "forbidden",
            Code::GrantConsumed => "grant-consumed",
            Code::GrantExpired => "grant-expired",
            Code::GrantRevoked => "grant-revoked",
            Code::InDoubt => "in-doubt",
            Code::Internal => "internal",
            Code::Malformed => "malformed",
            Code::MalformedAccess => "malformed-access",
            Code::MethodNotAllowed => "method-not-allowed",
            Code::MissingSignature => "missing-signature",
            Code::NoGrant => "no-grant",
            Code::NotFound => "not-found",
            Code::NotOwnFamily => "not-own-family",
            Code::NotYetValid => "not-yet-valid",
            Code::OutsideLookBack => "outside-look-back",
            Code::RateLimited => "rate-limited",
            Code::Refused => "refused",
            Code::Replayed => "replayed",
            Code::RequestsNotAccepted => "requests-not-accepted",
            Code::RotationPending => "rotation-pending",
            Code::StaleEpoch => "stale-epoch",
            Code::StaleHead => "stale-head",
            Code::TooLarge => "too-large",
            Code::TooManyRequests => "too-many-requests",
            Code::Unavailable => "unavailable",
            Code::UnboundAccess => "unbound-access",
            Code::UnknownCustomer => "unknown-customer",
            Code::UnknownFamily => "unknown-family",
            Code::UnknownIdentity => "unknown-identity",
            Code::UnknownKey => "unknown-key",
            Code::WrongCompany => "wrong-company",
            Code::WrongHeader => "wrong-header",
        }
    }

    /// The code named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_is_distinct() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-')
            );
        }
        assert_eq!(Code::parse("no-such-code"), None);
    }
}
