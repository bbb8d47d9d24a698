// Watches message data on its way to the spool and stops it at the first problem, while the intake
// still consumes the rest so the SMTP conversation stays in step (the client is sending until
// CRLF.CRLF whatever we think of it):
//  - a bare LF or bare CR: the SMTP smuggling family (CVE-2023-51764 and relatives) relies on
//    servers that disagree about where a line, and so the message, ends. Only CRLF is accepted.
//  - more bytes than the size limit: nothing past the limit reaches the disk.
//
// A plain object called per chunk, not a Transform stream: a stream stage per message cost its
// pipe, listeners and buffers for nothing (see the intake's #onData).
const CR = 0x0d;
const LF = 0x0a;

export type DataViolation = { kind: 'bare_lf' | 'bare_cr'; offset: number } | { kind: 'too_big'; limit: number };

export class DataGuard {
  violation: DataViolation | null = null;
  bytes = 0;
  readonly #limit: number;
  /** A CR ending the previous chunk, still waiting for its LF. */
  #pendingCr = false;

  constructor(limit: number) {
    this.#limit = limit;
  }

  /** Counts a chunk; true when it may be written on, false from the first violation on. */
  accept(chunk: Buffer): boolean {
    const start = this.bytes;
    this.bytes += chunk.length;
    if (this.violation) return false;
    if (this.bytes > this.#limit) {
      this.violation = { kind: 'too_big', limit: this.#limit };
      return false;
    }
    const bad = this.#findBareLineEnding(chunk);
    if (bad) {
      this.violation = { kind: bad.kind, offset: start + bad.index };
      return false;
    }
    return true;
  }

  /** The end of the data: a CR still waiting for its LF is a bare CR. */
  end(): void {
    if (!this.violation && this.#pendingCr) this.violation = { kind: 'bare_cr', offset: this.bytes - 1 };
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
