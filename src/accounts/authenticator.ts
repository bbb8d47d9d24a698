// Checks service-account credentials for SMTP AUTH.
//
// Why a cache: verifying an argon2id hash costs ~14 ms of CPU, and devices open a new connection
// (and AUTH) for every message. Like Dovecot's auth cache, a successful check is remembered for a
// short time under a keyed hash of the credentials (HMAC with a key that lives only in this
// process), never the password itself. An entry only counts while the stored hash is the one it
// was made for, so a password change or `account set` takes effect on the next AUTH; the enabled
// and smtp_auth flags are read from the store on every attempt. Failures are never cached.
import { createHmac, randomBytes } from 'node:crypto';
import type { Account, AccountStore } from '../store/store.js';
import { decoyPasswordHash, verifyPassword } from './password.js';

export type AuthOutcome =
  | { ok: true; address: string; account: Account; cached: boolean }
  | { ok: false; reason: 'bad_credentials' | 'account_disabled' | 'smtp_auth_disabled' };

interface CacheEntry {
  address: string;
  passwordHash: string;
  expiresAt: number;
}

export interface AuthenticatorOptions {
  /** How long a verified password is trusted without a new argon2 check. 0 disables the cache. */
  cacheTtlMs?: number;
  maxEntries?: number;
  /**
   * The password check (default: argon2id verifyPassword). Tests pass a wrapper around the real
   * one to see that every attempt, whatever the account, costs exactly one verification.
   */
  verify?: (passwordHash: string, password: string) => Promise<boolean>;
}

export class Authenticator {
  readonly #store: AccountStore;
  readonly #key = randomBytes(32);
  readonly #cache = new Map<string, CacheEntry>();
  readonly #ttl: number;
  readonly #maxEntries: number;
  readonly #verify: (passwordHash: string, password: string) => Promise<boolean>;

  constructor(store: AccountStore, options: AuthenticatorOptions = {}) {
    this.#store = store;
    this.#ttl = options.cacheTtlMs ?? 60_000;
    this.#maxEntries = options.maxEntries ?? 10_000;
    this.#verify = options.verify ?? verifyPassword;
  }

  async authenticate(username: string, password: string, now = Date.now()): Promise<AuthOutcome> {
    const address = username.trim().toLowerCase();
    const account = await this.#store.getAccount(address);
    const key = this.#ttl > 0 ? this.#cacheKey(address, password) : '';
    const cached = key ? this.#cache.get(key) : undefined;
    let verified: boolean;
    let fromCache = false;
    if (account && cached && cached.expiresAt > now && cached.passwordHash === account.passwordHash) {
      verified = true;
      fromCache = true;
    } else {
      if (cached) this.#cache.delete(key);
      // Constant work per attempt: unknown accounts cost one argon2 verification too (against a
      // decoy hash with the same parameters), and the flags are looked at only afterwards, so
      // timing reveals neither which accounts exist nor which are disabled.
      verified = await this.#verify(account?.passwordHash ?? (await decoyPasswordHash()), password);
      verified &&= account !== undefined;
    }
    if (!verified || !account) return { ok: false, reason: 'bad_credentials' };
    if (!account.enabled) return { ok: false, reason: 'account_disabled' };
    if (!account.smtpAuth) return { ok: false, reason: 'smtp_auth_disabled' };
    if (key && !fromCache) this.#remember(key, { address, passwordHash: account.passwordHash, expiresAt: now + this.#ttl });
    return { ok: true, address, account, cached: fromCache };
  }

  #cacheKey(address: string, password: string): string {
    return createHmac('sha256', this.#key).update(address).update('\0').update(password).digest('base64');
  }

  #remember(key: string, entry: CacheEntry): void {
    if (this.#cache.size >= this.#maxEntries) {
      // Map keeps insertion order: drop the oldest entry.
      const oldest = this.#cache.keys().next().value;
      if (oldest !== undefined) this.#cache.delete(oldest);
    }
    this.#cache.set(key, entry);
  }
}
