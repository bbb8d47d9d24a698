// `npm run soak`: Postern under a steady, mixed load for 20 minutes (SOAK_MINUTES), then drained;
// prints the counts, the throughput in the first and last quarter, and the RSS and open-file
// slopes, and writes the same figures as JSON. See soak.ts for the phases and docs/benchmarks.md
// ("Soak") for how to read them.
//
// Environment: SOAK_MINUTES (20), SOAK_RATE (messages/s, 20), SOAK_SAMPLE_SECONDS (5),
// SOAK_WARMUP_SECONDS (60, left out of the slopes), SOAK_SEED (1), SOAK_LOG_LEVEL (Postern's log
// level; default the config's, info), SOAK_KEEP=1 (keep Postern's data dir and log; by default
// only the config and the results stay).
//
// Exit code: 0 when the run held its checks (queue drained, every recipient that got 250
// delivered or bounced as its sink decided, once, no spool file left, no submission refused,
// Postern stopped cleanly); 2 when it ran but a check failed; 1 when it could not run. The slopes
// are reported, not judged.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeMachine } from '../bench/proc-stats.js';
import { formatSoakReport, soakChecks } from './soak-report.js';
import { SOAK_DEFAULTS, runSoak } from './soak.js';

function envNumber(name: string, fallback: number, max: number): number {
  const raw = process.env[name];
  if (!raw) return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0 || n > max) throw new Error(`${name} must be a positive number of at most ${max}, not "${raw}"`);
  return n;
}

function say(line: string): void {
  process.stderr.write(`[soak] ${line}\n`);
}

async function main(): Promise<number> {
  if (process.platform !== 'linux') throw new Error('the soak reads /proc/<pid>/status and /proc/<pid>/fd and runs on Linux only');
  const minutes = envNumber('SOAK_MINUTES', SOAK_DEFAULTS.durationSeconds / 60, 24 * 60);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postern-soak-'));
  say(`temp dir ${dir}`);
  const machine = describeMachine(dir);
  say(`${machine.cpus} CPUs (${machine.cpuModel}), ${(machine.memoryBytes / 1024 ** 3).toFixed(1)} GiB, ${machine.disk}, fsync ${machine.fsyncMedianMs.toFixed(2)} ms`);
  const durationSeconds = minutes * 60;
  const warmupSeconds = Math.min(envNumber('SOAK_WARMUP_SECONDS', SOAK_DEFAULTS.warmupSeconds, 24 * 3600), durationSeconds / 4);
  const result = await runSoak({
    ...SOAK_DEFAULTS,
    dir,
    durationSeconds,
    rate: envNumber('SOAK_RATE', SOAK_DEFAULTS.rate, 10_000),
    sampleSeconds: envNumber('SOAK_SAMPLE_SECONDS', SOAK_DEFAULTS.sampleSeconds, 600),
    warmupSeconds,
    seed: envNumber('SOAK_SEED', SOAK_DEFAULTS.seed, 2 ** 31),
    logLevel: process.env.SOAK_LOG_LEVEL || undefined,
    progress: say,
  });
  const checks = soakChecks(result);
  const jsonFile = path.join(dir, 'soak-results.json');
  fs.writeFileSync(jsonFile, `${JSON.stringify({ machine, ...result, checks }, null, 2)}\n`);
  if (process.env.SOAK_KEEP !== '1') {
    fs.rmSync(path.join(dir, 'data'), { recursive: true, force: true });
    fs.rmSync(path.join(dir, 'postern.log'), { force: true });
  }
  process.stdout.write(formatSoakReport(result, checks, jsonFile));
  return checks.every((c) => c.pass) ? 0 : 2;
}

main().then(
  (code) => process.exit(code),
  (err: Error) => {
    process.stderr.write(`[soak] could not run: ${err.stack ?? err.message}\n`);
    process.exit(1);
  },
);
