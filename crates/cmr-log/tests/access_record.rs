//! Access records are stored compact when the company's request followed the signing profile (the
//! signature base is rebuilt from a few fields), in full otherwise; both decode to the same record, whose
//! signature still verifies over the rebuilt base.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::consent::StatementId;
use cmr_core::decision::AccessKind;
use cmr_core::family::{FamilyId, Period};
use cmr_core::httpsig::{self, Request, SignatureParams};
use cmr_core::identity::IdentityId;
use cmr_core::keys::SigningKey;
use cmr_core::record::RecordId;
use cmr_log::entry::{AccessRecord, AccessedFamily, access_target};

const COMPACT: u8 = 0x13;
const FULL: u8 = 0x11;

struct Parts {
    customer: IdentityId,
    family: FamilyId,
    grant: StatementId,
    key: SigningKey,
    keyid: String,
}

fn parts() -> Parts {
    let key = SigningKey::from_seed(&[7; 32]);
    Parts {
        customer: IdentityId([1; 32]),
        family: FamilyId([2; 32]),
        grant: StatementId([3; 32]),
        keyid: hex::encode([0xab_u8; 32]),
        key,
    }
}

/// A read of `records` as a company's client signs it (the signing profile).
fn record(p: &Parts, records: usize) -> AccessRecord {
    let (from, to) = (
        Period::from_year_month(2025, 6).unwrap(),
        Period::from_year_month(2026, 11).unwrap(),
    );
    let target = access_target(
        &p.customer,
        &p.family,
        AccessKind::Read,
        &p.grant,
        None,
        from,
        to,
    );
    let digest = httpsig::content_digest(b"{}");
    let req = Request::new(
        "POST",
        "https",
        "vault.example:8443",
        &target,
        vec![("content-digest", digest.as_str())],
    );
    let params = SignatureParams::profile(1_800_000_000, &p.keyid, "n0nce-1").unwrap();
    let base = httpsig::signature_base(&req, &params).unwrap();
    AccessRecord {
        grant: p.grant,
        kind: AccessKind::Read,
        epoch: None,
        families: vec![AccessedFamily {
            family: p.family,
            from,
            to,
        }],
        records: (0..records).map(|i| RecordId([i as u8; 16])).collect(),
        keyid: p.keyid.clone(),
        signature: p.key.sign(base.as_bytes()).0,
        signature_base: base,
        head: None,
    }
}

#[test]
fn a_profile_request_is_stored_compact_and_rebuilt_exactly() {
    let p = parts();
    let rec = record(&p, 10);
    let bytes = rec.encode();
    assert_eq!(bytes[5], COMPACT);
    let back = AccessRecord::decode(&bytes).unwrap();
    assert_eq!(back, rec);
    p.key
        .verifying_key()
        .verify(
            back.signature_base.as_bytes(),
            &cmr_core::keys::Signature(back.signature),
        )
        .unwrap();
    assert_eq!(back.bound_customer(), Some(p.customer));
    back.check_binding(&p.customer).unwrap();
    // The signature base and the hex key id are not stored: the full form is over 500 bytes longer.
    let full = {
        let mut odd = rec.clone();
        odd.signature_base.push(' ');
        odd.encode()
    };
    assert_eq!(full[5], FULL);
    assert!(
        full.len() > bytes.len() + 500,
        "{} and {}",
        full.len(),
        bytes.len()
    );
}

#[test]
fn a_request_signed_otherwise_is_stored_in_full() {
    let p = parts();
    // An extra parameter (a generic RFC 9421 client's `alg`): the base cannot be rebuilt from fields.
    let rec = {
        let mut r = record(&p, 2);
        r.signature_base = r
            .signature_base
            .replace(";nonce=", ";alg=\"ed25519\";nonce=");
        r
    };
    let bytes = rec.encode();
    assert_eq!(bytes[5], FULL);
    assert_eq!(AccessRecord::decode(&bytes).unwrap(), rec);
    // Another key id than the device's hex: in full too.
    let mut odd = record(&p, 2);
    odd.keyid = odd.keyid.to_uppercase();
    assert_eq!(odd.encode()[5], FULL);
    assert_eq!(AccessRecord::decode(&odd.encode()).unwrap(), odd);
}

#[test]
fn a_compact_record_naming_two_families_does_not_decode() {
    let p = parts();
    let rec = record(&p, 1);
    let mut bytes = rec.encode();
    assert_eq!(bytes[5], COMPACT);
    // The family count sits after the grant (32), the kind (1) and the absent epoch (1).
    let at = 6 + 32 + 1 + 1;
    assert_eq!(&bytes[at..at + 4], &1u32.to_be_bytes());
    bytes[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
    let family = bytes[at + 4..at + 4 + 40].to_vec();
    bytes.splice(at + 4..at + 4, family);
    assert!(AccessRecord::decode(&bytes).is_err());
}

#[test]
fn a_read_logs_the_head_it_was_served_against_after_the_signature_in_both_forms() {
    let p = parts();
    let mut rec = record(&p, 3);
    rec.head = Some(cmr_core::hash::Digest([9; 32]));
    let compact = rec.encode();
    assert_eq!(compact[5], COMPACT);
    assert_eq!(AccessRecord::decode(&compact).unwrap(), rec);
    let mut full = rec.clone();
    full.signature_base.push(' ');
    let bytes = full.encode();
    assert_eq!(bytes[5], FULL);
    assert_eq!(AccessRecord::decode(&bytes).unwrap(), full);
    // Without a head nothing follows the signature: a record logged before heads were decodes as it
    // was, and an explicit "no head" marker is refused (one encoding per record).
    let without = record(&p, 3).encode();
    assert_eq!(without.len() + 33, compact.len());
    let mut marked = without.clone();
    marked.push(0);
    assert!(AccessRecord::decode(&marked).is_err());
}

#[test]
fn an_authority_longer_than_the_compact_form_takes_is_stored_in_full() {
    let p = parts();
    let mut rec = record(&p, 1);
    let long = "a".repeat(250) + ":65535";
    rec.signature_base = rec.signature_base.replace("vault.example:8443", &long);
    rec.signature = p.key.sign(rec.signature_base.as_bytes()).0;
    let bytes = rec.encode();
    assert_eq!(bytes[5], FULL);
    assert_eq!(AccessRecord::decode(&bytes).unwrap(), rec);
}
