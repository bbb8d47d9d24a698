// The soak's short variant: the same code as `npm run soak` (src/soak/soak.ts), about a minute of
// load at a modest rate with the same mix (1 KiB to 10 MiB, three sinks: normal, 550/451 by
// recipient, 2-5 s per DATA), against a real `postern serve` process. It checks what must hold
// whatever the machine's speed: the queue drains, every recipient of every message that got 250
// is delivered or bounced exactly once as its sink decided (matched by address and Message-ID),
// no spool file is left, the open file descriptors come back to where they started once the
// delivery pool's idle connections have closed, and RSS stays under a generous bound. No speed
// assertions: the throughput and the slopes are printed, not judged.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatSoakReport, soakChecks } from '../src/soak/soak-report.js';
import { SOAK_DEFAULTS, runSoak } from '../src/soak/soak.js';

const MB = 1024 * 1024;
/** Open fds allowed above the start once the soak has settled. */
const FD_MARGIN = 5;

describe('soak (short)', () => {
  it('drains, accounts for every accepted recipient, and gives back its file descriptors', { timeout: 170_000 }, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postern-soak-short-'));
    try {
      const result = await runSoak({
        ...SOAK_DEFAULTS,
        dir,
        durationSeconds: 55,
        rate: 8,
        sampleSeconds: 1,
        warmupSeconds: 15,
        queue: { firstRetry: '1s', maxRetryInterval: '3s', lifetime: '1h' },
        drainTimeoutSeconds: 45,
        // The delivery pool closes idle connections after 5 s.
        settleSeconds: 7,
      });
      console.log(formatSoakReport(result, soakChecks(result, FD_MARGIN)));

      const { ledger: l, submissions: s, memory: m } = result;
      // The load ran and the mix was exercised: bounces, deferrals, the slow sink, big messages.
      expect(s.accepted).toBeGreaterThan(300);
      expect(s.failed).toBe(0);
      expect(l.expectedBounced).toBeGreaterThan(0);
      expect(result.sinks.flaky!.deferrals).toBeGreaterThan(0);
      expect(l.deliveredBy.slow).toBeGreaterThan(0);

      // The queue drained to zero, and no body was left behind.
      expect(result.drained).toBe(true);
      expect(result.queueAfterDrain).toEqual({ messages: 0, queued: 0, inFlight: 0, deferred: 0 });
      expect(result.spoolFilesAfterDrain).toBe(0);

      // Every recipient of every message that got 250 reached its sink or came back in a DSN, as
      // the sink decided, once, under the Message-ID it was submitted with.
      expect(l.messagesAccepted).toBe(s.accepted);
      expect({
        missing: l.missing,
        duplicates: l.duplicates,
        wrongOutcome: l.wrongOutcome,
        messageIdMismatch: l.messageIdMismatch,
        strays: l.strays,
      }).toEqual({ missing: 0, duplicates: 0, wrongOutcome: 0, messageIdMismatch: 0, strays: 0 });
      expect(l.delivered).toBe(l.expectedDelivered);
      expect(l.bounced).toBe(l.expectedBounced);
      expect(l.delivered + l.bounced).toBe(l.recipientsAccepted);
      expect(l.messagesWithBounce).toBe(l.dsnMessages);

      // Resources: fds back near the start after the pool's idle timeout; RSS bounded.
      expect(m.fdsAfterSettle.total).toBeLessThanOrEqual(m.fdsAtStart.total + FD_MARGIN);
      expect(m.maxRssBytes).toBeLessThan(400 * MB);
      expect(result.posternExitCode).toBe(0);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
