// Pure request/response conversions: no server, no sockets.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { status } from '@grpc/grpc-js';

import { ClipServiceError } from '../src/errors.js';
import * as wire from '../src/wire.js';

/** Little-endian float32 bytes of `values`, starting at `offset` inside a larger buffer. */
function fp32Bytes(values, offset = 0) {
  const buf = Buffer.alloc(offset + 4 * values.length);
  values.forEach((v, i) => buf.writeFloatLE(v, offset + 4 * i));
  return buf.subarray(offset);
}

describe('requests', () => {
  test('images: bytes and urls, named when wrong', () => {
    const bytes = new Uint8Array([1, 2, 3]);
    const [a, b] = wire.imageList([bytes, { url: 'https://example.com/cat.jpg' }]);
    assert.deepEqual([...a.data], [1, 2, 3]);
    assert.ok(Buffer.isBuffer(a.data));
    assert.deepEqual(b, { url: 'https://example.com/cat.jpg' });
    assert.throws(() => wire.imageList([bytes, 'cat.jpg']), /images\[1\].*fs\.readFile/);
    assert.throws(() => wire.imageList([bytes, 42]), /images\[1\] must be .* got number/);
  });

  test('a lone string or Buffer is refused, not iterated', () => {
    assert.throws(() => wire.imageList(Buffer.from('abc')), /images must be an array.*wrap it/);
    assert.throws(() => wire.textList('a cat'), /texts must be an array.*wrap it/);
    assert.throws(() => wire.textList(['a', 3], 'labels'), /labels\[1\] must be a string/);
  });

  test('embedding formats map to the wire enum', () => {
    assert.equal(wire.encodeImageRequest([], 'fp16_bytes').format, 'EMBEDDING_FORMAT_FP16_BYTES');
    assert.equal(wire.encodeTextRequest(['x'], 'float').format, 'EMBEDDING_FORMAT_FLOAT');
    assert.throws(() => wire.formatToPb(/** @type {any} */ ('fp64')), RangeError);
  });

  test('truncation', () => {
    assert.equal(wire.encodeTextRequest(['x'], 'float').truncation, 'TRUNCATION_END');
    assert.equal(wire.encodeTextRequest(['x'], 'float', false).truncation, 'TRUNCATION_NONE');
  });

  test('classify: default templates are empty, topK optional', () => {
    const r = wire.classifyRequest([new Uint8Array(1)], ['cat', 'dog']);
    assert.deepEqual(r.templates, []);
    assert.equal(r.topK, undefined);
    const k = wire.classifyRequest([new Uint8Array(1)], ['cat'], { templates: ['{}'], topK: 1 });
    assert.deepEqual(k.templates, ['{}']);
    assert.equal(k.topK, 1);
  });

  test('topK must be an integer that fits uint32; its range is the server\'s', () => {
    assert.equal(wire.optionalTopK(0), 0);
    assert.throws(() => wire.optionalTopK(1.5), TypeError);
    assert.throws(() => wire.optionalTopK('2'), TypeError);
    assert.throws(() => wire.optionalTopK(-1), RangeError);
    assert.throws(() => wire.optionalTopK(2 ** 32), RangeError);
  });

  test('rank: a string is text, bytes are an image', () => {
    const r = wire.rankRequest(Buffer.from('img'), ['a cat', new Uint8Array(2)], { topK: 2 });
    assert.ok('image' in r.query);
    assert.deepEqual(r.candidates[0], { text: 'a cat' });
    assert.ok('image' in r.candidates[1]);
    assert.throws(() => wire.rankRequest('q', [null]), /candidates\[0\]/);
    assert.throws(() => wire.rankRequest('q', 'a cat'), /candidates must be an array/);
  });
});

describe('responses', () => {
  const values = [0.5, -0.25, 1 / 3, 1e-7];

  test('float, fp32 bytes (unaligned) and fp16 bytes decode to the same float32', () => {
    const expected = Float32Array.from(values);
    const [f] = wire.decodeEmbeddings([{ values }], 4, 'EMBEDDING_FORMAT_FLOAT');
    const [b] = wire.decodeEmbeddings([{ raw: fp32Bytes(values, 1) }], 4, 'EMBEDDING_FORMAT_FP32_BYTES');
    assert.deepEqual(f, expected);
    assert.deepEqual(b, expected);
    const half = Buffer.from([0x00, 0x38, 0x00, 0xb4, 0x55, 0x35, 0x02, 0x00]); // 0.5 -0.25 ~1/3 ~1.19e-7
    const [h] = wire.decodeEmbeddings([{ raw: half }], 4, 'EMBEDDING_FORMAT_FP16_BYTES');
    h.forEach((x, i) => assert.ok(Math.abs(x - values[i]) < 1e-3, `${x} vs ${values[i]}`));
  });

  test('unspecified format means float; rows are views of one block', () => {
    const rows = wire.decodeEmbeddings(
      [{ values: [1, 2] }, { values: [3, 4] }], 2, 'EMBEDDING_FORMAT_UNSPECIFIED');
    assert.deepEqual(rows.map((r) => [...r]), [[1, 2], [3, 4]]);
    assert.equal(rows[0].buffer, rows[1].buffer);
  });

  test('half floats: specials and subnormals', () => {
    assert.equal(wire.halfToFloat(0x3c00), 1);
    assert.equal(wire.halfToFloat(0xc000), -2);
    assert.equal(wire.halfToFloat(0x7bff), 65504);
    assert.equal(wire.halfToFloat(0x0001), 2 ** -24);
    assert.equal(wire.halfToFloat(0x7c00), Infinity);
    assert.equal(wire.halfToFloat(0xfc00), -Infinity);
    assert.ok(Number.isNaN(wire.halfToFloat(0x7e00)));
    assert.ok(Object.is(wire.halfToFloat(0x8000), -0));
  });

  test('contract breaks are DATA_LOSS errors that say what is wrong', () => {
    const check = (fn, pattern) => assert.throws(fn, (err) => {
      assert.ok(err instanceof ClipServiceError);
      assert.equal(err.code, status.DATA_LOSS);
      assert.match(err.details, pattern);
      return true;
    });
    check(() => wire.decodeEmbeddings([{ values: [1] }], 2, 'EMBEDDING_FORMAT_FLOAT'),
      /embeddings\[0\] has 1 values, expected dim=2/);
    check(() => wire.decodeEmbeddings([{ raw: Buffer.alloc(6) }], 2, 'EMBEDDING_FORMAT_FP32_BYTES'),
      /6 raw bytes, expected 4 x dim=2/);
    check(() => wire.decodeEmbeddings([], 2, 7), /unknown embedding format 7/);
    check(() => wire.decodeEncodeResponse({ embeddings: [], dim: 2, format: 'EMBEDDING_FORMAT_FLOAT' }, 1),
      /0 embeddings for 1 inputs/);
    check(() => wire.decodeClassifyResponse({ classifications: [] }, 2), /0 classifications/);
  });

  test('classify and rank keep only the documented fields', () => {
    const label = { label: 'cat', index: 1, probability: 0.75, score: 0.3, extra: 1 };
    assert.deepEqual(wire.decodeClassifyResponse({ classifications: [{ labels: [label] }] }, 1),
      [[{ label: 'cat', index: 1, probability: 0.75, score: 0.3 }]]);
    const cand = { index: 2, score: 0.1, probability: 0.5, item: 'x' };
    assert.deepEqual(wire.decodeRankResponse({ candidates: [cand] }),
      [{ index: 2, score: 0.1, probability: 0.5 }]);
  });
});
