//! `cmr company`: a company's access from the command line.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use cmr_client::company::{Company, RequestStatus};
use cmr_client::state::CompanyState;
use cmr_client::wellknown::KeyDocument;
use cmr_core::consent::{AccessRequest, Counterparty, StatementId};
use cmr_core::family::{Period, Scope};
use cmr_core::identity::{IdentityId, Role};
use serde_json::json;

use crate::customer::{access_name, parse_month, parse_scope_access, this_month};
use crate::error::{CliError, CliResult};
use crate::home::{self, Home, Saved};
use crate::out::{Out, now, short};

/// The company's commands.
#[derive(Subcommand)]
pub enum CompanyCmd {
    /// Create the company's identity and first device, sealed with a passphrase.
    #[command(
        after_help = "Example:\n  cmr company init --server http://127.0.0.1:8080 --log-vkey \"$(cat cmr-log.pub)\""
    )]
    Init {
        #[command(flatten)]
        at: home::ServerArgs,
    },
    /// Register the identity and the device with the server.
    #[command(after_help = "Example:\n  cmr company register")]
    Register,
    /// Print this company's identity; needs no passphrase.
    #[command(after_help = "Example:\n  cmr company id")]
    Id,
    /// Print the key document to serve at https://YOUR-DOMAIN/.well-known/cmr-vault.
    #[command(
        after_help = "Example:\n  cmr company key-document --name \"Acme Bank\" > cmr-vault   # serve at https://DOMAIN/.well-known/cmr-vault"
    )]
    KeyDocument {
        /// The name customers see.
        #[arg(long)]
        name: String,
    },
    /// Ask a customer for access.
    #[command(
        after_help = "Example:\n  cmr company request 5e07… --scope transactions:read --purpose \"credit limit review\" --lookback 12"
    )]
    Request {
        /// The customer's identity.
        customer: String,
        /// SCOPE:ACCESS, repeatable. Scopes: profile.identity, profile.contact, profile.address,
        /// profile.preferences, profile.inferred, transactions. Access: read, append or read+append
        /// (appending only to one of transactions and profile.inferred).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Why, in words the customer reads.
        #[arg(long)]
        purpose: String,
        /// once, persistent, or a number of days.
        #[arg(long, default_value = "persistent")]
        duration: String,
        /// How many months of history.
        #[arg(long, default_value_t = 12)]
        lookback: u32,
    },
    /// What became of the requests sent (granted, denied, pending), and the grants held.
    #[command(after_help = "Example:\n  cmr company status")]
    Status,
    /// Accept the vault's log after the operator restored it from a backup (the client refuses a
    /// shorter log than it saw until then): what happened after the backup is gone.
    #[command(after_help = "Example:\n  cmr company accept-restore")]
    AcceptRestore,
    /// Read a customer's records under a grant; decrypted here, never on the server.
    #[command(after_help = "Example:\n  cmr company read 8c1d… --from 2026-09 --to 2026-11")]
    Read {
        /// The grant's id.
        grant: String,
        /// The scope to read.
        #[arg(long, default_value = "transactions")]
        scope: String,
        /// From this month (default: the grant's look-back start).
        #[arg(long)]
        from: Option<String>,
        /// To this month (default: this month).
        #[arg(long)]
        to: Option<String>,
    },
    /// Append a transaction or an inferred attribute under a grant that allows appends.
    #[command(after_help = "Example:\n  cmr company append 8c1d… \"segment: frequent traveller\"")]
    Append {
        /// The grant's id.
        grant: String,
        /// The month, for transactions (default: this month).
        #[arg(long)]
        month: Option<String>,
        /// The record, in words.
        text: String,
    },
}

struct Loaded {
    company: Company,
    saved: Saved<CompanyState>,
}

impl Loaded {
    fn open(home: &Home) -> CliResult<Self> {
        let (session, saved) = home::open_session::<CompanyState>(home, Role::Company)?;
        let company = saved.role.restore(session)?;
        Ok(Self { company, saved })
    }

    fn save(mut self, home: &Home) -> CliResult {
        self.saved.role = CompanyState::save(&self.company);
        self.saved.session = self.saved.role.session.clone();
        home.write_state(Role::Company, &self.saved)
    }
}

/// Runs a company command.
pub async fn run(home: &Home, out: Out, cmd: CompanyCmd) -> CliResult {
    if let CompanyCmd::Init { at } = &cmd {
        let (server, log_vkey) = (&at.server, &at.log_vkey);
        home::check_server(server, log_vkey)?;
        home.refuse_existing(Role::Company)?;
        let (keys, inception, _recovery) = cmr_client::session::Session::create(Role::Company);
        let id = keys.identity;
        let passphrase = home::passphrase(
            true,
            &format!("company {}", crate::out::short(&id.to_hex())),
        )?;
        home.write_key(Role::Company, &keys, &passphrase)?;
        let company = Company::new(home::new_session(server, log_vkey, keys)?);
        let role = CompanyState::save(&company);
        home.write_state(
            Role::Company,
            &Saved {
                identity: id.to_hex(),
                server: server.clone(),
                log_vkey: log_vkey.clone(),
                inception: Some(B64.encode(inception.encode())),
                registered: false,
                session: role.session.clone(),
                role,
            },
        )?;
        out.line(format!(
            "company identity {} created; next: cmr company register",
            id.to_hex()
        ));
        out.value(&json!({"identity": id.to_hex()}));
        return Ok(());
    }
    if let CompanyCmd::Id = cmd {
        return crate::customer::print_id(home, out, Role::Company);
    }
    let mut l = Loaded::open(home)?;
    let result = step(&mut l, out, cmd).await;
    l.save(home)?;
    result
}

async fn step(l: &mut Loaded, out: Out, cmd: CompanyCmd) -> CliResult {
    let t = now();
    let c = &mut l.company;
    match cmd {
        CompanyCmd::Init { .. } | CompanyCmd::Id => {
            return Err(CliError::local(
                "this command runs on its own",
                "report this",
            ));
        }
        CompanyCmd::Register => {
            home::register(&mut c.session, &mut l.saved, "company").await?;
            out.line(format!(
                "registered company {} with the server",
                c.id().to_hex()
            ));
            out.value(&json!({"identity": c.id().to_hex(), "registered": true}));
        }
        CompanyCmd::KeyDocument { name } => {
            let doc = KeyDocument {
                identity: c.id().to_hex(),
                name,
            };
            crate::out::print(&serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        CompanyCmd::Request {
            customer,
            scopes,
            purpose,
            duration,
            lookback,
        } => {
            // A customer typed as a prefix of one this company already deals with, or whole.
            let known: Vec<[u8; 32]> = c
                .requests
                .values()
                .chain(c.grants.values().map(|g| &g.customer))
                .map(|id| id.0)
                .collect();
            let customer = IdentityId(crate::out::resolve_id(&customer, "customer", known)?);
            let scopes = scopes
                .iter()
                .map(|s| parse_scope_access(s))
                .collect::<CliResult<Vec<_>>>()?;
            let duration = crate::customer::parse_duration(&duration)?;
            let rid = c
                .request(
                    customer,
                    AccessRequest {
                        scopes,
                        purpose,
                        duration,
                        lookback_months: lookback,
                        counterparty: Counterparty::OnlyRequester,
                    },
                    t,
                )
                .await?;
            out.line(format!(
                "request {} sent to {}; the customer answers with `cmr customer approve`",
                rid.to_hex(),
                customer.to_hex()
            ));
            out.value(&json!({"request": rid.to_hex()}));
        }
        CompanyCmd::AcceptRestore => {
            let size = c.accept_restore().await?;
            out.line(format!(
                "accepted the log restored from a backup at size {size}: what happened after it is \
                 gone; check the grants held (cmr company status)"
            ));
            out.value(&json!({"restored_size": size}));
        }
        CompanyCmd::Status => {
            let mut customers: Vec<IdentityId> = c.requests.values().copied().collect();
            customers.extend(c.grants.values().map(|g| g.customer));
            // Customers who granted access without being asked are found too.
            customers.extend(c.discover().await?);
            customers.sort();
            customers.dedup();
            for cust in customers {
                c.sync(cust).await?;
            }
            let mut rows = Vec::new();
            let mut reqs: Vec<(StatementId, IdentityId)> =
                c.requests.iter().map(|(r, cu)| (*r, *cu)).collect();
            reqs.sort();
            for (rid, cust) in reqs {
                let status = match c.status(&rid) {
                    RequestStatus::Pending => "pending".to_string(),
                    RequestStatus::Granted(g) => format!("granted: grant {}", g.to_hex()),
                    RequestStatus::Denied(r) => format!("denied: {r}"),
                };
                out.line(format!(
                    "request {} to {}: {status}",
                    short(&rid.to_hex()),
                    short(&cust.to_hex())
                ));
                rows.push(
                    json!({"request": rid.to_hex(), "customer": cust.to_hex(), "status": status}),
                );
            }
            let mut grants = Vec::new();
            for g in c.grants.values() {
                let Some(b) = g.grant() else { continue };
                let scopes: Vec<String> = b
                    .scopes
                    .iter()
                    .map(|(s, a)| format!("{}:{}", s.name(), access_name(*a)))
                    .collect();
                let state = g.status(crate::out::now());
                let lasting = crate::customer::lasting(b);
                out.line(format!(
                    "grant {} from {}: {state}, {}, {lasting}, history from {}",
                    short(&g.id.to_hex()),
                    short(&g.customer.to_hex()),
                    scopes.join(","),
                    b.lookback_start
                ));
                grants.push(json!({"grant": g.id.to_hex(), "customer": g.customer.to_hex(), "status": state, "scopes": scopes, "duration": lasting, "expires": b.expires, "lookback_start": b.lookback_start.to_string()}));
            }
            for d in &c.disputes {
                out.line(format!(
                    "dispute from {}: record {} {} (log index {})",
                    short(&d.customer),
                    d.record,
                    if d.rejected { "rejected" } else { "annotated" },
                    d.index
                ));
            }
            out.value(&json!({"requests": rows, "grants": grants, "disputes": c.disputes}));
        }
        CompanyCmd::Read {
            grant,
            scope,
            from,
            to,
        } => {
            let gid = StatementId(crate::out::resolve_id(
                &grant,
                "grant",
                c.grants.keys().map(|g| g.0),
            )?);
            let scope = Scope::from_name(&scope)
                .ok_or_else(|| CliError::local(format!("unknown scope {scope:?}"), "see --help"))?;
            let held = c.grants.get(&gid).ok_or_else(|| {
                CliError::local("no such grant held", "run `cmr company status` first")
            })?;
            let g = held
                .grant()
                .ok_or_else(|| CliError::local("not a grant", "check the id"))?;
            let family = g
                .families
                .iter()
                .find(|f| f.scope == scope)
                .map(|f| f.family)
                .ok_or_else(|| {
                    CliError::local(
                        format!("the grant does not cover {}", scope.name()),
                        "see `cmr company status`",
                    )
                })?;
            let (from, to) = if scope.is_periodic() {
                (
                    from.as_deref()
                        .map(parse_month)
                        .transpose()?
                        .unwrap_or(g.lookback_start),
                    to.as_deref()
                        .map(parse_month)
                        .transpose()?
                        .unwrap_or(this_month()?),
                )
            } else {
                (Period::ORIGIN, Period::ORIGIN)
            };
            let (_, records) = c.read(gid, family, from, to).await?;
            // Profile sections have no months: their records are shown without one.
            let periodic = scope.is_periodic();
            for r in &records {
                let text = String::from_utf8_lossy(&r.content);
                out.line(if periodic {
                    format!("{}  {text}", r.period)
                } else {
                    text.into_owned()
                });
            }
            out.line(format!(
                "{} records; the read was logged, proven complete and decrypted here",
                records.len()
            ));
            out.value(&json!({"records": records.iter().map(|r| json!({"month": periodic.then(|| r.period.to_string()), "text": String::from_utf8_lossy(&r.content), "record": r.id.to_hex(), "author": r.author.to_hex()})).collect::<Vec<_>>()}));
        }
        CompanyCmd::Append { grant, month, text } => {
            let gid = StatementId(crate::out::resolve_id(
                &grant,
                "grant",
                c.grants.keys().map(|g| g.0),
            )?);
            let held = c.grants.get(&gid).ok_or_else(|| {
                CliError::local("no such grant held", "run `cmr company status` first")
            })?;
            let g = held
                .grant()
                .ok_or_else(|| CliError::local("not a grant", "check the id"))?;
            let family = g.append_family.ok_or_else(|| {
                CliError::local(
                    "the grant does not allow appends",
                    "ask for an append scope",
                )
            })?;
            let scope = g
                .families
                .iter()
                .find(|f| f.family == family)
                .map(|f| f.scope)
                .ok_or_else(|| {
                    CliError::local("the append family is not in the grant", "report this")
                })?;
            let period = if scope.is_periodic() {
                month
                    .as_deref()
                    .map(parse_month)
                    .transpose()?
                    .unwrap_or(this_month()?)
            } else {
                Period::ORIGIN
            };
            // The append extends the family's current head, which the server names for an appender.
            let acked = c.append_now(gid, period, &[text.as_bytes()]).await?;
            out.line(format!(
                "appended to {} (log index {}, durable)",
                scope.name(),
                acked.index
            ));
            out.value(&json!({"index": acked.index}));
        }
    }
    Ok(())
}
