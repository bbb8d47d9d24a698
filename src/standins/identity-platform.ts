// The identity side of the two clouds Postern relays through, on one HTTPS server on loopback:
// Microsoft's token endpoint at /{tenant}/oauth2/v2.0/token (entra-token-endpoint.ts) and
// Google's at /token (google-token-endpoint.ts). Postern points its "authority" / token_uri here
// instead of login.microsoftonline.com or oauth2.googleapis.com, and trusts the stand-in's CA.
//
// Besides answering as the real endpoints do, it is a test instrument:
//   - the tokens it issues are remembered, so the SMTP stand-ins can check them (verifyToken),
//     and a test can make them all expire at once (expireAllTokens) to see Postern refresh in
//     the middle of a burst;
//   - every request is recorded (requests), so a test can count token fetches;
//   - failNext() answers the next requests with a chosen status and body (a 503, a 500, an
//     AADSTS error the stand-in would not produce by itself), and delayMs slows every answer.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { LoopbackHttps } from './loopback-https.js';
import { EntraTokenEndpoint, type EntraApp, type EntraAppRegistration, type TokenAnswer } from './entra-token-endpoint.js';
import { GoogleTokenEndpoint, makeServiceAccountKey, type ServiceAccountKey, type ServiceAccountRegistration } from './google-token-endpoint.js';
import { IssuedTokens, type TokenCheck, type TokenResource } from './issued-tokens.js';

export type { EntraApp, EntraAppRegistration } from './entra-token-endpoint.js';
export type { ServiceAccountKey, ServiceAccountRegistration } from './google-token-endpoint.js';
export type { TokenCheck, TokenResource } from './issued-tokens.js';

export interface IdentityStandInOptions {
  /** The HTTPS server's certificate and key (PEM). */
  certificate: { cert: string; key: string };
  /** Lifetime of issued access tokens, in seconds (default 3599, what both clouds answer). */
  tokenLifetimeSeconds?: number;
}

export interface TokenRequestRecord {
  time: number;
  path: string;
  provider: 'microsoft' | 'google' | 'unknown';
  grantType?: string;
  /** Microsoft: client_id. Google: the JWT's iss (the service account's email). */
  clientId?: string;
  /** Google: the JWT's sub, the mailbox asked for. */
  sub?: string;
  scope?: string;
  credential?: 'secret' | 'assertion';
  status: number;
  /** "invalid_client AADSTS7000215", "invalid_grant: Invalid JWT Signature.", "failNext". */
  error?: string;
}

interface Fault {
  remaining: number;
  status: number;
  body: unknown;
}

/** An answer ready to send: JSON, or text as is (a proxy's HTML error page). */
interface RawAnswer {
  status: number;
  contentType: string;
  text: string;
}

const MAX_BODY = 1024 * 1024;
const ENTRA_PATH = /^\/([^/]+)\/oauth2\/v2\.0\/token$/;

export class IdentityStandIn {
  readonly requests: TokenRequestRecord[] = [];
  /** Milliseconds every answer waits before it is sent. */
  delayMs = 0;
  readonly #options: IdentityStandInOptions;
  readonly #tokens = new IssuedTokens();
  readonly #faults: Fault[] = [];
  readonly #entra: EntraTokenEndpoint;
  readonly #google: GoogleTokenEndpoint;
  #server: LoopbackHttps | undefined;

  constructor(options: IdentityStandInOptions) {
    this.#options = options;
    const lifetime = options.tokenLifetimeSeconds ?? 3599;
    this.#entra = new EntraTokenEndpoint(this.#tokens, lifetime);
    this.#google = new GoogleTokenEndpoint(this.#tokens, lifetime);
  }

  async start(): Promise<void> {
    this.#server = await LoopbackHttps.start(this.#options.certificate, (req, res) => this.#handle(req, res));
  }

  /** https://127.0.0.1:port: Microsoft's "authority"; Google's token_uri is `${url}/token`. */
  get url(): string {
    if (!this.#server) throw new Error('IdentityStandIn: not started');
    return this.#server.url;
  }

  /** The token endpoint of a Microsoft tenant (by domain or id). */
  microsoftTokenUrl(tenant: string): string {
    return `${this.url}/${encodeURIComponent(tenant)}/oauth2/v2.0/token`;
  }

  /** Google's token endpoint, the token_uri of service-account key files. */
  get googleTokenUrl(): string {
    return `${this.url}/token`;
  }

  async close(): Promise<void> {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    await server.close();
  }

  // ---- Microsoft ------------------------------------------------------------------------

  /** Registers an app in a tenant (the tenant is created on first use). */
  registerApp(registration: EntraAppRegistration): EntraApp {
    return this.#entra.register(registration);
  }

  /** Replaces the app's client secret; the old one stops working. */
  setClientSecret(clientId: string, secret: string | undefined): void {
    this.#entra.setClientSecret(clientId, secret);
  }

  /**
   * Deletes the app registration: new token requests fail (AADSTS700016). Tokens already issued
   * keep working until they expire, as real ones do, unless invalidateTokens says otherwise.
   */
  revokeApp(clientId: string, options: { invalidateTokens?: boolean } = {}): void {
    this.#entra.remove(clientId);
    if (options.invalidateTokens) this.#tokens.invalidate((t) => t.appId?.toLowerCase() === clientId.toLowerCase());
  }

  // ---- Google ---------------------------------------------------------------------------

  registerServiceAccount(registration: ServiceAccountRegistration): void {
    this.#google.register(registration);
  }

  /** A key file like the Cloud console's, for a service account whose token_uri is `tokenUri`. */
  static makeServiceAccountKey(clientEmail: string, tokenUri: string): ServiceAccountKey {
    return makeServiceAccountKey(clientEmail, tokenUri);
  }

  // ---- Tokens and faults ----------------------------------------------------------------

  /** Whether `token` is one this stand-in issued, still valid, for `resource`. */
  verifyToken(token: string, options: { resource: TokenResource }): TokenCheck {
    return this.#tokens.check(token, options.resource);
  }

  /** Every token issued so far expires now. */
  expireAllTokens(): void {
    this.#tokens.expireAll();
  }

  /**
   * The next `count` token requests (either cloud) get this status and body instead: an object
   * is sent as JSON, a string as it is (text/html, what a proxy or load balancer answers).
   */
  failNext(count: number, status: number, body: unknown = {}): void {
    this.#faults.push({ remaining: count, status, body });
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const time = Date.now();
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    const entraMatch = ENTRA_PATH.exec(path);
    const provider: TokenRequestRecord['provider'] = entraMatch ? 'microsoft' : path === '/token' ? 'google' : 'unknown';
    let body: string;
    try {
      body = await readBody(req);
    } catch {
      res.destroy();
      return;
    }
    let answer: TokenAnswer;
    let raw: RawAnswer | undefined;
    const fault = this.#faults[0];
    if (fault) {
      if (--fault.remaining <= 0) this.#faults.shift();
      answer = { status: fault.status, body: {}, error: 'failNext' };
      raw =
        typeof fault.body === 'string'
          ? { status: fault.status, contentType: 'text/html; charset=utf-8', text: fault.body }
          : { status: fault.status, contentType: 'application/json; charset=utf-8', text: JSON.stringify(fault.body ?? {}) };
    } else if (provider === 'unknown') {
      answer = { status: 404, body: {} };
    } else if (req.method !== 'POST') {
      answer = { status: 405, body: {} };
    } else {
      const form = new URLSearchParams(body);
      const now = Date.now();
      try {
        answer = entraMatch
          ? await this.#entra.answer({ tenant: entraMatch[1]!, form, basic: basicCredentials(req.headers.authorization), authority: this.url, now })
          : await this.#google.answer(form, this.googleTokenUrl, now);
      } catch (err) {
        answer = { status: 500, body: { error: 'server_error', error_description: (err as Error).message }, error: (err as Error).message };
      }
    }
    this.requests.push({
      time,
      path,
      provider,
      status: answer.status,
      ...(answer.grantType !== undefined ? { grantType: answer.grantType } : {}),
      ...(answer.clientId !== undefined ? { clientId: answer.clientId } : {}),
      ...(answer.sub !== undefined ? { sub: answer.sub } : {}),
      ...(answer.scope !== undefined ? { scope: answer.scope } : {}),
      ...(answer.credential !== undefined ? { credential: answer.credential } : {}),
      ...(answer.error !== undefined ? { error: answer.error } : {}),
    });
    if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    raw ??= { status: answer.status, contentType: 'application/json; charset=utf-8', text: JSON.stringify(answer.body) };
    res.writeHead(raw.status, {
      'Content-Type': raw.contentType,
      'Cache-Control': 'no-store, no-cache',
      Pragma: 'no-cache',
      'Content-Length': Buffer.byteLength(raw.text),
    });
    res.end(raw.text);
  }
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY) reject(new Error('body too large'));
      else chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** client_secret_basic: the id and secret form-urlencoded, then base64 (RFC 6749 section 2.3.1). */
function basicCredentials(header: string | undefined): { clientId: string; secret: string } | undefined {
  const match = /^Basic\s+(\S+)$/i.exec(header ?? '');
  if (!match) return undefined;
  const decoded = Buffer.from(match[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  const unescape = (s: string): string => decodeURIComponent(s.replace(/\+/g, ' '));
  return { clientId: unescape(decoded.slice(0, colon)), secret: unescape(decoded.slice(colon + 1)) };
}
