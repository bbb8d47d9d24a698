// V8's young generation, kept small in the long-running server.
//
// V8 starts each semi-space of the young generation at 1 MB and doubles it, up to 16 MB on 64-bit,
// whenever many objects survive a scavenge. A mail server allocates fast (chunk buffers, replies,
// log lines), so under load it grows to the full 2 x 16 MB within seconds and that memory stays
// resident for good: measured with `npm run bench`, RSS with 1,000 idle connections after load was
// about 150 MB instead of about 110 MB, and a 35 MB message raised RSS by 20 to 30 MB instead of 2.
// Buffers live no longer than a session; a bigger young generation buys little.
//
// `--max-semi-space-size` would say this on the command line, but the process is started by npm,
// systemd or a person typing `node bin/postern.js`; so bin/postern.js stops the growth before
// anything is loaded (--semi-space-growth-factor=1, which V8 reads at each growth, unlike the
// maximum, which it reads once at start-up), and the server then lets it grow again, up to
// `maxBytes`, watching each minor collection.
import { type PerformanceEntry, PerformanceObserver, constants } from 'node:perf_hooks';
import v8 from 'node:v8';

/** Lets the young generation grow until it holds `maxBytes` (both semi-spaces), then stops it. */
export function capYoungGeneration(maxBytes: number): void {
  if (newSpaceBytes() >= maxBytes) {
    v8.setFlagsFromString('--semi-space-growth-factor=1');
    return;
  }
  v8.setFlagsFromString('--semi-space-growth-factor=2');
  const observer = new PerformanceObserver((list) => {
    const minor = list.getEntries().some((e) => (e as GcEntry).detail?.kind === constants.NODE_PERFORMANCE_GC_MINOR);
    if (!minor || newSpaceBytes() * 2 <= maxBytes) return;
    // One more doubling would pass the cap: no more.
    v8.setFlagsFromString('--semi-space-growth-factor=1');
    observer.disconnect();
  });
  observer.observe({ entryTypes: ['gc'] });
}

function newSpaceBytes(): number {
  return v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0;
}

/** A 'gc' performance entry: `detail.kind` tells a minor collection (scavenge) from the others. */
type GcEntry = PerformanceEntry & { detail?: { kind?: number } };
