//! RFC 9421 request signatures: the B.2.6 vector byte for byte, and the CMR profile's attacks.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::httpsig::{
    self, HttpSigError, Request, SignatureParams, TimeWindow, parse_signatures, sign_request,
    signature_base, verify_request,
};
use cmr_core::keys::{SigningKey, VerifyingKey};

/// Parses the vector's raw HTTP/1.1 request into method, target, headers and body.
fn parse_raw(raw: &str) -> (String, String, Vec<(String, String)>, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let mut start = lines.next().unwrap().split(' ');
    let method = start.next().unwrap().to_string();
    let target = start.next().unwrap().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_string(), v.trim().to_string())
        })
        .collect();
    (method, target, headers, body.to_string())
}

#[test]
fn rfc9421_b26_ed25519_reproduced_byte_for_byte() {
    let v = common::vector("rfc9421/rfc9421_b26_ed25519.json");
    let (method, target, headers, body) = parse_raw(v["request"].as_str().unwrap());
    let host = headers.iter().find(|(n, _)| n == "Host").unwrap().1.clone();
    let header_refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (&n[..], &v[..])).collect();
    let request = Request::new(&method, "https", &host, &target, header_refs);

    // Parse the example's Signature-Input and Signature, then rebuild the base.
    let input = v["signature_input"].as_str().unwrap();
    let signature = v["signature"].as_str().unwrap();
    let parsed = parse_signatures(input, signature).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].label, "sig-b26");
    let base = signature_base(&request, &parsed[0].params).unwrap();
    assert_eq!(base, v["signature_base"].as_str().unwrap());

    // Sign it with the example key: Ed25519 is deterministic, so both fields match byte for byte.
    let seed: [u8; 32] = common::hex_field(&v, "private_key_seed_hex")
        .try_into()
        .unwrap();
    let key = SigningKey::from_seed(&seed);
    assert_eq!(
        key.verifying_key().to_bytes().to_vec(),
        common::hex_field(&v, "public_key_hex")
    );
    let (our_input, our_sig) = httpsig::sign(&request, "sig-b26", &parsed[0].params, &key).unwrap();
    assert_eq!(our_input, input);
    assert_eq!(our_sig, signature);
    assert_eq!(parsed[0].signature, common::hex_field(&v, "signature_hex"));
    httpsig::verify(&request, &parsed[0], &key.verifying_key()).unwrap();

    // The example's Content-Digest (sha-512) matches its body.
    let digest = request.header("content-digest").unwrap();
    httpsig::verify_content_digest(&digest, body.as_bytes()).unwrap();
    assert_eq!(
        httpsig::verify_content_digest(&digest, b"{\"hello\": \"world!\"}"),
        Err(HttpSigError::ContentDigestMismatch)
    );
}

const NOW: i64 = 1_900_000_000;

struct Signed {
    key: SigningKey,
    content_digest: String,
    signature_input: String,
    signature: String,
}

fn signed(
    method: &str,
    authority: &str,
    target: &str,
    body: &[u8],
    created: i64,
    nonce: &str,
) -> Signed {
    let key = SigningKey::from_seed(&[5; 32]);
    let req = Request::new(
        method,
        "https",
        authority,
        target,
        vec![("content-type", "application/json")],
    );
    let h = sign_request(&req, body, &key, "device-1", nonce, created).unwrap();
    Signed {
        key,
        content_digest: h.content_digest,
        signature_input: h.signature_input,
        signature: h.signature,
    }
}

/// Verifies a request as the server would see it, possibly changed in transit.
fn check(
    s: &Signed,
    method: &str,
    authority: &str,
    target: &str,
    body: &[u8],
) -> Result<(), HttpSigError> {
    let headers = vec![
        ("content-type", "application/json"),
        ("content-digest", s.content_digest.as_str()),
        ("signature-input", s.signature_input.as_str()),
        ("signature", s.signature.as_str()),
    ];
    let req = Request::new(method, "https", authority, target, headers);
    let key: VerifyingKey = s.key.verifying_key();
    let window = TimeWindow {
        now: NOW,
        horizon: NOW - 1000,
    };
    verify_request(&req, body, window, |id| (id == "device-1").then_some(key)).map(|_| ())
}

#[test]
fn profile_round_trip() {
    let s = signed(
        "POST",
        "vault.example:8443",
        "/v1/records?x=1",
        b"{}",
        NOW,
        "n1",
    );
    check(&s, "POST", "vault.example:8443", "/v1/records?x=1", b"{}").unwrap();
    assert!(s.signature_input.starts_with(
        "cmr=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\");created=1900000000;keyid=\"device-1\";nonce=\"n1\""
    ));
}

#[test]
fn any_change_in_transit_breaks_the_signature() {
    let s = signed(
        "POST",
        "vault.example",
        "/v1/records?x=1",
        b"{\"a\":1}",
        NOW,
        "n1",
    );
    let body = b"{\"a\":1}".as_slice();
    assert_eq!(
        check(&s, "PUT", "vault.example", "/v1/records?x=1", body),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        check(&s, "POST", "vault.example", "/v1/other?x=1", body),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        check(&s, "POST", "vault.example", "/v1/records?x=2", body),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        check(&s, "POST", "vault.example", "/v1/records", body),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        check(&s, "POST", "evil.example", "/v1/records?x=1", body),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        check(&s, "POST", "vault.example", "/v1/records?x=1", b"{\"a\":2}"),
        Err(HttpSigError::ContentDigestMismatch)
    );
    // Case and default port of the authority are normalized, as RFC 9421 §2.2.3 asks.
    check(&s, "POST", "VAULT.example:443", "/v1/records?x=1", body).unwrap();
}

#[test]
fn a_swapped_content_digest_is_caught_by_the_signature() {
    let s = signed("POST", "v", "/p", b"one", NOW, "n");
    let mut forged = Signed {
        key: SigningKey::from_seed(&[5; 32]),
        ..s
    };
    forged.content_digest = httpsig::content_digest(b"two");
    assert_eq!(
        check(&forged, "POST", "v", "/p", b"two"),
        Err(HttpSigError::BadSignature)
    );
}

#[test]
fn created_window_and_horizon() {
    let ok_old = signed("GET", "v", "/p", b"", NOW - 60, "a");
    check(&ok_old, "GET", "v", "/p", b"").unwrap();
    let too_old = signed("GET", "v", "/p", b"", NOW - 61, "a");
    assert_eq!(
        check(&too_old, "GET", "v", "/p", b""),
        Err(HttpSigError::CreatedTooOld { age: 61 })
    );
    let ok_future = signed("GET", "v", "/p", b"", NOW + 5, "a");
    check(&ok_future, "GET", "v", "/p", b"").unwrap();
    let future = signed("GET", "v", "/p", b"", NOW + 6, "a");
    assert_eq!(
        check(&future, "GET", "v", "/p", b""),
        Err(HttpSigError::CreatedInFuture { ahead: 6 })
    );
    let err = check(&future, "GET", "v", "/p", b"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("6 s ahead"), "{err}");

    // After a restart, requests created before the horizon are refused even inside the window.
    let s = signed("GET", "v", "/p", b"", NOW - 10, "a");
    let headers = vec![
        ("content-digest", s.content_digest.as_str()),
        ("signature-input", s.signature_input.as_str()),
        ("signature", s.signature.as_str()),
    ];
    let req = Request::new("GET", "https", "v", "/p", headers);
    let key = s.key.verifying_key();
    let window = TimeWindow {
        now: NOW,
        horizon: NOW - 5,
    };
    assert_eq!(
        verify_request(&req, b"", window, |_| Some(key)),
        Err(HttpSigError::CreatedBeforeHorizon { horizon: NOW - 5 })
    );
}

#[test]
fn wrong_key_or_unknown_keyid() {
    let s = signed("GET", "v", "/p", b"", NOW, "a");
    let headers = vec![
        ("content-digest", s.content_digest.as_str()),
        ("signature-input", s.signature_input.as_str()),
        ("signature", s.signature.as_str()),
    ];
    let req = Request::new("GET", "https", "v", "/p", headers);
    let window = TimeWindow {
        now: NOW,
        horizon: 0,
    };
    let other = SigningKey::from_seed(&[6; 32]).verifying_key();
    assert_eq!(
        verify_request(&req, b"", window, |_| Some(other)),
        Err(HttpSigError::BadSignature)
    );
    assert_eq!(
        verify_request(&req, b"", window, |_| None),
        Err(HttpSigError::UnknownKey)
    );
}

/// Builds a request signed with arbitrary components and parameters, for the profile's refusals.
fn custom(components: &[&str], params: &str) -> Result<(), HttpSigError> {
    let key = SigningKey::from_seed(&[5; 32]);
    let digest = httpsig::content_digest(b"");
    let input = format!(
        "cmr=({});{params}",
        components
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let parsed = parse_signatures(&input, "cmr=:AAAA:").map(|p| p[0].params.clone())?;
    let base_req = Request::new(
        "GET",
        "https",
        "v",
        "/p",
        vec![("content-digest", digest.as_str())],
    );
    let (si, sig) = httpsig::sign(&base_req, "cmr", &parsed, &key)?;
    let headers = vec![
        ("content-digest", digest.as_str()),
        ("signature-input", si.as_str()),
        ("signature", sig.as_str()),
    ];
    let req = Request::new("GET", "https", "v", "/p", headers);
    let vk = key.verifying_key();
    verify_request(
        &req,
        b"",
        TimeWindow {
            now: NOW,
            horizon: 0,
        },
        |_| Some(vk),
    )
    .map(|_| ())
}

#[test]
fn profile_refusals() {
    let all = ["@method", "@authority", "@path", "@query", "content-digest"];
    let good = format!("created={NOW};keyid=\"k\";nonce=\"n\"");
    custom(&all, &good).unwrap();
    custom(&all, &format!("{good};alg=\"ed25519\"")).unwrap();
    for missing in all {
        let fewer: Vec<&str> = all.iter().copied().filter(|c| *c != missing).collect();
        assert_eq!(
            custom(&fewer, &good),
            Err(HttpSigError::MissingComponent(missing.into()))
        );
    }
    assert_eq!(
        custom(&all, "keyid=\"k\";nonce=\"n\""),
        Err(HttpSigError::MissingParameter("created"))
    );
    assert_eq!(
        custom(&all, &format!("created={NOW};keyid=\"k\"")),
        Err(HttpSigError::MissingParameter("nonce"))
    );
    assert_eq!(
        custom(&all, &format!("created={NOW};nonce=\"n\"")),
        Err(HttpSigError::MissingParameter("keyid"))
    );
    assert_eq!(
        custom(&all, &format!("{good};alg=\"rsa-pss-sha512\"")),
        Err(HttpSigError::UnsupportedAlgorithm("rsa-pss-sha512".into()))
    );
    assert_eq!(
        custom(&all, &format!("{good};expires={NOW}")),
        Err(HttpSigError::Expired)
    );
    assert!(matches!(
        custom(&all, "created=\"soon\";keyid=\"k\";nonce=\"n\""),
        Err(HttpSigError::Malformed { .. })
    ));
    let dup = [
        "@method",
        "@method",
        "@authority",
        "@path",
        "@query",
        "content-digest",
    ];
    assert_eq!(
        custom(&dup, &good),
        Err(HttpSigError::DuplicateComponent("@method".into()))
    );
}

#[test]
fn malformed_headers_are_clear_errors() {
    assert!(matches!(
        parse_signatures("cmr=(", "cmr=:AAAA:"),
        Err(HttpSigError::Malformed { .. })
    ));
    assert!(matches!(
        parse_signatures("cmr=(\"@method\")", "other=:AAAA:"),
        Err(HttpSigError::Malformed { .. })
    ));
    assert!(matches!(
        parse_signatures("cmr=1", "cmr=:AAAA:"),
        Err(HttpSigError::Malformed { .. })
    ));
    assert!(matches!(
        parse_signatures("cmr=(\"@method\";req)", "cmr=:AAAA:"),
        Err(HttpSigError::UnsupportedComponent(_))
    ));
    let long = "a".repeat(5000);
    assert!(matches!(
        parse_signatures(&long, "x"),
        Err(HttpSigError::Malformed { .. })
    ));
    assert_eq!(
        httpsig::verify_content_digest("md5=:AAAA:", b""),
        Err(HttpSigError::ContentDigestUnsupported)
    );
    let req = Request::new("GET", "https", "v", "/p", vec![]);
    assert_eq!(
        verify_request(
            &req,
            b"",
            TimeWindow {
                now: NOW,
                horizon: 0
            },
            |_| None
        ),
        Err(HttpSigError::MissingHeader("Signature-Input".into()))
    );
    // A signature that is not 64 bytes never verifies.
    let params = SignatureParams::profile(NOW, "k", "n").unwrap();
    let parsed = httpsig::ParsedSignature {
        label: "cmr".into(),
        params,
        signature: B64.decode("AAAA").unwrap(),
    };
    let key = SigningKey::from_seed(&[1; 32]).verifying_key();
    assert_eq!(
        httpsig::verify(&req, &parsed, &key),
        Err(HttpSigError::BadSignature)
    );
}

/// The signed example in docs/api.md, reproduced byte for byte.
#[test]
fn the_documented_example_is_reproducible() {
    let key = SigningKey::from_seed(&[7; 32]);
    let keyid = cmr_core::identity::DeviceId::of(&key.verifying_key()).to_hex();
    let body = br#"{"from":"2026-01","to":"2026-12"}"#;
    let req = Request::new(
        "POST",
        "https",
        "vault.example",
        "/v1/vaults/abc/families/def/read",
        vec![],
    );
    let h = sign_request(&req, body, &key, &keyid, "docs-1", 1_900_000_000).unwrap();
    let expected =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let lines = [
        format!("Content-Digest: {}", h.content_digest),
        format!("Signature-Input: {}", h.signature_input),
        format!("Signature: {}", h.signature),
    ];
    let missing: Vec<&String> = lines
        .iter()
        .filter(|l| !expected.contains(l.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/api.md lacks:\n{}",
        missing
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
