// One running Postern: store, intake listeners and the queue runner, started and stopped in order.
// Stop order matters: first no new mail (listeners close, sessions in DATA may finish), then the
// deliveries finish or are released back to the queue, then the store closes cleanly.
import { Authenticator } from './accounts/authenticator.js';
import type { Config } from './config/load-config.js';
import { type BoundListener, Intake } from './intake/intake.js';
import { type TlsMaterial, expiresSoon, loadOrCreateTlsMaterial } from './intake/tls-material.js';
import { TlsReloader } from './intake/tls-reloader.js';
import type { Logger } from './observe/logger.js';
import { SecurityEvents } from './policy/security-events.js';
import { SessionPolicy } from './policy/session-policy.js';
import { DeliveryThread } from './queue/delivery-thread.js';
import { QueueRunner } from './queue/queue-runner.js';
import { openStore } from './store/open-store.js';
import type { Store } from './store/store.js';

export interface Postern {
  config: Config;
  store: Store;
  intake: Intake;
  events: SecurityEvents;
  /** Reads the certificate files again (SIGHUP); true when the new pair is in use. */
  reloadTls(): boolean;
  listeners: BoundListener[];
  tls: TlsMaterial;
  stop(): Promise<void>;
}

export interface StartOptions {
  /** How long sessions and deliveries in progress get to finish on stop. */
  stopGraceMs?: number;
  /**
   * Run the queue runner in a worker thread (queue/delivery-thread.ts); `postern serve` does when
   * `[delivery] thread` says so (by default, on two cores or more). Needs the compiled code
   * (dist/): tests that run from the TypeScript sources deliver in this thread; the tests that run
   * `postern serve` (test/delivery-thread.test.ts and others) get the thread.
   */
  deliveryThread?: boolean;
}

/** What startPostern needs of the delivery side, in this thread or its own. */
interface Deliveries {
  start(): Promise<void>;
  notify(): void;
  stop(graceMs: number): Promise<void>;
}

export async function startPostern(config: Config, logger: Logger, options: StartOptions = {}): Promise<Postern> {
  // With a delivery thread, its connection checkpoints the WAL; this one keeps the SMTP sessions.
  const store = await openStore(config.dataDir, { checkpoints: !options.deliveryThread });
  let intake: Intake | undefined;
  let runner: Deliveries | undefined;
  try {
    const tls = await loadOrCreateTlsMaterial(config.tls.certFile, config.tls.keyFile, config.hostname);
    // Alert mails are queued; the runner (made next) is woken for them.
    const events = new SecurityEvents({ store, logger, config, onQueued: () => runner?.notify() });
    runner = options.deliveryThread ? new DeliveryThread({ config, logger }) : new QueueRunner({ store, config, logger, events });
    await runner.start();
    const queueRunner = runner;
    const started = (intake = new Intake({
      policy: new SessionPolicy(config, store, events),
      config,
      store,
      authenticator: new Authenticator(store, { cacheTtlMs: config.auth.cache_ttl }),
      logger,
      tls,
      onQueued: () => queueRunner.notify(),
    }));
    const listeners = await intake.start();
    const reloader = new TlsReloader({
      certFile: config.tls.certFile,
      keyFile: config.tls.keyFile,
      logger,
      apply: (material) => started.updateTls(material),
    });
    reloader.start();
    const daysLeft = expiresSoon(tls);
    if (daysLeft !== null) logger.warn({ event: 'tls_expiring', daysLeft, validTo: tls.validTo.toISOString() }, `the TLS certificate expires in ${daysLeft} days`);
    for (const l of listeners) {
      logger.info({ event: 'listening', listener: l.kind, host: l.host, port: l.port, legacy: l.legacy }, `${l.kind} listening`);
      if (l.legacy) {
        logger.warn(
          { event: 'legacy_listener', listener: l.kind, host: l.host, port: l.port },
          `${l.kind} on ${l.host}:${l.port} is a legacy listener: AUTH without TLS and TLS 1.0/1.1 are allowed there`,
        );
      }
    }
    const grace = options.stopGraceMs ?? 10_000;
    let stopping: Promise<void> | undefined;
    return {
      config,
      store,
      intake: started,
      events,
      reloadTls: () => reloader.reload('SIGHUP'),
      listeners,
      tls,
      stop() {
        stopping ??= (async () => {
          logger.info({ event: 'stopping' }, 'stopping: no new connections');
          reloader.stop();
          await started.close(grace);
          await events.drain();
          await queueRunner.stop(grace);
          await store.close();
          logger.info({ event: 'stopped' }, 'stopped');
        })();
        return stopping;
      },
    };
  } catch (err) {
    await intake?.close(0).catch(() => undefined);
    await runner?.stop(0).catch(() => undefined);
    await store.close().catch(() => undefined);
    throw err;
  }
}
