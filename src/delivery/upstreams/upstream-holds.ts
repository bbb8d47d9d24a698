// Holding an upstream (or one of its mailboxes) after it refused Postern's credentials, and
// logging each configuration problem once instead of once per message.
//
// Providers lock an account after a few failed logins, and a queue of 500 messages retried one by
// one would be 500 failed logins. So after a refusal the scope is held: for a minute (doubling on
// each new refusal, up to an hour) its mail is deferred with the refusal's reply without
// connecting. The first delivery that succeeds ends the hold. A scope is "" for the whole upstream
// or a mailbox address.
import type { Logger } from '../../observe/logger.js';
import type { SecurityEventSink } from '../../store/store.js';
import type { DeliveryOutcome } from '../delivery-target.js';

const HOLD_FIRST_MS = 60_000;
const HOLD_MAX_MS = 3_600_000;

interface Hold {
  until: number;
  /** When it began: a delivery that started before cannot end it. */
  since: number;
  outcome: DeliveryOutcome & { retryAt?: number; configurationProblem?: string };
  refusals: number;
}

export class UpstreamHolds {
  readonly #name: string;
  readonly #log: Logger | undefined;
  readonly #now: () => number;
  readonly #holds = new Map<string, Hold>();
  /** Problems logged and not yet cleared by a success, by scope: "problem reply". */
  readonly #logged = new Map<string, string>();

  readonly #events: SecurityEventSink | undefined;

  constructor(name: string, log: Logger | undefined, now: () => number, events?: SecurityEventSink) {
    this.#name = name;
    this.#log = log;
    this.#now = now;
    this.#events = events;
  }

  /** The outcome to give without trying, while `scope` (or the whole upstream) is held. */
  held(scope: string): (DeliveryOutcome & { retryAt?: number; configurationProblem?: string }) | undefined {
    const now = this.#now();
    for (const key of scope === '' ? [''] : ['', scope.toLowerCase()]) {
      const hold = this.#holds.get(key);
      if (hold && now < hold.until) return hold.outcome;
      if (hold && hold.refusals === 0) this.#holds.delete(key);
    }
    return undefined;
  }

  /**
   * The provider said to come back later (throttling): `scope`'s other mail waits until then too,
   * instead of each message trying and being told the same. Not an error, not doubled.
   */
  pause(scope: string, until: number, outcome: DeliveryOutcome): void {
    const key = scope.toLowerCase();
    const current = this.#holds.get(key);
    if (current && current.until >= until) return;
    this.#holds.set(key, { until, since: this.#now(), outcome: { ...outcome, status: 'deferred', retryAt: until }, refusals: current?.refusals ?? 0 });
  }

  /**
   * Holds `scope` after a refusal and logs it with `advice`. A refusal that arrives while the hold
   * is on (a connection opened before it began) neither lengthens it nor logs again.
   */
  hold(scope: string, problem: string, failure: DeliveryOutcome, advice: string, fields: Record<string, unknown> = {}): void {
    const key = scope.toLowerCase();
    const now = this.#now();
    const previous = this.#holds.get(key);
    if (previous && now < previous.until) return;
    const refusals = (previous?.refusals ?? 0) + 1;
    const holdMs = Math.min(HOLD_FIRST_MS * 2 ** (refusals - 1), HOLD_MAX_MS);
    // Held mail is deferred whatever the refusal's code: a configuration problem never bounces.
    this.#holds.set(key, { until: now + holdMs, since: now, outcome: { ...failure, status: 'deferred', configurationProblem: problem }, refusals });
    // Every hold is logged: there is at most one per hold period, and each is worth knowing about.
    this.#logged.delete(key);
    this.problem(scope, problem, failure, advice, { ...fields, holdMs, heldUntil: new Date(now + holdMs).toISOString() });
  }

  /** Logs a configuration problem, once per scope until it changes or a delivery succeeds. */
  problem(scope: string, problem: string, failure: DeliveryOutcome, advice: string, fields: Record<string, unknown> = {}): void {
    const key = scope.toLowerCase();
    const signature = `${problem} ${failure.response}`;
    if (this.#logged.get(key) === signature) return;
    this.#logged.set(key, signature);
    const message = `upstream ${this.#name}: ${advice}; its mail is deferred (not bounced) until then`;
    this.#log?.error(
      {
        event: `upstream_${problem}`,
        ...(scope ? { mailbox: scope } : {}),
        host: failure.remoteMta,
        ip: failure.remoteIp,
        code: failure.code,
        response: failure.response,
        ...fields,
      },
      message,
    );
    // Stored and alerted (at most one alert per mailbox or upstream every 15 minutes).
    void this.#events?.record({
      kind: 'upstream_problem',
      ...(scope ? { account: key } : {}),
      detail: { message, upstream: this.#name, problem, response: failure.response },
    });
  }

  /**
   * A delivery through `scope` that started at `startedAt` succeeded: holds that began before it
   * (and the whole upstream's) end. One that began while it ran stays: a connection logged in
   * before the credentials broke proves nothing about them.
   */
  recovered(scope: string, startedAt: number): void {
    const keys = ['', scope.toLowerCase()].filter((k) => {
      const hold = this.#holds.get(k);
      return hold ? hold.since <= startedAt : this.#logged.has(k);
    });
    if (keys.length === 0) return;
    for (const k of keys) {
      this.#holds.delete(k);
      this.#logged.delete(k);
    }
    this.#log?.info({ event: 'upstream_recovered', ...(scope ? { mailbox: scope } : {}) }, `upstream ${this.#name} accepts mail again`);
  }
}
