#!/usr/bin/env python3
"""A generic RFC 9421 client, written apart from the Rust code, to show that another language can call the
CMR Vault API. It knows only RFC 9421 (HTTP Message Signatures), RFC 9530 (Content-Digest) and Ed25519.

usage: rfc9421_client.py HOST:PORT PATH SEED_HEX KEYID [JSON_BODY]
prints the status code, then the response body.
"""
import base64
import hashlib
import http.client
import secrets
import sys
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def main() -> None:
    authority, path, seed_hex, keyid = sys.argv[1:5]
    body = (sys.argv[5] if len(sys.argv) > 5 else "{}").encode()
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    path_only, _, query = path.partition("?")
    params = (
        '("@method" "@authority" "@path" "@query" "content-digest")'
        f';created={int(time.time())};keyid="{keyid}";nonce="{secrets.token_hex(8)}";alg="ed25519"'
    )
    base = "\n".join(
        [
            '"@method": POST',
            f'"@authority": {authority}',
            f'"@path": {path_only}',
            f'"@query": ?{query}',
            f'"content-digest": {digest}',
            f'"@signature-params": {params}',
        ]
    )
    signature = base64.b64encode(key.sign(base.encode())).decode()
    conn = http.client.HTTPConnection(authority, timeout=10)
    conn.request(
        "POST",
        path,
        body=body,
        headers={
            "Content-Type": "application/json",
            "Content-Digest": digest,
            # A generic client's default label: the server accepts any label on a single signature.
            "Signature-Input": f"sig1={params}",
            "Signature": f"sig1=:{signature}:",
        },
    )
    resp = conn.getresponse()
    print(resp.status)
    print(resp.read().decode())


if __name__ == "__main__":
    main()
