//! Topic naming rules, shared by client subscribe/publish, connect-time subscriptions and the
//! HTTP API.

/// Why a topic name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name {name:?} is {len} bytes, over the {max}-byte limit")]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("topic name {name:?} contains {ch:?}; allowed are letters, digits and _ - . : / @")]
    BadChar { name: String, ch: char },
}

/// Checks a topic name: 1..=`max_len` bytes of ASCII letters, digits and `_ - . : / @`.
///
/// The alphabet is deliberately narrow: names end up in Redis channel names and keys, in logs
/// and in URLs, and none of these characters needs escaping anywhere.
pub fn validate(name: &str, max_len: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > max_len {
        return Err(TopicError::TooLong {
            name: name.chars().take(32).collect::<String>() + "...",
            len: name.len(),
            max: max_len,
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '@')))
    {
        return Err(TopicError::BadChar {
            name: name.to_string(),
            ch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_edge() {
        assert!(validate(&"a".repeat(8), 8).is_ok());
        assert!(matches!(
            validate(&"a".repeat(9), 8),
            Err(TopicError::TooLong { .. })
        ));
    }

    #[test]
    fn alphabet() {
        assert!(validate("alert.cpu", 64).is_ok());
        assert!(validate("chat:room-1/a@b_c", 64).is_ok());
        assert_eq!(validate("", 64), Err(TopicError::Empty));
        assert!(matches!(
            validate("a b", 64),
            Err(TopicError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            validate("a*", 64),
            Err(TopicError::BadChar { ch: '*', .. })
        ));
    }
}
