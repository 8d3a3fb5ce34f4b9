//! Confidentiality against the operator (PRODUCT.md promise 1), at rest: after a whole flow — profile,
//! transactions, a company's appends, a grant, reads, a revocation and its rotation, a key backup — the
//! server's data folder holds none of the plaintexts, in any file, as raw bytes. What stays visible is the
//! metadata docs/threat-model.md lists.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::Path;

use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::state::{CustomerState, KeyBackup};
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::Role;
use cmr_core::vault::VaultKey;
use common::now;

/// Every file under `dir`, with its bytes.
fn files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_folder_holds_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), "rest.test/log", 8).await;
    let store = server.store.clone();
    let t = now();
    let month = Period::from_unix(t as i64).unwrap();
    let register = |role| server.register(role);

    // The plaintexts: profile fields, transactions, a company's append, a key backup's contents.
    let secrets: [&[u8]; 5] = [
        b"alex.rivera.private@example.org",
        b"+44 7700 900123",
        b"PHARMACY-ST-JUDE prescription 48.20",
        b"OVERDRAFT-FEE-NOTICE 35.00",
        b"preferred-channel: carrier-pigeon-7",
    ];
    let mut bank = Company::new(register(Role::Company).await);
    let mut alex = Customer::new(
        register(Role::Customer).await,
        PseudonymKey::generate(&mut rand::rng()),
    );
    let contact = FamilyName::profile(Scope::ProfileContact).unwrap();
    let prefs = FamilyName::profile(Scope::ProfilePreferences).unwrap();
    let tx = alex.transactions_with(&bank.id());
    alex.declare(&[contact, prefs, tx], t).await.unwrap();
    let (fc, fp, ft) = (
        alex.family_id(&contact),
        alex.family_id(&prefs),
        alex.family_id(&tx),
    );
    alex.write(fc, Period::ORIGIN, &[secrets[0], secrets[1]])
        .await
        .unwrap();
    alex.write(ft, month, &[secrets[2]]).await.unwrap();
    bank.request(
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
    let proof = CompanyProof {
        domain: "bank.invalid".into(),
        name: "Bank".into(),
        identity: bank.id(),
    };
    let approval = Approval {
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        lookback_months: 1,
        families: vec![tx],
        append_family: Some(tx),
    };
    let g = alex
        .approve(&pending[0], &proof, &approval, t)
        .await
        .unwrap();
    bank.sync(alex.id()).await.unwrap();
    let (head, read) = bank.read(g, ft, month, month).await.unwrap();
    assert_eq!(read[0].content, secrets[2]);
    bank.append(g, &head, month, &[secrets[3]]).await.unwrap();
    alex.revoke(g, "moving banks", t).await.unwrap();
    alex.write(fp, Period::ORIGIN, &[secrets[4]]).await.unwrap();
    // The key backup: the whole client state (epoch secrets, grants, pseudonym key), sealed.
    let vault = VaultKey::generate(&mut rand::rng());
    let backup = KeyBackup::seal(
        0,
        "wrap".into(),
        &CustomerState::save(&alex, &vault),
        &vault,
        alex.id(),
    );
    alex.put_backup(&backup, 1).await.unwrap();
    // Everything is written through: flush what sled still buffers.
    store.close();

    let mut all = Vec::new();
    files(dir.path(), &mut all);
    assert!(all.iter().map(|(_, b)| b.len()).sum::<usize>() > 0);
    for (name, bytes) in &all {
        for s in secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s),
                "{name} holds {:?} in plaintext",
                String::from_utf8_lossy(s)
            );
        }
    }
    // And the check itself finds plaintext where there is some: the purpose of a request is metadata
    // the server reads to enforce consent (docs/threat-model.md), and it is there.
    assert!(
        all.iter()
            .any(|(_, b)| b.windows(b"statements".len()).any(|w| w == b"statements")),
        "the scan did not see the store's files"
    );
}
