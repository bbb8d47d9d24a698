// Decides where each recipient of a message goes: a [[route]] host, an [[upstream]] (a smarthost
// Postern logs in to), or the recipient domain's MX hosts. The answer is a DeliveryTarget plus a
// destination key; the queue runner groups a message's recipients by key so each destination gets
// one delivery (one transaction for all its recipients), and the connection pool shares
// connections and the per-destination cap by the same key. A message whose recipients go to
// several places is delivered to each of them, separately.
//
// The order, first match wins (docs/upstreams.md explains it to administrators):
//
//   1. The recipient's domain, from [[route]] `domains` and [[upstream_route]] `recipient_domains`
//      together: an exact domain ("example.com"), then the longest wildcard ("*.example.com"
//      matches every subdomain, not example.com itself). A domain may be claimed by one of the two
//      tables only (the configuration refuses a clash).
//   2. The authenticated account that submitted the message (`accounts`).
//   3. The envelope sender's domain (`sender_domains`), exact then longest wildcard. Bounces
//      (the null sender) have none and skip this step.
//   4. The default: [[upstream_route]] `default = true`, or a [[route]] with domains = ["*"]
//      (at most one of them).
//   5. Otherwise the recipient domain's MX hosts.
//
// Why this order. The recipient comes first because a destination's own needs are not optional:
// mail for an internal domain must go to the internal server whoever sends it, and a partner
// reached over a dedicated link is reached that way. That is Postfix's order too: transport_maps
// (recipient) wins over sender_dependent_relayhost_maps, which wins over relayhost. Between the
// two sender-side rules, the account is checked before the sender domain because it is the
// identity Postern verified (the envelope sender is only what the client claims) and because it
// is the narrower rule: "this scanner goes through the tenant it has a mailbox in" is an exception
// to "example.com goes through its ISP", as a full address is in Postfix's sender-dependent maps.
//
// Route hosts and upstream hosts are looked up with the system resolver (getaddrinfo, so
// /etc/hosts and internal DNS names work); MX lookups use delivery.dns_servers when set.
import type { Config } from '../config/load-config.js';
import type { SecurityEventSink } from '../store/store.js';
import type { Logger } from '../observe/logger.js';
import type { ConnectionPool } from './connection-pool.js';
import type { DeliveryTarget } from './delivery-target.js';
import type { MxResolver } from './mx-resolver.js';
import { SmtpTarget } from './smtp-target.js';
import { hostPortLabel, resolveStaticHost } from './static-host.js';
import { type UpstreamTarget, createUpstreamTargets } from './upstreams/upstreams.js';

type RouteConfig = Config['route'][number];

export interface Route {
  /** Recipients with the same key are delivered together, over the same connections. */
  key: string;
  target: DeliveryTarget;
}

/** What the router may know about the message besides the recipient. */
export interface MessageFacts {
  /** Envelope sender; '' for the null sender. */
  sender: string;
  /** The account that authenticated to submit it (none for relay connectors and bounces). */
  account?: string | undefined;
}

export type RouterConfig = Pick<Config, 'hostname' | 'delivery' | 'route'> &
  Partial<Pick<Config, 'upstream' | 'upstream_route' | 'file'>>;

export interface RouterOptions {
  config: RouterConfig;
  pool: ConnectionPool;
  resolver: MxResolver;
  /** Upstreams log configuration problems (refused credentials, untrusted certificates) here. */
  logger?: Logger;
  /** And report them, and mailboxes near a daily limit, as security events (alerts). */
  events?: SecurityEventSink;
}

type Destination = { route: RouteConfig } | { upstream: UpstreamTarget };

/** Exact names and "*.suffix" wildcards, looked up most specific first. */
class DomainTable<T> {
  readonly #exact = new Map<string, T>();
  /** [suffix with leading dot, value], longest suffix first. */
  readonly #wildcards: [string, T][] = [];

  /** The first entry for a name wins (routes have always behaved so). */
  add(pattern: string, value: T): void {
    const p = pattern.toLowerCase();
    if (p.startsWith('*.')) {
      if (!this.#wildcards.some(([suffix]) => suffix === p.slice(1))) this.#wildcards.push([p.slice(1), value]);
      this.#wildcards.sort((a, b) => b[0].length - a[0].length);
    } else if (!this.#exact.has(p)) {
      this.#exact.set(p, value);
    }
  }

  find(domain: string): T | undefined {
    const d = domain.toLowerCase();
    return this.#exact.get(d) ?? this.#wildcards.find(([suffix]) => d.endsWith(suffix))?.[1];
  }
}

export class Router {
  readonly #options: RouterOptions;
  /** [[route]] entries only, for findRoute. */
  readonly #routes = new DomainTable<RouteConfig>();
  #routeCatchAll: RouteConfig | undefined;
  readonly #recipients = new DomainTable<Destination>();
  readonly #accounts = new Map<string, UpstreamTarget>();
  readonly #senders = new DomainTable<UpstreamTarget>();
  #default: Destination | undefined;
  /** One target per route (routes are few); MX targets are made per call (they are cheap). */
  readonly #routeTargets = new Map<RouteConfig, SmtpTarget>();
  readonly #upstreams: Map<string, UpstreamTarget>;

  /** Reads the upstreams' secrets: throws a ConfigError when one cannot be read. */
  constructor(options: RouterOptions) {
    this.#options = options;
    const { config } = options;
    this.#upstreams = createUpstreamTargets(config.upstream ?? [], config.file, {
      ...this.#targetOptions(),
      ...(options.logger ? { logger: options.logger } : {}),
      ...(options.events ? { events: options.events } : {}),
    });

    for (const route of config.route) {
      for (const domain of route.domains) {
        if (domain === '*') {
          this.#routeCatchAll ??= route;
          continue;
        }
        this.#routes.add(domain, route);
        this.#recipients.add(domain, { route });
      }
    }
    if (this.#routeCatchAll) this.#default = { route: this.#routeCatchAll };

    for (const rule of config.upstream_route ?? []) {
      const upstream = this.#upstreams.get(rule.upstream.toLowerCase());
      // The configuration checks every rule names an upstream; a hand-built config may not.
      if (!upstream) throw new Error(`upstream_route names an unknown upstream "${rule.upstream}"`);
      for (const domain of rule.recipient_domains ?? []) this.#recipients.add(domain, { upstream });
      for (const account of rule.accounts ?? []) if (!this.#accounts.has(account.toLowerCase())) this.#accounts.set(account.toLowerCase(), upstream);
      for (const domain of rule.sender_domains ?? []) this.#senders.add(domain, upstream);
      if (rule.default) this.#default ??= { upstream };
    }
  }

  /** The [[route]] that applies to `domain` (upstream rules aside), or undefined. */
  findRoute(domain: string): RouteConfig | undefined {
    return this.#routes.find(domain) ?? this.#routeCatchAll;
  }

  /** Where a recipient at `domain` goes, for a message with these facts (see the order above). */
  route(domain: string, message?: MessageFacts): Route {
    const d = domain.toLowerCase();
    const chosen = this.#choose(d, message);
    if (!chosen) {
      const target = this.#mxTarget(d);
      return { key: target.key, target };
    }
    const target = 'upstream' in chosen ? chosen.upstream : this.#routeTarget(chosen.route);
    return { key: target.key, target };
  }

  #choose(domain: string, message: MessageFacts | undefined): Destination | undefined {
    const byRecipient = this.#recipients.find(domain);
    if (byRecipient) return byRecipient;
    const account = message?.account?.toLowerCase();
    const byAccount = account ? this.#accounts.get(account) : undefined;
    if (byAccount) return { upstream: byAccount };
    const at = message?.sender.lastIndexOf('@') ?? -1;
    const senderDomain = at >= 0 ? message!.sender.slice(at + 1) : '';
    const bySender = senderDomain ? this.#senders.find(senderDomain) : undefined;
    if (bySender) return { upstream: bySender };
    return this.#default;
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
      const name = hostPortLabel(route.host, route.port);
      target = new SmtpTarget(
        {
          key: `route:${name}`,
          description: `route ${name}`,
          name,
          port: route.port,
          tls: route.tls,
          resolve: () => resolveStaticHost(route.host),
        },
        this.#targetOptions(),
      );
      this.#routeTargets.set(route, target);
    }
    return target;
  }
}
