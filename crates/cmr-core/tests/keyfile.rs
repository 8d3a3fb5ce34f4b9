//! Passphrase-sealed key files: round trip, and each failure gets its own clear error.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::identity::{DeviceKeys, IdentityId, Role};
use cmr_core::keyfile::{self, KdfParams, KeyFileContents, KeyFileError};
use cmr_core::keys::SigningKey;

/// The reader's floor: the cheapest parameters a file may use, so the tests stay quick.
const TEST_PARAMS: KdfParams = KdfParams::MINIMUM;

fn contents() -> KeyFileContents {
    let mut r = rand::rng();
    KeyFileContents {
        role: Role::Customer,
        identity: IdentityId([7; 32]),
        device: DeviceKeys::generate(&mut r),
        identity_key: Some((3, SigningKey::generate(&mut r))),
    }
}

#[test]
fn round_trip() {
    let c = contents();
    let file = keyfile::seal(&mut rand::rng(), &c, "correct horse", TEST_PARAMS).unwrap();
    let opened = keyfile::open(&file, "correct horse").unwrap();
    assert_eq!(opened.role, c.role);
    assert_eq!(opened.identity, c.identity);
    assert_eq!(opened.device.id(), c.device.id());
    assert_eq!(*opened.device.kem.to_bytes(), *c.device.kem.to_bytes());
    let (seq, key) = opened.identity_key.unwrap();
    assert_eq!(seq, 3);
    assert_eq!(*key.seed(), *c.identity_key.unwrap().1.seed());

    let no_identity = KeyFileContents {
        identity_key: None,
        ..contents()
    };
    let file = keyfile::seal(&mut rand::rng(), &no_identity, "pw", TEST_PARAMS).unwrap();
    assert!(keyfile::open(&file, "pw").unwrap().identity_key.is_none());
}

#[test]
fn wrong_passphrase_is_its_own_error() {
    let file = keyfile::seal(&mut rand::rng(), &contents(), "right", TEST_PARAMS).unwrap();
    assert_eq!(
        keyfile::open(&file, "wrong").unwrap_err(),
        KeyFileError::WrongPassphrase
    );
    assert_eq!(
        keyfile::open(&file, "").unwrap_err(),
        KeyFileError::WrongPassphrase
    );
}

#[test]
fn truncated_or_edited_files_are_corrupted() {
    let file = keyfile::seal(&mut rand::rng(), &contents(), "pw", TEST_PARAMS).unwrap();
    for len in [7, 20, file.len() / 2, file.len() - 1] {
        assert_eq!(
            keyfile::open(&file[..len], "pw").unwrap_err(),
            KeyFileError::Corrupted,
            "truncated to {len}"
        );
    }
    let mut longer = file.clone();
    longer.push(0);
    assert_eq!(
        keyfile::open(&longer, "pw").unwrap_err(),
        KeyFileError::Corrupted
    );
    // Every single-bit edit after the version byte is detected as corruption.
    for i in 6..file.len() {
        let mut edited = file.clone();
        edited[i] ^= 0x04;
        assert_eq!(
            keyfile::open(&edited, "pw").unwrap_err(),
            KeyFileError::Corrupted,
            "byte {i}"
        );
    }
}

#[test]
fn a_checksum_recomputed_by_an_editor_still_fails_to_open() {
    use ring::digest::{SHA256, digest};
    let file = keyfile::seal(&mut rand::rng(), &contents(), "pw", TEST_PARAMS).unwrap();
    let body_len = file.len() - 32;
    // Weaken the stored Argon2 memory to the floor... it already is; instead edit the salt and fix up
    // the checksum: the AEAD must refuse (the salt changes the key), never yield other secrets.
    let mut edited = file[..body_len].to_vec();
    edited[30] ^= 1;
    let sum = digest(&SHA256, &edited);
    edited.extend_from_slice(sum.as_ref());
    assert_eq!(
        keyfile::open(&edited, "pw").unwrap_err(),
        KeyFileError::WrongPassphrase
    );
}

#[test]
fn framing_errors() {
    assert_eq!(
        keyfile::open(b"hello world", "pw").unwrap_err(),
        KeyFileError::NotAKeyFile
    );
    assert_eq!(
        keyfile::open(b"", "pw").unwrap_err(),
        KeyFileError::NotAKeyFile
    );
    let mut file = keyfile::seal(&mut rand::rng(), &contents(), "pw", TEST_PARAMS).unwrap();
    file[4] = 9;
    assert_eq!(
        keyfile::open(&file, "pw").unwrap_err(),
        KeyFileError::UnsupportedVersion(9)
    );
}

#[test]
fn unsafe_parameters_are_refused_both_ways() {
    let weak = KdfParams {
        m_kib: 1024,
        t: 1,
        p: 1,
    };
    assert!(matches!(
        keyfile::seal(&mut rand::rng(), &contents(), "pw", weak),
        Err(KeyFileError::UnsafeParameters(_))
    ));
    assert_eq!(
        keyfile::seal(&mut rand::rng(), &contents(), "", TEST_PARAMS).unwrap_err(),
        KeyFileError::EmptyPassphrase
    );
    // A hostile file asking for 4 GiB of memory is refused before any work (checksum fixed up).
    use ring::digest::{SHA256, digest};
    let file = keyfile::seal(&mut rand::rng(), &contents(), "pw", TEST_PARAMS).unwrap();
    let mut edited = file[..file.len() - 32].to_vec();
    edited[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
    let sum = digest(&SHA256, &edited);
    edited.extend_from_slice(sum.as_ref());
    assert!(matches!(
        keyfile::open(&edited, "pw"),
        Err(KeyFileError::UnsafeParameters(KdfParams {
            m_kib: u32::MAX,
            ..
        }))
    ));
}

#[test]
fn secrets_do_not_print() {
    let c = contents();
    let seed = hex::encode(*c.device.signing.seed());
    assert!(!format!("{c:?}").contains(&seed));
}
