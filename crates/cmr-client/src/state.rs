//! A client's state between runs, as plain data for the CLI to store (design note 0004). Secrets in it
//! are sealed: the customer's epoch secrets and pseudonym key under the vault key, a company's grant
//! keys as the bundles sealed to its device key. The device keys themselves live in the
//! passphrase-sealed key file, never here.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::consent::{SignedStatement, StatementId};
use cmr_core::directory::{DirectoryTracker, SignedDirectory};
use cmr_core::epoch::{EpochSecret, KeyBundle, SealedEpochSecret};
use cmr_core::family::{FamilyName, PseudonymKey};
use cmr_core::hash::Digest;
use cmr_core::identity::IdentityId;
use cmr_core::vault::{SealedClientSecret, VaultKey};
use cmr_core::wrap::SealedBytes;
use serde::{Deserialize, Serialize};

use crate::company::{Company, HeldGrant, RequestStatus};
use crate::customer::{Customer, FamilyState, IssuedGrant};
use crate::error::ClientError;
use crate::session::Session;

const PSEUDONYM_PURPOSE: &str = "pseudonym-key";

fn bad(what: &str) -> ClientError {
    ClientError::Local(format!("the saved state is damaged: {what}"))
}

fn unb64(s: &str, what: &str) -> Result<Vec<u8>, ClientError> {
    B64.decode(s).map_err(|_| bad(what))
}

fn id(s: &str) -> Result<IdentityId, ClientError> {
    IdentityId::from_hex(s).ok_or_else(|| bad("identity"))
}

fn statement_id(s: &str) -> Result<StatementId, ClientError> {
    Digest::from_hex(s)
        .map(|d| StatementId(d.0))
        .ok_or_else(|| bad("statement id"))
}

/// What every session keeps: the log view and the entries it had acknowledged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionState {
    /// The newest checkpoint verified (a signed note), re-verified when loaded.
    pub checkpoint: Option<String>,
    /// The entries acknowledged to this party.
    pub acked: Vec<u64>,
}

impl SessionState {
    /// Saves a session's state.
    pub fn of(session: &Session) -> Self {
        Self {
            checkpoint: session.log.latest_note().map(str::to_string),
            acked: session.acked.clone(),
        }
    }

    /// Applies the saved state to a fresh session: the checkpoint must still verify under the pinned key.
    /// A session that already verified a checkpoint keeps it (the saved one may be older, and replacing it
    /// without a consistency proof would undo what was checked); the acknowledged entries are merged.
    pub fn apply(&self, session: &mut Session) -> Result<(), ClientError> {
        if let Some(note) = &self.checkpoint
            && session.log.latest().is_none()
        {
            let (cp, _) = crate::verify::LogView::new(session.log.key().clone()).check(note)?;
            session.log.accept_trusted(cp, note.clone());
        }
        session.acked.extend(self.acked.iter().copied());
        session.acked.sort_unstable();
        session.acked.dedup();
        Ok(())
    }
}

/// A family as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedFamily {
    /// The encoded family name, base64.
    pub name: String,
    /// The current epoch.
    pub epoch: u64,
    /// Each epoch's secret sealed under the vault key, base64.
    pub secrets: Vec<String>,
    /// The most batches seen.
    pub batches_seen: u64,
}

/// A grant the customer issued, as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedIssuedGrant {
    /// The signed grant, base64.
    pub statement: String,
    /// Its log index.
    pub index: u64,
    /// The server time it was logged at.
    pub time: u64,
    /// Revoked since.
    pub revoked: bool,
}

/// A customer's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomerState {
    /// The session.
    pub session: SessionState,
    /// The pseudonym key sealed under the vault key, base64.
    pub pseudonym_key: String,
    /// The families.
    pub families: Vec<SavedFamily>,
    /// The latest directory, base64.
    pub directory: Option<String>,
    /// The grants issued.
    pub grants: Vec<SavedIssuedGrant>,
}

impl CustomerState {
    /// Saves `c`, sealing its secrets under `vault`.
    pub fn save(c: &Customer, vault: &VaultKey) -> Self {
        let me = c.id();
        let mut rng = rand::rng();
        let mut families: Vec<SavedFamily> = c
            .families
            .iter()
            .map(|(fid, f)| {
                let mut epochs: Vec<_> = f.secrets.iter().collect();
                epochs.sort_by_key(|(e, _)| **e);
                SavedFamily {
                    name: B64.encode(f.name.encode()),
                    epoch: f.epoch,
                    secrets: epochs
                        .into_iter()
                        .map(|(e, s)| {
                            B64.encode(
                                SealedEpochSecret::seal(&mut rng, vault, me, *fid, *e, s)
                                    .to_bytes(),
                            )
                        })
                        .collect(),
                    batches_seen: f.batches_seen,
                }
            })
            .collect();
        families.sort_by(|a, b| a.name.cmp(&b.name));
        let mut grants: Vec<SavedIssuedGrant> = c
            .grants
            .values()
            .map(|g| SavedIssuedGrant {
                statement: B64.encode(g.statement.encode()),
                index: g.index,
                time: g.time,
                revoked: g.revoked,
            })
            .collect();
        grants.sort_by_key(|g| g.index);
        Self {
            session: SessionState::of(&c.session),
            pseudonym_key: B64.encode(
                SealedClientSecret::seal(
                    &mut rng,
                    vault,
                    me,
                    PSEUDONYM_PURPOSE,
                    c.pseudonyms.expose_secret(),
                )
                .to_bytes(),
            ),
            families,
            directory: c.directory.as_ref().map(|d| B64.encode(d.encode())),
            grants,
        }
    }

    /// Merges what another device saved (both under the same vault key): every family and every epoch
    /// secret either knows, the later current epoch and the larger batch count, every grant (revoked if
    /// either saw it revoked), and the newer directory. Used when two devices' key backups race.
    pub fn merge(&mut self, other: &CustomerState) {
        for f in &other.families {
            match self.families.iter_mut().find(|m| m.name == f.name) {
                None => self.families.push(f.clone()),
                Some(mine) => {
                    let epoch_of = |s: &String| {
                        B64.decode(s)
                            .ok()
                            .and_then(|b| SealedEpochSecret::from_slice(&b).ok())
                            .map(|x| x.epoch)
                    };
                    let have: Vec<Option<u64>> = mine.secrets.iter().map(epoch_of).collect();
                    for s in &f.secrets {
                        if !have.contains(&epoch_of(s)) {
                            mine.secrets.push(s.clone());
                        }
                    }
                    mine.epoch = mine.epoch.max(f.epoch);
                    mine.batches_seen = mine.batches_seen.max(f.batches_seen);
                }
            }
        }
        self.families.sort_by(|a, b| a.name.cmp(&b.name));
        for g in &other.grants {
            match self.grants.iter_mut().find(|m| m.statement == g.statement) {
                None => self.grants.push(g.clone()),
                Some(mine) => mine.revoked |= g.revoked,
            }
        }
        self.grants.sort_by_key(|g| g.index);
        let version = |d: &Option<String>| {
            d.as_ref()
                .and_then(|d| B64.decode(d).ok())
                .and_then(|b| SignedDirectory::decode(&b).ok())
                .map_or(0, |d| d.directory().version)
        };
        if version(&other.directory) > version(&self.directory) {
            self.directory = other.directory.clone();
        }
    }

    /// Restores a customer around `session`, opening its secrets with `vault`.
    pub fn restore(&self, mut session: Session, vault: &VaultKey) -> Result<Customer, ClientError> {
        self.session.apply(&mut session)?;
        let me = session.keys.identity;
        let sealed = SealedClientSecret::from_slice(&unb64(&self.pseudonym_key, "pseudonym key")?)
            .ok_or_else(|| bad("pseudonym key"))?;
        let pk = sealed
            .open(vault, me, PSEUDONYM_PURPOSE)
            .map_err(|_| bad("the pseudonym key does not open with this vault key"))?;
        let mut c = Customer::new(session, PseudonymKey::from_bytes(*pk));
        for f in &self.families {
            let name = FamilyName::decode(&unb64(&f.name, "family name")?)
                .map_err(|_| bad("family name"))?;
            let fid = name.id(&me);
            let mut secrets = HashMap::new();
            for s in &f.secrets {
                let sealed = SealedEpochSecret::from_slice(&unb64(s, "epoch secret")?)
                    .map_err(|_| bad("epoch secret"))?;
                if sealed.family != fid {
                    return Err(bad("an epoch secret of another family"));
                }
                let secret: EpochSecret = sealed
                    .open(vault, me)
                    .map_err(|_| bad("an epoch secret does not open with this vault key"))?;
                secrets.insert(sealed.epoch, secret);
            }
            c.families.insert(
                fid,
                FamilyState {
                    name,
                    epoch: f.epoch,
                    secrets,
                    batches_seen: f.batches_seen,
                },
            );
        }
        if let Some(d) = &self.directory {
            let dir =
                SignedDirectory::decode(&unb64(d, "directory")?).map_err(|_| bad("directory"))?;
            c.restore_directory(dir);
        }
        for g in &self.grants {
            let st = SignedStatement::decode(&unb64(&g.statement, "grant")?)
                .map_err(|_| bad("grant"))?;
            c.grants.insert(
                st.id(),
                IssuedGrant {
                    statement: st,
                    index: g.index,
                    time: g.time,
                    revoked: g.revoked,
                },
            );
        }
        Ok(c)
    }
}

/// A grant a company holds, as saved: the signed grant and the bundles of the rotations that kept it,
/// all sealed to the company's device key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedHeldGrant {
    /// The vault, hex.
    pub customer: String,
    /// The signed grant, base64.
    pub statement: String,
    /// The rotations' sealed bundles, base64.
    pub rekeys: Vec<String>,
    /// Revoked since.
    pub revoked: bool,
    /// For a one-time grant: the log index of the read that used it up.
    #[serde(default)]
    pub used: Option<u64>,
}

/// A request a company sent, as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedRequest {
    /// The request's id, hex.
    pub id: String,
    /// The vault, hex.
    pub customer: String,
    /// `pending`, `granted:<grant id>` or `denied:<reason>`.
    pub status: String,
    /// The request as sent (the signed statement, base64), if it was kept.
    #[serde(default)]
    pub asked: Option<String>,
}

/// A company's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompanyState {
    /// The session.
    pub session: SessionState,
    /// The grants held.
    pub grants: Vec<SavedHeldGrant>,
    /// The requests sent.
    pub requests: Vec<SavedRequest>,
    /// Per vault (hex), the newest entry synced.
    pub synced: Vec<(String, u64)>,
    /// Customers' disputes of what this company appended.
    #[serde(default)]
    pub disputes: Vec<crate::company::Dispute>,
    /// This company's own accesses, as synced (a state saved before they were kept has none: the
    /// history then starts at the next sync).
    #[serde(default)]
    pub accesses: Vec<cmr_wire::gateway::AccessJson>,
}

impl CompanyState {
    /// Saves `c`.
    pub fn save(c: &Company) -> Self {
        let mut grants: Vec<SavedHeldGrant> = c
            .grants
            .values()
            .map(|g| SavedHeldGrant {
                customer: g.customer.to_hex(),
                statement: B64.encode(g.statement.encode()),
                rekeys: g.rekeys.iter().map(|b| B64.encode(b.to_bytes())).collect(),
                revoked: g.revoked,
                used: g.used,
            })
            .collect();
        grants.sort_by(|a, b| a.statement.cmp(&b.statement));
        let mut requests: Vec<SavedRequest> = c
            .requests
            .iter()
            .map(|(rid, cust)| SavedRequest {
                id: rid.to_hex(),
                customer: cust.to_hex(),
                status: match c.status(rid) {
                    RequestStatus::Pending => "pending".into(),
                    RequestStatus::Granted(g) => format!("granted:{}", g.to_hex()),
                    RequestStatus::Denied(r) => format!("denied:{r}"),
                },
                asked: c.asked.get(rid).map(|st| B64.encode(st.encode())),
            })
            .collect();
        requests.sort_by(|a, b| a.id.cmp(&b.id));
        let mut synced: Vec<(String, u64)> =
            c.synced.iter().map(|(k, v)| (k.to_hex(), *v)).collect();
        synced.sort();
        Self {
            session: SessionState::of(&c.session),
            grants,
            requests,
            synced,
            disputes: c.disputes.clone(),
            accesses: c.accesses.clone(),
        }
    }

    /// Restores a company around `session`, re-opening its grants' keys with its device key.
    pub fn restore(&self, mut session: Session) -> Result<Company, ClientError> {
        self.session.apply(&mut session)?;
        let me = session.keys.identity;
        let kem = session.keys.device.kem.clone();
        let mut c = Company::new(session);
        for g in &self.grants {
            let customer = id(&g.customer)?;
            let st = SignedStatement::decode(&unb64(&g.statement, "grant")?)
                .map_err(|_| bad("grant"))?;
            let bundle = st.bundle().ok_or_else(|| bad("a grant without keys"))?;
            let mut keys = KeyBundle::open(bundle, customer, me, &kem, st.id().0)
                .map_err(|_| bad("a grant's keys do not open with this device"))?;
            let mut rekeys = Vec::new();
            for r in &g.rekeys {
                let sealed =
                    SealedBytes::from_slice(&unb64(r, "rekey")?).map_err(|_| bad("rekey"))?;
                let fresh = KeyBundle::open(&sealed, customer, me, &kem, st.id().0)
                    .map_err(|_| bad("rotated keys do not open with this device"))?;
                keys.entries.extend(fresh.entries);
                rekeys.push(sealed);
            }
            c.grants.insert(
                st.id(),
                HeldGrant {
                    customer,
                    id: st.id(),
                    statement: st,
                    keys,
                    revoked: g.revoked,
                    used: g.used,
                    rekeys,
                },
            );
        }
        for r in &self.requests {
            let rid = statement_id(&r.id)?;
            c.requests.insert(rid, id(&r.customer)?);
            if let Some(asked) = &r.asked {
                let st = B64
                    .decode(asked)
                    .ok()
                    .and_then(|b| SignedStatement::decode(&b).ok())
                    .filter(|st| st.id() == rid)
                    .ok_or_else(|| bad("request as sent"))?;
                c.asked.insert(rid, st);
            }
            let status = if r.status == "pending" {
                RequestStatus::Pending
            } else if let Some(g) = r.status.strip_prefix("granted:") {
                RequestStatus::Granted(statement_id(g)?)
            } else if let Some(reason) = r.status.strip_prefix("denied:") {
                RequestStatus::Denied(reason.to_string())
            } else {
                return Err(bad("request status"));
            };
            c.statuses.insert(rid, status);
        }
        for (k, v) in &self.synced {
            c.synced.insert(id(k)?, *v);
        }
        c.disputes = self.disputes.clone();
        c.accesses = self.accesses.clone();
        Ok(c)
    }
}

/// The directory tracker that resumes from `dir`, the newest directory this client published.
pub fn tracker_of(dir: &SignedDirectory) -> DirectoryTracker {
    DirectoryTracker::restore(
        dir.directory().customer,
        dir.directory().version,
        dir.digest(),
    )
}

/// What the server keeps for a customer's recovery: the vault key wrapped (HPKE) to the recovery key of key
/// event `recovery_seq`, and the whole client state sealed under the vault key (so the server can neither
/// read nor alter it: a forged grant in it would otherwise be re-keyed at the next rotation). The recovery
/// phrase opens the vault key, and the vault key the rest. The server can still serve an older version;
/// restoring rebuilds the grants' revocations from the verified chain for that reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyBackup {
    /// The key event whose recovery key the vault key is wrapped to.
    pub recovery_seq: u64,
    /// The wrapped vault key, base64.
    pub vault_key: String,
    /// The client state, JSON sealed with `cmr_core::vault::seal_local`, base64.
    pub state: String,
}

const STATE_PURPOSE: &str = "client-state";

impl KeyBackup {
    /// Seals `state` under `vault` for `customer`.
    pub fn seal(
        recovery_seq: u64,
        vault_key: String,
        state: &CustomerState,
        vault: &VaultKey,
        customer: IdentityId,
    ) -> Self {
        let json = serde_json::to_vec(state).unwrap_or_default();
        let sealed =
            cmr_core::vault::seal_local(&mut rand::rng(), vault, customer, STATE_PURPOSE, &json);
        Self {
            recovery_seq,
            vault_key,
            state: B64.encode(sealed),
        }
    }

    /// Opens the client state with the vault key.
    pub fn open(
        &self,
        vault: &VaultKey,
        customer: IdentityId,
    ) -> Result<CustomerState, ClientError> {
        let sealed = unb64(&self.state, "backup state")?;
        let json =
            cmr_core::vault::open_local(vault, customer, STATE_PURPOSE, &sealed).map_err(|_| {
                bad("the backup's state does not open with this vault key, or was altered")
            })?;
        serde_json::from_slice(&json).map_err(|_| bad("the backup's state does not parse"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(
        vault: &VaultKey,
        customer: IdentityId,
        family: cmr_core::family::FamilyId,
        epoch: u64,
    ) -> String {
        let secret = EpochSecret::generate(&mut rand::rng());
        B64.encode(
            SealedEpochSecret::seal(&mut rand::rng(), vault, customer, family, epoch, &secret)
                .to_bytes(),
        )
    }

    #[test]
    fn two_devices_states_merge_into_their_union() {
        let vault = VaultKey::generate(&mut rand::rng());
        let me = IdentityId([1; 32]);
        let (fa, fb) = (
            cmr_core::family::FamilyId([2; 32]),
            cmr_core::family::FamilyId([3; 32]),
        );
        let family = |name: &str, f, epochs: &[u64], seen| SavedFamily {
            name: name.into(),
            epoch: *epochs.iter().max().unwrap_or(&1),
            secrets: epochs.iter().map(|e| sealed(&vault, me, f, *e)).collect(),
            batches_seen: seen,
        };
        let grant = |s: &str, index, revoked| SavedIssuedGrant {
            statement: s.into(),
            index,
            time: 0,
            revoked,
        };
        let base = CustomerState {
            session: SessionState::default(),
            pseudonym_key: String::new(),
            families: vec![family("a", fa, &[1], 3)],
            directory: None,
            grants: vec![grant("g1", 5, false)],
        };
        // This device rotated family a to epoch 2; the other one added family b and revoked g1.
        let mut mine = base.clone();
        mine.families[0] = family("a", fa, &[1, 2], 4);
        let mut theirs = base.clone();
        theirs.families.push(family("b", fb, &[1], 1));
        theirs.grants[0].revoked = true;
        theirs.grants.push(grant("g2", 9, false));
        mine.merge(&theirs);
        assert_eq!(mine.families.len(), 2);
        let a = mine.families.iter().find(|f| f.name == "a").unwrap();
        assert_eq!((a.epoch, a.secrets.len(), a.batches_seen), (2, 2, 4));
        assert!(mine.families.iter().any(|f| f.name == "b"));
        assert_eq!(mine.grants.len(), 2);
        assert!(
            mine.grants
                .iter()
                .find(|g| g.statement == "g1")
                .unwrap()
                .revoked
        );
    }
}
