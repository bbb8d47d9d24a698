// Bounces: RFC 3464 delivery status notifications for recipients that failed for good (a 5xx
// reply, a null MX, a domain that does not exist, or a message that expired in the queue).
//
// One DSN per message per attempt round, covering every recipient that failed in that round. It
// goes to the envelope sender, from the null sender (MAIL FROM:<>) so it can never bounce in turn,
// and through the queue like any other message (durable, retried, logged). No DSN is made for a
// message from the null sender (that would be a bounce of a bounce) nor for a recipient whose
// RFC 3461 NOTIFY excludes FAILURE (NOTIFY=NEVER, NOTIFY=SUCCESS).
//
// Layout (RFC 3462 multipart/report, report-type=delivery-status):
//   1. text/plain: what happened, in plain words, with the remote server's reply
//   2. message/delivery-status: Reporting-MTA, Arrival-Date, then per recipient Final-Recipient,
//      Action: failed, Status, Remote-MTA, Diagnostic-Code
//   3. text/rfc822-headers: the original message's header block (never the body: bounded size,
//      and no copy of the content travels back)
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { newQueueId } from '../store/queue-id.js';
import type { QueueStore, QueuedMessage } from '../store/store.js';
import { enqueueLocalMessage } from '../queue/enqueue-local.js';
import { formatRfc5322Date } from '../mail/rfc5322-date.js';
import { headerSectionEnd } from '../mail/header-section.js';

export interface DsnRecipient {
  address: string;
  /** ORCPT as stored ("rfc822;user@example.com"), when the client gave one. */
  orcpt?: string | null;
  /** Enhanced status code: "5.1.1", "4.4.7"... */
  status: string;
  /** What happened, in a sentence, for the human-readable part. */
  reason: string;
  /** The server that refused it, when one did. */
  remoteMta?: string;
  remoteIp?: string;
  /** The remote server's reply ("550 5.1.1 no such user"), for Diagnostic-Code and shown as is. */
  diagnostic?: string;
  /** Postern's own last error, shown as is when there is no remote reply. */
  detail?: string;
}

export interface DsnInput {
  /** Reporting MTA name (config.hostname). */
  hostname: string;
  message: Pick<QueuedMessage, 'queueId' | 'sender' | 'receivedAt' | 'dsnEnvid' | 'messageIdHeader'>;
  recipients: DsnRecipient[];
  /** Header block of the original message (see readHeaderBlock). */
  originalHeaders: Buffer;
  now: number;
  /** Message-ID of the DSN itself, without brackets. */
  messageId?: string;
}

/** RFC 3461: with no NOTIFY the default is FAILURE (and DELAY, which Postern does not send yet). */
export function wantsFailureNotice(notify: string[] | null | undefined): boolean {
  if (!notify || notify.length === 0) return true;
  const values = notify.map((n) => n.toUpperCase());
  return !values.includes('NEVER') && values.includes('FAILURE');
}

/**
 * Reads the header block of a stored message: up to and including the blank line, at most
 * `maxBytes` (cut at the last complete line when longer). Stops reading the file there.
 */
export async function readHeaderBlock(body: Readable, maxBytes = 64 * 1024): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let length = 0;
  try {
    for await (const chunk of body) {
      const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as string);
      chunks.push(buf);
      length += buf.length;
      const all = Buffer.concat(chunks, length);
      const end = headerSectionEnd(all);
      if (end >= 0 && end <= maxBytes) return all.subarray(0, end);
      if (length >= maxBytes) break;
    }
  } finally {
    body.destroy();
  }
  // Too long (or no blank line at all): keep the complete lines that fit.
  const all = Buffer.concat(chunks, length).subarray(0, maxBytes);
  const lastLine = all.lastIndexOf(0x0a);
  return lastLine >= 0 ? all.subarray(0, lastLine + 1) : all;
}

/** The whole DSN message, CRLF line endings, ready to spool. */
export function buildDsn(input: DsnInput): Buffer {
  const { hostname, message, recipients, now } = input;
  const boundary = `=_postern_${randomBytes(12).toString('hex')}`;
  const messageId = input.messageId ?? `${newQueueId(now)}@${hostname}`;
  const date = formatRfc5322Date(now);
  const sender = message.sender;

  const head = [
    `From: Mail Delivery System <MAILER-DAEMON@${hostname}>`,
    `To: <${sender}>`,
    `Subject: Undelivered Mail Returned to Sender`,
    `Date: ${date}`,
    `Message-ID: <${messageId}>`,
    ...(message.messageIdHeader ? [`In-Reply-To: ${message.messageIdHeader}`, `References: ${message.messageIdHeader}`] : []),
    // RFC 3834: automatic responders must not answer this.
    'Auto-Submitted: auto-replied',
    'MIME-Version: 1.0',
    `Content-Type: multipart/report; report-type=delivery-status;`,
    `\tboundary="${boundary}"`,
    'Content-Transfer-Encoding: 8bit',
  ];

  const human = [
    `This is the mail system at ${hostname}.`,
    '',
    recipients.length === 1
      ? 'Your message could not be delivered to the recipient below. This is a permanent'
      : `Your message could not be delivered to the ${recipients.length} recipients below. This is a permanent`,
    'error: the mail system has given up and will not try again.',
    '',
    ...recipients.flatMap((r) => [
      `<${r.address}>:`,
      ...wrap(r.reason, 74).map((l) => `    ${l}`),
      // Replies are never wrapped, so they can be searched for and copied whole.
      ...(r.diagnostic ? [`    Reply from ${r.remoteMta ?? 'the remote server'}: ${oneLine(r.diagnostic, 900)}`] : []),
      ...(!r.diagnostic && r.detail ? [`    Error: ${oneLine(r.detail, 900)}`] : []),
      '',
    ]),
    'Details of the original message:',
    `    Queue ID: ${message.queueId}`,
    `    Sender: <${sender}>`,
    `    Received: ${formatRfc5322Date(message.receivedAt)}`,
    ...(message.messageIdHeader ? [`    Message-ID: ${message.messageIdHeader}`] : []),
    '',
    'The headers of the original message are attached.',
  ];

  const perMessage = [
    `Reporting-MTA: dns; ${hostname}`,
    `X-Postern-Queue-ID: ${message.queueId}`,
    ...(message.dsnEnvid ? [`Original-Envelope-Id: ${message.dsnEnvid}`] : []),
    `Arrival-Date: ${formatRfc5322Date(message.receivedAt)}`,
  ];
  const perRecipient = recipients.map((r) => [
    `Final-Recipient: rfc822; ${r.address}`,
    ...(r.orcpt ? [`Original-Recipient: ${r.orcpt.includes(';') ? r.orcpt : `rfc822;${r.orcpt}`}`] : []),
    'Action: failed',
    `Status: ${r.status}`,
    ...(r.remoteMta ? [`Remote-MTA: dns; ${r.remoteMta}`] : []),
    ...(r.diagnostic ? [`Diagnostic-Code: smtp; ${oneLine(r.diagnostic, 900)}`] : []),
    `Last-Attempt-Date: ${date}`,
  ]);
  const status = [perMessage.join('\r\n'), ...perRecipient.map((lines) => lines.join('\r\n'))].join('\r\n\r\n');

  const headers = input.originalHeaders.toString('latin1').replace(/\r?\n/g, '\r\n').replace(/(\r\n)*$/, '\r\n');

  const text = [
    ...head,
    '',
    'This is a MIME-encapsulated message.',
    '',
    `--${boundary}`,
    'Content-Description: Notification',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: 8bit',
    '',
    human.join('\r\n'),
    '',
    `--${boundary}`,
    'Content-Description: Delivery report',
    'Content-Type: message/delivery-status',
    '',
    status,
    '',
    `--${boundary}`,
    'Content-Description: Undelivered Message Headers',
    'Content-Type: text/rfc822-headers',
    'Content-Transfer-Encoding: 8bit',
    '',
  ].join('\r\n');
  return Buffer.concat([
    Buffer.from(`${text}\r\n`, 'utf8'),
    // The original headers go back byte for byte (latin1 round-trips any byte).
    Buffer.from(headers, 'latin1'),
    Buffer.from(`\r\n--${boundary}--\r\n`, 'utf8'),
  ]);
}

export interface EnqueueDsnInput extends Omit<DsnInput, 'message'> {
  message: QueuedMessage;
  /** config.queue.lifetime: how long the DSN itself may stay queued. */
  lifetime: number;
}

/** Builds the DSN and queues it for the original sender. Resolves with the new queue id. */
export function enqueueDsn(store: QueueStore, input: EnqueueDsnInput): Promise<string> {
  return enqueueLocalMessage(store, {
    build: (messageId) => buildDsn({ ...input, messageId }),
    sender: '',
    recipients: [input.message.sender],
    hostname: input.hostname,
    now: input.now,
    lifetime: input.lifetime,
    // The original session id, so a bounce can be traced back to the submission.
    origin: { sessionId: input.message.origin.sessionId, listener: 'dsn', clientIp: '' },
  });
}


function oneLine(text: string, max: number): string {
  const flat = text.replace(/[\r\n]+/g, ' ');
  return flat.length > max ? `${flat.slice(0, max)}...` : flat;
}

function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of oneLine(text, 2000).split(' ')) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines;
}
