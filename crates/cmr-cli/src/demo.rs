//! `cmr demo`: the whole story on an embedded server in a temporary folder, told step by step, with one
//! customer and two companies. Every step checks that the vault behaved as promised; the demo exits
//! non-zero at the first one that did not.

use std::time::{SystemTime, UNIX_EPOCH};

use cmr_client::company::{Company, RequestStatus};
use cmr_client::customer::{Approval, Customer};
use cmr_client::session::Session;
use cmr_client::wellknown::{self, KeyDocument, Mode};
use cmr_client::{ClientError, Connection};
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::Role;
use cmr_core::keys::SigningKey;
use cmr_log::auditor::Auditor;
use cmr_log::note::{NoteSigner, NoteVerifier, TYPE_ED25519};

use crate::error::{CliError, CliResult, code};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prints the steps, and turns a broken promise into the demo's failure.
struct Story {
    step: usize,
}

impl Story {
    fn step(&mut self, title: &str) {
        self.step += 1;
        crate::out::print(&format!("\n{}. {title}", self.step));
    }

    fn say(&self, line: impl AsRef<str>) {
        crate::out::print(&format!("   {}", line.as_ref()));
    }

    fn fail(&self, what: impl AsRef<str>) -> CliError {
        CliError::with_code(
            code::DEMO_FAILED,
            format!("step {}: {}", self.step, what.as_ref()),
            Some("this is a bug: please report it with the output above"),
        )
    }

    /// The step must succeed.
    fn ok<T>(&self, what: &str, r: Result<T, ClientError>) -> CliResult<T> {
        r.map_err(|e| self.fail(format!("{what} failed: {e}")))
    }

    /// The step must be refused with `expected`.
    fn refused<T>(
        &self,
        what: &str,
        r: Result<T, ClientError>,
        expected: &str,
    ) -> CliResult<String> {
        match r {
            Err(ClientError::Refused { code, detail, .. }) if code == expected => Ok(detail),
            Err(e) => Err(self.fail(format!("{what}: expected refusal {expected}, got: {e}"))),
            Ok(_) => Err(self.fail(format!(
                "{what} was allowed; it must be refused ({expected})"
            ))),
        }
    }
}

/// Serves a company's key document on 127.0.0.1, standing in for `https://DOMAIN/.well-known/cmr-vault`.
async fn serve_domain(doc: KeyDocument) -> CliResult<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| {
            CliError::local(
                format!("cannot listen: {e}"),
                "check the loopback interface",
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::local(e.to_string(), "check the loopback interface"))?;
    let app = axum::Router::new().route(
        wellknown::PATH,
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        }),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr.to_string(), task))
}

/// Runs the demo.
pub async fn run() -> CliResult {
    let dir = tempfile::tempdir()
        .map_err(|e| CliError::local(format!("no temporary folder: {e}"), "check TMPDIR"))?;
    let seed: [u8; 32] = cmr_log::entry::draw_salt(&mut rand::rng());
    let signer = || {
        NoteSigner::new(
            "localhost/cmr-demo",
            TYPE_ED25519,
            SigningKey::from_seed(&seed),
        )
        .map_err(|e| CliError::local(e.to_string(), "report this"))
    };
    // The operator keeps a copy of the log key to admit the auditor.
    let (log_key, log_admit) = (signer()?, signer()?);
    let server = crate::serve::start(
        &dir.path().join("data"),
        log_key,
        "127.0.0.1:0",
        "http",
        Vec::new(),
    )
    .await?;
    crate::out::print(&format!(
        "CMR Vault demo: an embedded server on {} with sled in {}",
        server.base,
        dir.path().display()
    ));
    crate::out::print(&format!("Everyone pins the log key {}", server.log_vkey));
    let pinned = NoteVerifier::from_vkey(&server.log_vkey)
        .map_err(|e| CliError::local(e.to_string(), "report this"))?;
    let result = story(&server.base, &pinned, &log_admit).await;
    server.stop().await?;
    result?;
    crate::out::print("\nEvery step behaved as promised.");
    Ok(())
}

async fn story(base: &str, pinned: &NoteVerifier, log_key: &NoteSigner) -> CliResult {
    let mut s = Story { step: 0 };
    let conn = Connection::new(base)?;
    let t = now();
    let this_month =
        Period::from_unix(t as i64).ok_or_else(|| s.fail("the clock is before 2000"))?;

    s.step("Registration");
    let (cs, phrase) = s.ok(
        "customer registration",
        Session::register(conn.clone(), Role::Customer, pinned.clone(), t).await,
    )?;
    let words = phrase.split_whitespace().count();
    let mut alex = Customer::new(cs, PseudonymKey::generate(&mut rand::rng()));
    s.say(format!("customer Alex registered: identity {} with one device; a {words}-word recovery phrase is shown once", short(&alex.id().to_hex())));
    let (bs, _) = s.ok(
        "company registration",
        Session::register(conn.clone(), Role::Company, pinned.clone(), t).await,
    )?;
    let mut bank = Company::new(bs);
    let (ns, _) = s.ok(
        "company registration",
        Session::register(conn.clone(), Role::Company, pinned.clone(), t).await,
    )?;
    let mut shop = Company::new(ns);
    let (as_, _) = s.ok(
        "auditor registration",
        Session::register(conn.clone(), Role::Auditor, pinned.clone(), t).await,
    )?;
    let (bank_domain, _b) = serve_domain(KeyDocument {
        identity: bank.id().to_hex(),
        name: "Acme Bank".into(),
    })
    .await?;
    let (shop_domain, _n) = serve_domain(KeyDocument {
        identity: shop.id().to_hex(),
        name: "Northwind Travel".into(),
    })
    .await?;
    s.say(format!(
        "companies Acme Bank ({}) and Northwind Travel ({}) registered",
        short(&bank.id().to_hex()),
        short(&shop.id().to_hex())
    ));
    s.say(format!("each serves its key document at http://DOMAIN{} (plain http: the demo's explicit test mode)", wellknown::PATH));
    let admission = cmr_log::admission::Admission {
        auditor: as_.keys.identity,
        admit: true,
        time: t,
    };
    let at = s.ok(
        "auditor admission",
        cmr_client::auditor::submit_admission(&conn, &admission.sign(log_key)).await,
    )?;
    s.say(format!("an auditor registered, and the operator admitted it with the log key (log index {at}): it will see log entries, never customer content"));

    s.step("Alex's profile, preferences and transactions, encrypted on Alex's device");
    let tx = alex.transactions_with(&bank.id());
    let inferred = alex.inferred_by(&shop.id());
    let contact =
        FamilyName::profile(Scope::ProfileContact).ok_or_else(|| s.fail("no contact family"))?;
    let prefs = FamilyName::profile(Scope::ProfilePreferences)
        .ok_or_else(|| s.fail("no preferences family"))?;
    s.ok(
        "declaring families",
        alex.declare(&[contact, prefs, tx, inferred], t).await,
    )?;
    s.say("key directory v1 published: four families, each with a fresh epoch secret");
    s.ok(
        "profile write",
        alex.write(
            alex.family_id(&contact),
            Period::ORIGIN,
            &[b"email: alex@example.org"],
        )
        .await,
    )?;
    s.ok(
        "preferences write",
        alex.write(
            alex.family_id(&prefs),
            Period::ORIGIN,
            &[b"channel: email; times: evenings; pays by card"],
        )
        .await,
    )?;
    let mut written = 0;
    for back in (0..6u32).rev() {
        let p = Period(this_month.0.saturating_sub(back));
        let line = format!(
            "{}: card payment {:.2} EUR",
            p,
            20.0 + f64::from(back) * 7.5
        );
        s.ok(
            "transaction write",
            alex.write(alex.family_id(&tx), p, &[line.as_bytes()]).await,
        )?;
        written += 1;
    }
    s.say(format!("profile, preferences and {written} monthly transactions written; each write durable and logged before the answer"));

    s.step("Requests, and a narrowed approval");
    let bank_req = s.ok(
        "bank request",
        bank.request(
            alex.id(),
            AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: "credit limit review".into(),
                duration: Duration::Persistent,
                lookback_months: 36,
                counterparty: Counterparty::OnlyRequester,
            },
            t,
        )
        .await,
    )?;
    let shop_req = s.ok(
        "shop request",
        shop.request(
            alex.id(),
            AccessRequest {
                scopes: vec![
                    (Scope::ProfilePreferences, Access::Read),
                    (Scope::ProfileInferred, Access::ReadAppend),
                ],
                purpose: "personalised travel offers".into(),
                duration: Duration::Persistent,
                lookback_months: 0,
                counterparty: Counterparty::OnlyRequester,
            },
            t,
        )
        .await,
    )?;
    let pending = s.ok("listing requests", alex.pending().await)?;
    if pending.len() != 2 {
        return Err(s.fail(format!(
            "expected 2 pending requests, saw {}",
            pending.len()
        )));
    }
    for p in &pending {
        let r = p.request().ok_or_else(|| s.fail("not a request"))?;
        let scopes: Vec<String> = r
            .scopes
            .iter()
            .map(|(sc, a)| format!("{} ({a:?})", sc.name()))
            .collect();
        s.say(format!(
            "request from {}: {} — why: {:?}; {:?}; look-back {} months",
            short(&p.statement.statement().author.to_hex()),
            scopes.join(", "),
            r.purpose,
            r.duration,
            r.lookback_months
        ));
    }
    let find = |id| {
        pending
            .iter()
            .find(|p| p.statement.id() == id)
            .ok_or_else(|| s.fail("a request is missing"))
    };
    let proof = s.ok(
        "bank domain proof",
        wellknown::fetch(&bank_domain, Mode::InsecureTestHttp).await,
    )?;
    s.say(format!(
        "verified: {} vouches for {} (fingerprint {})",
        proof.domain,
        proof.name,
        proof.fingerprint()
    ));
    let shop_proof = s.ok(
        "shop domain proof",
        wellknown::fetch(&shop_domain, Mode::InsecureTestHttp).await,
    )?;
    let narrowed = Approval {
        scopes: vec![(Scope::Transactions, Access::Read)],
        lookback_months: 3,
        families: vec![tx],
        append_family: None,
    };
    match alex
        .approve(find(bank_req)?, &shop_proof, &narrowed, t)
        .await
    {
        Err(ClientError::Verification(_)) => s.say(
            "approving the bank's request with the shop's domain proof is refused by Alex's client",
        ),
        other => {
            return Err(s.fail(format!(
                "a mismatched domain proof was accepted: {:?}",
                other.err()
            )));
        }
    }
    let bank_grant = s.ok(
        "approval",
        alex.approve(find(bank_req)?, &proof, &narrowed, t).await,
    )?;
    s.say("Alex approves the bank narrowed: 3 months of look-back instead of 36; the keys are sealed to the bank's certified device key");
    let shop_grant = s.ok(
        "approval",
        alex.approve(
            find(shop_req)?,
            &shop_proof,
            &Approval {
                scopes: vec![
                    (Scope::ProfilePreferences, Access::Read),
                    (Scope::ProfileInferred, Access::ReadAppend),
                ],
                lookback_months: 0,
                families: vec![prefs, inferred],
                append_family: Some(inferred),
            },
            t,
        )
        .await,
    )?;
    s.say("Alex approves Northwind as asked: read preferences, write inferred attributes");

    s.step("A scoped read by the bank");
    s.ok("bank sync", bank.sync(alex.id()).await)?;
    if bank.status(&bank_req) != RequestStatus::Granted(bank_grant) {
        return Err(s.fail("the bank does not see its grant"));
    }
    let from = Period(this_month.0 - 3);
    let (_, records) = s.ok(
        "bank read",
        bank.read(bank_grant, alex.family_id(&tx), from, this_month)
            .await,
    )?;
    s.say(format!("the bank read {} transactions ({from} to {this_month}); the access was logged first, the read proven complete, the records decrypted by the bank:", records.len()));
    for r in &records {
        s.say(format!("  {}", String::from_utf8_lossy(&r.content)));
    }
    if records.len() != 4 {
        return Err(s.fail(format!(
            "expected the 4 transactions inside the look-back, got {}",
            records.len()
        )));
    }
    let detail = s.refused(
        "a read beyond the look-back",
        bank.read(
            bank_grant,
            alex.family_id(&tx),
            Period(this_month.0 - 5),
            this_month,
        )
        .await,
        "outside-look-back",
    )?;
    s.say(format!("reading 5 months back is refused: {detail}"));

    s.step("An inferred attribute, seen and disputed by Alex");
    s.ok("shop sync", shop.sync(alex.id()).await)?;
    let (_, prefs_read) = s.ok(
        "shop read",
        shop.read(
            shop_grant,
            alex.family_id(&prefs),
            Period::ORIGIN,
            Period::ORIGIN,
        )
        .await,
    )?;
    s.say(format!(
        "Northwind read the preferences: {}",
        prefs_read
            .first()
            .map(|r| String::from_utf8_lossy(&r.content).into_owned())
            .unwrap_or_default()
    ));
    let (head, _) = s.ok(
        "shop read",
        shop.read(
            shop_grant,
            alex.family_id(&inferred),
            Period::ORIGIN,
            Period::ORIGIN,
        )
        .await,
    )?;
    s.ok(
        "shop append",
        shop.append(
            shop_grant,
            &head,
            Period::ORIGIN,
            &[b"segment: frequent traveller"],
        )
        .await,
    )?;
    s.say("Northwind appended an inferred attribute, sealed on its own append chain");
    let seen = s.ok(
        "Alex's read",
        alex.read(alex.family_id(&inferred), Period::ORIGIN, Period::ORIGIN)
            .await,
    )?;
    let attr = seen
        .iter()
        .find(|r| r.author == shop.id())
        .ok_or_else(|| s.fail("Alex does not see the inferred attribute"))?;
    s.say(format!(
        "Alex sees it: {:?}, written by {}",
        String::from_utf8_lossy(&attr.content),
        short(&attr.author.to_hex())
    ));
    s.ok(
        "dispute",
        alex.dispute(alex.family_id(&inferred), attr.id, t).await,
    )?;
    s.say("Alex disputes it: the rejection is logged on Alex's chain");

    s.step("Revocation, and the rotation");
    let (rev, rotations) = s.ok(
        "revocation",
        alex.revoke(bank_grant, "moved to another bank", t).await,
    )?;
    s.say(format!(
        "the bank's grant is revoked at log index {}",
        rev.index
    ));
    s.say(format!("the transactions family rotated to a fresh epoch ({} rotation, no other grantee to re-key)", rotations.len()));

    s.step("The refused read");
    let detail = s.refused(
        "a read after the revocation",
        bank.read(bank_grant, alex.family_id(&tx), from, this_month)
            .await,
        "grant-revoked",
    )?;
    s.say(format!("the bank's next read is refused: {detail}"));

    s.step("The audit");
    let history = s.ok("Alex's history", alex.history().await)?;
    let accesses = history
        .iter()
        .filter(|e| e.body.kind == cmr_log::entry::EntryKind::Access)
        .count();
    s.say(format!("Alex's chain: {} entries, every link and inclusion proof checked, nothing acknowledged missing; {accesses} accesses by companies", history.len()));
    let auditors = s.ok("Alex's list of auditors", alex.session.auditors().await)?;
    if !auditors.is_admitted(&as_.keys.identity) {
        return Err(s.fail("Alex does not see the admitted auditor"));
    }
    s.say(format!(
        "Alex sees who may read log entries: {} admitted auditor, each admission signed with the log key",
        auditors.all().filter(|(_, st)| st.admitted).count()
    ));
    let mut auditor = Auditor::new(pinned.clone());
    let report = cmr_client::auditor::audit(&mut auditor, &as_)
        .map_err(|e| s.fail(format!("the audit could not run: {e}")))?;
    s.say(format!("the auditor verified {} entries against the signed checkpoint, without any customer content: {} violations", report.size, report.violations.len()));
    if !report.is_clean() {
        return Err(s.fail(format!(
            "the audit found violations: {:?}",
            report.violations
        )));
    }
    Ok(())
}

fn short(hex: &str) -> String {
    format!("{}…", &hex[..12.min(hex.len())])
}
