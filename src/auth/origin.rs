//! Which browser origins may open a WebSocket (`websocket.allowed_origins`).
//!
//! The allow-list exists to stop other sites' pages from opening sockets with a user's cookies.
//! Only browsers send `Origin`, so a request without one is not refused here. An entry is an
//! exact origin (`https://app.example.com`, compared case-insensitively), `*` for any origin, or
//! a scheme with a wildcard subdomain (`https://*.example.com`, which matches
//! `https://eu.example.com` and `https://a.b.example.com` but not `https://example.com` nor
//! `https://evil-example.com`).

/// Whether a request with `origin` (its `Origin` header, if any) may connect.
pub fn allowed(allow_list: &[String], origin: Option<&[u8]>) -> bool {
    if allow_list.is_empty() {
        return true;
    }
    let Some(origin) = origin else {
        return true;
    };
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    allow_list.iter().any(|entry| entry_matches(entry, origin))
}

fn entry_matches(entry: &str, origin: &str) -> bool {
    if entry == "*" || entry.eq_ignore_ascii_case(origin) {
        return true;
    }
    let Some((scheme, suffix)) = entry.split_once("://*.") else {
        return false;
    };
    let Some((origin_scheme, host)) = origin.split_once("://") else {
        return false;
    };
    // The host part must end in ".suffix" with at least one label before it.
    origin_scheme.eq_ignore_ascii_case(scheme)
        && host.len() > suffix.len() + 1
        && host.is_char_boundary(host.len() - suffix.len() - 1)
        && host[host.len() - suffix.len() - 1..].eq_ignore_ascii_case(&format!(".{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn empty_list_and_missing_origin_are_allowed() {
        assert!(allowed(&[], Some(b"https://evil.com")));
        assert!(allowed(&list(&["https://a.com"]), None));
    }

    #[test]
    fn exact_and_any() {
        let l = list(&["https://app.example.com"]);
        assert!(allowed(&l, Some(b"https://APP.example.com")));
        assert!(!allowed(&l, Some(b"http://app.example.com")));
        assert!(!allowed(&l, Some(b"https://app.example.com.evil.com")));
        assert!(allowed(&list(&["*"]), Some(b"null")));
        assert!(!allowed(&l, Some(b"\xff")));
    }

    #[test]
    fn wildcard_subdomains() {
        let l = list(&["https://*.example.com"]);
        assert!(allowed(&l, Some(b"https://eu.example.com")));
        assert!(allowed(&l, Some(b"https://a.b.example.com")));
        assert!(!allowed(&l, Some(b"https://eu.example.com:8443")));
        assert!(!allowed(&l, Some(b"https://example.com")));
        assert!(!allowed(&l, Some(b"https://evil-example.com")));
        assert!(!allowed(&l, Some(b"https://.example.com")));
        assert!(!allowed(&l, Some(b"http://eu.example.com")));
        assert!(!allowed(&l, Some(b"https://example.com.evil.org")));
    }
}
