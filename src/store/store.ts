// The storage contract. Everything Postern keeps (accounts, queued messages, per-recipient
// delivery state) goes through this interface; store/sqlite implements it today and a PostgreSQL
// backend will implement the same methods, checked by the same test suite (test/store.test.ts).
//
// Durability rule: `enqueue` resolves only after the message body and its rows are on disk
// (fsync'd). The SMTP `250` is sent after that and never before.
import type { Readable, Writable } from 'node:stream';

export type RecipientState = 'queued' | 'in_flight' | 'deferred' | 'delivered' | 'failed';

export const FINAL_STATES: readonly RecipientState[] = ['delivered', 'failed'];

export interface Account {
  address: string;
  passwordHash: string;
  smtpAuth: boolean;
  enabled: boolean;
  createdAt: number;
  updatedAt: number;
}

export interface NewAccount {
  address: string;
  passwordHash: string;
  smtpAuth?: boolean;
  enabled?: boolean;
}

export type AccountPatch = Partial<Pick<Account, 'passwordHash' | 'smtpAuth' | 'enabled'>>;

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
  /** Waits for the stream to finish, then fsyncs the body. Resolves with its size in bytes. */
  finish(): Promise<number>;
  /** Throws away a partial body (rejected message, client gone). */
  abort(): Promise<void>;
}

export interface AccountStore {
  createAccount(account: NewAccount): Promise<Account>;
  getAccount(address: string): Promise<Account | undefined>;
  listAccounts(): Promise<Account[]>;
  updateAccount(address: string, patch: AccountPatch): Promise<Account | undefined>;
  deleteAccount(address: string): Promise<boolean>;
}

export interface QueueStore {
  /** A writer for a new message body. Nothing is queued until `enqueue`. */
  createBody(queueId: string): BodyWriter;
  readBody(queueId: string): Readable;
  /** Makes the message durable (rows plus the body written earlier). Batched: several per fsync. */
  enqueue(message: NewMessage): Promise<void>;
  /**
   * Claims up to `limit` messages with recipients due at `now`, marking those recipients
   * in_flight so no other worker (or node) takes them.
   */
  claimDue(now: number, limit: number): Promise<QueuedMessage[]>;
  /** Records the result of an attempt; removes the body once every recipient is final. */
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
  /** Counts of recipients per state (for tests, `queue list` totals and later metrics). */
  countRecipients(): Promise<Record<RecipientState, number>>;
}

export interface Store extends AccountStore, QueueStore {
  readonly kind: 'sqlite' | 'postgres';
  close(): Promise<void>;
}
