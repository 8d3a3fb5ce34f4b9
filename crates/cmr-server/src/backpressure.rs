//! Back-pressure for the whole server, in front of every route (docs/operations.md, "Limits"):
//! - one server-wide limit on requests in flight, and a reserved share that only a customer acting on their
//!   own vault's emergency routes may use (a statement such as a revocation, a device revocation), so that
//!   a flood on other routes cannot stop a customer from revoking;
//! - a per-source limit on requests in flight from one address (not applied to the reserved routes);
//! - what can be checked before the body is checked first (a signature covering the profile, `created`
//!   in the window, a key id the server knows), so a request that can never verify is refused at once;
//! - a deadline for the whole body (a base plus a minimum rate), so a body sent one byte a second cannot
//!   hold a slot.

use cmr_core::problem::Code;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cmr_core::httpsig;
use cmr_core::identity::IdentityId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::AppState;
use crate::error::ApiError;

/// The server-wide gate: permits for requests in flight, and the count per source address.
pub struct Gate {
    general: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_source_max: usize,
}

impl Gate {
    /// A gate for `general` requests in flight, `reserved` more for the emergency routes, and at most
    /// `per_source` in flight from one address on the other routes.
    pub fn new(general: usize, reserved: usize, per_source: usize) -> Self {
        Self {
            general: Arc::new(Semaphore::new(general)),
            reserved: Arc::new(Semaphore::new(reserved)),
            per_source: Mutex::new(HashMap::new()),
            per_source_max: per_source,
        }
    }

    fn enter_source(&self, ip: IpAddr) -> Option<SourceGuard<'_>> {
        let mut counts = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.per_source_max {
            return None;
        }
        *n += 1;
        Some(SourceGuard { gate: self, ip })
    }
}

/// Holds one request's place in its source's count.
struct SourceGuard<'a> {
    gate: &'a Gate,
    ip: IpAddr,
}

impl Drop for SourceGuard<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .gate
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

fn at_capacity() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::Unavailable,
        "the server is at capacity; retry later",
    )
    .into_response()
}

/// The identity a route acts on when it is one of a customer's emergency routes: a statement on
/// `/v1/vaults/{customer}/statements`, a device revocation on `/v1/identities/{id}/devices/revoke`.
fn emergency_subject(method: &Method, path: &str) -> Option<IdentityId> {
    if method != Method::POST {
        return None;
    }
    let id = path
        .strip_prefix("/v1/vaults/")
        .and_then(|r| r.strip_suffix("/statements"))
        .or_else(|| {
            path.strip_prefix("/v1/identities/")
                .and_then(|r| r.strip_suffix("/devices/revoke"))
        })?;
    IdentityId::from_hex(id)
}

/// Checks what can be checked of a signed request before its body: the profile, `created`, and that the
/// key id is known (or names an identity by `id:`, as registration and recovery do). Returns the
/// identity of a known signer. A request without a signature is left to its route.
fn precheck(state: &AppState, req: &Request) -> Result<Option<IdentityId>, ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (Some(input), Some(signature)) = (header("signature-input"), header("signature")) else {
        return Ok(None);
    };
    let request = httpsig::Request::new(
        req.method().as_str(),
        &state.config.scheme,
        &state.config.authority,
        req.uri().path(),
        vec![("signature-input", input), ("signature", signature)],
    );
    let (_, checked) = httpsig::precheck(&request, crate::auth::window(state))?;
    match state.store.signer_key(&checked.keyid) {
        Some((id, _)) => Ok(Some(id)),
        None if checked.keyid.starts_with("id:") => Ok(None),
        None => Err(httpsig::HttpSigError::UnknownKey.into()),
    }
}

/// The middleware: refuses early what cannot verify, takes a permit (general, or reserved for a
/// customer's own emergency route), limits each source, and puts a deadline on the body.
pub async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let signer = match precheck(&state, &req) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let gate = &state.gate;
    let emergency = emergency_subject(req.method(), req.uri().path())
        .is_some_and(|subject| Some(subject) == signer);
    let _source = if emergency {
        None
    } else {
        let ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        match ip {
            Some(ip) => match gate.enter_source(ip) {
                Some(g) => Some(g),
                None => return at_capacity(),
            },
            None => None,
        }
    };
    let _permit: OwnedSemaphorePermit = match gate.general.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) if emergency => match gate.reserved.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => return at_capacity(),
        },
        Err(_) => return at_capacity(),
    };
    let deadline = body_deadline(&state, &req);
    let req = req.map(|body| Body::new(DeadlineBody::new(body, deadline)));
    next.run(req).await
}

/// How long a request's whole body may take: the base, plus its declared length at the minimum rate,
/// never more than the request timeout.
fn body_deadline(state: &AppState, req: &Request) -> Duration {
    let len = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(state.config.max_body as u64);
    let rate = state.config.min_body_rate.max(1) as u64;
    (state.config.body_deadline + Duration::from_secs(len / rate)).min(state.config.timeout)
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTooSlow;

/// A body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Body, within: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emergency_routes_are_a_customers_statements_and_device_revocations() {
        let id = IdentityId([7; 32]);
        let hex = id.to_hex();
        assert_eq!(
            emergency_subject(&Method::POST, &format!("/v1/vaults/{hex}/statements")),
            Some(id)
        );
        assert_eq!(
            emergency_subject(
                &Method::POST,
                &format!("/v1/identities/{hex}/devices/revoke")
            ),
            Some(id)
        );
        for path in [
            format!("/v1/vaults/{hex}/history"),
            format!("/v1/vaults/{hex}/families/{hex}/read"),
            format!("/v1/identities/{hex}/devices"),
            "/v1/vaults/zz/statements".to_string(),
        ] {
            assert_eq!(emergency_subject(&Method::POST, &path), None, "{path}");
        }
        assert_eq!(
            emergency_subject(&Method::GET, &format!("/v1/vaults/{hex}/statements")),
            None
        );
    }

    #[test]
    fn a_source_holds_at_most_its_share() {
        let gate = Gate::new(10, 2, 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = gate.enter_source(ip).unwrap();
        let _b = gate.enter_source(ip).unwrap();
        assert!(gate.enter_source(ip).is_none());
        assert!(gate.enter_source("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(gate.enter_source(ip).is_some());
    }
}
