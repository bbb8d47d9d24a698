// The queue runner's own duties: backoff and retries on its timer, expiry with a DSN, recovery of
// work left in flight by a crash, and a graceful stop. Real store, real sockets, real DNS server.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { type ConfigInput, configSchema } from '../src/config/config-schema.js';
import { type Logger, createLogger } from '../src/observe/logger.js';
import { QueueRunner } from '../src/queue/queue-runner.js';
import { retryDelay } from '../src/queue/retry-delay.js';
import { openStore } from '../src/store/open-store.js';
import { newQueueId } from '../src/store/queue-id.js';
import type { QueuedMessage, Store } from '../src/store/store.js';
import { type DnsZone, TestDnsServer } from './helpers/dns-server.js';
import { type SinkOptions, SinkServer } from './helpers/sink-server.js';
import { waitFor } from './helpers/wait-for.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn();
});

/** dest.test and client.test (the senders' domain, for DSNs) both have their MX at 127.0.0.1. */
const ZONE: DnsZone = {
  'dest.test': { MX: [{ priority: 10, exchange: 'mx.dest.test' }] },
  'mx.dest.test': { A: ['127.0.0.1'] },
  'client.test': { MX: [{ priority: 10, exchange: 'mx.client.test' }] },
  'mx.client.test': { A: ['127.0.0.1'] },
};

async function startSink(options?: SinkOptions): Promise<SinkServer> {
  const sink = await SinkServer.start(options);
  cleanups.unshift(() => sink.close());
  return sink;
}

interface Env {
  dir: string;
  dns: TestDnsServer;
  logs: Record<string, unknown>[];
  logger: Logger;
  config: ReturnType<typeof makeConfig>;
}

function makeConfig(dnsPort: number, mxPort: number, input: ConfigInput = {}) {
  const parsed = configSchema.parse({
    ...input,
    delivery: { connect_timeout: '1s', command_timeout: '1s', port: mxPort, dns_servers: [`127.0.0.1:${dnsPort}`], ...input.delivery },
  });
  return { ...parsed, hostname: 'relay.test' };
}

async function environment(mxPort: number, input?: ConfigInput): Promise<Env> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postern-queue-'));
  const dns = await TestDnsServer.start(ZONE);
  const logs: Record<string, unknown>[] = [];
  const logger = createLogger({ level: 'info', destination: { write: (line: string) => void logs.push(JSON.parse(line)) } });
  cleanups.push(async () => {
    await dns.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { dir, dns, logs, logger, config: makeConfig(dns.port, mxPort, input) };
}

async function open(env: Env): Promise<{ store: Store; runner: QueueRunner }> {
  const store = await openStore(env.dir);
  const runner = new QueueRunner({ store, config: env.config, logger: env.logger, dnsTimeout: 300, connectionIdleTimeout: 1000 });
  cleanups.push(async () => {
    await runner.stop(0);
    await store.close();
  });
  return { store, runner };
}

async function enqueue(store: Store, recipients: string[], options: { expiresAt?: number; sender?: string } = {}): Promise<string> {
  const queueId = newQueueId();
  const writer = store.createBody(queueId);
  writer.stream.end(`From: <app@client.test>\r\nSubject: queued ${queueId}\r\n\r\nBody of ${queueId}\r\n`);
  const size = await writer.finish();
  const now = Date.now();
  await store.enqueue({
    queueId,
    sender: options.sender ?? 'app@client.test',
    recipients: recipients.map((address) => ({ address })),
    size,
    receivedAt: now,
    expiresAt: options.expiresAt ?? now + 5 * 86_400_000,
    origin: { sessionId: `sess-${queueId}`, listener: 'submission', clientIp: '127.0.0.1' },
  });
  return queueId;
}


async function final(store: Store, queueId: string, timeoutMs?: number): Promise<QueuedMessage> {
  return waitFor(async () => {
    const m = await store.getMessage(queueId);
    return m && m.recipients.every((r) => r.state === 'delivered' || r.state === 'failed') ? m : undefined;
  }, timeoutMs);
}

describe('retryDelay', () => {
  const settings = { first_retry: 60_000, max_retry_interval: 3_600_000 };

  test('doubles from first_retry up to max_retry_interval', () => {
    const noJitter = () => 0;
    expect([1, 2, 3, 4, 5, 6, 7, 8, 20, 100].map((n) => retryDelay(n, settings, noJitter))).toEqual([
      60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000, 3_600_000, 3_600_000,
    ]);
  });

  test('jitter only shortens, by at most 10 %', () => {
    expect(retryDelay(1, settings, () => 0.999)).toBeGreaterThan(54_000);
    expect(retryDelay(1, settings, () => 0.999)).toBeLessThan(60_000);
    expect(retryDelay(30, settings, () => 0.5)).toBe(3_420_000);
  });
});

describe('QueueRunner', () => {
  test('retries a deferred recipient on its timer and delivers when the server recovers', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'a@dest.test': { code: 451, message: '4.3.0 Try later' } } } });
    const env = await environment(sink.port, { queue: { first_retry: '300ms' } });
    const { store, runner } = await open(env);
    await runner.start();
    const queueId = await enqueue(store, ['a@dest.test']);
    runner.notify();
    const deferred = await waitFor(async () => {
      const m = await store.getMessage(queueId);
      return m?.recipients[0]?.state === 'deferred' ? m.recipients[0] : undefined;
    });
    expect(deferred.lastResponse).toBe('451 4.3.0 Try later');
    sink.behaviour = {};
    const m = await final(store, queueId, 5000);
    expect(m.recipients[0]).toMatchObject({ state: 'delivered', attempts: 2, lastCode: 250 });
    expect(sink.messages).toHaveLength(1);
  });

  test('a recipient whose next attempt would be after expiry fails as expired, with a DSN', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'a@dest.test': { code: 451, message: '4.2.1 Mailbox busy' } } } });
    const env = await environment(sink.port, { queue: { first_retry: '200ms' } });
    const { store, runner } = await open(env);
    await runner.start();
    const queueId = await enqueue(store, ['a@dest.test'], { expiresAt: Date.now() + 700 });
    runner.notify();
    const m = await final(store, queueId, 5000);
    const r = m.recipients[0]!;
    expect(r.state).toBe('failed');
    // Usually 2 or 3 attempts (200 ms, then 400 ms apart) fit before expiry; a slow machine may fit only 1.
    expect(r.attempts).toBeGreaterThanOrEqual(1);
    const tries = r.attempts === 1 ? '1 attempt' : `${r.attempts} attempts`;
    expect(r.lastResponse).toBe(`4.4.7 Message expired after ${tries}: 451 4.2.1 Mailbox busy`);
    expect(r.lastCode).toBe(451);

    const [dsn] = await sink.waitForMessages(1);
    expect(dsn!.from).toBe('');
    expect(dsn!.to).toEqual(['app@client.test']);
    expect(dsn!.text).toContain('Final-Recipient: rfc822; a@dest.test');
    expect(dsn!.text).toContain('Action: failed');
    expect(dsn!.text).toContain('Status: 4.4.7');
    expect(dsn!.text).toContain('Diagnostic-Code: smtp; 451 4.2.1 Mailbox busy');
    expect(dsn!.text.replace(/\r\n {4}/g, ' ')).toContain(`(${tries}) and has expired`);
    expect(dsn!.text).toContain('Reply from mx.dest.test: 451 4.2.1 Mailbox busy');
    expect(env.logs.some((l) => l.event === 'expired' && l.queueId === queueId)).toBe(true);
  });

  test('recipients left in flight by a crash are delivered after the next start', async () => {
    const sink = await startSink();
    const env = await environment(sink.port);
    // First life: the message is claimed (in_flight) and the process "dies" before delivering.
    const first = await openStore(env.dir);
    const queueId = await enqueue(first, ['a@dest.test', 'b@dest.test']);
    const claimed = await first.claimDue(Date.now(), 10);
    expect(claimed.map((m) => m.queueId)).toEqual([queueId]);
    expect((await first.countRecipients()).in_flight).toBe(2);
    await first.close();

    // Second life.
    const { store, runner } = await open(env);
    expect((await store.countRecipients()).in_flight).toBe(2);
    await runner.start();
    const m = await final(store, queueId);
    expect(m.recipients.map((r) => [r.state, r.attempts])).toEqual([
      ['delivered', 1],
      ['delivered', 1],
    ]);
    expect(sink.messages).toHaveLength(1);
    expect(sink.messages[0]!.to).toEqual(['a@dest.test', 'b@dest.test']);
    expect(env.logs.find((l) => l.event === 'released')).toMatchObject({ recipients: 2 });
  });

  test('stop() lets a delivery in progress finish within the grace period', async () => {
    const sink = await startSink({ behaviour: { dataDelayMs: 300 } });
    const env = await environment(sink.port);
    const { store, runner } = await open(env);
    await runner.start();
    const queueId = await enqueue(store, ['a@dest.test']);
    runner.notify();
    await waitFor(() => sink.events.some((e) => e.startsWith('data')));
    await runner.stop(5000);
    const m = await store.getMessage(queueId);
    expect(m!.recipients[0]).toMatchObject({ state: 'delivered', attempts: 1 });
  });

  test('stop() aborts a stuck delivery after the grace period and queues it again without counting an attempt', async () => {
    const sink = await startSink({ behaviour: { stall: 'data' } });
    const env = await environment(sink.port, { delivery: { command_timeout: '30s' } });
    const { store, runner } = await open(env);
    await runner.start();
    const queueId = await enqueue(store, ['a@dest.test']);
    runner.notify();
    await waitFor(() => sink.events.some((e) => e.startsWith('data')));
    const started = Date.now();
    await runner.stop(200);
    expect(Date.now() - started).toBeLessThan(2000);
    const m = await store.getMessage(queueId);
    expect(m!.recipients[0]).toMatchObject({ state: 'queued', attempts: 0, lastCode: null });
    expect(env.logs.some((l) => l.event === 'released' && l.queueId === queueId)).toBe(true);
    // Nothing claims it any more.
    await new Promise((r) => setTimeout(r, 200));
    expect((await store.getMessage(queueId))!.recipients[0]!.state).toBe('queued');
  });

  test('notify() after enqueue starts delivery at once, well before the poll interval', async () => {
    const sink = await startSink();
    const env = await environment(sink.port);
    const { store, runner } = await open(env);
    await runner.start();
    // Let the runner go to sleep on an empty queue first.
    await new Promise((r) => setTimeout(r, 100));
    const started = Date.now();
    const queueId = await enqueue(store, ['a@dest.test']);
    runner.notify();
    await final(store, queueId);
    expect(Date.now() - started).toBeLessThan(2000);
  });

  test('while most slots are busy, a new message is still claimed and sent within the batch wait, not after the busy ones', async () => {
    // concurrency 8: claims wait for 2 free slots while 2 or more deliveries run (at most 20 ms).
    // Seven messages held at the sink leave one slot free; the eighth must go out while they are held.
    const sink = await startSink({ behaviour: { dataDelayMs: 3000 } });
    const env = await environment(sink.port, { delivery: { concurrency: 8, per_destination: 8, command_timeout: '10s' } });
    const { store, runner } = await open(env);
    await runner.start();
    for (let i = 0; i < 7; i++) await enqueue(store, [`held${i}@dest.test`]);
    runner.notify();
    await waitFor(() => sink.events.filter((e) => e.startsWith('data')).length === 7, 2000, 'seven messages at the sink');
    const started = Date.now();
    const eighth = await enqueue(store, ['eighth@dest.test']);
    runner.notify();
    await waitFor(() => sink.events.filter((e) => e.startsWith('data')).length === 8, 1000, 'the eighth message at the sink');
    expect(Date.now() - started).toBeLessThan(1000);
    expect(sink.messages).toHaveLength(0); // the first seven are still waiting for their replies
    expect((await final(store, eighth, 8000)).recipients[0]).toMatchObject({ state: 'delivered', attempts: 1 });
  });

  test('deletes finished messages past [queue] retention and security events past 90 days, keeps pending ones, and logs it', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'later@dest.test': { code: 451, message: '4.3.0 Try later' } } } });
    const env = await environment(sink.port, { queue: { retention: '8d' } });
    const store = await openStore(env.dir);
    // The runner's clock runs nine days ahead: everything received now is past an eight-day retention.
    const runner = new QueueRunner({ store, config: env.config, logger: env.logger, dnsTimeout: 300, now: () => Date.now() + 9 * 86_400_000, purgeInterval: 100 });
    cleanups.push(async () => {
      await runner.stop(0);
      await store.close();
    });
    // Both expire well after the runner's "now", so the deferred one stays deferred.
    const expiresAt = Date.now() + 30 * 86_400_000;
    const done = await enqueue(store, ['a@dest.test'], { expiresAt });
    const pending = await enqueue(store, ['later@dest.test'], { expiresAt });
    // Security events are kept 90 days: one from 100 days ago goes, one from 10 days ago stays.
    const event = (daysAgo: number) => ({ kind: 'relay_denied' as const, ip: '192.0.2.7', detail: { message: `${daysAgo} days ago` }, at: Date.now() - daysAgo * 86_400_000 });
    await store.recordSecurityEvent(event(100));
    await store.recordSecurityEvent(event(10));
    await runner.start();
    await waitFor(() => env.logs.find((l) => l.event === 'purged' && l.what === 'finished messages'), 5000, 'a purge');
    expect(await store.getMessage(done)).toBeUndefined();
    expect(sink.messages.map((m) => m.to)).toEqual([['a@dest.test']]);
    expect((await store.getMessage(pending))!.recipients[0]).toMatchObject({ state: 'deferred', lastCode: 451 });
    expect(env.logs.find((l) => l.event === 'purged' && l.what === 'finished messages')).toMatchObject({ count: 1 });
    await waitFor(() => env.logs.find((l) => l.event === 'purged' && l.what === 'security events'), 5000, 'a purge of events');
    expect((await store.listSecurityEvents()).map((e) => e.detail.message)).toEqual(['10 days ago']);
  });

  test('keeps security events for [policy] security_events_retention when it is set', async () => {
    const env = await environment(2, { policy: { security_events_retention: '30d' } });
    const store = await openStore(env.dir);
    const runner = new QueueRunner({ store, config: env.config, logger: env.logger, dnsTimeout: 300, purgeInterval: 100 });
    cleanups.push(async () => {
      await runner.stop(0);
      await store.close();
    });
    // 40 days ago is past 30 days (and within the default 90): it goes; 20 days ago stays.
    const event = (daysAgo: number) => ({ kind: 'relay_denied' as const, ip: '192.0.2.7', detail: { message: `${daysAgo} days ago` }, at: Date.now() - daysAgo * 86_400_000 });
    await store.recordSecurityEvent(event(40));
    await store.recordSecurityEvent(event(20));
    await runner.start();
    await waitFor(() => env.logs.find((l) => l.event === 'purged' && l.what === 'security events'), 5000, 'a purge of events');
    expect(env.logs.find((l) => l.event === 'purged' && l.what === 'security events')).toMatchObject({ count: 1 });
    expect((await store.listSecurityEvents()).map((e) => e.detail.message)).toEqual(['20 days ago']);
  });
});

