// Never an open relay (issue "Policy and security", point 8). Every trick in the matrix is tried
// without authentication on the submission port (after STARTTLS), on the smtps port, and on the
// relay port from a loopback address outside the only connector (127.0.0.1/32): each must get
// the exact refusal, and nothing may reach the queue. The tests at the end show the same server
// does relay for the connector and for an authenticated account, so the refusals are policy and
// not a broken server, and that an accepted trick address is delivered by its real domain.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NetworkList } from '../src/intake/network-list.js';
import { type TestPostern, startHeldQueuePostern } from './helpers/postern-harness.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { ConnectionTracker } from './helpers/smtp-fuzz.js';

const ACCOUNT = 'printer@example.com';
const PASSWORD = 'correct horse battery staple';
const OUTSIDER = '127.0.0.9';

const RELAY_DENIED = `550 5.7.1 Relaying denied: ${OUTSIDER} is not in an allowed network for this port. Authenticate on the submission port (587) or ask the administrator to add a connector`;
const AUTH_REQUIRED = '530 5.7.57 Client not authenticated to send mail. Log in with AUTH first';
const BAD_RECIPIENT = '501 5.1.3 Error: Bad recipient address syntax';

/**
 * Deliveries held at a closed port (see heldQueueConfigText), the only connector is 127.0.0.1/32,
 * and the policy settings are the defaults.
 */
function startRelay(submission?: string, connectorOptions?: string): Promise<TestPostern> {
  return startHeldQueuePostern(
    { user: ACCOUNT, password: PASSWORD },
    { submission, networks: ['127.0.0.1/32'], defaultPolicy: true, extra: connectorOptions },
    'postern-open-relay-',
  );
}

let t: TestPostern;

beforeAll(async () => {
  t = await startRelay();
});

afterAll(async () => {
  await t?.stop();
});

const opened = new ConnectionTracker();
afterEach(() => {
  opened.closeAll();
});

/** SmtpWire.connect, closed after the test. */
const connect = (port: number, options: { tls?: boolean; localAddress?: string } = {}) => opened.connect(port, options);

/** The queue holds nothing at all: no message, no recipient in any state. */
async function expectNothingQueued(p: TestPostern = t): Promise<void> {
  expect(await p.postern.store.listQueue()).toEqual([]);
  const counts = await p.postern.store.countRecipients();
  expect(Object.values(counts).reduce((a, b) => a + b, 0)).toBe(0);
}

interface Trick {
  name: string;
  /** The RCPT TO command as sent. */
  rcpt: string;
  /** On the relay port from outside the connector: refused for relaying, or for its syntax. */
  relay: 'denied' | 'syntax';
}

const TRICKS: Trick[] = [
  { name: 'percent hack', rcpt: 'RCPT TO:<victim%example.org@relay.example.test>', relay: 'denied' },
  { name: 'percent hack to an address literal of the relay', rcpt: 'RCPT TO:<victim%example.org@[127.0.0.1]>', relay: 'denied' },
  { name: 'double percent hack', rcpt: 'RCPT TO:<victim%example.org%example.net@relay.example.test>', relay: 'denied' },
  { name: 'source route', rcpt: 'RCPT TO:<@relay.example.test:victim@example.org>', relay: 'denied' },
  { name: 'multi-hop source route', rcpt: 'RCPT TO:<@relay.example.test,@mx.example.net:victim@example.org>', relay: 'denied' },
  { name: 'quoted local part with @', rcpt: 'RCPT TO:<"victim@example.org"@relay.example.test>', relay: 'syntax' },
  { name: 'quoted local part with %', rcpt: 'RCPT TO:<"victim%example.org"@relay.example.test>', relay: 'denied' },
  { name: 'bang path at the relay', rcpt: 'RCPT TO:<example.org!victim@relay.example.test>', relay: 'denied' },
  { name: 'bare bang path', rcpt: 'RCPT TO:<example.org!victim>', relay: 'syntax' },
  { name: 'trailing dot', rcpt: 'RCPT TO:<victim@example.org.>', relay: 'syntax' },
  { name: "trailing dot on the relay's own name", rcpt: 'RCPT TO:<victim@relay.example.test.>', relay: 'syntax' },
  { name: 'two @ signs', rcpt: 'RCPT TO:<victim@example.org@relay.example.test>', relay: 'syntax' },
  { name: 'upper-case address', rcpt: 'RCPT TO:<VICTIM@EXAMPLE.ORG>', relay: 'denied' },
  { name: "percent hack to the relay's name in upper case", rcpt: 'RCPT TO:<victim%example.org@RELAY.EXAMPLE.TEST>', relay: 'denied' },
  { name: 'IDN domain (U-label)', rcpt: 'RCPT TO:<victim@bücher.example>', relay: 'denied' },
  { name: 'IDN domain (A-label)', rcpt: 'RCPT TO:<victim@xn--bcher-kva.example>', relay: 'denied' },
  { name: 'IPv4 address literal', rcpt: 'RCPT TO:<victim@[192.0.2.1]>', relay: 'denied' },
  { name: 'IPv6 address literal', rcpt: 'RCPT TO:<victim@[IPv6:2001:db8::1]>', relay: 'denied' },
  { name: 'localhost', rcpt: 'RCPT TO:<victim@localhost>', relay: 'denied' },
  { name: 'domainless postmaster', rcpt: 'RCPT TO:<postmaster>', relay: 'denied' },
  { name: 'postmaster at the relay', rcpt: 'RCPT TO:<postmaster@relay.example.test>', relay: 'denied' },
  { name: 'space after the colon', rcpt: 'RCPT TO: <victim@example.org>', relay: 'denied' },
  { name: 'lower-case command', rcpt: 'rcpt to:<victim@example.org>', relay: 'denied' },
  { name: 'no angle brackets', rcpt: 'RCPT TO:victim@example.org', relay: 'syntax' },
  { name: 'null recipient', rcpt: 'RCPT TO:<>', relay: 'syntax' },
];

describe('relay port, client outside every connector (127.0.0.9; the connector is 127.0.0.1/32)', () => {
  for (const trick of TRICKS) {
    const expected = trick.relay === 'denied' ? RELAY_DENIED : BAD_RECIPIENT;
    it(`refuses ${trick.name} with ${expected.slice(0, 9)} and queues nothing`, async () => {
      const w = await connect(t.port('relay'), { localAddress: OUTSIDER });
      expect((await w.read()).code).toBe(220);
      expect((await w.command('EHLO outsider.example')).code).toBe(250);
      expect((await w.command('MAIL FROM:<spammer@outsider.example>')).text).toBe('250 2.1.0 Accepted');
      expect((await w.command(trick.rcpt)).text).toBe(expected);
      expect((await w.command('DATA')).text).toBe('503 5.5.1 Error: need RCPT command');
      w.destroy();
      await expectNothingQueued();
    });
  }

  it('refuses every recipient of a whole transaction pipelined in one write, body included', async () => {
    const w = await connect(t.port('relay'), { localAddress: OUTSIDER });
    await w.read();
    await w.command('EHLO outsider.example');
    const rcpts = TRICKS.filter((k) => k.relay === 'denied').map((k) => k.rcpt);
    w.write(
      `MAIL FROM:<spammer@outsider.example>\r\n${rcpts.join('\r\n')}\r\nDATA\r\nSubject: buy now\r\n\r\nspam\r\n.\r\nQUIT\r\n`,
    );
    expect(await w.waitClosed(10_000)).toBe(true);
    const replies = w.drain().map((r) => r.text);
    expect(replies[0]).toBe('250 2.1.0 Accepted');
    expect(replies.slice(1, 1 + rcpts.length)).toEqual(rcpts.map(() => RELAY_DENIED));
    expect(replies[1 + rcpts.length]).toBe('503 5.5.1 Error: need RCPT command');
    // The message lines were then read as commands: none of them is a 250 or a 354.
    expect(replies.slice(2 + rcpts.length).filter((r) => /^(250|354) /.test(r))).toEqual([]);
    await expectNothingQueued();
  });

  it('does not let XCLIENT or a PROXY header claim a connector address', async () => {
    const w = await connect(t.port('relay'), { localAddress: OUTSIDER });
    await w.read();
    expect((await w.command('PROXY TCP4 127.0.0.1 127.0.0.1 40000 25')).text).toBe('500 5.5.2 Error: command not recognized');
    await w.command('EHLO outsider.example');
    const xclient = await w.command('XCLIENT ADDR=127.0.0.1 NAME=localhost');
    expect(xclient.text).toBe('550 5.7.0 Error: Not allowed');
    await w.command('EHLO outsider.example');
    await w.command('MAIL FROM:<spammer@outsider.example>');
    expect((await w.command('RCPT TO:<victim@example.org>')).text).toBe(RELAY_DENIED);
    w.destroy();
    await expectNothingQueued();
  });

  it('does not relay after STARTTLS, and offers no AUTH to talk its way in', async () => {
    const w = await connect(t.port('relay'), { localAddress: OUTSIDER });
    await w.read();
    await w.command('EHLO outsider.example');
    w.write('STARTTLS\r\n');
    expect((await w.read()).code).toBe(220);
    await w.upgrade();
    const ehlo = await w.command('EHLO outsider.example');
    expect(ehlo.text).not.toMatch(/AUTH/);
    const auth = await w.command(`AUTH PLAIN ${Buffer.from(`\0${ACCOUNT}\0${PASSWORD}`).toString('base64')}`);
    expect(auth.text).toBe('500 5.5.2 Error: command not recognized');
    await w.command('MAIL FROM:<spammer@outsider.example>');
    expect((await w.command('RCPT TO:<victim@example.org>')).text).toBe(RELAY_DENIED);
    w.destroy();
    await expectNothingQueued();
  });

  it('refuses 200 recipients in a row, every one of them', async () => {
    const w = await connect(t.port('relay'), { localAddress: OUTSIDER });
    await w.read();
    await w.command('EHLO outsider.example');
    await w.command('MAIL FROM:<spammer@outsider.example>');
    w.write(Array.from({ length: 200 }, (_, i) => `RCPT TO:<victim${i}@example.org>\r\n`).join(''));
    // greeting, EHLO, MAIL, then one reply per RCPT
    expect(await w.waitForReplies(3 + 200, 10_000)).toBe(true);
    const replies = w.drain().map((r) => r.text);
    expect(replies).toHaveLength(200);
    expect(replies.every((r) => r === RELAY_DENIED)).toBe(true);
    w.destroy();
    await expectNothingQueued();
  });

  it('stores one relay_denied security event for the outsider, however many refusals', async () => {
    // Every test above was refused from OUTSIDER, hundreds of RCPTs in all: one stored event.
    const events = (await t.postern.store.listSecurityEvents()).filter((e) => e.kind === 'relay_denied');
    expect(events.map((e) => [e.ip, e.listener])).toEqual([[OUTSIDER, 'relay']]);
    expect(events[0]!.detail.message).toMatch(new RegExp(`^Relaying denied to ${OUTSIDER.replaceAll('.', '\\.')} on relay \\(first recipient tried: `));
  });
});

describe('submission port without AUTH (after STARTTLS)', () => {
  for (const trick of TRICKS) {
    it(`refuses MAIL, ${trick.name} and DATA with 530 5.7.57 and queues nothing`, async () => {
      const w = await connect(t.port('submission'), { localAddress: OUTSIDER });
      await w.read();
      await w.command('EHLO outsider.example');
      w.write('STARTTLS\r\n');
      expect((await w.read()).code).toBe(220);
      await w.upgrade();
      expect((await w.command('EHLO outsider.example')).text).toMatch(/^250-[\s\S]*AUTH PLAIN LOGIN/);
      expect((await w.command('MAIL FROM:<spammer@outsider.example>')).text).toBe(AUTH_REQUIRED);
      expect((await w.command(trick.rcpt)).text).toBe(AUTH_REQUIRED);
      expect((await w.command('DATA')).text).toBe(AUTH_REQUIRED);
      w.destroy();
      await expectNothingQueued();
    });
  }

  it('refuses MAIL without STARTTLS too, from the connector address as well', async () => {
    for (const localAddress of [OUTSIDER, '127.0.0.1']) {
      const w = await connect(t.port('submission'), { localAddress });
      await w.read();
      await w.command('EHLO device.example');
      expect((await w.command(`MAIL FROM:<${ACCOUNT}>`)).text).toBe(AUTH_REQUIRED);
      expect((await w.command('RCPT TO:<victim%example.org@relay.example.test>')).text).toBe(AUTH_REQUIRED);
      w.destroy();
    }
    await expectNothingQueued();
  });

  it('refuses MAIL after a failed AUTH, and after AUTH attempted in clear text with the right password', async () => {
    const wrong = await connect(t.port('submission'), { localAddress: OUTSIDER });
    await wrong.read();
    await wrong.command('EHLO outsider.example');
    wrong.write('STARTTLS\r\n');
    await wrong.read();
    await wrong.upgrade();
    await wrong.command('EHLO outsider.example');
    const bad = await wrong.command(`AUTH PLAIN ${Buffer.from(`\0${ACCOUNT}\0not the password`).toString('base64')}`);
    expect(bad.text).toBe('535 5.7.8 Authentication unsuccessful, the username or password is wrong');
    expect((await wrong.command(`MAIL FROM:<${ACCOUNT}>`)).text).toBe(AUTH_REQUIRED);

    const clear = await connect(t.port('submission'), { localAddress: OUTSIDER });
    await clear.read();
    await clear.command('EHLO outsider.example');
    const early = await clear.command(`AUTH PLAIN ${Buffer.from(`\0${ACCOUNT}\0${PASSWORD}`).toString('base64')}`);
    expect(early.text).toBe('538 5.7.11 Encryption required for requested authentication mechanism. Send STARTTLS first');
    expect((await clear.command(`MAIL FROM:<${ACCOUNT}>`)).text).toBe(AUTH_REQUIRED);
    await expectNothingQueued();
  });
});

describe('smtps port without AUTH', () => {
  for (const trick of TRICKS) {
    it(`refuses MAIL, ${trick.name} and DATA with 530 5.7.57 and queues nothing`, async () => {
      const w = await connect(t.port('smtps'), { tls: true, localAddress: OUTSIDER });
      await w.read();
      await w.command('EHLO outsider.example');
      expect((await w.command('MAIL FROM:<spammer@outsider.example>')).text).toBe(AUTH_REQUIRED);
      expect((await w.command(trick.rcpt)).text).toBe(AUTH_REQUIRED);
      expect((await w.command('DATA')).text).toBe(AUTH_REQUIRED);
      w.destroy();
      await expectNothingQueued();
    });
  }
});

describe('other listener and connector settings', () => {
  it('a legacy submission listener (AUTH without TLS) still refuses unauthenticated mail', async () => {
    const legacy = await startRelay('{ address = "127.0.0.1:0", legacy = true }');
    try {
      const w = await connect(legacy.port('submission'), { localAddress: OUTSIDER });
      await w.read();
      expect((await w.command('EHLO old-printer.example')).text).toMatch(/AUTH PLAIN LOGIN/);
      expect((await w.command('MAIL FROM:<spammer@outsider.example>')).text).toBe(AUTH_REQUIRED);
      expect((await w.command('RCPT TO:<victim%example.org@relay.example.test>')).text).toBe(AUTH_REQUIRED);
      const bad = await w.command(`AUTH PLAIN ${Buffer.from(`\0${ACCOUNT}\0wrong`).toString('base64')}`);
      expect(bad.code).toBe(535);
      expect((await w.command('MAIL FROM:<spammer@outsider.example>')).text).toBe(AUTH_REQUIRED);
      await expectNothingQueued(legacy);
    } finally {
      await legacy.stop();
    }
  });

  it('a connector with require_auth refuses MAIL from its own network until AUTH', async () => {
    const strict = await startRelay(undefined, 'require_auth = true');
    try {
      const w = await connect(strict.port('relay'), { localAddress: '127.0.0.1' });
      await w.read();
      await w.command('EHLO device.example');
      expect((await w.command('MAIL FROM:<alarm@camera.example>')).text).toBe(AUTH_REQUIRED);
      const outsider = await connect(strict.port('relay'), { localAddress: OUTSIDER });
      await outsider.read();
      await outsider.command('EHLO outsider.example');
      await outsider.command('MAIL FROM:<spammer@outsider.example>');
      expect((await outsider.command('RCPT TO:<victim@example.org>')).text).toBe(RELAY_DENIED);
      await expectNothingQueued(strict);
    } finally {
      await strict.stop();
    }
  });
});

describe('the same server relays for its connector and for an account (controls)', () => {
  it('has queued nothing from all of the above', async () => {
    await expectNothingQueued();
  });

  it('relays for 127.0.0.1 (the connector), and a percent-hack address goes to its real domain', async () => {
    const w = await connect(t.port('relay'), { localAddress: '127.0.0.1' });
    await w.read();
    await w.command('EHLO device.example');
    expect((await w.command('MAIL FROM:<alarm@camera.example>')).text).toBe('250 2.1.0 Accepted');
    expect((await w.command('RCPT TO:<victim%example.org@relay.example.test>')).text).toBe('250 2.1.5 Accepted');
    expect((await w.command('DATA')).code).toBe(354);
    w.write('Subject: control\r\n\r\ncontrol\r\n.\r\n');
    const reply = await w.read();
    expect(reply.text).toMatch(/^250 2\.0\.0 Ok: queued as /);
    const message = await t.postern.store.getMessage(/queued as (\S+)/.exec(reply.text)![1]!);
    // Postern does not interpret "%": the recipient is delivered by the domain after the @.
    expect(message?.recipients.map((r) => [r.address, r.domain])).toEqual([['victim%example.org@relay.example.test', 'relay.example.test']]);
    expect(message?.origin.listener).toBe('relay');
  });

  it('relays for an authenticated account on submission; a source route is dropped, not followed', async () => {
    const c = await RawSmtp.connect(t.port('submission'), { localAddress: OUTSIDER });
    opened.track(c);
    await c.read();
    await c.command('EHLO device.example');
    await c.startTls();
    await c.command('EHLO device.example');
    expect((await c.authPlain(ACCOUNT, PASSWORD)).code).toBe(235);
    expect((await c.command(`MAIL FROM:<${ACCOUNT}>`)).text).toBe('250 2.1.0 Accepted');
    expect((await c.command('RCPT TO:<@relay.example.test:victim@example.org>')).text).toBe('250 2.1.5 Accepted');
    const reply = await c.data('Subject: control\r\n\r\ncontrol\r\n');
    expect(reply.text).toMatch(/^250 2\.0\.0 Ok: queued as /);
    const message = await t.postern.store.getMessage(/queued as (\S+)/.exec(reply.text)![1]!);
    expect(message?.recipients.map((r) => [r.address, r.domain])).toEqual([['victim@example.org', 'example.org']]);
    expect(message?.origin.account).toBe(ACCOUNT);
    expect(await t.postern.store.listQueue()).toHaveLength(2);
  });
});

describe('NetworkList, the connector check', () => {
  it('answers the same for every address however many it has remembered, IPv4 as IPv6-mapped too', () => {
    // It remembers its answers per address (BlockList.check was 1.6% of the relay port's CPU);
    // the memory starts over past 4,096 addresses and must never change an answer.
    const list = new NetworkList(['192.168.1.0/24', '10.0.0.7', '2001:db8::/32']);
    const expected = (a: number, b: number) => a === 1 || (a === 0 && b === 7);
    for (let round = 0; round < 3; round++) {
      for (let a = 0; a < 40; a++) {
        for (let b = 0; b < 200; b++) {
          const v4 = a === 0 ? `10.0.0.${b}` : `192.168.${a}.${b}`;
          expect(list.has(v4), v4).toBe(expected(a, b));
          expect(list.has(`::ffff:${v4}`), `::ffff:${v4}`).toBe(expected(a, b));
        }
      }
    }
    expect(list.has('2001:db8::1')).toBe(true);
    expect(list.has('2001:db9::1')).toBe(false);
    expect(list.has('not an address')).toBe(false);
    expect(list.has('not an address')).toBe(false);
  });
});
