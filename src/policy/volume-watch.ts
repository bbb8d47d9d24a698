// Notices an account sending far more than usual: over the last 24 hours more than five times its
// daily average of the 7 days before (and at least `floor` recipients, so a quiet account's second
// message is not a "spike"). A stolen device password shows up like this before anything else.
// Checked at most once an hour per account, off the SMTP reply path.
import type { SecurityStore } from '../store/store.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

export interface VolumeSpike {
  last24h: number;
  dailyAverage: number;
}

export class VolumeWatch {
  readonly #store: SecurityStore;
  readonly #lastCheck = new Map<string, number>();
  readonly #factor: number;
  readonly #floor: number;

  constructor(store: SecurityStore, options: { factor?: number; floor?: number } = {}) {
    this.#store = store;
    this.#factor = options.factor ?? 5;
    this.#floor = options.floor ?? 100;
  }

  /** Returns the spike when there is one and this account was not checked in the last hour. */
  async check(account: string, now = Date.now()): Promise<VolumeSpike | null> {
    const last = this.#lastCheck.get(account);
    if (last !== undefined && now - last < HOUR) return null;
    this.#lastCheck.set(account, now);
    const [day, week] = await Promise.all([
      this.#store.usageSince({ account }, now - DAY),
      this.#store.usageSince({ account }, now - 8 * DAY),
    ]);
    const before = week.recipients - day.recipients;
    // Only an account with a history can spike; the first day of a new device is not one.
    if (week.oldestAt === null || week.oldestAt > now - 2 * DAY) return null;
    const days = Math.min(7, Math.max(1, (now - DAY - week.oldestAt) / DAY));
    const dailyAverage = before / days;
    if (day.recipients < this.#floor || day.recipients <= this.#factor * dailyAverage) return null;
    return { last24h: day.recipients, dailyAverage: Math.round(dailyAverage) };
  }
}
