// Builds one delivery target per [[upstream]], reading the secrets each one names. Called once,
// when the queue runner starts (the Router's constructor): a secret that cannot be read stops
// start-up with every such problem listed, naming the upstream, the file or variable and the
// reason, before a single listener is open.
//
// Each kind of upstream (`type`) gets its target here, behind the same DeliveryTarget contract:
// "smtp" a smarthost with a password, "microsoft365" (method smtp) and "google" XOAUTH2 with an
// OAuth2 token from the provider's token endpoint.
import { ConfigError } from '../../config/load-config.js';
import type { UpstreamConfig } from '../../config/config-schema.js';
import { SecretError, readCertificateFile, readPrivateKeyFile, readSecretEnv, readSecretFile, readServiceAccountFile } from '../../config/secret.js';
import type { DeliveryTarget } from '../delivery-target.js';
import { FallbackTarget } from './fallback.js';
import { GraphUpstreamTarget } from './graph-upstream.js';
import { OAuthSmtpUpstreamTarget, type OAuthSmtpUpstreamSpec } from './oauth-smtp-upstream.js';
import { GoogleTokenSource, type MicrosoftCredentials, MicrosoftTokenSource, type TokenEndpointOptions, type TokenSource } from './oauth2-tokens.js';
import { type ReplyClassifier, classifyGoogleReply, classifyMicrosoftReply } from './provider-replies.js';
import type { WindowLimit } from './send-limits.js';
import { SmtpUpstreamTarget, type SmtpUpstreamSecrets, type UpstreamContext } from './smtp-upstream.js';

export type { UpstreamContext };

export interface UpstreamTarget extends DeliveryTarget {
  /** Pool and grouping key: "upstream:NAME". */
  readonly key: string;
  readonly name: string;
}

/**
 * Targets by upstream name (lower case). Throws a ConfigError naming `file` (the configuration
 * file) when a secret cannot be read.
 */
export function createUpstreamTargets(
  upstreams: readonly UpstreamConfig[],
  file: string | null | undefined,
  context: UpstreamContext,
  env: NodeJS.ProcessEnv = process.env,
): Map<string, UpstreamTarget> {
  const problems: string[] = [];
  const targets = new Map<string, UpstreamTarget>();
  for (const upstream of upstreams) {
    try {
      targets.set(upstream.name.toLowerCase(), createTarget(upstream, context, env));
    } catch (err) {
      if (!(err instanceof SecretError)) throw err;
      problems.push(`upstream "${upstream.name}": ${err.message}`);
    }
  }
  if (problems.length > 0) throw new ConfigError(file ?? '(configuration)', problems);
  for (const u of upstreams) {
    if (u.type !== 'smtp' && !u.mailbox && !u.fallback) {
      // Not an error: routed by sender or account, such an upstream never sees Postern's own mail.
      context.logger?.warn(
        { event: 'upstream_no_null_sender_mailbox', upstream: u.name },
        `upstream ${u.name} sends as each message's sender, so bounces and alerts Postern sends (from the null sender) cannot go through it: if it is the default route, set mailbox = "postmaster@..." or a fallback`,
      );
    }
  }
  // Each upstream with a fallback hands it what its configuration keeps it from sending; the
  // fallback's own fallback follows (the configuration refuses cycles).
  const byName = new Map(upstreams.map((u) => [u.name.toLowerCase(), u]));
  const wrapped = new Map<string, UpstreamTarget>();
  const withFallback = (name: string): UpstreamTarget => {
    const done = wrapped.get(name);
    if (done) return done;
    const own = targets.get(name)!;
    const fallback = byName.get(name)?.fallback?.toLowerCase();
    const target = fallback && targets.has(fallback) ? new FallbackTarget(own, withFallback(fallback), context.logger) : own;
    wrapped.set(name, target);
    return target;
  };
  for (const name of targets.keys()) withFallback(name);
  return wrapped;
}

function createTarget(upstream: UpstreamConfig, context: UpstreamContext, env: NodeJS.ProcessEnv): UpstreamTarget {
  switch (upstream.type) {
    case 'smtp': {
      const secrets: SmtpUpstreamSecrets = {};
      if (upstream.password_file) secrets.password = readSecretFile(upstream.password_file, 'password_file');
      else if (upstream.password_env) secrets.password = readSecretEnv(upstream.password_env, 'password_env', env);
      if (upstream.ca_file && upstream.tls !== 'none') secrets.ca = readCertificateFile(upstream.ca_file, 'ca_file');
      return new SmtpUpstreamTarget(upstream, secrets, context);
    }
    case 'microsoft365': {
      const ca = upstream.ca_file ? readCertificateFile(upstream.ca_file, 'ca_file') : undefined;
      const credentials: MicrosoftCredentials = {
        authority: upstream.authority,
        tenant: upstream.tenant,
        clientId: upstream.client_id,
        scope: 'https://outlook.office365.com/.default',
      };
      if (upstream.client_secret_file) credentials.secret = readSecretFile(upstream.client_secret_file, 'client_secret_file');
      else if (upstream.client_secret_env) credentials.secret = readSecretEnv(upstream.client_secret_env, 'client_secret_env', env);
      else if (upstream.certificate_file && upstream.private_key_file) {
        credentials.certificate = {
          certificatePem: readCertificateFile(upstream.certificate_file, 'certificate_file'),
          privateKey: readPrivateKeyFile(upstream.private_key_file, 'private_key_file'),
        };
      }
      if (upstream.method === 'graph') {
        const tokens = new MicrosoftTokenSource({ ...credentials, scope: 'https://graph.microsoft.com/.default' }, tokenOptions(upstream.name, ca, context));
        return new GraphUpstreamTarget(
          {
            name: upstream.name,
            graphUrl: upstream.graph,
            ca,
            tokens,
            mailbox: upstream.mailbox,
            limits: windowLimits(upstream.limits),
            concurrentRequests: upstream.limits.connections,
            app: `${upstream.tenant}/${upstream.client_id}`,
          },
          context,
        );
      }
      const tokens = new MicrosoftTokenSource(credentials, tokenOptions(upstream.name, ca, context));
      return new OAuthSmtpUpstreamTarget(
        { ...oauthSpec(upstream, 'microsoft365', tokens, ca, classifyMicrosoftReply), recipientsPerMessage: 500, tokenScope: 'upstream' },
        context,
      );
    }
    case 'google': {
      const ca = upstream.ca_file ? readCertificateFile(upstream.ca_file, 'ca_file') : undefined;
      const account = readServiceAccountFile(upstream.service_account_file, 'service_account_file');
      const tokens = new GoogleTokenSource(
        { ...account, tokenUri: upstream.token_url ?? account.tokenUri, scope: 'https://mail.google.com/' },
        tokenOptions(upstream.name, ca, context),
      );
      return new OAuthSmtpUpstreamTarget({ ...oauthSpec(upstream, 'google', tokens, ca, classifyGoogleReply), recipientsPerMessage: 100, tokenScope: 'mailbox' }, context);
    }
  }
}

function tokenOptions(name: string, ca: string | undefined, context: UpstreamContext): TokenEndpointOptions {
  return { destination: `upstream ${name}`, timeoutMs: context.connectTimeout + context.commandTimeout, ...(ca ? { ca } : {}), ...(context.now ? { now: context.now } : {}) };
}

type OAuthUpstreamConfig = Extract<UpstreamConfig, { type: 'microsoft365' | 'google' }>;

function oauthSpec(
  upstream: OAuthUpstreamConfig,
  provider: string,
  tokens: TokenSource,
  ca: string | undefined,
  classify: ReplyClassifier,
): Omit<OAuthSmtpUpstreamSpec, 'recipientsPerMessage' | 'tokenScope'> {
  return {
    name: upstream.name,
    provider,
    host: upstream.smtp.host,
    port: upstream.smtp.port,
    // Always verified (the configuration refuses verify_certificate = false for OAuth2 upstreams).
    verify: ca ? { ca } : {},
    tokens,
    mailbox: upstream.mailbox,
    limits: windowLimits(upstream.limits),
    connectionsPerMailbox: upstream.limits.connections,
    classify,
  };
}

const MINUTE = 60_000;
const DAY = 86_400_000;

/**
 * The configured limits as sliding windows, scaled by time_scale (tests and benchmarks). No margin
 * is added: a send counts from when its delivery finished (send-limits.ts), which is after the
 * provider counted it.
 */
function windowLimits(limits: OAuthUpstreamConfig['limits']): WindowLimit[] {
  const scale = limits.time_scale;
  const windows: WindowLimit[] = [];
  if (limits.messages_per_minute) windows.push({ label: `${limits.messages_per_minute} messages a minute`, limit: limits.messages_per_minute, windowMs: MINUTE * scale, unit: 'messages' });
  if (limits.messages_per_day) windows.push({ label: `${limits.messages_per_day} messages a day`, limit: limits.messages_per_day, windowMs: DAY * scale, unit: 'messages', budget: true });
  if (limits.requests_per_10_minutes) {
    windows.push({ label: `${limits.requests_per_10_minutes} requests in 10 minutes`, limit: limits.requests_per_10_minutes, windowMs: 10 * MINUTE * scale, unit: 'messages' });
  }
  if (limits.recipients_per_day) windows.push({ label: `${limits.recipients_per_day} recipients a day`, limit: limits.recipients_per_day, windowMs: DAY * scale, unit: 'recipients', budget: true });
  return windows;
}
