//! The read-proof target: what a reader's SDK does with a read answer from an untrusted server. The JSON
//! goes through the client's own parser (`cmr_client::company::parse_read`) and then `verify_read`
//! against the head the reader trusts. Whatever verifies must be the truth: each record one that the
//! family holds, with the same bytes, in order, and all of them for the proven range when no further
//! page is announced.

use std::sync::OnceLock;

use cmr_client::company::parse_read;
use cmr_core::batch::verify_read;
use cmr_core::family::Period;
use cmr_core::hash::Digest;
use cmr_core::identity::DeviceId;
use cmr_core::keys::VerifyingKey;
use cmr_core::record::RecordId;
use serde_json::Value;

use crate::Outcome;
use crate::server::read_world;

struct Truth {
    head: Digest,
    /// Every record of the family, in read order: period, then position.
    records: Vec<(Period, RecordId, Vec<u8>)>,
    devices: Vec<(DeviceId, VerifyingKey)>,
    seeds: Vec<Vec<u8>>,
}

fn truth() -> &'static Truth {
    static T: OnceLock<Truth> = OnceLock::new();
    T.get_or_init(|| {
        // The harness runs its own runtime: build it on a thread of its own.
        let world = std::thread::spawn(read_world)
            .join()
            .expect("the read world builds");
        let page = parse_read(&world.full).expect("an honest answer parses");
        let records = page
            .records
            .iter()
            .map(|r| (r.header().period, r.header().id, r.as_bytes().to_vec()))
            .collect();
        let seeds = [&world.full, &world.paged]
            .map(|v| serde_json::to_vec(v).expect("json"))
            .to_vec();
        Truth {
            head: page.proof.head.digest(),
            records,
            devices: world.devices,
            seeds,
        }
    })
}

/// The honest answers the target starts from (its seed corpus).
pub fn read_proof_seeds() -> Vec<Vec<u8>> {
    truth().seeds.clone()
}

/// A read answer (JSON), as a reader's SDK gets it. Accepted when it verifies against the true head; then
/// it must be the truth.
pub fn read_proof(data: &[u8]) -> Outcome {
    let t = truth();
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Outcome::Rejected;
    };
    let Ok(page) = parse_read(&v) else {
        return Outcome::Rejected;
    };
    let key = |b: &cmr_core::batch::Batch| {
        t.devices
            .iter()
            .find(|(d, _)| *d == b.device)
            .map(|(_, k)| *k)
    };
    let Ok(read) = verify_read(
        &t.head,
        &page.proof,
        &page.records,
        &page.batches,
        key,
        None,
    ) else {
        return Outcome::Rejected;
    };
    let (from, to) = (page.proof.from, page.proof.to);
    let expected: Vec<_> = t
        .records
        .iter()
        .filter(|(p, _, _)| from <= *p && *p <= to)
        .collect();
    assert!(
        read.records.len() <= expected.len(),
        "a verified read holds {} records; the range {from}..{to} has {}",
        read.records.len(),
        expected.len()
    );
    for (got, (_, id, bytes)) in read.records.iter().zip(&expected) {
        assert_eq!(got.header().id, *id, "a verified read has another record");
        assert_eq!(
            got.as_bytes(),
            &bytes[..],
            "a verified record has other bytes"
        );
    }
    if read.next.is_none() {
        assert_eq!(
            read.records.len(),
            expected.len(),
            "a verified read with no next page left records of {from}..{to} out"
        );
    }
    Outcome::Accepted
}
