// Delivery outcomes that Postern itself decides (no remote server said them): DNS answers,
// connection failures, TLS policy, expiry. One registry, like errors/smtp-errors.ts does for the
// intake side, so every status a sender can find in a bounce or in `queue show` is listed here with
// its enhanced status code (RFC 3463) and whether it is worth retrying.
//
// A reply from a remote server is kept as the server wrote it (see parseReply); only what Postern
// concludes on its own comes from this registry.
//
// Rule of thumb, as in maddy's exterrors: everything is temporary unless we are sure that retrying
// cannot help (the domain does not exist, refuses all mail, or the message is too big).
import { fillTemplate } from '../errors/smtp-errors.js';
import type { DeliveryOutcome } from './delivery-target.js';

export interface DeliveryErrorSpec {
  enhanced: string;
  /** `{name}` placeholders are filled from the details argument. */
  text: string;
}

export const DELIVERY_ERRORS = {
  NULL_MX: { enhanced: '5.1.10', text: 'Recipient domain {domain} does not accept mail (null MX record, RFC 7505)' },
  NO_SUCH_DOMAIN: { enhanced: '5.1.2', text: 'Recipient domain {domain} does not exist (DNS: no such domain)' },
  NO_MAIL_HOST: {
    enhanced: '5.4.4',
    text: 'Recipient domain {domain} has no mail server: no MX record and no address record',
  },
  NO_MX_ADDRESS: {
    enhanced: '5.4.4',
    text: 'None of the mail servers of {domain} has an address: {hosts}',
  },
  DNS_TEMPORARY: {
    enhanced: '4.4.3',
    text: 'DNS lookup of {name} failed temporarily ({reason}); will retry',
  },
  BAD_ADDRESS: { enhanced: '5.1.3', text: 'Recipient address {address} has no domain' },
  CONNECT_FAILED: { enhanced: '4.4.1', text: 'Could not connect to a mail server for {destination}: {reason}' },
  CONNECTION_LOST: { enhanced: '4.4.2', text: 'Connection to {server} lost: {reason}' },
  TIMEOUT: { enhanced: '4.4.2', text: 'Timed out talking to {server}: {reason}' },
  PROTOCOL: { enhanced: '4.5.0', text: 'SMTP protocol error with {server}: {reason}' },
  TLS_UNAVAILABLE: {
    enhanced: '4.7.4',
    text: 'TLS is required for {destination} but {server} does not offer STARTTLS',
  },
  TLS_FAILED: { enhanced: '4.7.5', text: 'TLS handshake with {server} failed: {reason}' },
  CERTIFICATE_UNTRUSTED: {
    enhanced: '4.7.5',
    text: 'The TLS certificate of {server} is not trusted for {destination}: {reason} (set ca_file to the CA that issued it, or verify_certificate = false)',
  },
  AUTH_UNAVAILABLE: {
    enhanced: '4.7.4',
    text: 'Cannot log in to {destination}: {server} does not offer {wanted} (it offers {offered})',
  },
  TOKEN_REFUSED: {
    enhanced: '4.7.0',
    text: 'Cannot get an access token for {destination}: the token endpoint refused Postern\'s credentials: {reason}',
  },
  TOKEN_UNAVAILABLE: {
    enhanced: '4.4.1',
    text: 'Cannot get an access token for {destination}: {reason}',
  },
  NO_MAILBOX: {
    enhanced: '4.7.0',
    text: 'Cannot send mail from the null sender through {destination}: no mailbox to send as (set mailbox on the upstream)',
  },
  GRAPH_UNAVAILABLE: { enhanced: '4.4.1', text: 'Could not reach Microsoft Graph: {reason}' },
  GRAPH_RECIPIENTS: {
    enhanced: '4.7.0',
    text: 'Not sent through {destination}: the message names {address} in its To/Cc/Bcc but not as a recipient here, and Microsoft Graph sends to every address in those fields',
  },
  THROTTLED: {
    enhanced: '4.7.0',
    text: 'Waiting for {destination}: {limit}; next try at {until}',
  },
  MESSAGE_TOO_BIG: {
    enhanced: '5.3.4',
    text: 'Message size {size} bytes exceeds the limit of {limit} bytes announced by {server}',
  },
  BODY_UNREADABLE: { enhanced: '4.3.0', text: 'Could not read the queued message: {reason}' },
  INTERNAL: { enhanced: '4.3.0', text: 'Local error during delivery: {reason}' },
  INTERRUPTED: { enhanced: '4.3.2', text: 'Delivery interrupted because Postern is shutting down; will retry' },
  EXPIRED: { enhanced: '4.4.7', text: 'Message expired after {attempts}: {last}' },
} as const satisfies Record<string, DeliveryErrorSpec>;

export type DeliveryErrorName = keyof typeof DELIVERY_ERRORS;

/** A locally decided outcome. `response` is "<enhanced> <text>", the form stored and bounced. */
export class DeliveryError extends Error {
  readonly enhanced: string;
  readonly text: string;

  constructor(
    readonly errorName: DeliveryErrorName,
    details: Record<string, string | number> = {},
  ) {
    const spec: DeliveryErrorSpec = DELIVERY_ERRORS[errorName];
    const text = fillTemplate(spec.text, details);
    super(`${spec.enhanced} ${text}`);
    this.name = 'DeliveryError';
    this.enhanced = spec.enhanced;
    this.text = text;
  }

  get temporary(): boolean {
    return this.enhanced.startsWith('4');
  }

  get response(): string {
    return this.message;
  }

  /** As a delivery result: deferred when temporary, failed when permanent. */
  toOutcome(remote?: { remoteMta?: string; remoteIp?: string }): DeliveryOutcome {
    return {
      status: this.temporary ? 'deferred' : 'failed',
      code: null,
      enhanced: this.enhanced,
      response: this.response,
      ...(remote?.remoteMta ? { remoteMta: remote.remoteMta } : {}),
      ...(remote?.remoteIp ? { remoteIp: remote.remoteIp } : {}),
    };
  }
}

export function deliveryError(name: DeliveryErrorName, details?: Record<string, string | number>): DeliveryError {
  return new DeliveryError(name, details);
}

export interface ParsedReply {
  code: number;
  /** From the reply when it carries one, else derived from the code class ("5.0.0"). */
  enhanced: string;
  /** The whole reply on one line: "550 5.1.1 <a@b>: no such user". */
  response: string;
}

/**
 * Normalises a server reply as nodemailer hands it over (multi-line replies joined with "\n",
 * each line with its own "550-" prefix) into one line for the store, logs and bounces.
 */
export function parseReply(raw: string): ParsedReply | null {
  const lines = raw.split(/\r?\n/).filter((l) => l.trim() !== '');
  const first = lines[0];
  const m = first ? /^([2-5]\d\d)(?:[ -]|$)/.exec(first) : null;
  if (!m) return null;
  const code = Number(m[1]);
  const enhancedMatch = /^[2-5]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b/.exec(first!);
  const enhanced = enhancedMatch?.[1] ?? `${String(code)[0]}.0.0`;
  const parts = lines.map((line, i) => {
    let rest = line.replace(/^[2-5]\d\d[ -]?/, '');
    if (i > 0 && enhancedMatch) rest = rest.replace(/^[245]\.\d{1,3}\.\d{1,3}\s*/, '');
    return rest.trim();
  });
  const text = parts.join(' ').replace(/\s+/g, ' ').trim();
  return { code, enhanced, response: text ? `${code} ${text}` : String(code) };
}

/** A response without its leading enhanced status code: "5.1.1 No such user" -> "No such user". */
export function withoutStatus(response: string): string {
  return response.replace(/^[245]\.\d{1,3}\.\d{1,3} /, '');
}
