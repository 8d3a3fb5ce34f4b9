//! The `cmr` binary as users run it: help text (snapshots), common mistakes (one line, a hint, the
//! documented exit code, no backtrace), and a scripted session against a server the test starts.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use assert_cmd::cargo::cargo_bin;
use serde_json::Value;

fn cmr() -> Command {
    let mut c = Command::new(cargo_bin("cmr"));
    c.env("CMR_PASSPHRASE", "amber-quarry-lantern-nimbus-71")
        .env_remove("CMR_HOME")
        .env_remove("CMR_SERVER")
        .env_remove("CMR_LOG_VKEY")
        .env("RUST_BACKTRACE", "1");
    c
}

/// Compares `actual` with the snapshot file; `CMR_UPDATE_SNAPSHOTS=1` rewrites it.
fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("CMR_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with CMR_UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "snapshot {name} differs; run with CMR_UPDATE_SNAPSHOTS=1 if intended"
    );
}

fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_texts() {
    for (args, name) in [
        (vec!["--help"], "help.txt"),
        (vec!["customer", "--help"], "customer-help.txt"),
        (
            vec!["customer", "approve", "--help"],
            "customer-approve-help.txt",
        ),
        (vec!["company", "--help"], "company-help.txt"),
        (vec!["audit", "--help"], "audit-help.txt"),
        (vec!["serve", "--help"], "serve-help.txt"),
        (vec!["operator", "--help"], "operator-help.txt"),
    ] {
        let (code, stdout, _) = run(cmr().args(&args).env("COLUMNS", "100"));
        assert_eq!(code, 0, "{args:?}");
        snapshot(name, &stdout);
    }
}

/// An error is one line on stderr: the cause and a hint, with no backtrace.
fn one_line_error(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains("(hint: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn common_mistakes_get_one_line_and_their_exit_code() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    // No identity yet.
    let (code, _, err) = run(cmr().args(["--home", h, "customer", "requests"]));
    assert_eq!(code, 4);
    one_line_error(&err);
    assert!(err.contains("cmr customer init"), "{err}");
    // A log key that does not parse.
    let (code, _, err) =
        run(cmr().args(["--home", h, "customer", "init", "--log-vkey", "nonsense"]));
    assert_eq!(code, 4, "{err}");
    one_line_error(&err);
    // An identity whose server is not running.
    let vkey = "localhost/cmr-vault+423668a3+ARNvWSEFVkTp3XZpPeVy1WzXX8InvvaBtpc6obNo6NYE";
    let (code, _, err) = run(cmr().args([
        "--home",
        h,
        "customer",
        "init",
        "--server",
        "http://127.0.0.1:9",
        "--log-vkey",
        vkey,
    ]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(cmr().args(["--home", h, "customer", "register"]));
    assert_eq!(code, 5, "{err}");
    one_line_error(&err);
    // A second init in the same folder.
    let (code, _, err) = run(cmr().args(["--home", h, "customer", "init", "--log-vkey", vkey]));
    assert_eq!(code, 4);
    one_line_error(&err);
    // The wrong passphrase.
    let (code, _, err) = run(cmr()
        .args(["--home", h, "customer", "grants"])
        .env("CMR_PASSPHRASE", "wrong"));
    assert_eq!(code, 4);
    one_line_error(&err);
    assert!(err.contains("passphrase"), "{err}");
    // A malformed id is a usage mistake.
    let (code, _, err) = run(cmr().args(["--home", h, "customer", "revoke", "xyz"]));
    assert_eq!(code, 2);
    one_line_error(&err);
    // A key file others can read is refused, with the fix.
    let key = home.path().join("customer/identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(cmr().args(["--home", h, "customer", "grants"]));
    assert_eq!(code, 4);
    one_line_error(&err);
    assert!(
        err.contains("can be read by other users") && err.contains("chmod 600"),
        "{err}"
    );
    // An unknown flag is a usage error (clap's code 2).
    let (code, _, _) = run(cmr().args(["customer", "grants", "--frobnicate"]));
    assert_eq!(code, 2);
    // With --json, errors are JSON too: a usage mistake and a refusal alike, with their exit codes.
    let (code, _, err) = run(cmr().args(["--json", "customer", "grants", "--frobnicate"]));
    assert_eq!(code, 2);
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["exit_code"], 2);
    assert!(v["error"].as_str().unwrap().contains("frobnicate"), "{v}");
    // (The key file is still readable by others here: a local problem, exit 4.)
    let (code, _, err) = run(cmr().args(["--json", "--home", h, "customer", "grants"]));
    assert_eq!(code, 4);
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["exit_code"], 4);
    assert!(v["hint"].is_string(), "{v}");
}

/// A `cmr serve` child on a free port, stopped when dropped.
struct Server {
    child: Child,
    base: String,
    vkey: String,
    /// The CA file clients trust for an https server.
    ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Server {
    serve_in(tempfile::tempdir().unwrap(), &[])
}

/// `cmr serve` over the data and log key in `dir`, with `extra` arguments.
fn serve_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
    let (data, log_key) = (dir.path().join("data"), dir.path().join("log.key"));
    spawn(&data, &log_key, extra, dir)
}

#[test]
fn a_witness_cosigns_the_checkpoint_and_the_server_serves_it() {
    // A first start makes the log key; the witness is set up against it; the server restarts with it.
    let mut first = serve();
    let vkey = first.vkey.clone();
    let _ = first.child.kill();
    let _ = first.child.wait();
    let dir = std::mem::replace(&mut first._dir, tempfile::tempdir().unwrap());
    drop(first);
    let homes = tempfile::tempdir().unwrap();
    let witness = User {
        home: homes.path().join("witness"),
        server: "http://127.0.0.1:9".into(),
        vkey: vkey.clone(),
        ca: None,
    };
    let v = witness.json(&["audit", "witness-init", "--name", "witness.test/w1"]);
    let wkey = v["witness_vkey"].as_str().unwrap().to_string();
    let server = serve_in(dir, &["--witness", &wkey]);
    assert_eq!(server.vkey, vkey);
    let witness = User {
        server: server.base.clone(),
        ..witness
    };
    // The witness's state names the server it was set up with: point it at the restarted one.
    let state_path = witness.home.join("witness/state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["server"] = Value::from(server.base.clone());
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    // Some entries, then a cosignature that the checkpoint then carries.
    let alex = User {
        home: homes.path().join("alex"),
        server: server.base.clone(),
        vkey: vkey.clone(),
        ca: None,
    };
    alex.ok(&["customer", "init"]);
    alex.ok(&["customer", "register"]);
    let v = witness.json(&["audit", "witness"]);
    assert_eq!(v["cosigners"][0]["name"], "witness.test/w1");
    alex.ok(&["customer", "profile", "set", "contact", "a@example.org"]);
    witness.ok(&["audit", "witness"]);
}

/// Serves one key document over plain http on 127.0.0.1, as the company's domain (test mode).
fn domain(doc: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                doc.len()
            );
        }
    });
    addr
}

/// Alex on `server`: a customer initialised in `homes/alex`, registered, with a contact email.
fn alex_on(server: &Server, homes: &Path) -> User {
    alex_at(&server.base, &server.vkey, homes)
}

/// [`alex_on`] the server at `base` whose log key is `vkey`.
fn alex_at(base: &str, vkey: &str, homes: &Path) -> User {
    let alex = User {
        home: homes.join("alex"),
        server: base.to_string(),
        vkey: vkey.to_string(),
        ca: None,
    };
    alex.ok(&["customer", "init"]);
    alex.ok(&["customer", "register"]);
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@example.org",
    ]);
    alex
}

/// Acme Bank beside `alex` (same server): a company initialised in `homes/bank`, registered, with its
/// key document served as its domain (test mode). Returns it, its id and its domain.
fn acme_bank(alex: &User, homes: &Path) -> (User, String, String) {
    let bank = User {
        home: homes.join("bank"),
        ..alex.clone()
    };
    let bank_id = bank.json(&["company", "init"])["identity"]
        .as_str()
        .unwrap()
        .to_string();
    bank.ok(&["company", "register"]);
    let bank_domain = domain(bank.ok(&["company", "key-document", "--name", "Acme Bank"]));
    (bank, bank_id, bank_domain)
}

/// Runs `cmr --json ARGS…`, which must succeed, and parses what it prints.
fn json_of(c: &mut Command) -> Value {
    let (code, out, err) = run(c);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[derive(Clone)]
struct User {
    home: PathBuf,
    server: String,
    vkey: String,
    ca: Option<PathBuf>,
}

impl User {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = cmr();
        c.arg("--home")
            .arg(&self.home)
            .env("CMR_SERVER", &self.server)
            .env("CMR_LOG_VKEY", &self.vkey)
            .args(args);
        if let Some(ca) = &self.ca {
            c.env("CMR_CA_FILE", ca);
        }
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = run(&mut self.cmd(args));
        assert_eq!(code, 0, "cmr {args:?}: {err}");
        out
    }

    fn ok_with(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut c = self.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let (code, out, err) = run(&mut c);
        assert_eq!(code, 0, "cmr {args:?}: {err}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn fails(&self, args: &[&str], code: i32) -> String {
        let (c, _, err) = run(&mut self.cmd(args));
        assert_eq!(c, code, "cmr {args:?}: {err}");
        one_line_error(&err);
        err
    }
}

#[test]
fn a_scripted_session_against_a_real_server() {
    scripted_session(&serve());
}

/// The same session against `cmr serve --store postgres://…`, on a real PostgreSQL (a temporary cluster;
/// skipped with a note when PostgreSQL is not installed, unless `CMR_REQUIRE_POSTGRES` is set, as in CI).
#[test]
fn the_scripted_session_on_postgresql() {
    let Some(cluster) = cmr_postgres::cluster::Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    cluster.create_database("session").unwrap();
    let url = format!(
        "postgresql://cmr@localhost/session?host={}",
        cluster.socket_dir().display()
    );
    let server = serve_in(tempfile::tempdir().unwrap(), &["--store", &url]);
    scripted_session(&server);
    // The state is in the database, not in a data folder.
    assert!(!server._dir.path().join("data").exists());
    let rows: u64 = cluster
        .psql("session", "SELECT count(*) FROM cmr_rows")
        .unwrap()
        .parse()
        .unwrap();
    assert!(rows > 100, "{rows} rows");
}

/// One customer, a bank and an auditor, through the CLI as a new user would: registration, profile and
/// transactions, a request and a grant, reads, an append, a dispute, a revocation with its rotation,
/// recovery, an audit.
fn scripted_session(server: &Server) {
    let homes = tempfile::tempdir().unwrap();
    let user = |name: &str| User {
        home: homes.path().join(name),
        server: server.base.clone(),
        vkey: server.vkey.clone(),
        ca: server.ca.clone(),
    };
    let (alex, bank, auditor) = (user("alex"), user("bank"), user("auditor"));

    let v = alex.json(&["customer", "init"]);
    let alex_id = v["identity"].as_str().unwrap().to_string();
    let phrase = v["recovery_phrase"].as_str().unwrap().to_string();
    assert_eq!(
        v["recovery_phrase"].as_str().unwrap().split(' ').count(),
        24
    );
    alex.ok(&["customer", "register"]);
    assert_eq!(alex.ok(&["customer", "id"]).trim(), alex_id);
    let bank_id = bank.json(&["company", "init"])["identity"]
        .as_str()
        .unwrap()
        .to_string();
    bank.ok(&["company", "register"]);
    let doc = bank.ok(&["company", "key-document", "--name", "Acme Bank"]);
    let bank_domain = domain(doc);

    // Profile and transactions, from a CSV file with a progress bar (hidden under --json).
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@example.org",
    ]);
    let csv = homes.path().join("tx.csv");
    let month = |back: u32| {
        let v = alex.json(&["customer", "tx", "list", "--company", &bank_id]);
        let _ = v;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let p = cmr_core::family::Period::from_unix(now).unwrap();
        cmr_core::family::Period(p.0 - back).to_string()
    };
    let (m0, m1, m9) = (month(0), month(1), month(9));
    std::fs::write(
        &csv,
        format!("month,text\n{m9},old purchase\n{m1},groceries 41.75\n{m0},coffee 3.20\n"),
    )
    .unwrap();
    let v = alex.json(&[
        "customer",
        "tx",
        "import",
        "--company",
        &bank_id,
        csv.to_str().unwrap(),
    ]);
    assert_eq!(v["imported"], 3);
    // Run again (as after an interruption: see the import test that kills the server), nothing doubles.
    let v = alex.json(&[
        "customer",
        "tx",
        "import",
        "--company",
        &bank_id,
        csv.to_str().unwrap(),
    ]);
    assert_eq!(
        (v["imported"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(3))
    );
    let v = alex.json(&["customer", "tx", "list", "--company", &bank_id]);
    assert_eq!(v["transactions"].as_array().unwrap().len(), 3);
    // A typo in a company id is refused before anything is written; an id that is not a company too.
    let mut typo = bank_id.clone();
    typo.replace_range(0..1, if typo.starts_with('0') { "1" } else { "0" });
    let err = alex.fails(&["customer", "tx", "add", "--company", &typo, "lunch"], 4);
    assert!(err.contains("no company"), "{err}");
    let err = alex.fails(&["customer", "block", &alex_id], 4);
    assert!(err.contains("no company"), "{err}");

    // The bank asks; Alex sees who asks and why, then approves narrowed to 3 months.
    let req = bank.json(&[
        "company",
        "request",
        &alex_id,
        "--scope",
        "transactions:read",
        "--purpose",
        "credit limit review",
        "--lookback",
        "12",
        "--duration",
        "30",
    ])["request"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = alex.ok(&["customer", "requests"]);
    assert!(
        listed.contains("credit limit review")
            && listed.contains(&bank_id)
            && listed.contains("12 months")
            && listed.contains("30 days"),
        "{listed}"
    );
    // Over https the plain test domain fails: the domain proof needs TLS.
    alex.fails(&["customer", "approve", &req, "--domain", &bank_domain], 3);
    let approved = alex.ok(&[
        "customer",
        "approve",
        &req,
        "--domain",
        &bank_domain,
        "--lookback",
        "3",
        "--insecure-http-for-tests",
    ]);
    assert!(
        approved.contains("Acme Bank")
            && approved.contains("fingerprint")
            && approved.contains("30 days, until 20"),
        "{approved}"
    );
    // Alex accepts requests only from companies it granted to, ten a day: a new shop is refused with the
    // reason, the bank may ask again; then anyone may ask again.
    let v = alex.json(&["customer", "policy", "--granted-only", "--daily-cap", "10"]);
    assert_eq!(
        (v["granted_only"].as_bool(), v["daily_cap"].as_u64()),
        (Some(true), Some(10))
    );
    assert!(v["index"].is_u64(), "{v}");
    let shown = alex.ok(&["customer", "policy"]);
    assert!(
        shown.contains("only companies with an active grant") && shown.contains("10"),
        "{shown}"
    );
    let shop = user("shop");
    shop.ok(&["company", "init"]);
    shop.ok(&["company", "register"]);
    let ask = |who: &User, code: i32| {
        let args = [
            "company",
            "request",
            &alex_id,
            "--scope",
            "profile.contact:read",
            "--purpose",
            "newsletter",
        ];
        if code == 0 {
            who.ok(&args)
        } else {
            who.fails(&args, code)
        }
    };
    let err = ask(&shop, 1);
    assert!(err.contains("requests-not-accepted"), "{err}");
    ask(&bank, 0);
    let v = alex.json(&["customer", "policy", "--anyone", "--no-cap"]);
    assert_eq!(
        (v["granted_only"].as_bool(), v["daily_cap"].as_u64()),
        (Some(false), None)
    );
    ask(&shop, 0);
    // A time-bound grant is listed as such, in words, by both sides (never as a Rust type).
    let listed = alex.json(&["customer", "grants"]);
    assert_eq!(listed["grants"][0]["status"], "active");
    let lasting = listed["grants"][0]["duration"].as_str().unwrap();
    assert!(lasting.starts_with("30 days, until 20"), "{lasting}");

    // The bank reads what the grant covers, decrypted locally; further back is refused.
    let v = bank.json(&["company", "status"]);
    assert_eq!(v["grants"].as_array().unwrap().len(), 1);
    let lasting = v["grants"][0]["duration"].as_str().unwrap();
    assert!(lasting.starts_with("30 days, until 20"), "{lasting}");
    assert!(!bank.ok(&["company", "status"]).contains("TimeBound"));
    let grant = v["grants"][0]["grant"].as_str().unwrap().to_string();
    let v = bank.json(&["company", "read", &grant]);
    let texts: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["groceries 41.75", "coffee 3.20"]);
    let err = bank.fails(&["company", "read", &grant, "--from", &m9], 1);
    assert!(err.contains("outside-look-back"), "{err}");

    // An unsolicited grant of the contact section: the bank sees it and reads it.
    alex.ok(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "profile.contact:read",
        "--purpose",
        "statements by email",
        "--duration",
        "7",
        "--insecure-http-for-tests",
    ]);
    let v = bank.json(&["company", "status"]);
    let contact_grant = v["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["scopes"][0] == "profile.contact:read")
        .unwrap()["grant"]
        .as_str()
        .unwrap()
        .to_string();
    // The short form a listing shows (12 digits and "…") is accepted as typed.
    let shown = format!("{}…", &contact_grant[..12]);
    let v = bank.json(&["company", "read", &shown, "--scope", "profile.contact"]);
    assert_eq!(v["records"][0]["text"], "email: alex@example.org");
    assert!(v["records"][0]["month"].is_null(), "{v}");
    // A company that never asked anything discovers a grant made to it, and reads under it.
    let florist = user("florist");
    let florist_id = florist.json(&["company", "init"])["identity"]
        .as_str()
        .unwrap()
        .to_string();
    florist.ok(&["company", "register"]);
    let florist_domain = domain(florist.ok(&["company", "key-document", "--name", "Florist"]));
    alex.ok(&[
        "customer",
        "grant",
        "--company",
        &florist_id,
        "--domain",
        &florist_domain,
        "--scope",
        "profile.contact:read",
        "--purpose",
        "delivery address book",
        "--insecure-http-for-tests",
    ]);
    let v = florist.json(&["company", "status"]);
    let found = v["grants"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v}");
    let florist_grant = found[0]["grant"].as_str().unwrap().to_string();
    let v = florist.json(&[
        "company",
        "read",
        &florist_grant,
        "--scope",
        "profile.contact",
    ]);
    assert_eq!(v["records"][0]["text"], "email: alex@example.org");

    // The bank may infer attributes: it appends one, the customer sees it by name and disputes it, and
    // both sides see the dispute.
    let infer = alex.json(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "profile.inferred:read+append",
        "--purpose",
        "segments",
        "--insecure-http-for-tests",
    ])["grant"]
        .as_str()
        .unwrap()
        .to_string();
    bank.ok(&["company", "status"]);
    bank.ok(&["company", "append", &infer, "segment: frequent traveller"]);
    let v = alex.json(&["customer", "profile", "show"]);
    let inferred = v["profile"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["scope"] == "profile.inferred")
        .unwrap()
        .clone();
    assert_eq!(inferred["text"], "segment: frequent traveller");
    assert!(inferred["disputed"].is_null());
    let record = inferred["record"].as_str().unwrap().to_string();
    alex.ok(&["customer", "dispute", "--company", &bank_id, &record]);
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(
        shown.contains("by Acme Bank (") && shown.contains("disputed: rejected"),
        "{shown}"
    );
    let v = bank.json(&["company", "status"]);
    assert_eq!(v["disputes"][0]["record"], record.as_str(), "{v}");
    assert_eq!(v["disputes"][0]["rejected"], true);

    // A one-time grant on the same transactions, used by one read; its second read is refused.
    let once = alex.json(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "transactions:read",
        "--purpose",
        "one statement",
        "--lookback",
        "1",
        "--duration",
        "once",
        "--insecure-http-for-tests",
    ])["grant"]
        .as_str()
        .unwrap()
        .to_string();
    bank.ok(&["company", "status"]);
    bank.ok(&["company", "read", &once]);
    let err = bank.fails(&["company", "read", &once], 1);
    assert!(err.contains("grant-consumed"), "{err}");
    let listed = alex.json(&["customer", "grants"]);
    let used = listed["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["grant"] == once.as_str())
        .unwrap();
    assert_eq!(used["status"], "used", "{listed}");

    // A receipt; the revocation with its rotation (which skips the used one-time grant); the refused
    // read; the family takes writes again; the history shows the read.
    // Ids may be typed as a unique prefix, as git takes commit ids.
    let receipt = alex.ok(&["customer", "receipt", &grant[..10]]);
    assert!(receipt.contains("credit limit review"), "{receipt}");
    alex.ok(&["customer", "revoke", &grant]);
    let err = bank.fails(&["company", "read", &grant], 1);
    assert!(err.contains("grant-revoked"), "{err}");
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "after the rotation",
    ]);
    let v = bank.json(&["company", "status"]);
    let revoked = v["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["grant"] == grant.as_str())
        .unwrap();
    assert_eq!(revoked["status"], "revoked");
    let history = alex.ok(&["customer", "history"]);
    assert!(
        history.contains("read by Acme Bank (") && history.contains("revocation"),
        "{history}"
    );

    // A second device: it asks, the first device certifies it, it joins and reads the vault.
    let laptop = user("laptop");
    let v = laptop.json(&["customer", "device", "new", "--identity", &alex_id]);
    let request = v["request"].as_str().unwrap().to_string();
    let laptop_device = v["device"].as_str().unwrap().to_string();
    // `--out` with a bare file name, exactly as `device new` prints it, writes in the current folder; run
    // twice, it certifies the device once and writes the same enrolment again.
    let enrol = homes.path().join("enrol.json");
    for _ in 0..2 {
        let (code, _, err) = run(alex
            .cmd(&["customer", "device", "add", &request, "--out", "enrol.json"])
            .current_dir(homes.path()));
        assert_eq!(code, 0, "{err}");
    }
    let v = alex.json(&["customer", "device", "list"]);
    let certified = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["device"] == laptop_device.as_str())
        .count();
    assert_eq!(certified, 1, "{v}");
    laptop.ok(&["customer", "device", "join", enrol.to_str().unwrap()]);
    let shown = laptop.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("email: alex@example.org"), "{shown}");
    let listed = alex.ok(&["customer", "device", "list"]);
    assert!(
        listed.contains(&laptop_device) && listed.contains("this device"),
        "{listed}"
    );
    // Revoked, the laptop can no longer act; the first device rotated everything and carries on.
    alex.ok(&["customer", "device", "revoke", &laptop_device[..8]]);
    let err = laptop.fails(&["customer", "profile", "show"], 1);
    assert!(
        err.contains("unknown-key") || err.contains("revoked"),
        "{err}"
    );
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("email: alex@example.org"), "{shown}");
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "after the rotation",
    ]);

    // Export, then erase one family: its records are gone.
    let export: Value = serde_json::from_str(&alex.ok(&["customer", "export"])).unwrap();
    let tx_family = export["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["scope"] == "transactions")
        .unwrap();
    assert_eq!(tx_family["company"], bank_id.as_str());
    assert_eq!(tx_family["records"].as_array().unwrap().len(), 5);
    // The same export to a bare file name, in the current folder.
    let (code, _, err) = run(alex
        .cmd(&["customer", "export", "--out", "vault.json"])
        .current_dir(homes.path()));
    assert_eq!(code, 0, "{err}");
    let written: Value =
        serde_json::from_slice(&std::fs::read(homes.path().join("vault.json")).unwrap()).unwrap();
    assert_eq!(written["families"], export["families"]);
    alex.fails(
        &[
            "customer",
            "erase",
            "--scope",
            "transactions",
            "--company",
            &bank_id,
        ],
        4,
    );
    alex.ok(&[
        "customer",
        "erase",
        "--scope",
        "transactions",
        "--company",
        &bank_id,
        "--yes",
    ]);
    let v = alex.json(&["customer", "tx", "list", "--company", &bank_id]);
    assert!(v["transactions"].as_array().unwrap().is_empty(), "{v}");

    // Every device lost: the recovery phrase brings the vault back on a new one, with a new phrase.
    let phone = user("phone");
    let v: Value = serde_json::from_str(&phone.ok_with(
        &["--json", "customer", "recover", "--identity", &alex_id],
        &[("CMR_RECOVERY_PHRASE", &phrase)],
    ))
    .unwrap();
    let new_phrase = v["recovery_phrase"].as_str().unwrap().to_string();
    assert_ne!(new_phrase, phrase);
    let shown = phone.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("email: alex@example.org"), "{shown}");
    let err = alex.fails(&["customer", "profile", "show"], 1);
    assert!(err.contains("unknown-key"), "{err}");
    // The old phrase no longer recovers anything.
    let again = user("again");
    let (code, _, err) = run(again
        .cmd(&["customer", "recover", "--identity", &alex_id])
        .env("CMR_RECOVERY_PHRASE", &phrase));
    assert_eq!(code, 4, "{err}");
    one_line_error(&err);

    // The auditor: a full run, then an incremental one; and a single entry's proof.
    auditor.ok(&["audit", "init"]);
    auditor.ok(&["audit", "register"]);
    // Registered is not admitted: the operator admits auditors with the log key.
    let err = auditor.fails(&["audit", "verify"], 1);
    assert!(err.contains("not admitted"), "{err}");
    let auditor_id = auditor.ok(&["audit", "id"]).trim().to_string();
    let dir = server._dir.path();
    let admit = |verb: &str| {
        let mut c = cmr();
        c.args([
            "--json",
            "operator",
            verb,
            &auditor_id,
            "--server",
            &server.base,
        ])
        .arg("--log-key")
        .arg(dir.join("log.key"))
        .arg("--data")
        .arg(dir.join("data"));
        if let Some(ca) = &server.ca {
            c.env("CMR_CA_FILE", ca);
        }
        let (code, out, err) = run(&mut c);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let admitted = admit("admit-auditor");
    // The customer sees who is an auditor, and since when.
    let seen = phone.json(&["customer", "auditors"]);
    assert_eq!(seen["auditors"][0]["auditor"], auditor_id.as_str());
    assert_eq!(seen["auditors"][0]["admitted"], true);
    assert_eq!(seen["auditors"][0]["since_index"], admitted["index"]);
    let v = auditor.json(&["audit", "verify"]);
    assert_eq!(v["violations"].as_array().unwrap().len(), 0);
    assert_eq!(v["from"], 0);
    let v2 = auditor.json(&["audit", "verify"]);
    assert_eq!(v2["from"], v["size"]);
    let v = auditor.json(&["audit", "proof", "0"]);
    assert_eq!(v["kind"], "key-event");
    // Dismissed, the auditor reads no other party's entry again.
    admit("dismiss-auditor");
    let err = auditor.fails(&["audit", "proof", "0"], 1);
    assert!(err.contains("forbidden"), "{err}");
    let seen = phone.json(&["customer", "auditors"]);
    assert_eq!(seen["auditors"][0]["admitted"], false);

    // The whole vault erased: every later command says so (not a vanished backup); the id stays.
    phone.ok(&["customer", "erase", "--vault", "--yes"]);
    let err = phone.fails(&["customer", "profile", "show"], 4);
    assert!(err.contains("this vault was erased"), "{err}");
    assert_eq!(phone.ok(&["customer", "id"]).trim(), alex_id);
}

/// Sends one raw HTTP/1.1 POST with the given headers and body; returns the status and the body.
fn raw_post(
    addr: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn a_request_signed_before_a_restart_is_refused_after_it() {
    // The server keeps the nonces it saw in memory only: after a restart (here a kill -9), a request
    // signed before it could be replayed, so requests created before the start (plus 5 s) are refused.
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = User {
        home: homes.path().join("alex"),
        server: server.base.clone(),
        vkey: server.vkey.clone(),
        ca: None,
    };
    let id = alex.json(&["customer", "init"])["identity"]
        .as_str()
        .unwrap()
        .to_string();
    alex.ok(&["customer", "register"]);
    let file = std::fs::read(homes.path().join("alex/customer/identity.key")).unwrap();
    let keys = cmr_core::keyfile::open(&file, "amber-quarry-lantern-nimbus-71").unwrap();
    let authority = server.base.trim_start_matches("http://").to_string();
    let path = format!("/v1/vaults/{id}/history");
    let body = br#"{"limit":1}"#;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let h = cmr_core::httpsig::sign_request(
        &cmr_core::httpsig::Request::new("POST", "http", &authority, &path, vec![]),
        body,
        &keys.device.signing,
        &keys.device.id().to_hex(),
        "restart-test-nonce",
        created,
    )
    .unwrap();
    let headers = [
        ("content-digest", h.content_digest.as_str()),
        ("signature-input", h.signature_input.as_str()),
        ("signature", h.signature.as_str()),
    ];
    let (status, _) = raw_post(&authority, &authority, &path, &headers, body);
    assert_eq!(status, 200);
    let (status, answer) = raw_post(&authority, &authority, &path, &headers, body);
    assert_eq!(status, 401, "a replay before the restart: {answer}");
    assert!(answer.contains("replayed"), "{answer}");
    // Kill -9 and start again on the same data: the nonce memory is gone, the horizon is not.
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    let dir = std::mem::replace(&mut server._dir, tempfile::tempdir().unwrap());
    drop(server);
    let again = serve_in(dir, &[]);
    let addr = again.base.trim_start_matches("http://").to_string();
    let (status, answer) = raw_post(&addr, &authority, &path, &headers, body);
    assert_eq!(status, 401, "a replay after the restart: {answer}");
    assert!(answer.contains("created-before-start"), "{answer}");
    // A fresh request from the same device is served once past the horizon (the state names the old port).
    let state_path = homes.path().join("alex/customer/state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["server"] = Value::from(again.base.clone());
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    // (Within the horizon the SDK signs again and retries once a second until it passes.)
    let alex = User {
        server: again.base.clone(),
        ..alex
    };
    alex.ok(&["customer", "history"]);
}

/// The resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A family of 200 records of a megabyte each reads completely with default settings: pages are bounded
/// by bytes, the SDK follows the cursor, and the server's memory grows by less than 32 MiB while serving
/// it (before, a page could hold them all, and the SDK refused the 260 MB answer).
#[test]
fn a_family_of_large_records_reads_whole_in_pages_bounded_by_bytes() {
    use cmr_client::customer::Customer;
    use cmr_client::session::Session;
    use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
    let mut first = serve();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let conn = cmr_client::Connection::new(&first.base).unwrap();
        let pinned = cmr_log::note::NoteVerifier::from_vkey(&first.vkey).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (s, _) = Session::register(conn, cmr_core::identity::Role::Customer, pinned, now)
            .await
            .unwrap();
        let mut alex = Customer::new(s, PseudonymKey::generate(&mut rand::rng()));
        let name = FamilyName::profile(Scope::ProfilePreferences).unwrap();
        alex.declare(&[name], now).await.unwrap();
        let family = alex.family_id(&name);
        let record = |i: usize| vec![(i % 251) as u8; 1_000_000];
        let started = std::time::Instant::now();
        for batch in 0..20 {
            let contents: Vec<Vec<u8>> = (batch * 10..batch * 10 + 10).map(record).collect();
            let refs: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
            alex.write(family, Period::ORIGIN, &refs).await.unwrap();
        }
        // A fresh server process on the same folder, so that the writes' buffers do not hide what the
        // read costs; then sample its memory while it serves the whole family. It starts by reading
        // every record back against its batch (`--verify-on-open`), 200 MB of them.
        println!("written in {:?}", started.elapsed());
        let _ = first.child.kill();
        let _ = first.child.wait();
        let dir = std::mem::replace(&mut first._dir, tempfile::tempdir().unwrap());
        let server = serve_in(dir, &["--verify-on-open"]);
        let pid = server.child.id();
        alex.session.conn = cmr_client::Connection::new(&server.base).unwrap();
        let before = rss_kib(pid);
        println!("restarted at {:?}", started.elapsed());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                peak
            })
        };
        let records = alex
            .read(family, Period::ORIGIN, Period::ORIGIN)
            .await
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let peak = sampler.join().unwrap();
        println!("read at {:?}", started.elapsed());
        assert_eq!(records.len(), 200);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.content, record(i), "record {i}");
        }
        let growth = peak.saturating_sub(before);
        assert!(
            growth < 32 * 1024,
            "the server grew by {} MiB while serving the read ({} MiB before)",
            growth / 1024,
            before / 1024
        );
        println!(
            "server RSS {} MiB before the read, peak {} MiB during it",
            before / 1024,
            peak / 1024
        );
    });
}

/// An import names its records by their rows, so running it again stores nothing twice: a re-run of the
/// same file, a longer file that starts with it, and an import cut off by a server killed under it all
/// end with each row stored exactly once (two identical rows in one month stay two records).
#[test]
fn an_import_run_again_stores_each_row_once_even_after_the_server_died_under_it() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let vkey = server.vkey.clone();
    let user = |name: &str, base: &str| User {
        home: homes.path().join(name),
        server: base.to_string(),
        vkey: vkey.clone(),
        ca: None,
    };
    let (alex, bank) = (user("alex", &server.base), user("bank", &server.base));
    alex.ok(&["customer", "init"]);
    alex.ok(&["customer", "register"]);
    let bank_id = bank.json(&["company", "init"])["identity"]
        .as_str()
        .unwrap()
        .to_string();
    bank.ok(&["company", "register"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let this = cmr_core::family::Period::from_unix(now).unwrap();
    let month = |back: u32| cmr_core::family::Period(this.0 - back).to_string();
    // Rows over three months, with the same coffee bought three times in one month.
    let rows = |n: usize| -> String {
        let mut csv = String::from("month,text\n");
        for i in 0..n {
            let text = if i % 100 < 3 {
                "coffee 3.20".to_string()
            } else {
                format!("purchase {i}")
            };
            csv.push_str(&format!("{},{text}\n", month((i % 3) as u32)));
        }
        csv
    };
    let write = |name: &str, n: usize| {
        let p = homes.path().join(name);
        std::fs::write(&p, rows(n)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let import = |who: &User, file: &str| {
        who.json(&["customer", "tx", "import", "--company", &bank_id, file])
    };
    let count = |who: &User| {
        who.json(&["customer", "tx", "list", "--company", &bank_id])["transactions"]
            .as_array()
            .unwrap()
            .len()
    };
    let first = write("first.csv", 1200);
    let v = import(&alex, &first);
    assert_eq!(
        (v["imported"].as_u64(), v["skipped"].as_u64()),
        (Some(1200), Some(0))
    );
    let v = import(&alex, &first);
    assert_eq!(
        (v["imported"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(1200))
    );
    let longer = write("longer.csv", 1500);
    let v = import(&alex, &longer);
    assert_eq!(
        (v["imported"].as_u64(), v["skipped"].as_u64()),
        (Some(300), Some(1200))
    );
    assert_eq!(count(&alex), 1500);

    // A large import, and the server killed under it.
    let large = write("large.csv", 60_000);
    let child = alex
        .cmd(&["customer", "tx", "import", "--company", &bank_id, &large])
        .env("CMR_RETRY_SECONDS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once some of its batches are logged (the public checkpoint's size grows by them).
    let addr = server.base.trim_start_matches("http://").to_string();
    let log_size = || -> u64 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /v1/log/checkpoint HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        body.lines()
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    let before = log_size();
    let started = std::time::Instant::now();
    while log_size() < before + 10 && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("import under a kill: {:?}: {err}", out.status.code());
    if !out.status.success() {
        // It says how far it got and that running it again is safe.
        assert!(
            err.contains("of 60000 rows are stored") && err.contains("again is safe"),
            "{err}"
        );
    }
    let dir = std::mem::replace(&mut server._dir, tempfile::tempdir().unwrap());
    drop(server);
    let again = serve_in(dir, &[]);
    let state_path = homes.path().join("alex/customer/state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["server"] = Value::from(again.base.clone());
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let alex = user("alex", &again.base);
    let v = import(&alex, &large);
    assert_eq!(
        v["imported"].as_u64().unwrap() + v["skipped"].as_u64().unwrap(),
        60_000
    );
    assert!(v["skipped"].as_u64().unwrap() >= 1500, "{v}");
    // Rows 0..1500 of the large file are the longer file's rows: 60,000 rows stored in all, each once.
    assert_eq!(count(&alex), 60_000);
    // A future month is refused at entry, with the line.
    let future = homes.path().join("future.csv");
    std::fs::write(
        &future,
        format!(
            "month,text\n{},later\n",
            cmr_core::family::Period(this.0 + 2)
        ),
    )
    .unwrap();
    let err = alex.fails(
        &[
            "customer",
            "tx",
            "import",
            "--company",
            &bank_id,
            future.to_str().unwrap(),
        ],
        4,
    );
    assert!(
        err.contains("future.csv:2") && err.contains("future month"),
        "{err}"
    );
}

/// `cmr serve` as a service manager runs it: nothing is created when its address is taken, the data
/// folder is its owner's alone, its output to a pipe has no colour codes, and SIGTERM drains it like
/// Ctrl-C. And a reader that goes away early (`| head`) ends any command's output quietly.
#[test]
fn serve_behaves_as_a_service_and_output_survives_a_closed_pipe() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(cmr()
        .args(["serve", "--listen", &addr, "--data"])
        .arg(dir.path().join("data"))
        .arg("--log-key")
        .arg(dir.path().join("log.key")));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!dir.path().join("data").exists() && !dir.path().join("log.key").exists());
    drop(taken);

    // Served, to a pipe: the folder is 0700 and nothing on standard output is a colour code.
    let mut child = cmr()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--log-key")
        .arg(dir.path().join("log.key"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("stop with")) {
        seen.push(lines.next().unwrap().unwrap());
    }
    let mode = std::fs::metadata(dir.path().join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    seen.extend(rest);
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(0), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("stopping")), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "{seen:?}");

    // A reader that stops after one line: no panic, exit 0.
    for args in [vec!["completions", "bash"], vec!["--help"]] {
        let mut child = cmr()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        out.read_exact(&mut first).unwrap();
        drop(out);
        let done = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&done.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(done.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// Every command's `--help`, at every level, ends with an example.
#[test]
fn every_command_has_an_example() {
    fn walk(path: Vec<String>, missing: &mut Vec<String>, seen: &mut usize) {
        let (code, out, err) = run(cmr().args(&path).arg("--help").env("COLUMNS", "200"));
        assert_eq!(code, 0, "{path:?}: {err}");
        *seen += 1;
        if !out.contains("Example") {
            missing.push(path.join(" "));
        }
        let Some(section) = out.split("Commands:\n").nth(1) else {
            return;
        };
        for line in section.lines().take_while(|l| !l.is_empty()) {
            let Some(name) = line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            else {
                continue;
            };
            if name != "help" && !line.starts_with("   ") {
                let mut next = path.clone();
                next.push(name.to_string());
                walk(next, missing, seen);
            }
        }
    }
    let (mut missing, mut seen) = (Vec::new(), 0);
    walk(Vec::new(), &mut missing, &mut seen);
    assert!(seen > 50, "only {seen} commands found");
    assert!(missing.is_empty(), "no example in: {missing:?}");
}

/// A client that pinned another log key is told both keys and how to pin the right one; `cmr config`
/// shows and changes the server and the key; `CMR_SERVER` overrides the saved server for every command.
#[test]
fn a_wrong_pinned_key_is_named_and_config_fixes_it() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let home = homes.path().join("alex");
    let h = home.to_str().unwrap();
    let wrong = "localhost/cmr-vault+423668a3+ARNvWSEFVkTp3XZpPeVy1WzXX8InvvaBtpc6obNo6NYE";
    let cmd = |args: &[&str]| {
        let mut c = cmr();
        c.arg("--home").arg(h).args(args).env_remove("CMR_SERVER");
        c
    };
    let (code, _, err) = run(&mut cmd(&[
        "customer",
        "init",
        "--server",
        &server.base,
        "--log-vkey",
        wrong,
    ]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&mut cmd(&["customer", "register"]));
    assert_eq!(code, 3, "{err}");
    one_line_error(&err);
    // `name+keyid`: the first two fields (the third, base64, may itself hold a '+').
    let name_and_id = |vkey: &str| vkey.splitn(3, '+').take(2).collect::<Vec<_>>().join("+");
    let (pinned, real) = (name_and_id(wrong), name_and_id(&server.vkey));
    assert!(
        err.contains(&format!(
            "the server's log key is {real}, and this client pinned {pinned}"
        )) && err.contains("cmr config set --log-vkey"),
        "{err}"
    );
    let (code, _, err) = run(&mut cmd(&["customer", "config-is-not-here"]));
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run(&mut cmd(&[
        "--json",
        "config",
        "set",
        "--log-vkey",
        &server.vkey,
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("customer"), "{out}");
    let (code, _, err) = run(&mut cmd(&["customer", "register"]));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&mut cmd(&["--json", "config", "show"]));
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["identities"][0]["server"], server.base.as_str());
    assert_eq!(v["identities"][0]["log_vkey"], server.vkey.as_str());
    // CMR_SERVER overrides the saved server: a dead address fails, the saved one works again.
    let (code, _, err) = run(cmd(&["customer", "grants"]).env("CMR_SERVER", "http://127.0.0.1:9"));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("cmr config show"), "{err}");
    let (code, _, err) = run(&mut cmd(&["customer", "grants"]));
    assert_eq!(code, 0, "{err}");
}

/// A weak passphrase is refused with the estimator's reason; scripts may keep the passphrase in a file.
#[test]
fn weak_passphrases_are_refused_and_a_passphrase_file_works() {
    let homes = tempfile::tempdir().unwrap();
    let h = homes.path().join("alex");
    let vkey = "localhost/cmr-vault+423668a3+ARNvWSEFVkTp3XZpPeVy1WzXX8InvvaBtpc6obNo6NYE";
    let init = |c: &mut Command| {
        c.arg("--home").arg(&h).args([
            "customer",
            "init",
            "--server",
            "http://127.0.0.1:9",
            "--log-vkey",
            vkey,
        ]);
        run(c)
    };
    let (code, _, err) = init(cmr().env("CMR_PASSPHRASE", "password1"));
    assert_eq!(code, 4, "{err}");
    one_line_error(&err);
    assert!(err.contains("too weak"), "{err}");
    assert!(!h.join("customer/identity.key").exists());
    let file = homes.path().join("pass.txt");
    std::fs::write(&file, "amber-quarry-lantern-nimbus-71\n").unwrap();
    let (code, _, err) = init(
        cmr()
            .env_remove("CMR_PASSPHRASE")
            .arg("--passphrase-file")
            .arg(&file),
    );
    assert_eq!(code, 0, "{err}");
    // The same passphrase from the environment opens the key the file sealed (the newline is not in it);
    // a wrong one in the file is refused.
    let (code, out, err) = run(cmr().arg("--home").arg(&h).args(["customer", "grants"]));
    assert_ne!(code, 4, "{err}{out}");
    std::fs::write(&file, "not it\n").unwrap();
    let (code, _, err) = run(cmr()
        .env_remove("CMR_PASSPHRASE")
        .env("CMR_PASSPHRASE_FILE", &file)
        .arg("--home")
        .arg(&h)
        .args(["customer", "grants"]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("passphrase"), "{err}");
}

/// `eval "$(cmr unlock)"`: the passphrase is typed once, later commands need none until `cmr lock` (or the
/// end of the period); a session token with its expiry changed opens nothing.
#[test]
fn an_unlocked_session_needs_no_passphrase_until_locked() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = User {
        home: homes.path().join("alex"),
        server: server.base.clone(),
        vkey: server.vkey.clone(),
        ca: None,
    };
    alex.ok(&["customer", "init"]);
    alex.ok(&["customer", "register"]);
    let line = alex.ok(&["unlock", "--minutes", "5"]);
    let token = line
        .trim()
        .strip_prefix("export CMR_SESSION=")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    let without_passphrase = |token: &str| {
        let mut c = alex.cmd(&["customer", "grants"]);
        c.env_remove("CMR_PASSPHRASE").env("CMR_SESSION", token);
        run(&mut c)
    };
    let (code, _, err) = without_passphrase(&token);
    assert_eq!(code, 0, "{err}");
    // A longer expiry written into the token does not open the session file.
    let (secret, until) = token.rsplit_once('.').unwrap();
    let forged = format!("{secret}.{}", until.parse::<u64>().unwrap() + 3600);
    let (code, _, err) = without_passphrase(&forged);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("passphrase"), "{err}");
    alex.ok(&["lock"]);
    let (code, _, err) = without_passphrase(&token);
    assert_eq!(code, 4, "{err}");
}

/// `cmr serve` over `data` (or the store in `extra`) with the log key at `log_key`, kept by the caller.
fn serve_with(data: &std::path::Path, log_key: &std::path::Path, extra: &[&str]) -> Server {
    spawn(data, log_key, extra, tempfile::tempdir().unwrap())
}

/// Starts `cmr serve` and reads its address and log verifier key from what it prints; `dir` lives as
/// long as the server.
fn spawn(
    data: &std::path::Path,
    log_key: &std::path::Path,
    extra: &[&str],
    dir: tempfile::TempDir,
) -> Server {
    let mut child = cmr()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--log-key")
        .arg(log_key)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut base, mut vkey) = (String::new(), String::new());
    while base.is_empty() || vkey.is_empty() {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line
            .split(" on ")
            .nth(1)
            .filter(|_| line.starts_with("CMR Vault serving"))
        {
            base = rest.trim().to_string();
        }
        if let Some(k) = line.strip_prefix("log verifier key (clients pin it): ") {
            vkey = k.trim().to_string();
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        base,
        vkey,
        ca: None,
        _dir: dir,
    }
}

/// Two `cmr serve` processes on one PostgreSQL database serve one vault: a customer who writes through
/// one and reads through the other finds everything, and every checkpoint either serves is consistent
/// with those the other served (the client checks each against all it has seen). On a real PostgreSQL
/// (skipped with a note when it is not installed, unless `CMR_REQUIRE_POSTGRES` is set, as in CI).
#[test]
fn two_servers_on_one_database_serve_one_vault() {
    let Some(cluster) = cmr_postgres::cluster::Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    cluster.create_database("two").unwrap();
    let url = format!(
        "postgresql://cmr@localhost/two?host={}",
        cluster.socket_dir().display()
    );
    let keep = tempfile::tempdir().unwrap();
    let log_key = keep.path().join("log.key");
    let first = serve_with(&keep.path().join("a"), &log_key, &["--store", &url]);
    let second = serve_with(&keep.path().join("b"), &log_key, &["--store", &url]);
    assert_eq!(first.vkey, second.vkey);
    let homes = tempfile::tempdir().unwrap();
    let through = |server: &Server| User {
        home: homes.path().join("alex"),
        server: server.base.clone(),
        vkey: server.vkey.clone(),
        ca: None,
    };
    let (one, two) = (through(&first), through(&second));
    one.ok(&["customer", "init"]);
    one.ok(&["customer", "register"]);
    one.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@example.org",
    ]);
    // Read back through the other server, then written through it and read through the first.
    let shown = two.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@example.org"), "{shown}");
    two.ok(&["customer", "profile", "set", "preferences", "language: en"]);
    let shown = one.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("language: en"), "{shown}");
    for user in [&one, &two, &one] {
        user.ok(&["customer", "history"]);
    }
}

/// A vault served on sled moves into PostgreSQL with `cmr migrate` (which proves the same log there), and
/// `cmr serve --store` serves it: the customer's profile reads back and the history verifies, under
/// the same pinned log key. On a real PostgreSQL (skipped with a note when it is not installed, unless
/// `CMR_REQUIRE_POSTGRES` is set, as in CI).
#[test]
fn a_vault_moves_from_sled_into_postgresql() {
    let Some(cluster) = cmr_postgres::cluster::Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    cluster.create_database("moved").unwrap();
    let url = format!(
        "postgresql://cmr@localhost/moved?host={}",
        cluster.socket_dir().display()
    );
    let keep = tempfile::tempdir().unwrap();
    let homes = tempfile::tempdir().unwrap();
    let data = keep.path().join("data");
    let log_key = keep.path().join("log.key");
    let serve_on = |store: &[&str]| serve_with(&data, &log_key, store);
    let on_sled = serve_on(&[]);
    let alex = alex_on(&on_sled, homes.path());
    let vkey = on_sled.vkey.clone();
    // Refused while the server holds the folder.
    let (code, _, err) = run(cmr()
        .args(["migrate", "--to", &url, "--data"])
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_ne!(code, 0, "{err}");
    drop(on_sled);

    let (code, out, err) = run(cmr()
        .args(["--json", "migrate", "--to", &url, "--data"])
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["rows"].as_u64().unwrap() > 10, "{v}");
    assert!(v["size"].as_u64().unwrap() >= 4, "{v}");

    let on_postgres = serve_on(&["--store", &url]);
    assert_eq!(on_postgres.vkey, vkey);
    let alex = User {
        server: on_postgres.base.clone(),
        ..alex
    };
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@example.org"), "{shown}");
    alex.ok(&["customer", "history"]);
    // A second migration into the same database is refused: it is no longer empty.
    drop(on_postgres);
    let (code, _, err) = run(cmr()
        .args(["migrate", "--to", &url, "--data"])
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_ne!(code, 0);
    assert!(err.contains("empty"), "{err}");
}

/// A CA of its own and a certificate it issues for the loopback server (`127.0.0.1` and `localhost`),
/// as PEM files in `dir`: (the CA's certificate, the server's, the server's key).
fn test_ca(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("test CA {name}"));
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, format!("vault {name}"));
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// `cmr serve --tls-cert --tls-key` serves HTTPS: the whole scripted session runs over it with the
/// private CA pinned (`CMR_CA_FILE`); without the CA the CLI names the unknown certificate; and SIGHUP
/// serves a renewed certificate from the next handshake on, while a connection opened before keeps
/// working.
#[test]
fn the_session_over_https_with_a_pinned_ca_and_a_certificate_renewed_on_sighup() {
    let certs = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = test_ca(certs.path(), "one");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let mut server = serve_in(
        tempfile::tempdir().unwrap(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    server.ca = Some(ca1.clone());

    // Without the CA: the system's roots do not know it, and the error says why.
    let homes = tempfile::tempdir().unwrap();
    let stranger = User {
        home: homes.path().join("stranger"),
        server: server.base.clone(),
        vkey: server.vkey.clone(),
        ca: None,
    };
    stranger.ok(&["customer", "init"]);
    let err = stranger.fails(&["customer", "register"], 5);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    scripted_session(&server);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pem = |p: &PathBuf| std::fs::read(p).unwrap();
    let trusting = |ca: &PathBuf| {
        cmr_client::Connection::new(&server.base)
            .unwrap()
            .with_ca_pem(&pem(ca))
            .unwrap()
    };
    runtime.block_on(async {
        let before = trusting(&ca1);
        assert_eq!(before.get_text("/healthz").await.unwrap(), "ok");
        // A renewed certificate from another CA, read on SIGHUP.
        let (ca2, cert2, key2) = test_ca(certs.path(), "two");
        std::fs::copy(&cert2, &cert).unwrap();
        std::fs::copy(&key2, &key).unwrap();
        let hup = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        let mut renewed = false;
        for _ in 0..100 {
            if trusting(&ca2).get_text("/healthz").await.is_ok() {
                renewed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            renewed,
            "the renewed certificate is not served after SIGHUP"
        );
        // New handshakes get the new certificate; the connection opened before goes on.
        assert!(trusting(&ca1).get_text("/healthz").await.is_err());
        assert_eq!(before.get_text("/healthz").await.unwrap(), "ok");
    });
}

/// An operator backs up a running server, the vault goes on, the server is lost and its backup
/// restored: the restore checks the snapshot (a damaged one is refused and leaves nothing), the
/// restored server serves the vault as it was, and the customer's client, which saw the later log,
/// refuses it and says the vault was restored from a backup.
#[test]
fn a_backup_taken_while_serving_restores_and_clients_that_saw_more_are_told() {
    let keep = tempfile::tempdir().unwrap();
    let homes = tempfile::tempdir().unwrap();
    let (data, log_key) = (keep.path().join("data"), keep.path().join("log.key"));
    let snap = keep.path().join("vault.cmrsnap");
    let live = serve_with(&data, &log_key, &[]);
    let alex = alex_on(&live, homes.path());
    let bank = User {
        home: homes.path().join("bank"),
        ..alex.clone()
    };
    bank.ok(&["company", "init"]);
    bank.ok(&["company", "register"]);

    // Online: the server keeps its folder; the snapshot comes through its control socket.
    let backed = json_of(
        cmr()
            .args(["--json", "backup"])
            .arg(&snap)
            .arg("--data")
            .arg(&data),
    );
    let size = backed["size"].as_u64().unwrap();
    assert!(size >= 4, "{backed}");
    assert_eq!(
        std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A backup never overwrites another.
    let (code, _, err) = run(cmr().arg("backup").arg(&snap).arg("--data").arg(&data));
    assert_ne!(code, 0);
    assert!(err.contains("exists"), "{err}");

    // The vault goes on after the backup; then the server and its folder are lost.
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@new.example",
    ]);
    drop(live);
    std::fs::remove_dir_all(&data).unwrap();

    // A damaged copy is refused, and leaves no folder a server would open.
    let mut damaged = std::fs::read(&snap).unwrap();
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    let bad = keep.path().join("damaged.cmrsnap");
    std::fs::write(&bad, &damaged).unwrap();
    let (code, _, err) = run(cmr()
        .arg("restore")
        .arg(&bad)
        .arg("--data")
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_ne!(code, 0);
    assert!(err.contains("restore refused"), "{err}");
    assert!(!data.join("db").exists());

    let (code, out, err) = run(cmr()
        .args(["--json", "restore"])
        .arg(&snap)
        .arg("--data")
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_eq!(code, 0, "{err}");
    let restored: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored["size"], backed["size"]);
    assert_eq!(restored["root"], backed["root"]);

    let again = serve_with(&data, &log_key, &[]);
    assert_eq!(again.vkey, alex.vkey);
    let alex = User {
        server: again.base.clone(),
        ..alex
    };
    let bank = User {
        server: again.base.clone(),
        ..bank
    };
    // The client saw the profile change the restore lost: it refuses the log and says why.
    let err = alex.fails(&["customer", "profile", "show"], 3);
    assert!(err.contains("restored from a backup"), "{err}");
    assert!(err.contains(&format!("size {size}")), "{err}");
    // The customer accepts the restore: the vault is as it was at the backup, and goes on from there.
    let said = alex.json(&["customer", "accept-restore"]);
    assert_eq!(said["restored_size"].as_u64(), Some(size));
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@example.org"), "{shown}");
    assert!(!shown.contains("alex@new.example"), "{shown}");
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@again.example",
    ]);
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@again.example"), "{shown}");
    alex.ok(&["customer", "history"]);
    // The company, registered before the backup, saw nothing the restore took back; accepting it
    // anyway checks the log extends the restored one.
    bank.ok(&["company", "status"]);
    let said = bank.json(&["company", "accept-restore"]);
    assert_eq!(said["restored_size"].as_u64(), Some(size));
    bank.ok(&["company", "status"]);
    // The restore note is part of the documented API.
    let (code, out, _) = run(cmr().arg("openapi"));
    assert_eq!(code, 0);
    assert!(out.contains("/v1/log/restore"));
}

/// A vault on PostgreSQL is backed up from the database while its server runs, and restored into
/// another, empty database (a database that holds data is refused); the restored one serves the vault.
#[test]
fn a_vault_on_postgresql_is_backed_up_while_served_and_restored_into_an_empty_database() {
    let Some(cluster) = cmr_postgres::cluster::Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    let url = |db: &str| {
        cluster.create_database(db).unwrap();
        format!(
            "postgresql://cmr@localhost/{db}?host={}",
            cluster.socket_dir().display()
        )
    };
    let (live_url, restored_url) = (url("live"), url("restored"));
    let keep = tempfile::tempdir().unwrap();
    let homes = tempfile::tempdir().unwrap();
    let (data, log_key) = (keep.path().join("unused"), keep.path().join("log.key"));
    let snap = keep.path().join("vault.cmrsnap");
    let live = serve_with(&data, &log_key, &["--store", &live_url]);
    let alex = alex_on(&live, homes.path());
    let backed = json_of(
        cmr()
            .args(["--json", "backup"])
            .arg(&snap)
            .args(["--store", &live_url, "--log-key"])
            .arg(&log_key),
    );
    // The server served on during the backup.
    alex.ok(&["customer", "profile", "show"]);

    let restore = |to: &str| {
        run(cmr()
            .args(["--json", "restore"])
            .arg(&snap)
            .args(["--store", to, "--log-key"])
            .arg(&log_key))
    };
    let (code, _, err) = restore(&live_url);
    assert_ne!(code, 0);
    assert!(err.contains("already holds data"), "{err}");
    let (code, out, err) = restore(&restored_url);
    assert_eq!(code, 0, "{err}");
    let restored: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored["root"], backed["root"]);
    drop(live);
    let again = serve_with(&data, &log_key, &["--store", &restored_url]);
    let alex = User {
        server: again.base.clone(),
        ..alex
    };
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@example.org"), "{shown}");
}

/// Ten thousand connections held open without a word: `cmr serve` raises its descriptor limit at start,
/// holds them all while answering others, and closes every one after the header deadline.
#[test]
fn ten_thousand_idle_connections_are_held_then_closed_while_others_are_served() {
    // The test's own side of the connections needs the descriptors too.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    if limit < 10_500 {
        eprintln!("skipped: this process may open only {limit} descriptors");
        return;
    }
    let server = serve();
    let pid = server.child.id();
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let (fds_before, rss_before) = (fds(), rss_kib(pid));
    // Eight clients at once: a connect on this machine's loopback takes about 2 ms.
    let idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..1_250)
                    .map(|_| std::net::TcpStream::connect(addr).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // Held: the server has accepted them all, and serves a request meanwhile.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fds() < fds_before + 10_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} descriptors",
            fds()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rss_held = rss_kib(pid);
    let answer = get_health(addr);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Closed by the server after the header deadline (10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fds() > fds_before + 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} descriptors still open",
            fds()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "10,000 idle connections: server RSS {rss_before} KiB before, {rss_held} KiB while held \
         ({} bytes a connection)",
        (rss_held.saturating_sub(rss_before) * 1024) / 10_000
    );
    drop(idle);
}

/// The server's descriptors run out (its limit lowered under it, below what its connection cap
/// assumed): new connections wait in the queue instead of failing, the store does not lose what it
/// acknowledged, and once idle connections are closed (after the header deadline) the server serves
/// again by itself.
#[test]
fn when_the_descriptors_run_out_the_server_waits_and_comes_back_by_itself() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let pid = server.child.id();
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let lowered = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=256:256")
        .status()
        .is_ok_and(|s| s.success());
    if !lowered {
        eprintln!("skipped: prlimit is not available");
        return;
    }
    // More idle connections than descriptors left.
    let idle: Vec<std::net::TcpStream> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    // A customer's write meanwhile waits for a descriptor, then is served (its client retries what
    // it must); nothing acknowledged is lost.
    let started = std::time::Instant::now();
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "contact",
        "email: alex@later.example",
    ]);
    let waited = started.elapsed();
    drop(idle);
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@later.example"), "{shown}");
    let health = get_health(addr);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    eprintln!("a write under descriptor exhaustion waited {waited:?}");
}

/// `GET /readyz` on a connection of its own.
fn get_health(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// A data folder on a file system mounted read-only: `cmr serve` refuses to start with one line that
/// says so (exit 4), and starts with everything intact once it is writable again. Root only (it mounts
/// a tmpfs); skipped with a note otherwise, unless `CMR_REQUIRE_MOUNT` is set, as in CI.
#[test]
fn a_read_only_data_folder_is_refused_clearly_and_served_once_writable() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = |opts: &str| {
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !mount("size=64m") {
        assert!(
            std::env::var_os("CMR_REQUIRE_MOUNT").is_none(),
            "cannot mount a tmpfs (CMR_REQUIRE_MOUNT is set)"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let (data, log_key) = (mnt.join("data"), dir.path().join("log.key"));
    let homes = tempfile::tempdir().unwrap();
    let first = serve_with(&data, &log_key, &[]);
    let alex = alex_on(&first, homes.path());
    drop(first);
    let remount = |opts: &str| {
        // sled lets go of its files a moment after the process ends.
        for _ in 0..50 {
            if Command::new("mount")
                .args(["-o", &format!("remount,{opts}")])
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cannot remount {opts}");
    };
    remount("ro");
    let (code, _, err) = run(cmr()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--log-key")
        .arg(&log_key));
    assert_eq!(code, 4, "{err}");
    one_line_error(&err);
    assert!(err.to_lowercase().contains("read-only"), "{err}");
    remount("rw");
    let again = serve_with(&data, &log_key, &[]);
    let alex = User {
        server: again.base.clone(),
        ..alex
    };
    let shown = alex.ok(&["customer", "profile", "show"]);
    assert!(shown.contains("alex@example.org"), "{shown}");
}

/// `POST`/`GET` to the gateway with an optional bearer token: the status and the JSON answer.
fn gateway_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let json = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (status, json)
}

/// A company's backend integrates through the gateway with plain JSON: it asks, the customer
/// approves, the grant shows, the read returns verified and decrypted records, an append lands in the
/// vault, and after the revocation the next read is refused with the vault's stable code. Without the
/// token nothing is served; beyond loopback the gateway refuses to listen.
#[test]
fn a_company_backend_uses_the_gateway_with_plain_json() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let alex_id = alex.ok(&["customer", "id"]).trim().to_string();
    let (bank, bank_id, bank_domain) = acme_bank(&alex, homes.path());
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "coffee 3.20",
    ]);

    // Beyond loopback only when told.
    let (code, _, err) = run(&mut bank.cmd(&["company", "gateway", "--listen", "0.0.0.0:0"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("loopback"), "{err}");

    let (_gateway, addr, token) = start_gateway(&bank);
    let t = Some(token.as_str());

    // No token, a wrong token: 401, nothing served. The document is public.
    assert_eq!(gateway_call(&addr, "GET", "/v1/grants", None, None).0, 401);
    let (status, problem) = gateway_call(
        &addr,
        "GET",
        "/v1/grants",
        Some("wrong-token-wrong-token-wrong-token"),
        None,
    );
    assert_eq!(
        (status, problem["title"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, doc) = gateway_call(&addr, "GET", "/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/grants/{grant}/read"].is_object(), "{doc}");

    // Events: the backend listens before anything happens.
    let events = gateway_events(&addr, &token);
    // The backend asks; the customer approves, narrowed to three months.
    let (status, sent) = gateway_call(
        &addr,
        "POST",
        "/v1/requests",
        t,
        Some(serde_json::json!({
            "customer": alex_id,
            "scopes": ["transactions:read+append"],
            "purpose": "spending insights",
            "lookback_months": 12
        })),
    );
    assert_eq!(status, 200, "{sent}");
    let request = sent["request"].as_str().unwrap().to_string();
    let (_, listed) = gateway_call(&addr, "GET", "/v1/requests", t, None);
    assert_eq!(listed["requests"][0]["status"], "pending", "{listed}");
    alex.ok(&[
        "customer",
        "approve",
        &request,
        "--domain",
        &bank_domain,
        "--lookback",
        "3",
        "--insecure-http-for-tests",
    ]);
    let (status, held) = gateway_call(&addr, "GET", "/v1/grants", t, None);
    assert_eq!(status, 200, "{held}");
    let g = &held["grants"][0];
    assert_eq!(g["status"], "active", "{held}");
    assert_eq!(g["purpose"], "spending insights");
    assert_eq!(g["customer"], alex_id.as_str());
    let grant = g["grant"].as_str().unwrap().to_string();
    expect_event(&events, "grant-new", Some(&grant));
    // Three months of the twelve asked: narrowed, said by the grant and by an event.
    assert_eq!(g["narrowed"], true, "{held}");
    expect_event(&events, "grant-narrowed", Some(&grant));

    // A verified, decrypted read; an append that the customer then sees.
    let (status, read) = gateway_call(
        &addr,
        "POST",
        &format!("/v1/grants/{grant}/read"),
        t,
        Some(serde_json::json!({"scope": "transactions"})),
    );
    assert_eq!(status, 200, "{read}");
    let texts: Vec<&str> = read["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["text"].as_str())
        .collect();
    assert_eq!(texts, ["coffee 3.20"], "{read}");
    let (status, appended) = gateway_call(
        &addr,
        "POST",
        &format!("/v1/grants/{grant}/append"),
        t,
        Some(serde_json::json!({"text": "category: coffee lover"})),
    );
    assert_eq!(status, 200, "{appended}");
    assert!(appended["index"].is_u64());
    let listed = alex.ok(&["customer", "tx", "list", "--company", &bank_id]);
    assert!(listed.contains("category: coffee lover"), "{listed}");
    // The company's own history: the read, then the append, as the customer's chain logged them.
    let (status, own) = gateway_call(
        &addr,
        "GET",
        &format!("/v1/accesses?customer={alex_id}"),
        t,
        None,
    );
    assert_eq!(status, 200, "{own}");
    let kinds: Vec<&str> = own["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["read", "append"], "{own}");
    assert_eq!(own["accesses"][0]["grant"], grant.as_str(), "{own}");

    // A one-time grant on the same family, used by a read: the customer's rotation then seals the
    // family's new key to the grant that stays, and the gateway says it was delivered.
    let once = alex.json(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "transactions:read",
        "--purpose",
        "one statement",
        "--duration",
        "once",
        "--insecure-http-for-tests",
    ])["grant"]
        .as_str()
        .unwrap()
        .to_string();
    expect_event(&events, "grant-new", Some(&once));
    let (status, read) = gateway_call(
        &addr,
        "POST",
        &format!("/v1/grants/{once}/read"),
        t,
        Some(serde_json::json!({"scope": "transactions"})),
    );
    assert_eq!(status, 200, "{read}");
    expect_event(&events, "grant-used", None);
    alex.ok(&["customer", "rotate"]);
    expect_event(&events, "rotation-delivered", Some(&grant));

    // Bad input: a clear refusal, never a 500.
    let (status, problem) = gateway_call(
        &addr,
        "POST",
        &format!("/v1/grants/{grant}/read"),
        t,
        Some(serde_json::json!({"scope": "no-such-scope"})),
    );
    assert_eq!(
        (status, problem["title"].as_str()),
        (400, Some("bad-request")),
        "{problem}"
    );
    let (status, _) = gateway_call(
        &addr,
        "POST",
        "/v1/grants/zz/read",
        t,
        Some(serde_json::json!({"scope": "transactions"})),
    );
    assert_eq!(status, 400);

    // Revoked: an event within a second, and the next read is refused with the vault's stable code.
    alex.ok(&["customer", "revoke", &grant]);
    let revoked = std::time::Instant::now();
    let event = events
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("no grant-revoked event");
    let took = revoked.elapsed();
    assert_eq!(event["kind"], "grant-revoked", "{event}");
    assert!(
        took < std::time::Duration::from_secs(1),
        "the revocation's event took {took:?}"
    );
    eprintln!("grant-revoked event {took:?} after the revocation was acknowledged");
    let (status, problem) = gateway_call(
        &addr,
        "POST",
        &format!("/v1/grants/{grant}/read"),
        t,
        Some(serde_json::json!({"scope": "transactions"})),
    );
    assert_eq!(
        (status, problem["title"].as_str()),
        (403, Some("grant-revoked")),
        "{problem}"
    );
    let (_, held) = gateway_call(&addr, "GET", "/v1/grants", t, None);
    let status_of = |id: &str| {
        held["grants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["grant"] == id)
            .map(|g| g["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(&grant).as_deref(), Some("revoked"), "{held}");
    assert_eq!(status_of(&once).as_deref(), Some("used"), "{held}");
}

/// The gateway's server-sent events, parsed, as they arrive.
fn gateway_events(addr: &str, token: &str) -> std::sync::mpsc::Receiver<Value> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<Value>(data)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// A child process killed when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gateway's next event (within 10 s) must be of `kind`, for `grant` when given.
fn expect_event(events: &std::sync::mpsc::Receiver<Value>, kind: &str, grant: Option<&str>) {
    let event = events
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no {kind} event"));
    assert_eq!(event["kind"], kind, "{event}");
    if let Some(g) = grant {
        assert_eq!(event["grant"], g, "{event}");
    }
}

/// `cmr company gateway` for `company` on a free loopback port: the process, its address, its token.
fn start_gateway(company: &User) -> (Kill, String, String) {
    start_gateway_with(company, &[])
}

/// [`start_gateway`] with more arguments.
fn start_gateway_with(company: &User, extra: &[&str]) -> (Kill, String, String) {
    let mut args = vec!["company", "gateway", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut child = company
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let addr = first
        .rsplit_once("http://")
        .map(|(_, a)| a.trim().to_string())
        .unwrap();
    let token = std::fs::read_to_string(company.home.join("gateway.token"))
        .unwrap()
        .trim()
        .to_string();
    (Kill(child), addr, token)
}

/// The example backends (Python with the standard library, JavaScript on Node 20 with `fetch`), each
/// run as a company's developer would: it reacts to the customer's grant by reading the transactions
/// and appending a computed attribute the customer then sees, and stops using the data (and exits)
/// once the customer revokes. Neither contains any cryptography.
#[test]
fn the_python_and_node_example_backends_react_to_a_grant_and_to_its_revocation() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let alex_id = alex.ok(&["customer", "id"]).trim().to_string();
    let (bank, bank_id, bank_domain) = acme_bank(&alex, homes.path());
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "coffee 3.20",
    ]);
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "groceries 41.75",
    ]);
    let (_gateway, addr, token) = start_gateway(&bank);
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/gateway");
    for (program, script) in [("python3", "backend.py"), ("node", "backend.mjs")] {
        let mut child = Command::new(program)
            .arg(format!("{examples}/{script}"))
            .args(["--until-revoked", "--timeout", "90"])
            .env("CMR_GATEWAY", format!("http://{addr}"))
            .env("CMR_GATEWAY_TOKEN", &token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, said) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (_, sent) = gateway_call(
            &addr,
            "POST",
            "/v1/requests",
            Some(&token),
            Some(serde_json::json!({
                "customer": alex_id,
                "scopes": ["transactions:read+append"],
                "purpose": format!("insights ({script})"),
            })),
        );
        let request = sent["request"].as_str().unwrap().to_string();
        let granted = alex.json(&[
            "customer",
            "approve",
            &request,
            "--domain",
            &bank_domain,
            "--insecure-http-for-tests",
        ]);
        let grant = granted["grant"].as_str().unwrap().to_string();
        let wait_for = |what: &str| loop {
            let line = said
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{script} never said {what:?}"));
            if line.contains(what) {
                return line;
            }
        };
        let line = wait_for("appended");
        assert!(line.contains("44.95"), "{line}");
        let listed = alex.ok(&["customer", "tx", "list", "--company", &bank_id]);
        assert!(
            listed.contains("insight: spends about 44.95 a month"),
            "{listed}"
        );
        alex.ok(&["customer", "revoke", &grant]);
        wait_for("revoked; its data deleted here");
        let status = child.wait().unwrap();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(status.success(), "{script}: {err}");
    }
}

/// The gateway's webhooks while the company's backend is down for a while: every event is delivered
/// once it is back, in order, signed (RFC 9421 headers), and an event whose first delivery failed comes
/// again with the same event id.
#[test]
fn webhooks_reach_a_backend_that_was_down_in_order_and_with_stable_ids() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let (bank, bank_id, bank_domain) = acme_bank(&alex, homes.path());
    // The backend's port, not listening yet: the backend is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hook = format!("http://127.0.0.1:{port}/cmr-events");
    let (gateway, _, _) = start_gateway_with(&bank, &["--webhook", &hook]);
    let grant = alex.json(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "transactions:read",
        "--purpose",
        "statements",
        "--insecure-http-for-tests",
    ])["grant"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(std::time::Duration::from_millis(700));
    alex.ok(&["customer", "revoke", &grant]);
    // Down a while longer: deliveries fail and are tried again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, got) = std::sync::mpsc::channel::<(u16, String, Value)>();
    std::thread::spawn(move || {
        let mut n = 0;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then the body by its length.
            let (head, body) = loop {
                let k = s.read(&mut buf).unwrap_or(0);
                if k == 0 {
                    break (String::new(), Vec::new());
                }
                raw.extend_from_slice(&buf[..k]);
                if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..at]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while raw.len() < at + 4 + len {
                        let k = s.read(&mut buf).unwrap_or(0);
                        if k == 0 {
                            break;
                        }
                        raw.extend_from_slice(&buf[..k]);
                    }
                    break (head, raw[at + 4..].to_vec());
                }
            };
            // The first delivery after the backend is back fails too.
            let status = if n == 0 { 503 } else { 200 };
            n += 1;
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if tx.send((status, head, event)).is_err() {
                return;
            }
        }
    });
    let mut taken = Vec::new();
    let mut first_failed = None;
    while taken.len() < 2 {
        let (status, head, event) = got
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the webhooks never came");
        assert!(
            head.contains("signature-input: cmr=") && head.contains("content-digest: sha-256="),
            "{head}"
        );
        let id = event["id"].as_u64().unwrap();
        assert!(head.contains(&format!("cmr-event-id: {id}")), "{head}");
        if status == 503 {
            first_failed = Some(id);
        } else {
            taken.push((id, event["kind"].as_str().unwrap().to_string()));
        }
    }
    let kinds: Vec<&str> = taken.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(kinds, ["grant-new", "grant-revoked"], "{taken:?}");
    assert!(taken[0].0 < taken[1].0);
    // The one refused came again with the same id.
    assert_eq!(first_failed, Some(taken[0].0));

    // The gateway stops (killed); the customer grants again meanwhile; the gateway starts again. The
    // change made while it was down is an event, its id after the ones delivered (ids go on across
    // runs). At least once: an event whose 200 the gateway had not recorded when it was killed may come
    // again, with the same id (which is how a backend knows it).
    drop(gateway);
    alex.ok(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "profile.contact:read",
        "--purpose",
        "statements by email",
        "--insecure-http-for-tests",
    ]);
    let (_gateway, _, _) = start_gateway_with(&bank, &["--webhook", &hook]);
    let event = loop {
        let (status, _, event) = got
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the change made while the gateway was down never came");
        assert_eq!(status, 200);
        let id = event["id"].as_u64().unwrap();
        match taken.iter().find(|(t, _)| *t == id) {
            Some((_, kind)) => assert_eq!(event["kind"].as_str(), Some(kind.as_str())),
            None => break event,
        }
    };
    assert_eq!(event["kind"], "grant-new", "{event}");
    assert!(event["id"].as_u64().unwrap() > taken[1].0, "{event}");
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream`, one request per connection; while `tamper`
/// holds a function, every JSON answer to a path containing `/read` goes through it first.
type Rewrite = Box<dyn Fn(&mut Value) + Send>;
type ReadTamper = std::sync::Arc<std::sync::Mutex<Option<Rewrite>>>;

fn tampering_proxy(listener: std::net::TcpListener, upstream: String, tamper: ReadTamper) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut client) = stream else { continue };
            let upstream = upstream.clone();
            let tamper = tamper.clone();
            std::thread::spawn(move || {
                let Some((head, body)) = read_http(&mut client) else {
                    return;
                };
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let mut server = std::net::TcpStream::connect(&upstream).unwrap();
                // One request per connection, both ways.
                let head = head
                    .lines()
                    .filter(|l| !l.to_lowercase().starts_with("connection:"))
                    .collect::<Vec<_>>()
                    .join("\r\n");
                let _ = server.write_all(format!("{head}\r\nconnection: close\r\n\r\n").as_bytes());
                let _ = server.write_all(&body);
                let Some((answer_head, mut answer)) = read_http(&mut server) else {
                    return;
                };
                if path.contains("/read")
                    && let Some(t) = tamper.lock().unwrap().as_ref()
                    && let Ok(mut v) = serde_json::from_slice::<Value>(&answer)
                {
                    t(&mut v);
                    answer = serde_json::to_vec(&v).unwrap();
                }
                let answer_head = answer_head
                    .lines()
                    .filter(|l| {
                        let l = l.to_lowercase();
                        !l.starts_with("content-length:") && !l.starts_with("connection:")
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n");
                let _ = client.write_all(
                    format!(
                        "{answer_head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        answer.len()
                    )
                    .as_bytes(),
                );
                let _ = client.write_all(&answer);
            });
        }
    });
}

/// One HTTP/1.1 message with a content-length body (or none): its head and its body.
fn read_http(s: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let k = s.read(&mut buf).ok()?;
        if k == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..k]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..at]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let l = l.to_lowercase();
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while raw.len() < at + 4 + len {
                let k = s.read(&mut buf).ok()?;
                if k == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..k]);
            }
            return Some((head, raw[at + 4..].to_vec()));
        }
    }
}

/// A malicious vault server (a proxy rewriting its read answers) cannot get dropped, injected or
/// altered records to the company's backend as data: the gateway answers `verification-failed`, and
/// serves the honest answer again once the server behaves. A head other than the one the log recorded
/// with the access (an older one, to leave the newest records out) is refused too.
#[test]
fn through_a_tampering_server_the_gateway_serves_no_bad_data() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    // Clients address the proxy and sign for it; the server checks that authority.
    let server = serve_in(tempfile::tempdir().unwrap(), &["--authority", &proxy_addr]);
    let tamper: ReadTamper = std::sync::Arc::new(std::sync::Mutex::new(None));
    tampering_proxy(
        proxy,
        server.base.trim_start_matches("http://").to_string(),
        tamper.clone(),
    );
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_at(&format!("http://{proxy_addr}"), &server.vkey, homes.path());
    let (bank, bank_id, bank_domain) = acme_bank(&alex, homes.path());
    for t in ["coffee 3.20", "groceries 41.75"] {
        alex.ok(&["customer", "tx", "add", "--company", &bank_id, t]);
    }
    let grant = alex.json(&[
        "customer",
        "grant",
        "--company",
        &bank_id,
        "--domain",
        &bank_domain,
        "--scope",
        "transactions:read",
        "--purpose",
        "statements",
        "--insecure-http-for-tests",
    ])["grant"]
        .as_str()
        .unwrap()
        .to_string();
    let (_gateway, addr, token) = start_gateway(&bank);
    let read = || {
        gateway_call(
            &addr,
            "POST",
            &format!("/v1/grants/{grant}/read"),
            Some(&token),
            Some(serde_json::json!({"scope": "transactions"})),
        )
    };
    let (status, honest) = read();
    assert_eq!(status, 200, "{honest}");
    assert_eq!(honest["records"].as_array().unwrap().len(), 2);
    let attacks: Vec<(&str, Rewrite)> = vec![
        (
            "a record dropped",
            Box::new(|v: &mut Value| {
                v["records"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "a record injected",
            Box::new(|v: &mut Value| {
                let r = v["records"][0].clone();
                v["records"].as_array_mut().unwrap().push(r);
            }),
        ),
        (
            "a record altered",
            Box::new(|v: &mut Value| {
                let r = v["records"][0].as_str().unwrap().to_string();
                let mut bytes = B64.decode(&r).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                v["records"][0] = Value::String(B64.encode(bytes));
            }),
        ),
        (
            "another head than the one logged with the access",
            Box::new(|v: &mut Value| {
                v["proof_of_read"]["head"]["batches"] = serde_json::json!(0);
            }),
        ),
    ];
    for (what, attack) in attacks {
        *tamper.lock().unwrap() = Some(attack);
        let (status, problem) = read();
        assert_eq!(status, 502, "{what}: {problem}");
        assert_eq!(problem["title"], "verification-failed", "{what}: {problem}");
        assert!(problem.get("records").is_none(), "{what}: data served");
    }
    *tamper.lock().unwrap() = None;
    let (status, again) = read();
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["records"].as_array().unwrap().len(), 2);
}

/// Where the browser tests live: their Node project (playwright-core, axe-core, with a lock file).
fn browser_tests() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let ready = Path::new("/usr/bin/chromium").exists()
        && dir.join("node_modules/playwright-core").exists()
        && dir.join("node_modules/axe-core").exists();
    if ready {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CMR_REQUIRE_BROWSER").is_none(),
        "CMR_REQUIRE_BROWSER is set, but Chromium (/usr/bin/chromium) or the browser tests' npm packages \
         are missing: tests/run installs both"
    );
    eprintln!(
        "skipped: the browser test needs Debian's chromium and `npm ci` in {} (tests/run does both)",
        dir.display()
    );
    None
}

/// The consent dashboard in Debian's Chromium: a company's request appears without a reload; the
/// customer approves it narrowed; the company reads only what was granted; the customer revokes with
/// one click and a confirmation; the company's next read is refused; the history shows both reads; the
/// audit is green. A cross-site post, a post without the CSRF token and a wrong Host header are refused;
/// axe-core finds no serious violation. The screenshots of docs/guide.md are taken here.
#[test]
fn the_consent_dashboard_in_a_real_browser() {
    let Some(browser) = browser_tests() else {
        return;
    };
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    alex.ok(&[
        "customer",
        "profile",
        "set",
        "address",
        "1 Main St, Springfield",
    ]);
    let alex_id = alex.ok(&["customer", "id"]).trim().to_string();
    let (bank, bank_id, bank_domain) = acme_bank(&alex, homes.path());
    alex.ok(&[
        "customer",
        "tx",
        "add",
        "--company",
        &bank_id,
        "coffee 3.20",
    ]);

    // Beyond loopback only when told.
    let (code, _, err) = run(&mut alex.cmd(&["customer", "ui", "--listen", "0.0.0.0:0"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("loopback"), "{err}");

    let mut child = alex
        .cmd(&[
            "customer",
            "ui",
            "--listen",
            "127.0.0.1:0",
            "--insecure-http-for-tests",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let _ui = Kill(child);
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();

    // While the app holds the customer's state, a command says so instead of overwriting it.
    let err = alex.fails(&["customer", "grants"], 4);
    assert!(err.contains("another cmr process"), "{err}");

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/images");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .current_dir(&browser)
        .env("UI_URL", &url)
        .env("CMR_BIN", cargo_bin("cmr"))
        .env("BANK_HOME", &bank.home)
        .env("CMR_SERVER", &server.base)
        .env("CMR_LOG_VKEY", &server.vkey)
        .env("CMR_PASSPHRASE", "amber-quarry-lantern-nimbus-71")
        .env_remove("CMR_HOME")
        .env("ALEX_ID", &alex_id)
        .env("BANK_DOMAIN", &bank_domain)
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("dashboard: every step behaved as promised"),
        "{said}"
    );
}

/// `cmr customer watch` prints a company's request as it is logged (pushed by the server's event
/// stream, not polled), and a server with a watcher attached still stops at once when told to.
#[test]
fn watch_follows_the_chain_as_it_grows_and_does_not_hold_the_server() {
    let mut server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let alex_id = alex.ok(&["customer", "id"]).trim().to_string();
    let bank = User {
        home: homes.path().join("bank"),
        ..alex.clone()
    };
    bank.ok(&["company", "init"]);
    bank.ok(&["company", "register"]);
    let mut child = alex
        .cmd(&["--json", "customer", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _watch = Kill(child);
    // The watch is running once it printed nothing for a moment and its stream is open.
    std::thread::sleep(std::time::Duration::from_secs(2));
    bank.ok(&[
        "company",
        "request",
        &alex_id,
        "--scope",
        "profile.contact:read",
        "--purpose",
        "newsletter",
    ]);
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(15))
        .expect("the request reaches the watch");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["kind"], "statement", "{v}");
    assert!(v["what"].as_str().unwrap().contains("request"), "{v}");
    // SIGTERM: the open stream ends, so the server drains and exits promptly.
    let started = std::time::Instant::now();
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the server took {:?} to stop with a watcher attached",
        started.elapsed()
    );
}

/// A data folder deeper than a Unix socket address holds (108 bytes) still serves, and `cmr backup`
/// still reaches its control socket (through the folder's handle); before, `cmr serve` refused to start.
#[test]
fn a_deep_data_folder_serves_and_is_backed_up_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir
        .path()
        .join("a-rather-long-folder-name-for-the-operators-vault-data")
        .join("another-level-of-folders-as-deployments-have")
        .join("cmr-data");
    assert!(deep.join("control.sock").as_os_str().len() > 110);
    let server = serve_with(&deep, &dir.path().join("log.key"), &[]);
    let homes = tempfile::tempdir().unwrap();
    alex_on(&server, homes.path());
    let snap = dir.path().join("vault.snapshot");
    let backed = json_of(
        cmr()
            .args(["--json", "backup"])
            .arg(&snap)
            .arg("--data")
            .arg(&deep),
    );
    assert!(backed["size"].as_u64().unwrap() >= 4, "{backed}");
}

/// `cmr company gateway --socket PATH`: only this user's processes reach it (mode 0600), and the
/// bearer token is still required there.
#[test]
fn the_gateway_listens_on_a_unix_socket_only_its_owner_reaches() {
    let server = serve();
    let homes = tempfile::tempdir().unwrap();
    let alex = alex_on(&server, homes.path());
    let (bank, _, _) = acme_bank(&alex, homes.path());
    let socket = homes.path().join("gateway.sock");
    let mut child = bank
        .cmd(&["company", "gateway", "--socket", socket.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let _gateway = Kill(child);
    assert!(first.contains("Unix socket"), "{first}");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(bank.home.join("gateway.token"))
        .unwrap()
        .trim()
        .to_string();
    let get = |auth: Option<&str>| {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        let auth = auth.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET /v1/grants HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(get(None).starts_with("HTTP/1.1 401"), "{}", get(None));
    let ok = get(Some(&token));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"grants\":[]"), "{ok}");
}
