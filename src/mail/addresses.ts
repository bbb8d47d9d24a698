// Address lists in header fields (To, Cc, Bcc, From...), read with nodemailer's addressparser.
import addressparser from 'nodemailer/lib/addressparser';

/** The mailbox addresses of an address-list header value, groups flattened, as written. */
export function mailboxAddresses(value: string): string[] {
  return addressparser(value, { flatten: true })
    .map((entry) => entry.address)
    .filter(Boolean);
}
