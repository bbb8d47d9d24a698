// SMTP delivery to one destination: an MX set, a static route or an SMTP upstream. All are "a list
// of hosts to try on some port with some TLS policy"; they differ in how the host list is found
// (the Router gives the right `resolve`), and an upstream adds certificate verification and AUTH
// (src/delivery/upstreams/smtp-upstream.ts), so one class serves all three.
//
// Per job: take a connection slot from the pool, reuse an idle connection to the same destination
// or resolve and open a new one, run one transaction per batch of recipients, and hand the
// connection back for the next message. A kept connection that the server closed before the
// message reached it (its idle timeout running out just then) costs nothing: the transaction goes
// out again at once on another connection, as with Postfix's connection cache, because the
// server has nothing of it. Every problem becomes a per-recipient result; nothing throws.
import type { ConnectionPool, PoolLease } from './connection-pool.js';
import { DeliveryError, deliveryError } from './delivery-error.js';
import type { DeliveryJob, DeliveryOutcome, DeliveryTarget, RecipientResult, TlsMode } from './delivery-target.js';
import type { MailHost } from './mx-resolver.js';
import { type SessionAuth, type SessionTls, type SetupProblem, SmtpSession, type TransactionResult } from './smtp-session.js';

export interface SmtpDestination {
  /** Pool key: connections and the per-destination cap are shared by everything with this key. */
  key: string;
  /** For logs: "mx example.com", "route relay.internal:25". */
  description: string;
  /** For status texts: "example.com", "relay.internal:25". */
  name: string;
  port: number;
  tls: TlsMode | SessionTls;
  /** The hosts to try, best first. Throws a DeliveryError when there are none. */
  resolve(): Promise<MailHost[]>;
  /** Upstreams: verify the server's certificate (see SmtpSessionOptions.verify). */
  verify?: { ca?: string };
  /** Upstreams: log in after TLS. */
  auth?: SessionAuth;
  /** Connections at once to this destination, below the pool's per-destination cap. */
  maxConnections?: number;
  /**
   * Told when a new connection could not be set up for a reason beyond "this host failed"; may
   * return a more precise name for the problem (an upstream reads the provider's reply).
   */
  onSetupProblem?(problem: SetupProblem, failure: DeliveryOutcome): string | void;
}

export interface SmtpTargetOptions {
  pool: ConnectionPool;
  /** EHLO name (config.hostname). */
  heloName: string;
  connectTimeout: number;
  commandTimeout: number;
  /** Recipients per transaction (default 50, Postfix's default); more go in further transactions. */
  maxRecipientsPerTransaction?: number;
}

export class SmtpTarget implements DeliveryTarget {
  readonly #destination: SmtpDestination;
  readonly #options: SmtpTargetOptions;

  constructor(destination: SmtpDestination, options: SmtpTargetOptions) {
    this.#destination = destination;
    this.#options = options;
  }

  get description(): string {
    return this.#destination.description;
  }

  get key(): string {
    return this.#destination.key;
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    // The same address twice in one message is delivered once (and both get its result).
    const unique = new Map<string, string>();
    for (const r of job.recipients) if (!unique.has(r.address.toLowerCase())) unique.set(r.address.toLowerCase(), r.address);
    const outcomes = await this.#deliverUnique(job, [...unique.values()]);
    return job.recipients.map((r) => {
      const outcome =
        outcomes.get(unique.get(r.address.toLowerCase())!) ?? deliveryError('INTERNAL', { reason: 'no result' }).toOutcome();
      return { ...outcome, index: r.index };
    });
  }

  async #deliverUnique(job: DeliveryJob, addresses: string[]): Promise<Map<string, DeliveryOutcome>> {
    const outcomes = new Map<string, DeliveryOutcome>();
    const all = (outcome: DeliveryOutcome) => {
      for (const a of addresses) if (!outcomes.has(a)) outcomes.set(a, outcome);
      return outcomes;
    };
    const signal = job.signal;

    let lease: PoolLease;
    try {
      lease = await this.#options.pool.acquire(this.#destination.key, signal, this.#destination.maxConnections);
    } catch (err) {
      return all(
        signal?.aborted
          ? deliveryError('INTERRUPTED').toOutcome()
          : deliveryError('INTERNAL', { reason: (err as Error).message }).toOutcome(),
      );
    }

    let session: SmtpSession | undefined;
    const onAbort = () => session?.destroy();
    signal?.addEventListener('abort', onAbort, { once: true });
    let reusable = false;
    /** A kept connection, else a new one; the failure when none could be opened. */
    const connect = async (): Promise<{ session: SmtpSession; kept: boolean } | { failure: DeliveryOutcome }> => {
      const idle = await lease.takeIdle();
      if (idle) return { session: idle, kept: true };
      const opened = await this.#open(signal);
      return 'failure' in opened ? opened : { session: opened.session, kept: false };
    };
    try {
      let connected = await connect();
      if ('failure' in connected) return all(connected.failure);
      session = connected.session;

      const batchSize = this.#options.maxRecipientsPerTransaction ?? 50;
      for (let start = 0; start < addresses.length; start += batchSize) {
        const batch = addresses.slice(start, start + batchSize);
        if (signal?.aborted) return all(deliveryError('INTERRUPTED').toOutcome());
        if (session.needsReset && !(await session.reset())) {
          reusable = false;
          return all(deliveryError('CONNECTION_LOST', { server: session.server, reason: 'RSET failed' }).toOutcome());
        }
        let tx = await this.#transaction(job, batch, session);
        // Each pass takes another kept connection or opens a new one (then kept is false): it ends.
        while ('replies' in tx && tx.untouched && connected.kept && !signal?.aborted) {
          connected = await connect();
          if ('failure' in connected) return all(connected.failure);
          session = connected.session;
          tx = await this.#transaction(job, batch, session);
        }
        if (!('replies' in tx)) return all(tx);
        for (const [address, outcome] of tx.replies) outcomes.set(address, outcome);
        reusable = tx.reusable;
        if (!reusable) {
          // The rest of the recipients wait for a fresh connection on the next attempt.
          return all(deliveryError('CONNECTION_LOST', { server: session.server, reason: 'session ended' }).toOutcome());
        }
      }
      return outcomes;
    } catch (err) {
      reusable = false;
      return all(deliveryError('INTERNAL', { reason: (err as Error).message }).toOutcome());
    } finally {
      signal?.removeEventListener('abort', onAbort);
      lease.release(session, reusable && !signal?.aborted);
    }
  }

  /** One transaction for `batch`, or the outcome for all when the body cannot be read. */
  async #transaction(job: DeliveryJob, batch: string[], session: SmtpSession): Promise<TransactionResult | DeliveryOutcome> {
    let body;
    try {
      body = job.body();
    } catch (err) {
      return deliveryError('BODY_UNREADABLE', { reason: (err as Error).message }).toOutcome();
    }
    return session.send({ from: job.sender, to: batch, size: job.size }, body);
  }

  async #open(signal: AbortSignal | undefined): Promise<{ session: SmtpSession } | { failure: DeliveryOutcome }> {
    let hosts: MailHost[];
    try {
      hosts = await this.#destination.resolve();
    } catch (err) {
      if (err instanceof DeliveryError) return { failure: err.toOutcome() };
      return { failure: deliveryError('INTERNAL', { reason: (err as Error).message }).toOutcome() };
    }
    const { verify, auth } = this.#destination;
    const opened = await SmtpSession.open({
      destination: this.#destination.name,
      hosts,
      port: this.#destination.port,
      tls: this.#destination.tls,
      ...(verify ? { verify } : {}),
      ...(auth ? { auth } : {}),
      heloName: this.#options.heloName,
      connectTimeout: this.#options.connectTimeout,
      commandTimeout: this.#options.commandTimeout,
      signal,
    });
    if (opened.session) return { session: opened.session };
    if (!opened.problem) return { failure: opened.failure };
    const problem = this.#destination.onSetupProblem?.(opened.problem, opened.failure) || opened.problem;
    // This delivery's own setup failed on the configuration (credentials, TLS, AUTH): its
    // recipients say so, for an upstream's fallback (and nothing else) to act on.
    return { failure: { ...opened.failure, configurationProblem: problem } };
  }
}
