//! Who a client is and what it may do.
//!
//! - [`Authenticator`]: the identity of a connecting client. With no key configured auth is off
//!   (development): the `user_id` query parameter is taken as given. With any key configured
//!   every connection needs a valid JWT (query `token` or `Authorization: Bearer`); its `sub` is
//!   the user id, its topics claim the [`TopicGrants`], its `exp` (plus leeway) when the
//!   connection must have sent a `refresh` with a new token. `user_id` in the query is ignored.
//! - `keys`: which configured key may verify which token (allow-listed algorithms, `kid`).
//!   With a JWKS file, a token naming a `kid` nobody has makes the node read its keys again
//!   (at most once per [`KEY_RELOAD_INTERVAL`]), so keys rotated into the file are taken
//!   without a restart.
//! - `grants`: topic patterns from the token and the namespace rules applied to them.
//! - `api_key`: HTTP API keys.
//! - `origin`: which browser origins may open a WebSocket.
//!
//! Tokens and keys never reach a log line: errors describe what was wrong with a token, never
//! the token itself, and configured secrets are [`crate::config::Secret`]s.

pub mod api_key;
pub mod grants;
pub mod keys;
pub mod origin;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::AuthSettings;

pub use api_key::{check_api_access, ApiAccessError};
pub use grants::{Action, Denied, TopicGrants};
pub use keys::{parse_algorithm, KeyError, KeyRing};

/// Why a token was refused (`UNAUTHORIZED`, close 4001 at connect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (query `token` or `Authorization: Bearer`)")]
    MissingToken,
    #[error("the token is {len} bytes, over the {max}-byte limit")]
    TokenTooLong { len: usize, max: usize },
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("tokens signed with {0} are not accepted here")]
    AlgorithmNotAllowed(String),
    #[error("no key has the token's kid {0:?}")]
    UnknownKid(String),
    #[error("no configured key verifies {0} tokens without a kid")]
    NoKeyFor(String),
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// What a verified connection is allowed to be.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `sub` of the token; with auth off, the `user_id` query parameter.
    pub user_id: Option<String>,
    /// Topics the token grants (empty with auth off).
    pub grants: TopicGrants,
    /// When the connection must have refreshed its token: `exp` plus the leeway. `None` with
    /// auth off.
    pub expires_at: Option<SystemTime>,
}

/// The claims the gateway reads; the topics claim is looked up by its configured name.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// With a JWKS file: the least time between two reloads of the keys (each one started by a token
/// with an unknown `kid`), so that tokens with made-up kids cannot make the node read files in
/// a loop.
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The keys in use, and what reloading them needs.
#[derive(Debug)]
struct Keys {
    ring: parking_lot::RwLock<Arc<KeyRing>>,
    /// Set when a JWKS file is configured: the settings to load from again.
    reload: Option<AuthSettings>,
    last_reload: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl Keys {
    /// Reads the keys again (JWKS configured, and none read within [`KEY_RELOAD_INTERVAL`]);
    /// the new ring when that worked. A file that fails to load keeps the old keys.
    fn reloaded(&self) -> Option<Arc<KeyRing>> {
        let settings = self.reload.as_ref()?;
        {
            let mut last = self.last_reload.lock();
            if last.is_some_and(|at| at.elapsed() < KEY_RELOAD_INTERVAL) {
                return None;
            }
            *last = Some(std::time::Instant::now());
        }
        match KeyRing::load(settings) {
            Ok(Some(ring)) => {
                let ring = Arc::new(ring);
                *self.ring.write() = Arc::clone(&ring);
                tracing::info!("verification keys read again (a token named an unknown kid)");
                Some(ring)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "verification keys could not be read again; keeping the old ones");
                None
            }
        }
    }
}

/// Verifies tokens against the configured keys and rules.
#[derive(Debug)]
pub struct Authenticator {
    keys: Option<Keys>,
    leeway: Duration,
    max_token_bytes: usize,
    topics_claim: String,
    audience: Option<String>,
    issuer: Option<String>,
}

impl Authenticator {
    /// Loads the keys named in `settings` (read here; with a JWKS file, again when a token
    /// names an unknown `kid`).
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, KeyError> {
        Ok(Authenticator {
            keys: KeyRing::load(settings)?.map(|ring| Keys {
                ring: parking_lot::RwLock::new(Arc::new(ring)),
                reload: settings.jwks_file.is_some().then(|| settings.clone()),
                last_reload: parking_lot::Mutex::new(None),
            }),
            leeway: settings.leeway,
            max_token_bytes: settings.max_token_bytes,
            topics_claim: settings.topics_claim.clone(),
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
        })
    }

    /// Whether connections need a token.
    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// The identity of a connecting client: from its token when auth is on, else from the
    /// `user_id` query parameter.
    pub fn connecting(
        &self,
        token: Option<&str>,
        query_user: Option<String>,
    ) -> Result<Credentials, AuthError> {
        if !self.enabled() {
            return Ok(Credentials {
                user_id: query_user,
                ..Credentials::default()
            });
        }
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        self.verify(token)
    }

    /// Verifies one token (at connect, or a `refresh`).
    pub fn verify(&self, token: &str) -> Result<Credentials, AuthError> {
        let Some(keys) = &self.keys else {
            return Err(AuthError::Invalid("authentication is off".into()));
        };
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TokenTooLong {
                len: token.len(),
                max: self.max_token_bytes,
            });
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Malformed(describe(e.kind())))?;
        let ring = Arc::clone(&keys.ring.read());
        match self.verify_with(&ring, token, &header) {
            Err(AuthError::UnknownKid(kid)) => match keys.reloaded() {
                Some(ring) => self.verify_with(&ring, token, &header),
                None => Err(AuthError::UnknownKid(kid)),
            },
            other => other,
        }
    }

    fn verify_with(
        &self,
        keys: &KeyRing,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<Credentials, AuthError> {
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let mut last = AuthError::BadSignature;
        for key in keys.candidates(header)? {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return self.credentials(data.claims),
                Err(e) => last = refusal(e.kind()),
            }
        }
        Err(last)
    }

    fn credentials(&self, claims: Claims) -> Result<Credentials, AuthError> {
        let sub = claims.sub.filter(|s| !s.is_empty()).ok_or_else(|| {
            AuthError::Invalid("the `sub` claim (the user id) is required".into())
        })?;
        let grants = TopicGrants::from_claim(
            claims.rest.get(&self.topics_claim),
            &self.topics_claim,
            &sub,
        )
        .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway;
        // jsonwebtoken accepts `exp == now`; such a connection would be closed for expiry at
        // once, and its client would reconnect with the same token in a tight loop.
        if expires_at <= SystemTime::now() {
            return Err(AuthError::Expired);
        }
        Ok(Credentials {
            expires_at: Some(expires_at),
            user_id: Some(sub),
            grants,
        })
    }
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed("this".into()),
        other => AuthError::Invalid(describe(other)),
    }
}

/// A short description of what was wrong, without echoing any part of the token.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidToken => "not three base64url parts".into(),
        ErrorKind::Base64(_) => "bad base64url".into(),
        ErrorKind::Json(e) => match e.classify() {
            serde_json::error::Category::Data => {
                "unsupported `alg` or claims of the wrong type".into()
            }
            _ => "bad JSON".into(),
        },
        ErrorKind::Utf8(_) => "not UTF-8".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the `{c}` claim is required"),
        ErrorKind::InvalidAudience => "wrong audience (aud)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".into(),
        ErrorKind::InvalidAlgorithmName => "unsupported or missing alg".into(),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}
