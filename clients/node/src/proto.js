// @ts-check
/**
 * Loads `clipserve.v1.ClipService` from the repository's .proto file at runtime.
 *
 * No generated code: `@grpc/proto-loader` parses the file the server is built from, so the
 * Node client can never drift from the API. The file is found relative to this module
 * (`<repo>/proto/clipserve/v1/clip_service.proto`); pass `protoPath` where the client is
 * installed apart from the repository.
 */

import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** The API file, found from this module: clients/node/src -> <repo>/proto. */
export const DEFAULT_PROTO_PATH = fileURLToPath(
  new URL('../../../proto/clipserve/v1/clip_service.proto', import.meta.url),
);

export const SERVICE_NAME = 'clipserve.v1.ClipService';

/**
 * How messages become JavaScript values: camelCase fields (`topK`, `embeddingDim`), enums as
 * their names, 64-bit integers as numbers, unset scalars as their defaults (proto3 omits zeros
 * on the wire), and `oneof` members named (`image.source === 'data'`).
 * @type {protoLoader.Options}
 */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

/** @type {Map<string, grpc.ServiceClientConstructor>} */
const cache = new Map();

/**
 * The generated client constructor of `clipserve.v1.ClipService` (parsed once per file).
 * @param {string} [protoPath] path of clip_service.proto; defaults to the repository's copy
 * @returns {grpc.ServiceClientConstructor}
 */
export function loadClipService(protoPath = DEFAULT_PROTO_PATH) {
  let service = cache.get(protoPath);
  if (service === undefined) {
    let definition;
    try {
      definition = protoLoader.loadSync(protoPath, LOADER_OPTIONS);
    } catch (err) {
      throw new Error(
        `cannot load the clipserve API from ${protoPath} (pass protoPath to point at ` +
          `clip_service.proto): ${err instanceof Error ? err.message : err}`,
      );
    }
    const root = /** @type {any} */ (grpc.loadPackageDefinition(definition));
    /** @type {grpc.ServiceClientConstructor | undefined} */
    const loaded = root.clipserve?.v1?.ClipService;
    if (typeof loaded !== 'function') {
      throw new Error(`${protoPath} does not define ${SERVICE_NAME}`);
    }
    service = loaded;
    cache.set(protoPath, service);
  }
  return service;
}
