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
use cmr_wire::gateway::{GrantHeld, RecordRead, RequestSent};
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
    /// This company's own reads and appends, as the customers' chains logged them (verified), oldest
    /// first.
    #[command(after_help = "Example:\n  cmr company history --customer 9e78…")]
    History {
        /// Only the accesses to this customer's vault.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Serve this company's access to its backend as plain JSON on loopback (any language, no
    /// cryptography there): grants, requests, verified reads, appends. The keys and every
    /// verification stay in this process; the backend sends the bearer token it wrote.
    #[command(after_help = "\
Example:
  CMR_PASSPHRASE_FILE=/etc/acme/passphrase cmr company gateway --listen 127.0.0.1:7070
  curl -H \"Authorization: Bearer $(cat ~/.config/cmr/gateway.token)\" http://127.0.0.1:7070/v1/grants")]
    Gateway(crate::gateway::GatewayArgs),
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

pub(crate) struct Loaded {
    pub(crate) company: Company,
    saved: Saved<CompanyState>,
}

impl Loaded {
    pub(crate) fn open(home: &Home) -> CliResult<Self> {
        let (session, saved) = home::open_session::<CompanyState>(home, Role::Company)?;
        let company = saved.role.restore(session)?;
        Ok(Self { company, saved })
    }

    pub(crate) fn save(&mut self, home: &Home) -> CliResult {
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
    if let CompanyCmd::Gateway(args) = cmd {
        return crate::gateway::run(home, args).await;
    }
    let _held = home.hold(Role::Company, std::time::Duration::from_secs(10))?;
    let mut l = Loaded::open(home)?;
    let result = step(&mut l, out, cmd).await;
    l.save(home)?;
    result
}

async fn step(l: &mut Loaded, out: Out, cmd: CompanyCmd) -> CliResult {
    let t = now();
    let c = &mut l.company;
    match cmd {
        CompanyCmd::Init { .. } | CompanyCmd::Id | CompanyCmd::Gateway(_) => {
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
            let asked = access_request(&scopes, purpose, &duration, lookback)?;
            let rid = c.request(customer, asked, t).await?;
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
        CompanyCmd::History { customer } => {
            sync_all(c).await?;
            let accesses = access_rows(c, customer.as_deref())?;
            for a in &accesses {
                out.line(format!(
                    "{:>6}  {}  {} of {} under grant {}: {}",
                    a.index,
                    crate::out::time(a.time),
                    a.kind,
                    short(&a.customer),
                    short(&a.grant),
                    a.families
                        .iter()
                        .map(|f| f.split_once(':').map_or(f.as_str(), |(_, p)| p))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if accesses.is_empty() {
                out.line("no read or append yet");
            }
            out.value(&json!(cmr_wire::gateway::AccessesJson { accesses }));
        }
        CompanyCmd::Status => {
            sync_all(c).await?;
            let requests = request_rows(c);
            for r in &requests {
                out.line(format!(
                    "request {} to {}: {}",
                    short(&r.request),
                    short(&r.customer),
                    r.status
                ));
            }
            let grants = grant_rows(c);
            for g in &grants {
                out.line(format!(
                    "grant {} from {}: {}, {}, {}, history from {}",
                    short(&g.grant),
                    short(&g.customer),
                    g.status,
                    g.scopes.join(","),
                    g.duration,
                    g.lookback_start
                ));
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
            out.value(&json!({"requests": requests, "grants": grants, "disputes": c.disputes}));
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
            let t = read_target(c, gid, &scope, from.as_deref(), to.as_deref())?;
            let (_, records) = c.read(gid, t.family, t.from, t.to).await?;
            // Profile sections have no months: their records are shown without one.
            for r in &records {
                let text = String::from_utf8_lossy(&r.content);
                out.line(if t.periodic {
                    format!("{}  {text}", r.period)
                } else {
                    text.into_owned()
                });
            }
            out.line(format!(
                "{} records; the read was logged, proven complete and decrypted here",
                records.len()
            ));
            out.value(&json!({"records": record_rows(&records, t.periodic)}));
        }
        CompanyCmd::Append { grant, month, text } => {
            let gid = StatementId(crate::out::resolve_id(
                &grant,
                "grant",
                c.grants.keys().map(|g| g.0),
            )?);
            let (scope, period) = append_target(c, gid, month.as_deref())?;
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

/// Brings every vault this company deals with up to date (the customers it asked, those whose grants
/// it holds, and those that granted it something unasked): grants, revocations, answers, disputes.
pub(crate) async fn sync_all(c: &mut Company) -> Result<(), cmr_client::ClientError> {
    let mut customers: Vec<IdentityId> = c.requests.values().copied().collect();
    customers.extend(c.grants.values().map(|g| g.customer));
    // Customers who granted access without being asked are found too.
    customers.extend(c.discover().await?);
    customers.sort();
    customers.dedup();
    for cust in customers {
        c.sync(cust).await?;
    }
    Ok(())
}

/// The requests sent, by id.
pub(crate) fn request_rows(c: &Company) -> Vec<RequestSent> {
    let mut reqs: Vec<(StatementId, IdentityId)> =
        c.requests.iter().map(|(r, cu)| (*r, *cu)).collect();
    reqs.sort();
    reqs.into_iter()
        .map(|(rid, cust)| {
            let status = match c.status(&rid) {
                RequestStatus::Pending => "pending".to_string(),
                RequestStatus::Granted(g) => format!("granted: grant {}", g.to_hex()),
                RequestStatus::Denied(r) => format!("denied: {r}"),
            };
            RequestSent {
                request: rid.to_hex(),
                customer: cust.to_hex(),
                status,
            }
        })
        .collect()
}

/// The grants held, by id.
/// This company's own accesses, oldest first; only those to `customer` (an id, whole) when given.
pub(crate) fn access_rows(
    c: &Company,
    customer: Option<&str>,
) -> CliResult<Vec<cmr_wire::gateway::AccessJson>> {
    let only = customer
        .map(|id| crate::out::parse_id(id, "customer").map(hex::encode))
        .transpose()?;
    let mut rows: Vec<_> = c
        .accesses
        .iter()
        .filter(|a| only.as_ref().is_none_or(|o| *o == a.customer))
        .cloned()
        .collect();
    rows.sort_by_key(|a| a.index);
    Ok(rows)
}

pub(crate) fn grant_rows(c: &Company) -> Vec<GrantHeld> {
    let mut out: Vec<GrantHeld> = c
        .grants
        .values()
        .filter_map(|g| {
            let b = g.grant()?;
            let scopes: Vec<String> = b
                .scopes
                .iter()
                .map(|(s, a)| format!("{}:{}", s.name(), access_name(*a)))
                .collect();
            Some(GrantHeld {
                grant: g.id.to_hex(),
                customer: g.customer.to_hex(),
                status: g.status(now()).to_string(),
                scopes,
                duration: crate::customer::lasting(b),
                expires: b.expires,
                lookback_start: b.lookback_start.to_string(),
                purpose: b.purpose.clone(),
                narrowed: c.narrowed(&g.id),
            })
        })
        .collect();
    out.sort_by(|a, b| a.grant.cmp(&b.grant));
    out
}

/// What a read under a grant reads: the family of `scope`, and the months (from the grant's look-back
/// start to this month unless given; none for a profile section).
pub(crate) struct ReadTarget {
    pub family: cmr_core::family::FamilyId,
    pub from: Period,
    pub to: Period,
    pub periodic: bool,
}

/// The [`ReadTarget`] of `scope` under grant `gid`, which this company must hold.
pub(crate) fn read_target(
    c: &Company,
    gid: StatementId,
    scope: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> CliResult<ReadTarget> {
    let scope = Scope::from_name(scope)
        .ok_or_else(|| CliError::local(format!("unknown scope {scope:?}"), "see --help"))?;
    let held = c
        .grants
        .get(&gid)
        .ok_or_else(|| CliError::local("no such grant held", "run `cmr company status` first"))?;
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
    let periodic = scope.is_periodic();
    let (from, to) = if periodic {
        (
            from.map(parse_month)
                .transpose()?
                .unwrap_or(g.lookback_start),
            to.map(parse_month).transpose()?.unwrap_or(this_month()?),
        )
    } else {
        (Period::ORIGIN, Period::ORIGIN)
    };
    Ok(ReadTarget {
        family,
        from,
        to,
        periodic,
    })
}

/// Where an append under grant `gid` goes: its append family's scope, and the month (this month unless
/// given; none for a profile section).
pub(crate) fn append_target(
    c: &Company,
    gid: StatementId,
    month: Option<&str>,
) -> CliResult<(Scope, Period)> {
    let held = c
        .grants
        .get(&gid)
        .ok_or_else(|| CliError::local("no such grant held", "run `cmr company status` first"))?;
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
        .ok_or_else(|| CliError::local("the append family is not in the grant", "report this"))?;
    let period = if scope.is_periodic() {
        month.map(parse_month).transpose()?.unwrap_or(this_month()?)
    } else {
        Period::ORIGIN
    };
    Ok((scope, period))
}

/// Records read and decrypted here, in the wire's shape.
pub(crate) fn record_rows(
    records: &[cmr_client::customer::OpenedRecord],
    periodic: bool,
) -> Vec<RecordRead> {
    records
        .iter()
        .map(|r| RecordRead {
            record: r.id.to_hex(),
            month: periodic.then(|| r.period.to_string()),
            author: r.author.to_hex(),
            text: String::from_utf8_lossy(&r.content).into_owned(),
        })
        .collect()
}

/// An access request from what a person or a backend typed: `SCOPE:ACCESS` scopes, a purpose, a
/// duration (`once`, `persistent` or days) and months of history.
pub(crate) fn access_request(
    scopes: &[String],
    purpose: String,
    duration: &str,
    lookback_months: u32,
) -> CliResult<AccessRequest> {
    Ok(AccessRequest {
        scopes: scopes
            .iter()
            .map(|s| parse_scope_access(s))
            .collect::<CliResult<Vec<_>>>()?,
        purpose,
        duration: crate::customer::parse_duration(duration)?,
        lookback_months,
        counterparty: Counterparty::OnlyRequester,
    })
}
