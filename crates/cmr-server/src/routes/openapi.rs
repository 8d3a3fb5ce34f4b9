//! The OpenAPI 3.1 document at `/v1/openapi.json`, built from one table of the routes. A test checks that
//! every route in the table is served by the router.

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::AppState;

/// One documented route.
pub struct RouteDoc {
    /// `get` or `post`.
    pub method: &'static str,
    /// The path, with `{param}` placeholders.
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Whether the request must be signed (RFC 9421 profile).
    pub signed: bool,
    /// The JSON body's fields: (name, type, required).
    pub body: &'static [(&'static str, &'static str, bool)],
}

/// Every route the server serves.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/healthz",
        summary: "Liveness",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/openapi.json",
        summary: "This document",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/log/checkpoint",
        summary: "The latest signed checkpoint (C2SP signed note)",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/log/commitments",
        summary: "Leaf commitments from..to (at most 1,000)",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/log/proofs/inclusion",
        summary: "RFC 9162 inclusion proof (index, size)",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/log/proofs/consistency",
        summary: "RFC 9162 consistency proof (old, new)",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "post",
        path: "/v1/log/entries/{index}",
        summary: "An entry's salt and body, for the parties it involves and admitted auditors",
        signed: true,
        body: &[],
    },
    RouteDoc {
        method: "get",
        path: "/v1/auditors",
        summary: "Every auditor admission and dismissal, with inclusion proofs",
        signed: false,
        body: &[],
    },
    RouteDoc {
        method: "post",
        path: "/v1/auditors",
        summary: "Admit or dismiss an auditor (a statement signed with the log key)",
        signed: false,
        body: &[("statement", "signed note", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities",
        summary: "Register an identity (signed by its inception key)",
        signed: true,
        body: &[("event", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities/{id}/devices",
        summary: "Certify a device",
        signed: true,
        body: &[("certificate", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities/{id}/devices/revoke",
        summary: "Revoke a device",
        signed: true,
        body: &[("revocation", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities/{id}/rotate",
        summary: "Rotate the identity key (recovery)",
        signed: true,
        body: &[("event", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/directory",
        summary: "Publish the next key directory (compare-and-swap)",
        signed: true,
        body: &[("directory", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/statements",
        summary: "Record a consent statement",
        signed: true,
        body: &[("statement", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/history",
        summary: "The customer's chain of entries, newest first",
        signed: true,
        body: &[("before", "integer", false), ("limit", "integer", false)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/families/{family}/batches",
        summary: "Write a signed batch of records",
        signed: true,
        body: &[
            ("batch", "base64", true),
            ("records", "array of base64", true),
            ("grant", "hex", false),
        ],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/families/{family}/head",
        summary: "The digest of a family's head, for the customer or a company that may append to it",
        signed: true,
        body: &[("grant", "hex id", false)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/families/{family}/read",
        summary: "Read records with a completeness proof (a company's read is logged first)",
        signed: true,
        body: &[
            ("from", "YYYY-MM", true),
            ("to", "YYYY-MM", true),
            ("grant", "hex", false),
            ("cursor", "[YYYY-MM, integer]", false),
            ("limit", "integer", false),
        ],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/requests",
        summary: "The customer's unanswered access requests, oldest first",
        signed: true,
        body: &[],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/backup",
        summary: "Replace the customer's key backup (client-sealed; compare-and-swap on the version)",
        signed: true,
        body: &[("version", "integer", true), ("backup", "base64", true)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/backup/latest",
        summary: "The customer's latest key backup",
        signed: true,
        body: &[],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities/{id}/events",
        summary: "An identity's key events with inclusion proofs and the signed key-event head; a \
                  customer's only to itself, involved parties, admitted auditors and a recovering device",
        signed: true,
        body: &[("reveal", "base64", false)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/identities/{id}/vaults",
        summary: "The customers whose chains concern the calling identity (how a company discovers grants)",
        signed: true,
        body: &[("after", "hex id", false), ("limit", "integer", false)],
    },
    RouteDoc {
        method: "post",
        path: "/v1/vaults/{customer}/relationship",
        summary: "What of this vault concerns the calling company, with inclusion proofs",
        signed: true,
        body: &[("after", "integer", false), ("limit", "integer", false)],
    },
];

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": r.summary,
            "parameters": params,
            "responses": {
                "200": {"description": "Success"},
                "default": {"description": "Problem Details (RFC 9457)", "content": {"application/problem+json": {}}}
            },
        });
        if r.signed {
            op["security"] = json!([{"rfc9421": []}]);
        }
        if !r.body.is_empty() {
            let props: Map<String, Value> = r
                .body
                .iter()
                .map(|(n, t, _)| (n.to_string(), json!({"description": t})))
                .collect();
            let required: Vec<&str> = r
                .body
                .iter()
                .filter(|(_, _, req)| *req)
                .map(|(n, _, _)| *n)
                .collect();
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false, "properties": props, "required": required
            }}}});
        }
        paths
            .entry(r.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|o| o.insert(r.method.to_string(), op));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "CMR Vault", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"rfc9421": {
            "type": "apiKey", "in": "header", "name": "Signature",
            "description": "RFC 9421 HTTP Message Signature (Ed25519) over @method, @authority, @path, @query and content-digest, with created, keyid and nonce; see docs/api.md"
        }}},
        "paths": paths,
    })
}

/// The route that serves it.
pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/openapi.json", get(|| async { Json(document()) }))
}
