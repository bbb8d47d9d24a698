// The host list of a destination configured by name or address (a [[route]], an [[upstream]]),
// as opposed to one found through MX records.
import dns from 'node:dns/promises';
import net from 'node:net';
import { deliveryError } from './delivery-error.js';
import type { MailHost } from './mx-resolver.js';

/**
 * An address, or a name for the system resolver (getaddrinfo, so /etc/hosts and internal DNS
 * names work). Failing to find it is always temporary: it is a configuration or network problem,
 * not a reason to bounce the mail.
 */
export async function resolveStaticHost(host: string): Promise<MailHost[]> {
  const literal = host.replace(/^\[(.*)\]$/, '$1');
  if (net.isIPv4(literal)) return [{ exchange: literal, priority: 0, A: [literal], AAAA: [] }];
  if (net.isIPv6(literal)) return [{ exchange: literal, priority: 0, A: [], AAAA: [literal] }];
  try {
    const found = await dns.lookup(host, { all: true });
    return [
      {
        exchange: host,
        priority: 0,
        A: found.filter((a) => a.family === 4).map((a) => a.address),
        AAAA: found.filter((a) => a.family === 6).map((a) => a.address),
      },
    ];
  } catch (err) {
    throw deliveryError('DNS_TEMPORARY', { name: host, reason: (err as NodeJS.ErrnoException).code ?? (err as Error).message });
  }
}

/** "host:port", "[v6]:port": for keys and messages. */
export function hostPortLabel(host: string, port: number): string {
  const literal = host.replace(/^\[(.*)\]$/, '$1');
  return net.isIPv6(literal) ? `[${literal}]:${port}` : `${host}:${port}`;
}
