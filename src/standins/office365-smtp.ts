// Exchange Online's client-submission endpoint (smtp.office365.com:587), as Microsoft documents
// it, for Postern's Microsoft 365 upstream to be tested against:
//
//   - STARTTLS first; AUTH is advertised only after it ("AUTH LOGIN XOAUTH2"), and legacy TLS
//     (1.0, 1.1) gets "421 4.7.66 TLS 1.0 and 1.1 are not supported…" (Exchange Team blog on
//     TLS 1.0/1.1 deprecation for SMTP AUTH). The TLS server accepts those versions on purpose,
//     so that the refusal is Exchange's reply and not a failed handshake.
//   - AUTH XOAUTH2 with an access token from the identity stand-in, base64("user=" mailbox
//     "^Aauth=Bearer " token "^A^A"): "Authenticate an IMAP, POP or SMTP connection using OAuth"
//     (learn.microsoft.com/exchange/client-developer/legacy-protocols/…), whose failure sample is
//     "535 5.7.3 Authentication unsuccessful [host]". Today the bracket also carries a time and a
//     session id, as Exchange Online sends it: "[XX0PR00CA0000.NAMPRD00.PROD.OUTLOOK.COM
//     2025-01-07T04:13:27.123Z 08DD0123456789AB]".
//   - SMTP AUTH switched off for a mailbox or the tenant (Set-CASMailbox / Set-TransportConfig
//     SmtpClientAuthenticationDisabled; the mailbox setting wins over the tenant's): "535 5.7.139
//     Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox|Tenant.
//     Visit https://aka.ms/smtp_auth_disabled for more information."
//   - Basic auth (LOGIN, PLAIN) with a password: by default the reply Microsoft announced for when
//     Basic auth is gone from client submission, "550 5.7.30 Basic authentication is not
//     supported for Client Submission." (Exchange Team blog, "Exchange Online to retire Basic
//     auth for Client Submission"); basicAuth: 'disabled' gives instead the 535 5.7.139 tenants
//     see when policy blocks Basic auth.
//   - MAIL without AUTH: "530 5.7.57 Client not authenticated to send mail."
//   - Send As: MAIL FROM and the From header must be the mailbox or an address it has Send As on,
//     else after the data "550 5.7.60 SMTP; Client does not have permissions to send as this
//     sender" ("How to set up a multifunction device or application to send email using
//     Microsoft 365", which quotes 5.7.60).
//   - Limits, per mailbox ("Message storage and concurrent connection throttling for SMTP
//     Authenticated Submission", learn.microsoft.com/exchange/troubleshoot/send-emails/…):
//       * up to three concurrent connections may submit; more get "432 4.3.2 Concurrent
//         connections limit exceeded." (that page's current text; older Exchange sent "432 4.3.2
//         STOREDRV.ClientSubmit; sender thread limit exceeded", which a script can still produce).
//         It comes at the end of the data, when the message is submitted to the mailbox;
//       * 30 messages a minute: Microsoft documents that the excess is throttled and carried over
//         to the following minutes (delayed, not refused), so it is accepted and counted in
//         violations.messages; limits.overMessageRate: 'reject' refuses it instead;
//       * 10,000 recipients a day: "554 5.2.0 STOREDRV.Submission.Exception:
//         SubmissionQuotaExceededException; Failed to process message due to a permanent exception
//         with message Cannot submit message." (the page quotes the first part; the rest is what
//         Exchange appends).
//   - Apps may use a mailbox once Exchange knows their service principal and it has rights on the
//     mailbox (New-ServicePrincipal, Add-MailboxPermission: same OAuth page); mailboxPermissions
//     models that, and without it every app may use every listed mailbox.
//
// Anything else Exchange may answer (mailbox full, 5.7.68, 430 4.2.0 logon failure…) comes from
// script(). The greeting, EHLO and the texts of 220/235/250/354/221 are Exchange's own.
import { randomBytes, randomUUID } from 'node:crypto';
import type { SMTPServerAuthentication, SMTPServerSession } from 'smtp-server';
import type { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import { formatRfc5322Date } from '../mail/rfc5322-date.js';
import type { IdentityStandIn } from './identity-platform.js';
import { smtpRefusal } from './scripted-replies.js';
import { ConnectionIds, ScriptedSmtpStandIn, type AuthCallback, type DataCallback } from './scripted-smtp-standin.js';
import { headerAddresses, headerValue } from './smtp-records.js';
import { hasEnhancedCode, replyText, tlsProtocol, type OutgoingReply, type Reply } from './standin-smtp-server.js';

export interface Office365Limits {
  /** Messages a mailbox may submit in any window (Microsoft: 30 a minute). */
  messagesPerWindow: number;
  windowMs: number;
  /** Authenticated connections of one mailbox that may submit at once (Microsoft: 3). */
  connectionsPerMailbox: number;
  /** Recipients a mailbox may send to in any 24 hours (Microsoft: 10,000). */
  recipientsPerDay: number;
  /** Past messagesPerWindow: 'accept' (Microsoft's documented delay) or 'reject' (554 5.2.0). */
  overMessageRate: 'accept' | 'reject';
}

export type TlsVersion = 'TLSv1' | 'TLSv1.1' | 'TLSv1.2' | 'TLSv1.3';

export interface Office365SmtpStandInOptions {
  certificate: { cert: string; key: string };
  identity: Pick<IdentityStandIn, 'verifyToken'>;
  /** Licensed mailboxes with SMTP AUTH allowed. */
  mailboxes: string[];
  /** Extra addresses a mailbox may send as (Send As permission). */
  sendAs?: Record<string, string[]>;
  limits?: Partial<Office365Limits>;
  /** App (client) id -> mailboxes its Exchange service principal has rights on. Absent: all. */
  mailboxPermissions?: Record<string, string[] | '*'>;
  /** How a LOGIN/PLAIN attempt is refused (default 'retired': 550 5.7.30). */
  basicAuth?: 'retired' | 'disabled';
  /** Older TLS gets 421 4.7.66 at AUTH (default TLSv1.2). */
  minTlsVersion?: TlsVersion;
  /** The front-end server's name (default XX0PR00CA0000). */
  serverName?: string;
  /** SIZE advertised and enforced (default 37748736). */
  size?: number;
}

const DEFAULT_LIMITS: Office365Limits = {
  messagesPerWindow: 30,
  windowMs: 60_000,
  connectionsPerMailbox: 3,
  recipientsPerDay: 10_000,
  overMessageRate: 'accept',
};
const DAY_MS = 86_400_000;
const TLS_ORDER: Record<string, number> = { TLSv1: 0, 'TLSv1.1': 1, 'TLSv1.2': 2, 'TLSv1.3': 3 };

export const EXCHANGE_REPLIES = {
  legacyTls: '4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls',
  basicAuthRetired: '5.7.30 Basic authentication is not supported for Client Submission.',
  concurrentConnections: '4.3.2 Concurrent connections limit exceeded.',
  senderThreadLimit: '4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded',
  submissionQuota:
    '5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message Cannot submit message.',
  sendAsDenied: '5.7.60 SMTP; Client does not have permissions to send as this sender',
} as const;

/** smtp-server's stock texts, in Exchange's words. */
const EXCHANGE_STOCK: Record<string, Reply> = {
  '503 Error: send HELO/EHLO first': { code: 503, lines: ['5.5.2 Send hello first'] },
  '503 Error: need MAIL command': { code: 503, lines: ['5.5.2 Need mail command'] },
  '503 Error: need RCPT command': { code: 503, lines: ['5.5.2 Need rcpt command'] },
  '503 Error: nested MAIL command': { code: 503, lines: ['5.5.2 Sender already specified'] },
  '500 Error: command not recognized': { code: 500, lines: ['5.3.3 Unrecognized command'] },
  '250 OK': { code: 250, lines: ['2.0.0 OK'] },
};

export class Office365SmtpStandIn extends ScriptedSmtpStandIn {
  /** Per mailbox: the most authenticated connections it had open at once. */
  readonly maxConcurrent: Record<string, number> = {};
  readonly violations = { connections: 0, messages: 0, recipients: 0 };
  readonly #options: Office365SmtpStandInOptions;
  readonly #limits: Office365Limits;
  readonly #mailboxes: Set<string>;
  readonly #sendAs = new Map<string, Set<string>>();
  /** Per-mailbox SMTP AUTH setting; absent = the tenant's. */
  readonly #mailboxSmtpAuth = new Map<string, boolean>();
  #tenantSmtpAuth = true;
  /** Per mailbox, its authenticated sessions in login order (the first N may submit). */
  readonly #open = new Map<string, string[]>();
  readonly #sessionMailbox = new Map<string, string>();
  readonly #submitted = new Map<string, number[]>();
  readonly #recipients = new Map<string, { at: number; count: number }[]>();
  /** Exchange's per-session diagnostic id, shown in the bracket of its refusals. */
  readonly #sessionIds = new ConnectionIds(() => `08DD${randomBytes(6).toString('hex').toUpperCase()}`);
  readonly #frontEnd: string;
  readonly #diagnosticHost: string;
  readonly #mailboxServer: string;
  readonly #size: number;

  constructor(options: Office365SmtpStandInOptions) {
    const server = options.serverName ?? 'XX0PR00CA0000';
    const frontEnd = `${server}.outlook.office365.com`;
    const size = options.size ?? 37_748_736;
    super({
      key: options.certificate.key,
      cert: options.certificate.cert,
      // Legacy TLS must get through the handshake to be refused with Exchange's 421 4.7.66.
      minVersion: 'TLSv1',
      ciphers: 'DEFAULT:@SECLEVEL=0',
      name: frontEnd,
      size,
      authMethods: ['LOGIN', 'XOAUTH2', 'PLAIN'],
    });
    this.#options = options;
    this.#limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.#mailboxes = new Set(options.mailboxes.map((m) => m.toLowerCase()));
    for (const [mailbox, addresses] of Object.entries(options.sendAs ?? {})) {
      this.#sendAs.set(mailbox.toLowerCase(), new Set(addresses.map((a) => a.toLowerCase())));
    }
    this.#frontEnd = frontEnd;
    this.#diagnosticHost = `${server}.NAMPRD00.PROD.OUTLOOK.COM`;
    this.#mailboxServer = `${server.replace(/CA(\d+)$/, 'MB$1')}.namprd00.prod.outlook.com`;
    this.#size = size;
  }

  /** Set-CASMailbox -SmtpClientAuthenticationDisabled $true. */
  disableSmtpAuth(mailbox: string): void {
    this.#mailboxSmtpAuth.set(mailbox.toLowerCase(), false);
  }

  /** Set-CASMailbox -SmtpClientAuthenticationDisabled $false (wins over the tenant setting). */
  enableSmtpAuth(mailbox: string): void {
    this.#mailboxSmtpAuth.set(mailbox.toLowerCase(), true);
  }

  /** Set-TransportConfig -SmtpClientAuthenticationDisabled $true. */
  disableTenantSmtpAuth(): void {
    this.#tenantSmtpAuth = false;
  }

  enableTenantSmtpAuth(): void {
    this.#tenantSmtpAuth = true;
  }

  protected override onAuth(auth: SMTPServerAuthentication, session: SMTPServerSession, callback: AuthCallback): void {
    const connection = this.connectionOf(session);
    const mailbox = (auth.username ?? '').toLowerCase();
    const refuse = (code: number, text: string): void => {
      this.logins.push({ mailbox, method: auth.method, ok: false, reply: replyText({ code, lines: text.split('\n') }), at: Date.now() });
      callback(smtpRefusal(code, text));
    };
    const protocol = tlsProtocol(connection);
    if (protocol !== undefined && (TLS_ORDER[protocol] ?? 0) < (TLS_ORDER[this.#options.minTlsVersion ?? 'TLSv1.2'] ?? 2)) {
      return refuse(421, EXCHANGE_REPLIES.legacyTls);
    }
    const scripted = this.takeScript('auth', mailbox);
    if (scripted) return refuse(scripted.responseCode, scripted.message);
    if (auth.method !== 'XOAUTH2') {
      return this.#options.basicAuth === 'disabled'
        ? refuse(535, `5.7.139 Authentication unsuccessful, basic authentication is disabled. ${this.#diagnostics(connection)}`)
        : refuse(550, EXCHANGE_REPLIES.basicAuthRetired);
    }
    const check = this.#options.identity.verifyToken(auth.accessToken ?? '', { resource: 'outlook' });
    if (!check.ok || !this.#mailboxes.has(mailbox) || !this.#permitted(check.appId, mailbox)) {
      return refuse(535, `5.7.3 Authentication unsuccessful ${this.#diagnostics(connection)}`);
    }
    const enabled = this.#mailboxSmtpAuth.get(mailbox) ?? this.#tenantSmtpAuth;
    if (!enabled) {
      const where = this.#mailboxSmtpAuth.get(mailbox) === false ? 'Mailbox' : 'Tenant';
      return refuse(
        535,
        `5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the ${where}. Visit https://aka.ms/smtp_auth_disabled for more information. ${this.#diagnostics(connection)}`,
      );
    }
    this.#loggedIn(session.id, mailbox);
    this.logins.push({ mailbox, method: auth.method, ok: true, reply: '235 2.7.0 Authentication successful', at: Date.now() });
    callback(null, { user: mailbox });
  }

  #permitted(appId: string | undefined, mailbox: string): boolean {
    const permissions = this.#options.mailboxPermissions;
    if (!permissions) return true;
    const granted = Object.entries(permissions).find(([app]) => app.toLowerCase() === appId?.toLowerCase())?.[1];
    return granted === '*' || (granted ?? []).some((m) => m.toLowerCase() === mailbox);
  }

  #loggedIn(sessionId: string, mailbox: string): void {
    this.#sessionMailbox.set(sessionId, mailbox);
    const open = this.#open.get(mailbox) ?? [];
    open.push(sessionId);
    this.#open.set(mailbox, open);
    this.maxConcurrent[mailbox] = Math.max(this.maxConcurrent[mailbox] ?? 0, open.length);
  }

  #loggedOut(sessionId: string): void {
    const mailbox = this.#sessionMailbox.get(sessionId);
    if (mailbox === undefined) return;
    this.#sessionMailbox.delete(sessionId);
    const open = (this.#open.get(mailbox) ?? []).filter((id) => id !== sessionId);
    this.#open.set(mailbox, open);
  }

  protected override onClose(session: SMTPServerSession): void {
    this.#loggedOut(session.id);
  }

  protected override onMessage(raw: Buffer, sizeExceeded: boolean, session: SMTPServerSession, callback: DataCallback): void {
    const mailbox = String(session.user ?? '');
    const connection = this.connectionOf(session);
    if (sizeExceeded) return callback(smtpRefusal(552, '5.3.4 Message size exceeds fixed maximum message size'));
    const scripted = this.takeScript('data', mailbox);
    if (scripted) return callback(scripted);

    if ((this.#open.get(mailbox) ?? []).indexOf(session.id) >= this.#limits.connectionsPerMailbox) {
      this.violations.connections++;
      return callback(smtpRefusal(432, EXCHANGE_REPLIES.concurrentConnections));
    }

    const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
    const allowed = new Set([mailbox, ...(this.#sendAs.get(mailbox) ?? [])]);
    const senders = [from.toLowerCase(), ...headerAddresses(raw, 'from')].filter(Boolean);
    if (senders.some((address) => !allowed.has(address))) {
      return callback(smtpRefusal(550, `${EXCHANGE_REPLIES.sendAsDenied} ${this.#diagnostics(connection)}`));
    }

    const now = Date.now();
    const to = session.envelope.rcptTo.map((r) => r.address);
    const lastDay = (this.#recipients.get(mailbox) ?? []).filter((r) => now - r.at < DAY_MS);
    this.#recipients.set(mailbox, lastDay);
    if (lastDay.reduce((sum, r) => sum + r.count, 0) + to.length > this.#limits.recipientsPerDay) {
      this.violations.recipients++;
      return callback(smtpRefusal(554, EXCHANGE_REPLIES.submissionQuota));
    }
    const recent = (this.#submitted.get(mailbox) ?? []).filter((at) => now - at < this.#limits.windowMs);
    this.#submitted.set(mailbox, recent);
    if (recent.length >= this.#limits.messagesPerWindow) {
      this.violations.messages++;
      if (this.#limits.overMessageRate === 'reject') return callback(smtpRefusal(554, EXCHANGE_REPLIES.submissionQuota));
    }
    recent.push(now);
    lastDay.push({ at: now, count: to.length });

    const messageId = headerValue(raw, 'message-id') ?? `<${randomUUID()}@${this.#mailboxServer}>`;
    const reply = `2.0.0 OK ${messageId} [Hostname=${this.#mailboxServer}]`;
    this.messages.push({ mailbox, from, to, raw, receivedAt: now, reply: `250 ${reply}` });
    callback(null, reply);
  }

  /** "[XX0PR00CA0000.NAMPRD00.PROD.OUTLOOK.COM 2025-01-07T04:13:27.123Z 08DD0123456789AB]". */
  #diagnostics(connection: SMTPConnection | undefined): string {
    return `[${this.#diagnosticHost} ${new Date().toISOString()} ${this.#sessionIds.of(connection)}]`;
  }

  protected override dialect(reply: OutgoingReply, connection: SMTPConnection): Reply | undefined {
    if (hasEnhancedCode(reply)) return undefined;
    const text = reply.lines.join('\n');
    switch (reply.code) {
      case 220:
        return reply.context === false
          ? { code: 220, lines: [`${this.#frontEnd} Microsoft ESMTP MAIL Service ready at ${formatRfc5322Date(new Date())}`] }
          : { code: 220, lines: ['2.0.0 SMTP server ready'] };
      case 250:
        if (reply.context === false) {
          const hello = `${this.#frontEnd} Hello [${connection.remoteAddress}]`;
          if (reply.lines.length <= 1) return { code: 250, lines: [hello] };
          return {
            code: 250,
            lines: [hello, `SIZE ${this.#size}`, 'PIPELINING', 'DSN', 'ENHANCEDSTATUSCODES', connection.secure ? 'AUTH LOGIN XOAUTH2' : 'STARTTLS', '8BITMIME', 'SMTPUTF8'],
          };
        }
        if (reply.context === 'MAIL_FROM_OK') return { code: 250, lines: ['2.1.0 Sender OK'] };
        if (reply.context === 'RCPT_TO_OK') return { code: 250, lines: ['2.1.5 Recipient OK'] };
        break;
      case 235:
        return { code: 235, lines: ['2.7.0 Authentication successful'] };
      case 354:
        return { code: 354, lines: ['Start mail input; end with <CRLF>.<CRLF>'] };
      case 221:
        return { code: 221, lines: ['2.0.0 Service closing transmission channel'] };
      case 530:
        return { code: 530, lines: [`5.7.57 Client not authenticated to send mail. ${this.#diagnostics(connection)}`] };
      case 538:
      case 504:
        // AUTH before STARTTLS: Exchange has not offered AUTH yet.
        return { code: 504, lines: ['5.7.4 Unrecognized authentication type'] };
      case 552:
        return { code: 552, lines: ['5.3.4 Message size exceeds fixed maximum message size'] };
    }
    return EXCHANGE_STOCK[`${reply.code} ${text}`];
  }
}
