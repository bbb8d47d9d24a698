// The server's young generation cap (src/runtime/young-generation.ts, used by `postern serve`): the
// young generation grows under load up to the cap, both semi-spaces counted, and no further. Run
// in a fresh process started as bin/postern.js starts it (growth stopped until the cap is set),
// with a load that keeps objects alive across scavenges (what makes V8 grow the space).
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';

const MB = 1024 * 1024;

function newSpaceAfterLoad(capBytes: number): number {
  const script = `
    const v8 = require('node:v8');
    const { pathToFileURL } = require('node:url');
    (async () => {
      const { capYoungGeneration } = await import(pathToFileURL(${JSON.stringify(`${process.cwd()}/dist/runtime/young-generation.js`)}).href);
      capYoungGeneration(${capBytes});
      let keep = [];
      for (let round = 0; round < 400; round++) {
        for (let i = 0; i < 2000; i++) {
          keep.push({ i, s: 'x' + i });
          if (keep.length > 40000) keep = keep.slice(20000);
        }
        await new Promise((resolve) => setImmediate(resolve));
      }
      const space = v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space');
      console.log(space.space_size);
    })();
  `;
  return Number(execFileSync(process.execPath, ['--semi-space-growth-factor=1', '-e', script], { encoding: 'utf8' }).trim());
}

describe('young generation cap', () => {
  it('lets the young generation grow to the cap under load, and no further', () => {
    expect(newSpaceAfterLoad(4 * MB)).toBe(4 * MB);
    expect(newSpaceAfterLoad(8 * MB)).toBe(8 * MB);
  });
});
