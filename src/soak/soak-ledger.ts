// The soak's bookkeeping: what got 250 (per recipient, with its Message-ID and the outcome the
// sinks will decide), and what the sinks saw (deliveries, and bounces: the recipients listed in
// the DSNs Postern sent back to the sender). At the end every recipient of every message that got
// 250 must have been seen exactly once, the way its sink decided, under the right Message-ID.
//
// Observations may arrive before the client has processed the 250 (same event loop, two
// sockets), so both sides are kept by address and matched whenever either arrives.
import type { Destination, PlannedMessage } from './soak-mix.js';

interface Expected {
  messageId: string;
  destination: Destination;
  expect: 'deliver' | 'bounce';
}

interface Seen {
  delivered: number;
  bounced: number;
  /** The Message-IDs the sinks saw for this address (normally one). */
  messageIds: string[];
}

export interface LedgerTotals {
  /** Messages that got 250. */
  messagesAccepted: number;
  /** Their recipients. */
  recipientsAccepted: number;
  /** Recipients delivered to a sink / listed as failed in a DSN (first observation of each). */
  delivered: number;
  bounced: number;
  /** Of the accepted recipients, how many each sink was expected to take or refuse. */
  expectedDelivered: number;
  expectedBounced: number;
  /** Messages whose every recipient was delivered; messages with at least one bounced recipient. */
  messagesFullyDelivered: number;
  messagesWithBounce: number;
  /** DSN messages received (one per message and delivery round with failures). */
  dsnMessages: number;
  /** Accepted recipients not seen at all (yet). */
  missing: number;
  /** Extra observations of a recipient already seen (delivered twice, bounced twice, or both). */
  duplicates: number;
  /** Seen, but not as its sink decided (delivered instead of bounced or the reverse). */
  wrongOutcome: number;
  /** Seen under another Message-ID than the one submitted for it. */
  messageIdMismatch: number;
  /** Seen at a sink but never acknowledged with 250 to the client (a submission that failed late). */
  unacknowledged: number;
  /** Deliveries per destination. */
  deliveredBy: Record<Destination, number>;
  /** Messages the sinks could not tie to a soak recipient (no soak address): should be 0. */
  strays: number;
}

export class Ledger {
  readonly #expected = new Map<string, Expected>();
  readonly #seen = new Map<string, Seen>();
  readonly #messages: { recipients: string[] }[] = [];
  #settled = 0;
  #dsnMessages = 0;
  #strays = 0;
  readonly #onSeen: ((kind: 'delivered' | 'bounced', recipients: number) => void) | undefined;

  /** `onSeen` is told of every delivery and bounce as it arrives (for throughput over time). */
  constructor(onSeen?: (kind: 'delivered' | 'bounced', recipients: number) => void) {
    this.#onSeen = onSeen;
  }

  /** The client got 250 for this message. */
  accepted(message: PlannedMessage): void {
    for (const r of message.recipients) {
      this.#expected.set(r.address, { messageId: message.messageId, destination: r.destination, expect: r.expect });
      if (this.#seen.has(r.address)) this.#settled++;
    }
    this.#messages.push({ recipients: message.recipients.map((r) => r.address) });
  }

  /** A sink accepted a message for these recipients. */
  delivered(addresses: string[], messageId: string | undefined): void {
    for (const address of addresses) this.#observe(address.toLowerCase(), 'delivered', messageId);
    this.#onSeen?.('delivered', addresses.length);
  }

  /** A DSN for `messageId` listed these recipients as failed. */
  bounced(addresses: string[], messageId: string | undefined): void {
    this.#dsnMessages++;
    for (const address of addresses) this.#observe(address.toLowerCase(), 'bounced', messageId);
    this.#onSeen?.('bounced', addresses.length);
  }

  stray(): void {
    this.#strays++;
  }

  /** Accepted recipients with no outcome seen yet. */
  get outstanding(): number {
    return this.#expected.size - this.#settled;
  }

  #observe(address: string, kind: 'delivered' | 'bounced', messageId: string | undefined): void {
    let seen = this.#seen.get(address);
    if (!seen) {
      seen = { delivered: 0, bounced: 0, messageIds: [] };
      this.#seen.set(address, seen);
      if (this.#expected.has(address)) this.#settled++;
    }
    seen[kind]++;
    if (messageId && !seen.messageIds.includes(messageId)) seen.messageIds.push(messageId);
  }

  totals(): LedgerTotals {
    const t: LedgerTotals = {
      messagesAccepted: this.#messages.length,
      recipientsAccepted: this.#expected.size,
      delivered: 0,
      bounced: 0,
      expectedDelivered: 0,
      expectedBounced: 0,
      messagesFullyDelivered: 0,
      messagesWithBounce: 0,
      dsnMessages: this.#dsnMessages,
      missing: 0,
      duplicates: 0,
      wrongOutcome: 0,
      messageIdMismatch: 0,
      unacknowledged: 0,
      deliveredBy: { normal: 0, flaky: 0, slow: 0 },
      strays: this.#strays,
    };
    for (const [address, e] of this.#expected) {
      if (e.expect === 'deliver') t.expectedDelivered++;
      else t.expectedBounced++;
      const seen = this.#seen.get(address);
      if (!seen) {
        t.missing++;
        continue;
      }
      if (seen.delivered > 0) {
        t.delivered++;
        t.deliveredBy[e.destination]++;
      } else {
        t.bounced++;
      }
      t.duplicates += seen.delivered + seen.bounced - 1;
      const outcome = seen.delivered > 0 ? 'deliver' : 'bounce';
      if (outcome !== e.expect || (seen.delivered > 0 && seen.bounced > 0)) t.wrongOutcome++;
      if (seen.messageIds.some((id) => id !== e.messageId)) t.messageIdMismatch++;
    }
    for (const address of this.#seen.keys()) if (!this.#expected.has(address)) t.unacknowledged++;
    for (const m of this.#messages) {
      const seen = m.recipients.map((a) => this.#seen.get(a));
      if (seen.every((s) => s && s.delivered > 0)) t.messagesFullyDelivered++;
      if (seen.some((s) => s && s.bounced > 0)) t.messagesWithBounce++;
    }
    return t;
  }
}
