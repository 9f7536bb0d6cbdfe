mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn subscribe_then_http_publish_arrives() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut c, hello) = connect(addr, "/ws?user_id=u1&clientId=c1").await;
    assert_eq!(hello["data"]["clientId"], "c1");
    assert_eq!(hello["data"]["userId"], "u1");
    let ack = c
        .request(json!({"type":"subscribe","id":"s1","data":{"topics":["routes"]}}))
        .await;
    assert_eq!(ack["type"], "ack");
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic":"routes","type":"route_update","data":{"id":1}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = c.expect_type("route_update").await;
    assert_eq!(m["topic"], "routes");
    assert_eq!(m["data"]["id"], 1);
    assert_eq!(m["seq"], 1);
    node.shutdown().await;
}
