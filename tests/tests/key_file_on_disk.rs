//! A key file written to disk and read back, as the CLI will do it: the bytes survive the round trip, and
//! a torn write (a file cut short on disk) is reported as corrupted, not as a wrong passphrase.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::identity::{DeviceKeys, Role, create_identity};
use cmr_core::keyfile::{self, KdfParams, KeyFileContents, KeyFileError};

#[test]
fn key_file_round_trips_through_the_file_system() {
    let mut rng = rand::rng();
    let id = create_identity(&mut rng, Role::Company);
    let contents = KeyFileContents {
        role: Role::Company,
        identity: id.inception.identity(),
        device: DeviceKeys::generate(&mut rng),
        identity_key: Some((0, id.identity_key)),
    };
    let dir = std::env::temp_dir().join(format!("cmr-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("device.key");
    let sealed = keyfile::seal(&mut rng, &contents, "pass phrase", KdfParams::MINIMUM).unwrap();
    std::fs::write(&path, &sealed).unwrap();

    let read = std::fs::read(&path).unwrap();
    let opened = keyfile::open(&read, "pass phrase").unwrap();
    assert_eq!(opened.identity, contents.identity);
    assert_eq!(opened.device.id(), contents.device.id());

    // A write torn in the middle.
    std::fs::write(&path, &sealed[..sealed.len() - 40]).unwrap();
    let torn = std::fs::read(&path).unwrap();
    assert_eq!(
        keyfile::open(&torn, "pass phrase").unwrap_err(),
        KeyFileError::Corrupted
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
