// OAuth2 access tokens for upstreams that log in with XOAUTH2 (Microsoft 365, Google) instead of
// a password. Two grants, both "the application proves who it is and gets a token", no user in
// the loop:
//
//   - Microsoft: the client-credentials grant against the tenant's token endpoint
//     ({authority}/{tenant}/oauth2/v2.0/token), with a client secret or a certificate (a client
//     assertion: a JWT signed with the certificate's key, PS256, naming the certificate by its
//     SHA-256 thumbprint, x5t#S256). One token per tenant and app serves every mailbox: the
//     mailbox is chosen in the XOAUTH2 login, and Exchange checks the app may use it.
//   - Google: the JWT-bearer grant of a service account with domain-wide delegation. The JWT
//     names the mailbox to act for (`sub`), so there is one token per mailbox.
//
// Tokens are cached and fetched again before they expire (a fifth of their lifetime and a second
// early, at most five minutes), so a burst of mail never waits on an expired token; concurrent requests for the
// same token share one fetch. A server that refuses a token anyway (revoked, clock skew) gets a
// fresh one (`renew`).
//
// A refusal from the token endpoint (wrong secret, unknown app, missing consent: HTTP 400/401 with
// an OAuth2 error) is Postern's configuration, not the mail's: TokenFailure with problem
// 'token_refused', which holds the upstream. Anything else (no answer, 5xx, 429) is temporary.
// Secrets never leave this file except in the form body sent to the endpoint over TLS.
import { createHash, createPrivateKey, randomUUID, X509Certificate, type KeyObject } from 'node:crypto';
import type { Secret } from '../../config/secret.js';
import { deliveryError } from '../delivery-error.js';
import { TokenFailure } from '../smtp-session.js';
import { type HttpsAnswer, httpsRequest, jsonBody } from './https-client.js';

/** jose is loaded when a JWT is first signed (certificate credentials, Google): 9 MB of RSS otherwise spent by every Postern. */
const loadJose = () => import('jose');

export interface TokenSource {
  /** An access token that lets `mailbox` log in. */
  token(mailbox: string, renew: boolean): Promise<string>;
}

export interface TokenEndpointOptions {
  /** "upstream m365", for failure texts. */
  destination: string;
  /** PEM CAs to trust instead of the public ones (ca_file). */
  ca?: string;
  /** Per request (connect + answer). */
  timeoutMs: number;
  /** Clock, for tests. */
  now?: () => number;
}

/**
 * Refresh this long before expiry: a fifth of the lifetime plus a second (a token's `exp` is in
 * whole seconds, so it may end up to a second before `expires_in` says), at most five minutes,
 * at most half the lifetime.
 */
function refreshMargin(lifetimeMs: number): number {
  return Math.min(lifetimeMs / 5 + 1000, 5 * 60_000, lifetimeMs / 2);
}

interface CachedToken {
  value: string;
  /** When to fetch a new one (before it expires). */
  refreshAt: number;
  expiresAt: number;
}

/** Token cache and single-flight fetch, keyed by what the token is for. */
abstract class CachingTokenSource implements TokenSource {
  readonly #cache = new Map<string, CachedToken>();
  readonly #fetching = new Map<string, Promise<string>>();
  protected readonly options: TokenEndpointOptions;
  protected readonly now: () => number;

  constructor(options: TokenEndpointOptions) {
    this.options = options;
    this.now = options.now ?? Date.now;
  }

  /** The cache key for `mailbox`'s token. */
  protected abstract keyFor(mailbox: string): string;
  /** Fetches a new token for `mailbox`: its value and lifetime in seconds. */
  protected abstract fetchToken(mailbox: string): Promise<{ value: string; expiresIn: number }>;

  token(mailbox: string, renew: boolean): Promise<string> {
    const key = this.keyFor(mailbox);
    const cached = this.#cache.get(key);
    if (!renew && cached && this.now() < cached.refreshAt) return Promise.resolve(cached.value);
    if (renew && cached) this.#cache.delete(key);
    const inFlight = this.#fetching.get(key);
    if (inFlight) return inFlight;
    const fetching = this.fetchToken(mailbox)
      .then(
        ({ value, expiresIn }) => {
          const now = this.now();
          const lifetime = Math.max(expiresIn, 1) * 1000;
          this.#cache.set(key, { value, expiresAt: now + lifetime, refreshAt: now + lifetime - refreshMargin(lifetime) });
          this.#sweep(now);
          return value;
        },
        (err: unknown) => {
          // An early refresh that found the endpoint down: the token in hand is still good.
          const stillValid = !renew && cached && this.now() < cached.expiresAt;
          if (stillValid && err instanceof TokenFailure && err.problem === undefined) return cached.value;
          throw err;
        },
      )
      .finally(() => this.#fetching.delete(key));
    this.#fetching.set(key, fetching);
    return fetching;
  }

  /** Expired tokens go (Google's are per mailbox: one per sender that ever sent). */
  #sweep(now: number): void {
    if (this.#cache.size < 64) return;
    for (const [key, token] of this.#cache) if (token.expiresAt <= now) this.#cache.delete(key);
  }

  /** POSTs a form to the token endpoint and reads the token out of the JSON answer. */
  protected async requestToken(url: string, form: Record<string, string>, explain: (error: OAuthErrorBody) => string): Promise<{ value: string; expiresIn: number }> {
    let answer: HttpsAnswer;
    try {
      answer = await httpsRequest(
        url,
        { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' }, body: new URLSearchParams(form).toString() },
        this.options,
      );
    } catch (err) {
      throw new TokenFailure(
        deliveryError('TOKEN_UNAVAILABLE', { destination: this.options.destination, reason: `${new URL(url).origin}: ${(err as Error).message}` }).toOutcome(),
      );
    }
    // Not JSON: handled by the status below.
    const json = jsonBody(answer) ?? {};
    if (answer.status === 200 && typeof json.access_token === 'string') {
      const expiresIn = Number(json.expires_in);
      return { value: json.access_token, expiresIn: Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn : 3600 };
    }
    const error = json as OAuthErrorBody;
    // 400 and 401 with an OAuth2 error code: the endpoint looked at our credentials and said no.
    if ((answer.status === 400 || answer.status === 401) && typeof error.error === 'string') {
      throw new TokenFailure(
        deliveryError('TOKEN_REFUSED', { destination: this.options.destination, reason: explain(error) }).toOutcome(),
        'token_refused',
      );
    }
    const what = typeof error.error === 'string' ? `${error.error}: ${firstLine(error.error_description)}` : firstLine(answer.body.toString('utf8')) || 'no token in the answer';
    throw new TokenFailure(
      deliveryError('TOKEN_UNAVAILABLE', { destination: this.options.destination, reason: `HTTP ${answer.status} from ${new URL(url).origin}: ${what}` }).toOutcome(),
    );
  }
}

/** The error body of RFC 6749 section 5.2, with Microsoft's additions. */
export interface OAuthErrorBody {
  error?: string;
  error_description?: string;
  error_codes?: number[];
}

function firstLine(text: unknown): string {
  return typeof text === 'string' ? (text.split(/\r?\n/)[0] ?? '').trim().slice(0, 300) : '';
}

// ---- Microsoft identity platform --------------------------------------------------------

export interface MicrosoftCredentials {
  authority: string;
  tenant: string;
  clientId: string;
  /** The resource's ".default" scope: https://outlook.office365.com/.default for SMTP. */
  scope: string;
  secret?: Secret;
  /** Certificate credentials: the certificate uploaded to the app registration, and its key. */
  certificate?: { certificatePem: string; privateKey: Secret };
}

export class MicrosoftTokenSource extends CachingTokenSource {
  readonly #credentials: MicrosoftCredentials;
  readonly #tokenUrl: string;
  readonly #signing: { key: KeyObject; thumbprint: string } | undefined;

  constructor(credentials: MicrosoftCredentials, options: TokenEndpointOptions) {
    super(options);
    this.#credentials = credentials;
    this.#tokenUrl = `${credentials.authority.replace(/\/+$/, '')}/${encodeURIComponent(credentials.tenant)}/oauth2/v2.0/token`;
    if (credentials.certificate) {
      const der = new X509Certificate(credentials.certificate.certificatePem).raw;
      this.#signing = {
        key: createPrivateKey(credentials.certificate.privateKey.reveal()),
        thumbprint: createHash('sha256').update(der).digest('base64url'),
      };
    }
  }

  /** One token per tenant and app: Exchange takes the mailbox from the XOAUTH2 login. */
  protected keyFor(): string {
    return '';
  }

  protected async fetchToken(): Promise<{ value: string; expiresIn: number }> {
    const c = this.#credentials;
    const form: Record<string, string> = { client_id: c.clientId, scope: c.scope, grant_type: 'client_credentials' };
    if (this.#signing) {
      form.client_assertion_type = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
      form.client_assertion = await this.#assertion(this.#signing);
    } else if (c.secret) {
      form.client_secret = c.secret.reveal();
    }
    return this.requestToken(this.#tokenUrl, form, (e) => explainMicrosoftError(e, c));
  }

  /** The client assertion Microsoft documents for certificate credentials: valid 10 minutes. */
  async #assertion(signing: { key: KeyObject; thumbprint: string }): Promise<string> {
    const { SignJWT } = await loadJose();
    const now = Math.floor(this.now() / 1000);
    return new SignJWT({})
      .setProtectedHeader({ alg: 'PS256', typ: 'JWT', 'x5t#S256': signing.thumbprint })
      .setIssuer(this.#credentials.clientId)
      .setSubject(this.#credentials.clientId)
      .setAudience(this.#tokenUrl)
      .setJti(randomUUID())
      .setIssuedAt(now)
      .setNotBefore(now)
      .setExpirationTime(now + 600)
      .sign(signing.key);
  }
}

/** AADSTS codes an administrator meets when setting up the app, with what to do about each. */
const AADSTS_ADVICE: Record<number, string> = {
  7000215: 'the client secret is wrong: put the secret\'s Value (not its Secret ID) from the app registration\'s "Certificates & secrets" into client_secret_file',
  7000222: 'the client secret has expired: create a new one under "Certificates & secrets" and put its Value into client_secret_file',
  700027: 'the certificate assertion was refused: upload certificate_file\'s certificate to the app registration ("Certificates & secrets" > Certificates) and check private_key_file is its key',
  700016: 'no app with this client_id in this tenant: check client_id and tenant (the app must be registered in, or consented to by, the tenant)',
  90002: 'the tenant does not exist: check tenant (the primary domain such as contoso.onmicrosoft.com, or the tenant ID)',
  7000112: 'the app is disabled in this tenant: enable its enterprise application (service principal)',
  700024: 'the client assertion is not within its valid time range: check this machine\'s clock',
  70011: 'the scope is not valid for this app',
  1002012: 'the scope is not valid for this app',
  65001: 'the app has no admin consent for this permission: grant admin consent in the app registration\'s "API permissions"',
  500011: 'the resource (Office 365 Exchange Online) was not found in the tenant: the tenant needs an Exchange Online subscription',
};

function explainMicrosoftError(error: OAuthErrorBody, c: MicrosoftCredentials): string {
  const code = error.error_codes?.[0] ?? Number(/AADSTS(\d+)/.exec(error.error_description ?? '')?.[1]);
  const advice = code ? AADSTS_ADVICE[code] : undefined;
  const said = `${error.error}${code ? ` (AADSTS${code})` : ''}`;
  return advice ? `${said}: ${advice}` : `${said}: ${firstLine(error.error_description)} (tenant ${c.tenant}, client_id ${c.clientId})`;
}

// ---- Google service account ---------------------------------------------------------------

export interface GoogleServiceAccount {
  clientEmail: string;
  privateKeyId: string;
  privateKey: Secret;
  tokenUri: string;
  /** "https://mail.google.com/" for SMTP. */
  scope: string;
}

export class GoogleTokenSource extends CachingTokenSource {
  readonly #account: GoogleServiceAccount;
  readonly #key: KeyObject;

  constructor(account: GoogleServiceAccount, options: TokenEndpointOptions) {
    super(options);
    this.#account = account;
    this.#key = createPrivateKey(account.privateKey.reveal());
  }

  /** Each mailbox is its own delegation (`sub`), so its own token. */
  protected keyFor(mailbox: string): string {
    return mailbox.toLowerCase();
  }

  protected async fetchToken(mailbox: string): Promise<{ value: string; expiresIn: number }> {
    const a = this.#account;
    const { SignJWT } = await loadJose();
    const now = Math.floor(this.now() / 1000);
    const assertion = await new SignJWT({ scope: a.scope })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid: a.privateKeyId })
      .setIssuer(a.clientEmail)
      .setSubject(mailbox)
      .setAudience(a.tokenUri)
      .setIssuedAt(now)
      .setExpirationTime(now + 3600)
      .sign(this.#key);
    return this.requestToken(a.tokenUri, { grant_type: 'urn:ietf:params:oauth:grant-type:jwt-bearer', assertion }, (e) => explainGoogleError(e, a, mailbox));
  }
}

function explainGoogleError(error: OAuthErrorBody, a: GoogleServiceAccount, mailbox: string): string {
  const said = `${error.error}: ${firstLine(error.error_description)}`;
  if (error.error === 'unauthorized_client') {
    return `${said} (the service account ${a.clientEmail} is not allowed to act for ${mailbox}: in the Google Admin console, Security > API controls > Domain-wide delegation, add its client ID with the scope ${a.scope})`;
  }
  if (error.error === 'invalid_grant') {
    return `${said} (check that the key in service_account_file is current and not deleted, that ${mailbox} exists, and this machine's clock)`;
  }
  return said;
}
