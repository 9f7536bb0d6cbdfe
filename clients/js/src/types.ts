/**
 * The shapes of the wsgate protocol as this client sees them (docs/protocol.md in the wsgate
 * repository), and the client's own options and events.
 */

/** Where a topic's stream stands: the `seq` and `epoch` of a sequenced publication. */
export interface StreamPosition {
  seq: number;
  epoch: string;
}

/**
 * A message from the server that the application sees: a publication on a subscribed topic
 * (`topic`, and `seq`/`epoch` when sequenced), a direct message (`from`, `to`), a broadcast, or a
 * backend's answer to {@link WsgateClient.request}.
 */
export interface ServerMessage<D = unknown> {
  /** The publisher's type: `route_update`, `metrics`, `alert`, `chat`, `notification`, ... */
  type: string;
  /** The message id; a sequenced publication's is `<epoch>:<seq>`. */
  id?: string;
  /** RFC 3339 UTC with milliseconds. */
  timestamp?: string;
  /** The topic of a publication. */
  topic?: string;
  /** Per-topic sequence number of a sequenced publication. */
  seq?: number;
  /** The sequence `seq` counts in. */
  epoch?: string;
  /** Set on publications that must be acknowledged (the client does that by itself). */
  requireAck?: boolean;
  /** The sender of a direct message (set by the server). */
  from?: string;
  /** The recipient user of a direct message. */
  to?: string;
  /** The payload. */
  data: D;
  /** The payload again, when the sender used `content` (the framework guide's name). */
  content?: D;
  [extra: string]: unknown;
}

/** The `data` of the server's `connection` message, plus the URL the client connected to. */
export interface ConnectionInfo {
  status: 'connected';
  connectionId: number;
  clientId: string;
  userId: string | null;
  node: string;
  serverTime: number;
  heartbeatInterval: number;
  subscriptions: string[];
  /** The URL this connection was opened on (without the token). */
  url: string;
}

/**
 * Subscription filters: per topic (`{routes: {status: ['ACTIVE']}}`) or flat for every topic of
 * the call (`{level: ['warning', 'critical']}`), as in docs/protocol.md.
 */
export type Filters = Record<string, unknown>;

export interface SubscribeOptions {
  /** Only publications whose `data` fields hold one of the listed values. */
  filters?: Filters;
  /** Conflation: at most one publication per this many milliseconds (the latest wins). */
  interval?: number;
  /**
   * Start after this position instead of "now" (the application has its own copy of the data
   * up to here). Without it the first subscribe asks the server for the current position
   * (`recover: true`) and later ones resume from the last publication received.
   */
  since?: StreamPosition;
  /** Milliseconds to wait for the server's answer (default: the client's `requestTimeout`). */
  timeout?: number;
}

/** One topic's entry of a subscribe ack's `recovery`. */
export interface TopicRecovery {
  /** Present when a position was given: whether every missed publication follows. */
  recovered?: boolean;
  /** Where the topic's stream stands now; `null` when nothing is on record. */
  position: StreamPosition | null;
}

/** What `subscribe` resolves with: the server's ack. */
export interface SubscribeResult {
  topics: string[];
  recovered?: boolean;
  recovery?: Record<string, TopicRecovery>;
}

export interface UnsubscribeResult {
  topics: string[];
}

export interface PublishOptions {
  /**
   * A publish with a key already used for the topic within 5 minutes is not published again.
   * The client generates one when none is given, so that a publish cut off by a reconnect can be
   * sent again without a double; pass `null` to send none.
   */
  idempotencyKey?: string | null;
  /** Every recipient must acknowledge the publication. */
  requireAck?: boolean;
  timeout?: number;
}

export interface PublishResult {
  topic: string;
  seq: number;
  epoch: string;
  /** The idempotency key had been used: nothing was published, `seq`/`epoch` are the first's. */
  duplicate: boolean;
}

export interface SendOptions {
  /** Send the payload as `content` instead of `data`. */
  content?: boolean;
  timeout?: number;
}

export interface SendResult {
  to: string;
}

export interface RequestOptions {
  /** Milliseconds to wait for the backend's answer (default: the client's `requestTimeout`). */
  timeout?: number;
}

/**
 * The state of the client:
 * - `idle`: created, `connect()` not called yet;
 * - `connecting`: a WebSocket is opening, waiting for the server's `connection` message;
 * - `connected`: the `connection` message arrived; subscriptions are being (re)established;
 * - `reconnecting`: the connection was lost; waiting before the next attempt;
 * - `closed`: `close()` was called, or the server closed for good (a close code after which a
 *   client must not reconnect), or `maxAttempts` was reached.
 */
export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
}

/** Emitted every time a connection ends. */
export interface DisconnectEvent {
  /** The close code (1006 when the connection died without a close frame, or was given up by
   * the client: heartbeat or connect timeout). */
  code: number;
  reason: string;
  /** The server's `disconnect` notice before the close, when it sent one. */
  notice?: { code: number; reason: string; reconnect: boolean };
  /** Whether the client will connect again. */
  willReconnect: boolean;
  /** When it will, in milliseconds. */
  delay?: number;
}

/** Emitted for a topic each time it is subscribed again from a known position. */
export interface RecoveryEvent {
  topic: string;
  /**
   * `true`: every publication missed since `since` follows, in order, before the live ones.
   * `false`: they cannot be replayed (history too short, a new epoch, history off, or Redis
   * unavailable): reload the state from your source of truth; live publications go on from
   * `position`.
   */
  recovered: boolean;
  /** The position the client resumed from. */
  since: StreamPosition | null;
  /** Where the topic's stream stood when the server answered. */
  position: StreamPosition | null;
}

export interface RefreshEvent {
  /** When the new token runs out (server clock, milliseconds, leeway included). */
  expiresAt: number | null;
}

/** The events of the client itself; every other name is a message type. */
export interface ClientEvents {
  state: StateChange;
  connected: ConnectionInfo;
  disconnected: DisconnectEvent;
  error: import('./errors.js').WsgateError;
  recovery: RecoveryEvent;
  refresh: RefreshEvent;
  /** Every publication, direct message and broadcast the application gets (after duplicates
   * were dropped), whatever its type. */
  message: ServerMessage;
}

/** A minimal WebSocket: what browsers, Node 22+, Deno, Bun and the `ws` package all provide. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly url?: string;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => any) | null;
  onerror: ((ev: any) => any) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** The `ws` package's hard close (no closing handshake). */
  terminate?: () => void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Where to connect: one URL, several (tried in turn), or a function asked before every attempt. */
export type UrlSource =
  | string
  | string[]
  | ((ctx: { attempt: number; previous: string | null }) => string | Promise<string>);

export interface TokenContext {
  /** `connect`: before a connection; `refresh`: before the token runs out on an open connection;
   * `unauthorized`: the server refused the previous token. */
  reason: 'connect' | 'refresh' | 'unauthorized';
}

/** A token, or a function that returns a fresh one (called before every connection and before
 * the current token expires). */
export type TokenSource = string | ((ctx: TokenContext) => string | Promise<string>);

export interface ReconnectOptions {
  /** The first delay, in milliseconds (default 500). */
  minDelay?: number;
  /** The cap (default 30000). */
  maxDelay?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** The share of each delay that is random, 0 to 1 (default 0.5: between half and all of it). */
  jitter?: number;
  /** Give up after this many attempts in a row (default: never). */
  maxAttempts?: number;
  /** After a drain notice (`disconnect` 1001, reconnect: true), reconnect within a random delay
   * of at most this many milliseconds (default 1000), without backing off. */
  drainJitter?: number;
  /** A connection that lasted this long (default 5000 ms) starts the backoff over; one that
   * ended sooner counts as a failed attempt, so a server that accepts and drops at once is not
   * hammered. */
  stableAfter?: number;
}

/** A subscription to make at every connection: a topic name or a topic with options. */
export type InitialSubscription =
  | string
  | { topics: string | string[]; filters?: Filters; interval?: number; since?: StreamPosition };

export interface ClientOptions {
  /** `ws://host:port/ws` (or an alias path), several of them, or a function. */
  url: UrlSource;
  /** A JWT, or a function that returns one (needed to keep a connection past the token's `exp`). */
  token?: TokenSource;
  /** This client's label (`clientId`); generated once per client when absent. */
  clientId?: string;
  /** The user id, honoured by the gateway only when auth is off (development). */
  userId?: string;
  /** Subscriptions made at every connection. Their errors are emitted as `error`. */
  subscriptions?: InitialSubscription[];
  /** The WebSocket implementation (default: the global `WebSocket`; in Node 20 pass the `ws`
   * package's). */
  WebSocket?: WebSocketConstructor;
  /** Milliseconds between pings (default: the server's `heartbeatInterval`). */
  heartbeatInterval?: number;
  /** Milliseconds to wait for a `pong` before the connection counts as dead (default: the
   * heartbeat interval, at most 10000). */
  heartbeatTimeout?: number;
  /** Milliseconds from opening a socket to the server's `connection` message (default 10000). */
  connectTimeout?: number;
  /** Backoff settings, or `false` to never reconnect. */
  reconnect?: ReconnectOptions | false;
  /** Default timeout of subscribe, publish, send and request, in milliseconds (default 10000). */
  requestTimeout?: number;
  /** Refresh the token this long before its `exp` (default 60000; at most half its remaining
   * life). */
  refreshMargin?: number;
  /** How many message ids to remember for dropping duplicates (default 10000). */
  dedupWindow?: number;
  /** Milliseconds to collect `requireAck` ids into one `ack` message (default 20). */
  ackDelay?: number;
}
