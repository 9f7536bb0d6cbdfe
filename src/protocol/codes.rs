//! Every refusal the gateway can give, in one table: error codes (string + numeric twin + HTTP
//! status) and WebSocket close codes (with whether a client should reconnect).
//!
//! `docs/protocol.md` documents these tables; a unit test checks that the document lists every
//! code defined here, so the two cannot drift apart.

use serde::Serialize;

/// The `data.code` of an `error` message, and the `error.code` of an HTTP API error.
///
/// The numeric twins follow the front-end spec's ranges: 1xxx connection, 2xxx message,
/// 3xxx business rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, not an object, missing or non-string `type`, binary frame, bad field shape.
    InvalidMessageFormat,
    /// A message or request body over the configured size limit.
    MessageTooLarge,
    /// The connection's inbound token bucket is empty.
    RateLimitExceeded,
    /// Missing or invalid credentials (token or API key).
    Unauthorized,
    /// Credentials are fine but the action is not allowed (namespace, broadcast, origin).
    PermissionDenied,
    /// A subscribe/unsubscribe request that cannot be honoured as a whole.
    InvalidSubscription,
    /// A topic name that breaks the naming rules.
    InvalidTopic,
    /// More subscriptions than one connection may hold.
    TooManySubscriptions,
    /// A request the gateway understands but cannot carry out here (e.g. no backend).
    InvalidOperation,
    /// The node (or cluster) holds its maximum number of connections.
    TooManyConnections,
    /// The client could not keep up with its messages.
    SlowConsumer,
    /// No such route or resource (HTTP API).
    NotFound,
    /// HTTP method not allowed on this route.
    MethodNotAllowed,
    /// The node is shutting down or not ready.
    Unavailable,
    /// A bug or an unexpected failure inside the gateway.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation checks.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::InvalidMessageFormat,
        ErrorCode::MessageTooLarge,
        ErrorCode::RateLimitExceeded,
        ErrorCode::Unauthorized,
        ErrorCode::PermissionDenied,
        ErrorCode::InvalidSubscription,
        ErrorCode::InvalidTopic,
        ErrorCode::TooManySubscriptions,
        ErrorCode::InvalidOperation,
        ErrorCode::TooManyConnections,
        ErrorCode::SlowConsumer,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The string code clients match on.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessageFormat => "INVALID_MESSAGE_FORMAT",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::InvalidSubscription => "INVALID_SUBSCRIPTION",
            ErrorCode::InvalidTopic => "INVALID_TOPIC",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            ErrorCode::InvalidOperation => "INVALID_OPERATION",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL_ERROR",
        }
    }

    /// The numeric twin from the front-end spec (`WsErrorCode`).
    pub fn numeric(self) -> u16 {
        match self {
            ErrorCode::TooManyConnections => 1000,
            ErrorCode::Unauthorized => 1001,
            ErrorCode::Unavailable => 1003,
            ErrorCode::Internal => 1004,
            ErrorCode::InvalidMessageFormat => 2000,
            ErrorCode::MessageTooLarge => 2001,
            ErrorCode::RateLimitExceeded => 2002,
            ErrorCode::SlowConsumer => 2003,
            ErrorCode::InvalidSubscription => 3000,
            ErrorCode::PermissionDenied => 3001,
            ErrorCode::InvalidOperation => 3002,
            ErrorCode::TooManySubscriptions => 3003,
            ErrorCode::InvalidTopic => 3004,
            ErrorCode::NotFound => 3005,
            ErrorCode::MethodNotAllowed => 3006,
        }
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidMessageFormat
            | ErrorCode::InvalidSubscription
            | ErrorCode::InvalidTopic
            | ErrorCode::TooManySubscriptions
            | ErrorCode::InvalidOperation => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::MessageTooLarge => 413,
            ErrorCode::RateLimitExceeded | ErrorCode::SlowConsumer => 429,
            ErrorCode::Internal => 500,
            ErrorCode::TooManyConnections | ErrorCode::Unavailable => 503,
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Close codes the gateway sends, with what a client should do after each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client asked to close.
    Normal,
    /// 1001: the node is shutting down; reconnect (the load balancer picks another node).
    GoingAway,
    /// 1002: a WebSocket protocol violation (e.g. an unmasked client frame).
    ProtocolError,
    /// 1007: a text message that is not valid UTF-8.
    InvalidPayload,
    /// 1009: a message over `max_message_size`, counted over all its fragments.
    MessageTooBig,
    /// 1011: an unexpected server failure.
    InternalError,
    /// 1013: the node or cluster is full; reconnect with backoff.
    TryAgainLater,
    /// 4001: authentication failed; get a new token before reconnecting.
    Unauthorized,
    /// 4002: nothing received within the idle timeout.
    IdleTimeout,
    /// 4003: disconnected by an operator through the HTTP API.
    DisconnectedByServer,
    /// 4004: the token expired and no `refresh` came in time; reconnect with a fresh token.
    TokenExpired,
    /// 4008: the client did not read its messages fast enough (send queue over its bound).
    SlowConsumer,
    /// 4029: this user already holds as many connections as one user may.
    UserConnectionLimit,
}

impl CloseCode {
    pub const ALL: [CloseCode; 13] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::TryAgainLater,
        CloseCode::Unauthorized,
        CloseCode::IdleTimeout,
        CloseCode::DisconnectedByServer,
        CloseCode::TokenExpired,
        CloseCode::SlowConsumer,
        CloseCode::UserConnectionLimit,
    ];

    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4001,
            CloseCode::IdleTimeout => 4002,
            CloseCode::DisconnectedByServer => 4003,
            CloseCode::TokenExpired => 4004,
            CloseCode::SlowConsumer => 4008,
            CloseCode::UserConnectionLimit => 4029,
        }
    }

    /// Whether a client should reconnect after this close (the `reconnect` of a `disconnect`).
    pub fn reconnect(self) -> bool {
        match self {
            CloseCode::GoingAway
            | CloseCode::InternalError
            | CloseCode::TryAgainLater
            | CloseCode::IdleTimeout
            | CloseCode::TokenExpired
            | CloseCode::SlowConsumer => true,
            CloseCode::Normal
            | CloseCode::ProtocolError
            | CloseCode::InvalidPayload
            | CloseCode::MessageTooBig
            | CloseCode::Unauthorized
            | CloseCode::DisconnectedByServer
            | CloseCode::UserConnectionLimit => false,
        }
    }

    /// Whether `code` may appear in a close frame a peer sends (RFC 6455 7.4): the defined
    /// codes 1000-1003 and 1007-1011, the IANA-registered 1012-1014, and 3000-4999 (libraries
    /// and applications). 1004-1006 and 1015 are reserved or must never be sent; anything else
    /// is unassigned.
    pub fn peer_may_send(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/protocol.md must list every code with its numeric twin, and every close code.
    #[test]
    fn protocol_doc_lists_every_code() {
        let doc = include_str!("../../docs/protocol.md");
        for code in ErrorCode::ALL {
            let row = format!("`{}` | {}", code.as_str(), code.numeric());
            assert!(doc.contains(&row), "docs/protocol.md lacks the row {row:?}");
        }
        for code in CloseCode::ALL {
            let yes_no = if code.reconnect() { "yes" } else { "no" };
            let row = format!("| {} | {yes_no} |", code.as_u16());
            assert!(doc.contains(&row), "docs/protocol.md lacks the row {row:?}");
        }
    }

    #[test]
    fn close_codes_a_peer_may_send() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1011, 1013, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode::peer_may_send(code), "{code}");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode::peer_may_send(code), "{code}");
        }
    }

    #[test]
    fn numeric_twins_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.numeric()), "{code} reuses a number");
        }
    }
}
