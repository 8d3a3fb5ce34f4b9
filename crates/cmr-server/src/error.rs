//! Problem Details (RFC 9457) with stable codes. Every failure maps to one status and one code; a 5xx body
//! says nothing internal, and its cause goes to tracing.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cmr_core::decision::DenyReason;
use cmr_core::httpsig::HttpSigError;
use cmr_core::problem::Code;
use cmr_store::StoreError;

/// An API error: a status, a stable code and a human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable problem code (the last part of the problem type URI).
    pub code: Code,
    /// What went wrong, for people. Never internal details on a 5xx.
    pub detail: String,
    /// Members added to the problem object (RFC 9457 extension members), such as the current signed
    /// directory with `rotation-pending`.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            extensions: serde_json::Map::new(),
        }
    }

    /// Adds an extension member to the problem object.
    pub fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.extensions.insert(name.to_string(), value);
        self
    }

    /// 400 `malformed`.
    /// A body that could not be read: too large (413 `too-large`), or not readable (400 `malformed`).
    pub fn from_body_rejection(e: &axum::extract::rejection::BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::TooLarge,
                "the body is larger than this route accepts",
            )
        } else if too_slow(e) {
            Self::new(
                StatusCode::REQUEST_TIMEOUT,
                Code::BodyTooSlow,
                "the request body did not arrive in time",
            )
        } else {
            Self::malformed(format!("the body could not be read: {}", e.body_text()))
        }
    }

    /// A malformed request: 400 `malformed`.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::Malformed, detail)
    }

    /// 403 `forbidden`: the caller may not act on this resource.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, Code::Forbidden, detail)
    }

    /// 503 `in-doubt`: the request may or may not have been applied (it timed out while queued, or the
    /// store failed while making it durable). Writes are idempotent: sending the same bytes again gives
    /// exactly one result, the original one if it was applied.
    pub fn in_doubt(detail: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::InDoubt,
            format!("{detail}; it may or may not have been applied: send it again to know"),
        )
    }
}

impl From<HttpSigError> for ApiError {
    fn from(e: HttpSigError) -> Self {
        let code = match &e {
            HttpSigError::MissingHeader(_) | HttpSigError::NoSignature(_) => Code::MissingSignature,
            HttpSigError::UnknownKey => Code::UnknownKey,
            HttpSigError::BadSignature => Code::BadSignature,
            HttpSigError::ContentDigestMismatch | HttpSigError::ContentDigestUnsupported => {
                Code::ContentDigest
            }
            HttpSigError::CreatedTooOld { .. }
            | HttpSigError::CreatedInFuture { .. }
            | HttpSigError::Expired => Code::ClockSkew,
            HttpSigError::CreatedBeforeHorizon { .. } => Code::CreatedBeforeStart,
            _ => Code::BadSignatureInput,
        };
        Self::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

impl From<DenyReason> for ApiError {
    fn from(r: DenyReason) -> Self {
        let status = match r {
            DenyReason::RotationPending(_) | DenyReason::StaleEpoch { .. } => StatusCode::CONFLICT,
            DenyReason::Malformed(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::FORBIDDEN,
        };
        Self::new(status, r.code(), r.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Malformed(d) => Self::malformed(d),
            StoreError::BadSignature(d) => {
                Self::new(StatusCode::UNAUTHORIZED, Code::BadSignature, d)
            }
            StoreError::Denied(r) => r.into(),
            StoreError::Refused(d) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, Code::Refused, d),
            StoreError::TooManyRequests(d) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, Code::TooManyRequests, d)
            }
            StoreError::NotAccepted(d) => {
                Self::new(StatusCode::FORBIDDEN, Code::RequestsNotAccepted, d)
            }
            StoreError::Blocked => Self::new(
                StatusCode::FORBIDDEN,
                Code::CompanyBlocked,
                "the customer blocked this company",
            ),
            StoreError::Conflict => Self::new(
                StatusCode::CONFLICT,
                Code::Conflict,
                "another body was already written under this id",
            ),
            StoreError::StaleHead => Self::new(
                StatusCode::CONFLICT,
                Code::StaleHead,
                "the batch does not extend the family's current head",
            ),
            StoreError::DirectoryConflict { expected } => Self::new(
                StatusCode::CONFLICT,
                Code::DirectoryConflict,
                format!("expected version {expected}"),
            ),
            StoreError::BackupConflict { expected } => Self::new(
                StatusCode::CONFLICT,
                Code::BackupConflict,
                format!("expected version {expected}"),
            ),
            StoreError::NotFound(d) => Self::new(StatusCode::NOT_FOUND, Code::NotFound, d),
            StoreError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the store is not accepting writes; retry later",
            ),
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "storage out of reach");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "the store's database is out of reach; retry later",
                )
            }
            StoreError::InDoubt(_) => {
                tracing::error!(error = %e, "storage failure after a group was written");
                Self::in_doubt("the store failed while making this write durable")
            }
            StoreError::Format(_) | StoreError::Io(_) => {
                tracing::error!(error = %e, "storage failure");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // One wire form (`cmr_wire::problem`), plus the extension members.
        let problem = cmr_wire::problem::ProblemJson::new(
            self.code.as_str(),
            self.status.as_u16(),
            self.detail,
        );
        let mut body = serde_json::to_value(problem).unwrap_or_default();
        if let Some(members) = body.as_object_mut() {
            for (k, v) in self.extensions {
                members.entry(k).or_insert(v);
            }
        }
        let mut resp = (self.status, body.to_string()).into_response();
        resp.extensions_mut()
            .insert(crate::metrics::ProblemCode(self.code.as_str()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Whether a body failed because it missed its deadline ([`crate::backpressure::BodyTooSlow`]).
fn too_slow(e: &axum::extract::rejection::BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<crate::backpressure::BodyTooSlow>() {
            return true;
        }
        source = err.source();
    }
    false
}
