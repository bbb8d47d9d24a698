// Upstreams of type "smtp" (smarthosts): delivery through them over real sockets, the routing
// rules that choose them, how their answers are classified, and the configuration mistakes that
// stop start-up. The upstreams are smtp-server instances on loopback that want AUTH, with
// STARTTLS or implicit TLS and certificates that are self-signed or issued by a test CA
// (test/helpers/upstream-server.ts); the queue runner and store are the delivery harness's.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { describe, expect, test } from 'vitest';
import { hashPassword } from '../src/accounts/password.js';
import { type ConfigInput, configSchema } from '../src/config/config-schema.js';
import { ConfigError, parseConfigText } from '../src/config/load-config.js';
import { ConnectionPool } from '../src/delivery/connection-pool.js';
import { MxResolver } from '../src/delivery/mx-resolver.js';
import { Router } from '../src/delivery/router.js';
import { createLogger } from '../src/observe/logger.js';
import { startPostern } from '../src/postern.js';
import { newQueueId } from '../src/store/queue-id.js';
import { makeCertificate } from './helpers/certificates.js';
import { BIN } from './helpers/serve-process.js';
import { type Harness, recipient, settled, useDeliveryHarness, zoneFor } from './helpers/delivery-harness.js';
import { tempDir } from './helpers/temp-dir.js';
import { type TestCa, UpstreamServer, type UpstreamServerOptions, makeTestCa } from './helpers/upstream-server.js';
import { waitFor } from './helpers/wait-for.js';

const { setup, startSink, afterRunner } = useDeliveryHarness();

const USER = 'relay@isp.test';
const PASSWORD = 'correct horse battery staple';

let caPromise: Promise<TestCa> | undefined;
/** One test CA per file, and its certificate for 127.0.0.1 and localhost. */
const testCa = () => (caPromise ??= makeTestCa());
let caLeafPromise: Promise<{ cert: string; key: string }> | undefined;
const caIssued = () => (caLeafPromise ??= testCa().then((ca) => ca.issue(['localhost', '127.0.0.1'])));

/** A file in a fresh temp dir (removed by the OS's temp cleaning; tiny). */
function writeFile(name: string, content: string): string {
  const file = path.join(tempDir('postern-upstream-'), name);
  fs.writeFileSync(file, content, { mode: 0o600 });
  return file;
}

async function startUpstream(options: UpstreamServerOptions = {}): Promise<UpstreamServer> {
  const certificate = options.tls === 'none' ? undefined : (options.certificate ?? (await caIssued()));
  const server = await UpstreamServer.start({ users: { [USER]: PASSWORD }, ...options, ...(certificate ? { certificate } : {}) });
  afterRunner(() => server.close());
  return server;
}

/** An [[upstream]] for `server`, trusted through the test CA unless `extra` says otherwise. */
async function upstreamConfig(name: string, server: UpstreamServer, extra: Record<string, unknown> = {}) {
  return {
    name,
    type: 'smtp' as const,
    host: '127.0.0.1',
    port: server.port,
    username: USER,
    password_file: writeFile(`${name}.pass`, `${PASSWORD}\n`),
    ca_file: writeFile('ca.pem', (await testCa()).cert),
    ...extra,
  };
}

/** Like the harness's enqueue, with the account that submitted the message. */
async function enqueue(h: Harness, message: { sender: string; recipients: string[]; account?: string; body?: string }): Promise<string> {
  const queueId = newQueueId();
  const writer = h.store.createBody(queueId);
  writer.stream.end(message.body ?? `From: <${message.sender}>\r\nSubject: ${queueId}\r\nMessage-ID: <${queueId}@client.test>\r\n\r\nHello from ${queueId}.\r\n`);
  const size = await writer.finish();
  const now = Date.now();
  await h.store.enqueue({
    queueId,
    sender: message.sender,
    recipients: message.recipients.map((address) => ({ address })),
    size,
    receivedAt: now,
    expiresAt: now + 5 * 86_400_000,
    origin: { sessionId: `sess-${queueId}`, listener: 'submission', clientIp: '127.0.0.1', ...(message.account ? { account: message.account } : {}) },
  });
  h.runner.notify();
  return queueId;
}

/** Every log line and stored reply as text: none may hold the password, plain or base64. */
async function expectNoSecret(h: Harness, queueIds: string[]): Promise<void> {
  const stored = await Promise.all(queueIds.map((id) => h.message(id)));
  const text = JSON.stringify(h.logs) + JSON.stringify(stored);
  expect(text).not.toContain(PASSWORD);
  expect(text).not.toContain(Buffer.from(PASSWORD).toString('base64'));
  expect(text).not.toContain(Buffer.from(`\0${USER}\0${PASSWORD}`).toString('base64'));
}

// ---- delivery through a smarthost ----------------------------------------------------------

describe('smarthost delivery', () => {
  test('delivers through the upstream after STARTTLS and AUTH PLAIN, with the message bytes as queued', async () => {
    const isp = await startUpstream();
    const h = await setup({ config: { upstream: [await upstreamConfig('isp', isp)], upstream_route: [{ upstream: 'isp', default: true }] } });
    const body = 'From: <app@client.test>\r\nTo: <someone@far.test>\r\nSubject: via the ISP\r\n\r\n..a line starting with a dot\r\nbye\r\n';
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test', 'other@elsewhere.test'], body });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
    expect(isp.logins).toEqual([{ method: 'PLAIN', username: USER, ok: true, secure: true }]);
    // Both recipients in one transaction: one upstream is one destination, whatever the domains.
    expect(isp.messages).toHaveLength(1);
    expect(isp.messages[0]).toMatchObject({ from: 'app@client.test', to: ['someone@far.test', 'other@elsewhere.test'], secure: true, user: USER });
    expect(isp.messages[0]!.text).toBe(body);
    expect(h.logs.find((l) => l.event === 'delivered')).toMatchObject({
      queueId,
      destination: `upstream isp (127.0.0.1:${isp.port})`,
      ip: '127.0.0.1',
      code: 250,
    });
    await expectNoSecret(h, [queueId]);
  });

  test('uses AUTH LOGIN when the upstream offers only LOGIN, the password from password_env', async () => {
    const isp = await startUpstream({ authMethods: ['LOGIN'] });
    process.env.POSTERN_TEST_ISP_PASSWORD = PASSWORD;
    afterRunner(() => void delete process.env.POSTERN_TEST_ISP_PASSWORD);
    const { password_file: _f, ...config } = await upstreamConfig('isp', isp, { password_env: 'POSTERN_TEST_ISP_PASSWORD' });
    const h = await setup({ config: { upstream: [config], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    expect(recipient(await settled(h, queueId), 'someone@far.test').state).toBe('delivered');
    expect(isp.logins).toEqual([{ method: 'LOGIN', username: USER, ok: true, secure: true }]);
    await expectNoSecret(h, [queueId]);
  });

  test('implicit TLS: TLS from the first byte, then AUTH', async () => {
    const isp = await startUpstream({ tls: 'implicit' });
    const h = await setup({
      config: { upstream: [await upstreamConfig('isp', isp, { tls: 'implicit' })], upstream_route: [{ upstream: 'isp', default: true }] },
    });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    expect(recipient(await settled(h, queueId), 'someone@far.test').state).toBe('delivered');
    expect(isp.logins).toEqual([{ method: 'PLAIN', username: USER, ok: true, secure: true }]);
    expect(isp.messages[0]!.secure).toBe(true);
  });

  test('max_connections caps the connections open to the upstream at once', async () => {
    const isp = await startUpstream();
    const h = await setup({
      config: { upstream: [await upstreamConfig('isp', isp, { max_connections: 1 })], upstream_route: [{ upstream: 'isp', default: true }] },
    });
    const ids = await Promise.all([1, 2, 3, 4].map((n) => enqueue(h, { sender: 'app@client.test', recipients: [`user${n}@far.test`] })));
    for (const id of ids) expect((await settled(h, id)).recipients[0]!.state).toBe('delivered');
    expect(isp.messages).toHaveLength(4);
    expect(isp.maxConcurrent).toBe(1);
  });
});

// ---- TLS and certificates -----------------------------------------------------------------

describe('upstream TLS', () => {
  test('STARTTLS not offered: deferred, and neither AUTH nor the message is sent in clear', async () => {
    // This server would even accept AUTH in plaintext; Postern must not try.
    const isp = await startUpstream({ tls: 'none' });
    const h = await setup({ config: { upstream: [await upstreamConfig('isp', isp)], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, queueId), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastCode).toBeNull();
    expect(r.lastResponse).toBe(`4.7.4 TLS is required for upstream isp but [127.0.0.1]:${isp.port} does not offer STARTTLS`);
    expect(isp.logins).toEqual([]);
    expect(isp.events.some((e) => e.startsWith('mail'))).toBe(false);
    expect(h.logs.find((l) => l.event === 'upstream_tls_unavailable')).toMatchObject({ level: 'error', upstream: 'isp' });
  });

  test('a self-signed certificate is not trusted: deferred with the reason and what to set', async () => {
    const isp = await startUpstream({ certificate: await makeCertificate('localhost', new Date(Date.now() - 86_400_000), new Date(Date.now() + 86_400_000)) });
    const { ca_file: _ca, ...config } = await upstreamConfig('isp', isp);
    const h = await setup({ config: { upstream: [config], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, queueId), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe(
      `4.7.5 The TLS certificate of [127.0.0.1]:${isp.port} is not trusted for upstream isp: self-signed certificate (set ca_file to the CA that issued it, or verify_certificate = false)`,
    );
    expect(isp.logins).toEqual([]);
    const line = h.logs.find((l) => l.event === 'upstream_certificate');
    expect(line).toMatchObject({ level: 'error', upstream: 'isp' });
    expect(line!.msg).toContain('set ca_file to the CA that issued it');
  });

  test('a certificate for another name is not trusted, even from the trusted CA', async () => {
    const isp = await startUpstream({ certificate: await (await testCa()).issue(['mail.other.test']) });
    const h = await setup({ config: { upstream: [await upstreamConfig('isp', isp)], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, queueId), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toMatch(/^4\.7\.5 The TLS certificate of \[127\.0\.0\.1\]:\d+ is not trusted for upstream isp: Hostname\/IP does not match certificate's altnames/);
    expect(isp.logins).toEqual([]);
  });

  test('trusted through ca_file: a private CA, and a self-signed certificate named as its own CA', async () => {
    const viaCa = await startUpstream();
    const selfSigned = await makeCertificate('localhost', new Date(Date.now() - 86_400_000), new Date(Date.now() + 86_400_000));
    const pinned = await startUpstream({ certificate: selfSigned });
    const h = await setup({
      config: {
        upstream: [
          // by name: the certificate is checked against "localhost"
          await upstreamConfig('viaca', viaCa, { host: 'localhost' }),
          await upstreamConfig('pinned', pinned, { ca_file: writeFile('pinned.pem', selfSigned.cert) }),
        ],
        upstream_route: [
          { upstream: 'viaca', recipient_domains: ['a.test'] },
          { upstream: 'pinned', recipient_domains: ['b.test'] },
        ],
      },
    });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['x@a.test', 'y@b.test'] });
    const m = await settled(h, queueId);
    expect(m.recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
    expect(viaCa.messages.map((x) => x.to)).toEqual([['x@a.test']]);
    expect(pinned.messages.map((x) => x.to)).toEqual([['y@b.test']]);
  });

  test('verify_certificate = false delivers to a self-signed upstream (still encrypted)', async () => {
    const isp = await startUpstream({ certificate: await makeCertificate('localhost', new Date(Date.now() - 86_400_000), new Date(Date.now() + 86_400_000)) });
    const { ca_file: _ca, ...config } = await upstreamConfig('isp', isp, { verify_certificate: false });
    const h = await setup({ config: { upstream: [config], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    expect(recipient(await settled(h, queueId), 'someone@far.test').state).toBe('delivered');
    expect(isp.messages[0]!.secure).toBe(true);
  });
});

// ---- what the upstream's answers mean -------------------------------------------------------

describe('upstream replies', () => {
  test('a refused login defers with the reply kept (no bounce), logs the fix, and holds the upstream', async () => {
    const isp = await startUpstream({ users: { [USER]: 'the password the ISP really has' } });
    const config = await upstreamConfig('isp', isp);
    const h = await setup({ config: { upstream: [config], upstream_route: [{ upstream: 'isp', default: true }] } });
    const first = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, first), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.attempts).toBe(1);
    expect(r.lastCode).toBe(535);
    expect(r.lastResponse).toBe('535 5.7.8 Authentication credentials invalid');
    expect(isp.logins).toEqual([{ method: 'PLAIN', username: USER, ok: false, secure: true }]);
    expect(isp.events.some((e) => e.startsWith('mail'))).toBe(false);

    const line = h.logs.find((l) => l.event === 'upstream_auth_refused')!;
    expect(line).toMatchObject({ level: 'error', upstream: 'isp', username: USER, code: 535, response: '535 5.7.8 Authentication credentials invalid', holdMs: 60_000 });
    expect(line.msg).toBe(
      `upstream isp: the upstream refused the login of ${USER}: fix username or the password in password_file ${config.password_file}, then restart Postern; its mail is deferred (not bounced) until then`,
    );

    // Held: the next message is deferred with the same reply, without another failed login.
    const second = await enqueue(h, { sender: 'app@client.test', recipients: ['another@far.test'] });
    const r2 = recipient(await settled(h, second), 'another@far.test');
    expect(r2).toMatchObject({ state: 'deferred', lastCode: 535, lastResponse: '535 5.7.8 Authentication credentials invalid' });
    expect(isp.logins).toHaveLength(1);
    // No bounce was queued for either.
    expect((await h.store.listQueue()).map((q) => q.queueId).sort()).toEqual([first, second].sort());
    await expectNoSecret(h, [first, second]);
  });

  test('an upstream that offers no AUTH PLAIN or LOGIN: deferred, nothing sent', async () => {
    const isp = await startUpstream({ authMethods: [], authOptional: true });
    const h = await setup({ config: { upstream: [await upstreamConfig('isp', isp)], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, queueId), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toBe(`4.7.4 Cannot log in to upstream isp: [127.0.0.1]:${isp.port} does not offer AUTH PLAIN or LOGIN (it offers no AUTH)`);
    expect(isp.events.some((e) => e.startsWith('mail'))).toBe(false);
    expect(h.logs.find((l) => l.event === 'upstream_auth_unavailable')).toMatchObject({ level: 'error', upstream: 'isp' });
  });

  test('530 authentication required (no username configured) defers instead of bouncing', async () => {
    const isp = await startUpstream();
    const { username: _u, password_file: _p, ...config } = await upstreamConfig('isp', isp);
    const h = await setup({ config: { upstream: [config], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['someone@far.test'] });
    const r = recipient(await settled(h, queueId), 'someone@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastCode).toBe(530);
    expect(h.logs.find((l) => l.event === 'upstream_auth_required')).toMatchObject({ level: 'error', upstream: 'isp' });
    expect((await h.store.listQueue()).map((q) => q.queueId)).toEqual([queueId]);
  });

  test('"relay access denied" defers; a recipient the upstream does not know bounces as from any server', async () => {
    const isp = await startUpstream({
      rcpt: {
        'denied@far.test': { code: 554, message: '5.7.1 <denied@far.test>: Relay access denied' },
        'relay@far.test': { code: 550, message: '5.1.1 <relay@far.test>: Recipient address rejected: User unknown' },
      },
    });
    const h = await setup({ config: { upstream: [await upstreamConfig('isp', isp)], upstream_route: [{ upstream: 'isp', default: true }] } });
    const queueId = await enqueue(h, { sender: 'app@client.test', recipients: ['denied@far.test', 'relay@far.test', 'fine@far.test'] });
    const m = await settled(h, queueId);
    expect(recipient(m, 'denied@far.test')).toMatchObject({ state: 'deferred', lastCode: 554, lastResponse: '554 5.7.1 <denied@far.test>: Relay access denied' });
    // "relay" in an address is not a relaying refusal.
    expect(recipient(m, 'relay@far.test')).toMatchObject({ state: 'failed', lastCode: 550 });
    expect(recipient(m, 'fine@far.test').state).toBe('delivered');
    expect(h.logs.find((l) => l.event === 'upstream_relay_denied')).toMatchObject({ level: 'error', upstream: 'isp' });
    // The bounce for relay@ goes to the sender through the same default upstream.
    const dsn = await waitFor(() => isp.messages.find((x) => x.from === ''), 8000, 'the DSN');
    expect(dsn.to).toEqual(['app@client.test']);
    expect(dsn.text).toContain('Status: 5.1.1');
  });
});

// ---- routing ----------------------------------------------------------------------------------

describe('routing rules', () => {
  const base: ConfigInput = {
    upstream: [
      { name: 'alpha', type: 'smtp', host: '127.0.0.1', port: 2001, tls: 'none' },
      { name: 'beta', type: 'smtp', host: '127.0.0.1', port: 2002, tls: 'none' },
    ],
    route: [
      { domains: ['internal.test', '*.internal.test'], host: '10.0.0.5', port: 25 },
    ],
    upstream_route: [
      { upstream: 'beta', recipient_domains: ['partner.test', '*.partner.test'] },
      { upstream: 'beta', accounts: ['Scanner@Corp.test'] },
      { upstream: 'alpha', sender_domains: ['corp.test', '*.corp.test'] },
      { upstream: 'beta', default: true },
    ],
  };
  const router = (input: ConfigInput = base) =>
    new Router({
      config: { ...configSchema.parse(input), hostname: 'relay.test' },
      pool: new ConnectionPool({ maxConnections: 1, maxPerDestination: 1 }),
      resolver: new MxResolver(),
    });

  test('recipient domain first ([[route]] and recipient_domains), then account, then sender domain, then the default', () => {
    const r = router();
    const key = (domain: string, sender: string, account?: string) => r.route(domain, { sender, account }).key;
    // 1. recipient domain: a route or an upstream, whoever sends
    expect(key('internal.test', 'app@corp.test', 'scanner@corp.test')).toBe('route:10.0.0.5:25');
    expect(key('eu.internal.test', 'app@corp.test')).toBe('route:10.0.0.5:25');
    expect(key('partner.test', 'app@corp.test')).toBe('upstream:beta');
    expect(key('x.partner.test', 'app@corp.test')).toBe('upstream:beta');
    // 2. the account, before the sender domain (compared without case)
    expect(key('far.test', 'scanner@corp.test', 'scanner@corp.test')).toBe('upstream:beta');
    expect(key('far.test', 'scanner@corp.test', 'SCANNER@corp.test')).toBe('upstream:beta');
    // 3. the envelope sender's domain, exact or wildcard
    expect(key('far.test', 'app@corp.test', 'app@corp.test')).toBe('upstream:alpha');
    expect(key('far.test', 'app@paris.corp.test')).toBe('upstream:alpha');
    // 4. the default, also for bounces (null sender)
    expect(key('far.test', 'app@other.test')).toBe('upstream:beta');
    expect(key('far.test', '')).toBe('upstream:beta');
  });

  test('without a default, the rest goes by MX; a [[route]] "*" is a default like default = true', () => {
    const noDefault = router({ ...base, upstream_route: base.upstream_route!.slice(0, 3) });
    expect(noDefault.route('far.test', { sender: 'app@other.test' }).key).toBe('mx:far.test');
    expect(noDefault.route('far.test', { sender: 'app@corp.test' }).key).toBe('upstream:alpha');
    const starRoute = router({ ...base, route: [{ domains: ['*'], host: 'smarthost.internal' }], upstream_route: base.upstream_route!.slice(0, 3) });
    expect(starRoute.route('far.test', { sender: 'app@other.test' }).key).toBe('route:smarthost.internal:25');
    // The sender rule still comes before the catch-all route.
    expect(starRoute.route('far.test', { sender: 'app@corp.test' }).key).toBe('upstream:alpha');
  });

  test('each rule sends real mail to the right upstream; one message to several places is split', async () => {
    const alpha = await startUpstream();
    const beta = await startUpstream();
    const internal = await startSink();
    const mx = await startSink();
    const h = await setup({
      zone: zoneFor('far.test'),
      mxPort: mx.port,
      config: {
        upstream: [await upstreamConfig('alpha', alpha), await upstreamConfig('beta', beta)],
        route: [{ domains: ['internal.test'], host: '127.0.0.1', port: internal.port, tls: 'none' }],
        upstream_route: [
          { upstream: 'beta', recipient_domains: ['partner.test'] },
          { upstream: 'beta', accounts: ['scanner@corp.test'] },
          { upstream: 'alpha', sender_domains: ['corp.test'] },
        ],
      },
    });
    const byRecipient = await enqueue(h, { sender: 'app@corp.test', account: 'app@corp.test', recipients: ['a@partner.test'] });
    const byAccount = await enqueue(h, { sender: 'scanner@corp.test', account: 'scanner@corp.test', recipients: ['b@far.test'] });
    const bySender = await enqueue(h, { sender: 'app@corp.test', account: 'app@corp.test', recipients: ['c@far.test', 'd@internal.test'] });
    const byMx = await enqueue(h, { sender: 'app@other.test', recipients: ['e@far.test'] });
    for (const id of [byRecipient, byAccount, bySender, byMx]) {
      expect((await settled(h, id)).recipients.every((r) => r.state === 'delivered')).toBe(true);
    }
    const tos = (server: { messages: { to: string[] }[] }) => server.messages.map((m) => m.to.join(',')).sort();
    expect(tos(beta)).toEqual(['a@partner.test', 'b@far.test']);
    expect(tos(alpha)).toEqual(['c@far.test']);
    expect(tos(internal)).toEqual(['d@internal.test']);
    expect(tos(mx)).toEqual(['e@far.test']);
    const destinations = h.logs.filter((l) => l.queueId === bySender && l.event === 'delivered').map((l) => l.destination).sort();
    expect(destinations).toEqual([`route 127.0.0.1:${internal.port}`, `upstream alpha (127.0.0.1:${alpha.port})`]);
  });

  test('a device that logs in to Postern is routed by its account, end to end', async () => {
    const tenant = await startUpstream();
    const dir = tempDir();
    const password = 'device password';
    fs.writeFileSync(path.join(dir, 'tenant.pass'), `${PASSWORD}\n`);
    fs.writeFileSync(path.join(dir, 'ca.pem'), (await testCa()).cert);
    const file = path.join(dir, 'postern.toml');
    fs.writeFileSync(
      file,
      `hostname = "relay.example.test"
data_dir = "data"
[listen]
submission = "127.0.0.1:0"
[[upstream]]
name = "tenant"
type = "smtp"
host = "127.0.0.1"
port = ${tenant.port}
username = "${USER}"
password_file = "tenant.pass"
ca_file = "ca.pem"
[[upstream_route]]
upstream = "tenant"
accounts = ["scanner@corp.test"]
`,
    );
    const logs: string[] = [];
    const postern = await startPostern(parseConfigText(fs.readFileSync(file, 'utf8'), file), createLogger({ level: 'info', destination: { write: (l: string) => void logs.push(l) } }), {
      stopGraceMs: 1000,
    });
    afterRunner(() => postern.stop());
    await postern.store.createAccount({ address: 'scanner@corp.test', passwordHash: await hashPassword(password) });
    const submission = postern.listeners.find((l) => l.kind === 'submission')!;
    await nodemailer
      .createTransport({ host: '127.0.0.1', port: submission.port, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: 'scanner@corp.test', pass: password } })
      .sendMail({ envelope: { from: 'scanner@corp.test', to: ['boss@far.test'] }, raw: 'From: scanner@corp.test\r\nSubject: scan\r\n\r\nscan attached\r\n' });
    const message = await waitFor(() => tenant.messages[0], 10_000, 'the message at the tenant upstream');
    expect(message).toMatchObject({ from: 'scanner@corp.test', to: ['boss@far.test'], user: USER, secure: true });
    expect(message.text).toContain('scan attached');
    expect(logs.join('')).not.toContain(PASSWORD);
  });
});

// ---- configuration --------------------------------------------------------------------------

function problems(text: string): string[] {
  try {
    parseConfigText(text, '/etc/postern/postern.toml');
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as ConfigError).problems;
  }
  throw new Error('expected a ConfigError');
}

const ISP = `[[upstream]]
name = "isp"
type = "smtp"
host = "mail.isp.test"
username = "relay@isp.test"
`;

describe('upstream configuration', () => {
  test('the smtp upstream with its defaults; files relative to the configuration file', () => {
    const config = parseConfigText(`${ISP}password_file = "secrets/isp.pass"\n\n[[upstream_route]]\nupstream = "isp"\ndefault = true\n`, '/etc/postern/postern.toml');
    expect(config.upstream).toEqual([
      {
        type: 'smtp',
        name: 'isp',
        host: 'mail.isp.test',
        port: 587,
        tls: 'starttls',
        username: 'relay@isp.test',
        password_file: '/etc/postern/secrets/isp.pass',
        verify_certificate: true,
      },
    ]);
    expect(config.upstream_route).toEqual([{ upstream: 'isp', default: true }]);
    const implicit = parseConfigText('[[upstream]]\nname = "a"\ntype = "smtp"\nhost = "h"\ntls = "implicit"\nca_file = "ca.pem"\n', '/srv/p.toml');
    expect(implicit.upstream[0]).toMatchObject({ port: 465, ca_file: '/srv/ca.pem' });
  });

  test('a password written in the file is refused, saying why and what to write instead', () => {
    expect(problems(`${ISP}password = "hunter2-not-here"\n`)).toEqual([
      'upstream[0].password: a password is never written in the configuration file (the file gets copied, shared and backed up; the password would go with it): put it in a file readable only by Postern and set password_file = "secrets/NAME.pass", or set password_env = "VARIABLE"',
    ]);
    // The value itself is not repeated in the message.
    expect(problems(`${ISP}password = "hunter2-not-here"\n`).join('')).not.toContain('hunter2');
  });

  test('an unknown type names the supported ones', () => {
    const supported = '(supported: "smtp", "microsoft365", "google")';
    expect(problems('[[upstream]]\nname = "x"\ntype = "exchange"\nhost = "h"\n')).toEqual([`upstream[0].type: unknown upstream type "exchange" ${supported}`]);
    expect(problems('[[upstream]]\nname = "x"\nhost = "h"\n')).toEqual([`upstream[0].type: missing: every [[upstream]] needs a type ${supported}`]);
  });

  test('a rule naming an upstream that does not exist', () => {
    expect(problems(`${ISP}password_file = "p"\n[[upstream_route]]\nupstream = "ips"\ndefault = true\n`)).toEqual([
      'upstream_route[0].upstream: no [[upstream]] is named "ips" (defined: "isp")',
    ]);
  });

  test('other mistakes: two selectors, a duplicate name, a clash with a route, two defaults, a password in clear', () => {
    expect(problems(`${ISP}password_file = "p"\n[[upstream_route]]\nupstream = "isp"\naccounts = ["a@b.test"]\nsender_domains = ["b.test"]\n`)).toEqual([
      'upstream_route[0]: give only one of sender_domains, accounts, recipient_domains or default = true (this rule has sender_domains and accounts); write one rule each',
    ]);
    expect(problems(`${ISP}password_file = "p"\n${ISP}password_file = "q"\n`)).toEqual(['upstream[1].name: "isp" is already the name of upstream[0]']);
    expect(
      problems(`${ISP}password_file = "p"\n[[route]]\ndomains = ["corp.test"]\nhost = "10.0.0.5"\n[[upstream_route]]\nupstream = "isp"\nrecipient_domains = ["corp.test"]\n`),
    ).toEqual(['upstream_route[0].recipient_domains: recipient domain "corp.test" is already routed by route[0]']);
    expect(problems(`${ISP}password_file = "p"\n[[route]]\ndomains = ["*"]\nhost = "10.0.0.5"\n[[upstream_route]]\nupstream = "isp"\ndefault = true\n`)).toEqual([
      'upstream_route[0].default: all mail (default) is already routed by route[0] (domains = ["*"])',
    ]);
    expect(problems(`${ISP}password_file = "p"\ntls = "none"\n`)).toEqual([
      'upstream[0].tls: tls = "none" would send the password unencrypted; use "starttls" or "implicit" (or drop username if the upstream relays for Postern without AUTH)',
    ]);
    expect(problems(`${ISP}password_file = "p"\n[[upstream_route]]\nupstream = "isp"\nrecipient_domains = ["*"]\n`)).toEqual([
      'upstream_route[0].recipient_domains: "*" is not a recipient domain; for all mail use a rule with default = true',
    ]);
  });

  test('a missing secret file stops start-up, naming the upstream, the file and the reason', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'postern.toml');
    fs.writeFileSync(file, `data_dir = "data"\n[listen]\nsubmission = "127.0.0.1:0"\n${ISP}password_file = "secrets/isp.pass"\n`);
    const config = parseConfigText(fs.readFileSync(file, 'utf8'), file);
    const started = startPostern(config, createLogger({ level: 'silent' }));
    await expect(started).rejects.toThrow(ConfigError);
    await expect(started).rejects.toThrow(
      `${file}: invalid configuration\n  - upstream "isp": cannot read password_file ${path.join(dir, 'secrets/isp.pass')}: no such file (ENOENT)`,
    );
  });

  test('`postern serve` refuses to start too, before listening, with exit code 2', () => {
    const dir = tempDir();
    const file = path.join(dir, 'postern.toml');
    fs.writeFileSync(file, `data_dir = "data"\n[listen]\nsubmission = "127.0.0.1:0"\n${ISP}password_file = "isp.pass"\n`);
    const r = spawnSync(process.execPath, [BIN, 'serve', '--config', file], { cwd: dir, encoding: 'utf8', timeout: 20_000 });
    // 2: a configuration error, as for any other bad setting (the delivery thread passes it on as one).
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`${file}: invalid configuration\n  - upstream "isp": cannot read password_file ${path.join(dir, 'isp.pass')}: no such file (ENOENT)`);
    expect(r.stderr).not.toContain('Postern ready');
  });

  test('an unset password_env and an empty password file stop start-up as well', async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'empty.pass'), '\n');
    const file = path.join(dir, 'postern.toml');
    fs.writeFileSync(
      file,
      `data_dir = "data"\n[listen]\nsubmission = "127.0.0.1:0"\n${ISP}password_env = "POSTERN_TEST_UNSET_VARIABLE"\n${ISP.replace('"isp"', '"isp2"')}password_file = "empty.pass"\n`,
    );
    const started = startPostern(parseConfigText(fs.readFileSync(file, 'utf8'), file), createLogger({ level: 'silent' }));
    await expect(started).rejects.toThrow(
      `${file}: invalid configuration\n  - upstream "isp": password_env: the environment variable POSTERN_TEST_UNSET_VARIABLE is not set\n  - upstream "isp2": password_file ${path.join(dir, 'empty.pass')} is empty (the secret is its first line)`,
    );
  });
});
