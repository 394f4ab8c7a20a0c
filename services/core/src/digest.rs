//! Content digests (`algorithm:hex`) as the OCI image spec defines them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};

/// A digest algorithm Berth can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Algorithm {
    /// SHA-256, the default of every client.
    Sha256,
    /// SHA-512, registered by the image spec and accepted by the distribution spec.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written in a digest.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex-encoded hash.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// A fresh incremental hasher for this algorithm.
    pub fn hasher(self) -> DigestHasher {
        match self {
            Algorithm::Sha256 => DigestHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(Box::new(Sha512::new())),
        }
    }
}

/// A parsed, validated content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// Why a string is not a digest Berth accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `:` separator, an empty part, or characters outside the grammar.
    #[error("malformed digest")]
    Malformed,
    /// Well-formed but an algorithm Berth cannot verify.
    #[error("unsupported digest algorithm")]
    Unsupported,
}

impl Digest {
    /// Builds a digest from an algorithm and raw hash bytes.
    pub fn from_hash(algorithm: Algorithm, hash: &[u8]) -> Digest {
        Digest { algorithm, hex: hex::encode(hash) }
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::from_hash(Algorithm::Sha256, &Sha256::digest(data))
    }

    /// The digest of `data` under this digest's own algorithm.
    pub fn matches(&self, data: &[u8]) -> bool {
        let mut h = self.algorithm.hasher();
        h.update(data);
        h.finish() == *self
    }

    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Grammar (image-spec descriptor.md):
        //   algorithm := component ([+._-] component)*, component := [a-z0-9]+
        //   encoded   := [a-zA-Z0-9=_-]+
        let (alg, enc) = s.split_once(':').ok_or(DigestError::Malformed)?;
        let alg_ok = !alg.is_empty()
            && alg
                .split(['+', '.', '_', '-'])
                .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        let enc_ok =
            !enc.is_empty() && enc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-');
        if !alg_ok || !enc_ok {
            return Err(DigestError::Malformed);
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(DigestError::Unsupported),
        };
        // Registered algorithms fix the encoding: lower-case hex of the full hash length.
        if enc.len() != algorithm.hex_len() || !enc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError::Malformed);
        }
        Ok(Digest { algorithm, hex: enc.to_string() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// An incremental hasher producing a [`Digest`].
#[derive(Clone)]
pub enum DigestHasher {
    /// SHA-256 state.
    Sha256(Sha256),
    /// SHA-512 state (boxed: it is twice the size).
    Sha512(Box<Sha512>),
}

impl DigestHasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(data),
            DigestHasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest::from_hash(Algorithm::Sha256, &h.finalize()),
            DigestHasher::Sha512(h) => Digest::from_hash(Algorithm::Sha512, &h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse().unwrap();
        assert_eq!(d, Digest::sha256_of(b""));
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn sha512_round_trip() {
        let mut h = Algorithm::Sha512.hasher();
        h.update(b"abc");
        let d = h.finish();
        assert_eq!(d.hex().len(), 128);
        assert!(d.matches(b"abc"));
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_digests() {
        for s in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
        ] {
            assert_eq!(s.parse::<Digest>(), Err(DigestError::Malformed), "{s}");
        }
        assert_eq!("md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>(), Err(DigestError::Unsupported));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn any_hash_round_trips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let d = Digest::sha256_of(&data);
            proptest::prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
    }
}
