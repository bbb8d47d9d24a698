// Disk full: Postern's data directory on a small tmpfs that fills up. New mail gets
// `452 4.3.1 Insufficient system storage`, at MAIL FROM while free space is under the reserve
// (limits.min_free_space) and at the end of DATA when the disk fills during the transaction or a
// write fails with ENOSPC / SQLITE_FULL; nothing half-written is left; mail already queued keeps
// being delivered; freeing space brings intake back without a restart; the store stays sound.
//
// Mounting a tmpfs needs root (as on the CI machine); elsewhere the file is skipped, saying why.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { sinkRouteToml, startTestPostern, type TestPostern } from './helpers/postern-harness.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

const MiB = 1024 * 1024;
const PASSWORD = 'correct horse battery staple';
const RESERVE = 2 * MiB;
const FULL_REPLY = '452 4.3.1 Insufficient system storage, try again later';
const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn('disk-full.test.ts skipped: mounting a tmpfs for the data directory needs root');

/** A tmpfs of `size` mounted on a fresh directory; unmounted by `unmountAll`. */
const mounts: string[] = [];
function mountTmpfs(size: string): string {
  const dir = tempDir('postern-tmpfs-');
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir]);
  mounts.push(dir);
  return dir;
}
function unmountAll(): void {
  for (const dir of mounts.splice(0)) {
    try {
      execFileSync('umount', [dir], { stdio: 'ignore' });
    } catch {
      // Still busy (a test failed with files open): detach it now, it goes when they close.
      execFileSync('umount', ['-l', dir], { stdio: 'ignore' });
    }
    fs.rmdirSync(dir);
  }
}

function available(dir: string): number {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
}

/** Grows `file` until the file system has `leave` bytes available (0: until not one byte fits). */
function fill(file: string, leave = 0): void {
  const fd = fs.openSync(file, 'a');
  try {
    for (const chunk of [MiB, 4096, 1]) {
      const buf = Buffer.alloc(chunk, 0x78);
      for (;;) {
        const room = available(path.dirname(file)) - leave;
        if (leave > 0 && room <= 0) return;
        const n = leave > 0 ? Math.min(chunk, room) : chunk;
        try {
          if (fs.writeSync(fd, buf, 0, n) < n) break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
          break;
        }
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

function message(id: string, bodyBytes: number): string {
  const line = `${'x'.repeat(76)}\r\n`;
  const body = line.repeat(Math.ceil(bodyBytes / line.length));
  return `Message-ID: <${id}@disk.test>\r\nSubject: ${id}\r\nFrom: app@disk.test\r\n\r\n${body}`;
}

/** A relay session (loopback connector) with MAIL and RCPT accepted, ready for DATA. */
async function transaction(port: number): Promise<RawSmtp> {
  const c = await RawSmtp.connect(port);
  await c.read();
  await c.command('EHLO app.local');
  expect((await c.command('MAIL FROM:<app@disk.test>')).code).toBe(250);
  expect((await c.command('RCPT TO:<inbox@disk.test>')).code).toBe(250);
  return c;
}

/** One whole message; resolves with the final reply's text. */
async function send(port: number, id: string, bodyBytes: number): Promise<string> {
  const c = await RawSmtp.connect(port);
  await c.read();
  await c.command('EHLO app.local');
  const mail = await c.command('MAIL FROM:<app@disk.test>');
  if (mail.code !== 250) {
    await c.quit();
    return mail.text;
  }
  expect((await c.command('RCPT TO:<inbox@disk.test>')).code).toBe(250);
  const reply = await c.data(message(id, bodyBytes));
  await c.quit();
  return reply.text;
}

function messageIdOf(text: string): string | undefined {
  return /^Message-ID: <([^@>]+)@disk\.test>/im.exec(text)?.[1];
}

/** Rows and spool files for queued messages: what the store holds right now. */
function storeContents(dataDir: string): { rows: number; spool: string[] } {
  const db = new BetterSqlite3(path.join(dataDir, 'postern.db'), { readonly: true });
  try {
    const rows = (db.prepare('SELECT count(*) AS n FROM messages WHERE active = 1').get() as { n: number }).n;
    return { rows, spool: fs.readdirSync(path.join(dataDir, 'spool')) };
  } finally {
    db.close();
  }
}

function integrity(dataDir: string): string {
  const db = new BetterSqlite3(path.join(dataDir, 'postern.db'), { readonly: true });
  try {
    return db.pragma('integrity_check', { simple: true }) as string;
  } finally {
    db.close();
  }
}

function configText(dataDir: string, sinkPort: number, reserve: number): string {
  return `hostname = "relay.example.test"
data_dir = ${JSON.stringify(dataDir)}

[listen]
submission = "127.0.0.1:0"
relay = "127.0.0.1:0"

[limits]
min_free_space = ${reserve}
messages_per_minute = 100000

[queue]
first_retry = "1s"
max_retry_interval = "1s"

${sinkRouteToml('disk.test', sinkPort)}`;
}

/** A Postern whose data_dir is on its own tmpfs (config and log elsewhere: they are not the store). */
async function startOnTmpfs(sink: SinkServer, reserve: number): Promise<{ t: TestPostern; mount: string; dataDir: string }> {
  const mount = mountTmpfs('8m');
  const dataDir = path.join(mount, 'data');
  const dir = tempDir('postern-diskfull-');
  const t = await startTestPostern({ dir, text: configText(dataDir, sink.port, reserve) });
  return { t, mount, dataDir };
}

afterAll(() => unmountAll());
// Even if the worker dies before afterAll: no tmpfs left mounted.
process.once('exit', () => unmountAll());

describe.skipIf(!isRoot)('disk full, with the free-space reserve (min_free_space = 2 MiB)', () => {
  let sink: SinkServer;
  let t: TestPostern;
  let mount: string;
  let dataDir: string;
  let filler: string;
  /** Message ids that got 250: every one must reach the sink. */
  const accepted: string[] = [];
  const refused: string[] = [];

  beforeAll(async () => {
    sink = await SinkServer.start();
    ({ t, mount, dataDir } = await startOnTmpfs(sink, RESERVE));
    filler = path.join(mount, 'filler');
  });

  afterEach(() => fs.rmSync(filler, { force: true }));

  afterAll(async () => {
    await t?.stop();
    await sink?.close();
  });

  it('refuses new mail at MAIL FROM under the reserve, and keeps delivering what it holds', async () => {
    // Queue a small (inline) and a big (spool file) message while the destination defers them.
    sink.behaviour = { data: { code: 451, message: '4.3.0 Try again later' } };
    for (const [id, bytes] of [['held-small', 2_000], ['held-big', 200_000]] as const) {
      expect(await send(t.port('relay'), id, bytes)).toMatch(/^250 2\.0\.0 Ok: queued as /);
      accepted.push(id);
    }
    expect(storeContents(dataDir)).toMatchObject({ rows: 2, spool: [expect.stringMatching(/\.eml$/)] });
    await t.addAccount('app@disk.test', PASSWORD);
    // Both were tried and deferred: they are queued mail, waiting for a retry.
    await waitFor(() => sink.events.filter((e) => e.startsWith('data ')).length >= 2, 8000, 'two deferred attempts');
    expect(sink.messages).toEqual([]);

    fill(filler, RESERVE / 2);
    expect(available(mount)).toBeLessThan(RESERVE);

    // Relay port (connector) and submission port (after AUTH) alike; with or without SIZE.
    const relay = await RawSmtp.connect(t.port('relay'));
    await relay.read();
    await relay.command('EHLO app.local');
    expect((await relay.command('MAIL FROM:<app@disk.test>')).text).toBe(FULL_REPLY);
    expect((await relay.command('MAIL FROM:<app@disk.test> SIZE=200000')).text).toBe(FULL_REPLY);
    // Refused at MAIL: RCPT and DATA have no transaction to join.
    expect((await relay.command('RCPT TO:<inbox@disk.test>')).code).toBe(503);
    await relay.quit();
    const { client: device, auth } = await RawSmtp.submission(t.port('submission'), 'app@disk.test', PASSWORD);
    expect(auth.code).toBe(235);
    expect((await device.command('MAIL FROM:<app@disk.test>')).text).toBe(FULL_REPLY);
    await device.quit();
    expect(await send(t.port('relay'), 'refused-at-mail', 2_000)).toBe(FULL_REPLY);
    refused.push('refused-at-mail');

    const mailLog = t.logs().find((l) => l.event === 'mail_refused' && l.reason === 'disk_space');
    expect(mailLog).toMatchObject({ reserve: RESERVE });
    expect(mailLog!.available as number).toBeLessThan(RESERVE);

    // Nothing new in the store.
    expect(storeContents(dataDir).rows).toBe(2);

    // The destination comes back: what was queued is delivered although new mail is refused.
    sink.behaviour = {};
    const got = await sink.waitForMessages(2, 15_000);
    expect(got.map((m) => messageIdOf(m.text)).sort()).toEqual(['held-big', 'held-small']);
    await waitFor(() => storeContents(dataDir).rows === 0, 8000, 'the delivered messages to leave the queue');
    expect(storeContents(dataDir).spool).toEqual([]);
    // Still under the reserve: still refused.
    expect(available(mount)).toBeLessThan(RESERVE);
    expect(await send(t.port('relay'), 'still-refused', 2_000)).toBe(FULL_REPLY);
    refused.push('still-refused');
  });

  it('answers 452 4.3.1 at the end of DATA when the disk fills during the transaction, and keeps nothing of it', async () => {
    const before = sink.messages.length;
    // MAIL and RCPT pass while there is room; then another process takes every last byte.
    const small = await transaction(t.port('relay'));
    const big = await transaction(t.port('relay'));
    fill(filler);
    expect(available(mount)).toBe(0);

    // Over 64 KiB: the body spills to a spool file, whose write fails with ENOSPC.
    expect((await big.data(message('big-at-data', 200_000))).text).toBe(FULL_REPLY);
    const spoolFailure = t.logs().find((l) => l.event === 'data_rejected' && l.fault === 'full' && /ENOSPC/.test(String(l.err)));
    expect(spoolFailure, 'the spool write failed with ENOSPC').toBeDefined();
    // Small: kept in memory for the database; refused before the commit (free space is under the reserve).
    expect((await small.data(message('small-at-data', 2_000))).text).toBe(FULL_REPLY);
    refused.push('big-at-data', 'small-at-data');

    // The sessions go on: the next transaction is refused at MAIL, as the disk is still full.
    expect((await small.command('MAIL FROM:<app@disk.test>')).text).toBe(FULL_REPLY);
    await small.quit();
    await big.quit();

    // No row, no partial spool file.
    expect(storeContents(dataDir)).toEqual({ rows: 0, spool: [] });
    expect(sink.messages.length).toBe(before);
  });

  it('accepts mail again as soon as space is freed, without a restart', async () => {
    fill(filler);
    expect(await send(t.port('relay'), 'while-full', 2_000)).toBe(FULL_REPLY);
    refused.push('while-full');

    fs.rmSync(filler);
    // Room again, but not for any size: a declared SIZE must fit above the reserve (as in Postfix).
    const sized = await RawSmtp.connect(t.port('relay'));
    await sized.read();
    await sized.command('EHLO app.local');
    expect((await sized.command(`MAIL FROM:<app@disk.test> SIZE=${available(mount)}`)).text).toBe(FULL_REPLY);
    expect((await sized.command('MAIL FROM:<app@disk.test> SIZE=200000')).code).toBe(250);
    await sized.quit();
    for (const [id, bytes] of [['after-small', 2_000], ['after-big', 200_000]] as const) {
      expect(await send(t.port('relay'), id, bytes)).toMatch(/^250 2\.0\.0 Ok: queued as /);
      accepted.push(id);
    }
    await sink.waitForMessages(4, 15_000);
    await waitFor(() => storeContents(dataDir).rows === 0, 8000, 'the delivered messages to leave the queue');
    expect(storeContents(dataDir).spool).toEqual([]);
  });

  it('leaves a sound store: integrity_check ok, every 250 delivered once, nothing refused delivered', async () => {
    await t.stop();
    expect(integrity(dataDir)).toBe('ok');
    const delivered = sink.messages.map((m) => messageIdOf(m.text));
    expect(delivered.sort()).toEqual([...accepted].sort());
    for (const id of refused) expect(delivered).not.toContain(id);
  });
});

describe.skipIf(!isRoot)('disk full, without a reserve (min_free_space = 0): the writes themselves fail', () => {
  let sink: SinkServer;
  let t: TestPostern;
  let mount: string;
  let dataDir: string;
  let filler: string;

  beforeAll(async () => {
    sink = await SinkServer.start();
    ({ t, mount, dataDir } = await startOnTmpfs(sink, 0));
    filler = path.join(mount, 'filler');
  });

  afterAll(async () => {
    await t?.stop();
    await sink?.close();
  });

  it('maps SQLITE_FULL (inline body) and ENOSPC (spool file) to 452 4.3.1, cleans up, and recovers', async () => {
    // One message first, so the account of what the store holds starts from a working state.
    expect(await send(t.port('relay'), 'first', 2_000)).toMatch(/^250 /);
    await sink.waitForMessages(1, 15_000);
    await waitFor(() => storeContents(dataDir).rows === 0, 8000, 'the first message to leave the queue');

    const small = await transaction(t.port('relay'));
    const big = await transaction(t.port('relay'));
    fill(filler);
    expect(available(mount)).toBe(0);

    // No reserve check refuses these: the database commit and the spool write meet the full disk.
    // (The WAL only grows in a test this short, no checkpoint before 1000 pages, so the commit
    // needs new blocks and gets SQLITE_FULL.)
    expect((await small.data(message('small-sqlite-full', 2_000))).text).toBe(FULL_REPLY);
    expect((await big.data(message('big-enospc', 200_000))).text).toBe(FULL_REPLY);
    const failures = t.logs().filter((l) => l.event === 'data_rejected' && l.fault === 'full').map((l) => String(l.err));
    expect(failures).toEqual(['database or disk is full', expect.stringMatching(/^ENOSPC/)]);
    await small.quit();
    await big.quit();
    expect(storeContents(dataDir)).toEqual({ rows: 0, spool: [] });

    // Space back: the same running Postern takes and delivers mail again.
    fs.rmSync(filler);
    expect(await send(t.port('relay'), 'after-small', 2_000)).toMatch(/^250 /);
    expect(await send(t.port('relay'), 'after-big', 200_000)).toMatch(/^250 /);
    await sink.waitForMessages(3, 15_000);
    await waitFor(() => storeContents(dataDir).rows === 0, 8000, 'the queue to drain');

    await t.stop();
    expect(integrity(dataDir)).toBe('ok');
    expect(sink.messages.map((m) => messageIdOf(m.text)).sort()).toEqual(['after-big', 'after-small', 'first']);
  });
});
