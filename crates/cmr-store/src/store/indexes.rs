//! The index rows an entry adds and removes (party, pending, vaults-of).

use super::*;

/// The index rows an entry adds and removes ([`layout::tag::PARTY`], [`layout::tag::PENDING`]), judged
/// from the customer's consent state *before* the entry is applied. One function for the sequencer and
/// for the migration of a store written before the indexes existed.
#[derive(Default)]
pub(super) struct IndexChanges {
    pub(super) puts: Vec<(Vec<u8>, Vec<u8>)>,
    pub(super) deletes: Vec<Vec<u8>>,
}
pub(super) fn index_changes(
    consent: Option<&ConsentState>,
    index: u64,
    kind: EntryKind,
    subject: IdentityId,
    customer: Option<IdentityId>,
    payload: &[u8],
) -> IndexChanges {
    let mut out = IndexChanges::default();
    let Some(c) = customer else { return out };
    let mut parties = Vec::new();
    let statement = kind == EntryKind::Statement;
    match (kind, consent) {
        (EntryKind::Statement, Some(consent)) => {
            let Ok(st) = SignedStatement::decode(payload) else {
                return out;
            };
            parties = consent.concerned(&st);
            let pending = |company: IdentityId, request: StatementId| {
                layout::pending(&c.0, &company.0, &request.0)
            };
            match &st.statement().body {
                Body::Request(_) => out.puts.push((
                    pending(st.statement().author, st.id()),
                    index.to_be_bytes().to_vec(),
                )),
                Body::Grant(g) => {
                    if let Some(r) = g.request
                        && let Some(company) = consent.requester(&r)
                    {
                        out.deletes.push(pending(company, r));
                    }
                }
                Body::Denial { request, .. } => {
                    if let Some(company) = consent.requester(request) {
                        out.deletes.push(pending(company, *request));
                    }
                }
                Body::Block {
                    company,
                    blocked: true,
                } => {
                    for r in consent.waiting_requests(company) {
                        out.deletes.push(pending(*company, r));
                    }
                }
                _ => {}
            }
        }
        _ if subject != c => parties.push(subject),
        _ => {}
    }
    for p in parties {
        out.puts
            .push((layout::party(&c.0, &p.0, index), Vec::new()));
        out.puts.push((layout::vault_of(&p.0, &c.0), Vec::new()));
        if statement {
            out.puts.push((layout::feed(&p.0, index), c.0.to_vec()));
        }
    }
    out
}
/// Stages an entry's index rows. A vaults-of row never changes once written (a party stays involved in a
/// vault), so one already written since the store opened is not written again: every access would
/// otherwise rewrite its company's row.
pub(super) fn apply_index(
    overlay: &mut Overlay<'_>,
    changes: IndexChanges,
    vaults_written: &mut std::collections::HashSet<Vec<u8>>,
) {
    for k in changes.deletes {
        overlay.delete(k);
    }
    for (k, v) in changes.puts {
        if k.first() == Some(&tag::VAULTS_OF) && !vaults_written.insert(k.clone()) {
            continue;
        }
        overlay.put(k, v);
    }
}
