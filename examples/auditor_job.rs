//! An auditor job: verifies the log incrementally and keeps its state in a file between runs. Each run
//! starts from the saved state (the last verified checkpoint, the identities, the consent states),
//! checks only the new entries, saves again, and exits non-zero on any violation or fork.
//!
//! ```sh
//! cargo run -p cmr-client --example auditor-job -- \
//!     --server http://127.0.0.1:8080 --log-vkey "$(cat cmr-log.pub)" --state auditor.json --key auditor.key
//! ```
//!
//! Self-contained (an embedded server, two runs with writes in between; what CI runs):
//!
//! ```sh
//! cargo run -p cmr-client --example auditor-job -- --embedded
//! ```

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cmr_client::Connection;
use cmr_client::customer::Customer;
use cmr_client::session::{Keys, Session};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::{DeviceKeys, Role};
use cmr_core::keyfile;
use cmr_core::keys::SigningKey;
use cmr_log::auditor::Auditor;
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

/// One run: restore the auditor from `state` (or start), verify what is new, save.
async fn run_once(
    session: &Session,
    pinned: &NoteVerifier,
    state: &Path,
) -> Result<bool, Box<dyn Error>> {
    let mut auditor = match std::fs::read_to_string(state) {
        Ok(saved) => Auditor::restore(pinned.clone(), &saved)?,
        Err(_) => Auditor::new(pinned.clone()),
    };
    let from = auditor.verified().map_or(0, |c| c.size);
    let report = cmr_client::auditor::audit(&mut auditor, session)?;
    let tmp = state.with_extension("tmp");
    std::fs::write(&tmp, auditor.snapshot())?;
    std::fs::rename(&tmp, state)?;
    println!(
        "verified entries {from}..{}: {} violations, {} redacted; state saved to {}",
        report.size,
        report.violations.len(),
        report.redacted.len(),
        state.display()
    );
    for v in &report.violations {
        println!("  VIOLATION: {v:?}");
    }
    Ok(report.is_clean())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().any(|a| a == "--embedded") {
        return embedded().await;
    }
    let server = arg("--server").unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let pinned = NoteVerifier::from_vkey(&arg("--log-vkey").ok_or("--log-vkey is required")?)?;
    let state = arg("--state").unwrap_or_else(|| "auditor.json".into());
    let conn = Connection::new(&server)?;
    // The auditor's identity: created and registered on the first run, then kept in a key file sealed
    // with the passphrase in CMR_PASSPHRASE (mode 0600).
    let key_file = arg("--key").unwrap_or_else(|| "auditor.key".into());
    let passphrase = std::env::var("CMR_PASSPHRASE").map_err(|_| "set CMR_PASSPHRASE")?;
    let session = match std::fs::read(&key_file) {
        Ok(bytes) => {
            let c = keyfile::open(&bytes, &passphrase)?;
            let keys = Keys {
                identity: c.identity,
                role: c.role,
                device: c.device,
                identity_key: c.identity_key,
            };
            Session::new(conn, keys, pinned.clone())
        }
        Err(_) => {
            let (s, _) = Session::register(conn, Role::Auditor, pinned.clone(), now()).await?;
            let copy = |k: &SigningKey| SigningKey::from_seed(&k.seed());
            let contents = keyfile::KeyFileContents {
                role: Role::Auditor,
                identity: s.keys.identity,
                device: DeviceKeys {
                    signing: copy(&s.keys.device.signing),
                    kem: s.keys.device.kem.clone(),
                },
                identity_key: s.keys.identity_key.as_ref().map(|(q, k)| (*q, copy(k))),
            };
            let sealed = keyfile::seal(
                &mut rand::rng(),
                &contents,
                &passphrase,
                keyfile::KdfParams::DEFAULT,
            )?;
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_file)?
                .write_all(&sealed)?;
            println!(
                "auditor {} registered; its key is in {key_file}; the operator admits it with \
                 `cmr operator admit-auditor {}`",
                s.keys.identity, s.keys.identity
            );
            s
        }
    };
    if !run_once(&session, &pinned, Path::new(&state)).await? {
        std::process::exit(3);
    }
    Ok(())
}

async fn embedded() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let key = || {
        NoteSigner::new(
            "localhost/example",
            TYPE_ED25519,
            SigningKey::from_seed(&[6; 32]),
        )
    };
    let store = Arc::new(cmr_store::Store::open(cmr_store::StoreConfig::new(
        dir.path().join("data"),
        key()?,
    ))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = cmr_server::Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Default::default()
    };
    tokio::spawn(cmr_server::serve(
        listener,
        Arc::new(cmr_server::AppState::new(store, config)),
        std::future::pending(),
    ));
    let conn = Connection::new(&format!("http://{addr}"))?;
    let pinned = key()?.verifier();
    let (auditor, _) =
        Session::register(conn.clone(), Role::Auditor, pinned.clone(), now()).await?;
    // The operator admits the auditor with the log key; until then it may read no entry body.
    let admission = cmr_log::admission::Admission {
        auditor: auditor.keys.identity,
        admit: true,
        time: now(),
    };
    cmr_client::auditor::submit_admission(&conn, &admission.sign(&key()?)).await?;
    let (cs, _) = Session::register(conn, Role::Customer, pinned.clone(), now()).await?;
    let mut alex = Customer::new(cs, PseudonymKey::generate(&mut rand::rng()));
    let contact = FamilyName::profile(Scope::ProfileContact).ok_or("no contact family")?;
    alex.declare(&[contact], now()).await?;
    let state = dir.path().join("auditor.json");
    run_once(&auditor, &pinned, &state).await?;
    alex.write(
        alex.family_id(&contact),
        Period::ORIGIN,
        &[b"email: alex@example.org"],
    )
    .await?;
    println!("the customer wrote one more record; the next run checks only what is new:");
    if !run_once(&auditor, &pinned, &state).await? {
        std::process::exit(3);
    }
    Ok(())
}
