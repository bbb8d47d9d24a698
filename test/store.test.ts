// The storage contract, run against every backend (only SQLite today; PostgreSQL joins this list).
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openStore } from '../src/store/open-store.js';
import { newQueueId } from '../src/store/queue-id.js';
import type { NewMessage, Store } from '../src/store/store.js';
import { tempDir } from './helpers/temp-dir.js';

interface Backend {
  name: string;
  open(dir: string): Promise<Store>;
}

const BACKENDS: Backend[] = [{ name: 'sqlite', open: (dir) => openStore(dir) }];

async function put(store: Store, body: string, overrides: Partial<NewMessage> = {}): Promise<string> {
  const queueId = overrides.queueId ?? newQueueId();
  const writer = store.createBody(queueId);
  writer.stream.end(body);
  const size = await writer.finish();
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

async function readAll(store: Store, queueId: string): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of store.readBody(queueId)) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

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
      expect(fs.existsSync(path.join(dir, 'spool', `${queueId}.eml`))).toBe(true);
      await store.recordOutcomes(queueId, [{ index: 1, state: 'failed', code: 550, response: '550 5.1.1 no such user' }], now);
      expect(fs.existsSync(path.join(dir, 'spool', `${queueId}.eml`))).toBe(false);
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
      await store.claimDue(Date.now(), 10);
      // A body written but never enqueued: the client never got its 250.
      const orphan = store.createBody(newQueueId());
      orphan.stream.end('orphan');
      await orphan.finish();
      await store.close();
      store = await backend.open(dir);
      expect(await store.releaseInFlight(Date.now())).toBe(2);
      expect(fs.readdirSync(path.join(dir, 'spool'))).toEqual([`${queueId}.eml`]);
      expect((await store.claimDue(Date.now(), 10))[0]?.recipients).toHaveLength(2);
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
  });
}
