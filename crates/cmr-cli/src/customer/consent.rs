//! Consent: requests and their answers, grants, revocations and rotations, blocks, the request policy, receipts, disputes.

use super::*;

/// Runs a command of this group for the loaded customer.
pub(super) async fn step(l: &mut Loaded, out: Out, cmd: CustomerCmd) -> CliResult {
    let t = now();
    let c = &mut l.customer;
    match cmd {
        CustomerCmd::Requests => {
            let pending = c.pending().await?;
            let mut list = Vec::new();
            for p in &pending {
                let st = p.statement.statement();
                let Some(r) = p.request() else { continue };
                let scopes: Vec<String> = r
                    .scopes
                    .iter()
                    .map(|(s, a)| format!("{}:{}", s.name(), access_name(*a)))
                    .collect();
                out.line(format!("request {}", short(&p.statement.id().to_hex())));
                let known = Names::new(c.id(), &l.saved.role.companies).of(&st.author);
                out.line(format!(
                    "  from     company {} (fingerprint {}){}",
                    st.author.to_hex(),
                    wellknown::fingerprint(&st.author),
                    if known.starts_with("company ") {
                        ", domain not checked yet".to_string()
                    } else {
                        format!(", {known}, domain checked before")
                    }
                ));
                out.line(format!("  asks     {}", scopes.join(", ")));
                out.line(format!("  why      {}", r.purpose));
                out.line(format!("  for      {}", duration(r.duration)));
                out.line(format!("  history  the last {} months", r.lookback_months));
                list.push(json!({"id": p.statement.id().to_hex(), "company": st.author.to_hex(), "scopes": scopes, "purpose": r.purpose, "duration": duration(r.duration), "lookback_months": r.lookback_months}));
            }
            if pending.is_empty() {
                out.line("no requests waiting");
            }
            out.value(&json!({"pending": list}));
        }
        CustomerCmd::Approve {
            request,
            domain,
            lookback,
            only,
            duration: shorter,
            insecure_http_for_tests,
        } => {
            let shorter = shorter.as_deref().map(parse_duration).transpose()?;
            let p = &waiting(c, &request).await?;
            let r = p
                .request()
                .cloned()
                .ok_or_else(|| CliError::local("not a request", "check the id"))?;
            let company = p.statement.statement().author;
            let mode = if insecure_http_for_tests {
                Mode::InsecureTestHttp
            } else {
                Mode::Tls
            };
            let proof = wellknown::fetch(&domain, mode).await?;
            if insecure_http_for_tests {
                out.line("warning: the key document was fetched over plain http (test mode); it proves nothing about a real domain");
            }
            out.line(format!(
                "verified: {} vouches for {:?}, identity fingerprint {}",
                proof.domain,
                proof.name,
                proof.fingerprint()
            ));
            let scopes: Vec<(Scope, Access)> = if only.is_empty() {
                r.scopes.clone()
            } else {
                only.iter()
                    .map(|s| parse_scope_access(s))
                    .collect::<CliResult<_>>()?
            };
            let approval = approval_for(
                c,
                company,
                &scopes,
                lookback.unwrap_or(r.lookback_months),
                t,
            )
            .await?;
            let gid = c.approve_for(p, &proof, &approval, shorter, t).await?;
            l.saved
                .role
                .companies
                .retain(|(i, _, _)| *i != company.to_hex());
            l.saved.role.companies.push((
                company.to_hex(),
                proof.domain.clone(),
                proof.name.clone(),
            ));
            out.line(format!(
                "granted {} to {} ({}) for {:?}, {}, look-back {} months: grant {}",
                scopes
                    .iter()
                    .map(|(s, a)| format!("{}:{}", s.name(), access_name(*a)))
                    .collect::<Vec<_>>()
                    .join(", "),
                proof.name,
                proof.domain,
                r.purpose,
                c.grants
                    .get(&gid)
                    .and_then(|g| g.grant())
                    .map_or_else(|| duration(r.duration), lasting),
                approval.lookback_months,
                gid.to_hex()
            ));
            out.value(&json!({"grant": gid.to_hex(), "company": company.to_hex(), "domain": proof.domain}));
        }
        CustomerCmd::Grant {
            company,
            domain,
            scopes,
            purpose,
            lookback,
            duration,
            insecure_http_for_tests,
        } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let mode = if insecure_http_for_tests {
                Mode::InsecureTestHttp
            } else {
                Mode::Tls
            };
            let proof = wellknown::fetch(&domain, mode).await?;
            if proof.identity != company {
                return Err(CliError::with_code(
                    crate::error::code::VERIFICATION,
                    format!(
                        "{} vouches for {}, not for {}",
                        proof.domain,
                        proof.identity.to_hex(),
                        company.to_hex()
                    ),
                    Some("check the company's id and domain"),
                ));
            }
            let scopes = scopes
                .iter()
                .map(|s| parse_scope_access(s))
                .collect::<CliResult<Vec<_>>>()?;
            let approval = approval_for(c, company, &scopes, lookback, t).await?;
            let gid = c
                .grant(&proof, &purpose, parse_duration(&duration)?, &approval, t)
                .await?;
            l.saved
                .role
                .companies
                .retain(|(i, _, _)| *i != company.to_hex());
            l.saved.role.companies.push((
                company.to_hex(),
                proof.domain.clone(),
                proof.name.clone(),
            ));
            out.line(format!(
                "granted to {} ({}, fingerprint {}), {}: grant {}",
                proof.name,
                proof.domain,
                proof.fingerprint(),
                c.grants
                    .get(&gid)
                    .and_then(|g| g.grant())
                    .map_or_else(String::new, lasting),
                gid.to_hex()
            ));
            out.value(&json!({"grant": gid.to_hex(), "company": company.to_hex()}));
        }
        CustomerCmd::Deny { request, reason } => {
            let p = &waiting(c, &request).await?;
            let acked = c.deny(p, &reason, t).await?;
            out.line(format!("request denied (log index {})", acked.index));
            out.value(&json!({"denied": request, "index": acked.index}));
        }
        CustomerCmd::Grants => {
            // Where each grant stands is the log's word, folded from the verified chain.
            let consent = c.consent().await?;
            let mut list: Vec<_> = c.grants.values().collect();
            list.sort_by_key(|g| g.index);
            let mut rows = Vec::new();
            for g in list {
                let Some(b) = g.grant() else { continue };
                let id = g.statement.id();
                let status = consent
                    .grant_status(&id, t)
                    .map_or("not-in-log", GrantStatus::word);
                let scopes: Vec<String> = b
                    .scopes
                    .iter()
                    .map(|(s, a)| format!("{}:{}", s.name(), access_name(*a)))
                    .collect();
                let lasting = lasting(b);
                out.line(format!(
                    "{}  {status:<8} {}  {}  {lasting}  look-back from {}",
                    short(&id.to_hex()),
                    Names::new(c.id(), &l.saved.role.companies).of(&b.grantee),
                    scopes.join(","),
                    b.lookback_start
                ));
                rows.push(json!({"grant": id.to_hex(), "company": b.grantee.to_hex(), "status": status, "scopes": scopes, "duration": lasting, "expires": b.expires, "index": g.index, "time": g.time, "purpose": b.purpose, "lookback_start": b.lookback_start.to_string(), "request": b.request.map(|r| r.to_hex())}));
            }
            out.value(&json!({"grants": rows}));
        }
        CustomerCmd::Companies => {
            let consent = c.consent().await?;
            let names = Names::new(c.id(), &l.saved.role.companies);
            let mut ids: Vec<IdentityId> = l
                .saved
                .role
                .companies
                .iter()
                .filter_map(|(i, _, _)| IdentityId::from_hex(i))
                .chain(
                    c.grants
                        .values()
                        .filter_map(|g| g.grant().map(|b| b.grantee)),
                )
                .collect();
            ids.sort();
            ids.dedup();
            let mut rows = Vec::new();
            for id in ids {
                let hex = id.to_hex();
                let checked = l.saved.role.companies.iter().find(|(i, _, _)| *i == hex);
                let active = c
                    .grants
                    .iter()
                    .filter(|(gid, g)| {
                        g.grant().is_some_and(|b| b.grantee == id)
                            && consent
                                .grant_status(gid, t)
                                .is_some_and(GrantStatus::is_active)
                    })
                    .count();
                let blocked = consent.is_blocked(&id);
                out.line(format!(
                    "{}  fingerprint {}  {} active grant{}{}",
                    names.of(&id),
                    wellknown::fingerprint(&id),
                    active,
                    if active == 1 { "" } else { "s" },
                    if blocked { ", blocked" } else { "" }
                ));
                rows.push(json!({
                    "company": hex,
                    "fingerprint": wellknown::fingerprint(&id),
                    "domain": checked.map(|(_, d, _)| d),
                    "name": checked.map(|(_, _, n)| n),
                    "active_grants": active,
                    "blocked": blocked,
                }));
            }
            if rows.is_empty() {
                out.line("no company yet: they appear once you grant them or check their domain");
            }
            out.value(&json!({"companies": rows}));
        }
        CustomerCmd::Revoke { grant, reason } => {
            let gid = StatementId(crate::out::resolve_id(
                &grant,
                "grant",
                c.grants.keys().map(|g| g.0),
            )?);
            let (rev, _) = c.revoke_grant(gid, &reason, t).await?;
            out.line(format!("grant revoked at log index {}", rev.index));
            // The revocation stands whatever happens next; a rotation that fails stays owed.
            let rotations = c
                .finish_rotations(t)
                .await
                .map_err(|e| rotation_unfinished(e, rev.index))?;
            out.line(rotated_words(rotations.len()));
            out.value(&json!({"revoked": grant, "index": rev.index, "rotations": rotations.iter().map(|a| a.index).collect::<Vec<_>>()}));
        }
        CustomerCmd::Rotate => {
            let rotations = c.finish_rotations(t).await?;
            out.line(rotated_words(rotations.len()));
            out.value(&json!({"rotations": rotations.iter().map(|a| a.index).collect::<Vec<_>>()}));
        }
        CustomerCmd::Block { company, unblock } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let acked = c.block(company, !unblock, t).await?;
            out.line(format!(
                "company {} {} (log index {})",
                company.to_hex(),
                if unblock { "unblocked" } else { "blocked" },
                acked.index
            ));
            out.value(
                &json!({"company": company.to_hex(), "blocked": !unblock, "index": acked.index}),
            );
        }
        CustomerCmd::Policy {
            granted_only,
            anyone,
            daily_cap,
            no_cap,
        } => {
            let current = c.consent().await?.request_policy();
            let mut next = current;
            if granted_only || anyone {
                next.granted_only = granted_only;
            }
            if daily_cap.is_some() || no_cap {
                next.daily_cap = daily_cap;
            }
            let index = if next == current {
                None
            } else {
                Some(
                    c.set_request_policy(next, t)
                        .await
                        .map_err(CliError::from)?
                        .index,
                )
            };
            out.line(match index {
                Some(i) => format!("requests: {} (set at log index {i})", next.describe()),
                None => format!("requests: {}", next.describe()),
            });
            out.value(&json!({
                "granted_only": next.granted_only,
                "daily_cap": next.daily_cap,
                "index": index,
            }));
        }
        CustomerCmd::Receipt { grant } => {
            let gid = StatementId(crate::out::resolve_id(
                &grant,
                "grant",
                c.grants.keys().map(|g| g.0),
            )?);
            let g = c.grants.get(&gid).ok_or_else(|| {
                CliError::local("no such grant", "list them with `cmr customer grants`")
            })?;
            let grantee = g
                .grant()
                .map(|b| b.grantee)
                .ok_or_else(|| CliError::local("not a grant", "check the id"))?;
            let (domain, name) = l
                .saved
                .role
                .companies
                .iter()
                .find(|(i, _, _)| *i == grantee.to_hex())
                .map(|(_, d, n)| (d.clone(), n.clone()))
                .unwrap_or_default();
            let info = cmr_core::receipt::CompanyInfo { name, domain };
            let receipt = cmr_core::receipt::ConsentReceipt::for_grant(
                &g.statement,
                g.index,
                g.time,
                &info,
                grantee,
            )
            .ok_or_else(|| CliError::local("not a grant", "check the id"))?;
            if out.json {
                crate::out::print(&receipt.to_json());
            } else {
                crate::out::print(&receipt.to_text());
            }
        }
        CustomerCmd::Dispute { company, record } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let bytes = hex::decode(record.trim())
                .ok()
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .ok_or_else(|| {
                    CliError::local(
                        "a record id is 32 hex digits",
                        "copy it from `cmr customer profile show`",
                    )
                })?;
            let fid = c.family_id(&c.inferred_by(&company));
            let acked = c.dispute(fid, cmr_core::record::RecordId(bytes), t).await?;
            out.line(format!("attribute disputed (log index {})", acked.index));
            out.value(&json!({"disputed": record, "index": acked.index}));
        }
        _ => {
            return Err(CliError::local(
                "this command belongs to another group",
                "report this",
            ));
        }
    }
    Ok(())
}
