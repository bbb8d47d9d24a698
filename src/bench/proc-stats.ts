// What the benchmark reads about processes and the machine: resident memory and CPU time from
// /proc (Linux only; the bench says so and exits elsewhere), and a description of the machine to
// print next to the figures, because a figure without its machine cannot be compared.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

/** Linux's USER_HZ: utime and stime in /proc/<pid>/stat are in these ticks (100 on x86-64 and arm64). */
const CLOCK_TICKS_PER_SECOND = 100;

export interface MemoryReading {
  /** Resident set size now, bytes. */
  rss: number;
  /** Highest resident set size since the process started (VmHWM), bytes. */
  peak: number;
}

/** VmRSS and VmHWM from /proc/<pid>/status, or undefined when the process is gone. */
export function readMemory(pid: number): MemoryReading | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  return { rss: statusBytes(text, 'VmRSS'), peak: statusBytes(text, 'VmHWM') };
}

/** A "Field:   123 kB" line of /proc/<pid>/status, in bytes (0 when absent). */
function statusBytes(status: string, field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
  return m ? Number(m[1]) * 1024 : 0;
}

/**
 * Where the resident memory is, from /proc/<pid>/status and smaps: anonymous memory (JS heaps,
 * malloc, buffers), file-backed pages (code, the node binary, shared libraries), and of the
 * anonymous part the main thread's glibc heap (`[heap]`, where most malloc'd buffers of the main
 * thread live; the V8 heap and other threads' arenas are separate anonymous mappings).
 */
export interface MemoryBreakdown {
  anon: number;
  file: number;
  mallocHeap: number;
}

export function readMemoryBreakdown(pid: number): MemoryBreakdown | undefined {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const smaps = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
    const heap = /\[heap\]\n(?:.*\n)*?Rss:\s+(\d+) kB/.exec(smaps);
    return { anon: statusBytes(status, 'RssAnon'), file: statusBytes(status, 'RssFile') + statusBytes(status, 'RssShmem'), mallocHeap: heap ? Number(heap[1]) * 1024 : 0 };
  } catch {
    return undefined;
  }
}

/** CPU seconds (all threads) the process has used so far: user + system, and system alone. */
export function readCpuSeconds(pid: number): { total: number; system: number } {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // After the name, field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    const user = Number(fields[11]) / CLOCK_TICKS_PER_SECOND;
    const system = Number(fields[12]) / CLOCK_TICKS_PER_SECOND;
    return { total: user + system, system };
  } catch {
    return { total: 0, system: 0 };
  }
}

/** CPU used by a set of processes over an interval, in cores (1.0 = one core busy throughout). */
export class CpuMeter {
  readonly #pids: Record<string, number>;
  #start: { at: number; cpu: Record<string, number> } | undefined;

  constructor(pids: Record<string, number>) {
    this.#pids = pids;
  }

  start(): void {
    this.#start = { at: performance.now(), cpu: this.#read() };
  }

  /**
   * Cores used since start(): per process (`name`), its kernel part (`name:sys`), and the whole
   * machine (`machine`). Empty before start().
   */
  stop(): Record<string, number> {
    if (!this.#start) return {};
    const seconds = (performance.now() - this.#start.at) / 1000;
    const now = this.#read();
    const out: Record<string, number> = {};
    for (const [name, cpu] of Object.entries(now)) {
      out[name] = seconds > 0 ? (cpu - (this.#start.cpu[name] ?? cpu)) / seconds : 0;
    }
    return out;
  }

  #read(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, pid] of Object.entries(this.#pids)) {
      const cpu = readCpuSeconds(pid);
      out[name] = cpu.total;
      out[`${name}:sys`] = cpu.system;
    }
    out.machine = readMachineBusySeconds();
    return out;
  }
}

/**
 * CPU time used by the whole machine (all processes, kernel work included, hypervisor steal
 * excluded), in seconds: the bench subtracts its own processes to show what else was running.
 */
export function readMachineBusySeconds(): number {
  let line: string;
  try {
    line = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
  } catch {
    return 0;
  }
  // cpu  user nice system idle iowait irq softirq steal guest guest_nice
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0] = f;
  return (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_SECOND;
}

/**
 * Samples a process's VmRSS every `intervalMs` until stopped; reports the highest sample and the
 * VmHWM before and after (VmHWM cannot be reset, so it only tells the peak when it rose).
 */
export class RssSampler {
  readonly #pid: number;
  readonly #timer: NodeJS.Timeout;
  readonly #before: MemoryReading;
  #max = 0;
  #samples = 0;

  constructor(pid: number, intervalMs = 5) {
    this.#pid = pid;
    this.#before = readMemory(pid) ?? { rss: 0, peak: 0 };
    this.#max = this.#before.rss;
    this.#timer = setInterval(() => this.sample(), intervalMs);
  }

  sample(): void {
    const m = readMemory(this.#pid);
    if (!m) return;
    this.#samples++;
    if (m.rss > this.#max) this.#max = m.rss;
  }

  /** Everything so far, without stopping. */
  snapshot(): { before: MemoryReading; maxRss: number; samples: number } {
    this.sample();
    return { before: this.#before, maxRss: this.#max, samples: this.#samples };
  }

  stop(): { before: MemoryReading; after: MemoryReading; maxRss: number; samples: number } {
    clearInterval(this.#timer);
    this.sample();
    return { before: this.#before, after: readMemory(this.#pid) ?? { rss: 0, peak: 0 }, maxRss: this.#max, samples: this.#samples };
  }
}

/**
 * A fixed amount of pure CPU work (an integer hash loop: no allocation, no GC, no system calls),
 * timed in this process, in ms; the best of three. A shared virtual machine's speed can drift
 * (noisy neighbours, host frequency); this shows by how much during a run.
 */
export function cpuCheckMs(): number {
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    let h = 0x811c9dc5;
    for (let j = 0; j < 20_000_000; j++) h = Math.imul(h ^ j, 0x01000193) >>> 0;
    const ms = performance.now() - t;
    if (h === 42) best = -1; // keeps the loop from being optimised away
    best = Math.min(best, ms);
  }
  return best;
}

export interface MachineInfo {
  cpus: number;
  cpuModel: string;
  memoryBytes: number;
  kernel: string;
  node: string;
  disk: string;
  /** Median time of a 4 KiB write + fsync in the bench's temp directory, ms. */
  fsyncMedianMs: number;
  /** Median cost of creating one empty file in Postern's spool directory, ms (set once Postern runs). */
  spoolCreateMedianMs?: number;
  loadAverage: number[];
}

export function describeMachine(tempDir: string): MachineInfo {
  const cpuinfo = safeRead('/proc/cpuinfo');
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown';
  return {
    cpus: os.availableParallelism(),
    cpuModel: model,
    memoryBytes: os.totalmem(),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    disk: describeDisk(tempDir),
    fsyncMedianMs: measureFsync(tempDir),
    loadAverage: os.loadavg(),
  };
}

/** The device and file system holding `dir`, and whether the kernel calls it rotational. */
function describeDisk(dir: string): string {
  const mounts = safeRead('/proc/self/mounts')
    .split('\n')
    .map((line) => line.split(' '))
    .filter((f) => f.length >= 3 && dir.startsWith(f[1]!))
    .sort((a, b) => b[1]!.length - a[1]!.length);
  const mount = mounts[0];
  if (!mount) return 'unknown';
  const [device, mountPoint, fsType] = mount as [string, string, string];
  const name = path.basename(device).replace(/\d+$/, '');
  const rotational = safeRead(`/sys/block/${name}/queue/rotational`).trim();
  const kind = rotational === '1' ? 'reported rotational (virtual disks often are)' : rotational === '0' ? 'non-rotational' : 'type unknown';
  // ext4 without a journal skips recently deleted inodes when it allocates one, which makes file
  // creation slow under create/delete churn (a spool's pattern): worth knowing when reading figures.
  const journal = fsType === 'ext4' ? (fs.existsSync(`/proc/fs/jbd2/${path.basename(device)}-8`) ? ', with journal' : ', NO journal') : '';
  return `${device} (${fsType}${journal} on ${mountPoint}), ${kind}`;
}

/** 4 KiB write + fsync, at most 200 times or 2 s: the cost the durable queue pays per group commit. */
function measureFsync(dir: string): number {
  const file = path.join(dir, 'fsync-probe');
  const fd = fs.openSync(file, 'w');
  const block = Buffer.alloc(4096, 'x');
  const times: number[] = [];
  const deadline = performance.now() + 2000;
  try {
    for (let i = 0; i < 200 && performance.now() < deadline; i++) {
      const t = performance.now();
      fs.writeSync(fd, block, 0, block.length, 0);
      fs.fsyncSync(fd);
      times.push(performance.now() - t);
    }
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)] ?? 0;
}

/**
 * Median cost of creating (O_CREAT|O_EXCL) and closing an empty file in `dir`, ms; 200 files at
 * most, 2 s at most, all removed again. Postern creates one spool file per message, and on some
 * ext4 states (a crowded block group) this costs up to a millisecond of kernel CPU per file.
 * The names do not end in .eml, so Postern never takes them for message bodies.
 */
export function measureFileCreate(dir: string): number {
  const times: number[] = [];
  const names: string[] = [];
  const deadline = performance.now() + 2000;
  try {
    for (let i = 0; i < 200 && performance.now() < deadline; i++) {
      const name = path.join(dir, `.bench-create-probe-${process.pid}-${i}`);
      const t = performance.now();
      fs.closeSync(fs.openSync(name, 'wx', 0o600));
      times.push(performance.now() - t);
      names.push(name);
    }
  } finally {
    for (const name of names) fs.rmSync(name, { force: true });
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)] ?? 0;
}

function safeRead(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}
