// What Microsoft 365's and Google's SMTP replies mean for the queue, with the sentence an
// administrator needs. Their codes do not follow the usual "4xx later, 5xx never" reading:
// Exchange answers a sending mailbox over its quota with 554 5.2.0 (retry in a minute, not a
// bounce), and refuses a login it would accept once SMTP AUTH is switched on with 535 5.7.139
// (fix the tenant, do not bounce the queue). Each class:
//
//   - retry: deferred with the usual backoff (a temporary fault of the provider);
//   - retry_later: deferred until a given time (throttling: the provider said when, or its limits
//     do): not the mail's fault, nothing to fix;
//   - fail: the reply stands as given (a recipient refused, a message too big): 5xx bounces;
//   - configuration: something the administrator must fix (permissions, SMTP AUTH switched off):
//     deferred, never bounced, an error with the fix logged once, and with `hold` the mailbox or
//     the whole upstream stops trying until a delivery succeeds or the hold ends.
//
// Sources: Microsoft's "Fix email delivery issues for error code 5.7.x" pages, "Authenticate an
// IMAP, POP or SMTP connection using OAuth", "Sending limits in Exchange Online"; Google's
// "SMTP error reference". Replies that are not listed keep their usual reading.
import type { DeliveryOutcome } from '../delivery-target.js';

export type ReplyClass =
  | { action: 'retry'; advice?: string }
  | { action: 'retry_later'; afterMs: number; advice: string }
  | { action: 'fail'; advice?: string }
  | { action: 'configuration'; hold: 'mailbox' | 'upstream' | false; problem: string; advice: string };

export interface ReplyContext {
  /** The mailbox Postern logged in as. */
  mailbox: string;
  /** The envelope sender of the message. */
  sender: string;
}

export type ReplyClassifier = (outcome: DeliveryOutcome, context: ReplyContext) => ReplyClass | undefined;

const MINUTE = 60_000;

/** Exchange Online over SMTP (smtp.office365.com). */
export const classifyMicrosoftReply: ReplyClassifier = (outcome, { mailbox, sender }) => {
  if (outcome.code === null || outcome.status === 'delivered') return undefined;
  const text = outcome.response;
  const code = outcome.code;
  const enhanced = outcome.enhanced;
  if (code === 535 && enhanced === '5.7.139') {
    const tenant = /for the tenant/i.test(text);
    const securityDefaults = /security defaults|conditional access|did not meet the criteria/i.test(text);
    return {
      action: 'configuration',
      hold: tenant || securityDefaults ? 'upstream' : 'mailbox',
      problem: 'smtp_auth_disabled',
      advice: tenant
        ? 'SMTP AUTH is switched off for the whole tenant: in Exchange Online PowerShell run Set-TransportConfig -SmtpClientAuthenticationDisabled $false (or switch it on per mailbox with Set-CASMailbox)'
        : securityDefaults
          ? 'the tenant\'s Security Defaults or a Conditional Access policy blocks SMTP AUTH: exclude this app or mailbox from the policy'
          : `SMTP AUTH is switched off for the mailbox ${mailbox}: run Set-CASMailbox -Identity ${mailbox} -SmtpClientAuthenticationDisabled $false`,
    };
  }
  if (code === 535 && enhanced === '5.7.3') {
    return {
      action: 'configuration',
      hold: 'mailbox',
      problem: 'token_refused_by_exchange',
      advice: `Exchange refused the app's token for ${mailbox}: give the app's Exchange service principal access to the mailbox (New-ServicePrincipal once, then Add-MailboxPermission -Identity ${mailbox} -User <service principal ID> -AccessRights FullAccess), check the app has SMTP.SendAsApp with admin consent, and that ${mailbox} is a licensed mailbox`,
    };
  }
  if (code === 550 && enhanced === '5.7.30') {
    return {
      action: 'configuration',
      hold: 'upstream',
      problem: 'basic_auth_refused',
      advice: 'Exchange refused a password login (basic authentication is off): this upstream must use OAuth2; check it is type = "microsoft365"',
    };
  }
  if (code === 530 && enhanced === '5.7.57') {
    return {
      action: 'configuration',
      hold: 'mailbox',
      problem: 'not_authenticated',
      advice: `Exchange says the session is not authenticated as ${mailbox}: check the mailbox exists and the app may use it`,
    };
  }
  if (enhanced === '5.7.60' || /SendAsDenied|permission to send as this sender/i.test(text)) {
    return {
      action: 'configuration',
      hold: false,
      problem: 'send_as_denied',
      advice: `the mailbox ${mailbox} may not send as ${sender || 'this sender'}: grant it with Add-RecipientPermission -Identity ${sender || '<sender>'} -Trustee ${mailbox} -AccessRights SendAs, or send from ${mailbox}`,
    };
  }
  if (code === 432 && enhanced === '4.3.2') {
    return { action: 'retry_later', afterMs: MINUTE, advice: `too many connections at once for ${mailbox} (Exchange allows 3): lower max_connections` };
  }
  if (/SubmissionQuotaExceeded/i.test(text) || (code === 554 && enhanced === '5.2.0' && /quota/i.test(text))) {
    return { action: 'retry_later', afterMs: MINUTE, advice: `${mailbox} is over Exchange's sending rate (30 messages a minute): the mail waits and goes out within the limit` };
  }
  if (enhanced === '5.2.2') {
    return {
      action: 'configuration',
      hold: 'mailbox',
      problem: 'mailbox_full',
      advice: `the sending mailbox ${mailbox} is full (Exchange saves each sent message in its Sent Items): empty it or raise its quota`,
    };
  }
  if (code === 421 && enhanced === '4.7.66') {
    return { action: 'retry', advice: 'Exchange refused the TLS version: Postern uses TLS 1.2 or later, so something between Postern and Microsoft (a proxy) downgrades it' };
  }
  if (enhanced === '5.7.68') {
    return {
      action: 'configuration',
      hold: 'upstream',
      problem: 'tenant_blocked',
      advice: 'Exchange refused mail from this tenant (5.7.68): see the tenant\'s message center and the restricted entities page in the Defender portal',
    };
  }
  if (/^5\.7\.70[58]$/.test(enhanced)) {
    return {
      action: 'configuration',
      hold: 'upstream',
      problem: 'tenant_blocked',
      advice: 'Exchange has blocked the tenant from sending (outbound spam protection, 5.7.705/5.7.708): an administrator must have the block lifted (Defender portal, restricted entities; or a Microsoft support request)',
    };
  }
  if (code === 430 && enhanced === '4.2.0') {
    return { action: 'retry', advice: `Exchange could not open the mailbox ${mailbox} (a temporary logon failure)` };
  }
  return undefined;
};

/** Gmail / Google Workspace over SMTP (smtp.gmail.com). */
export const classifyGoogleReply: ReplyClassifier = (outcome, { mailbox }) => {
  if (outcome.code === null || outcome.status === 'delivered') return undefined;
  const text = outcome.response;
  if (outcome.code === 535 || (outcome.code === 534 && /5\.7\.(9|14)/.test(text))) {
    return {
      action: 'configuration',
      hold: 'mailbox',
      problem: 'token_refused_by_google',
      advice: `Google refused the token for ${mailbox}: check the service account's domain-wide delegation includes https://mail.google.com/ and that ${mailbox} is a user of the Workspace domain`,
    };
  }
  if (/5\.4\.5/.test(outcome.enhanced) || /sending (limit|quota) exceeded/i.test(text)) {
    return { action: 'retry_later', afterMs: 60 * MINUTE, advice: `${mailbox} is over Google's daily sending limit: the mail waits` };
  }
  if (outcome.code === 454 || (outcome.code === 421 && /4\.7\.0/.test(text))) {
    return { action: 'retry_later', afterMs: 5 * MINUTE, advice: 'Google is throttling logins or connections from this address' };
  }
  return undefined;
};
