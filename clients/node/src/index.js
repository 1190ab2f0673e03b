// @ts-check
/**
 * Node.js client of clipserve (`clipserve.v1.ClipService`).
 *
 *     import { ClipClient, status } from '@clipserve/client';
 *     const client = new ClipClient('localhost:8001');
 *     const [vector] = await client.encodeText(['a photo of a cat']); // Float32Array(dim)
 *     client.close();
 */

export { status, credentials, Metadata } from '@grpc/grpc-js';

export { ClipClient, DEFAULT_TARGET, DEFAULT_DEADLINE_MS, DEFAULT_MAX_MESSAGE_BYTES } from './client.js';
export { ClipServiceError, codeName } from './errors.js';
export { DEFAULT_PROTO_PATH, loadClipService } from './proto.js';
export { DEFAULT_RETRY } from './retry.js';
export { EMBEDDING_FORMATS } from './wire.js';
