// Gmail's submission endpoint (smtp.gmail.com:587) as Google documents it, for Postern's Google
// Workspace upstream to be tested against:
//
//   - STARTTLS first ("220 2.0.0 Ready to start TLS"); AUTH is listed only afterwards.
//   - AUTH XOAUTH2 with an access token from the identity stand-in (a service account's token
//     for the mailbox it impersonates, scope https://mail.google.com/): "The SASL XOAUTH2
//     Mechanism" (developers.google.com/workspace/gmail/imap/xoauth2-protocol). A token that is
//     unknown, expired, lacks the scope or was issued for another mailbox gets the error
//     challenge that page describes, a 334 with base64 JSON, here the body Gmail actually sends:
//     {"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}; the client answers
//     with an empty line and gets "535-5.7.8 Username and Password not accepted. For more
//     information, go to / 535 5.7.8  https://support.google.com/mail/?p=BadCredentials … - gsmtp".
//   - LOGIN/PLAIN work only with an app password (appPasswords), otherwise the same 535 5.7.8.
//   - Replies end in "<session id> - gsmtp", as Gmail's do; accepted mail gets
//     "250 2.0.0 OK  <unix time> <session id> - gsmtp".
//   - Gmail does not refuse a From it does not own: it rewrites it to the account (unless it is a
//     configured "Send mail as" alias). The stand-in records messages as sent; refusals Gmail can
//     give (550 5.4.5 daily sending limit, 421 4.7.0 try again later, 552 5.2.3…) come from
//     script().
//
// smtp-server already implements the XOAUTH2 error challenge (onAuth answering { data }), and its
// final "535 Error: Username and Password not accepted" is rewritten into Gmail's text below.
import { randomInt } from 'node:crypto';
import type { SMTPServerAuthentication, SMTPServerSession } from 'smtp-server';
import type { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import { GMAIL_SCOPE } from './google-token-endpoint.js';
import type { IdentityStandIn } from './identity-platform.js';
import { smtpRefusal } from './scripted-replies.js';
import { ConnectionIds, ScriptedSmtpStandIn, type AuthCallback, type DataCallback } from './scripted-smtp-standin.js';
import { hasEnhancedCode, replyText, type OutgoingReply, type Reply } from './standin-smtp-server.js';

export interface GmailSmtpStandInOptions {
  certificate: { cert: string; key: string };
  identity: Pick<IdentityStandIn, 'verifyToken'>;
  /** mailbox -> app password, for LOGIN/PLAIN (accounts with 2-Step Verification). */
  appPasswords?: Record<string, string>;
  /** SIZE advertised and enforced (default 35882577, Gmail's). */
  size?: number;
}

/** The XOAUTH2 error challenge Gmail sends, before base64. */
export const GMAIL_XOAUTH2_ERROR = { status: '400', schemes: 'Bearer', scope: GMAIL_SCOPE } as const;

const LETTERS = 'abcdefghijklmnopqrstuvwxyz';

/** Gmail's per-session id, "t66sm6271302pjb.45", at the end of its replies. */
function gmailSessionId(): string {
  const letter = (): string => LETTERS[randomInt(LETTERS.length)]!;
  return `${letter()}${randomInt(10, 100)}sm${randomInt(1_000_000, 10_000_000)}${letter()}${letter()}${letter()}.${randomInt(0, 100)}`;
}

export class GmailSmtpStandIn extends ScriptedSmtpStandIn {
  readonly #options: GmailSmtpStandInOptions;
  readonly #sessionIds = new ConnectionIds(gmailSessionId);
  readonly #size: number;

  constructor(options: GmailSmtpStandInOptions) {
    const size = options.size ?? 35_882_577;
    super({
      key: options.certificate.key,
      cert: options.certificate.cert,
      name: 'smtp.gmail.com',
      size,
      authMethods: ['LOGIN', 'PLAIN', 'XOAUTH2'],
    });
    this.#options = options;
    this.#size = size;
  }

  protected override onAuth(auth: SMTPServerAuthentication, session: SMTPServerSession, callback: AuthCallback): void {
    const connection = this.connectionOf(session);
    const mailbox = (auth.username ?? '').toLowerCase();
    const record = (ok: boolean, reply: Reply): void => {
      this.logins.push({ mailbox, method: auth.method, ok, reply: replyText(reply), at: Date.now() });
    };
    const scripted = this.takeScript('auth', mailbox);
    if (scripted) {
      record(false, { code: scripted.responseCode, lines: scripted.message.split('\n') });
      return callback(scripted);
    }
    if (auth.method === 'XOAUTH2') {
      const check = this.#options.identity.verifyToken(auth.accessToken ?? '', { resource: 'gmail' });
      if (!check.ok || check.subject?.toLowerCase() !== mailbox) {
        record(false, { code: 334, lines: [Buffer.from(JSON.stringify(GMAIL_XOAUTH2_ERROR)).toString('base64')] });
        return callback(null, { data: { ...GMAIL_XOAUTH2_ERROR } });
      }
    } else {
      const password = Object.entries(this.#options.appPasswords ?? {}).find(([m]) => m.toLowerCase() === mailbox)?.[1];
      if (password === undefined || password.replace(/\s+/g, '') !== (auth.password ?? '').replace(/\s+/g, '')) {
        const refusal = this.#badCredentials(connection);
        record(false, refusal);
        return callback(smtpRefusal(refusal.code, refusal.lines.join('\n')));
      }
    }
    record(true, { code: 235, lines: ['2.7.0 Accepted'] });
    callback(null, { user: mailbox });
  }

  protected override onMessage(raw: Buffer, sizeExceeded: boolean, session: SMTPServerSession, callback: DataCallback): void {
    const mailbox = String(session.user ?? '');
    const connection = this.connectionOf(session);
    if (sizeExceeded) {
      return callback(
        smtpRefusal(552, `5.3.4 Your message exceeded Google's message size limits. For more information, go to\n5.3.4  https://support.google.com/mail/?p=MaxSizeError ${this.#sessionIds.of(connection)} - gsmtp`),
      );
    }
    const scripted = this.takeScript('data', mailbox);
    if (scripted) return callback(scripted);
    const now = Date.now();
    const reply = `2.0.0 OK  ${Math.floor(now / 1000)} ${this.#sessionIds.of(connection)} - gsmtp`;
    this.messages.push({
      mailbox,
      from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
      to: session.envelope.rcptTo.map((r) => r.address),
      raw,
      receivedAt: now,
      reply: `250 ${reply}`,
    });
    callback(null, reply);
  }

  #badCredentials(connection: SMTPConnection | undefined): Reply {
    return {
      code: 535,
      lines: [
        '5.7.8 Username and Password not accepted. For more information, go to',
        `5.7.8  https://support.google.com/mail/?p=BadCredentials ${this.#sessionIds.of(connection)} - gsmtp`,
      ],
    };
  }

  protected override dialect(reply: OutgoingReply, connection: SMTPConnection): Reply | undefined {
    if (hasEnhancedCode(reply)) return undefined;
    const id = this.#sessionIds.of(connection);
    const text = reply.lines.join('\n');
    switch (reply.code) {
      case 220:
        return reply.context === false ? { code: 220, lines: [`smtp.gmail.com ESMTP ${id} - gsmtp`] } : { code: 220, lines: ['2.0.0 Ready to start TLS'] };
      case 250:
        if (reply.context === false) {
          const hello = `smtp.gmail.com at your service, [${connection.remoteAddress}]`;
          if (reply.lines.length <= 1) return { code: 250, lines: [hello] };
          return {
            code: 250,
            lines: [hello, `SIZE ${this.#size}`, '8BITMIME', connection.secure ? 'AUTH LOGIN PLAIN XOAUTH2' : 'STARTTLS', 'ENHANCEDSTATUSCODES', 'PIPELINING', 'SMTPUTF8'],
          };
        }
        if (reply.context === 'MAIL_FROM_OK') return { code: 250, lines: [`2.1.0 OK ${id} - gsmtp`] };
        if (reply.context === 'RCPT_TO_OK') return { code: 250, lines: [`2.1.5 OK ${id} - gsmtp`] };
        if (text === 'OK') return { code: 250, lines: [`2.0.0 OK ${id} - gsmtp`] };
        break;
      case 235:
        return { code: 235, lines: ['2.7.0 Accepted'] };
      case 354:
        return { code: 354, lines: [`Go ahead ${id} - gsmtp`] };
      case 221:
        return { code: 221, lines: [`2.0.0 closing connection ${id} - gsmtp`] };
      case 530:
        return connection.secure
          ? { code: 530, lines: ['5.7.0 Authentication Required. For more information, go to', `5.7.0  https://support.google.com/mail/?p=WantAuthError ${id} - gsmtp`] }
          : { code: 530, lines: [`5.7.0 Must issue a STARTTLS command first. ${id} - gsmtp`] };
      case 538:
        return { code: 530, lines: [`5.7.0 Must issue a STARTTLS command first. ${id} - gsmtp`] };
      case 535:
        // smtp-server's answer to the line that follows the XOAUTH2 error challenge.
        return this.#badCredentials(connection);
      case 504:
        return { code: 504, lines: [`5.7.4 Unrecognized authentication type. ${id} - gsmtp`] };
      case 503:
        return { code: 503, lines: [`5.5.1 ${text.replace(/^Error: /, '')}. ${id} - gsmtp`] };
      case 500:
        return { code: 502, lines: [`5.5.1 Unrecognized command. ${id} - gsmtp`] };
    }
    return undefined;
  }
}
