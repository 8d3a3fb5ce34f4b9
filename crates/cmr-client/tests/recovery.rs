//! Recovery against a real server: the identity is rotated with the phrase first, and the vault restored
//! from the key backup second; the second step can fail and be run again. The old device is revoked, the
//! records open on the new one, and the old phrase rotates nothing any more.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use cmr_client::customer::Customer;
use cmr_client::session::{Keys, Session};
use cmr_client::state::{CustomerState, KeyBackup};
use cmr_core::family::{Period, PseudonymKey};
use cmr_core::identity::{DeviceKeys, RecoverySecret, Role};
use cmr_core::keys::SigningKey;
use cmr_core::vault::VaultKey;
use common::now;

fn copy(keys: &Keys) -> Keys {
    let seed = |k: &SigningKey| SigningKey::from_seed(&k.seed());
    Keys {
        identity: keys.identity,
        role: keys.role,
        device: DeviceKeys {
            signing: seed(&keys.device.signing),
            kem: keys.device.kem.clone(),
        },
        identity_key: keys.identity_key.as_ref().map(|(s, k)| (*s, seed(k))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_rotates_first_restores_second_and_can_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "recovery.test/log", 5).await;
    let conn = server.conn.clone();
    let pinned = server.pinned.clone();
    let t = now();

    // A customer with records, and no key backup yet.
    let (s, phrase) = Session::register(conn.clone(), Role::Customer, pinned.clone(), t)
        .await
        .unwrap();
    let mut alex = Customer::new(s, PseudonymKey::generate(&mut rand::rng()));
    let contact =
        cmr_core::family::FamilyName::profile(cmr_core::family::Scope::ProfileContact).unwrap();
    alex.declare(&[contact], t).await.unwrap();
    let fid = alex.family_id(&contact);
    alex.write(fid, Period::ORIGIN, &[b"email: alex@example.org"])
        .await
        .unwrap();
    let secret = RecoverySecret::from_phrase(&phrase).unwrap();

    // Step one: the identity key rotates to the one the phrase reveals; this device is certified.
    let (session, next) =
        Customer::recover_identity(conn.clone(), pinned.clone(), alex.id(), &secret, t)
            .await
            .unwrap();
    assert_ne!(next.to_phrase().as_str(), phrase.as_str());
    let kept = copy(&session.keys);
    assert_eq!(kept.identity_key.as_ref().unwrap().0, 1);
    // The old phrase rotates nothing any more.
    assert!(
        Customer::recover_identity(conn.clone(), pinned.clone(), alex.id(), &secret, t)
            .await
            .is_err()
    );
    // Step two fails: there is no backup yet. Nothing is lost; it can run again.
    assert!(
        Customer::restore_from_backup(session, &secret, t)
            .await
            .is_err()
    );

    // The old device seals a backup, its vault key wrapped to the recovery key of event 0.
    let vault = VaultKey::generate(&mut rand::rng());
    // (Read with the new device: since step one the old one signs nothing, as shown below.)
    let mut reader = Session::new(conn.clone(), copy(&kept), pinned.clone());
    let events = reader.identity(alex.id()).await.unwrap();
    // The inception is the log's first entry; the key record in force just after it is event 0's.
    let record0 = events.state.keys().at(1).unwrap().clone();
    assert_eq!(record0.seq, 0);
    let wrap = vault.wrap_to_recovery(&mut rand::rng(), alex.id(), &record0);
    use base64::Engine as _;
    let backup = KeyBackup::seal(
        0,
        base64::engine::general_purpose::STANDARD.encode(wrap.to_bytes()),
        &CustomerState::save(&alex, &vault),
        &vault,
        alex.id(),
    );
    // Since step one, devices certified under the old identity key sign nothing (a thief's device would
    // be one): the old device's own request is refused.
    let refused = alex.put_backup(&backup, 1).await.unwrap_err();
    assert_eq!(refused.code(), Some("unknown-key"), "{refused}");
    let refused = alex.history().await.unwrap_err();
    assert_eq!(refused.code(), Some("unknown-key"), "{refused}");
    // The new device, certified under the new key, stores it.
    let mut new_device = Customer::new(
        Session::new(conn.clone(), copy(&kept), pinned.clone()),
        PseudonymKey::generate(&mut rand::rng()),
    );
    new_device.put_backup(&backup, 1).await.unwrap();

    // Step two again, on the kept keys: the vault comes back, the old device is revoked.
    let session = Session::new(conn.clone(), kept, pinned.clone());
    let (mut back, _, version) = Customer::restore_from_backup(session, &secret, now())
        .await
        .unwrap();
    assert_eq!(version, 1);
    let records = back
        .read(fid, Period::ORIGIN, Period::ORIGIN)
        .await
        .unwrap();
    assert_eq!(records[0].content, b"email: alex@example.org");
    let devices = back.devices().await.unwrap();
    assert_eq!(devices.iter().filter(|(_, revoked)| !revoked).count(), 1);
    let old = alex.read(fid, Period::ORIGIN, Period::ORIGIN).await;
    assert_eq!(old.unwrap_err().code(), Some("unknown-key"));
}
