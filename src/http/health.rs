//! Liveness and readiness for load balancers and orchestrators.
//!
//! `/healthz` answers 200 while the process serves HTTP at all, through a drain until the exit
//! (liveness: a draining node is not dead); `/readyz` answers 200 only while the node takes new
//! connections: 503 from the first moment of a drain or shutdown, and while the broker cannot
//! carry messages (readiness: load balancers and Kubernetes stop sending it clients);
//! `/metrics` is the Prometheus exposition.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::{json_response, Body};
use crate::node::NodeContext;

pub fn metrics(ctx: &NodeContext) -> Response<Body> {
    let mut resp = Response::new(Body::new(crate::metrics::render(ctx).into()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

pub fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub fn readyz(ctx: &NodeContext) -> Response<Body> {
    let shutting_down = ctx.is_shutting_down();
    let broker_ready = ctx.broker.is_ready();
    let ready = !shutting_down && broker_ready;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({"ready": ready, "shuttingDown": shutting_down, "brokerReady": broker_ready}),
    )
}
