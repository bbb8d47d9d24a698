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

/**
 * A `[[route]]` sending `domain` to a plain-text sink on 127.0.0.1:`port`, and the loopback
 * connector (so the relay port takes mail from the tests): the usual tail of a serve-process config.
 */
export function sinkRouteToml(domain: string, port: number): string {
  return `[[route]]
domains = ["${domain}"]
host = "127.0.0.1"
port = ${port}
tls = "none"

[[connector]]
name = "loopback"
networks = ["127.0.0.0/8"]
`;
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

export interface HeldQueueOptions {
  /** Replaces the submission listener line's value (e.g. a legacy table). */
  submission?: string;
  /** Networks of the single connector "loopback". */
  networks?: string[];
  /** Extra lines in [limits]. */
  limits?: string;
  /** No raised limits or lockout thresholds: the policy as shipped. */
  defaultPolicy?: boolean;
  /** Appended as is (e.g. connector options). */
  extra?: string;
}

/**
 * A Postern whose deliveries all go to a closed loopback port, retried only after an hour, so
 * everything intake accepted stays in the queue and the store shows exactly that. Unless
 * `defaultPolicy`, the sending limits and lockout thresholds are far out of the way, for tests
 * that hammer the intake.
 */
export function heldQueueConfigText(dir: string, o: HeldQueueOptions = {}): string {
  const policy = o.defaultPolicy
    ? ''
    : `messages_per_minute = 100000
recipients_per_day = 10000000
connections_per_account = 1000

[lockout]
account_failures = 100000
ip_failures = 100000
`;
  return `hostname = "relay.example.test"
data_dir = ${JSON.stringify(dir)}

[listen]
submission = ${o.submission ?? '"127.0.0.1:0"'}
smtps = "127.0.0.1:0"
relay = "127.0.0.1:0"

[limits]
${o.limits ?? ''}
${policy}
[queue]
first_retry = "1h"
max_retry_interval = "1h"

[[route]]
domains = ["*"]
host = "127.0.0.1"
port = 9
tls = "none"

[[connector]]
name = "loopback"
networks = ${JSON.stringify(o.networks ?? ['127.0.0.0/8'])}
${o.extra ?? ''}`;
}

/** Starts a held-queue Postern in its own temp dir with one account. */
export async function startHeldQueuePostern(
  account: { user: string; password: string },
  options: HeldQueueOptions = {},
  prefix = 'postern-held-',
): Promise<TestPostern> {
  const dir = tempDir(prefix);
  const p = await startTestPostern({ dir, text: heldQueueConfigText(dir, options) });
  await p.addAccount(account.user, account.password);
  return p;
}
