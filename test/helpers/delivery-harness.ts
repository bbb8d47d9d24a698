// The delivery test harness: a real store in a temp dir, a test DNS server, and a QueueRunner with
// short timeouts, torn down after each test. Used by test/delivery-smtp.test.ts (outcomes and
// replies) and test/delivery-faults.test.ts (network faults, stuck workers, leaked handles).
//
// Call useDeliveryHarness() once at the top of a test file: it registers the afterEach that stops
// the runner, closes the DNS server and the store, then closes the servers the test started.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach } from 'vitest';
import { type ConfigInput, configSchema } from '../../src/config/config-schema.js';
import { type Logger, createLogger } from '../../src/observe/logger.js';
import { SecurityEvents } from '../../src/policy/security-events.js';
import { QueueRunner } from '../../src/queue/queue-runner.js';
import { openStore } from '../../src/store/open-store.js';
import { newQueueId } from '../../src/store/queue-id.js';
import type { NewRecipient, QueuedMessage, Store } from '../../src/store/store.js';
import { type DnsZone, TestDnsServer } from './dns-server.js';
import { type SinkOptions, SinkServer } from './sink-server.js';
import { waitFor } from './wait-for.js';

export interface Harness {
  store: Store;
  /** Security events (upstream problems, budgets) recorded by the runner, stored in `store`. */
  events: SecurityEvents;
  dns: TestDnsServer;
  runner: QueueRunner;
  logs: Record<string, unknown>[];
  enqueue(message: { sender: string; recipients: (string | NewRecipient)[]; body?: string; expiresAt?: number }): Promise<string>;
  message(queueId: string): Promise<QueuedMessage>;
}

export interface HarnessOptions {
  zone?: DnsZone;
  /** delivery.port: where MX hosts are contacted. */
  mxPort?: number;
  config?: ConfigInput;
  /** Start the runner (default true). */
  start?: boolean;
  /** QueueRunner's connectionIdleTimeout in ms (default 2000). */
  connectionIdleTimeout?: number;
  /** QueueRunner's per-try DNS timeout in ms (default 300). */
  dnsTimeout?: number;
}

export interface DeliveryHarness {
  /**
   * A store in a temp dir, a DNS server with `zone`, and a runner configured by `config` (MX port
   * and DNS servers filled in by `mxPort`/the DNS server). Short timeouts keep failures fast.
   */
  setup(options?: HarnessOptions): Promise<Harness>;
  /** A sink closed after the test (after the runner, which is stopped first). */
  startSink(options?: SinkOptions): Promise<SinkServer>;
  /** Runs `fn` after the test, after the runner is stopped (for servers the test started). */
  afterRunner(fn: () => Promise<void> | void): void;
}

export function useDeliveryHarness(): DeliveryHarness {
  const cleanups: (() => Promise<void> | void)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  async function setup(options: HarnessOptions = {}): Promise<Harness> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postern-delivery-'));
    const store = await openStore(dir);
    const dns = await TestDnsServer.start(options.zone ?? {});
    const logs: Record<string, unknown>[] = [];
    const logger: Logger = createLogger({ level: 'info', destination: { write: (line: string) => void logs.push(JSON.parse(line)) } });
    const input: ConfigInput = options.config ?? {};
    const parsed = configSchema.parse({
      ...input,
      delivery: {
        connect_timeout: '1s',
        command_timeout: '1s',
        port: options.mxPort ?? 25,
        dns_servers: [`127.0.0.1:${dns.port}`],
        ...input.delivery,
      },
    });
    const config = { ...parsed, hostname: 'relay.test' };
    let runner: QueueRunner | undefined;
    const events = new SecurityEvents({ store, logger, config, onQueued: () => runner?.notify() });
    runner = new QueueRunner({
      store,
      config,
      logger,
      events,
      dnsTimeout: options.dnsTimeout ?? 300,
      connectionIdleTimeout: options.connectionIdleTimeout ?? 2000,
    });
    cleanups.push(async () => {
      await runner.stop(0);
      await dns.close();
      await store.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    if (options.start !== false) await runner.start();
    const started = runner;
    return {
      store,
      events,
      dns,
      runner,
      logs,
      async enqueue({ sender, recipients, body, expiresAt }) {
        const queueId = newQueueId();
        const writer = store.createBody(queueId);
        const text =
          body ?? `From: <${sender}>\r\nTo: <${recipients.map((r) => (typeof r === 'string' ? r : r.address)).join('>, <')}>\r\nSubject: test ${queueId}\r\nMessage-ID: <${queueId}@client.test>\r\n\r\nHello from ${queueId}.\r\n`;
        writer.stream.end(text);
        const size = await writer.finish();
        const now = Date.now();
        await store.enqueue({
          queueId,
          sender,
          recipients: recipients.map((r) => (typeof r === 'string' ? { address: r } : r)),
          size,
          receivedAt: now,
          expiresAt: expiresAt ?? now + 5 * 86_400_000,
          origin: { sessionId: `sess-${queueId}`, listener: 'submission', clientIp: '127.0.0.1' },
          messageIdHeader: `<${queueId}@client.test>`,
        });
        started.notify();
        return queueId;
      },
      async message(queueId) {
        const m = await store.getMessage(queueId);
        if (!m) throw new Error(`no message ${queueId}`);
        return m;
      },
    };
  }

  async function startSink(options?: SinkOptions): Promise<SinkServer> {
    const sink = await SinkServer.start(options);
    cleanups.unshift(() => sink.close());
    return sink;
  }

  return {
    setup,
    startSink,
    afterRunner: (fn) => void cleanups.unshift(fn),
  };
}

/** Waits until no recipient of the message is queued or in flight, returns the message. */
export async function settled(h: Harness, queueId: string, timeoutMs?: number): Promise<QueuedMessage> {
  return waitFor(async () => {
    const m = await h.message(queueId);
    return m.recipients.every((r) => r.state !== 'queued' && r.state !== 'in_flight') ? m : undefined;
  }, timeoutMs);
}

export function recipient(m: QueuedMessage, address: string) {
  const r = m.recipients.find((x) => x.address === address);
  if (!r) throw new Error(`no recipient ${address}`);
  return r;
}

/** A zone where each domain has one MX pointing at 127.0.0.1, plus client.test for bounces. */
export function zoneFor(...domains: string[]): DnsZone {
  const zone: DnsZone = { 'mx.client.test': { A: ['127.0.0.1'] }, 'client.test': { MX: [{ priority: 10, exchange: 'mx.client.test' }] } };
  for (const d of domains) {
    zone[d] = { MX: [{ priority: 10, exchange: `mx.${d}` }] };
    zone[`mx.${d}`] = { A: ['127.0.0.1'] };
  }
  return zone;
}

export const MINUTE = 60_000;
