//! Ed25519 must be strict everywhere: the speccheck, CCTV and Wycheproof sets, through our own
//! `VerifyingKey::from_bytes` + `verify` (which is `verify_strict` with weak keys refused).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use cmr_core::keys::{Signature, SigningKey, VerifyingKey};

/// Our full verification path: parse the key (refusing weak keys), then verify strictly.
fn accepts(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_slice(key) else {
        return false;
    };
    let Some(sig) = Signature::from_slice(sig) else {
        return false;
    };
    key.verify(msg, &sig).is_ok()
}

#[test]
fn speccheck_cases_only_strictly_valid_accepted() {
    let cases = common::vector("ed25519/speccheck-cases.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for (i, c) in cases.iter().enumerate() {
        let got = accepts(
            &common::hex_field(c, "pub_key"),
            &common::hex_field(c, "message"),
            &common::hex_field(c, "signature"),
        );
        // Cases 4–10 must be rejected by any verifier; a strict verifier also rejects 0–2 and 11.
        let expected = i == 3;
        assert_eq!(got, expected, "speccheck case {i}");
    }
}

#[test]
fn cctv_vectors_strict_acceptance() {
    let cases = common::vector("ed25519/cctv-ed25519vectors.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 914);
    let mut accepted = 0;
    for c in cases {
        let flags: Vec<&str> = c["flags"]
            .as_array()
            .map(|f| f.iter().map(|x| x.as_str().unwrap()).collect())
            .unwrap_or_default();
        // A strict verifier accepts points with a low-order component (low_order_component_R/_A), and
        // refuses every other flag: low-order points, non-canonical encodings, a reduced or large S.
        let expected = flags.iter().all(|f| f.starts_with("low_order_component"));
        let got = accepts(
            &common::hex_field(c, "key"),
            c["msg"].as_str().unwrap().as_bytes(),
            &common::hex_field(c, "sig"),
        );
        assert_eq!(got, expected, "CCTV case {} flags {flags:?}", c["number"]);
        accepted += usize::from(got);
    }
    assert!(accepted > 0, "the set has strictly valid cases");
}

#[test]
fn wycheproof_ed25519() {
    use wycheproof::TestResult;
    use wycheproof::eddsa::{TestName, TestSet};
    let set = TestSet::load(TestName::Ed25519).unwrap();
    let mut n = 0;
    for group in &set.test_groups {
        for t in &group.tests {
            let got = accepts(&group.key.pk, &t.msg, &t.sig);
            match t.result {
                TestResult::Valid => assert!(got, "tc {} {}", t.tc_id, t.comment),
                TestResult::Invalid => assert!(!got, "tc {} {}", t.tc_id, t.comment),
                TestResult::Acceptable => {}
            }
            n += 1;
        }
    }
    assert!(n > 100);
}

#[test]
fn rfc8032_test_1_signs_byte_for_byte() {
    // RFC 8032 §7.1, TEST 1 (empty message), through our SigningKey.
    let seed: [u8; 32] =
        hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap()
            .try_into()
            .unwrap();
    let key = SigningKey::from_seed(&seed);
    assert_eq!(
        hex::encode(key.verifying_key().to_bytes()),
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    assert_eq!(
        hex::encode(key.sign(b"").0),
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    );
}

/// The batch path (`verify_many`) accepts everything the strict path accepts; where it differs, the case
/// has a small-order component that only the key's holder could have put there (see `verify_many`).
#[test]
fn cctv_vectors_through_the_batch_path() {
    use cmr_core::keys::{SignedEnvelope, verify_many};
    let cases = common::vector("ed25519/cctv-ed25519vectors.json");
    // Each case is paired with an honest signature, so that it really goes through the batch equation.
    let honest_key = SigningKey::from_seed(&[3; 32]);
    let honest = SignedEnvelope::sign(b"honest".to_vec(), &honest_key);
    let mut valid = Vec::new();
    for c in cases.as_array().unwrap() {
        let Ok(key) = VerifyingKey::from_slice(&common::hex_field(c, "key")) else {
            continue;
        };
        let env = SignedEnvelope {
            body: c["msg"].as_str().unwrap().as_bytes().to_vec(),
            signature: Signature::from_slice(&common::hex_field(c, "sig")).unwrap(),
        };
        let strict = key.verify(&env.body, &env.signature).is_ok();
        let batch = verify_many(&[(&env, key), (&honest, honest_key.verifying_key())]).is_ok();
        if strict {
            assert!(
                batch,
                "CCTV case {}: strict accepts, batch refuses",
                c["number"]
            );
            valid.push((env, key));
        } else if batch {
            let flags = c["flags"].to_string();
            assert!(
                flags.contains("low_order_component"),
                "CCTV case {}: batch accepts what strict refuses, flags {flags}",
                c["number"]
            );
        }
    }
    let items: Vec<_> = valid.iter().map(|(e, k)| (e, *k)).collect();
    assert!(verify_many(&items).is_ok());
}

#[test]
fn batch_path_names_the_bad_signature() {
    use cmr_core::keys::{SignedEnvelope, verify_many};
    let keys: Vec<SigningKey> = (0..64u8).map(|i| SigningKey::from_seed(&[i; 32])).collect();
    let mut envs: Vec<SignedEnvelope> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| SignedEnvelope::sign(format!("statement {i}").into_bytes(), k))
        .collect();
    let items = |envs: &[SignedEnvelope]| -> Result<(), usize> {
        let v: Vec<_> = envs
            .iter()
            .zip(&keys)
            .map(|(e, k)| (e, k.verifying_key()))
            .collect();
        verify_many(&v)
    };
    assert_eq!(items(&envs), Ok(()));
    envs[37].body.push(b'!');
    assert_eq!(items(&envs), Err(37));
}
