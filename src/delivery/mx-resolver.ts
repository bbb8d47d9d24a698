// Finds where mail for a domain goes: MX hosts in preference order, each with every IPv4 and IPv6
// address. We resolve ourselves (node:dns, with `delivery.dns_servers` when set) instead of letting
// mx-connect do it, because mx-connect neither recognises a null MX nor asks for A and AAAA
// together; the resolved list is then handed to mx-connect, which only connects.
//
// The answers decide whether a recipient is retried or bounced, so the mapping is explicit:
//   NXDOMAIN for the domain               -> permanent (5.1.2), the domain does not exist
//   a single MX "." (RFC 7505 null MX)    -> permanent (5.1.10), the domain takes no mail
//   no MX records (NODATA)                -> implicit MX: the domain's own A/AAAA (RFC 5321 5.1)
//   no MX and no address                  -> permanent (5.4.4)
//   SERVFAIL, timeout, refused            -> temporary (4.4.3), try again later
import { Resolver } from 'node:dns/promises';
import net from 'node:net';
import { deliveryError } from './delivery-error.js';

/** One mail server with its addresses; the shape mx-connect's `mx` option takes. */
export interface MailHost {
  exchange: string;
  priority: number;
  A: string[];
  AAAA: string[];
}

export interface MxResolverOptions {
  /** DNS servers to ask instead of the system's (`delivery.dns_servers`). */
  servers?: { host: string; port: number }[];
  /** Per-try timeout in ms (default 5000). */
  timeout?: number;
  /** Tries per query (default 2). */
  tries?: number;
  /** Most MX hosts looked at (default 10), so a domain listing fifty cannot make us do 100 lookups. */
  maxHosts?: number;
}

/** DNS error codes that mean "the name or the record type does not exist": definitive answers. */
const NOT_FOUND = new Set(['ENOTFOUND']);
const NO_DATA = new Set(['ENODATA']);

export class MxResolver {
  readonly #resolver: Resolver;
  readonly #maxHosts: number;

  constructor(options: MxResolverOptions = {}) {
    this.#resolver = new Resolver({ timeout: options.timeout ?? 5000, tries: options.tries ?? 2 });
    if (options.servers?.length) {
      this.#resolver.setServers(
        options.servers.map((s) => (net.isIPv6(s.host) ? `[${s.host}]:${s.port}` : `${s.host}:${s.port}`)),
      );
    }
    this.#maxHosts = options.maxHosts ?? 10;
  }

  /**
   * The mail hosts for `domain`, most preferred first, each with at least one address.
   * Throws a DeliveryError (temporary or permanent) when there is nowhere to deliver.
   */
  async resolveMx(domain: string): Promise<MailHost[]> {
    const literal = addressLiteral(domain);
    if (literal) return [literal];

    let records: { exchange: string; priority: number }[];
    try {
      records = await this.#resolver.resolveMx(domain);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (NOT_FOUND.has(code)) throw deliveryError('NO_SUCH_DOMAIN', { domain });
      if (NO_DATA.has(code)) return this.#implicitMx(domain);
      throw deliveryError('DNS_TEMPORARY', { name: `${domain} (MX)`, reason: describeDnsError(err) });
    }
    if (records.length === 0) return this.#implicitMx(domain);
    // node returns the root name "." as ''. RFC 7505: a null MX is the only record; if a domain
    // mixes it with real MX records, the real ones are used.
    const real = records.filter((r) => r.exchange !== '' && r.exchange !== '.');
    if (real.length === 0) throw deliveryError('NULL_MX', { domain });

    const ordered = sortByPreference(real).slice(0, this.#maxHosts);
    const resolved = await Promise.all(ordered.map((r) => this.#addresses(r.exchange)));
    const hosts: MailHost[] = [];
    let temporary: { name: string; reason: string } | undefined;
    ordered.forEach((r, i) => {
      const { A, AAAA, temporaryError } = resolved[i]!;
      if (A.length || AAAA.length) hosts.push({ exchange: r.exchange.toLowerCase(), priority: r.priority, A, AAAA });
      else if (temporaryError && !temporary) temporary = { name: r.exchange, reason: temporaryError };
    });
    if (hosts.length > 0) return hosts;
    if (temporary) throw deliveryError('DNS_TEMPORARY', { name: temporary.name, reason: temporary.reason });
    throw deliveryError('NO_MX_ADDRESS', { domain, hosts: ordered.map((r) => r.exchange).join(', ') });
  }

  /** RFC 5321 5.1: with no MX records the domain itself is the mail host. */
  async #implicitMx(domain: string): Promise<MailHost[]> {
    const { A, AAAA, temporaryError, nxdomain } = await this.#addresses(domain);
    if (A.length || AAAA.length) return [{ exchange: domain, priority: 0, A, AAAA }];
    if (temporaryError) throw deliveryError('DNS_TEMPORARY', { name: domain, reason: temporaryError });
    if (nxdomain) throw deliveryError('NO_SUCH_DOMAIN', { domain });
    throw deliveryError('NO_MAIL_HOST', { domain });
  }

  /** A and AAAA of one name, asked together. A temporary failure of one family is remembered. */
  async #addresses(name: string): Promise<{ A: string[]; AAAA: string[]; temporaryError?: string; nxdomain: boolean }> {
    if (net.isIP(name)) {
      return net.isIPv4(name) ? { A: [name], AAAA: [], nxdomain: false } : { A: [], AAAA: [name], nxdomain: false };
    }
    let temporaryError: string | undefined;
    let nxdomain = false;
    const lookup = async (type: 'A' | 'AAAA'): Promise<string[]> => {
      try {
        return type === 'A' ? await this.#resolver.resolve4(name) : await this.#resolver.resolve6(name);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? '';
        if (NOT_FOUND.has(code)) nxdomain = true;
        else if (!NO_DATA.has(code)) temporaryError ??= `${type}: ${describeDnsError(err)}`;
        return [];
      }
    };
    const [A, AAAA] = await Promise.all([lookup('A'), lookup('AAAA')]);
    return { A, AAAA, temporaryError, nxdomain };
  }
}

/** "[192.0.2.1]" or "[IPv6:2001:db8::1]" as a recipient domain: deliver to that address. */
function addressLiteral(domain: string): MailHost | null {
  const m = /^\[(?:ipv6:)?([^\]]+)\]$/i.exec(domain);
  if (!m || !net.isIP(m[1]!)) return null;
  const ip = m[1]!;
  return { exchange: ip, priority: 0, A: net.isIPv4(ip) ? [ip] : [], AAAA: net.isIPv6(ip) ? [ip] : [] };
}

/** Lowest preference first; equal preferences in random order (RFC 5321 5.1) to spread load. */
function sortByPreference<T extends { priority: number }>(records: T[]): T[] {
  const shuffled = records.map((r) => ({ r, k: Math.random() }));
  shuffled.sort((a, b) => a.r.priority - b.r.priority || a.k - b.k);
  return shuffled.map((s) => s.r);
}

function describeDnsError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case 'ESERVFAIL':
      return 'SERVFAIL';
    case 'ETIMEOUT':
      return 'timeout';
    case 'ECONNREFUSED':
      return 'DNS server refused the connection';
    case 'EREFUSED':
      return 'query refused';
    default:
      return code ?? (err as Error).message;
  }
}
