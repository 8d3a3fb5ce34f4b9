//! Canonical binary encoding for every byte string that is signed or hashed.
//!
//! This module owns the framing (`"CMRV" || version || kind`), fixed-width big-endian integers and
//! length-prefixed byte strings. It knows nothing of what the fields mean; each format module reads and
//! writes its own fields in a fixed order. Decoding is strict: wrong magic, an unknown version, the wrong
//! kind, a truncated field, an oversized field and trailing bytes are all errors.

use thiserror::Error;

/// The four bytes that open every CMR Vault body.
pub const MAGIC: [u8; 4] = *b"CMRV";

/// The format version of every body this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// What a body is. Each signed statement has its own kind, which separates the signature domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An identity key event (inception or rotation).
    KeyEvent = 0x01,
    /// A device certificate, signed by an identity key.
    DeviceCertificate = 0x02,
    /// A device revocation, signed by an identity key.
    DeviceRevocation = 0x03,
    /// The secrets inside a passphrase-sealed key file.
    KeyFilePayload = 0x04,
    /// The HPKE `info` binding for a wrapped key.
    WrapInfo = 0x05,
    /// A signed envelope: a body and its signature.
    Signed = 0x06,
    /// A passphrase-sealed key file.
    KeyFile = 0x07,
    /// A family's name (scope and qualifier).
    FamilyName = 0x08,
    /// The header of a sealed record (its associated data).
    RecordHeader = 0x09,
    /// A signed batch of records.
    Batch = 0x0a,
    /// A customer's key directory.
    Directory = 0x0b,
    /// A bundle of keys sealed to one grantee in one HPKE seal.
    KeyBundle = 0x0c,
    /// An epoch secret sealed under the vault key.
    SealedEpochSecret = 0x0d,
    /// A consent statement (request, grant, denial, revocation, rotation, key delivery, block, erasure,
    /// dispute).
    Consent = 0x0e,
    /// The content of a record restored from an export, carrying its original author.
    RestoredRecord = 0x0f,
    /// A log entry body.
    LogEntry = 0x10,
    /// An access record inside a log entry.
    AccessRecord = 0x11,
    /// A new device's request to be certified, signed by the device itself.
    DeviceRequest = 0x12,
    /// An access record whose signed request followed the signing profile exactly, stored as the
    /// fields its signature base is rebuilt from.
    AccessRecordCompact = 0x13,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x01 => Kind::KeyEvent,
            0x02 => Kind::DeviceCertificate,
            0x03 => Kind::DeviceRevocation,
            0x04 => Kind::KeyFilePayload,
            0x05 => Kind::WrapInfo,
            0x06 => Kind::Signed,
            0x07 => Kind::KeyFile,
            0x08 => Kind::FamilyName,
            0x09 => Kind::RecordHeader,
            0x0a => Kind::Batch,
            0x0b => Kind::Directory,
            0x0c => Kind::KeyBundle,
            0x0d => Kind::SealedEpochSecret,
            0x0e => Kind::Consent,
            0x0f => Kind::RestoredRecord,
            0x10 => Kind::LogEntry,
            0x11 => Kind::AccessRecord,
            0x12 => Kind::DeviceRequest,
            0x13 => Kind::AccessRecordCompact,
            _ => return None,
        })
    }
}

/// Why a byte string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended in the middle of a field.
    #[error("truncated input")]
    Truncated,
    /// The input does not start with the CMR Vault magic.
    #[error("not a CMR Vault object (bad magic)")]
    BadMagic,
    /// The format version is not one this build reads.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u8),
    /// The object is of another kind than the one expected.
    #[error("wrong object kind: expected {expected:?}, found 0x{found:02x}")]
    WrongKind {
        /// The kind the caller asked for.
        expected: Kind,
        /// The byte found in the input.
        found: u8,
    },
    /// A length prefix exceeds the limit for that field.
    #[error("field {field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The field's name.
        field: &'static str,
        /// The announced length.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// Bytes remain after the last field.
    #[error("{0} trailing bytes after the last field")]
    TrailingBytes(usize),
    /// A field holds a value that is not allowed.
    #[error("invalid field {field}: {reason}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Writes one body in canonical form.
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Starts a body of `kind` with the magic and the current format version.
    pub fn new(kind: Kind) -> Self {
        Self::with_capacity(kind, 256)
    }

    /// Starts a body of `kind`, reserving room for `capacity` bytes in all.
    pub fn with_capacity(kind: Kind, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(6));
        buf.extend_from_slice(&MAGIC);
        buf.push(FORMAT_VERSION);
        buf.push(kind as u8);
        Self { buf }
    }

    /// Appends one byte.
    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.buf.push(value);
        self
    }

    /// Appends a big-endian u32.
    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a big-endian u64.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a fixed-size array with no length prefix.
    pub fn array<const N: usize>(&mut self, value: &[u8; N]) -> &mut Self {
        self.buf.extend_from_slice(value);
        self
    }

    /// Appends a byte string with a u32 length prefix.
    ///
    /// # Panics
    /// If `value` is 4 GiB or longer, which no caller can reach: every field has a limit far below that.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        let len = u32::try_from(value.len()).expect("field lengths are bounded far below 4 GiB");
        self.u32(len);
        self.buf.extend_from_slice(value);
        self
    }

    /// Appends an optional fixed-size array as a presence byte (0 or 1) and the array.
    pub fn option_array<const N: usize>(&mut self, value: Option<&[u8; N]>) -> &mut Self {
        match value {
            None => self.u8(0),
            Some(v) => self.u8(1).array(v),
        }
    }

    /// Returns the finished body.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads one body in canonical form.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the magic, the version and the kind, and positions the reader on the first field.
    pub fn new(data: &'a [u8], kind: Kind) -> Result<Self, DecodeError> {
        let mut reader = Self { data, pos: 0 };
        let magic: [u8; 4] = reader.array().map_err(|_| DecodeError::BadMagic)?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = reader.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let found = reader.u8()?;
        if Kind::from_u8(found) != Some(kind) {
            return Err(DecodeError::WrongKind {
                expected: kind,
                found,
            });
        }
        Ok(reader)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.data.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads a u32-length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        self.take(len)
    }

    /// Reads an optional fixed-size array written by [`Writer::option_array`].
    pub fn option_array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<Option<[u8; N]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.array()?)),
            _ => Err(DecodeError::Invalid {
                field,
                reason: "presence byte is neither 0 nor 1",
            }),
        }
    }

    /// How many bytes have been read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Reads a u32-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes(field, max)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
            field,
            reason: "not UTF-8",
        })
    }

    /// How many bytes are left to read.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Ends the read: every byte must have been consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_every_field_type() {
        let mut w = Writer::new(Kind::KeyEvent);
        w.u8(7)
            .u32(0xdead_beef)
            .u64(u64::MAX)
            .array(&[9u8; 3])
            .bytes(b"hello")
            .option_array::<2>(None)
            .option_array(Some(&[1u8, 2]));
        let body = w.finish();
        let mut r = Reader::new(&body, Kind::KeyEvent).unwrap();
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.array::<3>().unwrap(), [9u8; 3]);
        assert_eq!(r.bytes("b", 5).unwrap(), b"hello");
        assert_eq!(r.option_array::<2>("o").unwrap(), None);
        assert_eq!(r.option_array::<2>("o").unwrap(), Some([1, 2]));
        r.finish().unwrap();
    }

    #[test]
    fn framing_errors_are_named() {
        let body = Writer::new(Kind::KeyEvent).finish();
        assert_eq!(
            Reader::new(&body, Kind::DeviceCertificate).unwrap_err(),
            DecodeError::WrongKind {
                expected: Kind::DeviceCertificate,
                found: 1
            }
        );
        let mut bad_version = body.clone();
        bad_version[4] = 2;
        assert_eq!(
            Reader::new(&bad_version, Kind::KeyEvent).unwrap_err(),
            DecodeError::UnsupportedVersion(2)
        );
        assert_eq!(
            Reader::new(b"XXXX\x01\x01", Kind::KeyEvent).unwrap_err(),
            DecodeError::BadMagic
        );
        assert_eq!(
            Reader::new(b"CM", Kind::KeyEvent).unwrap_err(),
            DecodeError::BadMagic
        );
        let mut trailing = body.clone();
        trailing.push(0);
        let r = Reader::new(&trailing, Kind::KeyEvent).unwrap();
        assert_eq!(r.finish().unwrap_err(), DecodeError::TrailingBytes(1));
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading() {
        let mut w = Writer::new(Kind::KeyEvent);
        w.u32(u32::MAX);
        let body = w.finish();
        let mut r = Reader::new(&body, Kind::KeyEvent).unwrap();
        assert!(matches!(
            r.bytes("f", 1024),
            Err(DecodeError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(mut r) = Reader::new(&data, Kind::KeyEvent) {
                let _ = r.u64();
                let _ = r.bytes("f", 16);
                let _ = r.option_array::<4>("o");
                let _ = r.finish();
            }
        }

        #[test]
        fn bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut w = Writer::new(Kind::Signed);
            w.bytes(&data);
            let body = w.finish();
            let mut r = Reader::new(&body, Kind::Signed).unwrap();
            prop_assert_eq!(r.bytes("f", 300).unwrap(), &data[..]);
            r.finish().unwrap();
        }
    }
}
