//! SHA-256 digests with domain separation.
//!
//! Owns the [`Digest`] newtype and the tagged hash used for ids, commitments and statement digests. Merkle
//! hashing (RFC 6962) is not here: it lives with the log, because its prefixes are fixed by the RFC.

use std::fmt;

use ring::digest::{SHA256, digest};

/// A SHA-256 output.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, as ids are shown to people and in URLs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Plain SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    Digest(out)
}

/// SHA-256 over `len(tag) || "cmr-vault/v1/" tag || data`: the same data hashed for two purposes never
/// gives the same digest.
pub fn tagged_hash(tag: &str, data: &[u8]) -> Digest {
    const PREFIX: &[u8] = b"cmr-vault/v1/";
    let mut ctx = ring::digest::Context::new(&SHA256);
    // A tag is a short constant; the length byte keeps "ab"+"c" apart from "a"+"bc".
    let tag_len = u8::try_from(PREFIX.len() + tag.len()).expect("tags are short constants");
    ctx.update(&[tag_len]);
    ctx.update(PREFIX);
    ctx.update(tag.as_bytes());
    ctx.update(data);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Digest(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answer() {
        // FIPS 180-2 appendix B.1.
        assert_eq!(
            sha256(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tags_separate_domains() {
        assert_ne!(tagged_hash("a", b"x"), tagged_hash("b", b"x"));
        assert_ne!(tagged_hash("ab", b"c"), tagged_hash("a", b"bc"));
        assert_ne!(tagged_hash("a", b"x"), sha256(b"x"));
    }

    #[test]
    fn hex_round_trip() {
        let d = sha256(b"abc");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
