#!/usr/bin/env node
// Before anything is loaded: keep V8's young generation at its initial size (the server lets it
// grow to a cap later; see src/runtime/young-generation.ts for why and how much).
import v8 from 'node:v8';
v8.setFlagsFromString('--semi-space-growth-factor=1');
// The compiled CLI lives in dist/ (built by `npm install` via the prepare script, and by `npm start`).
import('../dist/cli/main.js').catch((err) => {
  if (err && err.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes('dist/cli/main.js')) {
    console.error('postern: not built yet. Run `npm run build` (or `npm install`) first.');
    process.exit(1);
  }
  throw err;
});
