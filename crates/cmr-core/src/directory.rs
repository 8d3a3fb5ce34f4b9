//! The key directory and family rotation (design note 0002, "Key directory").
//!
//! Owns:
//! - [`Directory`]: the customer's signed, versioned list of devices and, per family, the current epoch and
//!   the companies allowed to append; each version names the digest of the one it replaces;
//! - [`DirectoryTracker`]: what a client remembers, so that it refuses a directory that is unsigned, signed
//!   by the wrong key, older than one it has seen, or a fork of one it has seen;
//! - [`rotate_family`]: a new epoch, the new directory, and one sealed key bundle per grantee that keeps
//!   access.

use rand_core::CryptoRng;
use thiserror::Error;

use crate::encoding::{DecodeError, Kind, Reader, Writer};
use crate::epoch::{BundleEntry, EpochSecret, KeyBundle};
use crate::family::{FamilyId, Period, Scope};
use crate::hash::{Digest, tagged_hash};
use crate::identity::{DeviceId, IdentityError, IdentityId, IdentityState, Position};
use crate::keys::{KemPublicKey, SignedEnvelope, SigningKey, VerifyingKey};
use crate::wrap::SealedBytes;

/// The most devices, families, or appenders per family, a directory may list.
pub const MAX_ENTRIES: usize = 4096;

/// A device as the directory lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryDevice {
    /// The device.
    pub device: DeviceId,
    /// Its Ed25519 key.
    pub signing_key: VerifyingKey,
    /// Its X25519 key.
    pub kem_key: KemPublicKey,
}

/// A family as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryFamily {
    /// The family.
    pub family: FamilyId,
    /// Its scope.
    pub scope: Scope,
    /// Its current epoch.
    pub epoch: u64,
    /// The companies that may append to this epoch, sorted.
    pub appenders: Vec<IdentityId>,
}

/// A customer's key directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    /// The vault.
    pub customer: IdentityId,
    /// 1 for the first directory, then one more for each update.
    pub version: u64,
    /// The digest of the directory this one replaces (all zero for version 1).
    pub prev: Digest,
    /// The device that signs this version.
    pub signer: DeviceId,
    /// When the client issued it, Unix seconds (informative).
    pub issued_at: u64,
    /// The customer's devices, sorted by id.
    pub devices: Vec<DirectoryDevice>,
    /// The families, sorted by id.
    pub families: Vec<DirectoryFamily>,
}

fn invalid(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

fn read_count(r: &mut Reader<'_>, field: &'static str) -> Result<usize, DecodeError> {
    let n = r.u32()? as usize;
    if n > MAX_ENTRIES {
        return Err(DecodeError::TooLong {
            field,
            len: n,
            max: MAX_ENTRIES,
        });
    }
    Ok(n)
}

impl Directory {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Kind::Directory, 128 + self.families.len() * 80);
        w.array(&self.customer.0)
            .u64(self.version)
            .array(&self.prev.0)
            .array(&self.signer.0)
            .u64(self.issued_at)
            .u32(self.devices.len() as u32);
        for d in &self.devices {
            w.array(&d.device.0)
                .array(&d.signing_key.to_bytes())
                .array(&d.kem_key.to_bytes());
        }
        w.u32(self.families.len() as u32);
        for f in &self.families {
            w.array(&f.family.0)
                .u8(f.scope as u8)
                .u64(f.epoch)
                .u32(f.appenders.len() as u32);
            for a in &f.appenders {
                w.array(&a.0);
            }
        }
        w.finish()
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, Kind::Directory)?;
        let customer = IdentityId(r.array()?);
        let version = r.u64()?;
        let prev = Digest(r.array()?);
        let signer = DeviceId(r.array()?);
        let issued_at = r.u64()?;
        if version == 0 || (version == 1) != (prev == Digest([0; 32])) {
            return Err(invalid(
                "version",
                "version 1 has no predecessor, later ones have one",
            ));
        }
        let n = read_count(&mut r, "devices")?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            let device = DeviceId(r.array()?);
            let signing_key = VerifyingKey::from_bytes(&r.array()?)
                .map_err(|_| invalid("signing_key", "invalid or weak Ed25519 key"))?;
            let kem_key = KemPublicKey::from_bytes(&r.array()?)
                .map_err(|_| invalid("kem_key", "low-order X25519 key"))?;
            if DeviceId::of(&signing_key) != device {
                return Err(invalid("device", "id does not match the signing key"));
            }
            devices.push(DirectoryDevice {
                device,
                signing_key,
                kem_key,
            });
        }
        let n = read_count(&mut r, "families")?;
        let mut families = Vec::with_capacity(n);
        for _ in 0..n {
            let family = FamilyId(r.array()?);
            let scope = Scope::from_u8(r.u8()?)?;
            let epoch = r.u64()?;
            let m = read_count(&mut r, "appenders")?;
            let mut appenders = Vec::with_capacity(m);
            for _ in 0..m {
                appenders.push(IdentityId(r.array()?));
            }
            if appenders.windows(2).any(|w| w[0] >= w[1]) {
                return Err(invalid("appenders", "must be sorted and unique"));
            }
            families.push(DirectoryFamily {
                family,
                scope,
                epoch,
                appenders,
            });
        }
        r.finish()?;
        if devices.windows(2).any(|w| w[0].device >= w[1].device)
            || families.windows(2).any(|w| w[0].family >= w[1].family)
        {
            return Err(invalid(
                "directory",
                "devices and families must be sorted and unique",
            ));
        }
        Ok(Self {
            customer,
            version,
            prev,
            signer,
            issued_at,
            devices,
            families,
        })
    }

    /// The family's entry, if listed.
    pub fn family(&self, id: &FamilyId) -> Option<&DirectoryFamily> {
        self.families
            .binary_search_by(|f| f.family.cmp(id))
            .ok()
            .map(|i| &self.families[i])
    }

    /// The next version of this directory (signed by `signer`), with `family` added or replaced.
    pub fn next_with_family(
        &self,
        prev: &SignedDirectory,
        signer: DeviceId,
        issued_at: u64,
        family: DirectoryFamily,
    ) -> Directory {
        let mut next = self.clone();
        next.version = self.version + 1;
        next.prev = prev.digest();
        next.signer = signer;
        next.issued_at = issued_at;
        match next
            .families
            .binary_search_by(|f| f.family.cmp(&family.family))
        {
            Ok(i) => next.families[i] = family,
            Err(i) => next.families.insert(i, family),
        }
        next
    }

    /// Signs this directory with the device key of `self.signer`.
    pub fn sign(self, device_key: &SigningKey) -> SignedDirectory {
        SignedDirectory {
            envelope: SignedEnvelope::sign(self.encode(), device_key),
            directory: self,
        }
    }
}

/// A directory with the signature of one of the customer's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDirectory {
    envelope: SignedEnvelope,
    directory: Directory,
}

impl SignedDirectory {
    /// Parses the wire form (not verified).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope = SignedEnvelope::decode(bytes)?;
        let directory = Directory::decode(&envelope.body)?;
        Ok(Self {
            envelope,
            directory,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode()
    }

    /// The directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// `H("directory", body)`: what the next version names as `prev`.
    pub fn digest(&self) -> Digest {
        tagged_hash("directory", &self.envelope.body)
    }

    /// Verifies that a device of the customer, valid at `position`, signed it.
    pub fn verify(
        &self,
        customer: &IdentityState,
        position: Position,
    ) -> Result<(), DirectoryError> {
        if customer.keys().id() != self.directory.customer {
            return Err(DirectoryError::WrongCustomer);
        }
        customer
            .verify_device_signature(
                &self.directory.signer,
                position,
                &self.envelope.body,
                &self.envelope.signature,
            )
            .map_err(DirectoryError::Signature)
    }
}

/// Why a directory was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryError {
    /// Not signed by a device of the customer valid at that position.
    #[error("directory signature refused: {0}")]
    Signature(IdentityError),
    /// The directory is for another customer.
    #[error("directory is for another customer")]
    WrongCustomer,
    /// Older than a version already seen.
    #[error("rollback: version {got} is older than version {seen} already seen")]
    Rollback {
        /// The newest version seen.
        seen: u64,
        /// The version offered.
        got: u64,
    },
    /// Same version as one seen, different content.
    #[error("fork: another directory with version {0} was already seen")]
    Fork(u64),
    /// Does not chain to what was seen (wrong `prev`, or a gap in versions).
    #[error("directory version {0} does not chain to the last one seen")]
    Broken(u64),
    /// Nothing was offered.
    #[error("no directory offered")]
    Empty,
}

/// What a client remembers of a customer's directory, to refuse rollbacks and forks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryTracker {
    customer: IdentityId,
    latest: Option<(u64, Digest)>,
}

impl DirectoryTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(customer: IdentityId) -> Self {
        Self {
            customer,
            latest: None,
        }
    }

    /// A tracker restored from the version and digest it last accepted.
    pub fn restore(customer: IdentityId, version: u64, digest: Digest) -> Self {
        Self {
            customer,
            latest: Some((version, digest)),
        }
    }

    /// The version and digest last accepted.
    pub fn latest(&self) -> Option<(u64, Digest)> {
        self.latest
    }

    /// Accepts `chain`: consecutive directories from the one after the last seen (or the same one) to the
    /// newest. `verify` checks each signature (a customer device valid at that directory's log position).
    pub fn accept(
        &mut self,
        chain: &[SignedDirectory],
        verify: impl Fn(&SignedDirectory) -> Result<(), DirectoryError>,
    ) -> Result<(), DirectoryError> {
        if chain.is_empty() {
            return Err(DirectoryError::Empty);
        }
        let mut latest = self.latest;
        for (i, d) in chain.iter().enumerate() {
            let dir = d.directory();
            if dir.customer != self.customer {
                return Err(DirectoryError::WrongCustomer);
            }
            verify(d)?;
            let digest = d.digest();
            match latest {
                None => {}
                Some((seen, seen_digest)) => {
                    if dir.version < seen {
                        return Err(DirectoryError::Rollback {
                            seen,
                            got: dir.version,
                        });
                    }
                    if dir.version == seen {
                        if digest != seen_digest {
                            return Err(DirectoryError::Fork(seen));
                        }
                        if i > 0 {
                            return Err(DirectoryError::Broken(dir.version));
                        }
                        continue;
                    }
                    if dir.version != seen + 1 || dir.prev != seen_digest {
                        return Err(DirectoryError::Broken(dir.version));
                    }
                }
            }
            latest = Some((dir.version, digest));
        }
        self.latest = latest;
        Ok(())
    }
}

/// A grantee that keeps access to a family through a rotation.
#[derive(Debug, Clone)]
pub struct Keeper {
    /// The grantee.
    pub grantee: IdentityId,
    /// Its KEM key, from its own signed key material (checked by the caller).
    pub kem_key: KemPublicKey,
    /// The grant it holds, which the new keys are bound to.
    pub grant: [u8; 32],
    /// The look-back start of its read access, if it reads.
    pub read_from: Option<Period>,
    /// The first period it appends to, if it appends.
    pub append_from: Option<Period>,
}

/// What a rotation produces.
#[derive(Debug)]
pub struct Rotation {
    /// The new epoch's fresh secret (the customer seals it under the vault key).
    pub secret: EpochSecret,
    /// The new directory, signed.
    pub directory: SignedDirectory,
    /// One sealed bundle per keeper: (grantee, grant, bundle).
    pub bundles: Vec<(IdentityId, [u8; 32], SealedBytes)>,
}

/// Why a rotation could not be produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RotationError {
    /// The family is not in the directory.
    #[error("family is not in the directory")]
    UnknownFamily,
}

/// Rotates `family` to `epoch`: a fresh epoch secret (never derived from the old one), the next
/// directory with the new epoch and the keepers that append, and for each keeper one HPKE seal holding
/// exactly the keys its access needs at its starting periods.
///
/// `epoch` is the one after the family's epoch in the log. The current directory may already name it,
/// when an earlier rotation published its directory but its completion was never logged: that epoch was
/// never delivered to anyone nor written to (the log refuses writes while the rotation is owed), so it
/// is replaced here with a fresh secret.
pub fn rotate_family<R: CryptoRng + ?Sized>(
    rng: &mut R,
    current: &SignedDirectory,
    family: FamilyId,
    epoch: u64,
    keepers: &[Keeper],
    signer: (DeviceId, &SigningKey),
    issued_at: u64,
) -> Result<Rotation, RotationError> {
    let dir = current.directory();
    let old = dir.family(&family).ok_or(RotationError::UnknownFamily)?;
    let secret = EpochSecret::generate(rng);
    let mut appenders: Vec<IdentityId> = keepers
        .iter()
        .filter(|k| k.append_from.is_some())
        .map(|k| k.grantee)
        .collect();
    appenders.sort();
    appenders.dedup();
    let entry = DirectoryFamily {
        family,
        scope: old.scope,
        epoch,
        appenders: appenders.clone(),
    };
    let directory = dir
        .next_with_family(current, signer.0, issued_at, entry)
        .sign(signer.1);
    let bundles = keepers
        .iter()
        .map(|k| {
            let mut entries = Vec::new();
            let entry = |key| BundleEntry { family, epoch, key };
            // A reader gets the read chain and every appender's chain from its look-back start: its
            // own too, when it appends under another grant (its own appending grant gets it below).
            if let Some(from) = k.read_from {
                entries.push(entry(secret.read_key(from)));
                for a in appenders
                    .iter()
                    .filter(|a| **a != k.grantee || k.append_from.is_none())
                {
                    entries.push(entry(secret.append_key(a, from)));
                }
            }
            // An appender gets its own append chain from the earliest period it may touch.
            if let Some(from) = k.append_from {
                let from = k.read_from.map_or(from, |r| r.min(from));
                entries.push(entry(secret.append_key(&k.grantee, from)));
            }
            let bundle = KeyBundle { entries };
            let sealed = bundle.seal(rng, dir.customer, k.grantee, &k.kem_key, k.grant);
            (k.grantee, k.grant, sealed)
        })
        .collect();
    Ok(Rotation {
        secret,
        directory,
        bundles,
    })
}
