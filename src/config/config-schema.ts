// The shape of postern.toml. Every object is strict: an unknown key is a typo until proven
// otherwise, and a relay that silently ignores `[limts]` is worse than one that refuses to start.
import net from 'node:net';
import { z } from 'zod';

const MB = 1024 * 1024;

/** "host:port", "[v6]:port" or ":port" (all interfaces). */
export const listenAddress = z.string().transform((value, ctx) => {
  const parsed = parseListenAddress(value);
  if (!parsed) {
    ctx.addIssue({ code: 'custom', message: `expected "host:port" (for example "127.0.0.1:2587" or ":587"), got "${value}"` });
    return z.NEVER;
  }
  return parsed;
});

export interface ListenAddress {
  host: string;
  port: number;
  /** Old-device profile: AUTH without TLS and TLS 1.0/1.1 allowed (LAN addresses only). */
  legacy?: boolean;
}

/** Loopback, RFC 1918, CGNAT, link-local and unique-local addresses: never reachable from the internet. */
export function isNonPublicAddress(host: string): boolean {
  const list = new net.BlockList();
  for (const [a, b] of [['127.0.0.0', 8], ['10.0.0.0', 8], ['172.16.0.0', 12], ['192.168.0.0', 16], ['100.64.0.0', 10], ['169.254.0.0', 16]] as const) {
    list.addSubnet(a, b, 'ipv4');
  }
  for (const [a, b] of [['::1', 128], ['fc00::', 7], ['fe80::', 10]] as const) list.addSubnet(a, b, 'ipv6');
  const family = net.isIPv4(host) ? 'ipv4' : net.isIPv6(host) ? 'ipv6' : null;
  return family !== null && list.check(host, family);
}

export function parseListenAddress(value: string): ListenAddress | null {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(value.trim());
  if (!m) return null;
  const host = m[1] ?? m[2] ?? '';
  const port = Number(m[3]);
  // Port 0 asks the OS for a free port (tests use it; the start-up summary shows the real one).
  if (port > 65535) return null;
  if (m[1] && !net.isIPv6(m[1])) return null;
  return { host: host || '::', port };
}

/** A listener: "host:port", or { address = "host:port", legacy = true } for old devices. */
const listenerTable = z.strictObject({ address: listenAddress, legacy: z.boolean().default(false) });

// Not z.union: its errors say only "Invalid input"; this names the key and the reason.
const listener = z.unknown().transform((value, ctx): ListenAddress => {
  if (typeof value === 'string') {
    const parsed = parseListenAddress(value);
    if (parsed) return parsed;
    ctx.addIssue({ code: 'custom', message: `expected "host:port" (for example "127.0.0.1:2587" or ":587"), got "${value}"` });
    return z.NEVER;
  }
  const table = listenerTable.safeParse(value);
  if (!table.success) {
    for (const issue of table.error.issues) ctx.addIssue({ ...issue, path: issue.path } as never);
    return z.NEVER;
  }
  const { address, legacy } = table.data;
  if (legacy && !isNonPublicAddress(address.host)) {
    ctx.addIssue({
      code: 'custom',
      message: `legacy = true allows passwords without TLS, so it needs a loopback or private LAN address (such as 192.168.1.10:587), not "${address.host}"`,
    });
    return z.NEVER;
  }
  return { ...address, legacy };
});

const cidr = z.string().refine(
  (value) => {
    const [addr, bits, extra] = value.split('/');
    if (extra !== undefined || !addr) return false;
    const family = net.isIP(addr);
    if (!family) return false;
    if (bits === undefined) return true;
    const n = Number(bits);
    return /^\d+$/.test(bits) && n >= 0 && n <= (family === 4 ? 32 : 128);
  },
  { message: 'expected an IP network such as "192.168.1.0/24" or a single address' },
);

const duration = z
  .string()
  .regex(/^\d+(ms|s|m|h|d)$/, 'expected a duration such as "500ms", "30s", "5m", "1h" or "5d"')
  .transform((value) => {
    const m = /^(\d+)(ms|s|m|h|d)$/.exec(value)!;
    const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 'ms' | 's' | 'm' | 'h' | 'd'];
    return Number(m[1]) * unit;
  });

/** "host" or "host:port" (an IPv6 address in brackets), `defaultPort` when none is given. */
const hostPort = (defaultPort: number) =>
  z.string().transform((value, ctx) => {
    const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]+))(?::(\d{1,5}))?$/.exec(value.trim());
    const p = m?.[3] ? Number(m[3]) : defaultPort;
    if (!m || p < 1 || p > 65535) {
      ctx.addIssue({ code: 'custom', message: `expected "host" or "host:port", got "${value}"` });
      return z.NEVER;
    }
    return { host: (m[1] ?? m[2])!, port: p };
  });

const domainName = z
  .string()
  .min(1)
  .transform((d) => d.toLowerCase().replace(/\.$/, ''))
  .refine((d) => /^[a-z0-9*]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(d), {
    message: 'expected a domain name such as "example.com"',
  });

const port = z.number().int().min(1).max(65535);

// ---- upstreams ---------------------------------------------------------------------------
//
// An [[upstream]] is a server Postern hands mail to instead of the recipients' MX hosts, logging
// in as itself: a smarthost, or (later) Microsoft 365 or Google with OAuth2. The table is a
// discriminated union on `type`, so each kind has its own strict set of keys; adding a kind means
// adding its schema to UPSTREAM_SCHEMAS and a target in src/delivery/upstreams/.
//
// Secrets are never in this file: password_file or password_env name where the password is, and
// the delivery side reads it at start-up (src/config/secret.ts). A configuration file gets copied
// into tickets, backups and repositories; a password in it goes wherever the file goes.

const upstreamName = z
  .string()
  .regex(/^[a-z0-9][a-z0-9_-]{0,62}$/i, 'expected a short name of letters, digits, "-" and "_" (it appears in logs and rules), such as "isp"');

const envName = z
  .string()
  .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected the name of an environment variable, such as "POSTERN_ISP_PASSWORD"');

const INLINE_PASSWORD =
  'a password is never written in the configuration file (the file gets copied, shared and backed up; the password would go with it): put it in a file readable only by Postern and set password_file = "secrets/NAME.pass", or set password_env = "VARIABLE"';

const smtpUpstream = z
  .strictObject({
    type: z.literal('smtp'),
    name: upstreamName,
    host: z.string().min(1),
    /** Default: 587 with starttls, 465 with implicit, 25 with none. */
    port: port.optional(),
    tls: z.enum(['starttls', 'implicit', 'none']).default('starttls'),
    username: z.string().min(1).optional(),
    /** Relative to the configuration file's directory. */
    password_file: z.string().min(1).optional(),
    password_env: envName.optional(),
    /** Only so that a password written here gets the sentence below instead of "unknown key". */
    password: z.unknown().optional(),
    verify_certificate: z.boolean().default(true),
    /** PEM file of the CA (or the certificate itself) to trust for this upstream instead of the public CAs. */
    ca_file: z.string().min(1).optional(),
    /** Connections at once to this upstream (default: delivery.per_destination). */
    max_connections: z.number().int().positive().optional(),
    fallback: upstreamName.optional(),
  })
  .superRefine((u, ctx) => {
    if (u.password !== undefined) ctx.addIssue({ code: 'custom', path: ['password'], message: INLINE_PASSWORD });
    if (u.password_file !== undefined && u.password_env !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['password_env'], message: 'set password_file or password_env, not both' });
    }
    const hasPassword = u.password_file !== undefined || u.password_env !== undefined;
    if (u.username !== undefined && !hasPassword && u.password === undefined) {
      ctx.addIssue({ code: 'custom', path: ['username'], message: 'a username needs password_file or password_env' });
    }
    if (u.username === undefined && hasPassword) {
      ctx.addIssue({ code: 'custom', path: ['username'], message: 'password_file/password_env is set but username is missing' });
    }
    if (u.tls === 'none' && u.username !== undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['tls'],
        message: 'tls = "none" would send the password unencrypted; use "starttls" or "implicit" (or drop username if the upstream relays for Postern without AUTH)',
      });
    }
    if (u.tls === 'none' && u.ca_file !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['ca_file'], message: 'ca_file has no effect with tls = "none"' });
    }
  })
  .transform(({ password: _inline, ...u }) => ({ ...u, port: u.port ?? { starttls: 587, implicit: 465, none: 25 }[u.tls] }));

/**
 * Sending limits of one upstream identity (a mailbox), kept by Postern before the provider has to
 * refuse anything (src/delivery/upstreams/send-limits.ts). Each kind sets its provider's defaults.
 */
type LimitDefaults = { messages_per_minute?: number; messages_per_day?: number; recipients_per_day?: number; requests_per_10_minutes?: number; connections: number };

const rawLimits = z
  .strictObject({
    messages_per_minute: z.number().positive().optional(),
    messages_per_day: z.number().positive().optional(),
    recipients_per_day: z.number().positive().optional(),
    /** Microsoft Graph: API requests per mailbox in any 10 minutes. */
    requests_per_10_minutes: z.number().positive().optional(),
    /** SMTP connections (Graph: requests) at once per mailbox. */
    connections: z.number().int().positive().optional(),
    /**
     * For tests and benchmarks against a stand-in: every window is multiplied by this (0.01
     * makes "a minute" 600 ms). Never below 0.001.
     */
    time_scale: z.number().min(0.001).max(1).default(1),
  })
  .default({ time_scale: 1 });

/** The limits as configured, the provider's defaults filling what is not. */
function withDefaults(l: z.output<typeof rawLimits>, defaults: LimitDefaults) {
  return {
    messages_per_minute: l.messages_per_minute ?? defaults.messages_per_minute,
    messages_per_day: l.messages_per_day ?? defaults.messages_per_day,
    recipients_per_day: l.recipients_per_day ?? defaults.recipients_per_day,
    requests_per_10_minutes: l.requests_per_10_minutes ?? defaults.requests_per_10_minutes,
    connections: l.connections ?? defaults.connections,
    time_scale: l.time_scale,
  };
}

/** Exchange Online's limits: SMTP submission per mailbox; Graph per app and mailbox. */
const MICROSOFT_SMTP_LIMITS: LimitDefaults = { messages_per_minute: 30, recipients_per_day: 10_000, connections: 3 };
const MICROSOFT_GRAPH_LIMITS: LimitDefaults = { requests_per_10_minutes: 10_000, recipients_per_day: 10_000, connections: 4 };
/** Google Workspace's per user: 2,000 messages and 10,000 recipients a day. */
const GOOGLE_LIMITS: LimitDefaults = { messages_per_day: 2_000, recipients_per_day: 10_000, connections: 3 };

const httpsUrl = z.url({ protocol: /^https$/, error: 'expected an https:// URL (credentials are only sent over TLS)' });

const mailboxAddress = z.string().regex(/^[^@\s]+@[^@\s]+$/, 'expected a mailbox address such as "relay@contoso.com"');

/** Keys every OAuth2 upstream shares. */
const oauthUpstreamKeys = {
  name: upstreamName,
  /**
   * Another upstream for the mail this one cannot send because of its configuration (refused
   * credentials, SMTP AUTH switched off, a missing permission): Graph when SMTP is refused, say.
   */
  fallback: upstreamName.optional(),
  /**
   * Send all mail as this mailbox (it needs SendAs rights on the senders it sends for). Default:
   * each message as its envelope sender's mailbox.
   */
  mailbox: mailboxAddress.optional(),
  /**
   * Always true: the bearer token sent in AUTH XOAUTH2 can send as every mailbox the app may use,
   * so it never goes to a server whose certificate is not verified (ca_file for a private CA).
   */
  verify_certificate: z
    .boolean()
    .default(true)
    .refine((v) => v, {
      message:
        'an OAuth2 upstream always verifies certificates: its access token could send as every mailbox the app may use; for a private CA or a stand-in set ca_file',
    }),
  /** PEM CAs to trust for the token endpoint and the SMTP server instead of the public ones. */
  ca_file: z.string().min(1).optional(),
};

const INLINE_CLIENT_SECRET =
  'a client secret is never written in the configuration file: put it in a file readable only by Postern and set client_secret_file = "secrets/NAME.secret", or set client_secret_env = "VARIABLE"';

const microsoft365Upstream = z
  .strictObject({
    type: z.literal('microsoft365'),
    ...oauthUpstreamKeys,
    method: z.enum(['smtp', 'graph']).default('smtp'),
    /** The tenant: its primary domain (contoso.onmicrosoft.com) or its ID. */
    tenant: z.string().regex(/^[A-Za-z0-9.-]+$/, 'expected the tenant\'s domain (contoso.onmicrosoft.com) or its ID (a GUID)'),
    client_id: z.string().min(1),
    client_secret_file: z.string().min(1).optional(),
    client_secret_env: envName.optional(),
    client_secret: z.unknown().optional(),
    /** Certificate credentials: the certificate uploaded to the app registration (PEM) and its private key. */
    certificate_file: z.string().min(1).optional(),
    private_key_file: z.string().min(1).optional(),
    authority: httpsUrl.default('https://login.microsoftonline.com'),
    smtp: hostPort(587).default({ host: 'smtp.office365.com', port: 587 }),
    graph: httpsUrl.default('https://graph.microsoft.com'),
    limits: rawLimits,
  })
  .superRefine((u, ctx) => {
    if (u.client_secret !== undefined) ctx.addIssue({ code: 'custom', path: ['client_secret'], message: INLINE_CLIENT_SECRET });
    const ways = [u.client_secret_file !== undefined, u.client_secret_env !== undefined, u.certificate_file !== undefined].filter(Boolean).length;
    if (ways === 0 && u.client_secret === undefined) {
      ctx.addIssue({ code: 'custom', path: ['client_secret_file'], message: 'set client_secret_file, client_secret_env, or certificate_file with private_key_file' });
    }
    if (ways > 1) ctx.addIssue({ code: 'custom', path: ['client_secret_file'], message: 'set one of client_secret_file, client_secret_env or certificate_file' });
    if ((u.certificate_file === undefined) !== (u.private_key_file === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['private_key_file'], message: 'certificate_file and private_key_file go together (they may name the same PEM file)' });
    }
  })
  .transform(({ client_secret: _inline, ...u }) => ({
    ...u,
    limits: withDefaults(u.limits, u.method === 'graph' ? MICROSOFT_GRAPH_LIMITS : MICROSOFT_SMTP_LIMITS),
  }));

const googleUpstream = z.strictObject({
  type: z.literal('google'),
  ...oauthUpstreamKeys,
  /** The service account's JSON key file (with domain-wide delegation for https://mail.google.com/). */
  service_account_file: z.string().min(1),
  /** Default: the key file's token_uri. */
  token_url: httpsUrl.optional(),
  smtp: hostPort(587).default({ host: 'smtp.gmail.com', port: 587 }),
  limits: rawLimits.transform((l) => withDefaults(l, GOOGLE_LIMITS)),
});

/** Every kind of upstream this version can deliver through, by `type`. */
const UPSTREAM_SCHEMAS = [smtpUpstream, microsoft365Upstream, googleUpstream] as const;
export const UPSTREAM_TYPES = ['smtp', 'microsoft365', 'google'] as const;

const upstream = z.discriminatedUnion('type', UPSTREAM_SCHEMAS, {
  error: (issue) => {
    if (issue.code !== 'invalid_union') return undefined;
    const supported = `supported: ${UPSTREAM_TYPES.map((t) => `"${t}"`).join(', ')}`;
    const type = issue.input && typeof issue.input === 'object' ? (issue.input as { type?: unknown }).type : undefined;
    if (type === undefined) return `missing: every [[upstream]] needs a type (${supported})`;
    return `unknown upstream type ${JSON.stringify(type)} (${supported})`;
  },
});

/** An authenticated account (a Postern username): an address, compared without case. */
const accountName = z
  .string()
  .regex(/^[^@\s]+@[^@\s]+$/, 'expected an account address such as "scanner@example.com"')
  .transform((a) => a.toLowerCase());

const notCatchAll = (what: string) =>
  z.array(domainName).min(1).refine((list) => !list.includes('*'), {
    message: `"*" is not a ${what}; for all mail use a rule with default = true`,
  });

/**
 * Which upstream a message goes through. Each rule names one upstream and exactly one selector;
 * the order they are tried in is fixed (src/delivery/router.ts), not the order in the file.
 */
const upstreamRoute = z
  .strictObject({
    upstream: upstreamName,
    sender_domains: notCatchAll('sender domain').optional(),
    accounts: z.array(accountName).min(1).optional(),
    recipient_domains: notCatchAll('recipient domain').optional(),
    default: z.literal(true, { error: 'default can only be true (leave it out otherwise)' }).optional(),
  })
  .superRefine((rule, ctx) => {
    const given = (['sender_domains', 'accounts', 'recipient_domains', 'default'] as const).filter((k) => rule[k] !== undefined);
    if (given.length !== 1) {
      ctx.addIssue({
        code: 'custom',
        message:
          given.length === 0
            ? 'give one of sender_domains, accounts, recipient_domains or default = true'
            : `give only one of sender_domains, accounts, recipient_domains or default = true (this rule has ${given.join(' and ')}); write one rule each`,
      });
    }
  });

export const configSchema = z
  .strictObject({
    hostname: z.string().min(1).optional(),
    data_dir: z.string().min(1).default('./data'),
    listen: z
      .strictObject({
        submission: listener.optional(),
        smtps: listener.optional(),
        relay: listener.optional(),
        http: listenAddress.optional(),
      })
      .optional(),
    tls: z
      .strictObject({
        cert: z.string().min(1).default('tls/cert.pem'),
        key: z.string().min(1).default('tls/key.pem'),
      })
      .default({ cert: 'tls/cert.pem', key: 'tls/key.pem' }),
    limits: z
      .strictObject({
        max_message_size: z.number().int().positive().default(35 * MB),
        max_recipients: z.number().int().positive().max(100_000).default(500),
        idle_timeout: duration.default(5 * 60_000),
        max_connections: z.number().int().positive().default(1000),
        max_connections_per_ip: z.number().int().positive().default(50),
        // Office 365's sending limits; accounts can be given their own (`postern account set`).
        messages_per_minute: z.number().int().positive().default(30),
        recipients_per_day: z.number().int().positive().default(10_000),
        connections_per_account: z.number().int().positive().default(3),
        // Bytes that must stay free in data_dir: below it new mail is refused at MAIL FROM with
        // 452 4.3.1, so the store always has room to deliver what it holds. 0: no check.
        min_free_space: z.number().int().nonnegative().default(100 * MB),
      })
      .prefault({}),
    lockout: z
      .strictObject({
        account_failures: z.number().int().positive().default(5),
        ip_failures: z.number().int().positive().default(20),
        window: duration.default(15 * 60_000),
      })
      .prefault({}),
    policy: z
      .strictObject({
        // false switches off rate limits, send-as, recipient rules and lockouts (benchmarks,
        // emergencies). AUTH, TLS and relay rules stay on whatever this says.
        enforce: z.boolean().default(true),
        // How long security events (failed logins, lockouts, relaying refused...) are kept, for
        // `postern security events`; then they are deleted (queue/retention.ts). 90 days, as
        // Exchange Online keeps its audit log; they hold client addresses and usernames, which
        // some operators must not keep that long. Nothing in the policy reads them back.
        security_events_retention: duration
          .refine((ms) => ms >= 86_400_000, 'must be at least "1d": `postern security events` is how a person finds out what happened yesterday')
          .default(90 * 86_400_000),
      })
      .prefault({}),
    alerts: z
      .strictObject({
        admin_address: z.string().email().optional(),
        webhook: z.url({ protocol: /^https?$/ }).optional(),
      })
      .prefault({}),
    auth: z
      .strictObject({
        // How long a verified password is trusted without a new argon2id check ("0s": never).
        cache_ttl: duration.default(60_000),
      })
      .prefault({}),
    queue: z
      .strictObject({
        first_retry: duration.default(60_000),
        max_retry_interval: duration.default(3_600_000),
        lifetime: duration.default(5 * 86_400_000),
        // How long a finished message (every recipient delivered or failed) stays in the store,
        // for `queue show`, the daily sending limits and volume alerts; then it is deleted with
        // its recipients. At least 8 days: the volume alerts compare the last day with the 7
        // before it (policy/volume-watch.ts), and with less history they would fall silent.
        retention: duration
          .refine((ms) => ms >= 8 * 86_400_000, 'must be at least "8d": the volume alerts compare the last day of mail in the store with the 7 days before it')
          .default(30 * 86_400_000),
      })
      .prefault({}),
    delivery: z
      .strictObject({
        dns_servers: z.array(hostPort(53)).optional(),
        concurrency: z.number().int().positive().default(100),
        per_destination: z.number().int().positive().default(10),
        connect_timeout: duration.default(30_000),
        command_timeout: duration.default(5 * 60_000),
        tls: z.enum(['none', 'opportunistic', 'required']).default('opportunistic'),
        port: z.number().int().min(1).max(65535).default(25),
        /**
         * Deliver in a worker thread of its own (queue/delivery-thread.ts), so deliveries run on a
         * second core instead of taking turns with the SMTP sessions. "auto" (the default): when
         * the machine has two cores or more. Measured with `npm run bench` on 2 cores: new
         * connections accepted +25 to 60%, end to end +15%, reused connections -5%, 30 MB more
         * memory (docs/benchmarks.md).
         */
        thread: z.union([z.boolean(), z.literal('auto')], { error: 'expected true, false or "auto"' }).default('auto'),
        /**
         * The delivery thread's scheduling priority (Linux; elsewhere it is left alone). "low" (the
         * default): nice 10 above the process's, so when the CPU is short the SMTP sessions
         * waiting for their 250 come first and the queue absorbs the burst; deliveries still get
         * about a tenth of a contended core, and all of an idle one. "normal": no difference.
         */
        thread_priority: z.enum(['low', 'normal']).default('low'),
      })
      .prefault({}),
    route: z
      .array(
        z.strictObject({
          domains: z.array(domainName).min(1),
          host: z.string().min(1),
          port: z.number().int().min(1).max(65535).default(25),
          tls: z.enum(['none', 'opportunistic', 'required']).default('opportunistic'),
        }),
      )
      .default([]),
    upstream: z.array(upstream).default([]),
    upstream_route: z.array(upstreamRoute).default([]),
    connector: z
      .array(
        z.strictObject({
          name: z.string().min(1),
          networks: z.array(cidr).min(1),
          // Optional: the only envelope sender domains this connector may use.
          sender_domains: z.array(domainName).optional(),
          require_tls: z.boolean().default(false),
          require_auth: z.boolean().default(false),
          // Per client address on this connector; default: the [limits] values.
          messages_per_minute: z.number().int().positive().optional(),
          recipients_per_day: z.number().int().positive().optional(),
        }),
      )
      .default([]),
    log: z
      .strictObject({
        level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
      })
      .prefault({}),
  })
  .superRefine(checkUpstreamReferences);

/**
 * What a single table cannot check: upstream names are unique, rules name upstreams that exist,
 * and no address, domain or "default" is claimed by two rules (the router would have to guess).
 */
function checkUpstreamReferences(
  config: { route: { domains: string[] }[]; upstream: { name: string; fallback?: string | undefined }[]; upstream_route: z.output<typeof upstreamRoute>[] },
  ctx: z.RefinementCtx,
): void {
  const names = new Map<string, number>();
  config.upstream.forEach((u, i) => {
    const first = names.get(u.name.toLowerCase());
    if (first !== undefined) ctx.addIssue({ code: 'custom', path: ['upstream', i, 'name'], message: `"${u.name}" is already the name of upstream[${first}]` });
    else names.set(u.name.toLowerCase(), i);
  });
  const defined = config.upstream.map((u) => `"${u.name}"`).join(', ');
  // A fallback names another upstream, and following fallbacks never comes back round.
  config.upstream.forEach((u, i) => {
    if (u.fallback === undefined) return;
    const path = ['upstream', i, 'fallback'];
    if (!names.has(u.fallback.toLowerCase())) {
      ctx.addIssue({ code: 'custom', path, message: `no [[upstream]] is named "${u.fallback}" (defined: ${defined})` });
      return;
    }
    const seen = new Set([u.name.toLowerCase()]);
    for (let next: string | undefined = u.fallback; next !== undefined; ) {
      if (seen.has(next.toLowerCase())) {
        ctx.addIssue({ code: 'custom', path, message: `the fallbacks of "${u.name}" lead back to "${next}": a fallback must not come round again` });
        return;
      }
      seen.add(next.toLowerCase());
      const index = names.get(next.toLowerCase());
      next = index === undefined ? undefined : config.upstream[index]!.fallback;
    }
  });
  const claimed = new Map<string, string>();
  const claim = (key: string, by: string, path: (string | number)[], what: string) => {
    const first = claimed.get(key);
    if (first) ctx.addIssue({ code: 'custom', path, message: `${what} is already routed by ${first}` });
    else claimed.set(key, by);
  };
  // Routes among themselves keep their old rule (the first one listing a domain wins); only a
  // clash between a route and an upstream rule is refused.
  config.route.forEach((r, i) => {
    for (const d of r.domains) {
      const key = d === '*' ? 'default' : `rcpt:${d}`;
      if (!claimed.has(key)) claimed.set(key, d === '*' ? `route[${i}] (domains = ["*"])` : `route[${i}]`);
    }
  });
  config.upstream_route.forEach((rule, i) => {
    const at = `upstream_route[${i}]`;
    if (!names.has(rule.upstream.toLowerCase())) {
      ctx.addIssue({
        code: 'custom',
        path: ['upstream_route', i, 'upstream'],
        message: `no [[upstream]] is named "${rule.upstream}" (${defined ? `defined: ${defined}` : 'none is defined'})`,
      });
    }
    for (const d of rule.recipient_domains ?? []) claim(`rcpt:${d}`, at, ['upstream_route', i, 'recipient_domains'], `recipient domain "${d}"`);
    for (const d of rule.sender_domains ?? []) claim(`sender:${d}`, at, ['upstream_route', i, 'sender_domains'], `sender domain "${d}"`);
    for (const a of rule.accounts ?? []) claim(`account:${a}`, at, ['upstream_route', i, 'accounts'], `account "${a}"`);
    if (rule.default) claim('default', at, ['upstream_route', i, 'default'], 'all mail (default)');
  });
}

export type ConfigInput = z.input<typeof configSchema>;
export type ParsedConfig = z.output<typeof configSchema>;
export type RouteConfig = ParsedConfig['route'][number];
export type ConnectorConfig = ParsedConfig['connector'][number];
export type UpstreamConfig = ParsedConfig['upstream'][number];
export type SmtpUpstreamConfig = Extract<UpstreamConfig, { type: 'smtp' }>;
export type UpstreamRouteConfig = ParsedConfig['upstream_route'][number];
