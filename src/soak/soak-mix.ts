// What the soak sends: a weighted mix of message sizes (1 KiB to 10 MiB, mostly small) and of
// recipients at three destinations, each recipient's fate decided by its address (the flaky sink
// reads the local part: ok-, refuse-, defer-). Everything comes from a seeded generator, so two
// runs with the same seed send the same sequence.
//
// Addresses are unique per message and recipient ("<kind>-<serial>-<i>@<domain>"), which lets the
// sinks' observations be matched to what was submitted without keeping any body.

const KiB = 1024;
const MiB = 1024 * KiB;

export const SOAK_SENDER_DOMAIN = 'soak.test';
export const SOAK_SENDER = `soak@${SOAK_SENDER_DOMAIN}`;
/** Recipient domains: each is routed to its own loopback sink. */
export const DESTINATIONS = {
  normal: 'normal.test',
  flaky: 'flaky.test',
  slow: 'slow.test',
} as const;
export type Destination = keyof typeof DESTINATIONS;

/** Sizes in bytes (the whole message as submitted) and their weights (percent). */
export const SIZE_MIX: readonly { size: number; weight: number }[] = [
  { size: 1 * KiB, weight: 40 },
  { size: 4 * KiB, weight: 25 },
  { size: 20 * KiB, weight: 12 },
  // Both sides of the store's 64 KiB line between bodies kept inline in SQLite and spool files.
  { size: 60 * KiB, weight: 8 },
  { size: 100 * KiB, weight: 6 },
  { size: 512 * KiB, weight: 4 },
  { size: 2 * MiB, weight: 3 },
  { size: 5 * MiB, weight: 1.5 },
  { size: 10 * MiB, weight: 0.5 },
];

/** Recipients per message: 1 (70 %), 2 (20 %), 3 (10 %). */
export const RECIPIENT_COUNT_MIX: readonly { count: number; weight: number }[] = [
  { count: 1, weight: 70 },
  { count: 2, weight: 20 },
  { count: 3, weight: 10 },
];

/** Where each recipient goes. */
export const DESTINATION_MIX: readonly { destination: Destination; weight: number }[] = [
  { destination: 'normal', weight: 57 },
  { destination: 'flaky', weight: 33 },
  { destination: 'slow', weight: 10 },
];

/**
 * At the flaky sink: accepted, refused for good at RCPT (550 5.1.1, so a bounce), or deferred at
 * RCPT (451 4.2.0) for the first `deferAttempts` tries and then accepted.
 */
export type FlakyKind = 'ok' | 'refuse' | 'defer';
export const FLAKY_MIX: readonly { kind: FlakyKind; weight: number }[] = [
  { kind: 'ok', weight: 40 },
  { kind: 'refuse', weight: 30 },
  { kind: 'defer', weight: 30 },
];

/** Share of messages sent on a connection of their own (connect, STARTTLS, AUTH, one message, QUIT). */
export const NEW_CONNECTION_SHARE = 0.1;

export interface PlannedRecipient {
  address: string;
  destination: Destination;
  /** What the sinks will make of it: delivered, or refused for good and so bounced to the sender. */
  expect: 'deliver' | 'bounce';
}

export interface PlannedMessage {
  serial: number;
  messageId: string;
  size: number;
  recipients: PlannedRecipient[];
  /** true: its own connection; false: the pooled connections. */
  newConnection: boolean;
}

/** mulberry32: small, fast, good enough to pick from a mix. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function pick<T extends { weight: number }>(mix: readonly T[], r: number): T {
  const total = mix.reduce((s, m) => s + m.weight, 0);
  let x = r * total;
  for (const m of mix) {
    x -= m.weight;
    if (x < 0) return m;
  }
  return mix[mix.length - 1]!;
}

/** The flaky sink's decision for an address, from its local part. */
export function flakyKindOf(address: string): FlakyKind {
  if (address.startsWith('refuse-')) return 'refuse';
  if (address.startsWith('defer-')) return 'defer';
  return 'ok';
}

export class MessagePlanner {
  readonly #random: () => number;
  readonly #tag: string;
  readonly #maxSize: number;

  constructor(seed: number, tag: string, maxSize = Number.POSITIVE_INFINITY) {
    this.#random = seededRandom(seed);
    this.#tag = tag;
    this.#maxSize = maxSize;
  }

  messageIdOf(serial: number): string {
    return `<soak-${String(serial).padStart(9, '0')}.${this.#tag}@${SOAK_SENDER_DOMAIN}>`;
  }

  plan(serial: number): PlannedMessage {
    const r = this.#random;
    const size = Math.min(pick(SIZE_MIX, r()).size, this.#maxSize);
    const count = pick(RECIPIENT_COUNT_MIX, r()).count;
    const recipients: PlannedRecipient[] = [];
    for (let i = 0; i < count; i++) {
      const destination = pick(DESTINATION_MIX, r()).destination;
      const kind: FlakyKind = destination === 'flaky' ? pick(FLAKY_MIX, r()).kind : 'ok';
      recipients.push({
        address: `${kind}-${serial}-${i}@${DESTINATIONS[destination]}`,
        destination,
        expect: kind === 'refuse' ? 'bounce' : 'deliver',
      });
    }
    return { serial, messageId: this.messageIdOf(serial), size, recipients, newConnection: r() < NEW_CONNECTION_SHARE };
  }
}

const LINE = 'Soak test body line: the quick brown fox jumps over the lazy dog. 0123456789';

/**
 * Builds messages of exactly the planned size: fixed-width headers (only the Message-ID changes)
 * and a body of 76-character CRLF lines built once per size, so a message costs one concat.
 */
export class MessageFactory {
  readonly #bodies = new Map<number, Buffer>();
  readonly #headerLength: number;

  constructor() {
    this.#headerLength = this.#header('<soak-000000000.xxxxxxxx@soak.test>').length;
  }

  build(message: PlannedMessage): Buffer {
    const header = this.#header(message.messageId);
    if (header.length !== this.#headerLength) throw new Error('soak message header changed length');
    return Buffer.concat([header, this.#body(message.size - header.length)], message.size);
  }

  #header(messageId: string): Buffer {
    return Buffer.from(
      `From: Postern soak <${SOAK_SENDER}>\r\nTo: undisclosed-recipients:;\r\nSubject: Postern soak message\r\n` +
        `Message-ID: ${messageId}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n`,
    );
  }

  #body(length: number): Buffer {
    let body = this.#bodies.get(length);
    if (body) return body;
    if (length < 2) throw new Error(`a soak message needs at least ${this.#headerLength + 2} bytes`);
    body = Buffer.allocUnsafe(length);
    const full = Buffer.from(`${LINE}\r\n`);
    let at = 0;
    while (length - at >= full.length + 2) at += full.copy(body, at);
    const last = length - at - 2;
    body.write('x'.repeat(last), at, 'ascii');
    body.write('\r\n', length - 2, 'ascii');
    this.#bodies.set(length, body);
    return body;
  }
}
