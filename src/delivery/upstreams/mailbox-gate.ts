// What an OAuth2 upstream does before it sends anything, the same over SMTP (oauth-smtp-upstream.ts)
// and over Graph (graph-upstream.ts): choose the mailbox to send as, answer for mail that is held
// (after a refusal, or a provider's "come back later"), and wait for the mailbox's turn under its
// sending limits, warning at 80% of a daily budget. The targets differ only in how they send.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../../observe/logger.js';
import type { SecurityEventSink } from '../../store/store.js';
import { deliveryError } from '../delivery-error.js';
import type { DeliveryJob, DeliveryOutcome, RecipientResult } from '../delivery-target.js';
import { type BudgetWarning, SendLimits, type WindowLimit } from './send-limits.js';
import { UpstreamHolds } from './upstream-holds.js';

export type Outcome = DeliveryOutcome & Pick<RecipientResult, 'waitUntil' | 'retryAt' | 'configurationProblem'>;

/** The same outcome for every recipient of the job. */
export function forAll(job: DeliveryJob, outcome: Outcome): RecipientResult[] {
  return job.recipients.map((r) => ({ ...outcome, index: r.index }));
}

export interface MailboxGateOptions {
  /** The upstream's name. */
  name: string;
  /** Send everything as this mailbox; else as the envelope sender. */
  mailbox: string | undefined;
  limits: readonly WindowLimit[];
  log: Logger | undefined;
  now: () => number;
  events: SecurityEventSink | undefined;
}

export class MailboxGate {
  readonly holds: UpstreamHolds;
  readonly #limits: SendLimits;
  readonly #o: MailboxGateOptions;

  constructor(options: MailboxGateOptions) {
    this.#o = options;
    this.holds = new UpstreamHolds(options.name, options.log, options.now, options.events);
    this.#limits = new SendLimits(options.limits, (w) => this.#budgetWarning(w));
  }

  /** The mailbox to send `job` as, or the results to give without sending (no mailbox, held). */
  open(job: DeliveryJob): { mailbox: string } | { results: RecipientResult[] } {
    const mailbox = this.#o.mailbox ?? job.sender;
    if (!mailbox) {
      const failure = deliveryError('NO_MAILBOX', { destination: `upstream ${this.#o.name}` }).toOutcome();
      this.holds.problem(
        '',
        'no_mailbox',
        failure,
        'mail from the null sender (bounces and alerts Postern sends) has no mailbox to send as: set mailbox = "postmaster@your-domain" on this upstream, or a fallback',
      );
      return { results: forAll(job, { ...failure, configurationProblem: 'no_mailbox' }) };
    }
    const held = this.holds.held(mailbox);
    if (held) {
      // It will not come back for a slot it may have been given.
      this.#limits.cancel(mailbox, job.queueId);
      return { results: forAll(job, held) };
    }
    return { mailbox };
  }

  /**
   * Waits for the mailbox's turn to send `job` (`recipients`, as `messages` provider messages or
   * requests): undefined when it may go now (settle() when done), else the results to give. A short
   * wait (a slot moved by the delivery time of the messages before it) is waited here; a long one
   * goes back to the queue with its slot, not counted as an attempt.
   */
  async turn(job: DeliveryJob, mailbox: string, recipients: number, messages: number): Promise<RecipientResult[] | undefined> {
    const now = this.#o.now;
    const admit = () => this.#limits.admit(mailbox, job.queueId, recipients, now(), messages);
    let admission = admit();
    for (let tries = 0; !admission.go && admission.at - now() <= this.#limits.shortWaitMs && tries < 5; tries++) {
      const waited = await sleep(Math.max(0, admission.at - now()), undefined, job.signal ? { signal: job.signal } : undefined).then(
        () => true,
        () => false,
      );
      if (!waited) {
        this.#limits.cancel(mailbox, job.queueId);
        return forAll(job, deliveryError('INTERRUPTED').toOutcome());
      }
      admission = admit();
    }
    if (admission.go) return undefined;
    // A turn after the message expires is never taken (the queue runner bounces it): give the
    // slot back now, so the mail behind it need not wait for a send that will not happen.
    if (job.expiresAt !== undefined && admission.at > job.expiresAt) this.#limits.cancel(mailbox, job.queueId);
    const limit = `${mailbox} may send ${admission.limit.label}`;
    return forAll(job, {
      ...deliveryError('THROTTLED', { destination: `upstream ${this.#o.name}`, limit, until: new Date(admission.at).toISOString() }).toOutcome(),
      waitUntil: admission.at,
    });
  }

  /** The send that turn() let go has finished: it counts from now (see send-limits.ts). */
  settle(mailbox: string, job: DeliveryJob): void {
    this.#limits.settle(mailbox, job.queueId, this.#o.now());
  }

  #budgetWarning(w: BudgetWarning): void {
    const message = `upstream ${this.#o.name}: ${w.identity} has used ${w.used} of ${w.limit.label} (80% or more); mail over the limit waits for the window to move on`;
    this.#o.log?.warn({ event: 'upstream_budget', mailbox: w.identity, used: w.used, limit: w.limit.limit, unit: w.limit.unit }, message);
    void this.#o.events?.record({
      kind: 'upstream_budget',
      account: w.identity.toLowerCase(),
      detail: { message, upstream: this.#o.name, used: w.used, limit: w.limit.limit, unit: w.limit.unit },
    });
  }
}
