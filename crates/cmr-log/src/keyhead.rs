//! Key-event heads: the operator's signed word that a list of an identity's key events is complete
//! (docs/design/0006-key-event-heads.md).
//!
//! Each key event a client is served is proven to be in the log, but inclusion says nothing of what was
//! left out: a server could drop a device revocation, and a customer would seal a grant to the revoked
//! device. So the key events of an identity form a chain, computed, not stored: starting from a value
//! bound to the identity, each event (its log index and entry hash, in log order) is hashed into the
//! previous value. The server answers a key-event listing with a head: the note below, signed with the
//! log key, naming the tree size it speaks for, how many events the identity has below it, the last
//! one's index, and the chain value over all of them.
//!
//! ```text
//! cmr-vault key-event head v1
//! identity 3f1a…(64 hex digits)
//! size 1204
//! events 3 last 1187
//! chain 9c0e…(64 hex digits)
//! ```
//!
//! A client recomputes the chain over the events it was given and refuses any difference, so an event
//! left out, added or reordered is caught at once. A head that is itself a lie (the operator signs a
//! prefix) is evidence: any auditor, who reads every entry, recomputes the head at that size
//! ([`crate::auditor::Auditor::check_key_head`]) and the signature makes the lie the operator's own.
//!
//! Its second line starts with `identity`, so it can never be read as a checkpoint (whose second line
//! is a decimal size) or an auditor admission (`admit`/`dismiss`) signed by the same key.

use cmr_core::hash::{Digest, tagged_hash};
use cmr_core::identity::IdentityId;
use thiserror::Error;

use crate::entry::EntryKind;
use crate::note::{self, Note, NoteSigner, NoteVerifier};

/// The first line of every head.
pub const HEADER: &str = "cmr-vault key-event head v1";

/// Whether an entry of this kind is one of an identity's key events (what the chain runs over).
pub fn is_key_event(kind: EntryKind) -> bool {
    matches!(
        kind,
        EntryKind::KeyEvent | EntryKind::DeviceCertificate | EntryKind::DeviceRevocation
    )
}

/// A head is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyHeadError {
    /// The note does not parse, or its text is not exactly the canonical five lines.
    #[error("malformed key-event head: {0}")]
    Malformed(&'static str),
    /// It is not signed by the log key.
    #[error("the key-event head is not signed by this log's key")]
    NotSigned,
}

/// An identity's key-event chain up to a tree size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHead {
    /// Whose events.
    pub identity: IdentityId,
    /// The tree size it speaks for: every key event below it is counted.
    pub size: u64,
    /// How many events.
    pub count: u64,
    /// The last event's log index (none before the inception is logged).
    pub last: Option<u64>,
    /// The chain value over every event.
    pub chain: Digest,
}

impl KeyHead {
    /// The head of an identity with no events yet.
    pub fn start(identity: IdentityId, size: u64) -> Self {
        Self {
            identity,
            size,
            count: 0,
            last: None,
            chain: tagged_hash("key-event-chain-start", &identity.0),
        }
    }

    /// Hashes in the next event: its log index and its entry hash ([`crate::entry::EntryBody::hash`]).
    /// Events go in log order; an index not after the last one is a caller's mistake and is refused.
    pub fn extend(&mut self, index: u64, entry_hash: &Digest) -> Result<(), KeyHeadError> {
        if self.last.is_some_and(|l| index <= l) || index >= self.size {
            return Err(KeyHeadError::Malformed(
                "events out of order or beyond the size",
            ));
        }
        let mut data = Vec::with_capacity(72);
        data.extend_from_slice(&self.chain.0);
        data.extend_from_slice(&index.to_be_bytes());
        data.extend_from_slice(&entry_hash.0);
        self.chain = tagged_hash("key-event-chain", &data);
        self.count += 1;
        self.last = Some(index);
        Ok(())
    }

    /// The head over `events` (index and entry hash, log order) below `size`.
    pub fn over<'a>(
        identity: IdentityId,
        size: u64,
        events: impl IntoIterator<Item = (u64, &'a Digest)>,
    ) -> Result<Self, KeyHeadError> {
        let mut head = Self::start(identity, size);
        for (index, hash) in events {
            head.extend(index, hash)?;
        }
        Ok(head)
    }

    /// The canonical note text.
    pub fn text(&self) -> String {
        let last = self.last.map_or_else(|| "-".to_owned(), |l| l.to_string());
        format!(
            "{HEADER}\nidentity {}\nsize {}\nevents {} last {last}\nchain {}\n",
            self.identity.to_hex(),
            self.size,
            self.count,
            self.chain.to_hex()
        )
    }

    /// The head signed with the log key.
    pub fn sign(&self, log_key: &NoteSigner) -> String {
        // The text ends in exactly one newline, which is all `note::sign` can refuse.
        note::sign(&self.text(), &[log_key], 0).unwrap_or_default()
    }

    /// Opens a signed head: canonical text, signed by `log_key`.
    pub fn open(signed: &str, log_key: &NoteVerifier) -> Result<Self, KeyHeadError> {
        let note = Note::parse(signed).map_err(|_| KeyHeadError::Malformed("not a signed note"))?;
        note.verify(std::slice::from_ref(log_key))
            .map_err(|_| KeyHeadError::NotSigned)?;
        let parsed = Self::parse_text(&note.text)?;
        if parsed.text() != note.text {
            return Err(KeyHeadError::Malformed("not in canonical form"));
        }
        Ok(parsed)
    }

    fn parse_text(text: &str) -> Result<Self, KeyHeadError> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(KeyHeadError::Malformed("not a key-event head"));
        }
        let mut field = |name: &'static str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or(KeyHeadError::Malformed("a line is missing"))
        };
        let identity = IdentityId::from_hex(field("identity")?)
            .ok_or(KeyHeadError::Malformed("not an identity id"))?;
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| KeyHeadError::Malformed("not a number"))
        };
        let size = number(field("size")?)?;
        let (count, last) = field("events")?
            .split_once(" last ")
            .ok_or(KeyHeadError::Malformed("no last event"))?;
        let count = number(count)?;
        let last = match last {
            "-" => None,
            l => Some(number(l)?),
        };
        let chain = Digest::from_hex(field("chain")?)
            .ok_or(KeyHeadError::Malformed("not a chain value"))?;
        if lines.next().is_some() {
            return Err(KeyHeadError::Malformed("more than five lines"));
        }
        Ok(Self {
            identity,
            size,
            count,
            last,
            chain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer_from(seed: u8) -> NoteSigner {
        NoteSigner::new(
            "log.test",
            note::TYPE_ED25519,
            cmr_core::keys::SigningKey::from_seed(&[seed; 32]),
        )
        .unwrap()
    }

    fn signer() -> NoteSigner {
        signer_from(7)
    }

    fn head(events: &[(u64, Digest)]) -> KeyHead {
        KeyHead::over(
            IdentityId([3; 32]),
            100,
            events.iter().map(|(i, h)| (*i, h)),
        )
        .unwrap()
    }

    #[test]
    fn a_head_round_trips_and_only_under_the_log_key() {
        let key = signer();
        let h = head(&[(4, Digest([1; 32])), (9, Digest([2; 32]))]);
        let signed = h.sign(&key);
        assert_eq!(KeyHead::open(&signed, &key.verifier()).unwrap(), h);
        let other = signer_from(8);
        assert_eq!(
            KeyHead::open(&signed, &other.verifier()),
            Err(KeyHeadError::NotSigned)
        );
        let empty = KeyHead::start(IdentityId([3; 32]), 5);
        assert_eq!(
            KeyHead::open(&empty.sign(&key), &key.verifier()).unwrap(),
            empty
        );
    }

    #[test]
    fn leaving_out_adding_or_reordering_an_event_changes_the_head() {
        let (a, b, c) = (Digest([1; 32]), Digest([2; 32]), Digest([3; 32]));
        let full = head(&[(4, a), (9, b), (12, c)]);
        assert_ne!(full.chain, head(&[(4, a), (12, c)]).chain);
        assert_ne!(full.chain, head(&[(4, a), (9, b)]).chain);
        assert_ne!(full.chain, head(&[(4, a), (9, c), (12, b)]).chain);
        assert_ne!(full.chain, head(&[(4, a), (10, b), (12, c)]).chain);
        // Another identity's chain over the same events differs from the start.
        let other = KeyHead::over(IdentityId([4; 32]), 100, [(4, &a), (9, &b), (12, &c)]).unwrap();
        assert_ne!(full.chain, other.chain);
        // Out of order or beyond the size is refused.
        assert!(KeyHead::over(IdentityId([3; 32]), 100, [(9, &a), (4, &b)]).is_err());
        assert!(KeyHead::over(IdentityId([3; 32]), 9, [(9, &a)]).is_err());
    }

    #[test]
    fn a_head_is_not_a_checkpoint_or_an_admission() {
        let key = signer();
        let signed = head(&[(4, Digest([1; 32]))]).sign(&key);
        assert!(crate::checkpoint::open(&signed, &key.verifier(), &[], 0).is_err());
        assert!(crate::admission::Admission::open(&signed, &key.verifier()).is_err());
        // A non-canonical text (an extra space) is refused even when signed.
        let text = head(&[(4, Digest([1; 32]))])
            .text()
            .replace("size 100", "size  100");
        let odd = note::sign(&text, &[&key], 0).unwrap();
        assert!(KeyHead::open(&odd, &key.verifier()).is_err());
    }
}
