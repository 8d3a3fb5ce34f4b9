//! The vault as a whole: registration, the history, the admitted auditors, export and erasure.

use super::*;

/// Runs a command of this group for the loaded customer.
pub(super) async fn step(l: &mut Loaded, out: Out, cmd: CustomerCmd) -> CliResult {
    let t = now();
    let c = &mut l.customer;
    match cmd {
        CustomerCmd::Register => {
            home::register(&mut c.session, &mut l.saved, "customer").await?;
            let names: Vec<FamilyName> = SECTIONS
                .iter()
                .filter_map(|s| FamilyName::profile(*s))
                .collect();
            c.declare(&names, t).await?;
            out.line(format!(
                "registered customer {} with the server; key directory published",
                c.id().to_hex()
            ));
            out.value(&json!({"identity": c.id().to_hex(), "registered": true}));
        }
        CustomerCmd::History => {
            let chain = c.history().await?;
            let names = Names::new(c.id(), &l.saved.role.companies);
            let mut rows = Vec::new();
            for e in &chain {
                let what = describe(&e.body, &names);
                out.line(format!(
                    "{:>6}  {}  {what}",
                    e.index,
                    crate::out::time(e.body.time)
                ));
                let mut row = json!({"index": e.index, "time": e.body.time, "kind": e.body.kind.name(), "what": what, "by": e.body.subject.to_hex()});
                if e.body.kind == cmr_log::entry::EntryKind::Access
                    && let Ok(a) = cmr_log::entry::AccessRecord::decode(&e.body.payload)
                {
                    let scopes: Vec<&str> = a
                        .families
                        .iter()
                        .map(|f| {
                            c.families
                                .get(&f.family)
                                .map_or("a family erased or unknown here", |s| {
                                    s.name.scope().name()
                                })
                        })
                        .collect();
                    row["access"] = json!({
                        "kind": match a.kind {
                            cmr_core::decision::AccessKind::Read => "read",
                            cmr_core::decision::AccessKind::Append => "append",
                        },
                        "grant": a.grant.to_hex(),
                        "company": names.of(&e.body.subject),
                        "scopes": scopes,
                        "periods": a.families.iter().map(|f| format!("{}..{}", f.from, f.to)).collect::<Vec<_>>(),
                    });
                }
                rows.push(row);
            }
            out.line(format!("{} entries; each included in the checkpoint and linked to the one before; none missing", chain.len()));
            out.value(&json!({"history": rows}));
        }
        CustomerCmd::Watch => {
            // What is there now is the start; from then on each change of the chain's newest entry
            // (pushed by the server) is read and verified like `history`, and the new entries printed.
            let mut seen = c.history().await?.first().map(|e| e.index);
            out.line(format!(
                "watching the vault of {} (Ctrl-C stops)",
                c.id().to_hex()
            ));
            loop {
                let mut events = match c.watch(seen).await {
                    Ok(ev) => ev,
                    Err(e @ cmr_client::ClientError::Refused { .. }) => return Err(e.into()),
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Ok(Some(_)) = events.next().await {
                    let chain = c.history().await?;
                    let names = Names::new(c.id(), &l.saved.role.companies);
                    for e in chain.iter().rev().filter(|e| Some(e.index) > seen) {
                        let what = describe(&e.body, &names);
                        if out.json {
                            crate::out::print(
                                &json!({"index": e.index, "time": e.body.time, "kind": e.body.kind.name(), "what": what})
                                    .to_string(),
                            );
                        } else {
                            out.line(format!(
                                "{:>6}  {}  {what}",
                                e.index,
                                crate::out::time(e.body.time)
                            ));
                        }
                    }
                    seen = chain.first().map(|e| e.index).or(seen);
                }
                // The stream ended (the server stopped or the connection dropped): open it again.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        CustomerCmd::Status => {
            let before = c.session.log.latest().map(|cp| cp.size);
            // The newest checkpoint, proven consistent with the one verified before; then the chain,
            // linked and complete, in a checkpoint at least as new.
            let cp = c.session.refresh().await?;
            let chain = c.history().await?;
            let owed = c.consent().await?.pending_rotations(t).len();
            out.line(format!(
                "log checkpoint verified: size {}, root {}",
                cp.size,
                hex::encode(cp.root)
            ));
            out.line(match before {
                Some(b) => format!(
                    "  consistent with the checkpoint this client verified before (size {b})"
                ),
                None => "  the first checkpoint this client verified".to_string(),
            });
            out.line(format!(
                "this vault's chain: {} entries, each in the checkpoint and linked to the one before; every entry this client acknowledged is on it",
                chain.len()
            ));
            if owed > 0 {
                out.line(format!(
                    "{owed} rotation(s) owed: run `cmr customer rotate`"
                ));
            }
            out.value(&json!({
                "checkpoint": {"origin": cp.origin, "size": cp.size, "root": hex::encode(cp.root)},
                "previous_size": before,
                "consistent": true,
                "chain_entries": chain.len(),
                "chain_complete": true,
                "rotations_owed": owed,
            }));
        }
        CustomerCmd::AcceptRestore => {
            let size = c.accept_restore().await?;
            out.line(format!(
                "accepted the log restored from a backup at size {size}: what happened after it is \
                 gone; check your grants and records (cmr customer grants, cmr customer history)"
            ));
            out.value(&json!({"restored_size": size}));
        }
        CustomerCmd::Auditors => {
            let auditors = c.session.auditors().await?;
            let mut rows = Vec::new();
            for (id, st) in auditors.all() {
                let state = if st.admitted { "admitted" } else { "dismissed" };
                out.line(format!(
                    "{}  {state} since {} (log index {})",
                    id.to_hex(),
                    crate::out::time(st.time),
                    st.since
                ));
                rows.push(json!({"auditor": id.to_hex(), "admitted": st.admitted, "since_index": st.since, "since_time": st.time}));
            }
            if rows.is_empty() {
                out.line("no auditor was ever admitted");
            }
            out.value(&json!({"auditors": rows}));
        }
        CustomerCmd::Export { out: file } => {
            let mut companies: Vec<IdentityId> = l
                .saved
                .role
                .companies
                .iter()
                .filter_map(|(i, _, _)| IdentityId::from_hex(i))
                .collect();
            companies.extend(
                c.grants
                    .values()
                    .filter_map(|g| g.grant().map(|b| b.grantee)),
            );
            companies.sort();
            companies.dedup();
            let export = c.export(&companies, &[]).await?;
            let json = export.to_json();
            match file {
                Some(f) => {
                    home::write_private_file(&f, json.as_bytes())?;
                    out.line(format!(
                        "{} families exported to {} (decrypted: keep it safe)",
                        export.families.len(),
                        f.display()
                    ));
                    out.value(&json!({"families": export.families.len(), "file": f}));
                }
                None => crate::out::print(&json),
            }
        }
        CustomerCmd::Erase {
            scope,
            company,
            vault,
            yes,
        } => {
            if !yes {
                // On a terminal, the user types what is erased; a script must say --yes.
                let what = if vault {
                    "vault".to_string()
                } else {
                    scope.clone().unwrap_or_default()
                };
                if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    return Err(CliError::local(
                        "erasure cannot be undone",
                        "add --yes to confirm",
                    ));
                }
                eprint!(
                    "erasure cannot be undone; type {what:?} to erase it (anything else stops): "
                );
                let mut typed = String::new();
                let _ = std::io::stdin().read_line(&mut typed);
                if typed.trim() != what {
                    return Err(CliError::local(
                        "nothing was erased",
                        "type the name exactly",
                    ));
                }
            }
            let family = if vault {
                None
            } else {
                let scope = scope.as_deref().unwrap_or_default();
                let name = match (
                    Scope::from_name(scope)
                        .or_else(|| Scope::from_name(&format!("profile.{scope}"))),
                    company,
                ) {
                    (Some(Scope::Transactions), Some(co)) => {
                        c.transactions_with(&IdentityId(parse_id(&co, "company")?))
                    }
                    (Some(Scope::ProfileInferred), Some(co)) => {
                        c.inferred_by(&IdentityId(parse_id(&co, "company")?))
                    }
                    (Some(Scope::Transactions | Scope::ProfileInferred), None) => {
                        return Err(CliError::local(
                            "this family belongs to a company",
                            "add --company",
                        ));
                    }
                    (Some(sc), _) => FamilyName::profile(sc)
                        .ok_or_else(|| CliError::local("not a section", "see --help"))?,
                    (None, _) => {
                        return Err(CliError::local(
                            format!("unknown scope {scope:?}"),
                            "see --help",
                        ));
                    }
                };
                Some(c.family_id(&name))
            };
            let acked = c.erase(family, t).await?;
            if family.is_none() {
                l.saved.role.vault_erased_at = Some(acked.index);
            }
            out.line(format!("erased (log index {}): the records are gone; the log keeps only that an erasure happened", acked.index));
            out.value(&json!({"index": acked.index}));
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
