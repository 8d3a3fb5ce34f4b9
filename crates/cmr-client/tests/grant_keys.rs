//! What a grant's keys open, against a real server: a company granted read after a rotation still reads
//! its look-back from before the rotation, and reads what another company appended, in every epoch
//! (PRODUCT.md: a grant carries the read key of each epoch it may read, and readers of a family open
//! every author's appends). Found by the crash-under-load harness, whose late grantees could open
//! neither.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration};
use cmr_core::family::{Period, PseudonymKey, Scope};
use cmr_core::identity::Role;
use common::now;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_grant_reads_earlier_epochs_and_other_companies_appends() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "grants.test/log", 6).await;
    let t = now();
    let month = Period::from_unix(t as i64).unwrap();
    let register = |role| server.register(role);
    let proof = |co: &Company, name: &str| CompanyProof {
        domain: "grants.invalid".into(),
        name: name.into(),
        identity: co.id(),
    };

    // The bank reads and appends to the customer's transactions with it.
    let mut bank = Company::new(register(Role::Company).await);
    let mut alex = Customer::new(
        register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let tx = alex.transactions_with(&bank.id());
    alex.declare(&[tx], t).await.unwrap();
    let fam = alex.family_id(&tx);
    let req = bank
        .request(
            alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::ReadAppend)],
                purpose: "statements".into(),
                duration: Duration::Persistent,
                lookback_months: 1,
                counterparty: Counterparty::OnlyRequester,
            },
            t,
        )
        .await
        .unwrap();
    let pending = alex.pending().await.unwrap();
    let read_append = Approval {
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        lookback_months: 1,
        families: vec![tx],
        append_family: Some(tx),
    };
    let g = alex
        .approve(&pending[0], &proof(&bank, "bank"), &read_append, t)
        .await
        .unwrap();
    assert_eq!(pending[0].statement.id(), req);
    bank.sync(alex.id()).await.unwrap();

    // Epoch 0: the customer writes, the bank appends.
    alex.write(fam, month, &[b"customer, epoch 0"])
        .await
        .unwrap();
    let (head, _) = bank.read(g, fam, month, month).await.unwrap();
    bank.append(g, &head, month, &[b"bank, epoch 0"])
        .await
        .unwrap();

    // A reader comes and goes; its revocation rotates the family to epoch 1, which the bank keeps.
    let read_only = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 1,
        families: vec![tx],
        append_family: None,
    };
    let mut gone = Company::new(register(Role::Company).await);
    let first = alex
        .grant(
            &proof(&gone, "gone"),
            "once",
            Duration::Persistent,
            &read_only,
            t,
        )
        .await
        .unwrap();
    let (_, rotations) = alex.revoke(first, "done", t).await.unwrap();
    assert_eq!(rotations.len(), 1);
    bank.sync(alex.id()).await.unwrap();
    alex.write(fam, month, &[b"customer, epoch 1"])
        .await
        .unwrap();
    let (head, _) = bank.read(g, fam, month, month).await.unwrap();
    bank.append(g, &head, month, &[b"bank, epoch 1"])
        .await
        .unwrap();
    gone.sync(alex.id()).await.unwrap();

    // A reader granted now opens all four: both epochs, both authors.
    let mut late = Company::new(register(Role::Company).await);
    let lg = alex
        .grant(
            &proof(&late, "late"),
            "late",
            Duration::Persistent,
            &read_only,
            now(),
        )
        .await
        .unwrap();
    late.sync(alex.id()).await.unwrap();
    let (_, records) = late.read(lg, fam, month, month).await.unwrap();
    let mut opened: Vec<&[u8]> = records.iter().map(|r| r.content.as_slice()).collect();
    opened.sort();
    assert_eq!(
        opened,
        [
            &b"bank, epoch 0"[..],
            b"bank, epoch 1",
            b"customer, epoch 0",
            b"customer, epoch 1"
        ]
    );
    assert_eq!(records.iter().filter(|r| r.author == bank.id()).count(), 2);
}

/// A company that appends under an append-only grant (told the head, never the records) and reads under
/// another, read-only one, opens its own appends (before, the read-only grant carried every other
/// author's chain but not the grantee's own, and the read failed as if the server were faulty), before
/// and after a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_grant_opens_what_its_company_appended_under_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "grants.test/log", 6).await;
    let t = now();
    let month = Period::from_unix(t as i64).unwrap();
    let proof = |co: &Company| CompanyProof {
        domain: "grants.invalid".into(),
        name: "bank".into(),
        identity: co.id(),
    };
    let mut bank = Company::new(server.register(Role::Company).await);
    let mut alex = Customer::new(
        server.register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let tx = alex.transactions_with(&bank.id());
    alex.declare(&[tx], t).await.unwrap();
    let fam = alex.family_id(&tx);
    alex.write(fam, month, &[b"customer"]).await.unwrap();
    let append_only = Approval {
        scopes: vec![(Scope::Transactions, Access::Append)],
        lookback_months: 1,
        families: vec![tx],
        append_family: Some(tx),
    };
    let ga = alex
        .grant(
            &proof(&bank),
            "appends",
            Duration::Persistent,
            &append_only,
            t,
        )
        .await
        .unwrap();
    bank.sync(alex.id()).await.unwrap();
    // An append-only grant reads nothing: a read under it is refused, and its append goes to the head
    // the server names for an appender.
    let refused = bank.read(ga, fam, month, month).await.unwrap_err();
    assert_eq!(refused.code(), Some("access-not-granted"), "{refused}");
    bank.append_now(ga, month, &[b"bank"]).await.unwrap();
    let read_only = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 1,
        families: vec![tx],
        append_family: None,
    };
    let gr = alex
        .grant(
            &proof(&bank),
            "reads",
            Duration::Persistent,
            &read_only,
            now(),
        )
        .await
        .unwrap();
    bank.sync(alex.id()).await.unwrap();
    let opened = |records: &[cmr_client::customer::OpenedRecord]| {
        let mut v: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.content).into_owned())
            .collect();
        v.sort();
        v
    };
    let (_, records) = bank.read(gr, fam, month, month).await.unwrap();
    assert_eq!(opened(&records), ["bank", "customer"]);
    // A rotation (another reader revoked) keeps both grants; the bank appends in the new epoch and still
    // reads everything under its read-only grant.
    let other = Company::new(server.register(Role::Company).await);
    let go = alex
        .grant(
            &proof(&other),
            "other",
            Duration::Persistent,
            &read_only,
            now(),
        )
        .await
        .unwrap();
    let (_, rotations) = alex.revoke(go, "done", now()).await.unwrap();
    assert_eq!(rotations.len(), 1);
    bank.sync(alex.id()).await.unwrap();
    bank.append_now(ga, month, &[b"bank, epoch 1"])
        .await
        .unwrap();
    let (_, records) = bank.read(gr, fam, month, month).await.unwrap();
    assert_eq!(opened(&records), ["bank", "bank, epoch 1", "customer"]);
}
