// Memory relief (src/runtime/memory-relief.ts): after a burst and a quiet second, the store's
// caches are emptied, then one full collection and glibc's malloc_trim(0) give the burst's memory
// back. The addon and the store's cache are checked in processes of their own (RSS is per
// process); the scheduling with a CPU clock the test drives.
import { execFileSync } from 'node:child_process';
import { Writable } from 'node:stream';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { BUSY_CPU_MS, GROWTH_BYTES, MemoryRelief, QUIET_SECONDS, SAMPLE_INTERVAL_MS, collectGarbage, loadMallocTrim } from '../src/runtime/memory-relief.js';

describe('malloc_trim addon', () => {
  it('is installed with Postern (npm install builds it) on glibc Linux', () => {
    expect(loadMallocTrim()).toBeTypeOf('function');
  });

  it('gives back the free pages a burst left below live buffers', () => {
    // 2,000 buffers of 60 KiB (malloc'd, under glibc's mmap threshold, so in its heap); every
    // eighth stays alive, pinning the free space between them below the top of the heap.
    const script = `
      const { trim } = require('postern-malloc-trim');
      const anon = () => Number(/RssAnon:\\s+(\\d+)/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
      let all = Array.from({ length: 2000 }, () => Buffer.allocUnsafeSlow(60 * 1024).fill(1));
      const kept = all.filter((_, i) => i % 8 === 0);
      all = null;
      global.gc(); global.gc();
      const before = anon();
      const released = trim();
      const after = anon();
      console.log(JSON.stringify({ before, after, released, kept: kept.length }));
    `;
    const out = JSON.parse(execFileSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8' })) as {
      before: number;
      after: number;
      released: boolean;
    };
    expect(out.released).toBe(true);
    // About 100 MB was freed; at least half of it must leave the process.
    expect(out.before - out.after).toBeGreaterThan(50 * 1024 * 1024);
  });
});

/** A debug-level logger whose lines the test reads back as objects. */
function capturedLogger() {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, sink), lines };
}

describe("the SQLite store's releaseMemory", () => {
  it('gives back the page cache a burst filled, which a collection and malloc_trim alone do not', () => {
    // In a process of its own: 8,000 messages of 4 KiB queued, claimed, read back and delivered
    // fill each connection's page cache (16 MB in better-sqlite3's build). The RSS is read after
    // a full collection and malloc_trim, then again after releaseMemory and the same two.
    const script = `
      const fs = require('fs'), os = require('os'), path = require('path');
      const { trim } = require('postern-malloc-trim');
      const rss = () => process.memoryUsage.rss();
      const settle = () => { global.gc(); global.gc(); trim(); };
      (async () => {
        const { openStore } = await import(${JSON.stringify(`${process.cwd()}/dist/store/open-store.js`)});
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postern-release-'));
        const store = await openStore(dir);
        const body = Buffer.alloc(4300, 'x');
        const now = Date.now();
        for (let i = 0; i < 8000; i += 100) {
          const batch = [];
          for (let j = i; j < i + 100; j++) {
            const queueId = 'R' + String(j).padStart(12, '0');
            const writer = store.createBody(queueId);
            writer.stream.end(body);
            await writer.finish();
            batch.push(store.enqueue({ queueId, sender: 'a@example.test', recipients: [{ address: 'b@example.test' }], size: body.length,
              receivedAt: now, expiresAt: now + 86400000, origin: { sessionId: 's', listener: 'submission', clientIp: '127.0.0.1' } }));
          }
          await Promise.all(batch);
        }
        for (let claimed; (claimed = await store.claimDue(Date.now(), 200)).length > 0; ) {
          for (const m of claimed) {
            for await (const _ of store.readBody(m.queueId));
            await store.recordOutcomes(m.queueId, [{ index: 0, state: 'delivered', code: 250, response: '250 ok' }], Date.now());
          }
        }
        settle();
        const before = rss();
        store.releaseMemory();
        settle();
        const after = rss();
        await store.close();
        fs.rmSync(dir, { recursive: true, force: true });
        console.log(JSON.stringify({ before, after }));
      })();
    `;
    const out = JSON.parse(execFileSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8' })) as { before: number; after: number };
    // Measured here: 16.4 to 16.5 MiB given back in three runs; with releaseMemory doing nothing,
    // the test fails (the cache stays resident).
    expect(out.before - out.after).toBeGreaterThan(8 * 1024 * 1024);
  }, 60_000);
});

describe('MemoryRelief', () => {
  function harness() {
    const { logger, lines } = capturedLogger();
    let cpu = 0;
    let reliefs = 0;
    let rss = 100 * 1024 * 1024;
    /** What a relief gives back of the RSS, in bytes. */
    let givesBack = 0;
    /** What ran, in order: 'caches' (the store's releaseMemory) and 'relief'. */
    const order: string[] = [];
    const relief = new MemoryRelief({
      logger,
      cpuMs: () => cpu,
      rssBytes: () => rss,
      releaseCaches: () => order.push('caches'),
      relieve: () => {
        order.push('relief');
        reliefs++;
        cpu += 80; // the collection's own CPU
        rss -= givesBack;
      },
    });
    /** One sampling interval in which the process used `ms` of CPU and its RSS grew by `grow` bytes. */
    const second = (ms: number, grow = 0) => {
      cpu += ms;
      rss += grow;
      return relief.sample(SAMPLE_INTERVAL_MS);
    };
    /**
     * A quiet spell of QUIET_SECONDS seconds using `ms` of CPU each: nothing may happen before its
     * last second; returns what that one did.
     */
    const quietSpell = (ms = 0) => {
      for (let i = 1; i < QUIET_SECONDS; i++) expect(second(ms)).toBe(false);
      return second(ms);
    };
    return { second, quietSpell, reliefs: () => reliefs, lines, order, givesBack: (bytes: number) => void (givesBack = bytes) };
  }

  it('empties the caches just before each relief, and only then', () => {
    const h = harness();
    for (let i = 0; i < 5; i++) h.second(900);
    expect(h.order).toEqual([]);
    expect(h.quietSpell()).toBe(true);
    // Caches first, so that malloc_trim can hand their pages back in the same relief.
    expect(h.order).toEqual(['caches', 'relief']);
    for (let i = 0; i < 5; i++) h.second(5);
    expect(h.order).toEqual(['caches', 'relief']);
  });

  it('relieves once, at the end of the first quiet spell after a burst, and not again until the next burst', () => {
    const h = harness();
    // A burst: three busy seconds. Nothing while busy.
    expect([h.second(900), h.second(900), h.second(900)]).toEqual([false, false, false]);
    expect(h.quietSpell(10)).toBe(true);
    expect(h.reliefs()).toBe(1);
    // Quiet from now on: the relief's own CPU is not a burst, and quiet alone is not either.
    for (let i = 0; i < 3 * QUIET_SECONDS; i++) expect(h.second(5)).toBe(false);
    expect(h.reliefs()).toBe(1);
    // The next burst, then quiet: one more.
    h.second(BUSY_CPU_MS + 100);
    expect(h.quietSpell()).toBe(true);
    expect(h.reliefs()).toBe(2);
    expect(h.lines.filter((l) => l.event === 'memory_relief')).toHaveLength(2);
  });

  it('relieves after the RSS grew by GROWTH_BYTES with little CPU (one big message), and once only', () => {
    const h = harness();
    // A 35 MB message: under a second of CPU, 40 MB more resident. Nothing while busy.
    expect(h.second(600, 40 * 1024 * 1024)).toBe(false);
    h.givesBack(35 * 1024 * 1024);
    expect(h.quietSpell(5)).toBe(true);
    // Quiet and no growth since: nothing, although the relief left 5 MB it could not give back.
    for (let i = 0; i < 3 * QUIET_SECONDS; i++) expect(h.second(5)).toBe(false);
    // Growth just under the threshold, then quiet: still nothing.
    h.second(100, GROWTH_BYTES - 1024 * 1024);
    expect(h.quietSpell()).toBe(false);
    // Memory in use (a relief gives nothing back) calls again only after growing again.
    h.givesBack(0);
    h.second(100, 2 * 1024 * 1024);
    expect(h.quietSpell()).toBe(true);
    for (let i = 0; i < 3 * QUIET_SECONDS; i++) expect(h.second(5)).toBe(false);
    expect(h.reliefs()).toBe(2);
  });

  it('never runs under a steady load, however long', () => {
    const h = harness();
    // 25% of a core for ten minutes: plenty of CPU in all, never a quiet second.
    for (let i = 0; i < 600; i++) expect(h.second(250)).toBe(false);
    expect(h.reliefs()).toBe(0);
  });

  it('leaves the gaps between bursts alone: only a quiet spell of QUIET_SECONDS calls for a relief', () => {
    // A full collection while no session is open costs the next burst its optimized code, so
    // bursts a few seconds apart (2 s of work, 3 s of quiet, as a busy fleet of devices sends) must
    // not each pay for one.
    const gap = 3;
    const h = harness();
    for (let burst = 0; burst < 20; burst++) {
      expect([h.second(900), h.second(900)]).toEqual([false, false]);
      for (let i = 0; i < gap; i++) expect(h.second(0)).toBe(false);
    }
    expect(h.reliefs()).toBe(0);
    // The last gap goes on into a lull: one relief, in its QUIET_SECONDS-th second.
    for (let i = gap + 1; i < QUIET_SECONDS; i++) expect(h.second(0)).toBe(false);
    expect(h.second(0)).toBe(true);
    expect(h.reliefs()).toBe(1);
  });

  it('waits for a burst: light use followed by quiet is left alone', () => {
    const h = harness();
    for (let i = 0; i < 30; i++) h.second(i % 2 === 0 ? 40 : 0);
    expect(h.reliefs()).toBe(0);
  });

  it('runs the real relief (full collection, then malloc_trim) and logs what it gave back', () => {
    const { logger, lines } = capturedLogger();
    let cpu = 0;
    const relief = new MemoryRelief({ logger, cpuMs: () => cpu });
    cpu += BUSY_CPU_MS + 1;
    relief.sample(SAMPLE_INTERVAL_MS);
    for (let i = 1; i < QUIET_SECONDS; i++) expect(relief.sample(SAMPLE_INTERVAL_MS)).toBe(false);
    expect(relief.sample(SAMPLE_INTERVAL_MS)).toBe(true);
    const line = lines.find((l) => l.event === 'memory_relief');
    expect(line).toMatchObject({ rssBeforeMb: expect.any(Number), rssAfterMb: expect.any(Number), ms: expect.any(Number) });
  });

  it('collects for real, with no flag on the command line', async () => {
    let garbage: object | null = { big: new Array(1000).fill('x') };
    const ref = new WeakRef(garbage);
    garbage = null;
    // A WeakRef keeps its target alive until the current job ends.
    await new Promise((resolve) => setImmediate(resolve));
    collectGarbage();
    expect(ref.deref()).toBeUndefined();
  });
});
