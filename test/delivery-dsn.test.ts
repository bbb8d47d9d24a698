// DSN construction (RFC 3464 / RFC 3462) and the helpers around it, checked as bytes and by
// parsing the result with mailparser the way a receiving mail client would.
import { Readable } from 'node:stream';
import { simpleParser } from 'mailparser';
import { describe, expect, test } from 'vitest';
import { buildDsn, readHeaderBlock, wantsFailureNotice } from '../src/delivery/dsn.js';

const headers = Buffer.from('From: App <app@client.test>\r\nTo: <gone@dest.test>\r\nSubject: Invoice 42\r\nMessage-ID: <m1@client.test>\r\n');

function sample() {
  return buildDsn({
    hostname: 'relay.test',
    message: {
      queueId: 'Q123',
      sender: 'app@client.test',
      receivedAt: Date.UTC(2026, 10, 28, 12, 0, 0),
      dsnEnvid: 'ENV-1',
      messageIdHeader: '<m1@client.test>',
    },
    recipients: [
      {
        address: 'gone@dest.test',
        orcpt: 'rfc822;Gone@Dest.test',
        status: '5.1.1',
        reason: 'The mail server mx.dest.test[192.0.2.1] refused the message.',
        remoteMta: 'mx.dest.test',
        diagnostic: '550 5.1.1 No such user',
      },
      { address: 'nomail@null.test', status: '5.1.10', reason: '5.1.10 Recipient domain null.test does not accept mail' },
    ],
    originalHeaders: headers,
    now: Date.UTC(2026, 10, 29, 8, 30, 0),
    messageId: 'dsn1@relay.test',
  });
}

/** The parts of a multipart body: Content-Type and the body after the part's blank line. */
function splitParts(raw: Buffer, boundary: string): { type: string; body: string }[] {
  const text = raw.toString('utf8');
  const end = text.indexOf(`\r\n--${boundary}--`);
  expect(end).toBeGreaterThan(0);
  return text
    .slice(0, end)
    // The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
    .split(`\r\n--${boundary}\r\n`)
    .slice(1)
    .map((part) => {
      const blank = part.indexOf('\r\n\r\n');
      const head = part.slice(0, blank);
      return { type: /^Content-Type: (.*)$/m.exec(head)![1]!.trim(), body: part.slice(blank + 4) };
    });
}

describe('buildDsn', () => {
  test('is a multipart/report with the three parts, CRLF only', async () => {
    const raw = sample();
    const text = raw.toString('utf8');
    expect(text).not.toMatch(/[^\r]\n/);
    expect(text).toMatch(/^From: Mail Delivery System <MAILER-DAEMON@relay\.test>\r\n/);
    expect(text).toContain('To: <app@client.test>\r\n');
    expect(text).toContain('Auto-Submitted: auto-replied\r\n');
    expect(text).toContain('In-Reply-To: <m1@client.test>\r\n');

    const parsed = await simpleParser(raw);
    const contentType = parsed.headers.get('content-type') as { value: string; params: Record<string, string> };
    expect(contentType).toMatchObject({ value: 'multipart/report', params: { 'report-type': 'delivery-status' } });
    expect(parsed.subject).toBe('Undelivered Mail Returned to Sender');
    expect(parsed.messageId).toBe('<dsn1@relay.test>');

    const parts = splitParts(raw, contentType.params.boundary!);
    expect(parts.map((p) => p.type)).toEqual(['text/plain; charset=utf-8', 'message/delivery-status', 'text/rfc822-headers']);
    expect(parts[0]!.body).toContain('could not be delivered to the 2 recipients below');
    expect(parts[0]!.body).toContain(
      '<gone@dest.test>:\r\n    The mail server mx.dest.test[192.0.2.1] refused the message.\r\n    Reply from mx.dest.test: 550 5.1.1 No such user\r\n',
    );
    expect(parts[2]!.body).toBe(headers.toString());
  });

  test('delivery-status fields per message and per recipient', async () => {
    const raw = sample();
    const boundary = /boundary="([^"]+)"/.exec(raw.toString())![1]!;
    const status = splitParts(raw, boundary)[1]!.body;
    const [perMessage, first, second] = status.trim().split('\r\n\r\n');
    expect(perMessage).toBe(
      [
        'Reporting-MTA: dns; relay.test',
        'X-Postern-Queue-ID: Q123',
        'Original-Envelope-Id: ENV-1',
        'Arrival-Date: Sat, 28 Nov 2026 12:00:00 +0000',
      ].join('\r\n'),
    );
    expect(first).toBe(
      [
        'Final-Recipient: rfc822; gone@dest.test',
        'Original-Recipient: rfc822;Gone@Dest.test',
        'Action: failed',
        'Status: 5.1.1',
        'Remote-MTA: dns; mx.dest.test',
        'Diagnostic-Code: smtp; 550 5.1.1 No such user',
        'Last-Attempt-Date: Sun, 29 Nov 2026 08:30:00 +0000',
      ].join('\r\n'),
    );
    // Decided locally: no Remote-MTA, no Diagnostic-Code.
    expect(second).toBe(
      ['Final-Recipient: rfc822; nomail@null.test', 'Action: failed', 'Status: 5.1.10', 'Last-Attempt-Date: Sun, 29 Nov 2026 08:30:00 +0000'].join('\r\n'),
    );
  });
});

describe('readHeaderBlock', () => {
  test('stops at the blank line', async () => {
    const block = await readHeaderBlock(Readable.from([Buffer.from('A: 1\r\nB: 2\r\n\r\nbody\r\n')]));
    expect(block.toString()).toBe('A: 1\r\nB: 2\r\n');
  });

  test('finds the blank line across chunks and with bare LF', async () => {
    const block = await readHeaderBlock(Readable.from([Buffer.from('A: 1\nB: '), Buffer.from('2\n'), Buffer.from('\nbody\n')]));
    expect(block.toString()).toBe('A: 1\nB: 2\n');
  });

  test('is bounded, cut at the last complete line', async () => {
    const long = `${'X-Long: aaaaaaaaaa\r\n'.repeat(100)}\r\nbody`;
    const block = await readHeaderBlock(Readable.from([Buffer.from(long)]), 250);
    expect(block.length).toBeLessThanOrEqual(250);
    expect(block.toString().endsWith('\r\n')).toBe(true);
    expect(block.toString().split('\r\n').filter(Boolean).every((l) => l === 'X-Long: aaaaaaaaaa')).toBe(true);
  });
});

describe('wantsFailureNotice', () => {
  test('RFC 3461 NOTIFY values', () => {
    expect(wantsFailureNotice(null)).toBe(true);
    expect(wantsFailureNotice([])).toBe(true);
    expect(wantsFailureNotice(['FAILURE'])).toBe(true);
    expect(wantsFailureNotice(['SUCCESS', 'FAILURE'])).toBe(true);
    expect(wantsFailureNotice(['NEVER'])).toBe(false);
    expect(wantsFailureNotice(['SUCCESS'])).toBe(false);
    expect(wantsFailureNotice(['DELAY'])).toBe(false);
  });
});
