//! The main job: CMR Vault's core flow on the embedded default, sled in a local folder.
//!
//! Run: `cargo run -p cmr-store --example vault-on-sled` (data in `./cmr-data`, or the folder given as the
//! first argument). Each run adds a new customer and company to the same store:
//!
//! 1. register a customer and a company with their devices; the customer publishes a key directory;
//! 2. the company asks for its transactions; the customer grants them, sealing the keys to it;
//! 3. the customer writes records in a signed batch; every write is durable before it is acknowledged;
//! 4. the company reads them under the grant: the access is logged first, the read is proven complete, and
//!    the company decrypts with the keys from its grant;
//! 5. the customer revokes; the next read is refused;
//! 6. an auditor checks the whole log without reading any customer content.

use std::error::Error;

use cmr_core::batch::{Batch, Head, SignedBatch, verify_read};
use cmr_core::consent::{
    Access, AccessRequest, Body, Counterparty, Duration, Grant, GrantFamily, Initiator, Revocation,
    SignedStatement, Statement,
};
use cmr_core::decision::AccessKind;
use cmr_core::directory::{Directory, DirectoryDevice, DirectoryFamily};
use cmr_core::epoch::{BundleEntry, Chain, EpochSecret, KeyBundle};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::httpsig::{self, Request};
use cmr_core::identity::{DeviceKeys, Role, create_identity};
use cmr_core::keys::{KemSecretKey, SigningKey};
use cmr_core::record::{FamilyKeys, RecordId, RecordSealer};
use cmr_log::auditor::Auditor;
use cmr_log::entry::{AccessRecord, AccessedFamily};
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use cmr_store::{Op, Store, StoreConfig};

fn main() -> Result<(), Box<dyn Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "cmr-data".into());
    // The log key belongs outside the data folder; the CLI issue adds its key file. Fixed here.
    let log_key = NoteSigner::new(
        "localhost/cmr-vault",
        TYPE_ED25519,
        SigningKey::from_seed(&[7; 32]),
    )?;
    let store = Store::open(StoreConfig::new(&path, log_key))?;
    let mut rng = rand::rng();
    let now = store.start_time();
    println!("store at {path}/ opened; server time {now}");

    // 1. Identities, devices, directory.
    let c = create_identity(&mut rng, Role::Customer);
    let customer = c.inception.identity();
    let phone = DeviceKeys::generate(&mut rng);
    let a = create_identity(&mut rng, Role::Company);
    let acme = a.inception.identity();
    let acme_device = DeviceKeys::generate(&mut rng);
    let acme_kem = KemSecretKey::generate(&mut rng);
    store.execute(Op::Register(c.inception))?;
    store.execute(Op::Certify(phone.certify(
        customer,
        0,
        &c.identity_key,
        now,
    )))?;
    store.execute(Op::Register(a.inception))?;
    store.execute(Op::Certify(acme_device.certify(
        acme,
        0,
        &a.identity_key,
        now,
    )))?;
    let pseudonyms = PseudonymKey::generate(&mut rng);
    let tx = FamilyName::Transactions(pseudonyms.counterparty(&acme)).id(&customer);
    let dir = Directory {
        customer,
        version: 1,
        prev: Digest([0; 32]),
        signer: phone.id(),
        issued_at: now,
        devices: vec![DirectoryDevice {
            device: phone.id(),
            signing_key: phone.signing.verifying_key(),
            kem_key: phone.kem.public_key(),
        }],
        families: vec![DirectoryFamily {
            family: tx,
            scope: Scope::Transactions,
            epoch: 1,
            appenders: vec![],
        }],
    }
    .sign(&phone.signing);
    store.execute(Op::PublishDirectory(dir))?;
    println!("customer {customer}\ncompany  {acme}");

    // 2. Request and grant.
    let statement = |author, device: &DeviceKeys, body| Statement {
        customer,
        author,
        device: device.id(),
        issued_at: now,
        body,
    };
    let req = AccessRequest {
        scopes: vec![(Scope::Transactions, Access::Read)],
        purpose: "monthly statements".into(),
        duration: Duration::Persistent,
        lookback_months: 12,
        counterparty: Counterparty::OnlyRequester,
    };
    let req = SignedStatement::sign(
        statement(acme, &acme_device, Body::Request(req)),
        None,
        &acme_device.signing,
    )?;
    store.execute(Op::Statement(req.clone()))?;
    let period = Period::from_unix(now as i64).ok_or("clock before 2000")?;
    let secret = EpochSecret::generate(&mut rng);
    let g = Grant {
        grantee: acme,
        request: Some(req.id()),
        purpose: "monthly statements".into(),
        duration: Duration::Persistent,
        not_before: now,
        expires: None,
        lookback_start: Period(period.0 - 12),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::Read)],
        families: vec![GrantFamily {
            family: tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: acme_kem.public_key(),
    };
    let st = statement(customer, &phone, Body::Grant(g.clone()));
    let grant_id = SignedStatement::grant_id(&st);
    let bundle = KeyBundle {
        entries: vec![BundleEntry {
            family: tx,
            epoch: 1,
            key: secret.read_key(g.lookback_start),
        }],
    }
    .seal(&mut rng, customer, acme, &acme_kem.public_key(), grant_id.0);
    let grant = SignedStatement::sign(st, Some(bundle), &phone.signing)?;
    let ack = store.execute(Op::Statement(grant.clone()))?;
    println!(
        "grant {} logged at index {}",
        grant_id.to_hex(),
        ack.index.unwrap_or_default()
    );

    // 3. The customer writes records.
    let sealer = RecordSealer::new(
        customer,
        tx,
        1,
        customer,
        &secret.read_key(Period::ORIGIN),
        period,
    )?;
    let records: Vec<_> = ["coffee 3.20", "groceries 41.75", "refund -5.00"]
        .iter()
        .map(|t| sealer.seal(&mut rng, RecordId::generate(&mut rand::rng()), t.as_bytes()))
        .collect::<Result<_, _>>()?;
    let batch = Batch::for_records(phone.id(), Head::empty(customer, tx).digest(), &records)?;
    let ack = store.execute(Op::WriteBatch {
        batch: SignedBatch::sign(batch, &phone.signing),
        records,
        access: None,
    })?;
    println!(
        "3 records written, durable at index {} (checkpoint size {})",
        ack.index.unwrap_or_default(),
        ack.size
    );

    // 4. The company reads, with a signed request.
    let read = |nonce: &str| -> Result<Op, Box<dyn Error>> {
        let keyid = acme_device.id().to_hex();
        // The request names what it asks for, so the logged access is bound to it.
        let target = cmr_log::entry::access_target(
            &customer,
            &tx,
            AccessKind::Read,
            &grant_id,
            None,
            g.lookback_start,
            period,
        );
        let h = httpsig::sign_request(
            &Request::new("POST", "https", "localhost", &target, vec![]),
            b"{}",
            &acme_device.signing,
            &keyid,
            nonce,
            now as i64,
        )?;
        let parsed = httpsig::parse_signatures(&h.signature_input, &h.signature)?;
        let base = httpsig::signature_base(
            &Request::new(
                "POST",
                "https",
                "localhost",
                &target,
                vec![("content-digest", h.content_digest.as_str())],
            ),
            &parsed[0].params,
        )?;
        let access = AccessRecord {
            grant: grant_id,
            kind: AccessKind::Read,
            epoch: None,
            families: vec![AccessedFamily {
                family: tx,
                from: g.lookback_start,
                to: period,
            }],
            records: vec![],
            keyid,
            signature_base: base,
            signature: parsed[0]
                .signature
                .clone()
                .try_into()
                .map_err(|_| "signature length")?,
            head: None,
        };
        Ok(Op::Read {
            customer,
            family: tx,
            periods: (g.lookback_start, period),
            cursor: None,
            limit: 100,
            access: Some(access),
        })
    };
    let ack = store.execute(read("n1")?)?;
    let result = ack.read.ok_or("no read result")?;
    let customer_key = phone.signing.verifying_key();
    let (records, batches) = (result.sealed_records()?, result.signed_batches()?);
    let verified = verify_read(
        &result.proof.head.digest(),
        &result.proof,
        &records,
        &batches,
        |_| Some(customer_key),
        None,
    )?;
    let keys = KeyBundle::open(
        grant.bundle().ok_or("grant without keys")?,
        customer,
        acme,
        &acme_kem,
        grant_id.0,
    )
    .map_err(|_| "bundle")?;
    let mut family_keys = FamilyKeys::new(customer, tx);
    family_keys.insert(1, keys.key(&tx, 1, Chain::Read).ok_or("no key")?.clone());
    println!(
        "company read (logged at index {}), complete against head {}:",
        ack.index.unwrap_or_default(),
        result.proof.head.digest()
    );
    for r in verified.records {
        println!("  {}", String::from_utf8_lossy(&family_keys.open(r)?));
    }

    // 5. Revocation.
    let rev = SignedStatement::sign(
        statement(
            customer,
            &phone,
            Body::Revocation(Revocation {
                grant: grant_id,
                initiator: Initiator::Customer,
                reason: "closed the account".into(),
            }),
        ),
        None,
        &phone.signing,
    )?;
    store.execute(Op::Statement(rev))?;
    match store.execute(read("n2")?) {
        Err(e) => println!("after the revocation the company is refused: {e}"),
        Ok(_) => return Err("a read was served after the revocation".into()),
    }

    // 6. The auditor.
    let mut auditor = Auditor::new(
        NoteSigner::new(
            "localhost/cmr-vault",
            TYPE_ED25519,
            SigningKey::from_seed(&[7; 32]),
        )?
        .verifier(),
    );
    let report = auditor.run(&mut &store)?;
    println!(
        "auditor: {} entries verified, {} violations; counts {:?}",
        report.size,
        report.violations.len(),
        report.counts
    );
    if !report.is_clean() {
        return Err("the auditor found violations".into());
    }
    Ok(())
}
