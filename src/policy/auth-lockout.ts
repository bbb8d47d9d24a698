// Brute-force defence for SMTP AUTH. Failures are counted per client address and per username
// (whether or not the account exists, so a lockout reveals nothing); past the threshold, AUTH from
// that address or for that username is refused for a cool-down, correct passwords included.
// Counters live in the store (rate-limiter-flexible over SQLite), so a restart does not reset them.
import type { RateLimiterAbstract } from 'rate-limiter-flexible';
import type { SecurityStore } from '../store/store.js';

export interface LockoutSettings {
  accountFailures: number;
  ipFailures: number;
  /** Window for counting failures, and the cool-down once over, in ms. */
  windowMs: number;
}

export type LockoutState = { locked: false; accountFailures: number } | { locked: true; by: 'ip' | 'account'; retryMs: number };

export class AuthLockout {
  readonly #byIp: RateLimiterAbstract;
  readonly #byAccount: RateLimiterAbstract;
  readonly #settings: LockoutSettings;

  constructor(store: SecurityStore, settings: LockoutSettings) {
    this.#settings = settings;
    const seconds = Math.max(1, Math.round(settings.windowMs / 1000));
    this.#byIp = store.counter({ keyPrefix: 'authfail_ip', points: settings.ipFailures, duration: seconds, blockDuration: seconds });
    this.#byAccount = store.counter({ keyPrefix: 'authfail_account', points: settings.accountFailures, duration: seconds, blockDuration: seconds });
  }

  async state(ip: string, username: string): Promise<LockoutState> {
    const [ipRes, accountRes] = await Promise.all([this.#byIp.get(ip), this.#byAccount.get(normal(username))]);
    if (ipRes && ipRes.consumedPoints >= this.#settings.ipFailures) return { locked: true, by: 'ip', retryMs: ipRes.msBeforeNext };
    if (accountRes && accountRes.consumedPoints >= this.#settings.accountFailures) {
      return { locked: true, by: 'account', retryMs: accountRes.msBeforeNext };
    }
    return { locked: false, accountFailures: accountRes?.consumedPoints ?? 0 };
  }

  /** Counts a failure; returns the lockout it started, if this failure crossed a threshold. */
  async fail(ip: string, username: string): Promise<LockoutState> {
    const [ipRes, accountRes] = await Promise.all([
      this.#byIp.consume(ip).then(
        () => null,
        (r: unknown) => r,
      ),
      this.#byAccount.consume(normal(username)).then(
        () => null,
        (r: unknown) => r,
      ),
    ]);
    // consume() rejects with the limiter's result once the points are spent; an Error is a fault.
    for (const r of [ipRes, accountRes]) if (r instanceof Error) throw r;
    const state = await this.state(ip, username);
    // The failure that reaches the threshold starts a full cool-down, however old the first one.
    if (state.locked) {
      const seconds = Math.max(1, Math.round(this.#settings.windowMs / 1000));
      if (state.by === 'ip') await this.#byIp.block(ip, seconds);
      else await this.#byAccount.block(normal(username), seconds);
      return { ...state, retryMs: seconds * 1000 };
    }
    return state;
  }

  /** A successful login clears the username's failures (not the address's). */
  async succeed(username: string): Promise<void> {
    await this.#byAccount.delete(normal(username));
  }
}

function normal(username: string): string {
  return username.trim().toLowerCase().slice(0, 320);
}
