// When to try a deferred recipient again: exponential backoff from `queue.first_retry` (1 min by
// default), doubling per attempt up to `queue.max_retry_interval` (1 h), minus up to 10 % jitter
// so that messages deferred together (a destination that was down) do not all come back in the
// same second. Jitter only shortens the delay, so the configured maximum is never exceeded.

export interface RetrySettings {
  first_retry: number;
  max_retry_interval: number;
}

/** Delay in ms after the `attempts`-th failed attempt (1 for the first). */
export function retryDelay(attempts: number, settings: RetrySettings, random: () => number = Math.random): number {
  const exponent = Math.min(Math.max(attempts - 1, 0), 30);
  const base = Math.min(settings.first_retry * 2 ** exponent, settings.max_retry_interval);
  return Math.max(1, Math.round(base * (1 - 0.1 * random())));
}
