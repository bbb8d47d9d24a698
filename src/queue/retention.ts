// History kept, and no more. Finished messages (every recipient delivered or failed) stay in the
// store for `[queue] retention` (30 days by default), for `queue show`, the daily sending limits
// and volume alerts; security events (failed logins, relaying refused, lockouts...) for
// `[policy] security_events_retention` (90 days by default, as Exchange Online keeps its audit
// log). Then they are deleted. Without this the store would grow by every message ever sent and
// every failed login. Postal keeps messages 60 days by default; Postfix keeps nothing but its
// logs. Pending mail is never touched, however old: its lifetime ends in a bounce first.
//
// The queue runner runs this every few minutes, in small transactions so the intake, which
// shares the database, waits for no more than one of them.
import type { Logger } from '../observe/logger.js';
import type { QueueStore, SecurityStore } from '../store/store.js';

/** Rows deleted per transaction. */
const BATCH = 500;

export interface RetentionOptions {
  store: Pick<QueueStore, 'purgeFinished'> & Pick<SecurityStore, 'purgeSecurityEvents'>;
  /** How long a finished message is kept after it was received, in ms. */
  retentionMs: number;
  /** How long a security event is kept, in ms. */
  securityEventsRetentionMs: number;
  logger: Logger;
  /** How often to look, in ms. */
  intervalMs: number;
  now: () => number;
}

export class Retention {
  readonly #options: RetentionOptions;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;

  constructor(options: RetentionOptions) {
    this.#options = options;
  }

  start(): void {
    this.#timer = setInterval(() => {
      this.#running ??= this.purge().finally(() => {
        this.#running = undefined;
      });
    }, this.#options.intervalMs);
    this.#timer.unref();
  }

  /** Stops the timer and waits for a purge in progress. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
  }

  /** Deletes what is past its retention. Never throws: logs instead. */
  async purge(): Promise<void> {
    const { store, retentionMs, securityEventsRetentionMs, now } = this.#options;
    const at = now();
    await this.#purgeAll('finished messages', at - retentionMs, (before) => store.purgeFinished(before, BATCH));
    await this.#purgeAll('security events', at - securityEventsRetentionMs, (before) => store.purgeSecurityEvents(before, BATCH));
  }

  async #purgeAll(what: string, before: number, purgeBatch: (before: number) => Promise<number>): Promise<void> {
    const { logger } = this.#options;
    let purged = 0;
    try {
      for (;;) {
        const n = await purgeBatch(before);
        purged += n;
        if (n < BATCH) break;
        // Let the intake's commits in between.
        await new Promise((resolve) => setImmediate(resolve));
      }
    } catch (err) {
      logger.warn({ event: 'purge_error', what, purged, err: (err as Error).message }, `could not delete old ${what}; trying again later`);
      return;
    }
    if (purged > 0) {
      logger.info({ event: 'purged', what, count: purged, before: new Date(before).toISOString() }, `deleted ${purged} ${what} past their retention`);
    }
  }
}
