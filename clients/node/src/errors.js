// @ts-check
/**
 * `ClipServiceError`: how every failed call rejects.
 *
 * It carries the gRPC status `code` (a number, compare with `status.INVALID_ARGUMENT`), its
 * name, and the server's `details`, which name the offending item
 * (`images[1]: cannot identify image format ...`). Local mistakes (a wrong input type) reject
 * with the usual `TypeError` / `RangeError` before any call is made.
 */

import { status } from '@grpc/grpc-js';

/** @type {Map<number, string>} */
const CODE_NAMES = new Map(
  Object.entries(status)
    .filter(([, value]) => typeof value === 'number')
    .map(([name, value]) => [/** @type {number} */ (value), name]),
);

/**
 * The name of a gRPC status code, e.g. `INVALID_ARGUMENT` for 3.
 * @param {number} code
 * @returns {string}
 */
export function codeName(code) {
  return CODE_NAMES.get(code) ?? `UNKNOWN_CODE_${code}`;
}

export class ClipServiceError extends Error {
  /**
   * @param {number} code gRPC status code
   * @param {string} details the server's status message, written for the caller
   * @param {{method?: string, attempts?: number, metadata?: import('@grpc/grpc-js').Metadata,
   *          cause?: unknown}} [info]
   */
  constructor(code, details, { method = '', attempts = 1, metadata, cause } = {}) {
    super(`${codeName(code)}: ${details}`, cause === undefined ? undefined : { cause });
    this.name = 'ClipServiceError';
    /** gRPC status code (`status.INVALID_ARGUMENT`, ...). */
    this.code = code;
    /** Its name, e.g. `'INVALID_ARGUMENT'`. */
    this.codeName = codeName(code);
    /** The server's message; names the offending item, e.g. `images[2]: ...`. */
    this.details = details;
    /** The RPC, e.g. `'EncodeImage'`. */
    this.method = method;
    /** Attempts made (more than one after retries on UNAVAILABLE). */
    this.attempts = attempts;
    /** Trailing metadata of the failed call, when the server sent any. */
    this.metadata = metadata;
  }
}

/**
 * Whether `err` is the error grpc-js rejects a call with (`ServiceError`).
 * @param {unknown} err
 * @returns {err is import('@grpc/grpc-js').ServiceError}
 */
export function isServiceError(err) {
  return err instanceof Error && typeof (/** @type {any} */ (err).code) === 'number';
}

/**
 * A grpc-js `ServiceError` as a `ClipServiceError` of the given RPC.
 * @param {import('@grpc/grpc-js').ServiceError} err
 * @param {string} method
 * @param {number} attempts
 * @returns {ClipServiceError}
 */
export function fromServiceError(err, method, attempts) {
  return new ClipServiceError(err.code, err.details ?? '', {
    method,
    attempts,
    metadata: err.metadata,
    cause: err,
  });
}

/**
 * The server answered OK but broke the API contract (wrong number of embeddings, a raw
 * embedding of the wrong size); code DATA_LOSS, as in the Python client.
 * @param {string} details
 * @returns {ClipServiceError}
 */
export function invalidResponse(details) {
  return new ClipServiceError(status.DATA_LOSS, details);
}
