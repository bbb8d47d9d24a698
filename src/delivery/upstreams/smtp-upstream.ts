// An [[upstream]] of type "smtp": a smarthost Postern logs in to (an ISP's relay, a corporate
// gateway, a transactional mail service) instead of delivering to the recipients' MX hosts.
//
// It is an SmtpTarget (connection pool, transactions, per-recipient replies) with three things
// added: the upstream's certificate is verified (against ca_file when set), AUTH PLAIN or LOGIN
// is sent once TLS is up (never in clear: see smtp-session.ts), and the upstream's answers are
// read as coming from one server that speaks for every recipient, which changes what some of them
// mean:
//
//   - A refused login (535, 534, 538, any 5xx to AUTH) is our configuration, not the message's
//     fault: the recipients are deferred with the upstream's reply kept, never bounced, and an
//     error is logged saying to fix the credentials. The upstream is then held: for a minute
//     (doubling on each new refusal, up to an hour) its mail is deferred with that same reply
//     without connecting, because providers lock an account after a few failed logins and a
//     queue of 500 messages would otherwise be 500 failed logins. The first message delivered
//     ends the hold. The password is read at start-up, so fixing it means a restart (which also
//     ends the hold).
//   - "530 Authentication required" to MAIL or RCPT, and a 5xx refusal that says relaying is
//     denied, are configuration problems of the same kind (no or wrong credentials, or an
//     upstream that does not relay for this account): deferred, with an error logged.
//   - A certificate that is not trusted, or STARTTLS missing when tls = "starttls", defers with
//     Postern's own status (CERTIFICATE_UNTRUSTED, TLS_UNAVAILABLE) and logs an error once.
//   - Everything else is read as from any server: 2xx delivered, 4xx deferred, 5xx failed (the
//     upstream refusing a recipient or the message is a bounce, as for an MX host).
//
// Deferred mail still expires after queue.lifetime like any other; a hold that outlasts the
// queue's lifetime is point 7 of issue 5 (alerts and holding the queue), not this file's.
import type { SmtpUpstreamConfig } from '../../config/config-schema.js';
import type { Secret } from '../../config/secret.js';
import type { Logger } from '../../observe/logger.js';
import type { SecurityEventSink } from '../../store/store.js';
import type { ConnectionPool } from '../connection-pool.js';
import type { DeliveryJob, DeliveryOutcome, DeliveryTarget, RecipientResult } from '../delivery-target.js';
import type { SessionTls, SetupProblem } from '../smtp-session.js';
import { SmtpTarget } from '../smtp-target.js';
import { hostPortLabel, resolveStaticHost } from '../static-host.js';
import { UpstreamHolds } from './upstream-holds.js';

export interface UpstreamContext {
  pool: ConnectionPool;
  /** EHLO name (config.hostname). */
  heloName: string;
  connectTimeout: number;
  commandTimeout: number;
  logger?: Logger;
  /** Configuration problems and budget warnings, as security events (alerts). */
  events?: SecurityEventSink;
  /** Clock, for tests. */
  now?: () => number;
}

/** What the upstream's secrets were read into at start-up. */
export interface SmtpUpstreamSecrets {
  password?: Secret;
  /** PEM text of ca_file. */
  ca?: string;
}

/** tls = "starttls" is STARTTLS required (no plaintext fallback); "implicit" is TLS from the first byte. */
const SESSION_TLS = { starttls: 'required', implicit: 'implicit', none: 'none' } as const satisfies Record<SmtpUpstreamConfig['tls'], SessionTls>;

export class SmtpUpstreamTarget implements DeliveryTarget {
  readonly key: string;
  readonly description: string;
  readonly name: string;
  readonly #config: SmtpUpstreamConfig;
  readonly #inner: SmtpTarget;
  readonly #log: Logger | undefined;
  readonly #holds: UpstreamHolds;
  readonly #now: () => number;

  constructor(config: SmtpUpstreamConfig, secrets: SmtpUpstreamSecrets, context: UpstreamContext) {
    this.#config = config;
    this.#log = context.logger?.child({ component: 'upstream', upstream: config.name });
    this.#now = context.now ?? Date.now;
    this.#holds = new UpstreamHolds(config.name, this.#log, this.#now, context.events);
    this.name = config.name;
    this.key = `upstream:${config.name.toLowerCase()}`;
    const where = hostPortLabel(config.host, config.port);
    this.description = `upstream ${config.name} (${where})`;
    const password = secrets.password;
    this.#inner = new SmtpTarget(
      {
        key: this.key,
        description: this.description,
        name: `upstream ${config.name}`,
        port: config.port,
        tls: SESSION_TLS[config.tls],
        resolve: () => resolveStaticHost(config.host),
        ...(config.verify_certificate && config.tls !== 'none' ? { verify: secrets.ca ? { ca: secrets.ca } : {} } : {}),
        ...(config.username && password ? { auth: { user: config.username, pass: () => password.reveal() } } : {}),
        ...(config.max_connections ? { maxConnections: config.max_connections } : {}),
        onSetupProblem: (problem, failure) => this.#onSetupProblem(problem, failure),
      },
      {
        pool: context.pool,
        heloName: context.heloName,
        connectTimeout: context.connectTimeout,
        commandTimeout: context.commandTimeout,
      },
    );
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    const held = this.#holds.held('');
    if (held) return job.recipients.map((r) => ({ ...held, index: r.index }));
    const startedAt = this.#now();
    const results = await this.#inner.deliver(job);
    if (results.some((r) => r.status === 'delivered')) this.#holds.recovered('', startedAt);
    let problem: 'auth_required' | 'relay_denied' | undefined;
    const classified = results.map((result) => {
      const reason = configurationReply(result);
      if (!reason) return result;
      problem ??= reason;
      return { ...result, status: 'deferred' as const, configurationProblem: reason };
    });
    if (problem) {
      const first = classified.find((r) => configurationReply(r))!;
      this.#holds.problem('', problem, first, problemAdvice(problem, this.#config), this.#fields());
    }
    return classified;
  }

  #onSetupProblem(problem: SetupProblem, failure: DeliveryOutcome): void {
    const advice = problemAdvice(problem, this.#config);
    if (problem === 'auth_refused') this.#holds.hold('', problem, failure, advice, this.#fields());
    else this.#holds.problem('', problem, failure, advice, this.#fields());
  }

  #fields(): Record<string, unknown> {
    return this.#config.username ? { username: this.#config.username } : {};
  }
}

/**
 * Replies from an upstream that say its configuration (or ours) is wrong rather than that the
 * message or recipient is: "530 5.7.0 Authentication required" (to MAIL or RCPT) and a 5xx
 * refusal saying relaying is denied ("554 5.7.1 <x@y>: Relay access denied", "550 5.7.54 Unable
 * to relay"). Refused logins never get here: they end the setup (see #onSetupProblem).
 */
/**
 * Postfix "Relay access denied", Sendmail "Relaying denied", Exim "relay not permitted", Exchange
 * "Unable to relay", Gmail "Mail relay denied". Not just "relay": a recipient may be relay@x.
 */
const RELAY_DENIED = /\b(relay(ing)?( access)? (denied|not permitted|not allowed|prohibited)|unable to relay|not (permitted|allowed) to relay)\b/i;

function configurationReply(result: DeliveryOutcome): 'auth_required' | 'relay_denied' | undefined {
  if (result.code === null || result.status === 'delivered') return undefined;
  if (result.code === 530) return 'auth_required';
  if (result.code >= 500 && RELAY_DENIED.test(result.response)) return 'relay_denied';
  return undefined;
}

function problemAdvice(problem: SetupProblem | 'auth_required' | 'relay_denied' | string, config: SmtpUpstreamConfig): string {
  const secret = config.password_file ? `password_file ${config.password_file}` : config.password_env ? `password_env ${config.password_env}` : 'the password';
  switch (problem) {
    case 'auth_refused':
      return `the upstream refused the login of ${config.username}: fix username or the password in ${secret}, then restart Postern`;
    case 'auth_unavailable':
      return `the upstream does not offer AUTH PLAIN or LOGIN: check host and port (submission is usually 587 or 465), or remove username if it relays for Postern without a login`;
    case 'certificate':
      return `the upstream's TLS certificate is not trusted: set ca_file to the CA that issued it (or verify_certificate = false on a trusted network)`;
    case 'tls_unavailable':
      return 'the upstream does not offer STARTTLS, and the password is only sent encrypted: check host and port, or use tls = "implicit" if it is a port-465 style server';
    case 'auth_required':
      return config.username
        ? `the upstream asks for a login although Postern logged in as ${config.username}: check that this account may send through it`
        : 'the upstream requires a login: set username and password_file (or password_env)';
    case 'relay_denied':
      return config.username
        ? `the upstream does not relay for ${config.username}: allow this account to send to other domains (or as this sender) on the upstream`
        : 'the upstream does not relay for Postern: set username and password_file, or allow Postern\'s address on the upstream';
    default:
      return problem;
  }
}
