import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** A fresh directory under the system temp dir, one per test or server. */
export function tempDir(prefix = 'postern-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}
