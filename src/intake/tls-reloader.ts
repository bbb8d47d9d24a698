// Certificate renewal without a restart: when the cert or key file changes (certbot, an ACME
// client, an admin copying files) or on SIGHUP, the pair is read again and, if it is valid, used
// for every new TLS handshake. Connections already open keep the session they have. A bad pair
// (half-written, mismatched, expired) is logged and the old one stays in use.
import fs from 'node:fs';
import type { Logger } from '../observe/logger.js';
import { type TlsMaterial, expiresSoon, loadTlsMaterial } from './tls-material.js';

export interface TlsReloaderOptions {
  certFile: string;
  keyFile: string;
  logger: Logger;
  /** Applies a new pair to the listeners. */
  apply(material: Omit<TlsMaterial, 'generated'>): void;
  /** How often the files are polled, in ms. Polling survives the rename-over that renewals do. */
  intervalMs?: number;
}

export class TlsReloader {
  readonly #options: TlsReloaderOptions;
  #timer: NodeJS.Timeout | undefined;

  constructor(options: TlsReloaderOptions) {
    this.#options = options;
  }

  start(): void {
    const interval = this.#options.intervalMs ?? 2000;
    const onChange = (curr: fs.Stats, prev: fs.Stats) => {
      if (curr.mtimeMs === prev.mtimeMs && curr.size === prev.size && curr.ino === prev.ino) return;
      // Both files usually change within a moment of each other: wait for the second.
      clearTimeout(this.#timer);
      this.#timer = setTimeout(() => this.reload('file changed'), 300);
    };
    fs.watchFile(this.#options.certFile, { interval, persistent: false }, onChange);
    fs.watchFile(this.#options.keyFile, { interval, persistent: false }, onChange);
  }

  stop(): void {
    clearTimeout(this.#timer);
    fs.unwatchFile(this.#options.certFile);
    fs.unwatchFile(this.#options.keyFile);
  }

  /** Reads the pair and applies it if valid. Returns true when the new pair is in use. */
  reload(reason: string): boolean {
    const { certFile, keyFile, logger, apply } = this.#options;
    let material: Omit<TlsMaterial, 'generated'>;
    try {
      material = loadTlsMaterial(certFile, keyFile);
    } catch (err) {
      logger.error({ event: 'tls_reload_failed', reason, err: (err as Error).message }, 'certificate not reloaded; the previous one stays in use');
      return false;
    }
    apply(material);
    const days = expiresSoon(material);
    logger.info({ event: 'tls_reloaded', reason, subject: material.subject, validTo: material.validTo.toISOString() }, 'certificate reloaded');
    if (days !== null) logger.warn({ event: 'tls_expiring', daysLeft: days, validTo: material.validTo.toISOString() }, `the TLS certificate expires in ${days} days`);
    return true;
  }
}
