// Starts a real Postern in this process on loopback ports chosen by the OS, with its own data
// directory and a log file the test can read back.
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { hashPassword } from '../../src/accounts/password.js';
import { parseConfigText } from '../../src/config/load-config.js';
import { tempDir } from './temp-dir.js';
import type { ListenerKind } from '../../src/intake/intake.js';
import { createLogger } from '../../src/observe/logger.js';
import { type Postern, startPostern } from '../../src/postern.js';

export interface TestPostern {
  dir: string;
  postern: Postern;
  port(kind: ListenerKind): number;
  logs(): Record<string, unknown>[];
  addAccount(address: string, password: string, options?: { smtpAuth?: boolean; enabled?: boolean }): Promise<void>;
  stop(): Promise<void>;
}

export { tempDir };

/** Config text with every listener on an ephemeral loopback port; `extra` is appended as is. */
export function testConfigText(dir: string, extra = ''): string {
  return `hostname = "relay.example.test"
data_dir = ${JSON.stringify(dir)}

[listen]
submission = "127.0.0.1:0"
smtps = "127.0.0.1:0"
relay = "127.0.0.1:0"

[queue]
first_retry = "1s"
max_retry_interval = "2s"

[[connector]]
name = "loopback"
networks = ["127.0.0.0/8"]
${extra}`;
}

export async function startTestPostern(options: { extra?: string; text?: string; dir?: string } = {}): Promise<TestPostern> {
  const dir = options.dir ?? tempDir();
  const file = path.join(dir, 'postern.toml');
  fs.writeFileSync(file, options.text ?? testConfigText(dir, options.extra));
  const config = parseConfigText(fs.readFileSync(file, 'utf8'), file);
  const logFile = path.join(dir, 'postern.log');
  const logger = createLogger({ level: 'debug', destination: pino.destination({ dest: logFile, sync: true }) });
  const postern = await startPostern(config, logger, { stopGraceMs: 2000 });
  return {
    dir,
    postern,
    port(kind) {
      const l = postern.listeners.find((x) => x.kind === kind);
      if (!l) throw new Error(`no ${kind} listener`);
      return l.port;
    },
    logs() {
      return fs
        .readFileSync(logFile, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    },
    async addAccount(address, password, opts = {}) {
      await postern.store.createAccount({ address, passwordHash: await hashPassword(password), ...opts });
    },
    stop: () => postern.stop(),
  };
}
