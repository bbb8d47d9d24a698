// Upstreams that log in with OAuth2 over SMTP: Microsoft 365 (type "microsoft365", method "smtp")
// and Google (type "google"). Postern's queue runner and store (the delivery harness) deliver to
// local stand-ins that behave as Microsoft's and Google's documentation describes
// (src/standins/): an Entra token endpoint (client secret and certificate assertions), Exchange
// Online's SMTP submission with XOAUTH2, its limits and its replies, Google's JWT-bearer token
// endpoint and Gmail's SMTP. Nothing here reaches the internet.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ConfigError, parseConfigText } from '../src/config/load-config.js';
import MailComposer from 'nodemailer/lib/mail-composer';
import { GmailSmtpStandIn } from '../src/standins/gmail-smtp.js';
import { GraphStandIn, type GraphStandInOptions } from '../src/standins/graph-api.js';
import { withEnvelopeRecipients } from '../src/delivery/upstreams/graph-upstream.js';
import { IdentityStandIn } from '../src/standins/identity-platform.js';
import { Office365SmtpStandIn, type Office365SmtpStandInOptions } from '../src/standins/office365-smtp.js';
import { type StandInTls, makeAppCertificate, makeStandInTls } from '../src/standins/standin-certificates.js';
import { type Harness, recipient, settled, useDeliveryHarness } from './helpers/delivery-harness.js';
import { tempDir } from './helpers/temp-dir.js';
import { UpstreamServer } from './helpers/upstream-server.js';
import { waitFor } from './helpers/wait-for.js';

const { setup, afterRunner } = useDeliveryHarness();

const TENANT = 'contoso.onmicrosoft.com';
const CLIENT_ID = '6731de76-14a6-49ae-97bc-6eba6914391e';
const SECRET = 'qWe8Q~not-a-real-secret.Value-0123456789abcdef';
const PRINTER = 'printer@contoso.com';
const SCANNER = 'scanner@contoso.com';

let tls: StandInTls;
let identity: IdentityStandIn;
let files: string;

beforeAll(async () => {
  tls = await makeStandInTls();
  identity = new IdentityStandIn({ certificate: tls });
  await identity.start();
  identity.registerApp({ tenant: TENANT, clientId: CLIENT_ID, clientSecret: SECRET });
  files = tempDir('postern-oauth-');
  fs.writeFileSync(path.join(files, 'ca.pem'), tls.ca);
  fs.writeFileSync(path.join(files, 'm365.secret'), `${SECRET}\n`, { mode: 0o600 });
});

afterAll(async () => {
  await identity?.close();
});

async function startExchange(options: Partial<Office365SmtpStandInOptions> = {}): Promise<Office365SmtpStandIn> {
  const exchange = new Office365SmtpStandIn({ certificate: tls, identity, mailboxes: [PRINTER, SCANNER], ...options });
  await exchange.start();
  afterRunner(() => exchange.close());
  return exchange;
}

/** An [[upstream]] of type microsoft365 for `exchange`, trusting the stand-ins' CA. */
function m365(exchange: Office365SmtpStandIn, extra: Record<string, unknown> = {}) {
  return {
    name: 'm365',
    type: 'microsoft365' as const,
    tenant: TENANT,
    client_id: CLIENT_ID,
    client_secret_file: path.join(files, 'm365.secret'),
    authority: identity.url,
    smtp: `127.0.0.1:${exchange.port}`,
    ca_file: path.join(files, 'ca.pem'),
    ...extra,
  };
}

async function harness(upstream: Record<string, unknown>, options: { connectionIdleTimeout?: number } = {}): Promise<Harness> {
  return setup({ ...options, config: { upstream: [upstream], upstream_route: [{ upstream: String(upstream.name), default: true }] } as never });
}

/** Log lines about upstream problems (not the start-up notes, not recoveries). */
function problemLines(h: Harness) {
  return h.logs.filter((l) => String(l.event).startsWith('upstream_') && !['upstream_recovered', 'upstream_no_null_sender_mailbox'].includes(String(l.event)));
}

function tokenRequests(clientId = CLIENT_ID) {
  return identity.requests.filter((r) => r.clientId === clientId);
}

/** No log line, stored reply or event may hold the secret, an access token or an XOAUTH2 string. */
async function expectNoSecrets(h: Harness, queueIds: string[], secrets: string[]): Promise<void> {
  const stored = await Promise.all(queueIds.map((id) => h.message(id)));
  const events = await h.store.listSecurityEvents();
  const text = JSON.stringify(h.logs) + JSON.stringify(stored) + JSON.stringify(events);
  for (const secret of secrets) {
    expect(text).not.toContain(secret);
    expect(text).not.toContain(Buffer.from(secret).toString('base64'));
  }
  expect(text).not.toMatch(/auth=Bearer/);
  expect(text).not.toMatch(/dXNlcj1/); // base64 of "user=": an XOAUTH2 initial response
}

describe('Microsoft 365 over SMTP (XOAUTH2)', () => {
  test('delivers as each sender\'s mailbox with one token for the tenant, the bytes as queued', async () => {
    const exchange = await startExchange();
    const before = tokenRequests().length;
    const h = await harness(m365(exchange));
    const body = `From: <${PRINTER}>\r\nTo: <boss@fabrikam.test>\r\nSubject: scan\r\n\r\n..dot line\r\nscan attached\r\n`;
    const a = await h.enqueue({ sender: PRINTER, recipients: ['boss@fabrikam.test', 'team@fabrikam.test'], body });
    const b = await h.enqueue({ sender: SCANNER, recipients: ['boss@fabrikam.test'] });
    for (const id of [a, b]) expect((await settled(h, id)).recipients.every((r) => r.state === 'delivered')).toBe(true);

    const first = exchange.messages.find((m) => m.mailbox === PRINTER)!;
    expect(first).toMatchObject({ from: PRINTER, to: ['boss@fabrikam.test', 'team@fabrikam.test'] });
    expect(first.raw.toString('utf8')).toBe(body);
    expect(exchange.messages.find((m) => m.mailbox === SCANNER)).toMatchObject({ from: SCANNER, to: ['boss@fabrikam.test'] });
    // Each mailbox logged in with XOAUTH2 as itself; one client-credentials token served both.
    expect(exchange.logins.map((l) => [l.mailbox, l.method, l.ok]).sort()).toEqual([
      [PRINTER, 'XOAUTH2', true],
      [SCANNER, 'XOAUTH2', true],
    ]);
    const requests = tokenRequests().slice(before);
    expect(requests).toHaveLength(1);
    expect(requests[0]).toMatchObject({ provider: 'microsoft', grantType: 'client_credentials', scope: 'https://outlook.office365.com/.default', status: 200 });
    expect(h.logs.find((l) => l.event === 'delivered' && l.queueId === a)).toMatchObject({ destination: `upstream m365 (127.0.0.1:${exchange.port})`, code: 250 });
    await expectNoSecrets(h, [a, b], [SECRET]);
  });

  test('at start, an upstream that sends as each sender says bounces cannot go through it; with mailbox it does not', async () => {
    const exchange = await startExchange();
    const h = await harness(m365(exchange));
    const notes = h.logs.filter((l) => l.event === 'upstream_no_null_sender_mailbox');
    expect(notes).toHaveLength(1);
    expect(notes[0]!.msg).toContain('set mailbox = "postmaster@..." or a fallback');
    const withMailbox = await harness(m365(exchange, { mailbox: PRINTER }));
    expect(withMailbox.logs.filter((l) => l.event === 'upstream_no_null_sender_mailbox')).toEqual([]);
  });

  test('certificate credentials: a signed client assertion instead of a secret', async () => {
    const app = await makeAppCertificate();
    const clientId = 'b1f7e0c2-0000-4000-8000-00000000cert';
    identity.registerApp({ tenant: TENANT, clientId, certificatePem: app.cert });
    fs.writeFileSync(path.join(files, 'app.crt'), app.cert);
    fs.writeFileSync(path.join(files, 'app.key'), app.key, { mode: 0o600 });
    const exchange = await startExchange();
    const h = await harness(
      m365(exchange, { client_id: clientId, client_secret_file: undefined, certificate_file: path.join(files, 'app.crt'), private_key_file: path.join(files, 'app.key') }),
    );
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'x@fabrikam.test').state).toBe('delivered');
    expect(tokenRequests(clientId).at(-1)).toMatchObject({ credential: expect.stringMatching(/assertion/i), status: 200 });
    await expectNoSecrets(h, [id], [app.key.split('\n')[1]!]);
  });

  test('mailbox = sends everything as that one mailbox', async () => {
    const exchange = await startExchange({ sendAs: { [SCANNER]: ['app@contoso.com'] } });
    const h = await harness(m365(exchange, { mailbox: SCANNER }));
    const id = await h.enqueue({ sender: 'app@contoso.com', recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'x@fabrikam.test').state).toBe('delivered');
    expect(exchange.messages).toHaveLength(1);
    expect(exchange.messages[0]).toMatchObject({ mailbox: SCANNER, from: 'app@contoso.com' });
  });

  test('a token Exchange refuses mid-burst is renewed once, and nothing fails', async () => {
    const exchange = await startExchange();
    const h = await harness(m365(exchange));
    const first = await h.enqueue({ sender: PRINTER, recipients: ['a@fabrikam.test'] });
    await settled(h, first);
    const before = tokenRequests().length;
    // Every token issued so far is now expired at Microsoft (revoked, or Postern's clock behind).
    identity.expireAllTokens();
    const ids = await Promise.all(Array.from({ length: 6 }, (_, i) => h.enqueue({ sender: i % 2 ? PRINTER : SCANNER, recipients: [`r${i}@fabrikam.test`] })));
    for (const id of ids) expect((await settled(h, id)).recipients[0]!.state).toBe('delivered');
    // New connections met the expired token, got 535 5.7.3, and logged in again with a fresh one.
    const refused = exchange.logins.filter((l) => !l.ok);
    expect(refused.length).toBeGreaterThan(0);
    expect(refused.every((l) => l.reply.startsWith('535 5.7.3'))).toBe(true);
    expect(tokenRequests().length - before).toBeGreaterThanOrEqual(1);
    // No refusal was counted against the mailbox: nothing held, nothing logged as a problem.
    expect(problemLines(h)).toEqual([]);
    expect(exchange.messages).toHaveLength(7);
  });

  test('tokens are fetched again before they expire: no login ever uses an expired one', async () => {
    const shortLived = new IdentityStandIn({ certificate: tls, tokenLifetimeSeconds: 4 });
    await shortLived.start();
    afterRunner(() => shortLived.close());
    shortLived.registerApp({ tenant: TENANT, clientId: CLIENT_ID, clientSecret: SECRET });
    const exchange = new Office365SmtpStandIn({ certificate: tls, identity: shortLived, mailboxes: [PRINTER] });
    await exchange.start();
    afterRunner(() => exchange.close());
    // Connections are not kept between messages, so each message logs in with the token it has.
    const h = await harness(m365(exchange, { authority: shortLived.url }), { connectionIdleTimeout: 50 });
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      ids.push(await h.enqueue({ sender: PRINTER, recipients: [`r${i}@fabrikam.test`] }));
      await settled(h, ids.at(-1)!);
      await new Promise((r) => setTimeout(r, 1100));
    }
    for (const id of ids) expect((await h.message(id)).recipients[0]!.state).toBe('delivered');
    expect(shortLived.requests.filter((r) => r.status === 200).length).toBeGreaterThanOrEqual(2);
    expect(exchange.logins.filter((l) => !l.ok)).toEqual([]);
  });

  test('a wrong client secret: deferred with the AADSTS code and the fix, the upstream held, an alert stored, no bounce', async () => {
    const exchange = await startExchange();
    fs.writeFileSync(path.join(files, 'wrong.secret'), 'the-secret-id-not-its-value\n', { mode: 0o600 });
    const h = await harness(m365(exchange, { client_secret_file: path.join(files, 'wrong.secret') }));
    const before = tokenRequests().length;
    const a = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const ra = recipient(await settled(h, a), 'x@fabrikam.test');
    expect(ra.state).toBe('deferred');
    expect(ra.lastResponse).toMatch(
      /^4\.7\.0 Cannot get an access token for upstream m365: the token endpoint refused Postern's credentials: invalid_client \(AADSTS7000215\): the client secret is wrong: put the secret's Value \(not its Secret ID\)/,
    );
    // Held: the next message is deferred with the same reply, without asking for a token again.
    const b = await h.enqueue({ sender: SCANNER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, b), 'y@fabrikam.test')).toMatchObject({ state: 'deferred', lastResponse: ra.lastResponse });
    expect(tokenRequests().length - before).toBe(1);
    // The first message's connection got no AUTH (there was no token to send); the second none at all.
    expect(exchange.connections).toBe(1);
    expect(exchange.logins).toEqual([]);
    const logged = h.logs.filter((l) => l.event === 'upstream_token_refused');
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ level: 'error', holdMs: 60_000 });
    const events = await waitFor(async () => {
      const list = await h.store.listSecurityEvents();
      return list.some((e) => e.kind === 'upstream_problem') ? list : undefined;
    });
    expect(events.find((e) => e.kind === 'upstream_problem')!.detail).toMatchObject({ upstream: 'm365', problem: 'token_refused' });
    // Nothing bounced: no DSN queued.
    expect((await h.store.listQueue()).filter((m) => m.sender === '')).toEqual([]);
    await expectNoSecrets(h, [a, b], ['the-secret-id-not-its-value']);
  });

  test('the token endpoint down: deferred and tried again, not held as a configuration problem', async () => {
    const exchange = await startExchange();
    const h = await harness(m365(exchange));
    identity.failNext(1, 503, { error: 'temporarily_unavailable', error_description: 'AADSTS50196: The server terminated an operation because it encountered a client request loop.' });
    const a = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const ra = recipient(await settled(h, a), 'x@fabrikam.test');
    expect(ra.state).toBe('deferred');
    expect(ra.lastResponse).toMatch(/^4\.4\.1 Cannot get an access token for upstream m365: HTTP 503 from https:\/\/127\.0\.0\.1:\d+: temporarily_unavailable/);
    expect(problemLines(h)).toEqual([]);
    // Not held: the next message gets a token and goes.
    const b = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, b), 'y@fabrikam.test').state).toBe('delivered');
  });

  test('535 5.7.139 (SMTP AUTH off for a mailbox): that mailbox is held with the PowerShell fix, the others deliver', async () => {
    const exchange = await startExchange();
    exchange.disableSmtpAuth(PRINTER);
    const h = await harness(m365(exchange));
    const a = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const ra = recipient(await settled(h, a), 'x@fabrikam.test');
    expect(ra).toMatchObject({ state: 'deferred', lastCode: 535 });
    expect(ra.lastResponse).toMatch(/^535 5\.7\.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox/);
    const line = h.logs.find((l) => l.event === 'upstream_smtp_auth_disabled')!;
    expect(line).toMatchObject({ mailbox: PRINTER, holdMs: 60_000 });
    expect(line.msg).toContain(`Set-CASMailbox -Identity ${PRINTER} -SmtpClientAuthenticationDisabled $false`);
    const loginsBefore = exchange.logins.length;
    const again = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, again), 'y@fabrikam.test').state).toBe('deferred');
    expect(exchange.logins.length).toBe(loginsBefore);
    const other = await h.enqueue({ sender: SCANNER, recipients: ['z@fabrikam.test'] });
    expect(recipient(await settled(h, other), 'z@fabrikam.test').state).toBe('delivered');
  });

  test('SendAsDenied (550 5.7.60) is deferred with the Add-RecipientPermission fix, not bounced', async () => {
    const exchange = await startExchange();
    const h = await harness(m365(exchange, { mailbox: PRINTER }));
    const id = await h.enqueue({ sender: 'ceo@contoso.com', recipients: ['x@fabrikam.test'] });
    const r = recipient(await settled(h, id), 'x@fabrikam.test');
    expect(r).toMatchObject({ state: 'deferred', lastCode: 550 });
    expect(r.lastResponse).toMatch(/^550 5\.7\.60 /);
    expect(h.logs.find((l) => l.event === 'upstream_send_as_denied')!.msg).toContain(
      `Add-RecipientPermission -Identity ceo@contoso.com -Trustee ${PRINTER} -AccessRights SendAs`,
    );
    expect((await h.store.listQueue()).filter((m) => m.sender === '')).toEqual([]);
  });

  test.each([
    ['554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message Cannot submit message.', 'data'],
    ['432 4.3.2 Concurrent connections limit exceeded.', 'data'],
  ] as const)('throttling (%s) waits a minute and is not bounced', async (reply, at) => {
    const exchange = await startExchange();
    const [code, ...rest] = reply.split(' ');
    exchange.script({ at, code: Number(code), message: rest.join(' ') });
    const h = await harness(m365(exchange));
    const started = Date.now();
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const r = recipient(await settled(h, id), 'x@fabrikam.test');
    expect(r).toMatchObject({ state: 'deferred', lastCode: Number(code), attempts: 1 });
    expect(r.nextAttemptAt).toBeGreaterThanOrEqual(started + 60_000);
    expect(r.nextAttemptAt).toBeLessThan(Date.now() + 61_000);
    expect(h.logs.find((l) => l.event === 'upstream_throttled')).toMatchObject({ mailbox: PRINTER, retryInMs: 60_000 });
    // The mailbox's next message waits for the same time without trying; other mailboxes go on.
    const next = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, next), 'y@fabrikam.test')).toMatchObject({ state: 'deferred', nextAttemptAt: r.nextAttemptAt });
    const other = await h.enqueue({ sender: SCANNER, recipients: ['z@fabrikam.test'] });
    expect(recipient(await settled(h, other), 'z@fabrikam.test').state).toBe('delivered');
    expect(exchange.messages.map((m) => m.mailbox)).toEqual([SCANNER]);
  });

  test.each([
    ['554 5.2.2 mailbox full; Quota exceeded', 'mailbox_full', 'mailbox'],
    ['550 5.7.30 Basic authentication is not supported for Client Submission.', 'basic_auth_refused', 'upstream'],
    ['550 5.7.68 TenantOutboundBlocked', 'tenant_blocked', 'upstream'],
    ['530 5.7.57 Client not authenticated to send mail.', 'not_authenticated', 'mailbox'],
    ['550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.', 'tenant_blocked', 'upstream'],
  ] as const)('%s is a configuration problem: deferred, held, logged (%s)', async (reply, problem, scope) => {
    const exchange = await startExchange();
    const [code, ...rest] = reply.split(' ');
    exchange.script({ at: 'data', code: Number(code), message: rest.join(' ') });
    const h = await harness(m365(exchange));
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'x@fabrikam.test')).toMatchObject({ state: 'deferred', lastCode: Number(code) });
    const line = h.logs.find((l) => l.event === `upstream_${problem}`)!;
    expect(line).toMatchObject({ holdMs: 60_000 });
    expect(line.mailbox).toBe(scope === 'mailbox' ? PRINTER : undefined);
    // The hold covers the scope: another mailbox goes on only when just one mailbox is held.
    const other = await h.enqueue({ sender: SCANNER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, other), 'y@fabrikam.test').state).toBe(scope === 'mailbox' ? 'delivered' : 'deferred');
  });

  test.each([
    ['mail', '430 4.2.0 STOREDRV; mailbox logon failure', 'could not open the mailbox printer@contoso.com (a temporary logon failure)'],
    ['data', '421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2.', 'Exchange refused the TLS version'],
  ] as const)('at %s, %s is retried on the backoff, with the reason logged', async (at, reply, advice) => {
    const exchange = await startExchange();
    const [code, ...rest] = reply.split(' ');
    exchange.script({ at, code: Number(code), message: rest.join(' ') });
    const h = await harness(m365(exchange));
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'x@fabrikam.test')).toMatchObject({ state: 'deferred', lastCode: Number(code), attempts: 1 });
    const lines = problemLines(h);
    expect(lines.map((l) => l.event)).toEqual(['upstream_temporary']);
    expect(lines[0]!.msg).toContain(advice);
  });

  test('a refused recipient still bounces: 550 5.1.10 is not the configuration', async () => {
    const exchange = await startExchange();
    exchange.script({ at: 'rcpt', code: 550, message: '5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup' });
    const h = await harness(m365(exchange));
    const id = await h.enqueue({ sender: PRINTER, recipients: ['nobody@contoso.com'] });
    expect(recipient(await settled(h, id), 'nobody@contoso.com')).toMatchObject({ state: 'failed', lastCode: 550 });
  });
});

describe('Microsoft 365 over Graph', () => {
  async function startGraph(options: Partial<GraphStandInOptions> = {}): Promise<GraphStandIn> {
    const graph = new GraphStandIn({ certificate: tls, identity, mailboxes: [PRINTER, SCANNER], ...options });
    await graph.start();
    afterRunner(() => graph.close());
    return graph;
  }

  function graphUpstream(graph: GraphStandIn, extra: Record<string, unknown> = {}) {
    return {
      name: 'm365',
      type: 'microsoft365' as const,
      method: 'graph' as const,
      tenant: TENANT,
      client_id: CLIENT_ID,
      client_secret_file: path.join(files, 'm365.secret'),
      authority: identity.url,
      graph: graph.url,
      ca_file: path.join(files, 'ca.pem'),
      ...extra,
    };
  }

  test('a small message goes in one sendMail request, as queued, with a Graph-scoped token', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph));
    const body = `From: <${PRINTER}>\r\nTo: <boss@fabrikam.test>\r\nSubject: scan\r\n\r\nscan attached\r\n`;
    const id = await h.enqueue({ sender: PRINTER, recipients: ['boss@fabrikam.test'], body });
    const r = recipient(await settled(h, id), 'boss@fabrikam.test');
    expect(r).toMatchObject({ state: 'delivered', lastResponse: '2.0.0 Accepted by Microsoft Graph (HTTP 202)' });
    expect(graph.sent).toHaveLength(1);
    expect(graph.sent[0]).toMatchObject({ mailbox: PRINTER, via: 'sendMail', to: ['boss@fabrikam.test'] });
    expect(graph.sent[0]!.mime.toString('utf8')).toBe(body);
    expect(identity.requests.at(-1)).toMatchObject({ scope: 'https://graph.microsoft.com/.default', status: 200 });
    await expectNoSecrets(h, [id], [SECRET]);
  });

  test('envelope recipients the header does not name go in a Bcc field; a header recipient that is not one of them stops Graph', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph));
    const a = await h.enqueue({ sender: PRINTER, recipients: ['to@fabrikam.test', 'hidden@fabrikam.test'], body: `From: <${PRINTER}>\r\nTo: <to@fabrikam.test>\r\nSubject: x\r\n\r\nx\r\n` });
    expect((await settled(h, a)).recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
    expect(graph.sent[0]).toMatchObject({ to: ['to@fabrikam.test'], bcc: ['hidden@fabrikam.test'] });
    const b = await h.enqueue({ sender: PRINTER, recipients: ['to@fabrikam.test'], body: `From: <${PRINTER}>\r\nTo: <to@fabrikam.test>, <other@elsewhere.test>\r\nSubject: y\r\n\r\ny\r\n` });
    const rb = recipient(await settled(h, b), 'to@fabrikam.test');
    expect(rb.state).toBe('deferred');
    expect(rb.lastResponse).toBe(
      '4.7.0 Not sent through upstream m365: the message names other@elsewhere.test in its To/Cc/Bcc but not as a recipient here, and Microsoft Graph sends to every address in those fields',
    );
    expect(graph.sent).toHaveLength(1);
  });

  test('the envelope against the header fields: UTF-8 addresses, "To :", one merged Bcc field', () => {
    const mime = (header: string) => Buffer.from(`${header}Subject: x\r\n\r\nbody\r\n`, 'utf8');
    const bytes = (r: ReturnType<typeof withEnvelopeRecipients>) => ('mime' in r ? r.mime.toString('utf8') : r);
    expect(bytes(withEnvelopeRecipients(mime('To: <jürgen@bücher.test>\r\n'), ['jürgen@bücher.test', '用户@例子.test']))).toBe(
      'Bcc: 用户@例子.test\r\nTo: <jürgen@bücher.test>\r\nSubject: x\r\n\r\nbody\r\n',
    );
    expect(withEnvelopeRecipients(mime('To : <stranger@x.test>\r\n'), ['a@x.test'])).toEqual({ stranger: 'stranger@x.test' });
    expect(bytes(withEnvelopeRecipients(mime('To: a@x.test\r\nBcc: b@x.test,\r\n c@x.test\r\n'), ['a@x.test', 'b@x.test', 'c@x.test', 'd@x.test']))).toBe(
      'Bcc: b@x.test, c@x.test, d@x.test\r\nTo: a@x.test\r\nSubject: x\r\n\r\nbody\r\n',
    );
    // Nothing to add: the bytes are the queued ones, 8-bit header bytes included.
    const latin = Buffer.concat([Buffer.from('To: a@x.test\r\nSubject: '), Buffer.from([0xe9]), Buffer.from('\r\n\r\nx\r\n')]);
    expect(withEnvelopeRecipients(latin, ['a@x.test'])).toEqual({ mime: latin });
  });

  test('SendAsDenied over Graph: that message waits with the fix logged, the mailbox is not held', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph, { mailbox: PRINTER }));
    const denied = await h.enqueue({ sender: 'ceo@contoso.com', recipients: ['x@fabrikam.test'], body: 'From: <ceo@contoso.com>\r\nTo: <x@fabrikam.test>\r\n\r\nx\r\n' });
    const r = recipient(await settled(h, denied), 'x@fabrikam.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toMatch(/^4\.7\.0 Microsoft Graph answered 403 ErrorSendAsDenied: /);
    expect(h.logs.find((l) => l.event === 'upstream_send_as_denied')!.msg).toContain(`-Trustee ${PRINTER} -AccessRights SendAs`);
    const ok = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, ok), 'y@fabrikam.test').state).toBe('delivered');
  });

  test('a 30 MB message: a draft, its attachment through an upload session in chunks, then send; every byte arrives', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph));
    const attachment = Buffer.alloc(30 * 1024 * 1024);
    for (let i = 0; i < attachment.length; i += 4096) attachment.writeUInt32BE((i * 2654435761) >>> 0, i);
    const mime = await new Promise<Buffer>((resolve, reject) =>
      new MailComposer({
        from: PRINTER,
        to: 'boss@fabrikam.test',
        subject: 'big scan',
        text: 'The scan is attached.',
        headers: { 'X-Scanner-Job': '4711', 'Auto-Submitted': 'auto-generated' },
        attachments: [{ filename: 'scan.pdf', contentType: 'application/pdf', content: attachment }],
      })
        .compile()
        .build((err, message) => (err ? reject(err) : resolve(message))),
    );
    const id = await h.enqueue({ sender: PRINTER, recipients: ['boss@fabrikam.test'], body: mime.toString('latin1') });
    expect(recipient(await settled(h, id, 30_000), 'boss@fabrikam.test').state).toBe('delivered');
    expect(graph.sent).toHaveLength(1);
    const sent = graph.sent[0]!;
    expect(sent).toMatchObject({ via: 'draft', mailbox: PRINTER, to: ['boss@fabrikam.test'] });
    expect(sent.attachments.map((a) => [a.name, a.contentType, a.via, a.bytes.length])).toEqual([['scan.pdf', 'application/pdf', 'uploadSession', attachment.length]]);
    expect(sent.attachments[0]!.bytes.equals(attachment)).toBe(true);
    expect(sent.mime.toString('utf8')).toContain('The scan is attached.');
    // The draft is rebuilt from the parsed message: the other header fields come along.
    expect(sent.mime.toString('utf8')).toMatch(/^X-Scanner-Job: 4711\r$/m);
    expect(sent.mime.toString('utf8')).toMatch(/^Auto-Submitted: auto-generated\r$/m);
    expect(graph.drafts).toHaveLength(0);
    expect(graph.requests.filter((r) => r.operation === 'upload').length).toBe(Math.ceil(attachment.length / (10 * 320 * 1024)));
  });

  test('without Mail.ReadWrite a large message waits (logged with the permission to add), small ones still go', async () => {
    const graph = await startGraph({ appPermissions: { [CLIENT_ID]: ['Mail.Send'] } });
    const h = await harness(graphUpstream(graph));
    const mime = await new Promise<Buffer>((resolve, reject) =>
      new MailComposer({ from: PRINTER, to: 'boss@fabrikam.test', subject: 'big', text: 'x', attachments: [{ filename: 'a.bin', content: Buffer.alloc(4 * 1024 * 1024, 7) }] })
        .compile()
        .build((err, message) => (err ? reject(err) : resolve(message))),
    );
    const big = await h.enqueue({ sender: PRINTER, recipients: ['boss@fabrikam.test'], body: mime.toString('latin1') });
    expect(recipient(await settled(h, big), 'boss@fabrikam.test')).toMatchObject({ state: 'deferred' });
    expect(h.logs.find((l) => l.event === 'upstream_graph_large_denied')!.msg).toContain('Mail.ReadWrite');
    expect(graph.drafts).toHaveLength(0);
    const small = await h.enqueue({ sender: PRINTER, recipients: ['boss@fabrikam.test'] });
    expect(recipient(await settled(h, small), 'boss@fabrikam.test').state).toBe('delivered');
  });

  test('429 with Retry-After: deferred until then, and the mailbox waits with it', async () => {
    const graph = await startGraph();
    graph.script({ status: 429, code: 'ApplicationThrottled', message: 'Application is over its MailboxConcurrency limit.', retryAfterSeconds: 120 });
    const h = await harness(graphUpstream(graph));
    const started = Date.now();
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const r = recipient(await settled(h, id), 'x@fabrikam.test');
    expect(r).toMatchObject({ state: 'deferred', attempts: 1 });
    expect(r.lastResponse).toMatch(/^4\.7\.0 Microsoft Graph answered 429 ApplicationThrottled: /);
    expect(r.nextAttemptAt).toBeGreaterThanOrEqual(started + 120_000);
    const next = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, next), 'y@fabrikam.test')).toMatchObject({ state: 'deferred', nextAttemptAt: r.nextAttemptAt });
    expect(graph.sent).toHaveLength(0);
  });

  test('413: a request over Graph\'s 4 MB goes through a draft instead; too big that way too, it bounces', async () => {
    const graph = await startGraph();
    graph.script({ status: 413, code: 'RequestEntityTooLarge', message: 'The maximum request length supported is 4MB.', path: 'sendMail' });
    const h = await harness(graphUpstream(graph, { mailbox: PRINTER }));
    const a = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, a), 'x@fabrikam.test').state).toBe('delivered');
    expect(graph.sent[0]).toMatchObject({ via: 'draft' });
    graph.script({ status: 413, code: 'RequestEntityTooLarge', message: 'The maximum request length supported is 4MB.', path: 'sendMail' });
    graph.script({ status: 413, code: 'ErrorMessageSizeExceeded', message: 'The message exceeds the maximum supported size.', path: 'messages' });
    const b = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    const r = recipient(await settled(h, b), 'y@fabrikam.test');
    expect(r.state).toBe('failed');
    expect(r.lastResponse).toBe('5.3.4 Microsoft Graph answered 413 ErrorMessageSizeExceeded: The message exceeds the maximum supported size.');
  });

  test('403 without Mail.Send: deferred, the upstream held, the permission named', async () => {
    const graph = await startGraph({ appPermissions: { [CLIENT_ID]: [] } });
    const h = await harness(graphUpstream(graph));
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    const r = recipient(await settled(h, id), 'x@fabrikam.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toMatch(/^4\.7\.0 Microsoft Graph answered 403 ErrorAccessDenied: /);
    const line = h.logs.find((l) => l.event === 'upstream_graph_access_denied')!;
    expect(line).toMatchObject({ holdMs: 60_000 });
    expect(line.msg).toContain('Mail.Send');
    const requests = graph.requests.length;
    const other = await h.enqueue({ sender: SCANNER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, other), 'y@fabrikam.test').state).toBe('deferred');
    expect(graph.requests.length).toBe(requests);
  });

  test('404 for a mailbox Graph does not know: that mailbox held, the others go', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph));
    const id = await h.enqueue({ sender: 'ghost@contoso.com', recipients: ['x@fabrikam.test'], body: 'From: <ghost@contoso.com>\r\nTo: <x@fabrikam.test>\r\n\r\nx\r\n' });
    expect(recipient(await settled(h, id), 'x@fabrikam.test').state).toBe('deferred');
    expect(h.logs.find((l) => l.event === 'upstream_graph_mailbox_not_found')).toMatchObject({ mailbox: 'ghost@contoso.com' });
    const other = await h.enqueue({ sender: PRINTER, recipients: ['y@fabrikam.test'] });
    expect(recipient(await settled(h, other), 'y@fabrikam.test').state).toBe('delivered');
  });

  test('a token Graph refuses (401) is renewed once and the message goes', async () => {
    const graph = await startGraph();
    const h = await harness(graphUpstream(graph));
    await settled(h, await h.enqueue({ sender: PRINTER, recipients: ['a@fabrikam.test'] }));
    identity.expireAllTokens();
    const id = await h.enqueue({ sender: PRINTER, recipients: ['b@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'b@fabrikam.test').state).toBe('delivered');
    expect(graph.requests.filter((r) => r.status === 401)).toHaveLength(1);
    expect(problemLines(h)).toEqual([]);
  });

  test('a burst keeps to 4 requests at once per mailbox: none throttled, none lost', async () => {
    const graph = await startGraph();
    graph.delayMs = 60;
    const h = await harness(graphUpstream(graph));
    const ids = await Promise.all(Array.from({ length: 16 }, (_, i) => h.enqueue({ sender: PRINTER, recipients: [`r${i}@fabrikam.test`] })));
    for (const id of ids) expect((await settled(h, id, 20_000)).recipients[0]!.state).toBe('delivered');
    expect(graph.sent).toHaveLength(16);
    expect(graph.maxConcurrent[PRINTER]).toBeLessThanOrEqual(4);
    expect(graph.violations).toMatchObject({ concurrency: 0, requests: 0 });
  });

  test('Graph as the fallback of SMTP: a tenant without SMTP AUTH still sends', async () => {
    const exchange = await startExchange();
    exchange.disableTenantSmtpAuth();
    const graph = await startGraph();
    const h = await setup({
      config: { upstream: [m365(exchange, { fallback: 'm365-graph' }), { ...graphUpstream(graph), name: 'm365-graph' }], upstream_route: [{ upstream: 'm365', default: true }] } as never,
    });
    const id = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, id), 'x@fabrikam.test').state).toBe('delivered');
    expect(graph.sent).toHaveLength(1);
    expect(exchange.messages).toHaveLength(0);
  });
});

describe('fallback', () => {
  async function startIsp() {
    const isp = await UpstreamServer.start({ users: { 'relay@isp.test': 'isp-password' }, certificate: tls });
    afterRunner(() => isp.close());
    fs.writeFileSync(path.join(files, 'isp.pass'), 'isp-password\n', { mode: 0o600 });
    return {
      isp,
      upstream: {
        name: 'isp',
        type: 'smtp' as const,
        host: '127.0.0.1',
        port: isp.port,
        username: 'relay@isp.test',
        password_file: path.join(files, 'isp.pass'),
        ca_file: path.join(files, 'ca.pem'),
      },
    };
  }

  async function withFallback(exchange: Office365SmtpStandIn, isp: Record<string, unknown>): Promise<Harness> {
    return setup({ config: { upstream: [m365(exchange, { fallback: 'isp' }), isp], upstream_route: [{ upstream: 'm365', default: true }] } as never });
  }

  test('SMTP AUTH switched off for the tenant: the mail goes through the fallback, and the hold sends the next one there at once', async () => {
    const exchange = await startExchange();
    exchange.disableTenantSmtpAuth();
    const { isp, upstream } = await startIsp();
    const h = await withFallback(exchange, upstream);
    const a = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test', 'y@fabrikam.test'] });
    expect((await settled(h, a)).recipients.map((r) => r.state)).toEqual(['delivered', 'delivered']);
    expect(isp.messages).toHaveLength(1);
    expect(isp.messages[0]).toMatchObject({ from: PRINTER, to: ['x@fabrikam.test', 'y@fabrikam.test'] });
    expect(h.logs.find((l) => l.event === 'upstream_fallback')).toMatchObject({ queueId: a, fallback: 'isp', problem: 'smtp_auth_disabled', recipients: 2 });
    const loginsBefore = exchange.logins.length;
    const b = await h.enqueue({ sender: SCANNER, recipients: ['z@fabrikam.test'] });
    expect(recipient(await settled(h, b), 'z@fabrikam.test').state).toBe('delivered');
    // The tenant-wide hold: Exchange was not asked again.
    expect(exchange.logins.length).toBe(loginsBefore);
    expect(isp.messages).toHaveLength(2);
  });

  test('what the fallback cannot fix stays with the primary: a refused recipient bounces, a throttled one waits', async () => {
    const exchange = await startExchange();
    exchange.script({ at: 'rcpt', code: 550, message: '5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup' });
    const { isp, upstream } = await startIsp();
    const h = await withFallback(exchange, upstream);
    const a = await h.enqueue({ sender: PRINTER, recipients: ['nobody@contoso.com'] });
    expect(recipient(await settled(h, a), 'nobody@contoso.com')).toMatchObject({ state: 'failed', lastCode: 550 });
    exchange.script({ at: 'data', code: 432, message: '4.3.2 Concurrent connections limit exceeded.' });
    const b = await h.enqueue({ sender: PRINTER, recipients: ['x@fabrikam.test'] });
    expect(recipient(await settled(h, b), 'x@fabrikam.test')).toMatchObject({ state: 'deferred', lastCode: 432 });
    // Only the bounce for nobody@ went to the fallback: Postern's null sender has no mailbox in
    // the tenant (no `mailbox` set), which the fallback can fix.
    expect(h.logs.filter((l) => l.event === 'upstream_fallback' && (l.queueId === a || l.queueId === b))).toEqual([]);
    expect(h.logs.filter((l) => l.event === 'upstream_fallback').map((l) => l.problem)).toEqual(['no_mailbox']);
    await waitFor(() => isp.messages.length > 0 || undefined);
    expect(isp.messages.map((m) => [m.from, m.to])).toEqual([['', [PRINTER]]]);
  });

  test('configuration: the fallback must exist and must not lead back', () => {
    const u = (name: string, fallback?: string) =>
      `[[upstream]]\nname = "${name}"\ntype = "smtp"\nhost = "h"\n${fallback ? `fallback = "${fallback}"\n` : ''}`;
    const problems = (text: string): string[] => {
      try {
        parseConfigText(text, '/etc/postern/postern.toml');
        return [];
      } catch (err) {
        if (err instanceof ConfigError) return err.problems;
        throw err;
      }
    };
    expect(problems(u('a', 'nope'))).toEqual(['upstream[0].fallback: no [[upstream]] is named "nope" (defined: "a")']);
    expect(problems(u('a', 'b') + u('b', 'a'))).toEqual([
      'upstream[0].fallback: the fallbacks of "a" lead back to "a": a fallback must not come round again',
      'upstream[1].fallback: the fallbacks of "b" lead back to "b": a fallback must not come round again',
    ]);
    expect(problems(u('a', 'a'))).toEqual(['upstream[0].fallback: the fallbacks of "a" lead back to "a": a fallback must not come round again']);
    expect(problems(u('a', 'b') + u('b'))).toEqual([]);
  });
});

describe('sending limits', () => {
  test('a burst over 30 a minute leaves at the limit: none fails, none over the limit at Microsoft, each waits in the log', async () => {
    // time_scale 0.01: "a minute" is 600 ms at both ends, so the test takes seconds, not minutes.
    const exchange = await startExchange({ limits: { messagesPerWindow: 5, windowMs: 600 } });
    const h = await harness(m365(exchange, { limits: { messages_per_minute: 5, time_scale: 0.01 } }));
    const ids = await Promise.all(Array.from({ length: 20 }, (_, i) => h.enqueue({ sender: PRINTER, recipients: [`r${i}@fabrikam.test`] })));
    for (const id of ids) {
      const m = await settled(h, id, 30_000);
      expect(m.recipients[0]).toMatchObject({ state: 'delivered', attempts: 1 });
    }
    expect(exchange.messages).toHaveLength(20);
    expect(exchange.violations).toEqual({ connections: 0, messages: 0, recipients: 0 });
    const waiting = h.logs.filter((l) => l.event === 'waiting');
    expect(waiting.length).toBeGreaterThanOrEqual(15);
    expect(String(waiting[0]!.response)).toMatch(/^4\.7\.0 Waiting for upstream m365: printer@contoso\.com may send 5 messages a minute; next try at /);
    // At the limit, not slower: 20 messages at 5 per 612 ms need at least 3 windows, and well under 6.
    const times = exchange.messages.map((m) => m.receivedAt).sort((a, b) => a - b);
    const span = times.at(-1)! - times[0]!;
    expect(span).toBeGreaterThanOrEqual(3 * 600);
    expect(span).toBeLessThan(6 * 612);
  });

  test('at 80% of the daily recipients an alert is stored, once', async () => {
    const exchange = await startExchange();
    const h = await harness(m365(exchange, { limits: { recipients_per_day: 10 } }));
    for (let i = 0; i < 9; i++) await settled(h, await h.enqueue({ sender: PRINTER, recipients: [`r${i}@fabrikam.test`] }));
    const budget = (await h.store.listSecurityEvents()).filter((e) => e.kind === 'upstream_budget');
    expect(budget).toHaveLength(1);
    expect(budget[0]).toMatchObject({ account: PRINTER, detail: { upstream: 'm365', used: 8, limit: 10, unit: 'recipients' } });
    expect(budget[0]!.detail.message).toContain('has used 8 of 10 recipients a day');
  });
});

describe('Google Workspace over SMTP (XOAUTH2, service account)', () => {
  const SA = 'postern-relay@project.iam.gserviceaccount.com';

  async function startGmail(delegated: string[] | '*') {
    const key = IdentityStandIn.makeServiceAccountKey(SA, identity.googleTokenUrl);
    identity.registerServiceAccount({ clientEmail: SA, publicKeyPem: key.publicKeyPem, privateKeyId: key.privateKeyId, delegatedMailboxes: delegated });
    const keyFile = path.join(tempDir('postern-google-'), 'sa.json');
    fs.writeFileSync(keyFile, key.json, { mode: 0o600 });
    const gmail = new GmailSmtpStandIn({ certificate: tls, identity });
    await gmail.start();
    afterRunner(() => gmail.close());
    const upstream = {
      name: 'gmail',
      type: 'google' as const,
      service_account_file: keyFile,
      smtp: `127.0.0.1:${gmail.port}`,
      ca_file: path.join(files, 'ca.pem'),
    };
    return { gmail, upstream, key };
  }

  test('delivers as each mailbox with a delegated token per mailbox', async () => {
    const { gmail, upstream, key } = await startGmail('*');
    const h = await harness(upstream);
    const before = identity.requests.filter((r) => r.provider === 'google').length;
    const a = await h.enqueue({ sender: 'alice@example.com', recipients: ['x@far.test'] });
    const b = await h.enqueue({ sender: 'bob@example.com', recipients: ['y@far.test'] });
    for (const id of [a, b]) expect((await settled(h, id)).recipients[0]!.state).toBe('delivered');
    expect(gmail.messages.map((m) => m.mailbox).sort()).toEqual(['alice@example.com', 'bob@example.com']);
    const requests = identity.requests.filter((r) => r.provider === 'google').slice(before);
    expect(requests.map((r) => r.sub).sort()).toEqual(['alice@example.com', 'bob@example.com']);
    expect(requests.every((r) => r.status === 200)).toBe(true);
    const privateKey = (JSON.parse(key.json) as { private_key: string }).private_key;
    await expectNoSecrets(h, [a, b], [privateKey.split('\n')[1]!]);
  });

  test('a mailbox without domain-wide delegation: token refused, that mailbox held with the Admin console step, the others go on', async () => {
    const { gmail, upstream } = await startGmail(['alice@example.com']);
    const h = await harness(upstream);
    const id = await h.enqueue({ sender: 'mallory@example.com', recipients: ['x@far.test'] });
    const r = recipient(await settled(h, id), 'x@far.test');
    expect(r.state).toBe('deferred');
    expect(r.lastResponse).toMatch(/^4\.7\.0 Cannot get an access token for upstream gmail: the token endpoint refused Postern's credentials: unauthorized_client: .*Domain-wide delegation/);
    expect(h.logs.find((l) => l.event === 'upstream_token_refused')).toMatchObject({ mailbox: 'mallory@example.com' });
    const alice = await h.enqueue({ sender: 'alice@example.com', recipients: ['y@far.test'] });
    expect(recipient(await settled(h, alice), 'y@far.test').state).toBe('delivered');
    expect(gmail.messages.map((m) => m.mailbox)).toEqual(['alice@example.com']);
  });
});

describe('configuration', () => {
  const base = `[[upstream]]\nname = "m365"\ntype = "microsoft365"\ntenant = "${TENANT}"\nclient_id = "${CLIENT_ID}"\n`;
  const problems = (text: string): string[] => {
    try {
      parseConfigText(text, '/etc/postern/postern.toml');
      return [];
    } catch (err) {
      if (err instanceof ConfigError) return err.problems;
      throw err;
    }
  };

  test('credentials: one way, never inline', () => {
    expect(problems(base)).toEqual(['upstream[0].client_secret_file: set client_secret_file, client_secret_env, or certificate_file with private_key_file']);
    expect(problems(`${base}client_secret = "${SECRET}"\n`)).toEqual([
      'upstream[0].client_secret: a client secret is never written in the configuration file: put it in a file readable only by Postern and set client_secret_file = "secrets/NAME.secret", or set client_secret_env = "VARIABLE"',
    ]);
    expect(problems(`${base}client_secret = "${SECRET}"\n`).join('')).not.toContain(SECRET);
    expect(problems(`${base}client_secret_file = "a"\ncertificate_file = "b"\nprivate_key_file = "c"\n`)).toEqual([
      'upstream[0].client_secret_file: set one of client_secret_file, client_secret_env or certificate_file',
    ]);
    expect(problems(`${base}certificate_file = "b"\n`)).toEqual(['upstream[0].private_key_file: certificate_file and private_key_file go together (they may name the same PEM file)']);
    expect(problems(`${base}client_secret_file = "a"\nauthority = "http://login.example"\n`)).toEqual([
      'upstream[0].authority: expected an https:// URL (credentials are only sent over TLS)',
    ]);
  });

  test('certificates are always verified: the token could send as every mailbox', () => {
    expect(problems(`${base}client_secret_file = "s"\nverify_certificate = false\n`)).toEqual([
      'upstream[0].verify_certificate: an OAuth2 upstream always verifies certificates: its access token could send as every mailbox the app may use; for a private CA or a stand-in set ca_file',
    ]);
  });

  test('the defaults are Exchange Online\'s', () => {
    const config = parseConfigText(`${base}client_secret_file = "s"\n`, '/etc/postern/postern.toml');
    expect(config.upstream[0]).toMatchObject({
      method: 'smtp',
      authority: 'https://login.microsoftonline.com',
      smtp: { host: 'smtp.office365.com', port: 587 },
      limits: { messages_per_minute: 30, recipients_per_day: 10_000, connections: 3, time_scale: 1 },
      client_secret_file: '/etc/postern/s',
    });
  });

  test('a secret file that cannot be read stops start-up, naming the upstream and the file', async () => {
    const exchange = await startExchange();
    await expect(harness(m365(exchange, { client_secret_file: path.join(files, 'missing.secret') }))).rejects.toThrow(ConfigError);
    try {
      await harness(m365(exchange, { client_secret_file: path.join(files, 'missing.secret') }));
    } catch (err) {
      expect((err as ConfigError).problems).toEqual([`upstream "m365": cannot read client_secret_file ${path.join(files, 'missing.secret')}: no such file (ENOENT)`]);
    }
  });
});
