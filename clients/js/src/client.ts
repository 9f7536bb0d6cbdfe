/**
 * The wsgate client: one logical connection over any number of WebSockets in a row.
 *
 * What it does for the application (docs/protocol.md has the wire protocol):
 * - connects to one of the given URLs with the token and client id, and again, with exponential
 *   backoff and jitter, whenever the connection is lost, except after the close codes the
 *   protocol marks as final; right away (jittered) after a drain notice;
 * - pings at the server's advertised `heartbeatInterval` and counts a missing `pong` as a dead
 *   connection;
 * - refreshes the token before its `exp` through `refresh`;
 * - keeps every topic's last `seq` and `epoch`, subscribes again after each reconnect with
 *   `since`, drops duplicates, tells the application when the server could not replay what it
 *   missed, and acknowledges `requireAck` publications;
 * - settles `subscribe`, `unsubscribe`, `publish`, `send` and `request` by the server's answer
 *   (matched by request id) or a timeout.
 */

import { Emitter } from './emitter.js';
import { ClientErrorCode, WsgateError } from './errors.js';
import { jwtExpiry } from './jwt.js';
import type {
  ClientEvents,
  ClientOptions,
  ConnectionInfo,
  ConnectionState,
  DisconnectEvent,
  Filters,
  PublishOptions,
  PublishResult,
  ReconnectOptions,
  RequestOptions,
  SendOptions,
  SendResult,
  ServerMessage,
  StreamPosition,
  SubscribeOptions,
  SubscribeResult,
  TokenContext,
  TopicRecovery,
  UnsubscribeResult,
  WebSocketConstructor,
  WebSocketLike,
} from './types.js';

/** Close codes after which a client must not reconnect on its own (docs/protocol.md, section 8). */
export const FINAL_CLOSE_CODES: ReadonlySet<number> = new Set([1000, 1002, 1007, 1009, 4001, 4003, 4029]);

/** Types the gateway handles itself: never sent as a direct message or a backend request. */
const RESERVED_TYPES = new Set([
  'ping',
  'heartbeat',
  'pong',
  'ack',
  'subscribe',
  'unsubscribe',
  'refresh',
  'publish',
]);

/** The names of the client's own events. */
const CLIENT_EVENTS = new Set(['state', 'connected', 'disconnected', 'error', 'recovery', 'refresh', 'message']);

const OPEN = 1;

/** The `since` sent for a topic the server had nothing on record for: seen nothing yet. */
const NOTHING_SEEN: StreamPosition = { seq: 0, epoch: '' };

type Timer = ReturnType<typeof setTimeout>;

interface Subscription {
  filters: Filters | undefined;
  interval: number | undefined;
  /** Topics with equal options go into one subscribe message. */
  key: string;
  /** The last sequenced publication handed to the application. */
  position: StreamPosition | null;
  /** The server had nothing on record for the topic when it was subscribed. */
  empty: boolean;
  /** The server acknowledged it at least once. */
  confirmed: boolean;
  /** A subscribe with `since` is on its way: until its ack, only the very next `seq` is taken
   * (anything later is replayed or held by the server after the ack). */
  resyncing: boolean;
}

type Kind = 'subscribe' | 'unsubscribe' | 'publish' | 'send' | 'request' | 'refresh';

interface Pending {
  id: string;
  kind: Kind;
  message: Record<string, unknown>;
  resolve?: (value: any) => void;
  reject?: (error: WsgateError) => void;
  timer?: Timer;
  /** Order of creation (a re-sent publish keeps its place). */
  order: number;
  /** Send again after a reconnect (a publish with an idempotency key). */
  resend?: boolean;
  /** subscribe / unsubscribe: the topics. */
  topics?: string[];
  /** subscribe: the position sent for each topic that had one. */
  since?: Record<string, StreamPosition>;
  /** subscribe from a user call: what each topic was before (restored when refused). */
  restore?: Map<string, Subscription | undefined>;
  /** refresh: the token sent, and the attempt number. */
  token?: string;
  attempt?: number;
  /** request: the gateway forwarded it to the backends. */
  forwarded?: boolean;
}

interface Waiter {
  topics: string[];
  /** The subscribe requests whose acks settle it; `null` until one is sent. */
  awaiting: Set<string> | null;
  result: SubscribeResult;
  resolve: (value: SubscribeResult) => void;
  reject: (error: WsgateError) => void;
  timer?: Timer;
}

/** Remembers the last `limit` ids, to drop duplicates. */
class IdWindow {
  private readonly ids = new Set<string>();
  constructor(private readonly limit: number) {}
  has(id: string): boolean {
    return this.ids.has(id);
  }
  add(id: string): void {
    if (this.ids.has(id)) return;
    this.ids.add(id);
    if (this.ids.size > this.limit) {
      const oldest = this.ids.values().next().value;
      if (oldest !== undefined) this.ids.delete(oldest);
    }
  }
}

function randomHex(bytes: number): string {
  let out = '';
  for (let i = 0; i < bytes; i++) out += Math.floor(Math.random() * 256).toString(16).padStart(2, '0');
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function asPosition(v: unknown): StreamPosition | null {
  if (isObject(v) && typeof v.seq === 'number' && typeof v.epoch === 'string') {
    return { seq: v.seq, epoch: v.epoch };
  }
  return null;
}

function decodeData(data: unknown): string | null {
  if (typeof data === 'string') return data;
  try {
    if (data instanceof ArrayBuffer) return new TextDecoder().decode(new Uint8Array(data));
    if (ArrayBuffer.isView(data)) {
      return new TextDecoder().decode(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    }
  } catch {
    /* not text */
  }
  return null;
}

/**
 * The client. `M` maps message types to the type of their `data`, so that
 * `client.on('route_update', (msg) => msg.data.route)` is typed.
 */
export class WsgateClient<M extends Record<string, any> = Record<string, any>> extends Emitter {
  private readonly opts: ClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly backoff: Required<ReconnectOptions>;
  private readonly reconnectEnabled: boolean;
  private readonly clientId: string;
  private readonly idPrefix = `js${randomHex(3)}-`;
  private nextId = 0;

  private currentState: ConnectionState = 'idle';
  private ws: WebSocketLike | null = null;
  /** Bumped for every socket: events of older sockets are ignored. */
  private generation = 0;
  private info: ConnectionInfo | null = null;
  private currentUrl: string | null = null;
  private urlIndex = 0;
  private connectAttempts = 0;
  /** Failed attempts in a row (reset by a connection that lasted `stableAfter`). */
  private attempt = 0;
  /** When the open connection's `connection` message came (0: none). */
  private connectedAt = 0;
  private closedByUser = false;
  private notice: { code: number; reason: string; reconnect: boolean } | null = null;
  private refusedUnauthorized = false;
  private retriedUnauthorized = false;
  private tokenReason: TokenContext['reason'] = 'connect';
  private currentToken: string | null = null;

  private readonly subs = new Map<string, Subscription>();
  private readonly pending = new Map<string, Pending>();
  private outbox: Pending[] = [];
  private waiters: Waiter[] = [];
  private readonly seen: IdWindow;
  private ackIds: string[] = [];

  private connectTimer: Timer | undefined;
  private reconnectTimer: Timer | undefined;
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  private pongTimer: Timer | undefined;
  private refreshTimer: Timer | undefined;
  private ackTimer: Timer | undefined;
  private pingId: string | null = null;
  private pingSentAt = 0;
  private rtt: number | null = null;

  private connectWaiters: Array<{ resolve: (info: ConnectionInfo) => void; reject: (e: WsgateError) => void }> = [];

  constructor(options: ClientOptions) {
    super();
    this.opts = options;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new WsgateError({
        code: ClientErrorCode.INVALID_ARGUMENT,
        message:
          'no WebSocket implementation: pass one as the `WebSocket` option (in Node before 22: `import WebSocket from "ws"`)',
      });
    }
    this.WS = WS;
    const r = options.reconnect === false ? {} : options.reconnect ?? {};
    this.reconnectEnabled = options.reconnect !== false;
    this.backoff = {
      minDelay: r.minDelay ?? 500,
      maxDelay: r.maxDelay ?? 30000,
      factor: r.factor ?? 2,
      jitter: Math.min(1, Math.max(0, r.jitter ?? 0.5)),
      maxAttempts: r.maxAttempts ?? Infinity,
      drainJitter: r.drainJitter ?? 1000,
      stableAfter: r.stableAfter ?? 5000,
    };
    this.clientId = options.clientId ?? `js-${randomHex(8)}`;
    this.seen = new IdWindow(options.dedupWindow ?? 10000);
    for (const s of options.subscriptions ?? []) {
      if (typeof s === 'string') {
        this.want([s], {});
      } else {
        const topics = Array.isArray(s.topics) ? s.topics : [s.topics];
        this.want(topics, s);
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Public API

  /** Where the client stands. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The server's `connection` message of the open connection, or `null`. */
  get connection(): ConnectionInfo | null {
    return this.info;
  }

  /** The round trip of the last heartbeat, in milliseconds. */
  get latency(): number | null {
    return this.rtt;
  }

  /** The topics the client holds (or will hold once connected). */
  get topics(): string[] {
    return [...this.subs.keys()];
  }

  /** The client id sent to the server. */
  get id(): string {
    return this.clientId;
  }

  /** The last sequenced position handed to the application on `topic`. */
  position(topic: string): StreamPosition | null {
    const p = this.subs.get(topic)?.position;
    return p ? { ...p } : null;
  }

  /**
   * Starts connecting (and reconnecting as needed). Resolves with the first `connection`
   * message; rejects when the client closes before one arrives (a final close code, `close()`,
   * or `maxAttempts`). Calling it again after the client closed starts over.
   */
  connect(): Promise<ConnectionInfo> {
    if (this.currentState === 'connected' && this.info) return Promise.resolve(this.info);
    const promise = new Promise<ConnectionInfo>((resolve, reject) => {
      this.connectWaiters.push({ resolve, reject });
    });
    if (this.currentState === 'idle' || this.currentState === 'closed') {
      this.closedByUser = false;
      this.attempt = 0;
      this.retriedUnauthorized = false;
      this.tokenReason = 'connect';
      void this.openSocket();
    }
    return promise;
  }

  /** Drops the current connection (if any) and connects again at once, to the next URL. */
  reconnect(): void {
    if (this.currentState === 'idle' || this.currentState === 'closed') {
      void this.connect().catch(() => undefined);
      return;
    }
    if (this.reconnectTimer !== undefined) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
      void this.openSocket();
      return;
    }
    this.abandon('reconnect requested', 0);
  }

  /** Closes for good: no reconnect; every unsettled call is rejected with `CLOSED`. */
  close(code = 1000, reason = 'client closed'): Promise<void> {
    this.closedByUser = true;
    const ws = this.ws;
    this.finish(new WsgateError({ code: ClientErrorCode.CLOSED, message: 'the client was closed' }));
    if (!ws || ws.readyState > OPEN) return Promise.resolve();
    return new Promise((resolve) => {
      const done = setTimeout(resolve, 1000);
      ws.onclose = () => {
        clearTimeout(done);
        resolve();
      };
      try {
        ws.close(code, reason);
      } catch {
        clearTimeout(done);
        resolve();
      }
    });
  }

  /**
   * Subscribes to `topics` (all or none, as the server takes them). Resolves with the server's
   * ack; rejects with its `error` (`INVALID_TOPIC`, `PERMISSION_DENIED`, ...) or `TIMEOUT`.
   * The subscription is kept and made again, from the last position received, after every
   * reconnect. Subscribing again to a held topic replaces its filters and interval.
   */
  subscribe(topics: string | string[], options: SubscribeOptions = {}): Promise<SubscribeResult> {
    const list = [...new Set(Array.isArray(topics) ? topics : [topics])];
    if (list.length === 0) return Promise.reject(this.invalid('subscribe needs at least one topic'));
    const restore = new Map<string, Subscription | undefined>();
    for (const t of list) {
      const old = this.subs.get(t);
      restore.set(t, old ? { ...old } : undefined);
    }
    this.want(list, options);
    return new Promise<SubscribeResult>((resolve, reject) => {
      const waiter: Waiter = { topics: list, awaiting: null, result: { topics: [] }, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        for (const t of list) {
          const s = this.subs.get(t);
          if (s && !s.confirmed) this.subs.delete(t);
        }
        reject(this.timeout('subscribe'));
      }, options.timeout ?? this.requestTimeout());
      this.waiters.push(waiter);
      if (this.isConnected()) {
        const ids: string[] = [];
        for (const group of this.groups(list)) ids.push(...this.sendSubscribe(group, restore));
        waiter.awaiting = new Set(ids);
      }
    });
  }

  /** Unsubscribes from `topics`: nothing more is delivered for them from now on. Resolves with
   * the server's ack (at once when offline: a new connection will not subscribe them). */
  unsubscribe(topics: string | string[], options: { timeout?: number } = {}): Promise<UnsubscribeResult> {
    const list = [...new Set(Array.isArray(topics) ? topics : [topics])];
    if (list.length === 0) return Promise.reject(this.invalid('unsubscribe needs at least one topic'));
    for (const t of list) this.subs.delete(t);
    if (!this.isConnected()) return Promise.resolve({ topics: list });
    return this.call<UnsubscribeResult>(
      'unsubscribe',
      { type: 'unsubscribe', data: { topics: list } },
      options.timeout,
      { topics: list },
    );
  }

  /**
   * Publishes to a topic whose namespace lets clients publish. Resolves with the ack (`seq`,
   * `epoch`, `duplicate`). Carries an idempotency key (generated unless given), so a publish cut
   * off by a reconnect is sent again without risking a double.
   */
  publish<D = unknown>(topic: string, type: string, data: D, options: PublishOptions = {}): Promise<PublishResult> {
    const key = options.idempotencyKey === undefined ? `${this.clientId}-${randomHex(8)}` : options.idempotencyKey;
    const body: Record<string, unknown> = { topic, type, data };
    if (key !== null) body.idempotencyKey = key;
    if (options.requireAck) body.requireAck = true;
    return this.call<PublishResult>(
      'publish',
      { type: 'publish', data: body },
      options.timeout,
      { resend: key !== null },
    );
  }

  /** A direct message to every connection of user `to` (the server sets `from`). Resolves with
   * the ack. Not sent again after a reconnect: it rejects with `DISCONNECTED` instead.
   * `content: true` sends the payload as `content` (the framework guide's name): recipients get
   * it under both `content` and `data`. */
  send<D = unknown>(to: string, type: string, data: D, options: SendOptions = {}): Promise<SendResult> {
    if (RESERVED_TYPES.has(type)) return Promise.reject(this.invalid(`"${type}" is handled by the gateway itself`));
    const message = options.content ? { type, to, content: data } : { type, to, data };
    return this.call<SendResult>('send', message, options.timeout);
  }

  /**
   * A request for the backends (any type the gateway does not handle itself, e.g. `config_get`):
   * the gateway forwards it over Redis and a backend answers this connection with a message whose
   * `data.requestId` is this request's id. Resolves with that answer; rejects with the gateway's
   * `error` (`INVALID_OPERATION` without a backend), `TIMEOUT`, or `DISCONNECTED` when the
   * connection ends first (the answer would go to the old connection).
   */
  request<T = unknown, D = unknown>(type: string, data?: D, options: RequestOptions = {}): Promise<ServerMessage<T>> {
    if (RESERVED_TYPES.has(type)) return Promise.reject(this.invalid(`"${type}" is handled by the gateway itself`));
    return this.call<ServerMessage<T>>('request', { type, data: data ?? {} }, options.timeout);
  }

  /** Listens to a client event (`state`, `connected`, `disconnected`, `error`, `recovery`,
   * `refresh`, `message`) or to every message of one type. Returns the function that stops. */
  on<K extends keyof ClientEvents>(event: K, handler: (event: ClientEvents[K]) => void): () => void;
  on<K extends Exclude<keyof M & string, keyof ClientEvents>>(
    type: K,
    handler: (message: ServerMessage<M[K]>) => void,
  ): () => void;
  on(type: string, handler: (message: ServerMessage) => void): () => void;
  on(event: string, handler: (arg: any) => void): () => void {
    return this.addHandler(event, handler);
  }

  /** `on` for one event only. */
  once<K extends keyof ClientEvents>(event: K, handler: (event: ClientEvents[K]) => void): () => void;
  once<K extends Exclude<keyof M & string, keyof ClientEvents>>(
    type: K,
    handler: (message: ServerMessage<M[K]>) => void,
  ): () => void;
  once(type: string, handler: (message: ServerMessage) => void): () => void;
  once(event: string, handler: (arg: any) => void): () => void {
    const off = this.addHandler(event, (arg: unknown) => {
      off();
      handler(arg);
    });
    return off;
  }

  /** Removes one handler, or every handler of `event`. */
  off(event: string, handler?: (arg: any) => void): void {
    this.removeHandler(event, handler);
  }

  // ---------------------------------------------------------------------------------------
  // Connecting

  private requestTimeout(): number {
    return this.opts.requestTimeout ?? 10000;
  }

  private isConnected(): boolean {
    return this.currentState === 'connected' && this.ws !== null && this.ws.readyState === OPEN;
  }

  private setState(state: ConnectionState): void {
    const previous = this.currentState;
    if (previous === state) return;
    this.currentState = state;
    this.emitEvent('state', { state, previous });
  }

  private async nextUrl(): Promise<string> {
    const src = this.opts.url;
    if (typeof src === 'string') return src;
    if (Array.isArray(src)) {
      if (src.length === 0) throw this.invalid('`url` is an empty list');
      const url = src[this.urlIndex % src.length] as string;
      this.urlIndex++;
      return url;
    }
    return src({ attempt: this.connectAttempts, previous: this.currentUrl });
  }

  private async tokenFor(reason: TokenContext['reason']): Promise<string | null> {
    const src = this.opts.token;
    if (src === undefined) return null;
    if (typeof src === 'string') return src;
    return src({ reason });
  }

  private buildUrl(base: string, token: string | null): { full: string; shown: string } {
    const u = new URL(base);
    if (!u.searchParams.has('clientId') && !u.searchParams.has('client_id')) {
      u.searchParams.set('clientId', this.clientId);
    }
    if (this.opts.userId !== undefined && !u.searchParams.has('user_id')) {
      u.searchParams.set('user_id', this.opts.userId);
    }
    const shown = u.toString();
    if (token) u.searchParams.set('token', token);
    return { full: u.toString(), shown };
  }

  private async openSocket(): Promise<void> {
    const generation = ++this.generation;
    this.reconnectTimer = undefined;
    this.setState('connecting');
    this.connectAttempts++;
    let base: string;
    let token: string | null;
    try {
      base = await this.nextUrl();
      const reason = this.tokenReason;
      token = await this.tokenFor(reason);
    } catch (e) {
      if (generation !== this.generation || this.closedByUser) return;
      this.emitEvent('error', this.wrap(e, 'the url or token provider failed'));
      this.afterClose(1006, 'the url or token provider failed');
      return;
    }
    if (generation !== this.generation || this.closedByUser) return;
    const { full, shown } = this.buildUrl(base, token);
    let ws: WebSocketLike;
    try {
      ws = new this.WS(full);
    } catch (e) {
      this.emitEvent('error', this.wrap(e, `cannot open ${shown}`));
      this.afterClose(1006, 'cannot open the WebSocket');
      return;
    }
    this.ws = ws;
    this.currentUrl = shown;
    this.currentToken = token;
    this.notice = null;
    this.refusedUnauthorized = false;
    this.connectTimer = setTimeout(() => {
      if (generation === this.generation) this.abandon('no connection message in time');
    }, this.opts.connectTimeout ?? 10000);
    ws.onmessage = (ev) => {
      if (generation === this.generation) this.onData(ev.data);
    };
    ws.onclose = (ev) => {
      if (generation === this.generation) this.onSocketClosed(ev.code, ev.reason ?? '');
    };
    ws.onerror = () => {
      /* a close event follows */
    };
  }

  /** Gives up the current socket without waiting for its close (dead or stuck). */
  private abandon(reason: string, delay?: number): void {
    const ws = this.ws;
    if (ws) {
      this.detach(ws);
      try {
        if (ws.terminate) ws.terminate();
        else ws.close(4000, reason.slice(0, 100));
      } catch {
        /* already closing */
      }
    }
    this.onSocketClosed(1006, reason, delay);
  }

  private detach(ws: WebSocketLike): void {
    ws.onmessage = null;
    ws.onclose = null;
    // Not null: the `ws` package throws an 'error' nobody listens to (closing a socket that is
    // still connecting emits one).
    ws.onerror = () => undefined;
    ws.onopen = null;
  }

  private onSocketClosed(code: number, reason: string, forcedDelay?: number): void {
    const ws = this.ws;
    if (ws) this.detach(ws);
    this.ws = null;
    this.generation++;
    this.stopConnectionTimers();
    this.info = null;
    if (this.connectedAt && Date.now() - this.connectedAt >= this.backoff.stableAfter) this.attempt = 0;
    this.connectedAt = 0;
    this.failInFlight();
    if (this.closedByUser) return;
    this.afterClose(code, reason, forcedDelay);
  }

  /** Decides whether and when to connect again. */
  private afterClose(code: number, reason: string, forcedDelay?: number): void {
    const notice = this.notice ?? undefined;
    this.notice = null;
    const effective = notice?.code ?? code;
    let again = notice ? notice.reconnect : !FINAL_CLOSE_CODES.has(code);
    const unauthorized = effective === 4001 || this.refusedUnauthorized;
    if (unauthorized && typeof this.opts.token === 'function' && !this.retriedUnauthorized) {
      // The protocol: get a new token before reconnecting. A provider can give one; a second
      // refusal in a row is final.
      again = true;
      this.retriedUnauthorized = true;
      this.tokenReason = 'unauthorized';
    } else {
      this.tokenReason = 'connect';
    }
    if (!this.reconnectEnabled || this.attempt >= this.backoff.maxAttempts) again = false;
    if (!again) {
      const event: DisconnectEvent = { code, reason, willReconnect: false };
      if (notice) event.notice = notice;
      this.emitEvent('disconnected', event);
      this.finish(
        new WsgateError({
          code: ClientErrorCode.CLOSED,
          message: `the connection closed with code ${effective}${reason ? ` (${reason})` : ''} and will not be reopened`,
          details: { code: effective, reason },
        }),
      );
      return;
    }
    let delay: number;
    if (forcedDelay !== undefined) {
      delay = forcedDelay;
    } else if (effective === 1001) {
      // A drain: this node is going away, the others are fine. Come back at once, spread out.
      delay = Math.floor(Math.random() * this.backoff.drainJitter);
    } else {
      delay = this.backoffDelay(this.attempt++);
    }
    const event: DisconnectEvent = { code, reason, willReconnect: true, delay };
    if (notice) event.notice = notice;
    this.emitEvent('disconnected', event);
    this.setState('reconnecting');
    this.reconnectTimer = setTimeout(() => void this.openSocket(), delay);
  }

  private backoffDelay(attempt: number): number {
    const { minDelay, maxDelay, factor, jitter } = this.backoff;
    const full = Math.min(maxDelay, minDelay * Math.pow(factor, attempt));
    return Math.round(full * (1 - jitter * Math.random()));
  }

  /** Ends everything: state `closed`, every timer stopped, every unsettled call rejected. */
  private finish(error: WsgateError): void {
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.stopConnectionTimers();
    if (this.ws) this.detach(this.ws);
    this.ws = null;
    this.generation++;
    this.info = null;
    for (const p of this.pending.values()) this.settleError(p, error);
    this.pending.clear();
    for (const p of this.outbox) this.settleError(p, error);
    this.outbox = [];
    for (const w of this.waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(error);
    }
    this.waiters = [];
    for (const s of this.subs.values()) s.resyncing = false;
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    this.setState('closed');
    for (const w of waiters) w.reject(error);
  }

  private stopConnectionTimers(): void {
    for (const t of [this.connectTimer, this.pongTimer, this.refreshTimer, this.ackTimer]) {
      if (t !== undefined) clearTimeout(t);
    }
    if (this.heartbeatTimer !== undefined) clearInterval(this.heartbeatTimer);
    this.connectTimer = this.pongTimer = this.refreshTimer = this.ackTimer = undefined;
    this.heartbeatTimer = undefined;
    this.pingId = null;
    this.ackIds = [];
  }

  /** What was sent on the lost connection and not answered. */
  private failInFlight(): void {
    const requeue: Pending[] = [];
    for (const p of this.pending.values()) {
      switch (p.kind) {
        case 'subscribe':
          // Every held topic is subscribed again on the next connection.
          if (p.timer) clearTimeout(p.timer);
          break;
        case 'unsubscribe':
          // The server forgets a connection's subscriptions with it.
          if (p.timer) clearTimeout(p.timer);
          p.resolve?.({ topics: p.topics ?? [] });
          break;
        case 'refresh':
          // The next connection starts with a fresh token anyway.
          if (p.timer) clearTimeout(p.timer);
          break;
        case 'publish':
          if (p.resend) {
            requeue.push(p);
            break;
          }
          this.settleError(p, this.disconnected(p));
          break;
        default:
          this.settleError(p, this.disconnected(p));
      }
    }
    this.pending.clear();
    for (const w of this.waiters) w.awaiting = null;
    for (const s of this.subs.values()) s.resyncing = false;
    requeue.sort((a, b) => a.order - b.order);
    this.outbox = [...requeue, ...this.outbox];
  }

  private onConnection(data: Record<string, unknown>): void {
    if (this.connectTimer !== undefined) clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    const info: ConnectionInfo = {
      status: 'connected',
      connectionId: Number(data.connectionId),
      clientId: String(data.clientId ?? this.clientId),
      userId: typeof data.userId === 'string' ? data.userId : null,
      node: String(data.node ?? ''),
      serverTime: Number(data.serverTime ?? 0),
      heartbeatInterval: Number(data.heartbeatInterval ?? 25000),
      subscriptions: Array.isArray(data.subscriptions) ? (data.subscriptions as string[]) : [],
      url: this.currentUrl ?? '',
    };
    this.info = info;
    this.connectedAt = Date.now();
    this.retriedUnauthorized = false;
    this.tokenReason = 'connect';
    this.setState('connected');
    this.startHeartbeat(info.heartbeatInterval);
    this.scheduleRefresh();
    // Every held topic again, from where the application is.
    for (const topics of this.groups(this.subs.keys())) {
      const ids = this.sendSubscribe(topics);
      for (const w of this.waiters) {
        if (w.topics.some((t) => topics.includes(t))) {
          if (!w.awaiting) w.awaiting = new Set();
          for (const id of ids) w.awaiting.add(id);
        }
      }
    }
    const outbox = this.outbox;
    this.outbox = [];
    for (const p of outbox) this.transmit(p);
    this.emitEvent('connected', info);
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.resolve(info);
  }

  // ---------------------------------------------------------------------------------------
  // Heartbeat and token refresh

  private startHeartbeat(serverInterval: number): void {
    const interval = Math.max(100, this.opts.heartbeatInterval ?? serverInterval);
    const timeout = Math.min(this.opts.heartbeatTimeout ?? Math.min(interval, 10000), interval);
    const generation = this.generation;
    this.heartbeatTimer = setInterval(() => {
      if (generation !== this.generation || !this.ws || this.pingId !== null) return;
      const id = this.newId();
      this.pingId = id;
      this.pingSentAt = Date.now();
      this.raw({ type: 'ping', id });
      this.pongTimer = setTimeout(() => {
        if (generation === this.generation) this.abandon('heartbeat timeout: no pong');
      }, timeout);
    }, interval);
  }

  private onPong(data: Record<string, unknown>): void {
    if (this.pingId === null || data.requestId !== this.pingId) return;
    this.pingId = null;
    this.rtt = Date.now() - this.pingSentAt;
    if (this.pongTimer !== undefined) clearTimeout(this.pongTimer);
    this.pongTimer = undefined;
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (typeof this.opts.token !== 'function' || !this.currentToken) return;
    const exp = jwtExpiry(this.currentToken);
    if (exp === null) return;
    const remaining = exp - Date.now();
    const margin = Math.min(this.opts.refreshMargin ?? 60000, Math.max(0, remaining) / 2);
    const delay = Math.max(0, remaining - margin);
    this.refreshTimer = setTimeout(() => void this.refreshToken('refresh', 0), delay);
  }

  private async refreshToken(reason: TokenContext['reason'], attempt: number): Promise<void> {
    const generation = this.generation;
    let token: string | null;
    try {
      token = await this.tokenFor(reason);
    } catch (e) {
      if (generation !== this.generation) return;
      this.emitEvent('error', this.wrap(e, 'the token provider failed'));
      this.retryRefresh(attempt);
      return;
    }
    if (generation !== this.generation || !this.isConnected() || !token) return;
    const p = this.newPending('refresh', { type: 'refresh', data: { token } });
    p.token = token;
    p.attempt = attempt;
    p.timer = setTimeout(() => {
      this.pending.delete(p.id);
      if (generation === this.generation) this.retryRefresh(attempt);
    }, this.requestTimeout());
    this.transmit(p);
  }

  private retryRefresh(attempt: number): void {
    if (attempt >= 3 || !this.isConnected()) return;
    const generation = this.generation;
    this.refreshTimer = setTimeout(() => {
      if (generation === this.generation) void this.refreshToken('unauthorized', attempt + 1);
    }, 1000 * (attempt + 1));
  }

  // ---------------------------------------------------------------------------------------
  // Requests

  private newId(): string {
    return `${this.idPrefix}${++this.nextId}`;
  }

  private newPending(kind: Kind, message: Record<string, unknown>): Pending {
    const id = this.newId();
    return { id, kind, message: { ...message, id }, order: this.nextId };
  }

  private call<T>(
    kind: Kind,
    message: Record<string, unknown>,
    timeout: number | undefined,
    extra: Partial<Pending> = {},
  ): Promise<T> {
    if (this.currentState === 'closed' && !this.isConnected()) {
      return Promise.reject(new WsgateError({ code: ClientErrorCode.CLOSED, message: 'the client is closed' }));
    }
    return new Promise<T>((resolve, reject) => {
      const p = Object.assign(this.newPending(kind, message), extra);
      p.resolve = resolve;
      p.reject = reject;
      p.timer = setTimeout(() => {
        this.pending.delete(p.id);
        this.outbox = this.outbox.filter((q) => q !== p);
        reject(this.timeout(kind));
      }, timeout ?? this.requestTimeout());
      if (this.isConnected()) this.transmit(p);
      else this.outbox.push(p);
    });
  }

  /** Sends a request now; it waits in the outbox when the socket cannot take it. */
  private transmit(p: Pending): void {
    if (!this.isConnected() || !this.raw(p.message)) {
      this.outbox.push(p);
      return;
    }
    this.pending.set(p.id, p);
  }

  private raw(message: Record<string, unknown>): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(message));
      return true;
    } catch {
      return false;
    }
  }

  private settleError(p: Pending, error: WsgateError): void {
    if (p.timer) clearTimeout(p.timer);
    p.reject?.(error);
  }

  private timeout(what: string): WsgateError {
    return new WsgateError({ code: ClientErrorCode.TIMEOUT, message: `no answer to ${what} in time` });
  }

  private disconnected(p: Pending): WsgateError {
    return new WsgateError({
      code: ClientErrorCode.DISCONNECTED,
      message: `the connection ended before the answer to ${p.kind} "${String(p.message.type)}"`,
      requestId: p.id,
    });
  }

  private invalid(message: string): WsgateError {
    return new WsgateError({ code: ClientErrorCode.INVALID_ARGUMENT, message });
  }

  private wrap(e: unknown, message: string): WsgateError {
    if (e instanceof WsgateError) return e;
    return new WsgateError({ code: 'CLIENT_ERROR', message: `${message}: ${e instanceof Error ? e.message : String(e)}` });
  }

  // ---------------------------------------------------------------------------------------
  // Subscriptions

  /**
   * Records `topics` as wanted with these options (subscribed now or at the next connection).
   * Filters in the per-topic form (`{routes: {status: [...]}, metrics: {interval: 5000}}`, read
   * as the gateway reads it: every key a listed topic, every value an object) are split into one
   * flat filter per topic, and `interval` is taken out of the filter object, so that each topic
   * keeps its own options whatever else is subscribed or unsubscribed later.
   */
  private want(topics: string[], options: { filters?: Filters; interval?: number; since?: StreamPosition }): void {
    const filters = options.filters;
    const perTopic =
      isObject(filters) &&
      Object.keys(filters).length > 0 &&
      Object.entries(filters).every(([k, v]) => isObject(v) && topics.includes(k));
    for (const t of topics) {
      let own: Filters | undefined = perTopic ? (filters?.[t] as Filters | undefined) : filters;
      let interval = options.interval;
      if (own && 'interval' in own) {
        const { interval: ms, ...rest } = own;
        if (typeof ms === 'number') interval = ms;
        own = rest;
      }
      if (own && Object.keys(own).length === 0) own = undefined;
      if (interval !== undefined && interval <= 0) interval = undefined;
      const old = this.subs.get(t);
      this.subs.set(t, {
        filters: own,
        interval,
        key: JSON.stringify([own ?? null, interval ?? null]),
        position: options.since ? { ...options.since } : old?.position ?? null,
        empty: options.since ? false : old?.empty ?? false,
        confirmed: old?.confirmed ?? false,
        resyncing: old?.resyncing ?? false,
      });
    }
  }

  /** `topics` in groups of equal options (one subscribe message each). */
  private groups(topics: Iterable<string>): string[][] {
    const groups = new Map<string, string[]>();
    for (const topic of topics) {
      const sub = this.subs.get(topic);
      if (!sub) continue;
      const list = groups.get(sub.key);
      if (list) list.push(topic);
      else groups.set(sub.key, [topic]);
    }
    return [...groups.values()];
  }

  /**
   * Sends subscribe requests for `topics` (which share their options): with `since` for every
   * topic with a known position, `recover: true` for the others. Returns the request ids.
   */
  private sendSubscribe(topics: string[], restore?: Map<string, Subscription | undefined>): string[] {
    const first = this.subs.get(topics[0] as string);
    if (!first) return [];
    // A topic named "seq" would make a per-topic `since` map look like one {seq, epoch}.
    if (topics.length > 1 && topics.includes('seq')) {
      const rest = topics.filter((t) => t !== 'seq');
      return [...this.sendSubscribe(['seq'], restore), ...this.sendSubscribe(rest, restore)];
    }
    const since: Record<string, StreamPosition> = {};
    for (const t of topics) {
      const sub = this.subs.get(t);
      if (!sub) continue;
      const at = sub.position ?? (sub.empty ? NOTHING_SEEN : null);
      if (at) {
        since[t] = { ...at };
        sub.resyncing = true;
      }
    }
    const data: Record<string, unknown> = { topics };
    if (first.filters) data.filters = first.filters;
    if (first.interval !== undefined) data.interval = first.interval;
    const withSince = Object.keys(since);
    if (withSince.length > 0) {
      data.since = topics.length === 1 ? since[topics[0] as string] : since;
    } else {
      data.recover = true;
    }
    const p = this.newPending('subscribe', { type: 'subscribe', data });
    p.topics = topics;
    p.since = since;
    if (restore) p.restore = restore;
    p.timer = setTimeout(() => this.onSubscribeTimeout(p), this.requestTimeout());
    this.transmitSubscribe(p);
    return [p.id];
  }

  private transmitSubscribe(p: Pending): void {
    if (this.isConnected() && this.raw(p.message)) {
      this.pending.set(p.id, p);
    } else if (p.timer) {
      // The next connection subscribes every held topic anyway.
      clearTimeout(p.timer);
    }
  }

  private onSubscribeTimeout(p: Pending): void {
    if (!this.pending.delete(p.id)) return;
    for (const t of p.topics ?? []) {
      const s = this.subs.get(t);
      if (s) s.resyncing = false;
    }
    const error = this.timeout('subscribe');
    if (!this.settleWaiters(p.id, null, error)) this.emitEvent('error', error);
  }

  private onSubscribeAck(p: Pending, data: Record<string, unknown>): void {
    const recovery = isObject(data.recovery) ? data.recovery : {};
    for (const topic of p.topics ?? []) {
      const sub = this.subs.get(topic);
      if (!sub) continue;
      sub.confirmed = true;
      sub.resyncing = false;
      const entry = isObject(recovery[topic]) ? (recovery[topic] as Record<string, unknown>) : null;
      if (!entry) continue;
      const position = asPosition(entry.position);
      const sent = p.since?.[topic];
      if (sent) {
        const recovered = entry.recovered !== false;
        this.emitEvent('recovery', {
          topic,
          recovered,
          since: sent.epoch === '' && sent.seq === 0 ? null : { ...sent },
          position,
        });
        if (!recovered) {
          // Nothing is replayed: live publications go on from the current position.
          sub.position = position;
          sub.empty = position === null;
        }
      } else if (!sub.position) {
        sub.position = position;
        sub.empty = position === null;
      }
    }
    const result: SubscribeResult = {
      topics: Array.isArray(data.topics) ? (data.topics as string[]) : p.topics ?? [],
    };
    if (typeof data.recovered === 'boolean') result.recovered = data.recovered;
    if (isObject(data.recovery)) result.recovery = data.recovery as Record<string, TopicRecovery>;
    this.settleWaiters(p.id, result, null);
  }

  private onSubscribeError(p: Pending, error: WsgateError): void {
    const topics = p.topics ?? [];
    const details = error.details;
    const refused =
      isObject(details) && Array.isArray(details.topics)
        ? (details.topics as unknown[]).filter((t): t is string => typeof t === 'string' && topics.includes(t))
        : [];
    if (!p.restore && refused.length > 0 && refused.length < topics.length) {
      // A resubscribe refused for some topics (a permission gone, say): drop those, take the rest.
      for (const t of refused) this.subs.delete(t);
      const rest = topics.filter((t) => !refused.includes(t));
      for (const w of this.waiters) {
        if (w.topics.some((t) => refused.includes(t))) this.rejectWaiter(w, error);
      }
      const ids = this.sendSubscribe(rest);
      for (const w of this.waiters) {
        if (w.awaiting?.delete(p.id)) for (const id of ids) w.awaiting.add(id);
      }
      this.emitEvent('error', error);
      return;
    }
    for (const t of topics) {
      if (p.restore) {
        // The server kept what it had: so does the client.
        const before = p.restore.get(t);
        if (before) this.subs.set(t, before);
        else this.subs.delete(t);
      } else {
        this.subs.delete(t);
      }
    }
    if (!this.settleWaiters(p.id, null, error) || !p.restore) this.emitEvent('error', error);
  }

  /** Settles the waiters of subscribe request `id`; returns whether there was one. */
  private settleWaiters(id: string, result: SubscribeResult | null, error: WsgateError | null): boolean {
    let any = false;
    for (const w of [...this.waiters]) {
      if (!w.awaiting?.has(id)) continue;
      any = true;
      if (error) {
        this.rejectWaiter(w, error);
        continue;
      }
      w.awaiting.delete(id);
      if (result) {
        for (const t of result.topics) if (!w.result.topics.includes(t)) w.result.topics.push(t);
        if (result.recovered !== undefined) {
          w.result.recovered = (w.result.recovered ?? true) && result.recovered;
        }
        if (result.recovery) w.result.recovery = { ...(w.result.recovery ?? {}), ...result.recovery };
      }
      if (w.awaiting.size === 0) {
        this.waiters = this.waiters.filter((x) => x !== w);
        if (w.timer) clearTimeout(w.timer);
        w.resolve(w.result);
      }
    }
    return any;
  }

  private rejectWaiter(w: Waiter, error: WsgateError): void {
    this.waiters = this.waiters.filter((x) => x !== w);
    if (w.timer) clearTimeout(w.timer);
    w.reject(error);
  }

  // ---------------------------------------------------------------------------------------
  // Incoming

  private onData(raw: unknown): void {
    const text = decodeData(raw);
    if (text === null) return;
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!isObject(msg) || typeof msg.type !== 'string') return;
    const data = isObject(msg.data) ? msg.data : {};
    switch (msg.type) {
      case 'connection':
        this.onConnection(data);
        return;
      case 'pong':
        this.onPong(data);
        return;
      case 'heartbeat':
        return;
      case 'ack':
        this.onAck(data);
        return;
      case 'error':
        this.onError(data);
        return;
      case 'disconnect':
        this.notice = {
          code: Number(data.code ?? 0),
          reason: String(data.reason ?? ''),
          reconnect: data.reconnect === true,
        };
        return;
      default:
        this.onMessage(msg as unknown as ServerMessage);
    }
  }

  private onAck(data: Record<string, unknown>): void {
    const p = this.pending.get(String(data.requestId));
    if (!p) return;
    if (data.action === 'forwarded' && p.kind === 'request') {
      p.forwarded = true;
      return;
    }
    this.pending.delete(p.id);
    if (p.timer) clearTimeout(p.timer);
    switch (p.kind) {
      case 'subscribe':
        this.onSubscribeAck(p, data);
        return;
      case 'unsubscribe':
        p.resolve?.({ topics: Array.isArray(data.topics) ? data.topics : p.topics ?? [] });
        return;
      case 'publish':
        p.resolve?.({
          topic: String(data.topic ?? ''),
          seq: Number(data.seq),
          epoch: String(data.epoch ?? ''),
          duplicate: data.duplicate === true,
        });
        return;
      case 'send':
        p.resolve?.({ to: String(data.to ?? '') });
        return;
      case 'refresh':
        if (p.token) this.currentToken = p.token;
        this.emitEvent('refresh', { expiresAt: typeof data.expiresAt === 'number' ? data.expiresAt : null });
        this.scheduleRefresh();
        return;
      case 'request':
        // An ack that is not `forwarded`: the gateway answered itself.
        p.resolve?.({ type: 'ack', data } as ServerMessage);
        return;
    }
  }

  private onError(data: Record<string, unknown>): void {
    const error = WsgateError.fromServer(data);
    const p = data.requestId === undefined ? undefined : this.pending.get(String(data.requestId));
    if (!p) {
      if (error.code === 'UNAUTHORIZED' && this.currentState === 'connecting') this.refusedUnauthorized = true;
      this.emitEvent('error', error);
      return;
    }
    this.pending.delete(p.id);
    if (error.code === 'RATE_LIMIT_EXCEEDED') {
      // The message was dropped unread: sending it again is safe.
      const generation = this.generation;
      setTimeout(() => {
        if (generation !== this.generation) {
          if (p.kind !== 'subscribe' && p.kind !== 'refresh') this.outbox.push(p);
          return;
        }
        if (p.kind === 'subscribe') this.transmitSubscribe(p);
        else this.transmit(p);
      }, error.retryAfter ?? 100);
      return;
    }
    if (p.timer) clearTimeout(p.timer);
    switch (p.kind) {
      case 'subscribe':
        this.onSubscribeError(p, error);
        return;
      case 'refresh':
        this.emitEvent('error', error);
        if (error.code === 'UNAUTHORIZED') this.retryRefresh(p.attempt ?? 0);
        return;
      default:
        p.reject?.(error);
    }
  }

  private onMessage(msg: ServerMessage): void {
    const data = msg.data as unknown;
    // A backend's answer to a request.
    if (msg.topic === undefined && isObject(data) && data.requestId !== undefined) {
      const p = this.pending.get(String(data.requestId));
      if (p && p.kind === 'request') {
        this.pending.delete(p.id);
        if (p.timer) clearTimeout(p.timer);
        p.resolve?.(msg);
        return;
      }
    }
    if (msg.requireAck && typeof msg.id === 'string') this.queueAck(msg.id);
    if (typeof msg.id === 'string' && this.seen.has(msg.id)) return;
    if (typeof msg.topic === 'string') {
      const sub = this.subs.get(msg.topic);
      if (!sub) return; // unsubscribed meanwhile
      if (typeof msg.seq === 'number' && typeof msg.epoch === 'string') {
        if (!this.inSequence(msg.topic, sub, msg.seq, msg.epoch)) return;
        sub.position = { seq: msg.seq, epoch: msg.epoch };
        sub.empty = false;
      }
    }
    if (typeof msg.id === 'string') this.seen.add(msg.id);
    this.emitEvent('message', msg);
    if (!CLIENT_EVENTS.has(msg.type)) this.emitEvent(msg.type, msg);
  }

  /** Whether a sequenced publication is the application's next one on its topic. */
  private inSequence(topic: string, sub: Subscription, seq: number, epoch: string): boolean {
    const at = sub.position;
    if (!at || at.epoch !== epoch) {
      // First publication, or the topic's counter started over (a new epoch).
      return !sub.resyncing || !at;
    }
    if (seq <= at.seq) return false; // already handed over
    if (seq === at.seq + 1) return true;
    // A skipped number. Filters and conflation skip on purpose.
    if (sub.filters || sub.interval !== undefined) return !sub.resyncing;
    if (!sub.resyncing && this.isConnected()) {
      // Missed publications: subscribe again from here; the server replays them in order and
      // holds the live ones (this one among them) until after the replay.
      this.sendSubscribe([topic]);
    }
    return false;
  }

  private queueAck(id: string): void {
    this.ackIds.push(id);
    if (this.ackIds.length >= 200) {
      this.flushAcks();
      return;
    }
    if (this.ackTimer === undefined) {
      this.ackTimer = setTimeout(() => this.flushAcks(), this.opts.ackDelay ?? 20);
    }
  }

  private flushAcks(): void {
    if (this.ackTimer !== undefined) clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    const ids = [...new Set(this.ackIds)];
    this.ackIds = [];
    if (ids.length > 0) this.raw({ type: 'ack', data: { ids } });
  }
}
