// The access tokens the identity stand-in has handed out, so that the SMTP stand-ins can check
// the tokens clients present the way Exchange Online and Gmail do: known, not expired, and
// issued for them (an Outlook token is no good at Graph, a Google token without the
// https://mail.google.com/ scope is no good at smtp.gmail.com).
//
// Real access tokens cannot be recalled once issued: they work until they expire. So the only
// ways a token stops working here are its expiry, expireAll() (a test's "the hour is up" in the
// middle of a burst) and invalidate(), which a test asks for explicitly.

/** What a token may be used at: Exchange Online (SMTP), Microsoft Graph, Gmail (SMTP). */
export type TokenResource = 'outlook' | 'graph' | 'gmail';

export interface IssuedToken {
  token: string;
  provider: 'microsoft' | 'google';
  resource: TokenResource | undefined;
  /** Microsoft: the app (client) id and its tenant. */
  appId?: string;
  tenantId?: string;
  /** Google: the service account, and the mailbox it acts for (the JWT's `sub`). */
  clientEmail?: string;
  subject?: string;
  scopes: string[];
  expiresAt: number;
}

export type TokenCheck =
  | { ok: true; appId?: string; tenantId?: string; clientEmail?: string; subject?: string; expiresAt: number }
  | { ok: false; reason: 'unknown' | 'expired' | 'wrong_resource' };

export class IssuedTokens {
  readonly #tokens = new Map<string, IssuedToken>();

  add(token: IssuedToken): void {
    this.#tokens.set(token.token, token);
  }

  check(token: string, resource: TokenResource): TokenCheck {
    const issued = this.#tokens.get(token);
    if (!issued) return { ok: false, reason: 'unknown' };
    if (Date.now() >= issued.expiresAt) return { ok: false, reason: 'expired' };
    if (issued.resource !== resource) return { ok: false, reason: 'wrong_resource' };
    return {
      ok: true,
      expiresAt: issued.expiresAt,
      ...(issued.appId !== undefined ? { appId: issued.appId } : {}),
      ...(issued.tenantId !== undefined ? { tenantId: issued.tenantId } : {}),
      ...(issued.clientEmail !== undefined ? { clientEmail: issued.clientEmail } : {}),
      ...(issued.subject !== undefined ? { subject: issued.subject } : {}),
    };
  }

  /** Every token issued so far expires now. */
  expireAll(): void {
    const now = Date.now();
    for (const token of this.#tokens.values()) token.expiresAt = Math.min(token.expiresAt, now);
  }

  /** Forgets the tokens `matches` picks (a test that wants a revocation to bite at once). */
  invalidate(matches: (token: IssuedToken) => boolean): void {
    for (const [value, token] of this.#tokens) if (matches(token)) this.#tokens.delete(value);
  }
}
