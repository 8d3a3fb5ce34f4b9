//! # cmr
//!
//! The command line of CMR Vault: `cmr demo` plays the whole story; `cmr serve` runs the vault over sled
//! in a local folder; `cmr customer`, `cmr company` and `cmr audit` are the tools of each user.
//!
//! What it owns: argument parsing, the per-user configuration folder and its key files, prompts, output
//! for people and `--json` for scripts, exit codes. What it does not: every cryptographic and
//! verification step is the SDK's (`cmr-client`), storage and policy are the server's.
#![forbid(unsafe_code)]

mod audit;
mod backup;
mod company;
mod config;
mod customer;
mod demo;
mod error;
mod gateway;
mod home;
mod migrate;
mod operator;
mod out;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc instead of glibc malloc: the server's many small per-request allocations were ~16% of its
/// CPU under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CMR Vault: a customer-managed data vault with end-to-end encryption.
#[derive(Parser)]
#[command(name = "cmr", version, about, long_about = None, after_help = "\
Examples, to start here:
  cmr demo                      the whole story on a temporary server, step by step
  cmr serve                     run a vault over sled in ./cmr-data on 127.0.0.1:8080

Exit codes: 0 ok, 1 refused by the server, 2 usage, 3 verification failed, 4 local problem,
5 server unreachable, 6 demo step broken. See docs/guide.md.")]
struct Cli {
    /// The configuration folder (default: $XDG_CONFIG_HOME/cmr or ~/.config/cmr).
    #[arg(long, global = true, env = "CMR_HOME")]
    home: Option<PathBuf>,
    /// Print JSON for scripts instead of lines for people.
    #[arg(long, global = true)]
    json: bool,
    /// Read the passphrase from this file (its first line), for scripts; a prompt asks otherwise.
    #[arg(long, global = true, env = "CMR_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
    /// Trust only the certificate authorities in this PEM file for an https server (a private or a
    /// pinned CA), instead of the system's roots.
    #[arg(long, global = true, env = "CMR_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Play the whole story on an embedded server in a temporary folder.
    ///
    /// One customer and two companies: registration; the profile, preferences and transactions; a
    /// request approved in narrowed form; a scoped read; an append the customer sees and disputes; a
    /// revocation and the rotation; the refused read; the audit. Exits non-zero if any step does not
    /// behave as promised.
    #[command(after_help = "Example:\n  cmr demo")]
    Demo,
    /// Run the vault server over sled in a local folder (or over PostgreSQL).
    #[command(after_help = "\
Examples:
  cmr serve
  cmr serve --data /var/lib/cmr --listen 127.0.0.1:9000 --log-key /etc/cmr/log.key
  cmr serve --store postgres://cmr@db.internal/cmr --log-key /etc/cmr/log.key")]
    Serve {
        /// The data folder (sled).
        #[arg(long, env = "CMR_DATA", default_value = "cmr-data")]
        data: PathBuf,
        /// Where the state lives instead of --data: `postgres://USER@HOST/DB` (several servers may share
        /// one database, each with its own --authority) or `sled:PATH`.
        #[arg(long, env = "CMR_STORE")]
        store: Option<String>,
        /// The address to listen on.
        #[arg(long, env = "CMR_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// The log signing key file, outside the data folder (created with mode 0600 if missing).
        #[arg(long, env = "CMR_LOG_KEY", default_value = "cmr-log.key")]
        log_key: PathBuf,
        /// The log's origin, for a new log key.
        #[arg(long, env = "CMR_ORIGIN", default_value = "localhost/cmr-vault")]
        origin: String,
        /// A witness's verifier key whose cosignatures the server accepts and serves (repeatable).
        #[arg(long = "witness")]
        witnesses: Vec<String>,
        /// Requests per second one identity may make, sustained (a load test raises it).
        #[arg(long, env = "CMR_RATE", default_value_t = 200.0)]
        rate_per_identity: f64,
        /// Requests one identity may make in a burst.
        #[arg(long, env = "CMR_BURST", default_value_t = 400.0)]
        burst_per_identity: f64,
        /// sled's page cache, in MiB (its own default would be 1 GiB; the OS page cache holds the files).
        #[arg(long, env = "CMR_CACHE_MIB", default_value_t = 16)]
        cache_mib: u64,
        /// Read every stored record back at start and check it against the batch that wrote it (a
        /// plain start reads only the log, and trusts the records written with it).
        #[arg(long)]
        verify_on_open: bool,
        /// The scheme clients sign: `https` behind a reverse proxy that terminates TLS.
        #[arg(long, env = "CMR_SCHEME", default_value = "http", value_parser = ["http", "https"])]
        scheme: String,
        /// The authority (host[:port]) clients sign for, such as `vault.example.com` behind a reverse
        /// proxy; default: the listening address. A request signed for another authority is refused,
        /// whatever its Host header says.
        #[arg(long, env = "CMR_AUTHORITY")]
        authority: Option<String>,
        /// The log's format on standard output: `text` for people, `json` (one object a line) for a
        /// log collector. The level comes from RUST_LOG (default `info`).
        #[arg(long, env = "CMR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. SIGHUP reads
        /// both files again (a renewed certificate) without dropping connections.
        #[arg(long, env = "CMR_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, env = "CMR_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The most connections open at once; past it a new connection is answered 503 and closed.
        /// Default: what the descriptor limit leaves room for (raised to its hard limit at start).
        #[arg(long, env = "CMR_MAX_CONNECTIONS")]
        max_connections: Option<usize>,
    },
    /// A customer's vault: identity, profile, transactions, requests, grants, history.
    #[command(after_help = "\
Example, a first session (the passphrase comes from a prompt, or CMR_PASSPHRASE in scripts):
  cmr customer init --log-vkey \"$(cat cmr-log.pub)\"
  cmr customer register
  cmr customer profile set contact \"email: alex@example.org\"
  cmr customer requests
  cmr customer approve <request> --domain bank.example --lookback 3")]
    Customer {
        #[command(subcommand)]
        cmd: customer::CustomerCmd,
    },
    /// A company's access: requests, grants, reads decrypted locally, appends.
    #[command(after_help = "\
Example, a first session:
  cmr company init --log-vkey \"$(cat cmr-log.pub)\"
  cmr company register
  cmr company key-document --name \"Acme Bank\"   # serve it at https://DOMAIN/.well-known/cmr-vault
  cmr company request <customer> --scope transactions:read --purpose \"credit limit review\"
  cmr company status
  cmr company read <grant>")]
    Company {
        #[command(subcommand)]
        cmd: company::CompanyCmd,
    },
    /// Verify the log without trusting the operator, and without seeing customer data.
    #[command(after_help = "\
Example, a first run (the operator admits the auditor with the log key):
  cmr audit init --log-vkey \"$(cat cmr-log.pub)\"
  cmr audit register
  cmr operator admit-auditor \"$(cmr audit id)\"
  cmr audit verify")]
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Show or change the server and the pinned log key of the identities in the configuration folder.
    #[command(
        after_help = "Examples:\n  cmr config show\n  cmr config set --server http://127.0.0.1:9000"
    )]
    Config {
        #[command(subcommand)]
        cmd: config::ConfigCmd,
    },
    /// Type the passphrase once for the commands that follow: keeps the keys unlocked for a while, like
    /// `ssh-agent` or `bw unlock`, named by the CMR_SESSION it prints.
    #[command(
        after_help = "Examples:\n  eval \"$(cmr unlock)\"                 the next 15 minutes need no passphrase\n  eval \"$(cmr unlock --role company --minutes 60)\""
    )]
    Unlock {
        /// Which identity: customer, company or auditor (default: the first here).
        #[arg(long)]
        role: Option<String>,
        /// For how long, in minutes (at most a day).
        #[arg(long, default_value_t = 15)]
        minutes: u64,
    },
    /// End the unlocked sessions: the passphrase is asked again.
    #[command(after_help = "Example:\n  cmr lock")]
    Lock,
    /// The operator's tools on a running server, with the log key: admit or dismiss auditors.
    #[command(
        after_help = "Example:\n  cmr operator admit-auditor 3f1a… --log-key /etc/cmr/log.key"
    )]
    Operator {
        #[command(subcommand)]
        cmd: operator::OperatorCmd,
    },
    /// The load generator: seeds a vault, runs a mix of signed operations, reports throughput, latency,
    /// errors, server memory and same-run reference figures; optionally the revocation race.
    #[command(after_help = "\
Examples:
  cmr bench                                   its own server in a temporary folder, 64 clients, 10 s
  cmr bench --clients 8 --duration 3 --race-rounds 3 --json
  cmr bench --server http://127.0.0.1:8080 --log-vkey \"$(cat cmr-log.pub)\"")]
    Bench(cmr_bench::BenchArgs),
    /// Move a vault from its sled data folder into an empty PostgreSQL database, and prove it is the
    /// same vault there (log size, root and signed checkpoint).
    #[command(after_help = "\
Example (with the server stopped):
  cmr migrate --data /var/lib/cmr --to postgres://cmr@db.internal/cmr --log-key /etc/cmr/log.key")]
    Migrate(migrate::MigrateArgs),
    /// Take an online backup: a snapshot of the latest durable checkpoint and everything it refers
    /// to, while the server keeps serving.
    #[command(after_help = "\
Examples:
  cmr backup /backups/vault-2026-12-05.cmrsnap --data /var/lib/cmr
  cmr backup vault.cmrsnap --store postgres://cmr@db.internal/cmr --log-key /etc/cmr/log.key")]
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty folder or database, checking it first: the log's root against
    /// the signed checkpoint, every entry through the rules, every record against its batch.
    #[command(after_help = "\
Example (then serve the folder as usual):
  cmr restore /backups/vault-2026-12-05.cmrsnap --data /var/lib/cmr-restored --log-key /etc/cmr/log.key")]
    Restore(backup::RestoreArgs),
    /// Print the server's OpenAPI 3.1 document (the one `cmr serve` serves at /v1/openapi.json), for
    /// client generators and API checkers.
    #[command(after_help = "Example:\n  cmr openapi > openapi.json")]
    Openapi,
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  cmr completions bash > ~/.local/share/bash-completion/completions/cmr"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    // `--json` anywhere asks for errors as JSON too, even a usage mistake clap finds before parsing ends.
    let json = std::env::args().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let message = e.kind().to_string();
            let detail = e.to_string();
            let detail = detail
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or(&message)
                .trim_start_matches("error: ");
            report_json(&error::CliError::usage(detail, "see `cmr --help`"));
            return ExitCode::from(error::code::USAGE);
        }
        Err(e) => e.exit(),
    };
    if let Some(ca) = &cli.ca_file {
        home::trust_only(ca.clone());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(error::code::LOCAL);
        }
    };
    let out = out::Out { json: cli.json };
    if let Some(path) = cli.passphrase_file.clone() {
        let _ = home::PASSPHRASE_FILE.set(path);
    }
    let home = cli.home.clone();
    let result = runtime.block_on(async {
        let home = || home::Home::locate(home.clone());
        match cli.command {
            Command::Customer { cmd } => customer::run(&home()?, out, cmd).await,
            Command::Company { cmd } => company::run(&home()?, out, cmd).await,
            Command::Config { cmd } => config::run(&home()?, out, cmd),
            Command::Unlock { role, minutes } => {
                config::unlock(&home()?, out, role.as_deref(), minutes)
            }
            Command::Lock => config::lock(&home()?, out),
            Command::Audit { cmd } => audit::run(&home()?, out, cmd).await,
            Command::Operator { cmd } => operator::run(out, cmd).await,
            Command::Demo => demo::run().await,
            Command::Bench(args) => cmr_bench::run(cmr_bench::Out { json: out.json }, args)
                .await
                .map_err(error::from_bench),
            Command::Migrate(args) => migrate::run(out, args),
            Command::Backup(args) => backup::backup(out, args),
            Command::Restore(args) => backup::restore(out, args),
            Command::Serve {
                data,
                store,
                listen,
                log_key,
                origin,
                witnesses,
                scheme,
                rate_per_identity,
                burst_per_identity,
                cache_mib,
                verify_on_open,
                authority,
                log_format,
                tls_cert,
                tls_key,
                max_connections,
            } => {
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into());
                if log_format == "json" {
                    tracing_subscriber::fmt()
                        .json()
                        .with_env_filter(filter)
                        .init();
                } else {
                    tracing_subscriber::fmt()
                        // Colour codes only for a terminal: a log file or a journal gets plain text.
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                        .with_env_filter(filter)
                        .init();
                }
                let opts = serve::Options {
                    listen,
                    origin,
                    scheme,
                    witnesses,
                    rate: (rate_per_identity, burst_per_identity),
                    opening: serve::Opening {
                        cache_mib,
                        verify: verify_on_open,
                    },
                    authority,
                    tls: tls_cert.zip(tls_key),
                    max_connections,
                };
                let at = serve::Location::parse(store.as_deref(), &data)?;
                serve::run(&at, &log_key, &opts).await
            }
            Command::Openapi => {
                // A generated document of plain strings and maps always serializes.
                let doc = serde_json::to_string_pretty(cmr_server::routes::openapi::document())
                    .unwrap_or_default();
                out::print(&doc);
                Ok(())
            }
            Command::Completions { shell } => {
                // Into a buffer, then out as one write that ends quietly if the reader went away.
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "cmr", &mut script);
                out::print(String::from_utf8_lossy(&script).trim_end());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                report_json(&e);
            } else {
                eprintln!("{e}");
            }
            ExitCode::from(e.code)
        }
    }
}

/// An error as one JSON object on standard error: `{"error", "hint", "exit_code"}`.
fn report_json(e: &error::CliError) {
    eprintln!(
        "{}",
        serde_json::json!({"error": e.message, "hint": e.hint, "exit_code": e.code})
    );
}
