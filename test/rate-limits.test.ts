// Sending limits under concurrency and across restarts: a limit is reserved when it is checked, so
// parallel sessions of one account (or one connector address) cannot together go over it; what an
// abandoned transaction reserved is given back; queued mail still counts after a restart; and the
// shipped defaults are Office 365's.
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../src/accounts/password.js';
import { parseConfigText } from '../src/config/load-config.js';
import { newQueueId } from '../src/store/queue-id.js';
import type { AccountPolicy } from '../src/store/store.js';
import { RawSmtp, type Reply } from './helpers/raw-smtp.js';
import { type TestPostern, startTestPostern, tempDir } from './helpers/postern-harness.js';
import { waitFor } from './helpers/wait-for.js';

const PASSWORD = 'rate limit test password';
const NO_DNS = '\n[delivery]\ndns_servers = ["127.0.0.1:9"]\n';
/** A per-minute refusal: the retry time is at most a minute away. */
const RETRY_S = '([1-9]|[1-5]\\d|60) s';

async function account(t: TestPostern, address: string, policy: AccountPolicy = {}): Promise<void> {
  await t.postern.store.createAccount({ address, passwordHash: await hashPassword(PASSWORD), policy });
}

async function login(t: TestPostern, user: string): Promise<RawSmtp> {
  const { client, auth } = await RawSmtp.submission(t.port('submission'), user, PASSWORD);
  expect(auth.code).toBe(235);
  return client;
}

async function relay(t: TestPostern, localAddress: string): Promise<RawSmtp> {
  const c = await RawSmtp.connect(t.port('relay'), { localAddress });
  await c.read();
  await c.command('EHLO device.local');
  return c;
}

async function stored(t: TestPostern, who: { account: string } | { clientIp: string }) {
  return t.postern.store.usageSince(who, 0);
}

/** Sends the same command on every connection at once (one write each, then all replies). */
async function together(clients: RawSmtp[], line: string): Promise<Reply[]> {
  for (const c of clients) c.write(`${line}\r\n`);
  return Promise.all(clients.map((c) => c.read()));
}

describe('parallel sessions cannot go over a limit together', () => {
  let t: TestPostern;
  beforeAll(async () => {
    // Not the harness config: its "loopback" connector (127.0.0.0/8) would match first.
    const dir = tempDir();
    t = await startTestPostern({
      dir,
      text: `hostname = "relay.example.test"
data_dir = ${JSON.stringify(dir)}
[listen]
submission = "127.0.0.1:0"
relay = "127.0.0.1:0"
${NO_DNS}
[limits]
connections_per_account = 50

[[connector]]
name = "cameras"
networks = ["127.0.0.31/32"]
messages_per_minute = 2
recipients_per_day = 3
`,
    });
    await account(t, 'burst@example.com', { limits: { messagesPerMinute: 3 } });
    await account(t, 'wide@example.com', { limits: { recipientsPerDay: 5 } });
  });
  afterAll(() => t?.stop());

  it('8 sessions of one account send MAIL FROM at once: exactly 3 pass a limit of 3 a minute, 3 are queued', async () => {
    const clients = await Promise.all(Array.from({ length: 8 }, () => login(t, 'burst@example.com')));
    const replies = await together(clients, 'MAIL FROM:<burst@example.com>');
    const passed = clients.filter((_, i) => replies[i]!.code === 250);
    const refused = replies.filter((r) => r.code !== 250);
    expect(passed).toHaveLength(3);
    expect(refused).toHaveLength(5);
    for (const r of refused) expect(r.text).toMatch(new RegExp(`^451 4\\.7\\.0 Rate limit: 3 messages per minute for burst@example\\.com; retry in ${RETRY_S}$`));
    for (const c of passed) expect((await c.command('RCPT TO:<a@example.net>')).code).toBe(250);
    const data = await Promise.all(passed.map((c) => c.data('Subject: x\r\n\r\nx\r\n')));
    for (const r of data) expect(r.text).toMatch(/^250 2\.0\.0 Ok: queued as \S+$/);
    // The refused sessions have no transaction: nothing more can be queued through them.
    for (const c of clients.filter((c) => !passed.includes(c))) {
      expect((await c.command('RCPT TO:<a@example.net>')).text).toBe('503 5.5.1 Error: need MAIL command');
    }
    await Promise.all(clients.map((c) => c.quit()));
    expect((await stored(t, { account: 'burst@example.com' })).messages).toBe(3);
  });

  it('3 sessions of one account add recipients at once: a limit of 5 a day lets exactly 5 through', async () => {
    const clients = await Promise.all(Array.from({ length: 3 }, () => login(t, 'wide@example.com')));
    for (const r of await together(clients, 'MAIL FROM:<wide@example.com>')) expect(r.code).toBe(250);
    const accepted = [0, 0, 0];
    for (let round = 0; round < 3; round++) {
      const replies = await together(clients, `RCPT TO:<r${round}@example.net>`);
      replies.forEach((r, i) => {
        if (r.code === 250) accepted[i]!++;
        else expect(r.text).toBe('451 4.7.0 Rate limit: 5 recipients per 24 hours for wide@example.com; retry in 60 s');
      });
    }
    expect(accepted.reduce((a, b) => a + b, 0)).toBe(5);
    for (const r of await Promise.all(clients.map((c) => c.data('Subject: x\r\n\r\nx\r\n')))) expect(r.code).toBe(250);
    await Promise.all(clients.map((c) => c.quit()));
    expect(await stored(t, { account: 'wide@example.com' })).toMatchObject({ messages: 3, recipients: 5 });
  });

  it('6 sessions from one connector address: its limit of 2 messages a minute lets exactly 2 through', async () => {
    const clients = await Promise.all(Array.from({ length: 6 }, () => relay(t, '127.0.0.31')));
    const replies = await together(clients, 'MAIL FROM:<cam@cameras.example.com>');
    expect(replies.filter((r) => r.code === 250)).toHaveLength(2);
    for (const r of replies.filter((r) => r.code !== 250)) {
      expect(r.text).toMatch(new RegExp(`^451 4\\.7\\.0 Rate limit: 2 messages per minute for 127\\.0\\.0\\.31; retry in ${RETRY_S}$`));
    }
    const passed = clients.filter((_, i) => replies[i]!.code === 250);
    // The connector's recipients_per_day (3) holds across the two transactions as well.
    const first = await together(passed, 'RCPT TO:<ops1@example.net>');
    const second = await together(passed, 'RCPT TO:<ops2@example.net>');
    const codes = [...first, ...second].map((r) => r.code).sort();
    expect(codes).toEqual([250, 250, 250, 451]);
    const over = [...first, ...second].find((r) => r.code === 451)!;
    expect(over.text).toBe('451 4.7.0 Rate limit: 3 recipients per 24 hours for 127.0.0.31; retry in 60 s');
    for (const r of await Promise.all(passed.map((c) => c.data('Subject: motion\r\n\r\nx\r\n')))) expect(r.code).toBe(250);
    await Promise.all(clients.map((c) => c.quit()));
    expect(await stored(t, { clientIp: '127.0.0.31' })).toMatchObject({ messages: 2, recipients: 3 });
  });
});

describe('parallel logins cannot take more connection slots than an account has', () => {
  // After a failed login each successful one first clears the username's failures, a store write.
  // The slot is now taken with nothing awaited between reading the count and taking it (with
  // SQLite's synchronous counters the old order did not interleave in practice; an asynchronous
  // store would have let parallel logins all see a free slot).
  it('6 logins at once after a failed one: exactly 3 get in', async () => {
    const t = await startTestPostern({ extra: NO_DNS });
    try {
      await account(t, 'cam@example.com', { limits: { maxConnections: 3 } });
      const wrong = await RawSmtp.submission(t.port('submission'), 'cam@example.com', 'wrong password');
      expect(wrong.auth.code).toBe(535);
      wrong.client.destroy();
      const sessions = await Promise.all(
        Array.from({ length: 6 }, async () => {
          const client = await RawSmtp.connect(t.port('submission'));
          await client.read();
          await client.command('EHLO device.local');
          await client.startTls();
          await client.command('EHLO device.local');
          return client;
        }),
      );
      const line = `AUTH PLAIN ${Buffer.from(`\0cam@example.com\0${PASSWORD}`).toString('base64')}`;
      const replies = await together(sessions, line);
      expect(replies.filter((r) => r.code === 235)).toHaveLength(3);
      for (const r of replies.filter((r) => r.code !== 235)) {
        expect(r.text).toBe('454 4.7.0 Too many connections for cam@example.com: at most 3 at once; close one and try again');
      }
      for (const c of sessions) c.destroy();
    } finally {
      await t.stop();
    }
  });
});

describe('an abandoned transaction gives its reservation back', () => {
  let t: TestPostern;
  beforeAll(async () => {
    t = await startTestPostern({ extra: `${NO_DNS}\n[limits]\nconnections_per_account = 10\n` });
    await account(t, 'one@example.com', { limits: { messagesPerMinute: 1 } });
    await account(t, 'few@example.com', { limits: { recipientsPerDay: 2 } });
  });
  afterAll(() => t?.stop());

  const refusedText = new RegExp(`^451 4\\.7\\.0 Rate limit: 1 messages per minute for one@example\\.com; retry in ${RETRY_S}$`);

  /** `a` holds the only message slot; `b` is refused until `end(a)` gives it back. */
  async function givesBack(end: (a: RawSmtp) => Promise<void>): Promise<void> {
    const a = await login(t, 'one@example.com');
    const b = await login(t, 'one@example.com');
    expect((await a.command('MAIL FROM:<one@example.com>')).code).toBe(250);
    expect((await a.command('RCPT TO:<x@example.net>')).code).toBe(250);
    expect((await b.command('MAIL FROM:<one@example.com>')).text).toMatch(refusedText);
    await end(a);
    await waitFor(async () => {
      const reply = await b.command('MAIL FROM:<one@example.com>');
      if (reply.code === 250) return true;
      expect(reply.text).toMatch(refusedText);
      return false;
    }, 5000, 'the reservation to be given back');
    await b.command('RSET');
    await Promise.all([a.quit(), b.quit()]);
    // Nothing was queued, and nothing is held any more: a new session gets the slot.
    expect((await stored(t, { account: 'one@example.com' })).messages).toBe(0);
    const c = await login(t, 'one@example.com');
    await waitFor(async () => (await c.command('MAIL FROM:<one@example.com>')).code === 250, 5000, 'a free slot for a new session');
    await c.quit();
  }

  it('at RSET', () => givesBack(async (a) => void expect((await a.command('RSET')).code).toBe(250)));
  it('at a new EHLO', () => givesBack(async (a) => void expect((await a.command('EHLO again.local')).code).toBe(250)));
  it('at QUIT', () => givesBack((a) => a.quit()));
  it('when the connection is lost', () => givesBack(async (a) => a.destroy()));
  it('when DATA is refused (a forged From)', () =>
    givesBack(async (a) => {
      const reply = await a.data('From: ceo@example.com\r\n\r\nx\r\n');
      expect(reply.text).toBe('550 5.7.60 SendAsDenied; one@example.com is not allowed to send as ceo@example.com');
    }));
  it('when DATA is refused (a bare LF)', () =>
    givesBack(async (a) => {
      const reply = await a.data('Subject: x\r\n\r\nline\nsmuggled\r\n');
      expect(reply.text).toBe('550 5.6.11 Bare LF is not allowed in message data; lines must end with CRLF. Fix the client or its line-ending setting');
    }));

  it('recipients too: a transaction abandoned after RCPT frees its recipients for the next one', async () => {
    const a = await login(t, 'few@example.com');
    expect((await a.command('MAIL FROM:<few@example.com>')).code).toBe(250);
    expect((await a.command('RCPT TO:<r1@example.net>')).code).toBe(250);
    expect((await a.command('RCPT TO:<r2@example.net>')).code).toBe(250);
    expect((await a.command('RCPT TO:<r3@example.net>')).text).toBe('451 4.7.0 Rate limit: 2 recipients per 24 hours for few@example.com; retry in 60 s');
    const b = await login(t, 'few@example.com');
    expect((await b.command('MAIL FROM:<few@example.com>')).code).toBe(250);
    expect((await b.command('RCPT TO:<r1@example.net>')).text).toBe('451 4.7.0 Rate limit: 2 recipients per 24 hours for few@example.com; retry in 60 s');
    expect((await a.command('RSET')).code).toBe(250);
    expect((await b.command('RCPT TO:<r1@example.net>')).code).toBe(250);
    expect((await b.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
    await Promise.all([a.quit(), b.quit()]);
    expect(await stored(t, { account: 'few@example.com' })).toMatchObject({ messages: 1, recipients: 1 });
  });
});

describe('counters survive a restart', () => {
  it('an account at its per-minute limit is still refused after Postern restarts on the same data dir', async () => {
    const dir = tempDir();
    const extra = `${NO_DNS}\n[limits]\nmessages_per_minute = 2\n`;
    let t = await startTestPostern({ dir, extra });
    try {
      await account(t, 'printer@example.com');
      const c = await login(t, 'printer@example.com');
      for (let i = 0; i < 2; i++) {
        expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
        await c.command('RCPT TO:<a@example.net>');
        expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
      }
      await c.quit();
    } finally {
      await t.stop();
    }
    t = await startTestPostern({ dir, text: fs.readFileSync(`${dir}/postern.toml`, 'utf8') });
    try {
      const c = await login(t, 'printer@example.com');
      expect((await c.command('MAIL FROM:<printer@example.com>')).text).toMatch(
        new RegExp(`^451 4\\.7\\.0 Rate limit: 2 messages per minute for printer@example\\.com; retry in ${RETRY_S}$`),
      );
      await c.quit();
      expect((await stored(t, { account: 'printer@example.com' })).messages).toBe(2);
    } finally {
      await t.stop();
    }
  });
});

describe('the defaults are Office 365 limits', () => {
  it('parses to 30 messages a minute, 10,000 recipients a day, 500 per message and 3 connections per account', () => {
    const config = parseConfigText('', '/nonexistent/postern.toml');
    expect(config.limits).toMatchObject({ messages_per_minute: 30, recipients_per_day: 10_000, max_recipients: 500, connections_per_account: 3 });
    expect(config.policy.enforce).toBe(true);
  });

  describe('as a client meets them', () => {
    let t: TestPostern;
    beforeAll(async () => {
      // No [limits] table: the shipped values.
      t = await startTestPostern({ extra: NO_DNS });
      await account(t, 'printer@example.com');
      await account(t, 'busy@example.com');
    });
    afterAll(() => t?.stop());

    it('the 31st message in a minute gets 451 4.7.0 naming 30 messages per minute', async () => {
      const c = await login(t, 'printer@example.com');
      for (let i = 0; i < 30; i++) {
        expect((await c.command('MAIL FROM:<printer@example.com>')).code, `message ${i + 1}`).toBe(250);
        await c.command('RCPT TO:<a@example.net>');
        expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
      }
      expect((await c.command('MAIL FROM:<printer@example.com>')).text).toMatch(
        new RegExp(`^451 4\\.7\\.0 Rate limit: 30 messages per minute for printer@example\\.com; retry in ${RETRY_S}$`),
      );
      await c.quit();
      expect((await stored(t, { account: 'printer@example.com' })).messages).toBe(30);
    });

    it('the 10,001st recipient in 24 hours gets 451 4.7.0 naming 10000 recipients per 24 hours', async () => {
      // 9,999 recipients queued an hour ago, straight into the store.
      const store = t.postern.store;
      const at = Date.now() - 3_600_000;
      const queueId = newQueueId(at);
      const writer = store.createBody(queueId);
      writer.stream.end('Subject: x\r\n\r\nx\r\n');
      await store.enqueue({
        queueId,
        sender: 'busy@example.com',
        recipients: Array.from({ length: 9_999 }, (_, i) => ({ address: `r${i}@example.net` })),
        size: await writer.finish(),
        receivedAt: at,
        expiresAt: at + 5 * 86_400_000,
        origin: { sessionId: 'history', listener: 'submission', clientIp: '127.0.0.1', account: 'busy@example.com' },
      });
      const c = await login(t, 'busy@example.com');
      expect((await c.command('MAIL FROM:<busy@example.com>')).code).toBe(250);
      expect((await c.command('RCPT TO:<last@example.net>')).code).toBe(250);
      expect((await c.command('RCPT TO:<over@example.net>')).text).toBe(
        '451 4.7.0 Rate limit: 10000 recipients per 24 hours for busy@example.com; retry in 60 s',
      );
      expect((await c.data('Subject: x\r\n\r\nx\r\n')).code).toBe(250);
      expect((await c.command('MAIL FROM:<busy@example.com>')).code).toBe(250);
      expect((await c.command('RCPT TO:<over@example.net>')).text).toBe(
        '451 4.7.0 Rate limit: 10000 recipients per 24 hours for busy@example.com; retry in 23 h',
      );
      await c.quit();
      expect(await stored(t, { account: 'busy@example.com' })).toMatchObject({ messages: 2, recipients: 10_000 });
    });

    it('the 4th connection of an account gets 454 4.7.0 naming 3 at once', async () => {
      const open = await Promise.all(Array.from({ length: 3 }, () => login(t, 'printer@example.com')));
      const { client, auth } = await RawSmtp.submission(t.port('submission'), 'printer@example.com', PASSWORD);
      expect(auth.text).toBe('454 4.7.0 Too many connections for printer@example.com: at most 3 at once; close one and try again');
      for (const c of [...open, client]) c.destroy();
    });
  });
});
