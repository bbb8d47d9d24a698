// The registry of SMTP refusals and its documentation page agree.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { DELIVERY_ERRORS } from '../src/delivery/delivery-error.js';
import { SMTP_ERRORS, smtpError } from '../src/errors/smtp-errors.js';

describe('SMTP error registry', () => {
  const doc = fs.readFileSync('docs/errors.md', 'utf8');
  for (const [name, spec] of Object.entries(SMTP_ERRORS)) {
    it(`${name} is documented with its codes`, () => {
      const row = doc.split('\n').find((l) => l.startsWith(`| \`${name}\` |`));
      expect(row, `docs/errors.md has no row for ${name}`).toBeDefined();
      expect(row).toContain(`\`${spec.code} ${spec.enhanced}\``);
    });
  }

  for (const [name, spec] of Object.entries(DELIVERY_ERRORS)) {
    it(`delivery status ${name} is documented with its code`, () => {
      const section = doc.slice(doc.indexOf('## Delivery statuses'));
      const row = section.split('\n').find((l) => l.startsWith(`| \`${name}\` |`));
      expect(row, `docs/errors.md has no row for ${name}`).toBeDefined();
      expect(row).toContain(`\`${spec.enhanced}\``);
    });
  }

  it('gives every entry a class that matches its code and a sentence', () => {
    for (const spec of Object.values(SMTP_ERRORS)) {
      expect(spec.enhanced[0]).toBe(String(spec.code)[0]);
      expect(spec.text.length).toBeGreaterThan(20);
    }
    expect(smtpError('TOO_MANY_RECIPIENTS', { max: 7 }).message).toBe(
      '4.5.3 Too many recipients: at most 7 per message, send the rest in another message',
    );
  });
});
