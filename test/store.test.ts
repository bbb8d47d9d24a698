// The storage contract, run against every backend (only SQLite today; PostgreSQL joins this list).
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';
import { describe, expect, it, vi } from 'vitest';
import { openStore } from '../src/store/open-store.js';
import { newQueueId } from '../src/store/queue-id.js';
import type { NewMessage, Store } from '../src/store/store.js';
import { tempDir } from './helpers/temp-dir.js';

type BodyLocation = 'inline' | 'file' | 'none';

interface Backend {
  name: string;
  open(dir: string): Promise<Store>;
  /** Where the backend keeps a body, looked at from outside: in its database, in a file, or gone. */
  bodyLocation(dir: string, queueId: string): BodyLocation;
  /** Queue ids that have a body file. */
  bodyFiles(dir: string): string[];
}

const BACKENDS: Backend[] = [
  {
    name: 'sqlite',
    open: (dir) => openStore(dir),
    bodyLocation(dir, queueId) {
      // A second connection, as the CLI would open one; WAL lets it read beside the store's.
      const db = new BetterSqlite3(path.join(dir, 'postern.db'));
      try {
        const inline = db.prepare('SELECT 1 FROM bodies WHERE queue_id = ?').get(queueId) !== undefined;
        const file = fs.existsSync(path.join(dir, 'spool', `${queueId}.eml`));
        if (inline && file) throw new Error(`the body of ${queueId} is both inline and a file`);
        return inline ? 'inline' : file ? 'file' : 'none';
      } finally {
        db.close();
      }
    },
    bodyFiles: (dir) => fs.readdirSync(path.join(dir, 'spool')).filter((n) => n.endsWith('.eml')).map((n) => n.slice(0, -4)),
  },
];

/** Bodies up to this size are kept inline (the SQLite store's INLINE_BODY_MAX). */
const INLINE_MAX = 64 * 1024;

/** Writes a body the way the intake does: in pieces, through the stream, then finish(). */
async function writeBody(store: Store, queueId: string, body: string | Buffer, chunkSize = 16 * 1024): Promise<number> {
  const writer = store.createBody(queueId);
  const bytes = Buffer.from(body);
  for (let at = 0; at < bytes.length; at += chunkSize) {
    if (!writer.stream.write(bytes.subarray(at, at + chunkSize))) await new Promise((r) => writer.stream.once('drain', r));
  }
  writer.stream.end();
  return writer.finish();
}

async function put(store: Store, body: string | Buffer, overrides: Partial<NewMessage> = {}): Promise<string> {
  const queueId = overrides.queueId ?? newQueueId();
  const size = await writeBody(store, queueId, body);
  await store.enqueue({
    queueId,
    sender: 'dev@example.com',
    recipients: [{ address: 'a@example.net' }, { address: 'b@example.org', notify: ['FAILURE', 'DELAY'] }],
    size,
    receivedAt: Date.now(),
    expiresAt: Date.now() + 86_400_000,
    origin: { sessionId: 's1', listener: 'submission', clientIp: '127.0.0.1', account: 'dev@example.com' },
    messageIdHeader: '<m@example.com>',
    ...overrides,
  });
  return queueId;
}

async function readBytes(store: Store, queueId: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of store.readBody(queueId)) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

async function readAll(store: Store, queueId: string): Promise<string> {
  return (await readBytes(store, queueId)).toString();
}

const delivered = (index: number) => ({ index, state: 'delivered' as const, code: 250, response: '250 2.0.0 ok' });

for (const backend of BACKENDS) {
  describe(`store: ${backend.name}`, () => {
    it('creates, reads, updates and deletes accounts (addresses are case-insensitive)', async () => {
      const store = await backend.open(tempDir());
      await store.createAccount({ address: 'Printer@Example.com', passwordHash: 'h1' });
      await expect(store.createAccount({ address: 'printer@example.com', passwordHash: 'h2' })).rejects.toThrow();
      expect(await store.getAccount('PRINTER@example.com')).toMatchObject({ address: 'printer@example.com', smtpAuth: true, enabled: true });
      await store.updateAccount('printer@example.com', { smtpAuth: false, passwordHash: 'h3' });
      expect(await store.getAccount('printer@example.com')).toMatchObject({ smtpAuth: false, passwordHash: 'h3' });
      expect((await store.listAccounts()).map((a) => a.address)).toEqual(['printer@example.com']);
      expect(await store.deleteAccount('printer@example.com')).toBe(true);
      expect(await store.deleteAccount('printer@example.com')).toBe(false);
      await store.close();
    });

    it('keeps an enqueued message, body and rows, across a reopen', async () => {
      const dir = tempDir();
      let store = await backend.open(dir);
      const queueId = await put(store, 'Subject: hi\r\n\r\nbody\r\n');
      await store.close();
      store = await backend.open(dir);
      const m = await store.getMessage(queueId);
      expect(m).toMatchObject({ sender: 'dev@example.com', size: 21, messageIdHeader: '<m@example.com>' });
      expect(m?.recipients.map((r) => [r.address, r.domain, r.state])).toEqual([
        ['a@example.net', 'example.net', 'queued'],
        ['b@example.org', 'example.org', 'queued'],
      ]);
      expect(m?.recipients[1]?.notify).toEqual(['FAILURE', 'DELAY']);
      expect(await readAll(store, queueId)).toBe('Subject: hi\r\n\r\nbody\r\n');
      await store.close();
    });

    it('commits a burst of concurrent enqueues together, none lost', async () => {
      const store = await backend.open(tempDir());
      const ids = await Promise.all(Array.from({ length: 200 }, (_, i) => put(store, `Subject: ${i}\r\n\r\n${i}\r\n`)));
      expect(new Set(ids).size).toBe(200);
      expect((await store.listQueue()).length).toBe(200);
      expect((await store.countRecipients()).queued).toBe(400);
      await store.close();
    });

    it('claims due recipients once, records outcomes and removes the body when all are final', async () => {
      const dir = tempDir();
      const store = await backend.open(dir);
      const queueId = await put(store, 'x\r\n');
      const now = Date.now();
      const [claimed] = await store.claimDue(now, 10);
      expect(claimed?.queueId).toBe(queueId);
      expect(claimed?.recipients.map((r) => r.state)).toEqual(['in_flight', 'in_flight']);
      expect(await store.claimDue(now, 10)).toEqual([]);
      await store.recordOutcomes(queueId, [
        { index: 0, state: 'delivered', code: 250, response: '250 2.0.0 ok' },
        { index: 1, state: 'deferred', code: 451, response: '451 4.3.0 later', nextAttemptAt: now + 60_000 },
      ], now);
      expect(await store.nextDueAt()).toBe(now + 60_000);
      expect(await store.claimDue(now, 10)).toEqual([]);
      const later = await store.claimDue(now + 60_000, 10);
      expect(later[0]?.recipients.map((r) => r.index)).toEqual([1]);
      expect(backend.bodyLocation(dir, queueId)).toBe('inline');
      await store.recordOutcomes(queueId, [{ index: 1, state: 'failed', code: 550, response: '550 5.1.1 no such user' }], now);
      expect(backend.bodyLocation(dir, queueId)).toBe('none');
      await expect(readAll(store, queueId)).rejects.toThrow();
      expect(await store.listQueue()).toEqual([]);
      const m = await store.getMessage(queueId);
      expect(m?.recipients.map((r) => [r.state, r.attempts, r.lastCode])).toEqual([
        ['delivered', 1, 250],
        ['failed', 2, 550],
      ]);
      await store.close();
    });

    it('releases in-flight recipients after a crash and drops bodies that never committed', async () => {
      const dir = tempDir();
      let store = await backend.open(dir);
      const queueId = await put(store, 'x\r\n');
      const big = await put(store, Buffer.alloc(200 * 1024, 'b'));
      await store.claimDue(Date.now(), 10);
      // Bodies written but never enqueued: the client never got its 250. The big one is a file.
      const orphan = newQueueId();
      await writeBody(store, orphan, Buffer.alloc(200 * 1024, 'o'));
      await writeBody(store, newQueueId(), 'small orphan');
      expect(backend.bodyFiles(dir).sort()).toEqual([big, orphan].sort());
      await store.close();
      store = await backend.open(dir);
      expect(await store.releaseInFlight(Date.now())).toBe(4);
      expect(backend.bodyFiles(dir)).toEqual([big]);
      expect(backend.bodyLocation(dir, queueId)).toBe('inline');
      const claimed = await store.claimDue(Date.now(), 10);
      expect(claimed.map((m) => [m.queueId, m.recipients.length])).toEqual([
        [queueId, 2],
        [big, 2],
      ]);
      expect((await readBytes(store, big)).equals(Buffer.alloc(200 * 1024, 'b'))).toBe(true);
      await store.close();
    });

    it('keeps a small body inline and a big one in a file, byte for byte, across a reopen', async () => {
      const dir = tempDir();
      let store = await backend.open(dir);
      const bodies = {
        small: randomBytes(4 * 1024),
        atLimit: randomBytes(INLINE_MAX),
        overLimit: randomBytes(INLINE_MAX + 1),
        big: randomBytes(200 * 1024),
        empty: Buffer.alloc(0),
      };
      const ids: Record<string, string> = {};
      for (const [name, body] of Object.entries(bodies)) {
        // Chunks of 1,000 bytes: the spill happens in the middle of a write sequence.
        const queueId = newQueueId();
        expect(await writeBody(store, queueId, body, 1000)).toBe(body.length);
        await store.enqueue({
          queueId,
          sender: 'dev@example.com',
          recipients: [{ address: 'a@example.net' }],
          size: body.length,
          receivedAt: Date.now(),
          expiresAt: Date.now() + 86_400_000,
          origin: { sessionId: 's1', listener: 'submission', clientIp: '127.0.0.1' },
        });
        ids[name] = queueId;
      }
      const expected = { small: 'inline', atLimit: 'inline', overLimit: 'file', big: 'file', empty: 'inline' };
      const where = () => Object.fromEntries(Object.entries(ids).map(([name, id]) => [name, backend.bodyLocation(dir, id)]));
      expect(where()).toEqual(expected);
      await store.close();
      store = await backend.open(dir);
      expect(where()).toEqual(expected);
      for (const [name, body] of Object.entries(bodies)) {
        expect((await readBytes(store, ids[name]!)).equals(body), name).toBe(true);
        expect((await store.getMessage(ids[name]!))?.size).toBe(body.length);
      }
      await store.close();
    });

    it('keeps many small bodies written side by side apart, byte for byte', async () => {
      // Inline bodies share memory slabs until their commit (spilling-body-writer.ts): 120 bodies
      // of 1 to 8 KB, all written before any is queued, fill more than one slab.
      const dir = tempDir();
      const store = await backend.open(dir);
      const bodies = Array.from({ length: 120 }, (_, i) => randomBytes(1024 + ((i * 977) % (7 * 1024))));
      const ids = bodies.map(() => newQueueId());
      await Promise.all(bodies.map((body, i) => writeBody(store, ids[i]!, body, 1000)));
      await Promise.all(
        ids.map((queueId, i) =>
          store.enqueue({
            queueId,
            sender: 'dev@example.com',
            recipients: [{ address: 'a@example.net' }],
            size: bodies[i]!.length,
            receivedAt: Date.now(),
            expiresAt: Date.now() + 86_400_000,
            origin: { sessionId: 's1', listener: 'submission', clientIp: '127.0.0.1' },
          }),
        ),
      );
      for (const [i, queueId] of ids.entries()) expect((await readBytes(store, queueId)).equals(bodies[i]!), `body ${i}`).toBe(true);
      await store.close();
    });

    it('removes the body, inline or file, when the last recipient is final, and on delete', async () => {
      const dir = tempDir();
      const store = await backend.open(dir);
      const small = await put(store, 'Subject: small\r\n\r\nhi\r\n');
      const big = await put(store, Buffer.alloc(200 * 1024, 'x'));
      const deleted = await put(store, 'Subject: deleted\r\n\r\nhi\r\n');
      const deletedBig = await put(store, Buffer.alloc(100 * 1024, 'y'));
      const now = Date.now();
      await store.claimDue(now, 10);
      // One recipient final, one not: the body stays.
      await store.recordOutcomes(small, [delivered(0), { index: 1, state: 'deferred', code: 451, response: '451 later', nextAttemptAt: now }], now);
      await store.recordOutcomes(big, [delivered(0), { index: 1, state: 'deferred', code: 451, response: '451 later', nextAttemptAt: now }], now);
      expect([backend.bodyLocation(dir, small), backend.bodyLocation(dir, big)]).toEqual(['inline', 'file']);
      await store.claimDue(now, 10);
      await store.recordOutcomes(small, [delivered(1)], now);
      await store.recordOutcomes(big, [{ index: 1, state: 'failed', code: 550, response: '550 no' }], now);
      expect([backend.bodyLocation(dir, small), backend.bodyLocation(dir, big)]).toEqual(['none', 'none']);
      await expect(readAll(store, small)).rejects.toThrow();
      // The rows stay (`queue show` of a finished message), only the body goes.
      expect((await store.getMessage(small))?.recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
      expect(await store.deleteMessage(deleted)).toBe(true);
      expect(await store.deleteMessage(deletedBig)).toBe(true);
      expect([backend.bodyLocation(dir, deleted), backend.bodyLocation(dir, deletedBig)]).toEqual(['none', 'none']);
      await store.close();
    });

    it('throws away aborted bodies, small or spilled, and never queues them', async () => {
      const dir = tempDir();
      const store = await backend.open(dir);
      const small = store.createBody(newQueueId());
      small.stream.write('half a message');
      await small.abort();
      const big = store.createBody(newQueueId());
      big.stream.write(Buffer.alloc(INLINE_MAX + 10, 'z'));
      // Aborted right after the spill, while the file may still be opening.
      await big.abort();
      // finish() succeeded but the enqueue failed (say): the caller aborts.
      const finished = newQueueId();
      const writer = store.createBody(finished);
      writer.stream.end(Buffer.alloc(INLINE_MAX * 2, 'f'));
      await writer.finish();
      expect(backend.bodyFiles(dir)).toEqual([finished]);
      await writer.abort();
      expect(backend.bodyFiles(dir)).toEqual([]);
      expect(await store.listQueue()).toEqual([]);
      await store.close();
    });

    it('opens a spilled body file asynchronously and closes it exactly once (finish, abort, both)', async () => {
      // A second close(fd) closes whatever was opened since under the same number: another
      // session's socket or another body's file. Opens and closes are recorded in order.
      const events: { op: 'open' | 'close'; fd: number; spool: boolean }[] = [];
      const realOpen = fs.open;
      const realClose = fs.close;
      const openSync = vi.spyOn(fs, 'openSync');
      const open = vi.spyOn(fs, 'open').mockImplementation(((file: fs.PathLike, flags: fs.OpenMode, mode: fs.Mode, cb: (err: NodeJS.ErrnoException | null, fd: number) => void) =>
        realOpen(file, flags, mode, (err, fd) => {
          if (!err) events.push({ op: 'open', fd, spool: String(file).endsWith('.eml') });
          cb(err, fd);
        })) as unknown as typeof fs.open);
      const close = vi.spyOn(fs, 'close').mockImplementation(((fd: number, cb?: (err: NodeJS.ErrnoException | null) => void) => {
        events.push({ op: 'close', fd, spool: false });
        return realClose(fd, cb);
      }) as typeof fs.close);
      const store = await backend.open(tempDir());
      try {
        const big = Buffer.alloc(INLINE_MAX * 3, 'x');
        await writeBody(store, newQueueId(), big); // finished
        const aborted = store.createBody(newQueueId());
        aborted.stream.write(big);
        await new Promise((r) => setTimeout(r, 10));
        await aborted.abort(); // aborted mid-body
        const both = store.createBody(newQueueId());
        both.stream.end(big);
        await both.finish();
        await both.abort(); // finished, then the enqueue failed
        await writeBody(store, newQueueId(), 'small'); // inline: no file at all
      } finally {
        open.mockRestore();
        close.mockRestore();
        openSync.mockRestore();
        await store.close();
      }
      expect(openSync.mock.calls.filter(([file]) => String(file).endsWith('.eml'))).toEqual([]);
      const spoolOpens = events.map((e, i) => [e, i] as const).filter(([e]) => e.op === 'open' && e.spool);
      expect(spoolOpens).toHaveLength(3);
      for (const [opened, i] of spoolOpens) {
        const next = events.findIndex((e, j) => j > i && e.op === 'open' && e.fd === opened.fd);
        const closes = events.slice(i + 1, next === -1 ? undefined : next).filter((e) => e.op === 'close' && e.fd === opened.fd);
        expect(closes, `close() calls for the spool file opened as fd ${opened.fd}`).toHaveLength(1);
      }
    });

    it('never hands a recipient still in flight to a second claim', async () => {
      const store = await backend.open(tempDir());
      const queueId = await put(store, 'x\r\n');
      const now = Date.now();
      const [first] = await store.claimDue(now, 10);
      // Recipient 1 is retried soon; recipient 0's delivery is still running (in flight).
      await store.recordOutcomes(queueId, [{ index: 1, state: 'deferred', code: 451, response: '451 later', nextAttemptAt: now + 1000 }], now);
      expect(first?.recipients.map((r) => r.index)).toEqual([0, 1]);
      const [second] = await store.claimDue(now + 1000, 10);
      expect(second?.recipients.map((r) => [r.index, r.state])).toEqual([[1, 'in_flight']]);
      expect(await store.claimDue(now + 1000, 10)).toEqual([]);
      await store.close();
    });

    it('claims the oldest due messages first, up to the limit, each once', async () => {
      const store = await backend.open(tempDir());
      const base = Date.now();
      const ids: string[] = [];
      for (let i = 0; i < 30; i++) ids.push(await put(store, `m${i}\r\n`, { receivedAt: base - 30_000 + i * 1000 }));
      const claims = await Promise.all([store.claimDue(base, 10), store.claimDue(base, 10), store.claimDue(base, 10), store.claimDue(base, 10)]);
      expect(claims.map((c) => c.length)).toEqual([10, 10, 10, 0]);
      expect(claims.flat().map((m) => m.queueId)).toEqual(ids);
      expect((await store.countRecipients()).in_flight).toBe(60);
      await store.close();
    });

    it('lands every one of many concurrent recordOutcomes calls (grouped into few commits)', async () => {
      const dir = tempDir();
      let store = await backend.open(dir);
      const ids = await Promise.all(Array.from({ length: 120 }, (_, i) => put(store, i % 20 === 0 ? Buffer.alloc(100 * 1024, 'q') : `m${i}\r\n`)));
      const now = Date.now();
      const claimed = await store.claimDue(now, 200);
      expect(claimed).toHaveLength(120);
      // All in the same turn of the event loop: three kinds of result, by position.
      await Promise.all(
        ids.map((id, i) =>
          store.recordOutcomes(
            id,
            i % 3 === 0
              ? [delivered(0), delivered(1)]
              : i % 3 === 1
                ? [delivered(0), { index: 1, state: 'failed', code: 550, response: '550 no such user' }]
                : [delivered(0), { index: 1, state: 'deferred', code: 451, response: '451 later', nextAttemptAt: now + 60_000 }],
            now,
          ),
        ),
      );
      const check = async () => {
        expect(await store.countRecipients()).toEqual({ queued: 0, in_flight: 0, deferred: 40, delivered: 120 + 40, failed: 40 });
        expect((await store.listQueue()).map((q) => q.queueId).sort()).toEqual(ids.filter((_, i) => i % 3 === 2).sort());
        ids.forEach((id, i) => expect(backend.bodyLocation(dir, id), `${i}`).toBe(i % 3 === 2 ? (i % 20 === 0 ? 'file' : 'inline') : 'none'));
        expect(await store.nextDueAt()).toBe(now + 60_000);
      };
      await check();
      // Committed, not merely applied in memory: all of it is there after a reopen.
      await store.close();
      store = await backend.open(dir);
      await check();
      await store.close();
    });

    it('refuses a bad message of a group commit alone; the rest of the batch is queued', async () => {
      const store = await backend.open(tempDir());
      const taken = await put(store, 'first\r\n');
      const results = await Promise.allSettled([
        put(store, 'a\r\n'),
        put(store, 'again\r\n', { queueId: taken }),
        put(store, 'b\r\n'),
      ]);
      expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
      expect((await store.listQueue()).length).toBe(3);
      expect(await readAll(store, taken)).toBe('first\r\n');
      await store.close();
    });

    it('refuses a bad outcome of a group commit alone; the other messages\' outcomes are recorded', async () => {
      const dir = tempDir();
      let store = await backend.open(dir);
      const ids = [await put(store, 'a\r\n'), await put(store, 'b\r\n'), await put(store, 'c\r\n')];
      const now = Date.now();
      expect((await store.claimDue(now, 10)).length).toBe(3);
      // Submitted in one turn, so one group commit: the middle outcome breaks a NOT NULL (what a
      // bug would do), which must not take the other two with it.
      const broken = { ...delivered(0), state: null as unknown as 'delivered' };
      const results = await Promise.allSettled(ids.map((id, i) => store.recordOutcomes(id, [i === 1 ? broken : delivered(0), delivered(1)], now)));
      expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
      const check = async () => {
        // Two recipients each. The refused message is as it was before the attempt, both its
        // recipients in flight, its body kept (its good outcome went with the bad one).
        expect(await store.countRecipients()).toEqual({ queued: 0, in_flight: 2, deferred: 0, delivered: 4, failed: 0 });
        expect((await store.listQueue()).map((q) => q.queueId)).toEqual([ids[1]]);
        expect(await readAll(store, ids[1]!)).toBe('b\r\n');
      };
      await check();
      await store.close();
      store = await backend.open(dir);
      await check();
      await store.close();
    });

    it('counts what a sender queued since a time: messages, recipients, the oldest (the rate limits\' question)', async () => {
      const store = await backend.open(tempDir());
      const t0 = 1_700_000_000_000;
      const origin = (account: string | undefined, clientIp: string) => ({
        sessionId: 's',
        listener: account ? 'submission' : 'relay',
        clientIp,
        ...(account ? { account } : {}),
      });
      const one = [{ address: 'a@example.net' }];
      const three = [{ address: 'a@example.net' }, { address: 'b@example.net' }, { address: 'c@example.org' }];
      await put(store, 'x\r\n', { receivedAt: t0, recipients: three, origin: origin('app@example.com', '10.0.0.1') });
      await put(store, 'x\r\n', { receivedAt: t0 + 1000, recipients: one, origin: origin('app@example.com', '10.0.0.1') });
      await put(store, 'x\r\n', { receivedAt: t0 + 2000, recipients: three, origin: origin('other@example.com', '10.0.0.1') });
      await put(store, 'x\r\n', { receivedAt: t0 + 3000, recipients: one, origin: origin(undefined, '10.0.0.2') });
      expect(await store.usageSince({ account: 'APP@example.com' }, t0)).toEqual({ messages: 2, recipients: 4, oldestAt: t0 });
      expect(await store.usageSince({ account: 'app@example.com' }, t0 + 1)).toEqual({ messages: 1, recipients: 1, oldestAt: t0 + 1000 });
      expect(await store.usageSince({ clientIp: '10.0.0.1' }, t0)).toEqual({ messages: 3, recipients: 7, oldestAt: t0 });
      expect(await store.usageSince({ clientIp: '10.0.0.2' }, t0)).toEqual({ messages: 1, recipients: 1, oldestAt: t0 + 3000 });
      expect(await store.usageSince({ account: 'nobody@example.com' }, 0)).toEqual({ messages: 0, recipients: 0, oldestAt: null });
      await store.close();
    });

    it('keeps serving after releaseMemory, a group commit pending included (memory relief runs whenever the server is quiet)', async () => {
      const store = await backend.open(tempDir());
      const counter = store.counter({ keyPrefix: 'release', points: 5, duration: 60 });
      await counter.consume('k');
      const first = await put(store, 'first\r\n');
      const second = put(store, 'second\r\n');
      store.releaseMemory?.();
      const secondId = await second;
      store.releaseMemory?.();
      expect(await readAll(store, first)).toBe('first\r\n');
      expect(await readAll(store, secondId)).toBe('second\r\n');
      expect((await store.claimDue(Date.now(), 10)).map((m) => m.queueId).sort()).toEqual([first, secondId].sort());
      expect((await counter.consume('k')).remainingPoints).toBe(3);
      await store.close();
    });

    it('answers getAccount for a missing account with undefined', async () => {
      const store = await backend.open(tempDir());
      expect(await store.getAccount('nobody@example.com')).toBeUndefined();
      await store.close();
    });

    it('retries now and deletes on request', async () => {
      const store = await backend.open(tempDir());
      const a = await put(store, 'a\r\n');
      const b = await put(store, 'b\r\n');
      const now = Date.now();
      await store.claimDue(now, 10);
      for (const id of [a, b]) {
        await store.recordOutcomes(id, [0, 1].map((index) => ({ index, state: 'deferred' as const, code: 421, response: '421 busy', nextAttemptAt: now + 3_600_000 })), now);
      }
      expect(await store.claimDue(now + 1, 10)).toEqual([]);
      expect(await store.retryNow(a, now + 1)).toBe(2);
      expect((await store.claimDue(now + 1, 10)).map((m) => m.queueId)).toEqual([a]);
      expect(await store.deleteMessage(b)).toBe(true);
      expect(await store.getMessage(b)).toBeUndefined();
      expect(await store.deleteMessage(b)).toBe(false);
      await store.close();
    });

    it('purges finished messages received before the cutoff, oldest first, never pending ones', async () => {
      const store = await backend.open(tempDir());
      const day = 86_400_000;
      const now = Date.now();
      const at = (daysAgo: number) => ({ receivedAt: now - daysAgo * day, expiresAt: now + day });
      const oldDelivered = await put(store, 'old delivered\r\n', at(40));
      const olderFailed = await put(store, 'older failed\r\n', at(45));
      const oldPending = await put(store, 'old pending\r\n', at(41));
      const recentDelivered = await put(store, 'recent delivered\r\n', at(2));
      const finish = async (id: string, state: 'delivered' | 'failed') => {
        const outcome = state === 'delivered' ? delivered : (index: number) => ({ index, state, code: 550, response: '550 5.1.1 no such user' });
        await store.recordOutcomes(id, [outcome(0), outcome(1)], now);
      };
      await store.claimDue(now, 10);
      await finish(oldDelivered, 'delivered');
      await finish(olderFailed, 'failed');
      await finish(recentDelivered, 'delivered');
      await store.recordOutcomes(oldPending, [delivered(0), { index: 1, state: 'deferred', code: 451, response: '451 4.3.0 later', nextAttemptAt: now + 60_000 }], now);

      const cutoff = now - 30 * day;
      expect(await store.purgeFinished(cutoff, 1)).toBe(1); // the oldest first
      expect(await store.getMessage(olderFailed)).toBeUndefined();
      expect(await store.getMessage(oldDelivered)).toBeDefined();
      expect(await store.purgeFinished(cutoff, 500)).toBe(1);
      expect(await store.purgeFinished(cutoff, 500)).toBe(0);
      expect(await store.getMessage(oldDelivered)).toBeUndefined();
      // Kept: the one still pending (however old) and the finished one inside the retention.
      expect((await store.getMessage(oldPending))!.recipients.map((r) => r.state)).toEqual(['delivered', 'deferred']);
      expect(await store.getMessage(recentDelivered)).toBeDefined();
      // The recipients went with their messages.
      expect(await store.countRecipients()).toMatchObject({ delivered: 3, deferred: 1, failed: 0 });
      await store.close();
    });

    it('purges security events older than the cutoff, oldest first', async () => {
      const store = await backend.open(tempDir());
      const now = Date.now();
      for (const daysAgo of [95, 120, 5]) {
        await store.recordSecurityEvent({ kind: 'auth_failed', ip: '192.0.2.1', detail: { message: `${daysAgo}` }, at: now - daysAgo * 86_400_000 });
      }
      const cutoff = now - 90 * 86_400_000;
      expect(await store.purgeSecurityEvents(cutoff, 1)).toBe(1);
      expect((await store.listSecurityEvents()).map((e) => e.detail.message)).toEqual(['95', '5']);
      expect(await store.purgeSecurityEvents(cutoff, 500)).toBe(1);
      expect(await store.purgeSecurityEvents(cutoff, 500)).toBe(0);
      expect((await store.listSecurityEvents()).map((e) => e.detail.message)).toEqual(['5']);
      await store.close();
    });
  });
}

describe('store: sqlite write-ahead log fsync', () => {
  // The hot paths commit at synchronous=NORMAL and fsync the WAL on the thread pool
  // (src/store/sqlite/wal-sync.ts). These watch FileHandle.prototype.sync, which the WAL sync
  // uses (small bodies stay inline, so no spool file is synced here).
  async function fileHandleProto(): Promise<{ sync(): Promise<void> }> {
    const handle = await fs.promises.open(import.meta.filename, 'r');
    await handle.close();
    return Object.getPrototypeOf(handle);
  }

  it('refuses an enqueue whose WAL fsync fails, and queues again once fsync works', async () => {
    const dir = tempDir();
    const store = await openStore(dir);
    const proto = await fileHandleProto();
    const spy = vi.spyOn(proto, 'sync').mockRejectedValueOnce(Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' }));
    try {
      await expect(put(store, 'Subject: lost?\r\n\r\nx\r\n')).rejects.toThrow(/EIO/);
      expect(spy).toHaveBeenCalledTimes(1);
      const ok = await put(store, 'Subject: kept\r\n\r\ny\r\n');
      expect(spy).toHaveBeenCalledTimes(2);
      expect((await store.getMessage(ok))?.sender).toBe('dev@example.com');
    } finally {
      spy.mockRestore();
      await store.close();
    }
  });

  it('shares one fsync among the enqueues of a burst', async () => {
    const store = await openStore(tempDir());
    const proto = await fileHandleProto();
    const spy = vi.spyOn(proto, 'sync');
    try {
      await Promise.all(Array.from({ length: 100 }, (_, i) => put(store, `Subject: ${i}\r\n\r\n${i}\r\n`)));
      // Every enqueue waited for an fsync, and the burst did not cost one each.
      expect(spy.mock.calls.length).toBeGreaterThanOrEqual(1);
      expect(spy.mock.calls.length).toBeLessThanOrEqual(10);
      expect((await store.listQueue()).length).toBe(100);
    } finally {
      spy.mockRestore();
      await store.close();
    }
  });
});

describe('store: sqlite file that is not a database', () => {
  it('refuses to open it, naming the file, and leaves it as it was', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'postern.db');
    const garbage = randomBytes(8192);
    fs.writeFileSync(file, garbage);
    await expect(openStore(dir)).rejects.toThrow(`cannot open the store ${file}: file is not a database`);
    expect(fs.readFileSync(file).equals(garbage)).toBe(true);
  });
});

describe('store: sqlite usage counts (migration 0004)', () => {
  it('counts recipients from the message row: the recipients table is not read', async () => {
    const dir = tempDir();
    let store = await openStore(dir);
    const t0 = Date.now();
    await put(store, 'x\r\n', { receivedAt: t0 });
    await store.close();
    // Only deleting the message deletes its recipients; done by hand here, it shows where the count
    // comes from (the join it replaced answered 0).
    const db = new BetterSqlite3(path.join(dir, 'postern.db'));
    db.exec('DELETE FROM recipients');
    db.close();
    store = await openStore(dir);
    expect(await store.usageSince({ account: 'dev@example.com' }, 0)).toEqual({ messages: 1, recipients: 2, oldestAt: t0 });
    await store.close();
  });

  it('has covering indexes for the usage question, per account and per client address', async () => {
    const dir = tempDir();
    const store = await openStore(dir);
    await store.close();
    const db = new BetterSqlite3(path.join(dir, 'postern.db'));
    try {
      const plan = (where: string) =>
        db
          .prepare(`EXPLAIN QUERY PLAN SELECT count(*), sum(recipient_count), min(received_at) FROM messages WHERE ${where} AND received_at >= 0`)
          .all()
          .map((r) => (r as { detail: string }).detail)
          .join('; ');
      expect(plan("account = 'a@example.com'")).toMatch(/USING COVERING INDEX messages_account_time/);
      expect(plan("client_ip = '10.0.0.1'")).toMatch(/USING COVERING INDEX messages_ip_time/);
    } finally {
      db.close();
    }
  });

  it('counts the recipients of messages queued before the migration', async () => {
    const dir = tempDir();
    let store = await openStore(dir);
    const t0 = Date.now();
    const recipients = [{ address: 'a@example.net' }, { address: 'b@example.net' }];
    await put(store, 'x\r\n', { receivedAt: t0, recipients });
    await put(store, 'x\r\n', { receivedAt: t0 + 1, recipients: recipients.slice(0, 1) });
    await store.close();
    // Back to the schema of 0003: no recipient count, the old indexes, 0004 not applied yet.
    const db = new BetterSqlite3(path.join(dir, 'postern.db'));
    db.exec(`DROP INDEX messages_account_time; DROP INDEX messages_ip_time;
      ALTER TABLE messages DROP COLUMN recipient_count;
      CREATE INDEX messages_account_time ON messages (account, received_at);
      CREATE INDEX messages_ip_time ON messages (client_ip, received_at);
      DELETE FROM kysely_migration WHERE name = '0004_usage_from_indexes';`);
    db.close();
    store = await openStore(dir);
    expect(await store.usageSince({ account: 'dev@example.com' }, 0)).toEqual({ messages: 2, recipients: 3, oldestAt: t0 });
    await store.close();
  });
});

describe('store: sqlite checkpoints', () => {
  // `postern serve` opens the intake's connection with checkpoints off (its event loop never
  // waits for a checkpoint's fsyncs) and the delivery thread checkpoints through housekeeping().
  // Observable from outside: until a checkpoint, new rows live in the WAL and postern.db does not
  // grow.
  const dbBytes = (dir: string) => fs.statSync(path.join(dir, 'postern.db')).size;
  const burst = (store: Store) => Promise.all(Array.from({ length: 1500 }, (_, i) => put(store, `Subject: ${i}\r\n\r\n${'x'.repeat(4000)}\r\n`)));

  it('with checkpoints off, the WAL keeps the rows until housekeeping() copies them in', async () => {
    const dir = tempDir();
    const store = await openStore(dir, { checkpoints: false });
    const before = dbBytes(dir);
    await burst(store);
    // Far past SQLite's automatic checkpoint (1,000 pages, ~4 MB), and still all in the WAL.
    expect(fs.statSync(path.join(dir, 'postern.db-wal')).size).toBeGreaterThan(6_000_000);
    expect(dbBytes(dir)).toBe(before);
    await store.housekeeping?.();
    expect(dbBytes(dir)).toBeGreaterThan(before + 6_000_000);
    await store.close();
  });

  it('with checkpoints on (the default), SQLite checkpoints by itself', async () => {
    const dir = tempDir();
    const store = await openStore(dir);
    const before = dbBytes(dir);
    await burst(store);
    expect(dbBytes(dir)).toBeGreaterThan(before + 2_000_000);
    await store.close();
  });
});
