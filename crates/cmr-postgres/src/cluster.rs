//! A temporary PostgreSQL cluster for tests: Debian's `postgresql` package (`initdb`, `pg_ctl`), a data
//! folder in a temporary folder, listening only on a Unix socket there, stopped when dropped. No mock:
//! the tests that use it run against a real server.
//!
//! PostgreSQL refuses to run as root; as root, the cluster runs as the `postgres` user the package
//! creates.
#![allow(clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running temporary cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
}

/// Where Debian puts the server's programs, newest version first.
fn find_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("CMR_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Cluster {
    /// Starts a cluster, or says why it cannot: `Ok(None)` when PostgreSQL is not installed (set
    /// `CMR_REQUIRE_POSTGRES=1` to make that an error, as CI does).
    pub fn start() -> Result<Option<Cluster>, String> {
        let Some(bin) = find_bin() else {
            if std::env::var_os("CMR_REQUIRE_POSTGRES").is_some() {
                return Err("PostgreSQL is not installed (apt-get install -y postgresql)".into());
            }
            return Ok(None);
        };
        let dir = tempfile::Builder::new()
            .prefix("cmr-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        let cluster = Cluster {
            dir,
            bin,
            as_postgres,
        };
        if as_postgres {
            cluster.run("chown", &["-R", "postgres:", cluster.path_str()], false)?;
        }
        let data = cluster.data()?;
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "cmr",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            true,
        )?;
        cluster.pg_ctl(&["-w", "start"])?;
        Ok(Some(cluster))
    }

    fn path_str(&self) -> &str {
        self.dir.path().to_str().unwrap_or_default()
    }

    /// The folder of the cluster's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, program: &str, args: &[&str], server_program: bool) -> Result<(), String> {
        let path = if server_program {
            self.bin.join(program)
        } else {
            PathBuf::from(program)
        };
        let mut cmd = if self.as_postgres && server_program {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// The connection string of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("host={} user=cmr dbname={name}", self.path_str())
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) -> Result<(), String> {
        let createdb = self.bin.join("createdb");
        let out = Command::new(createdb)
            .args(["-h", self.path_str(), "-U", "cmr", name])
            .output()
            .map_err(|e| format!("createdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "createdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Runs SQL on database `name` with `psql`, and returns what it printed (unaligned, tuples only).
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                self.path_str(),
                "-U",
                "cmr",
                "-d",
                name,
                "-At",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no checkpoint, like a crash) and starts it
    /// again; what was committed synchronously must be there.
    pub fn crash_and_restart(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"])?;
        self.pg_ctl(&["-w", "start"])
    }

    /// Stops the database as an operator restarting it would (`pg_ctl stop -m fast`: sessions are
    /// ended, a shutdown checkpoint is written) and starts it again.
    pub fn fast_restart(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])?;
        self.pg_ctl(&["-w", "start"])
    }

    /// The data folder's path.
    fn data(&self) -> Result<String, String> {
        let data = self.dir.path().join("data");
        Ok(data.to_str().ok_or("temporary path")?.to_string())
    }

    /// `pg_ctl` on this cluster (its data folder, log file and server options), with `args`.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.data()?;
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=on -c max_connections=100",
            self.path_str()
        );
        let mut all = vec![
            "-D",
            &data,
            "-l",
            log.to_str().ok_or("temporary path")?,
            "-o",
            &options,
        ];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all, true)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }
}
