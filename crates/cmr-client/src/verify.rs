//! What the SDK checks before it believes an answer. The log key is pinned; every checkpoint must verify
//! under it and be consistent with every checkpoint seen before (a smaller one is a rollback, a
//! different root at a size seen is a fork); every entry the SDK relies on must be included in the
//! checkpoint served with it; an identity's keys come only from its key events, replayed from the
//! inception whose hash is its id.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::identity::{DeviceCertificate, DeviceId, IdentityId, IdentityState};
use cmr_core::keys::KemPublicKey;
use cmr_core::merkle::Hash;
use cmr_log::checkpoint::Checkpoint;
use cmr_log::entry::{EntryBody, SaltedBody, commitment, commitment_leaf};
use cmr_log::ledger::{Effect, Header, Ledger, Parsed, Signatures};
use cmr_log::note::NoteVerifier;
use serde_json::Value;

use crate::error::{ClientError, VerifyError};

/// The client's view of the log: the pinned key and the largest checkpoint verified so far.
#[derive(Debug, Clone)]
pub struct LogView {
    key: NoteVerifier,
    latest: Option<Checkpoint>,
    latest_note: Option<String>,
}

/// What a checkpoint needs before it is accepted: nothing, or a consistency proof from `old` to `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Accept it as is.
    Nothing,
    /// Fetch the consistency proof between these sizes and call [`LogView::accept`].
    Consistency {
        /// The size already verified.
        old: u64,
        /// The size offered.
        new: u64,
    },
}

impl LogView {
    /// A view pinned to the log key.
    pub fn new(key: NoteVerifier) -> Self {
        Self {
            key,
            latest: None,
            latest_note: None,
        }
    }

    /// The signed note of the largest checkpoint verified, to save.
    pub fn latest_note(&self) -> Option<&str> {
        self.latest_note.as_deref()
    }

    /// Starts from a checkpoint verified in an earlier run (its signature checked again by the caller).
    pub fn accept_trusted(&mut self, cp: Checkpoint, note: String) {
        self.latest = Some(cp);
        self.latest_note = Some(note);
    }

    /// The pinned key.
    pub fn key(&self) -> &NoteVerifier {
        &self.key
    }

    /// The largest checkpoint verified.
    pub fn latest(&self) -> Option<&Checkpoint> {
        self.latest.as_ref()
    }

    /// Opens `note` under the pinned key and says what it needs. A smaller checkpoint than one seen is a
    /// rollback; the same size with another root is a fork.
    pub fn check(&self, note: &str) -> Result<(Checkpoint, Needs), VerifyError> {
        let cp = cmr_log::checkpoint::open(note, &self.key, &[], 0)
            .map_err(|e| {
                // Signed, but by another key than the pinned one: name both, so a user can tell a
                // server whose key changed (or the wrong server) from a forgery.
                let signers: Vec<String> = cmr_log::note::Note::parse(note)
                    .map(|n| {
                        n.signatures
                            .iter()
                            .map(|s| format!("{}+{:08x}", s.name, s.id))
                            .collect()
                    })
                    .unwrap_or_default();
                let pinned_id = format!("{}+{:08x}", self.key.name(), self.key.id());
                if signers.is_empty() || signers.contains(&pinned_id) {
                    VerifyError::Checkpoint(e.to_string())
                } else {
                    VerifyError::Checkpoint(format!(
                        "the server's log key is {}, and this client pinned {pinned_id}",
                        signers.join(", ")
                    ))
                }
            })?
            .checkpoint;
        let needs = match &self.latest {
            None => Needs::Nothing,
            Some(seen) if cp.size < seen.size => {
                return Err(VerifyError::StaleCheckpoint {
                    seen: seen.size,
                    got: cp.size,
                });
            }
            Some(seen) if cp.size == seen.size => {
                if cp.root != seen.root {
                    return Err(VerifyError::Inconsistent {
                        old: seen.size,
                        new: cp.size,
                    });
                }
                Needs::Nothing
            }
            Some(seen) if seen.size == 0 => Needs::Nothing,
            Some(seen) => Needs::Consistency {
                old: seen.size,
                new: cp.size,
            },
        };
        Ok((cp, needs))
    }

    /// Accepts `cp` (from [`LogView::check`], signed `note`) with the consistency proof it needed, if any.
    pub fn accept(
        &mut self,
        cp: Checkpoint,
        note: &str,
        proof: Option<&[Hash]>,
    ) -> Result<(), VerifyError> {
        if let (Some(seen), Some(proof)) = (&self.latest, proof) {
            cmr_log::verify::verify_consistency(seen.size, cp.size, &seen.root, &cp.root, proof)
                .map_err(|_| VerifyError::Inconsistent {
                    old: seen.size,
                    new: cp.size,
                })?;
        } else if let Some(seen) = &self.latest
            && cp.size > seen.size
            && seen.size > 0
        {
            return Err(VerifyError::Inconsistent {
                old: seen.size,
                new: cp.size,
            });
        }
        if self.latest.as_ref().is_none_or(|s| cp.size >= s.size) {
            self.latest = Some(cp);
            self.latest_note = Some(note.to_string());
        }
        Ok(())
    }
}

/// An entry as served with a proof: index, salt, body, and its inclusion proof.
#[derive(Debug, Clone)]
pub struct ProvenEntry {
    /// The log index.
    pub index: u64,
    /// The salt and encoded body.
    pub salted: SaltedBody,
    /// The decoded body.
    pub body: EntryBody,
}

/// Verifies that `salted` is entry `index` of the checkpoint `cp`, by its inclusion `proof`.
pub fn check_inclusion(
    cp: &Checkpoint,
    index: u64,
    salted: &SaltedBody,
    proof: &[Hash],
) -> Result<EntryBody, VerifyError> {
    let leaf = commitment_leaf(&commitment(&salted.salt, &salted.body));
    cmr_log::verify::verify_inclusion(index, cp.size, &leaf, proof, &cp.root)
        .map_err(|_| VerifyError::NotIncluded(index))?;
    EntryBody::decode(&salted.body).map_err(|_| VerifyError::NotIncluded(index))
}

pub(crate) fn b64(v: &Value, what: &str) -> Result<Vec<u8>, ClientError> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or_else(|| ClientError::Malformed(format!("{what} is not base64")))
}

pub(crate) fn hashes(v: &Value, what: &str) -> Result<Vec<Hash>, ClientError> {
    v.as_array()
        .ok_or_else(|| ClientError::Malformed(format!("{what} is not a list")))?
        .iter()
        .map(|h| {
            b64(h, what)?.try_into().map_err(|_| {
                ClientError::Malformed(format!("{what} holds a hash of the wrong size"))
            })
        })
        .collect()
}

/// Parses `{index, salt, body, proof}` (`cmr_wire::log::EntryJson`) and checks it against `cp`.
pub(crate) fn proven_entry(v: &Value, cp: &Checkpoint) -> Result<ProvenEntry, ClientError> {
    prove(&wire::<cmr_wire::log::EntryJson>(v, "entry")?, cp)
}

/// An answer read as its wire type (`cmr-wire`): the one definition the server serializes.
pub(crate) fn wire<T: serde::de::DeserializeOwned>(
    v: &Value,
    what: &str,
) -> Result<T, ClientError> {
    T::deserialize(v).map_err(|e| ClientError::Malformed(format!("{what}: {e}")))
}

/// Checks that an entry served on the wire is included in `cp`, and decodes it.
pub(crate) fn prove(
    wire: &cmr_wire::log::EntryJson,
    cp: &Checkpoint,
) -> Result<ProvenEntry, ClientError> {
    let e = wire
        .decode()
        .map_err(|e| ClientError::Malformed(format!("entry: {e}")))?;
    let salted = SaltedBody {
        salt: e.salt,
        body: e.body,
    };
    let body = check_inclusion(cp, e.index, &salted, &e.proof)?;
    Ok(ProvenEntry {
        index: e.index,
        salted,
        body,
    })
}

/// An identity's keys, learnt only from its key events replayed in log order.
#[derive(Debug)]
pub struct VerifiedIdentity {
    /// The replayed state: which device keys were valid at which log positions.
    pub state: IdentityState,
    /// The device certificates, oldest first, with whether each was revoked since.
    pub devices: Vec<(DeviceCertificate, bool)>,
    /// Each device's newest signed certificate, as logged.
    pub certificates: HashMap<DeviceId, Vec<u8>>,
}

impl VerifiedIdentity {
    /// Replays `events` (proven entries, oldest first) for `id`.
    pub fn replay(id: IdentityId, events: &[ProvenEntry]) -> Result<Self, VerifyError> {
        let err = |reason: String| VerifyError::KeyEvents {
            identity: id.to_hex(),
            reason,
        };
        // The identity's events go through the log's one rule engine, as the store and the auditor
        // apply them: the id is the hash of the inception (a substituted key cannot carry this id), each
        // certificate and revocation is signed by the identity key current at its position, and each
        // entry's header is the one its payload fixes.
        let mut ledger = Ledger::new();
        let mut devices: Vec<(DeviceCertificate, bool)> = Vec::new();
        let mut certificates = HashMap::new();
        for e in events {
            if e.body.subject != id {
                return Err(err(format!("entry {} is about another identity", e.index)));
            }
            if !cmr_log::keyhead::is_key_event(e.body.kind) {
                return Err(err(format!(
                    "entry {} ({}) is not a key event",
                    e.index,
                    e.body.kind.name()
                )));
            }
            let parsed = Parsed::decode_signed(e.body.kind, &e.body.payload)
                .map_err(|x| err(format!("entry {}: {x}", e.index)))?;
            let (_, effect) = ledger
                .apply(
                    &parsed,
                    e.index,
                    e.body.time,
                    Some(Header::of(&e.body)),
                    Signatures::Verify,
                )
                .map_err(|x| err(format!("entry {}: {x}", e.index)))?;
            match (effect, &parsed) {
                (Effect::Certified(..), Parsed::Certificate(c)) => {
                    certificates.insert(c.body().device(), e.body.payload.clone());
                    devices.push((c.body().clone(), false));
                }
                (Effect::Revoked(_, gone), _) => {
                    for (c, revoked) in &mut devices {
                        if c.device() == gone {
                            *revoked = true;
                        }
                    }
                }
                _ => {}
            }
        }
        let state = ledger
            .identity(&id)
            .cloned()
            .ok_or_else(|| err("no inception".into()))?;
        Ok(Self {
            state,
            devices,
            certificates,
        })
    }

    /// The identity.
    pub fn id(&self) -> IdentityId {
        self.state.keys().id()
    }

    /// The devices valid now, newest first: certified under the identity key current now (a device
    /// certified under a key rotated away since counts only once certified again) and not revoked.
    pub fn current_devices(&self) -> impl Iterator<Item = &DeviceCertificate> {
        self.devices.iter().rev().filter_map(|(c, _)| {
            self.state
                .device_at(&c.device(), u64::MAX)
                .ok()
                .filter(|now| now.kem_key == c.kem_key)
        })
    }

    /// The KEM key of the newest device valid now: where keys for this party are sealed.
    pub fn kem_key(&self) -> Option<KemPublicKey> {
        self.current_devices().next().map(|c| c.kem_key)
    }

    /// Whether `device` is (or was) one of this identity's certified devices.
    pub fn has_device(&self, device: &DeviceId) -> bool {
        self.devices.iter().any(|(c, _)| c.device() == *device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmr_log::entry::EntryKind;
    use proptest::prelude::*;

    fn entry(index: u64, kind: EntryKind, subject: IdentityId, payload: Vec<u8>) -> ProvenEntry {
        let body = EntryBody {
            kind,
            time: 1_800_000_000 + index,
            subject,
            customer: None,
            prev: None,
            payload,
        };
        ProvenEntry {
            index,
            salted: SaltedBody {
                salt: [0; 32],
                body: body.encode(),
            },
            body,
        }
    }

    #[test]
    fn a_device_certified_under_a_rotated_away_key_is_not_sealed_to() {
        use cmr_core::identity::{DeviceKeys, Role, create_identity, rotate_identity};
        let rng = &mut rand::rng();
        let new = create_identity(rng, Role::Company);
        let id = new.inception.identity();
        let old_device = DeviceKeys::generate(rng);
        let mut events = vec![
            entry(0, EntryKind::KeyEvent, id, new.inception.encode()),
            entry(
                1,
                EntryKind::DeviceCertificate,
                id,
                old_device.certify(id, 0, &new.identity_key, 1).encode(),
            ),
        ];
        let before = VerifiedIdentity::replay(id, &events).unwrap();
        assert_eq!(before.kem_key(), Some(old_device.kem.public_key()));
        // The identity key rotates (a recovery): the old device no longer counts...
        let rotated = rotate_identity(rng, before.state.keys(), &new.recovery);
        events.push(entry(
            2,
            EntryKind::KeyEvent,
            id,
            rotated.inception.encode(),
        ));
        let after = VerifiedIdentity::replay(id, &events).unwrap();
        assert_eq!(after.kem_key(), None);
        // ...until a device is certified under the new key.
        let new_device = DeviceKeys::generate(rng);
        events.push(entry(
            3,
            EntryKind::DeviceCertificate,
            id,
            new_device.certify(id, 1, &rotated.identity_key, 2).encode(),
        ));
        let recertified = VerifiedIdentity::replay(id, &events).unwrap();
        assert_eq!(recertified.kem_key(), Some(new_device.kem.public_key()));
        assert_eq!(recertified.current_devices().count(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a server sends as a checkpoint, a read answer or a proven entry, the SDK answers with
        /// an error, never a panic.
        #[test]
        fn server_answers_never_make_the_sdk_panic(text in "\\PC{0,300}", n in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let key = cmr_log::note::NoteSigner::new(
                "sdk.test/log",
                cmr_log::note::TYPE_ED25519,
                cmr_core::keys::SigningKey::from_seed(&[1; 32]),
            )
            .unwrap()
            .verifier();
            let view = LogView::new(key);
            let _ = view.check(&text);
            let b64s = B64.encode(&bytes);
            let answers = [
                serde_json::json!({"proof_of_read": {"head": {"customer": text, "family": b64s}, "pages": [{"ids": [text]}]}, "records": [b64s], "batches": [text]}),
                serde_json::json!({"index": n, "salt": b64s, "body": b64s, "proof": [b64s]}),
                serde_json::Value::String(text.clone()),
            ];
            let cp = cmr_log::checkpoint::Checkpoint { origin: "sdk.test/log".into(), size: n, root: [0; 32], extensions: vec![] };
            for a in &answers {
                let _ = crate::company::parse_read(a);
                let _ = proven_entry(a, &cp);
                let _ = serde_json::from_value::<crate::state::KeyBackup>(a.clone());
            }
        }
    }
}
