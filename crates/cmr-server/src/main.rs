//! `cmr-server`: runs the API over the embedded store until Ctrl-C. Configuration comes from the
//! environment (the `cmr serve` command of the CLI issue will add flags):
//! - `CMR_DATA` — the data folder (default `./cmr-data`);
//! - `CMR_LOG_KEY` — the log key file, outside the data folder (default `./cmr-log.key`, created with mode
//!   0600 if missing);
//! - `CMR_ORIGIN` — the log's origin for a new key (default `localhost/cmr-vault`);
//! - `CMR_LISTEN` — the address (default `127.0.0.1:8080`);
//! - `CMR_AUTHORITY`, `CMR_SCHEME` — what clients address (defaults: the listen address, `http`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use cmr_server::{AppState, Config, logkey, serve};
use cmr_store::{Store, StoreConfig};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let data = PathBuf::from(env("CMR_DATA", "cmr-data"));
    let key_path = PathBuf::from(env("CMR_LOG_KEY", "cmr-log.key"));
    let listen = env("CMR_LISTEN", "127.0.0.1:8080");
    let log_key = if key_path.exists() {
        logkey::load(&key_path, &data)?
    } else {
        logkey::create(&key_path, &data, &env("CMR_ORIGIN", "localhost/cmr-vault"))?
    };
    println!("log verifier key: {}", log_key.verifier().to_vkey());
    let store =
        Arc::new(Store::open(StoreConfig::new(&data, log_key)).context("opening the data folder")?);
    let config = Config {
        authority: env("CMR_AUTHORITY", &listen),
        scheme: env("CMR_SCHEME", "http"),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    serve(
        listener,
        Arc::new(AppState::new(store.clone(), config)),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await?;
    // In-flight requests are done; let the sequencer finish what is queued before exiting.
    store.close();
    Ok(())
}
