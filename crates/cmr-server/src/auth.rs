//! Request authentication: the CMR signing profile (RFC 9421 + RFC 9530, `cmr_core::httpsig`), a nonce
//! memory for the replay window, and the restart horizon.

use cmr_core::problem::Code;
use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, Uri};
use cmr_core::httpsig::{self, Request, TimeWindow};
use cmr_core::identity::IdentityId;
use cmr_core::keys::VerifyingKey;

use crate::AppState;
use crate::error::ApiError;

/// Who signed a request, and what the log must keep of it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The identity that signed.
    pub identity: IdentityId,
    /// The `keyid` it signed with.
    pub keyid: String,
    /// The exact signature base.
    pub signature_base: String,
    /// The signature.
    pub signature: [u8; 64],
    /// The log size the client last verified (`CMR-Known-Size`), so an acknowledgement can carry the
    /// consistency proof from it; unsigned, since the proof verifies on its own.
    pub known_size: Option<u64>,
}

/// The (keyid, nonce) pairs seen within the replay window. Entries leave in the order they came, once no
/// request carrying them could be accepted any more, so each check costs O(1) amortized however many
/// requests the window holds.
#[derive(Debug, Default)]
pub struct NonceCache {
    inner: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    /// H(keyid, nonce) → (created, when it was recorded). 16 bytes of SHA-256 instead of the two strings:
    /// at thousands of requests a second the window holds hundreds of thousands of entries.
    seen: HashMap<u128, (i64, i64)>,
    /// Keys in the order they were recorded, with the time they were.
    order: std::collections::VecDeque<(i64, u128)>,
}

fn nonce_key(keyid: &str, nonce: &str) -> u128 {
    let mut data = Vec::with_capacity(keyid.len() + nonce.len() + 1);
    data.extend_from_slice(keyid.as_bytes());
    data.push(0);
    data.extend_from_slice(nonce.as_bytes());
    let d = cmr_core::hash::sha256(&data);
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.0[..16]);
    u128::from_le_bytes(k)
}

impl NonceCache {
    /// Records a nonce; false if it was already seen within the window.
    pub fn check(&self, keyid: &str, nonce: &str, created: i64, now: i64) -> bool {
        let mut n = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = now - httpsig::MAX_AGE - httpsig::MAX_FUTURE;
        // A request is accepted only if created ≥ now − MAX_AGE, and created ≤ (the time it was recorded)
        // + MAX_FUTURE; so an entry recorded before now − MAX_AGE − MAX_FUTURE can never match again.
        while n.order.front().is_some_and(|(at, _)| *at < horizon) {
            if let Some((at, key)) = n.order.pop_front()
                && n.seen
                    .get(&key)
                    .is_some_and(|(_, recorded)| *recorded == at)
            {
                n.seen.remove(&key);
            }
        }
        let key = nonce_key(keyid, nonce);
        match n.seen.get(&key) {
            Some((c, _)) if *c >= horizon => false,
            _ => {
                n.seen.insert(key, (created, now));
                n.order.push_back((now, key));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_refused_within_the_window_and_forgotten_after() {
        let c = NonceCache::default();
        assert!(c.check("k", "n1", 1000, 1000));
        assert!(!c.check("k", "n1", 1000, 1030));
        assert!(c.check("k2", "n1", 1000, 1030));
        // Many others come and go without slowing anything down; the first one is still refused.
        for i in 0..50_000 {
            assert!(c.check("k", &format!("x{i}"), 1040, 1040));
        }
        assert!(!c.check("k", "n1", 1000, 1060));
        // Past the window nothing carrying it could be accepted: it is forgotten, and memory with it.
        assert!(c.check("k", "n1", 1200, 1200));
        assert!(c.inner.lock().unwrap().seen.len() < 10);
    }
}

/// A token bucket per identity: one identity's flood gets 429 while the others are still served.
#[derive(Debug)]
pub struct RateLimits {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IdentityId, (f64, std::time::Instant)>>,
}

impl RateLimits {
    /// `rate` requests per second sustained, `burst` at most at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `id`; false when its budget is spent.
    pub fn take(&self, id: &IdentityId) -> bool {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(*id).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The window a request's `created` must fall in now.
pub(crate) fn window(state: &AppState) -> TimeWindow {
    TimeWindow {
        now: (state.clock)() as i64,
        // Nonces live in memory: after a restart, requests signed before it could be replayed, so only
        // requests created after the start (plus the allowed skew) are accepted. A store whose log was
        // empty at start has never accepted a signed request, so it needs no horizon.
        horizon: if state.store.opened_empty() {
            i64::MIN
        } else {
            state.store.start_time() as i64 + httpsig::MAX_FUTURE
        },
    }
}

/// Verifies a signed request. `registering` supplies the key of an identity that is being registered (the
/// request is signed by its inception key, which the store does not know yet).
pub fn authenticate(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    registering: Option<(IdentityId, VerifyingKey)>,
) -> Result<Caller, ApiError> {
    let mut pairs = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let value = value
            .to_str()
            .map_err(|_| ApiError::malformed("a header value is not visible ASCII"))?;
        pairs.push((name.as_str(), value));
    }
    // The authority signed for must be this deployment's, as configured: never the client's Host header,
    // so that a request signed for one deployment is refused by another (a reverse proxy may rewrite Host).
    let authority = state.config.authority.as_str();
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::new(
        method.as_str(),
        &state.config.scheme,
        authority,
        target,
        pairs,
    );
    let window = window(state);
    let mut signer = None;
    let verified = httpsig::verify_request(&request, body, window, |keyid| {
        let found = match registering {
            Some((id, key)) if keyid == format!("id:{}", id.to_hex()) => Some((id, key)),
            _ => state.store.signer_key(keyid),
        };
        signer = found.map(|(id, _)| id);
        found.map(|(_, k)| k)
    })
    .map_err(|e| {
        let host = headers.get("host").and_then(|h| h.to_str().ok());
        match (e, host) {
            // Say which authority this server verifies for when the client seems to sign for another.
            (httpsig::HttpSigError::BadSignature, Some(host))
                if !host.eq_ignore_ascii_case(authority) =>
            {
                let mut err = ApiError::from(httpsig::HttpSigError::BadSignature);
                err.detail = format!(
                    "the signature does not verify; this server verifies requests signed for \
                     authority {authority} (the request was sent to {host})"
                );
                err
            }
            (e, _) => ApiError::from(e),
        }
    })?;
    let identity = signer.ok_or_else(|| ApiError::from(httpsig::HttpSigError::UnknownKey))?;
    if !state.limits.take(&identity) {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            "too many requests from this identity; retry later",
        ));
    }
    if !state.nonces.check(
        &verified.keyid,
        &verified.nonce,
        verified.created,
        window.now,
    ) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            Code::Replayed,
            "this (keyid, nonce) was already used",
        ));
    }
    let known_size = known_size(headers)?;
    // A client that saw more of the log through another server sharing the database: this one catches
    // up first, so it never answers with less (the client would take it for a rollback).
    if let Some(size) = known_size {
        state.store.follow_to(size);
    }
    // The exact signature base and signature that verified, for the log's access entries.
    Ok(Caller {
        identity,
        keyid: verified.keyid,
        signature_base: verified.signature_base,
        signature: verified.signature,
        known_size,
    })
}

/// The log size the client verified last (`CMR-Known-Size`), if it says: a decimal number, or the
/// request is refused as malformed.
pub fn known_size(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("cmr-known-size") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
        // As documented (an int64): a log is never that large anyway.
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                Code::Malformed,
                "CMR-Known-Size is the log size the client verified, a decimal number",
            )
        })
}

/// A request as it arrived, before its signature is checked: what [`authenticate`] needs. Handlers that
/// must read the body first (registration and rotation, signed by the key they carry) take this.
pub struct Unverified {
    /// The method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// The header fields.
    pub headers: HeaderMap,
    /// The body (within the route's body limit).
    pub body: axum::body::Bytes,
}

impl Unverified {
    /// Authenticates the request; `registering` names the key of an identity being registered.
    pub fn authenticate(
        &self,
        state: &AppState,
        registering: Option<(IdentityId, VerifyingKey)>,
    ) -> Result<Caller, ApiError> {
        authenticate(
            state,
            &self.method,
            &self.uri,
            &self.headers,
            &self.body,
            registering,
        )
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Unverified {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        // The body's limit is read from the extensions, which stay with it; the header map is moved
        // out, not copied.
        let (mut parts, body) = req.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let (method, uri) = (parts.method.clone(), parts.uri.clone());
        let req = axum::extract::Request::from_parts(parts, body);
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::from_body_rejection(&e))?;
        Ok(Self {
            method,
            uri,
            headers,
            body,
        })
    }
}

/// A request whose RFC 9421 signature verified under a registered device or identity key: the caller,
/// and the body the signature covers. Every signed route but registration and rotation takes this.
pub struct SignedRequest {
    /// Who signed.
    pub caller: Caller,
    /// The body.
    pub body: axum::body::Bytes,
}

impl axum::extract::FromRequest<std::sync::Arc<AppState>> for SignedRequest {
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let raw = Unverified::from_request(req, state).await?;
        let caller = raw.authenticate(state, None)?;
        Ok(Self {
            caller,
            body: raw.body,
        })
    }
}

/// A signed request whose body is a `T`: the signature is verified first (over the exact bytes), then
/// the body is parsed, refusing unknown fields; an empty body reads as `{}`, so a body whose fields are
/// all optional may be left out.
pub struct Signed<T> {
    /// Who signed.
    pub caller: Caller,
    /// The parsed body.
    pub body: T,
}

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<std::sync::Arc<AppState>>
    for Signed<T>
{
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let SignedRequest { caller, body } = SignedRequest::from_request(req, state).await?;
        Ok(Self {
            caller,
            body: parse_body(&body)?,
        })
    }
}

/// A signed request by the owner of the identity its path names (`{customer}` on a vault's routes,
/// `{id}` on an identity's): a customer acts only on their own vault, an identity only on its own
/// devices and listings. Anyone else is refused with 403 before the body is parsed.
pub struct Owner<T> {
    /// The identity the path names, which signed the request.
    pub owner: IdentityId,
    /// The signer's details.
    pub caller: Caller,
    /// The parsed body.
    pub body: T,
}

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<std::sync::Arc<AppState>>
    for Owner<T>
{
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, ApiError> {
        use axum::extract::FromRequestParts as _;
        let (mut parts, body) = req.into_parts();
        let params = axum::extract::RawPathParams::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiError::malformed(format!("path: {}", e.body_text())))?;
        let named = params
            .iter()
            .find(|(name, _)| *name == "customer" || *name == "id")
            .map(|(_, value)| value.to_owned())
            .ok_or_else(|| ApiError::malformed("the path names no identity"))?;
        let owner = IdentityId(crate::routes::hex_id("identity", &named)?);
        let req = axum::extract::Request::from_parts(parts, body);
        let SignedRequest { caller, body } = SignedRequest::from_request(req, state).await?;
        if caller.identity != owner {
            return Err(ApiError::forbidden(
                "only the identity this path names may do this (a customer acts on their own vault)",
            ));
        }
        Ok(Self {
            owner,
            caller,
            body: parse_body(&body)?,
        })
    }
}

/// A JSON body, refusing unknown fields (by the type); an empty body reads as `{}`.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("body: {e}")))
}

/// The body of a request that takes none: empty, or `{}`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}
