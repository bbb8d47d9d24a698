// Microsoft 365 over Microsoft Graph (`type = "microsoft365"`, `method = "graph"`): the message is
// handed to Exchange Online through the REST API instead of SMTP, for tenants where SMTP AUTH is
// switched off entirely. The app needs the Mail.Send application permission (admin consent), and
// Mail.ReadWrite for messages over 3 MB (they go through a draft); an application access policy
// can narrow both to some mailboxes.
//
// Per message, as the mailbox (configured, or the envelope sender's):
//   - up to 3 MB: POST /users/{mailbox}/sendMail with the MIME message, base64, as text/plain
//     (Graph's 4 MB request limit, and base64 adds a third). One request.
//   - larger (up to the tenant's limit, 150 MB at most): a draft made of the message without its
//     attachments (POST /users/{mailbox}/messages, MIME), each attachment added to it (under 3 MB
//     in one request with its bytes; from 3 MB through an upload session, in chunks), then
//     POST .../send. The draft is deleted when a step fails, so a retry does not leave copies.
//
// Graph sends to the addresses in the message's To, Cc and Bcc header fields: it has no envelope.
// So the envelope's recipients that the headers do not name (Bcc'd by the client) are added as a
// Bcc field, and a message whose headers name someone who is not among this delivery's recipients
// (a recipient already delivered, or routed elsewhere) is not sent through Graph: it would reach
// them again. It is deferred with that reason, for a fallback or an SMTP upstream to take.
//
// Limits (send-limits.ts): 10,000 requests per 10 minutes per mailbox, and 4 requests at once (a
// semaphore here, for the whole app: Graph's throttling page counts the 4 per app since 2024, per
// mailbox before; per app keeps within both). Answers: 202 delivered; 429 and 503 wait for Retry-After; 401 gets
// one fresh token, then is the configuration; 403 (no Mail.Send, no consent, an access policy) and
// 404 (no such mailbox, or no Exchange Online licence) are the configuration; 413 is too big for
// the tenant and bounces.
import { Agent } from 'node:https';
import { buffer } from 'node:stream/consumers';
// mailparser and MailComposer are loaded when a large message first needs them: 28 MB of RSS
// that a Postern without a Graph upstream (or without large messages) should not carry.
import type { AddressObject, Attachment, ParsedMail } from 'mailparser';
import type { Logger } from '../../observe/logger.js';
import { deliveryError, withoutStatus } from '../delivery-error.js';
import { mailboxAddresses } from '../../mail/addresses.js';
import { headerSectionEnd } from '../../mail/header-section.js';
import type { DeliveryJob, DeliveryOutcome, DeliveryTarget, RecipientResult } from '../delivery-target.js';
import type { ConnectionPool, PoolLease } from '../connection-pool.js';
import { TokenFailure } from '../smtp-session.js';
import { type HttpsAnswer, httpsRequest, jsonBody } from './https-client.js';
import type { TokenSource } from './oauth2-tokens.js';
import { MailboxGate, type Outcome, forAll } from './mailbox-gate.js';
import type { WindowLimit } from './send-limits.js';
import type { UpstreamContext } from './smtp-upstream.js';

export interface GraphUpstreamSpec {
  name: string;
  /** "https://graph.microsoft.com" (or a national cloud's, or a stand-in). */
  graphUrl: string;
  ca: string | undefined;
  tokens: TokenSource;
  mailbox: string | undefined;
  /** Requests per window per mailbox. */
  limits: readonly WindowLimit[];
  /** Requests at once, for the whole app (Graph: 4). */
  concurrentRequests: number;
  /** The app ("tenant/client_id"): upstreams of one app share its request slots. */
  app: string;
}

/** MIME up to this size goes in one sendMail request: base64 makes it 3.87 MB, under Graph's 4 MB. */
const SEND_MAIL_MAX_BYTES = 2_900_000;
/** Large messages are read and parsed in memory: this many at once per upstream (35 MB each, copied twice). */
const LARGE_AT_ONCE = 2;
/** Attachments from this size go through an upload session (Graph: 3 MB). */
const UPLOAD_SESSION_FROM_BYTES = 3 * 1024 * 1024;
/** Upload chunk: a multiple of 320 KiB, under Graph's 4 MB per request. */
const UPLOAD_CHUNK_BYTES = 10 * 320 * 1024;

type GraphVerdict =
  | { status: 'delivered' }
  | { status: 'deferred'; retryAt?: number; hold?: 'mailbox' | 'upstream'; problem?: string; advice?: string; renewToken?: boolean }
  | { status: 'failed' };

export class GraphUpstreamTarget implements DeliveryTarget {
  readonly key: string;
  readonly name: string;
  readonly description: string;
  readonly #spec: GraphUpstreamSpec;
  readonly #timeoutMs: number;
  readonly #log: Logger | undefined;
  readonly #now: () => number;
  readonly #gate: MailboxGate;
  readonly #agent: Agent;
  /**
   * Graph requests take slots of the delivery pool: keyed by app, since Graph counts concurrent
   * requests per app and two [[upstream]] tables for one app registration share them; and large
   * messages (read, parsed and uploaded in memory) per upstream.
   */
  readonly #pool: ConnectionPool;
  readonly #requestsKey: string;
  readonly #largeKey: string;

  constructor(spec: GraphUpstreamSpec, context: UpstreamContext) {
    this.#spec = spec;
    this.name = spec.name;
    this.key = `upstream:${spec.name.toLowerCase()}`;
    this.description = `upstream ${spec.name} (Microsoft Graph ${new URL(spec.graphUrl).host})`;
    this.#timeoutMs = context.connectTimeout + context.commandTimeout * 4;
    this.#log = context.logger?.child({ component: 'upstream', upstream: spec.name });
    this.#now = context.now ?? Date.now;
    this.#gate = new MailboxGate({ name: spec.name, mailbox: spec.mailbox, limits: spec.limits, log: this.#log, now: this.#now, events: context.events });
    this.#agent = new Agent({ keepAlive: true, maxSockets: 16 });
    this.#pool = context.pool;
    this.#requestsKey = `graph-app:${spec.app.toLowerCase()}`;
    this.#largeKey = `graph-large:${spec.name.toLowerCase()}`;
  }

  /** A pool slot for `key`, or undefined when the signal fired first (shutdown). */
  async #slot(key: string, limit: number, signal: AbortSignal | undefined): Promise<PoolLease | undefined> {
    try {
      return await this.#pool.acquire(key, signal, limit);
    } catch (err) {
      if (signal?.aborted) return undefined;
      throw err;
    }
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    const all = (outcome: Outcome) => forAll(job, outcome);
    const opened = this.#gate.open(job);
    if ('results' in opened) return opened.results;
    const { mailbox } = opened;

    // A large message is held in memory while it is parsed and uploaded: a few at a time.
    const large = job.size > SEND_MAIL_MAX_BYTES ? await this.#slot(this.#largeKey, LARGE_AT_ONCE, job.signal) : null;
    if (large === undefined) return all(interrupted());
    try {
      return await this.#deliverRead(job, mailbox, all);
    } finally {
      large?.release();
    }
  }

  async #deliverRead(
    job: DeliveryJob,
    mailbox: string,
    all: (outcome: Outcome) => RecipientResult[],
  ): Promise<RecipientResult[]> {
    let prepared: ReturnType<typeof withEnvelopeRecipients>;
    try {
      prepared = withEnvelopeRecipients(await buffer(job.body()), job.recipients.map((r) => r.address));
    } catch (err) {
      return all(deliveryError('BODY_UNREADABLE', { reason: (err as Error).message }).toOutcome());
    }
    if ('stranger' in prepared) {
      const failure = deliveryError('GRAPH_RECIPIENTS', { destination: `upstream ${this.name}`, address: prepared.stranger }).toOutcome();
      this.#gate.holds.problem(mailbox, 'graph_recipients', failure, `a message names ${prepared.stranger} in its header but not as a recipient of this delivery; Graph would send it there too: route such mail over SMTP (method = "smtp") or give this upstream a fallback`);
      return all({ ...failure, configurationProblem: 'graph_recipients' });
    }

    const small = prepared.mime.length <= SEND_MAIL_MAX_BYTES;
    const requests = small ? 1 : 3 + Math.ceil(prepared.mime.length / UPLOAD_CHUNK_BYTES);
    const recipients = new Set(job.recipients.map((r) => r.address.toLowerCase())).size;
    const waiting = await this.#gate.turn(job, mailbox, recipients, requests);
    if (waiting) return waiting;
    const startedAt = this.#now();
    let verdict: GraphVerdict & { response: string; enhanced: string };
    try {
      verdict = await this.#send(mailbox, prepared.mime, small, job.signal);
    } finally {
      this.#gate.settle(mailbox, job);
    }
    const where = { remoteMta: new URL(this.#spec.graphUrl).host };
    if (verdict.status === 'delivered') {
      this.#gate.holds.recovered(mailbox, startedAt);
      return all({ status: 'delivered', code: null, enhanced: '2.0.0', response: verdict.response, ...where });
    }
    const outcome: DeliveryOutcome & { configurationProblem?: string } = {
      status: verdict.status,
      code: null,
      enhanced: verdict.enhanced,
      response: verdict.response,
      ...where,
      ...(verdict.status === 'deferred' && verdict.problem && !verdict.retryAt ? { configurationProblem: verdict.problem } : {}),
    };
    if (verdict.status === 'deferred') {
      if (verdict.hold && verdict.problem && verdict.advice) this.#gate.holds.hold(verdict.hold === 'mailbox' ? mailbox : '', verdict.problem, outcome, verdict.advice);
      else if (verdict.problem && verdict.advice) this.#gate.holds.problem(mailbox, verdict.problem, outcome, verdict.advice);
      if (verdict.retryAt) {
        this.#gate.holds.pause(mailbox, verdict.retryAt, outcome);
        return all({ ...outcome, retryAt: verdict.retryAt });
      }
    }
    return all(outcome);
  }

  /** One attempt, with one fresh token if Graph refused the first. */
  async #send(mailbox: string, mime: Buffer, small: boolean, signal: AbortSignal | undefined): Promise<GraphVerdict & { response: string; enhanced: string }> {
    for (let renew = false; ; renew = true) {
      let token: string;
      try {
        token = await this.#spec.tokens.token(mailbox, renew);
      } catch (err) {
        if (!(err instanceof TokenFailure)) throw err;
        const hold = err.problem === 'token_refused' ? ('upstream' as const) : undefined;
        return {
          status: 'deferred',
          response: err.outcome.response,
          enhanced: err.outcome.enhanced,
          ...(hold ? { hold, problem: 'token_refused', advice: `fix the app's credentials (${withoutStatus(err.outcome.response)}), then restart Postern` } : {}),
        };
      }
      const request = await this.#slot(this.#requestsKey, this.#spec.concurrentRequests, signal);
      if (!request) return interrupted();
      let answer: HttpsAnswer | { error: Error };
      try {
        answer = small ? await this.#sendMail(mailbox, mime, token, signal) : await this.#sendLarge(mailbox, mime, token, signal);
        // Over Graph's request size after all: the draft path takes it in parts.
        if (small && answer.status === 413) answer = await this.#sendLarge(mailbox, mime, token, signal);
      } catch (err) {
        answer = { error: err as Error };
      } finally {
        request.release();
      }
      if (signal?.aborted) return interrupted();
      if ('error' in answer) {
        const e = deliveryError('GRAPH_UNAVAILABLE', { reason: answer.error.message });
        return { status: 'deferred', response: e.response, enhanced: e.enhanced };
      }
      const verdict = this.#verdict(answer, mailbox, !small);
      if (verdict.status === 'deferred' && verdict.renewToken && !renew) continue;
      return verdict;
    }
  }

  #sendMail(mailbox: string, mime: Buffer, token: string, signal: AbortSignal | undefined): Promise<HttpsAnswer> {
    return this.#call('POST', `/v1.0/users/${encodeURIComponent(mailbox)}/sendMail`, token, { 'content-type': 'text/plain' }, mime.toString('base64'), signal);
  }

  /**
   * Draft, attachments, send. The draft is deleted if a step fails (with a fresh token when the
   * old one was refused), so a retry does not leave a copy in Drafts; a draft that cannot be
   * deleted is logged with its id.
   */
  async #sendLarge(mailbox: string, mime: Buffer, token: string, signal: AbortSignal | undefined): Promise<HttpsAnswer> {
    const user = `/v1.0/users/${encodeURIComponent(mailbox)}`;
    const { simpleParser } = await import('mailparser');
    const parsed = await simpleParser(mime, { skipHtmlToText: true, skipTextToHtml: true, skipTextLinks: true, skipImageLinks: true });
    const draftMime = await composeWithoutAttachments(parsed);
    const created = await this.#call('POST', `${user}/messages`, token, { 'content-type': 'text/plain' }, draftMime.toString('base64'), signal);
    if (created.status !== 201) return created;
    const id = String(jsonBody(created)?.id ?? '');
    if (!id) throw new Error('Graph created a draft without an id');
    const draft = `${user}/messages/${encodeURIComponent(id)}`;
    let sent = false;
    try {
      for (const attachment of parsed.attachments) {
        const answer =
          attachment.size >= UPLOAD_SESSION_FROM_BYTES ? await this.#upload(draft, attachment, token, signal) : await this.#attach(draft, attachment, token, signal);
        if (answer.status !== 201 && answer.status !== 200) return answer;
      }
      const answer = await this.#call('POST', `${draft}/send`, token, {}, undefined, signal);
      sent = answer.status === 202;
      return answer;
    } finally {
      if (!sent) await this.#deleteDraft(mailbox, draft, token);
    }
  }

  async #deleteDraft(mailbox: string, draft: string, token: string): Promise<void> {
    try {
      let answer = await this.#call('DELETE', draft, token, {}, undefined);
      if (answer.status === 401) answer = await this.#call('DELETE', draft, await this.#spec.tokens.token(mailbox, true), {}, undefined);
      if (answer.status < 300 || answer.status === 404) return;
      this.#log?.warn({ event: 'graph_draft_left', mailbox, draft, status: answer.status }, `could not delete an unsent draft in ${mailbox}'s Drafts folder (HTTP ${answer.status}); it can be deleted by hand`);
    } catch (err) {
      this.#log?.warn({ event: 'graph_draft_left', mailbox, draft, err: (err as Error).message }, `could not delete an unsent draft in ${mailbox}'s Drafts folder; it can be deleted by hand`);
    }
  }

  #attach(draft: string, a: Attachment, token: string, signal: AbortSignal | undefined): Promise<HttpsAnswer> {
    const body = JSON.stringify({
      '@odata.type': '#microsoft.graph.fileAttachment',
      name: a.filename ?? 'attachment',
      contentType: a.contentType,
      contentBytes: a.content.toString('base64'),
      ...(a.cid ? { contentId: a.cid } : {}),
      isInline: a.contentDisposition === 'inline',
    });
    return this.#call('POST', `${draft}/attachments`, token, { 'content-type': 'application/json' }, body, signal);
  }

  /** An upload session, then the bytes in chunks; the session's URL takes no token. */
  async #upload(draft: string, a: Attachment, token: string, signal: AbortSignal | undefined): Promise<HttpsAnswer> {
    const session = await this.#call(
      'POST',
      `${draft}/attachments/createUploadSession`,
      token,
      { 'content-type': 'application/json' },
      JSON.stringify({
        AttachmentItem: {
          attachmentType: 'file',
          name: a.filename ?? 'attachment',
          size: a.content.length,
          contentType: a.contentType,
          ...(a.cid ? { contentId: a.cid } : {}),
          isInline: a.contentDisposition === 'inline',
        },
      }),
      signal,
    );
    if (session.status !== 201) return session;
    const uploadUrl = String(jsonBody(session)?.uploadUrl ?? '');
    if (!uploadUrl) throw new Error('Graph opened an upload session without an uploadUrl');
    let last = session;
    for (let start = 0; start < a.content.length; start += UPLOAD_CHUNK_BYTES) {
      const chunk = a.content.subarray(start, Math.min(start + UPLOAD_CHUNK_BYTES, a.content.length));
      last = await httpsRequest(
        uploadUrl,
        {
          method: 'PUT',
          headers: { 'content-type': 'application/octet-stream', 'content-range': `bytes ${start}-${start + chunk.length - 1}/${a.content.length}` },
          body: chunk,
        },
        this.#httpsOptions(signal),
      );
      if (last.status !== 200 && last.status !== 201) return last;
    }
    return last;
  }

  #call(method: string, path: string, token: string, headers: Record<string, string>, body: string | undefined, signal?: AbortSignal): Promise<HttpsAnswer> {
    return httpsRequest(
      `${this.#spec.graphUrl.replace(/\/+$/, '')}${path}`,
      { method, headers: { authorization: `Bearer ${token}`, accept: 'application/json', ...headers }, ...(body !== undefined ? { body } : {}) },
      this.#httpsOptions(signal),
    );
  }

  #httpsOptions(signal?: AbortSignal) {
    return { timeoutMs: this.#timeoutMs, agent: this.#agent, ...(this.#spec.ca ? { ca: this.#spec.ca } : {}), ...(signal ? { signal } : {}) };
  }

  /** What Graph's answer means for the queue. */
  #verdict(answer: HttpsAnswer, mailbox: string, large: boolean): GraphVerdict & { response: string; enhanced: string } {
    if (answer.status === 202 || answer.status === 200 || answer.status === 201) {
      return { status: 'delivered', enhanced: '2.0.0', response: `2.0.0 Accepted by Microsoft Graph (HTTP ${answer.status})` };
    }
    const error = (jsonBody(answer)?.error ?? {}) as { code?: string; message?: string };
    const code = error.code ?? 'unknown';
    const message = (error.message ?? answer.body.toString('utf8').slice(0, 200)).replace(/\s+/g, ' ').trim();
    const said = (enhanced: string) => `${enhanced} Microsoft Graph answered ${answer.status} ${code}: ${message}`;
    const retryAfter = retryAfterMs(answer.headers['retry-after']);
    switch (true) {
      case answer.status === 429 || answer.status >= 500: {
        // 429: throttled (4.7.0); 5xx: Graph itself unavailable (4.4.2).
        const enhanced = answer.status === 429 ? '4.7.0' : '4.4.2';
        const waitMs = retryAfter ?? (answer.status === 429 ? 60_000 : undefined);
        return { status: 'deferred', enhanced, response: said(enhanced), ...(waitMs ? { retryAt: this.#now() + waitMs } : {}) };
      }
      case answer.status === 401:
        return {
          status: 'deferred',
          enhanced: '4.7.0',
          response: said('4.7.0'),
          renewToken: true,
          hold: 'upstream',
          problem: 'graph_token_refused',
          advice: `Graph refused the app's token (${code}): check the app registration is in tenant and has the Graph permission Mail.Send (Application) with admin consent`,
        };
      case answer.status === 403 && /SendAsDenied/i.test(code):
        // This message's From, not the app: deferred and logged, nothing held (as 5.7.60 over SMTP).
        return {
          status: 'deferred',
          enhanced: '4.7.0',
          response: said('4.7.0'),
          problem: 'send_as_denied',
          advice: `the mailbox ${mailbox} may not send as this message's From: grant it with Add-RecipientPermission -Identity <the From address> -Trustee ${mailbox} -AccessRights SendAs, or send from ${mailbox}`,
        };
      case answer.status === 403 && large && !/policy|access to odata/i.test(message):
        // Drafts and attachments need Mail.ReadWrite; small messages (sendMail) may still go.
        return {
          status: 'deferred',
          enhanced: '4.7.0',
          response: said('4.7.0'),
          problem: 'graph_large_denied',
          advice: `Graph refused to make a draft for a message over 3 MB (${code}): messages that large need the Graph application permission Mail.ReadWrite (with admin consent) besides Mail.Send`,
        };
      case answer.status === 403:
        return {
          status: 'deferred',
          enhanced: '4.7.0',
          response: said('4.7.0'),
          hold: /policy|access to odata/i.test(message) ? 'mailbox' : 'upstream',
          problem: 'graph_access_denied',
          advice: /policy/i.test(message)
            ? `an application access policy keeps the app from ${mailbox}: add the mailbox to the policy's group (Test-ApplicationAccessPolicy -Identity ${mailbox} -AppId <client_id> shows it)`
            : `Graph denied access (${code}): grant the app the Graph application permission Mail.Send and admin consent, and check ${mailbox} is allowed by any application access policy`,
        };
      case answer.status === 404:
        return {
          status: 'deferred',
          enhanced: '4.7.0',
          response: said('4.7.0'),
          hold: 'mailbox',
          problem: 'graph_mailbox_not_found',
          advice: `Graph does not know the mailbox ${mailbox} (${code}): check the address is a user with an Exchange Online licence in this tenant, or set mailbox`,
        };
      case answer.status === 413 || /MessageSizeExceeded|RequestEntityTooLarge/i.test(code):
        return { status: 'failed', enhanced: '5.3.4', response: said('5.3.4') };
      case answer.status === 400:
        // Graph read the request and refused this message (invalid recipients, MIME it cannot
        // take): sending it again would get the same answer, so it bounces with Graph's words.
        return { status: 'failed', enhanced: '5.6.0', response: said('5.6.0') };
      default:
        return {
          status: 'deferred',
          enhanced: '4.0.0',
          response: said('4.0.0'),
          problem: 'graph_refused',
          advice: `Graph refused the request (${answer.status} ${code}); the message is kept and retried`,
        };
    }
  }

}

/** Shutdown: back to the queue, not counted as an attempt (the queue runner sees the abort). */
function interrupted(): GraphVerdict & { response: string; enhanced: string } & DeliveryOutcome {
  const e = deliveryError('INTERRUPTED');
  return { status: 'deferred', code: null, enhanced: e.enhanced, response: e.response };
}

/** Retry-After in seconds or as an HTTP date, in ms from now. */
function retryAfterMs(value: string | string[] | undefined): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (!v) return undefined;
  const seconds = Number(v);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(v);
  return Number.isFinite(date) ? Math.max(0, date - Date.now()) : undefined;
}

/**
 * The MIME to give Graph for these recipients: envelope recipients the header fields do not name
 * are added in a Bcc field (Exchange removes it from what recipients see), merged with one the
 * message has, since a second Bcc field might be ignored; a header recipient that is not among
 * them makes the message unsendable this way. Addresses are read as UTF-8 (RFC 6532); the rest of
 * the header section is kept byte for byte.
 */
export function withEnvelopeRecipients(mime: Buffer, recipients: string[]): { mime: Buffer } | { stranger: string } {
  const found = headerSectionEnd(mime);
  const end = found < 0 ? mime.length : found;
  // "To : x" (a space before the colon) is old syntax, still a To field.
  const field = /^(to|cc|bcc)[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)/gim;
  const named = new Set<string>();
  const bcc: string[] = [];
  for (const m of mime.subarray(0, end).toString('utf8').matchAll(field)) {
    for (const a of mailboxAddresses(m[2]!.replace(/\r?\n[ \t]/g, ' '))) {
      named.add(a.toLowerCase());
      if (m[1]!.toLowerCase() === 'bcc') bcc.push(a);
    }
  }
  const wanted = new Set(recipients.map((r) => r.toLowerCase()));
  for (const address of named) if (!wanted.has(address)) return { stranger: address };
  const extra = recipients.filter((r) => !named.has(r.toLowerCase()));
  if (extra.length === 0) return { mime };
  const line = Buffer.from(`Bcc: ${[...bcc, ...extra].join(', ')}\r\n`, 'utf8');
  if (bcc.length === 0) return { mime: Buffer.concat([line, mime]) };
  const rest = mime.subarray(0, end).toString('latin1').replace(/^bcc[ \t]*:.*(?:\r?\n[ \t].*)*(?:\r?\n|$)/gim, '');
  return { mime: Buffer.concat([line, Buffer.from(rest, 'latin1'), mime.subarray(end)]) };
}

const text = (a: AddressObject | AddressObject[] | undefined) => (a ? (Array.isArray(a) ? a.map((x) => x.text).join(', ') : a.text) : undefined);

/** Fields the composer writes itself from the parsed message. */
const COMPOSED_FIELDS = new Set([
  'from', 'to', 'cc', 'bcc', 'reply-to', 'subject', 'date', 'message-id', 'in-reply-to', 'references',
  'mime-version', 'content-type', 'content-transfer-encoding', 'content-disposition', 'content-id',
]);

/**
 * The message with its header fields and text, without attachments (they go separately). It is
 * rebuilt, so a DKIM signature or an S/MIME signature over the original does not survive: such
 * messages need SMTP.
 */
async function composeWithoutAttachments(parsed: ParsedMail): Promise<Buffer> {
  const { default: MailComposer } = await import('nodemailer/lib/mail-composer');
  const composer = new MailComposer({
    ...(text(parsed.from) ? { from: text(parsed.from) } : {}),
    ...(text(parsed.to) ? { to: text(parsed.to) } : {}),
    ...(text(parsed.cc) ? { cc: text(parsed.cc) } : {}),
    ...(text(parsed.bcc) ? { bcc: text(parsed.bcc) } : {}),
    ...(text(parsed.replyTo) ? { replyTo: text(parsed.replyTo) } : {}),
    ...(parsed.subject !== undefined ? { subject: parsed.subject } : {}),
    ...(parsed.date ? { date: parsed.date } : {}),
    ...(parsed.messageId ? { messageId: parsed.messageId } : {}),
    ...(parsed.inReplyTo ? { inReplyTo: parsed.inReplyTo } : {}),
    ...(parsed.references ? { references: parsed.references } : {}),
    ...(parsed.text ? { text: parsed.text } : {}),
    ...(parsed.html ? { html: parsed.html } : {}),
    // Every other header field as it was (Sender, Auto-Submitted, List-*, X-*...).
    headers: parsed.headerLines
      .filter((h) => !COMPOSED_FIELDS.has(h.key))
      .map((h) => ({ key: h.line.slice(0, h.line.indexOf(':')).trim(), value: { prepared: true, value: h.line.slice(h.line.indexOf(':') + 1).trim() } })),
  });
  return new Promise((resolve, reject) => {
    // keepBcc: Graph takes the recipients from the fields, Bcc included.
    const built = composer.compile();
    (built as unknown as { keepBcc: boolean }).keepBcc = true;
    built.build((err, message) => (err ? reject(err) : resolve(message)));
  });
}
