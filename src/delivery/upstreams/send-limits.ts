// Keeping one upstream identity (a Microsoft 365 or Google mailbox) under its provider's sending
// limits before they are hit, instead of learning them from refusals: Exchange Online allows a
// mailbox 30 messages a minute and 10,000 recipients a day over SMTP, and a message over the limit
// gets "554 5.2.0 SubmissionQuotaExceeded", which many relays would bounce.
//
// Each limit is a sliding window ("at most N in any T"), counted in messages or recipients.
// Sending is planned, not polled: a message that may not go now gets a reservation, the earliest
// time at which every window has room for it, and later reservations queue behind it. The queue
// then puts the message back with that time (not counted as an attempt), and when it comes back
// its reserved slot is its own. So a burst of 500 messages from one device is accepted at once and
// leaves at exactly the allowed rate, each message claimed twice at most, none refused.
//
// Reservations are appended in time order, so checking the window that ends at the new entry is
// enough: no earlier window gains an entry. The state lives in memory: after a restart the windows
// start empty (the provider's own count does not), and the classification of the provider's
// throttling replies (SubmissionQuotaExceeded: retry later) covers that gap.

export interface WindowLimit {
  /** For texts: "30 messages a minute". */
  label: string;
  limit: number;
  windowMs: number;
  /** What counts: one per message, or its recipients. */
  unit: 'messages' | 'recipients';
  /** A daily budget: warn when 80% of it is used. */
  budget?: boolean;
}

interface Entry {
  at: number;
  units: number;
}

/** One sliding window: entries in time order, the oldest dropped once out of the window. */
class SlidingWindow {
  readonly spec: WindowLimit;
  readonly #entries: Entry[] = [];
  #head = 0;
  #total = 0;

  constructor(spec: WindowLimit) {
    this.spec = spec;
  }

  /** Units counted in the window that ends at `now` (entries after `now` included: reserved). */
  used(now: number): number {
    this.#prune(now);
    return this.#total;
  }

  /**
   * The earliest time at or after `from` (and after the last entry) at which `units` more fit. A
   * message larger than the whole limit goes when the window is empty, alone.
   */
  earliest(from: number, units: number): number {
    this.#prune(from);
    const last = this.#entries.length > this.#head ? this.#entries[this.#entries.length - 1]!.at : from;
    let at = Math.max(from, last);
    const room = Math.min(units, this.spec.limit);
    let total = this.#total;
    let i = this.#head;
    // Entries older than at - windowMs no longer count; drop them (in this calculation) until the
    // rest plus this one fit.
    while (i < this.#entries.length && (this.#entries[i]!.at <= at - this.spec.windowMs || total + room > this.spec.limit)) {
      const entry = this.#entries[i]!;
      at = Math.max(at, entry.at + this.spec.windowMs);
      total -= entry.units;
      i++;
    }
    return at;
  }

  add(at: number, units: number): void {
    this.#entries.push({ at, units });
    this.#total += units;
  }

  #prune(now: number): void {
    while (this.#head < this.#entries.length && this.#entries[this.#head]!.at <= now - this.spec.windowMs) {
      this.#total -= this.#entries[this.#head]!.units;
      this.#head++;
    }
    // Compact now and then so the array does not grow for ever.
    if (this.#head > 1024 && this.#head * 2 > this.#entries.length) {
      this.#entries.splice(0, this.#head);
      this.#head = 0;
    }
  }
}

export type Admission =
  | { go: true }
  /** Not before `at`: the reservation is kept for this message. */
  | { go: false; at: number; limit: WindowLimit };

export interface BudgetWarning {
  identity: string;
  limit: WindowLimit;
  used: number;
}

/** Reservations not taken up this long after their slot are dropped (message deleted, say). */
const STALE_RESERVATION_MS = 3_600_000;

/** The limits of one identity (a mailbox). */
class IdentityLimits {
  readonly windows: SlidingWindow[];
  /** queueId -> reserved time and the window that decided it. */
  readonly reservations = new Map<string, { at: number; limit: WindowLimit }>();
  /** Windows whose 80% warning has been given and not yet reset by falling below it. */
  readonly warned = new Set<SlidingWindow>();

  constructor(limits: readonly WindowLimit[]) {
    this.windows = limits.map((l) => new SlidingWindow(l));
  }
}

export class SendLimits {
  readonly #limits: readonly WindowLimit[];
  readonly #identities = new Map<string, IdentityLimits>();
  readonly #onWarning: ((warning: BudgetWarning) => void) | undefined;

  /** `onWarning` is told when an identity reaches 80% of a budget window. */
  constructor(limits: readonly WindowLimit[], onWarning?: (warning: BudgetWarning) => void) {
    this.#limits = limits;
    this.#onWarning = onWarning;
  }

  get limits(): readonly WindowLimit[] {
    return this.#limits;
  }

  /**
   * May message `queueId` with `recipients` recipients go as `identity` now? Yes: it is counted
   * (a send that then fails still used the provider's budget, as far as we can tell). No: it has
   * a reservation at the returned time; asking again then says yes.
   */
  admit(identity: string, queueId: string, recipients: number, now: number): Admission {
    if (this.#limits.length === 0) return { go: true };
    const key = identity.toLowerCase();
    let state = this.#identities.get(key);
    if (!state) {
      state = new IdentityLimits(this.#limits);
      this.#identities.set(key, state);
    }
    this.#dropStale(state, now);
    const reserved = state.reservations.get(queueId);
    if (reserved) {
      if (now < reserved.at) return { go: false, at: reserved.at, limit: reserved.limit };
      state.reservations.delete(queueId);
      return { go: true };
    }
    // The earliest time every window has room: moving later for one window never frees another,
    // so a few rounds settle it.
    let at = now;
    let decidedBy: WindowLimit | undefined;
    for (let round = 0; round < 4; round++) {
      let moved = false;
      for (const window of state.windows) {
        const t = window.earliest(at, window.spec.unit === 'messages' ? 1 : recipients);
        if (t > at) {
          at = t;
          decidedBy = window.spec;
          moved = true;
        }
      }
      if (!moved) break;
    }
    for (const window of state.windows) window.add(at, window.spec.unit === 'messages' ? 1 : recipients);
    this.#checkBudget(identity, state, now);
    if (at <= now || !decidedBy) return { go: true };
    state.reservations.set(queueId, { at, limit: decidedBy });
    return { go: false, at, limit: decidedBy };
  }

  #checkBudget(identity: string, state: IdentityLimits, now: number): void {
    for (const window of state.windows) {
      if (!window.spec.budget) continue;
      const used = window.used(now);
      if (used >= window.spec.limit * 0.8) {
        if (state.warned.has(window)) continue;
        state.warned.add(window);
        this.#onWarning?.({ identity, limit: window.spec, used });
      } else {
        state.warned.delete(window);
      }
    }
  }

  #dropStale(state: IdentityLimits, now: number): void {
    if (state.reservations.size === 0) return;
    for (const [queueId, r] of state.reservations) if (r.at < now - STALE_RESERVATION_MS) state.reservations.delete(queueId);
  }
}
