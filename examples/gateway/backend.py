#!/usr/bin/env python3
"""A company's backend on the CMR Vault company gateway, in plain Python (standard library only).

It reacts to each new grant that opens a customer's transactions: reads them (verified and decrypted
by the gateway), computes an attribute, appends it to the customer's vault if the grant allows, and
keeps the result only while the grant is active. When a grant ends (revoked, expired, used), it
deletes what it kept. No cryptography here: the gateway holds the keys and checks every answer.

    CMR_GATEWAY=http://127.0.0.1:7070 CMR_GATEWAY_TOKEN_FILE=~/.config/cmr/gateway.token \
        python3 examples/gateway/backend.py [--until-revoked] [--timeout SECONDS]

With --until-revoked it exits 0 once a grant it used has ended (as the CI test runs it).
"""

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

GATEWAY = os.environ.get("CMR_GATEWAY", "http://127.0.0.1:7070").rstrip("/")


def token():
    if os.environ.get("CMR_GATEWAY_TOKEN"):
        return os.environ["CMR_GATEWAY_TOKEN"].strip()
    path = os.path.expanduser(os.environ.get("CMR_GATEWAY_TOKEN_FILE", "gateway.token"))
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


TOKEN = token()


class Refused(Exception):
    """The gateway refused: its problem details (a stable code in `title`)."""

    def __init__(self, status, problem):
        super().__init__(f"{status} {problem.get('title')}: {problem.get('detail')}")
        self.status = status
        self.code = problem.get("title")


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        GATEWAY + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as e:
        raise Refused(e.code, json.load(e)) from None


def monthly_spend(records, customer):
    """The attribute: the average of the amounts in the customer's own transactions, per month."""
    amounts, months = [], set()
    for r in records:
        if r["author"] != customer:  # what companies appended (our insights among them)
            continue
        found = re.findall(r"\d+(?:\.\d+)?", r["text"])
        if found:
            amounts.append(float(found[-1]))
            months.add(r.get("month"))
    if not amounts:
        return None
    return sum(amounts) / max(len(months), 1)


def main():
    until_revoked = "--until-revoked" in sys.argv
    timeout = 120.0
    if "--timeout" in sys.argv:
        timeout = float(sys.argv[sys.argv.index("--timeout") + 1])
    deadline = time.monotonic() + timeout
    kept = {}  # grant id -> what we computed from it, only while the grant is active
    while time.monotonic() < deadline:
        for g in call("GET", "/v1/grants")["grants"]:
            gid = g["grant"]
            reads = any(s in ("transactions:read", "transactions:read+append") for s in g["scopes"])
            if g["status"] == "active" and reads and gid not in kept:
                records = call("POST", f"/v1/grants/{gid}/read", {"scope": "transactions"})["records"]
                spend = monthly_spend(records, g["customer"])
                kept[gid] = spend
                print(f"grant {gid[:12]}: read {len(records)} records, monthly spend {spend}", flush=True)
                if spend is not None and "transactions:read+append" in g["scopes"]:
                    text = f"insight: spends about {spend:.2f} a month"
                    index = call("POST", f"/v1/grants/{gid}/append", {"text": text})["index"]
                    print(f"grant {gid[:12]}: appended {text!r} at log index {index}", flush=True)
            elif g["status"] != "active" and gid in kept:
                del kept[gid]
                print(f"grant {gid[:12]}: {g['status']}; its data deleted here", flush=True)
                if until_revoked:
                    return 0
        time.sleep(0.3)
    print("timed out", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(2)
