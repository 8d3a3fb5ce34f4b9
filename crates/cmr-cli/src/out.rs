//! Output: lines for people, or one JSON document for scripts (`--json`).

use serde_json::Value;

/// Where a command's results go.
#[derive(Clone, Copy)]
pub struct Out {
    /// Print JSON instead of lines.
    pub json: bool,
}

impl Out {
    /// A line for people (nothing in JSON mode).
    pub fn line(&self, s: impl AsRef<str>) {
        if CAPTURE
            .try_with(|c| c.borrow_mut().lines.push(s.as_ref().to_string()))
            .is_ok()
        {
            return;
        }
        if !self.json {
            print(s.as_ref());
        }
    }

    /// The JSON result (nothing for people, who got lines).
    pub fn value(&self, v: &Value) {
        if CAPTURE
            .try_with(|c| c.borrow_mut().value = Some(v.clone()))
            .is_ok()
        {
            return;
        }
        if self.json {
            print(&serde_json::to_string_pretty(v).unwrap_or_default());
        }
    }
}

/// What a command said while it ran under [`capture`], instead of printing it: its lines for people,
/// its JSON result, and what it printed as is (a receipt, an export).
#[derive(Default, Debug)]
pub struct Captured {
    /// The lines for people.
    pub lines: Vec<String>,
    /// The JSON result.
    pub value: Option<Value>,
    /// Text printed as is.
    pub printed: String,
}

tokio::task_local! {
    static CAPTURE: std::cell::RefCell<Captured>;
}

/// Runs `f` (a command) with its output kept instead of printed: the local web app runs the same
/// commands as the command line, and shows what they said.
pub async fn capture<T>(f: impl std::future::Future<Output = T>) -> (T, Captured) {
    CAPTURE
        .scope(std::cell::RefCell::new(Captured::default()), async {
            let t = f.await;
            let captured = CAPTURE.with(|c| std::mem::take(&mut *c.borrow_mut()));
            (t, captured)
        })
        .await
}

/// Prints a line on standard output. A reader that went away (`cmr ... | head`) ends the output quietly
/// instead of a panic.
pub fn print(s: &str) {
    if CAPTURE
        .try_with(|c| {
            let mut c = c.borrow_mut();
            c.printed.push_str(s);
            c.printed.push('\n');
        })
        .is_ok()
    {
        return;
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{s}").is_err() {
        std::process::exit(0);
    }
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A 64-hex-digit id given on the command line.
pub fn parse_id(s: &str, what: &str) -> crate::error::CliResult<[u8; 32]> {
    cmr_core::hash::Digest::from_hex(s.trim())
        .map(|d| d.0)
        .ok_or_else(|| {
            crate::error::CliError::local(
                format!("{what} {s:?} is not 64 hex digits"),
                "copy the id from the list",
            )
        })
}

/// An id typed in full (64 hex digits) or as a unique prefix of at least 6 hex digits of one of
/// `known` (as git takes commit ids). Returns the id, or an error saying what to give instead.
pub fn resolve_id(
    s: &str,
    what: &str,
    known: impl IntoIterator<Item = [u8; 32]>,
) -> crate::error::CliResult<[u8; 32]> {
    let s = s.trim().trim_end_matches('…').to_ascii_lowercase();
    if let Ok(full) = parse_id(&s, what) {
        return Ok(full);
    }
    if s.len() < 6 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(crate::error::CliError::usage(
            format!("{what} {s:?} is neither a whole id (64 hex digits) nor a prefix of 6 or more"),
            "copy the id (or its first digits) from the list",
        ));
    }
    let mut found: Vec<[u8; 32]> = known
        .into_iter()
        .filter(|k| hex::encode(k).starts_with(&s))
        .collect();
    found.sort();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(crate::error::CliError::local(
            format!("no {what} known here starts with {s}"),
            "give the whole id, or check the list",
        )),
        many => Err(crate::error::CliError::usage(
            format!("{} {what}s start with {s}", many.len()),
            "give more digits",
        )),
    }
}

/// The first 12 hex digits of an id, for tables.
pub fn short(hex: &str) -> String {
    format!("{}…", &hex[..12.min(hex.len())])
}

/// A server time as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn time(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A server time's day, `YYYY-MM-DD` (UTC).
pub fn day(t: u64) -> String {
    time(t)[..10].to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_dates() {
        assert_eq!(super::day(1_795_835_845), "2026-11-28");
        assert_eq!(super::time(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(super::time(1_795_835_845), "2026-11-28 03:17:25Z");
    }
}
