// Bad input at intake: every refusal checks the reply code and text, that nothing was queued, and
// that the server goes on serving a well-behaved client afterwards.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { RawSmtp, type Reply } from './helpers/raw-smtp.js';
import { type TestPostern, startTestPostern } from './helpers/postern-harness.js';

const PASSWORD = 'correct horse battery staple';
const LIMIT = 64 * 1024;
let t: TestPostern;

beforeAll(async () => {
  t = await startTestPostern({
    extra: `
[limits]
max_message_size = ${LIMIT}
max_recipients = 3
max_connections_per_ip = 40

[delivery]
dns_servers = ["127.0.0.1:9"]
`,
  });
  await t.addAccount('printer@example.com', PASSWORD);
});

afterAll(async () => {
  await t?.stop();
});

async function queuedCount(): Promise<number> {
  return (await t.postern.store.listQueue()).length;
}

function spoolFiles(): string[] {
  return fs.readdirSync(path.join(t.dir, 'spool'));
}

/** An authenticated submission session ready for MAIL FROM. */
async function session(): Promise<RawSmtp> {
  const { client, auth } = await RawSmtp.submission(t.port('submission'), 'printer@example.com', PASSWORD);
  expect(auth.code).toBe(235);
  return client;
}

/** A relay session from loopback (inside the "loopback" connector). */
async function relaySession(localAddress = '127.0.0.1'): Promise<RawSmtp> {
  const c = await RawSmtp.connect(t.port('relay'), { localAddress });
  await c.read();
  await c.command('EHLO device.local');
  return c;
}

/** Proves the server still accepts a normal message after whatever the test did. */
async function stillServing(): Promise<void> {
  const c = await session();
  expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
  expect((await c.command('RCPT TO:<ok@example.net>')).code).toBe(250);
  const reply = await c.data('Subject: fine\r\n\r\nfine\r\n');
  expect(reply.text).toMatch(/^250 2\.0\.0 Ok: queued as /);
  await c.quit();
}

describe('session ids', () => {
  it('gives each connection its own id in smtp-server\'s form, the `session` of its log lines', async () => {
    const connects = () => t.logs().filter((l) => l.event === 'connect').map((l) => l.session as string);
    const before = connects().length;
    for (let i = 0; i < 20; i++) {
      const c = await RawSmtp.connect(t.port('relay'));
      await c.read();
      await c.quit();
    }
    const ids = connects().slice(before);
    expect(ids).toHaveLength(20);
    for (const id of ids) expect(id).toMatch(/^[0-9a-v]{16}$/);
    expect(new Set(ids).size).toBe(20);
  });
});

describe('commands out of order and malformed addresses', () => {
  it('answers 503 for RCPT before MAIL and DATA before RCPT', async () => {
    const before = await queuedCount();
    const c = await session();
    const rcpt = await c.command('RCPT TO:<a@example.net>');
    expect(rcpt.code).toBe(503);
    expect(rcpt.text).toMatch(/^503 5\.5\.1 /);
    expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
    const data = await c.command('DATA');
    expect(data.code).toBe(503);
    expect(data.text).toMatch(/^503 5\.5\.1 .*RCPT/);
    await c.quit();
    expect(await queuedCount()).toBe(before);
    await stillServing();
  });

  it('answers 503 for MAIL before EHLO', async () => {
    const c = await RawSmtp.connect(t.port('relay'));
    await c.read();
    const mail = await c.command('MAIL FROM:<a@example.com>');
    expect(mail.code).toBe(503);
    expect(mail.text).toMatch(/HELO\/EHLO first/);
    await c.quit();
  });

  it('refuses malformed sender and recipient addresses with 501 and the address', async () => {
    const c = await session();
    // smtp-server's own syntax check answers first for these.
    const noDomain = await c.command('MAIL FROM:<printer>');
    expect(noDomain.text).toBe('501 5.1.7 Error: Bad sender address syntax');
    const garbage = await c.command('MAIL FROM:<<<@>>>');
    expect(garbage.code).toBe(501);
    expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
    const bareRcpt = await c.command('RCPT TO:<someone>');
    expect(bareRcpt.text).toBe('501 5.1.3 Error: Bad recipient address syntax');
    for (const bad of ['someone@-bad-.example', 'someone@[300.1.2.3]', 'a@b@example.com', '@example.com']) {
      const reply = await c.command(`RCPT TO:<${bad}>`);
      expect(reply.text, bad).toMatch(/^501 5\.1\.3 (Error: )?Bad recipient address syntax/);
    }
    await c.quit();
    await stillServing();
  });
});

describe('limits', () => {
  it('refuses the recipient past max_recipients with 452 4.5.3 and queues the message for the rest', async () => {
    const c = await session();
    await c.command('MAIL FROM:<printer@example.com>');
    for (const r of ['a', 'b', 'c']) expect((await c.command(`RCPT TO:<${r}@example.net>`)).code).toBe(250);
    const fourth = await c.command('RCPT TO:<d@example.net>');
    expect(fourth.text).toBe('452 4.5.3 Too many recipients: at most 3 per message, send the rest in another message');
    const reply = await c.data('Subject: three\r\n\r\nbody\r\n');
    const queueId = /queued as (\S+)/.exec(reply.text)![1]!;
    const message = await t.postern.store.getMessage(queueId);
    expect(message?.recipients.map((r) => r.address)).toEqual(['a@example.net', 'b@example.net', 'c@example.net']);
    await c.quit();
  });

  it('refuses an oversized message with 552 5.3.4 while streaming and spools nothing', async () => {
    const before = await queuedCount();
    const filesBefore = spoolFiles();
    const c = await session();
    await c.command('MAIL FROM:<printer@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    const line = `${'x'.repeat(998)}\r\n`;
    const big = `Subject: big\r\n\r\n${line.repeat(Math.ceil((LIMIT * 3) / line.length))}`;
    const reply = await c.data(big);
    expect(reply.text).toBe(`552 5.3.4 Message size exceeds fixed maximum message size of ${LIMIT} bytes`);
    expect(await queuedCount()).toBe(before);
    // Past 64 KiB a body goes to a spool file; the refused one left none behind.
    expect(spoolFiles()).toEqual(filesBefore);
    // The same connection goes on.
    expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
    await c.quit();
    await stillServing();
  });

  it('closes an idle connection with 421 after the idle timeout', async () => {
    const idle = await startTestPostern({ extra: '\n[limits]\nidle_timeout = "1s"\n' });
    try {
      const c = await RawSmtp.connect(idle.port('relay'));
      await c.read();
      const bye = await c.read(5000);
      expect(bye.code).toBe(421);
      expect(bye.text).toMatch(/timeout/i);
    } finally {
      await idle.stop();
    }
  });

  it('caps connections per IP with 421 4.7.0 and lets others in when they close', async () => {
    const capped = await startTestPostern({ extra: '\n[limits]\nmax_connections_per_ip = 2\n' });
    try {
      const a = await RawSmtp.connect(capped.port('relay'));
      const b = await RawSmtp.connect(capped.port('relay'));
      expect((await a.read()).code).toBe(220);
      expect((await b.read()).code).toBe(220);
      const c = await RawSmtp.connect(capped.port('relay'));
      const refused = await c.read();
      expect(refused.text).toBe('421 4.7.0 Too many connections from 127.0.0.1; close some and try again');
      // Another address on loopback is a different client.
      const other = await RawSmtp.connect(capped.port('relay'), { localAddress: '127.0.0.2' });
      expect((await other.read()).code).toBe(220);
      await a.quit();
      await new Promise((r) => setTimeout(r, 100));
      const d = await RawSmtp.connect(capped.port('relay'));
      expect((await d.read()).code).toBe(220);
      for (const x of [b, c, d, other]) x.destroy();
    } finally {
      await capped.stop();
    }
  });
});

describe('connection caps and TLS failures', () => {
  it('caps connections in all with 421 4.3.2 (max_connections)', async () => {
    const capped = await startTestPostern({ extra: '\n[limits]\nmax_connections = 2\n' });
    try {
      const a = await RawSmtp.connect(capped.port('relay'), { localAddress: '127.0.0.3' });
      const b = await RawSmtp.connect(capped.port('relay'), { localAddress: '127.0.0.4' });
      expect((await a.read()).code).toBe(220);
      expect((await b.read()).code).toBe(220);
      const c = await RawSmtp.connect(capped.port('relay'), { localAddress: '127.0.0.5' });
      expect((await c.read()).text).toBe('421 4.3.2 Too many connections, try again in a moment');
      for (const x of [a, b, c]) x.destroy();
    } finally {
      await capped.stop();
    }
  });

  it('survives a STARTTLS handshake from a TLS 1.1 client and keeps serving', async () => {
    const c = await RawSmtp.connect(t.port('submission'));
    await c.read();
    await c.command('EHLO old-printer.local');
    await expect(c.startTls({ minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT:@SECLEVEL=0' })).rejects.toThrow();
    c.destroy();
    await stillServing();
  });
});

describe('bare line endings (SMTP smuggling, CVE-2023-51764)', () => {
  const cases: [string, string, string][] = [
    ['bare LF in a line', 'Subject: x\r\n\r\nline one\nline two\r\n', 'LF'],
    ['bare CR in a line', 'Subject: x\r\n\r\nline one\rline two\r\n', 'CR'],
    ['LF.LF smuggled end of data', 'Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\r\n', 'LF'],
    ['CRLF.LF smuggled end of data', 'Subject: x\r\n\r\nhello\r\n.\nRCPT TO:<victim@example.net>\r\n', 'LF'],
    ['LF.CRLF smuggled end of data', 'Subject: x\r\n\r\nhello\n.\r\nDATA\r\n', 'LF'],
    ['CR.CR smuggled end of data', 'Subject: x\r\n\r\nhello\r.\rQUIT\r\n', 'CR'],
  ];
  for (const [name, body, kind] of cases) {
    it(`rejects ${name} with 550 5.6.11 and queues nothing`, async () => {
      const before = await queuedCount();
      const c = await session();
      await c.command('MAIL FROM:<printer@example.com>');
      await c.command('RCPT TO:<a@example.net>');
      const reply = await c.data(body);
      expect(reply.text).toBe(
        `550 5.6.11 Bare ${kind} is not allowed in message data; lines must end with CRLF. Fix the client or its line-ending setting`,
      );
      // The smuggled "commands" were message data, not commands: the session is in step.
      const noop = await c.command('NOOP');
      expect(noop.code).toBe(250);
      await c.quit();
      expect(await queuedCount()).toBe(before);
      await stillServing();
    });
  }

  it('finds a bare CR split across two packets', async () => {
    const c = await session();
    await c.command('MAIL FROM:<printer@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    expect((await c.command('DATA')).code).toBe(354);
    c.write('Subject: x\r\n\r\nends with CR\r');
    await new Promise((r) => setTimeout(r, 50));
    c.write('not LF\r\n.\r\n');
    const reply = await c.read();
    expect(reply.text).toMatch(/^550 5\.6\.11 Bare CR/);
    await c.quit();
  });

  it('accepts CRLF split across two packets', async () => {
    const c = await session();
    await c.command('MAIL FROM:<printer@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    expect((await c.command('DATA')).code).toBe(354);
    c.write('Subject: x\r\n\r\nends with CR\r');
    await new Promise((r) => setTimeout(r, 50));
    c.write('\nnext line\r\n.\r\n');
    const reply = await c.read();
    expect(reply.code).toBe(250);
    await c.quit();
  });
});

describe('header section size', () => {
  // HeaderFixups buffers the header section (up to 256 KiB) so that the header policy (send-as)
  // sees all of it. A larger one used to be passed on without the policy: a forged From placed
  // after the first 256 KiB went through. Now it is refused, however the bytes arrive.
  const MAX = 256 * 1024;
  const TOO_BIG = '552 5.3.4 Header section too large: at most 262144 bytes of header fields are accepted. Send fewer or shorter header fields';
  let big: TestPostern;
  beforeAll(async () => {
    big = await startTestPostern({ extra: '\n[limits]\nmax_message_size = 4194304\n\n[delivery]\ndns_servers = ["127.0.0.1:9"]\n' });
    await big.addAccount('printer@example.com', PASSWORD);
  });
  afterAll(() => big?.stop());

  /** A header section of exactly `size` bytes (CRLFs included, blank line not) ending with `last`. */
  function headerSection(size: number, last: string): string {
    const end = `${last}\r\n`;
    const lines: string[] = ['Subject: big headers\r\n'];
    let used = lines[0]!.length + end.length;
    let i = 0;
    while (size - used > 200) {
      const line = `X-Filler-${String(i++).padStart(5, '0')}: ${'h'.repeat(80)}\r\n`;
      lines.push(line);
      used += line.length;
    }
    const pad = size - used - 'X-Pad: \r\n'.length;
    lines.push(`X-Pad: ${'p'.repeat(pad)}\r\n`, end);
    const text = lines.join('');
    expect(text.length).toBe(size);
    return text;
  }

  async function bigSession(): Promise<RawSmtp> {
    const { client, auth } = await RawSmtp.submission(big.port('submission'), 'printer@example.com', PASSWORD);
    expect(auth.code).toBe(235);
    expect((await client.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
    expect((await client.command('RCPT TO:<a@example.net>')).code).toBe(250);
    return client;
  }

  /** DATA in pieces of 16 KiB, each written after the previous one was flushed to the socket. */
  async function dataInPieces(c: RawSmtp, message: string): Promise<Reply> {
    expect((await c.command('DATA')).code).toBe(354);
    const bytes = Buffer.from(`${message}.\r\n`, 'latin1');
    for (let at = 0; at < bytes.length; at += 16 * 1024) {
      c.write(bytes.subarray(at, at + 16 * 1024));
      await new Promise((r) => setTimeout(r, 2));
    }
    return c.read();
  }

  const stored = async () => (await big.postern.store.usageSince({ account: 'printer@example.com' }, 0)).messages;

  it('refuses a header section over 256 KiB sent in pieces, with a forged From past the buffer, and queues nothing', async () => {
    const before = await stored();
    const spool = fs.readdirSync(path.join(big.dir, 'spool'));
    const c = await bigSession();
    const reply = await dataInPieces(c, `${headerSection(300 * 1024, 'From: CEO <ceo@example.com>')}\r\nbody\r\n`);
    expect(reply.text).toBe(TOO_BIG);
    expect(await stored()).toBe(before);
    expect(fs.readdirSync(path.join(big.dir, 'spool'))).toEqual(spool);
    // The session goes on.
    expect((await c.command('MAIL FROM:<printer@example.com>')).code).toBe(250);
    await c.quit();
  });

  it('refuses a message that is all headers (no blank line) over 256 KiB', async () => {
    const before = await stored();
    const c = await bigSession();
    expect((await dataInPieces(c, headerSection(MAX + 1024, 'X-Last: 1'))).text).toBe(TOO_BIG);
    await c.quit();
    expect(await stored()).toBe(before);
  });

  it('accepts exactly 256 KiB of header fields and refuses one byte more', async () => {
    const before = await stored();
    const c = await bigSession();
    const ok = await dataInPieces(c, `${headerSection(MAX, 'From: printer@example.com')}\r\nbody\r\n`);
    expect(ok.text).toMatch(/^250 2\.0\.0 Ok: queued as \S+$/);
    await c.command('MAIL FROM:<printer@example.com>');
    await c.command('RCPT TO:<a@example.net>');
    expect((await dataInPieces(c, `${headerSection(MAX + 1, 'From: printer@example.com')}\r\nbody\r\n`)).text).toBe(TOO_BIG);
    await c.quit();
    expect(await stored()).toBe(before + 1);
  });

  it('checks the From at the very end of a 256 KiB header section', async () => {
    const before = await stored();
    const c = await bigSession();
    const reply = await dataInPieces(c, `${headerSection(MAX, 'From: ceo@example.com')}\r\nbody\r\n`);
    expect(reply.text).toBe('550 5.7.60 SendAsDenied; printer@example.com is not allowed to send as ceo@example.com');
    await c.quit();
    expect(await stored()).toBe(before);
  });

  it('refuses it on the relay port too (a connector has no header policy, but the limit is the same)', async () => {
    const before = (await big.postern.store.usageSince({ clientIp: '127.0.0.1' }, 0)).messages;
    const c = await RawSmtp.connect(big.port('relay'), { localAddress: '127.0.0.1' });
    await c.read();
    await c.command('EHLO device.local');
    await c.command('MAIL FROM:<alarm@example.com>');
    await c.command('RCPT TO:<ops@example.net>');
    expect((await dataInPieces(c, `${headerSection(MAX + 100, 'X-Last: 1')}\r\nbody\r\n`)).text).toBe(TOO_BIG);
    await c.quit();
    expect((await big.postern.store.usageSince({ clientIp: '127.0.0.1' }, 0)).messages).toBe(before);
  });
});

describe('relay listener', () => {
  it('accepts unauthenticated mail from a connector network', async () => {
    const c = await relaySession('127.0.0.1');
    expect(c).toBeTruthy();
    const ehlo = await c.command('EHLO device.local');
    expect(ehlo.text).not.toMatch(/AUTH/);
    expect((await c.command('MAIL FROM:<alarm@camera.local.example.com>')).code).toBe(250);
    expect((await c.command('RCPT TO:<ops@example.net>')).code).toBe(250);
    const reply = await c.data('Subject: motion\r\n\r\nmotion detected\r\n');
    const message = await t.postern.store.getMessage(/queued as (\S+)/.exec(reply.text)![1]!);
    expect(message?.origin.listener).toBe('relay');
    expect(message?.origin.account).toBeUndefined();
    await c.quit();
  });

  it('refuses every recipient from an address outside every connector with 550 5.7.1', async () => {
    const strict = await startTestPostern({
      text: fs
        .readFileSync(path.join(t.dir, 'postern.toml'), 'utf8')
        .replace(/data_dir = .*/, `data_dir = ${JSON.stringify(fs.mkdtempSync(path.join(t.dir, 'strict-')))}`)
        .replace('networks = ["127.0.0.0/8"]', 'networks = ["127.0.0.1/32", "192.168.1.0/24"]'),
    });
    try {
      const c = await RawSmtp.connect(strict.port('relay'), { localAddress: '127.0.0.9' });
      await c.read();
      await c.command('EHLO outsider.example');
      expect((await c.command('MAIL FROM:<spam@outsider.example>')).code).toBe(250);
      for (const rcpt of ['victim@example.net', 'other@example.org', 'postmaster@relay.example.test']) {
        const reply = await c.command(`RCPT TO:<${rcpt}>`);
        expect(reply.text).toBe(
          '550 5.7.1 Relaying denied: 127.0.0.9 is not in an allowed network for this port. Authenticate on the submission port (587) or ask the administrator to add a connector',
        );
      }
      const data = await c.command('DATA');
      expect(data.code).toBe(503);
      await c.quit();
      expect(await strict.postern.store.listQueue()).toHaveLength(0);
      // The allowed address still gets through.
      const ok = await RawSmtp.connect(strict.port('relay'), { localAddress: '127.0.0.1' });
      await ok.read();
      await ok.command('EHLO device.local');
      await ok.command('MAIL FROM:<alarm@example.com>');
      expect((await ok.command('RCPT TO:<ops@example.net>')).code).toBe(250);
      await ok.quit();
    } finally {
      await strict.stop();
    }
  });
});

describe('smtp-server adjustments', () => {
  it('sends the greeting without waiting on a timer (no 100 ms early-talker delay)', async () => {
    // With every setTimeout frozen, smtp-server's stock greeting would never arrive.
    vi.useFakeTimers({ toFake: ['setTimeout'] });
    try {
      const socket = net.connect(t.port('relay'), '127.0.0.1');
      let greeting = '';
      socket.on('data', (d) => (greeting += d));
      // Poll with setImmediate (not faked) for up to 2 s of real time.
      const deadline = Date.now() + 2000;
      while (!greeting.includes('\r\n') && Date.now() < deadline) await new Promise((r) => setImmediate(r));
      socket.destroy();
      expect(greeting).toMatch(/^220 relay\.example\.test /);
    } finally {
      vi.useRealTimers();
    }
  });

  it('answers a pipelined MAIL, RCPT and DATA in one TCP segment, and the message data in another', async () => {
    const c = await relaySession();
    // The server's side of this connection, counted by the kernel: segments carrying data.
    const serverDataSegments = () => {
      const out = execFileSync('ss', ['-tinH', 'state', 'established', `( sport = :${t.port('relay')} and dport = :${c.localPort} )`], { encoding: 'utf8' });
      const m = /\bdata_segs_out:(\d+)/.exec(out);
      if (!m) throw new Error(`no data_segs_out in: ${out}`);
      return Number(m[1]);
    };
    const before = serverDataSegments();
    const transactions = 10;
    for (let i = 0; i < transactions; i++) {
      c.write(`MAIL FROM:<cam${i}@device.local>\r\nRCPT TO:<inbox@example.net>\r\nDATA\r\n`);
      expect([(await c.read()).code, (await c.read()).code, (await c.read()).code]).toEqual([250, 250, 354]);
      c.write(`Subject: pipelined ${i}\r\n\r\nhello\r\n.\r\n`);
      expect((await c.read()).text).toMatch(/^250 2\.0\.0 Ok: queued as /);
    }
    // Two per transaction (20 here); a write per reply makes four (40). The slack is for a
    // client write the kernel might split, never seen on loopback.
    expect(serverDataSegments() - before).toBeLessThanOrEqual(2 * transactions + 2);
    await c.quit();
    await stillServing();
  });

  it('sets TCP_NODELAY on accepted sockets', async () => {
    const c = await RawSmtp.connect(t.port('relay'));
    await c.read();
    const mine = t.postern.intake.sockets().filter((s) => s.remotePort === c.localPort);
    expect(mine).toHaveLength(1);
    expect(noDelayOf(mine[0]!)).toBe(true);
    await c.quit();
  });
});

/** Node keeps the TCP_NODELAY state it set on a socket under an internal symbol. */
function noDelayOf(socket: net.Socket): boolean | undefined {
  const sym = Object.getOwnPropertySymbols(socket).find((s) => s.description === 'kSetNoDelay');
  return sym ? (socket as unknown as Record<symbol, boolean>)[sym] : undefined;
}
