//! Passphrase-sealed key files (design note 0001, §5).
//!
//! Owns the key-file format: Argon2id (RFC 9106) with its parameters stored in the file, XChaCha20-Poly1305
//! over the secrets with the header as associated data, and a SHA-256 checksum so a corrupted file and a
//! wrong passphrase get different errors. It does not read or write files: callers pass bytes.
//!
//! Layout (all integers big-endian):
//! `"CMRV" 01 07 | kdf=01 | m_kib u32 | t u32 | p u32 | salt[16] | nonce[24] | len u32 | ciphertext | sha256[32]`

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Kind, MAGIC, Reader, Writer};
use crate::hash::sha256;
use crate::identity::{DeviceKeys, IdentityId, Role};
use crate::keys::{KemSecretKey, SigningKey};

/// Argon2id cost parameters, stored in each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// What new key files use: 64 MiB, 3 passes, 1 lane (RFC 9106 §4, second recommended option, one lane).
    pub const DEFAULT: Self = Self {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// The weakest parameters a reader accepts: 19 MiB, 2 passes (OWASP's floor for Argon2id).
    pub const MINIMUM: Self = Self {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// The largest memory a reader will spend on a file: 1 GiB.
    pub const MAX_M_KIB: u32 = 1024 * 1024;
    /// The most passes a reader will run.
    pub const MAX_T: u32 = 16;
    /// The most lanes a reader accepts.
    pub const MAX_P: u32 = 16;

    fn check(&self) -> Result<(), KeyFileError> {
        let weak = self.m_kib < Self::MINIMUM.m_kib || self.t < Self::MINIMUM.t || self.p == 0;
        let huge = self.m_kib > Self::MAX_M_KIB || self.t > Self::MAX_T || self.p > Self::MAX_P;
        if weak || huge {
            return Err(KeyFileError::UnsafeParameters(*self));
        }
        Ok(())
    }
}

/// Why a key file could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyFileError {
    /// The bytes are not a CMR Vault key file at all.
    #[error("not a CMR Vault key file")]
    NotAKeyFile,
    /// The key file has a version this build cannot read.
    #[error("unsupported key file version {0}")]
    UnsupportedVersion(u8),
    /// The file is damaged: truncated, edited or corrupted on disk.
    #[error("the key file is corrupted (checksum or structure does not match)")]
    Corrupted,
    /// The passphrase does not open the file.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// The file asks for Argon2 parameters outside the accepted range.
    #[error("the key file's Argon2 parameters are outside the accepted range: {0:?}")]
    UnsafeParameters(KdfParams),
    /// An empty passphrase was given when sealing.
    #[error("the passphrase must not be empty")]
    EmptyPassphrase,
}

/// The secrets a key file holds for one device of one identity.
#[derive(Debug)]
pub struct KeyFileContents {
    /// The identity's role.
    pub role: Role,
    /// The identity the device belongs to.
    pub identity: IdentityId,
    /// The device's own keys.
    pub device: DeviceKeys,
    /// The identity key and its sequence number, on the devices that hold it.
    pub identity_key: Option<(u64, SigningKey)>,
}

impl KeyFileContents {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::new(Kind::KeyFilePayload);
        w.u8(self.role as u8)
            .array(&self.identity.0)
            .array(&self.device.signing.seed())
            .array(&self.device.kem.to_bytes());
        match &self.identity_key {
            None => {
                w.u8(0);
            }
            Some((seq, key)) => {
                w.u8(1).u64(*seq).array(&key.seed());
            }
        }
        Zeroizing::new(w.finish())
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Kind::KeyFilePayload)?;
        let role = Role::from_u8(r.u8()?)?;
        let identity = IdentityId(r.array()?);
        let signing = SigningKey::from_seed(&Zeroizing::new(r.array()?));
        let kem = KemSecretKey::from_bytes(*Zeroizing::new(r.array::<32>()?));
        let identity_key = match r.u8()? {
            0 => None,
            1 => {
                let seq = r.u64()?;
                Some((seq, SigningKey::from_seed(&Zeroizing::new(r.array()?))))
            }
            _ => {
                return Err(DecodeError::Invalid {
                    field: "identity_key",
                    reason: "presence byte is neither 0 nor 1",
                });
            }
        };
        r.finish()?;
        Ok(Self {
            role,
            identity,
            device: DeviceKeys { signing, kem },
            identity_key,
        })
    }
}

const KDF_ARGON2ID: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const CHECKSUM_LEN: usize = 32;
/// Magic, version, kind, kdf id, three u32 costs, salt and nonce.
const HEADER_LEN: usize = 4 + 1 + 1 + 1 + 4 + 4 + 4 + SALT_LEN + NONCE_LEN;
/// The largest ciphertext a key file may hold.
const MAX_CIPHERTEXT: usize = 4096;

fn derive_key(
    passphrase: &str,
    salt: &[u8; SALT_LEN],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let argon_params = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|_| KeyFileError::UnsafeParameters(params))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
        .map_err(|_| KeyFileError::UnsafeParameters(params))?;
    Ok(key)
}

/// Seals `contents` under `passphrase`.
pub fn seal<R: CryptoRng + ?Sized>(
    rng: &mut R,
    contents: &KeyFileContents,
    passphrase: &str,
    params: KdfParams,
) -> Result<Vec<u8>, KeyFileError> {
    if passphrase.is_empty() {
        return Err(KeyFileError::EmptyPassphrase);
    }
    params.check()?;
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut salt);
    rng.fill_bytes(&mut nonce);
    let key = derive_key(passphrase, &salt, params)?;
    let plaintext = contents.encode();

    let mut w = Writer::new(Kind::KeyFile);
    w.u8(KDF_ARGON2ID)
        .u32(params.m_kib)
        .u32(params.t)
        .u32(params.p)
        .array(&salt)
        .array(&nonce);
    let mut out = w.finish();
    let ct_len = plaintext.len() + 16;
    out.extend_from_slice(&(ct_len as u32).to_be_bytes());
    let cipher = XChaCha20Poly1305::new_from_slice(key.as_ref())
        .expect("the derived key is 32 bytes, XChaCha20-Poly1305's key length");
    let ciphertext = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plaintext,
                aad: &out,
            },
        )
        .expect("encryption of a short in-memory buffer cannot fail");
    out.extend_from_slice(&ciphertext);
    let checksum = sha256(&out);
    out.extend_from_slice(&checksum.0);
    Ok(out)
}

/// Opens a key file with `passphrase`.
pub fn open(file: &[u8], passphrase: &str) -> Result<KeyFileContents, KeyFileError> {
    if file.len() < 6 || file[..4] != MAGIC {
        return Err(KeyFileError::NotAKeyFile);
    }
    match Reader::new(file, Kind::KeyFile) {
        Err(DecodeError::UnsupportedVersion(v)) => return Err(KeyFileError::UnsupportedVersion(v)),
        Err(DecodeError::WrongKind { .. }) => return Err(KeyFileError::NotAKeyFile),
        Err(_) => return Err(KeyFileError::Corrupted),
        Ok(_) => {}
    }
    let body_len = file
        .len()
        .checked_sub(CHECKSUM_LEN)
        .ok_or(KeyFileError::Corrupted)?;
    let (body, checksum) = file.split_at(body_len);
    if sha256(body).0 != checksum {
        return Err(KeyFileError::Corrupted);
    }

    let mut r = Reader::new(body, Kind::KeyFile).map_err(|_| KeyFileError::Corrupted)?;
    let parse = |r: &mut Reader<'_>| -> Result<_, DecodeError> {
        let kdf = r.u8()?;
        let params = KdfParams {
            m_kib: r.u32()?,
            t: r.u32()?,
            p: r.u32()?,
        };
        let salt: [u8; SALT_LEN] = r.array()?;
        let nonce: [u8; NONCE_LEN] = r.array()?;
        Ok((kdf, params, salt, nonce))
    };
    let (kdf, params, salt, nonce) = parse(&mut r).map_err(|_| KeyFileError::Corrupted)?;
    let ciphertext = r
        .bytes("ciphertext", MAX_CIPHERTEXT)
        .map_err(|_| KeyFileError::Corrupted)?;
    r.finish().map_err(|_| KeyFileError::Corrupted)?;
    if kdf != KDF_ARGON2ID {
        return Err(KeyFileError::Corrupted);
    }
    params.check()?;

    let key = derive_key(passphrase, &salt, params)?;
    let cipher = XChaCha20Poly1305::new_from_slice(key.as_ref())
        .expect("the derived key is 32 bytes, XChaCha20-Poly1305's key length");
    // The associated data is everything before the ciphertext, its length prefix included; the parse
    // above proved the body is at least that long.
    let aad = &body[..HEADER_LEN + 4];
    let plaintext = Zeroizing::new(
        cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| KeyFileError::WrongPassphrase)?,
    );
    KeyFileContents::decode(&plaintext).map_err(|_| KeyFileError::Corrupted)
}
