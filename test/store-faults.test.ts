// Store faults: the SQLite file locked by another process (an open write transaction in a sqlite3
// shell, a backup tool) or slow to give its lock. Postern runs as its own process, as in
// production, and this test holds the lock with BEGIN IMMEDIATE on a connection of its own.
//
// What must hold: a lock held past the store's busy deadline (5 s) gets the client a temporary
// `451 4.3.0` with a sentence, and nothing of the message is kept; a lock released within it only
// delays the 250, and other clients are served meanwhile (the store waits for the lock
// asynchronously, not on the event loop); the queue runner survives SQLITE_BUSY; once the lock is gone mail is accepted
// and delivered again without a restart; nothing that got 250 is lost and the file stays sound.
import fs from 'node:fs';
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawSmtp } from './helpers/raw-smtp.js';
import { sinkRouteToml } from './helpers/postern-harness.js';
import { type ServeProcess, killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

const BUSY_REPLY = '451 4.3.0 Message not queued: the queue database is locked by another process; try again in a few minutes';
/** Long enough for the store's busy deadline (5 s) or two. */
const SLOW = 30_000;

let sink: SinkServer;
let server: ServeProcess;
let dir: string;
let dataDir: string;
const accepted: string[] = [];
const refused: string[] = [];

beforeAll(async () => {
  sink = await SinkServer.start();
  dir = tempDir('postern-store-faults-');
  dataDir = path.join(dir, 'data');
  fs.writeFileSync(
    path.join(dir, 'postern.toml'),
    `hostname = "relay.example.test"
data_dir = "./data"

[listen]
relay = "127.0.0.1:0"

[limits]
messages_per_minute = 100000

[queue]
first_retry = "1s"
max_retry_interval = "1s"

${sinkRouteToml('lock.test', sink.port)}`,
  );
  server = await startServeProcess({ cwd: dir, args: ['--config', path.join(dir, 'postern.toml')] });
});

afterAll(async () => {
  await server?.stop();
  killAllServeProcesses();
  await sink?.close();
});

function logs(): Record<string, unknown>[] {
  return server
    .stdout()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

function message(id: string, bodyBytes: number): string {
  const line = `${'x'.repeat(76)}\r\n`;
  return `Message-ID: <${id}@lock.test>\r\nSubject: ${id}\r\nFrom: app@lock.test\r\n\r\n${line.repeat(Math.ceil(bodyBytes / line.length))}\r\n.\r\n`;
}

function messageIdOf(text: string): string | undefined {
  return /^Message-ID: <([^@>]+)@lock\.test>/im.exec(text)?.[1];
}

/** One message on the relay port; resolves with the reply to the data (which may be slow). */
async function send(id: string, bodyBytes: number): Promise<string> {
  const c = await RawSmtp.connect(server.ports.relay!);
  await c.read(SLOW);
  await c.command('EHLO app.local');
  expect((await c.command('MAIL FROM:<app@lock.test>')).code).toBe(250);
  expect((await c.command('RCPT TO:<inbox@lock.test>')).code).toBe(250);
  expect((await c.command('DATA')).code).toBe(354);
  c.write(message(id, bodyBytes));
  const reply = await c.read(SLOW);
  await c.quit();
  return reply.text;
}

/** Another connection to the store, as a sqlite3 shell would be. */
function openHolder(): BetterSqlite3.Database {
  const db = new BetterSqlite3(path.join(dataDir, 'postern.db'));
  db.pragma('busy_timeout = 10000');
  return db;
}

/** Message-ID headers of the messages not yet final. */
function activeIds(db: BetterSqlite3.Database): string[] {
  return (db.prepare('SELECT message_id_header AS m FROM messages WHERE active = 1').all() as { m: string }[]).map((r) => r.m);
}

function activeMessages(db: BetterSqlite3.Database): number {
  return (db.prepare('SELECT count(*) AS n FROM messages WHERE active = 1').get() as { n: number }).n;
}

describe('a SQLite file locked by another connection', () => {
  it('answers 451 4.3.0 while the write lock is held, keeps nothing, and accepts mail again once it is released', { timeout: 60_000 }, async () => {
    const holder = openHolder();
    try {
      holder.exec('BEGIN IMMEDIATE');
      // Small (inline, goes into the database) and big (spool file, then its row): both refused.
      expect(await send('locked-small', 2_000)).toBe(BUSY_REPLY);
      expect(await send('locked-big', 200_000)).toBe(BUSY_REPLY);
      refused.push('locked-small', 'locked-big');
      // Log lines reach stdout asynchronously.
      const rejected = await waitFor(() => {
        const lines = logs().filter((l) => l.event === 'data_rejected');
        return lines.length >= 2 && lines;
      }, 5000, 'two data_rejected log lines');
      expect(rejected.map((l) => l.fault)).toEqual(['busy', 'busy']);
      expect(rejected.map((l) => l.err)).toEqual(['database is locked', 'database is locked']);
      // Nothing kept: no row (read inside the lock holder's own transaction), no spool file.
      expect(activeMessages(holder)).toBe(0);
      expect(fs.readdirSync(path.join(dataDir, 'spool'))).toEqual([]);
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }

    // Released: the same process takes and delivers mail again.
    for (const [id, bytes] of [['unlocked-small', 2_000], ['unlocked-big', 200_000]] as const) {
      expect(await send(id, bytes)).toMatch(/^250 2\.0\.0 Ok: queued as /);
      accepted.push(id);
    }
    await sink.waitForMessages(2, 15_000);
    expect(sink.messages.map((m) => messageIdOf(m.text)).sort()).toEqual(['unlocked-big', 'unlocked-small']);
  });

  it('waits out a lock released within the busy deadline: the client gets 250, and others are served meanwhile', async () => {
    const holder = openHolder();
    let released = false;
    holder.exec('BEGIN IMMEDIATE');
    // Released well within the store's busy deadline (5 s). The test's event loop stays free
    // (Postern is another process), so this runs while Postern's commit is waiting for the lock.
    const release = setTimeout(() => {
      holder.exec('ROLLBACK');
      released = true;
    }, 1500);
    try {
      const pending = send('slow-lock', 2_000);
      // While that message waits for the lock, a second client is greeted and gets through EHLO
      // and MAIL FROM before the lock is released: the wait does not hold up the event loop.
      await new Promise((r) => setTimeout(r, 200));
      const other = await RawSmtp.connect(server.ports.relay!);
      expect((await other.read(SLOW)).code).toBe(220);
      expect((await other.command('EHLO other.local')).code).toBe(250);
      expect((await other.command('MAIL FROM:<other@lock.test>')).code).toBe(250);
      expect(released).toBe(false);
      await other.quit();
      const reply = await pending;
      expect(reply).toMatch(/^250 2\.0\.0 Ok: queued as /);
      // The 250 came after the release: the commit waited for the lock instead of failing.
      expect(released).toBe(true);
      accepted.push('slow-lock');
    } finally {
      clearTimeout(release);
      if (!released) holder.exec('ROLLBACK');
      holder.close();
    }
    await waitFor(() => sink.messages.some((m) => messageIdOf(m.text) === 'slow-lock'), 10_000, 'slow-lock delivered');
  });

  it('keeps mail queued before the lock and delivers it after: the queue runner survives SQLITE_BUSY', { timeout: 60_000 }, async () => {
    sink.behaviour = { data: { code: 451, message: '4.3.0 Try again later' } };
    const attemptsBefore = sink.events.filter((e) => e.startsWith('data ')).length;
    const lockErrors = () => logs().filter((l) => l.event === 'queue_error' && l.err === 'database is locked').length;
    const lockErrorsBefore = lockErrors();
    expect(await send('queued-before-lock', 2_000)).toMatch(/^250 /);
    accepted.push('queued-before-lock');
    await waitFor(() => sink.events.filter((e) => e.startsWith('data ')).length > attemptsBefore, 8000, 'a deferred attempt');

    const holder = openHolder();
    holder.exec('BEGIN IMMEDIATE');
    try {
      // The retry (1 s later) cannot claim the message: the runner logs it and tries again.
      await waitFor(() => lockErrors() > lockErrorsBefore, 20_000, 'a claim refused by the lock');
      expect(server.child.exitCode).toBeNull();
      // This message is still queued. (Others may be too: a delivery result that met the lock of
      // an earlier test is written again on a backoff of its own.)
      expect(activeIds(holder)).toContain('<queued-before-lock@lock.test>');
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    sink.behaviour = {};
    await waitFor(() => sink.messages.some((m) => messageIdOf(m.text) === 'queued-before-lock'), 20_000, 'the queued message delivered');
  });

  it('keeps a delivery result it could not write (lock past the deadline) and writes it later: no second delivery', { timeout: 60_000 }, async () => {
    sink.behaviour = { dataDelayMs: 1500 };
    const dataBefore = sink.events.filter((e) => e.startsWith('data ')).length;
    const writeFailures = () => logs().filter((l) => l.event === 'store_write_failed' && l.what === 'outcomes').length;
    const failuresBefore = writeFailures();
    expect(await send('lock-while-delivering', 2_000)).toMatch(/^250 /);
    accepted.push('lock-while-delivering');
    // The sink has the data and answers 250 in 1.5 s; by then the store is locked, and stays
    // locked past its 5 s deadline, so recording "delivered" fails at least once.
    await waitFor(() => sink.events.filter((e) => e.startsWith('data ')).length > dataBefore, 10_000, 'the delivery under way');
    const holder = openHolder();
    holder.exec('BEGIN IMMEDIATE');
    try {
      await waitFor(() => writeFailures() > failuresBefore, 20_000, 'a delivery result refused by the lock');
      expect(activeIds(holder)).toContain('<lock-while-delivering@lock.test>');
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    sink.behaviour = {};
    const db = openHolder();
    try {
      await waitFor(() => activeMessages(db) === 0, 20_000, 'the delivery result recorded');
    } finally {
      db.close();
    }
    // Delivered once: the result was kept and written, not thrown away and the mail sent again.
    expect(sink.messages.filter((m) => messageIdOf(m.text) === 'lock-while-delivering')).toHaveLength(1);
  });

  it('loses nothing and leaves a sound file', async () => {
    const db = openHolder();
    try {
      await waitFor(() => activeMessages(db) === 0, 10_000, 'the queue to drain');
    } finally {
      db.close();
    }
    expect(await server.stop()).toBe(0);
    const check = new BetterSqlite3(path.join(dataDir, 'postern.db'), { readonly: true });
    try {
      expect(check.pragma('integrity_check', { simple: true })).toBe('ok');
    } finally {
      check.close();
    }
    const delivered = sink.messages.map((m) => messageIdOf(m.text));
    expect(delivered.sort()).toEqual([...accepted].sort());
    for (const id of refused) expect(delivered).not.toContain(id);
    expect(fs.readdirSync(path.join(dataDir, 'spool'))).toEqual([]);
  });
});
