// The least a durable intake must do per message, for the durable ceiling of the bench: append the
// body to a SQLite table and have it on disk before the 250. Group-committed (one transaction and
// one WAL fsync per turn of the event loop, the fsync on the thread pool) with Postern's own
// GroupCommit and WalSync, so the figure is the floor of Postern's durability design, without
// its recipients, queue ids, header fix-ups, policy, logs or delivery.
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';
import { GroupCommit } from '../store/group-commit.js';
import { WalSync } from '../store/sqlite/wal-sync.js';

export class DurableAppend {
  readonly #commits: GroupCommit<Buffer>;

  private constructor(sqlite: BetterSqlite3.Database, wal: WalSync) {
    const insert = sqlite.prepare('INSERT INTO messages (body) VALUES (?)');
    const batch = sqlite.transaction((bodies: Buffer[]) => {
      for (const body of bodies) insert.run(body);
    });
    this.#commits = new GroupCommit(async (bodies) => {
      batch.immediate(bodies);
      await wal.sync();
      return bodies.map(() => ({ ok: true as const, value: undefined }));
    });
  }

  static async open(dir: string): Promise<DurableAppend> {
    const file = path.join(dir, 'durable-ceiling.db');
    const sqlite = new BetterSqlite3(file);
    sqlite.pragma('journal_mode = WAL');
    // NORMAL: the COMMIT does not fsync; WalSync does, off the event loop, before the 250.
    sqlite.pragma('synchronous = NORMAL');
    sqlite.exec('CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, body BLOB NOT NULL)');
    return new DurableAppend(sqlite, await WalSync.open(file));
  }

  /** Resolves once the body is committed and the WAL fsync'd. */
  append(body: Buffer): Promise<void> {
    return this.#commits.submit(body);
  }
}
