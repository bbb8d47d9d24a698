// Builds one delivery target per [[upstream]], reading the secrets each one names. Called once,
// when the queue runner starts (the Router's constructor): a secret that cannot be read stops
// start-up with every such problem listed, naming the upstream, the file or variable and the
// reason, before a single listener is open.
//
// Each kind of upstream (`type`) gets its target here; "microsoft365" and "google" will slot in
// next to "smtp" with their own targets (OAuth2 token, XOAUTH2 or Graph), behind the same
// DeliveryTarget contract.
import { ConfigError } from '../../config/load-config.js';
import type { UpstreamConfig } from '../../config/config-schema.js';
import { SecretError, readCertificateFile, readSecretEnv, readSecretFile } from '../../config/secret.js';
import type { DeliveryTarget } from '../delivery-target.js';
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
  return targets;
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
  }
}
