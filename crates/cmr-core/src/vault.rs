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

/// A 32-byte secret of the customer's own client (the pseudonym key) sealed under the vault key, for the
/// client's local state. The same construction as [`crate::epoch::SealedEpochSecret`]: a key expanded
/// from the vault key with HKDF-SHA256 under its own label, ChaCha20-Poly1305 with a random nonce, and
/// the customer and the secret's purpose as associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedClientSecret {
    nonce: [u8; 12],
    ciphertext: [u8; 48],
}

impl SealedClientSecret {
    /// The encoded length.
    pub const LEN: usize = 60;

    fn cipher(vault: &VaultKey) -> ring::aead::LessSafeKey {
        let key = crate::epoch::expand(vault.expose_secret(), &[b"cmr-client-secrets"]);
        ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key.as_ref())
                .expect("32 bytes is the ChaCha20-Poly1305 key length"),
        )
    }

    fn aad(customer: IdentityId, purpose: &str) -> Vec<u8> {
        let mut aad = customer.0.to_vec();
        aad.extend_from_slice(purpose.as_bytes());
        aad
    }

    /// Seals `secret` for `purpose` (a fixed label such as `"pseudonym-key"`).
    pub fn seal<R: CryptoRng + ?Sized>(
        rng: &mut R,
        vault: &VaultKey,
        customer: IdentityId,
        purpose: &str,
        secret: &[u8; 32],
    ) -> Self {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let mut buf = [0u8; 48];
        buf[..32].copy_from_slice(secret);
        let tag = Self::cipher(vault)
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(Self::aad(customer, purpose)),
                &mut buf[..32],
            )
            .expect("sealing 32 bytes cannot fail");
        buf[32..].copy_from_slice(tag.as_ref());
        Self {
            nonce,
            ciphertext: buf,
        }
    }

    /// Opens it; fails for another vault key, customer or purpose, or if it was altered.
    pub fn open(
        &self,
        vault: &VaultKey,
        customer: IdentityId,
        purpose: &str,
    ) -> Result<Zeroizing<[u8; 32]>, UnwrapError> {
        let mut buf = Zeroizing::new(self.ciphertext);
        let pt = Self::cipher(vault)
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(self.nonce),
                ring::aead::Aad::from(Self::aad(customer, purpose)),
                buf.as_mut(),
            )
            .map_err(|_| UnwrapError)?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(pt);
        Ok(out)
    }

    /// The encoded form: nonce, then ciphertext and tag.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..12].copy_from_slice(&self.nonce);
        out[12..].copy_from_slice(&self.ciphertext);
        out
    }

    /// Parses the encoded form.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Self {
            nonce: b[..12].try_into().ok()?,
            ciphertext: b[12..].try_into().ok()?,
        })
    }
}

/// Seals `plaintext` of any length under the vault key for `customer` and `purpose` (the client's state
/// in its key backup): ChaCha20-Poly1305 under a key expanded from the vault key with HKDF-SHA256 and its own
/// label, a random nonce, the customer and the purpose as associated data. Output: nonce || ciphertext+tag.
pub fn seal_local<R: CryptoRng + ?Sized>(
    rng: &mut R,
    vault: &VaultKey,
    customer: IdentityId,
    purpose: &str,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let mut buf = plaintext.to_vec();
    local_cipher(vault)
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(SealedClientSecret::aad(customer, purpose)),
            &mut buf,
        )
        .expect("sealing in memory cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out
}

/// Opens what [`seal_local`] sealed; fails for another key, customer or purpose, or altered bytes.
pub fn open_local(
    vault: &VaultKey,
    customer: IdentityId,
    purpose: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
    if sealed.len() < 12 + 16 {
        return Err(UnwrapError);
    }
    let nonce: [u8; 12] = sealed[..12].try_into().map_err(|_| UnwrapError)?;
    let mut buf = Zeroizing::new(sealed[12..].to_vec());
    let len = local_cipher(vault)
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(SealedClientSecret::aad(customer, purpose)),
            buf.as_mut_slice(),
        )
        .map_err(|_| UnwrapError)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

fn local_cipher(vault: &VaultKey) -> ring::aead::LessSafeKey {
    let key = crate::epoch::expand(vault.expose_secret(), &[b"cmr-client-state"]);
    ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key.as_ref())
            .expect("32 bytes is the ChaCha20-Poly1305 key length"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_secret_opens_only_with_its_key_customer_and_purpose() {
        let mut rng = rand::rng();
        let vault = VaultKey::generate(&mut rng);
        let other = VaultKey::generate(&mut rng);
        let (alex, bo) = (IdentityId([1; 32]), IdentityId([2; 32]));
        let sealed = SealedClientSecret::seal(&mut rng, &vault, alex, "pseudonym-key", &[7; 32]);
        let parsed = SealedClientSecret::from_slice(&sealed.to_bytes()).unwrap();
        assert_eq!(
            *parsed.open(&vault, alex, "pseudonym-key").unwrap(),
            [7; 32]
        );
        assert!(parsed.open(&other, alex, "pseudonym-key").is_err());
        assert!(parsed.open(&vault, bo, "pseudonym-key").is_err());
        assert!(parsed.open(&vault, alex, "another-purpose").is_err());
        let mut bytes = sealed.to_bytes();
        bytes[20] ^= 1;
        let altered = SealedClientSecret::from_slice(&bytes).unwrap();
        assert!(altered.open(&vault, alex, "pseudonym-key").is_err());
        assert!(SealedClientSecret::from_slice(&bytes[..59]).is_none());
    }

    #[test]
    fn a_local_state_opens_only_unaltered_with_its_key_customer_and_purpose() {
        let mut rng = rand::rng();
        let vault = VaultKey::generate(&mut rng);
        let alex = IdentityId([1; 32]);
        let sealed = seal_local(&mut rng, &vault, alex, "client-state", b"grants and epochs");
        assert_eq!(
            open_local(&vault, alex, "client-state", &sealed)
                .unwrap()
                .as_slice(),
            b"grants and epochs"
        );
        assert!(open_local(&VaultKey::generate(&mut rng), alex, "client-state", &sealed).is_err());
        assert!(open_local(&vault, IdentityId([2; 32]), "client-state", &sealed).is_err());
        assert!(open_local(&vault, alex, "other", &sealed).is_err());
        let mut altered = sealed.clone();
        altered[20] ^= 1;
        assert!(open_local(&vault, alex, "client-state", &altered).is_err());
        assert!(open_local(&vault, alex, "client-state", &sealed[..20]).is_err());
    }
}
