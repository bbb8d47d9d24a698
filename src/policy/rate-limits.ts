// Sending limits, with Office 365's defaults: messages per minute and recipients per rolling
// 24 hours, per account (or per client address on a connector). A hit is a temporary 4xx that says
// which limit, for whom and when to retry, so devices try again later instead of giving up.
//
// Reservations. A limit is checked and taken in one step, with no wait in between: MAIL FROM
// reserves one message, each accepted RCPT TO one recipient. So parallel sessions of one account
// (or one connector address) cannot all pass the check and together go over the limit: in one
// process, at most `limit` messages (recipients) are reserved or queued in the window. When the
// message is queued its reservation becomes a count; when the transaction ends without queueing
// (RSET, a new EHLO or STARTTLS, a refused DATA, QUIT, a lost connection) it is given back.
// A reservation whose transaction has ended is noticed at the next check for the same sender (its
// session's transaction changed) or when the connection closes, whichever comes first.
//
// Counting: the queue is the record of what was sent (store.usageSince), but asking it on every
// MAIL FROM costs a scan that grows with the traffic. So each sender's usage is read from the
// store once, then kept here and advanced as this process reserves and queues mail:
//  - the minute window as the times of its messages (exact; at start the messages the store
//    reports are all dated at the oldest one's time, which can only over-count);
//  - the 24-hour window as a recipient total re-read from the store every minute, plus what was
//    queued since (messages leaving the window are noticed at the next re-read: over-counting, for
//    at most a minute, never under-counting).
// Restarts lose nothing that was queued (the first use re-reads the store); reservations die with
// the process, as do their transactions. Several nodes sharing one store each see the others' mail
// at the next re-read, so across nodes the limits are approximate (see docs/security.md).
import { smtpError, type SmtpReplyError } from '../errors/smtp-errors.js';
import type { SecurityStore } from '../store/store.js';

export interface SendingLimits {
  messagesPerMinute: number;
  recipientsPerDay: number;
}

const MINUTE = 60_000;
const DAY = 86_400_000;
const DAY_REFRESH_MS = 60_000;

export type Sender = { account: string } | { clientIp: string };

/** "23 s", "12 min", "3 h": how long until a limit lets the client through again. */
export function formatWait(ms: number): string {
  const s = Math.max(1, Math.ceil(ms / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.ceil(s / 60)} min`;
  return `${Math.ceil(s / 3600)} h`;
}

/** One transaction's hold on its sender's limits, from MAIL FROM until queued or given back. */
export interface Reservation {
  readonly key: string;
  /** The minute-window time of its message (MAIL FROM). */
  readonly at: number;
  /** Recipients reserved so far (accepted RCPTs). */
  recipients: number;
  /** False once its transaction is over (RSET, new EHLO, the DATA reply sent); checked lazily. */
  readonly live: () => boolean;
  /** Queued or given back: it holds nothing any more. */
  done: boolean;
}

interface Usage {
  /** Times of the messages queued or reserved in the last minute, oldest first, from `head` on. */
  minute: number[];
  head: number;
  /** Recipients queued in the last 24 hours (store read plus what was queued since). */
  dayRecipients: number;
  /** Recipients reserved by transactions not queued yet. */
  dayReserved: number;
  dayOldestAt: number | null;
  dayReadAt: number;
  /** Recipients queued while a re-read of the store was in progress (counted again after it). */
  queuedDuringRead: number | null;
  open: Set<Reservation>;
}

export type MessageCheck = { refused: SmtpReplyError; reservation?: undefined } | { refused?: undefined; reservation: Reservation };

export class RateLimits {
  readonly #store: SecurityStore;
  readonly #usage = new Map<string, Promise<Usage>>();
  /** Settled usage by key, for giving reservations back without waiting. */
  readonly #loaded = new Map<string, Usage>();

  constructor(store: SecurityStore) {
    this.#store = store;
  }

  /**
   * At MAIL FROM: would one more message now go over the per-minute limit? If not, the message is
   * reserved (counted) at once; `live` tells later checks whether its transaction is still going.
   */
  async reserveMessage(sender: Sender, limits: SendingLimits, live: () => boolean, now = Date.now()): Promise<MessageCheck> {
    const u = await this.#current(sender, now);
    // Nothing below waits: the check and the reservation are one step.
    this.#sweep(u);
    const inWindow = u.minute.length - u.head;
    if (inWindow >= limits.messagesPerMinute) {
      // The window rolls: room opens when the oldest message in it is a minute old.
      return {
        refused: smtpError('RATE_LIMIT_MESSAGES', {
          limit: limits.messagesPerMinute,
          who: label(sender),
          retry: formatWait(u.minute[u.head]! + MINUTE - now),
        }),
      };
    }
    const at = Math.max(now, u.minute[u.minute.length - 1] ?? now);
    u.minute.push(at);
    const reservation: Reservation = { key: label(sender), at, recipients: 0, live, done: false };
    u.open.add(reservation);
    return { reservation };
  }

  /**
   * At RCPT TO: would one more recipient go over the 24-hour limit? If not, it is reserved in the
   * transaction's reservation. Recipients reserved by other transactions in progress count too.
   */
  async reserveRecipient(sender: Sender, limits: SendingLimits, reservation: Reservation, now = Date.now()): Promise<SmtpReplyError | null> {
    const u = await this.#current(sender, now);
    this.#sweep(u);
    // Given back already: its transaction is over, so this recipient is not part of it.
    if (reservation.done) return null;
    if (u.dayRecipients + u.dayReserved < limits.recipientsPerDay) {
      reservation.recipients++;
      u.dayReserved++;
      return null;
    }
    // Full because of queued mail: room opens when the oldest message leaves the 24 hours. Full
    // because of transactions still in progress: they may well end without queueing.
    const full = u.dayRecipients >= limits.recipientsPerDay;
    return smtpError('RATE_LIMIT_RECIPIENTS', {
      limit: limits.recipientsPerDay,
      who: label(sender),
      retry: formatWait(full ? (u.dayOldestAt ?? now) + DAY - now : MINUTE),
    });
  }

  /**
   * The transaction's message was queued with `recipients` recipients: its reservation becomes a
   * count, at once (no wait: another session's check must never see it neither reserved nor
   * counted). Without a live reservation (policy off, or given back meanwhile because the
   * connection closed) the message is counted as it stands.
   */
  async queued(sender: Sender, recipients: number, reservation?: Reservation, now = Date.now()): Promise<void> {
    const loaded = reservation && !reservation.done ? this.#loaded.get(reservation.key) : undefined;
    if (reservation && loaded) {
      reservation.done = true;
      loaded.open.delete(reservation);
      loaded.dayReserved -= reservation.recipients;
      this.#count(loaded, recipients, now);
      return;
    }
    const u = await this.#current(sender, now);
    u.minute.push(Math.max(now, u.minute[u.minute.length - 1] ?? now));
    this.#count(u, recipients, now);
  }

  #count(u: Usage, recipients: number, now: number): void {
    u.dayRecipients += recipients;
    if (u.queuedDuringRead !== null) u.queuedDuringRead += recipients;
    u.dayOldestAt ??= now;
  }

  /** The transaction ended without queueing: its message and recipients no longer count. */
  release(reservation: Reservation | undefined): void {
    if (!reservation || reservation.done) return;
    const u = this.#loaded.get(reservation.key);
    reservation.done = true;
    if (!u) return;
    u.open.delete(reservation);
    u.dayReserved -= reservation.recipients;
    // Its time is in the window unless it already rolled out (a transaction over a minute long).
    for (let i = u.minute.length - 1; i >= u.head; i--) {
      if (u.minute[i] === reservation.at) {
        u.minute.splice(i, 1);
        break;
      }
      if (u.minute[i]! < reservation.at) break;
    }
  }

  /** Gives back the reservations whose transaction ended without a word to us (RSET, EHLO). */
  #sweep(u: Usage): void {
    for (const r of u.open) if (!r.live()) this.release(r);
  }

  async #current(sender: Sender, now: number): Promise<Usage> {
    const key = label(sender);
    let pending = this.#usage.get(key);
    if (!pending) {
      pending = this.#load(sender, now).then((u) => {
        this.#loaded.set(key, u);
        return u;
      });
      this.#usage.set(key, pending);
      pending.catch(() => this.#usage.delete(key));
    }
    const u = await pending;
    while (u.head < u.minute.length && u.minute[u.head]! <= now - MINUTE) u.head++;
    if (u.head > 1024 && u.head * 2 > u.minute.length) {
      u.minute = u.minute.slice(u.head);
      u.head = 0;
    }
    if (now - u.dayReadAt >= DAY_REFRESH_MS) {
      u.dayReadAt = now;
      u.queuedDuringRead = 0;
      try {
        const day = await this.#store.usageSince(sender, now - DAY);
        // What was queued during the read may or may not be in it: counted again (over, never under).
        u.dayOldestAt = day.oldestAt ?? (u.queuedDuringRead > 0 ? u.dayOldestAt : null);
        u.dayRecipients = day.recipients + u.queuedDuringRead;
      } finally {
        u.queuedDuringRead = null;
      }
    }
    return u;
  }

  async #load(sender: Sender, now: number): Promise<Usage> {
    const [minute, day] = await Promise.all([this.#store.usageSince(sender, now - MINUTE), this.#store.usageSince(sender, now - DAY)]);
    return {
      minute: new Array<number>(minute.messages).fill(minute.oldestAt ?? now),
      head: 0,
      dayRecipients: day.recipients,
      dayReserved: 0,
      dayOldestAt: day.oldestAt,
      dayReadAt: now,
      queuedDuringRead: null,
      open: new Set(),
    };
  }
}

function label(sender: Sender): string {
  return 'account' in sender ? sender.account : sender.clientIp;
}
