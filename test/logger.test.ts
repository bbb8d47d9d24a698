// The logger's redaction (src/observe/logger.ts): the second line of defence behind "secrets never
// reach a log call". Each named key is censored; other fields are written as they are.
import { describe, expect, it } from 'vitest';
import { createLogger } from '../src/observe/logger.js';

function lineOf(fields: Record<string, unknown>): Record<string, unknown> {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', destination: { write: (line: string) => void lines.push(line) } });
  logger.info(fields, 'a line');
  expect(lines).toHaveLength(1);
  return JSON.parse(lines[0]!) as Record<string, unknown>;
}

describe('log redaction', () => {
  it('censors passwords and secrets at the top level, under auth and under a security event detail', () => {
    const line = lineOf({
      event: 'test',
      password: 'hunter2',
      pass: 'hunter3',
      secret: 's3',
      credentials: { user: 'u', password: 'p' },
      auth: { user: 'printer@example.com', pass: 'hunter4', password: 'hunter5' },
      detail: { message: 'm', password: 'hunter6', secret: 's4' },
    });
    expect(line).toMatchObject({
      event: 'test',
      password: '[redacted]',
      pass: '[redacted]',
      secret: '[redacted]',
      credentials: '[redacted]',
      auth: { user: 'printer@example.com', pass: '[redacted]', password: '[redacted]' },
      detail: { message: 'm', password: '[redacted]', secret: '[redacted]' },
      msg: 'a line',
    });
    expect(JSON.stringify(line)).not.toMatch(/hunter|"s3"|"s4"|"p"/);
  });

  it('leaves every other field as it is', () => {
    const line = lineOf({ event: 'queued', queueId: 'q1', size: 4096, to: ['a@example.net'], detail: { message: 'ok', count: 2 } });
    expect(line).toMatchObject({ event: 'queued', queueId: 'q1', size: 4096, to: ['a@example.net'], detail: { message: 'ok', count: 2 } });
  });
});
