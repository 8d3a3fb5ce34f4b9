//! The customer's vault key: random, wrapped to each device and to the recovery key, never to the operator.
//!
//! Owns the vault key type and the wrap contexts that bind a wrapped vault key to its customer and its
//! recipient. What the vault key protects (family secrets, the pseudonym key) is defined by the records
//! layer.

use std::fmt;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::hash::tagged_hash;
use crate::identity::{DeviceCertificate, DeviceKeys, IdentityId, KeyRecord, RecoverySecret};
use crate::keys::KemPublicKey;
use crate::wrap::{UnwrapError, WrapContext, WrapPurpose, WrappedKey, open_key, seal_key};

/// Who a vault key is wrapped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultKeyRecipient {
    /// A certified device, by its id.
    Device(crate::identity::DeviceId),
    /// The recovery key committed in the customer's key event `identity_seq`.
    Recovery {
        /// The key event whose recovery KEM key receives the wrap.
        identity_seq: u64,
    },
}

impl VaultKeyRecipient {
    fn binding(&self) -> [u8; 32] {
        match self {
            VaultKeyRecipient::Device(id) => id.0,
            VaultKeyRecipient::Recovery { identity_seq } => {
                tagged_hash("recovery-recipient", &identity_seq.to_be_bytes()).0
            }
        }
    }
}

/// A customer's 32-byte vault key. Zeroized on drop; never printed.
pub struct VaultKey(Zeroizing<[u8; 32]>);

impl VaultKey {
    /// Draws a fresh vault key.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        Self(key)
    }

    /// The key bytes, for the records layer.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    fn context(customer: IdentityId, recipient: VaultKeyRecipient) -> WrapContext {
        WrapContext {
            purpose: WrapPurpose::VaultKey,
            customer: customer.0,
            recipient: recipient.binding(),
            family: None,
            epoch: None,
            period: None,
            subject: None,
        }
    }

    fn wrap<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        customer: IdentityId,
        recipient: VaultKeyRecipient,
        key: &KemPublicKey,
    ) -> WrappedKey {
        seal_key(rng, key, &Self::context(customer, recipient), &self.0)
    }

    /// Wraps the key to a certified device of `customer`.
    pub fn wrap_to_device<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        cert: &DeviceCertificate,
    ) -> WrappedKey {
        let recipient = VaultKeyRecipient::Device(cert.device());
        self.wrap(rng, cert.identity, recipient, &cert.kem_key)
    }

    /// Wraps the key to the recovery key committed in `event` of `customer`'s history.
    pub fn wrap_to_recovery<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        customer: IdentityId,
        event: &KeyRecord,
    ) -> WrappedKey {
        let recipient = VaultKeyRecipient::Recovery {
            identity_seq: event.seq,
        };
        self.wrap(rng, customer, recipient, &event.recovery_kem)
    }

    /// Opens a wrap made for `device`.
    pub fn unwrap_as_device(
        customer: IdentityId,
        device: &DeviceKeys,
        wrapped: &WrappedKey,
    ) -> Result<Self, UnwrapError> {
        let ctx = Self::context(customer, VaultKeyRecipient::Device(device.id()));
        open_key(&device.kem, &ctx, wrapped).map(Self)
    }

    /// Opens a wrap made to the recovery key of key event `identity_seq`.
    pub fn unwrap_with_recovery(
        customer: IdentityId,
        identity_seq: u64,
        recovery: &RecoverySecret,
        wrapped: &WrappedKey,
    ) -> Result<Self, UnwrapError> {
        let ctx = Self::context(customer, VaultKeyRecipient::Recovery { identity_seq });
        open_key(&recovery.kem_key(), &ctx, wrapped).map(Self)
    }
}

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKey([redacted])")
    }
}
