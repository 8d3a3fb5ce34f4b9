//! Every way a grant ends (used once, expired, revoked) × every way a rotation starts (the customer
//! revokes another grant on the family, revokes a device, or simply writes to the family), against a real
//! server. After each: the rotation is logged, the family takes writes again, the company that keeps its
//! grant reads what was written after the rotation, the ended grant is refused, and both sides name how
//! it ended. Before the fix a used one-time grant was sealed new keys at the next rotation, which the log
//! refused, leaving the family `rotation-pending` for good.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::Duration;
use cmr_core::decision::GrantStatus;
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::{DeviceKeys, DeviceRequest, Role};
use common::now;

#[derive(Debug, Clone, Copy)]
enum End {
    Used,
    Expired,
    Revoked,
}

#[derive(Debug, Clone, Copy)]
enum Start {
    RevokeAnotherGrant,
    RevokeDevice,
    Write,
}

fn proof(co: &Company) -> CompanyProof {
    CompanyProof {
        domain: "endings.invalid".into(),
        name: "a company".into(),
        identity: co.id(),
    }
}

async fn case(server: &common::Server, end: End, start: Start) {
    let what = format!("{end:?} then {start:?}");
    let month = Period::from_unix(now() as i64).unwrap();
    // One bank, whose transactions family three companies read: one whose grant ends, one that keeps
    // its grant, one whose grant the customer may revoke to start a rotation.
    let bank = Company::new(server.register(Role::Company).await);
    let mut alex = Customer::new(
        server.register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let tx = alex.transactions_with(&bank.id());
    let contact = FamilyName::profile(Scope::ProfileContact).unwrap();
    alex.declare(&[tx, contact], now()).await.unwrap();
    let fam = alex.family_id(&tx);
    let read = Approval {
        scopes: vec![(Scope::Transactions, cmr_core::consent::Access::Read)],
        lookback_months: 1,
        families: vec![tx],
        append_family: None,
    };
    alex.write(fam, month, &[b"before"]).await.unwrap();
    let mut ender = Company::new(server.register(Role::Company).await);
    let mut keeper = Company::new(server.register(Role::Company).await);
    let other = Company::new(server.register(Role::Company).await);
    let duration = match end {
        End::Used => Duration::OneTime,
        End::Expired => Duration::TimeBound { seconds: 2 },
        End::Revoked => Duration::Persistent,
    };
    let ending = alex
        .grant(&proof(&ender), "ends", duration, &read, now())
        .await
        .unwrap();
    let kept = alex
        .grant(&proof(&keeper), "keeps", Duration::Persistent, &read, now())
        .await
        .unwrap();
    let revocable = alex
        .grant(
            &proof(&other),
            "revocable",
            Duration::Persistent,
            &read,
            now(),
        )
        .await
        .unwrap();
    ender.sync(alex.id()).await.unwrap();
    keeper.sync(alex.id()).await.unwrap();

    // The grant ends.
    match end {
        End::Used => {
            ender.read(ending, fam, month, month).await.unwrap();
        }
        End::Expired => tokio::time::sleep(std::time::Duration::from_secs(3)).await,
        // Revoked, and the rotation left owed (as when the client stopped right after the revocation).
        End::Revoked => {
            alex.revoke_grant(ending, "done", now()).await.unwrap();
        }
    }
    let expected = match end {
        End::Used => "used",
        End::Expired => "expired",
        End::Revoked => "revoked",
    };
    assert!(
        alex.consent()
            .await
            .unwrap()
            .pending_rotations(now())
            .contains(&fam),
        "{what}: the log owes a rotation of the family"
    );

    // A rotation starts.
    let t = now();
    match start {
        Start::RevokeAnotherGrant => {
            let (_, rotations) = alex.revoke(revocable, "enough", t).await.unwrap();
            assert!(!rotations.is_empty(), "{what}");
        }
        Start::RevokeDevice => {
            let phone = DeviceKeys::generate(&mut rand::rng());
            let request = DeviceRequest::open(&DeviceRequest::sign(alex.id(), &phone)).unwrap();
            alex.add_device(&request, t).await.unwrap();
            let (_, rotations) = alex.revoke_device(phone.id(), t).await.unwrap();
            assert!(!rotations.is_empty(), "{what}");
        }
        Start::Write => {
            alex.write_rotating(fam, month, &[b"owed"], t)
                .await
                .unwrap();
        }
    }

    // Nothing is owed any more, the family takes writes, and the keeper reads what came after.
    let consent = alex.consent().await.unwrap();
    assert!(
        consent.pending_rotations(now()).is_empty(),
        "{what}: {:?}",
        consent.pending_rotations(now())
    );
    alex.write(fam, month, &[b"after"]).await.unwrap();
    keeper.sync(alex.id()).await.unwrap();
    let (_, records) = keeper.read(kept, fam, month, month).await.unwrap();
    assert!(
        records.iter().any(|r| r.content == b"after"),
        "{what}: the keeper reads after the rotation"
    );
    // The ended grant is refused, with the code that says how it ended.
    let code = match end {
        End::Used => "grant-consumed",
        End::Expired => "grant-expired",
        End::Revoked => "grant-revoked",
    };
    let refused = ender.read(ending, fam, month, month).await.err().unwrap();
    assert_eq!(refused.code(), Some(code), "{what}: {refused}");
    // Both sides name how it ended; the kept grant is active.
    let status = consent.grant_status(&ending, now()).unwrap();
    assert_eq!(status.word(), expected, "{what}");
    assert_eq!(
        consent.grant_status(&kept, now()),
        Some(GrantStatus::Active),
        "{what}"
    );
    ender.sync(alex.id()).await.unwrap();
    assert_eq!(ender.grants[&ending].status(now()), expected, "{what}");
    assert_eq!(keeper.grants[&kept].status(now()), "active", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_grant_ends_times_every_way_a_rotation_starts() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "endings.test/log", 8).await;
    for end in [End::Used, End::Expired, End::Revoked] {
        for start in [Start::RevokeAnotherGrant, Start::RevokeDevice, Start::Write] {
            case(&server, end, start).await;
        }
    }
}
