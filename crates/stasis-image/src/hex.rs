//! Byte strings stored as lowercase hex in the manifest (serde helper).

use serde::{Deserialize, Deserializer, Serializer};

/// Encodes bytes as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes lowercase or uppercase hex; `None` if malformed.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// serde `serialize_with` for `Vec<u8>`.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(bytes))
}

/// serde `deserialize_with` for `Vec<u8>`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    decode(&s).ok_or_else(|| serde::de::Error::custom("malformed hex string"))
}

/// serde helpers for `Vec<Vec<u8>>`.
pub mod list {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    /// Serializes a list of byte strings as hex strings.
    pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for i in items {
            seq.serialize_element(&super::encode(i))?;
        }
        seq.end()
    }

    /// Deserializes a list of hex strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                super::decode(s).ok_or_else(|| serde::de::Error::custom("malformed hex string"))
            })
            .collect()
    }
}
