// The queue runner: takes due work from the store, delivers it, and records what happened.
//
// Failure semantics, in plain words (the queue's contract with senders):
//   - A message is in the store (durable) before the client got its 250; the runner only ever
//     moves recipients between states, it never holds mail only in memory.
//   - Each round claims due messages (their due recipients become in_flight so no other worker
//     takes them), groups the recipients by destination, delivers to every destination at once,
//     then records one outcome per recipient in one store call.
//   - delivered and failed are final. deferred comes back after an exponential backoff
//     (retry-delay.ts); when the next try would be after the message's expiry (queue.lifetime,
//     5 days by default) the recipient fails instead, as "4.4.7 Message expired after N attempts".
//   - Every recipient that failed in a round (refused, null MX, no such domain, expired) gets one
//     DSN per message and round, sent to the envelope sender unless it is the null sender or the
//     recipient asked for no failure notice. The DSN is queued before the outcome is recorded: a
//     crash in between can send a bounce twice, never lose it.
//   - A target may hold a recipient back without trying (an upstream's sending limits: Exchange
//     allows a mailbox 30 messages a minute): it goes back to the queue for the time the target
//     gave, not counted as an attempt, logged as "waiting". A server that says when to come back
//     (throttling) is retried then instead of on the backoff.
//   - If the process dies mid-delivery, recipients stay in_flight; start() puts them back
//     (store.releaseInFlight) and they are tried again. A message may then arrive twice, which is
//     SMTP's usual trade (RFC 5321 6.1: duplicates over loss).
//   - Finished messages stay in the store for `[queue] retention` (30 days), security events for
//     90 days; then they are deleted (retention.ts). Pending messages are never deleted.
//   - stop() claims nothing more, gives deliveries in progress a grace period, then aborts them;
//     the recipients they had not finished go back to the queue without counting as an attempt.
//
// Wake-ups: notify() (the intake calls it after each enqueue), the completion of a delivery (a
// slot is free), and a timer at store.nextDueAt(), capped so that changes made by another process
// (`postern queue retry`) are noticed within `maxSleep`. While most delivery slots are busy, a
// claim waits (20 ms at most) for a quarter of them to be free and takes that many at once.
import { setMaxListeners } from 'node:events';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config } from '../config/load-config.js';
import { ConnectionPool } from '../delivery/connection-pool.js';
import { deliveryError, withoutStatus } from '../delivery/delivery-error.js';
import type { DeliveryTarget, RecipientResult } from '../delivery/delivery-target.js';
import { type DsnRecipient, enqueueDsn, readHeaderBlock, wantsFailureNotice } from '../delivery/dsn.js';
import { MxResolver } from '../delivery/mx-resolver.js';
import { Router, type RouterConfig } from '../delivery/router.js';
import type { Logger } from '../observe/logger.js';
import type { QueueStore, QueuedMessage, QueuedRecipient, RecipientOutcome, SecurityEventSink, SecurityStore } from '../store/store.js';
import { Retention } from './retention.js';
import { retryDelay } from './retry-delay.js';

export interface QueueRunnerOptions {
  /** The queue, and the security events' purge (retention.ts). */
  store: QueueStore & Pick<SecurityStore, 'purgeSecurityEvents'>;
  config: Pick<Config, 'hostname' | 'delivery' | 'queue' | 'policy'> & RouterConfig;
  logger: Logger;
  /** How long an unused outbound connection is kept for reuse, in ms (default 5000). */
  connectionIdleTimeout?: number;
  /** Per-try DNS timeout in ms (default: connect_timeout, at most 5000). */
  dnsTimeout?: number;
  /** Longest sleep between looks at the store, in ms (default 10000). */
  maxSleep?: number;
  /** Upstream problems and budgets go here as security events (alerts). */
  events?: SecurityEventSink;
  /** Clock, for tests. */
  now?: () => number;
  /** How often finished messages past `[queue] retention` are deleted, in ms (default 10 minutes). */
  purgeInterval?: number;
}

/** Longest a claim waits for a batch of free slots while deliveries are busy (see #tick). */
const CLAIM_BATCH_WAIT_MS = 20;

/** Grace after the abort for deliveries to wind down before stop() gives up on them. */
const ABORT_WAIT_MS = 5000;

export class QueueRunner {
  readonly #store: QueueRunnerOptions['store'];
  readonly #config: QueueRunnerOptions['config'];
  readonly #log: Logger;
  readonly #now: () => number;
  readonly #maxSleep: number;
  readonly #pool: ConnectionPool;
  readonly #router: Router;
  readonly #retention: Retention;
  /**
   * Delivery rounds in progress. Keyed by a counter, not the queue id: a recipient of a message
   * can fall due while another recipient of the same message is still in flight.
   */
  readonly #active = new Map<number, Promise<void>>();
  #nextRound = 0;
  readonly #abort = new AbortController();
  #running = false;
  #stopping: Promise<void> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #ticking: Promise<void> | undefined;
  #again = false;
  /** When the claim now waiting for a batch of free slots began to wait (see #tick). */
  #batchWaitSince: number | undefined;

  constructor(options: QueueRunnerOptions) {
    // Every delivery in progress (up to delivery.concurrency, each waiting on sockets, pool slots
    // and timers) listens to the one shutdown signal: many listeners are the design, not a leak.
    setMaxListeners(0, this.#abort.signal);
    this.#store = options.store;
    this.#config = options.config;
    this.#log = options.logger.child({ component: 'queue' });
    this.#now = options.now ?? Date.now;
    this.#maxSleep = options.maxSleep ?? 10_000;
    const delivery = options.config.delivery;
    this.#pool = new ConnectionPool({
      maxConnections: delivery.concurrency,
      maxPerDestination: delivery.per_destination,
      idleTimeout: options.connectionIdleTimeout ?? 5000,
    });
    const resolver = new MxResolver({
      servers: delivery.dns_servers,
      timeout: options.dnsTimeout ?? Math.min(delivery.connect_timeout, 5000),
    });
    this.#retention = new Retention({
      store: this.#store,
      retentionMs: options.config.queue.retention,
      securityEventsRetentionMs: options.config.policy.security_events_retention,
      logger: this.#log,
      intervalMs: options.purgeInterval ?? 10 * 60_000,
      now: this.#now,
    });
    // Reads the upstreams' secrets: a ConfigError from here stops start-up.
    this.#router = new Router({ config: options.config, pool: this.#pool, resolver, logger: options.logger, ...(options.events ? { events: options.events } : {}) });
  }

  /**
   * Delivery rounds in progress, connection slots in use and idle connections kept open. All
   * three go back to zero once the queue is idle (after the pool's idle timeout for the last):
   * test/delivery-faults.test.ts checks that no network fault leaves a worker or a slot behind.
   */
  get activity(): { deliveries: number; connectionsInUse: number; idleConnections: number } {
    return { deliveries: this.#active.size, connectionsInUse: this.#pool.active, idleConnections: this.#pool.idle };
  }

  /** Puts work interrupted by a crash back in the queue, then starts delivering. */
  async start(): Promise<void> {
    if (this.#running || this.#stopping) return;
    const released = await this.#store.releaseInFlight(this.#now());
    if (released > 0) this.#log.warn({ event: 'released', recipients: released }, 'recipients left in flight by the last run are queued again');
    this.#running = true;
    this.#retention.start();
    this.#wake();
  }

  /** New mail was queued (or made due): look at the store now instead of at the next timer. */
  notify(): void {
    if (this.#running) this.#wake();
  }

  /**
   * Stops claiming, lets deliveries in progress finish for up to `graceMs`, then aborts the rest
   * (their unfinished recipients are queued again, not counted as an attempt) and closes idle
   * connections. Does not close the store.
   */
  stop(graceMs = 10_000): Promise<void> {
    this.#stopping ??= (async () => {
      this.#running = false;
      clearTimeout(this.#timer);
      await this.#retention.stop();
      await this.#ticking;
      if (this.#active.size > 0) {
        this.#log.info({ event: 'stopping', deliveries: this.#active.size, graceMs }, 'waiting for deliveries in progress');
        const finished = await settleWithin([...this.#active.values()], graceMs);
        if (!finished) {
          this.#log.warn({ event: 'aborting', deliveries: this.#active.size }, 'grace period over: aborting deliveries');
          this.#abort.abort();
          const wound = await settleWithin([...this.#active.values()], ABORT_WAIT_MS);
          if (!wound) this.#log.error({ event: 'abort_timeout', deliveries: this.#active.size }, 'deliveries did not stop; they will be retried after restart');
        }
      }
      this.#pool.close();
    })();
    return this.#stopping;
  }

  // ---- scheduling -----------------------------------------------------------------------

  #wake(): void {
    if (this.#ticking) {
      this.#again = true;
      return;
    }
    // The tick waits for setImmediate: wake-ups of one turn of the event loop (a group commit of
    // fifty enqueues, a handful of deliveries finishing) then share one claim transaction instead
    // of one each.
    this.#ticking = new Promise<void>((resolve) => setImmediate(resolve))
      .then(() => this.#tick())
      .finally(() => {
        this.#ticking = undefined;
        if (this.#again && this.#running) this.#wake();
      });
  }

  async #tick(): Promise<void> {
    this.#again = false;
    clearTimeout(this.#timer);
    if (!this.#running) return;
    const concurrency = this.#config.delivery.concurrency;
    const free = concurrency - this.#active.size;
    // Busy: claim in batches. A claim is a write transaction whose fixed cost (the lock, the
    // index walk, the commit) was paid per message when each finished delivery claimed the next
    // one alone. While a quarter of the rounds are still busy the connections have work in hand,
    // so a claim waits until a quarter of the slots are free, or CLAIM_BATCH_WAIT_MS at most.
    const batch = Math.max(1, Math.floor(concurrency / 4));
    if (free > 0 && free < batch && this.#active.size >= batch) {
      // Real time, not the runner's clock (tests pin that one).
      this.#batchWaitSince ??= performance.now();
      const waited = performance.now() - this.#batchWaitSince;
      if (waited < CLAIM_BATCH_WAIT_MS) {
        this.#schedule(CLAIM_BATCH_WAIT_MS - waited);
        return;
      }
    }
    this.#batchWaitSince = undefined;
    let claimed: QueuedMessage[] = [];
    try {
      if (free > 0) {
        claimed = await this.#store.claimDue(this.#now(), free);
        for (const message of claimed) this.#startMessage(message);
      }
      // All slots busy: the next completion wakes us. Otherwise sleep until the next due time.
      if (!this.#running || this.#active.size >= this.#config.delivery.concurrency) return;
      const due = await this.#store.nextDueAt();
      const now = this.#now();
      let delay = due === null ? this.#maxSleep : Math.min(Math.max(due - now, 0), this.#maxSleep);
      // Something is due but nothing could be claimed (another worker took it): do not spin.
      if (delay === 0 && claimed.length === 0) delay = 50;
      this.#schedule(delay);
    } catch (err) {
      this.#log.error({ event: 'queue_error', err: (err as Error).message }, 'cannot read the queue; retrying in 1s');
      this.#schedule(1000);
    }
  }

  #schedule(delay: number): void {
    if (!this.#running) return;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#wake(), delay);
  }

  #startMessage(message: QueuedMessage): void {
    const round = this.#nextRound++;
    const run = this.#deliverMessage(message)
      .catch(async (err) => {
        this.#log.error({ event: 'delivery_error', queueId: message.queueId, err: (err as Error).message }, 'delivery round failed');
        // A local fault (store error, bug) must not leave the recipients in flight until restart.
        const later = this.#now() + this.#config.queue.first_retry;
        const release = message.recipients.map((r) =>
          notTried(r, r.lastResponse ?? deliveryError('INTERNAL', { reason: (err as Error).message }).response, later),
        );
        await this.#store.recordOutcomes(message.queueId, release, this.#now()).catch(() => undefined);
      })
      .finally(() => {
        this.#active.delete(round);
        this.#wake();
      });
    this.#active.set(round, run);
  }

  // ---- one message ----------------------------------------------------------------------

  async #deliverMessage(message: QueuedMessage): Promise<void> {
    const signal = this.#abort.signal;
    const results = new Map<number, { result: RecipientResult; target?: DeliveryTarget; durationMs: number }>();

    const groups = new Map<string, { target: DeliveryTarget; recipients: QueuedRecipient[] }>();
    for (const r of message.recipients) {
      if (!r.domain || !r.address.includes('@')) {
        results.set(r.index, {
          result: { index: r.index, ...deliveryError('BAD_ADDRESS', { address: r.address }).toOutcome() },
          durationMs: 0,
        });
        continue;
      }
      const { key, target } = this.#router.route(r.domain, { sender: message.sender, account: message.origin.account });
      const group = groups.get(key) ?? { target, recipients: [] };
      group.recipients.push(r);
      groups.set(key, group);
    }

    await Promise.all(
      [...groups.values()].map(async ({ target, recipients }) => {
        const started = Date.now();
        let delivered: RecipientResult[];
        try {
          delivered = await target.deliver({
            queueId: message.queueId,
            sender: message.sender,
            recipients: recipients.map((r) => ({ index: r.index, address: r.address })),
            body: () => this.#store.readBody(message.queueId),
            size: message.size,
            expiresAt: message.expiresAt,
            signal,
          });
        } catch (err) {
          const outcome = deliveryError('INTERNAL', { reason: (err as Error).message }).toOutcome();
          delivered = recipients.map((r) => ({ ...outcome, index: r.index }));
        }
        const durationMs = Date.now() - started;
        for (const result of delivered) results.set(result.index, { result, target, durationMs });
      }),
    );

    const now = this.#now();
    const outcomes: RecipientOutcome[] = [];
    const bounces: DsnRecipient[] = [];
    for (const r of message.recipients) {
      const entry = results.get(r.index) ?? {
        result: { index: r.index, ...deliveryError('INTERNAL', { reason: 'no result' }).toOutcome() },
        durationMs: 0,
      };
      const { outcome, bounce } = this.#decide(message, r, entry.result, now, signal.aborted);
      outcomes.push(outcome);
      if (bounce && wantsFailureNotice(r.notify)) bounces.push(bounce);
      this.#logOutcome(message, r, entry.result, outcome, entry.target, entry.durationMs);
    }

    if (bounces.length > 0) await this.#persist(message.queueId, 'bounce', () => this.#bounce(message, bounces, now));
    await this.#persist(message.queueId, 'outcomes', () => this.#store.recordOutcomes(message.queueId, outcomes, now));
  }

  /**
   * Writes what a delivery round found out, retrying while the store refuses (locked by another
   * process past its busy deadline, disk full, a database restart). Giving up at once would leave
   * the recipients in flight until the next start, or put them back in the queue, and a recipient
   * the remote server already accepted would then get the message a second time. The round keeps
   * its slot meanwhile, so a broken store also stops new claims. Once stop() aborts, one last try,
   * then the error goes up (and a restart's releaseInFlight retries those recipients).
   */
  async #persist(queueId: string, what: 'bounce' | 'outcomes', write: () => Promise<unknown>): Promise<void> {
    for (let pause = 500; ; pause = Math.min(pause * 2, 30_000)) {
      try {
        await write();
        return;
      } catch (err) {
        if (this.#abort.signal.aborted) throw err;
        this.#log.error(
          { event: 'store_write_failed', queueId, what, err: (err as Error).message, retryMs: pause },
          `cannot record the delivery ${what === 'bounce' ? 'bounce' : 'results'}; retrying`,
        );
        // Cut short by stop()'s abort; the timer removes its abort listener either way (a long
        // store outage must not pile listeners onto the runner's signal).
        await sleep(pause, undefined, { signal: this.#abort.signal }).catch(() => undefined);
      }
    }
  }

  /** Turns a delivery result into the stored outcome: retry, expire, or final. */
  #decide(
    message: QueuedMessage,
    r: QueuedRecipient,
    result: RecipientResult,
    now: number,
    aborted: boolean,
  ): { outcome: RecipientOutcome; bounce?: DsnRecipient } {
    const attempts = r.attempts + 1;
    const remote = { remoteMta: result.remoteMta, remoteIp: result.remoteIp };
    if (result.status === 'delivered') {
      return { outcome: { index: r.index, state: 'delivered', code: result.code, response: result.response } };
    }
    if (result.status === 'deferred' && aborted) {
      // Shutdown, not the destination's fault: back in the queue, not counted as an attempt.
      return { outcome: notTried(r, r.lastResponse ?? deliveryError('INTERRUPTED').response, now) };
    }
    if (result.status === 'failed') {
      return {
        outcome: { index: r.index, state: 'failed', code: result.code, response: result.response },
        bounce: {
          address: r.address,
          orcpt: r.orcpt,
          status: result.enhanced,
          reason: describeFailure(result),
          ...remote,
          ...(result.code !== null ? { diagnostic: result.response } : {}),
        },
      };
    }
    // Held back by the target's own sending limits (waitUntil), the message was not tried: it
    // goes back for its slot without counting an attempt. A server that said when to come back
    // (throttling) is retried then, not on the backoff.
    const waiting = result.waitUntil !== undefined;
    const nextAttemptAt = waiting
      ? Math.max(result.waitUntil!, now)
      : result.retryAt !== undefined
        ? Math.max(result.retryAt, now)
        : now + retryDelay(attempts, this.#config.queue);
    if (nextAttemptAt > message.expiresAt) {
      const tried = waiting ? r.attempts : attempts;
      const tries = tried === 1 ? '1 attempt' : `${tried} attempts`;
      const expired = deliveryError('EXPIRED', { attempts: tries, last: result.response });
      return {
        outcome: { index: r.index, state: 'failed', code: waiting ? r.lastCode : result.code, response: expired.response },
        bounce: {
          address: r.address,
          orcpt: r.orcpt,
          status: expired.enhanced,
          ...(waiting
            ? {
                reason: `The message could not be sent within ${formatAge(message.expiresAt - message.receivedAt)}: the upstream's sending limit left it no turn before it expired.`,
                detail: withoutStatus(result.response),
              }
            : {
                reason: `The message could not be delivered in ${formatAge(now - message.receivedAt)} (${tries}) and has expired; every attempt failed temporarily.`,
                ...remote,
                ...(result.code !== null ? { diagnostic: result.response } : { detail: withoutStatus(result.response) }),
              }),
        },
      };
    }
    if (waiting) return { outcome: notTried(r, result.response, nextAttemptAt) };
    return { outcome: { index: r.index, state: 'deferred', code: result.code, response: result.response, nextAttemptAt } };
  }

  async #bounce(message: QueuedMessage, recipients: DsnRecipient[], now: number): Promise<void> {
    const base = { queueId: message.queueId, session: message.origin.sessionId, recipients: recipients.map((r) => r.address) };
    if (message.sender === '') {
      this.#log.warn({ ...base, event: 'bounce_dropped' }, 'not bouncing a message from the null sender');
      return;
    }
    try {
      const headers = await readHeaderBlock(this.#store.readBody(message.queueId)).catch(() => Buffer.alloc(0));
      const dsnQueueId = await enqueueDsn(this.#store, {
        hostname: this.#config.hostname,
        message,
        recipients,
        originalHeaders: headers,
        now,
        lifetime: this.#config.queue.lifetime,
      });
      this.#log.info({ ...base, event: 'bounced', to: message.sender, dsnQueueId }, 'delivery status notification queued');
      this.#wake();
    } catch (err) {
      this.#log.error({ ...base, event: 'bounce_error', err: (err as Error).message }, 'could not queue the delivery status notification');
    }
  }

  #logOutcome(
    message: QueuedMessage,
    r: QueuedRecipient,
    result: RecipientResult,
    outcome: RecipientOutcome,
    target: DeliveryTarget | undefined,
    durationMs: number,
  ): void {
    const expired = outcome.state === 'failed' && result.status === 'deferred';
    const waiting = outcome.state === 'queued' && result.waitUntil !== undefined;
    const event = waiting ? 'waiting' : outcome.state === 'queued' ? 'released' : expired ? 'expired' : outcome.state;
    const line = {
      event,
      queueId: message.queueId,
      session: message.origin.sessionId,
      from: message.sender,
      to: r.address,
      destination: target?.description,
      host: result.remoteMta,
      ip: result.remoteIp,
      code: result.code,
      response: outcome.response,
      attempt: r.attempts + 1,
      durationMs,
      ...(outcome.state === 'deferred' || waiting ? { nextAttemptAt: new Date(outcome.nextAttemptAt!).toISOString() } : {}),
    };
    if (event === 'delivered') this.#log.info(line, 'delivered');
    else if (waiting) this.#log.info(line, 'waiting for the upstream\'s sending limit');
    else if (event === 'released') this.#log.info(line, 'delivery interrupted; queued again');
    else this.#log.warn(line, event === 'deferred' ? 'deferred' : 'delivery failed');
  }
}

/** Back in the queue at `at`, not counted as an attempt, its last reply code kept. */
function notTried(r: QueuedRecipient, response: string, at: number): RecipientOutcome {
  return { index: r.index, state: 'queued', code: r.lastCode, response, nextAttemptAt: at, countsAsAttempt: false };
}

/** The human sentence for a bounce: who refused it, or what Postern found. */
function describeFailure(result: RecipientResult): string {
  if (result.code !== null) {
    const ip = result.remoteIp && result.remoteIp !== result.remoteMta ? `[${result.remoteIp}]` : '';
    return `The mail server ${result.remoteMta ?? 'of the recipient'}${ip} refused the message.`;
  }
  return `${withoutStatus(result.response)}.`;
}

/** "5 days", "3 hours", "12 minutes", "40 seconds". */
function formatAge(ms: number): string {
  const units: [number, string][] = [
    [86_400_000, 'day'],
    [3_600_000, 'hour'],
    [60_000, 'minute'],
  ];
  for (const [size, name] of units) {
    const n = Math.floor(ms / size);
    if (n >= 1) return `${n} ${name}${n === 1 ? '' : 's'}`;
  }
  const seconds = Math.max(0, Math.round(ms / 1000));
  return `${seconds} second${seconds === 1 ? '' : 's'}`;
}

/** true when every promise settled within `ms`. */
async function settleWithin(promises: Promise<unknown>[], ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  const all = Promise.allSettled(promises).then(() => true as const);
  try {
    return await Promise.race([all, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
