import { defineConfig } from 'vitest/config';

// Tests talk to real servers over loopback; each file gets its own process, ports and data dir.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
    reporters: ['default'],
  },
});
