//! Identities, pre-rotation, devices and recovery (design note 0001).
//!
//! This module owns:
//! - the key event format (inception and rotation) and the id derived from the inception;
//! - [`KeyHistory`], which checks a chain of key events in log order;
//! - device certificates and revocations, and [`IdentityState`], which answers "was this device allowed to
//!   sign at this log position?";
//! - the secret side: creating an identity, certifying devices, and rotating with the recovery secret.
//!
//! It does not own where events are stored or how positions are assigned: callers pass log positions in.
//! Customers, companies and auditors all have identities of this kind; only the [`Role`] differs.

use std::collections::BTreeMap;
use std::fmt;

use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::hash::{Digest, tagged_hash};
use crate::keys::{
    BadSignature, KemPublicKey, KemSecretKey, Signature, SignedEnvelope, SigningKey, VerifyingKey,
};

/// A log position: the index of the entry that carried a statement. Assigned by the sequencer.
pub type Position = u64;

/// An identity: the tagged hash of its inception body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(pub [u8; 32]);

impl IdentityId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        Digest::from_hex(s).map(|d| Self(d.0))
    }
}

impl fmt::Debug for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityId({})", self.to_hex())
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A device: the tagged hash of its signing key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 32]);

impl DeviceId {
    /// The id of the device whose signing key is `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        Self(tagged_hash("device", &key.to_bytes()).0)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.to_hex())
    }
}

/// Who an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// A person who owns a vault.
    Customer = 1,
    /// A company that requests access to vaults.
    Company = 2,
    /// An auditor of the log.
    Auditor = 3,
}

impl Role {
    /// Parses the role's byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Role::Customer,
            2 => Role::Company,
            3 => Role::Auditor,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "role",
                    reason: "unknown role",
                });
            }
        })
    }
}

/// The commitment to a next identity key: the tagged hash of its public bytes.
pub fn next_key_digest(key: &VerifyingKey) -> Digest {
    tagged_hash("next-key", &key.to_bytes())
}

/// Why an identity statement was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// The statement could not be decoded.
    #[error("malformed identity statement: {0}")]
    Decode(#[from] DecodeError),
    /// A signature did not verify under the key it must be signed by.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// An inception was expected (sequence 0) but something else came.
    #[error("not an inception event")]
    NotInception,
    /// A rotation does not follow the current event (sequence, id or prior digest).
    #[error("rotation does not extend the current key event (expected sequence {expected})")]
    BrokenChain {
        /// The sequence number that would have been accepted.
        expected: u64,
    },
    /// The rotation reveals a key that does not match the pre-committed digest.
    #[error("rotation key does not match the pre-committed next-key digest")]
    NextKeyMismatch,
    /// A statement names another identity.
    #[error("statement is for another identity")]
    WrongIdentity,
    /// A statement was signed by an identity key that is not the current one at its position.
    #[error("signed by identity key {signed_by}, but key {current} is current")]
    StaleIdentityKey {
        /// The sequence number named in the statement.
        signed_by: u64,
        /// The current sequence number at that position.
        current: u64,
    },
    /// Positions must grow: a statement cannot be applied at or before one already applied.
    #[error("position {0} is not after the last applied position")]
    PositionNotIncreasing(Position),
    /// The device has no certificate that is valid at that position.
    #[error("device is not certified by the current identity key at this position")]
    UnknownDevice,
    /// The device was revoked before that position.
    #[error("device was revoked at position {0}")]
    DeviceRevoked(Position),
    /// A device that was revoked cannot be certified again.
    #[error("device was revoked and cannot be certified again")]
    RevokedDeviceRecertified,
}

/// A key event: the inception (sequence 0) or a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    /// The identity's role, fixed at inception and repeated in every event.
    pub role: Role,
    /// 0 for the inception, then one more for each rotation.
    pub seq: u64,
    /// For a rotation: the identity and the digest of the event it replaces.
    pub prior: Option<(IdentityId, Digest)>,
    /// The identity key this event makes current.
    pub signing_key: VerifyingKey,
    /// The commitment to the next identity key, whose secret is the recovery secret.
    pub next_key_digest: Digest,
    /// The X25519 key derived from that same recovery secret; the vault key is wrapped to it.
    pub recovery_kem: KemPublicKey,
}

impl KeyEvent {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::KeyEvent);
        w.u8(self.role as u8).u64(self.seq);
        if let Some((id, prior)) = &self.prior {
            w.array(&id.0).array(&prior.0);
        }
        w.array(&self.signing_key.to_bytes())
            .array(&self.next_key_digest.0)
            .array(&self.recovery_kem.to_bytes());
        w.finish()
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, Kind::KeyEvent)?;
        let role = Role::from_u8(r.u8()?)?;
        let seq = r.u64()?;
        let prior = if seq == 0 {
            None
        } else {
            Some((IdentityId(r.array()?), Digest(r.array()?)))
        };
        let signing_key =
            VerifyingKey::from_bytes(&r.array()?).map_err(|_| DecodeError::Invalid {
                field: "signing_key",
                reason: "invalid or weak Ed25519 key",
            })?;
        let next_key_digest = Digest(r.array()?);
        let recovery_kem =
            KemPublicKey::from_bytes(&r.array()?).map_err(|_| DecodeError::Invalid {
                field: "recovery_kem",
                reason: "low-order X25519 key",
            })?;
        r.finish()?;
        Ok(Self {
            role,
            seq,
            prior,
            signing_key,
            next_key_digest,
            recovery_kem,
        })
    }
}

/// A key event with its signature by the key it makes current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKeyEvent {
    envelope: SignedEnvelope,
    event: KeyEvent,
}

impl SignedKeyEvent {
    fn sign(event: KeyEvent, key: &SigningKey) -> Self {
        let envelope = SignedEnvelope::sign(event.encode(), key);
        Self { envelope, event }
    }

    /// Parses the wire form. The signature is checked by [`KeyHistory`], not here.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let event = KeyEvent::decode(&envelope.body)?;
        Ok(Self { envelope, event })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode()
    }

    /// The event.
    pub fn event(&self) -> &KeyEvent {
        &self.event
    }

    /// The digest a later rotation names as its prior.
    pub fn digest(&self) -> Digest {
        tagged_hash("key-event", &self.envelope.body)
    }

    /// The identity this event belongs to: derived for an inception, named for a rotation.
    pub fn identity(&self) -> IdentityId {
        match &self.event.prior {
            None => IdentityId(tagged_hash("identity", &self.envelope.body).0),
            Some((id, _)) => *id,
        }
    }

    fn verify_self_signed(&self) -> Result<(), IdentityError> {
        self.envelope
            .verify(&self.event.signing_key)
            .map_err(|BadSignature| IdentityError::BadSignature("key event"))
    }
}

/// One accepted key event, as a verifier remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The event's sequence number.
    pub seq: u64,
    /// The log position of the event.
    pub position: Position,
    /// The identity key it made current.
    pub signing_key: VerifyingKey,
    /// Its next-key commitment.
    pub next_key_digest: Digest,
    /// Its recovery KEM key.
    pub recovery_kem: KemPublicKey,
    /// The event's digest.
    pub digest: Digest,
}

/// The verified chain of key events of one identity, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHistory {
    id: IdentityId,
    role: Role,
    records: Vec<KeyRecord>,
}

impl KeyHistory {
    /// Starts a history from an inception logged at `position`. The inception must be self-signed.
    pub fn incept(event: &SignedKeyEvent, position: Position) -> Result<Self, IdentityError> {
        if event.event.seq != 0 || event.event.prior.is_some() {
            return Err(IdentityError::NotInception);
        }
        event.verify_self_signed()?;
        Ok(Self {
            id: event.identity(),
            role: event.event.role,
            records: vec![record(event, position)],
        })
    }

    /// Applies a rotation logged at `position`. It must name this identity and the current event, reveal
    /// the pre-committed key, and be signed by that key.
    pub fn rotate(
        &mut self,
        event: &SignedKeyEvent,
        position: Position,
    ) -> Result<(), IdentityError> {
        let current = self.current();
        let expected = current.seq + 1;
        if position <= current.position {
            return Err(IdentityError::PositionNotIncreasing(position));
        }
        let Some((id, prior)) = &event.event.prior else {
            return Err(IdentityError::BrokenChain { expected });
        };
        if *id != self.id || event.event.role != self.role {
            return Err(IdentityError::WrongIdentity);
        }
        if event.event.seq != expected || *prior != current.digest {
            return Err(IdentityError::BrokenChain { expected });
        }
        if next_key_digest(&event.event.signing_key) != current.next_key_digest {
            return Err(IdentityError::NextKeyMismatch);
        }
        event.verify_self_signed()?;
        self.records.push(record(event, position));
        Ok(())
    }

    /// The identity.
    pub fn id(&self) -> IdentityId {
        self.id
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The latest event.
    pub fn current(&self) -> &KeyRecord {
        self.records
            .last()
            .expect("a history is created with its inception and never shrinks")
    }

    /// The key event in force at `position`: the last one logged strictly before it.
    pub fn at(&self, position: Position) -> Option<&KeyRecord> {
        self.records.iter().rev().find(|r| r.position < position)
    }
}

fn record(event: &SignedKeyEvent, position: Position) -> KeyRecord {
    KeyRecord {
        seq: event.event.seq,
        position,
        signing_key: event.event.signing_key,
        next_key_digest: event.event.next_key_digest,
        recovery_kem: event.event.recovery_kem,
        digest: event.digest(),
    }
}

/// A device certificate: the identity key `identity_seq` vouches for a device's two keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    /// The identity that owns the device.
    pub identity: IdentityId,
    /// The sequence number of the identity key that signs this certificate.
    pub identity_seq: u64,
    /// The device's Ed25519 key, which signs statements and requests.
    pub signing_key: VerifyingKey,
    /// The device's X25519 key, to which keys are wrapped.
    pub kem_key: KemPublicKey,
    /// When the client issued it, in Unix seconds (informative; validity follows log positions).
    pub issued_at: u64,
}

impl DeviceCertificate {
    /// The device's id.
    pub fn device(&self) -> DeviceId {
        DeviceId::of(&self.signing_key)
    }

    /// Signs this certificate with the identity key of sequence `identity_seq` (which it names).
    pub fn sign(self, identity_key: &SigningKey) -> Signed<DeviceCertificate> {
        Signed {
            envelope: SignedEnvelope::sign(self.encode(), identity_key),
            body: self,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::DeviceCertificate);
        w.array(&self.identity.0)
            .u64(self.identity_seq)
            .array(&self.signing_key.to_bytes())
            .array(&self.kem_key.to_bytes())
            .u64(self.issued_at);
        w.finish()
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, Kind::DeviceCertificate)?;
        let identity = IdentityId(r.array()?);
        let identity_seq = r.u64()?;
        let signing_key =
            VerifyingKey::from_bytes(&r.array()?).map_err(|_| DecodeError::Invalid {
                field: "signing_key",
                reason: "invalid or weak Ed25519 key",
            })?;
        let kem_key = KemPublicKey::from_bytes(&r.array()?).map_err(|_| DecodeError::Invalid {
            field: "kem_key",
            reason: "low-order X25519 key",
        })?;
        let issued_at = r.u64()?;
        r.finish()?;
        Ok(Self {
            identity,
            identity_seq,
            signing_key,
            kem_key,
            issued_at,
        })
    }
}

/// A revocation of a device by the identity key `identity_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRevocation {
    /// The identity that owns the device.
    pub identity: IdentityId,
    /// The sequence number of the identity key that signs this revocation.
    pub identity_seq: u64,
    /// The revoked device.
    pub device: DeviceId,
    /// When the client issued it, in Unix seconds (informative).
    pub issued_at: u64,
}

impl DeviceRevocation {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::DeviceRevocation);
        w.array(&self.identity.0)
            .u64(self.identity_seq)
            .array(&self.device.0)
            .u64(self.issued_at);
        w.finish()
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, Kind::DeviceRevocation)?;
        let out = Self {
            identity: IdentityId(r.array()?),
            identity_seq: r.u64()?,
            device: DeviceId(r.array()?),
            issued_at: r.u64()?,
        };
        r.finish()?;
        Ok(out)
    }
}

/// A statement signed by an identity key, with its parsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<T> {
    envelope: SignedEnvelope,
    body: T,
}

impl<T> Signed<T> {
    /// The parsed body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode()
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.envelope.signature
    }
}

impl Signed<DeviceCertificate> {
    /// Parses a signed device certificate (not verified here).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let body = DeviceCertificate::decode(&envelope.body)?;
        Ok(Self { envelope, body })
    }
}

impl Signed<DeviceRevocation> {
    /// Parses a signed device revocation (not verified here).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let body = DeviceRevocation::decode(&envelope.body)?;
        Ok(Self { envelope, body })
    }
}

#[derive(Debug, Clone)]
struct DeviceEntry {
    /// Every accepted certificate of the device, with the position it was logged at.
    certificates: Vec<(Position, DeviceCertificate)>,
    revoked_at: Option<Position>,
}

/// A verifier's view of one identity: its key history and its devices, built in log order.
#[derive(Debug, Clone)]
pub struct IdentityState {
    keys: KeyHistory,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    last_position: Position,
}

impl IdentityState {
    /// Starts from a verified inception.
    pub fn new(keys: KeyHistory) -> Self {
        let last_position = keys.current().position;
        Self {
            keys,
            devices: BTreeMap::new(),
            last_position,
        }
    }

    /// The key history.
    pub fn keys(&self) -> &KeyHistory {
        &self.keys
    }

    /// Statements are applied in log order: each at a position after the last one applied.
    fn check_order(&self, position: Position) -> Result<(), IdentityError> {
        if position <= self.last_position {
            return Err(IdentityError::PositionNotIncreasing(position));
        }
        Ok(())
    }

    /// Checks that a statement signed by identity key `seq` is acceptable at `position`.
    fn identity_key_at(
        &self,
        identity: IdentityId,
        seq: u64,
        position: Position,
    ) -> Result<&KeyRecord, IdentityError> {
        if identity != self.keys.id {
            return Err(IdentityError::WrongIdentity);
        }
        let current = self
            .keys
            .at(position)
            .ok_or(IdentityError::PositionNotIncreasing(position))?;
        if current.seq != seq {
            return Err(IdentityError::StaleIdentityKey {
                signed_by: seq,
                current: current.seq,
            });
        }
        Ok(current)
    }

    /// Applies a rotation of the identity key, logged at `position`.
    pub fn rotate(
        &mut self,
        event: &SignedKeyEvent,
        position: Position,
    ) -> Result<(), IdentityError> {
        self.check_order(position)?;
        self.keys.rotate(event, position)?;
        self.last_position = position;
        Ok(())
    }

    /// Applies a device certificate logged at `position`. It must be signed by the identity key current at
    /// that position.
    pub fn certify(
        &mut self,
        cert: &Signed<DeviceCertificate>,
        position: Position,
    ) -> Result<DeviceId, IdentityError> {
        self.check_order(position)?;
        let key = self.identity_key_at(cert.body.identity, cert.body.identity_seq, position)?;
        cert.envelope
            .verify(&key.signing_key)
            .map_err(|BadSignature| IdentityError::BadSignature("device certificate"))?;
        let device = cert.body.device();
        let entry = self.devices.entry(device).or_insert(DeviceEntry {
            certificates: Vec::new(),
            revoked_at: None,
        });
        if entry.revoked_at.is_some() {
            return Err(IdentityError::RevokedDeviceRecertified);
        }
        entry.certificates.push((position, cert.body.clone()));
        self.last_position = position;
        Ok(device)
    }

    /// Applies a device revocation logged at `position`.
    pub fn revoke(
        &mut self,
        revocation: &Signed<DeviceRevocation>,
        position: Position,
    ) -> Result<(), IdentityError> {
        self.check_order(position)?;
        let body = &revocation.body;
        let key = self.identity_key_at(body.identity, body.identity_seq, position)?;
        revocation
            .envelope
            .verify(&key.signing_key)
            .map_err(|BadSignature| IdentityError::BadSignature("device revocation"))?;
        let entry = self
            .devices
            .get_mut(&body.device)
            .ok_or(IdentityError::UnknownDevice)?;
        entry.revoked_at.get_or_insert(position);
        self.last_position = position;
        Ok(())
    }

    /// Every device ever certified, valid or not.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.devices.keys()
    }

    /// The signing key of a device that was ever certified (a device id fixes its key), whatever its
    /// validity now.
    pub fn device_key(&self, device: &DeviceId) -> Option<VerifyingKey> {
        self.devices
            .get(device)
            .and_then(|e| e.certificates.first())
            .map(|(_, c)| c.signing_key)
    }

    /// The device's certificate in force at `position`: logged before it, signed by the identity key
    /// current at it, and not revoked before it.
    pub fn device_at(
        &self,
        device: &DeviceId,
        position: Position,
    ) -> Result<&DeviceCertificate, IdentityError> {
        let entry = self
            .devices
            .get(device)
            .ok_or(IdentityError::UnknownDevice)?;
        if let Some(revoked) = entry.revoked_at
            && revoked < position
        {
            return Err(IdentityError::DeviceRevoked(revoked));
        }
        let current = self.keys.at(position).ok_or(IdentityError::UnknownDevice)?;
        entry
            .certificates
            .iter()
            .rev()
            .find(|(at, cert)| *at < position && cert.identity_seq == current.seq)
            .map(|(_, cert)| cert)
            .ok_or(IdentityError::UnknownDevice)
    }

    /// Verifies a signature by `device` on a statement logged at `position`.
    pub fn verify_device_signature(
        &self,
        device: &DeviceId,
        position: Position,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), IdentityError> {
        let cert = self.device_at(device, position)?;
        cert.signing_key
            .verify(message, signature)
            .map_err(|BadSignature| IdentityError::BadSignature("device statement"))
    }
}

/// The offline recovery secret: the secret of the next identity key, written down as 24 words.
pub struct RecoverySecret(Zeroizing<[u8; 32]>);

/// A recovery phrase could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the recovery phrase is not valid: {0}")]
pub struct RecoveryPhraseError(String);

impl RecoverySecret {
    /// Draws a fresh secret.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(secret.as_mut());
        Self(secret)
    }

    /// The 24-word BIP-39 (English) phrase to write down.
    pub fn to_phrase(&self) -> Zeroizing<String> {
        let mnemonic = bip39::Mnemonic::from_entropy(self.0.as_ref())
            .expect("32 bytes is a valid BIP-39 entropy length");
        Zeroizing::new(mnemonic.to_string())
    }

    /// Reads a phrase back. A wrong word or a wrong checksum is an error.
    pub fn from_phrase(phrase: &str) -> Result<Self, RecoveryPhraseError> {
        let words = phrase.split_whitespace().count();
        if words != 24 {
            return Err(RecoveryPhraseError(format!(
                "a recovery phrase has 24 words; this has {words}"
            )));
        }
        let normalized = phrase.split_whitespace().collect::<Vec<_>>().join(" ");
        let mnemonic = bip39::Mnemonic::parse_in_normalized(
            bip39::Language::English,
            &normalized.to_lowercase(),
        )
        .map_err(|e| {
            // Which word, counted from 1 as people count; never the word itself (it is secret).
            RecoveryPhraseError(match e {
                bip39::Error::UnknownWord(i) => {
                    format!("word {} of 24 is not in the recovery word list", i + 1)
                }
                bip39::Error::InvalidChecksum => "every word is in the list, but the phrase does \
                    not check out: a word is mistyped into another list word, or two are swapped"
                    .to_string(),
                other => other.to_string(),
            })
        })?;
        let entropy = Zeroizing::new(mnemonic.to_entropy());
        let secret: [u8; 32] = entropy
            .as_slice()
            .try_into()
            .map_err(|_| RecoveryPhraseError("a recovery phrase has 24 words".into()))?;
        Ok(Self(Zeroizing::new(secret)))
    }

    fn expand(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use ring::hkdf;
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cmr-vault/v1 recovery");
        let prk = salt.extract(self.0.as_ref());
        let info = [label];
        let okm = prk
            .expand(&info, hkdf::HKDF_SHA256)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        let mut out = Zeroizing::new([0u8; 32]);
        okm.fill(out.as_mut())
            .expect("the buffer matches the requested length");
        out
    }

    /// The next identity key, which this secret commits to.
    pub fn identity_key(&self) -> SigningKey {
        SigningKey::from_seed(&self.expand(b"identity-signing"))
    }

    /// The X25519 key the vault key is wrapped to.
    pub fn kem_key(&self) -> KemSecretKey {
        KemSecretKey::from_bytes(*self.expand(b"recovery-kem"))
    }
}

impl fmt::Debug for RecoverySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoverySecret([redacted])")
    }
}

/// What creating an identity produces. The caller logs `inception`, seals `identity_key` into a key file
/// and shows `recovery` to the person once.
#[derive(Debug)]
pub struct NewIdentity {
    /// The signed inception, to be registered.
    pub inception: SignedKeyEvent,
    /// The current identity key (sequence 0).
    pub identity_key: SigningKey,
    /// The secret of the next identity key.
    pub recovery: RecoverySecret,
}

/// Creates an identity of `role`.
pub fn create_identity<R: CryptoRng + ?Sized>(rng: &mut R, role: Role) -> NewIdentity {
    let identity_key = SigningKey::generate(rng);
    let recovery = RecoverySecret::generate(rng);
    let event = KeyEvent {
        role,
        seq: 0,
        prior: None,
        signing_key: identity_key.verifying_key(),
        next_key_digest: next_key_digest(&recovery.identity_key().verifying_key()),
        recovery_kem: recovery.kem_key().public_key(),
    };
    NewIdentity {
        inception: SignedKeyEvent::sign(event, &identity_key),
        identity_key,
        recovery,
    }
}

/// Rotates an identity with its recovery secret: the committed key becomes current, and a new recovery
/// secret is drawn. `current` is the latest event of the identity's history.
pub fn rotate_identity<R: CryptoRng + ?Sized>(
    rng: &mut R,
    history: &KeyHistory,
    recovery: &RecoverySecret,
) -> NewIdentity {
    let current = history.current();
    let identity_key = recovery.identity_key();
    let next = RecoverySecret::generate(rng);
    let event = KeyEvent {
        role: history.role(),
        seq: current.seq + 1,
        prior: Some((history.id(), current.digest)),
        signing_key: identity_key.verifying_key(),
        next_key_digest: next_key_digest(&next.identity_key().verifying_key()),
        recovery_kem: next.kem_key().public_key(),
    };
    NewIdentity {
        inception: SignedKeyEvent::sign(event, &identity_key),
        identity_key,
        recovery: next,
    }
}

/// A device's own secrets.
#[derive(Debug)]
pub struct DeviceKeys {
    /// Signs statements and requests.
    pub signing: SigningKey,
    /// Receives wrapped keys.
    pub kem: KemSecretKey,
}

impl DeviceKeys {
    /// Draws fresh device keys.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self {
            signing: SigningKey::generate(rng),
            kem: KemSecretKey::generate(rng),
        }
    }

    /// The device's id.
    pub fn id(&self) -> DeviceId {
        DeviceId::of(&self.signing.verifying_key())
    }

    /// A certificate for these keys, signed by identity key `identity_seq`.
    pub fn certify(
        &self,
        identity: IdentityId,
        identity_seq: u64,
        identity_key: &SigningKey,
        issued_at: u64,
    ) -> Signed<DeviceCertificate> {
        DeviceCertificate {
            identity,
            identity_seq,
            signing_key: self.signing.verifying_key(),
            kem_key: self.kem.public_key(),
            issued_at,
        }
        .sign(identity_key)
    }
}

/// A new device's request to join an identity: its two public keys, signed by the device's own signing
/// key (proof that it holds it). A device that holds the identity key turns it into a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    /// The identity the device joins.
    pub identity: IdentityId,
    /// The device's Ed25519 key.
    pub signing_key: VerifyingKey,
    /// The device's X25519 key.
    pub kem_key: KemPublicKey,
}

impl DeviceRequest {
    /// The signed request of `device` to join `identity`.
    pub fn sign(identity: IdentityId, device: &DeviceKeys) -> Vec<u8> {
        let body = DeviceRequest {
            identity,
            signing_key: device.signing.verifying_key(),
            kem_key: device.kem.public_key(),
        };
        let mut w = Writer::new(Kind::DeviceRequest);
        w.array(&body.identity.0)
            .array(&body.signing_key.to_bytes())
            .array(&body.kem_key.to_bytes());
        SignedEnvelope::sign(w.finish(), &device.signing).encode()
    }

    /// Parses a signed request and checks the device's own signature.
    pub fn open(bytes: &[u8]) -> Result<Self, IdentityError> {
        let env = SignedEnvelope::decode(bytes)?;
        let mut r = Reader::new(&env.body, Kind::DeviceRequest)?;
        let identity = IdentityId(r.array()?);
        let signing_key = VerifyingKey::from_bytes(&r.array()?).map_err(|_| {
            IdentityError::Decode(DecodeError::Invalid {
                field: "signing_key",
                reason: "invalid or weak Ed25519 key",
            })
        })?;
        let kem_key = KemPublicKey::from_bytes(&r.array()?).map_err(|_| {
            IdentityError::Decode(DecodeError::Invalid {
                field: "kem_key",
                reason: "low-order X25519 key",
            })
        })?;
        r.finish()?;
        env.verify(&signing_key)
            .map_err(|_| IdentityError::BadSignature("device request"))?;
        Ok(Self {
            identity,
            signing_key,
            kem_key,
        })
    }

    /// The device's id.
    pub fn device(&self) -> DeviceId {
        DeviceId::of(&self.signing_key)
    }

    /// The certificate for it, by identity key `identity_seq`.
    pub fn certify(
        &self,
        identity_seq: u64,
        identity_key: &SigningKey,
        issued_at: u64,
    ) -> Signed<DeviceCertificate> {
        DeviceCertificate {
            identity: self.identity,
            identity_seq,
            signing_key: self.signing_key,
            kem_key: self.kem_key,
            issued_at,
        }
        .sign(identity_key)
    }
}

/// A revocation of `device`, signed by identity key `identity_seq`.
pub fn revoke_device(
    identity: IdentityId,
    identity_seq: u64,
    identity_key: &SigningKey,
    device: DeviceId,
    issued_at: u64,
) -> Signed<DeviceRevocation> {
    let body = DeviceRevocation {
        identity,
        identity_seq,
        device,
        issued_at,
    };
    Signed {
        envelope: SignedEnvelope::sign(body.encode(), identity_key),
        body,
    }
}
