//! HTTP Message Signatures (RFC 9421, Ed25519), Content-Digest (RFC 9530), and CMR's request profile.
//!
//! This module owns:
//! - the signature base for a request, for the derived components `@method`, `@authority`, `@path`,
//!   `@query`, `@target-uri`, `@scheme`, `@request-target`, and plain header fields;
//! - parsing of the `Signature-Input` and `Signature` fields (Structured Field Values, RFC 9651, via `sfv`);
//! - the profile every CMR request must meet ([`verify_request`]): the covered components, `created`
//!   within the window, a `nonce`, a `keyid`, Ed25519, and a Content-Digest that matches the body.
//!
//! It is pure: it sees a [`Request`] value, never a socket, and the current time is an argument. Remembering
//! nonces is the server's job; the window it must remember them for is [`MAX_AGE`] + [`MAX_FUTURE`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sfv::{BareItem, Dictionary, FieldType, InnerList, Item, ListEntry, Parameters, Parser};
use thiserror::Error;

use crate::keys::{Signature, SigningKey, VerifyingKey};

/// How far in the past `created` may be, in seconds.
pub const MAX_AGE: i64 = 60;
/// How far in the future `created` may be, in seconds.
pub const MAX_FUTURE: i64 = 5;
/// The components every CMR request signature must cover.
pub const PROFILE_COMPONENTS: [&str; 5] =
    ["@method", "@authority", "@path", "@query", "content-digest"];
/// The label CMR clients sign under. A request that carries a single signature may use any label.
pub const PROFILE_LABEL: &str = "cmr";
/// The longest nonce accepted.
pub const MAX_NONCE_LEN: usize = 128;
/// The longest `Signature-Input` or `Signature` field accepted.
pub const MAX_FIELD_LEN: usize = 4096;

/// Why a request signature was refused. Each variant is a distinct, stable reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpSigError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(String),
    /// A structured field could not be parsed.
    #[error("malformed {field}: {reason}")]
    Malformed {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No usable signature was found.
    #[error("no signature with label {0:?}")]
    NoSignature(String),
    /// A required component is not covered by the signature.
    #[error("signature does not cover {0}")]
    MissingComponent(String),
    /// A component identifier this profile does not support (for example one with parameters).
    #[error("unsupported component {0}")]
    UnsupportedComponent(String),
    /// The same component is listed twice.
    #[error("component {0} is covered twice")]
    DuplicateComponent(String),
    /// A required signature parameter is absent.
    #[error("missing signature parameter {0}")]
    MissingParameter(&'static str),
    /// The `alg` parameter names another algorithm.
    #[error("unsupported algorithm {0:?}; only ed25519 is accepted")]
    UnsupportedAlgorithm(String),
    /// `created` is older than the window allows.
    #[error(
        "request is too old: created {age} s ago, at most {MAX_AGE} s allowed (check the client clock)"
    )]
    CreatedTooOld {
        /// How many seconds before the server's clock.
        age: i64,
    },
    /// `created` is further in the future than the window allows.
    #[error(
        "request is from the future: created {ahead} s ahead of the server clock, at most {MAX_FUTURE} s allowed (check the client clock)"
    )]
    CreatedInFuture {
        /// How many seconds after the server's clock.
        ahead: i64,
    },
    /// `created` falls before the server's replay horizon (set at start-up).
    #[error("request was created before the server's replay horizon ({horizon})")]
    CreatedBeforeHorizon {
        /// The earliest `created` accepted.
        horizon: i64,
    },
    /// The `expires` parameter has passed.
    #[error("signature expired")]
    Expired,
    /// The `keyid` does not name a known key.
    #[error("unknown keyid")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// The body does not match its Content-Digest.
    #[error("content-digest does not match the body")]
    ContentDigestMismatch,
    /// The Content-Digest field holds no algorithm this profile supports (sha-256, sha-512).
    #[error("content-digest has no supported algorithm (sha-256 or sha-512)")]
    ContentDigestUnsupported,
}

/// The parts of an HTTP request that a signature can cover.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The method, as sent (`GET`, `POST`, …).
    pub method: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The authority the client addressed (`host[:port]`).
    pub authority: &'a str,
    /// The absolute path, without the query.
    pub path: &'a str,
    /// The query, without the leading `?`, if the target had one.
    pub query: Option<&'a str>,
    /// The header fields, in order; names in any case.
    pub headers: Vec<(&'a str, &'a str)>,
}

impl<'a> Request<'a> {
    /// Builds a request from a request target such as `/v1/x?y=1`.
    pub fn new(
        method: &'a str,
        scheme: &'a str,
        authority: &'a str,
        target: &'a str,
        headers: Vec<(&'a str, &'a str)>,
    ) -> Self {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Self {
            method,
            scheme,
            authority,
            path,
            query,
            headers,
        }
    }

    /// Every value of header `name`, trimmed and joined with `", "` (RFC 9421 §2.1). `None` if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    fn authority_normalized(&self) -> String {
        let lower = self.authority.to_ascii_lowercase();
        let default_port = match self.scheme {
            "http" => Some(":80"),
            "https" => Some(":443"),
            _ => None,
        };
        match default_port {
            Some(port) if lower.ends_with(port) => lower[..lower.len() - port.len()].to_string(),
            _ => lower,
        }
    }

    fn path_or_root(&self) -> &str {
        if self.path.is_empty() { "/" } else { self.path }
    }

    /// The value of one covered component.
    fn component(&self, name: &str) -> Result<String, HttpSigError> {
        let query = || format!("?{}", self.query.unwrap_or(""));
        Ok(match name {
            "@method" => self.method.to_string(),
            "@authority" => self.authority_normalized(),
            "@scheme" => self.scheme.to_ascii_lowercase(),
            "@path" => self.path_or_root().to_string(),
            "@query" => query(),
            "@request-target" => match self.query {
                Some(q) => format!("{}?{q}", self.path_or_root()),
                None => self.path_or_root().to_string(),
            },
            "@target-uri" => {
                let tail = self.query.map(|q| format!("?{q}")).unwrap_or_default();
                format!(
                    "{}://{}{}{tail}",
                    self.scheme.to_ascii_lowercase(),
                    self.authority_normalized(),
                    self.path_or_root()
                )
            }
            n if n.starts_with('@') => return Err(HttpSigError::UnsupportedComponent(n.into())),
            field => self
                .header(field)
                .ok_or_else(|| HttpSigError::MissingHeader(field.to_string()))?,
        })
    }
}

/// The covered components and parameters of one signature, as they appear in `Signature-Input`.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureParams {
    inner: InnerList,
    components: Vec<String>,
}

impl SignatureParams {
    /// Builds the parameters a CMR client signs with: the profile components, then `created`, `keyid`
    /// and `nonce`, in that order.
    pub fn profile(created: i64, keyid: &str, nonce: &str) -> Result<Self, HttpSigError> {
        let components: Vec<String> = PROFILE_COMPONENTS.iter().map(|s| s.to_string()).collect();
        let mut params = Parameters::new();
        params.insert(key("created"), BareItem::Integer(int(created)?));
        params.insert(key("keyid"), BareItem::String(sf_string(keyid)?));
        params.insert(key("nonce"), BareItem::String(sf_string(nonce)?));
        Self::from_parts(components, params)
    }

    /// Builds parameters from components and an ordered parameter map.
    pub fn from_parts(components: Vec<String>, params: Parameters) -> Result<Self, HttpSigError> {
        let items = components
            .iter()
            .map(|c| Ok(Item::new(sf_string(c)?)))
            .collect::<Result<Vec<_>, HttpSigError>>()?;
        Self::from_inner(InnerList { items, params })
    }

    fn from_inner(inner: InnerList) -> Result<Self, HttpSigError> {
        let mut components = Vec::with_capacity(inner.items.len());
        for item in &inner.items {
            let BareItem::String(name) = &item.bare_item else {
                return Err(HttpSigError::Malformed {
                    field: "Signature-Input",
                    reason: "a component identifier must be a string".into(),
                });
            };
            let name = name.as_str();
            if !item.params.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(HttpSigError::UnsupportedComponent(name.to_string()));
            }
            if components.iter().any(|c| c == name) {
                return Err(HttpSigError::DuplicateComponent(name.to_string()));
            }
            components.push(name.to_string());
        }
        Ok(Self { inner, components })
    }

    /// The covered component names, in order.
    pub fn components(&self) -> &[String] {
        &self.components
    }

    fn param(&self, name: &str) -> Option<&BareItem> {
        self.inner.params.get(name)
    }

    fn string_param(&self, name: &'static str) -> Result<Option<&str>, HttpSigError> {
        match self.param(name) {
            None => Ok(None),
            Some(BareItem::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(HttpSigError::Malformed {
                field: "Signature-Input",
                reason: format!("parameter {name} must be a string"),
            }),
        }
    }

    fn int_param(&self, name: &'static str) -> Result<Option<i64>, HttpSigError> {
        match self.param(name) {
            None => Ok(None),
            Some(BareItem::Integer(i)) => Ok(Some(i64::from(*i))),
            Some(_) => Err(HttpSigError::Malformed {
                field: "Signature-Input",
                reason: format!("parameter {name} must be an integer"),
            }),
        }
    }

    /// `created`, if present.
    pub fn created(&self) -> Result<Option<i64>, HttpSigError> {
        self.int_param("created")
    }

    /// `keyid`, if present.
    pub fn keyid(&self) -> Result<Option<&str>, HttpSigError> {
        self.string_param("keyid")
    }

    /// `nonce`, if present.
    pub fn nonce(&self) -> Result<Option<&str>, HttpSigError> {
        self.string_param("nonce")
    }

    /// The serialized inner list: the value of `@signature-params` and of the `Signature-Input` member.
    pub fn serialize(&self) -> String {
        vec![ListEntry::InnerList(self.inner.clone())]
            .serialize()
            .expect("a list with one member always serializes")
    }
}

/// One signature taken from the `Signature-Input` and `Signature` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSignature {
    /// The dictionary label.
    pub label: String,
    /// Its components and parameters.
    pub params: SignatureParams,
    /// The signature bytes.
    pub signature: Vec<u8>,
}

fn key(name: &str) -> sfv::Key {
    sfv::Key::from_string(name.to_string()).expect("parameter names here are valid sf keys")
}

fn int(v: i64) -> Result<sfv::Integer, HttpSigError> {
    sfv::Integer::try_from(v).map_err(|_| HttpSigError::Malformed {
        field: "Signature-Input",
        reason: "integer out of range".into(),
    })
}

fn sf_string(s: &str) -> Result<sfv::String, HttpSigError> {
    sfv::String::from_string(s.to_string()).map_err(|_| HttpSigError::Malformed {
        field: "Signature-Input",
        reason: "not a valid structured-field string".into(),
    })
}

fn parse_dictionary(field: &'static str, value: &str) -> Result<Dictionary, HttpSigError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(HttpSigError::Malformed {
            field,
            reason: format!("longer than {MAX_FIELD_LEN} bytes"),
        });
    }
    Parser::new(value)
        .parse::<Dictionary>()
        .map_err(|e| HttpSigError::Malformed {
            field,
            reason: e.to_string(),
        })
}

/// Parses `Signature-Input` and `Signature` into the signatures they carry, matched by label.
pub fn parse_signatures(
    signature_input: &str,
    signature: &str,
) -> Result<Vec<ParsedSignature>, HttpSigError> {
    let inputs = parse_dictionary("Signature-Input", signature_input)?;
    let sigs = parse_dictionary("Signature", signature)?;
    let mut out = Vec::with_capacity(inputs.len());
    for (label, entry) in inputs {
        let ListEntry::InnerList(inner) = entry else {
            return Err(HttpSigError::Malformed {
                field: "Signature-Input",
                reason: format!("member {label} is not an inner list"),
            });
        };
        let Some(ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(bytes),
            ..
        })) = sigs.get(label.as_str())
        else {
            return Err(HttpSigError::Malformed {
                field: "Signature",
                reason: format!("no byte sequence for label {label}"),
            });
        };
        out.push(ParsedSignature {
            label: label.to_string(),
            params: SignatureParams::from_inner(inner)?,
            signature: bytes.clone(),
        });
    }
    Ok(out)
}

/// The signature base (RFC 9421 §2.5) for `params` over `request`.
pub fn signature_base(
    request: &Request<'_>,
    params: &SignatureParams,
) -> Result<String, HttpSigError> {
    let mut base = String::new();
    for name in params.components() {
        let value = request.component(name)?;
        if value.contains('\n') || value.contains('\r') {
            return Err(HttpSigError::Malformed {
                field: "component",
                reason: format!("{name} contains a line break"),
            });
        }
        base.push_str(&format!("\"{name}\": {value}\n"));
    }
    base.push_str(&format!("\"@signature-params\": {}", params.serialize()));
    Ok(base)
}

/// Signs `request` under `label`; returns the `Signature-Input` and `Signature` field values.
pub fn sign(
    request: &Request<'_>,
    label: &str,
    params: &SignatureParams,
    key: &SigningKey,
) -> Result<(String, String), HttpSigError> {
    let base = signature_base(request, params)?;
    let signature = key.sign(base.as_bytes());
    Ok((
        format!("{label}={}", params.serialize()),
        format!("{label}=:{}:", B64.encode(signature.0)),
    ))
}

/// Verifies one parsed signature over `request` with `key`. Checks only the cryptography; the profile's
/// rules are in [`verify_request`].
pub fn verify(
    request: &Request<'_>,
    parsed: &ParsedSignature,
    key: &VerifyingKey,
) -> Result<(), HttpSigError> {
    let signature = Signature::from_slice(&parsed.signature).ok_or(HttpSigError::BadSignature)?;
    let base = signature_base(request, &parsed.params)?;
    key.verify(base.as_bytes(), &signature)
        .map_err(|_| HttpSigError::BadSignature)
}

/// The `Content-Digest` value for `body`: `sha-256=:…:`.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", B64.encode(crate::hash::sha256(body).0))
}

/// Checks a `Content-Digest` value against `body`. Every supported algorithm present must match, and at
/// least one must be present; unknown algorithms are ignored (RFC 9530 §2).
pub fn verify_content_digest(value: &str, body: &[u8]) -> Result<(), HttpSigError> {
    let dict = parse_dictionary("Content-Digest", value)?;
    let mut checked = 0;
    for (alg, entry) in &dict {
        let algorithm = match alg.as_str() {
            "sha-256" => &ring::digest::SHA256,
            "sha-512" => &ring::digest::SHA512,
            _ => continue,
        };
        let ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(expected),
            ..
        }) = entry
        else {
            return Err(HttpSigError::Malformed {
                field: "Content-Digest",
                reason: format!("{alg} is not a byte sequence"),
            });
        };
        if ring::digest::digest(algorithm, body).as_ref() != expected.as_slice() {
            return Err(HttpSigError::ContentDigestMismatch);
        }
        checked += 1;
    }
    if checked == 0 {
        return Err(HttpSigError::ContentDigestUnsupported);
    }
    Ok(())
}

/// The headers a client adds to a request it signs with the CMR profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `Content-Digest`.
    pub content_digest: String,
    /// `Signature-Input`.
    pub signature_input: String,
    /// `Signature`.
    pub signature: String,
    /// The signature base that was signed. A server that logs a request (a company's read is logged as
    /// an access) logs this base; the client compares it with its own to know the entry is its request's.
    pub signature_base: String,
}

/// Signs a request with the CMR profile: computes the Content-Digest of `body`, covers the profile
/// components, and signs under [`PROFILE_LABEL`]. `request.headers` must not already hold a
/// Content-Digest.
pub fn sign_request(
    request: &Request<'_>,
    body: &[u8],
    key: &SigningKey,
    keyid: &str,
    nonce: &str,
    created: i64,
) -> Result<SignedHeaders, HttpSigError> {
    let content_digest = content_digest(body);
    let mut with_digest = request.clone();
    with_digest
        .headers
        .push(("content-digest", &content_digest));
    let params = SignatureParams::profile(created, keyid, nonce)?;
    let signature_base = signature_base(&with_digest, &params)?;
    let signature = key.sign(signature_base.as_bytes());
    Ok(SignedHeaders {
        content_digest,
        signature_input: format!("{PROFILE_LABEL}={}", params.serialize()),
        signature: format!("{PROFILE_LABEL}=:{}:", B64.encode(signature.0)),
        signature_base,
    })
}

/// The time limits a verifier applies to `created`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// The verifier's clock, in Unix seconds.
    pub now: i64,
    /// The earliest `created` accepted regardless of `now`: the server's start time plus [`MAX_FUTURE`],
    /// so that a restart cannot reopen the replay window.
    pub horizon: i64,
}

/// What a verified request tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRequest {
    /// The key that signed it.
    pub keyid: String,
    /// The nonce, which the caller must check for replay over the window.
    pub nonce: String,
    /// The `created` time.
    pub created: i64,
    /// The signature base that verified (what a logged access keeps), once [`verify_request`] checked it;
    /// empty after [`precheck`] alone.
    pub signature_base: String,
    /// The Ed25519 signature over it.
    pub signature: [u8; 64],
}

/// Verifies a request against the CMR profile. `lookup` maps a `keyid` to its key. The caller still must
/// refuse a repeated (keyid, nonce) within the window.
pub fn verify_request(
    request: &Request<'_>,
    body: &[u8],
    window: TimeWindow,
    lookup: impl FnOnce(&str) -> Option<VerifyingKey>,
) -> Result<VerifiedRequest, HttpSigError> {
    let (chosen, mut checked) = precheck(request, window)?;
    let key = lookup(&checked.keyid).ok_or(HttpSigError::UnknownKey)?;
    let signature = Signature::from_slice(&chosen.signature).ok_or(HttpSigError::BadSignature)?;
    let base = signature_base(request, &chosen.params)?;
    key.verify(base.as_bytes(), &signature)
        .map_err(|_| HttpSigError::BadSignature)?;
    let digest = request
        .header("content-digest")
        .ok_or_else(|| HttpSigError::MissingHeader("Content-Digest".into()))?;
    verify_content_digest(&digest, body)?;
    checked.signature = chosen
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| HttpSigError::BadSignature)?;
    checked.signature_base = base;
    Ok(checked)
}

/// What can be checked of a request before its body arrives: the profile's signature is present, covers
/// the profile's components, and its `created` is within `window`, with a nonce and a key id. Returns
/// the chosen signature and what it says; [`verify_request`] then checks the signature and the body. A
/// server refuses early with this, so that a request that can never verify does not hold a slot while
/// its body trickles in.
pub fn precheck(
    request: &Request<'_>,
    window: TimeWindow,
) -> Result<(ParsedSignature, VerifiedRequest), HttpSigError> {
    let input = request
        .header("signature-input")
        .ok_or_else(|| HttpSigError::MissingHeader("Signature-Input".into()))?;
    let sig = request
        .header("signature")
        .ok_or_else(|| HttpSigError::MissingHeader("Signature".into()))?;
    let mut signatures = parse_signatures(&input, &sig)?;
    let chosen = match signatures.iter().position(|s| s.label == PROFILE_LABEL) {
        Some(at) => signatures.swap_remove(at),
        None if signatures.len() == 1 => signatures.swap_remove(0),
        None => return Err(HttpSigError::NoSignature(PROFILE_LABEL.into())),
    };
    let params = &chosen.params;
    for required in PROFILE_COMPONENTS {
        if !params.components().iter().any(|c| c == required) {
            return Err(HttpSigError::MissingComponent(required.into()));
        }
    }
    if let Some(alg) = params.string_param("alg")?
        && alg != "ed25519"
    {
        return Err(HttpSigError::UnsupportedAlgorithm(alg.into()));
    }
    let created = params
        .created()?
        .ok_or(HttpSigError::MissingParameter("created"))?;
    let age = window.now.saturating_sub(created);
    if age > MAX_AGE {
        return Err(HttpSigError::CreatedTooOld { age });
    }
    if -age > MAX_FUTURE {
        return Err(HttpSigError::CreatedInFuture { ahead: -age });
    }
    if created < window.horizon {
        return Err(HttpSigError::CreatedBeforeHorizon {
            horizon: window.horizon,
        });
    }
    if let Some(expires) = params.int_param("expires")?
        && expires <= window.now
    {
        return Err(HttpSigError::Expired);
    }
    let nonce = params
        .nonce()?
        .ok_or(HttpSigError::MissingParameter("nonce"))?;
    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
        return Err(HttpSigError::Malformed {
            field: "Signature-Input",
            reason: format!("nonce must be 1 to {MAX_NONCE_LEN} characters"),
        });
    }
    let keyid = params
        .keyid()?
        .ok_or(HttpSigError::MissingParameter("keyid"))?;
    let checked = VerifiedRequest {
        keyid: keyid.to_string(),
        nonce: nonce.to_string(),
        created,
        signature_base: String::new(),
        signature: [0; 64],
    };
    Ok((chosen, checked))
}
