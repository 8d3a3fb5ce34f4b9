//! A company backend on the SDK: it asks a customer for access, waits for the approval, reads and
//! verifies the transactions, infers an attribute from them, and appends it to the customer's vault.
//!
//! Against a running server (the customer approves with `cmr customer approve` in another terminal):
//!
//! ```sh
//! cargo run -p cmr-client --example company-backend -- \
//!     --server http://127.0.0.1:8080 --log-vkey "$(cat cmr-log.pub)" --customer <customer id>
//! ```
//!
//! Self-contained, with an embedded server and a scripted customer (what CI runs):
//!
//! ```sh
//! cargo run -p cmr-client --example company-backend -- --embedded
//! ```

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use cmr_client::Connection;
use cmr_client::company::{Company, RequestStatus};
use cmr_client::customer::{Approval, Customer};
use cmr_client::session::Session;
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration};
use cmr_core::family::{Period, PseudonymKey, Scope};
use cmr_core::identity::{IdentityId, Role};
use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, NoteVerifier, TYPE_ED25519};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().any(|a| a == "--embedded") {
        return embedded().await;
    }
    let server = arg("--server").unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let vkey = arg("--log-vkey").ok_or("--log-vkey is required (the server's log verifier key)")?;
    let customer = arg("--customer").ok_or("--customer is required")?;
    let customer = IdentityId::from_hex(&customer).ok_or("--customer is 64 hex digits")?;
    let pinned = NoteVerifier::from_vkey(&vkey)?;
    let (session, _) =
        Session::register(Connection::new(&server)?, Role::Company, pinned, now()).await?;
    let mut company = Company::new(session);
    println!("company {} registered", company.id());
    backend(&mut company, customer, None).await
}

/// The backend's job. `approve` stands in for the customer in the embedded run.
async fn backend(
    company: &mut Company,
    customer: IdentityId,
    approve: Option<&mut Customer>,
) -> Result<(), Box<dyn Error>> {
    let request = company
        .request(
            customer,
            AccessRequest {
                scopes: vec![
                    (Scope::Transactions, Access::Read),
                    (Scope::ProfileInferred, Access::ReadAppend),
                ],
                purpose: "spending insights".into(),
                duration: Duration::Persistent,
                lookback_months: 6,
                counterparty: Counterparty::OnlyRequester,
            },
            now(),
        )
        .await?;
    println!("asked {customer} for access (request {})", request.to_hex());
    if let Some(c) = approve {
        let me = company.id();
        let pending = c.pending().await?;
        let p = pending
            .iter()
            .find(|p| p.statement.id() == request)
            .ok_or("request not seen")?;
        let proof = CompanyProof {
            domain: "example.test".into(),
            name: "Example".into(),
            identity: me,
        };
        let (tx, inferred) = (c.transactions_with(&me), c.inferred_by(&me));
        c.declare(&[inferred], now()).await?;
        let approval = Approval {
            scopes: vec![
                (Scope::Transactions, Access::Read),
                (Scope::ProfileInferred, Access::ReadAppend),
            ],
            lookback_months: 6,
            families: vec![tx, inferred],
            append_family: Some(inferred),
        };
        c.approve(p, &proof, &approval, now()).await?;
    }
    // Wait for the customer's answer: every relationship entry is verified as it arrives.
    let grant = loop {
        company.sync(customer).await?;
        match company.status(&request) {
            RequestStatus::Granted(g) => break g,
            RequestStatus::Denied(reason) => return Err(format!("denied: {reason}").into()),
            RequestStatus::Pending => tokio::time::sleep(StdDuration::from_secs(2)).await,
        }
    };
    println!("granted: {}", grant.to_hex());
    let g = company
        .grants
        .get(&grant)
        .and_then(|h| h.grant())
        .ok_or("grant not held")?
        .clone();
    let month = Period::from_unix(now() as i64).ok_or("clock before 2000")?;
    let tx = g
        .families
        .iter()
        .find(|f| f.scope == Scope::Transactions)
        .ok_or("no transactions family")?;
    let (_, records) = company
        .read(grant, tx.family, g.lookback_start, month)
        .await?;
    println!(
        "read {} transactions: logged first, proven complete, decrypted here",
        records.len()
    );
    // The inference: total spend over the look-back (amounts are the last word of each record).
    let total: f64 = records
        .iter()
        .filter_map(|r| {
            String::from_utf8_lossy(&r.content)
                .split_whitespace()
                .last()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    let attribute = format!(
        "spend over {} months: {total:.2}",
        month.0 - g.lookback_start.0 + 1
    );
    let inferred = g.append_family.ok_or("the grant allows no append")?;
    let (head, _) = company
        .read(grant, inferred, Period::ORIGIN, Period::ORIGIN)
        .await?;
    let acked = company
        .append(grant, &head, Period::ORIGIN, &[attribute.as_bytes()])
        .await?;
    println!("appended {attribute:?} at log index {}", acked.index);
    Ok(())
}

async fn embedded() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let key = || {
        NoteSigner::new(
            "localhost/example",
            TYPE_ED25519,
            SigningKey::from_seed(&[5; 32]),
        )
    };
    let store = Arc::new(cmr_store::Store::open(cmr_store::StoreConfig::new(
        dir.path(),
        key()?,
    ))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = cmr_server::Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Default::default()
    };
    let state = Arc::new(cmr_server::AppState::new(store, config));
    tokio::spawn(cmr_server::serve(listener, state, std::future::pending()));
    let conn = Connection::new(&format!("http://{addr}"))?;
    let pinned = key()?.verifier();
    let (cs, _) = Session::register(conn.clone(), Role::Customer, pinned.clone(), now()).await?;
    let mut alex = Customer::new(cs, PseudonymKey::generate(&mut rand::rng()));
    let (bs, _) = Session::register(conn, Role::Company, pinned, now()).await?;
    let mut company = Company::new(bs);
    let tx = alex.transactions_with(&company.id());
    alex.declare(&[tx], now()).await?;
    let month = Period::from_unix(now() as i64).ok_or("clock before 2000")?;
    alex.write(
        alex.family_id(&tx),
        month,
        &[b"coffee 3.20", b"groceries 41.75"],
    )
    .await?;
    println!(
        "embedded server on {addr}; customer {} with 2 transactions",
        alex.id()
    );
    let customer = alex.id();
    backend(&mut company, customer, Some(&mut alex)).await?;
    let seen = alex
        .read(
            alex.family_id(&alex.inferred_by(&company.id())),
            Period::ORIGIN,
            Period::ORIGIN,
        )
        .await?;
    println!(
        "the customer sees: {:?}",
        seen.iter()
            .map(|r| String::from_utf8_lossy(&r.content).into_owned())
            .collect::<Vec<_>>()
    );
    Ok(())
}
