// ClipClient without a server: options, metadata, proto loading, and the call loop (retry,
// deadline, cancellation, error mapping) on a fake stub. No sockets are opened: grpc-js
// channels connect on the first call, and every call here goes to the fake.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { Metadata, status } from '@grpc/grpc-js';

import { callMetadata, ClipClient } from '../src/client.js';
import { ClipServiceError, codeName } from '../src/errors.js';
import { DEFAULT_PROTO_PATH, loadClipService } from '../src/proto.js';
import { DEFAULT_RETRY, nextDelayMs, retryPolicy } from '../src/retry.js';

/** A grpc-js style error. */
function serviceError(code, details) {
  return Object.assign(new Error(`${code} ${details}`), { code, details, metadata: new Metadata() });
}

/** A client whose stub answers from `replies` (errors or responses) and records calls. */
function fakeClient(replies, options = {}) {
  const client = new ClipClient('127.0.0.1:1', {
    retry: { initialBackoffMs: 1, maxBackoffMs: 2 }, ...options });
  const calls = [];
  const handler = (request, metadata, callOptions, callback) => {
    calls.push({ request, metadata, callOptions });
    const reply = replies.shift();
    const call = { cancel: () => callback(serviceError(status.CANCELLED, 'Cancelled on client')) };
    if (reply !== 'hang') setImmediate(() => (reply instanceof Error ? callback(reply) : callback(null, reply)));
    return call;
  };
  client.close();
  client._stub = { GetModelInfo: handler, EncodeText: handler, close() {} };
  return { client, calls };
}

const ENCODED = { embeddings: [{ raw: Buffer.alloc(8) }], dim: 2, format: 'EMBEDDING_FORMAT_FP32_BYTES' };

describe('proto', () => {
  test('the repository proto defines the five RPCs', () => {
    const Service = loadClipService();
    assert.equal(loadClipService(DEFAULT_PROTO_PATH), Service); // parsed once
    for (const m of ['EncodeImage', 'EncodeText', 'Classify', 'Rank', 'GetModelInfo']) {
      assert.equal(typeof Service.prototype[m], 'function', m);
    }
  });

  test('a wrong protoPath says how to fix it', () => {
    assert.throws(() => loadClipService('/nonexistent/clip_service.proto'), /pass protoPath/);
  });
});

describe('options', () => {
  test('metadata: token as a bearer header plus extra entries', () => {
    const md = callMetadata('s3cret', { 'x-team': 'vision', 'x-tag': ['a', 'b'] });
    assert.deepEqual(md.get('authorization'), ['Bearer s3cret']);
    assert.deepEqual(md.get('x-tag'), ['a', 'b']);
    const given = new Metadata();
    given.set('x-a', '1');
    const merged = callMetadata(undefined, given);
    assert.deepEqual(merged.get('x-a'), ['1']);
    assert.notEqual(merged, given);
  });

  test('bad options are refused at construction', () => {
    assert.throws(() => new ClipClient(''), TypeError);
    assert.throws(() => new ClipClient('h:1', { deadlineMs: 0 }), RangeError);
    assert.throws(() => new ClipClient('h:1', { embeddingFormat: 'fp64' }), RangeError);
    assert.throws(() => new ClipClient('h:1', { loadBalancing: 'random' }), RangeError);
    assert.throws(() => new ClipClient('h:1', { retry: { maxAttempts: 0 } }), RangeError);
  });

  test('input mistakes reject before any call', async () => {
    const { client, calls } = fakeClient([]);
    await assert.rejects(client.encodeText('a cat'), TypeError);
    await assert.rejects(client.encodeImage(['cat.jpg']), /images\[0\]/);
    assert.equal(calls.length, 0);
  });
});

describe('calls', () => {
  test('decodes, sends metadata and a deadline', async () => {
    const { client, calls } = fakeClient([ENCODED], { token: 't', deadlineMs: 5000 });
    const before = Date.now();
    const [v] = await client.encodeText(['a cat']);
    assert.ok(v instanceof Float32Array);
    assert.equal(v.length, 2);
    assert.deepEqual(calls[0].metadata.get('authorization'), ['Bearer t']);
    assert.deepEqual(calls[0].request.texts, ['a cat']);
    const { deadline } = calls[0].callOptions;
    assert.ok(deadline >= before + 5000 && deadline <= Date.now() + 5000);
    assert.equal((await fakeClient([ENCODED]).client.encodeText(['x'], { deadlineMs: null })).length, 1);
  });

  test('UNAVAILABLE is retried, then succeeds', async () => {
    const { client, calls } = fakeClient([serviceError(status.UNAVAILABLE, 'starting'), ENCODED]);
    await client.encodeText(['a cat']);
    assert.equal(calls.length, 2);
  });

  test('gives up after maxAttempts with the last error', async () => {
    const down = () => serviceError(status.UNAVAILABLE, 'connection refused');
    const { client, calls } = fakeClient([down(), down(), down()], { retry: { maxAttempts: 3, initialBackoffMs: 1 } });
    await assert.rejects(client.modelInfo(), (err) => {
      assert.ok(err instanceof ClipServiceError);
      assert.equal(err.code, status.UNAVAILABLE);
      assert.equal(err.attempts, 3);
      assert.equal(err.method, 'GetModelInfo');
      return true;
    });
    assert.equal(calls.length, 3);
  });

  test('other codes are not retried and keep the server\'s details', async () => {
    const bad = serviceError(status.INVALID_ARGUMENT, 'texts: empty');
    const { client, calls } = fakeClient([bad]);
    await assert.rejects(client.encodeText([]), (err) => {
      assert.equal(err.code, status.INVALID_ARGUMENT);
      assert.equal(err.codeName, 'INVALID_ARGUMENT');
      assert.equal(err.details, 'texts: empty');
      assert.equal(err.message, 'INVALID_ARGUMENT: texts: empty');
      assert.equal(err.cause, bad);
      return true;
    });
    assert.equal(calls.length, 1);
  });

  test('a response that breaks the contract names the RPC', async () => {
    const { client } = fakeClient([{ ...ENCODED, dim: 3 }]);
    await assert.rejects(client.encodeText(['x']), (err) => {
      assert.equal(err.code, status.DATA_LOSS);
      assert.equal(err.method, 'EncodeText');
      return true;
    });
  });

  test('an AbortSignal cancels the call', async () => {
    const { client } = fakeClient(['hang']);
    const controller = new AbortController();
    const pending = client.encodeText(['x'], { signal: controller.signal });
    controller.abort();
    await assert.rejects(pending, (err) => err.code === status.CANCELLED);
    await assert.rejects(client.encodeText(['x'], { signal: AbortSignal.abort() }),
      /CANCELLED: cancelled by the caller/);
  });
});

describe('retry policy', () => {
  test('exponential backoff, capped, jittered, within the deadline', () => {
    const p = retryPolicy({ jitter: 0 });
    assert.equal(nextDelayMs(p, status.UNAVAILABLE, 1, 0.5), 100);
    assert.equal(nextDelayMs(p, status.UNAVAILABLE, 3, 0.5), 400);
    assert.equal(nextDelayMs(retryPolicy({ maxAttempts: 10, jitter: 0 }), status.UNAVAILABLE, 9, 0), 2000);
    assert.equal(nextDelayMs(DEFAULT_RETRY, status.UNAVAILABLE, 1, 1), 50);
    assert.equal(nextDelayMs(DEFAULT_RETRY, status.UNAVAILABLE, 4, 0), null); // attempts used up
    assert.equal(nextDelayMs(DEFAULT_RETRY, status.RESOURCE_EXHAUSTED, 1, 0), null);
    assert.equal(nextDelayMs(DEFAULT_RETRY, status.UNAVAILABLE, 1, 0, 80), null); // past deadline
  });

  test('code names', () => {
    assert.equal(codeName(status.INVALID_ARGUMENT), 'INVALID_ARGUMENT');
    assert.equal(codeName(99), 'UNKNOWN_CODE_99');
  });
});
