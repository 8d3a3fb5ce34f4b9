//! The pages: HTML from the commands' JSON results, every value escaped by maud. Pure functions (no
//! I/O), so the words and the pictures are tested without a browser.

use std::collections::HashMap;

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::{Flash, Frame};
use crate::error::CliError;
use crate::out::{day, now, short, time};

/// Names of companies whose domain the customer checked: identity hex → (name, domain).
type Checked = HashMap<String, (String, String)>;

const NAV: [(&str, &str); 9] = [
    ("/", "Overview"),
    ("/requests", "Requests"),
    ("/grants", "Grants"),
    ("/companies", "Companies"),
    ("/history", "Access history"),
    ("/profile", "Profile"),
    ("/transactions", "Transactions"),
    ("/settings", "Settings"),
    ("/audit", "Audit"),
];

/// The frame of every page: the skip link, the navigation, the flash, the live region.
fn layout(f: &Frame, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · CMR Vault" }
                link rel="icon" href="/assets/icon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/assets/ui.css";
                script src="/assets/ui.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to the content" }
                header {
                    p.brand { "CMR Vault" span.sub { " · your consent dashboard" } }
                    nav aria-label="Main" {
                        ul {
                            @for (href, label) in NAV {
                                li {
                                    a href=(href) aria-current=[(f.path == href).then_some("page")] { (label) }
                                }
                            }
                        }
                    }
                }
                main #main data-live=(f.live) {
                    h1 { (title) }
                    @if let Some(flash) = &f.flash { (flash_box(flash)) }
                    (body)
                }
                div #live role="status" aria-live="polite" {}
                footer {
                    p { "Your keys stay on this computer: this page talks only to the app you started, which verifies everything the vault says." }
                }
            }
        }
    }
}

fn flash_box(flash: &Flash) -> Markup {
    html! {
        div class=(if flash.ok { "flash ok" } else { "flash error" }) role=(if flash.ok { "status" } else { "alert" }) data-message="action" {
            @for line in &flash.lines { p { (line) } }
        }
    }
}

/// A page that could not be shown: the error and its hint.
pub(crate) fn failed(f: &Frame, title: &str, e: &CliError) -> Markup {
    layout(
        f,
        title,
        html! {
            div.flash.error role="alert" {
                p { (e.message) }
                @if let Some(h) = &e.hint { p { (h) } }
            }
        },
    )
}

/// A scope in plain words.
pub(crate) fn scope_words(scope: &str) -> &str {
    match scope {
        "profile.identity" => "your identity details",
        "profile.contact" => "your contact details",
        "profile.address" => "your address",
        "profile.preferences" => "your communication and payment preferences",
        "profile.inferred" => "what the company inferred about you",
        "transactions" => "your transactions with the company",
        other => other,
    }
}

/// `SCOPE:ACCESS` in plain words: "see your address", "see and add to your transactions …".
pub(crate) fn scope_access_words(sa: &str) -> String {
    let (scope, access) = sa.split_once(':').unwrap_or((sa, "read"));
    let verb = match access {
        "read" => "see",
        "append" => "add to",
        _ => "see and add to",
    };
    format!("{verb} {}", scope_words(scope))
}

/// Who a company is: its checked name and domain, or "a company" and its short id.
fn who(checked: &Checked, id: &str) -> String {
    match checked.get(id) {
        Some((name, domain)) => format!("{name} ({domain})"),
        None => format!("a company, {} (domain not checked yet)", short(id)),
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

fn list<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v[k].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn status_badge(status: &str) -> Markup {
    html! { span class={"badge " (status)} { (status) } }
}

/// The hidden CSRF field of every form.
fn csrf(f: &Frame) -> Markup {
    html! { input type="hidden" name="csrf" value=(f.csrf); }
}

pub(crate) fn overview(
    f: &Frame,
    checked: &Checked,
    requests: &Value,
    grants: &Value,
    history: &Value,
) -> Markup {
    let pending = list(requests, "pending");
    let active: Vec<&Value> = list(grants, "grants")
        .iter()
        .filter(|g| s(g, "status") == "active")
        .collect();
    let accesses: Vec<&Value> = list(history, "history")
        .iter()
        .filter(|e| e.get("access").is_some())
        .collect();
    let body = html! {
        section.cards aria-label="At a glance" {
            a.card href="/grants" { strong { (active.len()) } " active grant" @if active.len() != 1 { "s" } }
            a.card href="/requests" { strong { (pending.len()) } " request" @if pending.len() != 1 { "s" } " waiting" }
            a.card href="/history" { strong { (accesses.len()) } " read" @if accesses.len() != 1 { "s" } " and appends" }
        }
        section aria-labelledby="who-h" {
            h2 #who-h { "Who can see what" }
            @if active.is_empty() {
                p { "No company can see anything in your vault." }
            } @else {
                table {
                    thead { tr { th scope="col" { "Company" } th scope="col" { "Can" } th scope="col" { "Why" } th scope="col" { "Since" } th scope="col" { "Lasting" } th scope="col" { span.visually-hidden { "Stop it" } } } }
                    tbody {
                        @for g in &active {
                            tr {
                                td { (who(checked, s(g, "company"))) }
                                td { ul.plain { @for sc in list(g, "scopes") { li { (scope_access_words(sc.as_str().unwrap_or_default())) } } } }
                                td { (s(g, "purpose")) }
                                td { (day(g["time"].as_u64().unwrap_or_default())) }
                                td { (s(g, "duration")) }
                                td { (revoke_button(f, s(g, "grant"), &who(checked, s(g, "company")))) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="req-h" {
            h2 #req-h { "Requests waiting for your answer" }
            @if pending.is_empty() { p { "None." } }
            @else {
                ul {
                    @for p in pending {
                        li { a href="/requests" { (who(checked, s(p, "company"))) } " asks to " (list(p, "scopes").iter().map(|x| scope_access_words(x.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")) " — " (s(p, "purpose")) }
                    }
                }
            }
        }
        section aria-labelledby="acc-h" {
            h2 #acc-h { "Latest reads and appends" }
            (activity_chart(&accesses, now()))
            (access_table(accesses.iter().take(10).copied()))
        }
    };
    layout(f, "Overview", body)
}

fn revoke_button(f: &Frame, grant: &str, whom: &str) -> Markup {
    html! {
        form.inline method="post" action={"/grants/" (grant) "/revoke"} {
            (csrf(f))
            button.danger type="submit" aria-label={"Revoke the grant to " (whom)} { "Revoke" }
        }
    }
}

fn access_table<'a>(rows: impl Iterator<Item = &'a Value>) -> Markup {
    let rows: Vec<&Value> = rows.collect();
    html! {
        @if rows.is_empty() {
            p { "No company has read or added anything yet." }
        } @else {
            table.history {
                thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "Did" } th scope="col" { "What" } th scope="col" { "Months" } th scope="col" { "Grant" } } }
                tbody {
                    @for e in rows {
                        @let a = &e["access"];
                        tr class={"access " (s(a, "kind"))} {
                            td { (time(e["time"].as_u64().unwrap_or_default())) }
                            td { (s(a, "company")) }
                            td { @if s(a, "kind") == "read" { "read" } @else { "added" } }
                            td { (list(a, "scopes").iter().map(|x| scope_words(x.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")) }
                            td { (months(a)) }
                            td { code { (short(s(a, "grant"))) } }
                        }
                    }
                }
            }
        }
    }
}

/// Which months an access covered, in words: "2026-06 to 2026-12", "all" for a profile section (one
/// period). (The log keeps an access's families and periods, not a count of records.)
fn months(a: &Value) -> String {
    let mut spans: Vec<String> = list(a, "periods")
        .iter()
        .filter_map(Value::as_str)
        .map(|p| match p.split_once("..") {
            Some(("2000-01", "2000-01")) => "all".to_string(),
            Some((from, to)) if from == to => from.to_string(),
            Some((from, to)) => format!("{from} to {to}"),
            None => p.to_string(),
        })
        .collect();
    spans.dedup();
    spans.join(", ")
}

/// Reads and appends per company over the last 14 days, drawn here as SVG (no external service): one
/// row per company, one column per day, a bar for reads and one for appends.
pub(crate) fn activity_chart(accesses: &[&Value], now: u64) -> Markup {
    const DAYS: u64 = 14;
    let today = now / 86_400;
    let mut per: Vec<(String, [[u32; 2]; DAYS as usize])> = Vec::new();
    for e in accesses {
        let a = &e["access"];
        let d = e["time"].as_u64().unwrap_or_default() / 86_400;
        if d + DAYS <= today || d > today {
            continue;
        }
        let col = (DAYS - 1 - (today - d)) as usize;
        let k = usize::from(s(a, "kind") != "read");
        let company = s(a, "company").to_string();
        let row = match per.iter().position(|(c, _)| *c == company) {
            Some(i) => i,
            None => {
                per.push((company, [[0; 2]; DAYS as usize]));
                per.len() - 1
            }
        };
        per[row].1[col][k] += 1;
    }
    if per.is_empty() {
        return html! {};
    }
    let max = per
        .iter()
        .flat_map(|(_, d)| d.iter().flat_map(|x| x.iter()))
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let (label_w, col_w, row_h) = (220u32, 28u32, 44u32);
    let width = label_w + col_w * DAYS as u32 + 10;
    let height = row_h * per.len() as u32 + 24;
    let summary: Vec<String> = per
        .iter()
        .map(|(c, d)| {
            let reads: u32 = d.iter().map(|x| x[0]).sum();
            let appends: u32 = d.iter().map(|x| x[1]).sum();
            format!("{c}: {reads} reads, {appends} appends")
        })
        .collect();
    let label = format!("In the last 14 days: {}", summary.join("; "));
    html! {
        figure.chart {
            svg role="img" aria-label=(label) viewBox={"0 0 " (width) " " (height)} width=(width) height=(height) xmlns="http://www.w3.org/2000/svg" {
                title { (label) }
                @for (r, (company, days)) in per.iter().enumerate() {
                    @let y = r as u32 * row_h;
                    text x="0" y=(y + row_h / 2 + 4) class="chart-label" { (company) }
                    @for (i, counts) in days.iter().enumerate() {
                        @let x = label_w + i as u32 * col_w;
                        @let hr = counts[0] * (row_h - 8) / max;
                        @let ha = counts[1] * (row_h - 8) / max;
                        rect x=(x) y=(y + row_h - 4 - hr) width=(col_w / 2 - 2) height=(hr) class="bar-read" {}
                        rect x=(x + col_w / 2) y=(y + row_h - 4 - ha) width=(col_w / 2 - 2) height=(ha) class="bar-append" {}
                    }
                }
                text x=(label_w) y=(height - 6) class="chart-axis" { "14 days ago" }
                text x=(width - 60) y=(height - 6) class="chart-axis" { "today" }
            }
            figcaption { span.key.read { "reads" } " " span.key.append { "appends" } " per day, per company" }
        }
    }
}

/// Which months a grant opens of each family it covers, from its look-back start to this month (at
/// most 24 columns; profile sections have one period: all of it).
pub(crate) fn coverage(g: &Value, now: u64) -> Markup {
    let Some(start) = cmr_core::family::Period::parse(s(g, "lookback_start")) else {
        return html! {};
    };
    let Some(this) = cmr_core::family::Period::from_unix(now as i64) else {
        return html! {};
    };
    let first = cmr_core::family::Period(start.0.max(this.0.saturating_sub(23)));
    let months: Vec<cmr_core::family::Period> =
        (first.0..=this.0).map(cmr_core::family::Period).collect();
    html! {
        table.coverage {
            caption { "What this grant opens" }
            thead {
                tr {
                    th scope="col" { "Family" }
                    @for m in &months { th scope="col" { (m.to_string()) } }
                }
            }
            tbody {
                @for sc in list(g, "scopes") {
                    @let sc = sc.as_str().unwrap_or_default();
                    @let scope = sc.split_once(':').map_or(sc, |x| x.0);
                    tr {
                        th scope="row" { (scope_access_words(sc)) }
                        @if scope == "transactions" {
                            @for m in &months {
                                @let open = *m >= start;
                                td class=(if open { "open" } else { "closed" }) { @if open { "open" } @else { "—" } }
                            }
                        } @else {
                            td.open colspan=(months.len()) { "all of it (one period)" }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn requests(f: &Frame, checked: &Checked, requests: &Value) -> Markup {
    let pending = list(requests, "pending");
    let body = html! {
        @if pending.is_empty() {
            p { "No request is waiting for your answer." }
        }
        @for p in pending {
            @let id = s(p, "id");
            @let company = s(p, "company");
            @let known = checked.get(company);
            @let lookback = p["lookback_months"].as_u64().unwrap_or_default();
            article.request aria-labelledby={"r-" (id)} {
                h2 #{"r-" (id)} { (who(checked, company)) " asks for access" }
                dl {
                    dt { "Who" } dd { (who(checked, company)) br; "identity " code { (company) } }
                    dt { "What" } dd { ul.plain { @for sc in list(p, "scopes") { li { (scope_access_words(sc.as_str().unwrap_or_default())) } } } }
                    dt { "Why" } dd { (s(p, "purpose")) }
                    dt { "For how long" } dd { (s(p, "duration")) }
                    dt { "How far back" } dd { "the last " (lookback) " months" }
                }
                form.approve method="post" action={"/requests/" (id) "/approve"} {
                    (csrf(f))
                    fieldset {
                        legend { "Approve, as asked or narrower" }
                        p {
                            label for={"domain-" (id)} { "The company's domain (its key document there must name it)" }
                            input #{"domain-" (id)} type="text" name="domain" required value=[known.map(|k| k.1.as_str())] autocomplete="off";
                        }
                        fieldset.scopes {
                            legend { "Scopes to grant (untick to narrow)" }
                            @for sc in list(p, "scopes") {
                                @let sc = sc.as_str().unwrap_or_default();
                                @let fid = format!("s-{}-{}", &id[..12.min(id.len())], sc.replace([':', '.', '+'], "-"));
                                p.check {
                                    input #(fid) type="checkbox" name="scope" value=(sc) checked;
                                    label for=(fid) { (scope_access_words(sc)) }
                                }
                            }
                        }
                        p {
                            label for={"lookback-" (id)} { "How many months back (at most " (lookback) ")" }
                            input #{"lookback-" (id)} type="number" name="lookback" min="0" max=(lookback) value=(lookback);
                        }
                        p {
                            label for={"duration-" (id)} { "For how long" }
                            select #{"duration-" (id)} name="duration" {
                                option value="asked" selected { "as asked: " (s(p, "duration")) }
                                option value="once" { "one read only" }
                                option value="7" { "7 days" }
                                option value="30" { "30 days" }
                                option value="90" { "90 days" }
                            }
                        }
                        button.primary type="submit" { "Approve" }
                    }
                }
                form.deny method="post" action={"/requests/" (id) "/deny"} {
                    (csrf(f))
                    p {
                        label for={"reason-" (id)} { "Reason (the company sees it)" }
                        input #{"reason-" (id)} type="text" name="reason" value="declined";
                    }
                    button type="submit" { "Deny" }
                }
            }
        }
    };
    layout(f, "Requests", body)
}

fn grant_group<'a>(grants: &'a [Value], wanted: &[&str]) -> Vec<&'a Value> {
    grants
        .iter()
        .filter(|g| wanted.contains(&s(g, "status")))
        .collect()
}

pub(crate) fn grants(f: &Frame, checked: &Checked, grants: &Value, companies: &Value) -> Markup {
    let all = list(grants, "grants");
    let active = grant_group(all, &["active", "not-yet-valid"]);
    let ended = grant_group(all, &["used", "expired", "revoked", "erased", "not-in-log"]);
    let t = now();
    let body = html! {
        section aria-labelledby="active-h" {
            h2 #active-h { "Active" }
            @if active.is_empty() { p { "No active grant." } }
            @for g in &active {
                @let whom = who(checked, s(g, "company"));
                article.grant aria-label={"Grant to " (whom)} {
                    h3 { (whom) " " (status_badge(s(g, "status"))) }
                    p { "Can " (list(g, "scopes").iter().map(|x| scope_access_words(x.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")) ", for “" (s(g, "purpose")) "”, " (s(g, "duration")) "; granted " (day(g["time"].as_u64().unwrap_or_default())) "." }
                    (coverage(g, t))
                    div.actions {
                        (revoke_button(f, s(g, "grant"), &whom))
                        form.inline method="post" action={"/grants/" (s(g, "grant")) "/receipt"} {
                            (csrf(f))
                            button type="submit" aria-label={"Download the consent receipt of the grant to " (whom)} { "Consent receipt" }
                        }
                    }
                }
            }
        }
        section aria-labelledby="ended-h" {
            h2 #ended-h { "Ended: expired, used, revoked" }
            @if ended.is_empty() { p { "None." } }
            @else {
                table {
                    thead { tr { th scope="col" { "Company" } th scope="col" { "Status" } th scope="col" { "Could" } th scope="col" { "Why" } th scope="col" { "Granted" } th scope="col" { "Receipt" } } }
                    tbody {
                        @for g in &ended {
                            tr {
                                td { (who(checked, s(g, "company"))) }
                                td { (status_badge(s(g, "status"))) }
                                td { (list(g, "scopes").iter().map(|x| scope_access_words(x.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")) }
                                td { (s(g, "purpose")) }
                                td { (day(g["time"].as_u64().unwrap_or_default())) }
                                td {
                                    form.inline method="post" action={"/grants/" (s(g, "grant")) "/receipt"} {
                                        (csrf(f))
                                        button type="submit" aria-label={"Download the consent receipt of grant " (short(s(g, "grant")))} { "Receipt" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="new-h" {
            h2 #new-h { "Grant a company access it did not ask for" }
            form method="post" action="/grants/new" {
                (csrf(f))
                p {
                    label for="g-company" { "Company" }
                    select #g-company name="company" required {
                        @for c in list(companies, "companies") {
                            option value=(s(c, "company")) { (s(c, "name")) " " (short(s(c, "company"))) }
                        }
                    }
                }
                p { label for="g-domain" { "Its domain" } input #g-domain type="text" name="domain" required; }
                fieldset.scopes {
                    legend { "Scopes" }
                    @for (i, sc) in ["profile.identity:read", "profile.contact:read", "profile.address:read", "profile.preferences:read", "transactions:read", "transactions:read+append", "profile.inferred:append"].iter().enumerate() {
                        p.check { input #{"g-s" (i)} type="checkbox" name="scope" value=(sc); label for={"g-s" (i)} { (scope_access_words(sc)) } }
                    }
                }
                p { label for="g-purpose" { "Why (the company and the receipt show it)" } input #g-purpose type="text" name="purpose" required; }
                p { label for="g-lookback" { "Months back" } input #g-lookback type="number" name="lookback" min="0" max="1200" value="12"; }
                p {
                    label for="g-duration" { "For how long" }
                    select #g-duration name="duration" {
                        option value="persistent" { "until I revoke it" }
                        option value="once" { "one read only" }
                        option value="30" { "30 days" }
                        option value="90" { "90 days" }
                    }
                }
                button.primary type="submit" { "Grant" }
            }
        }
    };
    layout(f, "Grants", body)
}

pub(crate) fn confirm_revoke(f: &Frame, checked: &Checked, grants: &Value, id: &str) -> Markup {
    let g = list(grants, "grants")
        .iter()
        .find(|g| s(g, "grant").starts_with(id.trim_end_matches('…')));
    let body = html! {
        @match g {
            None => div.flash.error role="alert" { p { "No such grant." } },
            Some(g) => {
                @let whom = who(checked, s(g, "company"));
                p { "Revoke the grant to " strong { (whom) } "? It can then no longer "
                    (list(g, "scopes").iter().map(|x| scope_access_words(x.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", "))
                    ". The families it could read get fresh keys (a rotation), so what is added later stays closed to it." }
                form method="post" action={"/grants/" (s(g, "grant")) "/revoke"} {
                    (csrf(f))
                    input type="hidden" name="confirm" value="yes";
                    p { label for="reason" { "Reason (kept in the log)" } input #reason type="text" name="reason" value="revoked by the customer"; }
                    button.danger type="submit" { "Yes, revoke it" }
                    " "
                    a href="/grants" { "No, keep it" }
                }
            }
        }
    };
    layout(f, "Revoke a grant", body)
}

pub(crate) fn companies(f: &Frame, companies: &Value) -> Markup {
    let all = list(companies, "companies");
    let body = html! {
        @if all.is_empty() { p { "No company yet: they appear once you grant them access or check their domain." } }
        @else {
            table {
                thead { tr { th scope="col" { "Company" } th scope="col" { "Verified domain" } th scope="col" { "Fingerprint" } th scope="col" { "Active grants" } th scope="col" { "Blocked" } th scope="col" { span.visually-hidden { "Block" } } } }
                tbody {
                    @for c in all {
                        @let name = c["name"].as_str().unwrap_or("(not checked)");
                        @let blocked = c["blocked"].as_bool().unwrap_or_default();
                        tr {
                            td { (name) br; code { (short(s(c, "company"))) } }
                            td { (c["domain"].as_str().unwrap_or("not checked")) }
                            td { code { (s(c, "fingerprint")) } }
                            td { (c["active_grants"].as_u64().unwrap_or_default()) }
                            td { @if blocked { "blocked" } @else { "no" } }
                            td {
                                form.inline method="post" action={"/companies/" (s(c, "company")) "/block"} {
                                    (csrf(f))
                                    @if blocked {
                                        input type="hidden" name="unblock" value="yes";
                                        button type="submit" aria-label={"Unblock " (name)} { "Unblock" }
                                    } @else {
                                        button.danger type="submit" aria-label={"Block " (name)} { "Block" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p.note { "A blocked company's requests are refused; its grants stay until you revoke them." }
        }
    };
    layout(f, "Companies", body)
}

pub(crate) fn history(f: &Frame, history: &Value) -> Markup {
    let all = list(history, "history");
    let accesses: Vec<&Value> = all.iter().filter(|e| e.get("access").is_some()).collect();
    let body = html! {
        p { (all.len()) " entries on your vault's chain, each checked against the log's signed checkpoint and linked to the one before: none missing." }
        (activity_chart(&accesses, now()))
        h2 { "Reads and appends" }
        (access_table(accesses.iter().copied()))
        h2 { "Everything, newest first" }
        ol.timeline reversed {
            @for e in all {
                li class=(if e.get("access").is_some() { "access" } else { "other" }) {
                    time { (time(e["time"].as_u64().unwrap_or_default())) }
                    " " (s(e, "what"))
                    span.index { " (log index " (e["index"].as_u64().unwrap_or_default()) ")" }
                }
            }
        }
    };
    layout(f, "Access history", body)
}

const SECTIONS: [(&str, &str); 4] = [
    ("identity", "Identity"),
    ("contact", "Contact"),
    ("address", "Address"),
    ("preferences", "Communication and payment preferences"),
];

pub(crate) fn profile(f: &Frame, checked: &Checked, me: &str, profile: &Value) -> Markup {
    let rows = list(profile, "profile");
    let latest = |section: &str| {
        let scope = format!("profile.{section}");
        rows.iter()
            .rev()
            .find(|r| s(r, "scope") == scope)
            .map(|r| s(r, "text").to_string())
            .unwrap_or_default()
    };
    let inferred: Vec<&Value> = rows
        .iter()
        .filter(|r| s(r, "scope") == "profile.inferred")
        .collect();
    let body = html! {
        @for (section, title) in SECTIONS {
            form.section method="post" action={"/profile/" (section)} {
                (csrf(f))
                p {
                    label for={"p-" (section)} { (title) }
                    textarea #{"p-" (section)} name="text" rows="2" { (latest(section)) }
                }
                button type="submit" aria-label={"Save " (title)} { "Save" }
            }
        }
        h2 { "What companies inferred about you" }
        @if inferred.is_empty() { p { "Nothing." } }
        @else {
            table {
                thead { tr { th scope="col" { "Attribute" } th scope="col" { "By" } th scope="col" { "Status" } th scope="col" { span.visually-hidden { "Dispute" } } } }
                tbody {
                    @for r in &inferred {
                        tr {
                            td { (s(r, "text")) }
                            td { @if s(r, "author") == me { "you" } @else { (who(checked, s(r, "author"))) } }
                            td { @if let Some(d) = r["disputed"].as_str() { "disputed: " (d) } @else { "not disputed" } }
                            td {
                                @if r["disputed"].is_null() {
                                    form.inline method="post" action="/profile/dispute" {
                                        (csrf(f))
                                        input type="hidden" name="company" value=(s(r, "author"));
                                        input type="hidden" name="record" value=(s(r, "record"));
                                        button type="submit" aria-label={"Dispute " (s(r, "text"))} { "Dispute" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(f, "Profile", body)
}

pub(crate) fn transactions(
    f: &Frame,
    companies: &Value,
    chosen: Option<&str>,
    txs: Option<&Value>,
    me: &str,
) -> Markup {
    let all = list(companies, "companies");
    let name_of = |id: &str| {
        all.iter()
            .find(|c| s(c, "company") == id)
            .and_then(|c| c["name"].as_str())
            .map_or_else(|| short(id), str::to_string)
    };
    let body = html! {
        @if all.is_empty() { p { "No company yet: transactions are kept per company." } }
        @else {
            form.inline method="get" action="/transactions" {
                label for="t-company" { "Company " }
                select #t-company name="company" {
                    @for c in all {
                        option value=(s(c, "company")) selected[Some(s(c, "company")) == chosen] { (name_of(s(c, "company"))) }
                    }
                }
                " "
                button type="submit" { "Show" }
            }
            @if let (Some(company), Some(txs)) = (chosen, txs) {
                h2 { "With " (name_of(company)) }
                @let rows = list(txs, "transactions");
                @if rows.is_empty() { p { "No transaction yet." } }
                @else {
                    table {
                        thead { tr { th scope="col" { "Month" } th scope="col" { "Transaction" } th scope="col" { "Written by" } } }
                        tbody {
                            @for r in rows {
                                tr {
                                    td { (s(r, "month")) }
                                    td { (s(r, "text")) }
                                    td { @if s(r, "author") == me { "you" } @else { (name_of(s(r, "author"))) " (the company)" } }
                                }
                            }
                        }
                    }
                }
                h2 { "Add one" }
                form method="post" action="/transactions" {
                    (csrf(f))
                    input type="hidden" name="company" value=(company);
                    p { label for="t-month" { "Month" } input #t-month type="month" name="month"; }
                    p { label for="t-text" { "Transaction" } input #t-text type="text" name="text" required; }
                    button.primary type="submit" { "Add" }
                }
            }
        }
    };
    layout(f, "Transactions", body)
}

pub(crate) fn settings(
    f: &Frame,
    policy: &Value,
    devices: &Value,
    auditors: &Value,
    companies: &Value,
) -> Markup {
    let granted_only = policy["granted_only"].as_bool().unwrap_or_default();
    let cap = policy["daily_cap"].as_u64();
    let body = html! {
        section aria-labelledby="pol-h" {
            h2 #pol-h { "Who may ask" }
            form method="post" action="/settings/policy" {
                (csrf(f))
                fieldset {
                    legend { "Accept requests from" }
                    p.check { input #who-any type="radio" name="who" value="anyone" checked[!granted_only]; label for="who-any" { "any company" } }
                    p.check { input #who-granted type="radio" name="who" value="granted" checked[granted_only]; label for="who-granted" { "only companies I granted access to" } }
                }
                p { label for="cap" { "At most this many requests a day (empty: no cap)" } input #cap type="number" name="cap" min="1" value=[cap]; }
                button type="submit" { "Save" }
            }
        }
        section aria-labelledby="dev-h" {
            h2 #dev-h { "Devices" }
            table {
                thead { tr { th scope="col" { "Device" } th scope="col" { "State" } th scope="col" { span.visually-hidden { "Revoke" } } } }
                tbody {
                    @for d in list(devices, "devices") {
                        @let revoked = d["revoked"].as_bool().unwrap_or_default();
                        @let this = d["this"].as_bool().unwrap_or_default();
                        tr {
                            td { code { (short(s(d, "device"))) } }
                            td { @if revoked { "revoked" } @else if this { "this device" } @else { "active" } }
                            td {
                                @if !revoked && !this {
                                    form.inline method="post" action={"/settings/devices/" (s(d, "device")) "/revoke"} {
                                        (csrf(f))
                                        input #{"dc-" (s(d, "device"))} type="checkbox" name="confirm" value="yes";
                                        label for={"dc-" (s(d, "device"))} { "I lost it" }
                                        " "
                                        button.danger type="submit" { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p.note { "Adding a device takes files carried between the two devices: use " code { "cmr customer device new" } " and " code { "add" } "." }
        }
        section aria-labelledby="aud-h" {
            h2 #aud-h { "Auditors the operator admitted" }
            @let all = list(auditors, "auditors");
            @if all.is_empty() { p { "None was ever admitted." } }
            ul {
                @for a in all {
                    li { code { (short(s(a, "auditor"))) } " " @if a["admitted"].as_bool().unwrap_or_default() { "admitted" } @else { "dismissed" } " since " (time(a["since_time"].as_u64().unwrap_or_default())) " (they see entry bodies, never your records)" }
                }
            }
        }
        section aria-labelledby="exp-h" {
            h2 #exp-h { "Export" }
            form method="post" action="/settings/export" {
                (csrf(f))
                button type="submit" { "Download everything (decrypted JSON)" }
            }
        }
        section aria-labelledby="era-h" {
            h2 #era-h { "Erase" }
            p { "Erasure cannot be undone: the records are deleted; the log keeps only that an erasure happened." }
            form method="post" action="/settings/erase" {
                (csrf(f))
                p {
                    label for="e-family" { "What" }
                    select #e-family name="family" {
                        @for (section, title) in SECTIONS { option value=(section) { (title) } }
                        @for c in list(companies, "companies") {
                            option value={"transactions@" (s(c, "company"))} { "Transactions with " (c["name"].as_str().unwrap_or("a company")) }
                            option value={"inferred@" (s(c, "company"))} { "What " (c["name"].as_str().unwrap_or("a company")) " inferred" }
                        }
                        option value="vault" { "The whole vault" }
                    }
                }
                p { label for="e-typed" { "Type the name to confirm (identity, contact, address, preferences, transactions, inferred or vault)" } input #e-typed type="text" name="typed" autocomplete="off"; }
                button.danger type="submit" { "Erase" }
            }
        }
    };
    layout(f, "Settings", body)
}

pub(crate) fn audit(f: &Frame, status: &Result<Value, CliError>) -> Markup {
    let body = html! {
        @match status {
            Ok(v) => {
                div.status.green role="status" {
                    p { strong { "Verified." } " The vault's log is consistent with everything this app saw, and your chain is complete." }
                }
                dl {
                    dt { "Log checkpoint verified" } dd { "size " (v["checkpoint"]["size"].as_u64().unwrap_or_default()) ", root " code { (s(&v["checkpoint"], "root")) } br; "log " (s(&v["checkpoint"], "origin")) }
                    dt { "Consistent with the one verified before" } dd { @match v["previous_size"].as_u64() { Some(p) => { "yes (it was size " (p) ")" }, None => "this was the first checkpoint verified" } }
                    dt { "Your chain" } dd { (v["chain_entries"].as_u64().unwrap_or_default()) " entries, each in the checkpoint, linked to the one before; every entry this app acknowledged is on it" }
                    dt { "Rotations owed" } dd { (v["rotations_owed"].as_u64().unwrap_or_default()) }
                }
                @if v["rotations_owed"].as_u64().unwrap_or_default() > 0 {
                    form method="post" action="/audit/rotate" { (csrf(f)) button.primary type="submit" { "Finish the rotations" } }
                }
            },
            Err(e) => {
                div.status.red role="alert" {
                    p { strong { "Not verified." } " " (e.message) }
                    @if let Some(h) = &e.hint { p { (h) } }
                }
                @if e.message.contains("restored") {
                    form method="post" action="/audit/accept-restore" {
                        (csrf(f))
                        p { "The operator restored the vault from a backup: what happened after it is gone. Accept the restored log only if you agree." }
                        button.danger type="submit" { "Accept the restored log" }
                    }
                }
            },
        }
    };
    layout(f, "Audit", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frame() -> Frame {
        Frame {
            csrf: "T".into(),
            flash: None,
            path: "/",
            live: true,
        }
    }

    #[test]
    fn what_companies_write_is_escaped() {
        let checked = Checked::new();
        let requests = json!({"pending": [{"id": "ab", "company": "cd", "scopes": ["transactions:read"], "purpose": "<script>alert(1)</script>", "duration": "until revoked", "lookback_months": 3}]});
        let html = requests_page(&checked, &requests);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }

    fn requests_page(checked: &Checked, v: &Value) -> String {
        requests(&frame(), checked, v).into_string()
    }

    #[test]
    fn every_form_carries_the_csrf_token() {
        let checked = Checked::new();
        let requests = json!({"pending": [{"id": "ab", "company": "cd", "scopes": ["transactions:read"], "purpose": "p", "duration": "until revoked", "lookback_months": 3}]});
        let html = requests_page(&checked, &requests);
        let forms = html.matches("<form").count();
        assert_eq!(forms, 2);
        assert_eq!(
            html.matches(r#"<input type="hidden" name="csrf" value="T">"#)
                .count(),
            forms
        );
    }

    #[test]
    fn scopes_are_said_in_plain_words() {
        assert_eq!(
            scope_access_words("transactions:read+append"),
            "see and add to your transactions with the company"
        );
        assert_eq!(
            scope_access_words("profile.address:read"),
            "see your address"
        );
    }

    #[test]
    fn the_chart_counts_reads_and_appends_per_company_and_day() {
        let now = 20_000 * 86_400 + 3600;
        let e = |t: u64, kind: &str, who: &str| json!({"time": t, "access": {"kind": kind, "company": who}});
        let rows = [
            e(now, "read", "Acme"),
            e(now - 86_400, "read", "Acme"),
            e(now, "append", "Acme"),
            e(now, "read", "Beta"),
            e(now - 30 * 86_400, "read", "Old"),
        ];
        let refs: Vec<&Value> = rows.iter().collect();
        let svg = activity_chart(&refs, now).into_string();
        assert!(
            svg.contains("Acme: 2 reads, 1 appends; Beta: 1 reads, 0 appends"),
            "{svg}"
        );
        assert!(!svg.contains("Old"), "older than 14 days is left out");
        assert!(activity_chart(&[], now).into_string().is_empty());
    }

    #[test]
    fn coverage_opens_months_from_the_look_back() {
        let now = 1_795_835_845; // 2026-11
        let g = json!({"lookback_start": "2026-09", "scopes": ["transactions:read", "profile.address:read"]});
        let html = coverage(&g, now).into_string();
        assert!(html.contains("2026-09") && html.contains("2026-11"));
        assert!(!html.contains("2026-08"), "{html}");
        assert_eq!(html.matches(r#"<td class="open">open</td>"#).count(), 3);
        assert!(html.contains("all of it (one period)"));
    }
}
