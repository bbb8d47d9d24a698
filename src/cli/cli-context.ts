// What every CLI command needs: the configuration the server uses and a store opened on it.
import os from 'node:os';
import type { Command } from 'commander';
import { type Config, loadConfig } from '../config/load-config.js';
import { openStore } from '../store/open-store.js';
import type { Store } from '../store/store.js';

/** A mistake in how the command was used: printed as is, exit status 2. */
export class UsageError extends Error {}

export function configFor(command: Command): Config {
  const root = command.optsWithGlobals() as { config?: string };
  return loadConfig(root.config);
}

export async function withStore<T>(command: Command, fn: (store: Store, config: Config) => Promise<T>): Promise<T> {
  const config = configFor(command);
  const store = await openStore(config.dataDir);
  try {
    return await fn(store, config);
  } finally {
    await store.close();
  }
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Left-aligned columns, for humans; scripts use --json. */
export function printTable(headers: string[], rows: string[][]): void {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  process.stdout.write(`${[line(headers), ...rows.map(line)].join('\n')}\n`);
}

export function formatTime(ms: number | null | undefined): string {
  return ms == null ? '-' : new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

export async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** Who made an admin change, for the audit log: the login behind sudo when there is one. */
export function actor(): string {
  let user = process.env.SUDO_USER;
  if (!user) {
    try {
      user = os.userInfo().username;
    } catch {
      user = String(process.getuid?.() ?? 'unknown');
    }
  }
  return `cli:${user}`;
}
