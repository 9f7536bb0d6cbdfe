//! The HTTP API for backends and operators (SPEC section 4): publish, send, broadcast,
//! disconnect, status, presence, topic history and node info. Requests pass the API key check
//! in `auth`; errors use the socket's codes.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::{json_error, json_response, Body};
use crate::auth::{self, ApiAccessError};
use crate::broker::{BrokerError, Direct, DisconnectTarget, Recipient, TopicMessage};
use crate::history::StreamPosition;
use crate::hub::ConnId;
use crate::node::NodeContext;
use crate::protocol::codes::ErrorCode;
use crate::protocol::topic;

/// A refusal, turned into a JSON error response at the edge (`handle`).
#[derive(Debug)]
struct ApiError {
    code: ErrorCode,
    message: String,
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
        allow: None,
    }
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError {
        allow: Some(allow),
        ..refuse(ErrorCode::MethodNotAllowed, format!("use {allow}"))
    }
}

impl ApiError {
    fn into_response(self) -> Response<Body> {
        let mut resp = json_error(self.code, self.message);
        if let Some(allow) = self.allow {
            resp.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(allow),
            );
        }
        resp
    }
}

type ApiResult = Result<Response<Body>, ApiError>;

pub async fn handle(
    ctx: Arc<NodeContext>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    if let Err(e) = auth::check_api_access(&ctx.settings, req.headers(), peer) {
        let code = match e {
            ApiAccessError::NotLoopback => ErrorCode::PermissionDenied,
            _ => ErrorCode::Unauthorized,
        };
        return json_error(code, e.to_string());
    }
    let route = (req.method().clone(), req.uri().path().to_string());
    let result = match (&route.0, route.1.as_str()) {
        (&Method::GET, "/api/ws/status") => status(&ctx).await,
        (&Method::GET, "/api/info") => info(&ctx).await,
        (&Method::GET, "/api/presence") => presence(&ctx, &req).await,
        (&Method::POST, "/api/publish") => publish(&ctx, req).await,
        (&Method::POST, "/api/ws/send") => send(&ctx, req).await,
        (&Method::POST, "/api/ws/broadcast") => broadcast(&ctx, req).await,
        (&Method::POST, "/api/disconnect") => disconnect(&ctx, req).await,
        (method, path) if path.starts_with(HISTORY_PREFIX) => {
            if *method == Method::GET {
                history(&ctx, &req).await
            } else {
                Err(method_not_allowed("GET"))
            }
        }
        (_, "/api/ws/status" | "/api/info" | "/api/presence") => Err(method_not_allowed("GET")),
        (_, "/api/publish" | "/api/ws/send" | "/api/ws/broadcast" | "/api/disconnect") => {
            Err(method_not_allowed("POST"))
        }
        (_, path) => Err(refuse(ErrorCode::NotFound, format!("no API route {path}"))),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Reads a JSON body of at most `max_message_size` bytes into `T`.
async fn read_json<T: for<'de> Deserialize<'de>>(
    ctx: &NodeContext,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let limit = ctx.settings.ws.max_message_size;
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(refuse(
                ErrorCode::MessageTooLarge,
                format!("request body is over the {limit}-byte limit"),
            ))
        }
        Err(e) => {
            return Err(refuse(
                ErrorCode::InvalidMessageFormat,
                format!("could not read the body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        refuse(
            ErrorCode::InvalidMessageFormat,
            format!("invalid JSON body: {e}"),
        )
    })
}

/// Deserializes a field that is present, `null` included (plain `Option` would turn an
/// explicit `null` into "absent").
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The payload of a request: `data`, or `content` (then repeated as `content` to clients).
fn payload(
    data: Option<Box<RawValue>>,
    content: Option<Box<RawValue>>,
) -> Result<(Box<RawValue>, bool), ApiError> {
    match (data, content) {
        (Some(d), _) => Ok((d, false)),
        (None, Some(c)) => Ok((c, true)),
        (None, None) => Err(refuse(
            ErrorCode::InvalidMessageFormat,
            "the body needs `data` or `content`",
        )),
    }
}

fn require_type(kind: Option<String>) -> Result<String, ApiError> {
    kind.filter(|k| !k.is_empty()).ok_or_else(|| {
        refuse(
            ErrorCode::InvalidMessageFormat,
            "the body needs a non-empty `type`",
        )
    })
}

#[derive(Deserialize)]
struct PublishBody {
    topic: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    /// Publishes with the same key within the window are published once.
    #[serde(rename = "idempotencyKey", default)]
    idempotency_key: Option<String>,
    #[serde(rename = "requireAck", default)]
    require_ack: bool,
}

async fn publish(ctx: &NodeContext, req: Request<Incoming>) -> ApiResult {
    let body: PublishBody = read_json(ctx, req).await?;
    let topic = body
        .topic
        .ok_or_else(|| refuse(ErrorCode::InvalidMessageFormat, "the body needs a `topic`"))?;
    topic::validate(&topic, ctx.settings.ws.max_topic_length)
        .map_err(|e| refuse(ErrorCode::InvalidTopic, e.to_string()))?;
    if topic::is_system(&topic) {
        return Err(refuse(
            ErrorCode::PermissionDenied,
            format!("{topic} is a system topic: only the gateway publishes there"),
        ));
    }
    let kind = require_type(body.kind)?;
    let (data, _) = payload(body.data, None)?;
    let receipt = ctx
        .broker
        .publish(TopicMessage {
            idempotency_key: body.idempotency_key,
            require_ack: body.require_ack,
            ..TopicMessage::new(topic.clone(), kind, data)
        })
        .await
        .map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "topic": topic, "seq": receipt.seq, "epoch": receipt.epoch,
                "delivered": receipt.delivered_here, "duplicate": receipt.duplicate}),
    ))
}

#[derive(Deserialize)]
struct SendBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    to: Option<String>,
    #[serde(rename = "connectionId")]
    connection_id: Option<ConnId>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    content: Option<Box<RawValue>>,
}

async fn send(ctx: &NodeContext, req: Request<Incoming>) -> ApiResult {
    let body: SendBody = read_json(ctx, req).await?;
    let kind = require_type(body.kind)?;
    let recipient = match (body.to, body.connection_id) {
        (Some(to), _) if !to.is_empty() => Recipient::User(to),
        (_, Some(id)) => Recipient::Connection(id),
        _ => {
            return Err(refuse(
                ErrorCode::InvalidMessageFormat,
                "the body needs `to` (a user id) or `connectionId`",
            ))
        }
    };
    let (data, as_content) = payload(body.data, body.content)?;
    deliver(
        ctx,
        Direct {
            recipient,
            kind,
            from: None,
            data,
            as_content,
        },
    )
    .await
}

#[derive(Deserialize)]
struct BroadcastBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    content: Option<Box<RawValue>>,
}

async fn broadcast(ctx: &NodeContext, req: Request<Incoming>) -> ApiResult {
    let body: BroadcastBody = read_json(ctx, req).await?;
    let kind = require_type(body.kind)?;
    let (data, as_content) = payload(body.data, body.content)?;
    deliver(
        ctx,
        Direct {
            recipient: Recipient::Everyone,
            kind,
            from: None,
            data,
            as_content,
        },
    )
    .await
}

async fn deliver(ctx: &NodeContext, msg: Direct) -> ApiResult {
    let delivered = ctx.broker.send(msg).await.map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "delivered": delivered}),
    ))
}

#[derive(Deserialize)]
struct DisconnectBody {
    #[serde(rename = "userId", alias = "user_id")]
    user_id: Option<String>,
    #[serde(rename = "clientId", alias = "client_id")]
    client_id: Option<String>,
}

async fn disconnect(ctx: &NodeContext, req: Request<Incoming>) -> ApiResult {
    let body: DisconnectBody = read_json(ctx, req).await?;
    let target = match (body.user_id, body.client_id) {
        (Some(u), _) if !u.is_empty() => DisconnectTarget::User(u),
        (_, Some(c)) if !c.is_empty() => DisconnectTarget::Client(c),
        _ => {
            return Err(refuse(
                ErrorCode::InvalidMessageFormat,
                "the body needs `userId` or `clientId`",
            ))
        }
    };
    let n = ctx.broker.disconnect(target).await.map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "disconnected": n}),
    ))
}

async fn status(ctx: &NodeContext) -> ApiResult {
    let cluster = ctx.broker.cluster_status().await.map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "online_count": cluster.online_count,
            "online_users": cluster.online_users,
            "online_user_count": cluster.online_users.len(),
            "nodes": cluster.nodes.len(),
            "node": ctx.settings.node_id,
            "node_connections": ctx.hub.connection_count(),
            "node_topics": ctx.hub.topic_count(),
        }),
    ))
}

async fn info(ctx: &NodeContext) -> ApiResult {
    let cluster = ctx.broker.cluster_status().await.map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "node": ctx.settings.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "broker": ctx.broker.name(),
            "uptime_seconds": ctx.started_at.elapsed().as_secs(),
            "ready": !ctx.is_shutting_down() && ctx.broker.is_ready(),
            "max_connections": ctx.slots.max(),
            "node_connection_limit": ctx.slots.limit(),
            "nodes": cluster.nodes,
        }),
    ))
}

async fn presence(ctx: &NodeContext, req: &Request<Incoming>) -> ApiResult {
    let query = req.uri().query().unwrap_or_default();
    let topic = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "topic")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| refuse(ErrorCode::InvalidMessageFormat, "add ?topic=NAME"))?;
    if !ctx.settings.namespace_of(&topic).presence {
        return Err(refuse(
            ErrorCode::InvalidOperation,
            format!("presence is off in the namespace of {topic:?}"),
        ));
    }
    let members = ctx
        .broker
        .topic_presence(&topic)
        .await
        .map_err(unavailable)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"topic": topic, "count": members.len(), "members": members}),
    ))
}

/// `GET /api/history/{topic}`: everything after the topic's path segment is the topic name,
/// percent-decoded (names may hold `/` and `:`).
const HISTORY_PREFIX: &str = "/api/history/";
/// `limit` when the query has none.
const HISTORY_DEFAULT_LIMIT: usize = 100;
/// The largest `limit` accepted.
const HISTORY_MAX_LIMIT: usize = 10_000;

/// The answer of `GET /api/history/{topic}`.
#[derive(Serialize)]
struct HistoryResponse<'a> {
    topic: &'a str,
    /// Where the topic's stream stands now; `null` when nothing is on record.
    position: Option<&'a StreamPosition>,
    /// Whether `publications` is everything after `since` (always true without `since`).
    complete: bool,
    /// Each publication exactly as subscribers receive it, oldest first.
    publications: Vec<Box<RawValue>>,
}

/// A topic's history: after `since` (with `epoch`), or the newest `limit` without it.
async fn history(ctx: &NodeContext, req: &Request<Incoming>) -> ApiResult {
    let raw_topic = req.uri().path()[HISTORY_PREFIX.len()..].to_string();
    let topic = percent_decode(&raw_topic).ok_or_else(|| {
        refuse(
            ErrorCode::InvalidTopic,
            format!("topic {raw_topic:?} is not valid percent-encoded UTF-8"),
        )
    })?;
    topic::validate(&topic, ctx.settings.ws.max_topic_length)
        .map_err(|e| refuse(ErrorCode::InvalidTopic, e.to_string()))?;
    let query = req.uri().query().unwrap_or_default();
    let (mut since, mut epoch, mut limit) = (None, None, None);
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "since" => since = Some(value.into_owned()),
            "epoch" => epoch = Some(value.into_owned()),
            "limit" => limit = Some(value.into_owned()),
            _ => {}
        }
    }
    let bad = |message: String| refuse(ErrorCode::InvalidMessageFormat, message);
    let since = match (since, epoch) {
        (None, None) => None,
        (Some(seq), Some(epoch)) => Some(StreamPosition {
            seq: seq
                .parse()
                .map_err(|_| bad(format!("`since` must be a seq number, not {seq:?}")))?,
            epoch,
        }),
        (Some(_), None) => return Err(bad("`since` needs `epoch` (add &epoch=...)".into())),
        (None, Some(_)) => return Err(bad("`epoch` needs `since` (add &since=SEQ)".into())),
    };
    let limit = match limit {
        None => HISTORY_DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= HISTORY_MAX_LIMIT)
            .ok_or_else(|| {
                bad(format!(
                    "`limit` must be a number from 0 to {HISTORY_MAX_LIMIT}, not {l:?}"
                ))
            })?,
    };
    if !ctx.settings.namespace_of(&topic).history.enabled() {
        return Err(refuse(
            ErrorCode::InvalidOperation,
            format!("history is off in the namespace of {topic:?}"),
        ));
    }
    let page = ctx
        .broker
        .history(&topic, since.as_ref(), limit)
        .await
        .map_err(unavailable)?;
    let publications = page
        .publications
        .iter()
        .map(|p| {
            let payload = crate::ws::frame::payload_of(p.frame.plain());
            std::str::from_utf8(payload)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_string()).ok())
                .ok_or_else(|| {
                    refuse(
                        ErrorCode::Internal,
                        "a publication in history is not a JSON text frame",
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json_response(
        StatusCode::OK,
        &HistoryResponse {
            topic: &topic,
            position: page.position.as_ref(),
            complete: page.complete,
            publications,
        },
    ))
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`); `None` for a broken escape or a
/// result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn unavailable(e: BrokerError) -> ApiError {
    refuse(ErrorCode::Unavailable, e.to_string())
}
