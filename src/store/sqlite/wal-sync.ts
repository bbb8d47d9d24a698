// fsync of SQLite's write-ahead log, off the event loop.
//
// better-sqlite3 is synchronous: a COMMIT at synchronous=FULL fsyncs the WAL on the main thread,
// and every SMTP session waits while it does. On this project's test VM that is 0.07 ms; on a
// server's disk it is often 1 to 10 ms, which would cap the whole process at a few hundred commits
// per second no matter how many cores it has. So the hot paths commit at synchronous=NORMAL (the
// frames are written to the WAL, not flushed) and then call sync(), which flushes the WAL file on
// libuv's thread pool while the event loop goes on; the 250 waits for that promise.
//
// Why that is as durable as FULL: in WAL mode a commit is durable once its frames are on disk,
// and an fsync of the WAL file after the commit puts them there (on Linux fsync flushes the file,
// whichever descriptor it is called on). NORMAL still fsyncs the WAL before every checkpoint and
// the database after it, so the database file is never at risk; only unflushed commits are, and
// nobody was told about those yet.
//
// Coalescing: callers that arrive while an fsync runs share the next one (their frames may have
// been written after the running one started), so a burst costs at most two fsyncs.
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';

export class WalSync {
  readonly #handle: FileHandle;
  #running: Promise<void> | undefined;
  #next: Promise<void> | undefined;

  private constructor(handle: FileHandle) {
    this.#handle = handle;
  }

  /**
   * Opens `<database>-wal`, which exists while a connection in WAL mode has the database open,
   * and fsyncs the directory once so the WAL file's own entry is durable too.
   */
  static async open(databaseFile: string): Promise<WalSync> {
    const walFile = `${databaseFile}-wal`;
    let handle: FileHandle;
    try {
      handle = await fs.promises.open(walFile, 'r');
    } catch (err) {
      throw new Error(`cannot open the write-ahead log ${walFile}: ${(err as Error).message}`);
    }
    const dir = await fs.promises.open(path.dirname(walFile), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
    return new WalSync(handle);
  }

  /** Resolves once everything committed before this call is on disk. */
  sync(): Promise<void> {
    if (this.#next) return this.#next;
    if (!this.#running) return this.#start();
    const after = this.#running.catch(() => undefined);
    this.#next = after.then(() => {
      this.#next = undefined;
      return this.#start();
    });
    return this.#next;
  }

  /** Flushes once more and closes the file (the store calls this last). */
  async close(): Promise<void> {
    await this.sync().catch(() => undefined);
    await this.#handle.close();
  }

  #start(): Promise<void> {
    const run = this.#handle.sync().finally(() => {
      if (this.#running === run) this.#running = undefined;
    });
    this.#running = run;
    return run;
  }
}
