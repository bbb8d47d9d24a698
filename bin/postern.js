#!/usr/bin/env node
// The compiled CLI lives in dist/ (built by `npm install` via the prepare script, and by `npm start`).
import('../dist/cli/main.js').catch((err) => {
  if (err && err.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes('dist/cli/main.js')) {
    console.error('postern: not built yet. Run `npm run build` (or `npm install`) first.');
    process.exit(1);
  }
  throw err;
});
