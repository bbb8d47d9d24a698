// Memory relief: after a burst of mail, give the memory it needed back to the system.
//
// A burst leaves two kinds of memory resident that the quiet server no longer needs:
//  - dead buffers: message chunks, bodies read back for delivery and TLS records are Node Buffers
//    whose bytes live outside the JS heap (malloc). Those that lived a few milliseconds too long
//    (an fsync, a delivery) reached the old generation, and V8 frees them only at its next full
//    collection, which an idle server may not have for a long time;
//  - glibc's free pages: glibc returns freed memory to the system only from the top of its heap,
//    so pages freed below buffers still alive stay resident;
//  - caches that a burst fills and nothing empties: SQLite's page cache, per connection (the store's
//    releaseMemory). It is emptied first, so that the trim can hand its pages back too.
// Measured with `npm run bench` after its load (1,000 idle connections): 164 MB resident; after a
// full collection 157 MB; after malloc_trim(0) as well, 124 MB (`[heap]` from 67 to 26 MB).
//
// So once the process has been busy (BUSY_CPU_MS of CPU since the last relief) or has grown (its
// RSS GROWTH_BYTES above what the last relief left: one 35 MB message costs little CPU but leaves
// its buffers behind) and then is nearly idle for QUIET_SECONDS in a row, it runs one full
// collection and malloc_trim(0). Both pause the event loop (tens of milliseconds), and it never
// runs under steady load: there the memory is in use, and the next message would take it again.
//
// Why a quiet spell of QUIET_SECONDS and not one quiet second: a full collection while no session
// is open throws away the optimized code built for the sessions' objects (V8 deoptimizes every
// function that embedded a shape that died: 175 to 580 of them here, Node's own socket and stream
// code among them), and the next burst runs slower while the compiler rebuilds it. With a relief
// after every quiet second, bursts of 2 s with 2.2 s gaps on the device path cost about 3.5 ms of
// CPU per message instead of about 1.8 ms (docs/benchmarks.md, 2026-11-30). V8's own memory
// reducer runs such a collection about 8 s into a quiet spell anyway; waiting about as long adds
// no rebuild V8 would not cause itself, and leaves a burst's memory resident for that long only.
// malloc_trim comes from a tiny optional addon (native/malloc-trim); without it (no compiler at
// install, musl) only the collection runs.
import { createRequire } from 'node:module';
import v8 from 'node:v8';
import vm from 'node:vm';
import type { Logger } from '../observe/logger.js';

/** CPU the process must have used since the last relief (a burst), in milliseconds. */
export const BUSY_CPU_MS = 2000;
/** Growth of the RSS since the last relief that calls for one, whatever the CPU used, in bytes. */
export const GROWTH_BYTES = 16 * 1024 * 1024;
/** Below this share of one core over a sampling interval, the process counts as quiet. */
export const QUIET_CPU_SHARE = 0.05;
/** How often CPU use is sampled. */
export const SAMPLE_INTERVAL_MS = 1000;
/** Quiet sampling intervals in a row before a relief: a lull, not a gap between bursts. */
export const QUIET_SECONDS = 10;

/** A full garbage collection, obtained once: V8 exposes `gc` to new contexts after the flag is set. */
let fullGc: (() => void) | undefined;
export function collectGarbage(): void {
  if (!fullGc) {
    v8.setFlagsFromString('--expose-gc');
    fullGc = vm.runInNewContext('gc') as () => void;
  }
  fullGc();
}

/** glibc's malloc_trim(0) from the optional addon; undefined when the addon is not installed. */
export function loadMallocTrim(): (() => boolean) | undefined {
  try {
    const addon = createRequire(import.meta.url)('postern-malloc-trim') as { trim?: () => boolean };
    return typeof addon.trim === 'function' ? addon.trim : undefined;
  } catch {
    return undefined;
  }
}

export interface MemoryReliefOptions {
  logger: Logger;
  /** CPU time used by the process so far, in milliseconds (default: process.cpuUsage()). */
  cpuMs?: () => number;
  /** The relief itself (default: a full collection, then malloc_trim). */
  relieve?: () => void;
  /** Empties this thread's caches (the store's releaseMemory); runs just before the relief. */
  releaseCaches?: () => void;
  /** The process's resident set in bytes (default: process.memoryUsage.rss()). */
  rssBytes?: () => number;
}

export class MemoryRelief {
  readonly #logger: Logger;
  readonly #cpuMs: () => number;
  readonly #relieve: () => void;
  readonly #releaseCaches: (() => void) | undefined;
  readonly #rss: () => number;
  #timer: NodeJS.Timeout | undefined;
  /** RSS after the last relief (or at start): growth is counted from here. */
  #rssAfterRelief: number;
  /** CPU time at the last relief (or start), and at the previous sample. */
  #sinceRelief: number;
  #lastSample: number;
  /** Quiet samples in a row so far. */
  #quietSamples = 0;

  constructor(options: MemoryReliefOptions) {
    this.#logger = options.logger;
    this.#cpuMs =
      options.cpuMs ??
      (() => {
        const u = process.cpuUsage();
        return (u.user + u.system) / 1000;
      });
    this.#relieve = options.relieve ?? defaultRelief();
    this.#releaseCaches = options.releaseCaches;
    this.#rss = options.rssBytes ?? (() => process.memoryUsage.rss());
    this.#sinceRelief = this.#lastSample = this.#cpuMs();
    this.#rssAfterRelief = this.#rss();
  }

  start(): void {
    this.#timer ??= setInterval(() => this.sample(SAMPLE_INTERVAL_MS), SAMPLE_INTERVAL_MS).unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** One sampling step, `intervalMs` after the previous one; true when it relieved. */
  sample(intervalMs: number): boolean {
    const now = this.#cpuMs();
    const quiet = now - this.#lastSample < intervalMs * QUIET_CPU_SHARE;
    this.#lastSample = now;
    this.#quietSamples = quiet ? this.#quietSamples + 1 : 0;
    if (this.#quietSamples < QUIET_SECONDS) return false;
    const rssBefore = this.#rss();
    if (now - this.#sinceRelief < BUSY_CPU_MS && rssBefore - this.#rssAfterRelief < GROWTH_BYTES) return false;
    const started = performance.now();
    this.#releaseCaches?.();
    this.#relieve();
    const ms = performance.now() - started;
    // The relief's own CPU must not count as the next burst.
    this.#sinceRelief = this.#lastSample = this.#cpuMs();
    // Memory the relief could not give back is in use: only growth beyond it calls again.
    const rssAfter = (this.#rssAfterRelief = this.#rss());
    this.#logger.debug(
      { event: 'memory_relief', rssBeforeMb: mb(rssBefore), rssAfterMb: mb(rssAfter), ms: Math.round(ms) },
      'quiet after a burst: memory given back',
    );
    return true;
  }
}

function defaultRelief(): () => void {
  const trim = loadMallocTrim();
  return () => {
    collectGarbage();
    trim?.();
  };
}

function mb(bytes: number): number {
  return Math.round((bytes / (1024 * 1024)) * 10) / 10;
}
