// One registry of every SMTP refusal Postern gives a client. Each entry carries the reply code, the
// enhanced status code and a sentence a person can act on; docs/errors.md lists them and a test
// checks the two agree. Intake code throws `smtpError('NAME', ...)`; nothing else invents replies.

export interface SmtpErrorSpec {
  code: number;
  enhanced: string;
  /** The text after the codes. `{name}` placeholders are filled from the details argument. */
  text: string;
}

export const SMTP_ERRORS = {
  AUTH_REQUIRED: { code: 530, enhanced: '5.7.57', text: 'Client not authenticated to send mail. Log in with AUTH first' },
  AUTH_NEEDS_TLS: {
    code: 538,
    enhanced: '5.7.11',
    text: 'Encryption required for requested authentication mechanism. Send STARTTLS first',
  },
  AUTH_FAILED: { code: 535, enhanced: '5.7.8', text: 'Authentication unsuccessful, the username or password is wrong' },
  AUTH_SMTP_DISABLED: {
    code: 535,
    enhanced: '5.7.139',
    text: 'Authentication unsuccessful, SMTP AUTH is disabled for this account',
  },
  AUTH_TEMPORARY: {
    code: 454,
    enhanced: '4.7.0',
    text: 'Temporary authentication failure, try again later',
  },
  RELAY_DENIED: {
    code: 550,
    enhanced: '5.7.1',
    text: 'Relaying denied: {ip} is not in an allowed network for this port. Authenticate on the submission port (587) or ask the administrator to add a connector',
  },
  TOO_MANY_RECIPIENTS: {
    code: 452,
    enhanced: '4.5.3',
    text: 'Too many recipients: at most {max} per message, send the rest in another message',
  },
  BAD_SENDER_ADDRESS: { code: 501, enhanced: '5.1.7', text: 'Bad sender address syntax: {address}' },
  BAD_RECIPIENT_ADDRESS: { code: 501, enhanced: '5.1.3', text: 'Bad recipient address syntax: {address}' },
  BAD_DSN_PARAMETER: {
    code: 501,
    enhanced: '5.5.4',
    text: '{name} is too long: at most {max} characters (RFC 3461)',
  },
  MESSAGE_TOO_BIG: {
    code: 552,
    enhanced: '5.3.4',
    text: 'Message size exceeds fixed maximum message size of {max} bytes',
  },
  HEADER_TOO_BIG: {
    code: 552,
    enhanced: '5.3.4',
    text: 'Header section too large: at most {max} bytes of header fields are accepted. Send fewer or shorter header fields',
  },
  HEADER_REPEATED: {
    code: 550,
    enhanced: '5.6.0',
    text: 'The message has {count} {name} header fields; RFC 5322 allows one. Fix the client so it writes a single {name}',
  },
  BARE_LINE_ENDING: {
    code: 550,
    enhanced: '5.6.11',
    text: 'Bare {kind} is not allowed in message data; lines must end with CRLF. Fix the client or its line-ending setting',
  },
  QUEUE_UNAVAILABLE: {
    code: 451,
    enhanced: '4.3.0',
    text: 'Message not queued because of a local storage error; try again later',
  },
  INSUFFICIENT_STORAGE: { code: 452, enhanced: '4.3.1', text: 'Insufficient system storage, try again later' },
  STORE_BUSY: {
    code: 451,
    enhanced: '4.3.0',
    text: 'Message not queued: the queue database is locked by another process; try again in a few minutes',
  },
  SHUTTING_DOWN: { code: 421, enhanced: '4.3.2', text: 'Service shutting down, try again later' },
  TOO_MANY_CONNECTIONS: {
    code: 421,
    enhanced: '4.7.0',
    text: 'Too many connections from {ip}; close some and try again',
  },
  SERVER_BUSY: { code: 421, enhanced: '4.3.2', text: 'Too many connections, try again in a moment' },
  RATE_LIMIT_MESSAGES: {
    code: 451,
    enhanced: '4.7.0',
    text: 'Rate limit: {limit} messages per minute for {who}; retry in {retry}',
  },
  RATE_LIMIT_RECIPIENTS: {
    code: 451,
    enhanced: '4.7.0',
    text: 'Rate limit: {limit} recipients per 24 hours for {who}; retry in {retry}',
  },
  ACCOUNT_CONNECTIONS: {
    code: 454,
    enhanced: '4.7.0',
    text: 'Too many connections for {account}: at most {max} at once; close one and try again',
  },
  AUTH_LOCKED: {
    code: 454,
    enhanced: '4.7.0',
    text: 'Too many failed logins; AUTH is refused for {retry}. Check the password configured in the device',
  },
  SEND_AS_DENIED: { code: 550, enhanced: '5.7.60', text: 'SendAsDenied; {account} is not allowed to send as {address}' },
  RECIPIENT_DOMAIN_DENIED: {
    code: 550,
    enhanced: '5.7.1',
    text: '{account} may not send to {domain}: the account is limited to {allowed}',
  },
  SENDER_DOMAIN_DENIED: {
    code: 550,
    enhanced: '5.7.1',
    text: 'Sender domain {domain} is not allowed on connector {connector}',
  },
  CONNECTOR_NEEDS_TLS: {
    code: 530,
    enhanced: '5.7.0',
    text: 'Must issue a STARTTLS command first: connector {connector} requires TLS',
  },
} as const satisfies Record<string, SmtpErrorSpec>;

export type SmtpErrorName = keyof typeof SMTP_ERRORS;

/** Fills `{name}` placeholders; unknown names stay visible rather than vanish. */
export function fillTemplate(text: string, details: Record<string, string | number> = {}): string {
  return text.replace(/\{(\w+)\}/g, (_, k: string) => String(details[k] ?? `{${k}}`));
}

/** An error smtp-server turns into a reply: `responseCode` plus "enhanced text". */
export class SmtpReplyError extends Error {
  readonly responseCode: number;
  readonly enhanced: string;
  constructor(
    readonly errorName: SmtpErrorName,
    details: Record<string, string | number> = {},
  ) {
    const spec: SmtpErrorSpec = SMTP_ERRORS[errorName];
    super(`${spec.enhanced} ${fillTemplate(spec.text, details)}`);
    this.responseCode = spec.code;
    this.enhanced = spec.enhanced;
    this.name = 'SmtpReplyError';
  }

  get temporary(): boolean {
    return this.responseCode < 500;
  }
}

export function smtpError(name: SmtpErrorName, details?: Record<string, string | number>): SmtpReplyError {
  return new SmtpReplyError(name, details);
}
