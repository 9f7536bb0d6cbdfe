//! Topic permissions: the patterns a token grants, and the namespace rule that decides whether
//! a client may subscribe to or publish on a topic.
//!
//! A token's topics claim (`auth.topics_claim`, default `topics`) is either a list of patterns
//! that grant both actions, or `{"subscribe": [...], "publish": [...]}`. A pattern is a topic
//! name (`news`), a prefix ending in `*` (`chat:*`, or `*` for every topic), and may contain
//! `{sub}`, which stands for the token's own user id (`inbox:{sub}`), so one token format serves
//! every user without listing their ids.

use serde_json::Value;

use crate::config::Access;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
        }
    }
}

/// One granted pattern: an exact topic, or a prefix when it ended in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    prefix: bool,
}

impl Pattern {
    fn parse(raw: &str, user: &str) -> Pattern {
        let text = raw.replace("{sub}", user);
        match text.strip_suffix('*') {
            Some(prefix) => Pattern {
                text: prefix.to_string(),
                prefix: true,
            },
            None => Pattern {
                text,
                prefix: false,
            },
        }
    }

    fn matches(&self, topic: &str) -> bool {
        if self.prefix {
            topic.starts_with(&self.text)
        } else {
            topic == self.text
        }
    }
}

/// The topics one token lets its holder subscribe to and publish on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicGrants {
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
}

/// A topics claim that is not in either accepted shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {claim:?} claim must be a list of topic patterns or {{\"subscribe\": [..], \"publish\": [..]}}")]
pub struct BadGrants {
    pub claim: String,
}

impl TopicGrants {
    /// Reads the topics claim `claim` (absent: no grants) of a token for `user`.
    pub fn from_claim(value: Option<&Value>, claim: &str, user: &str) -> Result<Self, BadGrants> {
        let bad = || BadGrants {
            claim: claim.to_string(),
        };
        let list = |v: &Value| -> Result<Vec<Pattern>, BadGrants> {
            v.as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|p| p.as_str().map(|p| Pattern::parse(p, user)).ok_or_else(bad))
                .collect()
        };
        match value {
            None | Some(Value::Null) => Ok(TopicGrants::default()),
            Some(v @ Value::Array(_)) => {
                let both = list(v)?;
                Ok(TopicGrants {
                    subscribe: both.clone(),
                    publish: both,
                })
            }
            Some(Value::Object(map)) => {
                if map.keys().any(|k| k != "subscribe" && k != "publish") {
                    return Err(bad());
                }
                let get = |key: &str| map.get(key).map(list).transpose();
                Ok(TopicGrants {
                    subscribe: get("subscribe")?.unwrap_or_default(),
                    publish: get("publish")?.unwrap_or_default(),
                })
            }
            Some(_) => Err(bad()),
        }
    }

    /// Whether a pattern grants `action` on `topic`.
    pub fn allows(&self, action: Action, topic: &str) -> bool {
        let patterns = match action {
            Action::Subscribe => &self.subscribe,
            Action::Publish => &self.publish,
        };
        patterns.iter().any(|p| p.matches(topic))
    }
}

/// Why an action on a topic was refused (`PERMISSION_DENIED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("you may not {} {topic:?}: {why}", action.verb())]
pub struct Denied {
    pub action: Action,
    pub topic: String,
    pub why: &'static str,
}

/// Applies a namespace rule: may a client with `user` (its user id, if any) and `grants` do
/// `action` on `topic`?
pub fn check(
    rule: Access,
    action: Action,
    topic: &str,
    user: Option<&str>,
    grants: &TopicGrants,
) -> Result<(), Denied> {
    let why = match rule {
        Access::Anyone => return Ok(()),
        Access::Authenticated if user.is_some() => return Ok(()),
        Access::Granted if grants.allows(action, topic) => return Ok(()),
        Access::Nobody => "its namespace does not allow clients to",
        Access::Authenticated => "its namespace is for authenticated users only",
        Access::Granted => "your token's topics claim does not list it",
    };
    Err(Denied {
        action,
        topic: topic.to_string(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grants(v: Value) -> TopicGrants {
        TopicGrants::from_claim(Some(&v), "topics", "alice").expect("grants")
    }

    #[test]
    fn list_grants_both_actions_with_prefixes_and_sub() {
        let g = grants(json!(["news", "chat:*", "inbox:{sub}"]));
        for action in [Action::Subscribe, Action::Publish] {
            assert!(g.allows(action, "news"));
            assert!(!g.allows(action, "news2"));
            assert!(g.allows(action, "chat:room1"));
            assert!(g.allows(action, "chat:"));
            assert!(!g.allows(action, "chatroom"));
            assert!(g.allows(action, "inbox:alice"));
            assert!(!g.allows(action, "inbox:bob"));
        }
        assert!(grants(json!(["*"])).allows(Action::Publish, "anything"));
    }

    #[test]
    fn object_form_separates_actions() {
        let g = grants(json!({"subscribe": ["feed:*"], "publish": ["feed:alice"]}));
        assert!(g.allows(Action::Subscribe, "feed:bob"));
        assert!(!g.allows(Action::Publish, "feed:bob"));
        assert!(g.allows(Action::Publish, "feed:alice"));
    }

    #[test]
    fn malformed_claims_are_refused() {
        for bad in [
            json!("chat:*"),
            json!([1]),
            json!({"read": []}),
            json!({"subscribe": "x"}),
        ] {
            assert!(
                TopicGrants::from_claim(Some(&bad), "topics", "a").is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            TopicGrants::from_claim(None, "topics", "a"),
            Ok(TopicGrants::default())
        );
    }

    #[test]
    fn rules() {
        let none = TopicGrants::default();
        let g = grants(json!(["chat:*"]));
        let s = Action::Subscribe;
        assert!(check(Access::Anyone, s, "t", None, &none).is_ok());
        assert!(check(Access::Nobody, s, "t", Some("u"), &g).is_err());
        assert!(check(Access::Authenticated, s, "t", Some("u"), &none).is_ok());
        assert!(check(Access::Authenticated, s, "t", None, &none).is_err());
        assert!(check(Access::Granted, s, "chat:1", Some("u"), &g).is_ok());
        let denied = check(Access::Granted, s, "news", Some("u"), &g).expect_err("denied");
        assert!(denied.to_string().contains("topics claim"), "{denied}");
    }
}
