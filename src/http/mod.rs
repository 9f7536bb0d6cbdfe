//! The HTTP side of a node: one hyper 1 HTTP/1.1 connection per TCP connection, routed to the
//! WebSocket upgrade, the health endpoints, the status page, or the HTTP API.

pub mod api;
pub mod health;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::node::NodeContext;
use crate::protocol::codes::ErrorCode;
use crate::protocol::envelope::ErrorBody;
use crate::ws;

/// Response body of every HTTP answer.
pub type Body = Full<Bytes>;

/// Serves one accepted TCP connection until it closes or is upgraded away.
pub async fn serve_connection(ctx: Arc<NodeContext>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(route(ctx, req, peer).await) }
    });
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
    }
}

async fn route(ctx: Arc<NodeContext>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if ctx.settings.ws.paths.iter().any(|p| p == path) {
        return ws::upgrade::handle(ctx, req, ws::session::SessionKind::Protocol, peer);
    }
    if ctx.settings.ws.echo_path.as_deref() == Some(path) {
        return ws::upgrade::handle(ctx, req, ws::session::SessionKind::Echo, peer);
    }
    match path {
        "/healthz" => health::healthz(),
        "/readyz" => health::readyz(&ctx),
        "/metrics" => health::metrics(&ctx),
        "/status" => status::page(&ctx),
        p if p.starts_with("/api/") => api::handle(ctx, req, peer).await,
        _ => json_error(ErrorCode::NotFound, format!("no route for {path}")),
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An error in the same codes as the socket: `{"error": {code, numericCode, message}}`.
pub fn json_error(code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody::new(code, message.into());
    let mut resp = json_response(status, &serde_json::json!({ "error": body }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
    }
    resp
}

/// An error body (built by the caller, e.g. with `retryAfter`) answered with `status` rather
/// than its code's own: a refusal before a WebSocket upgrade is a 429 whatever its code.
pub fn json_error_status(status: StatusCode, body: ErrorBody<'_>) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": body }))
}
