// "A message that got 250 is never lost": Postern runs as its own process under a steady load and
// is killed with SIGKILL at random moments (mid-DATA, right after 250, mid-delivery), restarted
// on the same data directory, and killed again. At the end every Message-ID that got a 250 must
// have reached the sink. Duplicates are allowed (a delivery cut after the remote's 250 is retried)
// and are counted.
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
import { killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';

const ROUNDS = 3;
const WORKERS = 6;

let child: ChildProcess | undefined;
afterAll(() => killAllServeProcesses());

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function startServer(dir: string): Promise<ChildProcess> {
  const server = await startServeProcess({ cwd: dir, args: ['--config', path.join(dir, 'postern.toml')], env: { POSTERN_LOG_LEVEL: 'warn' } });
  return server.child;
}

function messageIdOf(text: string): string | undefined {
  return /^Message-ID: (<[^>]+>)/im.exec(text)?.[1];
}

describe('crash safety (kill -9)', () => {
  it('delivers every message that got 250 across repeated SIGKILLs', { timeout: 180_000 }, async () => {
    const sink = await SinkServer.start({ behaviour: { dataDelayMs: 3 } });
    const dir = tempDir('postern-crash-');
    const relayPort = await freePort();
    fs.writeFileSync(
      path.join(dir, 'postern.toml'),
      `hostname = "relay.example.test"
data_dir = "./data"

[listen]
relay = "127.0.0.1:${relayPort}"

[limits]
max_connections_per_ip = 500
# A load test: far above the 30 messages a minute a device gets by default.
messages_per_minute = 1000000
recipients_per_day = 100000000

[queue]
first_retry = "1s"
max_retry_interval = "2s"

[[route]]
domains = ["crash.test"]
host = "127.0.0.1"
port = ${sink.port}
tls = "none"

[[connector]]
name = "loopback"
networks = ["127.0.0.0/8"]
`,
    );

    const acked = new Set<string>();
    let attempted = 0;
    let serial = 0;
    let loadRunning = true;
    const worker = async (w: number) => {
      // Bounded: at most 2,000 attempts per worker, and only while the test says so.
      for (let i = 0; loadRunning && i < 2000; i++) {
        const id = `<crash-${w}-${serial++}@test.example>`;
        const transport = nodemailer.createTransport({ host: '127.0.0.1', port: relayPort, ignoreTLS: true, connectionTimeout: 2000 });
        attempted++;
        try {
          const size = i % 10 === 0 ? 200_000 : 2_000;
          await transport.sendMail({
            envelope: { from: 'load@crash.test', to: [`r${i % 3}@crash.test`, `s${i % 5}@crash.test`] },
            raw: `Message-ID: ${id}\r\nSubject: load ${i}\r\n\r\n${'x'.repeat(size)}\r\n`,
          });
          acked.add(id);
        } catch {
          // No 250: the server was down or died mid-transaction; the message may or may not arrive.
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    };

    child = await startServer(dir);
    const load = Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
    let kills = 0;
    for (let round = 0; round < ROUNDS; round++) {
      await new Promise((r) => setTimeout(r, 400 + Math.floor(Math.random() * 800)));
      child.kill('SIGKILL');
      await new Promise((r) => child!.once('exit', r));
      kills++;
      await new Promise((r) => setTimeout(r, 100));
      child = await startServer(dir);
    }
    await new Promise((r) => setTimeout(r, 500));
    loadRunning = false;
    await load;

    // Everything acknowledged must arrive; give the queue time to drain.
    const received = () => sink.messages.map((m) => messageIdOf(m.text)).filter((x): x is string => !!x);
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline && [...acked].some((id) => !received().includes(id))) {
      await new Promise((r) => setTimeout(r, 200));
    }
    child.kill('SIGTERM');
    await new Promise((r) => child!.once('exit', r));
    child = undefined;
    await sink.close();

    const got = received();
    const counts = new Map<string, number>();
    for (const id of got) counts.set(id, (counts.get(id) ?? 0) + 1);
    const missing = [...acked].filter((id) => !counts.has(id));
    // A message goes to two recipients, possibly in two transactions: count per transaction.
    const duplicates = sink.messages.length - new Set(sink.messages.map((m) => `${messageIdOf(m.text)} ${m.to.join(',')}`)).size;
    console.log(
      `crash test: ${kills} SIGKILLs, ${attempted} attempted, ${acked.size} got 250, ${counts.size} distinct Message-IDs delivered, ${duplicates} duplicate deliveries, ${missing.length} missing`,
    );
    expect(kills).toBe(ROUNDS);
    expect(acked.size).toBeGreaterThan(50);
    expect(missing).toEqual([]);
  });
});
