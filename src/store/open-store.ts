// Picks the storage backend. Only the embedded SQLite store exists today; PostgreSQL will plug in
// here behind the same Store interface.
import fs from 'node:fs';
import { openSqliteStore } from './sqlite/sqlite-store.js';
import type { Store } from './store.js';

export interface OpenStoreOptions {
  /**
   * Whether this connection checkpoints the SQLite WAL into the database as it grows (default
   * true). `postern serve` leaves that to its delivery thread, so the intake's event loop never
   * waits for the fsyncs a checkpoint makes.
   */
  checkpoints?: boolean;
}

export async function openStore(dataDir: string, options: OpenStoreOptions = {}): Promise<Store> {
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  return openSqliteStore({ dataDir, checkpoints: options.checkpoints });
}
