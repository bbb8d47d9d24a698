// The storage contract. Everything Postern keeps (accounts, queued messages, per-recipient
// delivery state) goes through this interface; store/sqlite implements it today and a PostgreSQL
// backend will implement the same methods, checked by the same test suite (test/store.test.ts).
//
// Durability rule: `enqueue` resolves only after the message body and its rows are on disk
// (fsync'd). The SMTP `250` is sent after that and never before.
import type { Readable, Writable } from 'node:stream';
import type { RateLimiterAbstract } from 'rate-limiter-flexible';

export type RecipientState = 'queued' | 'in_flight' | 'deferred' | 'delivered' | 'failed';

/** Per-account limits; an absent value means the `[limits]` default. */
export interface AccountLimits {
  messagesPerMinute?: number;
  recipientsPerDay?: number;
  recipientsPerMessage?: number;
  maxConnections?: number;
}

/** What an account may do beyond authenticating. Every field is optional: absent = the default. */
export interface AccountPolicy {
  /** Addresses and `*@domain` patterns it may send as, besides its own address. */
  sendAs?: string[];
  /** When set, the only recipient domains it may send to. */
  recipientDomains?: string[];
  /** Replace a header From it may not use with its own address (original kept in Reply-To). */
  rewriteFrom?: boolean;
  /** When set, the only client networks (CIDR) it may log in from. */
  networks?: string[];
  limits?: AccountLimits;
}

export interface Account {
  address: string;
  passwordHash: string;
  smtpAuth: boolean;
  enabled: boolean;
  policy: AccountPolicy;
  createdAt: number;
  updatedAt: number;
}

export interface NewAccount {
  address: string;
  passwordHash: string;
  smtpAuth?: boolean;
  enabled?: boolean;
  policy?: AccountPolicy;
}

export type AccountPatch = Partial<Pick<Account, 'passwordHash' | 'smtpAuth' | 'enabled' | 'policy'>>;

export type SecurityEventKind =
  | 'auth_failed'
  | 'lockout'
  | 'rate_limited'
  | 'send_as_denied'
  | 'recipient_denied'
  | 'relay_denied'
  | 'new_network'
  | 'volume_spike'
  /** An upstream refused Postern's configuration (credentials, permissions): its mail is held. */
  | 'upstream_problem'
  /** An upstream mailbox has used 80% of a daily sending limit. */
  | 'upstream_budget';

/** Where code outside the SMTP session reports security events (SecurityEvents implements it). */
export interface SecurityEventSink {
  record(event: NewSecurityEvent): Promise<void>;
}

export interface NewSecurityEvent {
  kind: SecurityEventKind;
  account?: string;
  ip?: string;
  listener?: string;
  /** A sentence and any fields worth keeping; never a password. */
  detail: Record<string, unknown> & { message: string };
  at?: number;
}

export interface SecurityEvent extends Required<Omit<NewSecurityEvent, 'account' | 'ip' | 'listener'>> {
  id: number;
  account: string | null;
  ip: string | null;
  listener: string | null;
}

export interface AuditEntry {
  id: number;
  at: number;
  /** Who: "cli:root", "api:admin@example.com". */
  actor: string;
  action: string;
  target: string;
  detail: Record<string, unknown>;
}

/** What an account or client address has queued in a window (rate limits count from the queue). */
export interface Usage {
  messages: number;
  recipients: number;
  /** When the oldest message in the window was queued (it leaves the window first), or null. */
  oldestAt: number | null;
}

/** A counter that survives restarts, for brute-force lockouts (rate-limiter-flexible semantics). */
export interface CounterOptions {
  keyPrefix: string;
  points: number;
  /** Window, in seconds. */
  duration: number;
  /** Once over the limit, blocked for this long, in seconds. */
  blockDuration?: number;
}

export interface NewRecipient {
  address: string;
  /** RFC 3461 NOTIFY values (upper case), or undefined for the default (FAILURE). */
  notify?: string[];
  orcpt?: string;
}

export interface NewMessage {
  queueId: string;
  /** Envelope sender; '' is the null sender (bounces). */
  sender: string;
  recipients: NewRecipient[];
  size: number;
  receivedAt: number;
  expiresAt: number;
  /** Where it came from, for logs, trace and `queue show`. */
  origin: {
    sessionId: string;
    listener: string;
    clientIp: string;
    account?: string;
    heloName?: string;
  };
  messageIdHeader?: string;
  dsnEnvid?: string;
  dsnRet?: 'FULL' | 'HDRS';
}

export interface QueuedRecipient {
  index: number;
  address: string;
  domain: string;
  state: RecipientState;
  attempts: number;
  nextAttemptAt: number;
  lastCode: number | null;
  lastResponse: string | null;
  notify: string[] | null;
  orcpt: string | null;
  updatedAt: number;
}

export interface QueuedMessage extends Omit<NewMessage, 'recipients'> {
  recipients: QueuedRecipient[];
}

export interface RecipientOutcome {
  index: number;
  state: 'delivered' | 'deferred' | 'failed' | 'queued';
  code: number | null;
  response: string;
  /** Required for 'deferred' (and 'queued' when released): when to try again. */
  nextAttemptAt?: number;
  /** false when the outcome should not count as an attempt (released, not tried). */
  countsAsAttempt?: boolean;
}

export interface QueueSummary {
  queueId: string;
  sender: string;
  receivedAt: number;
  size: number;
  recipients: number;
  pending: number;
  nextAttemptAt: number | null;
  lastResponse: string | null;
}

export interface BodyWriter {
  readonly queueId: string;
  /** Write the message bytes here; the caller pipes into it and ends it. */
  readonly stream: Writable;
  /**
   * Waits for the stream to finish; resolves with the body's size in bytes. A body the backend
   * keeps in a file is fsync'd here; a small one kept inline in the database is made durable by
   * `enqueue`, in the same commit as the rows. Either way, durable once `enqueue` resolves.
   */
  finish(): Promise<number>;
  /** Throws away a partial body (rejected message, client gone). */
  abort(): Promise<void>;
}

export interface SecurityStore {
  recordSecurityEvent(event: NewSecurityEvent): Promise<void>;
  listSecurityEvents(options?: { since?: number; limit?: number }): Promise<SecurityEvent[]>;
  /** Deletes up to `limit` security events older than `before`, oldest first. Returns how many. */
  purgeSecurityEvents(before: number, limit: number): Promise<number>;
  recordAudit(entry: Omit<AuditEntry, 'id' | 'at'> & { at?: number }): Promise<void>;
  listAudit(options?: { since?: number; limit?: number }): Promise<AuditEntry[]>;
  /** Remembers that an account logged in from a network; true when it is the first time. */
  noteAccountNetwork(account: string, network: string, now: number): Promise<boolean>;
  listAccountNetworks(account: string): Promise<{ network: string; firstSeen: number }[]>;
  /**
   * Messages and recipients queued since `since` by an account, or from a client address. Asked
   * once a minute per active sender on the thread that serves the SMTP sessions, over up to a
   * day of that sender's mail: a backend answers it from an index, not by reading the messages.
   */
  usageSince(who: { account: string } | { clientIp: string }, since: number): Promise<Usage>;
  /** A rate-limiter-flexible limiter whose counters live in the store. */
  counter(options: CounterOptions): RateLimiterAbstract;
}

export interface AccountStore {
  createAccount(account: NewAccount): Promise<Account>;
  getAccount(address: string): Promise<Account | undefined>;
  listAccounts(): Promise<Account[]>;
  updateAccount(address: string, patch: AccountPatch): Promise<Account | undefined>;
  deleteAccount(address: string): Promise<boolean>;
}

export interface QueueStore {
  /**
   * Periodic upkeep, called by the queue runner's side every few seconds (SQLite: checkpoint the
   * write-ahead log when it has grown, since the intake's connection leaves that to this one).
   */
  housekeeping?(): Promise<void>;
  /** A writer for a new message body. Nothing is queued until `enqueue`. */
  createBody(queueId: string): BodyWriter;
  readBody(queueId: string): Readable;
  /** Makes the message durable (rows plus the body written earlier). Batched: several per fsync. */
  enqueue(message: NewMessage): Promise<void>;
  /**
   * Claims up to `limit` messages with recipients due at `now`, marking those recipients
   * in_flight so no other worker (or node) takes them. Each message carries only the recipients
   * this call claimed (never one already in flight), oldest due first.
   */
  claimDue(now: number, limit: number): Promise<QueuedMessage[]>;
  /**
   * Records the result of an attempt; removes the body once every recipient is final. Calls may be
   * grouped and committed without waiting for an fsync: an outcome lost in a power cut leaves its
   * recipients as they were before the attempt (in_flight, which releaseInFlight undoes), so they
   * are delivered again (at-least-once). The mail itself is never at risk.
   */
  recordOutcomes(queueId: string, outcomes: RecipientOutcome[], now: number): Promise<void>;
  /** After a crash: in_flight recipients go back to queued. Returns how many. */
  releaseInFlight(now: number): Promise<number>;
  /** When the next recipient becomes due, or null when nothing is pending. */
  nextDueAt(): Promise<number | null>;
  listQueue(options?: { limit?: number }): Promise<QueueSummary[]>;
  getMessage(queueId: string): Promise<QueuedMessage | undefined>;
  /** Makes pending recipients due now; all pending messages when no id. Returns recipients touched. */
  retryNow(queueId: string | undefined, now: number): Promise<number>;
  /** Removes a message and its body whatever its state. */
  deleteMessage(queueId: string): Promise<boolean>;
  /**
   * Deletes up to `limit` finished messages (every recipient delivered or failed) received before
   * `before`, oldest first, with their recipients. Returns how many. Pending mail is never touched.
   */
  purgeFinished(before: number, limit: number): Promise<number>;
  /** Counts of recipients per state (for tests, `queue list` totals and later metrics). */
  countRecipients(): Promise<Record<RecipientState, number>>;
}

export interface Store extends AccountStore, QueueStore, SecurityStore {
  readonly kind: 'sqlite' | 'postgres';
  /**
   * Gives back the memory a backend keeps for speed under load, once the server is quiet (SQLite:
   * each connection's page cache, up to 16 MB in better-sqlite3's build, which a burst fills and
   * nothing empties). What is needed again comes back from the operating system's file cache.
   * Synchronous and cheap: memory relief calls it after a burst (runtime/memory-relief.ts).
   */
  releaseMemory?(): void;
  close(): Promise<void>;
}
