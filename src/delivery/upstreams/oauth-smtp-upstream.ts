// An upstream that logs in with OAuth2 over SMTP (AUTH XOAUTH2): Microsoft 365 (method "smtp",
// smtp.office365.com:587) and Google (smtp.gmail.com:587). Devices keep sending to Postern with a
// username and a password; Postern alone holds the app's credentials and sends on as a mailbox.
//
// Per message:
//   1. The mailbox: `mailbox` from the configuration, else the envelope sender (each device sends
//      as its own mailbox, as it did when it talked to Microsoft directly).
//   2. Held? After the provider or the token endpoint refused our credentials, the mailbox (or
//      the whole upstream) waits; its mail is deferred with that reply, without connecting.
//   3. Limits (send-limits.ts): the mailbox's windows (Exchange: 30 messages a minute, 10,000
//      recipients a day) either admit the message now or give it a time; it then goes back to the
//      queue until then, not counted as an attempt.
//   4. Delivery over the mailbox's own connections (pool key per mailbox, `connections` at most),
//      logged in with the app's token (cached and refreshed in oauth2-tokens.ts).
//   5. The replies, read the provider's way (provider-replies.ts): throttling waits, problems an
//      administrator must fix are deferred and logged with the fix, never bounced.
import type { Logger } from '../../observe/logger.js';
import { withoutStatus } from '../delivery-error.js';
import type { DeliveryJob, DeliveryOutcome, DeliveryTarget, RecipientResult } from '../delivery-target.js';
import type { SetupProblem } from '../smtp-session.js';
import { SmtpTarget } from '../smtp-target.js';
import { hostPortLabel, resolveStaticHost } from '../static-host.js';
import type { TokenSource } from './oauth2-tokens.js';
import type { ReplyClassifier } from './provider-replies.js';
import { MailboxGate } from './mailbox-gate.js';
import type { WindowLimit } from './send-limits.js';
import type { UpstreamContext } from './smtp-upstream.js';

export interface OAuthSmtpUpstreamSpec {
  name: string;
  /** "microsoft365" or "google", for texts. */
  provider: string;
  host: string;
  port: number;
  /** Certificate verification (the default), against `ca` when set. */
  verify: { ca?: string } | undefined;
  tokens: TokenSource;
  /** Send everything as this mailbox; else as the envelope sender. */
  mailbox: string | undefined;
  limits: readonly WindowLimit[];
  connectionsPerMailbox: number;
  /**
   * Recipients per SMTP transaction; a message with more is sent (and counted by the provider) as
   * several. Exchange Online takes 500, Gmail 100.
   */
  recipientsPerMessage: number;
  /**
   * What a refusal from the token endpoint stops: Microsoft's token is the app's, for every
   * mailbox ('upstream'); Google's is per mailbox (domain-wide delegation may cover some only).
   */
  tokenScope: 'upstream' | 'mailbox';
  classify: ReplyClassifier;
}


export class OAuthSmtpUpstreamTarget implements DeliveryTarget {
  readonly key: string;
  readonly name: string;
  readonly description: string;
  readonly #spec: OAuthSmtpUpstreamSpec;
  readonly #context: UpstreamContext;
  readonly #log: Logger | undefined;
  readonly #now: () => number;
  readonly #gate: MailboxGate;
  /** One SMTP target (own pool key, own connections) per mailbox, lower case. */
  readonly #mailboxes = new Map<string, SmtpTarget>();

  constructor(spec: OAuthSmtpUpstreamSpec, context: UpstreamContext) {
    this.#spec = spec;
    this.#context = context;
    this.name = spec.name;
    this.key = `upstream:${spec.name.toLowerCase()}`;
    this.description = `upstream ${spec.name} (${hostPortLabel(spec.host, spec.port)})`;
    this.#log = context.logger?.child({ component: 'upstream', upstream: spec.name });
    this.#now = context.now ?? Date.now;
    this.#gate = new MailboxGate({ name: spec.name, mailbox: spec.mailbox, limits: spec.limits, log: this.#log, now: this.#now, events: context.events });
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    const opened = this.#gate.open(job);
    if ('results' in opened) return opened.results;
    const { mailbox } = opened;
    const recipients = new Set(job.recipients.map((r) => r.address.toLowerCase())).size;
    const transactions = Math.max(1, Math.ceil(recipients / this.#spec.recipientsPerMessage));
    const waiting = await this.#gate.turn(job, mailbox, recipients, transactions);
    if (waiting) return waiting;

    const startedAt = this.#now();
    let results: RecipientResult[];
    try {
      results = await this.#targetFor(mailbox).deliver(job);
    } finally {
      this.#gate.settle(mailbox, job);
    }
    if (results.some((r) => r.status === 'delivered')) this.#gate.holds.recovered(mailbox, startedAt);
    // Setup failures were read the provider's way in #onSetupProblem. Recipients that share a reply
    // (one refusal at DATA) share its side effects: logged, paused or held once.
    const acted = new Set<string>();
    return results.map((result) => (result.configurationProblem ? result : this.#read(result, mailbox, job.sender, acted)));
  }

  /** A result read the provider's way; `acted` holds the replies whose side effects already ran. */
  #read(result: RecipientResult, mailbox: string, sender: string, acted: Set<string>): RecipientResult {
    const verdict = this.#spec.classify(result, { mailbox, sender });
    if (!verdict) return result;
    const first = !acted.has(result.response);
    acted.add(result.response);
    switch (verdict.action) {
      case 'retry':
        if (verdict.advice && first) {
          this.#log?.warn({ event: 'upstream_temporary', mailbox, code: result.code, response: result.response }, `upstream ${this.name}: ${verdict.advice}; retried`);
        }
        return result.status === 'failed' ? { ...result, status: 'deferred' } : result;
      case 'retry_later': {
        // The mailbox's other mail waits as well, instead of each message being told the same.
        const until = this.#now() + verdict.afterMs;
        if (!first) return { ...result, status: 'deferred', retryAt: until };
        this.#gate.holds.pause(mailbox, until, result);
        this.#log?.warn({ event: 'upstream_throttled', mailbox, code: result.code, response: result.response, retryInMs: verdict.afterMs }, `upstream ${this.name}: ${verdict.advice}`);
        return { ...result, status: 'deferred', retryAt: until };
      }
      case 'fail':
        return result;
      case 'configuration':
        if (!first) return { ...result, status: 'deferred', configurationProblem: verdict.problem };
        if (verdict.hold) this.#gate.holds.hold(verdict.hold === 'mailbox' ? mailbox : '', verdict.problem, result, verdict.advice);
        else this.#gate.holds.problem(mailbox, verdict.problem, result, verdict.advice);
        return { ...result, status: 'deferred', configurationProblem: verdict.problem };
    }
  }

  #targetFor(mailbox: string): SmtpTarget {
    const key = mailbox.toLowerCase();
    let target = this.#mailboxes.get(key);
    if (target) return target;
    const spec = this.#spec;
    target = new SmtpTarget(
      {
        key: `${this.key}:${key}`,
        description: this.description,
        name: `upstream ${spec.name}`,
        port: spec.port,
        tls: 'required',
        resolve: () => resolveStaticHost(spec.host),
        ...(spec.verify ? { verify: spec.verify } : {}),
        auth: { user: mailbox, token: (renew: boolean) => spec.tokens.token(mailbox, renew) },
        maxConnections: spec.connectionsPerMailbox,
        onSetupProblem: (problem, failure) => this.#onSetupProblem(mailbox, problem, failure),
      },
      {
        pool: this.#context.pool,
        heloName: this.#context.heloName,
        connectTimeout: this.#context.connectTimeout,
        commandTimeout: this.#context.commandTimeout,
        maxRecipientsPerTransaction: spec.recipientsPerMessage,
      },
    );
    this.#mailboxes.set(key, target);
    return target;
  }

  /** Holds or logs what a failed setup means; returns the provider's name for a refused login. */
  #onSetupProblem(mailbox: string, problem: SetupProblem, failure: DeliveryOutcome): string | undefined {
    switch (problem) {
      case 'token_refused':
        // Microsoft: the app's credentials, refused for every mailbox alike. Google: this
        // mailbox's delegation (others may have it).
        this.#gate.holds.hold(
          this.#spec.tokenScope === 'mailbox' ? mailbox : '',
          'token_refused',
          failure,
          `fix the app's credentials (${withoutStatus(failure.response)}), then restart Postern`,
        );
        return;
      case 'auth_refused': {
        const verdict = this.#spec.classify(failure, { mailbox, sender: mailbox });
        if (verdict?.action === 'configuration') {
          this.#gate.holds.hold(verdict.hold === 'upstream' ? '' : mailbox, verdict.problem, failure, verdict.advice);
          // smtp_auth_disabled, tenant_not_found...: the fallback and the logs say which.
          return verdict.problem;
        }
        this.#gate.holds.hold(mailbox, 'auth_refused', failure, `${providerName(this.#spec.provider)} refused the login of ${mailbox} with the app's token: check the app's permissions for this mailbox`);
        return undefined;
      }
      case 'auth_unavailable':
        this.#gate.holds.problem('', problem, failure, `${hostPortLabel(this.#spec.host, this.#spec.port)} does not offer AUTH XOAUTH2 after STARTTLS: check smtp (host and port)`);
        return;
      case 'certificate':
        this.#gate.holds.problem('', problem, failure, 'the TLS certificate of the SMTP server or token endpoint is not trusted: set ca_file to the CA that issued it');
        return;
      case 'tls_unavailable':
        this.#gate.holds.problem('', problem, failure, 'the SMTP server does not offer STARTTLS: check smtp (host and port)');
        return;
    }
  }

}

function providerName(provider: string): string {
  return provider === 'google' ? 'Google' : 'Microsoft 365';
}

