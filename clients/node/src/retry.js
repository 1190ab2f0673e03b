// @ts-check
/**
 * Retry policy: exponential backoff with jitter, on UNAVAILABLE only (as the Python client).
 *
 * Every clipserve RPC is a pure function of its request, so retrying is safe; UNAVAILABLE is
 * the one status saying the request did not reach a ready server (refused connection, server
 * starting or draining). RESOURCE_EXHAUSTED is not retried: the server is full, and prompt
 * retries from every client would keep it full. Pure functions: the caller passes the random
 * draw and the time left, so the policy is tested without clocks.
 */

import { status } from '@grpc/grpc-js';

/**
 * @typedef {object} RetryPolicy
 * @property {number} maxAttempts attempts in all, the first included; 1 disables retries
 * @property {number} initialBackoffMs wait after the first failure (before jitter)
 * @property {number} maxBackoffMs cap of a wait
 * @property {number} multiplier growth of the wait per failure
 * @property {number} jitter fraction of the wait that is random, in [0, 1]
 */

/** @type {Readonly<RetryPolicy>} */
export const DEFAULT_RETRY = Object.freeze({
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 2000,
  multiplier: 2,
  jitter: 0.5,
});

/** @type {ReadonlySet<number>} */
export const RETRYABLE_CODES = new Set([status.UNAVAILABLE]);

/**
 * `DEFAULT_RETRY` with the given fields replaced, checked.
 * @param {Partial<RetryPolicy>} [overrides]
 * @returns {Readonly<RetryPolicy>}
 */
export function retryPolicy(overrides = {}) {
  const policy = { ...DEFAULT_RETRY, ...overrides };
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) {
    throw new RangeError(`retry.maxAttempts must be an integer >= 1, got ${policy.maxAttempts}`);
  }
  if (!(policy.initialBackoffMs >= 0) || !(policy.maxBackoffMs >= 0)) {
    throw new RangeError('retry backoff times must be >= 0');
  }
  if (!(policy.multiplier >= 1)) {
    throw new RangeError(`retry.multiplier must be >= 1, got ${policy.multiplier}`);
  }
  if (!(policy.jitter >= 0 && policy.jitter <= 1)) {
    throw new RangeError(`retry.jitter must be in [0, 1], got ${policy.jitter}`);
  }
  return Object.freeze(policy);
}

/**
 * Milliseconds to wait before the next attempt, or `null` to give up and reject.
 *
 * The wait after `failures` failed attempts is `cap * (1 - jitter * rand)` with
 * `cap = min(maxBackoffMs, initialBackoffMs * multiplier ** (failures - 1))`; a retry whose
 * wait would reach past the call's deadline is not made.
 *
 * @param {Readonly<RetryPolicy>} policy
 * @param {number} code status of the attempt that just failed
 * @param {number} failures attempts made so far, all failed (1 after the first failure)
 * @param {number} rand uniform random draw in [0, 1)
 * @param {number} [remainingMs] time left before the call's deadline (Infinity: none)
 * @returns {number | null}
 */
export function nextDelayMs(policy, code, failures, rand, remainingMs = Infinity) {
  if (!RETRYABLE_CODES.has(code) || failures >= policy.maxAttempts) {
    return null;
  }
  const cap = Math.min(
    policy.maxBackoffMs,
    policy.initialBackoffMs * policy.multiplier ** (failures - 1),
  );
  const delay = cap * (1 - policy.jitter * rand);
  return delay >= remainingMs ? null : delay;
}
