//! An in-memory log: what the sequencer does to a log, without storage. Tests, benchmarks and tools use it
//! as a source for the auditor; `cmr-store` does the same steps inside its sled transactions.
//!
//! Owns the order of one append: draw the salt, link the entry to its customer's previous one, commit,
//! append the leaf. Server times never decrease.

use std::collections::HashMap;

use cmr_core::hash::Digest;
use cmr_core::identity::IdentityId;
use cmr_core::merkle::Hash;
use rand_core::CryptoRng;
use thiserror::Error;

use crate::checkpoint::Checkpoint;
use crate::entry::{
    ChainLink, EntryBody, EntryKind, SaltedBody, commitment, commitment_leaf, draw_salt,
};
use crate::note::NoteSigner;
use crate::tree::{MemoryNodes, Tree};

/// An append was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AppendError {
    /// The server time went backwards.
    #[error("server time {got} is before the last entry's {last}")]
    TimeWentBackwards {
        /// The last entry's time.
        last: u64,
        /// The time offered.
        got: u64,
    },
}

/// What an append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's index.
    pub index: u64,
    /// Its commitment (the leaf data).
    pub commitment: Digest,
    /// Its entry hash (what the customer's next entry names).
    pub hash: Digest,
}

/// An in-memory log with bodies, salts and per-customer chain heads.
#[derive(Debug, Default)]
pub struct MemoryLog {
    tree: Tree<MemoryNodes>,
    commitments: Vec<Digest>,
    bodies: Vec<Option<SaltedBody>>,
    heads: HashMap<IdentityId, ChainLink>,
    last_time: u64,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of entries.
    pub fn size(&self) -> u64 {
        self.commitments.len() as u64
    }

    /// The customer's latest entry.
    pub fn head(&self, customer: &IdentityId) -> Option<ChainLink> {
        self.heads.get(customer).copied()
    }

    /// Appends an entry: draws its salt, links it to the customer's previous entry, and commits it.
    pub fn append<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        kind: EntryKind,
        time: u64,
        subject: IdentityId,
        customer: Option<IdentityId>,
        payload: Vec<u8>,
    ) -> Result<Appended, AppendError> {
        if time < self.last_time {
            return Err(AppendError::TimeWentBackwards {
                last: self.last_time,
                got: time,
            });
        }
        let body = EntryBody {
            kind,
            time,
            subject,
            customer,
            prev: customer.and_then(|c| self.heads.get(&c).copied()),
            payload,
        };
        Ok(self.append_body(rng, &body))
    }

    /// Appends a body as given (tests use it to plant a broken chain or a time that goes backwards).
    pub fn append_body<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        body: &EntryBody,
    ) -> Appended {
        let encoded = body.encode();
        let salt = draw_salt(rng);
        let c = commitment(&salt, &encoded);
        let index = self
            .tree
            .append(commitment_leaf(&c))
            .expect("the in-memory store never fails");
        let hash = EntryBody::hash(&encoded);
        if let Some(customer) = body.customer {
            self.heads.insert(customer, ChainLink { index, hash });
        }
        self.last_time = self.last_time.max(body.time);
        self.commitments.push(c);
        self.bodies.push(Some(SaltedBody {
            salt,
            body: encoded,
        }));
        Appended {
            index,
            commitment: c,
            hash,
        }
    }

    /// The checkpoint at the current size, signed by `log`.
    pub fn checkpoint(&self, log: &NoteSigner) -> String {
        self.checkpoint_at(self.size(), log)
    }

    /// The checkpoint at `size`, signed by `log`.
    pub fn checkpoint_at(&self, size: u64, log: &NoteSigner) -> String {
        Checkpoint {
            origin: log.name().to_string(),
            size,
            root: self.root(size),
            extensions: vec![],
        }
        .sign(log)
    }

    /// The root at `size`.
    pub fn root(&self, size: u64) -> Hash {
        self.tree.root(size).expect("size is within the log")
    }

    /// The tree, for proofs.
    pub fn tree(&self) -> &Tree<MemoryNodes> {
        &self.tree
    }

    /// The commitments `from..to`.
    pub fn commitments(&self, from: u64, to: u64) -> &[Digest] {
        &self.commitments[from as usize..to as usize]
    }

    /// The salt and body of entry `index`, unless erased.
    pub fn body(&self, index: u64) -> Option<&SaltedBody> {
        self.bodies.get(index as usize).and_then(Option::as_ref)
    }

    /// Erases an entry's body and salt (erasure of a customer's data). The leaf stays.
    pub fn redact(&mut self, index: u64) {
        if let Some(b) = self.bodies.get_mut(index as usize) {
            *b = None;
        }
    }

    /// Replaces a stored body (tests use it to play a server that edits history).
    pub fn tamper_body(&mut self, index: u64, salt: [u8; 32], body: Vec<u8>) {
        self.bodies[index as usize] = Some(SaltedBody { salt, body });
    }

    /// Replaces a commitment without touching the tree (a server that rewrites a leaf it serves).
    pub fn tamper_commitment(&mut self, index: u64, c: Digest) {
        self.commitments[index as usize] = c;
    }
}

/// A [`crate::auditor::LogSource`] over a [`MemoryLog`], serving a given signed checkpoint.
#[derive(Debug)]
pub struct MemorySource<'a> {
    /// The log.
    pub log: &'a MemoryLog,
    /// The checkpoint served.
    pub checkpoint: String,
}

impl crate::auditor::LogSource for MemorySource<'_> {
    type Error = std::convert::Infallible;

    fn checkpoint(&mut self) -> Result<String, Self::Error> {
        Ok(self.checkpoint.clone())
    }

    fn commitments(&mut self, from: u64, to: u64) -> Result<Vec<Digest>, Self::Error> {
        let to = to.min(self.log.size());
        Ok(self.log.commitments(from.min(to), to).to_vec())
    }

    fn body(&mut self, index: u64) -> Result<Option<SaltedBody>, Self::Error> {
        Ok(self.log.body(index).cloned())
    }
}
