// Message bodies as files in one spool directory: the bodies too big to keep inline in the
// database (see spilling-body-writer.ts). A body file is opened asynchronously (no `openSync` on
// the event loop), fsync'd when complete, and its directory entry fsync'd before the queue row
// that points at it is committed (see `syncDirectory`, called once per group commit that has
// file bodies in it).
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';

export class FileSpool {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  pathFor(queueId: string): string {
    if (!/^[A-Za-z0-9_-]+$/.test(queueId)) throw new Error(`invalid queue id ${JSON.stringify(queueId)}`);
    return path.join(this.dir, `${queueId}.eml`);
  }

  /**
   * A stream to a new body file. The open happens in the thread pool; writes made before it
   * completes are buffered by the stream. `autoClose: false` keeps the descriptor open after
   * 'finish' so the caller can fsync it; the caller then closes it with `closeWriteStream`, which
   * goes through the stream so the descriptor is closed exactly once (a second close(fd) would
   * close whatever was opened since under the same number).
   * flags 'wx': a queue id is never reused, so an existing file is a bug worth failing on.
   */
  openWriteStream(queueId: string): fs.WriteStream {
    return fs.createWriteStream(this.pathFor(queueId), { flags: 'wx', mode: 0o600, autoClose: false });
  }

  read(queueId: string): Readable {
    return fs.createReadStream(this.pathFor(queueId));
  }

  async remove(queueId: string): Promise<void> {
    await fsp.rm(this.pathFor(queueId), { force: true });
  }

  /** Makes new directory entries (bodies created since the last call) durable. */
  async syncDirectory(): Promise<void> {
    const handle = await fsp.open(this.dir, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  /** Queue ids that have a body file, for removing orphans left by a crash before commit. */
  async listIds(): Promise<string[]> {
    const names = await fsp.readdir(this.dir);
    return names.filter((n) => n.endsWith('.eml')).map((n) => n.slice(0, -4));
  }
}

/**
 * Closes a stream from `openWriteStream`, once whatever the state: destroy() waits for a pending
 * open, closes the descriptor if there is one and forgets it, and 'close' is emitted once.
 */
export function closeWriteStream(stream: fs.WriteStream): Promise<void> {
  if (stream.closed) return Promise.resolve();
  return new Promise((resolve) => {
    stream.once('close', () => resolve());
    stream.destroy();
  });
}
