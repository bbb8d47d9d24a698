// Message bodies as files in one spool directory. A body is streamed to disk as it arrives (never
// held whole in memory), fsync'd when complete, and its directory entry fsync'd before the queue
// row that points at it is committed (see `syncDirectory`, called once per group commit).
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { finished } from 'node:stream/promises';
import type { BodyWriter } from './store.js';

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

  createWriter(queueId: string): BodyWriter {
    const file = this.pathFor(queueId);
    // flags 'wx': a queue id is never reused, so an existing file is a bug worth failing on.
    const fd = fs.openSync(file, 'wx', 0o600);
    const stream = fs.createWriteStream(file, { fd, autoClose: false });
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
    };
    return {
      queueId,
      stream,
      async finish() {
        await finished(stream);
        await new Promise<void>((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
        const { size } = await fsp.stat(file);
        await close();
        return size;
      },
      async abort() {
        stream.destroy();
        await close();
        await fsp.rm(file, { force: true });
      },
    };
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
