// The whole path a device's message takes: submission -> queue -> delivery, to a route and to an
// MX found through a DNS server on loopback, with bounces coming back to the sender.
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestDnsServer } from './helpers/dns-server.js';
import { type TestPostern, startTestPostern } from './helpers/postern-harness.js';
import { SinkServer } from './helpers/sink-server.js';
import { waitFor } from './helpers/wait-for.js';

const PASSWORD = 'end to end password';
let routeSink: SinkServer;
let mxSink: SinkServer;
let dns: TestDnsServer;
let t: TestPostern;

beforeAll(async () => {
  routeSink = await SinkServer.start();
  mxSink = await SinkServer.start({ starttls: true });
  dns = await TestDnsServer.start({
    'example.net': { MX: [{ priority: 10, exchange: 'mx.example.net' }] },
    'mx.example.net': { A: ['127.0.0.1'] },
    'nullmx.example': { MX: [{ priority: 0, exchange: '.' }] },
  });
  t = await startTestPostern({
    extra: `
[delivery]
dns_servers = ["127.0.0.1:${dns.port}"]
port = ${mxSink.port}
connect_timeout = "2s"

[[route]]
domains = ["example.test", "example.com"]
host = "127.0.0.1"
port = ${routeSink.port}
tls = "none"
`,
  });
  await t.addAccount('printer@example.com', PASSWORD);
});

afterAll(async () => {
  await t?.stop();
  await routeSink?.close();
  await mxSink?.close();
  await dns?.close?.();
});

const device = () =>
  nodemailer.createTransport({
    host: '127.0.0.1',
    port: t.port('submission'),
    requireTLS: true,
    tls: { rejectUnauthorized: false },
    auth: { user: 'printer@example.com', pass: PASSWORD },
  });

describe('submission to delivery', () => {
  it('delivers a device message through a [[route]] with the headers Postern added', async () => {
    const before = routeSink.messages.length;
    const info = await device().sendMail({
      envelope: { from: 'printer@example.com', to: ['frontdesk@example.test'] },
      raw: 'From: printer@example.com\r\nTo: frontdesk@example.test\r\nSubject: Scan 0042\r\n\r\nscan attached\r\n',
    });
    const queueId = /queued as (\S+)/.exec(info.response)![1]!;
    const [msg] = (await routeSink.waitForMessages(before + 1)).slice(before);
    expect(msg!.from).toBe('printer@example.com');
    expect(msg!.to).toEqual(['frontdesk@example.test']);
    expect(msg!.heloName).toBe('relay.example.test');
    expect(msg!.text).toMatch(new RegExp(`^Received: from .*\\r\\n\\tby relay\\.example\\.test \\(Postern\\) with ESMTPSA id ${queueId}`, 's'));
    expect(msg!.text).toMatch(/\r\nMessage-ID: <[0-9a-f-]{36}@relay\.example\.test>\r\n/);
    expect(msg!.text).toContain('Subject: Scan 0042\r\n\r\nscan attached\r\n');
    const stored = await waitFor(async () => {
      const m = await t.postern.store.getMessage(queueId);
      return m?.recipients[0]?.state === 'delivered' && m;
    }, 15_000, 'delivered state');
    expect(stored.recipients[0]).toMatchObject({ state: 'delivered', lastCode: 250, attempts: 1 });
    // The log ties the session to the delivery through the queue id.
    const lines = t.logs().filter((l) => l.queueId === queueId);
    expect(lines.map((l) => l.event)).toEqual(expect.arrayContaining(['queued', 'delivered']));
    const session = lines.find((l) => l.event === 'queued')!.session;
    expect(lines.find((l) => l.event === 'delivered')!.session).toBe(session);
  });

  it('delivers to the MX the DNS server names, over opportunistic STARTTLS', async () => {
    const before = mxSink.messages.length;
    await device().sendMail({ from: 'printer@example.com', to: 'user@example.net', subject: 'via MX', text: 'hello' });
    const [msg] = (await mxSink.waitForMessages(before + 1)).slice(before);
    expect(msg!.to).toEqual(['user@example.net']);
    expect(msg!.secure).toBe(true);
    expect(dns.queries.some((q) => q.name === 'example.net' && q.type === 'MX')).toBe(true);
  });

  it('bounces to the sender when the remote refuses a recipient, and delivers the others', async () => {
    routeSink.behaviour.rcpt = { 'gone@example.test': { code: 550, message: '5.1.1 No such user here' } };
    try {
      const before = routeSink.messages.length;
      await device().sendMail({
        envelope: { from: 'printer@example.com', to: ['gone@example.test', 'stays@example.test'] },
        raw: 'From: printer@example.com\r\nSubject: to two\r\nMessage-ID: <two@printer.local>\r\n\r\nbody\r\n',
      });
      // The message for the good recipient, then the DSN for the bad one (both to the route sink:
      // example.com, the sender's domain, is routed there too).
      const received = (await routeSink.waitForMessages(before + 2)).slice(before);
      const delivered = received.find((m) => m.from === 'printer@example.com')!;
      expect(delivered.to).toEqual(['stays@example.test']);
      const dsn = received.find((m) => m.from === '')!;
      expect(dsn.to).toEqual(['printer@example.com']);
      expect(dsn.text).toMatch(/Content-Type: multipart\/report;\s*report-type=delivery-status/i);
      expect(dsn.text).toMatch(/Final-Recipient: rfc822; ?gone@example\.test/);
      expect(dsn.text).toContain('Status: 5.1.1');
      expect(dsn.text).toMatch(/Diagnostic-Code: smtp; ?550 5\.1\.1 No such user here/);
      expect(dsn.text).toContain('Message-ID: <two@printer.local>');
    } finally {
      routeSink.behaviour.rcpt = undefined;
    }
  });

  it('fails a null-MX domain at once with a bounce, without contacting anything', async () => {
    const before = routeSink.messages.length;
    const mxBefore = mxSink.connections;
    await device().sendMail({ from: 'printer@example.com', to: 'x@nullmx.example', subject: 'nowhere', text: 'x' });
    const [dsn] = (await routeSink.waitForMessages(before + 1)).slice(before);
    expect(dsn!.from).toBe('');
    expect(dsn!.text).toMatch(/Final-Recipient: rfc822; ?x@nullmx\.example/);
    expect(dsn!.text).toContain('Status: 5.1.10');
    expect(mxSink.connections).toBe(mxBefore);
  });

  it('defers on 4xx and delivers on the retry', async () => {
    routeSink.behaviour.data = { code: 451, message: '4.3.0 Try again later' };
    const before = routeSink.messages.length;
    const info = await device().sendMail({ from: 'printer@example.com', to: 'later@example.test', subject: 'later', text: 'x' });
    const queueId = /queued as (\S+)/.exec(info.response)![1]!;
    const deferred = await waitFor(async () => {
      const m = await t.postern.store.getMessage(queueId);
      return m?.recipients[0]?.state === 'deferred' && m.recipients[0];
    }, 15_000, 'deferral');
    expect(deferred.lastResponse).toMatch(/^451 4\.3\.0 Try again later/);
    expect(deferred.nextAttemptAt).toBeGreaterThan(Date.now());
    routeSink.behaviour.data = undefined;
    // first_retry is 1 s in the test config.
    const [msg] = (await routeSink.waitForMessages(before + 1)).slice(before);
    expect(msg!.to).toEqual(['later@example.test']);
    const done = await waitFor(async () => {
      const m = await t.postern.store.getMessage(queueId);
      return m?.recipients[0]?.state === 'delivered' && m.recipients[0];
    }, 15_000, 'delivered state');
    expect(done.attempts).toBe(2);
  });
});
