// The three destinations Postern delivers to during the soak, each a real smtp-server on
// 127.0.0.1 (random port) in the soak's own process. None keeps a body: each reads the header
// block for the Message-ID and counts the rest, so a 20-minute run holds no mail in memory.
//
//   normal  accepts everything, offers STARTTLS (the route uses the default opportunistic TLS,
//           so deliveries there are encrypted); also receives the DSNs, which go to the
//           sender's domain: it reads their In-Reply-To and Final-Recipient lines.
//   flaky   decides by the recipient's local part: ok-* accepted, refuse-* 550 5.1.1 at RCPT
//           (permanent: Postern bounces it), defer-* 451 4.2.0 at RCPT for the first
//           `deferAttempts` tries, then accepted. No STARTTLS.
//   slow    accepts everything but answers each DATA after 2 to 5 s (uniform). No STARTTLS.
import type { AddressInfo } from 'node:net';
import type { Readable } from 'node:stream';
import { SMTPServer, type SMTPServerSession } from 'smtp-server';
import type { Ledger } from './soak-ledger.js';
import { type Destination, flakyKindOf } from './soak-mix.js';

export interface SinkSettings {
  /** 451s before a defer-* recipient is accepted. */
  deferAttempts: number;
  /** The slow sink's delay before answering DATA, ms. */
  slowDelayMs: { min: number; max: number };
  tls: { key: Buffer; cert: Buffer };
}

export interface SinkCounters {
  connections: number;
  transactions: number;
  bytes: number;
  /** RCPT replies 451 / 550 given (flaky sink). */
  deferrals: number;
  refusals: number;
}

const HEADER_LIMIT = 64 * 1024;
const DSN_LIMIT = 1024 * 1024;

export class SoakSink {
  readonly destination: Destination;
  readonly counters: SinkCounters = { connections: 0, transactions: 0, bytes: 0, deferrals: 0, refusals: 0 };
  readonly #server: SMTPServer;
  readonly #ledger: Ledger;
  readonly #settings: SinkSettings;
  /** defer-* addresses and how many times they were deferred so far. */
  readonly #deferred = new Map<string, number>();
  readonly #timers = new Set<NodeJS.Timeout>();

  private constructor(destination: Destination, ledger: Ledger, settings: SinkSettings) {
    this.destination = destination;
    this.#ledger = ledger;
    this.#settings = settings;
    const starttls = destination === 'normal';
    this.#server = new SMTPServer({
      name: `${destination}.sink.soak.test`,
      ...(starttls ? { key: settings.tls.key, cert: settings.tls.cert } : { hideSTARTTLS: true }),
      disabledCommands: starttls ? ['AUTH'] : ['AUTH', 'STARTTLS'],
      authOptional: true,
      disableReverseLookup: true,
      closeTimeout: 500,
      logger: false,
      onConnect: (_session, cb) => {
        this.counters.connections++;
        cb();
      },
      onRcptTo: (address, _session, cb) => this.#onRcpt(address.address.toLowerCase(), cb),
      onData: (stream, session, cb) => this.#onData(stream, session, cb),
    });
    // Failed handshakes and resets surface here; without a listener they would throw.
    this.#server.on('error', () => undefined);
  }

  static async start(destination: Destination, ledger: Ledger, settings: SinkSettings): Promise<SoakSink> {
    const sink = new SoakSink(destination, ledger, settings);
    await new Promise<void>((resolve, reject) => {
      sink.#server.server.once('error', reject);
      sink.#server.listen(0, '127.0.0.1', () => resolve());
    });
    return sink;
  }

  get port(): number {
    return (this.#server.server.address() as AddressInfo).port;
  }

  close(): Promise<void> {
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }

  #onRcpt(address: string, cb: (err?: Error | null) => void): void {
    if (this.destination !== 'flaky') return cb();
    const kind = flakyKindOf(address);
    if (kind === 'refuse') {
      this.counters.refusals++;
      return cb(reply(550, '5.1.1 No such user here (soak: refused for good)'));
    }
    if (kind === 'defer') {
      const n = this.#deferred.get(address) ?? 0;
      if (n < this.#settings.deferAttempts) {
        this.#deferred.set(address, n + 1);
        this.counters.deferrals++;
        return cb(reply(451, '4.2.0 Mailbox busy, try again later (soak: deferred)'));
      }
      this.#deferred.delete(address);
    }
    cb();
  }

  #onData(stream: Readable, session: SMTPServerSession, cb: (err?: Error | null, message?: string) => void): void {
    const isDsn = session.envelope.mailFrom !== false && session.envelope.mailFrom.address === '';
    const limit = isDsn ? DSN_LIMIT : HEADER_LIMIT;
    const head: Buffer[] = [];
    let headLength = 0;
    let headDone = false;
    let bytes = 0;
    stream.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (headDone) return;
      head.push(chunk);
      headLength += chunk.length;
      if (headLength >= limit || (!isDsn && Buffer.concat(head).includes('\r\n\r\n'))) headDone = true;
    });
    stream.on('end', () => {
      this.counters.transactions++;
      this.counters.bytes += bytes;
      const text = Buffer.concat(head).subarray(0, limit).toString('latin1');
      const recipients = session.envelope.rcptTo.map((r) => r.address);
      const finish = () => {
        if (isDsn) {
          // Final-Recipient lines name the failed recipients; In-Reply-To the original message.
          const failed = [...text.matchAll(/^Final-Recipient: *rfc822; *(\S+)\s*$/gim)].map((m) => m[1]!);
          const original = /^In-Reply-To: *(<[^>]+>)/im.exec(text)?.[1];
          if (failed.length === 0) this.#ledger.stray();
          else this.#ledger.bounced(failed, original);
        } else {
          const messageId = /^Message-ID: *(<[^>]+>)/im.exec(text.slice(0, headerEnd(text)))?.[1];
          if (!recipients.some((r) => /^(ok|refuse|defer)-\d+-\d+@/.test(r))) this.#ledger.stray();
          this.#ledger.delivered(recipients, messageId);
        }
        cb(null, 'OK: soak sink took it');
      };
      if (this.destination !== 'slow' || isDsn) return finish();
      const { min, max } = this.#settings.slowDelayMs;
      const timer = setTimeout(() => {
        this.#timers.delete(timer);
        finish();
      }, min + Math.random() * (max - min));
      this.#timers.add(timer);
    });
  }
}

function headerEnd(text: string): number {
  const end = text.indexOf('\r\n\r\n');
  return end >= 0 ? end : text.length;
}

function reply(code: number, message: string): Error {
  return Object.assign(new Error(message), { responseCode: code });
}
