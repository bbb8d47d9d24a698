// Postern under soak, started the way an operator starts it: `postern account add`, then
// `node bin/postern.js serve --config <dir>/postern.toml`, a child process of its own so that its
// RSS and open files can be read from /proc/<pid>. Its JSON log goes to a file (as it would to
// journald); the submission port comes from the start-up summary on stderr.
//
// What the soak reads about it: VmRSS (/proc/<pid>/status), the open file descriptors
// (/proc/<pid>/fd, by kind), CPU time, and the queue (`postern queue list --json`, the operator's
// view, which works while the server runs).
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnServe } from '../bench/postern-process.js';
import { readCpuSeconds } from '../bench/proc-stats.js';
import { DESTINATIONS, SOAK_SENDER, SOAK_SENDER_DOMAIN } from './soak-mix.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(repoRoot, 'bin', 'postern.js');

export interface SoakPosternSettings {
  dir: string;
  ports: { normal: number; flaky: number; slow: number };
  queue: { firstRetry: string; maxRetryInterval: string; lifetime: string };
  perDestination: number;
  /** POSTERN_LOG_LEVEL; undefined keeps the config's (info). */
  logLevel?: string;
}

export function soakConfigText(s: SoakPosternSettings): string {
  return `# Written by the Postern soak (src/soak).
hostname = "postern.soak.test"
data_dir = ${JSON.stringify(path.join(s.dir, 'data'))}

# Only the submission port (STARTTLS, then AUTH), on loopback. Postern generates its certificate.
[listen]
submission = "127.0.0.1:0"

[limits]
# One account sends everything: far above Office 365's 30 messages a minute and 3 connections,
# so the policy runs (and costs what it costs) but never refuses.
messages_per_minute = 1000000000
recipients_per_day = 1000000000
connections_per_account = 100

# Short retries, so deferred recipients settle within the run (the flaky sink accepts a defer-*
# recipient after a few 451s).
[queue]
first_retry = ${JSON.stringify(s.queue.firstRetry)}
max_retry_interval = ${JSON.stringify(s.queue.maxRetryInterval)}
lifetime = ${JSON.stringify(s.queue.lifetime)}

# Raised from 10: the slow sink holds a connection 2 to 5 s per message.
[delivery]
per_destination = ${s.perDestination}

# The normal sink offers STARTTLS (opportunistic TLS, the default) and takes the bounces too.
[[route]]
domains = [${JSON.stringify(DESTINATIONS.normal)}, ${JSON.stringify(SOAK_SENDER_DOMAIN)}]
host = "127.0.0.1"
port = ${s.ports.normal}

[[route]]
domains = [${JSON.stringify(DESTINATIONS.flaky)}]
host = "127.0.0.1"
port = ${s.ports.flaky}
tls = "none"

[[route]]
domains = [${JSON.stringify(DESTINATIONS.slow)}]
host = "127.0.0.1"
port = ${s.ports.slow}
tls = "none"
`;
}

export interface FdReading {
  total: number;
  sockets: number;
  /** Regular files and directories. */
  files: number;
  /** Pipes, eventfds, epoll and other anonymous inodes. */
  other: number;
}

export interface MemoryReading {
  rss: number;
  anon: number;
  /** File-backed and shared pages (RssFile + RssShmem). */
  file: number;
}

export interface QueueStatus {
  messages: number;
  queued: number;
  inFlight: number;
  deferred: number;
}

export class SoakPostern {
  readonly child: ChildProcess;
  readonly submissionPort: number;
  readonly configFile: string;
  readonly logFile: string;
  readonly dataDir: string;
  #exit: Promise<number | null>;

  private constructor(child: ChildProcess, submissionPort: number, configFile: string, logFile: string, dataDir: string) {
    this.child = child;
    this.submissionPort = submissionPort;
    this.configFile = configFile;
    this.logFile = logFile;
    this.dataDir = dataDir;
    this.#exit = new Promise((resolve) => {
      if (child.exitCode !== null) resolve(child.exitCode);
      else child.once('exit', (code) => resolve(code));
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  static async start(s: SoakPosternSettings, password: string): Promise<SoakPostern> {
    const configFile = path.join(s.dir, 'postern.toml');
    fs.writeFileSync(configFile, soakConfigText(s));
    const added = await runCli(configFile, ['account', 'add', SOAK_SENDER, '--password-stdin'], `${password}\n`);
    if (added.code !== 0) throw new Error(`postern account add failed (${added.code}): ${added.output.trim()}`);

    const logFile = path.join(s.dir, 'postern.log');
    const { child, summary } = await spawnServe({
      configFile,
      logFile,
      logLevel: s.logLevel,
      ready: (stderr) => /Postern ready[\s\S]*\n {2}delivery /.test(stderr),
    });
    const m = /^ {2}submission +127\.0\.0\.1:(\d+) /m.exec(summary);
    if (!m) {
      child.kill('SIGKILL');
      throw new Error(`no submission port in Postern's summary:\n${summary}`);
    }
    return new SoakPostern(child, Number(m[1]), configFile, logFile, path.join(s.dir, 'data'));
  }

  /**
   * VmRSS and its parts from /proc/<pid>/status, bytes (0 once the process is gone): anonymous
   * memory (the JS heap, malloc, buffers) and file-backed pages (code, mapped files).
   */
  memory(): MemoryReading {
    let text: string;
    try {
      text = fs.readFileSync(`/proc/${this.pid}/status`, 'utf8');
    } catch {
      return { rss: 0, anon: 0, file: 0 };
    }
    const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
    return { rss: kb('VmRSS'), anon: kb('RssAnon'), file: kb('RssFile') + kb('RssShmem') };
  }

  cpuSeconds(): number {
    return readCpuSeconds(this.pid).total;
  }

  fds(): FdReading {
    const dir = `/proc/${this.pid}/fd`;
    const reading: FdReading = { total: 0, sockets: 0, files: 0, other: 0 };
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch {
      return reading;
    }
    for (const name of names) {
      let target: string;
      try {
        target = fs.readlinkSync(`${dir}/${name}`);
      } catch {
        continue; // closed between readdir and readlink
      }
      reading.total++;
      if (target.startsWith('socket:')) reading.sockets++;
      else if (target.startsWith('/')) reading.files++;
      else reading.other++;
    }
    return reading;
  }

  /**
   * What each open descriptor points at, inode numbers dropped ("socket", "pipe",
   * "anon_inode:[eventfd]", "/path/to/file"): to name what a count that did not come back holds.
   */
  fdTargets(): string[] {
    const dir = `/proc/${this.pid}/fd`;
    const out: string[] = [];
    try {
      for (const name of fs.readdirSync(dir)) {
        try {
          out.push(fs.readlinkSync(`${dir}/${name}`).replace(/^(socket|pipe):\[\d+\]$/, '$1'));
        } catch {
          // closed meanwhile
        }
      }
    } catch {
      // the process is gone
    }
    return out.sort();
  }

  /** Files left in the spool directory (bodies too big to keep inline); 0 once the queue is empty. */
  spoolFiles(): number {
    try {
      return fs.readdirSync(path.join(this.dataDir, 'spool')).length;
    } catch {
      return 0;
    }
  }

  /** `postern queue list --json`: messages still queued and their pending recipients by state. */
  async queueStatus(): Promise<QueueStatus> {
    const { code, output } = await runCli(this.configFile, ['queue', 'list', '--json']);
    if (code !== 0) throw new Error(`postern queue list failed (${code}): ${output.trim()}`);
    const parsed = JSON.parse(output) as { messages: unknown[]; recipients: Record<string, number> };
    return {
      messages: parsed.messages.length,
      queued: parsed.recipients.queued ?? 0,
      inFlight: parsed.recipients.in_flight ?? 0,
      deferred: parsed.recipients.deferred ?? 0,
    };
  }

  /** SIGTERM; SIGKILL after `graceMs`. Resolves with the exit code (null when killed). */
  async stop(graceMs = 30_000): Promise<number | null> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
      this.child.kill('SIGTERM');
      await this.#exit;
      clearTimeout(timer);
    }
    return this.#exit;
  }
}

/** Runs `postern --config FILE ...args`, with `input` on stdin; 60 s at most. */
function runCli(configFile: string, args: string[], input = ''): Promise<{ code: number | null; output: string }> {
  const child = spawn(process.execPath, [bin, '--config', configFile, ...args], { cwd: repoRoot, stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  let errors = '';
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (errors += c.toString()));
  child.stdin!.end(input);
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, output: code === 0 ? output : `${output}${errors}` });
    });
  });
}
