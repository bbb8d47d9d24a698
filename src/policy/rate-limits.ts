// Sending limits, with Office 365's defaults: messages per minute and recipients per rolling
// 24 hours, per account (or per client address on a connector). They are counted from the queue
// itself (store.usageSince), so they are exact rolling windows, survive restarts and will be shared
// by every node once the store is shared. A hit is a temporary 4xx that says which limit, for whom
// and when to retry, so devices try again later instead of giving up.
import { type SmtpReplyError, smtpError } from '../errors/smtp-errors.js';
import type { SecurityStore } from '../store/store.js';

export interface SendingLimits {
  messagesPerMinute: number;
  recipientsPerDay: number;
}

const MINUTE = 60_000;
const DAY = 86_400_000;

export type Sender = { account: string } | { clientIp: string };

function who(sender: Sender): string {
  return 'account' in sender ? sender.account : sender.clientIp;
}

/** "23 s", "12 min", "3 h": how long until a limit lets the client through again. */
export function formatWait(ms: number): string {
  const s = Math.max(1, Math.ceil(ms / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.ceil(s / 60)} min`;
  return `${Math.ceil(s / 3600)} h`;
}

export class RateLimits {
  readonly #store: SecurityStore;

  constructor(store: SecurityStore) {
    this.#store = store;
  }

  /** At MAIL FROM: one more message now would go over the per-minute limit? */
  async checkMessage(sender: Sender, limits: SendingLimits, now = Date.now()): Promise<SmtpReplyError | null> {
    const used = await this.#store.usageSince(sender, now - MINUTE);
    if (used.messages < limits.messagesPerMinute) return null;
    // The window rolls: room opens when the oldest message in it is a minute old.
    return smtpError('RATE_LIMIT_MESSAGES', {
      limit: limits.messagesPerMinute,
      who: who(sender),
      retry: formatWait((used.oldestAt ?? now) + MINUTE - now),
    });
  }

  /**
   * At RCPT TO: would `pending + 1` more recipients go over the 24-hour limit? `pending` counts
   * the recipients already accepted in this transaction (not queued yet).
   */
  async checkRecipient(sender: Sender, limits: SendingLimits, pending: number, now = Date.now()): Promise<SmtpReplyError | null> {
    const used = await this.#store.usageSince(sender, now - DAY);
    if (used.recipients + pending < limits.recipientsPerDay) return null;
    return smtpError('RATE_LIMIT_RECIPIENTS', {
      limit: limits.recipientsPerDay,
      who: who(sender),
      retry: formatWait((used.oldestAt ?? now) + DAY - now),
    });
  }
}
