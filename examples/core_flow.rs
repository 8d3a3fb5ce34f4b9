//! The core flow of CMR Vault in one process, with no server yet: what a customer's and a company's
//! clients do, and what a verifier checks. Run with `cargo run -p cmr-core --example core-flow`.
//!
//! 1. A customer creates an identity (inception, pre-committed recovery key) and a first device.
//! 2. The vault key is drawn and wrapped to the device and to the recovery key.
//! 3. The device's secrets are sealed under a passphrase in a key file, and opened again.
//! 4. A company creates its identity and device, and signs an HTTP request (RFC 9421); the verifier checks
//!    it, and refuses it once changed.
//! 5. The customer loses the device, recovers with the 24-word phrase, rotates, and certifies a new device;
//!    the old device is refused from then on.

use std::error::Error;

use cmr_core::httpsig::{Request, TimeWindow, sign_request, verify_request};
use cmr_core::identity::{
    DeviceKeys, IdentityState, KeyHistory, RecoverySecret, Role, create_identity, rotate_identity,
};
use cmr_core::keyfile::{self, KdfParams, KeyFileContents};
use cmr_core::vault::VaultKey;

fn main() -> Result<(), Box<dyn Error>> {
    let mut rng = rand::rng();
    // Log positions stand in for the sequencer, which arrives with the store.
    let mut position = 0u64;
    let mut next = || {
        position += 1;
        position
    };
    let now = 1_900_000_000i64;

    // 1. Customer identity and first device.
    let customer = create_identity(&mut rng, Role::Customer);
    let id = customer.inception.identity();
    let mut state = IdentityState::new(KeyHistory::incept(&customer.inception, next())?);
    let phone = DeviceKeys::generate(&mut rng);
    let cert = phone.certify(id, 0, &customer.identity_key, now as u64);
    state.certify(&cert, next())?;
    println!("customer {id}");
    println!(
        "  device {} certified by identity key 0",
        phone.id().to_hex()
    );
    println!(
        "  recovery phrase (shown once): {} …",
        first_words(&customer.recovery, 4)
    );

    // 2. Vault key, wrapped to the device and the recovery key.
    let vault = VaultKey::generate(&mut rng);
    let to_phone = vault.wrap_to_device(&mut rng, cert.body());
    let to_recovery = vault.wrap_to_recovery(&mut rng, id, state.keys().current());
    let opened = VaultKey::unwrap_as_device(id, &phone, &to_phone)?;
    assert_eq!(opened.expose_secret(), vault.expose_secret());
    println!("  vault key wrapped to the device and to the recovery key (HPKE, 80 bytes each)");

    // 3. Key file.
    let contents = KeyFileContents {
        role: Role::Customer,
        identity: id,
        device: phone,
        identity_key: Some((0, customer.identity_key)),
    };
    let file = keyfile::seal(&mut rng, &contents, "a long passphrase", KdfParams::DEFAULT)?;
    let reopened = keyfile::open(&file, "a long passphrase")?;
    println!(
        "  key file: {} bytes (Argon2id 64 MiB, t=3); reopened device {}",
        file.len(),
        reopened.device.id().to_hex()
    );
    match keyfile::open(&file, "wrong") {
        Err(e) => println!("  wrong passphrase refused: {e}"),
        Ok(_) => return Err("a wrong passphrase opened the key file".into()),
    }

    // 4. A company signs a request; the verifier checks it.
    let company = create_identity(&mut rng, Role::Company);
    let company_device = DeviceKeys::generate(&mut rng);
    let body = br#"{"families":["profile.contact"],"purpose":"delivery"}"#;
    let keyid = company_device.id().to_hex();
    let req = Request::new("POST", "https", "vault.example", "/v1/requests", vec![]);
    let signed = sign_request(&req, body, &company_device.signing, &keyid, "nonce-1", now)?;
    let headers = vec![
        ("content-digest", signed.content_digest.as_str()),
        ("signature-input", signed.signature_input.as_str()),
        ("signature", signed.signature.as_str()),
    ];
    let received = Request::new(
        "POST",
        "https",
        "vault.example",
        "/v1/requests",
        headers.clone(),
    );
    let key = company_device.signing.verifying_key();
    let window = TimeWindow {
        now,
        horizon: now - 30,
    };
    let ok = verify_request(&received, body, window, |k| (k == keyid).then_some(key))?;
    println!("company {}", company.inception.identity());
    println!(
        "  signed request verified: keyid {}…, nonce {}",
        &ok.keyid[..16],
        ok.nonce
    );
    let altered = Request::new("POST", "https", "vault.example", "/v1/grants", headers);
    match verify_request(&altered, body, window, |_| Some(key)) {
        Err(e) => println!("  same signature on another path refused: {e}"),
        Ok(_) => return Err("an altered request verified".into()),
    }

    // 5. Recovery: rotate with the phrase, certify a new device; the old one stops working.
    let phrase = customer.recovery.to_phrase();
    let recovered = RecoverySecret::from_phrase(&phrase)?;
    let vault_again = VaultKey::unwrap_with_recovery(id, 0, &recovered, &to_recovery)?;
    assert_eq!(vault_again.expose_secret(), vault.expose_secret());
    let rotation = rotate_identity(&mut rng, state.keys(), &recovered);
    state.rotate(&rotation.inception, next())?;
    let laptop = DeviceKeys::generate(&mut rng);
    state.certify(
        &laptop.certify(id, 1, &rotation.identity_key, now as u64),
        next(),
    )?;
    let at = next();
    let old_sig = reopened.device.signing.sign(b"statement");
    let new_sig = laptop.signing.sign(b"statement");
    state.verify_device_signature(&laptop.id(), at, b"statement", &new_sig)?;
    println!(
        "recovery: identity key rotated to sequence {}, vault key reopened from the phrase",
        state.keys().current().seq
    );
    match state.verify_device_signature(&reopened.device.id(), at, b"statement", &old_sig) {
        Err(e) => println!("  old device refused after the rotation: {e}"),
        Ok(_) => return Err("a device certified by the old key was accepted".into()),
    }
    println!("core flow complete");
    Ok(())
}

fn first_words(secret: &RecoverySecret, n: usize) -> String {
    secret
        .to_phrase()
        .split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}
