// @ts-check
/**
 * Conversion between client values and `clipserve.v1` messages, both ways. Pure functions.
 *
 * Only what is needed to build a well-typed message is checked here (input types, `topK` fits
 * uint32); limits and semantics (empty lists, duplicate labels, `topK` range, image size) are
 * the server's to judge, so the client never disagrees with it. Same split as the Python
 * client's `clients/wire.py`.
 */

import { invalidResponse } from './errors.js';

/**
 * How embeddings travel on the wire; every format is returned as Float32Array.
 * - `'float'`: packed repeated float.
 * - `'fp32_bytes'`: raw little-endian float32, bit-identical to `'float'` (the default).
 * - `'fp16_bytes'`: raw little-endian float16, half the size; float16 precision.
 * @typedef {'float' | 'fp32_bytes' | 'fp16_bytes'} EmbeddingFormat
 */

/**
 * One image: encoded bytes (JPEG, PNG, WebP, BMP, GIF) as a Buffer or Uint8Array, or
 * `{url}` for the server to fetch (refused with PERMISSION_DENIED unless it allows URLs).
 * @typedef {Uint8Array | {url: string}} ImageInput
 */

/**
 * A rank query or candidate: a string is text, anything else an image.
 * @typedef {string | ImageInput} RankInput
 */

/**
 * @typedef {object} LabelScore one label of a classification, best first
 * @property {string} label
 * @property {number} index position of the label in the request's labels
 * @property {number} probability softmax over all labels of logitScale * score (+ logitBias)
 * @property {number} score cosine similarity between the image and the label embedding
 */

/**
 * @typedef {object} RankedCandidate one rank candidate, best first
 * @property {number} index position of the candidate in the request's candidates
 * @property {number} score cosine similarity to the query
 * @property {number} probability softmax over all candidates of logitScale * score (+ logitBias)
 */

/**
 * @typedef {object} BatchingInfo settings of one tower's dynamic batcher
 * @property {number} maxBatchSize
 * @property {number} maxQueueDelayUs
 * @property {number} maxQueueSize
 * @property {number[]} batchBuckets
 * @property {number[]} lengthBuckets
 * @property {number} instances model instances running batches side by side
 */

/**
 * @typedef {object} ModelInfo what the server serves (GetModelInfo)
 * @property {string} modelName
 * @property {string} pretrained
 * @property {number} embeddingDim
 * @property {number} imageSize
 * @property {number} contextLength
 * @property {string} precision
 * @property {string} executionProvider
 * @property {BatchingInfo} visionBatching
 * @property {BatchingInfo} textBatching
 * @property {number} logitScale
 * @property {number} logitBias
 * @property {string[]} defaultTemplates
 * @property {string} serverVersion
 * @property {number[]} imageMean
 * @property {number[]} imageStd
 * @property {string} interpolation
 * @property {string} resizeMode
 * @property {number} maxItemsPerRequest
 * @property {number} maxLabels
 */

/** @type {Readonly<Record<EmbeddingFormat, string>>} */
const FORMAT_TO_PB = Object.freeze({
  float: 'EMBEDDING_FORMAT_FLOAT',
  fp32_bytes: 'EMBEDDING_FORMAT_FP32_BYTES',
  fp16_bytes: 'EMBEDDING_FORMAT_FP16_BYTES',
});

/** @type {readonly EmbeddingFormat[]} */
export const EMBEDDING_FORMATS = Object.freeze(
  /** @type {EmbeddingFormat[]} */ (Object.keys(FORMAT_TO_PB)),
);

const UINT32_MAX = 2 ** 32 - 1;

/**
 * The wire enum name of an embedding format.
 * @param {EmbeddingFormat} format
 * @returns {string}
 */
export function formatToPb(format) {
  if (!Object.hasOwn(FORMAT_TO_PB, format)) {
    throw new RangeError(
      `embeddingFormat must be one of ${EMBEDDING_FORMATS.join(', ')}, got ${JSON.stringify(format)}`,
    );
  }
  return FORMAT_TO_PB[format];
}

/**
 * @param {unknown} value
 * @returns {string}
 */
function typeName(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'Array';
  if (typeof value === 'object') return value.constructor?.name ?? 'object';
  return typeof value;
}

/**
 * One image as an `Image` message.
 * @param {unknown} image
 * @param {string} where e.g. `images[2]`, named in the error
 * @returns {{data: Buffer} | {url: string}}
 */
export function imageToPb(image, where) {
  if (image instanceof Uint8Array) {
    // Buffer.from(ArrayBuffer, ...) shares memory: no copy of the image bytes.
    return { data: Buffer.from(image.buffer, image.byteOffset, image.byteLength) };
  }
  if (image !== null && typeof image === 'object' && 'url' in image) {
    const { url } = /** @type {{url: unknown}} */ (image);
    if (typeof url === 'string') return { url };
  }
  throw new TypeError(
    `${where} must be encoded image bytes (Buffer or Uint8Array) or {url: string}, got ` +
      `${typeName(image)}${typeof image === 'string' ? ' (read files with fs.readFile first)' : ''}`,
  );
}

/**
 * A list argument as an array; a lone string or Buffer is refused (iterating it would send
 * its characters or bytes).
 * @param {unknown} items
 * @param {string} what argument name, e.g. `images`
 * @returns {unknown[]}
 */
function list(items, what) {
  if (typeof items === 'string' || items instanceof Uint8Array) {
    throw new TypeError(`${what} must be an array, not a single ${typeName(items)}; wrap it in []`);
  }
  if (!Array.isArray(items)) {
    throw new TypeError(`${what} must be an array, got ${typeName(items)}`);
  }
  return items;
}

/**
 * Images of a call as `Image` messages.
 * @param {unknown} images
 * @returns {Array<{data: Buffer} | {url: string}>}
 */
export function imageList(images) {
  return list(images, 'images').map((image, i) => imageToPb(image, `images[${i}]`));
}

/**
 * A list of strings, checked.
 * @param {unknown} texts
 * @param {string} [what]
 * @returns {string[]}
 */
export function textList(texts, what = 'texts') {
  return list(texts, what).map((text, i) => {
    if (typeof text !== 'string') {
      throw new TypeError(`${what}[${i}] must be a string, got ${typeName(text)}`);
    }
    return text;
  });
}

/**
 * `topK` checked to fit the wire's uint32 (its range is the server's to check).
 * @param {unknown} topK
 * @returns {number | undefined}
 */
export function optionalTopK(topK) {
  if (topK === undefined || topK === null) return undefined;
  if (typeof topK !== 'number' || !Number.isInteger(topK)) {
    throw new TypeError(`topK must be an integer or undefined, got ${JSON.stringify(topK)}`);
  }
  if (topK < 0 || topK > UINT32_MAX) {
    throw new RangeError(`topK must be a positive integer that fits uint32, got ${topK}`);
  }
  return topK;
}

/**
 * A rank query or candidate: a string is text, anything else an image.
 * @param {unknown} item
 * @param {string} where
 */
export function rankItemToPb(item, where) {
  return typeof item === 'string' ? { text: item } : { image: imageToPb(item, where) };
}

// ---- requests ----------------------------------------------------------------------------

/**
 * @param {unknown} images
 * @param {EmbeddingFormat} format
 */
export function encodeImageRequest(images, format) {
  return { images: imageList(images), format: formatToPb(format) };
}

/**
 * @param {unknown} texts
 * @param {EmbeddingFormat} format
 * @param {boolean} truncate false: the server refuses a text over the context length
 */
export function encodeTextRequest(texts, format, truncate = true) {
  return {
    texts: textList(texts),
    format: formatToPb(format),
    truncation: truncate ? 'TRUNCATION_END' : 'TRUNCATION_NONE',
  };
}

/**
 * A `ClassifyRequest`; no (or empty) `templates` asks for the model's default set.
 * @param {unknown} images
 * @param {unknown} labels
 * @param {{templates?: unknown, topK?: unknown}} [options]
 */
export function classifyRequest(images, labels, { templates, topK } = {}) {
  return {
    images: imageList(images),
    labels: textList(labels, 'labels'),
    templates: templates === undefined || templates === null ? [] : textList(templates, 'templates'),
    topK: optionalTopK(topK),
  };
}

/**
 * @param {unknown} query
 * @param {unknown} candidates
 * @param {{topK?: unknown}} [options]
 */
export function rankRequest(query, candidates, { topK } = {}) {
  return {
    query: rankItemToPb(query, 'query'),
    candidates: list(candidates, 'candidates').map((c, i) => rankItemToPb(c, `candidates[${i}]`)),
    topK: optionalTopK(topK),
  };
}

// ---- responses ---------------------------------------------------------------------------

/**
 * An IEEE 754 binary16 value (its 16 bits) as a number.
 * @param {number} bits
 * @returns {number}
 */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24; // zero, subnormal
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/**
 * Embeddings of a response as one Float32Array each (views of one contiguous block of
 * `n * dim` floats, `embeddings[0].buffer`), whatever their wire format.
 *
 * @param {ReadonlyArray<{values?: number[], raw?: Uint8Array}>} embeddings
 * @param {number} dim
 * @param {string | number} format the format the response says it used
 * @returns {Float32Array[]}
 */
export function decodeEmbeddings(embeddings, dim, format) {
  const n = embeddings.length;
  const out = new Float32Array(n * dim); // [N, D]
  if (format === 'EMBEDDING_FORMAT_FLOAT' || format === 'EMBEDDING_FORMAT_UNSPECIFIED') {
    embeddings.forEach((embedding, i) => {
      const values = embedding.values ?? [];
      if (values.length !== dim) {
        throw invalidResponse(`embeddings[${i}] has ${values.length} values, expected dim=${dim}`);
      }
      out.set(values, i * dim);
    });
  } else if (format === 'EMBEDDING_FORMAT_FP32_BYTES' || format === 'EMBEDDING_FORMAT_FP16_BYTES') {
    const half = format === 'EMBEDDING_FORMAT_FP16_BYTES';
    const itemsize = half ? 2 : 4;
    embeddings.forEach((embedding, i) => {
      const raw = embedding.raw ?? new Uint8Array(0);
      if (raw.byteLength !== itemsize * dim) {
        throw invalidResponse(
          `embeddings[${i}] has ${raw.byteLength} raw bytes, expected ${itemsize} x dim=${dim}`,
        );
      }
      // DataView: any alignment, little-endian whatever the host.
      const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      for (let j = 0; j < dim; j++) {
        out[i * dim + j] = half
          ? halfToFloat(view.getUint16(2 * j, true))
          : view.getFloat32(4 * j, true);
      }
    });
  } else {
    throw invalidResponse(`unknown embedding format ${format}`);
  }
  return Array.from({ length: n }, (_, i) => out.subarray(i * dim, (i + 1) * dim));
}

/**
 * @param {string} what
 * @param {number} got
 * @param {number} expected
 */
function checkCount(what, got, expected) {
  if (got !== expected) {
    throw invalidResponse(`response has ${got} ${what} for ${expected} inputs`);
  }
}

/**
 * @param {{embeddings: Array<{values?: number[], raw?: Uint8Array}>, dim: number,
 *          format: string | number}} response
 * @param {number} expected number of inputs
 * @returns {Float32Array[]}
 */
export function decodeEncodeResponse(response, expected) {
  checkCount('embeddings', response.embeddings.length, expected);
  return decodeEmbeddings(response.embeddings, response.dim, response.format);
}

/**
 * @param {{classifications: Array<{labels: LabelScore[]}>}} response
 * @param {number} expected number of images
 * @returns {LabelScore[][]}
 */
export function decodeClassifyResponse(response, expected) {
  checkCount('classifications', response.classifications.length, expected);
  return response.classifications.map((c) =>
    c.labels.map(({ label, index, probability, score }) => ({ label, index, probability, score })),
  );
}

/**
 * @param {{candidates: RankedCandidate[]}} response
 * @returns {RankedCandidate[]}
 */
export function decodeRankResponse(response) {
  return response.candidates.map(({ index, score, probability }) => ({ index, score, probability }));
}

/**
 * @param {BatchingInfo | null | undefined} b
 * @returns {BatchingInfo}
 */
function batching(b) {
  return {
    maxBatchSize: b?.maxBatchSize ?? 0,
    maxQueueDelayUs: b?.maxQueueDelayUs ?? 0,
    maxQueueSize: b?.maxQueueSize ?? 0,
    batchBuckets: [...(b?.batchBuckets ?? [])],
    lengthBuckets: [...(b?.lengthBuckets ?? [])],
    instances: b?.instances || 1, // 0: a server from before the field had one
  };
}

/**
 * @param {ModelInfo} r a decoded GetModelInfoResponse
 * @returns {ModelInfo}
 */
export function decodeModelInfo(r) {
  return {
    modelName: r.modelName,
    pretrained: r.pretrained,
    embeddingDim: r.embeddingDim,
    imageSize: r.imageSize,
    contextLength: r.contextLength,
    precision: r.precision,
    executionProvider: r.executionProvider,
    visionBatching: batching(r.visionBatching),
    textBatching: batching(r.textBatching),
    logitScale: r.logitScale,
    logitBias: r.logitBias,
    defaultTemplates: [...r.defaultTemplates],
    serverVersion: r.serverVersion,
    imageMean: [...r.imageMean],
    imageStd: [...r.imageStd],
    interpolation: r.interpolation,
    resizeMode: r.resizeMode,
    maxItemsPerRequest: r.maxItemsPerRequest,
    maxLabels: r.maxLabels,
  };
}
