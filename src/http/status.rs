//! `GET /status`: a live status page for people (nodes, connections, message and byte rates,
//! fan-out latency, as charts and a table). One self-contained HTML file (no external script,
//! style or font: it works on a machine with no internet), compiled into the binary; it
//! subscribes to `$sys.metrics` and `$sys.health` over the gateway's own WebSocket (the first
//! of `websocket.paths`, with the page's `token` query parameter passed on when auth is on)
//! and draws on canvas.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use super::Body;
use crate::node::NodeContext;

/// The page, with [`WS_PATH_PLACEHOLDER`] where the WebSocket path goes.
const PAGE: &str = include_str!("status.html");
/// Stands in the page for the WebSocket path, inside a JavaScript string literal.
const WS_PATH_PLACEHOLDER: &str = "\"__WSGATE_WS_PATH__\"";

pub fn page(ctx: &NodeContext) -> Response<Body> {
    let path = ctx.settings.ws.paths.first().map_or("/ws", String::as_str);
    // A JSON string is a valid JavaScript string literal; `<` is escaped so that no path can
    // close the script element.
    let literal = serde_json::to_string(path)
        .unwrap_or_else(|_| "\"/ws\"".into())
        .replace('<', "\\u003c");
    let html = PAGE.replacen(WS_PATH_PLACEHOLDER, &literal, 1);
    let mut resp = Response::new(Body::new(html.into()));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_its_placeholder_and_no_external_resource() {
        assert_eq!(PAGE.matches(WS_PATH_PLACEHOLDER).count(), 1);
        for external in ["http://", "https://", "//cdn", "<link", "src=\""] {
            assert!(!PAGE.contains(external), "status.html refers to {external}");
        }
    }
}
