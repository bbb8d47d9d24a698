// The figures the bench produces, the targets from the issue, and the table printed at the end.
// Targets are judged here and only here, so the table, the JSON and docs/benchmarks.md agree.
import { type UpstreamBenchFigures, formatUpstreamFigures } from './upstream-bench.js';
import type { MachineInfo, MemoryBreakdown } from './proc-stats.js';

export type PortKind = 'submission' | 'relay';

export interface ScenarioFigures {
  server: string;
  port: PortKind;
  mode: 'new' | 'reuse';
  concurrency: number;
  messagesPerSecond: number;
  measured: number;
  accepted: number;
  errors: number;
  firstErrors: string[];
  transactionP50Ms: number;
  transactionP99Ms: number;
  sessionP50Ms: number | null;
  sessionP99Ms: number | null;
  /**
   * CPU in cores during the window: the server under test, the load workers, the sink, and the
   * rest of the machine (other processes, and kernel work not charged to a process).
   */
  cpu: { server: number; client: number; sink: number; other: number; serverSystem: number };
  /** Postern only: seconds until the sink had every message accepted so far. */
  drainSeconds?: number;
  /** cpuCheckMs() just before this scenario (lower is faster). */
  cpuCheckMs?: number;
  /**
   * Postern only: messages it had accepted before this scenario. The policy's rolling 24-hour
   * usage grows with it (all bench mail is one account), so later scenarios carry more history.
   */
  posternAcceptedBefore?: number;
  /**
   * Which pass over the concurrency-50 pairs (BENCH_ROUNDS): 1 for the first, which also runs the
   * other concurrencies; absent in the rows that are not part of a pair. For the warm rows (server
   * name ending in WARM), which warm round (BENCH_WARM_ROUNDS).
   */
  round?: number;
}

export interface EndToEndFigures {
  accepted: number;
  delivered: number;
  loadSeconds: number;
  /** First submission to the last arrival at the sink. */
  totalSeconds: number;
  messagesPerSecond: number;
  acceptedPerSecond: number;
  cpu: { server: number; client: number; sink: number; other: number };
}

/** VmRSS of a server before and with many greeted, silent TCP connections. */
export interface IdleFigures {
  server: string;
  /** 'after warm-up' (early in the run) or 'after load' (after every throughput scenario). */
  phase: string;
  connections: number;
  greeted: number;
  failed: number;
  rssBeforeBytes: number;
  /** Highest VmRSS sampled while the connections were being opened and held. */
  rssWithIdleBytes: number;
  /** Lowest VmRSS in the 2 s the connections were held (after a collection, say). */
  rssWithIdleLowestBytes: number;
  /** Where the RSS was at the end of the 2 s (anonymous, file-backed, the main thread's malloc heap). */
  breakdown?: MemoryBreakdown;
}

/** VmRSS of a server while it receives one message just under max_message_size. */
export interface BigMessageFigures {
  server: string;
  bytes: number;
  rssBeforeBytes: number;
  /** Highest sampled VmRSS from the start of the transfer to the 250. */
  peakReceiveBytes: number;
  /** Highest sampled VmRSS until the sink had the message (Postern delivering it included). */
  peakWithDeliveryBytes: number | null;
  hwmBeforeBytes: number;
  hwmAfterBytes: number;
  samples: number;
  seconds: number;
}

export interface TargetResult {
  name: string;
  value: string;
  target: string;
  pass: boolean;
}

export interface BenchResults {
  startedAt: string;
  durationSeconds: number;
  machine: MachineInfo;
  /** cpuCheckMs() at the start, before each scenario pair, and at the end of the run. */
  cpuChecksMs: number[];
  settings: Record<string, unknown>;
  ceilingNote: string;
  scenarios: ScenarioFigures[];
  endToEnd: EndToEndFigures | null;
  /** Postern's VmRSS right after "Postern ready", before any connection. */
  posternRssAtStartBytes: number;
  idle: IdleFigures[];
  bigMessage: BigMessageFigures[];
  /**
   * The same 587 c=50 loads against a Postern with the policy on and a second one with it off, in
   * rounds that alternate which side goes first (BENCH_POLICY_ROUNDS).
   */
  policyOverhead: { mode: 'new' | 'reuse'; rounds: PolicyRound[] }[];
  /** 1,000 messages through the Microsoft 365 upstream stand-in (src/bench/upstream-bench.ts). */
  upstream: UpstreamBenchFigures | null;
  targets: TargetResult[];
}

export function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return 0;
  const sorted = Float64Array.from(samples).sort();
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

const MB = 1024 * 1024;

/**
 * The suffix of a server's name in its warm rows: measured in a block of its own after unmeasured
 * load, with no quiet second before them (run.ts says why). The accept targets judge these.
 */
export const WARM = '-warm';

/** Which ceiling a Postern scenario is compared with: same protocol work, no durability. */
export function ceilingFor(port: PortKind): string {
  return port === 'submission' ? 'ceiling-tls' : 'ceiling-plain';
}

/** The durable ceiling for a port: the same server as ceilingFor(), keeping each message on disk. */
export function durableCeilingFor(port: PortKind): string {
  return port === 'submission' ? 'ceiling-durable-tls' : 'ceiling-durable-plain';
}

/** The scenario of the first round (the only one below concurrency 50). */
function find(results: BenchResults, server: string, port: PortKind, mode: 'new' | 'reuse', c: number): ScenarioFigures | undefined {
  return results.scenarios.find((s) => s.server === server && s.port === port && s.mode === mode && s.concurrency === c && (s.round ?? 1) === 1);
}

/** One round of a concurrency-50 pair: the ceiling, Postern right after it, then the durable ceiling. */
interface PairRound {
  round: number;
  ceiling: ScenarioFigures;
  postern: ScenarioFigures;
  durable: ScenarioFigures | undefined;
  ratio: number;
}

/**
 * Every round of the concurrency-50 pair for a port and mode, in order: the paired rows (ceiling,
 * then Postern), or with `suffix` WARM the warm rows.
 */
function pairRounds(results: BenchResults, port: PortKind, mode: 'new' | 'reuse', suffix = ''): PairRound[] {
  const at = (server: string, round: number) =>
    results.scenarios.find((s) => s.server === server && s.port === port && s.mode === mode && s.concurrency === 50 && (s.round ?? 1) === round);
  const rounds: PairRound[] = [];
  for (const round of [...new Set(results.scenarios.map((s) => s.round ?? 1))].sort((a, b) => a - b)) {
    const ceiling = at(`${ceilingFor(port)}${suffix}`, round);
    const postern = at(`postern${suffix}`, round);
    if (!ceiling || !postern) continue;
    const ratio = ceiling.messagesPerSecond > 0 ? postern.messagesPerSecond / ceiling.messagesPerSecond : 0;
    // The durable ceiling runs only in the paired rounds; a warm round of the same number is not its pair.
    const durable = suffix === '' ? at(durableCeilingFor(port), round) : undefined;
    rounds.push({ round, ceiling, postern, durable, ratio });
  }
  return rounds;
}

/** The median (the lower middle one for an even count, so a tie never rounds a target up). */
function median(values: number[]): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}

export interface PolicyRound {
  on: number;
  off: number;
}

function policyRatio(r: PolicyRound): number {
  return r.off > 0 ? r.on / r.off : 0;
}

/**
 * The median round: the one whose ratio is the median (the lower middle one for an even count);
 * its rates are the ones printed.
 */
function medianRound<R>(rounds: R[], ratio: (r: R) => number): R | undefined {
  const m = median(rounds.map(ratio));
  return rounds.find((r) => ratio(r) === m);
}

const pairRatio = (r: PairRound) => r.ratio;

/**
 * The rounds a c=50 accept target is judged on: the warm ones when the run has them, else the
 * paired ones; with the median round among them. The targets and the main table both ask here.
 */
function judgedRounds(results: BenchResults, port: PortKind, mode: 'new' | 'reuse'): { warm: boolean; rounds: PairRound[]; median: PairRound | undefined } {
  const warm = pairRounds(results, port, mode, WARM);
  const rounds = warm.length ? warm : pairRounds(results, port, mode);
  return { warm: warm.length > 0, rounds, median: medianRound(rounds, pairRatio) };
}

/**
 * A round-by-round table's rows for every port and mode with at least `minRounds` rounds (the
 * paired rows, or with `suffix` WARM the warm ones): port and mode, round, the CPU check, then
 * `cells`; then a median row, its ratio placed by `medianCells`.
 */
function roundByRound(
  results: BenchResults,
  suffix: string,
  minRounds: number,
  cells: (r: PairRound) => string[],
  medianCells: (ratio: string) => string[],
): string[][] {
  const rows: string[][] = [];
  for (const port of ['submission', 'relay'] as const) {
    for (const mode of ['new', 'reuse'] as const) {
      const rounds = pairRounds(results, port, mode, suffix);
      if (rounds.length < minRounds) continue;
      for (const r of rounds) rows.push([label(port, mode), String(r.round), num(r.ceiling.cpuCheckMs, 0), ...cells(r)]);
      rows.push([label(port, mode), 'median', '', ...medianCells(pct(median(rounds.map((r) => r.ratio))))]);
    }
  }
  return rows;
}

/** The issue's targets, judged on this run. */
export function judgeTargets(results: BenchResults): TargetResult[] {
  const targets: TargetResult[] = [];
  for (const p of results.policyOverhead) {
    const shown = medianRound(p.rounds, policyRatio);
    if (!shown) continue;
    const ratio = policyRatio(shown);
    targets.push({
      name: `accept 587 ${p.mode === 'new' ? 'new conn/msg' : 'reused conn'} c=50, policy on vs off`,
      value: `${shown.on.toFixed(0)}/${shown.off.toFixed(0)} = ${pct(ratio)}${
        p.rounds.length > 1 ? ` (median of ${p.rounds.length} rounds: ${p.rounds.map((r) => pct(policyRatio(r))).join(', ')})` : ''
      }`,
      target: '>= 85%',
      pass: ratio >= 0.85,
    });
  }
  for (const port of ['submission', 'relay'] as const) {
    for (const mode of ['new', 'reuse'] as const) {
      // Judged on the warm rows when the run has them; the paired rows (each after a quiet spell)
      // are shown beside them.
      const judged = judgedRounds(results, port, mode);
      const m = judged.median;
      if (!m) continue;
      const rate = (rounds: PairRound[], r: PairRound) =>
        `${r.postern.messagesPerSecond.toFixed(0)}/${r.ceiling.messagesPerSecond.toFixed(0)} = ${pct(r.ratio)}${
          rounds.length > 1 ? ` (median of ${rounds.length} rounds: ${rounds.map((x) => pct(x.ratio)).join(', ')})` : ''
        }`;
      const paired = pairRounds(results, port, mode);
      const pairedMedian = medianRound(paired, pairRatio);
      targets.push({
        name: `accept ${label(port, mode)} c=50 vs ${ceilingFor(port)}`,
        value: judged.warm ? `warm ${rate(judged.rounds, m)}${pairedMedian ? `; after a quiet spell ${rate(paired, pairedMedian)}` : ''}` : rate(paired, m),
        target: '>= 70%',
        pass: m.ratio >= 0.7,
      });
    }
  }
  const e2e = results.endToEnd;
  // The ceiling's median rate over the rounds: one end-to-end run against the typical ceiling.
  const ceilingRates = pairRounds(results, 'submission', 'reuse').map((r) => r.ceiling.messagesPerSecond);
  if (e2e && ceilingRates.length) {
    const ceiling = median(ceilingRates);
    const ratio = ceiling > 0 ? e2e.messagesPerSecond / ceiling : 0;
    targets.push({
      name: `end-to-end (587 reuse c=50 -> sink) vs ceiling-tls reuse c=50${ceilingRates.length > 1 ? ' (its median)' : ''}`,
      value: `${e2e.messagesPerSecond.toFixed(0)}/${ceiling.toFixed(0)} = ${pct(ratio)}`,
      target: '>= 50%',
      pass: ratio >= 0.5,
    });
  }
  const idle = results.idle.filter((m) => m.server === 'postern');
  if (idle.length) {
    // The worse of the two phases: a relay that has been busy keeps the memory it grew.
    const worst = idle.reduce((a, b) => (b.rssWithIdleBytes > a.rssWithIdleBytes ? b : a));
    targets.push({
      name: `RSS with ${worst.connections} idle connections (worst phase: ${worst.phase})`,
      value: `${mb(worst.rssWithIdleBytes)} (${worst.greeted} greeted)`,
      target: '< 150 MB',
      pass: worst.rssWithIdleBytes < 150 * MB && worst.greeted === worst.connections,
    });
  }
  const big = results.bigMessage.find((m) => m.server === 'postern');
  if (big) {
    const raise = big.peakReceiveBytes - big.rssBeforeBytes;
    targets.push({
      name: `RSS raise receiving one ${mb(big.bytes)} message`,
      value: mb(raise),
      target: '< 20 MB',
      pass: raise < 20 * MB,
    });
  }
  const u = results.upstream;
  if (u) {
    const over = u.violations.messages + u.violations.connections + u.violations.recipients;
    targets.push({
      name: `Microsoft 365 upstream: ${u.messages} messages, failures and limit overruns`,
      value: `${u.messages - u.arrived} missing, ${u.deferred} deferred, ${u.failed} failed, ${over} over the limit`,
      target: '0',
      pass: u.arrived === u.messages && u.deferred === 0 && u.failed === 0 && over === 0,
    });
    targets.push({
      name: 'Microsoft 365 upstream: achieved rate vs configured limit',
      value: `${u.achievedPerSecond.toFixed(1)}/${u.limitPerSecond.toFixed(1)} = ${(u.ratio * 100).toFixed(1)}%`,
      target: 'within 5%',
      pass: Math.abs(u.ratio - 1) <= 0.05,
    });
  }
  return targets;
}

export function label(port: PortKind, mode: 'new' | 'reuse'): string {
  return `${port === 'submission' ? '587 STARTTLS+AUTH' : 'relay plain'}, ${mode === 'new' ? 'new conn/msg' : 'reused conn'}`;
}

/** Server cores, with the kernel's share in parentheses: "1.02(0.48)". */
const srv = (s: ScenarioFigures) => `${s.cpu.server.toFixed(2)}(${s.cpu.serverSystem.toFixed(2)})`;
const pct = (r: number) => `${(r * 100).toFixed(0)}%`;
/** a's rate as a share of b's, or '-' when either is missing. */
const rateRatio = (a: ScenarioFigures | undefined, b: ScenarioFigures | undefined) =>
  a && b && b.messagesPerSecond > 0 ? pct(a.messagesPerSecond / b.messagesPerSecond) : '-';
/** Server (kernel), load generator and other cores, for the rows of a server without a sink. */
const cpuNoSink = (s: ScenarioFigures) => `${srv(s)}/${s.cpu.client.toFixed(2)}/${s.cpu.other.toFixed(2)}`;
/** The cells a diagnostic row starts with: the scenario, its rate and its median transaction. */
const scenarioCells = (s: ScenarioFigures) => [label(s.port, s.mode), String(s.concurrency), num(s.messagesPerSecond, 0), num(s.transactionP50Ms)];
const mb = (bytes: number) => `${(bytes / MB).toFixed(1)} MB`;
const num = (v: number | null | undefined, digits = 1) => (v == null ? '-' : v.toFixed(digits));

export function formatReport(results: BenchResults, jsonFile: string): string {
  const out: string[] = [];
  const m = results.machine;
  out.push(
    '',
    `Postern benchmark, ${results.startedAt}, ${results.durationSeconds.toFixed(0)} s`,
    `Machine: ${m.cpus} x ${m.cpuModel}, ${(m.memoryBytes / 1024 ** 3).toFixed(1)} GiB, ${m.kernel}, Node ${m.node}`,
    `Disk: ${m.disk}; 4 KiB write+fsync median ${m.fsyncMedianMs.toFixed(2)} ms; file create in Postern's spool dir median ${m.spoolCreateMedianMs?.toFixed(3) ?? '-'} ms`,
    `Load average at start: ${m.loadAverage.map((l) => l.toFixed(2)).join(' ')}`,
    cpuCheckLine(results.cpuChecksMs),
    `Ceiling: ${results.ceilingNote}`,
    `Settings: ${Object.entries(results.settings).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(',') : String(v)}`).join(' ')}`,
  );
  const header = ['port, mode', 'c', 'Postern/s', 'txn p50', 'txn p99', 'sess p50', 'sess p99', 'CPU srv(sys)/cli/sink/oth', 'ceiling/s', 'CPU srv(sys)/cli/oth', 'ratio', 'target', ''];
  const rows: string[][] = [];
  for (const port of ['submission', 'relay'] as const) {
    for (const mode of ['new', 'reuse'] as const) {
      for (const c of [...new Set(results.scenarios.map((s) => s.concurrency))].sort((a, b) => a - b)) {
        const p = find(results, 'postern', port, mode, c);
        const ceil = find(results, ceilingFor(port), port, mode, c);
        if (!p && !ceil) continue;
        const ratio = p && ceil && ceil.messagesPerSecond > 0 ? p.messagesPerSecond / ceil.messagesPerSecond : null;
        // Judged as the targets are (judgedRounds): with one paired round and no warm ones, that is this row.
        const verdict = c === 50 ? judgedRounds(results, port, mode) : undefined;
        const judgedRatio = verdict && ratio !== null ? (verdict.median?.ratio ?? ratio) : null;
        const judged = judgedRatio !== null;
        rows.push([
          label(port, mode),
          String(c),
          num(p?.messagesPerSecond, 0),
          num(p?.transactionP50Ms),
          num(p?.transactionP99Ms),
          num(p?.sessionP50Ms),
          num(p?.sessionP99Ms),
          p ? `${srv(p)}/${p.cpu.client.toFixed(2)}/${p.cpu.sink.toFixed(2)}/${p.cpu.other.toFixed(2)}` : '-',
          num(ceil?.messagesPerSecond, 0),
          ceil ? cpuNoSink(ceil) : '-',
          ratio === null ? '-' : pct(ratio),
          judged ? '>=70%' : '',
          judged ? `${verdict?.warm ? 'warm ' : ''}${judgedRatio === ratio ? '' : `median ${pct(judgedRatio!)} `}${judgedRatio! >= 0.7 ? 'PASS' : 'FAIL'}` : '',
        ]);
      }
    }
  }
  if (rows.length) {
    out.push(
      '',
      'Accepted messages/s, 4 KiB messages. Latency = MAIL FROM -> 250 after DATA (txn); for new conn/msg also',
      'TCP connect -> 250 after DATA (session). CPU in cores: Postern or ceiling process (its kernel part in parentheses),',
      'load workers, sink, and the rest of the machine (other processes and kernel work not charged to a process; high',
      'values mean outside interference).',
      '',
      table(header, rows),
    );
  }

  const roundRows = roundByRound(
    results,
    '',
    2,
    (r) => [num(r.ceiling.messagesPerSecond, 0), num(r.postern.messagesPerSecond, 0), pct(r.ratio), num(r.durable?.messagesPerSecond, 0), rateRatio(r.postern, r.durable)],
    (m) => ['', '', m, '', ''],
  );
  if (roundRows.length) {
    out.push(
      '',
      'Concurrency 50, round by round: the ceiling, Postern right after it, then the durable ceiling. Each server',
      'meets its row after sitting idle through the others\' (a quiet spell):',
      table(['port, mode', 'round', 'CPU check ms', 'ceiling/s', 'Postern/s', 'ratio', 'durable/s', 'Postern/durable'], roundRows),
    );
  }

  const cores = (f: ScenarioFigures) => `${f.cpu.server.toFixed(2)}/${f.cpu.client.toFixed(2)}`;
  const warmRows = roundByRound(
    results,
    WARM,
    1,
    (r) => [num(r.ceiling.messagesPerSecond, 0), cores(r.ceiling), num(r.postern.messagesPerSecond, 0), cores(r.postern), pct(r.ratio)],
    (m) => ['', '', '', '', m],
  );
  if (warmRows.length) {
    out.push(
      '',
      'Concurrency 50, warm: each server in a block of its own, its rows back to back after unmeasured',
      'new-connection load, nothing quiet in between (the blocks alternate which comes first). The accept',
      'targets take the median of these rounds\' ratios (the lower middle one for an even count):',
      table(['port, mode', 'round', 'CPU check ms', 'ceiling/s', 'CPU srv/cli', 'Postern/s', 'CPU srv/cli', 'ratio'], warmRows),
    );
  }

  const intakeOnly = results.scenarios.filter((s) => s.server === 'postern-intake-only');
  if (intakeOnly.length) {
    out.push('', 'Diagnostic: Postern with delivery held back (sink paused), i.e. the intake alone; not a target:');
    out.push(
      table(
        ['port, mode', 'c', 'Postern/s', 'txn p50', 'txn p99', 'CPU srv(sys)/cli/oth', 'ceiling/s', 'ratio', 'with delivery'],
        intakeOnly.map((s) => {
          const ceil = find(results, ceilingFor(s.port), s.port, s.mode, s.concurrency);
          const full = find(results, 'postern', s.port, s.mode, s.concurrency);
          return [
            ...scenarioCells(s),
            num(s.transactionP99Ms),
            cpuNoSink(s),
            num(ceil?.messagesPerSecond, 0),
            rateRatio(s, ceil),
            full ? `${num(full.messagesPerSecond, 0)}/s` : '-',
          ];
        }),
      ),
    );
  }

  const durable = results.scenarios.filter((s) => s.server === durableCeilingFor(s.port) && (s.round ?? 1) === 1);
  if (durable.length) {
    out.push(
      '',
      'Durable ceiling: the same bare smtp-server, each message appended to SQLite and its WAL fsync\'d',
      'before the 250 (group commit, fsync on the thread pool: src/bench/durable-append.ts); not a target:',
    );
    out.push(
      table(
        ['port, mode', 'c', 'durable/s', 'txn p50', 'CPU srv(sys)/cli/oth', 'ceiling/s', 'durable/ceiling', 'Postern/s', 'Postern/durable'],
        durable.map((s) => {
          const ceil = find(results, ceilingFor(s.port), s.port, s.mode, s.concurrency);
          const postern = find(results, 'postern', s.port, s.mode, s.concurrency);
          return [
            ...scenarioCells(s),
            cpuNoSink(s),
            num(ceil?.messagesPerSecond, 0),
            rateRatio(s, ceil),
            num(postern?.messagesPerSecond, 0),
            rateRatio(postern, s),
          ];
        }),
      ),
    );
  }

  const stock = results.scenarios.filter((s) => s.server === 'stock-tls');
  if (stock.length) {
    out.push('', 'Stock smtp-server (100 ms wait before each greeting, no TCP_NODELAY), 587-like, for reference:');
    out.push(
      table(
        ['mode', 'c', 'msg/s', 'txn p50', 'sess p50', 'sess p99', 'CPU srv/cli/oth'],
        stock.map((s) => [
          s.mode === 'new' ? 'new conn/msg' : 'reused conn',
          String(s.concurrency),
          num(s.messagesPerSecond, 0),
          num(s.transactionP50Ms),
          num(s.sessionP50Ms),
          num(s.sessionP99Ms),
          `${s.cpu.server.toFixed(2)}/${s.cpu.client.toFixed(2)}/${s.cpu.other.toFixed(2)}`,
        ]),
      ),
    );
  }

  const e2e = results.endToEnd;
  if (e2e) {
    out.push(
      '',
      `End-to-end (587 STARTTLS+AUTH, reused conn, c=50, for ${e2e.loadSeconds.toFixed(0)} s, then until the sink has all):`,
      `  ${e2e.accepted} accepted (${e2e.acceptedPerSecond.toFixed(0)}/s while loading), ${e2e.delivered} at the sink after ${e2e.totalSeconds.toFixed(1)} s: ${e2e.messagesPerSecond.toFixed(0)} messages/s end to end`,
      `  CPU srv/cli/sink/other ${e2e.cpu.server.toFixed(2)}/${e2e.cpu.client.toFixed(2)}/${e2e.cpu.sink.toFixed(2)}/${e2e.cpu.other.toFixed(2)}`,
    );
  }

  if (results.idle.length || results.bigMessage.length) {
    out.push('', `Memory (VmRSS of the server process). Postern at start: ${mb(results.posternRssAtStartBytes)}.`);
  }
  if (results.idle.length) {
    out.push(
      table(
        ['server', 'phase', 'RSS before', 'RSS with idle conns (max)', '(lowest held)', 'greeted', 'anon/file/malloc heap'],
        results.idle.map((x) => [
          x.server,
          x.phase,
          mb(x.rssBeforeBytes),
          mb(x.rssWithIdleBytes),
          mb(x.rssWithIdleLowestBytes),
          `${x.greeted}/${x.connections}`,
          x.breakdown ? `${mb(x.breakdown.anon)} / ${mb(x.breakdown.file)} / ${mb(x.breakdown.mallocHeap)}` : '-',
        ]),
      ),
    );
  }
  if (results.bigMessage.length) {
    out.push('');
    out.push(
      table(
        ['server', 'message', 'RSS before', 'peak to 250', 'raise', 'peak incl. delivery', 'VmHWM before/after', 'seconds'],
        results.bigMessage.map((x) => [
          x.server,
          mb(x.bytes),
          mb(x.rssBeforeBytes),
          mb(x.peakReceiveBytes),
          mb(x.peakReceiveBytes - x.rssBeforeBytes),
          x.peakWithDeliveryBytes === null ? '-' : mb(x.peakWithDeliveryBytes),
          `${mb(x.hwmBeforeBytes)}/${mb(x.hwmAfterBytes)}`,
          x.seconds.toFixed(1),
        ]),
      ),
    );
  }

  if (results.upstream) out.push('', formatUpstreamFigures(results.upstream));

  out.push('', 'Targets:');
  out.push(table(['target', 'measured', 'wanted', ''], results.targets.map((t) => [t.name, t.value, t.target, t.pass ? 'PASS' : 'FAIL'])));
  const errors = results.scenarios.filter((s) => s.errors > 0);
  if (errors.length) {
    out.push('', 'Errors:');
    for (const s of errors) out.push(`  ${s.server} ${label(s.port, s.mode)} c=${s.concurrency}: ${s.errors} (${s.firstErrors.join(' | ')})`);
  }
  out.push('', `Figures as JSON: ${jsonFile}`, '');
  return out.join('\n');
}

function cpuCheckLine(checks: number[]): string {
  if (checks.length === 0) return 'CPU check: not run';
  const sorted = [...checks].sort((a, b) => a - b);
  const min = sorted[0]!;
  const max = sorted[sorted.length - 1]!;
  const median = sorted[Math.floor(sorted.length / 2)]!;
  const drift = max / min - 1;
  const line = `CPU check (fixed integer loop, ${checks.length} times during the run): median ${median.toFixed(0)} ms, min ${min.toFixed(0)}, max ${max.toFixed(0)}`;
  return drift > 0.3
    ? `${line}. WARNING: the machine's speed varied by ${(drift * 100).toFixed(0)}% during the run; compare ratios rather than absolute figures, or rerun on a quiet machine`
    : line;
}

/** Columns padded to width; numbers (and ratios, sizes) right-aligned, the first column left-aligned. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].map((l) => `  ${l}`).join('\n');
}
