// "A message that got 250 is never lost" (issue 4, point 1): Postern runs as its own process under
// a steady load (8 clients, a new connection per message, two recipients each, a tenth of the
// bodies big enough to go to the spool file) and is killed with SIGKILL at chosen moments, each at
// least once per run, in a random order:
//
//   during DATA         raw clients are in the middle of sending a message's data (cut in the
//                       headers, in the middle of a spilled body, just before the final CRLF)
//   right after 250     the moment a load client has its 250
//   during delivery     the sink has a delivery's data and holds its reply
//   during store write  at a random moment of the steady load, when group commits run back to back
//   random              3 more kills at random moments
//
// Postern is restarted on the same data directory after each kill. At the end, for every message
// that got a 250, each of its recipients must have a copy at the sink; every copy at the sink of any
// message (250 or not) must be the bytes the client sent, behind Postern's Received header; and a
// duplicate is allowed only across a kill: no two copies of one message to one recipient may come
// from the same run of Postern (that would be a double claim without a crash).
import { type ChildProcess, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
import { RawSmtp, type Reply } from './helpers/raw-smtp.js';
import { sinkRouteToml } from './helpers/postern-harness.js';
import { BIN, killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { type ReceivedMessage, SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

const WORKERS = 8;
const RANDOM_KILLS = 3;
/** The sink's usual answer time, and how long it holds the delivery a kill is aimed at. */
const SINK_DELAY_MS = 3;
const HOLD_MS = 2000;
/** Acknowledged messages after each (re)start before the next kill: each run of Postern works. */
const ACKS_BETWEEN_KILLS = 40;

type KillPoint = 'during DATA' | 'right after 250' | 'during delivery' | 'during store write' | 'random';

interface Kill {
  point: KillPoint;
  /** Date.now() when SIGKILL was sent. */
  at: number;
  /** Date.now() just before the next process was spawned (see restart()). */
  restartAt: number;
  /** Date.now() when the next process said it was ready. */
  readyAt: number;
  detail: string;
}

afterAll(() => killAllServeProcesses());

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const execFileAsync = promisify(execFile);

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Resolves with `promise`, or rejects after `ms` (calling `cancel` first). */
async function within<T>(promise: Promise<T>, ms: number, what: string, cancel: () => void): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      cancel();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Printable text without CR or LF, some of it starting with a dot (dot-stuffing is exercised). */
const POOL = (() => {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-_=+/()<>@';
  let s = 0x9e3779b9;
  let out = '';
  for (let i = 0; i < 65_536; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out += alphabet[(s >>> 0) % alphabet.length];
  }
  return out;
})();

/**
 * A message as the client means it (before dot-stuffing): its own Message-ID and Date (so Postern
 * adds only its Received header) and `bodySize` bytes of lines that differ from message to message,
 * among them lines that are a lone dot or start with one.
 */
function messageBytes(id: string, bodySize: number): Buffer {
  let s = createHash('sha256').update(id).digest().readUInt32LE(0) || 1;
  const rand = (n: number) => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) % n;
  };
  const lines = [`Message-ID: ${id}`, 'Date: Mon, 01 Jun 2026 10:00:00 +0000', 'From: <load@crash.test>', `Subject: crash test ${id}`, ''];
  let size = 0;
  while (size < bodySize) {
    const kind = rand(100);
    const text = POOL.substr(rand(POOL.length - 200), 1 + rand(180));
    const line = kind < 3 ? '.' : kind < 10 ? `.${text}` : kind < 13 ? '' : text;
    lines.push(line);
    size += line.length + 2;
  }
  return Buffer.from(`${lines.join('\r\n')}\r\n`, 'latin1');
}

/** The bytes on the wire after DATA (RFC 5321 4.5.2), without the terminating ".\r\n". */
function dotStuffed(message: Buffer): Buffer {
  return Buffer.from(message.toString('latin1').replace(/^\./gm, '..'), 'latin1');
}

/** The Message-ID in the header block of a copy at the sink. */
function messageIdOf(raw: Buffer): string | undefined {
  const text = raw.toString('latin1');
  const end = text.indexOf('\r\n\r\n');
  return /^Message-ID: (<[^>]+>)/im.exec(end === -1 ? text : text.slice(0, end))?.[1];
}

function expectReply(reply: Reply, code: number, step: string): void {
  if (reply.code !== code) throw new Error(`${step}: expected ${code}, got ${reply.text}`);
}

describe('crash safety (kill -9)', () => {
  it('delivers every message that got 250, intact, across SIGKILLs at chosen and random points', { timeout: 120_000 }, async () => {
    const started = Date.now();
    const sink = await SinkServer.start({ behaviour: { dataDelayMs: SINK_DELAY_MS } });
    const dir = tempDir('postern-crash-');
    const relayPort = await freePort();
    const configPath = path.join(dir, 'postern.toml');
    fs.writeFileSync(
      configPath,
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

${sinkRouteToml('crash.test', sink.port)}`,
    );
    const startServer = async () =>
      (await startServeProcess({ cwd: dir, args: ['--config', configPath], env: { POSTERN_LOG_LEVEL: 'warn' } })).child;

    // What each client sent, by Message-ID: a fingerprint of the bytes and the envelope recipients.
    const sent = new Map<string, { sha: string; length: number; recipients: string[] }>();
    const remember = (id: string, bytes: Buffer, recipients: string[]) => sent.set(id, { sha: sha256(bytes), length: bytes.length, recipients });

    // ---- The load ----
    const acked = new Set<string>();
    let attempted = 0;
    /** Attempts refused at connect: no Postern was listening (between a kill and the restart). */
    let refused = 0;
    let loadRunning = true;
    /** Set by a kill point: called by the first load client to get a 250 afterwards. */
    let onAck: ((id: string) => void) | undefined;
    const worker = async (w: number) => {
      const transport = nodemailer.createTransport({
        host: '127.0.0.1',
        port: relayPort,
        ignoreTLS: true,
        connectionTimeout: 2000,
        greetingTimeout: 5000,
        socketTimeout: 15_000,
      });
      // Bounded: at most 3,000 attempts per worker, and only while the test says so.
      for (let i = 0; loadRunning && i < 3000; i++) {
        const id = `<load-${w}-${i}@crash.test>`;
        const recipients = [`r${i % 3}@crash.test`, `s${(i + w) % 5}@crash.test`];
        const bytes = messageBytes(id, i % 10 === 0 ? 150_000 + ((i * 7919) % 100_000) : 300 + ((i * 7919) % 4000));
        remember(id, bytes, recipients);
        attempted++;
        try {
          await transport.sendMail({ envelope: { from: 'load@crash.test', to: recipients }, raw: bytes });
        } catch (err) {
          // No 250: the server was down or died mid-transaction; the message may or may not arrive.
          if (String((err as Error).message).includes('ECONNREFUSED')) refused++;
          await sleep(20);
          continue;
        }
        acked.add(id);
        const hook = onAck;
        onAck = undefined;
        hook?.(id);
      }
      transport.close();
    };

    // ---- Kills and restarts ----
    // Runs of Postern are numbered from 0; run g starts at restarts[g - 1] (run 0 at the start).
    // restart() draws the line between two runs only once the killed process has provably stopped
    // talking to the sink: all its connections there are closed, and the sink handles a
    // connection's data before its close. So a copy whose receivedAt is before restarts[g - 1]
    // came from a run before g (possibly data the kernel still flushed from a killed process's
    // socket, i.e. a delivery the kill interrupted), and one after it from run g or later.
    const kills: Kill[] = [];
    const restarts: number[] = [];
    const runOf = (t: number) => restarts.filter((r) => r <= t).length;
    let acksAtRestart = 0;
    let child: ChildProcess = await startServer();

    const kill = (point: KillPoint, detail: string) => {
      child.kill('SIGKILL');
      kills.push({ point, at: Date.now(), restartAt: 0, readyAt: 0, detail });
    };
    const restart = async () => {
      const dead = child;
      if (dead.exitCode === null && dead.signalCode === null) await new Promise((r) => dead.once('exit', r));
      await waitFor(() => sink.openConnections === 0, 5000, "the killed process's connections to the sink to close");
      sink.behaviour.dataDelayMs = SINK_DELAY_MS;
      // A new millisecond: every copy from the killed run has receivedAt < restartAt, strictly.
      const last = Date.now();
      while (Date.now() <= last) await sleep(1);
      const restartAt = Date.now();
      restarts.push(restartAt);
      kills.at(-1)!.restartAt = restartAt;
      child = await startServer();
      kills.at(-1)!.readyAt = Date.now();
      acksAtRestart = acked.size;
    };

    // (a) Raw clients stop in the middle of their data: in the header block, in the middle of a
    // 300 KB body (already spilling to the spool file), and after the whole body but before the
    // terminator's final CRLF. None got a 250: each may or may not arrive, but never cut short.
    const partialIds: string[] = [];
    const killDuringData = async () => {
      const cuts = [
        { name: 'headers', size: 2_000, cut: () => 40 },
        { name: 'mid-body', size: 300_000, cut: (wire: Buffer) => Math.floor(wire.length / 2) },
        { name: 'before-final-crlf', size: 5_000, cut: (wire: Buffer) => wire.length - 2 },
      ];
      const clients: RawSmtp[] = [];
      try {
        for (const c of cuts) {
          const id = `<partial-${kills.length}-${c.name}@crash.test>`;
          const bytes = messageBytes(id, c.size);
          remember(id, bytes, ['partial@crash.test']);
          partialIds.push(id);
          const client = await RawSmtp.connect(relayPort);
          clients.push(client);
          expectReply(await client.read(), 220, 'greeting');
          expectReply(await client.command('EHLO crash.test'), 250, 'EHLO');
          expectReply(await client.command('MAIL FROM:<load@crash.test>'), 250, 'MAIL');
          expectReply(await client.command('RCPT TO:<partial@crash.test>'), 250, 'RCPT');
          expectReply(await client.command('DATA'), 354, 'DATA');
          const wire = Buffer.concat([dotStuffed(bytes), Buffer.from('.\r\n')]);
          client.write(wire.subarray(0, c.cut(wire)));
        }
        // Loopback: the bytes are in Postern's socket buffers at once; give it time to take them in.
        await sleep(200);
        kill('during DATA', `3 clients mid-DATA (${partialIds.slice(-3).join(' ')})`);
      } finally {
        for (const c of clients) c.destroy();
      }
    };

    // (b) The first load client to get a 250 kills Postern, synchronously in its continuation.
    const afterAckIds: string[] = [];
    const killRightAfter250 = async () => {
      const id = await within(
        new Promise<string>((resolve) => {
          onAck = (acknowledged) => {
            kill('right after 250', acknowledged);
            resolve(acknowledged);
          };
        }),
        15_000,
        'a 250 to a load client',
        () => (onAck = undefined),
      );
      afterAckIds.push(id);
    };

    // (c) The sink holds its reply to the next delivery it gets whole; Postern dies meanwhile.
    // It had no answer, so the recipients stay in_flight and the restart must deliver them again.
    const held: { id: string; to: string[]; run: number }[] = [];
    const killDuringDelivery = async () => {
      sink.behaviour.dataDelayMs = HOLD_MS; // put back by restart(), after the process is gone
      const message = await within(
        new Promise<ReceivedMessage>((resolve) => {
          sink.onDataComplete = (m) => {
            sink.onDataComplete = undefined;
            kill('during delivery', `${messageIdOf(m.raw)} to ${m.to.join(',')}`);
            resolve(m);
          };
        }),
        15_000,
        'a delivery to reach the sink',
        () => (sink.onDataComplete = undefined),
      );
      held.push({ id: messageIdOf(message.raw) ?? '(no Message-ID)', to: message.to, run: restarts.length });
    };

    // (d) There is no outside signal for "Postern is inside a store write", and none is added to
    // src/ for this test. In the steady state, though, the store writes all the time: every 250 is
    // preceded by a group commit (rows, inline bodies, the WAL fsync, spool files and their
    // directory fsync for big bodies), and every delivery claims and then records outcomes. So the
    // practical way to land in a write is a random moment inside that steady load. (Sampling
    // /proc/<pid>/task/*/syscall during this load found a thread of Postern inside an fsync of the
    // WAL, the database, a spool file or the spool directory in about 1 sample in 5; with the
    // random kills as well, most runs kill Postern at least once in the middle of a flush.)
    const killDuringStoreWrite = async () => {
      await waitFor(() => acked.size - acksAtRestart >= 2 * ACKS_BETWEEN_KILLS, 20_000, 'steady load');
      await sleep(Math.floor(Math.random() * 300));
      kill('during store write', `${acked.size - acksAtRestart} messages acknowledged since the restart`);
    };

    const killAtRandom = async () => {
      const wait = 200 + Math.floor(Math.random() * 1300);
      await sleep(wait);
      kill('random', `${wait} ms after the load resumed`);
    };

    const plan: KillPoint[] = ['during DATA', 'right after 250', 'during delivery', 'during store write', ...Array<KillPoint>(RANDOM_KILLS).fill('random')];
    for (let i = plan.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [plan[i], plan[j]] = [plan[j]!, plan[i]!];
    }
    const killers: Record<KillPoint, () => Promise<void>> = {
      'during DATA': killDuringData,
      'right after 250': killRightAfter250,
      'during delivery': killDuringDelivery,
      'during store write': killDuringStoreWrite,
      random: killAtRandom,
    };

    const load = Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
    for (const point of plan) {
      await waitFor(() => acked.size - acksAtRestart >= ACKS_BETWEEN_KILLS, 20_000, `the load to resume before the kill ${point}`);
      await killers[point]();
      await restart();
    }
    await sleep(500);
    loadRunning = false;
    await load;

    // ---- Drain: every acknowledged message delivered, then the queue empty ----
    const deliveredPairs = () => new Set(sink.messages.flatMap((m) => m.to.map((r) => `${messageIdOf(m.raw)} ${r}`)));
    const undelivered = () => {
      const pairs = deliveredPairs();
      return [...acked].filter((id) => sent.get(id)!.recipients.some((r) => !pairs.has(`${id} ${r}`)));
    };
    const queueLength = async () => {
      const { stdout } = await execFileAsync(process.execPath, [BIN, 'queue', 'list', '--json', '--config', configPath], { cwd: dir });
      return (JSON.parse(stdout) as { messages: unknown[] }).messages.length;
    };
    const deadline = Date.now() + 45_000;
    while (Date.now() < deadline && undelivered().length > 0) await sleep(200);
    let queued = await queueLength();
    while (Date.now() < deadline && queued > 0) {
      await sleep(300);
      queued = await queueLength();
    }
    const last = child;
    const stopped = new Promise<number | null>((r) => (last.exitCode !== null || last.signalCode !== null ? r(last.exitCode) : last.once('exit', (code) => r(code))));
    last.kill('SIGTERM');
    const exitCode = await stopped;
    await sink.close();

    // ---- Count and check ----
    const problems: string[] = [];
    const copies = new Map<string, { receivedAt: number; run: number }[]>();
    for (const m of sink.messages) {
      const id = messageIdOf(m.raw) ?? '(no Message-ID)';
      const expected = sent.get(id);
      const prefixLength = expected ? m.raw.length - expected.length : 0;
      const prefix = m.raw.subarray(0, Math.max(0, prefixLength)).toString('latin1');
      const problem = !expected
        ? 'not a message the test sent'
        : prefixLength <= 0
          ? `${m.raw.length} bytes, shorter than the ${expected.length} sent`
          : !/^Received: [^\r\n]+(?:\r\n[ \t][^\r\n]*)*\r\n$/.test(prefix)
            ? `not the bytes sent behind a Received header (${m.raw.length} bytes for ${expected.length} sent)`
            : sha256(m.raw.subarray(prefixLength)) !== expected.sha
              ? 'content differs from what was sent'
              : m.to.some((r) => !expected.recipients.includes(r))
                ? `recipients ${m.to.join(',')}, sent to ${expected.recipients.join(',')}`
                : undefined;
      if (problem) problems.push(`${id} to ${m.to.join(',')}: ${problem}`);
      for (const r of m.to) {
        const key = `${id} ${r}`;
        copies.set(key, [...(copies.get(key) ?? []), { receivedAt: m.receivedAt, run: runOf(m.receivedAt) }]);
      }
    }
    // A duplicate is explained when no two copies of one message to one recipient came from the
    // same run: then, copy by copy, the earlier one reached the sink before a kill (or as the
    // killed process's last bytes, flushed by the kernel) and the later one after the restart
    // that followed it, which is a delivery interrupted after the sink had it all. Two copies in
    // one run would be a double claim (or a retry of a delivery the sink accepted) without a crash.
    let duplicates = 0;
    const unexplained: string[] = [];
    /** Per kill: the copies made again after it (the earlier copy came from the run it ended). */
    const duplicatesByKill = kills.map(() => 0);
    for (const [key, list] of copies) {
      if (list.length < 2) continue;
      duplicates += list.length - 1;
      const sorted = [...list].sort((a, b) => a.receivedAt - b.receivedAt);
      for (let i = 1; i < sorted.length; i++) if (sorted[i - 1]!.run < kills.length) duplicatesByKill[sorted[i - 1]!.run]!++;
      const runs = list.map((c) => c.run);
      if (new Set(runs).size !== runs.length) {
        unexplained.push(`${key}: ${list.map((c) => `at ${c.receivedAt - started} ms (run ${c.run})`).join(', ')}`);
      }
    }
    const duplicatedIds = new Set([...copies].filter(([, list]) => list.length > 1).map(([key]) => key.slice(0, key.indexOf(' ')))).size;
    const missing = undelivered();
    const delivered = new Set([...copies.keys()].map((k) => k.slice(0, k.indexOf(' '))));
    const withoutAck = [...delivered].filter((id) => !acked.has(id)).length;
    const partialArrived = partialIds.filter((id) => delivered.has(id)).length;
    const notRedelivered = held.flatMap((h) =>
      h.to.filter((r) => !(copies.get(`${h.id} ${r}`) ?? []).some((c) => c.run > h.run)).map((r) => `${h.id} ${r} (held by the sink at kill, run ${h.run})`),
    );

    const figures =
      `${kills.length} SIGKILLs (${kills.map((k) => k.point).join(', ')}), ${attempted} attempted (${refused} refused while down), ${acked.size} got 250, ` +
      `${delivered.size} distinct Message-IDs delivered (${withoutAck} without a 250, ${partialArrived} of ${partialIds.length} cut mid-DATA), ` +
      `${duplicates} duplicate deliveries to a recipient (${duplicatedIds} Message-IDs; per kill: ${duplicatesByKill.join('+')}; ${unexplained.length} unexplained), ` +
      `${missing.length} missing, ` +
      `${queued} left in the queue, ${((Date.now() - started) / 1000).toFixed(1)} s`;
    console.log(`crash test: ${figures}`);
    const timeline = kills
      .map((k) => `${k.point} at ${k.at - started} ms, restart at ${k.restartAt - started} ms, ready at ${k.readyAt - started} ms: ${k.detail}`)
      .join('\n  ');
    const context = `${figures}\nkills:\n  ${timeline}`;

    expect(new Set(kills.map((k) => k.point)), context).toEqual(new Set<KillPoint>(['during DATA', 'right after 250', 'during delivery', 'during store write', 'random']));
    expect(kills.filter((k) => k.point === 'random').length, context).toBeGreaterThanOrEqual(2);
    expect(held.length, context).toBeGreaterThanOrEqual(1);
    // Guaranteed by the waits above (each kill waits for ACKS_BETWEEN_KILLS new 250s): hundreds.
    expect(acked.size, context).toBeGreaterThanOrEqual(plan.length * ACKS_BETWEEN_KILLS);
    expect(problems.slice(0, 20), `${context}\ncorrupt or unknown copies at the sink (${problems.length})`).toEqual([]);
    expect(missing.slice(0, 20), `${context}\nmissing after a 250 (${missing.length})`).toEqual([]);
    expect(afterAckIds.filter((id) => missing.includes(id)), `${context}\nthe message acknowledged right before a kill`).toEqual([]);
    expect(unexplained.slice(0, 20), `${context}\nduplicates not explained by a kill (${unexplained.length})`).toEqual([]);
    expect(notRedelivered, `${context}\ndeliveries cut by a kill, not made again after the restart`).toEqual([]);
    expect(queued, context).toBe(0);
    expect(exitCode, `${context}\nexit code after SIGTERM`).toBe(0);
  });
});
