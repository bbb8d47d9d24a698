// Microsoft Graph v1.0 mail sending (graph.microsoft.com), as Microsoft documents it, for Postern's
// Graph upstream to be tested against. HTTPS on loopback; the client points its Graph URL here
// and trusts the stand-in's CA. Graph URLs are `${url}/v1.0/...`.
//
//   - POST /v1.0/users/{id | userPrincipalName}/sendMail: "user: sendMail" (learn.microsoft.com/
//     graph/api/user-sendmail). MIME: Content-Type text/plain, the body the base64 of the message
//     (line breaks allowed, as in the page's example 4); 202 Accepted, empty body. A body that is
//     not base64 gets 400 ErrorMimeContentInvalidBase64String "Invalid base64 string for MIME
//     content." (same page). The JSON form ({ message, saveToSentItems }) is accepted too; note
//     the page's own example sends saveToSentItems as the string "false". "Send Outlook messages
//     in MIME format" (…/graph/outlook-send-mime-message) is where the two Content-Types are set.
//   - POST /v1.0/users/{id}/messages: "Create message" (…/api/user-post-messages), MIME or JSON;
//     201 Created and the draft (a message resource, shortened as the page allows). It needs
//     Mail.ReadWrite, not Mail.Send: the permissions tables of that page, of message-post-
//     attachments and of createUploadSession say so, and "Attach large files to Outlook messages
//     or events" (…/graph/outlook-large-attachments) repeats it. So an app with only Mail.Send can
//     send with sendMail but cannot build a draft (403).
//   - POST …/messages/{id}/attachments: a fileAttachment with contentBytes, 201 and the attachment
//     ("Add attachment", …/api/message-post-attachments, Mail.ReadWrite). Its "under 3 MB" needs
//     no check of its own: 3 MB is 4 MB in base64, past the request limit below.
//   - POST …/messages/{id}/attachments/createUploadSession: "attachment: createUploadSession"
//     (…/api/attachment-createuploadsession): for 3 MB to 150 MB, 201 and an uploadSession
//     { uploadUrl, expirationDateTime, nextExpectedRanges: ["0-"] }. Smaller files get
//     ErrorAttachmentSizeShouldNotBeLessThanMinimumSize (outlook-large-attachments, "Errors").
//   - PUT {uploadUrl}: outlook-large-attachments, steps 2 and 3. The URL is opaque and
//     pre-authenticated (an authtoken in the query, in Outlook's own URL shape, not Graph's), and
//     "Do not specify an Authorization request header": one sent anyway gets what Outlook answers
//     a Graph token, 401 InvalidAudience "The audience claim value is invalid 'aud'." (reported in
//     microsoftgraph/msgraph-sdk-java-core#445). Content-Range "bytes {start}-{end}/{total}";
//     bytes must come in order ("You must upload bytes in a file in order"); 200 and
//     { ExpirationDateTime, nextExpectedRanges: ["{start}"] } while bytes are missing (the
//     page's example, spelling and all: Outlook answers a single start, not "start-"), and the
//     last PUT 201 Created with a Location header and no body. DELETE on the URL cancels (204).
//     Chunk rules: "up to 4 MB each time" (createUploadSession, step 2) is enforced as 4 MiB, and
//     every chunk but the last must be a multiple of 320 KiB, which Graph's upload sessions ask of
//     OneDrive (driveitem-createuploadsession) and which Microsoft's SDKs (LargeFileUploadTask)
//     use for Outlook too; both are options. Range errors use the codes of "Microsoft Graph error
//     responses" (…/graph/errors): 416 invalidRange with fragmentOverlap / fragmentOutOfOrder,
//     fragmentLengthMismatch, maxFragmentLengthExceeded, uploadSessionNotFound.
//   - POST …/messages/{id}/send: "message: send" (…/api/message-send), 202, Mail.Send. The sent
//     message is the draft's MIME plus the attachments added to it, kept apart (sent[].mime and
//     sent[].attachments) so that a test can check every byte arrived.
//   - DELETE …/messages/{id}: 204 (Postern deletes a draft when a step fails).
//
// Errors are Graph's JSON ("Microsoft Graph error responses"): { error: { code, message,
// innerError: { date, request-id, client-request-id } } }, with request-id / client-request-id
// headers (client-request-id echoes the client's). Texts are the ones Graph sends today, as
// clients have recorded them where the documentation gives none:
//   - 401 InvalidAuthenticationToken: "Access token is empty.", "Access token validation
//     failure.", "Access token validation failure. Invalid audience." (a token for Exchange
//     Online, say), "Lifetime validation failed, the token is expired."; with Graph's
//     WWW-Authenticate header;
//   - 403 ErrorAccessDenied "Access is denied. Check credentials and try again.": the app lacks
//     the permission (not granted, or no admin consent: its token then carries no roles);
//   - 403 ErrorAccessDenied "Access to OData is disabled: [RAOP] : Blocked by tenant configured
//     AppOnly AccessPolicy settings.": an application access policy leaves the mailbox out
//     ("Limiting application permissions to specific Exchange Online mailboxes",
//     …/graph/auth-limit-mailbox-access, documents the "Access to OData is disabled." part; the
//     rest is what Exchange appends today);
//   - 403 ErrorSendAsDenied: the From field names an address the mailbox may not send as;
//   - 404 ErrorInvalidUser "The requested user '…' is invalid." (no such user), 404
//     MailboxNotEnabledForRESTAPI "The mailbox is either inactive, soft-deleted, or is hosted
//     on-premise." (a user without an Exchange Online mailbox: usersWithoutMailbox);
//   - 400 BadRequest "/me request is only valid with delegated authentication flow." (an app-only
//     token on /me), "Resource not found for the segment '…'." (an unknown path);
//   - 413 "The maximum request length supported is 4MB.": Graph's 4 MB limit on a request
//     ("Create message": payloads over 4 MB get "HTTP 413 Request Entity Too Large"; the text is
//     Graph's as clients report it). No client has recorded the code with it, so the code is the
//     status's name, RequestEntityTooLarge;
//   - 400 ErrorMessageSizeExceeded: the message would pass maxMessageBytes (Exchange answers that
//     code with 400; "The message exceeds the maximum supported size." is the stand-in's text).
// Where nothing is documented or recorded (415, a malformed AttachmentItem or Content-Range, the
// text of ErrorAttachmentSizeShouldNotBeLessThanMinimumSize), the texts are the stand-in's own and
// say what is wrong; clients should go by the status and the code, as "Microsoft Graph error
// responses" asks.
//
// Limits ("Microsoft Graph service-specific throttling limits", …/graph/throttling-limits,
// Outlook service limits), counted per app and mailbox, with Retry-After in seconds ("Microsoft
// Graph throttling guidance", …/graph/throttling):
//   - 4 requests at once: 429 ApplicationThrottled "Application is over its MailboxConcurrency
//     limit." (Outlook's text, widely reported). The page has said per app and mailbox, and since
//     2024 says per app whatever the mailbox; concurrencyScope chooses;
//   - 10,000 requests in 10 minutes: 429 TooManyRequests "Please retry again later." (the sample of
//     the throttling guidance; Outlook names no budget for this one that clients have recorded);
//   - 150 MB uploaded (POST, PUT, PATCH) in 5 minutes: 429 ApplicationThrottled "Application is
//     over its IncomingBytes limit." (Outlook's text). The request that crosses the budget is
//     let through; the next ones wait, as Exchange's budgets do.
// The uploadUrl's PUTs count too: they are Outlook requests on the same mailbox. A request is in
// progress from when its body has arrived until its answer is written (delayMs included); a
// throttled request takes no place and no share of the window. Retry-After for the concurrency
// limit is 1 second: a place frees as soon as a request ends, and Outlook's value is not documented.
//
// Anything else Graph may answer (503, 500, 504, an error on one step…) comes from script().
import { randomBytes, randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { LoopbackHttps } from './loopback-https.js';
import addressparser from 'nodemailer/lib/addressparser';
import type { IdentityStandIn } from './identity-platform.js';
import { headerValue } from './smtp-records.js';

/** Application permissions the stand-in knows about. */
export type GraphPermission = 'Mail.Send' | 'Mail.ReadWrite';

/** The operations, for script() and the request log. */
export type GraphOperation = 'sendMail' | 'messages' | 'attachments' | 'createUploadSession' | 'upload' | 'send' | 'deleteMessage';

export interface GraphLimits {
  /** Requests of one app on one mailbox in progress at once (Outlook: 4). */
  concurrentPerMailbox: number;
  /** 'mailbox': the 4 are per app and mailbox (the brief, older docs); 'app': per app. */
  concurrencyScope: 'mailbox' | 'app';
  /** Requests of one app on one mailbox in any window (Outlook: 10,000 in 10 minutes). */
  requestsPerWindow: number;
  windowMs: number;
  /** Bytes one app may upload to one mailbox in any upload window (Outlook: 150 MB in 5 min). */
  uploadBytesPerWindow: number;
  uploadWindowMs: number;
}

export interface GraphStandInOptions {
  certificate: { cert: string; key: string };
  identity: Pick<IdentityStandIn, 'verifyToken'>;
  /** Users with an Exchange Online mailbox (addresses, case-insensitive). */
  mailboxes: string[];
  /** Users who exist but have no mailbox (no licence): 404 MailboxNotEnabledForRESTAPI. */
  usersWithoutMailbox?: string[];
  /** App id -> application permissions granted (with admin consent). Absent: every app has all. */
  appPermissions?: Record<string, GraphPermission[]>;
  /** App id -> the only mailboxes it may use (New-ApplicationAccessPolicy -AccessRight RestrictAccess). */
  accessPolicy?: Record<string, string[]>;
  /** Mailbox -> other addresses it may send as. The mailbox itself always may. */
  sendAs?: Record<string, string[]>;
  limits?: Partial<GraphLimits>;
  /** Graph's limit on one request's body (4 MB). */
  maxRequestBytes?: number;
  /** A message with its attachments (Exchange's MaxSendSize; Graph's ceiling is 150 MB). */
  maxMessageBytes?: number;
  /** Smallest attachment an upload session takes (3 MB). */
  minUploadSessionBytes?: number;
  /** Largest chunk one PUT may carry ("up to 4 MB each time"). */
  maxChunkBytes?: number;
  /** Every chunk but the last must be a multiple of this (320 KiB); 1 turns the rule off. */
  chunkMultipleBytes?: number;
  /** How long an upload session's URL works (default 15 minutes). */
  uploadSessionLifetimeMs?: number;
}

export interface GraphRequestRecord {
  method: string;
  path: string;
  operation?: GraphOperation;
  mailbox?: string;
  appId?: string;
  status: number;
  /** The error code answered, if any. */
  code?: string;
  at: number;
  /** Bytes of the request body. */
  bytes: number;
}

export interface GraphAttachment {
  id: string;
  name: string;
  contentType: string;
  bytes: Buffer;
  contentId: string | undefined;
  isInline: boolean;
  /** A POST with contentBytes, or an upload session. */
  via: 'post' | 'uploadSession';
}

export interface GraphDraft {
  id: string;
  mailbox: string;
  appId: string | undefined;
  format: 'mime' | 'json';
  /** The MIME the draft was created from (empty for a JSON draft). */
  mime: Buffer;
  /** The JSON message a JSON draft was created from. */
  message?: Record<string, unknown>;
  attachments: GraphAttachment[];
  createdAt: number;
}

export interface GraphSentMessage {
  mailbox: string;
  appId: string | undefined;
  via: 'sendMail' | 'draft';
  format: 'mime' | 'json';
  /** The MIME as sent (sendMail), or the draft's MIME without its added attachments. */
  mime: Buffer;
  message?: Record<string, unknown>;
  draftId?: string;
  /** Addresses from the From, To, Cc and Bcc header fields (or the JSON), lower case. */
  from: string[];
  to: string[];
  cc: string[];
  bcc: string[];
  /** Attachments added to the draft (or in the JSON message); MIME parts stay in mime. */
  attachments: GraphAttachment[];
  saveToSentItems: boolean;
  at: number;
}

export interface GraphScriptedError {
  status: number;
  code: string;
  message: string;
  /** Sent as Retry-After (seconds). */
  retryAfterSeconds?: number;
  /** How many matching requests get it (default 1). */
  times?: number;
  mailbox?: string;
  /** Only this operation; absent: any. */
  path?: GraphOperation;
}

export const GRAPH_ERRORS = {
  tokenEmpty: 'Access token is empty.',
  tokenInvalid: 'Access token validation failure.',
  tokenAudience: 'Access token validation failure. Invalid audience.',
  tokenExpired: 'Lifetime validation failed, the token is expired.',
  accessDenied: 'Access is denied. Check credentials and try again.',
  accessPolicy: 'Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.',
  sendAsDenied: 'The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.',
  mailboxNotEnabled: 'The mailbox is either inactive, soft-deleted, or is hosted on-premise.',
  itemNotFound: 'The specified object was not found in the store.',
  invalidBase64: 'Invalid base64 string for MIME content.',
  requestTooLarge: 'The maximum request length supported is 4MB.',
  messageTooLarge: 'The message exceeds the maximum supported size.',
  meAppOnly: '/me request is only valid with delegated authentication flow.',
  unreadableJson: 'Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.',
  mailboxConcurrency: 'Application is over its MailboxConcurrency limit.',
  incomingBytes: 'Application is over its IncomingBytes limit.',
  tooManyRequests: 'Please retry again later.',
  uploadAudience: "The audience claim value is invalid 'aud'.",
} as const;

const DEFAULT_LIMITS: GraphLimits = {
  concurrentPerMailbox: 4,
  concurrencyScope: 'mailbox',
  requestsPerWindow: 10_000,
  windowMs: 600_000,
  uploadBytesPerWindow: 150 * 1024 * 1024,
  uploadWindowMs: 300_000,
};
const MIB = 1024 * 1024;
/** Graph's own resource id, in the WWW-Authenticate of its 401s. */
const GRAPH_APP_ID = '00000003-0000-0000-c000-000000000000';
const JSON_TYPE = 'application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8';
const UPLOAD_PATH = /^\/api\/v2\.0\/Users\('([^']*)'\)\/Messages\('([^']*)'\)\/AttachmentSessions\('([^']*)'\)$/i;

interface Context {
  method: string;
  path: string;
  at: number;
  requestId: string;
  clientRequestId: string;
  operation?: GraphOperation;
  mailbox?: string;
  appId?: string;
  /** The throttling key this request holds a place under while in progress. */
  held?: string;
}

interface Answer {
  status: number;
  headers?: Record<string, string>;
  json?: unknown;
  code?: string;
}

interface Body {
  bytes: Buffer;
  size: number;
  /** More than the route's limit arrived (bytes is then empty). */
  over: boolean;
}

interface UploadSession {
  id: string;
  authtoken: string;
  mailbox: string;
  appId: string | undefined;
  draftId: string;
  name: string;
  contentType: string;
  contentId: string | undefined;
  isInline: boolean;
  size: number;
  next: number;
  chunks: Buffer[];
  expiresAt: number;
}

interface PendingScript {
  error: GraphScriptedError;
  remaining: number;
}

interface Budget {
  inFlight: number;
  requests: number[];
  uploads: { at: number; bytes: number }[];
}

type Route =
  | { kind: 'graph'; operation: GraphOperation; user: string; draftId?: string }
  | { kind: 'me' }
  | { kind: 'upload'; sessionId: string }
  | { kind: 'unknown'; segment: string }
  | { kind: 'method'; allowed: string };

export class GraphStandIn {
  readonly requests: GraphRequestRecord[] = [];
  readonly sent: GraphSentMessage[] = [];
  /** Per mailbox: the most requests it had in progress at once (under one throttling key). */
  readonly maxConcurrent: Record<string, number> = {};
  /** 429s answered: over the concurrency limit, the request window, the upload budget. */
  readonly violations = { concurrency: 0, requests: 0, uploadBytes: 0 };
  /** Milliseconds every answer waits before it is sent (a place stays held meanwhile). */
  delayMs = 0;
  readonly #options: GraphStandInOptions;
  readonly #limits: GraphLimits;
  readonly #mailboxes: Set<string>;
  readonly #withoutMailbox: Set<string>;
  readonly #drafts = new Map<string, GraphDraft>();
  readonly #sessions = new Map<string, UploadSession>();
  readonly #budgets = new Map<string, Budget>();
  readonly #scripts: PendingScript[] = [];
  /** The directory object id of each mailbox's user, for Outlook's upload URLs. */
  readonly #objectIds = new Map<string, string>();
  readonly #tenantId = randomUUID();
  readonly #maxRequestBytes: number;
  readonly #maxMessageBytes: number;
  readonly #minUploadSessionBytes: number;
  readonly #maxChunkBytes: number;
  readonly #chunkMultiple: number;
  readonly #sessionLifetimeMs: number;
  #server: LoopbackHttps | undefined;

  constructor(options: GraphStandInOptions) {
    this.#options = options;
    this.#limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.#mailboxes = new Set(options.mailboxes.map((m) => m.toLowerCase()));
    this.#withoutMailbox = new Set((options.usersWithoutMailbox ?? []).map((m) => m.toLowerCase()));
    this.#maxRequestBytes = options.maxRequestBytes ?? 4 * MIB;
    this.#maxMessageBytes = options.maxMessageBytes ?? 150 * MIB;
    this.#minUploadSessionBytes = options.minUploadSessionBytes ?? 3 * MIB;
    this.#maxChunkBytes = options.maxChunkBytes ?? 4 * MIB;
    this.#chunkMultiple = Math.max(1, options.chunkMultipleBytes ?? 320 * 1024);
    this.#sessionLifetimeMs = options.uploadSessionLifetimeMs ?? 900_000;
  }

  async start(): Promise<void> {
    this.#server = await LoopbackHttps.start(this.#options.certificate, (req, res) => this.#handle(req, res));
  }

  /** https://127.0.0.1:port, Graph's root: requests go to `${url}/v1.0/...`. */
  get url(): string {
    if (!this.#server) throw new Error('GraphStandIn: not started');
    return this.#server.url;
  }

  async close(): Promise<void> {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    await server.close();
  }

  /** Drafts created and not sent or deleted yet. */
  get drafts(): GraphDraft[] {
    return [...this.#drafts.values()];
  }

  /** Upload sessions still open. */
  get uploadSessions(): number {
    return this.#sessions.size;
  }

  /** The next `times` matching requests (after authentication) get this error instead. */
  script(error: GraphScriptedError): void {
    if (error.status < 400 || error.status > 599) throw new Error(`scripted answers are errors (4xx/5xx), not ${error.status}`);
    this.#scripts.push({ error: { ...error, ...(error.mailbox !== undefined ? { mailbox: error.mailbox.toLowerCase() } : {}) }, remaining: error.times ?? 1 });
  }

  /** Scripted errors not used yet. */
  get pendingScripts(): number {
    return this.#scripts.reduce((sum, s) => sum + s.remaining, 0);
  }

  // ---- The request ------------------------------------------------------------------------

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const at = Date.now();
    const method = (req.method ?? 'GET').toUpperCase();
    const target = req.url ?? '/';
    const queryAt = target.indexOf('?');
    const rawPath = queryAt < 0 ? target : target.slice(0, queryAt);
    const query = new URLSearchParams(queryAt < 0 ? '' : target.slice(queryAt + 1));
    const route = routeOf(method, rawPath);
    const limit = route.kind === 'upload' ? this.#maxChunkBytes : this.#maxRequestBytes;
    let body: Body;
    try {
      body = await readBody(req, limit);
    } catch {
      res.destroy();
      return;
    }
    const requestId = randomUUID();
    const clientRequestId = headerString(req.headers['client-request-id']) ?? requestId;
    const ctx: Context = { method, path: rawPath, at, requestId, clientRequestId };
    let answer: Answer;
    try {
      answer = this.#answer(req, route, query, body, ctx);
    } catch (err) {
      answer = this.#error(ctx, 500, 'generalException', (err as Error).message);
    }
    this.requests.push({
      method,
      path: rawPath,
      status: answer.status,
      at,
      bytes: body.size,
      ...(ctx.operation !== undefined ? { operation: ctx.operation } : {}),
      ...(ctx.mailbox !== undefined ? { mailbox: ctx.mailbox } : {}),
      ...(ctx.appId !== undefined ? { appId: ctx.appId } : {}),
      ...(answer.code !== undefined ? { code: answer.code } : {}),
    });
    try {
      if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
      const text = answer.json === undefined ? '' : JSON.stringify(answer.json);
      res.writeHead(answer.status, {
        'request-id': requestId,
        'client-request-id': clientRequestId,
        'Cache-Control': 'no-cache',
        ...(answer.json !== undefined ? { 'Content-Type': JSON_TYPE } : {}),
        'Content-Length': Buffer.byteLength(text),
        ...answer.headers,
      });
      res.end(text);
    } finally {
      if (ctx.held !== undefined) this.#release(ctx.held);
    }
  }

  #answer(req: IncomingMessage, route: Route, query: URLSearchParams, body: Body, ctx: Context): Answer {
    if (route.kind === 'upload') return this.#upload(req, route.sessionId, query, body, ctx);
    if (route.kind === 'method') return this.#error(ctx, 405, 'BadRequest', `The HTTP method is not allowed on this resource; use ${route.allowed}.`);
    if (body.over) return this.#error(ctx, 413, 'RequestEntityTooLarge', GRAPH_ERRORS.requestTooLarge);

    // Graph checks the token before it looks at the resource.
    const token = /^Bearer\s+(.*)$/i.exec(headerString(req.headers.authorization) ?? '')?.[1]?.trim() ?? '';
    if (!token) return this.#unauthorized(ctx, GRAPH_ERRORS.tokenEmpty);
    const check = this.#options.identity.verifyToken(token, { resource: 'graph' });
    if (!check.ok) {
      const text = check.reason === 'expired' ? GRAPH_ERRORS.tokenExpired : check.reason === 'wrong_resource' ? GRAPH_ERRORS.tokenAudience : GRAPH_ERRORS.tokenInvalid;
      return this.#unauthorized(ctx, text);
    }
    const appId = check.appId;
    if (appId !== undefined) ctx.appId = appId;
    if (route.kind === 'me') return this.#error(ctx, 400, 'BadRequest', GRAPH_ERRORS.meAppOnly);
    if (route.kind === 'unknown') return this.#error(ctx, 400, 'BadRequest', `Resource not found for the segment '${route.segment}'.`);

    ctx.operation = route.operation;
    const mailbox = route.user.toLowerCase();
    if (this.#withoutMailbox.has(mailbox)) return this.#error(ctx, 404, 'MailboxNotEnabledForRESTAPI', GRAPH_ERRORS.mailboxNotEnabled);
    if (!this.#mailboxes.has(mailbox)) return this.#error(ctx, 404, 'ErrorInvalidUser', `The requested user '${route.user}' is invalid.`);
    ctx.mailbox = mailbox;
    const needed: GraphPermission = route.operation === 'sendMail' || route.operation === 'send' ? 'Mail.Send' : 'Mail.ReadWrite';
    if (!this.#granted(appId, needed)) return this.#error(ctx, 403, 'ErrorAccessDenied', GRAPH_ERRORS.accessDenied);
    if (!this.#policyAllows(appId, mailbox)) return this.#error(ctx, 403, 'ErrorAccessDenied', GRAPH_ERRORS.accessPolicy);

    const scripted = this.#scripted(route.operation, mailbox, ctx);
    if (scripted) return scripted;
    const throttled = this.#admit(ctx, appId, mailbox, ctx.method === 'DELETE' ? 0 : body.size);
    if (throttled) return throttled;

    switch (route.operation) {
      case 'sendMail':
        return this.#sendMail(req, body.bytes, ctx, mailbox, appId);
      case 'messages':
        return this.#createDraft(req, body.bytes, ctx, mailbox, appId);
      case 'attachments':
        return this.#addAttachment(body.bytes, ctx, mailbox, route.draftId ?? '');
      case 'createUploadSession':
        return this.#createUploadSession(body.bytes, ctx, mailbox, appId, route.draftId ?? '');
      case 'send':
        return this.#sendDraft(ctx, mailbox, route.draftId ?? '');
      case 'deleteMessage': {
        const draft = this.#draftOf(mailbox, route.draftId ?? '');
        if (!draft) return this.#error(ctx, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
        this.#drafts.delete(draft.id);
        for (const [id, session] of this.#sessions) if (session.draftId === draft.id) this.#sessions.delete(id);
        return { status: 204 };
      }
      case 'upload':
        return this.#error(ctx, 500, 'generalException', 'unreachable');
    }
  }

  // ---- sendMail and drafts ----------------------------------------------------------------

  #sendMail(req: IncomingMessage, body: Buffer, ctx: Context, mailbox: string, appId: string | undefined): Answer {
    const parsed = this.#parseMessageBody(req, body, ctx, true);
    if ('status' in parsed) return parsed;
    const size = parsed.mime.length + parsed.attachments.reduce((sum, a) => sum + a.bytes.length, 0);
    if (size > this.#maxMessageBytes) return this.#error(ctx, 400, 'ErrorMessageSizeExceeded', GRAPH_ERRORS.messageTooLarge);
    const refused = this.#checkSendAs(ctx, mailbox, parsed.from);
    if (refused) return refused;
    this.sent.push({
      mailbox,
      appId,
      via: 'sendMail',
      format: parsed.format,
      mime: parsed.mime,
      ...(parsed.message !== undefined ? { message: parsed.message } : {}),
      from: parsed.from,
      to: parsed.to,
      cc: parsed.cc,
      bcc: parsed.bcc,
      attachments: parsed.attachments,
      saveToSentItems: parsed.saveToSentItems,
      at: Date.now(),
    });
    return { status: 202 };
  }

  #createDraft(req: IncomingMessage, body: Buffer, ctx: Context, mailbox: string, appId: string | undefined): Answer {
    const parsed = this.#parseMessageBody(req, body, ctx, false);
    if ('status' in parsed) return parsed;
    const size = parsed.mime.length + parsed.attachments.reduce((sum, a) => sum + a.bytes.length, 0);
    if (size > this.#maxMessageBytes) return this.#error(ctx, 400, 'ErrorMessageSizeExceeded', GRAPH_ERRORS.messageTooLarge);
    const draft: GraphDraft = {
      id: exchangeId(),
      mailbox,
      appId,
      format: parsed.format,
      mime: parsed.mime,
      ...(parsed.message !== undefined ? { message: parsed.message } : {}),
      attachments: parsed.attachments,
      createdAt: Date.now(),
    };
    this.#drafts.set(draft.id, draft);
    return { status: 201, json: this.#draftResource(draft, parsed) };
  }

  #sendDraft(ctx: Context, mailbox: string, draftId: string): Answer {
    const draft = this.#draftOf(mailbox, draftId);
    if (!draft) return this.#error(ctx, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
    if (this.#draftSize(draft) > this.#maxMessageBytes) return this.#error(ctx, 400, 'ErrorMessageSizeExceeded', GRAPH_ERRORS.messageTooLarge);
    const fields = draft.format === 'mime' ? mimeFields(draft.mime) : jsonFields(draft.message ?? {});
    const refused = this.#checkSendAs(ctx, mailbox, fields.from);
    if (refused) return refused;
    this.#drafts.delete(draft.id);
    for (const [id, session] of this.#sessions) if (session.draftId === draft.id) this.#sessions.delete(id);
    this.sent.push({
      mailbox,
      appId: draft.appId,
      via: 'draft',
      format: draft.format,
      mime: draft.mime,
      ...(draft.message !== undefined ? { message: draft.message } : {}),
      draftId: draft.id,
      ...fields,
      attachments: draft.attachments,
      saveToSentItems: true,
      at: Date.now(),
    });
    return { status: 202 };
  }

  /** The body of sendMail or Create message: base64 MIME (text/plain) or JSON. */
  #parseMessageBody(req: IncomingMessage, body: Buffer, ctx: Context, sendMail: boolean): ParsedMessage | Answer {
    const type = contentType(req);
    if (type === 'text/plain') {
      const mime = decodeBase64Strict(body.toString('latin1'));
      if (!mime) return this.#error(ctx, 400, 'ErrorMimeContentInvalidBase64String', GRAPH_ERRORS.invalidBase64);
      return { format: 'mime', mime, ...mimeFields(mime), attachments: [], saveToSentItems: true };
    }
    if (type !== 'application/json') {
      return this.#error(ctx, 415, 'UnsupportedMediaType', 'Use application/json for a JSON object and text/plain for MIME content.');
    }
    const json = parseJson(body);
    if (json === unreadable) return this.#error(ctx, 400, 'BadRequest', GRAPH_ERRORS.unreadableJson);
    if (!isObject(json)) return this.#error(ctx, 400, 'BadRequest', GRAPH_ERRORS.unreadableJson);
    // sendMail wraps the message ({ message, saveToSentItems }); Create message is the message.
    const message = sendMail ? json.message : json;
    if (!isObject(message)) return this.#error(ctx, 400, 'ErrorInvalidParameter', "The value of the parameter 'Message' is empty.");
    const attachments: GraphAttachment[] = [];
    for (const item of Array.isArray(message.attachments) ? message.attachments : []) {
      const attachment = isObject(item) ? fileAttachmentOf(item, 'post') : undefined;
      if (!attachment) return this.#error(ctx, 400, 'ErrorInvalidRequest', 'Only file attachments with base64 contentBytes are supported here.');
      attachments.push(attachment);
    }
    const save = sendMail ? json.saveToSentItems : true;
    return {
      format: 'json',
      mime: Buffer.alloc(0),
      message,
      ...jsonFields(message),
      attachments,
      saveToSentItems: !(save === false || (typeof save === 'string' && save.toLowerCase() === 'false')),
    };
  }

  #checkSendAs(ctx: Context, mailbox: string, from: string[]): Answer | undefined {
    const allowed = new Set([mailbox, ...(Object.entries(this.#options.sendAs ?? {}).find(([m]) => m.toLowerCase() === mailbox)?.[1] ?? []).map((a) => a.toLowerCase())]);
    if (from.some((address) => !allowed.has(address))) return this.#error(ctx, 403, 'ErrorSendAsDenied', GRAPH_ERRORS.sendAsDenied);
    return undefined;
  }

  /** A message resource for the 201, shortened as the documentation's examples are. */
  #draftResource(draft: GraphDraft, parsed: ParsedMessage): Record<string, unknown> {
    const now = graphDate(new Date(draft.createdAt));
    const people = (list: { name: string; address: string }[]) => list.map((p) => ({ emailAddress: { name: p.name || p.address, address: p.address } }));
    const from = parsed.named.from[0];
    const internetMessageId = draft.format === 'mime' ? headerValue(draft.mime, 'message-id') : undefined;
    return {
      '@odata.context': `${this.url}/v1.0/$metadata#users('${encodeURIComponent(draft.mailbox)}')/messages/$entity`,
      '@odata.etag': `W/"${randomBytes(20).toString('base64')}"`,
      id: draft.id,
      createdDateTime: now,
      lastModifiedDateTime: now,
      changeKey: randomBytes(20).toString('base64'),
      categories: [],
      receivedDateTime: now,
      sentDateTime: now,
      hasAttachments: draft.attachments.length > 0,
      internetMessageId: internetMessageId ?? `<${randomBytes(8).toString('hex').toUpperCase()}@STANDIN.namprd00.prod.outlook.com>`,
      subject: parsed.subject,
      importance: 'normal',
      isRead: true,
      isDraft: true,
      ...(from ? { sender: people([from])[0], from: people([from])[0] } : {}),
      toRecipients: people(parsed.named.to),
      ccRecipients: people(parsed.named.cc),
      bccRecipients: people(parsed.named.bcc),
      replyTo: [],
      flag: { flagStatus: 'notFlagged' },
    };
  }

  #draftOf(mailbox: string, draftId: string): GraphDraft | undefined {
    const draft = this.#drafts.get(draftId);
    return draft && draft.mailbox === mailbox ? draft : undefined;
  }

  #draftSize(draft: GraphDraft, adding = 0): number {
    return draft.mime.length + draft.attachments.reduce((sum, a) => sum + a.bytes.length, 0) + adding;
  }

  // ---- Attachments --------------------------------------------------------------------------

  #addAttachment(body: Buffer, ctx: Context, mailbox: string, draftId: string): Answer {
    const draft = this.#draftOf(mailbox, draftId);
    if (!draft) return this.#error(ctx, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
    const json = parseJson(body);
    if (json === unreadable) return this.#error(ctx, 400, 'BadRequest', GRAPH_ERRORS.unreadableJson);
    const attachment = isObject(json) ? fileAttachmentOf(json, 'post') : undefined;
    if (!attachment) return this.#error(ctx, 400, 'ErrorInvalidRequest', 'Only file attachments with a name and base64 contentBytes are supported here.');
    if (this.#draftSize(draft, attachment.bytes.length) > this.#maxMessageBytes) {
      return this.#error(ctx, 400, 'ErrorMessageSizeExceeded', GRAPH_ERRORS.messageTooLarge);
    }
    draft.attachments.push(attachment);
    return {
      status: 201,
      json: {
        '@odata.context': `${this.url}/v1.0/$metadata#users('${encodeURIComponent(mailbox)}')/messages('${draft.id}')/attachments/$entity`,
        '@odata.type': '#microsoft.graph.fileAttachment',
        '@odata.mediaContentType': attachment.contentType,
        id: attachment.id,
        lastModifiedDateTime: graphDate(new Date()),
        name: attachment.name,
        contentType: attachment.contentType,
        size: attachment.bytes.length,
        isInline: attachment.isInline,
        contentId: attachment.contentId ?? null,
        contentLocation: null,
        contentBytes: attachment.bytes.toString('base64'),
      },
    };
  }

  #createUploadSession(body: Buffer, ctx: Context, mailbox: string, appId: string | undefined, draftId: string): Answer {
    const draft = this.#draftOf(mailbox, draftId);
    if (!draft) return this.#error(ctx, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
    const json = parseJson(body);
    if (json === unreadable) return this.#error(ctx, 400, 'BadRequest', GRAPH_ERRORS.unreadableJson);
    const item = isObject(json) ? json.AttachmentItem : undefined;
    if (!isObject(item) || typeof item.name !== 'string' || !item.name || typeof item.size !== 'number' || !Number.isInteger(item.size) || item.size < 0) {
      return this.#error(ctx, 400, 'ErrorInvalidRequest', 'AttachmentItem needs at least attachmentType, name and size.');
    }
    if (item.attachmentType !== undefined && String(item.attachmentType).toLowerCase() !== 'file') {
      return this.#error(ctx, 400, 'ErrorInvalidRequest', 'Only file attachments can be uploaded in a session.');
    }
    if (item.size < this.#minUploadSessionBytes) {
      return this.#error(ctx, 400, 'ErrorAttachmentSizeShouldNotBeLessThanMinimumSize', 'Attachment size should not be less than the minimum size of an upload session (3 MB).');
    }
    if (this.#draftSize(draft, item.size) > this.#maxMessageBytes) return this.#error(ctx, 400, 'ErrorMessageSizeExceeded', GRAPH_ERRORS.messageTooLarge);
    const session: UploadSession = {
      id: exchangeId(),
      authtoken: randomBytes(32).toString('base64url'),
      mailbox,
      appId,
      draftId: draft.id,
      name: item.name,
      contentType: typeof item.contentType === 'string' && item.contentType ? item.contentType : 'application/octet-stream',
      contentId: typeof item.contentId === 'string' && item.contentId ? item.contentId : undefined,
      isInline: item.isInline === true,
      size: item.size,
      next: 0,
      chunks: [],
      expiresAt: Date.now() + this.#sessionLifetimeMs,
    };
    this.#sessions.set(session.id, session);
    return {
      status: 201,
      json: {
        '@odata.context': `${this.url}/v1.0/$metadata#microsoft.graph.uploadSession`,
        uploadUrl: `${this.#sessionUrl(session)}?authtoken=${session.authtoken}`,
        expirationDateTime: outlookDate(session.expiresAt),
        nextExpectedRanges: ['0-'],
      },
    };
  }

  /** Outlook's URL for the session, as createUploadSession's examples show it. */
  #sessionUrl(session: UploadSession): string {
    return `${this.url}/api/v2.0/${this.#messagePath(session)}/AttachmentSessions('${session.id}')`;
  }

  /** "Users('{object id}@{tenant id}')/Messages('{id}')", Outlook's name for the draft. */
  #messagePath(session: UploadSession): string {
    let objectId = this.#objectIds.get(session.mailbox);
    if (!objectId) {
      objectId = randomUUID();
      this.#objectIds.set(session.mailbox, objectId);
    }
    return `Users('${objectId}@${this.#tenantId}')/Messages('${session.draftId}')`;
  }

  /** PUT (a range of bytes) or DELETE (cancel) on an uploadUrl. */
  #upload(req: IncomingMessage, sessionId: string, query: URLSearchParams, body: Body, ctx: Context): Answer {
    ctx.operation = 'upload';
    // The URL carries its own token; a Graph token in the header is for the wrong audience.
    if (headerString(req.headers.authorization)) return this.#error(ctx, 401, 'InvalidAudience', GRAPH_ERRORS.uploadAudience);
    const session = this.#sessions.get(sessionId);
    if (!session || session.expiresAt <= Date.now()) {
      if (session) this.#sessions.delete(sessionId);
      return this.#error(ctx, 404, 'itemNotFound', 'Upload session not found.', { innerCode: 'uploadSessionNotFound' });
    }
    if (query.get('authtoken') !== session.authtoken) return this.#error(ctx, 401, 'InvalidAuthenticationToken', GRAPH_ERRORS.tokenInvalid);
    ctx.mailbox = session.mailbox;
    if (session.appId !== undefined) ctx.appId = session.appId;

    const scripted = this.#scripted('upload', session.mailbox, ctx);
    if (scripted) return scripted;
    if (ctx.method === 'DELETE') {
      this.#sessions.delete(session.id);
      return { status: 204 };
    }
    if (body.over) {
      return this.#error(ctx, 413, 'invalidRequest', `A fragment may carry at most ${this.#maxChunkBytes} bytes.`, { innerCode: 'maxFragmentLengthExceeded' });
    }
    const throttled = this.#admit(ctx, session.appId, session.mailbox, body.size);
    if (throttled) return throttled;

    const range = /^bytes\s+(\d+)-(\d+)\/(\d+)$/i.exec(headerString(req.headers['content-range'])?.trim() ?? '');
    if (!range) return this.#error(ctx, 400, 'invalidRequest', 'The Content-Range header is missing or is not "bytes {start}-{end}/{total}".');
    const start = Number(range[1]);
    const end = Number(range[2]);
    const total = Number(range[3]);
    if (total !== session.size) {
      return this.#error(ctx, 400, 'invalidRequest', 'Declared total size for this fragment is different from that of the upload session.', {
        innerCode: 'fragmentLengthMismatch',
      });
    }
    if (start !== session.next) {
      return start < session.next
        ? this.#error(ctx, 416, 'invalidRange', 'Uploaded fragment overlaps with existing data.', { innerCode: 'fragmentOverlap' })
        : this.#error(ctx, 416, 'invalidRange', 'Uploaded fragment is out of order.', { innerCode: 'fragmentOutOfOrder' });
    }
    if (end < start || end >= total) return this.#error(ctx, 416, 'invalidRange', 'The specified byte range is invalid or unavailable.');
    const length = end - start + 1;
    if (body.size !== length) return this.#error(ctx, 400, 'invalidRequest', `Content-Range names ${length} bytes but the request carries ${body.size}.`);
    const last = end + 1 === total;
    if (!last && length % this.#chunkMultiple !== 0) {
      return this.#error(ctx, 400, 'invalidRequest', `Every fragment but the last must be a multiple of ${this.#chunkMultiple} bytes (320 KiB).`, { innerCode: 'invalidRange' });
    }
    session.chunks.push(body.bytes);
    session.next = end + 1;
    if (!last) {
      return {
        status: 200,
        json: {
          '@odata.context': `${this.url}/api/v2.0/$metadata#${this.#messagePath(session)}/AttachmentSessions/$entity`,
          ExpirationDateTime: outlookDate(session.expiresAt),
          nextExpectedRanges: [String(session.next)],
        },
      };
    }
    this.#sessions.delete(session.id);
    const draft = this.#drafts.get(session.draftId);
    if (!draft) return this.#error(ctx, 404, 'ErrorItemNotFound', GRAPH_ERRORS.itemNotFound);
    const attachment: GraphAttachment = {
      id: exchangeId(),
      name: session.name,
      contentType: session.contentType,
      bytes: Buffer.concat(session.chunks),
      contentId: session.contentId,
      isInline: session.isInline,
      via: 'uploadSession',
    };
    draft.attachments.push(attachment);
    const location = `${this.url}/api/v2.0/${this.#messagePath(session)}/Attachments('${attachment.id}')`;
    return { status: 201, headers: { Location: location } };
  }

  // ---- Permissions, scripts, limits --------------------------------------------------------

  #granted(appId: string | undefined, permission: GraphPermission): boolean {
    const table = this.#options.appPermissions;
    if (!table) return true;
    const granted = Object.entries(table).find(([app]) => app.toLowerCase() === appId?.toLowerCase())?.[1] ?? [];
    return granted.includes(permission);
  }

  #policyAllows(appId: string | undefined, mailbox: string): boolean {
    const policy = Object.entries(this.#options.accessPolicy ?? {}).find(([app]) => app.toLowerCase() === appId?.toLowerCase())?.[1];
    return !policy || policy.some((m) => m.toLowerCase() === mailbox);
  }

  #scripted(operation: GraphOperation, mailbox: string, ctx: Context): Answer | undefined {
    const index = this.#scripts.findIndex((s) => (s.error.path === undefined || s.error.path === operation) && (s.error.mailbox === undefined || s.error.mailbox === mailbox));
    const pending = this.#scripts[index];
    if (!pending) return undefined;
    if (--pending.remaining <= 0) this.#scripts.splice(index, 1);
    const { status, code, message, retryAfterSeconds } = pending.error;
    return this.#error(ctx, status, code, message, retryAfterSeconds !== undefined ? { retryAfter: retryAfterSeconds } : {});
  }

  /** Takes a place for the request, or answers 429 if a limit says no. */
  #admit(ctx: Context, appId: string | undefined, mailbox: string, uploadBytes: number): Answer | undefined {
    const limits = this.#limits;
    const app = (appId ?? '').toLowerCase();
    const key = limits.concurrencyScope === 'app' ? app : `${app}\n${mailbox}`;
    const windowKey = `${app}\n${mailbox}`;
    const now = Date.now();
    const concurrency = this.#budget(key);
    if (concurrency.inFlight >= limits.concurrentPerMailbox) {
      this.violations.concurrency++;
      return this.#error(ctx, 429, 'ApplicationThrottled', GRAPH_ERRORS.mailboxConcurrency, { retryAfter: 1 });
    }
    const budget = this.#budget(windowKey);
    // Oldest first, so trimming the front is enough (the bench makes thousands of requests).
    while (budget.requests.length > 0 && now - budget.requests[0]! >= limits.windowMs) budget.requests.shift();
    if (budget.requests.length >= limits.requestsPerWindow) {
      this.violations.requests++;
      const wait = Math.max(1, Math.ceil((budget.requests[0]! + limits.windowMs - now) / 1000));
      return this.#error(ctx, 429, 'TooManyRequests', GRAPH_ERRORS.tooManyRequests, { retryAfter: wait, innerCode: '429', innerMessage: 'Please retry after', innerStatus: '429' });
    }
    while (budget.uploads.length > 0 && now - budget.uploads[0]!.at >= limits.uploadWindowMs) budget.uploads.shift();
    const uploaded = budget.uploads.reduce((sum, u) => sum + u.bytes, 0);
    if (uploadBytes > 0 && uploaded >= limits.uploadBytesPerWindow) {
      this.violations.uploadBytes++;
      // Wait until enough of the window's bytes have aged out to be under budget again.
      let left = uploaded;
      let until = now;
      for (const u of budget.uploads) {
        left -= u.bytes;
        until = u.at + limits.uploadWindowMs;
        if (left < limits.uploadBytesPerWindow) break;
      }
      return this.#error(ctx, 429, 'ApplicationThrottled', GRAPH_ERRORS.incomingBytes, { retryAfter: Math.max(1, Math.ceil((until - now) / 1000)) });
    }
    budget.requests.push(now);
    if (uploadBytes > 0) budget.uploads.push({ at: now, bytes: uploadBytes });
    concurrency.inFlight++;
    ctx.held = key;
    this.maxConcurrent[mailbox] = Math.max(this.maxConcurrent[mailbox] ?? 0, concurrency.inFlight);
    return undefined;
  }

  #budget(key: string): Budget {
    let budget = this.#budgets.get(key);
    if (!budget) {
      budget = { inFlight: 0, requests: [], uploads: [] };
      this.#budgets.set(key, budget);
    }
    return budget;
  }

  #release(key: string): void {
    const budget = this.#budgets.get(key);
    if (budget && budget.inFlight > 0) budget.inFlight--;
  }

  // ---- Answers ------------------------------------------------------------------------------

  #unauthorized(ctx: Context, message: string): Answer {
    const answer = this.#error(ctx, 401, 'InvalidAuthenticationToken', message);
    answer.headers = {
      ...answer.headers,
      'WWW-Authenticate': `Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="${GRAPH_APP_ID}"`,
    };
    return answer;
  }

  #error(
    ctx: Context,
    status: number,
    code: string,
    message: string,
    extra: { retryAfter?: number; innerCode?: string; innerMessage?: string; innerStatus?: string } = {},
  ): Answer {
    return {
      status,
      code,
      ...(extra.retryAfter !== undefined ? { headers: { 'Retry-After': String(extra.retryAfter) } } : {}),
      json: {
        error: {
          code,
          message,
          innerError: {
            ...(extra.innerCode !== undefined ? { code: extra.innerCode } : {}),
            ...(extra.innerMessage !== undefined ? { message: extra.innerMessage } : {}),
            ...(extra.innerStatus !== undefined ? { status: extra.innerStatus } : {}),
            date: new Date().toISOString().slice(0, 19),
            'request-id': ctx.requestId,
            'client-request-id': ctx.clientRequestId,
          },
        },
      },
    };
  }
}

// ---- Helpers ----------------------------------------------------------------------------------

interface NamedAddress {
  name: string;
  address: string;
}

interface MessageFields {
  from: string[];
  to: string[];
  cc: string[];
  bcc: string[];
}

interface ParsedMessage extends MessageFields {
  format: 'mime' | 'json';
  mime: Buffer;
  message?: Record<string, unknown>;
  attachments: GraphAttachment[];
  saveToSentItems: boolean;
  subject?: string;
  named: { from: NamedAddress[]; to: NamedAddress[]; cc: NamedAddress[]; bcc: NamedAddress[] };
}

/** Which operation a path is, from its raw (still percent-encoded) segments. */
function routeOf(method: string, rawPath: string): Route {
  const segments = rawPath.split('/').slice(1).map(safeDecode);
  const decoded = `/${segments.join('/')}`;
  const session = UPLOAD_PATH.exec(decoded);
  if (session) return method === 'PUT' || method === 'DELETE' ? { kind: 'upload', sessionId: session[3]! } : { kind: 'method', allowed: 'PUT or DELETE' };
  if (segments[0] !== 'v1.0') return { kind: 'unknown', segment: segments[0] ?? '' };
  if (segments[1]?.toLowerCase() === 'me') return { kind: 'me' };
  if (segments[1]?.toLowerCase() !== 'users' || !segments[2]) return { kind: 'unknown', segment: segments[1] ?? '' };
  const user = segments[2];
  const rest = segments.slice(3).map((s, i) => (i === 1 ? s : s.toLowerCase()));
  const post = (operation: GraphOperation, draftId?: string): Route =>
    method === 'POST' ? { kind: 'graph', operation, user, ...(draftId !== undefined ? { draftId } : {}) } : { kind: 'method', allowed: 'POST' };
  if (rest.length === 1 && rest[0] === 'sendmail') return post('sendMail');
  if (rest[0] === 'messages') {
    const draftId = rest[1];
    if (rest.length === 1) return post('messages');
    if (rest.length === 2 && draftId) {
      return method === 'DELETE' ? { kind: 'graph', operation: 'deleteMessage', user, draftId } : { kind: 'method', allowed: 'DELETE' };
    }
    if (rest.length === 3 && draftId && rest[2] === 'send') return post('send', draftId);
    if (rest.length === 3 && draftId && rest[2] === 'attachments') return post('attachments', draftId);
    if (rest.length === 4 && draftId && rest[2] === 'attachments' && rest[3] === 'createuploadsession') return post('createUploadSession', draftId);
  }
  return { kind: 'unknown', segment: segments[segments.length - 1] ?? '' };
}

function safeDecode(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function readBody(req: IncomingMessage, limit: number): Promise<Body> {
  return new Promise((resolve, reject) => {
    let chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        // Keep reading, so that the answer reaches a client still sending, but keep nothing.
        over = true;
        chunks = [];
      } else chunks.push(chunk);
    });
    req.on('end', () => resolve({ bytes: over ? Buffer.alloc(0) : Buffer.concat(chunks), size, over }));
    req.on('error', reject);
  });
}

function headerString(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}

function contentType(req: IncomingMessage): string {
  return (headerString(req.headers['content-type']) ?? '').split(';')[0]!.trim().toLowerCase();
}

/** Base64 as Graph takes it: line breaks allowed, nothing else outside the alphabet. */
function decodeBase64Strict(text: string): Buffer | undefined {
  const compact = text.replace(/[\r\n\t ]+/g, '');
  if (!compact || compact.length % 4 !== 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(compact)) return undefined;
  return Buffer.from(compact, 'base64');
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function named(value: string | undefined): NamedAddress[] {
  if (value === undefined) return [];
  return addressparser(value, { flatten: true })
    .filter((entry): entry is { name: string; address: string } => typeof entry.address === 'string' && entry.address !== '')
    .map((entry) => ({ name: entry.name, address: entry.address }));
}

/** From, To, Cc, Bcc and Subject from a MIME message's header. */
function mimeFields(mime: Buffer): MessageFields & { subject?: string; named: ParsedMessage['named'] } {
  const list = {
    from: named(headerValue(mime, 'from')),
    to: named(headerValue(mime, 'to')),
    cc: named(headerValue(mime, 'cc')),
    bcc: named(headerValue(mime, 'bcc')),
  };
  const subject = headerValue(mime, 'subject');
  return {
    from: list.from.map((a) => a.address.toLowerCase()),
    to: list.to.map((a) => a.address.toLowerCase()),
    cc: list.cc.map((a) => a.address.toLowerCase()),
    bcc: list.bcc.map((a) => a.address.toLowerCase()),
    ...(subject !== undefined ? { subject } : {}),
    named: list,
  };
}

/** The same from a JSON message resource (toRecipients: [{ emailAddress: { address } }]…). */
function jsonFields(message: Record<string, unknown>): MessageFields & { subject?: string; named: ParsedMessage['named'] } {
  const people = (value: unknown): NamedAddress[] =>
    (Array.isArray(value) ? value : value === undefined ? [] : [value]).flatMap((r) => {
      const email = isObject(r) && isObject(r.emailAddress) ? r.emailAddress : undefined;
      return email && typeof email.address === 'string' ? [{ name: typeof email.name === 'string' ? email.name : '', address: email.address }] : [];
    });
  const list = { from: people(message.from), to: people(message.toRecipients), cc: people(message.ccRecipients), bcc: people(message.bccRecipients) };
  return {
    from: list.from.map((a) => a.address.toLowerCase()),
    to: list.to.map((a) => a.address.toLowerCase()),
    cc: list.cc.map((a) => a.address.toLowerCase()),
    bcc: list.bcc.map((a) => a.address.toLowerCase()),
    ...(typeof message.subject === 'string' ? { subject: message.subject } : {}),
    named: list,
  };
}

/** A fileAttachment resource ({ '@odata.type', name, contentType, contentBytes, … }). */
function fileAttachmentOf(item: Record<string, unknown>, via: GraphAttachment['via']): GraphAttachment | undefined {
  const type = String(item['@odata.type'] ?? '').replace(/^#/, '').toLowerCase();
  if (type !== 'microsoft.graph.fileattachment') return undefined;
  if (typeof item.name !== 'string' || typeof item.contentBytes !== 'string') return undefined;
  const bytes = decodeBase64Strict(item.contentBytes) ?? (item.contentBytes === '' ? Buffer.alloc(0) : undefined);
  if (!bytes) return undefined;
  return {
    id: exchangeId(),
    name: item.name,
    contentType: typeof item.contentType === 'string' && item.contentType ? item.contentType : 'application/octet-stream',
    bytes,
    contentId: typeof item.contentId === 'string' && item.contentId ? item.contentId : undefined,
    isInline: item.isInline === true,
    via,
  };
}

/** An Exchange item id ("AAMkAD…AAA="): base64, URL-safe here so it needs no escaping but '='. */
function exchangeId(): string {
  return `AAMkAD${randomBytes(30).toString('base64url')}AAA=`;
}

/** "2017-07-22T01:53:56Z", how Graph writes a message's times. */
function graphDate(date: Date): string {
  return `${date.toISOString().slice(0, 19)}Z`;
}

/** "2019-09-25T01:09:30.7671707Z", how Outlook writes an upload session's expiry. */
function outlookDate(ms: number): string {
  return new Date(ms).toISOString().replace(/\.(\d{3})Z$/, '.$10000Z');
}

/** What parseJson gives for a body that is not JSON. */
const unreadable = Symbol('unreadable');

function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8')) as unknown;
  } catch {
    return unreadable;
  }
}
