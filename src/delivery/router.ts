// Maps a recipient domain to where its mail goes: a [[route]] from the configuration when one
// matches, else the domain's MX hosts. The answer is a DeliveryTarget plus a destination key; the
// queue runner groups a message's recipients by key so each destination gets one delivery (one
// transaction for all its recipients), and the connection pool shares connections and the
// per-destination cap by the same key.
//
// Route matching, most specific first: an exact domain ("example.com"), then the longest wildcard
// ("*.example.com" matches every subdomain, not example.com itself), then "*" (everything: a
// smarthost). Route hosts are looked up with the system resolver (getaddrinfo, so /etc/hosts and
// internal DNS names work); MX lookups use delivery.dns_servers when set.
import dns from 'node:dns/promises';
import net from 'node:net';
import type { Config } from '../config/load-config.js';
import type { ConnectionPool } from './connection-pool.js';
import { deliveryError } from './delivery-error.js';
import type { DeliveryTarget } from './delivery-target.js';
import type { MailHost, MxResolver } from './mx-resolver.js';
import { SmtpTarget } from './smtp-target.js';

type RouteConfig = Config['route'][number];

export interface Route {
  /** Recipients with the same key are delivered together, over the same connections. */
  key: string;
  target: DeliveryTarget;
}

export interface RouterOptions {
  config: Pick<Config, 'hostname' | 'delivery' | 'route'>;
  pool: ConnectionPool;
  resolver: MxResolver;
}

export class Router {
  readonly #options: RouterOptions;
  readonly #exact = new Map<string, RouteConfig>();
  /** [suffix with leading dot, route], longest suffix first. */
  readonly #wildcards: [string, RouteConfig][] = [];
  #catchAll: RouteConfig | undefined;
  /** One target per route (routes are few); MX targets are made per call (they are cheap). */
  readonly #routeTargets = new Map<RouteConfig, SmtpTarget>();

  constructor(options: RouterOptions) {
    this.#options = options;
    for (const route of options.config.route) {
      for (const domain of route.domains) {
        const d = domain.toLowerCase();
        if (d === '*') this.#catchAll ??= route;
        else if (d.startsWith('*.')) this.#wildcards.push([d.slice(1), route]);
        else if (!this.#exact.has(d)) this.#exact.set(d, route);
      }
    }
    this.#wildcards.sort((a, b) => b[0].length - a[0].length);
  }

  /** The route config that applies to `domain`, or undefined for MX delivery. */
  findRoute(domain: string): RouteConfig | undefined {
    const d = domain.toLowerCase();
    return this.#exact.get(d) ?? this.#wildcards.find(([suffix]) => d.endsWith(suffix))?.[1] ?? this.#catchAll;
  }

  route(domain: string): Route {
    const d = domain.toLowerCase();
    const configured = this.findRoute(d);
    const target = configured ? this.#routeTarget(configured) : this.#mxTarget(d);
    return { key: target.key, target };
  }

  #targetOptions() {
    const { config, pool } = this.#options;
    return {
      pool,
      heloName: config.hostname,
      connectTimeout: config.delivery.connect_timeout,
      commandTimeout: config.delivery.command_timeout,
    };
  }

  #mxTarget(domain: string): SmtpTarget {
    const { config, resolver } = this.#options;
    return new SmtpTarget(
      {
        key: `mx:${domain}`,
        description: `mx ${domain}`,
        name: domain,
        port: config.delivery.port,
        tls: config.delivery.tls,
        resolve: () => resolver.resolveMx(domain),
      },
      this.#targetOptions(),
    );
  }

  #routeTarget(route: RouteConfig): SmtpTarget {
    let target = this.#routeTargets.get(route);
    if (!target) {
      const name = net.isIPv6(route.host) ? `[${route.host}]:${route.port}` : `${route.host}:${route.port}`;
      target = new SmtpTarget(
        {
          key: `route:${name}`,
          description: `route ${name}`,
          name,
          port: route.port,
          tls: route.tls,
          resolve: () => resolveRouteHost(route.host),
        },
        this.#targetOptions(),
      );
      this.#routeTargets.set(route, target);
    }
    return target;
  }
}

/**
 * A route host is an address or a name for the system resolver. Failing to find it is always
 * temporary: it is a configuration or network problem, not a reason to bounce the mail.
 */
async function resolveRouteHost(host: string): Promise<MailHost[]> {
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
