// `postern serve` as its own process, the way an administrator runs it: for the CLI, lifecycle and
// crash tests, which need signals, exit codes and a process that can die.
import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';

export const BIN = path.resolve('bin/postern.js');

export interface ServeProcess {
  child: ChildProcess;
  /** Ports by listener name, from the start-up summary (same stream as "Postern ready"). */
  ports: Record<string, number>;
  stderr(): string;
  stdout(): string;
  /** Sends SIGTERM and resolves with the exit code. */
  stop(): Promise<number | null>;
}

const running = new Set<ChildProcess>();

/** Kills whatever a test left running (call from afterAll). */
export function killAllServeProcesses(): void {
  for (const c of running) c.kill('SIGKILL');
  running.clear();
}

export async function startServeProcess(options: {
  cwd: string;
  args?: string[];
  env?: Record<string, string>;
  /** Wrap the command, e.g. ['setpriv', '--bounding-set=-net_bind_service']. */
  prefix?: string[];
}): Promise<ServeProcess> {
  const argv = [...(options.prefix ?? []), process.execPath, BIN, 'serve', ...(options.args ?? [])];
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: options.cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...options.env },
  });
  running.add(child);
  child.once('exit', () => running.delete(child));
  let out = '';
  let err = '';
  const ports: Record<string, number> = {};
  child.stdout!.on('data', (d) => (out += d));
  await new Promise<void>((resolve, reject) => {
    child.stderr!.on('data', (d) => {
      err += d;
      // The summary is written in one piece; wait for its last line.
      if (!/Postern ready[\s\S]*\n {2}delivery /.test(err)) return;
      for (const m of err.matchAll(/^ {2}(submission|smtps|relay) +\S+:(\d+) /gm)) ports[m[1]!] = Number(m[2]);
      resolve();
    });
    child.once('exit', (code) => reject(new Error(`postern serve exited with ${code}: ${err}`)));
  });
  return {
    child,
    ports,
    stderr: () => err,
    stdout: () => out,
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve(child.exitCode);
        child.once('exit', (code) => resolve(code));
        child.kill('SIGTERM');
      }),
  };
}
