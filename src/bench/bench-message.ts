// The messages the load generator sends: exactly `size` bytes of plain RFC 5322 text with CRLF
// line endings (Postern refuses bare LF), no line starting with a dot (so dot-stuffing adds
// nothing) and a unique Message-ID per message. The body is built once; only the fixed-width
// Message-ID line changes, so making a message costs the client one Buffer.concat.

export const BENCH_DOMAIN = 'bench.test';
export const BENCH_SENDER = `bench@${BENCH_DOMAIN}`;
export const BENCH_RECIPIENT = `sink@${BENCH_DOMAIN}`;

const LINE = 'The quick brown fox jumps over the lazy dog; Postern benchmark body text. 0123';

export class BenchMessage {
  readonly size: number;
  readonly #prefix: Buffer;
  readonly #rest: Buffer;
  readonly #tag = Math.random().toString(36).slice(2, 10);

  constructor(size: number) {
    const prefix = `From: Postern bench <${BENCH_SENDER}>\r\nTo: Sink <${BENCH_RECIPIENT}>\r\n`;
    const headers =
      `Subject: Postern benchmark message\r\nDate: ${new Date().toUTCString().replace('GMT', '+0000')}\r\n` +
      'MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n';
    const fixed = Buffer.byteLength(prefix) + this.#messageIdLine(0).length + Buffer.byteLength(headers);
    if (size < fixed + 2) throw new Error(`a bench message needs at least ${fixed + 2} bytes`);
    this.size = size;
    this.#prefix = Buffer.from(prefix);
    this.#rest = Buffer.concat([Buffer.from(headers), body(size - fixed)]);
  }

  /** Message number `n` (the number only changes the Message-ID). */
  build(n: number): Buffer {
    return Buffer.concat([this.#prefix, this.#messageIdLine(n), this.#rest], this.size);
  }

  #messageIdLine(n: number): Buffer {
    return Buffer.from(`Message-ID: <${String(n).padStart(12, '0')}.${this.#tag}@${BENCH_DOMAIN}>\r\n`);
  }
}

/** `length` bytes (at least 2) of 76-character lines, each ending CRLF; the last line is shorter. */
function body(length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  const full = Buffer.from(`${LINE.slice(0, 76)}\r\n`);
  let at = 0;
  // Stop while at least 2 bytes remain for the last line's CRLF (and never fewer).
  while (length - at >= full.length + 2) at += full.copy(out, at);
  const last = length - at - 2;
  out.write(LINE.slice(0, 76).padEnd(last, 'x').slice(0, last), at, 'ascii');
  out.write('\r\n', length - 2, 'ascii');
  return out;
}
