//! The auditor over HTTP: the log's public checkpoint and commitments, and the entries' bodies (served
//! to registered auditors), fed to `cmr_log::auditor::Auditor`, which verifies everything itself.

use cmr_core::hash::Digest;
use cmr_log::auditor::{Auditor, LogSource, Report, SourceError};
use cmr_log::entry::SaltedBody;
use serde_json::json;

use crate::error::ClientError;
use crate::session::Session;
use crate::verify::b64;

/// A log source that fetches from the server. The auditor is synchronous, so each call blocks on the
/// runtime; run it with [`audit`].
struct HttpSource<'a> {
    session: &'a Session,
    handle: tokio::runtime::Handle,
}

impl HttpSource<'_> {
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, String> {
        tokio::task::block_in_place(|| self.handle.block_on(f)).map_err(|e| e.to_string())
    }
}

impl LogSource for HttpSource<'_> {
    type Error = String;

    fn checkpoint(&mut self) -> Result<String, String> {
        self.block(self.session.conn.get_text("/v1/log/checkpoint"))
    }

    fn commitments(&mut self, from: u64, to: u64) -> Result<Vec<Digest>, String> {
        let mut out = Vec::with_capacity(to.saturating_sub(from).min(1000) as usize);
        let mut at = from;
        while at < to {
            let end = (at + 1000).min(to);
            let v = self.block(
                self.session
                    .conn
                    .get_json(&format!("/v1/log/commitments?from={at}&to={end}")),
            )?;
            for c in v["commitments"].as_array().cloned().unwrap_or_default() {
                let b = b64(&c, "commitment").map_err(|e| e.to_string())?;
                out.push(Digest(
                    b.try_into().map_err(|_| "commitment size".to_string())?,
                ));
            }
            at = end;
        }
        if out.len() as u64 != to - from {
            return Err("the server returned the wrong number of commitments".into());
        }
        Ok(out)
    }

    fn body(&mut self, index: u64) -> Result<Option<SaltedBody>, String> {
        let r = tokio::task::block_in_place(|| {
            self.handle.block_on(
                self.session
                    .post(&format!("/v1/log/entries/{index}"), &json!({})),
            )
        });
        match r {
            Ok(v) => {
                let salt = b64(&v["salt"], "salt").map_err(|e| e.to_string())?;
                Ok(Some(SaltedBody {
                    salt: salt.try_into().map_err(|_| "salt size".to_string())?,
                    body: b64(&v["body"], "body").map_err(|e| e.to_string())?,
                }))
            }
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Runs `auditor` against the server with `session` (a registered auditor). Needs a multi-thread
/// runtime: the auditor's synchronous calls block on it.
pub fn audit(auditor: &mut Auditor, session: &Session) -> Result<Report, SourceError> {
    let mut source = HttpSource {
        session,
        handle: tokio::runtime::Handle::current(),
    };
    auditor.run(&mut source)
}

/// Sends the operator's admission statement (signed with the log key, [`cmr_log::admission`]) and
/// returns the log index it was logged at. The statement is its own authentication: the request is not
/// signed.
pub async fn submit_admission(
    conn: &crate::Connection,
    statement: &str,
) -> Result<u64, ClientError> {
    let v = conn
        .post_unsigned("/v1/auditors", &json!({ "statement": statement }))
        .await?;
    v["index"]
        .as_u64()
        .ok_or_else(|| ClientError::Malformed("an admission's answer has no index".into()))
}
