// The delivery side of `postern serve`, in a worker thread (see delivery-thread.ts for why): its
// own connection to the store, the queue runner, and a logger whose lines go to the main thread,
// which writes them with its own (one stream, whole lines, never interleaved).
import { parentPort, workerData } from 'node:worker_threads';
import { type Config, ConfigError } from '../config/load-config.js';
import { createLogger } from '../observe/logger.js';
import { SecurityEvents } from '../policy/security-events.js';
import { MemoryRelief } from '../runtime/memory-relief.js';
import { openStore } from '../store/open-store.js';
import type { Store } from '../store/store.js';
import { lowerThisThreadsPriority, type ToWorker, type WorkerData } from './delivery-thread.js';
import { QueueRunner } from './queue-runner.js';

const port = parentPort;
if (!port) throw new Error('delivery-worker.js runs as a worker thread of `postern serve`');

const { config, logLevel } = workerData as WorkerData;

// Log lines travel to the main thread in batches: at LOG_BATCH_BYTES, else LOG_BATCH_MS after the
// first line. A message per event-loop turn woke the main thread for every delivery, 4% of this
// thread's CPU when draining a queue; the main thread's own log is written in 4 KB batches too
// (observe/logger.ts). Stopping flushes what is left.
const LOG_BATCH_BYTES = 16 * 1024;
const LOG_BATCH_MS = 50;
let pending = '';
let flushTimer: NodeJS.Timeout | undefined;
const flushLogs = () => {
  clearTimeout(flushTimer);
  flushTimer = undefined;
  if (pending) port.postMessage({ type: 'log', text: pending });
  pending = '';
};
const logger = createLogger({
  level: logLevel,
  destination: {
    write(line: string) {
      pending += line;
      if (pending.length >= LOG_BATCH_BYTES) flushLogs();
      else flushTimer ??= setTimeout(flushLogs, LOG_BATCH_MS);
    },
  },
}).child({ thread: 'delivery' });

/** How often the store gets its upkeep (SQLite: a WAL checkpoint), see Store.housekeeping. */
const HOUSEKEEPING_MS = 5000;

let store: Store | undefined;
let runner: QueueRunner | undefined;
let housekeeping: NodeJS.Timeout | undefined;
// This thread's isolate has its own dead buffers after a burst: the main thread's relief
// collects only its own heap (malloc_trim, process-wide, is harmless twice).
const relief = new MemoryRelief({ logger, releaseCaches: () => store?.releaseMemory?.() });

async function start(): Promise<void> {
  if ((config as Config).delivery.thread_priority === 'low') {
    const nice = lowerThisThreadsPriority();
    logger.debug({ event: 'delivery_thread_priority', nice }, 'delivery thread priority lowered');
  }
  store = await openStore((config as Config).dataDir);
  // Upstream problems found here are stored and alerted from this thread, with its own store
  // connection; an alert mail it queues is this runner's to deliver.
  const events = new SecurityEvents({ store, logger, config: config as Config, onQueued: () => runner?.notify() });
  runner = new QueueRunner({ store, config, logger, events });
  await runner.start();
  relief.start();
  const upkeep = store;
  housekeeping = setInterval(() => {
    upkeep.housekeeping?.().catch((err: Error) => logger.warn({ event: 'housekeeping_error', err: err.message }, 'store upkeep failed'));
  }, HOUSEKEEPING_MS);
}

async function stop(graceMs: number): Promise<void> {
  clearInterval(housekeeping);
  relief.stop();
  await runner?.stop(graceMs);
  await store?.close();
  flushLogs();
}

start().then(
  () => port.postMessage({ type: 'ready' }),
  (err: Error) => {
    flushLogs();
    // A configuration problem found here (an upstream's secret file, say) must stop start-up as
    // one (exit code 2, file and reasons), not as a crash.
    const config = err instanceof ConfigError ? { file: err.file, problems: err.problems } : undefined;
    port.postMessage({ type: 'failed', message: err.message, config });
  },
);

port.on('message', (message: ToWorker) => {
  if (message.type === 'notify') runner?.notify();
  else if (message.type === 'stop') {
    stop(message.graceMs).then(
      () => {
        port.postMessage({ type: 'stopped' });
        port.close();
      },
      (err: Error) => {
        flushLogs();
        port.postMessage({ type: 'stopped', error: err.message });
        port.close();
      },
    );
  }
});
