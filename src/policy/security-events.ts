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

  constructor(options: SecurityEventsOptions) {
    this.#options = options;
  }

  /** Records the event; alerts go out in the background. */
  async record(event: NewSecurityEvent): Promise<void> {
    const at = event.at ?? Date.now();
    const { store, logger } = this.#options;
    logger.warn({ event: 'security', kind: event.kind, account: event.account, ip: event.ip, listener: event.listener, detail: event.detail }, event.detail.message);
    await store.recordSecurityEvent({ ...event, at }).catch((err: Error) => logger.error({ event: 'security_store_error', err: err.message }, 'cannot store security event'));
    if (ALERT_KINDS.has(event.kind)) this.#track(this.#alert({ ...event, at }));
  }

  /** Waits for alerts in flight (on shutdown and in tests). */
  async drain(): Promise<void> {
    await Promise.allSettled([...this.#pending]);
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
