// The consent dashboard as a customer uses it, in Debian's Chromium driven by playwright-core; the
// company acts through its own `cmr` between the customer's clicks. Run by the Rust test
// `the_consent_dashboard_in_a_real_browser` (crates/cmr-cli/tests/cli.rs), which starts the vault, the
// company's domain and `cmr customer ui`, and passes them here:
//   UI_URL       the link `cmr customer ui` printed (with its token)
//   CMR_BIN      the cmr binary; BANK_HOME the company's configuration folder (CMR_SERVER,
//                CMR_LOG_VKEY and CMR_PASSPHRASE are set for it)
//   ALEX_ID      the customer; BANK_DOMAIN the company's domain (plain http, test mode)
//   SHOTS        where the screenshots of the main pages go (docs/images)
// Exits non-zero, saying which step failed, if any step does not behave as promised.
import { chromium } from "playwright-core";
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import http from "node:http";
import assert from "node:assert/strict";
import path from "node:path";

const env = process.env;
const origin = new URL(env.UI_URL).origin;
const port = new URL(env.UI_URL).port;
const require = createRequire(import.meta.url);

function bankRun(args) {
  return spawnSync(env.CMR_BIN, ["--home", env.BANK_HOME, "--json", ...args], { encoding: "utf8" });
}
function bank(...args) {
  const r = bankRun(args);
  assert.equal(r.status, 0, `cmr ${args.join(" ")}: ${r.stderr}`);
  return JSON.parse(r.stdout);
}
function bankRefused(...args) {
  const r = bankRun(args);
  assert.notEqual(r.status, 0, `cmr ${args.join(" ")} should have been refused: ${r.stdout}`);
  return r.stderr;
}
const step = (what) => console.log(`step: ${what}`);
const shot = (page, name) => page.screenshot({ path: path.join(env.SHOTS, `ui-${name}.png`), fullPage: true });

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
const page = await context.newPage();
try {
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  page.on("pageerror", (e) => problems.push(e.message));

  step("the link opens the app and its token leaves the address bar");
  await page.goto(env.UI_URL);
  assert.ok(!page.url().includes("token"), page.url());
  await page.getByRole("heading", { name: "Overview" }).waitFor();

  step("1. a company's request appears without reloading");
  await page.goto(`${origin}/requests`);
  await page.getByText("No request is waiting for your answer.").waitFor();
  const asked = bank("company", "request", env.ALEX_ID,
    "--scope", "transactions:read", "--scope", "profile.contact:read", "--scope", "profile.address:read",
    "--purpose", "credit limit review", "--lookback", "12", "--duration", "30");
  assert.match(asked.request, /^[0-9a-f]{64}$/);
  await page.getByRole("heading", { name: /asks for access/ }).waitFor({ timeout: 20000 });
  await page.getByText("credit limit review").first().waitFor();
  await page.getByText("the last 12 months").waitFor();
  await shot(page, "requests");

  step("2. the customer approves it with narrowed scopes");
  await page.getByLabel(/company's domain/).fill(env.BANK_DOMAIN);
  await page.getByLabel("see your address").uncheck();
  await page.getByLabel(/How many months back/).fill("6");
  await page.getByRole("button", { name: "Approve" }).click();
  await page.getByText(/granted transactions:read, profile\.contact:read to Acme Bank/).waitFor();
  await page.getByRole("heading", { name: /Acme Bank/ }).first().waitFor();
  await shot(page, "grants");

  step("3. the company's read returns only those scopes");
  const grants = bank("company", "status").grants;
  assert.equal(grants.length, 1);
  const grant = grants[0].grant;
  assert.deepEqual(grants[0].scopes, ["transactions:read", "profile.contact:read"]);
  const txs = bank("company", "read", grant).records.map((r) => r.text);
  assert.deepEqual(txs, ["coffee 3.20"]);
  const contact = bank("company", "read", grant, "--scope", "profile.contact").records.map((r) => r.text);
  assert.deepEqual(contact, ["email: alex@example.org"]);
  assert.match(bankRefused("company", "read", grant, "--scope", "profile.address"), /does not cover profile\.address/);

  step("4. the customer revokes: one click, then a confirmation");
  await page.goto(`${origin}/grants`);
  await page.getByRole("button", { name: "Revoke the grant to Acme Bank (" + env.BANK_DOMAIN + ")" }).click();
  await page.getByText(/Revoke the grant to/).waitFor();
  await shot(page, "revoke");
  await page.getByRole("button", { name: "Yes, revoke it" }).click();
  await page.getByText(/grant revoked at log index \d+/).waitFor();
  await page.getByText(/famil(y|ies) rotated/).waitFor();

  step("5. the company's next read is refused");
  const refused = bankRefused("company", "read", grant);
  assert.match(refused, /revoked|not active|denied/i, refused);

  step("6. the history shows both reads");
  await page.goto(`${origin}/history`);
  const reads = page.locator("table.history tbody tr.access.read");
  assert.equal(await reads.count(), 2);
  await page.getByRole("img", { name: /Acme Bank \(.*\): 2 reads, 0 appends/ }).waitFor();
  await shot(page, "history");

  step("7. the audit status is green");
  await page.goto(`${origin}/audit`);
  await page.locator(".status.green").getByText("Verified.").waitFor();
  await shot(page, "audit");

  step("the other pages, for the guide");
  for (const [where, name, heading] of [
    ["/", "overview", "Overview"], ["/companies", "companies", "Companies"], ["/profile", "profile", "Profile"],
    ["/transactions", "transactions", "Transactions"], ["/settings", "settings", "Settings"],
  ]) {
    await page.goto(`${origin}${where}`);
    await page.getByRole("heading", { name: heading, exact: true }).waitFor();
    await shot(page, name);
  }
  const bankId = (await page.goto(`${origin}/companies`), await page.locator("form[action$='/block']").first().getAttribute("action")).split("/")[2];

  step("no page so far broke its Content-Security-Policy or threw, or failed to load");
  assert.deepEqual(problems, []);

  step("an action without the CSRF token is refused and changes nothing");
  const status = await page.evaluate(async (to) => (await fetch(to, {
    method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: "unblock=no",
  })).status, `/companies/${bankId}/block`);
  assert.equal(status, 403);

  step("a cross-site form posting to the app is refused and changes nothing");
  const evil = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end(`<!doctype html><title>win a prize</title><form id=f method=post action="${origin}/companies/${bankId}/block">
      <input name=unblock value=no></form><script>document.getElementById("f").submit()</script>`);
  });
  await new Promise((ok) => evil.listen(0, "127.0.0.1", ok));
  const evilPage = await context.newPage();
  const answer = evilPage.waitForResponse((r) => r.url().includes("/block"));
  await evilPage.goto(`http://localhost:${evil.address().port}/`);
  const forged = await answer;
  assert.ok([401, 403].includes(forged.status()), `the forged post got ${forged.status()}`);
  evil.close();
  await page.goto(`${origin}/companies`);
  await page.getByRole("button", { name: /^Block Acme Bank/ }).waitFor();

  step("a request with another Host header (DNS rebinding) is refused");
  const cookie = (await context.cookies(origin)).find((c) => c.name === "cmr_ui");
  assert.ok(cookie, "the session cookie");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Strict");
  const rebound = await new Promise((ok, fail) => {
    http.get({ host: "127.0.0.1", port, path: "/", headers: { host: `attacker.example:${port}`, cookie: `cmr_ui=${cookie.value}` } },
      (res) => { res.resume(); ok(res.statusCode); }).on("error", fail);
  });
  assert.equal(rebound, 421);
  const noSession = await new Promise((ok, fail) => {
    http.get({ host: "127.0.0.1", port, path: "/" }, (res) => { res.resume(); ok(res.statusCode); }).on("error", fail);
  });
  assert.equal(noSession, 401);

  step("axe-core finds no serious or critical violation on any page");
  // axe is injected as a script, which the app's CSP forbids: this context alone bypasses it.
  const audit = await browser.newContext({ bypassCSP: true });
  await audit.addCookies([cookie]);
  const a11y = await audit.newPage();
  for (const where of ["/", "/requests", "/grants", "/companies", "/history", "/profile", "/transactions", "/settings", "/audit"]) {
    await a11y.goto(`${origin}${where}`);
    await a11y.addScriptTag({ path: require.resolve("axe-core/axe.min.js") });
    const result = await a11y.evaluate(() => window.axe.run(document, { runOnly: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"] }));
    const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
    assert.deepEqual(bad.map((v) => `${where}: ${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`), []);
  }
  console.log("dashboard: every step behaved as promised");
} catch (e) {
  // What the customer saw when the step failed.
  console.log(`failed at ${page.url()}:\n${await page.locator("main").innerText().catch(() => "(no page)")}`);
  await page.screenshot({ path: path.join(env.SHOTS, "failed.png"), fullPage: true }).catch(() => {});
  throw e;
} finally {
  await browser.close();
}
