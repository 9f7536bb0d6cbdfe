/**
 * @wsgate/client: the official JavaScript/TypeScript client of the wsgate WebSocket gateway.
 * Runs in browsers and in Node (pass a WebSocket implementation such as the `ws` package where
 * there is no global `WebSocket`).
 */
export { WsgateClient, FINAL_CLOSE_CODES } from './client.js';
export { WsgateError, ClientErrorCode, ServerErrorCode } from './errors.js';
export type { ErrorData } from './errors.js';
export { decodeJwtClaims, jwtExpiry } from './jwt.js';
export type * from './types.js';
