// Submission fix-ups (RFC 6409 section 8): prepend a Received trace header and add Message-ID and
// Date when the client left them out (many devices do). Only the header block is buffered, and only
// up to a bound: a message whose headers never end within it is passed on with the Received header
// alone rather than held in memory.
import { randomBytes } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import type { SmtpReplyError } from '../errors/smtp-errors.js';
import { formatRfc5322Date } from '../mail/rfc5322-date.js';

const MAX_HEADER_BLOCK = 256 * 1024;
const HEADER_END = Buffer.from('\r\n\r\n');

export interface ReceivedInfo {
  heloName: string;
  clientHostname: string;
  clientIp: string;
  hostname: string;
  /** ESMTP, ESMTPS, ESMTPSA (RFC 3848). */
  protocol: string;
  queueId: string;
  tls?: { version: string; cipher: string };
  account?: string;
  /** Named only when there is exactly one recipient, as Postfix does, so Bcc lists do not leak. */
  singleRecipient?: string;
  date: Date;
}

/** Client-supplied words in a trace header: no control characters, bounded length. */
function clean(value: string): string {
  return value.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 255);
}

export function receivedHeader(info: ReceivedInfo): string {
  info = { ...info, heloName: clean(info.heloName), clientHostname: clean(info.clientHostname), account: info.account && clean(info.account), singleRecipient: info.singleRecipient && clean(info.singleRecipient) };
  const from = `from ${info.heloName || 'unknown'} (${info.clientHostname && info.clientHostname !== `[${info.clientIp}]` ? `${info.clientHostname} ` : ''}[${info.clientIp}])`;
  const tls = info.tls ? `\r\n\t(using ${info.tls.version} with cipher ${info.tls.cipher})` : '';
  const auth = info.account ? `\r\n\t(Authenticated sender: ${info.account})` : '';
  const forRcpt = info.singleRecipient ? `\r\n\tfor <${info.singleRecipient}>` : '';
  return `Received: ${from}${tls}${auth}\r\n\tby ${info.hostname} (Postern) with ${info.protocol} id ${info.queueId}${forRcpt};\r\n\t${formatRfc5322Date(info.date)}\r\n`;
}

/** What the session policy says about a message's headers (send-as, From rewrite). */
export interface HeaderDecision {
  reject?: SmtpReplyError;
  /** Replace the From header with this address and keep the original in Reply-To. */
  rewriteFrom?: string;
}

/** Header values by lower-case name, unfolded (first occurrence; all of them under `all`). */
export interface HeaderView {
  get(name: string): string | undefined;
}

export class HeaderFixups extends Transform {
  /** The Message-ID the message carries (its own or the one added), once headers are read. */
  messageId: string | undefined;
  /** Set when the header policy refused the message; nothing more is written then. */
  rejection: SmtpReplyError | null = null;
  /** The From the policy replaced, when it did. */
  rewrittenFrom: string | undefined;
  #buffer: Buffer[] = [];
  #buffered = 0;
  /** The last 3 bytes seen, and the first 2 (a message may start with the blank line). */
  #tail: Buffer = Buffer.alloc(0);
  #head: Buffer = Buffer.alloc(0);
  #done = false;
  readonly #received: string;
  readonly #hostname: string;
  readonly #date: Date;

  readonly #policy: ((headers: HeaderView) => HeaderDecision) | undefined;

  constructor(received: string, hostname: string, date: Date, policy?: (headers: HeaderView) => HeaderDecision) {
    super();
    this.#received = received;
    this.#hostname = hostname;
    this.#date = date;
    this.#policy = policy;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, callback: TransformCallback): void {
    if (this.rejection) return callback();
    if (this.#done) return callback(null, chunk);
    const start = this.#buffered;
    this.#buffer.push(chunk);
    this.#buffered += chunk.length;
    // Look for the blank line in the new chunk plus the 3 bytes before it (it may straddle two
    // chunks). Nothing is copied until it is found: a header block sent a byte at a time costs
    // linear time, not quadratic.
    const window = Buffer.concat([this.#tail, chunk]);
    const hit = window.indexOf(HEADER_END);
    this.#tail = window.subarray(Math.max(0, window.length - 3));
    if (this.#head.length < 2) this.#head = Buffer.concat([this.#head, chunk.subarray(0, 2 - this.#head.length)]);
    const startsBlank = this.#head.length >= 2 && this.#head[0] === 0x0d && this.#head[1] === 0x0a;
    const end = startsBlank ? 0 : hit === -1 ? -1 : start - (window.length - chunk.length) + hit;
    if (end === -1 && this.#buffered < MAX_HEADER_BLOCK) return callback();
    const all = Buffer.concat(this.#buffer);
    this.#release(all, end === -1 ? null : all.subarray(0, end + 2));
    callback();
  }

  override _flush(callback: TransformCallback): void {
    if (!this.#done) {
      // The whole message is headers (no blank line): still add what is missing.
      const all = Buffer.concat(this.#buffer);
      this.#release(all, all);
    }
    callback();
  }

  #release(all: Buffer, headerBlock: Buffer | null): void {
    this.#done = true;
    this.#buffer = [];
    // Postern's own lines are UTF-8 (an SMTPUTF8 address stays readable, and no character can
    // turn into a CR or LF byte); values copied from the client's headers keep their bytes.
    const prefix: Buffer[] = [Buffer.from(this.#received, 'utf8')];
    const own = (line: string) => prefix.push(Buffer.from(line, 'utf8'));
    if (headerBlock) {
      const names = headerNames(headerBlock.toString('latin1'));
      const decision = this.#policy?.({ get: (name) => names.get(name.toLowerCase()) });
      if (decision?.reject) {
        this.rejection = decision.reject;
        return;
      }
      if (decision?.rewriteFrom) {
        this.rewrittenFrom = names.get('from');
        all = Buffer.concat([withoutHeader(headerBlock, 'from'), all.subarray(headerBlock.length)]);
        own(`From: <${decision.rewriteFrom}>\r\n`);
        if (!names.has('reply-to') && this.rewrittenFrom) prefix.push(Buffer.from(`Reply-To: ${this.rewrittenFrom}\r\n`, 'latin1'));
      }
      const existingId = names.get('message-id');
      if (existingId) {
        this.messageId = existingId;
      } else {
        this.messageId = `<${randomBytes(12).toString('hex')}@${this.#hostname}>`;
        own(`Message-ID: ${this.messageId}\r\n`);
      }
      if (!names.has('date')) own(`Date: ${formatRfc5322Date(this.#date)}\r\n`);
    }
    this.push(Buffer.concat(prefix));
    this.push(all);
  }
}

/** The header block without every occurrence of one header (with its folded lines). */
function withoutHeader(block: Buffer, name: string): Buffer {
  const lines = block.toString('latin1').split('\r\n');
  const kept: string[] = [];
  let dropping = false;
  for (const line of lines) {
    if (/^[ \t]/.test(line)) {
      if (!dropping) kept.push(line);
      continue;
    }
    dropping = line.slice(0, line.indexOf(':')).trim().toLowerCase() === name;
    if (!dropping) kept.push(line);
  }
  return Buffer.from(kept.join('\r\n'), 'latin1');
}

/** Header names (lower case) mapped to their first value, unfolded. */
function headerNames(block: string): Map<string, string> {
  const out = new Map<string, string>();
  const unfolded = block.replace(/\r\n[ \t]+/g, ' ');
  for (const line of unfolded.split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    if (!out.has(name)) out.set(name, line.slice(colon + 1).trim());
  }
  return out;
}
