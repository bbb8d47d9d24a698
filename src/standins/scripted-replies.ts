// Replies a test orders in advance: "the next AUTH gets 535 5.7.139 …", "the next two messages
// get 432 4.3.2 …". The stand-ins produce the common refusals by themselves (bad token, limits,
// SendAs); scripts cover everything else a provider can answer, so Postern's handling of each
// documented reply can be tested without teaching the stand-in when the provider sends it.
//
// A scripted reply is a refusal (4xx or 5xx) and replaces the stand-in's own decision for that
// command. 421 closes the connection afterwards, as smtp-server does for any 421.

/** Where in the session: the AUTH command, MAIL FROM, each RCPT TO, or the end of DATA. */
export type ScriptPoint = 'auth' | 'mail' | 'rcpt' | 'data';

export interface ScriptedReply {
  at: ScriptPoint;
  code: number;
  /** The text after the code, enhanced status code included; "\n" makes a multi-line reply. */
  message: string;
  /** How many matching commands get it (default 1). */
  times?: number;
  /** Only for this mailbox (the AUTH user, or the session's user later on). */
  mailbox?: string;
}

interface Pending {
  at: ScriptPoint;
  code: number;
  message: string;
  remaining: number;
  mailbox: string | undefined;
}

export class ScriptedReplies {
  readonly #pending: Pending[] = [];

  add(reply: ScriptedReply): void {
    if (reply.code < 400 || reply.code > 599) throw new Error(`scripted replies are refusals (4xx/5xx), not ${reply.code}`);
    this.#pending.push({
      at: reply.at,
      code: reply.code,
      message: reply.message,
      remaining: reply.times ?? 1,
      mailbox: reply.mailbox?.toLowerCase(),
    });
  }

  /** The reply scripted for this command, if any; uses up one of its times. */
  take(at: ScriptPoint, mailbox: string | undefined): Error & { responseCode: number } | undefined {
    const index = this.#pending.findIndex((p) => p.at === at && (p.mailbox === undefined || p.mailbox === mailbox?.toLowerCase()));
    const pending = this.#pending[index];
    if (!pending) return undefined;
    if (--pending.remaining <= 0) this.#pending.splice(index, 1);
    return smtpRefusal(pending.code, pending.message);
  }

  /** Scripted replies not used yet. */
  get pending(): number {
    return this.#pending.reduce((sum, p) => sum + p.remaining, 0);
  }
}

/** An error smtp-server's handlers turn into exactly this reply. */
export function smtpRefusal(code: number, message: string): Error & { responseCode: number } {
  return Object.assign(new Error(message), { responseCode: code });
}
