//! C2SP signed notes (c2sp.org/signed-note) with Ed25519 signatures (type 0x01) and Ed25519 timestamped
//! cosignatures (type 0x04, c2sp.org/tlog-cosignature).
//!
//! Owns the note format, key ids, the `name+keyhash+base64` verifier keys and `PRIVATE+KEY+…` signer keys,
//! signing, and verification with the spec's rules: signatures from unknown keys are ignored, a known
//! key's bad signature rejects the note, and a note with no verified known signature is refused.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_core::hash::sha256;
use cmr_core::keys::{Signature, SigningKey, VerifyingKey};
use thiserror::Error;
use zeroize::Zeroizing;

/// The most signature lines a note may carry.
pub const MAX_SIGNATURES: usize = 64;
/// The largest note accepted, in bytes.
pub const MAX_NOTE: usize = 64 * 1024;
/// The Ed25519 signature type.
pub const TYPE_ED25519: u8 = 0x01;
/// The timestamped Ed25519 cosignature type.
pub const TYPE_COSIGNATURE: u8 = 0x04;

/// A note, a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NoteError {
    /// The note is not in the signed-note format.
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    /// A key string is malformed.
    #[error("malformed key: {0}")]
    BadKey(&'static str),
    /// A known key's signature did not verify.
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    /// No known key signed the note.
    #[error("no signature by a known key")]
    NoKnownSignature,
}

/// `SHA-256(name || "\n" || type || public key)[:4]`, big-endian.
pub fn key_id(name: &str, sig_type: u8, public: &[u8; 32]) -> u32 {
    let mut data = Vec::with_capacity(name.len() + 34);
    data.extend_from_slice(name.as_bytes());
    data.push(b'\n');
    data.push(sig_type);
    data.extend_from_slice(public);
    let h = sha256(&data).0;
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains('+') {
        return Err(NoteError::BadKey(
            "a key name is non-empty, without spaces or '+'",
        ));
    }
    Ok(())
}

/// A key that signs notes.
pub struct NoteSigner {
    name: String,
    sig_type: u8,
    key: SigningKey,
    id: u32,
}

impl NoteSigner {
    /// A signer named `name` of type `sig_type` ([`TYPE_ED25519`] or [`TYPE_COSIGNATURE`]).
    pub fn new(name: &str, sig_type: u8, key: SigningKey) -> Result<Self, NoteError> {
        check_name(name)?;
        if sig_type != TYPE_ED25519 && sig_type != TYPE_COSIGNATURE {
            return Err(NoteError::BadKey("unsupported signature type"));
        }
        let id = key_id(name, sig_type, &key.verifying_key().to_bytes());
        Ok(Self {
            name: name.to_string(),
            sig_type,
            key,
            id,
        })
    }

    /// Parses `PRIVATE+KEY+name+hexid+base64(type || seed)`.
    pub fn from_skey(skey: &str) -> Result<Self, NoteError> {
        let rest = skey
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::BadKey("a signer key starts with PRIVATE+KEY+"))?;
        let (name, id, material) = split_key(rest)?;
        let (sig_type, seed) = material
            .split_first()
            .ok_or(NoteError::BadKey("empty key material"))?;
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            seed.try_into()
                .map_err(|_| NoteError::BadKey("an Ed25519 seed is 32 bytes"))?,
        );
        let signer = Self::new(name, *sig_type, SigningKey::from_seed(&seed))?;
        if signer.id != id {
            return Err(NoteError::BadKey("key id does not match the key"));
        }
        Ok(signer)
    }

    /// The `PRIVATE+KEY+…` form.
    pub fn to_skey(&self) -> Zeroizing<String> {
        let mut material = Zeroizing::new(vec![self.sig_type]);
        material.extend_from_slice(self.key.seed().as_ref());
        Zeroizing::new(format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(&*material)
        ))
    }

    /// The matching verifier.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            sig_type: self.sig_type,
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A signature line over `text` (a note text ending in newline). For a cosigner, `timestamp` is the
    /// cosignature time; an Ed25519 signer ignores it.
    pub fn signature_line(&self, text: &str, timestamp: u64) -> String {
        let mut sig = self.id.to_be_bytes().to_vec();
        if self.sig_type == TYPE_COSIGNATURE {
            let msg = cosigned_message(text, timestamp);
            sig.extend_from_slice(&timestamp.to_be_bytes());
            sig.extend_from_slice(&self.key.sign(msg.as_bytes()).0);
        } else {
            sig.extend_from_slice(&self.key.sign(text.as_bytes()).0);
        }
        format!("\u{2014} {} {}\n", self.name, B64.encode(sig))
    }
}

impl fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoteSigner({}+{:08x}, [redacted])", self.name, self.id)
    }
}

fn cosigned_message(text: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{text}")
}

fn split_key(s: &str) -> Result<(&str, u32, Vec<u8>), NoteError> {
    let mut parts = s.splitn(3, '+');
    let name = parts.next().ok_or(NoteError::BadKey("missing name"))?;
    let id_hex = parts.next().ok_or(NoteError::BadKey("missing key id"))?;
    let material = parts
        .next()
        .ok_or(NoteError::BadKey("missing key material"))?;
    check_name(name)?;
    if id_hex.len() != 8 {
        return Err(NoteError::BadKey("a key id is 8 hex digits"));
    }
    let id = u32::from_str_radix(id_hex, 16).map_err(|_| NoteError::BadKey("key id is not hex"))?;
    let material = B64
        .decode(material)
        .map_err(|_| NoteError::BadKey("key material is not base64"))?;
    Ok((name, id, material))
}

/// A key that verifies notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    sig_type: u8,
    key: VerifyingKey,
    id: u32,
}

impl NoteVerifier {
    /// Parses `name+hexid+base64(type || public key)`.
    pub fn from_vkey(vkey: &str) -> Result<Self, NoteError> {
        let (name, id, material) = split_key(vkey)?;
        let (sig_type, public) = material
            .split_first()
            .ok_or(NoteError::BadKey("empty key material"))?;
        if *sig_type != TYPE_ED25519 && *sig_type != TYPE_COSIGNATURE {
            return Err(NoteError::BadKey("unsupported signature type"));
        }
        let key = VerifyingKey::from_slice(public)
            .map_err(|_| NoteError::BadKey("not a valid Ed25519 public key"))?;
        if key_id(name, *sig_type, &key.to_bytes()) != id {
            return Err(NoteError::BadKey("key id does not match the key"));
        }
        Ok(Self {
            name: name.to_string(),
            sig_type: *sig_type,
            key,
            id,
        })
    }

    /// The `name+hexid+base64` form.
    pub fn to_vkey(&self) -> String {
        let mut material = vec![self.sig_type];
        material.extend_from_slice(&self.key.to_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(material))
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id (the hash prefix that names it in signature lines).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this key is a cosigner (type 0x04).
    pub fn is_cosigner(&self) -> bool {
        self.sig_type == TYPE_COSIGNATURE
    }

    /// Checks one signature (the bytes after the key id) over `text`; returns the cosignature timestamp
    /// for a cosigner.
    fn check(&self, text: &str, sig: &[u8]) -> Result<Option<u64>, NoteError> {
        let bad = || NoteError::BadSignature(self.name.clone());
        if self.sig_type == TYPE_COSIGNATURE {
            if sig.len() != 8 + 64 {
                return Err(bad());
            }
            let timestamp = u64::from_be_bytes(sig[..8].try_into().map_err(|_| bad())?);
            if timestamp > i64::MAX as u64 {
                return Err(bad());
            }
            let s = Signature::from_slice(&sig[8..]).ok_or_else(bad)?;
            self.key
                .verify(cosigned_message(text, timestamp).as_bytes(), &s)
                .map_err(|_| bad())?;
            Ok(Some(timestamp))
        } else {
            let s = Signature::from_slice(sig).ok_or_else(bad)?;
            self.key.verify(text.as_bytes(), &s).map_err(|_| bad())?;
            Ok(None)
        }
    }
}

/// One signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    /// Key name.
    pub name: String,
    /// Key id.
    pub id: u32,
    /// The signature bytes after the key id.
    pub signature: Vec<u8>,
}

/// A parsed (not yet verified) note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The text, ending in newline.
    pub text: String,
    /// The signature lines.
    pub signatures: Vec<NoteSignature>,
}

/// A signature by a known key that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The key name.
    pub name: String,
    /// The cosignature time, for a cosigner.
    pub timestamp: Option<u64>,
}

impl Note {
    /// Parses a signed note.
    pub fn parse(note: &str) -> Result<Self, NoteError> {
        if note.len() > MAX_NOTE {
            return Err(NoteError::Malformed("note too large"));
        }
        if note.chars().any(|c| c.is_control() && c != '\n') {
            return Err(NoteError::Malformed("control character"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let text = &note[..split + 1];
        let sigs = &note[split + 2..];
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed("signature lines end in newline"));
        }
        let mut signatures = Vec::new();
        for line in sigs[..sigs.len() - 1].split('\n') {
            if signatures.len() == MAX_SIGNATURES {
                return Err(NoteError::Malformed("too many signatures"));
            }
            let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
                "a signature line starts with an em dash and a space",
            ))?;
            let (name, b64) = rest.split_once(' ').ok_or(NoteError::Malformed(
                "a signature line has a name and a signature",
            ))?;
            check_name(name).map_err(|_| NoteError::Malformed("bad key name"))?;
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature is not base64"))?;
            if raw.len() < 5 {
                return Err(NoteError::Malformed("signature too short"));
            }
            signatures.push(NoteSignature {
                name: name.to_string(),
                id: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
                signature: raw[4..].to_vec(),
            });
        }
        if signatures.is_empty() {
            return Err(NoteError::Malformed("no signature"));
        }
        Ok(Self {
            text: text.to_string(),
            signatures,
        })
    }

    /// Verifies the signatures by `known` keys: unknown ones are ignored, a bad known one rejects the
    /// note, and at least one known one must verify.
    pub fn verify(&self, known: &[NoteVerifier]) -> Result<Vec<Verified>, NoteError> {
        let mut verified = Vec::new();
        for sig in &self.signatures {
            let Some(key) = known.iter().find(|k| k.name == sig.name && k.id == sig.id) else {
                continue;
            };
            let timestamp = key.check(&self.text, &sig.signature)?;
            verified.push(Verified {
                name: key.name.clone(),
                timestamp,
            });
        }
        if verified.is_empty() {
            return Err(NoteError::NoKnownSignature);
        }
        Ok(verified)
    }
}

/// Signs `text` (ending in newline) with `signers`: the signed note.
pub fn sign(text: &str, signers: &[&NoteSigner], timestamp: u64) -> Result<String, NoteError> {
    if !text.ends_with('\n') || text.ends_with("\n\n") {
        return Err(NoteError::Malformed(
            "a note text ends in exactly one newline",
        ));
    }
    let mut out = format!("{text}\n");
    for s in signers {
        out.push_str(&s.signature_line(text, timestamp));
    }
    Ok(out)
}

/// Adds a signature line to a signed note (a witness cosigning, say).
pub fn add_signature(note: &str, line: &str) -> String {
    format!("{note}{line}")
}
