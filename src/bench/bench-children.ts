// Starting, talking to and stopping the bench's child processes: the discard servers (sink and
// ceilings) and the load workers. Every wait has a timeout; every child is ended by its own pid.
import { type ChildProcess, fork } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type {
  DiscardServerOptions,
  DiscardStats,
  FromDiscardServer,
  FromLoadWorker,
  LoadResult,
  LoadScenario,
  ToDiscardServer,
  ToLoadWorker,
} from './bench-ipc.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** Forks a compiled bench module (dist/bench/<name>.js) with an IPC channel; its stderr is kept for errors. */
function forkBenchModule(name: string, args: string[] = [], execArgv: string[] = []): { child: ChildProcess; stderr: () => string } {
  const child = fork(path.join(here, `${name}.js`), args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], execArgv });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    if (stderr.length < 20_000) stderr += chunk.toString();
  });
  return { child, stderr: () => stderr };
}

/**
 * Resolves with the first IPC message that `accept` returns a value for; rejects when it returns
 * an Error, when the child exits first, or on timeout.
 */
function waitForMessage<M, T>(child: ChildProcess, accept: (m: M) => T | Error | undefined, timeoutMs: number, what: string, stderr: () => string): Promise<T> {
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      child.off('message', onMessage);
      child.off('exit', onExit);
    };
    const onMessage = (m: M) => {
      const value = accept(m);
      if (value === undefined) return;
      cleanup();
      if (value instanceof Error) reject(value);
      else resolve(value);
    };
    const onExit = (code: number | null) => {
      cleanup();
      reject(new Error(`${what}: child exited (${code}) ${stderr().trim().slice(-2000)}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`${what}: no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    child.on('message', onMessage);
    child.once('exit', onExit);
  });
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the child has exited. */
export function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

export interface DiscardServer {
  role: string;
  pid: number;
  port: number;
  stats(): Promise<DiscardStats>;
  /** SIGSTOP: connections to it hang before the greeting (its stats() would too) until resume(). */
  pause(): void;
  resume(): void;
  stop(): Promise<void>;
}

export async function startDiscardServer(options: DiscardServerOptions): Promise<DiscardServer> {
  const { child, stderr } = forkBenchModule('discard-server', [JSON.stringify(options)]);
  const port = await waitForMessage<FromDiscardServer, number>(
    child,
    (m) => (m.type === 'listening' ? m.port : undefined),
    15_000,
    `${options.role} start`,
    stderr,
  );
  return {
    role: options.role,
    pid: child.pid!,
    port,
    async stats() {
      const answer = waitForMessage<FromDiscardServer, DiscardStats>(
        child,
        (m) => (m.type === 'stats' ? { messages: m.messages, bytes: m.bytes, lastAt: m.lastAt } : undefined),
        10_000,
        `${options.role} stats`,
        stderr,
      );
      child.send({ type: 'stats' } satisfies ToDiscardServer);
      return answer;
    },
    pause: () => void child.kill('SIGSTOP'),
    resume: () => void child.kill('SIGCONT'),
    stop: () => {
      child.kill('SIGCONT');
      return stopChild(child);
    },
  };
}

export interface LoadRunHooks {
  /** Called when the first worker's measurement window opens and when it closes. */
  onWindowStart?: () => void;
  onWindowEnd?: () => void;
}

/**
 * Runs a scenario on `workers` load processes, splitting the concurrency between them, and
 * merges their results (counts add up, latency samples are pooled, CPU adds up).
 */
export async function runLoad(scenario: LoadScenario, workers: number, hooks: LoadRunHooks = {}): Promise<LoadResult> {
  const n = Math.max(1, Math.min(workers, scenario.concurrency));
  const shares = Array.from({ length: n }, (_, i) => Math.floor(scenario.concurrency / n) + (i < scenario.concurrency % n ? 1 : 0));
  const limitMs = scenario.warmupMs + scenario.durationMs + 120_000;
  let windowStarted = false;
  let windowEnded = false;
  const results = await Promise.all(
    shares.map((concurrency, i) => {
      const { child, stderr } = forkBenchModule('load-worker');
      const share: LoadScenario = {
        ...scenario,
        concurrency,
        maxMessages: Math.ceil(scenario.maxMessages / n),
        // Each worker gets its own source addresses so the connections do not compete for ports.
        localAddresses: scenario.localAddresses.filter((_, j) => j % n === i),
      };
      const done = waitForMessage<FromLoadWorker, LoadResult>(
        child,
        (m) => {
          if (m.type === 'window-start' && !windowStarted) {
            windowStarted = true;
            hooks.onWindowStart?.();
          } else if (m.type === 'window-end' && !windowEnded) {
            windowEnded = true;
            hooks.onWindowEnd?.();
          } else if (m.type === 'failed') {
            return new Error(`load worker failed: ${m.error}`);
          } else if (m.type === 'result') {
            const { type: _t, ...result } = m;
            return result;
          }
          return undefined;
        },
        limitMs,
        'load worker',
        stderr,
      );
      child.send({ type: 'run', scenario: share } satisfies ToLoadWorker);
      return done.finally(() => stopChild(child, 1000));
    }),
  );
  return {
    accepted: sum(results.map((r) => r.accepted)),
    measured: sum(results.map((r) => r.measured)),
    windowMs: scenario.durationMs,
    errors: sum(results.map((r) => r.errors)),
    firstErrors: results.flatMap((r) => r.firstErrors).slice(0, 5),
    transactionMs: results.flatMap((r) => r.transactionMs),
    sessionMs: results.flatMap((r) => r.sessionMs),
    cpuCores: sum(results.map((r) => r.cpuCores)),
  };
}

function sum(values: number[]): number {
  return values.reduce((a, b) => a + b, 0);
}
