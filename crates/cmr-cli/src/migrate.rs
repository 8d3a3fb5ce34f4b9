//! `cmr migrate`: moves a vault from a sled data folder into PostgreSQL, and proves it is the same
//! vault there (the same log size, root and signed checkpoint, rebuilt and checked by the store on the
//! new engine).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cmr_store::{SledStorage, Store, StoreConfig};
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::out::Out;

/// `cmr migrate`'s arguments.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The data folder to move (sled); no server may be using it.
    #[arg(long, env = "CMR_DATA", default_value = "cmr-data")]
    data: PathBuf,
    /// The empty PostgreSQL database to move it into: `postgres://USER@HOST/DB`.
    #[arg(long)]
    to: String,
    /// The log key that signed the vault's checkpoints.
    #[arg(long, env = "CMR_LOG_KEY", default_value = "cmr-log.key")]
    log_key: PathBuf,
}

/// What a log looks like from its store: size, root and checkpoint.
fn state(store: &Store) -> CliResult<(u64, String, String)> {
    let note = store
        .checkpoint()
        .map_err(|e| CliError::local(e.to_string(), "report this"))?
        .unwrap_or_default();
    let size = cmr_log::checkpoint::open(&note, store.log_verifier(), &[], 0)
        .map(|c| c.checkpoint.size)
        .unwrap_or(0);
    let root = store
        .root(size)
        .map_err(|e| CliError::local(e.to_string(), "report this"))?;
    Ok((size, hex::encode(root), note))
}

fn key(path: &Path, data: &Path) -> CliResult<cmr_log::note::NoteSigner> {
    cmr_server::logkey::load(path, Some(data)).map_err(|e| {
        CliError::local(
            format!("log key {}: {e}", path.display()),
            "give the key the server signs with: --log-key (or CMR_LOG_KEY)",
        )
    })
}

/// Moves the vault and compares the two logs.
pub fn run(out: Out, args: MigrateArgs) -> CliResult {
    if !args.data.join("db").exists() {
        return Err(CliError::local(
            format!("{} holds no vault", args.data.display()),
            "give the data folder `cmr serve` uses: --data (or CMR_DATA)",
        ));
    }
    let local = |what: &str, e: cmr_store::StoreError| {
        CliError::local(
            format!("{what}: {e}"),
            "stop the server that uses the folder; the database must exist and be empty",
        )
    };
    // The source, opened as a store: its format, its replay and its acknowledgement mark are checked
    // before anything is copied.
    let from = Arc::new(
        SledStorage::open_folder(&args.data, cmr_store::DEFAULT_CACHE)
            .map_err(|e| local("the data folder", e))?,
    );
    let source = Store::open_on(
        from.clone(),
        StoreConfig::new(&args.data, key(&args.log_key, &args.data)?),
    )
    .map_err(|e| local("the data folder", e))?;
    let before = state(&source)?;
    source.close();
    drop(source);
    let to = cmr_postgres::PgStorage::connect(&args.to).map_err(|e| local("the database", e))?;
    let bar = indicatif::ProgressBar::new_spinner();
    if out.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let rows = cmr_store::storage::copy(&*from, &to, 8 << 20, |n| {
        bar.set_message(format!("{n} rows copied"));
        bar.tick();
    })
    .map_err(|e| local("copying", e))?;
    bar.finish_and_clear();
    drop(from);
    let moved = Store::open_on(
        Arc::new(to),
        StoreConfig::new("", key(&args.log_key, &args.data)?),
    )
    .map_err(|e| local("the copy in the database", e))?;
    let after = state(&moved)?;
    moved.close();
    if before != after {
        return Err(CliError::local(
            format!(
                "the copy differs: {} entries with root {} in the folder, {} with root {} in the database",
                before.0, before.1, after.0, after.1
            ),
            "drop the database's tables and migrate again; report this",
        ));
    }
    out.line(format!(
        "moved {rows} rows into PostgreSQL: the same log ({} entries, root {}) and the same signed \
         checkpoint",
        after.0, after.1
    ));
    out.line("serve it with: cmr serve --store <the same URL> --log-key <the same key>");
    out.value(&json!({
        "rows": rows,
        "size": after.0,
        "root": after.1,
        "checkpoint": after.2,
    }));
    Ok(())
}
