// Policy and security at intake: send-as, recipient rules, rate limits, connections per account,
// lockouts, account networks, connectors, and the security events each refusal leaves behind.
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../src/accounts/password.js';
import type { AccountPolicy } from '../src/store/store.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { type TestPostern, startTestPostern } from './helpers/postern-harness.js';
import { waitFor } from './helpers/wait-for.js';

const PASSWORD = 'policy test password';
const NO_DNS = '\n[delivery]\ndns_servers = ["127.0.0.1:9"]\n';

async function login(t: TestPostern, user: string, options: { localAddress?: string; password?: string } = {}) {
  const { client, auth } = await RawSmtp.submission(t.port('submission'), user, options.password ?? PASSWORD, options);
  return { c: client, auth };
}

async function account(t: TestPostern, address: string, policy: AccountPolicy = {}) {
  await t.postern.store.createAccount({ address, passwordHash: await hashPassword(PASSWORD), policy });
}

async function queued(t: TestPostern): Promise<number> {
  return (await t.postern.store.countRecipients()).queued + (await t.postern.store.countRecipients()).deferred;
}

/** Messages ever stored for an account or client address (rows stay whatever their delivery state). */
async function storedFor(t: TestPostern, who: { account: string } | { clientIp: string }): Promise<number> {
  return (await t.postern.store.usageSince(who, 0)).messages;
}

/** A transaction refused before DATA leaves nothing to queue: RCPT and DATA get 503. */
async function noTransaction(c: RawSmtp): Promise<void> {
  expect((await c.command('DATA')).text).toBe('503 5.5.1 Error: need RCPT command');
}

/** The alert mail to admin@example.com with this subject, as queued, or undefined. */
async function alertMail(t: TestPostern, subject: string): Promise<string | undefined> {
  for (const q of await t.postern.store.listQueue({ limit: 10_000 })) {
    const m = await t.postern.store.getMessage(q.queueId);
    if (m?.origin.listener !== 'alert' || m.recipients[0]?.address !== 'admin@example.com') continue;
    const body = await bodyOf(t, q.queueId);
    if (body.includes(`\r\nSubject: ${subject}\r\n`)) return body;
  }
  return undefined;
}

/** The whole message body of a queued message. */
async function bodyOf(t: TestPostern, queueId: string): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of t.postern.store.readBody(queueId)) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('latin1');
}

describe('send-as and recipient rules', () => {
  let t: TestPostern;
  beforeAll(async () => {
    t = await startTestPostern({ extra: NO_DNS });
    await account(t, 'printer@example.com');
    await account(t, 'app@example.com', { sendAs: ['noreply@example.com', '*@alerts.example.com'] });
    await account(t, 'scanner@example.com', { rewriteFrom: true });
    await account(t, 'lobby@example.com', { recipientDomains: ['example.com', '*.example.org'] });
  });
  afterAll(() => t?.stop());

  it('refuses MAIL FROM another address with 550 5.7.60 SendAsDenied, queues nothing and records the event', async () => {
    const before = await storedFor(t, { account: 'printer@example.com' });
    const { c } = await login(t, 'printer@example.com');
    const reply = await c.command('MAIL FROM:<ceo@example.com>');
    expect(reply.text).toBe('550 5.7.60 SendAsDenied; printer@example.com is not allowed to send as ceo@example.com');
    expect((await c.command('RCPT TO:<a@example.net>')).text).toBe('503 5.5.1 Error: need MAIL command');
    await noTransaction(c);
    expect((await c.command('MAIL FROM:<Printer@Example.com>')).code).toBe(250);
    await c.quit();
    expect(await storedFor(t, { account: 'printer@example.com' })).toBe(before);
    const events = await t.postern.store.listSecurityEvents();
    expect(events.find((e) => e.kind === 'send_as_denied')).toMatchObject({
      account: 'printer@example.com',
      ip: '127.0.0.1',
      listener: 'submission',
      detail: { message: 'printer@example.com tried to send as ceo@example.com (envelope)' },
    });
  });

  it('allows the addresses and *@domain patterns in the account policy', async () => {
    const { c } = await login(t, 'app@example.com');
    for (const from of ['app@example.com', 'noreply@example.com', 'disk@alerts.example.com']) {
      expect((await c.command(`MAIL FROM:<${from}>`)).code, from).toBe(250);
      await c.command('RSET');
    }
    expect((await c.command('MAIL FROM:<x@evil-alerts.example.com>')).code).toBe(550);
    expect((await c.command('MAIL FROM:<x@sub.alerts.example.com>')).code).toBe(550);
    await c.quit();
  });

  it('checks the From and Sender headers too, and queues nothing when they are refused', async () => {
    const before = await queued(t);
    for (const header of ['From: CEO <ceo@example.com>', 'From: printer@example.com\r\nSender: boss@example.com']) {
      const { c } = await login(t, 'printer@example.com');
      await c.command('MAIL FROM:<printer@example.com>');
      await c.command('RCPT TO:<a@example.net>');
      const reply = await c.data(`${header}\r\nSubject: x\r\n\r\nbody\r\n`);
      expect(reply.text).toMatch(/^550 5\.7\.60 SendAsDenied; printer@example\.com is not allowed to send as (ceo|boss)@example\.com$/);
      await c.quit();
    }
    expect(await queued(t)).toBe(before);
  });

  // A second From (or Sender) field used to go unchecked: only the first of each was looked at.
  const forged: [string, string][] = [
    ['a second From after an allowed one', 'From: printer@example.com\r\nSubject: x\r\nFrom: CEO <ceo@example.com>'],
    ['a second From before an allowed one', 'From: ceo@example.com\r\nFrom: printer@example.com'],
    ['a forged address in a From list', 'From: printer@example.com, ceo@example.com\r\nSender: printer@example.com'],
    ['a forged address on a folded line', 'From: printer@example.com,\r\n\t"CEO" <ceo@example.com>'],
    ['a forged address in a group', 'From: team: printer@example.com, ceo@example.com;'],
    ['an upper-case field name', 'FROM: ceo@example.com'],
    ['a second Sender', 'From: printer@example.com\r\nSender: printer@example.com\r\nSender: ceo@example.com'],
  ];
  for (const [name, header] of forged) {
    it(`refuses ${name} with 550 5.7.60 and queues nothing`, async () => {
      const before = await storedFor(t, { account: 'printer@example.com' });
      const { c } = await login(t, 'printer@example.com');
      expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
      expect((await c.command('RCPT TO:<a@example.net>')).code).toBe(250);
      const reply = await c.data(`${header}\r\nSubject: forged\r\n\r\nbody\r\n`);
      expect(reply.text).toBe('550 5.7.60 SendAsDenied; printer@example.com is not allowed to send as ceo@example.com');
      // The session goes on, with the refused transaction gone.
      await noTransaction(c);
      await c.quit();
      expect(await storedFor(t, { account: 'printer@example.com' })).toBe(before);
      const event = await waitFor(
        async () =>
          (await t.postern.store.listSecurityEvents()).find(
            (e) => e.kind === 'send_as_denied' && e.detail.message === 'SendAsDenied; printer@example.com is not allowed to send as ceo@example.com (headers)',
          ),
        5000,
        'send_as_denied (headers) event',
      );
      expect(event).toMatchObject({ account: 'printer@example.com', ip: '127.0.0.1', listener: 'submission' });
    });
  }

  it('refuses two From (or two Sender) fields even when each is allowed, with 550 5.6.0, and queues nothing', async () => {
    const before = await storedFor(t, { account: 'printer@example.com' });
    const cases: [string, string][] = [
      ['From: printer@example.com\r\nFrom: "Printer" <printer@example.com>', 'The message has 2 From header fields; RFC 5322 allows one. Fix the client so it writes a single From'],
      ['From: printer@example.com\r\nSender: printer@example.com\r\nSender: printer@example.com\r\nSender: printer@example.com', 'The message has 3 Sender header fields; RFC 5322 allows one. Fix the client so it writes a single Sender'],
    ];
    for (const [header, text] of cases) {
      const { c } = await login(t, 'printer@example.com');
      await c.command('MAIL FROM:<printer@example.com>');
      await c.command('RCPT TO:<a@example.net>');
      expect((await c.data(`${header}\r\nSubject: x\r\n\r\nbody\r\n`)).text).toBe(`550 5.6.0 ${text}`);
      await c.quit();
    }
    expect(await storedFor(t, { account: 'printer@example.com' })).toBe(before);
    // One From with several allowed addresses is fine (RFC 5322 wants a Sender then: it has one).
    const { c } = await login(t, 'app@example.com');
    await c.command('MAIL FROM:<app@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    expect((await c.data('From: app@example.com, noreply@example.com\r\nSender: app@example.com\r\nSubject: x\r\n\r\nbody\r\n')).code).toBe(250);
    await c.quit();
  });

  it('rewrites a From the account may not use when rewrite-from is on, keeping the original in Reply-To', async () => {
    const { c } = await login(t, 'scanner@example.com');
    await c.command('MAIL FROM:<scanner@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    const reply = await c.data('From: "Scanner 3F" <scanner-3f@printers.local>\r\nSubject: scan\r\n\r\nbody\r\n');
    const queueId = /queued as (\S+)/.exec(reply.text)![1]!;
    await c.quit();
    const chunks: Buffer[] = [];
    for await (const chunk of t.postern.store.readBody(queueId)) chunks.push(chunk as Buffer);
    const head = Buffer.concat(chunks).toString().split('\r\n\r\n')[0]!;
    expect(head).toContain('\r\nFrom: <scanner@example.com>\r\n');
    expect(head).toContain('\r\nReply-To: "Scanner 3F" <scanner-3f@printers.local>\r\n');
    expect(head).not.toContain('From: "Scanner 3F"');
  });

  it('rewrites every From field when one is not allowed, leaving one From and the originals in Reply-To', async () => {
    const { c } = await login(t, 'scanner@example.com');
    await c.command('MAIL FROM:<scanner@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    const reply = await c.data('From: scanner@example.com\r\nSubject: scan\r\nFrom: CEO <ceo@example.com>\r\n\r\nbody\r\n');
    expect(reply.text).toMatch(/^250 2\.0\.0 Ok: queued as \S+$/);
    await c.quit();
    const head = (await bodyOf(t, /queued as (\S+)/.exec(reply.text)![1]!)).split('\r\n\r\n')[0]!;
    expect(head.match(/^From:.*$/gim)).toEqual(['From: <scanner@example.com>']);
    expect(head).toContain('\r\nReply-To: scanner@example.com, CEO <ceo@example.com>\r\n');
    expect(head).not.toContain('ceo@example.com>\r\nSubject');
  });

  it('still refuses a forged Sender when rewrite-from is on (only From is rewritten)', async () => {
    const before = await storedFor(t, { account: 'scanner@example.com' });
    const { c } = await login(t, 'scanner@example.com');
    await c.command('MAIL FROM:<scanner@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    const reply = await c.data('From: scanner-3f@printers.local\r\nSender: boss@example.com\r\n\r\nbody\r\n');
    expect(reply.text).toBe('550 5.7.60 SendAsDenied; scanner@example.com is not allowed to send as boss@example.com');
    await c.quit();
    expect(await storedFor(t, { account: 'scanner@example.com' })).toBe(before);
  });

  it('refuses recipients outside the account allow list with 550 5.7.1 naming the rule, and queues the message only for the others', async () => {
    const before = await storedFor(t, { account: 'lobby@example.com' });
    const { c } = await login(t, 'lobby@example.com');
    await c.command('MAIL FROM:<lobby@example.com>');
    const alone = await c.command('RCPT TO:<someone@gmail.example>');
    expect(alone.text).toBe('550 5.7.1 lobby@example.com may not send to gmail.example: the account is limited to example.com, *.example.org');
    // Refused as the only recipient: there is nothing to send.
    await noTransaction(c);
    expect((await c.command('RCPT TO:<desk@example.com>')).code).toBe(250);
    expect((await c.command('RCPT TO:<x@branch.example.org>')).code).toBe(250);
    const refused = await c.command('RCPT TO:<someone@gmail.example>');
    expect(refused.text).toBe('550 5.7.1 lobby@example.com may not send to gmail.example: the account is limited to example.com, *.example.org');
    const reply = await c.data('Subject: x\r\n\r\nx\r\n');
    await c.quit();
    expect(await storedFor(t, { account: 'lobby@example.com' })).toBe(before + 1);
    const message = await t.postern.store.getMessage(/queued as (\S+)/.exec(reply.text)![1]!);
    expect(message?.recipients.map((r) => r.address)).toEqual(['desk@example.com', 'x@branch.example.org']);
    const event = (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'recipient_denied');
    expect(event).toMatchObject({ account: 'lobby@example.com', ip: '127.0.0.1', listener: 'submission', detail: { message: 'lobby@example.com may not send to gmail.example' } });
  });
});

describe('rate limits', () => {
  let t: TestPostern;
  beforeAll(async () => {
    t = await startTestPostern({ extra: `${NO_DNS}\n[limits]\nconnections_per_account = 2\n` });
    await account(t, 'burst@example.com', { limits: { messagesPerMinute: 3 } });
    await account(t, 'many@example.com', { limits: { recipientsPerDay: 4 } });
    await account(t, 'conn@example.com');
  });
  afterAll(() => t?.stop());

  it('answers 451 4.7.0 past the messages-per-minute limit, naming the limit, the account and when to retry', async () => {
    const { c } = await login(t, 'burst@example.com');
    for (let i = 0; i < 3; i++) {
      expect((await c.command('MAIL FROM:<burst@example.com>')).code).toBe(250);
      await c.command('RCPT TO:<a@example.net>');
      expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
    }
    const fourth = await c.command('MAIL FROM:<burst@example.com>');
    expect(fourth.text).toMatch(/^451 4\.7\.0 Rate limit: 3 messages per minute for burst@example\.com; retry in ([1-9]|[1-5]\d|60) s$/);
    expect((await c.command('RCPT TO:<a@example.net>')).text).toBe('503 5.5.1 Error: need MAIL command');
    await noTransaction(c);
    await c.quit();
    expect(await storedFor(t, { account: 'burst@example.com' })).toBe(3);
    const event = (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'rate_limited');
    expect(event).toMatchObject({ account: 'burst@example.com', ip: '127.0.0.1', listener: 'submission' });
    expect(event?.detail.message).toMatch(/^Rate limit: 3 messages per minute for burst@example\.com; retry in \d+ s$/);
  });

  it('answers 451 4.7.0 past the recipients-per-day limit, counting recipients of this message too', async () => {
    const { c } = await login(t, 'many@example.com');
    await c.command('MAIL FROM:<many@example.com>');
    for (const r of ['a', 'b', 'c']) expect((await c.command(`RCPT TO:<${r}@example.net>`)).code).toBe(250);
    expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
    await c.command('MAIL FROM:<many@example.com>');
    expect((await c.command('RCPT TO:<d@example.net>')).code).toBe(250);
    const over = await c.command('RCPT TO:<e@example.net>');
    // The in-progress transaction's own recipient counts: 3 queued + 1 reserved. Not full of
    // queued mail yet, so the client is told to try again soon.
    expect(over.text).toBe('451 4.7.0 Rate limit: 4 recipients per 24 hours for many@example.com; retry in 60 s');
    // The message goes to the recipient that was accepted, and only to it.
    const reply = await c.data('Subject: x\r\n\r\nx\r\n');
    expect((await t.postern.store.getMessage(/queued as (\S+)/.exec(reply.text)![1]!))?.recipients.map((r) => r.address)).toEqual(['d@example.net']);
    // Now full of queued mail: room opens when the first message leaves the 24 hours.
    await c.command('MAIL FROM:<many@example.com>');
    expect((await c.command('RCPT TO:<f@example.net>')).text).toBe('451 4.7.0 Rate limit: 4 recipients per 24 hours for many@example.com; retry in 24 h');
    await noTransaction(c);
    await c.quit();
    expect(await storedFor(t, { account: 'many@example.com' })).toBe(2);
    expect((await t.postern.store.usageSince({ account: 'many@example.com' }, 0)).recipients).toBe(4);
  });

  it('limits connections per account with 454 4.7.0 and frees the slot on close', async () => {
    const a = await login(t, 'conn@example.com');
    const b = await login(t, 'conn@example.com');
    expect([a.auth.code, b.auth.code]).toEqual([235, 235]);
    const third = await login(t, 'conn@example.com');
    expect(third.auth.text).toBe('454 4.7.0 Too many connections for conn@example.com: at most 2 at once; close one and try again');
    // Still not logged in: it cannot send anything.
    expect((await third.c.command('MAIL FROM:<conn@example.com>')).text).toBe('530 5.7.57 Client not authenticated to send mail. Log in with AUTH first');
    expect(await storedFor(t, { account: 'conn@example.com' })).toBe(0);
    const event = (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'rate_limited' && e.account === 'conn@example.com');
    expect(event).toMatchObject({ ip: '127.0.0.1', listener: 'submission', detail: { message: 'conn@example.com already has 2 connections open (limit 2)', limit: 'connections' } });
    await a.c.quit();
    await waitFor(async () => {
      const again = await login(t, 'conn@example.com');
      again.c.destroy();
      return again.auth.code === 235;
    }, 5000, 'a free connection slot');
    for (const x of [b.c, third.c]) x.destroy();
  });
});

describe('brute-force lockout', () => {
  it('locks a username after 5 failures, refuses even the right password, and keeps the lock across a restart', async () => {
    let t = await startTestPostern({ extra: NO_DNS });
    const dir = t.dir;
    await account(t, 'printer@example.com');
    for (let i = 0; i < 5; i++) {
      const { c, auth } = await login(t, 'printer@example.com', { password: `wrong ${i}` });
      expect(auth.text).toBe('535 5.7.8 Authentication unsuccessful, the username or password is wrong');
      c.destroy();
    }
    const { c, auth } = await login(t, 'printer@example.com');
    expect(auth.text).toMatch(/^454 4\.7\.0 Too many failed logins; AUTH is refused for \d+ min\. Check the password configured in the device$/);
    c.destroy();
    // The same reply for a username that does not exist: a lockout reveals nothing.
    for (let i = 0; i < 6; i++) (await login(t, 'ghost@example.com', { password: 'x' })).c.destroy();
    expect((await login(t, 'ghost@example.com')).auth.text).toMatch(/^454 4\.7\.0 Too many failed logins/);
    const events = await t.postern.store.listSecurityEvents();
    const failed = events.filter((e) => e.kind === 'auth_failed' && e.account === 'printer@example.com');
    expect(failed).toHaveLength(5);
    for (const e of failed) {
      expect(e).toMatchObject({
        ip: '127.0.0.1',
        listener: 'submission',
        detail: { message: 'Failed AUTH for printer@example.com from 127.0.0.1 on submission', reason: 'bad_credentials' },
      });
    }
    // An unknown username is recorded the same way (the log names the reason, the client never does).
    expect(events.find((e) => e.kind === 'auth_failed' && e.account === 'ghost@example.com')).toMatchObject({ ip: '127.0.0.1', listener: 'submission' });
    expect(events.find((e) => e.kind === 'lockout' && e.account === 'printer@example.com')).toBeTruthy();
    await t.stop();
    t = await startTestPostern({ dir, text: (await import('node:fs')).readFileSync(`${dir}/postern.toml`, 'utf8') });
    try {
      const after = await login(t, 'printer@example.com');
      expect(after.auth.code).toBe(454);
      after.c.destroy();
    } finally {
      await t.stop();
    }
  });

  it('locks an address after 20 failures across usernames; other addresses still log in', async () => {
    const t = await startTestPostern({ extra: NO_DNS });
    try {
      await account(t, 'printer@example.com');
      for (let i = 0; i < 20; i++) (await login(t, `user${i}@example.com`, { localAddress: '127.0.0.7', password: 'x' })).c.destroy();
      const locked = await login(t, 'printer@example.com', { localAddress: '127.0.0.7' });
      expect(locked.auth.text).toBe('454 4.7.0 Too many failed logins; AUTH is refused for 15 min. Check the password configured in the device');
      expect((await locked.c.command('MAIL FROM:<printer@example.com>')).text).toBe('530 5.7.57 Client not authenticated to send mail. Log in with AUTH first');
      expect(await storedFor(t, { account: 'printer@example.com' })).toBe(0);
      const lockout = (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'lockout');
      expect(lockout).toMatchObject({ ip: '127.0.0.7', listener: 'submission', detail: { message: 'AUTH locked for address 127.0.0.7 for 15 min after repeated failures', by: 'ip' } });
      const other = await login(t, 'printer@example.com', { localAddress: '127.0.0.8' });
      expect(other.auth.code).toBe(235);
      for (const x of [locked.c, other.c]) x.destroy();
    } finally {
      await t.stop();
    }
  });

  it('stores at most 30 failed logins a minute one by one, and the rest as one summary', async () => {
    // A password spray from many addresses passes every lockout; the store must not take a row per
    // attempt. 35 failures, each with its own username, from two addresses (under the address
    // lockout of 20), all within one minute of the clock.
    const t = await startTestPostern({ extra: NO_DNS });
    try {
      const second = new Date().getUTCSeconds();
      if (second >= 45) await new Promise((resolve) => setTimeout(resolve, (61 - second) * 1000));
      for (let i = 0; i < 35; i++) {
        (await login(t, `spray${i}@example.com`, { localAddress: i < 18 ? '127.0.0.9' : '127.0.0.10', password: 'x' })).c.destroy();
      }
      await t.postern.events.drain();
      const failed = (await t.postern.store.listSecurityEvents()).filter((e) => e.kind === 'auth_failed');
      const oneByOne = failed.filter((e) => e.account !== null);
      expect(oneByOne.map((e) => e.account).sort()).toEqual(Array.from({ length: 30 }, (_, i) => `spray${i}@example.com`).sort());
      const summaries = failed.filter((e) => e.account === null);
      expect(summaries).toHaveLength(1);
      expect(summaries[0]).toMatchObject({ ip: null, listener: null, detail: { suppressed: 5, addresses: 1, usernames: 5 } });
      expect(summaries[0]!.detail.message).toMatch(
        /^5 more failed AUTH in the minute from \d\d:\d\d UTC, from 1 addresses for 5 usernames; not stored one by one \(at most 30 a minute are\), each is in the log$/,
      );
    } finally {
      await t.stop();
    }
  }, 60_000);
});

describe('networks, connectors and alerts', () => {
  let t: TestPostern;
  let hook: http.Server;
  const posted: Record<string, unknown>[] = [];
  beforeAll(async () => {
    hook = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        posted.push(JSON.parse(body) as Record<string, unknown>);
        res.end('ok');
      });
    });
    await new Promise<void>((r) => hook.listen(0, '127.0.0.1', () => r()));
    const hookPort = (hook.address() as { port: number }).port;
    t = await startTestPostern({
      text: `hostname = "relay.example.test"
data_dir = "${(await import('./helpers/temp-dir.js')).tempDir()}"
[listen]
submission = "127.0.0.1:0"
relay = "127.0.0.1:0"
[delivery]
dns_servers = ["127.0.0.1:9"]
[alerts]
admin_address = "admin@example.com"
webhook = "http://127.0.0.1:${hookPort}/postern"
[lockout]
account_failures = 2
[[connector]]
name = "tls-only"
networks = ["127.0.0.21/32"]
require_tls = true
[[connector]]
name = "cameras"
networks = ["127.0.0.22/32"]
sender_domains = ["cameras.example.com"]
messages_per_minute = 1
`,
    });
    await account(t, 'bound@example.com', { networks: ['127.0.5.0/24'] });
    await account(t, 'roamer@example.com');
  });
  afterAll(async () => {
    await t?.stop();
    hook?.close();
  });

  it('refuses an account outside its networks with the wrong-password reply', async () => {
    const outside = await login(t, 'bound@example.com', { localAddress: '127.0.0.1' });
    expect(outside.auth.text).toBe('535 5.7.8 Authentication unsuccessful, the username or password is wrong');
    const inside = await login(t, 'bound@example.com', { localAddress: '127.0.5.9' });
    expect(inside.auth.code).toBe(235);
    for (const x of [outside.c, inside.c]) x.destroy();
  });

  it('records a login from a new network and alerts by webhook and by mail', async () => {
    (await login(t, 'roamer@example.com', { localAddress: '127.0.0.1' })).c.destroy();
    (await login(t, 'roamer@example.com', { localAddress: '127.0.9.1' })).c.destroy();
    const event = await waitFor(async () => (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'new_network'), 5000, 'new_network event');
    expect(event).toMatchObject({ account: 'roamer@example.com', ip: '127.0.9.1' });
    expect(event.detail.message).toBe('roamer@example.com logged in from 127.0.9.0/24, a network it never used before');
    const hooked = await waitFor(() => posted.find((p) => p.kind === 'new_network'), 5000, 'webhook');
    expect(hooked).toMatchObject({ source: 'relay.example.test', account: 'roamer@example.com' });
    const mail = await waitFor(async () => {
      for (const q of await t.postern.store.listQueue()) {
        const m = await t.postern.store.getMessage(q.queueId);
        if (m?.origin.listener === 'alert' && m.recipients[0]?.address === 'admin@example.com') return m;
      }
      return undefined;
    }, 5000, 'alert mail');
    expect(mail.sender).toBe('');
  });

  it('alerts on a lockout', async () => {
    for (let i = 0; i < 2; i++) (await login(t, 'roamer@example.com', { password: 'nope' })).c.destroy();
    const hooked = await waitFor(() => posted.find((p) => p.kind === 'lockout'), 5000, 'lockout webhook');
    expect(String((hooked.detail as { message: string }).message)).toMatch(/^AUTH locked for account roamer@example\.com for \d+ min after repeated failures$/);
  });

  it('applies connector options: TLS required, sender domains, per-address limits', async () => {
    const plain = await RawSmtp.connect(t.port('relay'), { localAddress: '127.0.0.21' });
    await plain.read();
    await plain.command('EHLO cam.local');
    expect((await plain.command('MAIL FROM:<a@example.com>')).text).toBe('530 5.7.0 Must issue a STARTTLS command first: connector tls-only requires TLS');
    expect((await plain.command('RCPT TO:<ops@example.net>')).text).toBe('503 5.5.1 Error: need MAIL command');
    await noTransaction(plain);
    expect(await storedFor(t, { clientIp: '127.0.0.21' })).toBe(0);
    await plain.startTls();
    await plain.command('EHLO cam.local');
    expect((await plain.command('MAIL FROM:<a@example.com>')).code).toBe(250);
    await plain.quit();

    const cam = await RawSmtp.connect(t.port('relay'), { localAddress: '127.0.0.22' });
    await cam.read();
    await cam.command('EHLO cam.local');
    expect((await cam.command('MAIL FROM:<cam1@other.example>')).text).toBe(
      '550 5.7.1 Sender domain other.example is not allowed on connector cameras',
    );
    expect((await cam.command('RCPT TO:<ops@example.net>')).text).toBe('503 5.5.1 Error: need MAIL command');
    await noTransaction(cam);
    expect(await storedFor(t, { clientIp: '127.0.0.22' })).toBe(0);
    expect((await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'send_as_denied' && e.ip === '127.0.0.22')).toMatchObject({
      account: null,
      listener: 'relay',
      detail: { message: 'Sender domain other.example refused on connector cameras' },
    });
    expect((await cam.command('MAIL FROM:<cam1@cameras.example.com>')).code).toBe(250);
    await cam.command('RCPT TO:<ops@example.net>');
    expect((await cam.data('Subject: motion\r\n\r\nx\r\n')).code).toBe(250);
    expect((await cam.command('MAIL FROM:<cam1@cameras.example.com>')).text).toMatch(
      /^451 4\.7\.0 Rate limit: 1 messages per minute for 127\.0\.0\.22; retry in ([1-9]|[1-5]\d|60) s$/,
    );
    await noTransaction(cam);
    await cam.quit();
    expect(await storedFor(t, { clientIp: '127.0.0.22' })).toBe(1);
  });

  it('alerts on a rate-limit hit, by webhook and by mail, naming the limit and the address', async () => {
    // The test above hit the cameras connector's limit of 1 message per minute.
    const hooked = await waitFor(() => posted.find((p) => p.kind === 'rate_limited'), 5000, 'rate_limited webhook');
    expect(hooked).toMatchObject({ source: 'relay.example.test', kind: 'rate_limited', ip: '127.0.0.22', listener: 'relay' });
    expect(String((hooked.detail as { message: string }).message)).toMatch(/^Rate limit: 1 messages per minute for 127\.0\.0\.22; retry in \d+ s$/);
    const mail = await waitFor(() => alertMail(t, '[Postern] rate limited from 127.0.0.22'), 5000, 'rate limit alert mail');
    expect(mail).toMatch(/\r\n\r\nRate limit: 1 messages per minute for 127\.0\.0\.22; retry in \d+ s\r\n/);
    expect(mail).toContain('\r\nAddress:  127.0.0.22\r\nListener: relay\r\n');
  });
});

describe('[policy] enforce = false', () => {
  it('turns off rate limits and send-as but not authentication', async () => {
    const t = await startTestPostern({ extra: `${NO_DNS}\n[policy]\nenforce = false\n[limits]\nmessages_per_minute = 1\n` });
    try {
      await account(t, 'printer@example.com');
      const { c } = await login(t, 'printer@example.com');
      for (let i = 0; i < 2; i++) {
        expect((await c.command('MAIL FROM:<anyone@example.org>')).code).toBe(250);
        await c.command('RCPT TO:<a@example.net>');
        expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
      }
      await c.quit();
      expect((await login(t, 'printer@example.com', { password: 'wrong' })).auth.code).toBe(535);
    } finally {
      await t.stop();
    }
  });
});

describe('volume spike', () => {
  it('records an account sending more than 5 times its daily average of the week before, and alerts by webhook and mail', async () => {
    const posted: Record<string, unknown>[] = [];
    const hook = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        posted.push(JSON.parse(body) as Record<string, unknown>);
        res.end('ok');
      });
    });
    await new Promise<void>((r) => hook.listen(0, '127.0.0.1', () => r()));
    const hookPort = (hook.address() as { port: number }).port;
    const t = await startTestPostern({
      extra: `${NO_DNS}\n[alerts]\nadmin_address = "admin@example.com"\nwebhook = "http://127.0.0.1:${hookPort}/postern"\n`,
    });
    try {
      await account(t, 'printer@example.com');
      const store = t.postern.store;
      const day = 86_400_000;
      const now = Date.now();
      // History, queued straight into the store: one recipient a day for 7 days, then 120 today.
      const put = async (at: number, recipients: number) => {
        const { newQueueId } = await import('../src/store/queue-id.js');
        const queueId = newQueueId(at);
        const writer = store.createBody(queueId);
        writer.stream.end('Subject: x\r\n\r\nx\r\n');
        const size = await writer.finish();
        await store.enqueue({
          queueId,
          sender: 'printer@example.com',
          recipients: Array.from({ length: recipients }, (_, i) => ({ address: `r${i}@example.net` })),
          size,
          receivedAt: at,
          expiresAt: at + 5 * day,
          origin: { sessionId: 'history', listener: 'submission', clientIp: '127.0.0.1', account: 'printer@example.com' },
        });
      };
      for (let d = 2; d <= 8; d++) await put(now - d * day + 3_600_000, 1);
      await put(now - 3_600_000, 60);
      await put(now - 1_800_000, 60);
      const { c } = await login(t, 'printer@example.com');
      expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
      await c.quit();
      const spike = await waitFor(async () => (await store.listSecurityEvents()).find((e) => e.kind === 'volume_spike'), 5000, 'volume_spike');
      expect(spike).toMatchObject({ account: 'printer@example.com', ip: '127.0.0.1', listener: 'submission', detail: { last24h: 120, dailyAverage: 1 } });
      expect(spike.detail.message).toBe('printer@example.com sent to 120 recipients in 24 hours, more than 5 times its daily average of 1');
      const hooked = await waitFor(() => posted.find((p) => p.kind === 'volume_spike'), 5000, 'volume_spike webhook');
      expect(hooked).toMatchObject({
        source: 'relay.example.test',
        account: 'printer@example.com',
        ip: '127.0.0.1',
        listener: 'submission',
        detail: { message: 'printer@example.com sent to 120 recipients in 24 hours, more than 5 times its daily average of 1' },
      });
      const mail = await waitFor(() => alertMail(t, '[Postern] volume spike for printer@example.com'), 5000, 'volume spike alert mail');
      expect(mail).toContain('\r\n\r\nprinter@example.com sent to 120 recipients in 24 hours, more than 5 times its daily average of 1\r\n');
      expect(mail).toContain('\r\nAccount:  printer@example.com\r\nAddress:  127.0.0.1\r\nListener: submission\r\n');
    } finally {
      await t.stop();
      hook.close();
    }
  });
});
