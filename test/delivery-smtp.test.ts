// End-to-end delivery through the queue runner: messages are put in a real store, the runner
// claims and delivers them over real sockets to smtp-server sinks, found through a real (test) DNS
// server or a [[route]]. Assertions look at what the sink received, the reply codes and texts kept
// in the store, and the DSNs that come back. The harness is shared with delivery-faults.test.ts.
import { describe, expect, test } from 'vitest';
import { MINUTE, recipient, settled, useDeliveryHarness, zoneFor } from './helpers/delivery-harness.js';
import type { DnsZone } from './helpers/dns-server.js';
import { waitFor } from './helpers/wait-for.js';

const { setup, startSink } = useDeliveryHarness();

// ---- tests --------------------------------------------------------------------------------

describe('route delivery', () => {
  test('delivers to the route host, several recipients in one transaction', async () => {
    const sink = await startSink();
    const h = await setup({
      config: { route: [{ domains: ['routed.test'], host: '127.0.0.1', port: sink.port, tls: 'none' }] },
    });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@routed.test', 'b@routed.test'] });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
    expect(recipient(m, 'a@routed.test').lastCode).toBe(250);
    expect(sink.messages).toHaveLength(1);
    expect(sink.messages[0]!.from).toBe('app@client.test');
    expect(sink.messages[0]!.to).toEqual(['a@routed.test', 'b@routed.test']);
    expect(sink.messages[0]!.heloName).toBe('relay.test');
    expect(sink.messages[0]!.text).toContain(`Hello from ${queueId}.`);
  });
});

describe('MX delivery', () => {
  test('delivers to the MX host, with opportunistic STARTTLS to a self-signed certificate', async () => {
    const sink = await startSink({ starttls: true });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@dest.test'] });
    const m = await settled(h, queueId);
    expect(recipient(m, 'user@dest.test').state).toBe('delivered');
    expect(sink.messages).toHaveLength(1);
    expect(sink.messages[0]!.secure).toBe(true);
    expect(sink.messages[0]!.to).toEqual(['user@dest.test']);
    const line = h.logs.find((l) => l.event === 'delivered');
    expect(line).toMatchObject({
      queueId,
      session: `sess-${queueId}`,
      to: 'user@dest.test',
      destination: 'mx dest.test',
      host: 'mx.dest.test',
      ip: '127.0.0.1',
      code: 250,
    });
    expect(typeof line!.durationMs).toBe('number');
  });

  test('tries MX hosts in preference order: the first refuses connections, the second gets the mail', async () => {
    const sink = await startSink();
    const zone: DnsZone = {
      'pref.test': {
        MX: [
          { priority: 20, exchange: 'backup.pref.test' },
          { priority: 10, exchange: 'primary.pref.test' },
        ],
      },
      // Nothing listens on 127.0.0.2 (or ::1) at the sink's port: connection refused.
      'primary.pref.test': { A: ['127.0.0.2'], AAAA: ['::1'] },
      'backup.pref.test': { A: ['127.0.0.1'] },
    };
    const h = await setup({ zone, mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@pref.test'] });
    const m = await settled(h, queueId);
    expect(recipient(m, 'user@pref.test').state).toBe('delivered');
    expect(sink.connections).toBe(1);
    expect(h.logs.find((l) => l.event === 'delivered')).toMatchObject({ host: 'backup.pref.test', ip: '127.0.0.1' });
  });

  test('a host that answers 421 at connect is skipped for the next MX host', async () => {
    const good = await startSink();
    // Same port, another loopback address: the MX port is one setting for all hosts.
    const busy = await startSink({ host: '127.0.0.2', port: good.port, behaviour: { connect: { code: 421, message: '4.3.2 Too busy' } } });
    const zone: DnsZone = {
      'busy.test': {
        MX: [
          { priority: 10, exchange: 'mx1.busy.test' },
          { priority: 20, exchange: 'mx2.busy.test' },
        ],
      },
      'mx1.busy.test': { A: ['127.0.0.2'] },
      'mx2.busy.test': { A: ['127.0.0.1'] },
    };
    const h = await setup({ zone, mxPort: good.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@busy.test'] });
    const m = await settled(h, queueId);
    expect(recipient(m, 'user@busy.test').state).toBe('delivered');
    expect(busy.connections).toBe(1);
    expect(good.messages).toHaveLength(1);
  });

  test('when every host refuses the connection the recipient is deferred (4.4.1)', async () => {
    const sink = await startSink();
    const port = sink.port;
    await sink.close();
    const h = await setup({ zone: zoneFor('down.test'), mxPort: port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@down.test'] });
    const r = recipient(await settled(h, queueId), 'user@down.test');
    expect(r.state).toBe('deferred');
    expect(r.lastCode).toBeNull();
    expect(r.lastResponse).toBe('4.4.1 Could not connect to a mail server for down.test: mx.down.test[127.0.0.1]: Connection refused');
  });

  test('implicit MX: a domain without MX records gets mail at its own address', async () => {
    const sink = await startSink();
    const h = await setup({ zone: { 'plain.test': { A: ['127.0.0.1'] } }, mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@plain.test'] });
    expect(recipient(await settled(h, queueId), 'user@plain.test').state).toBe('delivered');
    expect(sink.messages[0]!.to).toEqual(['user@plain.test']);
  });
});

describe('DNS outcomes', () => {
  test('null MX fails at once and the sender gets a DSN', async () => {
    const sink = await startSink();
    const zone = zoneFor();
    zone['nomail.test'] = { MX: [{ priority: 0, exchange: '.' }] };
    const h = await setup({ zone, mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@nomail.test'] });
    const r = recipient(await settled(h, queueId), 'user@nomail.test');
    expect(r.state).toBe('failed');
    expect(r.attempts).toBe(1);
    expect(r.lastResponse).toMatch(/^5\.1\.10 /);
    const [dsn] = await sink.waitForMessages(1);
    expect(dsn!.from).toBe('');
    expect(dsn!.to).toEqual(['app@client.test']);
    expect(dsn!.text).toContain('Final-Recipient: rfc822; user@nomail.test');
    expect(dsn!.text).toContain('Status: 5.1.10');
    // Postern decided this itself: no remote server, no Diagnostic-Code.
    expect(dsn!.text).not.toContain('Diagnostic-Code');
    // The explanation is wrapped at 74 columns; unwrap it to compare.
    expect(dsn!.text.replace(/\r\n {4}/g, ' ')).toContain('Recipient domain nomail.test does not accept mail (null MX record, RFC 7505).');
  });

  test('NXDOMAIN fails permanently (5.1.2)', async () => {
    const sink = await startSink();
    const h = await setup({ zone: zoneFor(), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@no-such-domain.test'] });
    const r = recipient(await settled(h, queueId), 'user@no-such-domain.test');
    expect(r.state).toBe('failed');
    expect(r.lastResponse).toBe('5.1.2 Recipient domain no-such-domain.test does not exist (DNS: no such domain)');
    const [dsn] = await sink.waitForMessages(1);
    expect(dsn!.text).toContain('Status: 5.1.2');
  });

  test('SERVFAIL defers, with the next attempt set by the backoff', async () => {
    const h = await setup({ zone: { 'broken.test': { servfail: true } } });
    const before = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@broken.test'] });
    const r = recipient(await settled(h, queueId), 'user@broken.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe('4.4.3 DNS lookup of broken.test (MX) failed temporarily (SERVFAIL); will retry');
    // first_retry is 1 minute by default, minus up to 10 % jitter.
    expect(r.nextAttemptAt).toBeGreaterThanOrEqual(before + 0.9 * MINUTE - 10);
    expect(r.nextAttemptAt).toBeLessThanOrEqual(Date.now() + MINUTE);
  });

  test('a DNS timeout defers', async () => {
    const h = await setup({ zone: { 'slow.test': { timeout: true } } });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['user@slow.test'] });
    const r = recipient(await settled(h, queueId), 'user@slow.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toContain('(timeout)');
  });
});

describe('SMTP replies', () => {
  test('a 4xx reply defers the recipient, keeping the reply and the backoff time', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'later@dest.test': { code: 451, message: '4.7.1 Greylisted, try again' } } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { queue: { first_retry: '2m' } } });
    const before = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['later@dest.test'] });
    const r = recipient(await settled(h, queueId), 'later@dest.test');
    expect(r.state).toBe('deferred');
    expect(r.attempts).toBe(1);
    expect(r.lastCode).toBe(451);
    expect(r.lastResponse).toBe('451 4.7.1 Greylisted, try again');
    expect(r.nextAttemptAt).toBeGreaterThanOrEqual(before + 0.9 * 2 * MINUTE - 10);
    expect(r.nextAttemptAt).toBeLessThanOrEqual(Date.now() + 2 * MINUTE);
    expect(h.logs.find((l) => l.event === 'deferred')).toMatchObject({ queueId, to: 'later@dest.test', code: 451 });
    expect(sink.messages).toHaveLength(0);
  });

  test('a 5xx reply fails the recipient and a DSN goes to the sender', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'gone@dest.test': { code: 550, message: '5.1.1 <gone@dest.test>: No such user' } } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['gone@dest.test'] });
    const r = recipient(await settled(h, queueId), 'gone@dest.test');
    expect(r.state).toBe('failed');
    expect(r.lastCode).toBe(550);
    expect(r.lastResponse).toBe('550 5.1.1 <gone@dest.test>: No such user');

    const [dsn] = await sink.waitForMessages(1);
    expect(dsn!.from).toBe('');
    expect(dsn!.to).toEqual(['app@client.test']);
    const text = dsn!.text;
    expect(text).toMatch(/^Content-Type: multipart\/report; report-type=delivery-status;/m);
    expect(text).toContain('Reporting-MTA: dns; relay.test');
    expect(text).toContain('Final-Recipient: rfc822; gone@dest.test');
    expect(text).toContain('Action: failed');
    expect(text).toContain('Status: 5.1.1');
    expect(text).toContain('Remote-MTA: dns; mx.dest.test');
    expect(text).toContain('Diagnostic-Code: smtp; 550 5.1.1 <gone@dest.test>: No such user');
    expect(text).toContain('Content-Type: text/rfc822-headers');
    // The original headers come back, the body does not.
    expect(text).toContain(`Message-ID: <${queueId}@client.test>`);
    expect(text).not.toContain(`Hello from ${queueId}.`);
    expect(text).toContain('The mail server mx.dest.test[127.0.0.1] refused the message.');
    expect(text).toContain('Reply from mx.dest.test: 550 5.1.1 <gone@dest.test>: No such user');
    // The DSN itself is a delivered message in the store.
    const dsnLine = h.logs.find((l) => l.event === 'bounced');
    expect(dsnLine).toMatchObject({ queueId, to: 'app@client.test', recipients: ['gone@dest.test'] });
    const dsnMessage = await settled(h, dsnLine!.dsnQueueId as string);
    expect(dsnMessage.sender).toBe('');
    expect(dsnMessage.origin.listener).toBe('dsn');
    expect(dsnMessage.recipients[0]!.state).toBe('delivered');
  });

  test('no DSN for a message from the null sender', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'gone@dest.test': { code: 550, message: '5.1.1 No such user' } } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: '', recipients: ['gone@dest.test'] });
    expect(recipient(await settled(h, queueId), 'gone@dest.test').state).toBe('failed');
    await waitFor(() => h.logs.some((l) => l.event === 'bounce_dropped'));
    await new Promise((r) => setTimeout(r, 200));
    expect(sink.messages).toHaveLength(0);
    expect((await h.store.countRecipients()).queued).toBe(0);
    expect(await h.store.listQueue()).toEqual([]);
  });

  test('no DSN for a recipient that asked for none (NOTIFY=NEVER)', async () => {
    const sink = await startSink({ behaviour: { rcpt: { 'gone@dest.test': { code: 550, message: '5.1.1 No such user' } } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: [{ address: 'gone@dest.test', notify: ['NEVER'] }] });
    expect(recipient(await settled(h, queueId), 'gone@dest.test').state).toBe('failed');
    await new Promise((r) => setTimeout(r, 300));
    expect(sink.messages).toHaveLength(0);
    expect(h.logs.some((l) => l.event === 'bounced')).toBe(false);
  });

  test('mixed replies in one transaction: 250, 550 and 451 each count for their recipient', async () => {
    const sink = await startSink({
      behaviour: {
        rcpt: {
          'no@dest.test': { code: 550, message: '5.1.1 No such user' },
          'wait@dest.test': { code: 451, message: '4.2.1 Mailbox busy' },
        },
      },
    });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['ok@dest.test', 'no@dest.test', 'wait@dest.test', 'ok2@dest.test'] });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => [r.address, r.state, r.lastCode])).toEqual([
      ['ok@dest.test', 'delivered', 250],
      ['no@dest.test', 'failed', 550],
      ['wait@dest.test', 'deferred', 451],
      ['ok2@dest.test', 'delivered', 250],
    ]);
    // One transaction carried the accepted recipients.
    expect(sink.messages).toHaveLength(1);
    expect(sink.messages[0]!.to).toEqual(['ok@dest.test', 'ok2@dest.test']);
    // The DSN covers only the refused recipient.
    const [, dsn] = await sink.waitForMessages(2);
    expect(dsn!.text).toContain('Final-Recipient: rfc822; no@dest.test');
    expect(dsn!.text).not.toContain('Final-Recipient: rfc822; wait@dest.test');
    expect(dsn!.text).not.toContain('Final-Recipient: rfc822; ok@dest.test');
  });

  test('a 5xx reply to the message data fails every accepted recipient', async () => {
    const sink = await startSink({ behaviour: { data: { code: 554, message: '5.7.1 Message rejected as spam' } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: '', recipients: ['a@dest.test', 'b@dest.test'] });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => [r.state, r.lastResponse])).toEqual([
      ['failed', '554 5.7.1 Message rejected as spam'],
      ['failed', '554 5.7.1 Message rejected as spam'],
    ]);
  });

  test('a 4xx reply to the message data defers every accepted recipient, refused ones keep their reply', async () => {
    const sink = await startSink({
      behaviour: { data: { code: 452, message: '4.3.1 Insufficient system storage' }, rcpt: { 'no@dest.test': { code: 550, message: '5.1.1 No such user' } } },
    });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: '', recipients: ['a@dest.test', 'no@dest.test'] });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => [r.state, r.lastResponse])).toEqual([
      ['deferred', '452 4.3.1 Insufficient system storage'],
      ['failed', '550 5.1.1 No such user'],
    ]);
  });

  test('a 421 to MAIL FROM defers', async () => {
    const sink = await startSink({ behaviour: { mail: { code: 421, message: '4.7.0 Try again later, closing connection' } } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe('421 4.7.0 Try again later, closing connection');
  });
});

describe('timeouts', () => {
  test('a server that never greets: deferred after connect_timeout', async () => {
    const sink = await startSink({ behaviour: { stall: 'greeting' } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { connect_timeout: '300ms' } } });
    // connect_timeout (300 ms) and not the default (30 s) applies: otherwise the test times out.
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe(`4.4.2 Timed out talking to mx.dest.test[127.0.0.1]:${sink.port}: no greeting`);
  });

  test('a server that never answers the message data: deferred after command_timeout', async () => {
    const sink = await startSink({ behaviour: { stall: 'data' } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { command_timeout: '400ms' } } });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toMatch(/^4\.4\.2 Timed out talking to mx\.dest\.test\[127\.0\.0\.1\]:\d+: no reply/);
  });
});

describe('connections', () => {
  test('messages to the same destination share one connection', async () => {
    const sink = await startSink();
    // A long idle timeout: a busy test machine stalling past the default 2 s would close the
    // connection between the messages and make this fail for the wrong reason.
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { per_destination: 1 } }, connectionIdleTimeout: 30_000 });
    const ids = await Promise.all([1, 2, 3].map((i) => h.enqueue({ sender: 'app@client.test', recipients: [`user${i}@dest.test`] })));
    for (const id of ids) expect((await settled(h, id)).recipients[0]!.state).toBe('delivered');
    // A later message within the idle time reuses the same connection too.
    const later = await h.enqueue({ sender: 'app@client.test', recipients: ['user4@dest.test'] });
    expect((await settled(h, later)).recipients[0]!.state).toBe('delivered');
    expect(sink.messages).toHaveLength(4);
    expect(sink.connections).toBe(1);
    expect(new Set(sink.messages.map((m) => m.connection))).toEqual(new Set([1]));
  });

  test('per_destination caps parallel connections to one destination', async () => {
    const sink = await startSink();
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { per_destination: 2 } } });
    const ids = await Promise.all([1, 2, 3, 4, 5, 6].map((i) => h.enqueue({ sender: 'app@client.test', recipients: [`u${i}@dest.test`] })));
    for (const id of ids) expect((await settled(h, id)).recipients[0]!.state).toBe('delivered');
    expect(sink.messages).toHaveLength(6);
    expect(sink.connections).toBeLessThanOrEqual(2);
  });
});

describe('TLS policy', () => {
  test('tls = "required" defers when the server does not offer STARTTLS', async () => {
    const sink = await startSink({ starttls: false });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { tls: 'required' } } });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe(`4.7.4 TLS is required for dest.test but mx.dest.test[127.0.0.1]:${sink.port} does not offer STARTTLS`);
    expect(sink.messages).toHaveLength(0);
  });

  test('tls = "required" delivers over STARTTLS when offered', async () => {
    const sink = await startSink({ starttls: true });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port, config: { delivery: { tls: 'required' } } });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    expect(recipient(await settled(h, queueId), 'a@dest.test').state).toBe('delivered');
    expect(sink.messages[0]!.secure).toBe(true);
  });

  test('tls = "none" on a route never uses STARTTLS, even when offered', async () => {
    const sink = await startSink({ starttls: true });
    const h = await setup({ config: { route: [{ domains: ['*.routed.test'], host: '127.0.0.1', port: sink.port, tls: 'none' }] } });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@sub.routed.test'] });
    expect(recipient(await settled(h, queueId), 'a@sub.routed.test').state).toBe('delivered');
    expect(sink.messages[0]!.secure).toBe(false);
  });

  test('opportunistic TLS falls back to plaintext when the handshake fails', async () => {
    // TLS 1.2 with a cipher no client offers: STARTTLS is announced but the handshake fails.
    const sink = await startSink({ starttls: true, tlsOptions: { maxVersion: 'TLSv1.2', ciphers: 'PSK-AES128-CBC-SHA' } });
    const h = await setup({ zone: zoneFor('dest.test'), mxPort: sink.port });
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('delivered');
    expect(sink.connections).toBe(2);
    expect(sink.messages[0]!.secure).toBe(false);
  });
});
