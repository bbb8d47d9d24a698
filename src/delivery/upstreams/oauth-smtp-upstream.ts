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
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../../observe/logger.js';
import { deliveryError } from '../delivery-error.js';
import type { DeliveryJob, DeliveryOutcome, DeliveryTarget, RecipientResult } from '../delivery-target.js';
import type { SetupProblem } from '../smtp-session.js';
import { SmtpTarget } from '../smtp-target.js';
import { hostPortLabel, resolveStaticHost } from '../static-host.js';
import type { TokenSource } from './oauth2-tokens.js';
import type { ReplyClassifier } from './provider-replies.js';
import { type BudgetWarning, SendLimits, type WindowLimit } from './send-limits.js';
import type { UpstreamContext } from './smtp-upstream.js';
import { UpstreamHolds } from './upstream-holds.js';

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
  readonly #holds: UpstreamHolds;
  readonly #limits: SendLimits;
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
    this.#holds = new UpstreamHolds(spec.name, this.#log, this.#now, context.events);
    this.#limits = new SendLimits(spec.limits, (w) => this.#budgetWarning(w));
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    const all = (outcome: DeliveryOutcome & Pick<RecipientResult, 'waitUntil' | 'retryAt'>) => job.recipients.map((r) => ({ ...outcome, index: r.index }));
    const mailbox = this.#spec.mailbox ?? job.sender;
    if (!mailbox) {
      const failure = deliveryError('NO_MAILBOX', { destination: `upstream ${this.name}` }).toOutcome();
      this.#holds.problem('', 'no_mailbox', failure, `mail from the null sender (bounces Postern sends) has no mailbox to send as: set mailbox = "postmaster@your-domain" on this upstream, or route bounces elsewhere`);
      return all({ ...failure, configurationProblem: 'no_mailbox' });
    }
    const held = this.#holds.held(mailbox);
    if (held) {
      this.#limits.cancel(mailbox, job.queueId);
      return all(held);
    }

    const recipients = new Set(job.recipients.map((r) => r.address.toLowerCase())).size;
    const transactions = Math.max(1, Math.ceil(recipients / this.#spec.recipientsPerMessage));
    const admit = () => this.#limits.admit(mailbox, job.queueId, recipients, this.#now(), transactions);
    let admission = admit();
    // A short wait (a slot moved by the delivery latency of the messages before it) is waited
    // here; a long one goes back to the queue with its slot.
    for (let tries = 0; !admission.go && admission.at - this.#now() <= this.#limits.shortWaitMs && tries < 5; tries++) {
      const aborted = await sleep(Math.max(0, admission.at - this.#now()), undefined, job.signal ? { signal: job.signal } : undefined).then(
        () => false,
        () => true,
      );
      if (aborted) {
        this.#limits.cancel(mailbox, job.queueId);
        return all(deliveryError('INTERRUPTED').toOutcome());
      }
      admission = admit();
    }
    if (!admission.go) {
      const limit = `${mailbox} may send ${admission.limit.label}`;
      return all({
        ...deliveryError('THROTTLED', { destination: `upstream ${this.name}`, limit, until: new Date(admission.at).toISOString() }).toOutcome(),
        waitUntil: admission.at,
      });
    }

    const startedAt = this.#now();
    let results: RecipientResult[];
    try {
      results = await this.#targetFor(mailbox).deliver(job);
    } finally {
      // Counted from when it reached the provider (or failed to): see send-limits.ts.
      this.#limits.settle(mailbox, job.queueId, this.#now());
    }
    if (results.some((r) => r.status === 'delivered')) this.#holds.recovered(mailbox, startedAt);
    return results.map((result) => {
      // A refused login (tagged by the setup) is named the provider's way: smtp_auth_disabled...
      if (result.configurationProblem === 'auth_refused') {
        const verdict = this.#spec.classify(result, { mailbox, sender: job.sender });
        return verdict?.action === 'configuration' ? { ...result, status: 'deferred', configurationProblem: verdict.problem } : result;
      }
      return result.configurationProblem ? result : this.#read(result, mailbox, job.sender);
    });
  }

  /** A result read the provider's way. */
  #read(result: RecipientResult, mailbox: string, sender: string): RecipientResult {
    const verdict = this.#spec.classify(result, { mailbox, sender });
    if (!verdict) return result;
    switch (verdict.action) {
      case 'retry':
        if (verdict.advice) {
          this.#log?.warn({ event: 'upstream_temporary', mailbox, code: result.code, response: result.response }, `upstream ${this.name}: ${verdict.advice}; retried`);
        }
        return result.status === 'failed' ? { ...result, status: 'deferred' } : result;
      case 'retry_later': {
        // The mailbox's other mail waits as well, instead of each message being told the same.
        const until = this.#now() + verdict.afterMs;
        this.#holds.pause(mailbox, until, result);
        this.#log?.warn({ event: 'upstream_throttled', mailbox, code: result.code, response: result.response, retryInMs: verdict.afterMs }, `upstream ${this.name}: ${verdict.advice}`);
        return { ...result, status: 'deferred', retryAt: until };
      }
      case 'fail':
        return result;
      case 'configuration':
        if (verdict.hold) this.#holds.hold(verdict.hold === 'mailbox' ? mailbox : '', verdict.problem, result, verdict.advice);
        else this.#holds.problem(mailbox, verdict.problem, result, verdict.advice);
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

  #onSetupProblem(mailbox: string, problem: SetupProblem, failure: DeliveryOutcome): void {
    switch (problem) {
      case 'token_refused':
        // Microsoft: the app's credentials, refused for every mailbox alike. Google: this
        // mailbox's delegation (others may have it).
        this.#holds.hold(
          this.#spec.tokenScope === 'mailbox' ? mailbox : '',
          'token_refused',
          failure,
          `fix the app's credentials (${withoutStatus(failure.response)}), then restart Postern`,
        );
        return;
      case 'auth_refused': {
        const verdict = this.#spec.classify(failure, { mailbox, sender: mailbox });
        if (verdict?.action === 'configuration') {
          this.#holds.hold(verdict.hold === 'upstream' ? '' : mailbox, verdict.problem, failure, verdict.advice);
        } else {
          this.#holds.hold(mailbox, 'auth_refused', failure, `${providerName(this.#spec.provider)} refused the login of ${mailbox} with the app's token: check the app's permissions for this mailbox`);
        }
        return;
      }
      case 'auth_unavailable':
        this.#holds.problem('', problem, failure, `${hostPortLabel(this.#spec.host, this.#spec.port)} does not offer AUTH XOAUTH2 after STARTTLS: check smtp (host and port)`);
        return;
      case 'certificate':
        this.#holds.problem('', problem, failure, 'the TLS certificate of the SMTP server or token endpoint is not trusted: set ca_file to the CA that issued it');
        return;
      case 'tls_unavailable':
        this.#holds.problem('', problem, failure, 'the SMTP server does not offer STARTTLS: check smtp (host and port)');
        return;
    }
  }

  #budgetWarning(w: BudgetWarning): void {
    const message = `upstream ${this.name}: ${w.identity} has used ${w.used} of ${w.limit.label} (80% or more); mail over the limit waits for the window to move on`;
    this.#log?.warn({ event: 'upstream_budget', mailbox: w.identity, used: w.used, limit: w.limit.limit, unit: w.limit.unit }, message);
    void this.#context.events?.record({
      kind: 'upstream_budget',
      account: w.identity.toLowerCase(),
      detail: { message, upstream: this.name, used: w.used, limit: w.limit.limit, unit: w.limit.unit },
    });
  }
}

function providerName(provider: string): string {
  return provider === 'google' ? 'Google' : 'Microsoft 365';
}

function withoutStatus(response: string): string {
  return response.replace(/^\d\.\d{1,3}\.\d{1,3} /, '');
}
