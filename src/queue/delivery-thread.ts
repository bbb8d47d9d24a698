// Delivery in a thread of its own, as Postfix runs smtpd and smtp as separate processes.
//
// Why: `postern serve` is one Node process, and with intake and delivery on one event loop that
// loop is the bottleneck. Measured with `npm run bench` on 2 cores, end to end, the main thread sat
// at 100% of a core while 0.6 of the other core was idle: every delivery (claim, read the body,
// an SMTP client session, record the outcome) took time from the SMTP sessions coming in. In a
// worker thread the queue runner gets its own event loop and its own connection to the store
// (SQLite in WAL mode lets both write, one commit at a time; the store waits for the other's lock
// asynchronously), and a slow delivery path never delays a 250.
//
// When (`[delivery] thread`, "auto" by default: on machines with two cores or more): measured with
// `npm run bench` on 2 cores on 2026-11-29, the thread raised the accept rate of new connections
// per message (how devices send) by 25% on port 587 and 60% on the relay port, and end-to-end
// throughput by 15%; reused connections lost 5% (the deliveries now keep pace with the intake, on
// the same two cores). A second V8 isolate costs about 30 MB: 115 MB at start against 84, 127 to
// 130 MB with 1,000 idle connections after load against 120 (memory relief runs in both threads).
// On one core the two event loops would only take turns, so "auto" keeps delivery in the main
// thread there; `true` or `false` decide it outright.
//
// Priority (`[delivery] thread_priority`, "low" by default): the thread runs at nice 10 above the
// process. A 250 is what a device or an app waits for; a delivery can wait in the durable queue.
// When both want the CPU, the scheduler now gives the SMTP sessions about ten times the share of
// the deliveries (CFS weights 1024 and 110), and an idle core still goes to the deliveries whole.
// Measured with `npm run bench` (BENCH_ONLY=quick, 2 cores, 2026-11-29, ten runs): 587 reused
// connections a median of about 1,070/s at nice 10 against 890/s at nice 0; end to end about 880
// against 850/s, within a spread of 750 to 1,250/s on both sides, so not settled
// (docs/benchmarks.md, BENCH_DELIVERY_PRIORITY). A cost to watch for: the thread preempted while
// it holds SQLite's write lock, the intake's commit then backing off for it.
// Under a load the deliveries cannot keep up with, the queue grows faster than at "normal"; the
// free-space reserve (intake/free-space.ts) still stops the intake before the disk is full. The
// thread also yields to other programs at nice 0 on the same machine: "normal" when that matters.
//
// The contract is the QueueRunner's: start() (after releasing what a crash left in flight),
// notify() when mail was queued, stop(grace) to finish or release deliveries in progress. The
// worker's log lines come back here and go out through this process's logger stream, so there is
// still one stream of whole JSON lines. Should the worker die (a bug, not a delivery problem), it
// is started again after a pause: its recipients in flight are released at start, as after a crash.
import { availableParallelism, getPriority, setPriority } from 'node:os';
import { Worker } from 'node:worker_threads';
import pino from 'pino';
import { type Config, ConfigError } from '../config/load-config.js';
import type { Logger } from '../observe/logger.js';

export interface WorkerData {
  config: Config;
  logLevel: string;
}

export type ToWorker = { type: 'notify' } | { type: 'stop'; graceMs: number };
type FromWorker =
  | { type: 'ready' }
  | { type: 'failed'; message: string; config?: { file: string; problems: string[] } }
  | { type: 'log'; text: string }
  | { type: 'stopped'; error?: string };

/** The worker script, next to this file once compiled (dist/queue/delivery-worker.js). */
const WORKER_SCRIPT = new URL('./delivery-worker.js', import.meta.url);
/** The worker's young generation cap, as the main thread's (young-generation.ts). */
const WORKER_YOUNG_GENERATION_MB = 8;
/** Pause before a worker that died is started again. */
const RESTART_PAUSE_MS = 1000;

/** How much nicer than the process the delivery thread runs with `thread_priority = "low"`. */
const LOW_PRIORITY_NICE_STEP = 10;

/**
 * Lowers the calling thread's scheduling priority, not the process's: on Linux, setpriority() with
 * PRIO_PROCESS and pid 0 applies to the calling thread alone (setpriority(2), "BUGS"), and
 * os.setPriority(n) is that call. Elsewhere it would renice the whole process, so it does nothing
 * there. Returns the thread's nice value, or undefined when left alone.
 */
export function lowerThisThreadsPriority(): number | undefined {
  if (process.platform !== 'linux') return undefined;
  const nice = Math.min(19, getPriority() + LOW_PRIORITY_NICE_STEP);
  setPriority(nice);
  return nice;
}

/** `[delivery] thread` resolved: "auto" is a thread of its own with two cores or more. */
export function deliversInThread(setting: boolean | 'auto', cores = availableParallelism()): boolean {
  return setting === 'auto' ? cores >= 2 : setting;
}

export class DeliveryThread {
  readonly #config: Config;
  readonly #logger: Logger;
  readonly #logStream: { write(text: string): unknown };
  #worker: Worker | undefined;
  #stopping = false;
  #restartTimer: NodeJS.Timeout | undefined;
  #notifyScheduled = false;

  constructor(options: { config: Config; logger: Logger }) {
    this.#config = options.config;
    this.#logger = options.logger;
    // The stream this process's logger writes to: the worker's lines join it whole.
    this.#logStream = (options.logger as unknown as Record<symbol, { write(text: string): unknown }>)[pino.symbols.streamSym]!;
  }

  /** Resolves once the worker has opened the store and released what a crash left in flight. */
  start(): Promise<void> {
    const worker = new Worker(WORKER_SCRIPT, {
      workerData: { config: this.#config, logLevel: this.#logger.level } satisfies WorkerData,
      // The worker is an isolate of its own, with its own young generation; left to grow, it adds
      // 30 MB or more of resident memory (see src/runtime/young-generation.ts for the main thread's).
      resourceLimits: { maxYoungGenerationSizeMb: WORKER_YOUNG_GENERATION_MB },
    });
    this.#worker = worker;
    return new Promise<void>((resolve, reject) => {
      let started = false;
      worker.on('message', (message: FromWorker) => {
        if (message.type === 'log') this.#logStream.write(message.text);
        else if (message.type === 'ready') {
          started = true;
          resolve();
        } else if (message.type === 'failed') {
          reject(message.config ? new ConfigError(message.config.file, message.config.problems) : new Error(message.message));
        }
      });
      worker.on('error', (err) => {
        this.#logger.error({ event: 'delivery_thread_error', err: err.message, stack: err.stack }, 'the delivery thread failed');
        if (!started) reject(err);
      });
      worker.on('exit', (code) => {
        if (this.#worker === worker) this.#worker = undefined;
        if (!started || this.#stopping) return;
        this.#logger.error({ event: 'delivery_thread_exit', code, restartMs: RESTART_PAUSE_MS }, 'the delivery thread stopped; starting it again');
        this.#restartTimer = setTimeout(() => {
          this.start().catch((err: Error) =>
            this.#logger.error({ event: 'delivery_thread_error', err: err.message }, 'the delivery thread could not start again'),
          );
        }, RESTART_PAUSE_MS);
      });
    });
  }

  /** Mail was queued: the worker looks at the store now (one message per turn of the event loop). */
  notify(): void {
    if (this.#notifyScheduled) return;
    this.#notifyScheduled = true;
    setImmediate(() => {
      this.#notifyScheduled = false;
      this.#worker?.postMessage({ type: 'notify' } satisfies ToWorker);
    });
  }

  /** Finishes or releases deliveries in progress (up to graceMs), closes the worker's store. */
  async stop(graceMs: number): Promise<void> {
    this.#stopping = true;
    clearTimeout(this.#restartTimer);
    const worker = this.#worker;
    if (!worker) return;
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    const stopped = new Promise<void>((resolve) => {
      worker.on('message', (message: FromWorker) => {
        if (message.type !== 'stopped') return;
        if (message.error) this.#logger.error({ event: 'delivery_thread_error', err: message.error }, 'error while stopping deliveries');
        resolve();
      });
    });
    worker.postMessage({ type: 'stop', graceMs } satisfies ToWorker);
    // The runner's own stop gives up after the grace and a short abort wait; this is a backstop.
    const backstop = setTimeout(() => void worker.terminate(), graceMs + 10_000);
    await Promise.race([stopped.then(() => exited), exited]);
    clearTimeout(backstop);
  }
}
