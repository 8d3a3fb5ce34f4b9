//! Identities, pre-rotation, devices and the vault key: each attack in PRODUCT.md's "Identities, devices
//! and recovery" must fail.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::identity::{
    DeviceCertificate, DeviceKeys, IdentityError, IdentityState, KeyHistory, Role, Signed,
    SignedKeyEvent, create_identity, revoke_device, rotate_identity,
};
use cmr_core::keys::SigningKey;
use cmr_core::vault::VaultKey;

fn rng() -> rand::rngs::ThreadRng {
    rand::rng()
}

#[test]
fn inception_is_self_signed_and_names_the_id() {
    let new = create_identity(&mut rng(), Role::Customer);
    let bytes = new.inception.encode();
    let parsed = SignedKeyEvent::decode(&bytes).unwrap();
    assert_eq!(parsed, new.inception);
    let history = KeyHistory::incept(&parsed, 1).unwrap();
    assert_eq!(history.id(), new.inception.identity());
    assert_eq!(history.role(), Role::Customer);
    assert_eq!(history.current().seq, 0);
    // Two identities never share an id.
    let other = create_identity(&mut rng(), Role::Customer);
    assert_ne!(other.inception.identity(), history.id());
}

#[test]
fn tampered_inception_is_refused() {
    let new = create_identity(&mut rng(), Role::Company);
    let bytes = new.inception.encode();
    // Flip one byte in every position of the body: decoding or verification must fail.
    for i in 10..bytes.len() - 64 {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        if let Ok(ev) = SignedKeyEvent::decode(&b) {
            assert!(KeyHistory::incept(&ev, 1).is_err(), "byte {i}");
        }
    }
}

#[test]
fn recovery_rotates_and_the_old_key_cannot() {
    let mut r = rng();
    let new = create_identity(&mut r, Role::Customer);
    let mut history = KeyHistory::incept(&new.inception, 1).unwrap();

    // The thief holds the current identity key but not the recovery secret. A rotation they sign with
    // the stolen key to a key of their own does not match the commitment.
    let thief_target = create_identity(&mut r, Role::Customer);
    let forged = rotate_identity(&mut r, &history, &thief_target.recovery);
    assert_eq!(
        history.clone().rotate(&forged.inception, 2),
        Err(IdentityError::NextKeyMismatch)
    );

    // The owner rotates with the recovery phrase, typed back in.
    let phrase = new.recovery.to_phrase();
    assert_eq!(phrase.split_whitespace().count(), 24);
    let recovered = cmr_core::identity::RecoverySecret::from_phrase(&phrase).unwrap();
    let rotation = rotate_identity(&mut r, &history, &recovered);
    history.rotate(&rotation.inception, 2).unwrap();
    assert_eq!(history.current().seq, 1);
    assert_eq!(
        history.current().signing_key,
        recovered.identity_key().verifying_key()
    );

    // Replaying the same rotation fails: it no longer extends the current event.
    assert_eq!(
        history.clone().rotate(&rotation.inception, 3),
        Err(IdentityError::BrokenChain { expected: 2 })
    );
    // And the next rotation needs the new recovery secret, not the old one.
    let stale = rotate_identity(&mut r, &history, &recovered);
    assert_eq!(
        history.clone().rotate(&stale.inception, 3),
        Err(IdentityError::NextKeyMismatch)
    );
    let next = rotate_identity(&mut r, &history, &rotation.recovery);
    history.rotate(&next.inception, 3).unwrap();
}

#[test]
fn forged_rotation_links_are_refused() {
    let mut r = rng();
    let new = create_identity(&mut r, Role::Customer);
    let history = KeyHistory::incept(&new.inception, 1).unwrap();
    let good = rotate_identity(&mut r, &history, &new.recovery);

    // A rotation for another identity.
    let stranger = create_identity(&mut r, Role::Customer);
    let stranger_history = KeyHistory::incept(&stranger.inception, 1).unwrap();
    let foreign = rotate_identity(&mut r, &stranger_history, &stranger.recovery);
    assert_eq!(
        history.clone().rotate(&foreign.inception, 2),
        Err(IdentityError::WrongIdentity)
    );
    // An inception offered as a rotation.
    assert_eq!(
        history.clone().rotate(&stranger.inception, 2),
        Err(IdentityError::BrokenChain { expected: 1 })
    );
    // A rotation offered as an inception.
    assert_eq!(
        KeyHistory::incept(&good.inception, 1).unwrap_err(),
        IdentityError::NotInception
    );
    // A rotation logged at or before the current event.
    assert_eq!(
        history.clone().rotate(&good.inception, 1),
        Err(IdentityError::PositionNotIncreasing(1))
    );
    // Tampering with any byte of a valid rotation breaks it.
    let bytes = good.inception.encode();
    for i in 10..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x80;
        if let Ok(ev) = SignedKeyEvent::decode(&b) {
            assert!(history.clone().rotate(&ev, 2).is_err(), "byte {i}");
        }
    }
}

fn customer_with_device() -> (
    cmr_core::identity::NewIdentity,
    IdentityState,
    DeviceKeys,
    Signed<DeviceCertificate>,
) {
    let mut r = rng();
    let new = create_identity(&mut r, Role::Customer);
    let history = KeyHistory::incept(&new.inception, 10).unwrap();
    let mut state = IdentityState::new(history);
    let device = DeviceKeys::generate(&mut r);
    let cert = device.certify(
        new.inception.identity(),
        0,
        &new.identity_key,
        1_800_000_000,
    );
    let cert = Signed::<DeviceCertificate>::decode(&cert.encode()).unwrap();
    state.certify(&cert, 11).unwrap();
    (new, state, device, cert)
}

#[test]
fn device_signatures_follow_log_positions() {
    let (new, mut state, device, _) = customer_with_device();
    let id = device.id();
    let sig = device.signing.sign(b"statement");
    // Before the certificate was logged, and at its own position, the device is unknown.
    assert_eq!(
        state.verify_device_signature(&id, 11, b"statement", &sig),
        Err(IdentityError::UnknownDevice)
    );
    state
        .verify_device_signature(&id, 12, b"statement", &sig)
        .unwrap();
    assert_eq!(
        state.verify_device_signature(&id, 12, b"statemenT", &sig),
        Err(IdentityError::BadSignature("device statement"))
    );

    // Revoked at 20: still valid for statements logged before, refused from then on.
    let revocation = revoke_device(new.inception.identity(), 0, &new.identity_key, id, 0);
    state.revoke(&revocation, 20).unwrap();
    state
        .verify_device_signature(&id, 19, b"statement", &sig)
        .unwrap();
    state
        .verify_device_signature(&id, 20, b"statement", &sig)
        .unwrap();
    assert_eq!(
        state.verify_device_signature(&id, 21, b"statement", &sig),
        Err(IdentityError::DeviceRevoked(20))
    );
}

#[test]
fn device_not_certified_by_the_identity_is_refused() {
    let (_, mut state, _, _) = customer_with_device();
    let mut r = rng();
    // A certificate signed by some other key (an operator's, say) that claims this identity.
    let rogue_key = SigningKey::generate(&mut r);
    let rogue = DeviceKeys::generate(&mut r);
    let cert = rogue.certify(state.keys().id(), 0, &rogue_key, 0);
    assert_eq!(
        state.certify(&cert, 30),
        Err(IdentityError::BadSignature("device certificate"))
    );
    let sig = rogue.signing.sign(b"x");
    assert_eq!(
        state.verify_device_signature(&rogue.id(), 31, b"x", &sig),
        Err(IdentityError::UnknownDevice)
    );
    // A certificate from another identity's key, naming that identity, does not land here.
    let other = create_identity(&mut r, Role::Customer);
    let cert = rogue.certify(other.inception.identity(), 0, &other.identity_key, 0);
    assert_eq!(state.certify(&cert, 31), Err(IdentityError::WrongIdentity));
}

#[test]
fn rotation_retires_devices_certified_by_the_old_key() {
    let (new, mut state, device, _) = customer_with_device();
    let mut r = rng();
    let id = device.id();
    let rotation = rotate_identity(&mut r, state.keys(), &new.recovery);
    state.rotate(&rotation.inception, 40).unwrap();
    let sig = device.signing.sign(b"m");
    state.verify_device_signature(&id, 40, b"m", &sig).unwrap();
    assert_eq!(
        state.verify_device_signature(&id, 41, b"m", &sig),
        Err(IdentityError::UnknownDevice)
    );
    // A certificate signed with the old (perhaps stolen) key after the rotation is refused.
    let stale = device.certify(state.keys().id(), 0, &new.identity_key, 0);
    assert_eq!(
        state.certify(&stale, 42),
        Err(IdentityError::StaleIdentityKey {
            signed_by: 0,
            current: 1
        })
    );
    // Re-certified by the new key, the device works again.
    let fresh = device.certify(state.keys().id(), 1, &rotation.identity_key, 0);
    state.certify(&fresh, 43).unwrap();
    state.verify_device_signature(&id, 44, b"m", &sig).unwrap();
}

#[test]
fn a_revoked_device_stays_revoked() {
    let (new, mut state, device, cert) = customer_with_device();
    let revocation = revoke_device(
        new.inception.identity(),
        0,
        &new.identity_key,
        device.id(),
        0,
    );
    state.revoke(&revocation, 20).unwrap();
    assert_eq!(
        state.certify(&cert, 21),
        Err(IdentityError::RevokedDeviceRecertified)
    );
    // A revocation signed by a device key (not the identity key) is refused.
    let other = DeviceKeys::generate(&mut rng());
    let cert2 = other.certify(new.inception.identity(), 0, &new.identity_key, 0);
    state.certify(&cert2, 22).unwrap();
    let forged = revoke_device(new.inception.identity(), 0, &device.signing, other.id(), 0);
    assert_eq!(
        state.revoke(&forged, 23),
        Err(IdentityError::BadSignature("device revocation"))
    );
}

#[test]
fn vault_key_opens_for_devices_and_recovery_only() {
    let (new, state, device, cert) = customer_with_device();
    let mut r = rng();
    let customer = state.keys().id();
    let vault = VaultKey::generate(&mut r);
    let to_device = vault.wrap_to_device(&mut r, cert.body());
    let to_recovery = vault.wrap_to_recovery(&mut r, customer, state.keys().current());

    let opened = VaultKey::unwrap_as_device(customer, &device, &to_device).unwrap();
    assert_eq!(opened.expose_secret(), vault.expose_secret());
    let recovery =
        cmr_core::identity::RecoverySecret::from_phrase(&new.recovery.to_phrase()).unwrap();
    let opened = VaultKey::unwrap_with_recovery(customer, 0, &recovery, &to_recovery).unwrap();
    assert_eq!(opened.expose_secret(), vault.expose_secret());

    // Another device, another customer, a swapped wrap or the wrong key event: all refused.
    let other = DeviceKeys::generate(&mut r);
    assert!(VaultKey::unwrap_as_device(customer, &other, &to_device).is_err());
    let stranger = create_identity(&mut r, Role::Customer).inception.identity();
    assert!(VaultKey::unwrap_as_device(stranger, &device, &to_device).is_err());
    assert!(VaultKey::unwrap_as_device(customer, &device, &to_recovery).is_err());
    assert!(VaultKey::unwrap_with_recovery(customer, 1, &recovery, &to_recovery).is_err());
    assert!(format!("{vault:?}").contains("redacted"));
}

#[test]
fn recovery_phrase_errors() {
    let new = create_identity(&mut rng(), Role::Customer);
    let phrase = new.recovery.to_phrase();
    let mut words: Vec<&str> = phrase.split_whitespace().collect();
    // Extra spaces and capitals are tolerated.
    let loose = format!("  {}  ", phrase.to_uppercase().replace(' ', "   "));
    assert!(cmr_core::identity::RecoverySecret::from_phrase(&loose).is_ok());
    // One wrong word breaks the checksum (or is not in the word list).
    words[5] = if words[5] == "abandon" {
        "ability"
    } else {
        "abandon"
    };
    assert!(cmr_core::identity::RecoverySecret::from_phrase(&words.join(" ")).is_err());
    assert!(cmr_core::identity::RecoverySecret::from_phrase("not a phrase").is_err());
    // A word not in the list is named by its place, counted from 1, and never echoed.
    let mut typo = phrase.split_whitespace().collect::<Vec<_>>();
    typo[6] = "zzzzq";
    let e = cmr_core::identity::RecoverySecret::from_phrase(&typo.join(" "))
        .unwrap_err()
        .to_string();
    assert!(e.contains("word 7 of 24") && !e.contains("zzzzq"), "{e}");
    let short = phrase
        .split_whitespace()
        .take(23)
        .collect::<Vec<_>>()
        .join(" ");
    let e = cmr_core::identity::RecoverySecret::from_phrase(&short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("this has 23"), "{e}");
    // Twelve valid words are a BIP-39 phrase but not a CMR recovery phrase.
    let twelve = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about";
    assert!(cmr_core::identity::RecoverySecret::from_phrase(twelve).is_err());
    // Debug output never shows the secret. (Its fixed text may contain a word of the list, "cover" or
    // "act" say, so the check is on the phrase, not on single words.)
    let shown = format!("{:?}", new.recovery);
    assert_eq!(shown, "RecoverySecret([redacted])");
    assert!(!shown.contains(phrase.as_str()));
}

#[test]
fn a_device_request_proves_its_key_and_becomes_a_certificate() {
    use cmr_core::identity::DeviceRequest;
    let mut rng = rand::rng();
    let new = create_identity(&mut rng, Role::Customer);
    let id = new.inception.identity();
    let phone = DeviceKeys::generate(&mut rng);
    let bytes = DeviceRequest::sign(id, &phone);
    let req = DeviceRequest::open(&bytes).unwrap();
    assert_eq!(req.device(), phone.id());
    assert_eq!(req.identity, id);
    // The certificate made from the request verifies like one made with the device's own keys.
    let cert = req.certify(0, &new.identity_key, 1);
    let mut state = IdentityState::new(KeyHistory::incept(&new.inception, 0).unwrap());
    assert_eq!(state.certify(&cert, 1).unwrap(), phone.id());
    // A request whose keys were swapped does not carry the new key's signature.
    let other = DeviceKeys::generate(&mut rng);
    let mut forged = bytes.clone();
    let at = forged
        .windows(32)
        .position(|w| w == phone.kem.public_key().to_bytes())
        .unwrap();
    forged[at..at + 32].copy_from_slice(&other.kem.public_key().to_bytes());
    assert!(DeviceRequest::open(&forged).is_err());
    // Another kind of signed body is not a device request.
    let cert_bytes = cert.encode();
    assert!(DeviceRequest::open(&cert_bytes).is_err());
    assert!(DeviceRequest::open(&bytes[..bytes.len() - 1]).is_err());
}
