// Submission (587-style STARTTLS) and smtps (465-style implicit TLS): what a device sees, byte for
// byte, and what lands in the queue.
import fs from 'node:fs';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawSmtp } from './helpers/raw-smtp.js';
import { type TestPostern, startTestPostern } from './helpers/postern-harness.js';

const PASSWORD = 'correct horse battery staple';
let t: TestPostern;

beforeAll(async () => {
  // No routes and no DNS for example.net: queued mail stays queued, which is what we inspect.
  t = await startTestPostern({
    extra: `
[delivery]
dns_servers = ["127.0.0.1:9"]
connect_timeout = "1s"
`,
  });
  await t.addAccount('printer@example.com', PASSWORD);
  await t.addAccount('scanner@example.com', PASSWORD, { smtpAuth: false });
  await t.addAccount('old@example.com', PASSWORD, { enabled: false });
});

afterAll(async () => {
  await t?.stop();
});

function transport(options: { user?: string; pass?: string; port?: number; secure?: boolean } = {}) {
  return nodemailer.createTransport({
    host: '127.0.0.1',
    port: options.port ?? t.port('submission'),
    secure: options.secure ?? false,
    requireTLS: !options.secure,
    tls: { rejectUnauthorized: false },
    auth: { user: options.user ?? 'printer@example.com', pass: options.pass ?? PASSWORD },
  });
}

async function queuedBody(queueId: string): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of t.postern.store.readBody(queueId)) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function queueIdFrom(response: string): string {
  const m = /queued as ([A-Z0-9]+)/.exec(response);
  if (!m) throw new Error(`no queue id in ${response}`);
  return m[1]!;
}

describe('submission listener', () => {
  it('advertises the Office 365 extension set, and AUTH only after STARTTLS', async () => {
    const c = await RawSmtp.connect(t.port('submission'));
    const greeting = await c.read();
    expect(greeting.code).toBe(220);
    expect(greeting.text).toContain('relay.example.test');
    const before = await c.command('EHLO device.local');
    expect(before.code).toBe(250);
    for (const ext of ['PIPELINING', '8BITMIME', 'SMTPUTF8', 'ENHANCEDSTATUSCODES', 'DSN', 'STARTTLS', `SIZE ${35 * 1024 * 1024}`]) {
      expect(before.text).toContain(ext);
    }
    expect(before.text).not.toMatch(/AUTH/);
    await c.startTls();
    const after = await c.command('EHLO device.local');
    expect(after.text).toMatch(/250[- ]AUTH PLAIN LOGIN/);
    expect(after.text).not.toContain('STARTTLS');
    await c.quit();
  });

  it('refuses AUTH before STARTTLS, so no password crosses the network in clear', async () => {
    const c = await RawSmtp.connect(t.port('submission'));
    await c.read();
    await c.command('EHLO device.local');
    const reply = await c.authPlain('printer@example.com', PASSWORD);
    expect(reply.code).toBe(538);
    expect(reply.text).toBe('538 5.7.11 Encryption required for requested authentication mechanism. Send STARTTLS first');
    // Nothing authenticated: mail is still refused.
    const mail = await c.command('MAIL FROM:<printer@example.com>');
    expect(mail.code).toBe(530);
    expect(mail.text).toBe('530 5.7.57 Client not authenticated to send mail. Log in with AUTH first');
    await c.quit();
  });

  it('requires AUTH after STARTTLS too', async () => {
    const c = await RawSmtp.connect(t.port('submission'));
    await c.read();
    await c.command('EHLO device.local');
    await c.startTls();
    await c.command('EHLO device.local');
    const mail = await c.command('MAIL FROM:<printer@example.com>');
    expect(mail.text).toBe('530 5.7.57 Client not authenticated to send mail. Log in with AUTH first');
    await c.quit();
  });

  it('queues an authenticated message with Received, Message-ID and Date added, and never the password', async () => {
    const info = await transport().sendMail({
      envelope: { from: 'printer@example.com', to: ['someone@example.net'] },
      raw: 'From: printer@example.com\r\nTo: someone@example.net\r\nSubject: scan\r\n\r\nscan attached\r\n',
    });
    expect(info.response).toMatch(/^250 2\.0\.0 Ok: queued as [A-Z0-9]+$/);
    const queueId = queueIdFrom(info.response);
    const message = await t.postern.store.getMessage(queueId);
    expect(message?.sender).toBe('printer@example.com');
    expect(message?.recipients.map((r) => r.address)).toEqual(['someone@example.net']);
    expect(message?.origin.account).toBe('printer@example.com');
    expect(message?.origin.listener).toBe('submission');
    const body = await queuedBody(queueId);
    const [head] = body.split('\r\n\r\n');
    expect(head).toMatch(/^Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\r\n\t\(Authenticated sender: printer@example\.com\)\r\n\tby relay\.example\.test \(Postern\) with ESMTPSA id /);
    expect(head).toMatch(/\r\nMessage-ID: <[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}@relay\.example\.test>\r\n/);
    expect(head).toMatch(/\r\nDate: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n/);
    expect(message?.messageIdHeader).toMatch(/@relay\.example\.test>$/);
    expect(body).toContain('Subject: scan\r\n\r\nscan attached\r\n');
    const logText = fs.readFileSync(path.join(t.dir, 'postern.log'), 'utf8');
    expect(logText).toContain(queueId);
    expect(logText).not.toContain(PASSWORD);
    expect(body).not.toContain(PASSWORD);
    expect(fs.readFileSync(path.join(t.dir, 'postern.db')).includes(Buffer.from(PASSWORD))).toBe(false);
  });

  it('keeps the Message-ID and Date a client set', async () => {
    const info = await transport().sendMail({
      from: 'printer@example.com',
      to: 'someone@example.net',
      subject: 'own ids',
      text: 'hello',
      messageId: '<own-id@printer.local>',
      date: new Date('2026-01-02T03:04:05Z'),
    });
    const body = await queuedBody(queueIdFrom(info.response));
    expect(body.match(/^Message-ID:/gim)).toHaveLength(1);
    expect(body).toContain('Message-ID: <own-id@printer.local>');
    expect(body.match(/^Date:/gim)).toHaveLength(1);
  });

  it('gives a wrong password and an unknown account the same 535 5.7.8 reply', async () => {
    const wrong = await transport({ pass: 'not the password' }).verify().catch((e: { response?: string }) => e.response);
    const unknown = await transport({ user: 'nobody@example.com' }).verify().catch((e: { response?: string }) => e.response);
    expect(wrong).toBe('535 5.7.8 Authentication unsuccessful, the username or password is wrong');
    expect(unknown).toBe(wrong);
    const disabled = await transport({ user: 'old@example.com' }).verify().catch((e: { response?: string }) => e.response);
    expect(disabled).toBe(wrong);
  });

  it('answers 535 5.7.139 when SMTP AUTH is off for the account', async () => {
    const reply = await transport({ user: 'scanner@example.com' }).verify().catch((e: { response?: string }) => e.response);
    expect(reply).toBe('535 5.7.139 Authentication unsuccessful, SMTP AUTH is disabled for this account');
  });

  it('trusts a verified password from its cache until the password changes', async () => {
    await t.addAccount('camera@example.com', PASSWORD);
    expect(await transport({ user: 'camera@example.com' }).verify()).toBe(true);
    expect(await transport({ user: 'camera@example.com' }).verify()).toBe(true);
    const auths = t.logs().filter((l) => l.event === 'auth' && l.account === 'camera@example.com');
    expect(auths.map((l) => l.cached)).toEqual([false, true]);
    const { hashPassword } = await import('../src/accounts/password.js');
    await t.postern.store.updateAccount('camera@example.com', { passwordHash: await hashPassword('a new password 123') });
    const old = await transport({ user: 'camera@example.com' }).verify().catch((e: { response?: string }) => e.response);
    expect(old).toMatch(/^535 5\.7\.8 /);
    expect(await transport({ user: 'camera@example.com', pass: 'a new password 123' }).verify()).toBe(true);
  });

  it('checks the hash every time when [auth] cache_ttl is 0s', async () => {
    const strict = await startTestPostern({ extra: '\n[auth]\ncache_ttl = "0s"\n' });
    try {
      await strict.addAccount('printer@example.com', PASSWORD);
      for (let i = 0; i < 2; i++) expect(await transport({ port: strict.port('submission') }).verify()).toBe(true);
      expect(strict.logs().filter((l) => l.event === 'auth').map((l) => l.cached)).toEqual([false, false]);
    } finally {
      await strict.stop();
    }
  });

  it('does not let a cached password outlive SMTP AUTH being switched off', async () => {
    await t.addAccount('webapp@example.com', PASSWORD);
    expect(await transport({ user: 'webapp@example.com' }).verify()).toBe(true);
    await t.postern.store.updateAccount('webapp@example.com', { smtpAuth: false });
    const reply = await transport({ user: 'webapp@example.com' }).verify().catch((e: { response?: string }) => e.response);
    expect(reply).toMatch(/^535 5\.7\.139 /);
  });
});

describe('smtps listener (implicit TLS)', () => {
  it('accepts an authenticated message over implicit TLS', async () => {
    const info = await transport({ port: t.port('smtps'), secure: true }).sendMail({
      from: 'printer@example.com',
      to: 'someone@example.net',
      subject: 'over 465',
      text: 'hello',
    });
    const message = await t.postern.store.getMessage(queueIdFrom(info.response));
    expect(message?.origin.listener).toBe('smtps');
  });

  it('refuses TLS 1.1 and keeps serving', async () => {
    const tls = await import('node:tls');
    const failure = await new Promise<string>((resolve) => {
      const s = tls.connect({
        host: '127.0.0.1',
        port: t.port('smtps'),
        rejectUnauthorized: false,
        minVersion: 'TLSv1',
        maxVersion: 'TLSv1.1',
        ciphers: 'DEFAULT:@SECLEVEL=0',
      });
      s.on('secureConnect', () => resolve(`connected with ${s.getProtocol()}`));
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
    });
    expect(failure).not.toMatch(/^connected/);
    expect(await transport({ port: t.port('smtps'), secure: true }).verify()).toBe(true);
  });
});
