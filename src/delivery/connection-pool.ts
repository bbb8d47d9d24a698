// Connection slots and idle connections, shared by every SMTP target.
//
// Two caps, both from config.delivery: `concurrency` connections in use overall and
// `per_destination` to any one destination (a domain's MX set, a route or an upstream; an
// upstream's max_connections can lower it for that upstream). A delivery first takes
// a slot (waiting in line when the caps are reached), then uses an idle connection to the same
// destination if one is kept, else opens a new one. When it is done, a healthy connection stays
// open for a few seconds so the next message to the same place skips TCP, greeting, EHLO and TLS:
// a burst of messages to one domain goes down one or a few connections. RSET only follows a
// transaction that did not end with the reply to the message data (SmtpSession.needsReset); the
// server may have closed a kept connection meanwhile, which SmtpTarget handles.
//
// Idle connections hold no slot; they are closed after `idleTimeout`, after
// `maxTransactionsPerConnection` messages, when the server closes them, or on close().
import type { SmtpSession } from './smtp-session.js';

export interface ConnectionPoolOptions {
  /** Connections in use at once, all destinations together (config.delivery.concurrency). */
  maxConnections: number;
  /** Connections in use at once to one destination (config.delivery.per_destination). */
  maxPerDestination: number;
  /** How long an unused connection is kept open, in ms (default 5000). */
  idleTimeout?: number;
  /** Messages sent over one connection before it is replaced (default 100). */
  maxTransactionsPerConnection?: number;
}

export interface PoolLease {
  readonly key: string;
  /** An idle connection to this destination, ready for a transaction, or undefined when none is usable. */
  takeIdle(): Promise<SmtpSession | undefined>;
  /**
   * Frees the slot. A reusable session is kept for the next message to the same destination;
   * any other is closed. Safe to call more than once.
   */
  release(session?: SmtpSession, reusable?: boolean): void;
}

interface Waiter {
  key: string;
  limit: number;
  resolve: (lease: PoolLease) => void;
  reject: (err: Error) => void;
}

interface IdleEntry {
  session: SmtpSession;
  timer: NodeJS.Timeout;
  unsubscribe: () => void;
}

export class ConnectionPool {
  readonly #options: Required<ConnectionPoolOptions>;
  readonly #activeByKey = new Map<string, number>();
  #active = 0;
  readonly #waiters: Waiter[] = [];
  readonly #idle = new Map<string, IdleEntry[]>();
  #closed = false;

  constructor(options: ConnectionPoolOptions) {
    this.#options = { idleTimeout: 5000, maxTransactionsPerConnection: 100, ...options };
  }

  /** Slots in use. */
  get active(): number {
    return this.#active;
  }

  /** Idle connections kept open, all destinations. */
  get idle(): number {
    let n = 0;
    for (const list of this.#idle.values()) n += list.length;
    return n;
  }

  /**
   * Waits for a slot to `key`. Rejects when the signal aborts or the pool closes first. `limit`
   * lowers the per-destination cap for this destination (an upstream's max_connections).
   */
  acquire(key: string, signal?: AbortSignal, limit?: number): Promise<PoolLease> {
    if (this.#closed) return Promise.reject(new Error('connection pool closed'));
    if (signal?.aborted) return Promise.reject(abortError());
    const cap = Math.min(limit ?? Number.POSITIVE_INFINITY, this.#options.maxPerDestination);
    if (this.#hasRoom(key, cap)) return Promise.resolve(this.#lease(key));
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = this.#waiters.indexOf(waiter);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(abortError());
      };
      const waiter: Waiter = {
        key,
        limit: cap,
        resolve: (lease) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(lease);
        },
        reject: (err) => {
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiters.push(waiter);
    });
  }

  /** Closes idle connections (QUIT) and refuses further slots. Sessions in use are the users'. */
  close(): void {
    this.#closed = true;
    for (const waiter of this.#waiters.splice(0)) waiter.reject(new Error('connection pool closed'));
    for (const [key, list] of this.#idle) {
      for (const entry of list) {
        clearTimeout(entry.timer);
        entry.unsubscribe();
        entry.session.quit();
      }
      this.#idle.delete(key);
    }
  }

  #hasRoom(key: string, limit: number): boolean {
    return this.#active < this.#options.maxConnections && (this.#activeByKey.get(key) ?? 0) < limit;
  }

  #lease(key: string): PoolLease {
    this.#active++;
    this.#activeByKey.set(key, (this.#activeByKey.get(key) ?? 0) + 1);
    let released = false;
    return {
      key,
      takeIdle: () => this.#takeIdle(key),
      release: (session, reusable = false) => {
        if (released) {
          // The slot is gone already; still never leak a connection.
          if (session && !session.closed) session.quit();
          return;
        }
        released = true;
        if (session) this.#keepOrClose(key, session, reusable);
        this.#active--;
        const n = (this.#activeByKey.get(key) ?? 1) - 1;
        if (n > 0) this.#activeByKey.set(key, n);
        else this.#activeByKey.delete(key);
        this.#grant();
      },
    };
  }

  /** Hands free slots to waiters in arrival order, skipping those whose destination is full. */
  #grant(): void {
    for (let i = 0; i < this.#waiters.length && this.#active < this.#options.maxConnections; ) {
      const waiter = this.#waiters[i]!;
      if (this.#hasRoom(waiter.key, waiter.limit)) {
        this.#waiters.splice(i, 1);
        waiter.resolve(this.#lease(waiter.key));
      } else {
        i++;
      }
    }
  }

  async #takeIdle(key: string): Promise<SmtpSession | undefined> {
    const list = this.#idle.get(key);
    while (list?.length) {
      // Most recently used first: it is the least likely to have been closed by the server.
      const entry = list.pop()!;
      clearTimeout(entry.timer);
      entry.unsubscribe();
      if (list.length === 0) this.#idle.delete(key);
      if (entry.session.closed) continue;
      if (!entry.session.needsReset || (await entry.session.reset())) return entry.session;
      entry.session.destroy();
    }
    return undefined;
  }

  #keepOrClose(key: string, session: SmtpSession, reusable: boolean): void {
    if (session.closed) return;
    const keep = reusable && !this.#closed && session.transactions < this.#options.maxTransactionsPerConnection;
    if (!keep) {
      if (reusable) session.quit();
      else session.destroy();
      return;
    }
    const list = this.#idle.get(key) ?? [];
    const entry: IdleEntry = {
      session,
      timer: setTimeout(() => {
        this.#dropIdle(key, entry);
        session.quit();
      }, this.#options.idleTimeout),
      unsubscribe: () => {},
    };
    // An idle connection must not keep the process alive on its own.
    entry.timer.unref();
    list.push(entry);
    this.#idle.set(key, list);
    entry.unsubscribe = session.onClose(() => this.#dropIdle(key, entry));
  }

  #dropIdle(key: string, entry: IdleEntry): void {
    clearTimeout(entry.timer);
    entry.unsubscribe();
    const list = this.#idle.get(key);
    if (!list) return;
    const i = list.indexOf(entry);
    if (i >= 0) list.splice(i, 1);
    if (list.length === 0) this.#idle.delete(key);
  }
}

function abortError(): Error {
  const err = new Error('aborted');
  err.name = 'AbortError';
  return err;
}
