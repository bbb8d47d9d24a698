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

  it('refuses MAIL FROM another address with 550 5.7.60 SendAsDenied and records the event', async () => {
    const { c } = await login(t, 'printer@example.com');
    const reply = await c.command('MAIL FROM:<ceo@example.com>');
    expect(reply.text).toBe('550 5.7.60 SendAsDenied; printer@example.com is not allowed to send as ceo@example.com');
    expect((await c.command('MAIL FROM:<Printer@Example.com>')).code).toBe(250);
    await c.quit();
    const events = await t.postern.store.listSecurityEvents();
    expect(events.find((e) => e.kind === 'send_as_denied')).toMatchObject({ account: 'printer@example.com', ip: '127.0.0.1', listener: 'submission' });
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

  it('refuses recipients outside the account allow list with 550 5.7.1 naming the rule', async () => {
    const { c } = await login(t, 'lobby@example.com');
    await c.command('MAIL FROM:<lobby@example.com>');
    expect((await c.command('RCPT TO:<desk@example.com>')).code).toBe(250);
    expect((await c.command('RCPT TO:<x@branch.example.org>')).code).toBe(250);
    const refused = await c.command('RCPT TO:<someone@gmail.example>');
    expect(refused.text).toBe('550 5.7.1 lobby@example.com may not send to gmail.example: the account is limited to example.com, *.example.org');
    await c.quit();
    expect((await t.postern.store.listSecurityEvents()).some((e) => e.kind === 'recipient_denied')).toBe(true);
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
    expect(fourth.text).toMatch(/^451 4\.7\.0 Rate limit: 3 messages per minute for burst@example\.com; retry in \d+ s$/);
    await c.quit();
    const event = (await t.postern.store.listSecurityEvents()).find((e) => e.kind === 'rate_limited');
    expect(event).toMatchObject({ account: 'burst@example.com' });
  });

  it('answers 451 4.7.0 past the recipients-per-day limit, counting recipients of this message too', async () => {
    const { c } = await login(t, 'many@example.com');
    await c.command('MAIL FROM:<many@example.com>');
    for (const r of ['a', 'b', 'c']) expect((await c.command(`RCPT TO:<${r}@example.net>`)).code).toBe(250);
    expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
    await c.command('MAIL FROM:<many@example.com>');
    expect((await c.command('RCPT TO:<d@example.net>')).code).toBe(250);
    const over = await c.command('RCPT TO:<e@example.net>');
    expect(over.text).toMatch(/^451 4\.7\.0 Rate limit: 4 recipients per 24 hours for many@example\.com; retry in \d+ h$/);
    await c.quit();
  });

  it('limits connections per account with 454 4.7.0 and frees the slot on close', async () => {
    const a = await login(t, 'conn@example.com');
    const b = await login(t, 'conn@example.com');
    expect([a.auth.code, b.auth.code]).toEqual([235, 235]);
    const third = await login(t, 'conn@example.com');
    expect(third.auth.text).toBe('454 4.7.0 Too many connections for conn@example.com: at most 2 at once; close one and try again');
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
    expect(events.filter((e) => e.kind === 'auth_failed').length).toBeGreaterThanOrEqual(5);
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
      expect(locked.auth.code).toBe(454);
      const other = await login(t, 'printer@example.com', { localAddress: '127.0.0.8' });
      expect(other.auth.code).toBe(235);
      for (const x of [locked.c, other.c]) x.destroy();
    } finally {
      await t.stop();
    }
  });
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
    expect((await cam.command('MAIL FROM:<cam1@cameras.example.com>')).code).toBe(250);
    await cam.command('RCPT TO:<ops@example.net>');
    expect((await cam.data('Subject: motion\r\n\r\nx\r\n')).code).toBe(250);
    expect((await cam.command('MAIL FROM:<cam1@cameras.example.com>')).text).toMatch(
      /^451 4\.7\.0 Rate limit: 1 messages per minute for 127\.0\.0\.22; retry in \d+ s$/,
    );
    await cam.quit();
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
  it('records an account sending more than 5 times its daily average of the week before', async () => {
    const t = await startTestPostern({ extra: NO_DNS });
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
      expect(spike.account).toBe('printer@example.com');
      expect(spike.detail.message).toMatch(/^printer@example\.com sent to 120 recipients in 24 hours, more than 5 times its daily average of 1$/);
    } finally {
      await t.stop();
    }
  });
});
