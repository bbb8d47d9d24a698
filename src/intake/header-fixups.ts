// Submission fix-ups (RFC 6409 section 8): prepend a Received trace header and add Message-ID and
// Date when the client left them out (many devices do), after the header policy (send-as) has seen
// every header field. Only the header block is buffered, and only up to a bound, 256 KiB like
// Exchange Online's header limit: a header section larger than that is refused (552 5.3.4), never
// passed on unchecked, since the policy could not see all of it.
import { randomUUID } from 'node:crypto';
import { type SmtpReplyError, smtpError } from '../errors/smtp-errors.js';
import { formatRfc5322Date } from '../mail/rfc5322-date.js';

/** The largest header section accepted, in bytes (header fields with their CRLFs, not the blank line). */
export const MAX_HEADER_BLOCK = 256 * 1024;
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

/** Header values by name (any case), unfolded. */
export interface HeaderView {
  /** The first occurrence. */
  get(name: string): string | undefined;
  /** Every occurrence, in order (a message may repeat a field, From included). */
  all(name: string): string[];
}

/**
 * Called per chunk of message data with a function that takes what may be written on, in order.
 * A plain object, not a Transform stream, for the same reason as DataGuard.
 */
export class HeaderFixups {
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
    this.#received = received;
    this.#hostname = hostname;
    this.#date = date;
    this.#policy = policy;
  }

  /** Takes a chunk; passes on to `emit` what may be written now (nothing while headers are read). */
  take(chunk: Buffer, emit: (piece: Buffer) => void): void {
    if (this.rejection) return;
    if (this.#done) return emit(chunk);
    const start = this.#buffered;
    this.#buffer.push(chunk);
    this.#buffered += chunk.length;
    // Look for the blank line straddling the previous chunk and this one (the 3 bytes kept from
    // before with this chunk's first 3), then in this chunk. Nothing is copied until it is found
    // but those 6 bytes: a header block sent a byte at a time costs linear time, not quadratic,
    // and a message in one chunk is not copied at all.
    let end = -1;
    if (this.#tail.length > 0) {
      const seam = Buffer.concat([this.#tail, chunk.subarray(0, 3)]);
      const hit = seam.indexOf(HEADER_END);
      if (hit !== -1) end = start - this.#tail.length + hit;
    }
    if (end === -1) {
      const hit = chunk.indexOf(HEADER_END);
      if (hit !== -1) end = start + hit;
    }
    this.#tail = chunk.length >= 3 ? chunk.subarray(chunk.length - 3) : Buffer.concat([this.#tail, chunk]).subarray(-3);
    if (this.#head.length < 2) this.#head = Buffer.concat([this.#head, chunk.subarray(0, 2 - this.#head.length)]);
    const startsBlank = this.#head.length >= 2 && this.#head[0] === 0x0d && this.#head[1] === 0x0a;
    if (startsBlank) end = 0;
    // A header section of MAX_HEADER_BLOCK bytes ends with the blank line by byte MAX + 2.
    if (end === -1 && this.#buffered < MAX_HEADER_BLOCK + 2) return;
    const all = joined(this.#buffer);
    this.#release(all, end === -1 ? null : all.subarray(0, end + 2), emit);
  }

  /** The end of the data: passes on what is still held. */
  end(emit: (piece: Buffer) => void): void {
    if (this.#done || this.rejection) return;
    // The whole message is headers (no blank line): still add what is missing.
    const all = joined(this.#buffer);
    this.#release(all, all, emit);
  }

  #release(all: Buffer, headerBlock: Buffer | null, emit: (piece: Buffer) => void): void {
    this.#done = true;
    this.#buffer = [];
    // Headers the policy cannot see in full are never passed on: the header section ends within
    // MAX_HEADER_BLOCK bytes or the message is refused, whether or not a policy applies, so the
    // limit is the same on every port.
    if (!headerBlock || headerBlock.length > MAX_HEADER_BLOCK) {
      this.rejection = smtpError('HEADER_TOO_BIG', { max: MAX_HEADER_BLOCK });
      return;
    }
    // Postern's own lines are UTF-8 (an SMTPUTF8 address stays readable, and no character can
    // turn into a CR or LF byte); values copied from the client's headers keep their bytes.
    const prefix: Buffer[] = [Buffer.from(this.#received, 'utf8')];
    const own = (line: string) => prefix.push(Buffer.from(line, 'utf8'));
    const fields = headerFields(headerBlock.toString('latin1'));
    const first = (name: string) => fields.get(name)?.[0];
    const decision = this.#policy?.({ get: (name) => first(name.toLowerCase()), all: (name) => fields.get(name.toLowerCase()) ?? [] });
    if (decision?.reject) {
      this.rejection = decision.reject;
      return;
    }
    if (decision?.rewriteFrom) {
      // Every From field goes (there may be several); the originals are kept in Reply-To.
      const originals = (fields.get('from') ?? []).filter(Boolean);
      this.rewrittenFrom = originals.length > 0 ? originals.join(', ') : undefined;
      all = Buffer.concat([withoutHeader(headerBlock, 'from'), all.subarray(headerBlock.length)]);
      own(`From: <${decision.rewriteFrom}>\r\n`);
      if (!fields.has('reply-to') && this.rewrittenFrom) prefix.push(Buffer.from(`Reply-To: ${this.rewrittenFrom}\r\n`, 'latin1'));
    }
    const existingId = first('message-id');
    if (existingId) {
      this.messageId = existingId;
    } else {
      // A UUID's 122 random bits, from Node's cache of them (see queue-id.ts).
      this.messageId = `<${randomUUID()}@${this.#hostname}>`;
      own(`Message-ID: ${this.messageId}\r\n`);
    }
    if (!fields.has('date')) own(`Date: ${formatRfc5322Date(this.#date)}\r\n`);
    emit(Buffer.concat(prefix));
    emit(all);
  }
}

/** The chunks as one buffer; a single chunk as it is (Buffer.concat would copy it). */
function joined(chunks: Buffer[]): Buffer {
  return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
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

/** Header names (lower case) mapped to every value they have, in order, unfolded. */
function headerFields(block: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const unfolded = block.replace(/\r\n[ \t]+/g, ' ');
  for (const line of unfolded.split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    const values = out.get(name);
    if (values) values.push(value);
    else out.set(name, [value]);
  }
  return out;
}
