// The Microsoft Graph stand-in (src/standins/graph-api.ts), checked with real HTTPS requests as a
// Graph client makes them: a token from the identity stand-in for https://graph.microsoft.com/
// .default, then sendMail with a base64 MIME message, or a draft, its attachments (a large one in
// an upload session, in chunks) and send. Postern's Graph upstream is tested against this stand-in,
// so each documented answer it gives (codes, texts, Retry-After) is pinned here.
import { randomBytes, randomUUID } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import https from 'node:https';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { GRAPH_ERRORS, GraphStandIn, type GraphStandInOptions } from '../src/standins/graph-api.js';
import { IdentityStandIn } from '../src/standins/identity-platform.js';
import { makeStandInTls, type StandInTls } from '../src/standins/standin-certificates.js';

const TENANT = 'contoso.onmicrosoft.com';
const GRAPH_SCOPE = 'https://graph.microsoft.com/.default';
const OUTLOOK_SCOPE = 'https://outlook.office365.com/.default';
const SECRET = 'Qx~8Q~graph-standin-secret';
/** Mail.Send and Mail.ReadWrite, admin-consented. */
const APP = randomUUID();
/** Registered, but no permission consented. */
const BARE_APP = randomUUID();
/** Mail.Send only: sendMail works, drafts do not. */
const SEND_ONLY_APP = randomUUID();
/** Mail.Send, but an application access policy limits it to OTHER. */
const POLICY_APP = randomUUID();
const MAILBOX = 'relay@contoso.com';
const OTHER = 'alerts@contoso.com';
const UNLICENSED = 'former.employee@contoso.com';
const KIB = 1024;
const MIB = 1024 * 1024;
/** The largest chunk a client may send: 12 × 320 KiB, under 4 MiB. */
const CHUNK = 12 * 320 * KIB;

let tls: StandInTls;
let identity: IdentityStandIn;
let graph: GraphStandIn;
const closers: (() => Promise<void>)[] = [];

beforeAll(async () => {
  tls = await makeStandInTls();
  identity = new IdentityStandIn({ certificate: tls });
  await identity.start();
  closers.push(() => identity.close());
  for (const clientId of [APP, BARE_APP, SEND_ONLY_APP, POLICY_APP]) identity.registerApp({ tenant: TENANT, clientId, clientSecret: SECRET });
  graph = await startGraph();
});

afterAll(async () => {
  for (const close of closers.reverse()) await close();
});

async function startGraph(options: Partial<GraphStandInOptions> = {}): Promise<GraphStandIn> {
  const standIn = new GraphStandIn({
    certificate: tls,
    identity,
    mailboxes: [MAILBOX, OTHER],
    usersWithoutMailbox: [UNLICENSED],
    appPermissions: {
      [APP]: ['Mail.Send', 'Mail.ReadWrite'],
      [BARE_APP]: [],
      [SEND_ONLY_APP]: ['Mail.Send'],
      [POLICY_APP]: ['Mail.Send'],
    },
    accessPolicy: { [POLICY_APP]: [OTHER] },
    sendAs: { [MAILBOX]: ['noreply@contoso.com'] },
    ...options,
  });
  await standIn.start();
  closers.push(() => standIn.close());
  return standIn;
}

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  json: Record<string, any>;
}

function call(method: string, url: string, options: { token?: string; headers?: Record<string, string>; body?: string | Buffer } = {}): Promise<Reply> {
  const body = options.body === undefined ? undefined : Buffer.isBuffer(options.body) ? options.body : Buffer.from(options.body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        ca: tls.ca,
        agent: false,
        headers: {
          ...(options.token !== undefined ? { Authorization: `Bearer ${options.token}` } : {}),
          'Content-Length': body?.length ?? 0,
          ...options.headers,
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          const json = text && /json/.test(String(res.headers['content-type'])) ? (JSON.parse(text) as Record<string, any>) : {};
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
        });
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

async function token(clientId = APP, scope = GRAPH_SCOPE): Promise<string> {
  const form = new URLSearchParams({ grant_type: 'client_credentials', client_id: clientId, client_secret: SECRET, scope }).toString();
  const answer = await call('POST', identity.microsoftTokenUrl(TENANT), { body: form, headers: { 'Content-Type': 'application/x-www-form-urlencoded' } });
  expect(answer.status).toBe(200);
  return answer.json.access_token as string;
}

function mime(fields: { from?: string; to?: string; cc?: string; bcc?: string; subject?: string; body?: string } = {}): Buffer {
  const header = [
    `From: Relay <${fields.from ?? MAILBOX}>`,
    `To: ${fields.to ?? 'Someone <someone@example.net>'}`,
    ...(fields.cc ? [`Cc: ${fields.cc}`] : []),
    ...(fields.bcc ? [`Bcc: ${fields.bcc}`] : []),
    `Subject: ${fields.subject ?? 'stand-in test'}`,
    `Message-ID: <${randomUUID()}@postern.test>`,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=utf-8',
  ];
  return Buffer.from(`${header.join('\r\n')}\r\n\r\n${fields.body ?? 'Sent through the Graph stand-in.\r\n'}`);
}

/** Base64 in 76-character lines, as the documentation's example is. */
function base64Lines(bytes: Buffer): string {
  return (bytes.toString('base64').match(/.{1,76}/g) ?? []).join('\r\n');
}

const users = (mailbox = MAILBOX) => `${graph.url}/v1.0/users/${encodeURIComponent(mailbox)}`;

function sendMail(bearer: string, message: Buffer, mailbox = MAILBOX, standIn = graph): Promise<Reply> {
  return call('POST', `${standIn.url}/v1.0/users/${encodeURIComponent(mailbox)}/sendMail`, {
    token: bearer,
    headers: { 'Content-Type': 'text/plain' },
    body: message.toString('base64'),
  });
}

async function createDraft(bearer: string, message: Buffer, mailbox = MAILBOX): Promise<string> {
  const answer = await call('POST', `${users(mailbox)}/messages`, { token: bearer, headers: { 'Content-Type': 'text/plain' }, body: message.toString('base64') });
  expect(answer.status).toBe(201);
  return answer.json.id as string;
}

async function createSession(bearer: string, draftId: string, item: Record<string, unknown>): Promise<Reply> {
  return call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/attachments/createUploadSession`, {
    token: bearer,
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ AttachmentItem: { attachmentType: 'file', ...item } }),
  });
}

function put(uploadUrl: string, bytes: Buffer, start: number, total: number, headers: Record<string, string> = {}): Promise<Reply> {
  return call('PUT', uploadUrl, {
    headers: { 'Content-Type': 'application/octet-stream', 'Content-Range': `bytes ${start}-${start + bytes.length - 1}/${total}`, ...headers },
    body: bytes,
  });
}

function expectGraphError(answer: Reply, status: number, code: string, message?: string | RegExp): void {
  expect(answer.status).toBe(status);
  expect(answer.json.error.code).toBe(code);
  if (typeof message === 'string') expect(answer.json.error.message).toBe(message);
  else if (message) expect(answer.json.error.message).toMatch(message);
  expect(answer.json.error.innerError).toMatchObject({ date: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/), 'request-id': answer.headers['request-id'] });
}

describe('Graph stand-in: sendMail', () => {
  test('a base64 MIME message gets 202 and is recorded with the recipients of its header', async () => {
    const message = mime({ to: 'Ann <ann@example.net>, bob@example.org', cc: 'carol@example.com', bcc: 'dave@example.net' });
    const answer = await call('POST', `${users()}/sendMail`, {
      token: await token(),
      headers: { 'Content-Type': 'text/plain', 'client-request-id': 'postern-1234' },
      body: base64Lines(message),
    });
    expect(answer.status).toBe(202);
    expect(answer.text).toBe('');
    expect(answer.headers['client-request-id']).toBe('postern-1234');
    expect(answer.headers['request-id']).toMatch(/^[0-9a-f-]{36}$/);
    const sent = graph.sent.at(-1)!;
    expect(sent).toMatchObject({
      mailbox: MAILBOX,
      appId: APP,
      via: 'sendMail',
      format: 'mime',
      from: [MAILBOX],
      to: ['ann@example.net', 'bob@example.org'],
      cc: ['carol@example.com'],
      bcc: ['dave@example.net'],
      attachments: [],
      saveToSentItems: true,
    });
    expect(sent.mime.equals(message)).toBe(true);
    expect(graph.requests.at(-1)).toMatchObject({ method: 'POST', operation: 'sendMail', mailbox: MAILBOX, appId: APP, status: 202 });
  });

  test('the JSON form works too, saveToSentItems "false" included', async () => {
    const answer = await call('POST', `${users()}/sendMail`, {
      token: await token(),
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        message: {
          subject: 'JSON',
          body: { contentType: 'Text', content: 'Hello' },
          toRecipients: [{ emailAddress: { address: 'Frannis@Contoso.com' } }],
          attachments: [{ '@odata.type': '#microsoft.graph.fileAttachment', name: 'a.txt', contentType: 'text/plain', contentBytes: 'SGVsbG8gV29ybGQh' }],
        },
        saveToSentItems: 'false',
      }),
    });
    expect(answer.status).toBe(202);
    const sent = graph.sent.at(-1)!;
    expect(sent).toMatchObject({ format: 'json', to: ['frannis@contoso.com'], saveToSentItems: false });
    expect(sent.attachments[0]?.bytes.toString()).toBe('Hello World!');
  });

  test('MIME that is not base64 gets 400 ErrorMimeContentInvalidBase64String', async () => {
    const answer = await call('POST', `${users()}/sendMail`, { token: await token(), headers: { 'Content-Type': 'text/plain' }, body: 'From: raw MIME, not base64\r\n' });
    expectGraphError(answer, 400, 'ErrorMimeContentInvalidBase64String', GRAPH_ERRORS.invalidBase64);
  });

  test("Graph's 4 MB request limit: 413 past it, 202 just under", async () => {
    const bearer = await token();
    const before = graph.sent.length;
    const big = mime({ body: 'x'.repeat(Math.ceil(3.2 * MIB)) });
    const refused = await sendMail(bearer, big);
    expectGraphError(refused, 413, 'RequestEntityTooLarge', GRAPH_ERRORS.requestTooLarge);
    expect(graph.sent.length).toBe(before);
    const fits = mime({ body: 'x'.repeat(3 * MIB - 64 * KIB) });
    expect((await sendMail(bearer, fits)).status).toBe(202);
  });
});

describe('Graph stand-in: drafts and large attachments', () => {
  test('a draft, a small attachment, 30 MB in an upload session, then send: every byte arrives', async () => {
    const bearer = await token();
    const draftMime = mime({ to: 'ann@example.net', subject: 'quarterly report' });
    const created = await call('POST', `${users()}/messages`, { token: bearer, headers: { 'Content-Type': 'text/plain' }, body: draftMime.toString('base64') });
    expect(created.status).toBe(201);
    expect(created.json).toMatchObject({ isDraft: true, subject: 'quarterly report', toRecipients: [{ emailAddress: { address: 'ann@example.net' } }] });
    const draftId = created.json.id as string;
    expect(draftId).toMatch(/^AAMkAD[\w-]+AAA=$/);

    const small = randomBytes(1000);
    const attached = await call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/attachments`, {
      token: bearer,
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ '@odata.type': '#microsoft.graph.fileAttachment', name: 'small.bin', contentType: 'application/octet-stream', contentBytes: small.toString('base64') }),
    });
    expect(attached.status).toBe(201);
    expect(attached.json).toMatchObject({ '@odata.type': '#microsoft.graph.fileAttachment', name: 'small.bin', size: 1000, isInline: false });

    const large = randomBytes(30_000_000);
    const session = await createSession(bearer, draftId, { name: 'scan.pdf', size: large.length, contentType: 'application/pdf', contentId: 'scan1', isInline: true });
    expect(session.status).toBe(201);
    expect(session.json).toMatchObject({ nextExpectedRanges: ['0-'], expirationDateTime: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$/) });
    const uploadUrl = session.json.uploadUrl as string;
    expect(uploadUrl).toMatch(/\/AttachmentSessions\('[^']+'\)\?authtoken=/);

    // The URL is pre-authenticated: a Graph token sent along is for the wrong audience.
    const withToken = await put(uploadUrl, large.subarray(0, CHUNK), 0, large.length, { Authorization: `Bearer ${bearer}` });
    expectGraphError(withToken, 401, 'InvalidAudience', GRAPH_ERRORS.uploadAudience);

    let last: Reply | undefined;
    for (let start = 0; start < large.length; start += CHUNK) {
      const chunk = large.subarray(start, Math.min(start + CHUNK, large.length));
      last = await put(uploadUrl, chunk, start, large.length);
      if (start + chunk.length < large.length) {
        expect(last.status).toBe(200);
        expect(last.json).toMatchObject({ nextExpectedRanges: [String(start + chunk.length)], ExpirationDateTime: session.json.expirationDateTime });
      }
    }
    expect(last?.status).toBe(201);
    expect(last?.text).toBe('');
    expect(last?.headers.location).toMatch(/\/Attachments\('[^']+'\)$/);
    expect(graph.uploadSessions).toBe(0);

    const sentBefore = graph.sent.length;
    const send = await call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/send`, { token: bearer });
    expect(send.status).toBe(202);
    expect(send.text).toBe('');
    expect(graph.sent.length).toBe(sentBefore + 1);
    const sent = graph.sent.at(-1)!;
    expect(sent).toMatchObject({ via: 'draft', draftId, mailbox: MAILBOX, to: ['ann@example.net'], saveToSentItems: true });
    expect(sent.mime.equals(draftMime)).toBe(true);
    expect(sent.attachments.map((a) => [a.name, a.contentType, a.contentId, a.isInline, a.via])).toEqual([
      ['small.bin', 'application/octet-stream', undefined, false, 'post'],
      ['scan.pdf', 'application/pdf', 'scan1', true, 'uploadSession'],
    ]);
    expect(sent.attachments[0]!.bytes.equals(small)).toBe(true);
    expect(sent.attachments[1]!.bytes.equals(large)).toBe(true);
    expect(graph.drafts.some((d) => d.id === draftId)).toBe(false);
  });

  test('upload sessions: 3 MB minimum, chunks in order, 320 KiB multiples, 4 MB at most, the declared size', async () => {
    const bearer = await token();
    const draftId = await createDraft(bearer, mime());
    const tooSmall = await createSession(bearer, draftId, { name: 'small.bin', size: MIB });
    expectGraphError(tooSmall, 400, 'ErrorAttachmentSizeShouldNotBeLessThanMinimumSize');

    const size = 6 * MIB;
    const data = randomBytes(size);
    const session = await createSession(bearer, draftId, { name: 'big.bin', size });
    expect(session.status).toBe(201);
    const url = session.json.uploadUrl as string;

    const outOfOrder = await put(url, data.subarray(320 * KIB, 640 * KIB), 320 * KIB, size);
    expectGraphError(outOfOrder, 416, 'invalidRange', 'Uploaded fragment is out of order.');
    expect(outOfOrder.json.error.innerError.code).toBe('fragmentOutOfOrder');
    expectGraphError(await put(url, data.subarray(0, 100_000), 0, size), 400, 'invalidRequest', /multiple of 327680 bytes/);
    const mismatch = await put(url, data.subarray(0, 320 * KIB), 0, size + 1);
    expectGraphError(mismatch, 400, 'invalidRequest');
    expect(mismatch.json.error.innerError.code).toBe('fragmentLengthMismatch');
    const tooBig = await put(url, data.subarray(0, 5 * MIB), 0, size);
    expect(tooBig.status).toBe(413);
    expect(tooBig.json.error.innerError.code).toBe('maxFragmentLengthExceeded');

    const first = await put(url, data.subarray(0, 320 * KIB), 0, size);
    expect(first.status).toBe(200);
    expect(first.json.nextExpectedRanges).toEqual([String(320 * KIB)]);
    const again = await put(url, data.subarray(0, 320 * KIB), 0, size);
    expectGraphError(again, 416, 'invalidRange', 'Uploaded fragment overlaps with existing data.');

    // Cancelling the session (DELETE on its URL), then deleting the draft.
    expect((await call('DELETE', url)).status).toBe(204);
    const gone = await put(url, data.subarray(320 * KIB, 640 * KIB), 320 * KIB, size);
    expectGraphError(gone, 404, 'itemNotFound');
    expect(gone.json.error.innerError.code).toBe('uploadSessionNotFound');
    expect((await call('DELETE', `${users()}/messages/${encodeURIComponent(draftId)}`, { token: bearer })).status).toBe(204);
    const send = await call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/send`, { token: bearer });
    expectGraphError(send, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
  });
});

describe('Graph stand-in: authentication and permissions', () => {
  test('401 InvalidAuthenticationToken: no token, a token for Exchange Online, an unknown one, an expired one', async () => {
    const none = await sendMail('', mime());
    expectGraphError(none, 401, 'InvalidAuthenticationToken', GRAPH_ERRORS.tokenEmpty);
    expect(none.headers['www-authenticate']).toMatch(/^Bearer realm="", authorization_uri="https:\/\/login\.microsoftonline\.com\/common\/oauth2\/authorize"/);
    expectGraphError(await sendMail(await token(APP, OUTLOOK_SCOPE), mime()), 401, 'InvalidAuthenticationToken', GRAPH_ERRORS.tokenAudience);
    expectGraphError(await sendMail('eyJhbGciOiJub25lIn0.e30.', mime()), 401, 'InvalidAuthenticationToken', GRAPH_ERRORS.tokenInvalid);
    const old = await token();
    identity.expireAllTokens();
    expectGraphError(await sendMail(old, mime()), 401, 'InvalidAuthenticationToken', GRAPH_ERRORS.tokenExpired);
    expect((await sendMail(await token(), mime())).status).toBe(202);
  });

  test('403 ErrorAccessDenied without Mail.Send (or without consent); drafts need Mail.ReadWrite', async () => {
    expectGraphError(await sendMail(await token(BARE_APP), mime()), 403, 'ErrorAccessDenied', GRAPH_ERRORS.accessDenied);
    const sendOnly = await token(SEND_ONLY_APP);
    expect((await sendMail(sendOnly, mime())).status).toBe(202);
    const draft = await call('POST', `${users()}/messages`, { token: sendOnly, headers: { 'Content-Type': 'text/plain' }, body: mime().toString('base64') });
    expectGraphError(draft, 403, 'ErrorAccessDenied', GRAPH_ERRORS.accessDenied);
  });

  test('403 from an application access policy, and for a From the mailbox may not send as', async () => {
    const policed = await token(POLICY_APP);
    const refused = await sendMail(policed, mime(), MAILBOX);
    expectGraphError(refused, 403, 'ErrorAccessDenied', GRAPH_ERRORS.accessPolicy);
    expect(refused.json.error.message).toMatch(/^Access to OData is disabled/);
    expect((await sendMail(policed, mime({ from: OTHER }), OTHER)).status).toBe(202);

    const bearer = await token();
    expectGraphError(await sendMail(bearer, mime({ from: 'ceo@contoso.com' })), 403, 'ErrorSendAsDenied', GRAPH_ERRORS.sendAsDenied);
    expect((await sendMail(bearer, mime({ from: 'noreply@contoso.com' }))).status).toBe(202);
  });

  test('404 for no such user and for a user without a mailbox; 400 for /me with an app token', async () => {
    const bearer = await token();
    expectGraphError(await sendMail(bearer, mime(), 'nobody@contoso.com'), 404, 'ErrorInvalidUser', "The requested user 'nobody@contoso.com' is invalid.");
    expectGraphError(await sendMail(bearer, mime(), UNLICENSED), 404, 'MailboxNotEnabledForRESTAPI', GRAPH_ERRORS.mailboxNotEnabled);
    const me = await call('POST', `${graph.url}/v1.0/me/sendMail`, { token: bearer, headers: { 'Content-Type': 'text/plain' }, body: mime().toString('base64') });
    expectGraphError(me, 400, 'BadRequest', GRAPH_ERRORS.meAppOnly);
  });
});

describe('Graph stand-in: throttling', () => {
  test('more than 4 requests in progress on one mailbox: 429 ApplicationThrottled with Retry-After', async () => {
    const bearer = await token();
    const before = graph.violations.concurrency;
    graph.delayMs = 300;
    try {
      const answers = await Promise.all([
        ...Array.from({ length: 6 }, () => sendMail(bearer, mime())),
        ...Array.from({ length: 2 }, () => sendMail(bearer, mime({ from: OTHER }), OTHER)),
      ]);
      const mine = answers.slice(0, 6);
      expect(mine.filter((a) => a.status === 202)).toHaveLength(4);
      const throttled = mine.filter((a) => a.status === 429);
      expect(throttled).toHaveLength(2);
      for (const answer of throttled) {
        expectGraphError(answer, 429, 'ApplicationThrottled', GRAPH_ERRORS.mailboxConcurrency);
        expect(answer.headers['retry-after']).toBe('1');
      }
      expect(answers.slice(6).map((a) => a.status)).toEqual([202, 202]);
    } finally {
      graph.delayMs = 0;
    }
    expect(graph.violations.concurrency - before).toBe(2);
    expect(graph.maxConcurrent[MAILBOX]).toBe(4);
  });

  test('with concurrencyScope "app", the 4 are shared by all mailboxes', async () => {
    const standIn = await startGraph({ limits: { concurrencyScope: 'app' } });
    standIn.delayMs = 250;
    const bearer = await token();
    const answers = await Promise.all([
      ...Array.from({ length: 3 }, () => sendMail(bearer, mime(), MAILBOX, standIn)),
      ...Array.from({ length: 3 }, () => sendMail(bearer, mime({ from: OTHER }), OTHER, standIn)),
    ]);
    expect(answers.filter((a) => a.status === 429)).toHaveLength(2);
    expect(standIn.violations.concurrency).toBe(2);
  });

  test('past the request window: 429 with Retry-After until the oldest request leaves it', async () => {
    const standIn = await startGraph({ limits: { requestsPerWindow: 3, windowMs: 60_000 } });
    const bearer = await token();
    for (let i = 0; i < 3; i++) expect((await sendMail(bearer, mime(), MAILBOX, standIn)).status).toBe(202);
    const refused = await sendMail(bearer, mime(), MAILBOX, standIn);
    expectGraphError(refused, 429, 'TooManyRequests', GRAPH_ERRORS.tooManyRequests);
    expect(Number(refused.headers['retry-after'])).toBeGreaterThanOrEqual(59);
    expect(Number(refused.headers['retry-after'])).toBeLessThanOrEqual(60);
    expect(standIn.violations.requests).toBe(1);
    // The window is per app and mailbox: another mailbox is not affected.
    expect((await sendMail(bearer, mime({ from: OTHER }), OTHER, standIn)).status).toBe(202);
  });

  test('past the upload budget: 429 ApplicationThrottled "IncomingBytes"', async () => {
    const standIn = await startGraph({ limits: { uploadBytesPerWindow: MIB } });
    const bearer = await token();
    // The request that crosses the budget goes through; the next one waits.
    expect((await sendMail(bearer, mime({ body: 'y'.repeat(MIB) }), MAILBOX, standIn)).status).toBe(202);
    const refused = await sendMail(bearer, mime(), MAILBOX, standIn);
    expectGraphError(refused, 429, 'ApplicationThrottled', GRAPH_ERRORS.incomingBytes);
    expect(Number(refused.headers['retry-after'])).toBeGreaterThan(290);
    expect(standIn.violations.uploadBytes).toBe(1);
  });
});

describe('Graph stand-in: scripted errors', () => {
  test('the next matching requests get the scripted error, then things go back to normal', async () => {
    const bearer = await token();
    graph.script({ status: 503, code: 'ServiceUnavailable', message: 'Service Unavailable', retryAfterSeconds: 7, times: 2, mailbox: MAILBOX, path: 'sendMail' });
    for (let i = 0; i < 2; i++) {
      const answer = await sendMail(bearer, mime());
      expectGraphError(answer, 503, 'ServiceUnavailable', 'Service Unavailable');
      expect(answer.headers['retry-after']).toBe('7');
    }
    expect((await sendMail(bearer, mime({ from: OTHER }), OTHER)).status).toBe(202);
    expect((await sendMail(bearer, mime())).status).toBe(202);

    // A failed send leaves the draft in place; the retry sends it.
    const draftId = await createDraft(bearer, mime());
    graph.script({ status: 500, code: 'ErrorInternalServerError', message: 'An internal server error occurred. The operation failed.', path: 'send' });
    const failed = await call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/send`, { token: bearer });
    expectGraphError(failed, 500, 'ErrorInternalServerError');
    expect(graph.drafts.some((d) => d.id === draftId)).toBe(true);
    expect((await call('POST', `${users()}/messages/${encodeURIComponent(draftId)}/send`, { token: bearer })).status).toBe(202);
    expect(graph.pendingScripts).toBe(0);
    expect(() => graph.script({ status: 202, code: 'x', message: 'y' })).toThrow(/4xx\/5xx/);
  });
});
