// Keeping one upstream identity (a Microsoft 365 or Google mailbox) under its provider's sending
// limits before they are hit, instead of learning them from refusals: Exchange Online allows a
// mailbox 30 messages a minute and 10,000 recipients a day over SMTP, and a mailbox over its daily
// recipients gets "554 5.2.0 SubmissionQuotaExceeded", which many relays would bounce.
//
// Each limit is a sliding window ("at most N in any T"), counted in messages or recipients, as the
// provider counts them: when a message reaches it. So each send is an entry that goes through
// three states:
//
//   - reserved: the message may not go now; it gets a slot, the earliest time the windows have
//     room for it behind the messages already waiting (and evenly spaced after them: a minute / 30
//     for Exchange), and goes back to the queue until then (not counted as an attempt). Later
//     reservations queue behind it, so a burst of 500 messages is planned once, at the allowed
//     rate, and each message is claimed about twice.
//   - in flight: admitted and being delivered. It counts in every window until it is done,
//     whatever its time, because the provider will count it when it arrives.
//   - done: counted at the time the delivery finished (settle()), which is when the provider saw
//     it, or later.
//
// A slot is a plan, and plans meet latency: a message that waited a second for a connection
// arrives a second late, and the one a window after it would then make one too many. So admission
// is checked again when a reserved message comes back: only what is in flight or done counts, and
// if the window is still full the slot moves to when it frees.
//
// The state lives in memory: after a restart the windows start empty (the provider's count does
// not), and the classification of the provider's throttling replies (SubmissionQuotaExceeded:
// retry later) covers that gap.

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

type EntryState = 'reserved' | 'in_flight' | 'done';

interface Entry {
  /** Unique per send: a message retried (one recipient deferred) is a second send. */
  id: number;
  queueId: string;
  /** reserved: the slot; in flight: when it was let go; done: when the delivery finished. */
  at: number;
  /** Recipients, for the recipient windows. */
  recipients: number;
  /** Messages the provider will count: a message split into several transactions is several. */
  messages: number;
  state: EntryState;
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
/** An in-flight entry never settled (a bug, a crash of the delivery) stops counting after this. */
const STALE_IN_FLIGHT_MS = 3_600_000;

/** The sends of one identity (a mailbox), shared by all its windows. */
class IdentitySends {
  readonly entries = new Map<number, Entry>();
  /** Budget windows whose 80% warning has been given and not yet reset by falling below it. */
  readonly warned = new Set<WindowLimit>();
  #longestWindow: number;

  constructor(limits: readonly WindowLimit[]) {
    this.#longestWindow = Math.max(...limits.map((l) => l.windowMs));
  }

  prune(now: number): void {
    for (const [id, e] of this.entries) {
      const stale =
        (e.state === 'done' && e.at <= now - this.#longestWindow) ||
        (e.state === 'reserved' && e.at < now - STALE_RESERVATION_MS) ||
        (e.state === 'in_flight' && e.at < now - STALE_IN_FLIGHT_MS);
      if (stale) this.entries.delete(id);
    }
  }

  find(queueId: string, state: EntryState): Entry | undefined {
    for (const e of this.entries.values()) if (e.queueId === queueId && e.state === state) return e;
    return undefined;
  }
}

const units = (limit: WindowLimit, e: { recipients: number; messages: number }) => (limit.unit === 'messages' ? e.messages : e.recipients);

/** How often every identity is pruned, and the empty ones dropped (senders that stopped sending). */
const SWEEP_MS = 60_000;

export class SendLimits {
  readonly #limits: readonly WindowLimit[];
  readonly #identities = new Map<string, IdentitySends>();
  readonly #onWarning: ((warning: BudgetWarning) => void) | undefined;
  #nextId = 1;
  #sweptAt = 0;

  /** `onWarning` is told when an identity reaches 80% of a budget window. */
  constructor(limits: readonly WindowLimit[], onWarning?: (warning: BudgetWarning) => void) {
    this.#limits = limits;
    this.#onWarning = onWarning;
  }

  /**
   * A wait this short is better spent where the message is than on a trip back through the
   * queue: a tenth of the shortest window (6 s for "a minute"), at most 5 s.
   */
  get shortWaitMs(): number {
    return Math.min(5000, ...this.#limits.map((l) => l.windowMs / 10));
  }

  /**
   * May message `queueId` go as `identity` now, to `recipients` recipients in `messages` SMTP
   * transactions? Yes: it is in flight until settle(). No: it has a slot at the returned time;
   * asking again then usually says yes.
   */
  admit(identity: string, queueId: string, recipients: number, now: number, messages = 1): Admission {
    if (this.#limits.length === 0) return { go: true };
    this.#sweep(now);
    const sends = this.#sends(identity);
    sends.prune(now);
    const own = sends.find(queueId, 'reserved');
    if (own && now < own.at) return { go: false, at: own.at, limit: this.#decidingLimit(sends, own, now) };
    if (own) sends.entries.delete(own.id);
    const entry: Entry = { id: this.#nextId++, queueId, at: now, recipients, messages, state: 'in_flight' };

    // Messages already waiting go first: a newcomer queues behind them, a returning one does not.
    // (A slot already past is a message about to come back, or one deleted from the queue.)
    const othersWaiting = !own && [...sends.entries.values()].some((e) => e.state === 'reserved' && e.at > now);
    const blocking = othersWaiting ? undefined : this.#fullWindow(sends, entry, now);
    if (!othersWaiting && !blocking) {
      sends.entries.set(entry.id, entry);
      this.#checkBudgets(identity, sends, now);
      return { go: true };
    }
    const at = this.#slot(sends, entry, now, !own);
    const reserved: Entry = { ...entry, at, state: 'reserved' };
    sends.entries.set(reserved.id, reserved);
    return { go: false, at, limit: blocking ?? this.#decidingLimit(sends, reserved, now) };
  }

  /** The delivery of `queueId` finished at `at`: it counts from then (or from when it went). */
  settle(identity: string, queueId: string, at: number): void {
    const entry = this.#identities.get(identity.toLowerCase())?.find(queueId, 'in_flight');
    if (!entry) return;
    entry.state = 'done';
    entry.at = Math.max(entry.at, at);
  }

  /** `queueId` will not come back for its slot (it expired, was held, or went elsewhere). */
  cancel(identity: string, queueId: string): void {
    const sends = this.#identities.get(identity.toLowerCase());
    const entry = sends?.find(queueId, 'reserved');
    if (entry) sends!.entries.delete(entry.id);
  }

  #sweep(now: number): void {
    if (now - this.#sweptAt < SWEEP_MS) return;
    this.#sweptAt = now;
    for (const [key, sends] of this.#identities) {
      sends.prune(now);
      if (sends.entries.size === 0) this.#identities.delete(key);
    }
  }

  #sends(identity: string): IdentitySends {
    const key = identity.toLowerCase();
    let sends = this.#identities.get(key);
    if (!sends) {
      sends = new IdentitySends(this.#limits);
      this.#identities.set(key, sends);
    }
    return sends;
  }

  /** A window that has no room now for `entry`, counting what is in flight or done. */
  #fullWindow(sends: IdentitySends, entry: Entry, now: number): WindowLimit | undefined {
    return this.#limits.find((limit) => this.#usedNow(sends, limit, now) + Math.min(units(limit, entry), limit.limit) > limit.limit);
  }

  /** Units in the window ending now: done entries inside it, and everything in flight. */
  #usedNow(sends: IdentitySends, limit: WindowLimit, now: number): number {
    let used = 0;
    for (const e of sends.entries.values()) {
      if (e.state === 'in_flight' || (e.state === 'done' && e.at > now - limit.windowMs)) used += units(limit, e);
    }
    return used;
  }

  /**
   * The earliest time every window has room for `entry`, projecting all entries at their times (in
   * flight ones at now or later); `behindWaiting` puts it after the last reserved slot, so that
   * reservations are handed out in order.
   */
  #slot(sends: IdentitySends, entry: Entry, now: number, behindWaiting: boolean): number {
    const others = [...sends.entries.values()].filter((e) => e.id !== entry.id);
    let at = now + 1;
    if (behindWaiting) {
      // Behind the messages already waiting, and a message window's even share after the last of
      // them (a minute / 30 = 2 s): a backlog leaves one message at a time, not in bursts of 30
      // that queue for the mailbox's 3 connections and reach the provider spread out.
      const lastReserved = Math.max(-Infinity, ...others.filter((e) => e.state === 'reserved').map((e) => e.at));
      if (lastReserved > -Infinity) {
        const spacing = Math.max(0, ...this.#limits.filter((l) => l.unit === 'messages').map((l) => l.windowMs / l.limit));
        at = Math.max(at, lastReserved + spacing);
      }
    }
    const times = others.map((e) => ({ t: e.state === 'in_flight' ? Math.max(e.at, now) : e.at, e })).sort((a, b) => a.t - b.t);
    // Moving later for one window never frees another, so a few rounds settle it.
    for (let round = 0; round < 8; round++) {
      let moved = false;
      for (const limit of this.#limits) {
        const need = Math.min(units(limit, entry), limit.limit);
        let used = 0;
        for (const { t, e } of times) if (t > at - limit.windowMs && t <= at) used += units(limit, e);
        // Drop the oldest entries of the window ending at `at` until this one fits.
        for (const { t, e } of times) {
          if (used + need <= limit.limit) break;
          if (t <= at - limit.windowMs || t > at) continue;
          used -= units(limit, e);
          at = Math.max(at, t + limit.windowMs);
          moved = true;
        }
      }
      if (!moved) break;
    }
    return at;
  }

  /** For the waiting message's text: the first window that is full at its slot's eve. */
  #decidingLimit(sends: IdentitySends, entry: Entry, now: number): WindowLimit {
    return this.#fullWindow(sends, entry, now) ?? this.#limits[0]!;
  }

  #checkBudgets(identity: string, sends: IdentitySends, now: number): void {
    for (const limit of this.#limits) {
      if (!limit.budget) continue;
      const used = this.#usedNow(sends, limit, now);
      if (used >= limit.limit * 0.8) {
        if (sends.warned.has(limit)) continue;
        sends.warned.add(limit);
        this.#onWarning?.({ identity, limit, used });
      } else {
        sends.warned.delete(limit);
      }
    }
  }
}
