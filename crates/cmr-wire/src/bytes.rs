//! Bytes on the wire: a JSON string in standard base64 (RFC 4648, padded).
//!
//! Large answers (a read's sealed records and signed batches) are mostly such strings. serde_json writes
//! a string by scanning it byte by byte for characters to escape; base64's alphabet has none, and for a
//! read's answer that scan cost more than the encoding itself. So [`Base64`] writes its quoted string
//! as raw JSON (checked once by serde_json's fast string reader), the same bytes a string would give.
//! It is meant for JSON: every answer of the API is JSON.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, Serialize, Serializer};

/// Bytes written as a base64 JSON string, and read back from one (anything else is refused).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Base64(pub Vec<u8>);

impl Base64 {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Base64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64({} bytes)", self.0.len())
    }
}

impl Serialize for Base64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut quoted = String::with_capacity(self.0.len().div_ceil(3) * 4 + 2);
        quoted.push('"');
        B64.encode_string(&self.0, &mut quoted);
        quoted.push('"');
        serde_json::value::RawValue::from_string(quoted)
            .map_err(ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> de::Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Base64Visitor;
        impl Visitor<'_> for Base64Visitor {
            type Value = Base64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Base64, E> {
                // Not echoed: a record's string is kilobytes long.
                B64.decode(s)
                    .map(Base64)
                    .map_err(|_| E::custom("a string that is not padded standard base64"))
            }
        }
        deserializer.deserialize_str(Base64Visitor)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Base64 {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Byte)))
            .pattern(Some(
                "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
            ))
            .description(Some("Bytes in standard base64 (RFC 4648, padded)"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Base64 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_same_json_as_a_base64_string() {
        for len in [0usize, 1, 2, 3, 4, 31, 32, 1100] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let ours = serde_json::to_string(&Base64(bytes.clone())).unwrap();
            let plain = serde_json::to_string(&B64.encode(&bytes)).unwrap();
            assert_eq!(ours, plain, "{len} bytes");
            let pretty = serde_json::to_string_pretty(&vec![Base64(bytes.clone())]).unwrap();
            assert_eq!(
                pretty,
                serde_json::to_string_pretty(&vec![B64.encode(&bytes)]).unwrap()
            );
            let value = serde_json::to_value(Base64(bytes.clone())).unwrap();
            assert_eq!(value, serde_json::Value::String(B64.encode(&bytes)));
            let back: Base64 = serde_json::from_str(&ours).unwrap();
            assert_eq!(back.0, bytes);
            let from_value: Base64 = serde_json::from_value(value).unwrap();
            assert_eq!(from_value.0, bytes);
        }
    }

    #[test]
    fn refuses_what_is_not_padded_standard_base64() {
        for bad in [
            "\"AAA\"",         // unpadded
            "\"AA-_\"",        // the URL-safe alphabet
            "\"AA A=\"",       // a space
            "\"A\"",           // too short
            "12",              // a number
            "null",            // nothing
            "[\"AAAA\"]",      // a list
            "\"AAAA\\u0041\"", // an escape turning into a fifth character
        ] {
            let r = serde_json::from_str::<Base64>(bad);
            assert!(r.is_err(), "{bad} was accepted as {r:?}");
        }
        assert_eq!(
            serde_json::from_str::<Base64>("\"AAAA\"").unwrap().0,
            vec![0, 0, 0]
        );
    }
}
