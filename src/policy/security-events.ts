// Security events: lockouts, rate-limit hits, send-as denials, logins from new networks, volume
// spikes, upstreams refusing Postern's credentials and upstream mailboxes near a daily limit. Each is stored (for `postern security events`), logged, and optionally sent on to an
// admin address (as a queued message) and/or a webhook (a JSON POST). Alerts never block the SMTP
// session that caused them, and an alert that cannot be sent is logged, not retried forever.
import type { Config } from '../config/load-config.js';
import { formatRfc5322Date } from '../mail/rfc5322-date.js';
import type { Logger } from '../observe/logger.js';
import { enqueueLocalMessage } from '../queue/enqueue-local.js';
import type { NewSecurityEvent, SecurityEventKind, SecurityEventSink, Store } from '../store/store.js';

/** Kinds worth an alert (the others are stored and logged only). */
const ALERT_KINDS: ReadonlySet<SecurityEventKind> = new Set(['lockout', 'new_network', 'volume_spike', 'rate_limited', 'upstream_problem', 'upstream_budget']);

/** At most one alert per kind and account (or address) in this period, so a storm is one mail. */
const ALERT_QUIET_MS = 15 * 60_000;

/**
 * Failed logins stored one by one in each minute of the clock; past that they are counted and
 * stored as one summary event for the minute (each one is still logged). The lockout bounds the
 * failures per address and per username, but not a password spray from thousands of addresses,
 * which would otherwise write a row per attempt: 10,000 addresses at the default 20 failures per
 * 15 minutes are 800,000 rows an hour. With this cap a minute costs at most 31 rows.
 */
const AUTH_FAILED_STORED_PER_MINUTE = 30;
/** Distinct addresses and usernames counted for a summary; past it the summary says "at least". */
const SUMMARY_DISTINCT_MAX = 10_000;

export interface SecurityEventsOptions {
  store: Store;
  logger: Logger;
  config: Pick<Config, 'alerts' | 'hostname' | 'queue'>;
  /** Called after an alert message was queued (wakes the queue runner). */
  onQueued?: () => void;
}

export class SecurityEvents implements SecurityEventSink {
  readonly #options: SecurityEventsOptions;
  readonly #lastAlert = new Map<string, number>();
  readonly #pending = new Set<Promise<unknown>>();
  /** The failed logins of the current minute (see AUTH_FAILED_STORED_PER_MINUTE). */
  #failedLogins: FailedLoginMinute | undefined;
  #summaryTimer: NodeJS.Timeout | undefined;

  constructor(options: SecurityEventsOptions) {
    this.#options = options;
  }

  /** Records the event; alerts go out in the background. */
  async record(event: NewSecurityEvent): Promise<void> {
    const at = event.at ?? Date.now();
    const { logger } = this.#options;
    logger.warn({ event: 'security', kind: event.kind, account: event.account, ip: event.ip, listener: event.listener, detail: event.detail }, event.detail.message);
    if (event.kind === 'auth_failed' && !this.#storeFailedLogin(event, at)) return;
    await this.#store({ ...event, at });
    if (ALERT_KINDS.has(event.kind)) this.#track(this.#alert({ ...event, at }));
  }

  /** Waits for alerts in flight and stores a pending summary of failed logins (on shutdown and in tests). */
  async drain(): Promise<void> {
    this.#track(this.#storeSummary());
    await Promise.allSettled([...this.#pending]);
  }

  async #store(event: NewSecurityEvent & { at: number }): Promise<void> {
    const { store, logger } = this.#options;
    await store.recordSecurityEvent(event).catch((err: Error) => logger.error({ event: 'security_store_error', err: err.message }, 'cannot store security event'));
  }

  /** false: this failed login is over the minute's share and only counted for its summary. */
  #storeFailedLogin(event: NewSecurityEvent, at: number): boolean {
    const minute = Math.floor(at / 60_000);
    if (this.#failedLogins && this.#failedLogins.minute !== minute) this.#track(this.#storeSummary());
    const current = (this.#failedLogins ??= { minute, stored: 0, over: 0, addresses: new Set(), usernames: new Set() });
    if (current.stored < AUTH_FAILED_STORED_PER_MINUTE) {
      current.stored++;
      return true;
    }
    current.over++;
    if (event.ip && current.addresses.size < SUMMARY_DISTINCT_MAX) current.addresses.add(event.ip);
    if (event.account && current.usernames.size < SUMMARY_DISTINCT_MAX) current.usernames.add(event.account);
    // Written when the minute is over even if no other failure comes to trigger it.
    this.#summaryTimer ??= setTimeout(() => {
      this.#summaryTimer = undefined;
      this.#track(this.#storeSummary());
    }, (minute + 1) * 60_000 - Date.now() + 1000).unref();
    return false;
  }

  /** The summary of the failed logins not stored one by one, if there were any. */
  async #storeSummary(): Promise<void> {
    const done = this.#failedLogins;
    this.#failedLogins = undefined;
    clearTimeout(this.#summaryTimer);
    this.#summaryTimer = undefined;
    if (!done || done.over === 0) return;
    const from = new Date(done.minute * 60_000).toISOString().slice(11, 16);
    const atLeast = (set: Set<string>) => `${set.size >= SUMMARY_DISTINCT_MAX ? 'at least ' : ''}${set.size}`;
    const message =
      `${done.over} more failed AUTH in the minute from ${from} UTC, from ${atLeast(done.addresses)} addresses for ${atLeast(done.usernames)} usernames; ` +
      `not stored one by one (at most ${AUTH_FAILED_STORED_PER_MINUTE} a minute are), each is in the log`;
    this.#options.logger.warn({ event: 'security', kind: 'auth_failed', suppressed: done.over }, message);
    await this.#store({
      kind: 'auth_failed',
      at: (done.minute + 1) * 60_000 - 1,
      detail: { message, suppressed: done.over, addresses: done.addresses.size, usernames: done.usernames.size },
    });
  }

  #track(p: Promise<unknown>): void {
    this.#pending.add(p);
    p.finally(() => this.#pending.delete(p));
  }

  async #alert(event: NewSecurityEvent & { at: number }): Promise<void> {
    const { alerts } = this.#options.config;
    if (!alerts.admin_address && !alerts.webhook) return;
    const key = `${event.kind}:${event.account ?? event.ip ?? ''}`;
    const last = this.#lastAlert.get(key);
    if (last !== undefined && event.at - last < ALERT_QUIET_MS) return;
    this.#lastAlert.set(key, event.at);
    const tasks: Promise<unknown>[] = [];
    if (alerts.webhook) tasks.push(this.#postWebhook(alerts.webhook, event));
    if (alerts.admin_address) tasks.push(this.#mailAdmin(alerts.admin_address, event));
    await Promise.all(tasks);
  }

  async #postWebhook(url: string, event: NewSecurityEvent & { at: number }): Promise<void> {
    const { logger, config } = this.#options;
    try {
      const res = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'user-agent': 'Postern' },
        body: JSON.stringify({ source: config.hostname, ...event, at: new Date(event.at).toISOString() }),
        signal: AbortSignal.timeout(10_000),
      });
      if (!res.ok) logger.error({ event: 'alert_failed', via: 'webhook', status: res.status }, `alert webhook answered ${res.status}`);
    } catch (err) {
      logger.error({ event: 'alert_failed', via: 'webhook', err: (err as Error).message }, 'alert webhook failed');
    }
  }

  async #mailAdmin(to: string, event: NewSecurityEvent & { at: number }): Promise<void> {
    const { store, config, logger, onQueued } = this.#options;
    try {
      await enqueueLocalMessage(store, {
        build: (messageId) => {
          const lines = [
            `From: Postern <postmaster@${config.hostname}>`,
            `To: <${to}>`,
            `Subject: [Postern] ${event.kind.replace(/_/g, ' ')}${event.account ? ` for ${event.account}` : event.ip ? ` from ${event.ip}` : ''}`,
            `Date: ${formatRfc5322Date(new Date(event.at))}`,
            `Message-ID: <${messageId}>`,
            'Auto-Submitted: auto-generated',
            'MIME-Version: 1.0',
            'Content-Type: text/plain; charset=utf-8',
            'Content-Transfer-Encoding: 8bit',
            '',
            event.detail.message,
            '',
            `Time:     ${new Date(event.at).toISOString()}`,
            `Account:  ${event.account ?? '-'}`,
            `Address:  ${event.ip ?? '-'}`,
            `Listener: ${event.listener ?? '-'}`,
            '',
            `Details and earlier events: postern security events --since 1d`,
            '',
          ];
          return Buffer.from(lines.join('\r\n'), 'utf8');
        },
        sender: '',
        recipients: [to],
        hostname: config.hostname,
        now: event.at,
        lifetime: config.queue.lifetime,
        origin: { sessionId: 'alert', listener: 'alert', clientIp: '' },
      });
      onQueued?.();
    } catch (err) {
      logger.error({ event: 'alert_failed', via: 'mail', err: (err as Error).message }, 'cannot queue the alert mail');
    }
  }
}

interface FailedLoginMinute {
  /** Minutes since the epoch. */
  minute: number;
  stored: number;
  /** Failed logins past the share, summed up in one event. */
  over: number;
  addresses: Set<string>;
  usernames: Set<string>;
}
