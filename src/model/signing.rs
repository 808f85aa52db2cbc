//! ed25519 keys that sign binary cache records, written as `NAME:BASE64` like Nix's, so a
//! farm.toml's `trusted-public-keys` line says whose records it accepts.
//!
//! Pure: key generation takes its 32 random bytes from the caller.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

/// A key's name: what signatures and `trusted-public-keys` refer to it by.
fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("a key is `NAME:BASE64`, with NAME of letters, digits, `.`, `_`, `-`")]
    Shape,
    #[error("its key part is not base64 of {expected} bytes")]
    Bytes { expected: usize },
    #[error("it is not a valid ed25519 public key")]
    NotEd25519,
}

fn split(text: &str) -> Result<(&str, Vec<u8>), KeyParseError> {
    let (name, key) = text.trim().split_once(':').ok_or(KeyParseError::Shape)?;
    if !valid_key_name(name) {
        return Err(KeyParseError::Shape);
    }
    let bytes = BASE64.decode(key).map_err(|_| KeyParseError::Shape)?;
    Ok((name, bytes))
}

/// A public key farm.toml trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(text)?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyParseError::Bytes { expected: 32 })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyParseError::NotEd25519)?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// A secret key `farm store push` signs with. Its text form holds the 32-byte seed.
pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

impl SecretKey {
    /// A key named `name` from 32 random bytes. `None` if the name is not allowed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Option<SecretKey> {
        valid_key_name(name).then(|| SecretKey {
            name: name.to_string(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            key: self.name.clone(),
            sig: BASE64.encode(self.key.sign(message).to_bytes()),
        }
    }

    /// `NAME:BASE64(seed)`: what `farm store keygen` writes to the secret key file.
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.to_bytes()))
    }
}

impl FromStr for SecretKey {
    type Err = KeyParseError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(text)?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyParseError::Bytes { expected: 32 })?;
        SecretKey::from_seed(name, seed).ok_or(KeyParseError::Shape)
    }
}

/// One signature of a record: the key's name and the base64 ed25519 signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub key: String,
    pub sig: String,
}

/// Why a record is not trusted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("it is not signed")]
    Unsigned,
    #[error("it is signed by {}, which `trusted-public-keys` does not list", .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    UnknownKeys(Vec<String>),
    #[error("its signature by `{0}` does not match its content")]
    BadSignature(String),
}

/// The name of the trusted key that signed `message`, or why none did. A signature by a
/// trusted key that does not verify is an error even if another would: it means tampering.
pub fn verify<'a>(
    trusted: &'a [PublicKey],
    message: &[u8],
    signatures: &[Signature],
) -> Result<&'a str, Untrusted> {
    if signatures.is_empty() {
        return Err(Untrusted::Unsigned);
    }
    let mut unknown = Vec::new();
    for signature in signatures {
        let Some(key) = trusted.iter().find(|k| k.name == signature.key) else {
            unknown.push(signature.key.clone());
            continue;
        };
        let bad = || Untrusted::BadSignature(signature.key.clone());
        let bytes: [u8; 64] = BASE64
            .decode(&signature.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        key.key
            .verify(message, &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|_| bad())?;
        return Ok(&key.name);
    }
    Err(Untrusted::UnknownKeys(unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_sign_and_verify() {
        let secret = SecretKey::from_seed("ci-1", [7; 32]).unwrap();
        let public = secret.public();
        let text = public.to_string();
        assert!(text.starts_with("ci-1:"), "{text}");
        assert_eq!(text.parse::<PublicKey>().unwrap(), public);
        let again: SecretKey = secret.to_text().parse().unwrap();
        assert_eq!(again.public(), public);

        let signature = secret.sign(b"record");
        let trusted = [public];
        assert_eq!(
            verify(&trusted, b"record", std::slice::from_ref(&signature)),
            Ok("ci-1")
        );
        assert_eq!(
            verify(&trusted, b"recorD", std::slice::from_ref(&signature)),
            Err(Untrusted::BadSignature("ci-1".into()))
        );
        assert_eq!(verify(&trusted, b"record", &[]), Err(Untrusted::Unsigned));
        let other = SecretKey::from_seed("other", [8; 32]).unwrap();
        let err = verify(&trusted, b"record", &[other.sign(b"record")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is signed by `other`, which `trusted-public-keys` does not list"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!("nokey".parse::<PublicKey>(), Err(KeyParseError::Shape));
        assert_eq!("a b:AAAA".parse::<PublicKey>(), Err(KeyParseError::Shape));
        assert_eq!(
            "k:AAAA".parse::<PublicKey>(),
            Err(KeyParseError::Bytes { expected: 32 })
        );
    }
}
