// The Socket.IO 4 side of loadtest/compare.sh: one node of a cluster sharing one Redis through
// @socket.io/redis-adapter, with the same three operations the load generator uses on wsgate.
//
//   PORT=9001 REDIS_URL=redis://127.0.0.1:6379 DEFLATE=0 node loadtest/peers/socketio-server.js
//
// - WebSocket only (`transports: ['websocket']`): the generator connects to
//   /socket.io/?EIO=4&transport=websocket[&user_id=U] and speaks engine.io v4 framing itself
//   (`40` to connect, `42[...]` events, `2`/`3` heartbeats).
// - `420["subscribe",["topic",...]]` joins the rooms `t:<topic>` and acknowledges (`430[true]`);
//   a `user_id` in the handshake query joins `u:<user>` at connect.
// - `POST /publish {"topic","data"}` emits `m` with `data` to room `t:<topic>` on every node;
//   `POST /send {"to","data"}` to room `u:<to>`. Answers 200 `{"ok":true}`.
// - DEFLATE=1 turns on permessage-deflate (the `ws` library's, threshold 256 bytes, as wsgate's).
//
// Needs socket.io@4, @socket.io/redis-adapter@8 and redis@4, installed by loadtest/compare.sh into
// a scratch directory (NODE_PATH points there); nothing of theirs is in this repository.
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

const port = Number(process.env.PORT || 9001);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const deflate = process.env.DEFLATE === '1';

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.method === 'POST' && (req.url === '/publish' || req.url === '/send')) {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        let m;
        try {
          m = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch (e) {
          res.writeHead(400, { 'Content-Type': 'application/json' });
          res.end('{"ok":false}');
          return;
        }
        const room = req.url === '/publish' ? `t:${m.topic}` : `u:${m.to}`;
        io.to(room).emit('m', m.data);
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end('{"ok":true}');
      });
      return;
    }
    if (req.url === '/healthz') {
      res.writeHead(200);
      res.end('ok');
      return;
    }
    res.writeHead(404);
    res.end();
  });

  const io = new Server(httpServer, {
    transports: ['websocket'],
    serveClient: false,
    perMessageDeflate: deflate ? { threshold: 256 } : false,
    maxHttpBufferSize: 1e6,
  });
  io.adapter(createAdapter(pub, sub));
  io.on('connection', (socket) => {
    const user = socket.handshake.query.user_id;
    if (user) socket.join(`u:${user}`);
    socket.on('subscribe', (topics, ack) => {
      for (const t of Array.isArray(topics) ? topics : [topics]) socket.join(`t:${t}`);
      if (typeof ack === 'function') ack(true);
    });
  });
  httpServer.listen(port, '127.0.0.1', () => console.log(`socket.io node on 127.0.0.1:${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
