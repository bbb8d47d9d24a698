// A BodyWriter that keeps a small body in memory and spills a big one to the file spool.
//
// Why: most mail is a few KiB. A file per message costs a create, a write, an fsync, a close, a
// share of a directory fsync and later an unlink, and on some file systems (ext4 without a
// journal) inode allocation under create/unlink churn is very slow. A body kept in memory instead
// goes into the database in the same group-committed transaction as its rows: one WAL append and
// one fsync per batch. Big bodies would cost memory and bloat the WAL, so past `threshold` bytes
// the writer opens a spool file (asynchronously), writes what it buffered and streams the rest.
// It never holds more than `threshold` bytes of the body itself.
//
// The writer does not commit anything: `finish()` hands the result (the bytes, or "it is in the
// spool file, fsync'd") to `onFinished`, and the store's `enqueue` makes it durable with the rows.
import fs from 'node:fs';
import { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import type { BodyWriter } from './store.js';
import { type FileSpool, closeWriteStream } from './file-spool.js';

/** What a finished body is: its bytes (inline), or null when it is in the spool file. */
export type FinishedBody = { size: number; inline: Buffer | null };

export interface SpillingBodyWriterOptions {
  queueId: string;
  spool: FileSpool;
  /** Bodies up to this many bytes stay in memory and go inline. */
  threshold: number;
  /** Called once finish() has the body complete (and, for a file, fsync'd and closed). */
  onFinished(queueId: string, body: FinishedBody): void;
  /** Called by abort(): forget anything kept for this queue id. */
  onAborted(queueId: string): void;
}

export class SpillingBodyWriter implements BodyWriter {
  readonly queueId: string;
  readonly stream: Writable;
  readonly #options: SpillingBodyWriterOptions;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #size = 0;
  /** Set once the body has spilled to a spool file. */
  #file: fs.WriteStream | undefined;
  /** The file's descriptor once it is open (so it exists, created by us: abort() may remove it). */
  #fd: number | undefined;

  constructor(options: SpillingBodyWriterOptions) {
    this.queueId = options.queueId;
    this.#options = options;
    this.stream = new Writable({
      write: (chunk: Buffer, _encoding, callback) => this.#write(chunk, callback),
      final: (callback) => this.#final(callback),
    });
  }

  async finish(): Promise<number> {
    await finished(this.stream);
    const file = this.#file;
    if (file) {
      try {
        const fd = this.#fd;
        if (fd === undefined) throw new Error(`spool file for ${this.queueId} is not open`);
        await new Promise<void>((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
      } finally {
        await closeWriteStream(file);
      }
      this.#options.onFinished(this.queueId, { size: this.#size, inline: null });
    } else {
      const chunks = this.#chunks;
      const inline = chunks.length === 1 ? chunks[0]! : joinOnSlab(chunks, this.#buffered);
      this.#chunks = [];
      this.#options.onFinished(this.queueId, { size: this.#size, inline });
    }
    return this.#size;
  }

  async abort(): Promise<void> {
    this.stream.destroy();
    this.#chunks = [];
    this.#buffered = 0;
    this.#options.onAborted(this.queueId);
    const file = this.#file;
    if (!file) return;
    // Waits for an open still in progress, so the file is removed whenever it came to exist.
    await closeWriteStream(file);
    if (this.#fd !== undefined) await this.#options.spool.remove(this.queueId);
  }

  #write(chunk: Buffer, callback: (err?: Error | null) => void): void {
    this.#size += chunk.length;
    if (!this.#file) {
      if (this.#buffered + chunk.length <= this.#options.threshold) {
        this.#chunks.push(chunk);
        this.#buffered += chunk.length;
        callback();
        return;
      }
      this.#spill();
    }
    // Backpressure: take the next chunk only once the file stream has room for it.
    if (this.#file!.write(chunk)) callback();
    else this.#file!.once('drain', () => callback());
  }

  #final(callback: (err?: Error | null) => void): void {
    const file = this.#file;
    if (!file) {
      callback();
      return;
    }
    // autoClose is off: 'finish' leaves the descriptor open for finish() to fsync.
    file.once('finish', () => callback());
    file.end();
  }

  /** Opens the spool file and hands it what was buffered; from now on chunks go straight there. */
  #spill(): void {
    const file = this.#options.spool.openWriteStream(this.queueId);
    this.#file = file;
    file.once('open', (fd: number) => {
      this.#fd = fd;
    });
    // A failed open or write fails the body stream: the intake sees 'error' and answers 4xx.
    file.on('error', (err) => this.stream.destroy(err));
    for (const chunk of this.#chunks) file.write(chunk);
    this.#chunks = [];
    this.#buffered = 0;
  }
}

// Inline bodies are joined into slices of a shared slab rather than each into a buffer of its own:
// a buffer over 4 KiB is past Node's own pool, so every few-KiB message allocated a fresh
// ArrayBuffer (3% of the intake's CPU at 2,000 messages/s). A slab is freed with the last body in
// it; bodies live until their group commit, so a few slabs at most are alive at once.
const SLAB_BYTES = 256 * 1024;
/** Bodies above this get a buffer of their own (a slab holds at least 8 of them). */
const SLAB_MAX_BODY = SLAB_BYTES / 8;
let slab = Buffer.alloc(0);
let slabUsed = 0;

function joinOnSlab(chunks: Buffer[], total: number): Buffer {
  if (total > SLAB_MAX_BODY) return Buffer.concat(chunks, total);
  if (slabUsed + total > slab.length) {
    slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
    slabUsed = 0;
  }
  const body = slab.subarray(slabUsed, slabUsed + total);
  let at = 0;
  for (const chunk of chunks) at += chunk.copy(body, at);
  // 8-byte steps keep every body aligned, as Node's own pool does.
  slabUsed += (total + 7) & ~7;
  return body;
}
