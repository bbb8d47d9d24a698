// Sending limits, with Office 365's defaults: messages per minute and recipients per rolling
// 24 hours, per account (or per client address on a connector). A hit is a temporary 4xx that says
// which limit, for whom and when to retry, so devices try again later instead of giving up.
//
// Counting: the queue is the record of what was sent (store.usageSince), but asking it on every
// MAIL FROM costs a scan that grows with the traffic. So each sender's usage is read from the
// store once, then kept here and advanced as this process queues mail:
//  - the minute window as the times of its messages (exact; at start the messages the store
//    reports are all dated at the oldest one's time, which can only over-count);
//  - the 24-hour window as a recipient total re-read from the store every minute, plus what was
//    queued since (messages leaving the window are noticed at the next re-read: over-counting, for
//    at most a minute, never under-counting).
// Restarts lose nothing (the first use re-reads the store). Several nodes sharing one store will
// each see the others' mail at the next re-read.
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

interface Usage {
  /** Times of the messages queued in the last minute, oldest first, from `head` on. */
  minute: number[];
  head: number;
  dayRecipients: number;
  dayOldestAt: number | null;
  dayReadAt: number;
}

export class RateLimits {
  readonly #store: SecurityStore;
  readonly #usage = new Map<string, Promise<Usage>>();

  constructor(store: SecurityStore) {
    this.#store = store;
  }

  /** At MAIL FROM: would one more message now go over the per-minute limit? */
  async checkMessage(sender: Sender, limits: SendingLimits, now = Date.now()): Promise<SmtpReplyError | null> {
    const u = await this.#current(sender, now);
    const inWindow = u.minute.length - u.head;
    if (inWindow < limits.messagesPerMinute) return null;
    // The window rolls: room opens when the oldest message in it is a minute old.
    return smtpError('RATE_LIMIT_MESSAGES', {
      limit: limits.messagesPerMinute,
      who: label(sender),
      retry: formatWait(u.minute[u.head]! + MINUTE - now),
    });
  }

  /**
   * At RCPT TO: would one more recipient go over the 24-hour limit? `pending` counts the
   * recipients already accepted in this transaction (not queued yet).
   */
  async checkRecipient(sender: Sender, limits: SendingLimits, pending: number, now = Date.now()): Promise<SmtpReplyError | null> {
    const u = await this.#current(sender, now);
    if (u.dayRecipients + pending < limits.recipientsPerDay) return null;
    return smtpError('RATE_LIMIT_RECIPIENTS', {
      limit: limits.recipientsPerDay,
      who: label(sender),
      retry: formatWait((u.dayOldestAt ?? now) + DAY - now),
    });
  }

  /** A message from this sender was queued: count it. */
  async queued(sender: Sender, recipients: number, now = Date.now()): Promise<void> {
    const u = await this.#current(sender, now);
    u.minute.push(now);
    u.dayRecipients += recipients;
    u.dayOldestAt ??= now;
  }

  async #current(sender: Sender, now: number): Promise<Usage> {
    const key = label(sender);
    let pending = this.#usage.get(key);
    if (!pending) {
      pending = this.#load(sender, now);
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
      const day = await this.#store.usageSince(sender, now - DAY);
      u.dayRecipients = day.recipients;
      u.dayOldestAt = day.oldestAt;
    }
    return u;
  }

  async #load(sender: Sender, now: number): Promise<Usage> {
    const [minute, day] = await Promise.all([this.#store.usageSince(sender, now - MINUTE), this.#store.usageSince(sender, now - DAY)]);
    return {
      minute: new Array<number>(minute.messages).fill(minute.oldestAt ?? now),
      head: 0,
      dayRecipients: day.recipients,
      dayOldestAt: day.oldestAt,
      dayReadAt: now,
    };
  }
}

function label(sender: Sender): string {
  return 'account' in sender ? sender.account : sender.clientIp;
}
