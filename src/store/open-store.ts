// Picks the storage backend. Only the embedded SQLite store exists today; PostgreSQL will plug in
// here behind the same Store interface.
import fs from 'node:fs';
import { openSqliteStore } from './sqlite/sqlite-store.js';
import type { Store } from './store.js';

export async function openStore(dataDir: string): Promise<Store> {
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  return openSqliteStore({ dataDir });
}
