/**
 * Errors: the server's `error` messages (string `code`, `numericCode`, `details`, `requestId`,
 * `retryAfter`) and the client's own (`TIMEOUT`, `DISCONNECTED`, `CLOSED`).
 */

/** The client's own codes, next to the server's (docs/protocol.md, "Error codes"). */
export const ClientErrorCode = {
  /** No answer within the timeout. */
  TIMEOUT: 'TIMEOUT',
  /** The connection ended after the request was sent and before its answer (a direct message
   * or a backend request is not sent again: it might have been acted on). */
  DISCONNECTED: 'DISCONNECTED',
  /** The client was closed (by `close()`, or for good by the server). */
  CLOSED: 'CLOSED',
  /** A message the client refuses to send (a reserved type, say). */
  INVALID_ARGUMENT: 'INVALID_ARGUMENT',
} as const;

/** The server's codes (docs/protocol.md, "Error codes"), with their numeric twins. */
export const ServerErrorCode = {
  TOO_MANY_CONNECTIONS: 1000,
  UNAUTHORIZED: 1001,
  UNAVAILABLE: 1003,
  INTERNAL_ERROR: 1004,
  INVALID_MESSAGE_FORMAT: 2000,
  MESSAGE_TOO_LARGE: 2001,
  RATE_LIMIT_EXCEEDED: 2002,
  SLOW_CONSUMER: 2003,
  INVALID_SUBSCRIPTION: 3000,
  PERMISSION_DENIED: 3001,
  INVALID_OPERATION: 3002,
  TOO_MANY_SUBSCRIPTIONS: 3003,
  INVALID_TOPIC: 3004,
  NOT_FOUND: 3005,
  METHOD_NOT_ALLOWED: 3006,
} as const;

export interface ErrorData {
  code: string;
  numericCode?: number;
  message?: string;
  details?: unknown;
  requestId?: unknown;
  retryAfter?: number;
}

export class WsgateError extends Error {
  /** `UNAUTHORIZED`, `PERMISSION_DENIED`, ... or one of the client's own codes. */
  readonly code: string;
  readonly numericCode: number | undefined;
  readonly details: unknown;
  /** The id of the request the server answered, when known. */
  readonly requestId: unknown;
  /** Milliseconds to wait before sending again (`RATE_LIMIT_EXCEEDED`). */
  readonly retryAfter: number | undefined;

  constructor(data: ErrorData) {
    super(data.message ?? data.code);
    this.name = 'WsgateError';
    this.code = data.code;
    this.numericCode = data.numericCode;
    this.details = data.details;
    this.requestId = data.requestId;
    this.retryAfter = data.retryAfter;
  }

  /** The error of a server `error` message's `data`. */
  static fromServer(data: unknown): WsgateError {
    const d = (data && typeof data === 'object' ? data : {}) as Record<string, unknown>;
    return new WsgateError({
      code: typeof d.code === 'string' ? d.code : 'UNKNOWN',
      numericCode: typeof d.numericCode === 'number' ? d.numericCode : undefined,
      message: typeof d.message === 'string' ? d.message : undefined,
      details: d.details,
      requestId: d.requestId,
      retryAfter: typeof d.retryAfter === 'number' ? d.retryAfter : undefined,
    });
  }
}
