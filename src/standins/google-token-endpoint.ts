// Google's token endpoint (oauth2.googleapis.com/token) for the grant a relay uses with Google
// Workspace: a service account with domain-wide delegation signs a JWT naming the mailbox it acts
// for and trades it for an access token. As "Using OAuth 2.0 for Server to Server Applications"
// (developers.google.com/identity/protocols/oauth2/service-account) describes it:
//
//   - POST grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>;
//   - the JWT is RS256, signed with the service account's key (client libraries put the key's
//     private_key_id in `kid`); claims iss = the service account's email, scope = space-separated
//     scopes, aud = the token URL, iat, exp at most one hour after iat, and sub = the user to
//     impersonate (domain-wide delegation, granted per client and per scope in the Admin console);
//   - success: {"access_token", "expires_in", "token_type": "Bearer"};
//   - errors are {"error", "error_description"}. The descriptions are the ones Google sends
//     (the page lists some; the rest are what its endpoint answers, as quoted in many client
//     libraries' error handling): "Invalid JWT Signature.", "Invalid grant: account not found",
//     "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable
//     timeframe. …", and for a mailbox the client is not delegated: unauthorized_client "Client is
//     unauthorized to retrieve access tokens using this method, or client not authorized for any
//     of the scopes requested.".
//
// makeServiceAccountKey() writes the key file the Cloud console hands out, so a test can give
// Postern the same JSON an administrator would.
import { createPublicKey, generateKeyPairSync, randomBytes, randomInt, type KeyObject } from 'node:crypto';
import { compactVerify, decodeProtectedHeader } from 'jose';
import type { IssuedTokens } from './issued-tokens.js';
import type { TokenAnswer } from './entra-token-endpoint.js';

export const JWT_BEARER_GRANT = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
export const GMAIL_SCOPE = 'https://mail.google.com/';

export interface ServiceAccountRegistration {
  clientEmail: string;
  /** The public half of the account's key (SPKI PEM), or the X.509 certificate Google publishes for it. */
  publicKeyPem?: string;
  certificate?: string;
  /** The key's id (private_key_id in the key file); a JWT whose `kid` names another key is refused. */
  privateKeyId?: string;
  /** Mailboxes the Workspace admin let this client impersonate ('*': the whole domain). Absent: none. */
  delegatedMailboxes?: string[] | '*';
  /** Scopes granted to the client in the Admin console (default: https://mail.google.com/). */
  delegatedScopes?: string[];
}

export interface ServiceAccountKey {
  /** The key file, as the Cloud console downloads it. */
  json: string;
  publicKeyPem: string;
  privateKeyId: string;
  clientEmail: string;
}

interface ServiceAccount {
  clientEmail: string;
  key: KeyObject;
  privateKeyId: string | undefined;
  delegatedMailboxes: Set<string> | '*';
  delegatedScopes: Set<string>;
}

/** Google accepts some clock skew on iat; this much. */
const SKEW_SECONDS = 300;

export class GoogleTokenEndpoint {
  readonly #accounts = new Map<string, ServiceAccount>();
  readonly #tokens: IssuedTokens;
  readonly #lifetimeSeconds: number;

  constructor(tokens: IssuedTokens, lifetimeSeconds: number) {
    this.#tokens = tokens;
    this.#lifetimeSeconds = lifetimeSeconds;
  }

  register(registration: ServiceAccountRegistration): void {
    const pem = registration.publicKeyPem ?? registration.certificate;
    if (!pem) throw new Error('registerServiceAccount: publicKeyPem or certificate is needed');
    const delegated = registration.delegatedMailboxes;
    this.#accounts.set(registration.clientEmail.toLowerCase(), {
      clientEmail: registration.clientEmail,
      key: createPublicKey(pem),
      privateKeyId: registration.privateKeyId,
      delegatedMailboxes: delegated === '*' ? '*' : new Set((delegated ?? []).map((m) => m.toLowerCase())),
      delegatedScopes: new Set(registration.delegatedScopes ?? [GMAIL_SCOPE]),
    });
  }

  async answer(form: URLSearchParams, tokenUrl: string, now: number): Promise<TokenAnswer> {
    const grantType = form.get('grant_type') ?? undefined;
    const seen: Partial<TokenAnswer> = grantType !== undefined ? { grantType } : {};
    const fail = (status: number, error: string, description: string, extra: Partial<TokenAnswer> = {}): TokenAnswer => ({
      ...seen,
      ...extra,
      status,
      body: { error, error_description: description },
      error: `${error}: ${description}`,
    });
    if (grantType !== JWT_BEARER_GRANT) return fail(400, 'unsupported_grant_type', `Invalid grant_type: ${grantType ?? ''}`);
    const assertion = form.get('assertion');
    if (!assertion) return fail(400, 'invalid_request', 'Missing required parameter: assertion');

    let header: ReturnType<typeof decodeProtectedHeader>;
    let claims: Record<string, unknown>;
    try {
      header = decodeProtectedHeader(assertion);
      const payload = assertion.split('.')[1] ?? '';
      claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as Record<string, unknown>;
    } catch {
      return fail(400, 'invalid_grant', 'Bad Request');
    }
    const iss = typeof claims.iss === 'string' ? claims.iss : '';
    const sub = typeof claims.sub === 'string' ? claims.sub : undefined;
    const scope = typeof claims.scope === 'string' ? claims.scope : undefined;
    const who: Partial<TokenAnswer> = { clientId: iss, ...(scope !== undefined ? { scope } : {}) };
    const whoWithSub = sub !== undefined ? { ...who, sub } : who;

    const account = this.#accounts.get(iss.toLowerCase());
    if (!account) return fail(400, 'invalid_grant', 'Invalid grant: account not found', whoWithSub);
    if (header.alg !== 'RS256' || (account.privateKeyId !== undefined && header.kid !== undefined && header.kid !== account.privateKeyId)) {
      return fail(400, 'invalid_grant', 'Invalid JWT Signature.', whoWithSub);
    }
    try {
      await compactVerify(assertion, account.key, { algorithms: ['RS256'] });
    } catch {
      return fail(400, 'invalid_grant', 'Invalid JWT Signature.', whoWithSub);
    }
    const audience = [claims.aud].flat();
    if (!audience.includes(tokenUrl)) return fail(400, 'invalid_grant', 'Invalid JWT: Failed audience check.', whoWithSub);
    const iat = typeof claims.iat === 'number' ? claims.iat : undefined;
    const exp = typeof claims.exp === 'number' ? claims.exp : undefined;
    if (iat === undefined) return fail(400, 'invalid_grant', 'Invalid JWT: iat (issued at) is not set.', whoWithSub);
    if (exp === undefined) return fail(400, 'invalid_grant', 'Invalid JWT: exp (expiration time) is not set.', whoWithSub);
    const seconds = now / 1000;
    if (exp - iat > 3600 || exp <= iat || iat > seconds + SKEW_SECONDS || exp < seconds - SKEW_SECONDS) {
      return fail(
        400,
        'invalid_grant',
        'Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.',
        whoWithSub,
      );
    }
    const scopes = (scope ?? '').split(/\s+/).filter(Boolean);
    if (scopes.length === 0) return fail(400, 'invalid_scope', 'Invalid OAuth scope or ID token audience provided.', whoWithSub);
    if (sub !== undefined) {
      const mailboxAllowed = account.delegatedMailboxes === '*' || account.delegatedMailboxes.has(sub.toLowerCase());
      const scopesAllowed = scopes.every((s) => account.delegatedScopes.has(s));
      if (!mailboxAllowed || !scopesAllowed) {
        return fail(
          401,
          'unauthorized_client',
          'Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.',
          whoWithSub,
        );
      }
    }

    const token = `ya29.c.${randomBytes(96).toString('base64url')}`;
    this.#tokens.add({
      token,
      provider: 'google',
      resource: scopes.includes(GMAIL_SCOPE) ? 'gmail' : undefined,
      clientEmail: account.clientEmail,
      ...(sub !== undefined ? { subject: sub } : {}),
      scopes,
      expiresAt: now + this.#lifetimeSeconds * 1000,
    });
    return { ...seen, ...whoWithSub, status: 200, body: { access_token: token, expires_in: this.#lifetimeSeconds, token_type: 'Bearer' } };
  }
}

/**
 * A service-account key file like the one the Cloud console downloads (RSA 2048, PKCS#8), and
 * the public key to register with the stand-in.
 */
export function makeServiceAccountKey(clientEmail: string, tokenUri: string): ServiceAccountKey {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const privateKeyId = randomBytes(20).toString('hex');
  const projectId = /@([^.]+)\.iam\.gserviceaccount\.com$/i.exec(clientEmail)?.[1] ?? 'standin-project';
  const clientId = String(randomInt(1e9, 1e10 - 1)) + String(randomInt(1e9, 1e10 - 1)) + String(randomInt(0, 10));
  const json = JSON.stringify(
    {
      type: 'service_account',
      project_id: projectId,
      private_key_id: privateKeyId,
      private_key: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
      client_email: clientEmail,
      client_id: clientId,
      auth_uri: 'https://accounts.google.com/o/oauth2/auth',
      token_uri: tokenUri,
      auth_provider_x509_cert_url: 'https://www.googleapis.com/oauth2/v1/certs',
      client_x509_cert_url: `https://www.googleapis.com/robot/v1/metadata/x509/${encodeURIComponent(clientEmail)}`,
      universe_domain: 'googleapis.com',
    },
    null,
    2,
  );
  return { json, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(), privateKeyId, clientEmail };
}
