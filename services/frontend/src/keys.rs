//! The keys that sign and verify registry tokens.
//!
//! Each frontend signs with an Ed25519 key (`EdDSA`, with a key id in every token's header)
//! that it makes at start and holds only in memory: private keys are never written to disk,
//! to the Raft log or to snapshots, so reading a data directory mints nothing. What is
//! replicated is the public half ([`PublicSigningKey`]), which every frontend uses to verify
//! tokens whoever signed them, and which `GET /.well-known/jwks.json` publishes.
//!
//! Rotation (`berth admin keys rotate`, or a restart) makes a new key and publishes it; the old
//! one keeps verifying until the last token it signed has expired (one token lifetime), then
//! retires. A rotation asked of one frontend reaches the others through a generation counter
//! in the metadata service that each frontend checks.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use berth_core::store::{DirectoryChange, PublicSigningKey};
use berth_core::{now_ms, MetaStore, RegistryError};
use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::{Digest as _, Sha256};

/// The fixed prefix of an Ed25519 private key in PKCS#8 v1 DER (RFC 8410), before its 32-byte
/// seed: what `jsonwebtoken` takes as an EdDSA signing key.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// How often a frontend looks for a rotation asked through another frontend.
pub const ROTATION_CHECK: Duration = Duration::from_secs(10);

/// Shortest time between two reloads of the published keys prompted by an unknown key id, so
/// that tokens with made-up key ids cannot turn into a flood of metadata reads. A token with an
/// unknown key id waits for the next reload (every such token waiting meanwhile shares it)
/// rather than being refused: a key another frontend published a moment ago is not known here
/// until a reload that starts after the token was shown.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

struct Signer {
    kid: String,
    key: EncodingKey,
}

struct Verifier {
    key: DecodingKey,
    retire_after_ms: Option<u64>,
}

/// A frontend's signing key and every published verifying key.
pub struct KeyRing {
    meta: Arc<dyn MetaStore>,
    /// The frontend's name in the keys it publishes.
    owner: String,
    ttl: Duration,
    signer: RwLock<Arc<Signer>>,
    verifiers: RwLock<HashMap<String, Arc<Verifier>>>,
    /// The key generation acted on.
    generation: RwLock<u64>,
    /// When the last reload began (`None` before the first); held across a reload, so that
    /// reloads run one at a time.
    reloaded: tokio::sync::Mutex<Option<Instant>>,
}

fn internal(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::internal(e)
}

/// A new key pair of frontend `owner`: the signer and its public record.
fn generate(owner: &str) -> (Signer, PublicSigningKey) {
    let seed: [u8; 32] = rand::random();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    let kid = hex::encode(&Sha256::digest(public)[..8]);
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let record = PublicSigningKey {
        kid: kid.clone(),
        x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
        owner: owner.to_string(),
        created_ms: now_ms(),
        retire_after_ms: None,
    };
    (Signer { kid, key: EncodingKey::from_ed_der(&der) }, record)
}

impl KeyRing {
    /// Makes the key of frontend `owner` (a name stable across its restarts), publishes it,
    /// retiring the keys of its previous run, and loads every published key. Tokens live `ttl`.
    pub async fn start(meta: Arc<dyn MetaStore>, ttl: Duration, owner: &str) -> Result<Arc<KeyRing>, RegistryError> {
        // The shared HMAC key of earlier versions leaves the state: tokens it signed stop
        // verifying, which costs clients one new token.
        if meta.has_legacy_signing_key().await? {
            meta.change_directory(DirectoryChange::DropLegacySigningKey).await?;
        }
        let generation = meta.key_generation().await?;
        let (signer, record) = generate(owner);
        let ring = Arc::new(KeyRing {
            meta,
            owner: owner.to_string(),
            ttl,
            signer: RwLock::new(Arc::new(signer)),
            verifiers: RwLock::new(HashMap::new()),
            generation: RwLock::new(generation),
            reloaded: tokio::sync::Mutex::new(None),
        });
        ring.publish(record).await?;
        Ok(ring)
    }

    async fn publish(&self, key: PublicSigningKey) -> Result<(), RegistryError> {
        let now = now_ms();
        // A replaced key verifies for one more token lifetime (and a minute of clock skew).
        let retire_after_ms = now + self.ttl.as_millis() as u64 + 60_000;
        self.meta.change_directory(DirectoryChange::PublishKey { key, retire_after_ms, now_ms: now }).await?;
        self.reload().await
    }

    /// Replaces this frontend's signing key; the old one verifies until its tokens expire.
    pub async fn rotate(&self) -> Result<String, RegistryError> {
        let (signer, record) = generate(&self.owner);
        let kid = signer.kid.clone();
        self.publish(record).await?;
        *self.signer.write().map_err(internal)? = Arc::new(signer);
        Ok(kid)
    }

    /// Asks every frontend to rotate (through the generation counter) and rotates this one.
    pub async fn rotate_everywhere(&self) -> Result<String, RegistryError> {
        self.meta.change_directory(DirectoryChange::RotateKeys).await?;
        let generation = self.meta.key_generation().await?;
        let kid = self.rotate().await?;
        *self.generation.write().map_err(internal)? = generation;
        Ok(kid)
    }

    /// Rotates when another frontend asked for it since this one last looked.
    pub async fn follow_rotations(&self) -> Result<(), RegistryError> {
        let generation = self.meta.key_generation().await?;
        if generation > *self.generation.read().map_err(internal)? {
            self.rotate().await?;
            *self.generation.write().map_err(internal)? = generation;
        }
        Ok(())
    }

    async fn reload(&self) -> Result<(), RegistryError> {
        let mut last = self.reloaded.lock().await;
        self.reload_locked(&mut last).await
    }

    /// Reads every published key; `last` is the held time of the last reload.
    async fn reload_locked(&self, last: &mut Option<Instant>) -> Result<(), RegistryError> {
        let began = Instant::now();
        let mut fresh = HashMap::new();
        for k in self.meta.signing_keys().await? {
            match DecodingKey::from_ed_components(&k.x) {
                Ok(key) => {
                    fresh.insert(k.kid, Arc::new(Verifier { key, retire_after_ms: k.retire_after_ms }));
                }
                Err(e) => tracing::warn!(kid = %k.kid, error = %e, "a published signing key does not decode"),
            }
        }
        *self.verifiers.write().map_err(internal)? = fresh;
        *last = Some(began);
        Ok(())
    }

    /// The key id and key to sign a token with now.
    pub fn signing(&self) -> Result<(String, EncodingKey), RegistryError> {
        let s = self.signer.read().map_err(internal)?.clone();
        Ok((s.kid.clone(), s.key.clone()))
    }

    /// The key that verifies tokens with key id `kid`, unless unknown or retired. An unknown
    /// key id waits for a reload that begins after it was asked about (see [`RELOAD_EVERY`]).
    pub async fn verifying(&self, kid: &str) -> Result<Option<DecodingKey>, RegistryError> {
        let known = || -> Result<Option<Arc<Verifier>>, RegistryError> {
            Ok(self.verifiers.read().map_err(internal)?.get(kid).cloned())
        };
        let found = match known()? {
            Some(v) => Some(v),
            None => {
                let asked = Instant::now();
                let mut last = self.reloaded.lock().await;
                // A reload that began after the question, while this one waited its turn,
                // has answered it already.
                if last.is_none_or(|t| t <= asked) {
                    if let Some(wait) = last.and_then(|t| RELOAD_EVERY.checked_sub(t.elapsed())) {
                        tokio::time::sleep(wait).await;
                    }
                    self.reload_locked(&mut last).await?;
                }
                drop(last);
                known()?
            }
        };
        Ok(found.filter(|v| v.retire_after_ms.is_none_or(|t| t >= now_ms())).map(|v| v.key.clone()))
    }

    /// The published keys that still verify, as a JSON Web Key Set.
    pub async fn jwks(&self) -> Result<serde_json::Value, RegistryError> {
        let now = now_ms();
        let keys: Vec<serde_json::Value> = self
            .meta
            .signing_keys()
            .await?
            .into_iter()
            .filter(|k| k.retire_after_ms.is_none_or(|t| t >= now))
            .map(|k| {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": k.kid, "x": k.x})
            })
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }
}
