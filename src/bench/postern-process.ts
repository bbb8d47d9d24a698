// Postern under test, as a child process started the way an operator starts it:
// `node bin/postern.js serve --config <tmp>/postern.toml`. A child of its own so that its RSS and
// CPU time can be read from /proc and are not mixed with the load generator's.
//
// Its JSON log lines (stdout) go to a file, as they would to journald: the bench does not spend
// its own CPU reading them. The listening ports come from the start-up summary (stderr), or
// from the {"event":"listening"} lines in that file.
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { BENCH_DOMAIN } from './bench-message.js';
import { stopChild } from './bench-children.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(repoRoot, 'bin', 'postern.js');

export interface PosternSettings {
  dir: string;
  certFile: string;
  keyFile: string;
  sinkPort: number;
  maxMessageSize: number;
  /** Extra node flags for the child, e.g. --cpu-prof. */
  nodeArgs: string[];
  /** POSTERN_LOG_LEVEL for the child; undefined keeps the config's (info). */
  logLevel?: string;
  /**
   * true: policy enforced (as in production) with sending limits far above what the bench sends,
   * so their bookkeeping is measured but never refuses. false: `[policy] enforce = false`.
   */
  enforcePolicy: boolean;
  /** TOML appended to the configuration (the upstream bench's [[upstream]]). */
  extraConfig?: string;
}

/** The bench configuration: loopback listeners, the bench domain routed to the sink, high connection caps. */
export function benchConfigText(s: PosternSettings): string {
  return `# Written by the Postern benchmark (src/bench); removed with its temp directory.
hostname = "postern.bench.test"
data_dir = ${JSON.stringify(path.join(s.dir, 'data'))}

[listen]
submission = "127.0.0.1:0"
relay = "127.0.0.1:0"

[tls]
cert = ${JSON.stringify(s.certFile)}
key = ${JSON.stringify(s.keyFile)}

[limits]
max_message_size = ${s.maxMessageSize}
# 1,000 idle connections from one address: above the defaults (1000 and 50).
max_connections = 5000
max_connections_per_ip = 2000
# One account sends everything at up to 50 sessions: far above Office 365's 30/min and 3
# connections, so the limits are checked (and cost what they cost) but never refuse.
messages_per_minute = 1000000000
recipients_per_day = 1000000000
connections_per_account = 5000

[policy]
enforce = ${s.enforcePolicy}

# Every bench recipient goes to the loopback sink, which offers no STARTTLS: delivery is cleartext.
[[route]]
domains = [${JSON.stringify(BENCH_DOMAIN)}]
host = "127.0.0.1"
port = ${s.sinkPort}
tls = "none"

[[connector]]
name = "bench-loopback"
networks = ["127.0.0.0/8"]
${s.extraConfig ?? ''}`;
}

export class PosternProcess {
  readonly child: ChildProcess;
  readonly ports: { submission: number; relay: number };
  readonly logFile: string;

  private constructor(child: ChildProcess, ports: { submission: number; relay: number }, logFile: string) {
    this.child = child;
    this.ports = ports;
    this.logFile = logFile;
  }

  get pid(): number {
    return this.child.pid!;
  }

  static async start(s: PosternSettings, account: { user: string; pass: string }): Promise<PosternProcess> {
    const configFile = path.join(s.dir, 'postern.toml');
    fs.writeFileSync(configFile, benchConfigText(s));
    await addAccount(configFile, account);

    const logFile = path.join(s.dir, 'postern.log');
    const { child, summary } = await spawnServe({
      configFile,
      logFile,
      logLevel: s.logLevel,
      nodeArgs: s.nodeArgs,
      ready: (stderr) => stderr.includes('Postern ready'),
    });
    try {
      const ports = portsFromSummary(summary) ?? (await listeningPorts(logFile));
      return new PosternProcess(child, ports, logFile);
    } catch (err) {
      await stopChild(child, 2000);
      throw err;
    }
  }

  /** SIGTERM and wait (Postern gives sessions and deliveries up to 10 s), then SIGKILL. */
  stop(): Promise<void> {
    return stopChild(this.child, 30_000);
  }
}

async function addAccount(configFile: string, account: { user: string; pass: string }): Promise<void> {
  const child = spawn(process.execPath, [bin, '--config', configFile, 'account', 'add', account.user, '--password-stdin'], {
    cwd: repoRoot,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (output += c.toString()));
  child.stdin!.end(`${account.pass}\n`);
  const code = await new Promise<number | null>((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.once('exit', (c) => {
      clearTimeout(timer);
      resolve(c);
    });
  });
  if (code !== 0) throw new Error(`postern account add failed (${code}): ${output.trim()}`);
}

/**
 * Starts `node bin/postern.js serve --config <configFile>` as an operator would, its JSON log lines
 * (stdout) appended to `logFile`, and resolves once its start-up summary (stderr) satisfies
 * `ready`, with the summary. Shared by the bench and the soak (src/soak/soak-postern.ts).
 */
export async function spawnServe(o: {
  configFile: string;
  logFile: string;
  /** POSTERN_LOG_LEVEL; undefined keeps the config's. */
  logLevel?: string;
  nodeArgs?: string[];
  ready: (stderr: string) => boolean;
}): Promise<{ child: ChildProcess; summary: string }> {
  const logFd = fs.openSync(o.logFile, 'a');
  const env = { ...process.env };
  if (o.logLevel) env.POSTERN_LOG_LEVEL = o.logLevel;
  else delete env.POSTERN_LOG_LEVEL;
  const child = spawn(process.execPath, [...(o.nodeArgs ?? []), bin, 'serve', '--config', o.configFile], {
    cwd: repoRoot,
    env,
    stdio: ['ignore', logFd, 'pipe'],
  });
  fs.closeSync(logFd);
  // Postern has no IPC channel to notice its parent going away: should the parent die without
  // its cleanup running, take Postern with it rather than leave it listening.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  child.once('exit', () => process.off('exit', killOnExit));
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    if (stderr.length < 50_000) stderr += chunk.toString();
  });
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`Postern was not ready within 60 s:\n${stderr}`)), 60_000);
      const onData = () => {
        if (!o.ready(stderr)) return;
        clearTimeout(timer);
        child.stderr!.off('data', onData);
        child.off('exit', onExit);
        resolve();
      };
      const onExit = (code: number | null) => {
        clearTimeout(timer);
        reject(new Error(`Postern exited (${code}) before it was ready:\n${stderr}`));
      };
      child.stderr!.on('data', onData);
      child.once('exit', onExit);
    });
  } catch (err) {
    child.kill('SIGKILL');
    throw err;
  }
  return { child, summary: stderr };
}

/**
 * The submission and relay ports from the start-up summary on stderr ("  submission  127.0.0.1:41234
 * ..."), which is printed at every log level; undefined when the summary does not show both.
 */
function portsFromSummary(summary: string): { submission: number; relay: number } | undefined {
  const port = (kind: string) => Number(new RegExp(`^\\s+${kind}\\s+127\\.0\\.0\\.1:(\\d+)\\s`, 'm').exec(summary)?.[1] ?? 0);
  const submission = port('submission');
  const relay = port('relay');
  return submission && relay ? { submission, relay } : undefined;
}

/** The submission and relay ports, from the {"event":"listening"} log lines (info level). */
async function listeningPorts(logFile: string): Promise<{ submission: number; relay: number }> {
  const found: Record<string, number> = {};
  for (let i = 0; i < 100; i++) {
    for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
      if (!line.includes('"listening"')) continue;
      try {
        const entry = JSON.parse(line) as { event?: string; listener?: string; port?: number };
        if (entry.event === 'listening' && entry.listener && entry.port) found[entry.listener] = entry.port;
      } catch {
        // a line still being written
      }
    }
    if (found.submission && found.relay) return { submission: found.submission, relay: found.relay };
    await sleep(100);
  }
  throw new Error(`no "listening" log lines for submission and relay in ${logFile}`);
}
