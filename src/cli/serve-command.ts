// `postern serve`: start everything, print a summary a person can act on, stop cleanly on
// SIGTERM/SIGINT. Logs (JSON lines) go to stdout; the human summary goes to stderr.
import type { Command } from 'commander';
import type { Config } from '../config/load-config.js';
import type { BoundListener } from '../intake/intake.js';
import { expiresSoon } from '../intake/tls-material.js';
import { createLogger } from '../observe/logger.js';
import { type Postern, startPostern } from '../postern.js';
import { deliversInThread } from '../queue/delivery-thread.js';
import { MemoryRelief } from '../runtime/memory-relief.js';
import { capYoungGeneration } from '../runtime/young-generation.js';
import { configFor } from './cli-context.js';

/**
 * Young generation cap for the server (both semi-spaces, 2 MB each): see young-generation.ts.
 * Until 2026-11-29 this read 8 MB, but an off-by-one in the cap stopped the growth at 4 MB, which
 * is what every figure in docs/benchmarks.md was measured with. 8 MB for real halved the time in
 * scavenges under load (550 to 250 ms per 5 s at 2,000 messages/s), but the 35 MiB message then
 * raised RSS by 10 to 19 MB in three runs against 3 to 8 MB, too close to its 20 MB target.
 */
const YOUNG_GENERATION_BYTES = 4 * 1024 * 1024;

export function registerServeCommand(program: Command): void {
  program
    .command('serve')
    .description('run the SMTP listeners and the delivery queue')
    .action(async (_opts: unknown, cmd: Command) => {
      const config = configFor(cmd);
      const logger = createLogger({ level: process.env.POSTERN_LOG_LEVEL ?? config.log.level });
      // Handlers first: a SIGTERM that arrives while starting must still stop cleanly.
      const signalled = new Promise<string>((resolve) => {
        process.once('SIGTERM', () => resolve('SIGTERM'));
        process.once('SIGINT', () => resolve('SIGINT'));
      });
      const postern = await startPostern(config, logger, { deliveryThread: deliversInThread(config.delivery.thread) });
      capYoungGeneration(YOUNG_GENERATION_BYTES);
      // With delivery in a thread of its own, that thread relieves its own store connection.
      const relief = new MemoryRelief({ logger, releaseCaches: () => postern.store.releaseMemory?.() });
      relief.start();
      process.on('SIGHUP', () => postern.reloadTls());
      process.stderr.write(await summary(postern));
      const signal = await signalled;
      logger.info({ event: 'signal', signal }, `${signal} received`);
      relief.stop();
      await postern.stop().catch((err: Error) => logger.error({ err: err.message }, 'error while stopping'));
      logger.flush();
    });
}

function describeListener(l: BoundListener, config: Config): string {
  const where = `${l.host.includes(':') ? `[${l.host}]` : l.host}:${l.port}`;
  const what = {
    submission: 'STARTTLS, then AUTH (PLAIN/LOGIN) required',
    smtps: 'implicit TLS, AUTH (PLAIN/LOGIN) required',
    relay:
      config.connector.length > 0
        ? `no AUTH; accepts mail from connectors: ${config.connector.map((c) => `${c.name} (${c.networks.join(', ')})`).join('; ')}`
        : 'no AUTH; no connectors configured, so every recipient is refused',
  }[l.kind];
  const fallback = l.fellBackFrom
    ? `\n      port ${l.fellBackFrom} needs privileges; using ${l.port}. For ${l.fellBackFrom}: run as root, or \`sudo setcap cap_net_bind_service=+ep "$(command -v node)"\`, or set [listen] in postern.toml`
    : '';
  const legacy = l.legacy ? '\n      LEGACY: passwords without TLS and TLS 1.0/1.1 are accepted here; keep it on a trusted LAN' : '';
  return `  ${l.kind.padEnd(11)} ${where.padEnd(22)} ${what}${fallback}${legacy}`;
}

async function summary(p: Postern): Promise<string> {
  const { config, tls, listeners } = p;
  const accounts = await p.store.listAccounts();
  const lines = [
    `Postern ready as ${config.hostname} (config: ${config.file ?? 'built-in defaults'})`,
    `  store       SQLite in ${config.dataDir}`,
    ...listeners.map((l) => describeListener(l, config)),
  ];
  if (config.listen.http) lines.push(`  http        ${config.listen.http.host}:${config.listen.http.port} is configured; the admin API and console are not part of this version yet`);
  lines.push(
    tls.generated
      ? `  TLS         generated a self-signed certificate for ${config.hostname} in ${config.tls.certFile}; devices that verify certificates need one from a CA (set [tls] cert/key)`
      : `  TLS         ${tls.subject}, valid until ${tls.validTo.toISOString().slice(0, 10)}${expiresSoon(tls) !== null ? ` (expires in ${expiresSoon(tls)} days: renew it; Postern reloads the files when they change)` : ''}`,
  );
  const routes = config.route.map((r) => `${r.domains.join(',')} -> ${r.host}:${r.port}`);
  const rules = config.upstream_route.map((r) => {
    const what = r.default
      ? 'everything else'
      : r.recipient_domains
        ? `to ${r.recipient_domains.join(',')}`
        : r.accounts
          ? `from accounts ${r.accounts.join(',')}`
          : `from ${(r.sender_domains ?? []).join(',')}`;
    return `${what} -> upstream ${r.upstream}`;
  });
  const catchAll = config.upstream_route.some((r) => r.default) || config.route.some((r) => r.domains.includes('*'));
  const parts = [...(routes.length ? [`routes: ${routes.join('; ')}`] : []), ...rules, ...(catchAll ? [] : ['other domains by MX'])];
  lines.push(`  delivery    ${parts.join('; ')}`);
  if (accounts.length === 0) {
    lines.push('', 'No accounts yet. Add the first one (in another terminal):', '  npx postern account add printer@example.com --generate');
  } else {
    lines.push(`  accounts    ${accounts.length}`);
  }
  return `${lines.join('\n')}\n`;
}
