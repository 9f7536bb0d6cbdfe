//! Recovering subscriptions (`subscribe` with `since` or `recover: true`): which position each
//! topic starts from, and the recovery itself. Live publications of a recovering topic are held
//! by the hub while this node makes sure it receives the topic live and reads the topic's
//! history after the client's position; then the ack (with `recovered` and each topic's current
//! position) goes out, the missed publications follow in order, then the held live ones that
//! come after them: no gap, no duplicate.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::dispatch::Refusal;
use super::session::Session;
use crate::history::StreamPosition;
use crate::hub::Publication;
use crate::protocol::codes::ErrorCode;

/// The topics to recover and each one's starting position: `since` is `{seq, epoch}` (for
/// every listed topic) or `{TOPIC: {seq, epoch}, ...}`; `recover: true` alone asks for the
/// positions only. Empty when neither was given.
pub(super) fn positions(
    topics: &[String],
    since: Option<&Value>,
    recover: bool,
) -> Result<Vec<(String, Option<StreamPosition>)>, Refusal> {
    let bad = |e: serde_json::Error| {
        Refusal::new(
            ErrorCode::InvalidSubscription,
            format!("`since` must be {{seq, epoch}} or {{topic: {{seq, epoch}}}}: {e}"),
        )
    };
    let per_topic: HashMap<String, StreamPosition> = match since {
        None | Some(Value::Null) if !recover => return Ok(Vec::new()),
        None | Some(Value::Null) => HashMap::new(),
        Some(v) if v.get("seq").is_some() => {
            let at: StreamPosition = serde_json::from_value(v.clone()).map_err(bad)?;
            topics.iter().map(|t| (t.clone(), at.clone())).collect()
        }
        Some(v) => serde_json::from_value(v.clone()).map_err(bad)?,
    };
    Ok(topics
        .iter()
        .map(|t| (t.clone(), per_topic.get(t).cloned()))
        .collect())
}

impl Session {
    /// Recovers `recovery`'s topics (already subscribed, held by the hub): queues the ack made
    /// from `data` plus the outcome, then each topic's replay followed by what was held.
    pub(super) async fn recover_topics(
        &mut self,
        request_id: Option<&RawValue>,
        mut data: Value,
        recovery: &[(String, Option<StreamPosition>)],
    ) {
        let mut recovered_all = true;
        let mut positions = serde_json::Map::new();
        let mut replays = Vec::new();
        for (topic, since) in recovery {
            let (recovered, position, replay) = self.recover(topic, since.as_ref()).await;
            // Asking only for the position (no `since`) recovers nothing and loses nothing.
            recovered_all &= recovered || since.is_none();
            let mut entry = json!({ "position": position });
            if since.is_some() {
                entry["recovered"] = Value::Bool(recovered);
            }
            positions.insert(topic.clone(), entry);
            replays.push((topic, replay));
        }
        data["recovered"] = Value::Bool(recovered_all);
        data["recovery"] = Value::Object(positions);
        let ack: Bytes = self.reply("ack", request_id, data);
        let _ = self.conn.outbound.push(ack);
        for (topic, replay) in replays {
            self.ctx.hub.finish_recovery(topic, self.conn.id, replay);
        }
    }

    /// Reads what `topic` published after `since`, once this node is sure to receive the
    /// topic live. Returns whether that is complete, the topic's current position, and the
    /// publications to replay (none when incomplete: a partial replay would hide the gap).
    async fn recover(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
    ) -> (bool, Option<StreamPosition>, Vec<Publication>) {
        let history = self.ctx.settings.namespace_of(topic).history;
        if !self
            .ctx
            .broker
            .await_subscribed(topic, crate::broker::SUBSCRIBE_WAIT)
            .await
        {
            return (false, None, Vec::new());
        }
        let limit = if since.is_some() { history.size } else { 0 };
        match self.ctx.broker.history(topic, since, limit).await {
            Ok(page) if page.complete && since.is_some() => {
                (true, page.position, page.publications)
            }
            Ok(page) => (false, page.position, Vec::new()),
            Err(e) => {
                tracing::debug!(topic, error = %e, "history unavailable for recovery");
                (false, None, Vec::new())
            }
        }
    }
}
