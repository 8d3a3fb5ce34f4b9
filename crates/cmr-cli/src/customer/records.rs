//! The customer's own records: profile sections and transactions (show, add, import).

use super::*;

/// Runs a command of this group for the loaded customer.
pub(super) async fn step(l: &mut Loaded, out: Out, cmd: CustomerCmd) -> CliResult {
    let t = now();
    let c = &mut l.customer;
    match cmd {
        CustomerCmd::Profile {
            cmd: ProfileCmd::Set { section: s, text },
        } => {
            let scope = section(&s)?;
            let name = FamilyName::profile(scope)
                .ok_or_else(|| CliError::local("not a section", "see --help"))?;
            let fid = c.family_id(&name);
            c.declare(&[name], t).await?;
            let acked = c
                .write_rotating(fid, Period::ORIGIN, &[text.as_bytes()], t)
                .await?;
            out.line(format!(
                "{} set (log index {}, durable)",
                scope.name(),
                acked.index
            ));
            out.value(&json!({"section": scope.name(), "index": acked.index}));
        }
        CustomerCmd::Profile {
            cmd: ProfileCmd::Show,
        } => {
            let mut all = Vec::new();
            let mut names: Vec<FamilyName> = SECTIONS
                .iter()
                .filter_map(|s| FamilyName::profile(*s))
                .collect();
            names.extend(
                c.families
                    .values()
                    .filter(|f| f.name.scope() == Scope::ProfileInferred)
                    .map(|f| f.name),
            );
            // Disputed attributes are marked as such, as the log says.
            let disputes = if names.iter().any(|n| n.scope() == Scope::ProfileInferred) {
                c.consent().await?.disputes().to_vec()
            } else {
                Vec::new()
            };
            let who = Names::new(c.id(), &l.saved.role.companies);
            for name in names {
                let fid = c.family_id(&name);
                if !c.families.contains_key(&fid) {
                    continue;
                }
                let records = c.read(fid, Period::ORIGIN, Period::ORIGIN).await?;
                for r in records {
                    let text = String::from_utf8_lossy(&r.content).into_owned();
                    let by = who.of(&r.author);
                    let disputed =
                        disputes
                            .iter()
                            .rev()
                            .find(|d| d.record == r.id)
                            .map(|d| match d.action {
                                cmr_core::consent::DisputeAction::Reject => "rejected",
                                cmr_core::consent::DisputeAction::Annotate { .. } => "annotated",
                            });
                    let mark = disputed.map_or_else(String::new, |d| format!(", disputed: {d}"));
                    out.line(format!(
                        "{:<22} {text}   (record {}, by {by}{mark})",
                        name.scope().name(),
                        r.id.to_hex()
                    ));
                    all.push(json!({"scope": name.scope().name(), "text": text, "record": r.id.to_hex(), "author": r.author.to_hex(), "disputed": disputed}));
                }
            }
            out.value(&json!({"profile": all}));
        }
        CustomerCmd::Tx {
            cmd:
                TxCmd::Add {
                    company,
                    month,
                    text,
                },
        } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let month = month
                .as_deref()
                .map(parse_month)
                .transpose()?
                .map(transaction_month)
                .transpose()?
                .unwrap_or(this_month()?);
            let name = c.transactions_with(&company);
            c.declare(&[name], t).await?;
            let acked = c
                .write_rotating(c.family_id(&name), month, &[text.as_bytes()], t)
                .await?;
            out.line(format!(
                "transaction added to {month} (log index {}, durable)",
                acked.index
            ));
            out.value(&json!({"month": month.to_string(), "index": acked.index}));
        }
        CustomerCmd::Tx {
            cmd: TxCmd::Import { company, file },
        } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let rows = read_import(&file)?;
            let name = c.transactions_with(&company);
            c.declare(&[name], t).await?;
            let fid = c.family_id(&name);
            // Each row's record id is derived from the row (its month, text and occurrence among identical
            // rows of that month), so importing the same file again names the same records: those already
            // stored are skipped, and an interrupted import is finished by running it again.
            let mut by_month: std::collections::BTreeMap<Period, Vec<(RecordId, String)>> =
                Default::default();
            let mut seen: HashMap<(Period, String), u32> = HashMap::new();
            for (m, text) in rows {
                let n = seen.entry((m, text.clone())).or_insert(0);
                let id = c.pseudonyms.import_record_id(&fid, m, text.as_bytes(), *n);
                *n += 1;
                by_month.entry(m).or_default().push((id, text));
            }
            let total: usize = by_month.values().map(Vec::len).sum();
            let stored: HashSet<RecordId> = match (
                by_month.keys().next().copied(),
                by_month.keys().next_back().copied(),
            ) {
                (Some(from), Some(to)) => c
                    .read(fid, from, to)
                    .await?
                    .into_iter()
                    .map(|r| r.id)
                    .collect(),
                _ => HashSet::new(),
            };
            let bar = indicatif::ProgressBar::new(total as u64);
            if out.json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} transactions ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut skipped = 0usize;
            let mut imported = 0usize;
            for (month, rows) in by_month {
                let (old, new): (Vec<_>, Vec<_>) =
                    rows.into_iter().partition(|(id, _)| stored.contains(id));
                skipped += old.len();
                bar.inc(old.len() as u64);
                let texts: Vec<String> = new.iter().map(|(_, t)| t.clone()).collect();
                let mut at = 0;
                for chunk in import_batches(&texts) {
                    let records: Vec<(RecordId, &[u8])> = new[at..at + chunk.len()]
                        .iter()
                        .map(|(id, t)| (*id, t.as_bytes()))
                        .collect();
                    at += chunk.len();
                    if let Err(e) = c.write_records_rotating(fid, month, &records, t).await {
                        bar.finish_and_clear();
                        let mut e = CliError::from(e);
                        e.message = format!(
                            "{} ({} of {total} rows are stored; running the same import again is safe: \
                             the rows already stored are skipped)",
                            e.message,
                            skipped + imported
                        );
                        return Err(e);
                    }
                    imported += chunk.len();
                    bar.inc(chunk.len() as u64);
                }
            }
            bar.finish_and_clear();
            out.line(if skipped == 0 {
                format!("{imported} transactions imported, each batch durable and logged")
            } else {
                format!(
                    "{imported} transactions imported, each batch durable and logged; {skipped} were \
                     already stored (an earlier run of this import) and were skipped"
                )
            });
            out.value(&json!({"imported": imported, "skipped": skipped}));
        }
        CustomerCmd::Tx {
            cmd: TxCmd::List { company, from, to },
        } => {
            let company = company_id(c, &l.saved.role.companies, &company).await?;
            let from = from
                .as_deref()
                .map(parse_month)
                .transpose()?
                .unwrap_or(Period::ORIGIN);
            let to = to
                .as_deref()
                .map(parse_month)
                .transpose()?
                .unwrap_or(this_month()?);
            let fid = c.family_id(&c.transactions_with(&company));
            let records = if c.families.contains_key(&fid) {
                c.read(fid, from, to).await?
            } else {
                vec![]
            };
            let names = Names::new(c.id(), &l.saved.role.companies);
            for r in &records {
                // Rows a company appended say so; the customer's own need no mark.
                let by = if r.author == c.id() {
                    String::new()
                } else {
                    format!("   (added by {})", names.of(&r.author))
                };
                out.line(format!(
                    "{}  {}{by}",
                    r.period,
                    String::from_utf8_lossy(&r.content)
                ));
            }
            out.line(format!("{} transactions, proven complete", records.len()));
            out.value(&json!({"transactions": records.iter().map(|r| json!({"month": r.period.to_string(), "text": String::from_utf8_lossy(&r.content), "record": r.id.to_hex(), "author": r.author.to_hex(), "by": names.of(&r.author)})).collect::<Vec<_>>()}));
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
