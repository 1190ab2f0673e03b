// @ts-check
/**
 * `ClipClient`: the promise-based Node.js client of `clipserve.v1.ClipService`.
 *
 * Same semantics as the Python `ClipClient` (clients/client.py): one channel per client,
 * a default deadline of 30 s per call (retries and their waits included), UNAVAILABLE
 * retried with backoff, embeddings fetched as raw fp32 bytes and returned as float32.
 */

import { createRequire } from 'node:module';

import * as grpc from '@grpc/grpc-js';

import { ClipServiceError, fromServiceError, isServiceError } from './errors.js';
import { loadClipService } from './proto.js';
import { nextDelayMs, retryPolicy } from './retry.js';
import * as wire from './wire.js';

const { version: VERSION } = createRequire(import.meta.url)('../package.json');

export const DEFAULT_TARGET = 'localhost:8001';
export const DEFAULT_DEADLINE_MS = 30_000;
/** 64 MiB both ways: a batch of images or of 1024-d embeddings can pass gRPC's 4 MiB default. */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * @typedef {object} ClipClientOptions
 * @property {grpc.ChannelCredentials} [credentials] TLS: `grpc.credentials.createSsl(ca, key,
 *   cert)`; default plaintext
 * @property {string} [token] bearer token, sent as `authorization: Bearer <token>` on every call
 * @property {grpc.Metadata | Record<string, string | string[]>} [metadata] extra metadata sent
 *   on every call
 * @property {number | null} [deadlineMs] default deadline of a call in milliseconds, retries
 *   included (default 30000); null for none
 * @property {Partial<import('./retry.js').RetryPolicy>} [retry] retry on UNAVAILABLE;
 *   `{maxAttempts: 1}` disables retries
 * @property {wire.EmbeddingFormat} [embeddingFormat] default wire format of embeddings
 *   (default `'fp32_bytes'`); always returned as Float32Array
 * @property {'round_robin' | 'pick_first'} [loadBalancing] `round_robin` spreads calls over
 *   every address the target resolves to (`dns:///clipserve.ns.svc:8001`)
 * @property {number} [maxMessageBytes] largest message sent or received (default 64 MiB)
 * @property {grpc.ChannelOptions} [channelOptions] extra channel arguments; they win over ours
 * @property {string} [protoPath] path of clip_service.proto (default: the repository's)
 */

/**
 * @typedef {object} CallOptions
 * @property {number | null} [deadlineMs] this call's deadline in ms (null: none; default: the
 *   client's)
 * @property {AbortSignal} [signal] cancels the call (rejects with CANCELLED)
 */

/**
 * @param {string | undefined} token
 * @param {ClipClientOptions['metadata']} extra
 * @returns {grpc.Metadata}
 */
export function callMetadata(token, extra) {
  const metadata = extra instanceof grpc.Metadata ? extra.clone() : new grpc.Metadata();
  if (extra !== undefined && !(extra instanceof grpc.Metadata)) {
    for (const [key, value] of Object.entries(extra)) {
      for (const v of Array.isArray(value) ? value : [value]) metadata.add(key, v);
    }
  }
  if (token !== undefined) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/**
 * @param {number | null | undefined} deadlineMs
 * @param {string} what
 */
function checkDeadline(deadlineMs, what) {
  if (deadlineMs !== undefined && deadlineMs !== null && !(deadlineMs > 0)) {
    throw new RangeError(`${what} must be > 0 or null, got ${deadlineMs}`);
  }
}

/**
 * @param {AbortSignal | undefined} signal
 * @param {string} method
 * @param {number} attempts
 */
function cancelled(signal, method, attempts) {
  const reason = signal?.reason instanceof Error ? signal.reason.message : 'aborted';
  return new ClipServiceError(grpc.status.CANCELLED, `cancelled by the caller: ${reason}`, {
    method,
    attempts,
  });
}

/**
 * @param {number} ms
 * @param {AbortSignal | undefined} signal
 * @returns {Promise<boolean>} false when aborted
 */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class ClipClient {
  /**
   * A client of the server at `target` (`host:port`, `dns:///name:port`, `unix:path`). The
   * channel connects lazily, on the first call.
   * @param {string} [target]
   * @param {ClipClientOptions} [options]
   */
  constructor(target = DEFAULT_TARGET, options = {}) {
    const {
      credentials = grpc.credentials.createInsecure(),
      token,
      metadata,
      deadlineMs = DEFAULT_DEADLINE_MS,
      retry,
      embeddingFormat = 'fp32_bytes',
      loadBalancing,
      maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
      channelOptions = {},
      protoPath,
    } = options;
    if (typeof target !== 'string' || target === '') {
      throw new TypeError(`target must be a non-empty string, got ${JSON.stringify(target)}`);
    }
    checkDeadline(deadlineMs, 'deadlineMs');
    wire.formatToPb(embeddingFormat);
    if (loadBalancing !== undefined && !['round_robin', 'pick_first'].includes(loadBalancing)) {
      throw new RangeError(`loadBalancing must be round_robin or pick_first, got ${loadBalancing}`);
    }
    /** @private */ this._target = target;
    /** @private */ this._deadlineMs = deadlineMs;
    /** @private */ this._retry = retryPolicy(retry);
    /** @private */ this._format = embeddingFormat;
    /** @private */ this._metadata = callMetadata(token, metadata);
    /** @type {grpc.ChannelOptions} */
    const channel = {
      'grpc.max_receive_message_length': maxMessageBytes,
      'grpc.max_send_message_length': maxMessageBytes,
      'grpc.primary_user_agent': `clipserve-node/${VERSION}`,
    };
    if (loadBalancing !== undefined) {
      channel['grpc.service_config'] = JSON.stringify({
        loadBalancingConfig: [{ [loadBalancing]: {} }],
      });
    }
    const Service = loadClipService(protoPath);
    /** @private */ this._stub = new Service(target, credentials, { ...channel, ...channelOptions });
  }

  /** The target this client calls. */
  get target() {
    return this._target;
  }

  /** The underlying grpc-js client, e.g. for `waitForReady` or a health check. */
  get grpcClient() {
    return this._stub;
  }

  /** Close the channel; calls in flight are cancelled. */
  close() {
    this._stub.close();
  }

  /**
   * L2-normalised text embeddings, one Float32Array of `dim` floats per text, in input order.
   * @param {string[]} texts
   * @param {CallOptions & {truncate?: boolean, embeddingFormat?: wire.EmbeddingFormat}} [options]
   *   `truncate: false` makes the server refuse (INVALID_ARGUMENT) a text longer than the
   *   model's context instead of cutting it
   * @returns {Promise<Float32Array[]>}
   */
  async encodeText(texts, options = {}) {
    const { truncate = true, embeddingFormat = this._format } = options;
    const request = wire.encodeTextRequest(texts, embeddingFormat, truncate);
    const n = request.texts.length;
    return this._invoke('EncodeText', request, (r) => wire.decodeEncodeResponse(r, n), options);
  }

  /**
   * L2-normalised image embeddings, one Float32Array per image, in input order.
   * @param {wire.ImageInput[]} images encoded bytes (Buffer/Uint8Array) or `{url}`
   * @param {CallOptions & {embeddingFormat?: wire.EmbeddingFormat}} [options]
   * @returns {Promise<Float32Array[]>}
   */
  async encodeImage(images, options = {}) {
    const { embeddingFormat = this._format } = options;
    const request = wire.encodeImageRequest(images, embeddingFormat);
    const n = request.images.length;
    return this._invoke('EncodeImage', request, (r) => wire.decodeEncodeResponse(r, n), options);
  }

  /**
   * Zero-shot classification: per image, labels best first.
   * @param {wire.ImageInput[]} images
   * @param {string[]} labels
   * @param {CallOptions & {templates?: string[], topK?: number}} [options] `templates`:
   *   prompts with one `{}` for the label (default: the model's set; `['{}']`: bare labels);
   *   `topK` unset returns every label, probabilities summing to 1
   * @returns {Promise<wire.LabelScore[][]>}
   */
  async classify(images, labels, options = {}) {
    const request = wire.classifyRequest(images, labels, options);
    const n = request.images.length;
    return this._invoke('Classify', request, (r) => wire.decodeClassifyResponse(r, n), options);
  }

  /**
   * Candidates ordered by similarity to the query, best first. A string is text, a
   * Buffer/Uint8Array or `{url}` an image.
   * @param {wire.RankInput} query
   * @param {wire.RankInput[]} candidates
   * @param {CallOptions & {topK?: number}} [options]
   * @returns {Promise<wire.RankedCandidate[]>}
   */
  async rank(query, candidates, options = {}) {
    const request = wire.rankRequest(query, candidates, options);
    return this._invoke('Rank', request, wire.decodeRankResponse, options);
  }

  /**
   * What model the server serves, its preprocessing, batching and limits.
   * @param {CallOptions} [options]
   * @returns {Promise<wire.ModelInfo>}
   */
  async modelInfo(options = {}) {
    return this._invoke('GetModelInfo', {}, wire.decodeModelInfo, options);
  }

  /**
   * Send `request`, retrying UNAVAILABLE within the deadline; decode the response.
   * @template T
   * @param {string} method
   * @param {object} request
   * @param {(response: any) => T} decode
   * @param {CallOptions} options
   * @returns {Promise<T>}
   * @private
   */
  async _invoke(method, request, decode, { deadlineMs, signal } = {}) {
    checkDeadline(deadlineMs, 'deadlineMs');
    const ms = deadlineMs === undefined ? this._deadlineMs : deadlineMs;
    const deadline = ms === null ? Infinity : Date.now() + ms;
    for (let failures = 0; ; ) {
      if (signal?.aborted) throw cancelled(signal, method, failures + 1);
      let response;
      try {
        response = await this._unary(method, request, deadline, signal);
      } catch (err) {
        if (!isServiceError(err)) throw err;
        failures += 1;
        const delay = nextDelayMs(this._retry, err.code, failures, Math.random(), deadline - Date.now());
        if (delay === null) throw fromServiceError(err, method, failures);
        if (!(await sleep(delay, signal))) throw cancelled(signal, method, failures);
        continue;
      }
      try {
        return decode(response);
      } catch (err) {
        if (err instanceof ClipServiceError) {
          err.method = method;
          err.attempts = failures + 1;
        }
        throw err;
      }
    }
  }

  /**
   * One attempt of a unary call.
   * @param {string} method
   * @param {object} request
   * @param {number} deadline epoch ms (Infinity: none)
   * @param {AbortSignal | undefined} signal
   * @returns {Promise<unknown>}
   * @private
   */
  _unary(method, request, deadline, signal) {
    return new Promise((resolve, reject) => {
      const onAbort = () => call.cancel();
      const call = this._stub[method](
        request,
        this._metadata.clone(),
        { deadline },
        (/** @type {grpc.ServiceError | null} */ err, /** @type {unknown} */ response) => {
          signal?.removeEventListener('abort', onAbort);
          if (err) reject(err);
          else resolve(response);
        },
      );
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }
}
