//! Who may connect and who may call the HTTP API.
//!
//! WebSocket identity: with no JWT secret configured, auth is off and the `user_id` query
//! parameter is taken as given; with a secret, the token (query `token` or `Authorization:
//! Bearer`) must be a valid HS256 JWT and its `sub` claim is the user id (`user_id` in the query
//! is ignored). HTTP API: with keys configured a request needs one (`X-API-Key` or `Authorization:
//! Bearer`); with none, only loopback peers may call it.

use std::net::SocketAddr;

use hyper::HeaderMap;
use serde::Deserialize;

use crate::config::Settings;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (query `token` or `Authorization: Bearer`)")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("an API key is required (`X-API-Key` or `Authorization: Bearer`)")]
    MissingApiKey,
    #[error("the API key is not valid")]
    WrongApiKey,
    #[error("no API key is configured, so the API answers loopback callers only")]
    NotLoopback,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// The user id of a connecting client, or why it may not connect.
pub fn connecting_user(
    settings: &Settings,
    token: Option<&str>,
    query_user: Option<String>,
) -> Result<Option<String>, AuthError> {
    let Some(secret) = &settings.jwt_secret else {
        return Ok(query_user);
    };
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::MissingToken)?;
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
    Ok(Some(data.claims.sub))
}

/// Whether an HTTP API request may proceed.
pub fn check_api_access(
    settings: &Settings,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(), AuthError> {
    if settings.api_keys.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(AuthError::NotLoopback)
        };
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let offered = header("x-api-key")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(str::trim)
        .ok_or(AuthError::MissingApiKey)?;
    if settings
        .api_keys
        .iter()
        .any(|k| constant_time_eq(k.as_bytes(), offered.as_bytes()))
    {
        Ok(())
    } else {
        Err(AuthError::WrongApiKey)
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_with_keys(keys: &[&str]) -> Settings {
        Settings {
            api_keys: keys.iter().map(|k| k.to_string()).collect(),
            ..Settings::for_loopback()
        }
    }

    #[test]
    fn api_without_keys_is_loopback_only() {
        let s = settings_with_keys(&[]);
        let h = HeaderMap::new();
        assert!(check_api_access(&s, &h, "127.0.0.1:1".parse().expect("addr")).is_ok());
        assert_eq!(
            check_api_access(&s, &h, "10.0.0.1:1".parse().expect("addr")),
            Err(AuthError::NotLoopback)
        );
    }

    #[test]
    fn api_keys_by_either_header() {
        let s = settings_with_keys(&["k1", "k2"]);
        let peer = "10.0.0.1:1".parse().expect("addr");
        let mut h = HeaderMap::new();
        assert_eq!(
            check_api_access(&s, &h, peer),
            Err(AuthError::MissingApiKey)
        );
        h.insert("x-api-key", "k2".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_ok());
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_ok());
        h.insert("authorization", "Bearer k3".parse().expect("header"));
        assert_eq!(check_api_access(&s, &h, peer), Err(AuthError::WrongApiKey));
    }
}
