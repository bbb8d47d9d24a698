// Watches message data as it streams to the spool and stops writing at the first problem, while
// still consuming the rest so the SMTP conversation stays in step (the client is sending until
// CRLF.CRLF whatever we think of it):
//  - a bare LF or bare CR: the SMTP smuggling family (CVE-2023-51764 and relatives) relies on
//    servers that disagree about where a line, and so the message, ends. Only CRLF is accepted.
//  - more bytes than the size limit: nothing past the limit reaches the disk.
import { Transform, type TransformCallback } from 'node:stream';

const CR = 0x0d;
const LF = 0x0a;

export type DataViolation = { kind: 'bare_lf' | 'bare_cr'; offset: number } | { kind: 'too_big'; limit: number };

export class DataGuard extends Transform {
  violation: DataViolation | null = null;
  bytes = 0;
  readonly #limit: number;
  /** A CR ending the previous chunk, still waiting for its LF. */
  #pendingCr = false;

  constructor(limit: number) {
    super();
    this.#limit = limit;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, callback: TransformCallback): void {
    const start = this.bytes;
    this.bytes += chunk.length;
    if (this.violation) return callback();
    if (this.bytes > this.#limit) {
      this.violation = { kind: 'too_big', limit: this.#limit };
      return callback();
    }
    const bad = this.#findBareLineEnding(chunk);
    if (bad) {
      this.violation = { kind: bad.kind, offset: start + bad.index };
      return callback();
    }
    callback(null, chunk);
  }

  override _flush(callback: TransformCallback): void {
    if (!this.violation && this.#pendingCr) this.violation = { kind: 'bare_cr', offset: this.bytes - 1 };
    callback();
  }

  #findBareLineEnding(chunk: Buffer): { kind: 'bare_lf' | 'bare_cr'; index: number } | null {
    let i = 0;
    if (this.#pendingCr) {
      this.#pendingCr = false;
      if (chunk[0] !== LF) return { kind: 'bare_cr', index: -1 };
      i = 1;
    }
    // indexOf runs in native code: a normal chunk costs two scans.
    for (;;) {
      const lf = chunk.indexOf(LF, i);
      const cr = chunk.indexOf(CR, i);
      if (lf === -1 && cr === -1) return null;
      // An LF before any CR has no CR right before it.
      if (cr === -1 || (lf !== -1 && lf < cr)) return { kind: 'bare_lf', index: lf };
      if (cr === chunk.length - 1) {
        this.#pendingCr = true;
        return null;
      }
      if (chunk[cr + 1] !== LF) return { kind: 'bare_cr', index: cr };
      i = cr + 2;
    }
  }
}
