//! Signed HTTP to a vault server: every request but the public log's carries an RFC 9421 signature over
//! method, authority, path, query and the body's digest, with a fresh nonce and the current time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cmr_core::httpsig;
use cmr_core::identity::{DeviceKeys, IdentityId};
use cmr_core::keys::SigningKey;
use cmr_core::problem::Code;
use serde_json::Value;

use crate::error::ClientError;

/// The most bytes of an answer the SDK reads.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Who signs a request: a device (the usual case) or an identity key (registration, certification).
#[derive(Clone, Copy)]
pub enum Signer<'a> {
    /// A certified device: `keyid` is the device id.
    Device(&'a DeviceKeys),
    /// An identity key: `keyid` is `id:<identity>`.
    Identity(IdentityId, &'a SigningKey),
}

/// How long a signed write whose answer was lost is sent again, by default.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(30);

/// A connection to one vault server.
#[derive(Clone, Debug)]
pub struct Connection {
    http: reqwest::Client,
    scheme: String,
    authority: String,
    retry_for: Duration,
    resent: Arc<AtomicU64>,
    on_retry: Option<RetryNotice>,
}

/// What a connection calls when it starts sending a request again after losing its answer.
#[derive(Clone)]
struct RetryNotice(Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for RetryNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryNotice")
    }
}

/// A transport failure with its causes ("error sending request" alone does not say that the server's
/// certificate is unknown, or that the connection was refused).
fn transport_error(e: &reqwest::Error) -> ClientError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    ClientError::Transport(text)
}

/// The HTTP client: TLS by rustls, verifying servers against the platform's roots, or only against
/// `roots` when given.
fn http_client(roots: Option<Vec<reqwest::Certificate>>) -> Result<reqwest::Client, ClientError> {
    let mut builder = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .connect_timeout(std::time::Duration::from_secs(10))
        // The server closes a connection idle for 10 s: stop reusing one well before.
        .pool_idle_timeout(std::time::Duration::from_secs(5))
        // A signed request goes to the server it was signed for, never on to another.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(roots) = roots {
        builder = builder.tls_certs_only(roots);
    }
    builder.build().map_err(|e| transport_error(&e))
}

/// Installs the ring provider for rustls once per process (the SDK's only TLS backend).
pub(crate) fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Connection {
    /// A connection to `base`, such as `http://127.0.0.1:8080` or `https://vault.example`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        tls_provider();
        let (scheme, rest) = base.split_once("://").ok_or_else(|| {
            ClientError::Local(format!(
                "server address {base:?} needs a scheme, like http://127.0.0.1:8080"
            ))
        })?;
        if scheme != "http" && scheme != "https" {
            return Err(ClientError::Local(format!("unsupported scheme {scheme:?}")));
        }
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::Local(format!(
                "server address {base:?} has a path; give only scheme and host"
            )));
        }
        Ok(Self {
            http: http_client(None)?,
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            retry_for: DEFAULT_RETRY,
            resent: Arc::new(AtomicU64::new(0)),
            on_retry: None,
        })
    }

    /// Trusts only the certificate authorities in `pem` (one or more PEM certificates) for an `https`
    /// server, instead of the platform's roots: a vault behind a private CA, or a pinned one.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Self, ClientError> {
        let roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::Local(format!("the CA certificates: {e}")))?;
        if roots.is_empty() {
            return Err(ClientError::Local(
                "the CA file holds no PEM certificate".into(),
            ));
        }
        self.http = http_client(Some(roots))?;
        Ok(self)
    }

    /// Sets how long a signed request whose answer was lost (the connection broke after the request may
    /// have reached the server, or a gateway in front of it answered 502 or 504) is sent again: the same
    /// body, signed afresh, if it is safe to (see [`safe_to_resend`]). A write sent again returns the
    /// original result and log index if the first attempt was logged, and is logged once if it was not.
    /// A company's read under a grant and a key backup are not sent again: their lost answer is
    /// [`ClientError::InDoubt`] at once, as is any request once the budget runs out. `Duration::ZERO`
    /// turns retries off. A server that refuses the connection fails at once.
    pub fn with_retry(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// Calls `notice` with a sentence for people each time a request's answer is lost and the request is
    /// about to be sent again (once per lost answer, not per attempt): a command line prints it, so a wait
    /// for a restarting server is not silent.
    pub fn on_retry(mut self, notice: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(RetryNotice(Arc::new(notice)));
        self
    }

    /// How many times this connection (and its clones) sent a request again after losing its answer.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// The server's address, `scheme://authority`.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// A public GET, answered as text.
    pub async fn get_text(&self, target: &str) -> Result<String, ClientError> {
        self.get_text_known(target, None).await
    }

    /// [`Connection::get_text`], telling the server the log size this client verified last
    /// (`CMR-Known-Size`): a server that shares its database with others catches up to it first.
    pub async fn get_text_known(
        &self,
        target: &str,
        known_size: Option<u64>,
    ) -> Result<String, ClientError> {
        let mut req = self.http.get(format!("{}{target}", self.base()));
        if let Some(k) = known_size {
            req = req.header("cmr-known-size", k.to_string());
        }
        let resp = req.send().await.map_err(|e| transport_error(&e))?;
        let status = resp.status();
        let bytes = read_limited(resp).await?;
        if !status.is_success() {
            return Err(problem(status.as_u16(), &bytes));
        }
        String::from_utf8(bytes).map_err(|_| ClientError::Malformed("not UTF-8".into()))
    }

    /// A public GET, answered as JSON.
    pub async fn get_json(&self, target: &str) -> Result<Value, ClientError> {
        let text = self.get_text(target).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// An unsigned POST of `body` (the witness's cosignature, which carries its own signature), answered
    /// as JSON.
    pub async fn post_unsigned(&self, target: &str, body: &Value) -> Result<Value, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Local(e.to_string()))?;
        let resp = self
            .http
            .post(format!("{}{target}", self.base()))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await;
        json_answer(resp).await
    }

    /// A signed POST of `body`, answered as JSON. A request refused because it was created before the
    /// server's replay horizon (a server that has just started) is signed again and retried after a
    /// second, for as long as the horizon lasts (a few seconds). A request whose answer was lost is sent
    /// again (see [`Connection::with_retry`]).
    pub async fn post(
        &self,
        target: &str,
        body: &Value,
        signer: Signer<'_>,
    ) -> Result<Value, ClientError> {
        self.post_known(target, body, signer, None).await
    }

    /// [`Connection::post`], telling the server the log size this client verified last
    /// (`CMR-Known-Size`), so that an acknowledgement can carry the consistency proof from it.
    pub async fn post_known(
        &self,
        target: &str,
        body: &Value,
        signer: Signer<'_>,
        known_size: Option<u64>,
    ) -> Result<Value, ClientError> {
        Ok(self
            .post_known_signed(target, body, signer, known_size)
            .await?
            .0)
    }

    /// [`Connection::post_known`], also returning the RFC 9421 signature base of the request that was
    /// answered. A logged request (a company's read under a grant) is logged with that base, so the
    /// caller can tell that the logged access is this request's and not an earlier answer replayed.
    pub async fn post_known_signed(
        &self,
        target: &str,
        body: &Value,
        signer: Signer<'_>,
        known_size: Option<u64>,
    ) -> Result<(Value, String), ClientError> {
        self.post_as(target, body, signer, known_size).await
    }

    /// [`Connection::post_known_signed`], with the answer read straight into its wire type (`cmr-wire`)
    /// instead of a JSON tree: what a client that only needs some fields of a large answer asks for.
    pub async fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        target: &str,
        body: &Value,
        signer: Signer<'_>,
        known_size: Option<u64>,
    ) -> Result<(T, String), ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Local(e.to_string()))?;
        let retry = safe_to_resend(target, body);
        let mut horizon_tries = 0;
        // Set once the request may have reached the server: from then on its fate is unknown until an
        // answer arrives, so it is sent again (even through a spell of refused connections while the
        // server restarts) until the retry budget runs out.
        let mut in_doubt: Option<Instant> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.post_once(target, &bytes, signer, known_size).await {
                Err(Attempt::Answered(e))
                    if e.problem() == Some(Code::CreatedBeforeStart) && horizon_tries < 10 =>
                {
                    horizon_tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(Attempt::Lost { error, sent }) => {
                    let since = match (in_doubt, sent) {
                        (Some(t), _) => t,
                        (None, true) => *in_doubt.insert(Instant::now()),
                        (None, false) => return Err(error),
                    };
                    if !retry || since.elapsed() >= self.retry_for {
                        return Err(ClientError::InDoubt(error.to_string()));
                    }
                    if pause == Duration::from_millis(50)
                        && let Some(RetryNotice(notice)) = &self.on_retry
                    {
                        notice(&format!(
                            "the server did not answer ({error}); retrying for up to {} s",
                            self.retry_for.as_secs()
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    self.resent.fetch_add(1, Ordering::Relaxed);
                }
                Err(Attempt::Answered(e)) => return Err(e),
                Ok(v) => return Ok(v),
            }
        }
    }

    /// A signed POST whose answer is a stream (server-sent events): the response once its status
    /// says success, to be read as it arrives. Never sent again on its own: a lost stream is opened
    /// again by its reader.
    pub async fn post_stream(
        &self,
        target: &str,
        body: &Value,
        signer: Signer<'_>,
    ) -> Result<reqwest::Response, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Local(e.to_string()))?;
        let (resp, _) = self
            .send_signed(target, &bytes, signer, None)
            .await
            .map_err(|a| match a {
                Attempt::Answered(e) | Attempt::Lost { error: e, .. } => e,
            })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let bytes = read_limited(resp).await?;
            return Err(problem(status, &bytes));
        }
        Ok(resp)
    }

    /// Signs and sends a POST; the response as it arrives, and the request's signature base.
    async fn send_signed(
        &self,
        target: &str,
        bytes: &[u8],
        signer: Signer<'_>,
        known_size: Option<u64>,
    ) -> Result<(reqwest::Response, String), Attempt> {
        let (keyid, key) = match signer {
            Signer::Device(d) => (d.id().to_hex(), &d.signing),
            Signer::Identity(id, k) => (format!("id:{}", id.to_hex()), k),
        };
        let nonce = &cmr_log::entry::draw_salt(&mut rand::rng())[..16];
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let req = httpsig::Request::new("POST", &self.scheme, &self.authority, target, vec![]);
        let h = httpsig::sign_request(&req, bytes, key, &keyid, &hex::encode(nonce), created)
            .map_err(|e| {
                Attempt::Answered(ClientError::Local(format!("cannot sign the request: {e}")))
            })?;
        let base = h.signature_base;
        let mut req = self.http.post(format!("{}{target}", self.base()));
        if let Some(k) = known_size {
            req = req.header("cmr-known-size", k.to_string());
        }
        let resp = req
            .header("content-type", "application/json")
            .header("content-digest", h.content_digest)
            .header("signature-input", h.signature_input)
            .header("signature", h.signature)
            .body(bytes.to_vec())
            .send()
            .await
            .map_err(|e| Attempt::Lost {
                sent: !e.is_connect(),
                error: transport_error(&e),
            })?;
        Ok((resp, base))
    }

    async fn post_once<T: serde::de::DeserializeOwned>(
        &self,
        target: &str,
        bytes: &[u8],
        signer: Signer<'_>,
        known_size: Option<u64>,
    ) -> Result<(T, String), Attempt> {
        let (resp, base) = self.send_signed(target, bytes, signer, known_size).await?;
        let status = resp.status();
        let bytes = read_limited(resp).await.map_err(|error| match error {
            ClientError::Transport(_) => Attempt::Lost { error, sent: true },
            other => Attempt::Answered(other),
        })?;
        // A gateway in front of the server (docs/operations.md) answers 502 or 504 when the server died
        // or did not answer in time: the request may have reached it, like a cut connection.
        if status == reqwest::StatusCode::BAD_GATEWAY
            || status == reqwest::StatusCode::GATEWAY_TIMEOUT
        {
            return Err(Attempt::Lost {
                error: problem(status.as_u16(), &bytes),
                sent: true,
            });
        }
        if !status.is_success() {
            let refusal = problem(status.as_u16(), &bytes);
            // The server itself does not know whether the request was applied (it timed out while
            // queued, or the store failed while making it durable): like a lost answer.
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && refusal.problem() == Some(Code::InDoubt)
            {
                return Err(Attempt::Lost {
                    error: refusal,
                    sent: true,
                });
            }
            return Err(Attempt::Answered(refusal));
        }
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| Attempt::Answered(ClientError::Malformed(e.to_string())))?;
        Ok((v, base))
    }
}

/// Whether a signed POST of `body` to `target` is safe to send again after its answer was lost. Writes
/// are idempotent by their bytes (statements, record batches, directories, identity key events, device
/// certificates and revocations: the same bytes are answered with the original entry), and reads that
/// are not logged (a customer's own reads, histories, listings, a company's relationship view) change
/// nothing. Two are not: a company's read under a grant is logged as an access (and consumes a one-time
/// grant), and a key backup is a compare-and-swap on its version (a repeat is a conflict).
pub fn safe_to_resend(target: &str, body: &Value) -> bool {
    let path = target.split('?').next().unwrap_or(target);
    let logged_read = path.ends_with("/read") && body.get("grant").is_some();
    !(logged_read || path.ends_with("/backup"))
}

/// How one attempt at a signed POST failed.
enum Attempt {
    /// The server answered (or the request could not be made): final.
    Answered(ClientError),
    /// No answer. `sent` when the request may have reached the server (anything but a refused
    /// connection).
    Lost { error: ClientError, sent: bool },
}

/// A JSON answer, or the refusal its Problem Details describe.
async fn json_answer(resp: reqwest::Result<reqwest::Response>) -> Result<Value, ClientError> {
    let resp = resp.map_err(|e| transport_error(&e))?;
    let status = resp.status();
    let bytes = read_limited(resp).await?;
    if !status.is_success() {
        return Err(problem(status.as_u16(), &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Malformed(e.to_string()))
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&e))? {
        if out.len() + chunk.len() > MAX_ANSWER {
            return Err(ClientError::Malformed("answer larger than 64 MiB".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A refusal from its Problem Details (RFC 9457), or from the status alone.
fn problem(status: u16, body: &[u8]) -> ClientError {
    // The one wire form (`cmr_wire::problem`); anything else (a proxy's page) is named by its status.
    let (code, detail) = match serde_json::from_slice::<cmr_wire::problem::ProblemJson>(body) {
        Ok(p) => (
            p.kind
                .rsplit(':')
                .next()
                .unwrap_or("http-error")
                .to_string(),
            p.detail,
        ),
        Err(_) => ("http-error".to_string(), "no details".to_string()),
    };
    ClientError::Refused {
        status,
        code,
        detail,
    }
}
