//! Topic naming rules, shared by client subscribe/publish, connect-time subscriptions and the
//! HTTP API.
//!
//! One prefix is reserved: `$sys.`, the gateway's own topics ([`SYSTEM_TOPICS`]: every node
//! publishes its snapshots there, see `crate::sys`). `$` is allowed in no other place, so no
//! ordinary topic can look like one; the names under the prefix are exactly the system topics
//! (a typo is refused rather than subscribed to silence); only the gateway publishes to them.

/// The reserved prefix of the gateway's own topics.
pub const SYSTEM_PREFIX: &str = "$sys.";
/// Every node's `metrics` snapshot, every `sys.interval`.
pub const SYS_METRICS: &str = "$sys.metrics";
/// Every node's `health_update` snapshot, every `sys.interval`.
pub const SYS_HEALTH: &str = "$sys.health";
/// The system topics there are.
pub const SYSTEM_TOPICS: [&str; 2] = [SYS_METRICS, SYS_HEALTH];

/// Whether `name` is in the reserved `$sys.` space (clients may subscribe, never publish).
pub fn is_system(name: &str) -> bool {
    name.starts_with(SYSTEM_PREFIX)
}

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
    #[error("{name:?} is not a system topic; the `$sys.` topics are $sys.metrics and $sys.health")]
    UnknownSystemTopic { name: String },
}

/// Checks a topic name: 1..=`max_len` bytes of ASCII letters, digits and `_ - . : / @`, or
/// one of the [`SYSTEM_TOPICS`].
///
/// The alphabet is deliberately narrow: names end up in Redis channel names and keys, in logs
/// and in URLs, and none of these characters needs escaping anywhere (`$`, in the system
/// topics only, needs none in Redis or a URL path either).
pub fn validate(name: &str, max_len: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if is_system(name) {
        return if SYSTEM_TOPICS.contains(&name) {
            Ok(())
        } else {
            Err(TopicError::UnknownSystemTopic {
                name: name.chars().take(64).collect(),
            })
        };
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

    #[test]
    fn system_topics_only_under_the_reserved_prefix() {
        assert!(validate("$sys.metrics", 8).is_ok(), "not bound by max_len");
        assert!(validate("$sys.health", 64).is_ok());
        assert!(matches!(
            validate("$sys.metric", 64),
            Err(TopicError::UnknownSystemTopic { .. })
        ));
        for name in ["$metrics", "a$sys.metrics", "$SYS.metrics", "sys$"] {
            assert!(
                matches!(validate(name, 64), Err(TopicError::BadChar { ch: '$', .. })),
                "{name}"
            );
        }
        assert!(is_system("$sys.health") && !is_system("sys.health"));
    }
}
