// The soak itself, shared by `npm run soak` (run.ts, 20 minutes) and the short variant in the
// test suite (test/soak-short.test.ts, about a minute).
//
// One real Postern process (`node bin/postern.js serve`), three sinks in this process, and a load
// in this process that submits at a steady rate over the submission port (STARTTLS + AUTH) with
// nodemailer: most messages over a pool of connections, one in ten on a connection of its own.
// Every few seconds Postern's VmRSS and open file descriptors are sampled. Then the load stops,
// the queue drains (the deferred recipients settle because the flaky sink accepts them after a
// few 451s and the retries are short), the delivery pool's idle connections time out, and the
// figures are computed: counts checked recipient by recipient (soak-ledger.ts), throughput per
// quarter, and the RSS and fd slopes over the steady part.
//
// Phases, with t = 0 at the first submission:
//   load     [0, duration)            steady rate; samples every sampleSeconds
//   steady   [warmup, duration]       the window the slopes are fitted over
//   drain    load end -> every recipient seen at a sink or in a DSN and `queue list` empty
//   settle   settleSeconds more (longer than the pool's 5 s idle timeout), then the final fd count
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import nodemailer from 'nodemailer';
import { writeBenchCertificate } from '../bench/bench-certificate.js';
import { Ledger, type LedgerTotals } from './soak-ledger.js';
import {
  DESTINATION_MIX,
  FLAKY_MIX,
  MessageFactory,
  MessagePlanner,
  NEW_CONNECTION_SHARE,
  RECIPIENT_COUNT_MIX,
  SIZE_MIX,
  SOAK_SENDER,
  type PlannedMessage,
} from './soak-mix.js';
import { type FdReading, type QueueStatus, SoakPostern } from './soak-postern.js';
import { type SinkCounters, SoakSink } from './soak-sinks.js';
import { leastSquares, perMinute, percentile } from './soak-stats.js';

const MB = 1024 * 1024;

export interface SoakOptions {
  /** A directory for the config, the data dir and the log (created by the caller). */
  dir: string;
  durationSeconds: number;
  /** Messages per second, started on a fixed schedule whatever the replies' pace. */
  rate: number;
  sampleSeconds: number;
  /** Samples before this (seconds into the load) are left out of the slopes. */
  warmupSeconds: number;
  seed: number;
  queue: { firstRetry: string; maxRetryInterval: string; lifetime: string };
  perDestination: number;
  /** 451s the flaky sink gives a defer-* recipient before accepting it. */
  deferAttempts: number;
  slowDelayMs: { min: number; max: number };
  /** Pooled client connections to the submission port. */
  poolConnections: number;
  drainTimeoutSeconds: number;
  /** Wait after the drain before the final fd and RSS reading (the pool's idle timeout is 5 s). */
  settleSeconds: number;
  /** Caps the message sizes (the short test keeps the mix; 0 or absent: no cap). */
  maxMessageSize?: number;
  /** POSTERN_LOG_LEVEL for Postern; absent: the config's (info). */
  logLevel?: string;
  /** Progress lines (stderr in run.ts). */
  progress?: (line: string) => void;
  progressEverySeconds?: number;
}

export const SOAK_DEFAULTS = {
  durationSeconds: 20 * 60,
  rate: 20,
  sampleSeconds: 5,
  warmupSeconds: 60,
  seed: 1,
  queue: { firstRetry: '5s', maxRetryInterval: '30s', lifetime: '1h' },
  perDestination: 20,
  deferAttempts: 2,
  slowDelayMs: { min: 2000, max: 5000 },
  poolConnections: 8,
  drainTimeoutSeconds: 600,
  settleSeconds: 8,
} satisfies Omit<SoakOptions, 'dir'>;

export interface SoakSample {
  /** Seconds since the first submission. */
  t: number;
  rssBytes: number;
  /** RssAnon: the JS heap, malloc, buffers. */
  rssAnonBytes: number;
  fds: FdReading;
  /** Postern's CPU time so far, seconds. */
  cpuSeconds: number;
  /** Recipients accepted but not yet seen at a sink or in a DSN. */
  backlog: number;
  phase: 'load' | 'drain' | 'settle';
}

export interface QuarterFigures {
  fromSeconds: number;
  toSeconds: number;
  acceptedPerMinute: number;
  /** Recipients delivered to a sink or bounced, per minute. */
  settledPerMinute: number;
  /** MAIL FROM ... 250 after DATA, as the client saw it, ms (messages submitted in the quarter). */
  submitP50Ms: number;
  submitP99Ms: number;
  /** Postern's CPU, cores. */
  posternCores: number;
}

export interface SoakResult {
  settings: Omit<SoakOptions, 'progress' | 'dir'> & {
    mix: { sizes: typeof SIZE_MIX; recipientsPerMessage: typeof RECIPIENT_COUNT_MIX; destinations: typeof DESTINATION_MIX; flaky: typeof FLAKY_MIX; newConnectionShare: number };
  };
  dir: string;
  posternPid: number;
  loadSeconds: number;
  drainSeconds: number;
  drained: boolean;
  submissions: {
    attempted: number;
    accepted: number;
    /** Failed submissions (no 250), and the first few errors. */
    failed: number;
    firstErrors: string[];
    /** Messages not started because too many were in flight (the load fell behind). */
    skipped: number;
    bytesAccepted: number;
    onNewConnection: number;
  };
  ledger: LedgerTotals;
  /** Postern's queue after the drain (`postern queue list --json`). */
  queueAfterDrain: QueueStatus;
  spoolFilesAfterDrain: number;
  sinks: Record<string, SinkCounters>;
  throughput: { firstQuarter: QuarterFigures; lastQuarter: QuarterFigures };
  memory: {
    rssSlopeMBPerHour: number;
    rssSlopeR2: number;
    /** The same fit for RssAnon alone. */
    rssAnonSlopeMBPerHour: number;
    /**
     * The lowest RSS sample (the floor between garbage collections) in the first minute of the
     * steady window and in the last minute of the load: less noisy than the maximum.
     */
    rssFloorFirstMinuteBytes: number;
    rssFloorLastMinuteBytes: number;
    fdSlopePerHour: number;
    fdSlopeR2: number;
    /** Samples in the steady window the slopes were fitted over. */
    steadySamples: number;
    rssAtStartBytes: number;
    maxRssBytes: number;
    rssAfterSettleBytes: number;
    fdsAtStart: FdReading;
    maxFds: number;
    fdsAfterSettle: FdReading;
    /** Descriptors open after settling that were not at the start, and the reverse (by target). */
    fdsOpenedSinceStart: string[];
    fdsClosedSinceStart: string[];
    maxBacklog: number;
  };
  posternExitCode: number | null;
  /** Postern's log lines by event, and error/fatal lines. */
  logEvents: Record<string, number>;
  logErrors: number;
  samples: SoakSample[];
}

export async function runSoak(options: SoakOptions): Promise<SoakResult> {
  const o = options;
  const say = o.progress ?? (() => undefined);
  const tag = crypto.randomBytes(6).toString('base64url').toLowerCase().replace(/[^a-z0-9]/g, 'x').slice(0, 8);
  const password = crypto.randomBytes(18).toString('base64url');

  let clock0 = performance.now();
  const secondsNow = () => (performance.now() - clock0) / 1000;
  const acceptedPerSecond: number[] = [];
  const settledPerSecond: number[] = [];
  const bump = (series: number[], n: number) => {
    const s = Math.max(0, Math.floor(secondsNow()));
    series[s] = (series[s] ?? 0) + n;
  };
  const ledger = new Ledger((_kind, n) => bump(settledPerSecond, n));

  const tlsDir = path.join(o.dir, 'sink-tls');
  fs.mkdirSync(tlsDir, { recursive: true, mode: 0o700 });
  await writeBenchCertificate(path.join(tlsDir, 'cert.pem'), path.join(tlsDir, 'key.pem'));
  const sinkSettings = {
    deferAttempts: o.deferAttempts,
    slowDelayMs: o.slowDelayMs,
    tls: { key: fs.readFileSync(path.join(tlsDir, 'key.pem')), cert: fs.readFileSync(path.join(tlsDir, 'cert.pem')) },
  };
  const sinks: SoakSink[] = [];
  let postern: SoakPostern | undefined;
  const transports: { close(): void }[] = [];
  let sampler: NodeJS.Timeout | undefined;
  try {
    for (const d of ['normal', 'flaky', 'slow'] as const) sinks.push(await SoakSink.start(d, ledger, sinkSettings));
    const [normal, flaky, slow] = sinks as [SoakSink, SoakSink, SoakSink];
    postern = await SoakPostern.start(
      {
        dir: o.dir,
        ports: { normal: normal.port, flaky: flaky.port, slow: slow.port },
        queue: o.queue,
        perDestination: o.perDestination,
        logLevel: o.logLevel,
      },
      password,
    );
    const p = postern;
    say(`postern pid ${p.pid}, submission 127.0.0.1:${p.submissionPort}; sinks normal ${normal.port}, flaky ${flaky.port}, slow ${slow.port}`);

    const common = {
      host: '127.0.0.1',
      port: p.submissionPort,
      secure: false,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: SOAK_SENDER, pass: password },
      name: 'client.soak.test',
      connectionTimeout: 15_000,
      greetingTimeout: 15_000,
      socketTimeout: 120_000,
      logger: false,
    };
    const pooled = nodemailer.createTransport({ ...common, pool: true, maxConnections: o.poolConnections, maxMessages: 100 });
    const single = nodemailer.createTransport({ ...common });
    transports.push(pooled, single);

    const planner = new MessagePlanner(o.seed, tag, o.maxMessageSize || undefined);
    const factory = new MessageFactory();
    const samples: SoakSample[] = [];
    let phase: SoakSample['phase'] = 'load';
    const sample = () => {
      const mem = p.memory();
      samples.push({ t: secondsNow(), rssBytes: mem.rss, rssAnonBytes: mem.anon, fds: p.fds(), cpuSeconds: p.cpuSeconds(), backlog: ledger.outstanding, phase });
    };

    // Settle for a moment after start-up, then the fd and RSS baseline.
    await sleep(1000);
    clock0 = performance.now();
    sample();
    const fdTargetsAtStart = p.fdTargets();
    sampler = setInterval(sample, o.sampleSeconds * 1000);

    // ---- load -----------------------------------------------------------------------------
    const submissions = { attempted: 0, accepted: 0, failed: 0, firstErrors: [] as string[], skipped: 0, bytesAccepted: 0, onNewConnection: 0 };
    const latencies: { t: number; ms: number }[] = [];
    const inFlight = new Set<Promise<void>>();
    const maxInFlight = Math.max(50, Math.ceil(o.rate * 10));
    const submit = async (message: PlannedMessage) => {
      const raw = factory.build(message);
      const started = performance.now();
      const transport = message.newConnection ? single : pooled;
      try {
        const info = await transport.sendMail({ envelope: { from: SOAK_SENDER, to: message.recipients.map((r) => r.address) }, raw });
        if (info.rejected.length > 0) throw new Error(`recipients refused: ${info.rejected.join(', ')} ${info.response ?? ''}`);
        submissions.accepted++;
        submissions.bytesAccepted += raw.length;
        if (message.newConnection) submissions.onNewConnection++;
        bump(acceptedPerSecond, 1);
        latencies.push({ t: (started - clock0) / 1000, ms: performance.now() - started });
        ledger.accepted(message);
      } catch (err) {
        submissions.failed++;
        if (submissions.firstErrors.length < 5) submissions.firstErrors.push(`${message.messageId}: ${(err as Error).message}`);
      }
    };
    let serial = 0;
    let lastProgress = 0;
    const progressEvery = o.progressEverySeconds ?? 60;
    await new Promise<void>((resolve, reject) => {
      const tick = setInterval(() => {
        const t = secondsNow();
        if (p.child.exitCode !== null || p.child.signalCode !== null) {
          clearInterval(tick);
          reject(new Error(`Postern exited during the load (${p.child.exitCode ?? p.child.signalCode}); see ${p.logFile}`));
          return;
        }
        const due = Math.min(Math.floor(t * o.rate), Math.floor(o.durationSeconds * o.rate));
        while (serial < due) {
          if (inFlight.size >= maxInFlight) {
            submissions.skipped += due - serial;
            serial = due;
            break;
          }
          const message = planner.plan(serial++);
          submissions.attempted++;
          const run = submit(message).finally(() => inFlight.delete(run));
          inFlight.add(run);
        }
        if (t - lastProgress >= progressEvery) {
          lastProgress = t;
          const last = samples.at(-1);
          say(
            `${formatClock(t)} accepted ${submissions.accepted} (${submissions.failed} failed, ${submissions.skipped} skipped), ` +
              `backlog ${ledger.outstanding} recipients, in flight ${inFlight.size}; RSS ${((last?.rssBytes ?? 0) / MB).toFixed(1)} MB, fds ${last?.fds.total ?? 0}`,
          );
        }
        if (t >= o.durationSeconds) {
          clearInterval(tick);
          resolve();
        }
      }, 20);
    });
    const loadSeconds = secondsNow();
    say(`${formatClock(loadSeconds)} load stopped; waiting for ${inFlight.size} submissions in flight`);
    await Promise.all([...inFlight]);
    for (const t of transports) t.close();
    transports.length = 0;

    // ---- drain ----------------------------------------------------------------------------
    phase = 'drain';
    const drainStart = performance.now();
    const drainElapsed = () => (performance.now() - drainStart) / 1000;
    let queueAfterDrain: QueueStatus;
    let drained = false;
    let lastDrainNote = 0;
    for (;;) {
      if (p.child.exitCode !== null) throw new Error(`Postern exited during the drain (${p.child.exitCode}); see ${p.logFile}`);
      if (ledger.outstanding === 0) {
        queueAfterDrain = await p.queueStatus();
        if (queueAfterDrain.messages === 0) {
          drained = true;
          break;
        }
      }
      if (drainElapsed() > o.drainTimeoutSeconds) {
        queueAfterDrain = await p.queueStatus();
        break;
      }
      if (drainElapsed() - lastDrainNote >= 30) {
        lastDrainNote = drainElapsed();
        say(`draining: ${ledger.outstanding} recipients not seen yet (${drainElapsed().toFixed(0)} s)`);
      }
      await sleep(500);
    }
    const drainSeconds = drainElapsed();
    const spoolFilesAfterDrain = p.spoolFiles();
    say(`${drained ? 'drained' : 'NOT drained'} in ${drainSeconds.toFixed(1)} s; settling ${o.settleSeconds} s for idle connections to close`);

    // ---- settle ---------------------------------------------------------------------------
    phase = 'settle';
    await sleep(o.settleSeconds * 1000);
    clearInterval(sampler);
    sampler = undefined;
    sample();
    const final = samples.at(-1)!;
    const fdsOpenedSinceStart = multisetMinus(p.fdTargets(), fdTargetsAtStart);
    const fdsClosedSinceStart = multisetMinus(fdTargetsAtStart, p.fdTargets());

    const posternExitCode = await p.stop();
    postern = undefined;
    const { events: logEvents, errors: logErrors } = await countLogEvents(p.logFile);

    // ---- figures --------------------------------------------------------------------------
    const steady = samples.filter((s) => s.phase === 'load' && s.t >= o.warmupSeconds);
    const rssFit = leastSquares(steady.map((s) => ({ x: s.t, y: s.rssBytes })));
    const anonFit = leastSquares(steady.map((s) => ({ x: s.t, y: s.rssAnonBytes })));
    const floor = (from: number, to: number) => {
      const within = steady.filter((s) => s.t >= from && s.t <= to).map((s) => s.rssBytes);
      return within.length ? Math.min(...within) : 0;
    };
    const fdFit = leastSquares(steady.map((s) => ({ x: s.t, y: s.fds.total })));
    const quarter = (from: number, to: number): QuarterFigures => {
      const within = latencies.filter((l) => l.t >= from && l.t < to).map((l) => l.ms);
      const cpuAt = (t: number) => interpolateCpu(samples, t);
      return {
        fromSeconds: from,
        toSeconds: to,
        acceptedPerMinute: perMinute(acceptedPerSecond, from, to),
        settledPerMinute: perMinute(settledPerSecond, from, to),
        submitP50Ms: percentile(within, 50),
        submitP99Ms: percentile(within, 99),
        posternCores: to > from ? (cpuAt(to) - cpuAt(from)) / (to - from) : 0,
      };
    };
    const q = loadSeconds / 4;
    const { progress: _progress, dir: _dir, ...settings } = o;
    return {
      settings: {
        ...settings,
        mix: { sizes: SIZE_MIX, recipientsPerMessage: RECIPIENT_COUNT_MIX, destinations: DESTINATION_MIX, flaky: FLAKY_MIX, newConnectionShare: NEW_CONNECTION_SHARE },
      },
      dir: o.dir,
      posternPid: p.pid,
      loadSeconds,
      drainSeconds,
      drained,
      submissions,
      ledger: ledger.totals(),
      queueAfterDrain: queueAfterDrain!,
      spoolFilesAfterDrain,
      sinks: Object.fromEntries(sinks.map((s) => [s.destination, s.counters])),
      throughput: { firstQuarter: quarter(0, q), lastQuarter: quarter(3 * q, loadSeconds) },
      memory: {
        rssSlopeMBPerHour: (rssFit.slope * 3600) / MB,
        rssSlopeR2: rssFit.r2,
        rssAnonSlopeMBPerHour: (anonFit.slope * 3600) / MB,
        rssFloorFirstMinuteBytes: floor(o.warmupSeconds, o.warmupSeconds + 60),
        rssFloorLastMinuteBytes: floor(loadSeconds - 60, loadSeconds),
        fdSlopePerHour: fdFit.slope * 3600,
        fdSlopeR2: fdFit.r2,
        steadySamples: steady.length,
        rssAtStartBytes: samples[0]!.rssBytes,
        maxRssBytes: Math.max(...samples.map((s) => s.rssBytes)),
        rssAfterSettleBytes: final.rssBytes,
        fdsAtStart: samples[0]!.fds,
        maxFds: Math.max(...samples.map((s) => s.fds.total)),
        fdsAfterSettle: final.fds,
        fdsOpenedSinceStart,
        fdsClosedSinceStart,
        maxBacklog: Math.max(...samples.map((s) => s.backlog)),
      },
      posternExitCode,
      logEvents,
      logErrors,
      samples,
    };
  } finally {
    if (sampler) clearInterval(sampler);
    for (const t of transports) t.close();
    if (postern) await postern.stop(5000);
    await Promise.all(sinks.map((s) => s.close()));
  }
}

/** The items of `a` not matched by one in `b` (both sorted or not; duplicates count). */
function multisetMinus(a: string[], b: string[]): string[] {
  const left = new Map<string, number>();
  for (const x of b) left.set(x, (left.get(x) ?? 0) + 1);
  const out: string[] = [];
  for (const x of a) {
    const n = left.get(x) ?? 0;
    if (n > 0) left.set(x, n - 1);
    else out.push(x);
  }
  return out;
}

/** Postern's CPU seconds at time t, interpolated between the samples around it. */
function interpolateCpu(samples: SoakSample[], t: number): number {
  let before = samples[0]!;
  for (const s of samples) {
    if (s.t <= t) before = s;
    else {
      if (s.t === before.t) return s.cpuSeconds;
      return before.cpuSeconds + ((s.cpuSeconds - before.cpuSeconds) * (t - before.t)) / (s.t - before.t);
    }
  }
  return before.cpuSeconds;
}

/** Counts the JSON log lines by `event`, and those at level error or fatal. */
async function countLogEvents(file: string): Promise<{ events: Record<string, number>; errors: number }> {
  const events: Record<string, number> = {};
  let errors = 0;
  const lines = createInterface({ input: fs.createReadStream(file, 'utf8'), crlfDelay: Number.POSITIVE_INFINITY });
  for await (const line of lines) {
    const event = /"event":"([^"]+)"/.exec(line)?.[1];
    if (event) events[event] = (events[event] ?? 0) + 1;
    if (/"level":"(error|fatal)"/.test(line)) errors++;
  }
  return { events, errors };
}

export function formatClock(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}
