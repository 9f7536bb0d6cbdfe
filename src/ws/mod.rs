//! The WebSocket side of a node, in the order a connection meets it:
//! `upgrade` (handshake, identity, admission) -> `session` (read loop, frames to messages) ->
//! `dispatch` (each client message of the protocol; `recovery` for subscriptions with `since`) ->
//! `writer` (bounded queue, batched writes) -> `flusher` (writes queues after each fan-out; the
//! writer task takes over a full socket) -> socket. On the read path `guard` checks and inflates the raw stream and `reader`
//! splits it into frames; `frame` builds the server's frame bytes.

pub mod deflate;
mod dispatch;
pub mod flusher;
pub mod frame;
pub mod guard;
pub mod reader;
mod recovery;
pub mod session;
pub mod upgrade;
pub mod writer;
