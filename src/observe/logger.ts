// Structured logs: one JSON line per SMTP session event and per delivery attempt. `session` and
// `queueId` fields tie a message's intake to its deliveries. Secrets never reach a log call:
// pino's redact is a second line of defence for the keys that could carry one.
import pino, { type Logger } from 'pino';

export type { Logger };

export interface LoggerOptions {
  level?: string;
  /** Where lines go; defaults to stdout. Tests pass a file stream to read the lines back. */
  destination?: pino.DestinationStream;
}

export function createLogger(options: LoggerOptions = {}): Logger {
  return pino(
    {
      level: options.level ?? 'info',
      base: { app: 'postern' },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: ['password', '*.password', 'auth.password', 'pass', '*.pass', 'secret', '*.secret', 'credentials'], censor: '[redacted]' },
      formatters: { level: (label) => ({ level: label }) },
    },
    options.destination ?? pino.destination({ dest: 1, sync: false }),
  );
}
