// The soak's checks and its printed report (run.ts prints it; the short test prints the same).
import { type SoakResult, formatClock } from './soak.js';

const MB = 1024 * 1024;

export interface SoakCheck {
  name: string;
  pass: boolean;
  detail: string;
}

/** The correctness checks; the slopes are figures, not checks. */
export function soakChecks(r: SoakResult, fdMargin = 5): SoakCheck[] {
  const l = r.ledger;
  const q = r.queueAfterDrain;
  return [
    { name: 'queue drained', pass: r.drained && q.messages === 0, detail: `${q.messages} messages still queued (${q.queued} queued, ${q.inFlight} in flight, ${q.deferred} deferred)` },
    { name: 'every recipient that got 250 seen', pass: l.missing === 0, detail: `${l.missing} missing` },
    {
      name: 'as its sink decided',
      pass: l.wrongOutcome === 0 && l.messageIdMismatch === 0 && l.strays === 0,
      detail: `${l.wrongOutcome} wrong outcome, ${l.messageIdMismatch} Message-ID mismatches, ${l.strays} strays`,
    },
    { name: 'no duplicates', pass: l.duplicates === 0, detail: `${l.duplicates} duplicate deliveries or bounces` },
    { name: 'spool empty', pass: r.spoolFilesAfterDrain === 0, detail: `${r.spoolFilesAfterDrain} spool files after the drain` },
    { name: 'no submission refused', pass: r.submissions.failed === 0, detail: `${r.submissions.failed} failed: ${r.submissions.firstErrors.join(' | ')}` },
    {
      name: `fds back to the start (+${fdMargin})`,
      pass: r.memory.fdsAfterSettle.total <= r.memory.fdsAtStart.total + fdMargin,
      detail: `${r.memory.fdsAtStart.total} at start, ${r.memory.fdsAfterSettle.total} after settling`,
    },
    { name: 'clean stop', pass: r.posternExitCode === 0, detail: `exit code ${r.posternExitCode}` },
  ];
}

function fd(f: { total: number; sockets: number; files: number; other: number }): string {
  return `${f.total} (${f.sockets} sockets, ${f.files} files, ${f.other} other)`;
}

export function formatSoakReport(r: SoakResult, checks: SoakCheck[], jsonFile?: string): string {
  const s = r.submissions;
  const l = r.ledger;
  const m = r.memory;
  const { firstQuarter: f, lastQuarter: z } = r.throughput;
  const steadyFrom = r.settings.warmupSeconds;
  const quarter = (name: string, x: typeof f) =>
    `  ${name.padEnd(14)} ${formatClock(x.fromSeconds)}-${formatClock(x.toSeconds)}  ${x.acceptedPerMinute.toFixed(0).padStart(6)} accepted/min  ` +
    `${x.settledPerMinute.toFixed(0).padStart(6)} recipients settled/min  submit p50 ${x.submitP50Ms.toFixed(0)} ms, p99 ${x.submitP99Ms.toFixed(0)} ms  Postern ${x.posternCores.toFixed(2)} cores`;
  const events = ['delivered', 'deferred', 'failed', 'expired', 'bounced', 'released']
    .map((e) => `${e} ${r.logEvents[e] ?? 0}`)
    .join(', ');
  const lines = [
    '',
    `Postern soak: ${(r.loadSeconds / 60).toFixed(1)} min at ${r.settings.rate}/s (seed ${r.settings.seed}), Postern pid ${r.posternPid}`,
    '',
    `Submissions    ${s.accepted} accepted of ${s.attempted} (${s.failed} failed, ${s.skipped} skipped because the load fell behind), ` +
      `${(s.bytesAccepted / MB).toFixed(0)} MB, ${s.onNewConnection} on a connection of their own`,
    `Recipients     ${l.recipientsAccepted} accepted: ${l.delivered} delivered (normal ${l.deliveredBy.normal}, flaky ${l.deliveredBy.flaky}, slow ${l.deliveredBy.slow}; expected ${l.expectedDelivered}), ` +
      `${l.bounced} bounced (expected ${l.expectedBounced}) in ${l.dsnMessages} DSNs`,
    `Messages       ${l.messagesAccepted} accepted: ${l.messagesFullyDelivered} delivered to every recipient, ${l.messagesWithBounce} with a bounce`,
    `Still queued   ${r.queueAfterDrain.messages} messages (${r.queueAfterDrain.queued} queued, ${r.queueAfterDrain.inFlight} in flight, ${r.queueAfterDrain.deferred} deferred) ` +
      `${r.drained ? 'after a drain of' : 'after giving up on the drain at'} ${r.drainSeconds.toFixed(1)} s; ${r.spoolFilesAfterDrain} spool files`,
    'Throughput',
    quarter('first quarter', f),
    quarter('last quarter', z),
    `RSS            slope ${signed(m.rssSlopeMBPerHour)} MB/hour (R² ${m.rssSlopeR2.toFixed(2)}, ${m.steadySamples} samples, ${formatClock(steadyFrom)} to ${formatClock(r.loadSeconds)}; ` +
      `anonymous memory alone ${signed(m.rssAnonSlopeMBPerHour)} MB/hour); start ${(m.rssAtStartBytes / MB).toFixed(1)} MB, max ${(m.maxRssBytes / MB).toFixed(1)} MB, ` +
      `after settling ${(m.rssAfterSettleBytes / MB).toFixed(1)} MB; floor ${(m.rssFloorFirstMinuteBytes / MB).toFixed(1)} MB in the first steady minute, ` +
      `${(m.rssFloorLastMinuteBytes / MB).toFixed(1)} MB in the last`,
    `Open fds       slope ${signed(m.fdSlopePerHour)} fds/hour (R² ${m.fdSlopeR2.toFixed(2)}); start ${fd(m.fdsAtStart)}, max ${m.maxFds}, after settling ${fd(m.fdsAfterSettle)}` +
      (m.fdsOpenedSinceStart.length ? `; opened since the start: ${m.fdsOpenedSinceStart.slice(0, 10).join(', ')}` : '') +
      (m.fdsClosedSinceStart.length ? `; closed since the start: ${m.fdsClosedSinceStart.slice(0, 10).join(', ')}` : ''),
    `Backlog        at most ${m.maxBacklog} recipients accepted and not yet delivered or bounced (sampled)`,
    `Sinks          ${Object.entries(r.sinks)
      .map(([name, c]) => `${name}: ${c.connections} connections, ${c.transactions} transactions, ${(c.bytes / MB).toFixed(0)} MB, ${c.refusals} refused, ${c.deferrals} deferred`)
      .join('; ')}`,
    `Postern log    ${events}; ${r.logErrors} error lines`,
    '',
    'Checks',
    ...checks.map((c) => `  ${c.pass ? 'PASS' : 'FAIL'}  ${c.name}: ${c.detail}`),
    '',
  ];
  if (jsonFile) lines.push(`JSON: ${jsonFile}`, '');
  return lines.join('\n');
}

function signed(n: number): string {
  return `${n >= 0 ? '+' : ''}${n.toFixed(1)}`;
}
