// Compiled with `tsc --noEmit` by `npm run build`: the README's typed usage keeps compiling
// against the published declarations (dist/*.d.ts).
import {
  WsgateClient,
  WsgateError,
  ServerErrorCode,
  type ConnectionInfo,
  type ServerMessage,
  type SubscribeResult,
} from '../../dist/index.js';

interface Messages {
  route_update: { action: string; route: { id: string; status: string } };
  metrics: { metrics: Record<string, unknown> };
}

export async function usage(): Promise<void> {
  const client = new WsgateClient<Messages>({
    url: ['ws://a/ws', 'ws://b/ws'],
    token: async ({ reason }) => `token-for-${reason}`,
    clientId: 'admin-client-001',
    subscriptions: ['logs', { topics: ['alerts'], filters: { level: ['critical'] } }],
    reconnect: { minDelay: 100, maxDelay: 5000, drainJitter: 500 },
  });
  const off = client.on('route_update', (msg) => {
    const status: string = msg.data.route.status;
    void status;
  });
  off();
  client.on('metrics', (msg) => void msg.data.metrics);
  client.on('chat', (msg: ServerMessage) => void msg.from);
  client.on('state', ({ state, previous }) => void [state, previous]);
  client.on('disconnected', (d) => void (d.willReconnect && d.delay));
  client.on('recovery', (r) => void (r.recovered ? r.position?.seq : r.since?.epoch));
  client.on('error', (e: WsgateError) => void (e.code === 'UNAUTHORIZED' && e.numericCode === ServerErrorCode.UNAUTHORIZED));
  client.once('connected', (info: ConnectionInfo) => void info.node);
  const info: ConnectionInfo = await client.connect();
  void info.heartbeatInterval;
  const sub: SubscribeResult = await client.subscribe(['routes', 'metrics'], {
    filters: { routes: { status: ['ACTIVE'] }, metrics: { interval: 5000 } },
  });
  void sub.recovery?.routes?.position?.seq;
  const pub = await client.publish('chat:r', 'chat_message', { text: 'hi' }, { requireAck: true });
  void (pub.seq + pub.epoch.length);
  await client.send('bob', 'chat', 'hi', { content: true });
  const reply = await client.request<{ config: { refreshSeconds: number } }>('config_get', {});
  const seconds: number = reply.data.config.refreshSeconds;
  void seconds;
  void client.position('routes')?.seq;
  void client.latency;
  await client.unsubscribe('routes');
  await client.close();
}
