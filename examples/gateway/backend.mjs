// A company's backend on the CMR Vault company gateway, in TypeScript-compatible JavaScript for
// Node 20 (`fetch` only, no dependency). The same behaviour as backend.py: each new grant that opens a
// customer's transactions is read (verified and decrypted by the gateway), an attribute computed and
// appended if the grant allows, and what was kept is deleted when the grant ends.
//
//   CMR_GATEWAY=http://127.0.0.1:7070 CMR_GATEWAY_TOKEN_FILE=~/.config/cmr/gateway.token \
//       node examples/gateway/backend.mjs [--until-revoked] [--timeout SECONDS]
import { readFileSync } from "node:fs";

const gateway = (process.env.CMR_GATEWAY ?? "http://127.0.0.1:7070").replace(/\/$/, "");
const token = (
  process.env.CMR_GATEWAY_TOKEN ??
  readFileSync(process.env.CMR_GATEWAY_TOKEN_FILE ?? "gateway.token", "utf8")
).trim();

/** A refusal: the gateway's problem details, with its stable code. */
class Refused extends Error {
  constructor(status, problem) {
    super(`${status} ${problem.title}: ${problem.detail}`);
    this.code = problem.title;
  }
}

async function call(method, path, body) {
  const answer = await fetch(gateway + path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await answer.json();
  if (!answer.ok) throw new Refused(answer.status, json);
  return json;
}

/** The attribute: the average of the amounts in the customer's own transactions, per month. */
function monthlySpend(records, customer) {
  const amounts = [];
  const months = new Set();
  for (const r of records) {
    if (r.author !== customer) continue; // what companies appended (our insights among them)
    const found = r.text.match(/\d+(?:\.\d+)?/g);
    if (found) {
      amounts.push(Number(found[found.length - 1]));
      months.add(r.month);
    }
  }
  if (amounts.length === 0) return null;
  return amounts.reduce((a, b) => a + b, 0) / Math.max(months.size, 1);
}

async function main() {
  const untilRevoked = process.argv.includes("--until-revoked");
  const at = process.argv.indexOf("--timeout");
  const deadline = Date.now() + 1000 * (at > 0 ? Number(process.argv[at + 1]) : 120);
  const kept = new Map(); // grant id -> what we computed, only while the grant is active
  while (Date.now() < deadline) {
    for (const g of (await call("GET", "/v1/grants")).grants) {
      const reads = g.scopes.some((s) => s === "transactions:read" || s === "transactions:read+append");
      if (g.status === "active" && reads && !kept.has(g.grant)) {
        const { records } = await call("POST", `/v1/grants/${g.grant}/read`, { scope: "transactions" });
        const spend = monthlySpend(records, g.customer);
        kept.set(g.grant, spend);
        console.log(`grant ${g.grant.slice(0, 12)}: read ${records.length} records, monthly spend ${spend}`);
        if (spend !== null && g.scopes.includes("transactions:read+append")) {
          const text = `insight: spends about ${spend.toFixed(2)} a month`;
          const { index } = await call("POST", `/v1/grants/${g.grant}/append`, { text });
          console.log(`grant ${g.grant.slice(0, 12)}: appended "${text}" at log index ${index}`);
        }
      } else if (g.status !== "active" && kept.has(g.grant)) {
        kept.delete(g.grant);
        console.log(`grant ${g.grant.slice(0, 12)}: ${g.status}; its data deleted here`);
        if (untilRevoked) return 0;
      }
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  console.error("timed out");
  return 1;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`refused: ${e.message}`);
    process.exit(2);
  },
);
