// History kept, and no more: finished messages (every recipient delivered or failed) stay in the
// store for `[queue] retention` (30 days by default), for `queue show`, the daily sending limits
// and volume alerts, then they are deleted with their recipients. Without this the store would
// grow by every message ever sent. Postal keeps 60 days by default; Postfix keeps nothing but its
// logs. Pending mail is never touched, however old: its lifetime ends in a bounce first.
//
// The queue runner runs this every few minutes, in small transactions so the intake, which
// shares the database, waits for no more than one of them.
import type { Logger } from '../observe/logger.js';
import type { QueueStore } from '../store/store.js';

/** Messages deleted per transaction. */
const BATCH = 500;

export interface RetentionOptions {
  store: Pick<QueueStore, 'purgeFinished'>;
  /** How long a finished message is kept after it was received, in ms. */
  retentionMs: number;
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

  /** Deletes every finished message older than the retention. Never throws: logs instead. */
  async purge(): Promise<void> {
    const { store, retentionMs, logger, now } = this.#options;
    const before = now() - retentionMs;
    let purged = 0;
    try {
      for (;;) {
        const n = await store.purgeFinished(before, BATCH);
        purged += n;
        if (n < BATCH) break;
        // Let the intake's commits in between.
        await new Promise((resolve) => setImmediate(resolve));
      }
    } catch (err) {
      logger.warn({ event: 'purge_error', purged, err: (err as Error).message }, 'could not delete old finished messages; trying again later');
      return;
    }
    if (purged > 0) {
      logger.info({ event: 'purged', messages: purged, receivedBefore: new Date(before).toISOString() }, `deleted ${purged} finished messages past the retention`);
    }
  }
}
