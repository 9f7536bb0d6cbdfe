//! HTTP API access: an API key from the configured list, or, with none configured, a loopback
//! caller.
//!
//! Keys come from `api.keys` or `--api-key`/`WSGATE_API_KEYS` and arrive as `X-API-Key: KEY` or
//! `Authorization: Bearer KEY`. Every configured key is compared in constant time (the `subtle`
//! crate) and all of them are always compared, so neither the position of a matching key nor
//! how much of a key matched shows in the response time.

use std::net::SocketAddr;

use hyper::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::Settings;

/// Why an HTTP API request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAccessError {
    #[error("an API key is required (`X-API-Key` or `Authorization: Bearer`)")]
    MissingApiKey,
    #[error("the API key is not valid")]
    WrongApiKey,
    #[error("no API key is configured, so the API answers loopback callers only")]
    NotLoopback,
}

/// Whether an HTTP API request may proceed.
pub fn check_api_access(
    settings: &Settings,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(), ApiAccessError> {
    if settings.api_keys.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(ApiAccessError::NotLoopback)
        };
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let offered = header("x-api-key")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(str::trim)
        .ok_or(ApiAccessError::MissingApiKey)?;
    let matched = settings
        .api_keys
        .iter()
        .fold(subtle::Choice::from(0), |acc, key| {
            acc | key.expose().as_bytes().ct_eq(offered.as_bytes())
        });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiAccessError::WrongApiKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn settings_with_keys(keys: &[&str]) -> Settings {
        Settings {
            api_keys: keys.iter().map(|k| Secret::from(*k)).collect(),
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
            Err(ApiAccessError::NotLoopback)
        );
    }

    #[test]
    fn api_keys_by_either_header() {
        let s = settings_with_keys(&["k1", "k2"]);
        let peer = "10.0.0.1:1".parse().expect("addr");
        let mut h = HeaderMap::new();
        assert_eq!(
            check_api_access(&s, &h, peer),
            Err(ApiAccessError::MissingApiKey)
        );
        h.insert("x-api-key", "k2".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_ok());
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_ok());
        h.insert("authorization", "Bearer k3".parse().expect("header"));
        assert_eq!(
            check_api_access(&s, &h, peer),
            Err(ApiAccessError::WrongApiKey)
        );
        // A prefix of a key, or a key with extra bytes, is not the key.
        h.insert("authorization", "Bearer k".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_err());
        h.insert("authorization", "Bearer k11".parse().expect("header"));
        assert!(check_api_access(&s, &h, peer).is_err());
    }
}
