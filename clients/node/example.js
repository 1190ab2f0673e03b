#!/usr/bin/env node
// @ts-check
/**
 * Example of the Node.js client: encode a text and the images, classify the images against a
 * few labels, rank candidate texts against the first image.
 *
 *     node example.js --target localhost:8001 cat.jpg dog.png
 *     node example.js --json cat.jpg        # one JSON document on stdout (used by the tests)
 *
 * Exit status: 0 on success, 1 when a call fails (with --json the error is printed as
 * `{"error": {...}}` on stdout), 2 on a usage error.
 */

import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import process from 'node:process';
import { parseArgs } from 'node:util';

import { ClipClient, ClipServiceError, credentials } from './src/index.js';

const USAGE = `usage: node example.js [options] IMAGE [IMAGE ...]

options:
  --target HOST:PORT   server (default: $CLIPSERVE_ADDRESS or localhost:8001)
  --text TEXT          text to encode (default: "a photo of a cat")
  --labels A,B,C       labels to classify the images against
  --candidate TEXT     candidate text to rank against the first image (repeatable)
  --top-k K            labels per image (default: all)
  --templates T,U      prompt templates with {} for the label (default: the model's)
  --deadline-ms MS     deadline of each call (default: 30000)
  --token-file PATH    bearer token (default: $CLIPSERVE_TOKEN when set)
  --ca-cert PATH       PEM CA bundle of the server: use TLS
  --proto PATH         clip_service.proto (default: the repository's)
  --json               print one JSON document instead of text`;

const DEFAULT_LABELS = 'cat,dog,person,cup of coffee,car';
const DEFAULT_CANDIDATES = [
  'a photo of a cat',
  'an astronaut in a space suit',
  'a cup of coffee on a table',
  'a red sports car',
];

class UsageError extends Error {}

/** @param {string[]} argv */
function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        target: { type: 'string' },
        text: { type: 'string', default: 'a photo of a cat' },
        labels: { type: 'string', default: DEFAULT_LABELS },
        candidate: { type: 'string', multiple: true },
        'top-k': { type: 'string' },
        templates: { type: 'string' },
        'deadline-ms': { type: 'string', default: '30000' },
        'token-file': { type: 'string' },
        'ca-cert': { type: 'string' },
        proto: { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const { values, positionals } = parsed;
  if (values.help) return null;
  if (positionals.length === 0) throw new UsageError('give at least one image file');
  /** @param {string | undefined} value @param {string} name */
  const positive = (value, name) => {
    if (value === undefined) return undefined;
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${name} must be a positive integer`);
    return n;
  };
  /** @param {string} value */
  const commaList = (value) => value.split(',').map((s) => s.trim()).filter(Boolean);
  return {
    target: values.target ?? process.env.CLIPSERVE_ADDRESS ?? 'localhost:8001',
    text: /** @type {string} */ (values.text),
    labels: commaList(/** @type {string} */ (values.labels)),
    candidates: values.candidate ?? DEFAULT_CANDIDATES,
    topK: positive(values['top-k'], '--top-k'),
    templates: values.templates === undefined ? undefined : commaList(values.templates),
    deadlineMs: positive(values['deadline-ms'], '--deadline-ms'),
    tokenFile: values['token-file'],
    caCert: values['ca-cert'],
    protoPath: values.proto,
    json: Boolean(values.json),
    images: positionals,
  };
}

/** @param {Float32Array} v */
function head(v) {
  return `[${Array.from(v.subarray(0, 4), (x) => x.toFixed(4)).join(', ')}, ...]`;
}

/** @param {NonNullable<ReturnType<typeof parse>>} args */
async function run(args) {
  const token = args.tokenFile
    ? (await readFile(args.tokenFile, 'utf8')).trim()
    : process.env.CLIPSERVE_TOKEN || undefined;
  const client = new ClipClient(args.target, {
    credentials: args.caCert ? credentials.createSsl(await readFile(args.caCert)) : undefined,
    token,
    deadlineMs: args.deadlineMs,
    protoPath: args.protoPath,
  });
  try {
    const images = await Promise.all(args.images.map((path) => readFile(path)));
    const info = await client.modelInfo();
    const [textEmbedding] = await client.encodeText([args.text]);
    const imageEmbeddings = await client.encodeImage(images);
    const classifications = await client.classify(images, args.labels, {
      templates: args.templates,
      topK: args.topK,
    });
    const ranked = await client.rank(images[0], args.candidates);
    return {
      target: args.target,
      model: {
        modelName: info.modelName,
        pretrained: info.pretrained,
        embeddingDim: info.embeddingDim,
        executionProvider: info.executionProvider,
        visionInstances: info.visionBatching.instances,
      },
      text: { text: args.text, embedding: Array.from(textEmbedding) },
      images: args.images.map((path, i) => ({ path, embedding: Array.from(imageEmbeddings[i]) })),
      classifications: args.images.map((path, i) => ({ path, labels: classifications[i] })),
      rank: {
        query: args.images[0],
        results: ranked.map((c) => ({ ...c, text: args.candidates[c.index] })),
      },
    };
  } finally {
    client.close();
  }
}

/** @param {Awaited<ReturnType<typeof run>>} result */
function printText(result) {
  const { model, text, images, classifications, rank } = result;
  console.log(`${result.target}: ${model.modelName} (${model.pretrained}), ` +
    `${model.embeddingDim}-d, ${model.executionProvider}`);
  console.log(`text ${JSON.stringify(text.text)}: ${head(Float32Array.from(text.embedding))}`);
  for (const image of images) {
    console.log(`image ${basename(image.path)}: ${head(Float32Array.from(image.embedding))}`);
  }
  for (const { path, labels } of classifications) {
    const best = labels.map((l) => `${l.label} ${(100 * l.probability).toFixed(1)}%`);
    console.log(`${basename(path)}: ${best.join(', ')}`);
  }
  console.log(`texts ranked against ${basename(rank.query)}:`);
  for (const c of rank.results) {
    console.log(`  ${c.score.toFixed(4)}  p=${c.probability.toFixed(3)}  ${c.text}`);
  }
}

/**
 * An unreadable image or certificate file (ENOENT, EACCES, ...).
 * @param {unknown} err
 * @returns {err is NodeJS.ErrnoException}
 */
function isFileError(err) {
  return err instanceof Error && typeof (/** @type {any} */ (err).syscall) === 'string';
}

async function main() {
  let args;
  try {
    args = parse(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`${USAGE}\n\nerror: ${err.message}`);
    return 2;
  }
  if (args === null) {
    console.log(USAGE);
    return 0;
  }
  try {
    const result = await run(args);
    if (args.json) console.log(JSON.stringify(result));
    else printText(result);
    return 0;
  } catch (err) {
    if (isFileError(err)) {
      console.error(`error: ${err.message}`);
      return 1;
    }
    if (!(err instanceof ClipServiceError)) throw err;
    if (args.json) {
      const { code, codeName, details, method } = err;
      console.log(JSON.stringify({ error: { code, codeName, details, method } }));
    } else {
      console.error(`${err.method} failed: ${err.message}`);
    }
    return 1;
  }
}

process.exitCode = await main();
