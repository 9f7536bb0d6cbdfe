//! The keys that verify client tokens, and which of them may verify a given token.
//!
//! Keys come from `auth.jwt_secret` (HMAC), `auth.public_keys` (PEM files: RSA, EC or Ed25519,
//! each optionally named by a `kid`) and `auth.jwks_file` (RFC 7517; every key needs a `kid`).
//! They are loaded once at start; a file that cannot be used stops the node with its path.
//!
//! The accepted algorithms are `auth.algorithms`, or every algorithm of the configured key
//! types when that is empty, and never anything the token asks for beyond that: a token's
//! `alg` must be on the list, and only keys of that algorithm's family are tried, so an HMAC
//! token is never checked against an RSA public key used as a secret (algorithm confusion), and
//! `alg: none` does not even parse.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Header};

use super::AuthError;
use crate::config::AuthSettings;

/// A key source that cannot be used (reported at start, with the file).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an RSA, EC or Ed25519 public key in PEM form", path.display())]
    NotAPublicKey { path: PathBuf },
    #[error("{}: not a JWKS document: {detail}", path.display())]
    BadJwks { path: PathBuf, detail: String },
    #[error("{}: a JWKS key without a `kid` cannot be selected; give every key a kid", path.display())]
    JwksKeyWithoutKid { path: PathBuf },
    #[error("auth.algorithms: {0:?} is not a supported JWT algorithm")]
    UnknownAlgorithm(String),
    #[error("auth.algorithms allows none of the configured keys' algorithms")]
    NoUsableAlgorithm,
}

/// One verification key and what may select it.
struct NamedKey {
    kid: Option<String>,
    /// The one algorithm a JWKS entry pinned with its `alg`, if any.
    pinned: Option<Algorithm>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// Every configured verification key plus the algorithm allow-list.
pub struct KeyRing {
    keys: Vec<NamedKey>,
    allowed: Vec<Algorithm>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .field("allowed", &self.allowed)
            .finish()
    }
}

/// Parses an `alg` name as written in config (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    name.parse().ok()
}

impl KeyRing {
    /// Loads every configured key; `None` when none is configured (auth off).
    pub fn load(settings: &AuthSettings) -> Result<Option<KeyRing>, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.jwt_secret {
            keys.push(NamedKey {
                kid: None,
                pinned: None,
                family: AlgorithmFamily::Hmac,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            });
        }
        for source in &settings.public_keys {
            let pem = read(&source.path)?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| KeyError::NotAPublicKey {
                    path: source.path.clone(),
                })?;
            keys.push(NamedKey {
                kid: source.kid.clone(),
                pinned: None,
                family: key.family(),
                key,
            });
        }
        if let Some(path) = &settings.jwks_file {
            keys.extend(load_jwks(path)?);
        }
        if keys.is_empty() {
            return Ok(None);
        }
        let allowed = if settings.algorithms.is_empty() {
            let mut all: Vec<Algorithm> = Vec::new();
            for k in &keys {
                for alg in k.family.algorithms() {
                    if !all.contains(alg) {
                        all.push(*alg);
                    }
                }
            }
            all
        } else {
            settings
                .algorithms
                .iter()
                .map(|name| {
                    parse_algorithm(name).ok_or_else(|| KeyError::UnknownAlgorithm(name.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        if !allowed
            .iter()
            .any(|alg| keys.iter().any(|k| k.family == alg.family()))
        {
            return Err(KeyError::NoUsableAlgorithm);
        }
        Ok(Some(KeyRing { keys, allowed }))
    }

    /// The algorithms tokens may use.
    pub fn allowed(&self) -> &[Algorithm] {
        &self.allowed
    }

    /// The keys that may verify a token with this header: its `alg` must be allowed; a `kid`
    /// selects the keys named so, no `kid` the keys without a name; only keys of the
    /// algorithm's family (and of its pinned algorithm, for JWKS keys) qualify.
    pub fn candidates(&self, header: &Header) -> Result<Vec<&DecodingKey>, AuthError> {
        let alg = header.alg;
        if !self.allowed.contains(&alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        let usable = |k: &&NamedKey| k.family == alg.family() && k.pinned.is_none_or(|p| p == alg);
        let chosen: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => {
                let named: Vec<&NamedKey> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Err(AuthError::UnknownKid(truncated(kid)));
                }
                named.into_iter().filter(usable).map(|k| &k.key).collect()
            }
            None => self
                .keys
                .iter()
                .filter(|k| k.kid.is_none())
                .filter(usable)
                .map(|k| &k.key)
                .collect(),
        };
        if chosen.is_empty() {
            return Err(AuthError::NoKeyFor(format!("{alg:?}")));
        }
        Ok(chosen)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_jwks(path: &Path) -> Result<Vec<NamedKey>, KeyError> {
    let text = read(path)?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| KeyError::BadJwks {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    set.keys
        .iter()
        .map(|jwk| {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| KeyError::JwksKeyWithoutKid {
                    path: path.to_path_buf(),
                })?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::BadJwks {
                path: path.to_path_buf(),
                detail: format!("key {kid:?}: {e}"),
            })?;
            let pinned = jwk
                .common
                .key_algorithm
                .and_then(|a| parse_algorithm(&a.to_string()));
            Ok(NamedKey {
                kid: Some(kid),
                pinned,
                family: key.family(),
                key,
            })
        })
        .collect()
}

/// A `kid` from a token, cut short for error messages (it is attacker-chosen text).
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}
