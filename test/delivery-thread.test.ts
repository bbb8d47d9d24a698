// `[delivery] thread = true`: `postern serve` runs the queue runner in a worker thread
// (src/queue/delivery-thread.ts). The thread needs the compiled code, so this runs the real
// `postern serve`: mail queued on the relay port reaches the sink, the worker's log lines come out
// whole on the server's stdout, a configuration error found by the worker stops start-up as one
// (exit code 2), and SIGTERM stops the thread and the store cleanly.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
import { BIN, killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { sinkRouteToml } from './helpers/postern-harness.js';
import { SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

afterAll(() => killAllServeProcesses());

function configText(sinkPort: number, extra = ''): string {
  return `hostname = "relay.example.test"
data_dir = "./data"

[listen]
relay = "127.0.0.1:0"

[delivery]
thread = true

${sinkRouteToml('thread.test', sinkPort)}${extra}`;
}

describe('delivery in a worker thread', () => {
  it('delivers, logs from the thread, and stops cleanly', async () => {
    const sink = await SinkServer.start();
    const dir = tempDir('postern-thread-');
    fs.writeFileSync(path.join(dir, 'postern.toml'), configText(sink.port));
    const server = await startServeProcess({ cwd: dir, args: ['--config', path.join(dir, 'postern.toml')] });
    try {
      const transport = nodemailer.createTransport({ host: '127.0.0.1', port: server.ports.relay!, ignoreTLS: true });
      for (let i = 0; i < 5; i++) {
        await transport.sendMail({ envelope: { from: 'cam@thread.test', to: [`inbox${i}@thread.test`] }, raw: `Message-ID: <t${i}@thread.test>\r\nSubject: ${i}\r\n\r\nhello\r\n` });
      }
      await sink.waitForMessages(5, 15_000);
      expect(sink.messages.map((m) => m.to[0]).sort()).toEqual([0, 1, 2, 3, 4].map((i) => `inbox${i}@thread.test`));
      // Every stdout line is a whole JSON object, the thread's included.
      const lines = await waitFor(() => {
        const parsed = server
          .stdout()
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as Record<string, unknown>);
        return parsed.filter((l) => l.event === 'delivered').length >= 5 && parsed;
      }, 10_000, 'five delivered log lines');
      expect(lines.filter((l) => l.event === 'delivered').every((l) => l.thread === 'delivery')).toBe(true);
    } finally {
      expect(await server.stop()).toBe(0);
      await sink.close();
    }
    const stopped = server.stdout().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(stopped.at(-1)?.event).toBe('stopped');
  });

  it('runs the delivery thread at nice 10 and the rest of the process at 0; "normal" leaves all at 0', async () => {
    /** Nice value of each thread of the process (field 19 of /proc/PID/task/TID/stat). */
    const niceByThread = (pid: number) =>
      fs.readdirSync(`/proc/${pid}/task`).map((tid) => {
        const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
        return { tid: Number(tid), nice: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]) };
      });
    for (const priority of ['low', 'normal']) {
      const dir = tempDir('postern-thread-');
      fs.writeFileSync(path.join(dir, 'postern.toml'), configText(25, '').replace('thread = true', `thread = true\nthread_priority = "${priority}"`));
      const server = await startServeProcess({ cwd: dir, args: ['--config', path.join(dir, 'postern.toml')] });
      try {
        const pid = server.child.pid!;
        const threads = niceByThread(pid);
        expect(threads.find((t) => t.tid === pid)?.nice).toBe(0);
        // The worker thread alone: V8's and libuv's helper threads keep the process's priority.
        expect(threads.filter((t) => t.nice !== 0).map((t) => t.nice)).toEqual(priority === 'low' ? [10] : []);
      } finally {
        expect(await server.stop()).toBe(0);
      }
    }
  });

  it('stops start-up with exit code 2 when the thread finds a configuration error', () => {
    const dir = tempDir('postern-thread-');
    const file = path.join(dir, 'postern.toml');
    fs.writeFileSync(
      file,
      configText(25, `
[[upstream]]
name = "isp"
type = "smtp"
host = "127.0.0.1"
username = "relay@example.net"
password_file = "missing.pass"
`),
    );
    const r = spawnSync(process.execPath, [BIN, 'serve', '--config', file], { cwd: dir, encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`${file}: invalid configuration\n  - upstream "isp": cannot read password_file ${path.join(dir, 'missing.pass')}: no such file (ENOENT)`);
    expect(r.stderr).not.toContain('Postern ready');
  });
});
