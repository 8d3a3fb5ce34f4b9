//! Property tests over every byte format: encodings round-trip, and decoding arbitrary or mutated input
//! never panics.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::httpsig;
use cmr_core::identity::{
    DeviceCertificate, DeviceKeys, DeviceRevocation, RecoverySecret, Role, Signed, SignedKeyEvent,
    create_identity, revoke_device,
};
use cmr_core::keyfile;
use cmr_core::keys::{SignedEnvelope, SigningKey};
use cmr_core::wrap::WrappedKey;
use proptest::prelude::*;

/// Valid encodings of each signed format, to mutate.
fn samples() -> Vec<Vec<u8>> {
    let mut r = rand::rng();
    let id = create_identity(&mut r, Role::Customer);
    let device = DeviceKeys::generate(&mut r);
    let cert = device.certify(id.inception.identity(), 0, &id.identity_key, 42);
    let rev = revoke_device(
        id.inception.identity(),
        0,
        &id.identity_key,
        device.id(),
        43,
    );
    let request = cmr_core::identity::DeviceRequest::sign(id.inception.identity(), &device);
    vec![id.inception.encode(), cert.encode(), rev.encode(), request]
}

fn decode_all(bytes: &[u8]) {
    let _ = SignedKeyEvent::decode(bytes);
    let _ = Signed::<DeviceCertificate>::decode(bytes);
    let _ = Signed::<DeviceRevocation>::decode(bytes);
    let _ = SignedEnvelope::decode(bytes);
    let _ = WrappedKey::from_slice(bytes);
    let _ = keyfile::open(bytes, "pw");
    let _ = cmr_core::identity::DeviceRequest::open(bytes);
    let vault = cmr_core::vault::VaultKey::generate(&mut rand::rng());
    let customer = cmr_core::identity::IdentityId([1; 32]);
    if let Some(s) = cmr_core::vault::SealedClientSecret::from_slice(bytes) {
        let _ = s.open(&vault, customer, "pseudonym-key");
    }
    let _ = cmr_core::vault::open_local(&vault, customer, "client-state", bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        decode_all(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_encodings(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = samples().swap_remove(which);
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        decode_all(&bytes);
        let n = cut.index(bytes.len());
        decode_all(&bytes[..n]);
    }

    #[test]
    fn header_parsers_never_panic(input in "\\PC{0,200}", sig in "\\PC{0,120}") {
        let _ = httpsig::parse_signatures(&input, &sig);
        let _ = httpsig::verify_content_digest(&input, b"body");
        let _ = RecoverySecret::from_phrase(&input);
    }

    #[test]
    fn envelope_round_trip(body in proptest::collection::vec(any::<u8>(), 0..2000), seed in any::<[u8; 32]>()) {
        let key = SigningKey::from_seed(&seed);
        let env = SignedEnvelope::sign(body, &key);
        let decoded = SignedEnvelope::decode(&env.encode()).unwrap();
        prop_assert_eq!(&decoded, &env);
        prop_assert!(decoded.verify(&key.verifying_key()).is_ok());
    }

    #[test]
    fn recovery_phrase_round_trip(seed in any::<[u8; 32]>()) {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::from_seed(seed);
        let secret = RecoverySecret::generate(&mut rng);
        let back = RecoverySecret::from_phrase(&secret.to_phrase()).unwrap();
        prop_assert_eq!(
            back.identity_key().verifying_key(),
            secret.identity_key().verifying_key()
        );
        prop_assert_eq!(back.kem_key().public_key(), secret.kem_key().public_key());
    }

    #[test]
    fn wrapped_key_round_trip(bytes in any::<[u8; 80]>()) {
        let w = WrappedKey::from_slice(&bytes).unwrap();
        prop_assert_eq!(w.to_bytes(), bytes);
    }

    #[test]
    fn signature_params_round_trip(created in 0i64..=999_999_999_999_999, keyid in "[a-zA-Z0-9_-]{1,40}", nonce in "[a-zA-Z0-9]{1,40}") {
        let p = httpsig::SignatureParams::profile(created, &keyid, &nonce).unwrap();
        let parsed = httpsig::parse_signatures(&format!("cmr={}", p.serialize()), "cmr=:AAAA:").unwrap();
        prop_assert_eq!(&parsed[0].params, &p);
        prop_assert_eq!(parsed[0].params.created().unwrap(), Some(created));
    }
}

#[test]
fn signed_statements_round_trip() {
    let all = samples();
    // The device request (last) is only opened, never re-encoded: its signature is the device's.
    assert!(cmr_core::identity::DeviceRequest::open(&all[3]).is_ok());
    for bytes in all.into_iter().take(3) {
        let ok = SignedKeyEvent::decode(&bytes)
            .map(|e| e.encode())
            .ok()
            .or_else(|| {
                Signed::<DeviceCertificate>::decode(&bytes)
                    .map(|e| e.encode())
                    .ok()
            })
            .or_else(|| {
                Signed::<DeviceRevocation>::decode(&bytes)
                    .map(|e| e.encode())
                    .ok()
            });
        assert_eq!(ok.as_deref(), Some(&bytes[..]));
    }
}
