// The stand-ins for Microsoft's and Google's cloud endpoints (src/standins/), checked with real
// clients over loopback: token requests over HTTPS as Postern makes them (client secret,
// certificate assertion signed with jose, service-account JWT), and nodemailer or a line-level
// client against the SMTP stand-ins. These stand-ins are what Postern's OAuth upstreams are tested
// against, so each documented reply they give is pinned here.
import { createHash, createPrivateKey, generateKeyPairSync, randomUUID, X509Certificate } from 'node:crypto';
import https from 'node:https';
import { SignJWT } from 'jose';
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { GmailSmtpStandIn } from '../src/standins/gmail-smtp.js';
import { IdentityStandIn, type ServiceAccountKey } from '../src/standins/identity-platform.js';
import { Office365SmtpStandIn, type Office365SmtpStandInOptions } from '../src/standins/office365-smtp.js';
import { makeAppCertificate, makeStandInTls, type StandInTls } from '../src/standins/standin-certificates.js';
import { RawSmtp } from './helpers/raw-smtp.js';

const TENANT = 'contoso.onmicrosoft.com';
const TENANT_ID = randomUUID();
const SECRET_APP = randomUUID();
const SECRET = 'Qx~8Q~standin-secret-value';
const CERT_APP = randomUUID();
const OUTLOOK_SCOPE = 'https://outlook.office365.com/.default';
const MAILBOX = 'relay@contoso.com';
const SERVICE_ACCOUNT = 'postern-relay@postern-test.iam.gserviceaccount.com';
const GMAIL_USER = 'alerts@example.org';
const AAD_DESCRIPTION = /^AADSTS\d+: .+\r\nTrace ID: [0-9a-f-]{36}\r\nCorrelation ID: [0-9a-f-]{36}\r\nTimestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$/s;

let standinTls: StandInTls;
let appCertificate: { cert: string; key: string };
let serviceKey: ServiceAccountKey;
let identity: IdentityStandIn;
let office: Office365SmtpStandIn;
let gmail: GmailSmtpStandIn;
const closers: (() => Promise<void>)[] = [];

beforeAll(async () => {
  standinTls = await makeStandInTls();
  appCertificate = await makeAppCertificate();
  identity = new IdentityStandIn({ certificate: standinTls });
  await identity.start();
  closers.push(() => identity.close());
  identity.registerApp({ tenant: TENANT, tenantId: TENANT_ID, clientId: SECRET_APP, clientSecret: SECRET });
  identity.registerApp({ tenant: TENANT, clientId: CERT_APP, certificatePem: appCertificate.cert });
  serviceKey = IdentityStandIn.makeServiceAccountKey(SERVICE_ACCOUNT, identity.googleTokenUrl);
  identity.registerServiceAccount({
    clientEmail: SERVICE_ACCOUNT,
    publicKeyPem: serviceKey.publicKeyPem,
    privateKeyId: serviceKey.privateKeyId,
    delegatedMailboxes: [GMAIL_USER],
  });
  office = await startOffice();
  gmail = new GmailSmtpStandIn({ certificate: standinTls, identity });
  await gmail.start();
  closers.push(() => gmail.close());
});

afterAll(async () => {
  for (const close of closers.reverse()) await close();
});

async function startOffice(options: Partial<Office365SmtpStandInOptions> = {}): Promise<Office365SmtpStandIn> {
  const standIn = new Office365SmtpStandIn({
    certificate: standinTls,
    identity,
    mailboxes: [MAILBOX, 'printer@contoso.com'],
    sendAs: { [MAILBOX]: ['noreply@contoso.com'] },
    ...options,
  });
  await standIn.start();
  closers.push(() => standIn.close());
  return standIn;
}

interface HttpAnswer {
  status: number;
  json: Record<string, any>;
}

function postForm(url: string, form: Record<string, string>, headers: Record<string, string> = {}): Promise<HttpAnswer> {
  const body = new URLSearchParams(form).toString();
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method: 'POST',
        ca: standinTls.ca,
        headers: { 'Content-Type': 'application/x-www-form-urlencoded', 'Content-Length': Buffer.byteLength(body), ...headers },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text || '{}') as Record<string, any> }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const msTokenUrl = (tenant = TENANT) => identity.microsoftTokenUrl(tenant);

async function secretToken(scope = OUTLOOK_SCOPE): Promise<string> {
  const answer = await postForm(msTokenUrl(), { grant_type: 'client_credentials', client_id: SECRET_APP, client_secret: SECRET, scope });
  expect(answer.status).toBe(200);
  return answer.json.access_token as string;
}

/** The client assertion certificate-credentials documents (PS256, x5t#S256), with overrides. */
async function clientAssertion(
  overrides: { alg?: 'PS256' | 'RS256'; key?: string; cert?: string; aud?: string; iss?: string; exp?: number; thumbprint?: 'x5t' | 'x5t#S256' } = {},
): Promise<string> {
  const der = new X509Certificate(overrides.cert ?? appCertificate.cert).raw;
  const kind = overrides.thumbprint ?? 'x5t#S256';
  const thumbprint = createHash(kind === 'x5t' ? 'sha1' : 'sha256').update(der).digest('base64url');
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({})
    .setProtectedHeader({ alg: overrides.alg ?? 'PS256', typ: 'JWT', [kind]: thumbprint })
    .setAudience(overrides.aud ?? msTokenUrl())
    .setIssuer(overrides.iss ?? CERT_APP)
    .setSubject(overrides.iss ?? CERT_APP)
    .setJti(randomUUID())
    .setNotBefore(now)
    .setIssuedAt(now)
    .setExpirationTime(overrides.exp ?? now + 600)
    .sign(createPrivateKey(overrides.key ?? appCertificate.key));
}

function assertionForm(assertion: string, scope = OUTLOOK_SCOPE): Record<string, string> {
  return {
    grant_type: 'client_credentials',
    client_id: CERT_APP,
    scope,
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    client_assertion: assertion,
  };
}

/** A service-account JWT as Google's client libraries make it, with overrides. */
async function googleAssertion(overrides: { sub?: string | null; scope?: string; aud?: string; iss?: string; lifetime?: number; key?: string; kid?: string } = {}): Promise<string> {
  const key = JSON.parse(serviceKey.json) as { private_key: string; private_key_id: string; client_email: string; token_uri: string };
  const now = Math.floor(Date.now() / 1000);
  const jwt = new SignJWT({ scope: overrides.scope ?? 'https://mail.google.com/' })
    .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid: overrides.kid ?? key.private_key_id })
    .setIssuer(overrides.iss ?? key.client_email)
    .setAudience(overrides.aud ?? key.token_uri)
    .setIssuedAt(now)
    .setExpirationTime(now + (overrides.lifetime ?? 3600));
  if (overrides.sub !== null) jwt.setSubject(overrides.sub ?? GMAIL_USER);
  return jwt.sign(createPrivateKey(overrides.key ?? key.private_key));
}

async function googleToken(sub = GMAIL_USER): Promise<string> {
  const answer = await postForm(identity.googleTokenUrl, { grant_type: 'urn:ietf:params:oauth:grant-type:jwt-bearer', assertion: await googleAssertion({ sub }) });
  expect(answer.status).toBe(200);
  return answer.json.access_token as string;
}

function officeTransport(auth: { user: string; accessToken?: string; pass?: string }, standIn = office, extra: Record<string, unknown> = {}) {
  return nodemailer.createTransport({
    host: '127.0.0.1',
    port: standIn.port,
    secure: false,
    requireTLS: true,
    tls: { ca: standinTls.ca },
    auth: auth.accessToken !== undefined ? { type: 'OAuth2', user: auth.user, accessToken: auth.accessToken } : { user: auth.user, pass: auth.pass ?? '' },
    ...extra,
  } as Parameters<typeof nodemailer.createTransport>[0]);
}

function mail(from: string, to: string | string[], subject = 'stand-in test') {
  return { from, to, subject, text: 'Sent through a stand-in.\r\n' };
}

async function failure(promise: Promise<unknown>): Promise<{ responseCode?: number; response?: string; message: string }> {
  try {
    await promise;
  } catch (err) {
    return err as { responseCode?: number; response?: string; message: string };
  }
  throw new Error('expected a failure');
}

describe('identity stand-in: Microsoft client credentials', () => {
  test('a client secret gets a bearer token for Exchange Online, which Graph would not take', async () => {
    const answer = await postForm(msTokenUrl(), { grant_type: 'client_credentials', client_id: SECRET_APP, client_secret: SECRET, scope: OUTLOOK_SCOPE });
    expect(answer.status).toBe(200);
    expect(answer.json).toMatchObject({ token_type: 'Bearer', expires_in: 3599, ext_expires_in: 3599 });
    expect(answer.json.access_token).toMatch(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/);
    const claims = JSON.parse(Buffer.from((answer.json.access_token as string).split('.')[1]!, 'base64url').toString());
    expect(claims).toMatchObject({ aud: 'https://outlook.office365.com', appid: SECRET_APP, tid: TENANT_ID });
    expect(identity.verifyToken(answer.json.access_token, { resource: 'outlook' })).toMatchObject({ ok: true, appId: SECRET_APP, tenantId: TENANT_ID });
    expect(identity.verifyToken(answer.json.access_token, { resource: 'graph' })).toEqual({ ok: false, reason: 'wrong_resource' });
    expect(identity.verifyToken('not-a-token', { resource: 'outlook' })).toEqual({ ok: false, reason: 'unknown' });
  });

  test('the tenant may be named by its id, and the secret may come as HTTP Basic', async () => {
    const basic = Buffer.from(`${encodeURIComponent(SECRET_APP)}:${encodeURIComponent(SECRET)}`).toString('base64');
    const answer = await postForm(msTokenUrl(TENANT_ID), { grant_type: 'client_credentials', scope: OUTLOOK_SCOPE }, { Authorization: `Basic ${basic}` });
    expect(answer.status).toBe(200);
  });

  test('a certificate assertion (PS256 with x5t#S256, or RS256 with x5t) gets a token', async () => {
    const ps256 = await postForm(msTokenUrl(), assertionForm(await clientAssertion()));
    expect(ps256.status).toBe(200);
    expect(identity.verifyToken(ps256.json.access_token, { resource: 'outlook' })).toMatchObject({ ok: true, appId: CERT_APP });
    const rs256 = await postForm(msTokenUrl(TENANT_ID), assertionForm(await clientAssertion({ alg: 'RS256', thumbprint: 'x5t', aud: msTokenUrl(TENANT_ID) })));
    expect(rs256.status).toBe(200);
    expect(identity.requests.at(-1)).toMatchObject({ provider: 'microsoft', clientId: CERT_APP, credential: 'assertion', status: 200 });
  });

  test('a wrong secret gets 401 invalid_client AADSTS7000215 in Entra error shape', async () => {
    const answer = await postForm(msTokenUrl(), { grant_type: 'client_credentials', client_id: SECRET_APP, client_secret: 'the-secret-id-not-its-value', scope: OUTLOOK_SCOPE });
    expect(answer.status).toBe(401);
    expect(answer.json).toMatchObject({ error: 'invalid_client', error_codes: [7000215] });
    expect(answer.json.error_description).toMatch(AAD_DESCRIPTION);
    expect(answer.json.error_description).toContain(
      'AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID',
    );
    expect(answer.json.timestamp).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$/);
    expect(answer.json.trace_id).toMatch(/^[0-9a-f-]{36}$/);
    expect(answer.json.correlation_id).toMatch(/^[0-9a-f-]{36}$/);
  });

  test.each([
    ['an unknown tenant', { tenant: 'fabrikam.onmicrosoft.com' }, 400, 'invalid_request', 90002],
    ['an unknown app', { client_id: randomUUID() }, 400, 'unauthorized_client', 700016],
    ['a scope without /.default', { scope: 'https://outlook.office365.com/SMTP.SendAsApp' }, 400, 'invalid_scope', 1002012],
    ['a resource that is not Exchange or Graph', { scope: 'https://example.com/.default' }, 400, 'invalid_scope', 70011],
    ['the password grant', { grant_type: 'password' }, 400, 'unsupported_grant_type', 70003],
    ['no credential at all', { client_secret: undefined }, 401, 'invalid_client', 7000218],
  ])('%s is refused as Entra refuses it', async (_what, change: Record<string, string | undefined>, status, error, code) => {
    const { tenant, ...fields } = change;
    const form: Record<string, string> = {};
    for (const [k, v] of Object.entries({ grant_type: 'client_credentials', client_id: SECRET_APP, client_secret: SECRET, scope: OUTLOOK_SCOPE, ...fields })) {
      if (v !== undefined) form[k] = v;
    }
    const answer = await postForm(msTokenUrl(tenant ?? TENANT), form);
    expect(answer.status).toBe(status);
    expect(answer.json).toMatchObject({ error, error_codes: [code] });
    expect(answer.json.error_description).toMatch(AAD_DESCRIPTION);
  });

  test('assertions that fail the certificate-credentials rules are refused', async () => {
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const otherCert = (await makeAppCertificate('not uploaded')).cert;
    const cases: [Promise<string>, number, RegExp][] = [
      [clientAssertion({ key: other }), 700027, /invalid signature\. \[Reason - The provided signature value did not match/],
      [clientAssertion({ cert: otherCert }), 700027, /invalid signature\. \[Reason - The key was not found\./],
      [clientAssertion({ aud: 'https://login.microsoftonline.com/common/oauth2/v2.0/token' }), 700023, /audience claim does not match/],
      [clientAssertion({ iss: SECRET_APP }), 700021, /application identifier doesn't match 'client_id'/],
      [clientAssertion({ exp: Math.floor(Date.now() / 1000) - 3600 }), 700024, /not within its valid time range/],
    ];
    for (const [assertion, code, text] of cases) {
      const answer = await postForm(msTokenUrl(), assertionForm(await assertion));
      expect(answer.status, `AADSTS${code}`).toBe(401);
      expect(answer.json).toMatchObject({ error: 'invalid_client', error_codes: [code] });
      expect(answer.json.error_description).toMatch(text);
    }
  });

  test('a new secret replaces the old one; a deleted app gets no new tokens but its tokens last', async () => {
    const app = randomUUID();
    identity.registerApp({ tenant: TENANT, clientId: app, clientSecret: 'first' });
    const form = (secret: string) => ({ grant_type: 'client_credentials', client_id: app, client_secret: secret, scope: OUTLOOK_SCOPE });
    const token = (await postForm(msTokenUrl(), form('first'))).json.access_token as string;
    identity.setClientSecret(app, 'second');
    expect((await postForm(msTokenUrl(), form('first'))).json.error_codes).toEqual([7000215]);
    expect((await postForm(msTokenUrl(), form('second'))).status).toBe(200);
    identity.revokeApp(app);
    expect((await postForm(msTokenUrl(), form('second'))).json.error_codes).toEqual([700016]);
    expect(identity.verifyToken(token, { resource: 'outlook' }).ok).toBe(true);
  });

  test('failNext answers with a chosen status and body; delayMs slows answers; requests are recorded', async () => {
    const before = identity.requests.length;
    identity.failNext(2, 503, { error: 'temporarily_unavailable' });
    const form = { grant_type: 'client_credentials', client_id: SECRET_APP, client_secret: SECRET, scope: OUTLOOK_SCOPE };
    expect(await postForm(msTokenUrl(), form)).toEqual({ status: 503, json: { error: 'temporarily_unavailable' } });
    expect((await postForm(msTokenUrl(), form)).status).toBe(503);
    identity.delayMs = 150;
    const started = Date.now();
    expect((await postForm(msTokenUrl(), form)).status).toBe(200);
    expect(Date.now() - started).toBeGreaterThanOrEqual(140);
    identity.delayMs = 0;
    expect(identity.requests.slice(before).map((r) => r.status)).toEqual([503, 503, 200]);
    expect(identity.requests.at(-1)).toMatchObject({ path: `/${TENANT}/oauth2/v2.0/token`, grantType: 'client_credentials', clientId: SECRET_APP, credential: 'secret' });
  });
});

describe('identity stand-in: Google service account with domain-wide delegation', () => {
  test('the key file looks like the Cloud console one and its JWT gets a token for the delegated mailbox', async () => {
    const key = JSON.parse(serviceKey.json) as Record<string, string>;
    expect(key).toMatchObject({ type: 'service_account', project_id: 'postern-test', client_email: SERVICE_ACCOUNT, token_uri: identity.googleTokenUrl });
    expect(key.private_key).toMatch(/^-----BEGIN PRIVATE KEY-----\n/);
    expect(key.private_key_id).toMatch(/^[0-9a-f]{40}$/);
    const answer = await postForm(identity.googleTokenUrl, { grant_type: 'urn:ietf:params:oauth:grant-type:jwt-bearer', assertion: await googleAssertion() });
    expect(answer.status).toBe(200);
    expect(answer.json).toMatchObject({ expires_in: 3599, token_type: 'Bearer' });
    expect(answer.json.access_token).toMatch(/^ya29\./);
    expect(identity.verifyToken(answer.json.access_token, { resource: 'gmail' })).toMatchObject({ ok: true, clientEmail: SERVICE_ACCOUNT, subject: GMAIL_USER });
    expect(identity.requests.at(-1)).toMatchObject({ provider: 'google', clientId: SERVICE_ACCOUNT, sub: GMAIL_USER, status: 200 });
  });

  test('refusals carry Google error bodies', async () => {
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const cases: [Promise<string>, number, Record<string, string>][] = [
      [
        googleAssertion({ sub: 'ceo@example.org' }),
        401,
        {
          error: 'unauthorized_client',
          error_description: 'Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.',
        },
      ],
      [googleAssertion({ key: other }), 400, { error: 'invalid_grant', error_description: 'Invalid JWT Signature.' }],
      [googleAssertion({ iss: 'deleted@postern-test.iam.gserviceaccount.com' }), 400, { error: 'invalid_grant', error_description: 'Invalid grant: account not found' }],
      [googleAssertion({ lifetime: 7200 }), 400, { error: 'invalid_grant' }],
      [googleAssertion({ aud: 'https://oauth2.googleapis.com/token' }), 400, { error: 'invalid_grant', error_description: 'Invalid JWT: Failed audience check.' }],
    ];
    for (const [assertion, status, body] of cases) {
      const answer = await postForm(identity.googleTokenUrl, { grant_type: 'urn:ietf:params:oauth:grant-type:jwt-bearer', assertion: await assertion });
      expect(answer.status, JSON.stringify(body)).toBe(status);
      expect(answer.json).toMatchObject(body);
    }
  });

  test('expireAllTokens expires every token issued so far', async () => {
    const ms = await secretToken();
    const google = await googleToken();
    identity.expireAllTokens();
    expect(identity.verifyToken(ms, { resource: 'outlook' })).toEqual({ ok: false, reason: 'expired' });
    expect(identity.verifyToken(google, { resource: 'gmail' })).toEqual({ ok: false, reason: 'expired' });
    expect(identity.verifyToken(await secretToken(), { resource: 'outlook' }).ok).toBe(true);
  });
});

describe('Exchange Online stand-in', () => {
  test('speaks like smtp.office365.com: greeting, EHLO before and after STARTTLS, XOAUTH2, replies', async () => {
    const token = await secretToken();
    const client = await RawSmtp.connect(office.port);
    try {
      const greeting = await client.read();
      expect(greeting.text).toMatch(/^220 XX0PR00CA0000\.outlook\.office365\.com Microsoft ESMTP MAIL Service ready at \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000$/);
      const ehlo = await client.command('EHLO relay.test');
      expect(ehlo.lines).toEqual([
        '250-XX0PR00CA0000.outlook.office365.com Hello [127.0.0.1]',
        '250-SIZE 37748736',
        '250-PIPELINING',
        '250-DSN',
        '250-ENHANCEDSTATUSCODES',
        '250-STARTTLS',
        '250-8BITMIME',
        '250 SMTPUTF8',
      ]);
      expect((await client.command('AUTH LOGIN')).text).toBe('504 5.7.4 Unrecognized authentication type');
      expect((await client.command('MAIL FROM:<relay@contoso.com>')).text).toMatch(
        /^530 5\.7\.57 Client not authenticated to send mail\. \[XX0PR00CA0000\.NAMPRD00\.PROD\.OUTLOOK\.COM \d{4}-\d\d-\d\dT[\d:.]+Z [0-9A-F]{16}\]$/,
      );
      await client.startTls();
      expect((await client.command('EHLO relay.test')).lines).toContain('250-AUTH LOGIN XOAUTH2');
      const sasl = Buffer.from(`user=${MAILBOX}\x01auth=Bearer ${token}\x01\x01`).toString('base64');
      expect((await client.command(`AUTH XOAUTH2 ${sasl}`)).text).toBe('235 2.7.0 Authentication successful');
      expect((await client.command(`MAIL FROM:<${MAILBOX}>`)).text).toBe('250 2.1.0 Sender OK');
      expect((await client.command('RCPT TO:<someone@example.net>')).text).toBe('250 2.1.5 Recipient OK');
      const done = await client.data(`From: ${MAILBOX}\r\nTo: someone@example.net\r\nMessage-ID: <m1@relay.test>\r\nSubject: hi\r\n\r\nhello`);
      expect(done.text).toBe('250 2.0.0 OK <m1@relay.test> [Hostname=XX0PR00MB0000.namprd00.prod.outlook.com]');
      expect(office.messages.at(-1)).toMatchObject({ mailbox: MAILBOX, from: MAILBOX, to: ['someone@example.net'] });
    } finally {
      await client.quit();
    }
  });

  test('nodemailer sends with XOAUTH2; the message and the login are recorded', async () => {
    const transport = officeTransport({ user: MAILBOX, accessToken: await secretToken() });
    const info = await transport.sendMail(mail(MAILBOX, 'someone@example.net'));
    expect(info.response).toMatch(/^250 2\.0\.0 OK <.+> \[Hostname=/);
    expect(office.logins.at(-1)).toMatchObject({ mailbox: MAILBOX, method: 'XOAUTH2', ok: true, reply: '235 2.7.0 Authentication successful' });
    expect(office.messages.at(-1)!.raw.toString()).toContain('Sent through a stand-in.');
    transport.close();
  });

  test('an expired token, an unknown mailbox and a Graph token all get 535 5.7.3', async () => {
    const expired = await secretToken();
    identity.expireAllTokens();
    const tokens: [string, string][] = [
      [MAILBOX, expired],
      ['stranger@contoso.com', await secretToken()],
      [MAILBOX, await secretToken('https://graph.microsoft.com/.default')],
    ];
    for (const [user, accessToken] of tokens) {
      const err = await failure(officeTransport({ user, accessToken }).sendMail(mail(user, 'someone@example.net')));
      expect(err.response).toMatch(/^535 5\.7\.3 Authentication unsuccessful \[XX0PR00CA0000\.NAMPRD00\.PROD\.OUTLOOK\.COM /);
    }
  });

  test('SMTP AUTH disabled for the mailbox or the tenant gets 535 5.7.139; the mailbox setting wins', async () => {
    const token = await secretToken();
    office.disableSmtpAuth(MAILBOX);
    let err = await failure(officeTransport({ user: MAILBOX, accessToken: token }).sendMail(mail(MAILBOX, 'a@example.net')));
    expect(err.response).toContain(
      '535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.',
    );
    office.enableSmtpAuth(MAILBOX);
    office.disableTenantSmtpAuth();
    err = await failure(officeTransport({ user: 'printer@contoso.com', accessToken: token }).sendMail(mail('printer@contoso.com', 'a@example.net')));
    expect(err.response).toContain('535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.');
    await officeTransport({ user: MAILBOX, accessToken: token }).sendMail(mail(MAILBOX, 'a@example.net'));
    office.enableTenantSmtpAuth();
  });

  test('a password (Basic auth) gets 550 5.7.30; Send As and the scripted replies refuse after the data', async () => {
    let err = await failure(officeTransport({ user: MAILBOX, pass: 'hunter2' }).sendMail(mail(MAILBOX, 'a@example.net')));
    expect(err.response).toBe('550 5.7.30 Basic authentication is not supported for Client Submission.');

    const transport = officeTransport({ user: MAILBOX, accessToken: await secretToken() });
    await transport.sendMail(mail('noreply@contoso.com', 'a@example.net'));
    err = await failure(transport.sendMail(mail('ceo@contoso.com', 'a@example.net')));
    expect(err.response).toMatch(/^550 5\.7\.60 SMTP; Client does not have permissions to send as this sender \[/);

    office.script({ at: 'data', code: 554, message: '5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded' });
    office.script({ at: 'mail', code: 430, message: '4.2.0 STOREDRV; mailbox logon failure', mailbox: MAILBOX });
    err = await failure(transport.sendMail(mail(MAILBOX, 'a@example.net')));
    expect(err.response).toBe('430 4.2.0 STOREDRV; mailbox logon failure');
    err = await failure(transport.sendMail(mail(MAILBOX, 'a@example.net')));
    expect(err.response).toBe('554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded');
    await transport.sendMail(mail(MAILBOX, 'a@example.net'));
    expect(office.pendingScripts).toBe(0);
    transport.close();
  });

  test('TLS 1.1 gets 421 4.7.66 at AUTH, and the connection is closed', async () => {
    const client = await RawSmtp.connect(office.port);
    await client.read();
    await client.command('EHLO old-printer.local');
    await client.startTls({ minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT:@SECLEVEL=0' });
    await client.command('EHLO old-printer.local');
    const sasl = Buffer.from(`user=${MAILBOX}\x01auth=Bearer ${await secretToken()}\x01\x01`).toString('base64');
    expect((await client.command(`AUTH XOAUTH2 ${sasl}`)).text).toBe(
      '421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls',
    );
    await expect(client.read(2000)).rejects.toThrow(/connection closed/);
    client.destroy();
  });

  test('a fourth concurrent connection of one mailbox gets 432 4.3.2 at the end of the data', async () => {
    const standIn = await startOffice({ limits: { connectionsPerMailbox: 3 } });
    const transport = officeTransport({ user: MAILBOX, accessToken: await secretToken() }, standIn, { pool: true, maxConnections: 4, maxMessages: 100 });
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => transport.sendMail(mail(MAILBOX, `r${i}@example.net`))));
    transport.close();
    const refused = results.flatMap((r) => (r.status === 'rejected' ? [(r.reason as { response?: string }).response] : []));
    expect(standIn.maxConcurrent[MAILBOX]).toBe(4);
    expect(refused.length).toBeGreaterThan(0);
    expect(refused.every((text) => text === '432 4.3.2 Concurrent connections limit exceeded.')).toBe(true);
    expect(standIn.violations.connections).toBe(refused.length);
  });

  test('past 30 messages a minute: accepted (Microsoft delays them) or refused, and counted', async () => {
    const token = await secretToken();
    for (const overMessageRate of ['accept', 'reject'] as const) {
      const standIn = await startOffice({ limits: { messagesPerWindow: 3, windowMs: 60_000, overMessageRate } });
      const transport = officeTransport({ user: MAILBOX, accessToken: token }, standIn, { pool: true, maxConnections: 1 });
      const results: string[] = [];
      for (let i = 0; i < 5; i++) {
        results.push(await transport.sendMail(mail(MAILBOX, 'a@example.net')).then(() => 'ok', (err: { response: string }) => err.response));
      }
      transport.close();
      expect(standIn.violations.messages).toBe(2);
      if (overMessageRate === 'accept') expect(results).toEqual(['ok', 'ok', 'ok', 'ok', 'ok']);
      else {
        expect(results.slice(0, 3)).toEqual(['ok', 'ok', 'ok']);
        expect(results[3]).toMatch(/^554 5\.2\.0 STOREDRV\.Submission\.Exception:SubmissionQuotaExceededException; /);
      }
    }
  });

  test('past the recipients a day: 554 5.2.0 SubmissionQuotaExceededException', async () => {
    const standIn = await startOffice({ limits: { recipientsPerDay: 5 } });
    const transport = officeTransport({ user: MAILBOX, accessToken: await secretToken() }, standIn, { pool: true, maxConnections: 1 });
    await transport.sendMail(mail(MAILBOX, ['a@example.net', 'b@example.net', 'c@example.net', 'd@example.net']));
    const err = await failure(transport.sendMail(mail(MAILBOX, ['e@example.net', 'f@example.net'])));
    expect(err.response).toBe(
      '554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message Cannot submit message.',
    );
    await transport.sendMail(mail(MAILBOX, 'e@example.net'));
    transport.close();
    expect(standIn.violations.recipients).toBe(1);
    expect(standIn.messages.map((m) => m.to.length)).toEqual([4, 1]);
  });
});

describe('Gmail stand-in', () => {
  test('nodemailer sends with the delegated token of a service account', async () => {
    const transport = nodemailer.createTransport({
      host: '127.0.0.1',
      port: gmail.port,
      secure: false,
      requireTLS: true,
      tls: { ca: standinTls.ca },
      auth: { type: 'OAuth2', user: GMAIL_USER, accessToken: await googleToken() },
    });
    const info = await transport.sendMail(mail(GMAIL_USER, 'someone@example.net'));
    expect(info.response).toMatch(/^250 2\.0\.0 OK {2}\d+ [a-z]\d+sm\d+[a-z]{3}\.\d+ - gsmtp$/);
    expect(gmail.messages.at(-1)).toMatchObject({ mailbox: GMAIL_USER, to: ['someone@example.net'] });
    expect(gmail.logins.at(-1)).toMatchObject({ mailbox: GMAIL_USER, method: 'XOAUTH2', ok: true, reply: '235 2.7.0 Accepted' });
    transport.close();
  });

  test('a token for another mailbox gets the XOAUTH2 error challenge, then 535-5.7.8', async () => {
    const token = await googleToken();
    const client = await RawSmtp.connect(gmail.port);
    try {
      expect((await client.read()).text).toMatch(/^220 smtp\.gmail\.com ESMTP \S+ - gsmtp$/);
      expect((await client.command('EHLO relay.test')).lines).toContain('250-STARTTLS');
      await client.startTls();
      const ehlo = await client.command('EHLO relay.test');
      expect(ehlo.lines[0]).toBe('250-smtp.gmail.com at your service, [127.0.0.1]');
      expect(ehlo.lines).toContain('250-AUTH LOGIN PLAIN XOAUTH2');
      const sasl = Buffer.from(`user=boss@example.org\x01auth=Bearer ${token}\x01\x01`).toString('base64');
      const challenge = await client.command(`AUTH XOAUTH2 ${sasl}`);
      expect(challenge.text).toBe('334 eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==');
      const refused = await client.command('');
      expect(refused.lines[0]).toBe('535-5.7.8 Username and Password not accepted. For more information, go to');
      expect(refused.lines[1]).toMatch(/^535 5\.7\.8 {2}https:\/\/support\.google\.com\/mail\/\?p=BadCredentials \S+ - gsmtp$/);
      expect(gmail.logins.at(-1)).toMatchObject({ mailbox: 'boss@example.org', ok: false });
    } finally {
      await client.quit();
    }
  });
});
