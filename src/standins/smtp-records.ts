// What the SMTP stand-ins write down for tests to read (logins and accepted messages), and what they
// (and the Graph stand-in) need to read a message's header: one field's value, and its addresses.
import addressparser from 'nodemailer/lib/addressparser';

export interface StandInLogin {
  /** The SASL user (the mailbox the client logs in as). */
  mailbox: string;
  /** 'XOAUTH2', 'LOGIN', 'PLAIN'. */
  method: string;
  ok: boolean;
  /** The reply the AUTH command got, as sent: "235 2.7.0 Authentication successful". */
  reply: string;
  at: number;
}

export interface StandInMessage {
  /** The mailbox the session logged in as. */
  mailbox: string;
  /** MAIL FROM ('' for <>). */
  from: string;
  to: string[];
  raw: Buffer;
  receivedAt: number;
  /** The reply that accepted it. */
  reply: string;
}

/** The unfolded value of the first `name` header field, if the message has one. */
export function headerValue(raw: Buffer, name: string): string | undefined {
  const text = raw.toString('latin1');
  const end = text.search(/\r?\n\r?\n/);
  const header = (end < 0 ? text : text.slice(0, end)).replace(/\r?\n[ \t]+/g, ' ');
  const wanted = name.toLowerCase();
  for (const line of header.split(/\r?\n/)) {
    const colon = line.indexOf(':');
    if (colon > 0 && line.slice(0, colon).trim().toLowerCase() === wanted) return line.slice(colon + 1).trim();
  }
  return undefined;
}

/** The mailbox addresses in the first `name` header field (From, Sender…), lower case. */
export function headerAddresses(raw: Buffer, name: string): string[] {
  const value = headerValue(raw, name);
  if (value === undefined) return [];
  return addressparser(value, { flatten: true })
    .map((entry) => entry.address.toLowerCase())
    .filter(Boolean);
}
