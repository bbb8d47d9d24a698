// The policy side of an SMTP session, phase by phase: who may log in (lockouts, account networks,
// connections per account), who may send as whom (send-as), to whom (recipient domains), and how
// much (rate limits). The intake calls these at each phase and sends the SmtpReplyError they
// return; every refusal is also a security event with the account, address and listener.
//
// `[policy] enforce = false` turns off lockouts, send-as, recipient rules and rate limits (for a
// benchmark or an emergency); authentication, TLS and relay rules do not depend on it.
import { mailboxAddresses } from '../mail/addresses.js';
import type { ConnectorConfig } from '../config/config-schema.js';
import type { Config } from '../config/load-config.js';
import { type SmtpReplyError, smtpError } from '../errors/smtp-errors.js';
import type { HeaderDecision, HeaderView } from '../intake/header-fixups.js';
import { NetworkList, plainIp } from '../intake/network-list.js';
import type { Account, Store } from '../store/store.js';
import { AuthLockout } from './auth-lockout.js';
import { RateLimits, type Reservation, type Sender, type SendingLimits, formatWait } from './rate-limits.js';
import type { SecurityEvents } from './security-events.js';
import { mayMailDomain, maySendAs } from './send-as.js';
import { VolumeWatch } from './volume-watch.js';

/** What the policy needs to know about a session; the intake keeps one per connection. */
export interface PolicySession {
  listener: string;
  ip: string;
  secure: boolean;
  account?: Account;
  connector?: ConnectorConfig;
  /** Failures counted against the username at the last AUTH (a success then clears them). */
  authFailures?: number;
  /**
   * The current mail transaction, as an object that changes when the transaction ends (smtp-server's
   * session.envelope: replaced at RSET, EHLO, STARTTLS and after the DATA reply). Lets the rate
   * limits give back what an abandoned transaction reserved. Without it a reservation lasts until
   * the next MAIL FROM or the end of the connection.
   */
  transaction?: () => unknown;
  /** What the current transaction holds against the sending limits (set at MAIL FROM). */
  reservation?: Reservation;
}

/** One stored relay_denied event per client address in this period. */
const RELAY_EVENT_PERIOD_MS = 15 * 60_000;
/** Client addresses remembered for that; beyond it the oldest is forgotten. */
const RELAY_EVENT_ADDRESSES = 10_000;

export class SessionPolicy {
  readonly #config: Config;
  readonly #store: Store;
  readonly #events: SecurityEvents;
  readonly #lockout: AuthLockout;
  readonly #rates: RateLimits;
  readonly #volume: VolumeWatch;
  readonly #enforce: boolean;
  readonly #accountSessions = new Map<string, number>();
  readonly #accountNetworks = new Map<string, NetworkList>();
  readonly #seenNetworks = new Set<string>();
  /** Client address -> when its last relay_denied event was stored (see relayDenied). */
  readonly #relayDeniedAt = new Map<string, number>();

  constructor(config: Config, store: Store, events: SecurityEvents) {
    this.#config = config;
    this.#store = store;
    this.#events = events;
    this.#enforce = config.policy.enforce;
    this.#lockout = new AuthLockout(store, {
      accountFailures: config.lockout.account_failures,
      ipFailures: config.lockout.ip_failures,
      windowMs: config.lockout.window,
    });
    this.#rates = new RateLimits(store);
    this.#volume = new VolumeWatch(store);
  }

  // ---- auth ------------------------------------------------------------------------------

  /** Before the password is checked: is this address or username locked out? */
  async beforeAuth(s: PolicySession, username: string): Promise<SmtpReplyError | null> {
    if (!this.#enforce) return null;
    const state = await this.#lockout.state(s.ip, username);
    if (!state.locked) {
      s.authFailures = state.accountFailures;
      return null;
    }
    return smtpError('AUTH_LOCKED', { retry: formatWait(state.retryMs) });
  }

  /** A wrong password (or unknown or disabled account): count it, maybe lock. */
  async authFailed(s: PolicySession, username: string, reason: string): Promise<void> {
    const account = username.trim().toLowerCase().slice(0, 320);
    await this.#events.record({
      kind: 'auth_failed',
      account,
      ip: s.ip,
      listener: s.listener,
      detail: { message: `Failed AUTH for ${account} from ${s.ip} on ${s.listener}`, reason },
    });
    if (!this.#enforce) return;
    const after = await this.#lockout.fail(s.ip, username);
    if (after.locked) {
      const who = after.by === 'ip' ? `address ${s.ip}` : `account ${account}`;
      await this.#events.record({
        kind: 'lockout',
        account,
        ip: s.ip,
        listener: s.listener,
        detail: { message: `AUTH locked for ${who} for ${formatWait(after.retryMs)} after repeated failures`, by: after.by },
      });
    }
  }

  /**
   * The password was right: may this account log in from here, now? On success the session
   * counts against the account's connection limit until `closed()`.
   */
  async afterAuth(s: PolicySession, account: Account): Promise<SmtpReplyError | null> {
    const networks = account.policy.networks;
    if (networks && networks.length > 0 && !this.#networksOf(account).has(s.ip)) {
      // Same reply as a wrong password: a stolen password used elsewhere learns nothing.
      await this.authFailed(s, account.address, 'network_not_allowed');
      return smtpError('AUTH_FAILED');
    }
    // The password was right: the username's failures go (only one with failures on record needs
    // a write). Done before the connection count, so that nothing waits between reading the count
    // and taking a slot: parallel logins cannot all see a free slot.
    if (this.#enforce && (s.authFailures ?? 0) > 0) await this.#lockout.succeed(account.address);
    const open = this.#accountSessions.get(account.address) ?? 0;
    const max = account.policy.limits?.maxConnections ?? this.#config.limits.connections_per_account;
    if (this.#enforce && open >= max) {
      await this.#events.record({
        kind: 'rate_limited',
        account: account.address,
        ip: s.ip,
        listener: s.listener,
        detail: { message: `${account.address} already has ${open} connections open (limit ${max})`, limit: 'connections' },
      });
      return smtpError('ACCOUNT_CONNECTIONS', { account: account.address, max });
    }
    this.#accountSessions.set(account.address, open + 1);
    s.account = account;
    void this.#noteNetwork(s, account.address);
    return null;
  }

  closed(s: PolicySession): void {
    // QUIT or a lost connection: a transaction in progress will never be queued.
    this.#rates.release(s.reservation);
    s.reservation = undefined;
    if (!s.account) return;
    const left = (this.#accountSessions.get(s.account.address) ?? 1) - 1;
    if (left > 0) this.#accountSessions.set(s.account.address, left);
    else this.#accountSessions.delete(s.account.address);
  }

  // ---- mail ------------------------------------------------------------------------------

  async onMail(s: PolicySession, sender: string): Promise<SmtpReplyError | null> {
    // A new transaction: whatever the last one reserved and did not queue goes back.
    this.#rates.release(s.reservation);
    s.reservation = undefined;
    const connector = s.connector;
    if (connector) {
      if (connector.require_tls && !s.secure) return smtpError('CONNECTOR_NEEDS_TLS', { connector: connector.name });
      if (connector.require_auth && !s.account) return smtpError('AUTH_REQUIRED');
      const domain = sender.slice(sender.lastIndexOf('@') + 1).toLowerCase();
      if (sender && connector.sender_domains && !connector.sender_domains.includes(domain)) {
        await this.#deny(s, 'send_as_denied', `Sender domain ${domain} refused on connector ${connector.name}`);
        return smtpError('SENDER_DOMAIN_DENIED', { domain, connector: connector.name });
      }
    }
    if (!this.#enforce) return null;
    if (s.account && sender && !maySendAs(s.account, sender)) {
      await this.#deny(s, 'send_as_denied', `${s.account.address} tried to send as ${sender} (envelope)`);
      return smtpError('SEND_AS_DENIED', { account: s.account.address, address: sender });
    }
    const who = this.#sender(s);
    const limits = this.#limits(s);
    const token = s.transaction?.();
    const live = s.transaction ? () => s.transaction!() === token : () => true;
    const checked = await this.#rates.reserveMessage(who, limits, live);
    if (checked.refused) {
      await this.#deny(s, 'rate_limited', checked.refused.message.replace(/^\S+ /, ''));
      return checked.refused;
    }
    s.reservation = checked.reservation;
    if (s.account) void this.#watchVolume(s, s.account.address);
    return null;
  }

  /** `accepted`: recipients already accepted in this transaction. */
  async onRcpt(s: PolicySession, recipient: string, accepted: number): Promise<SmtpReplyError | null> {
    const max = s.account?.policy.limits?.recipientsPerMessage ?? this.#config.limits.max_recipients;
    if (accepted >= max) return smtpError('TOO_MANY_RECIPIENTS', { max });
    if (!this.#enforce) return null;
    const domain = recipient.slice(recipient.lastIndexOf('@') + 1);
    if (s.account && !mayMailDomain(s.account, domain)) {
      await this.#deny(s, 'recipient_denied', `${s.account.address} may not send to ${domain}`);
      return smtpError('RECIPIENT_DOMAIN_DENIED', {
        account: s.account.address,
        domain,
        allowed: (s.account.policy.recipientDomains ?? []).join(', '),
      });
    }
    if (!s.reservation) return null;
    const refused = await this.#rates.reserveRecipient(this.#sender(s), this.#limits(s), s.reservation);
    if (refused) {
      await this.#deny(s, 'rate_limited', refused.message.replace(/^\S+ /, ''));
      return refused;
    }
    return null;
  }

  /** The message was queued: what its transaction reserved becomes a count. */
  queued(s: PolicySession, recipients: number): void {
    const reservation = s.reservation;
    s.reservation = undefined;
    void this.#rates.queued(this.#sender(s), recipients, reservation).catch(() => undefined);
  }

  /**
   * The header check at DATA: every address in every From and Sender field must be one the
   * account may use (a second From field must not slip a forged address past the first). With
   * rewrite-from on, a From it may not use is replaced instead (every From field goes, and the
   * originals are kept in Reply-To). More than one From or Sender field is refused even when each
   * is allowed: RFC 5322 allows one of each, and receivers disagree on which one they show.
   */
  headerCheck(s: PolicySession): ((headers: HeaderView) => HeaderDecision) | undefined {
    const account = s.account;
    if (!this.#enforce || !account) return undefined;
    return (headers) => {
      let rewriteFrom = false;
      for (const [name, label] of [['from', 'From'], ['sender', 'Sender']] as const) {
        const values = headers.all(name);
        const bad = values.flatMap(mailboxAddresses).find((a) => !maySendAs(account, a));
        if (bad) {
          if (name === 'from' && account.policy.rewriteFrom) {
            rewriteFrom = true;
            continue;
          }
          return { reject: smtpError('SEND_AS_DENIED', { account: account.address, address: bad }) };
        }
        if (values.length > 1) return { reject: smtpError('HEADER_REPEATED', { count: values.length, name: label }) };
      }
      return rewriteFrom ? { rewriteFrom: account.address } : {};
    };
  }

  /** Records a refusal found in the headers (the reply is already decided). */
  async headerRefused(s: PolicySession, refusal: SmtpReplyError): Promise<void> {
    // Only a forged sender is a security event; a malformed or oversized header section is logged.
    if (refusal.errorName !== 'SEND_AS_DENIED') return;
    await this.#deny(s, 'send_as_denied', `${refusal.message.replace(/^\S+ /, '')} (headers)`);
  }

  // ---- helpers -----------------------------------------------------------------------------

  #sender(s: PolicySession): Sender {
    return s.account ? { account: s.account.address } : { clientIp: s.ip };
  }

  #limits(s: PolicySession): SendingLimits {
    const own = s.account?.policy.limits;
    return {
      messagesPerMinute: own?.messagesPerMinute ?? s.connector?.messages_per_minute ?? this.#config.limits.messages_per_minute,
      recipientsPerDay: own?.recipientsPerDay ?? s.connector?.recipients_per_day ?? this.#config.limits.recipients_per_day,
    };
  }

  /**
   * Someone outside every connector tried to relay. Each refusal is logged by the intake; the
   * store gets one relay_denied event per client address per RELAY_EVENT_PERIOD_MS (with the
   * first recipient tried), so `postern security events` shows who probes the relay port
   * without an internet scanner's ten thousand RCPTs filling the store. Not subject to
   * `[policy] enforce`: relay rules never are.
   */
  async relayDenied(s: PolicySession, recipient: string, now = Date.now()): Promise<void> {
    const last = this.#relayDeniedAt.get(s.ip);
    if (last !== undefined && now - last < RELAY_EVENT_PERIOD_MS) return;
    this.#relayDeniedAt.delete(s.ip);
    if (this.#relayDeniedAt.size >= RELAY_EVENT_ADDRESSES) {
      // Insertion order is time order: the oldest address goes (a flood of addresses costs at
      // most an event per new address, never unbounded memory).
      const oldest = this.#relayDeniedAt.keys().next().value;
      if (oldest !== undefined) this.#relayDeniedAt.delete(oldest);
    }
    this.#relayDeniedAt.set(s.ip, now);
    await this.#events.record({
      kind: 'relay_denied',
      ip: s.ip,
      listener: s.listener,
      detail: {
        message: `Relaying denied to ${s.ip} on ${s.listener} (first recipient tried: ${recipient.slice(0, 320)}); later attempts from this address in the next ${RELAY_EVENT_PERIOD_MS / 60_000} minutes are logged only`,
      },
    });
  }

  #networksOf(account: Account): NetworkList {
    const key = `${account.address}\0${(account.policy.networks ?? []).join(',')}`;
    let list = this.#accountNetworks.get(key);
    if (!list) {
      list = new NetworkList(account.policy.networks ?? []);
      this.#accountNetworks.set(key, list);
    }
    return list;
  }

  async #deny(s: PolicySession, kind: 'send_as_denied' | 'recipient_denied' | 'rate_limited', message: string): Promise<void> {
    await this.#events.record({ kind, account: s.account?.address, ip: s.ip, listener: s.listener, detail: { message } });
  }

  /** A login from a network (/24, /64) the account has not used before is worth a look. */
  async #noteNetwork(s: PolicySession, account: string): Promise<void> {
    const network = networkOf(s.ip);
    const key = `${account}\0${network}`;
    if (this.#seenNetworks.has(key)) return;
    this.#seenNetworks.add(key);
    try {
      const first = (await this.#store.listAccountNetworks(account)).length === 0;
      const isNew = await this.#store.noteAccountNetwork(account, network, Date.now());
      if (isNew && !first) {
        await this.#events.record({
          kind: 'new_network',
          account,
          ip: s.ip,
          listener: s.listener,
          detail: { message: `${account} logged in from ${network}, a network it never used before`, network },
        });
      }
    } catch {
      this.#seenNetworks.delete(key);
    }
  }

  async #watchVolume(s: PolicySession, account: string): Promise<void> {
    const spike = await this.#volume.check(account).catch(() => null);
    if (!spike) return;
    await this.#events.record({
      kind: 'volume_spike',
      account,
      ip: s.ip,
      listener: s.listener,
      detail: {
        message: `${account} sent to ${spike.last24h} recipients in 24 hours, more than 5 times its daily average of ${spike.dailyAverage}`,
        ...spike,
      },
    });
  }
}

function networkOf(ip: string): string {
  const plain = plainIp(ip);
  if (plain.includes(':')) return `${plain.split(':').slice(0, 4).join(':')}::/64`;
  return `${plain.split('.').slice(0, 3).join('.')}.0/24`;
}

