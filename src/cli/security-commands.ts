// `postern security events|audit`: what the policy refused or noticed, and who changed what.
import type { Command } from 'commander';
import { UsageError, formatTime, printJson, printTable, withStore } from './cli-context.js';

/** "30m", "1h", "7d" -> a time that far back; "all" -> 0. */
function since(value: string | undefined, fallbackMs: number): number {
  if (value === 'all') return 0;
  if (value === undefined) return Date.now() - fallbackMs;
  const m = /^(\d+)(m|h|d)$/.exec(value);
  if (!m) throw new UsageError(`--since takes a duration such as 30m, 12h or 7d (or "all"), not "${value}"`);
  const unit = { m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 'm' | 'h' | 'd'];
  return Date.now() - Number(m[1]) * unit;
}

export function registerSecurityCommands(program: Command): void {
  const security = program.command('security').description('security events and the audit log');

  security
    .command('events')
    .description('lockouts, failed logins, rate-limit hits, send-as denials, new networks, volume spikes')
    .option('--since <duration>', 'how far back: 30m, 12h, 7d or all', '1d')
    .option('--json', 'machine-readable output')
    .action(async (opts: { since: string; json?: boolean }, cmd: Command) => {
      const events = await withStore(cmd, (store) => store.listSecurityEvents({ since: since(opts.since, 86_400_000) }));
      // Oldest first by time (the store lists by insertion; an event may carry an earlier time).
      events.sort((a, b) => a.at - b.at || a.id - b.id);
      if (opts.json) return printJson(events.map((e) => ({ ...e, at: new Date(e.at).toISOString() })));
      if (events.length === 0) {
        process.stdout.write(`No security events since ${opts.since === 'all' ? 'the start' : formatTime(since(opts.since, 0))}.\n`);
        return;
      }
      printTable(
        ['TIME', 'KIND', 'ACCOUNT', 'ADDRESS', 'LISTENER', 'WHAT'],
        events.map((e) => [formatTime(e.at), e.kind, e.account ?? '-', e.ip ?? '-', e.listener ?? '-', e.detail.message]),
      );
    });

  security
    .command('audit')
    .description('admin changes: accounts created, removed, limits and flags changed, and by whom')
    .option('--since <duration>', 'how far back: 30m, 12h, 7d or all', '30d')
    .option('--json', 'machine-readable output')
    .action(async (opts: { since: string; json?: boolean }, cmd: Command) => {
      const entries = await withStore(cmd, (store) => store.listAudit({ since: since(opts.since, 30 * 86_400_000) }));
      if (opts.json) return printJson(entries.map((e) => ({ ...e, at: new Date(e.at).toISOString() })));
      if (entries.length === 0) {
        process.stdout.write('No admin changes in that period.\n');
        return;
      }
      printTable(
        ['TIME', 'WHO', 'ACTION', 'TARGET', 'DETAIL'],
        entries.map((e) => [formatTime(e.at), e.actor, e.action, e.target, JSON.stringify(e.detail)]),
      );
    });
}
