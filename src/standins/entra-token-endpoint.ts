// Microsoft's token endpoint (login.microsoftonline.com/{tenant}/oauth2/v2.0/token) for the one
// grant a relay uses: client credentials, the app proving who it is with a client secret or a
// certificate (a client assertion), no user involved. Everything here follows Microsoft's
// documentation, which is where Postern's code learns it too:
//
//   - the request and the success answer: "Microsoft identity platform and the OAuth 2.0 client
//     credentials flow" (learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow);
//     the secret may also come as HTTP Basic, which that page says is supported;
//   - the assertion: "Microsoft identity platform application authentication certificate
//     credentials" (…/certificate-credentials): header alg RS256 or PS256 naming the certificate
//     by x5t (SHA-1) or x5t#S256 (SHA-256 of the DER), claims aud = the token endpoint, iss = sub =
//     the client id, jti, nbf/iat, exp (Entra sets no upper bound on exp);
//   - the error body: error, error_description ("AADSTSnnnn: …\r\nTrace ID: …\r\nCorrelation ID:
//     …\r\nTimestamp: …"), error_codes, timestamp, trace_id, correlation_id, error_uri, as in
//     "Microsoft Entra authentication and authorization error codes" (…/reference-error-codes);
//     the AADSTS texts are the ones Entra sends today (the page warns they change over time).
//
// Access tokens are JWTs signed with the stand-in's own key, shaped like Entra's app-only tokens
// (aud, iss, appid, tid, roles…), because clients treat them as opaque and some log their claims.
// They are remembered in IssuedTokens so the SMTP stand-ins can check them.
import { createHash, createPublicKey, generateKeyPair, randomUUID, X509Certificate, type KeyObject } from 'node:crypto';
import { promisify } from 'node:util';
import { compactVerify, decodeProtectedHeader, SignJWT } from 'jose';
import type { IssuedTokens, TokenResource } from './issued-tokens.js';

/** An app registration in a tenant: its client id and credentials. */
export interface EntraAppRegistration {
  /** The tenant's domain, e.g. "contoso.onmicrosoft.com"; token URLs may name it or its id. */
  tenant: string;
  /** The tenant's GUID (made up if absent; fixed by the first registration in the tenant). */
  tenantId?: string;
  clientId: string;
  clientSecret?: string;
  /** Public certificates (PEM) uploaded to the app, for client assertions. */
  certificatePem?: string | string[];
}

export interface EntraApp {
  tenant: string;
  tenantId: string;
  clientId: string;
}

/** Scopes a relay may ask for, and the resource each one is a token for. */
const RESOURCE_SCOPES: Record<string, TokenResource> = {
  'https://outlook.office365.com/.default': 'outlook',
  'https://graph.microsoft.com/.default': 'graph',
};
const RESOURCE_AUDIENCE: Record<TokenResource, string> = {
  outlook: 'https://outlook.office365.com',
  graph: 'https://graph.microsoft.com',
  gmail: 'https://mail.google.com/',
};

const CLIENT_ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const CERT_DOCS = 'Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .';
/** Clock skew Entra tolerates on an assertion's times. */
const SKEW_SECONDS = 300;

interface Certificate {
  sha256: string;
  sha1: string;
  key: KeyObject;
}

interface App {
  clientId: string;
  secret: string | undefined;
  certificates: Certificate[];
}

interface Tenant {
  domain: string;
  id: string;
  apps: Map<string, App>;
}

/** How the request went, for IdentityStandIn.requests. */
export interface TokenAnswer {
  status: number;
  body: Record<string, unknown>;
  clientId?: string;
  /** Google: the JWT's sub. */
  sub?: string;
  grantType?: string;
  scope?: string;
  credential?: 'secret' | 'assertion';
  error?: string;
}

export interface EntraRequest {
  /** The {tenant} segment of the path, as sent. */
  tenant: string;
  form: URLSearchParams;
  /** Authorization: Basic client_id:client_secret, if sent. */
  basic: { clientId: string; secret: string } | undefined;
  /** https://host:port, what the token URLs start with. */
  authority: string;
  now: number;
}

export class EntraTokenEndpoint {
  readonly #tenants: Tenant[] = [];
  readonly #tokens: IssuedTokens;
  readonly #lifetimeSeconds: number;
  /** The key access tokens are signed with, made on first use (RSA key generation takes a while). */
  #signingKey: Promise<KeyObject> | undefined;

  constructor(tokens: IssuedTokens, lifetimeSeconds: number) {
    this.#tokens = tokens;
    this.#lifetimeSeconds = lifetimeSeconds;
  }

  register(registration: EntraAppRegistration): EntraApp {
    let tenant = this.#findTenant(registration.tenant) ?? (registration.tenantId ? this.#findTenant(registration.tenantId) : undefined);
    if (tenant && registration.tenantId && tenant.id !== registration.tenantId.toLowerCase()) {
      throw new Error(`tenant ${registration.tenant} already has id ${tenant.id}`);
    }
    if (!tenant) {
      tenant = { domain: registration.tenant.toLowerCase(), id: (registration.tenantId ?? randomUUID()).toLowerCase(), apps: new Map() };
      this.#tenants.push(tenant);
    }
    const pems = registration.certificatePem === undefined ? [] : [registration.certificatePem].flat();
    tenant.apps.set(registration.clientId.toLowerCase(), {
      clientId: registration.clientId,
      secret: registration.clientSecret,
      certificates: pems.map(certificateOf),
    });
    return { tenant: tenant.domain, tenantId: tenant.id, clientId: registration.clientId };
  }

  /** A new secret replaces the old one (which stops working at once, as when it is deleted). */
  setClientSecret(clientId: string, secret: string | undefined): void {
    this.#app(clientId).secret = secret;
  }

  /** The app registration is deleted: token requests for it fail as for an unknown app. */
  remove(clientId: string): void {
    for (const tenant of this.#tenants) tenant.apps.delete(clientId.toLowerCase());
  }

  #app(clientId: string): App {
    for (const tenant of this.#tenants) {
      const app = tenant.apps.get(clientId.toLowerCase());
      if (app) return app;
    }
    throw new Error(`no app registration ${clientId}`);
  }

  #findTenant(nameOrId: string): Tenant | undefined {
    const key = nameOrId.toLowerCase();
    return this.#tenants.find((t) => t.domain === key || t.id === key);
  }

  async answer(request: EntraRequest): Promise<TokenAnswer> {
    const { form, now } = request;
    const fail = (status: number, error: string, code: number, text: string, extra: Partial<TokenAnswer> = {}): TokenAnswer => ({
      status,
      body: aadErrorBody(error, code, text, now),
      error: `${error} AADSTS${code}`,
      ...extra,
    });

    const pathTenant = decodeURIComponent(request.tenant);
    if (/^(common|consumers)$/i.test(pathTenant)) {
      return fail(400, 'invalid_request', 9001023, 'The grant type is not supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.');
    }
    const tenant = this.#findTenant(pathTenant);
    if (!tenant) {
      return fail(
        400,
        'invalid_request',
        90002,
        `Tenant '${pathTenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.`,
      );
    }

    const grantType = form.get('grant_type') ?? undefined;
    const clientId = form.get('client_id') ?? request.basic?.clientId;
    const scope = form.get('scope') ?? undefined;
    const seen: Partial<TokenAnswer> = {
      ...(grantType !== undefined ? { grantType } : {}),
      ...(clientId !== undefined ? { clientId } : {}),
      ...(scope !== undefined ? { scope } : {}),
    };
    if (!grantType) return fail(400, 'invalid_request', 900144, "The request body must contain the following parameter: 'grant_type'.", seen);
    if (grantType !== 'client_credentials') {
      return fail(400, 'unsupported_grant_type', 70003, `The app requested an unsupported grant type '${grantType}'.`, seen);
    }
    if (!clientId) return fail(400, 'invalid_request', 900144, "The request body must contain the following parameter: 'client_id'.", seen);
    const app = tenant.apps.get(clientId.toLowerCase());
    if (!app) {
      return fail(
        400,
        'unauthorized_client',
        700016,
        `Application with identifier '${clientId}' was not found in the directory '${tenant.domain}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.`,
        seen,
      );
    }
    if (!scope) return fail(400, 'invalid_request', 900144, "The request body must contain the following parameter: 'scope'.", seen);
    const scopes = scope.split(/\s+/).filter(Boolean);
    if (scopes.some((s) => !s.endsWith('/.default'))) {
      return fail(
        400,
        'invalid_scope',
        1002012,
        `The provided value for scope ${scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).`,
        seen,
      );
    }
    const resource = scopes.length === 1 ? RESOURCE_SCOPES[scopes[0]!] : undefined;
    if (!resource) {
      return fail(400, 'invalid_scope', 70011, `The provided value for the input parameter 'scope' is not valid. The scope ${scope} is not valid.`, seen);
    }

    // The client's credential: a secret (form or HTTP Basic) or a client assertion.
    const assertion = form.get('client_assertion');
    const secret = form.get('client_secret') ?? request.basic?.secret;
    if (assertion) {
      const withCredential = { ...seen, credential: 'assertion' as const };
      if (form.get('client_assertion_type') !== CLIENT_ASSERTION_TYPE) {
        return fail(400, 'invalid_request', 900144, "The request body must contain the following parameter: 'client_assertion_type'.", withCredential);
      }
      const audiences = [tenant.domain, tenant.id].map((t) => `${request.authority}/${t}/oauth2/v2.0/token`.toLowerCase());
      const refusal = await checkAssertion(assertion, app, audiences, now);
      if (refusal) return fail(refusal.status, refusal.error, refusal.code, refusal.text, withCredential);
      return this.#issue(tenant, app, resource, scopes, 'assertion', now, withCredential);
    }
    if (secret !== undefined && secret !== null) {
      const withCredential = { ...seen, credential: 'secret' as const };
      if (app.secret === undefined || secret !== app.secret) {
        return fail(
          401,
          'invalid_client',
          7000215,
          `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${app.clientId}'.`,
          withCredential,
        );
      }
      return this.#issue(tenant, app, resource, scopes, 'secret', now, withCredential);
    }
    return fail(401, 'invalid_client', 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.", seen);
  }

  async #issue(
    tenant: Tenant,
    app: App,
    resource: TokenResource,
    scopes: string[],
    credential: 'secret' | 'assertion',
    now: number,
    seen: Partial<TokenAnswer>,
  ): Promise<TokenAnswer> {
    const iat = Math.floor(now / 1000);
    const exp = iat + this.#lifetimeSeconds;
    const token = await new SignJWT({
      aio: randomUUID(),
      app_displayname: app.clientId,
      appid: app.clientId,
      appidacr: credential === 'secret' ? '1' : '2',
      idp: `https://sts.windows.net/${tenant.id}/`,
      idtyp: 'app',
      oid: randomUUID(),
      rh: randomUUID(),
      roles: resource === 'outlook' ? ['SMTP.SendAsApp'] : [],
      sid: randomUUID(),
      tid: tenant.id,
      uti: randomUUID().replaceAll('-', '').slice(0, 22),
      ver: '1.0',
    })
      .setProtectedHeader({ typ: 'JWT', alg: 'RS256', kid: 'standin' })
      .setAudience(RESOURCE_AUDIENCE[resource])
      .setIssuer(`https://sts.windows.net/${tenant.id}/`)
      .setIssuedAt(iat)
      .setNotBefore(iat)
      .setExpirationTime(exp)
      .setSubject(randomUUID())
      .sign(await this.#key());
    this.#tokens.add({
      token,
      provider: 'microsoft',
      resource,
      appId: app.clientId,
      tenantId: tenant.id,
      scopes,
      expiresAt: exp * 1000,
    });
    return {
      ...seen,
      status: 200,
      body: { token_type: 'Bearer', expires_in: this.#lifetimeSeconds, ext_expires_in: this.#lifetimeSeconds, access_token: token },
    };
  }

  #key(): Promise<KeyObject> {
    this.#signingKey ??= promisify(generateKeyPair)('rsa', { modulusLength: 2048 }).then((pair) => pair.privateKey);
    return this.#signingKey;
  }
}

interface Refusal {
  status: number;
  error: string;
  code: number;
  text: string;
}

/** Checks a client assertion the way certificate-credentials describes it; undefined if good. */
async function checkAssertion(assertion: string, app: App, audiences: string[], now: number): Promise<Refusal | undefined> {
  const malformed: Refusal = { status: 400, error: 'invalid_request', code: 50027, text: 'JWT token is invalid or malformed.' };
  let header: ReturnType<typeof decodeProtectedHeader>;
  try {
    header = decodeProtectedHeader(assertion);
  } catch {
    return malformed;
  }
  const s256 = typeof header['x5t#S256'] === 'string' ? header['x5t#S256'] : undefined;
  const sha1 = typeof header.x5t === 'string' ? header.x5t : undefined;
  const thumbprint = s256 ?? sha1 ?? '';
  const certificate = app.certificates.find((c) => (s256 !== undefined && c.sha256 === s256) || (sha1 !== undefined && c.sha1 === sha1));
  const invalidSignature = (reason: string): Refusal => ({
    status: 401,
    error: 'invalid_client',
    code: 700027,
    text: `Client assertion contains an invalid signature. [Reason - ${reason}, Thumbprint of key used by client: '${thumbprintHex(thumbprint)}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '${app.clientId}'.]`,
  });
  if (!certificate) return invalidSignature('The key was not found.');
  let claims: Record<string, unknown>;
  try {
    const verified = await compactVerify(assertion, certificate.key, { algorithms: ['RS256', 'PS256'] });
    claims = JSON.parse(new TextDecoder().decode(verified.payload)) as Record<string, unknown>;
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED') {
      return invalidSignature('The provided signature value did not match the expected signature value.');
    }
    return malformed;
  }
  if (claims.iss !== app.clientId || claims.sub !== app.clientId) {
    return { status: 401, error: 'invalid_client', code: 700021, text: `Client assertion application identifier doesn't match 'client_id' parameter. ${CERT_DOCS}` };
  }
  const audience = [claims.aud].flat();
  if (!audience.some((a) => typeof a === 'string' && audiences.includes(a.toLowerCase()))) {
    return { status: 401, error: 'invalid_client', code: 700023, text: `Client assertion audience claim does not match Realm issuer. ${CERT_DOCS}` };
  }
  if (typeof claims.jti !== 'string' || claims.jti === '') return malformed;
  const seconds = now / 1000;
  const exp = typeof claims.exp === 'number' ? claims.exp : undefined;
  const nbf = typeof claims.nbf === 'number' ? claims.nbf : typeof claims.iat === 'number' ? claims.iat : undefined;
  const iat = typeof claims.iat === 'number' ? claims.iat : undefined;
  if (exp === undefined || exp < seconds - SKEW_SECONDS || (nbf !== undefined && nbf > seconds + SKEW_SECONDS) || (iat !== undefined && iat > seconds + SKEW_SECONDS)) {
    return {
      status: 401,
      error: 'invalid_client',
      code: 700024,
      text: `Client assertion is not within its valid time range. Current time: ${isoTicks(now)}, assertion valid from ${nbf === undefined ? 'unknown' : isoTicks(nbf * 1000)}, expiry time of assertion ${exp === undefined ? 'unknown' : isoTicks(exp * 1000)}. ${CERT_DOCS}`,
    };
  }
  return undefined;
}

function certificateOf(pem: string): Certificate {
  const x509 = new X509Certificate(pem);
  return {
    sha256: createHash('sha256').update(x509.raw).digest('base64url'),
    sha1: createHash('sha1').update(x509.raw).digest('base64url'),
    key: createPublicKey(pem),
  };
}

/** Entra prints the thumbprint it looked for in hex, upper case. */
function thumbprintHex(base64url: string): string {
  return Buffer.from(base64url, 'base64url').toString('hex').toUpperCase();
}

/** 2024-05-01T10:00:00.0000000Z, the form Entra's time-range message uses. */
function isoTicks(ms: number): string {
  return new Date(ms).toISOString().replace(/\.(\d{3})Z$/, '.$10000Z');
}

/** "2016-01-09 02:02:12Z", the timestamp of Entra's error bodies. */
function aadTimestamp(ms: number): string {
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d{3}Z$/, 'Z');
}

/** Entra's error body, as reference-error-codes shows it. */
export function aadErrorBody(error: string, code: number, text: string, now = Date.now()): Record<string, unknown> {
  const traceId = randomUUID();
  const correlationId = randomUUID();
  const timestamp = aadTimestamp(now);
  return {
    error,
    error_description: `AADSTS${code}: ${text}\r\nTrace ID: ${traceId}\r\nCorrelation ID: ${correlationId}\r\nTimestamp: ${timestamp}`,
    error_codes: [code],
    timestamp,
    trace_id: traceId,
    correlation_id: correlationId,
    error_uri: `https://login.microsoftonline.com/error?code=${code}`,
  };
}
