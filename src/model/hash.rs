//! Hash newtypes: what a derivation is keyed by, and what an output is checked against.
//!
//! `DrvHash` (the recipe) and `ContentHash` (the result) are distinct types so one can never
//! be passed where the other is meant, even though both are 32-byte blake3 digests.

use std::fmt;
use std::str::FromStr;

/// Length, in hex characters, of the key prefix used in store directory names.
/// 128 bits is far beyond any collision risk and keeps paths readable.
pub const STORE_KEY_HEX_LEN: usize = 32;

macro_rules! blake3_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn from_blake3(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "blake3-{}", self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = HashParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let hex_part = s.strip_prefix("blake3-").unwrap_or(s);
                decode_fixed::<32>(hex_part, "blake3").map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

blake3_newtype!(
    /// The blake3 hash of a derivation's canonical encoding: the store key of its output.
    DrvHash
);

impl DrvHash {
    /// The prefix of the hash used in store directory names (`<key>-<name>`).
    pub fn store_key(&self) -> String {
        self.to_hex()[..STORE_KEY_HEX_LEN].to_string()
    }
}

blake3_newtype!(
    /// The blake3 hash of some bytes: a file, a key, a disk layer.
    ContentHash
);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_blake3(blake3::hash(bytes))
    }
}

/// Which algorithm an expected hash uses. Image publishers use sha256/sha512; farm itself blake3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgo {
    Sha256,
    Sha512,
    Blake3,
}

impl HashAlgo {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
            HashAlgo::Blake3 => "blake3",
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Sha256 | HashAlgo::Blake3 => 32,
            HashAlgo::Sha512 => 64,
        }
    }
}

/// A hash an input is declared to have (`sha256 = "…"` in farm.toml).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedHash {
    pub algo: HashAlgo,
    pub digest: Vec<u8>,
}

impl ExpectedHash {
    /// Parses a hex digest for `algo`, accepting an optional `algo:` or `algo-` prefix.
    pub fn parse(algo: HashAlgo, text: &str) -> Result<Self, HashParseError> {
        let trimmed = text.trim();
        let hex_part = [":", "-"]
            .iter()
            .find_map(|sep| trimmed.strip_prefix(&format!("{}{sep}", algo.name())))
            .unwrap_or(trimmed);
        let digest = decode_hex(hex_part, algo.name(), algo.digest_len())?;
        Ok(Self { algo, digest })
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.digest)
    }
}

impl fmt::Display for ExpectedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.name(), self.to_hex())
    }
}

impl fmt::Debug for ExpectedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for ExpectedHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashParseError {
    #[error("A {algo} digest has {expected} hex characters, this one has {actual}")]
    Length {
        algo: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("A {algo} digest is hexadecimal; `{text}` is not")]
    NotHex { algo: &'static str, text: String },
}

fn decode_hex(text: &str, algo: &'static str, len: usize) -> Result<Vec<u8>, HashParseError> {
    if text.len() != len * 2 {
        return Err(HashParseError::Length {
            algo,
            expected: len * 2,
            actual: text.len(),
        });
    }
    hex::decode(text.to_ascii_lowercase()).map_err(|_| HashParseError::NotHex {
        algo,
        text: text.to_string(),
    })
}

fn decode_fixed<const N: usize>(text: &str, algo: &'static str) -> Result<[u8; N], HashParseError> {
    let bytes = decode_hex(text, algo, N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// Streaming hasher for any [`HashAlgo`], so a download is verified as it is written.
pub enum StreamHasher {
    Sha256(Box<sha2::Sha256>),
    Sha512(Box<sha2::Sha512>),
    Blake3(Box<blake3::Hasher>),
}

impl StreamHasher {
    pub fn new(algo: HashAlgo) -> Self {
        use sha2::Digest;
        match algo {
            HashAlgo::Sha256 => Self::Sha256(Box::new(sha2::Sha256::new())),
            HashAlgo::Sha512 => Self::Sha512(Box::new(sha2::Sha512::new())),
            HashAlgo::Blake3 => Self::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Sha512(h) => h.update(bytes),
            Self::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    pub fn finish(self) -> ExpectedHash {
        use sha2::Digest;
        let (algo, digest) = match self {
            Self::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Self::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
            Self::Blake3(h) => (HashAlgo::Blake3, h.finalize().as_bytes().to_vec()),
        };
        ExpectedHash { algo, digest }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drv_hash_displays_with_algorithm_prefix_and_round_trips() {
        let h = DrvHash([0xab; 32]);
        let shown = h.to_string();
        assert_eq!(shown, format!("blake3-{}", "ab".repeat(32)));
        assert_eq!(shown.parse::<DrvHash>().unwrap(), h);
        assert_eq!(h.store_key().len(), STORE_KEY_HEX_LEN);
    }

    #[test]
    fn expected_hash_accepts_prefixed_and_uppercase_hex() {
        let hex = "AB".repeat(32);
        let a = ExpectedHash::parse(HashAlgo::Sha256, &hex).unwrap();
        let b = ExpectedHash::parse(HashAlgo::Sha256, &format!("sha256:{hex}")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), format!("sha256:{}", "ab".repeat(32)));
    }

    #[test]
    fn expected_hash_rejects_wrong_length_and_non_hex() {
        assert_eq!(
            ExpectedHash::parse(HashAlgo::Sha512, "abcd"),
            Err(HashParseError::Length {
                algo: "sha512",
                expected: 128,
                actual: 4
            })
        );
        assert!(matches!(
            ExpectedHash::parse(HashAlgo::Blake3, &"zz".repeat(32)),
            Err(HashParseError::NotHex { .. })
        ));
    }

    #[test]
    fn stream_hasher_matches_known_sha256() {
        let mut h = StreamHasher::new(HashAlgo::Sha256);
        h.update(b"abc");
        assert_eq!(
            h.finish().to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
