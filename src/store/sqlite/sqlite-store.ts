// The embedded default store: SQLite (WAL, synchronous=FULL) for rows, a file spool for bodies.
//
// Group commit: `enqueue` calls that arrive in the same turn of the event loop share one
// transaction and one fsync of the spool directory, so a burst of 50 sessions pays for a handful
// of fsyncs instead of 50. Each caller's promise resolves only after that commit.
import path from 'node:path';
import type { Readable } from 'node:stream';
import BetterSqlite3 from 'better-sqlite3';
import { type RateLimiterAbstract, RateLimiterSQLite } from 'rate-limiter-flexible';
import { Kysely, Migrator, SqliteDialect, type Transaction } from 'kysely';
import { FileSpool } from '../file-spool.js';
import {
  type Account,
  type AccountPatch,
  type AccountPolicy,
  type AuditEntry,
  type BodyWriter,
  type CounterOptions,
  type NewSecurityEvent,
  type SecurityEvent,
  type Usage,
  type NewAccount,
  type NewMessage,
  type QueueSummary,
  type QueuedMessage,
  type QueuedRecipient,
  type RecipientOutcome,
  type RecipientState,
  type Store,
} from '../store.js';
import { type AccountsTable, type Database, type RecipientsTable, migrationProvider } from './sqlite-schema.js';

const PENDING: RecipientState[] = ['queued', 'deferred'];
const NOT_FINAL: RecipientState[] = ['queued', 'deferred', 'in_flight'];

interface PendingEnqueue {
  message: NewMessage;
  resolve: () => void;
  reject: (err: Error) => void;
}

export interface SqliteStoreOptions {
  /** Directory holding postern.db and spool/. */
  dataDir: string;
}

export async function openSqliteStore(options: SqliteStoreOptions): Promise<SqliteStore> {
  const spool = new FileSpool(path.join(options.dataDir, 'spool'));
  const sqlite = new BetterSqlite3(path.join(options.dataDir, 'postern.db'));
  sqlite.pragma('journal_mode = WAL');
  // FULL: a commit is on disk when it returns; the 250 reply depends on it.
  sqlite.pragma('synchronous = FULL');
  sqlite.pragma('foreign_keys = ON');
  // The CLI writes to the same file while the server runs.
  sqlite.pragma('busy_timeout = 5000');
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: sqlite }) });
  // Lockout counters change on every failed AUTH and need not survive a power cut (a process
  // restart, yes): their own file, synchronous=NORMAL, so they never wait for an fsync.
  const counters = new BetterSqlite3(path.join(options.dataDir, 'counters.db'));
  counters.pragma('journal_mode = WAL');
  counters.pragma('synchronous = NORMAL');
  counters.pragma('busy_timeout = 5000');
  counters.exec('CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, points INTEGER NOT NULL DEFAULT 0, expire INTEGER)');
  const migrator = new Migrator({ db, provider: migrationProvider });
  const { error, results } = await migrator.migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === 'Error')?.migrationName ?? 'unknown';
    await db.destroy();
    counters.close();
    throw new Error(`store migration ${failed} failed: ${(error as Error).message ?? error}`);
  }
  return new SqliteStore(db, spool, counters);
}

export class SqliteStore implements Store {
  readonly kind = 'sqlite' as const;
  readonly #db: Kysely<Database>;
  readonly #spool: FileSpool;
  readonly #counters: BetterSqlite3.Database;
  #pending: PendingEnqueue[] = [];
  #flushScheduled = false;
  #flushing: Promise<void> = Promise.resolve();

  constructor(db: Kysely<Database>, spool: FileSpool, counters: BetterSqlite3.Database) {
    this.#db = db;
    this.#spool = spool;
    this.#counters = counters;
  }

  // ---- accounts -------------------------------------------------------------------------

  async createAccount(account: NewAccount): Promise<Account> {
    const now = Date.now();
    const row: AccountsTable = {
      address: account.address.toLowerCase(),
      password_hash: account.passwordHash,
      smtp_auth: account.smtpAuth === false ? 0 : 1,
      enabled: account.enabled === false ? 0 : 1,
      policy: JSON.stringify(account.policy ?? {}),
      created_at: now,
      updated_at: now,
    };
    await this.#db.insertInto('accounts').values(row).execute();
    return toAccount(row);
  }

  async getAccount(address: string): Promise<Account | undefined> {
    const row = await this.#db
      .selectFrom('accounts')
      .selectAll()
      .where('address', '=', address.toLowerCase())
      .executeTakeFirst();
    return row && toAccount(row);
  }

  async listAccounts(): Promise<Account[]> {
    const rows = await this.#db.selectFrom('accounts').selectAll().orderBy('address').execute();
    return rows.map(toAccount);
  }

  async updateAccount(address: string, patch: AccountPatch): Promise<Account | undefined> {
    const values: Partial<AccountsTable> = { updated_at: Date.now() };
    if (patch.passwordHash !== undefined) values.password_hash = patch.passwordHash;
    if (patch.smtpAuth !== undefined) values.smtp_auth = patch.smtpAuth ? 1 : 0;
    if (patch.enabled !== undefined) values.enabled = patch.enabled ? 1 : 0;
    if (patch.policy !== undefined) values.policy = JSON.stringify(patch.policy);
    await this.#db.updateTable('accounts').set(values).where('address', '=', address.toLowerCase()).execute();
    return this.getAccount(address);
  }

  async deleteAccount(address: string): Promise<boolean> {
    const result = await this.#db.deleteFrom('accounts').where('address', '=', address.toLowerCase()).executeTakeFirst();
    return Number(result.numDeletedRows) > 0;
  }

  // ---- queue ----------------------------------------------------------------------------

  createBody(queueId: string): BodyWriter {
    return this.#spool.createWriter(queueId);
  }

  readBody(queueId: string): Readable {
    return this.#spool.read(queueId);
  }

  enqueue(message: NewMessage): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#pending.push({ message, resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        setImmediate(() => {
          this.#flushing = this.#flushing.then(() => this.#flush());
        });
      }
    });
  }

  async #flush(): Promise<void> {
    this.#flushScheduled = false;
    const batch = this.#pending;
    this.#pending = [];
    if (batch.length === 0) return;
    try {
      await this.#spool.syncDirectory();
      await this.#db.transaction().execute(async (trx) => {
        for (const { message } of batch) await insertMessage(trx, message);
      });
      for (const p of batch) p.resolve();
    } catch (err) {
      for (const p of batch) p.reject(err as Error);
    }
  }

  async claimDue(now: number, limit: number): Promise<QueuedMessage[]> {
    const claimed = await this.#db.transaction().execute(async (trx) => {
      const due = await trx
        .selectFrom('recipients')
        .select('queue_id')
        .distinct()
        .where('state', 'in', PENDING)
        .where('next_attempt_at', '<=', now)
        .orderBy('queue_id')
        .limit(limit)
        .execute();
      const ids = due.map((d) => d.queue_id);
      if (ids.length === 0) return [];
      await trx
        .updateTable('recipients')
        .set({ state: 'in_flight', updated_at: now })
        .where('queue_id', 'in', ids)
        .where('state', 'in', PENDING)
        .where('next_attempt_at', '<=', now)
        .execute();
      return ids;
    });
    if (claimed.length === 0) return [];
    const messages = await this.#loadMessages(claimed);
    // Hand the worker only the recipients it claimed.
    for (const m of messages) m.recipients = m.recipients.filter((r) => r.state === 'in_flight');
    return messages;
  }

  async recordOutcomes(queueId: string, outcomes: RecipientOutcome[], now: number): Promise<void> {
    const done = await this.#db.transaction().execute(async (trx) => {
      for (const o of outcomes) {
        await trx
          .updateTable('recipients')
          .set((eb) => ({
            state: o.state,
            attempts: o.countsAsAttempt === false ? eb.ref('attempts') : eb('attempts', '+', 1),
            last_code: o.code,
            last_response: o.response,
            next_attempt_at: o.nextAttemptAt ?? now,
            updated_at: now,
          }))
          .where('queue_id', '=', queueId)
          .where('idx', '=', o.index)
          .execute();
      }
      const open = await trx
        .selectFrom('recipients')
        .select((eb) => eb.fn.countAll<number>().as('n'))
        .where('queue_id', '=', queueId)
        .where('state', 'in', NOT_FINAL)
        .executeTakeFirstOrThrow();
      if (Number(open.n) === 0) {
        await trx.updateTable('messages').set({ active: 0 }).where('queue_id', '=', queueId).execute();
        return true;
      }
      return false;
    });
    if (done) await this.#spool.remove(queueId);
  }

  async releaseInFlight(now: number): Promise<number> {
    const result = await this.#db
      .updateTable('recipients')
      .set({ state: 'queued', next_attempt_at: now, updated_at: now })
      .where('state', '=', 'in_flight')
      .executeTakeFirst();
    // Bodies written before a crash whose rows never committed were never acknowledged: drop them.
    const known = new Set(
      (await this.#db.selectFrom('messages').select('queue_id').where('active', '=', 1).execute()).map((r) => r.queue_id),
    );
    for (const id of await this.#spool.listIds()) if (!known.has(id)) await this.#spool.remove(id);
    return Number(result.numUpdatedRows);
  }

  async nextDueAt(): Promise<number | null> {
    const row = await this.#db
      .selectFrom('recipients')
      .select((eb) => eb.fn.min<number>('next_attempt_at').as('due'))
      .where('state', 'in', PENDING)
      .executeTakeFirst();
    return row?.due == null ? null : Number(row.due);
  }

  async listQueue(options: { limit?: number } = {}): Promise<QueueSummary[]> {
    const rows = await this.#db
      .selectFrom('messages as m')
      .innerJoin('recipients as r', 'r.queue_id', 'm.queue_id')
      .select((eb) => [
        'm.queue_id',
        'm.sender',
        'm.received_at',
        'm.size',
        eb.fn.countAll<number>().as('recipients'),
        eb.fn.sum<number>(eb.case().when('r.state', 'in', NOT_FINAL).then(1).else(0).end()).as('pending'),
        eb.fn.min<number>(eb.case().when('r.state', 'in', PENDING).then(eb.ref('r.next_attempt_at')).end()).as('next'),
        eb.fn.max<string>('r.last_response').as('last_response'),
      ])
      .where('m.active', '=', 1)
      .groupBy(['m.queue_id', 'm.sender', 'm.received_at', 'm.size'])
      .orderBy('m.received_at')
      .limit(options.limit ?? 1000)
      .execute();
    return rows.map((r) => ({
      queueId: r.queue_id,
      sender: r.sender,
      receivedAt: Number(r.received_at),
      size: Number(r.size),
      recipients: Number(r.recipients),
      pending: Number(r.pending),
      nextAttemptAt: r.next == null ? null : Number(r.next),
      lastResponse: r.last_response ?? null,
    }));
  }

  async getMessage(queueId: string): Promise<QueuedMessage | undefined> {
    const [m] = await this.#loadMessages([queueId]);
    return m;
  }

  async retryNow(queueId: string | undefined, now: number): Promise<number> {
    let q = this.#db.updateTable('recipients').set({ next_attempt_at: now, updated_at: now }).where('state', 'in', PENDING);
    if (queueId) q = q.where('queue_id', '=', queueId);
    const result = await q.executeTakeFirst();
    return Number(result.numUpdatedRows);
  }

  async deleteMessage(queueId: string): Promise<boolean> {
    const result = await this.#db.deleteFrom('messages').where('queue_id', '=', queueId).executeTakeFirst();
    await this.#spool.remove(queueId);
    return Number(result.numDeletedRows) > 0;
  }

  async countRecipients(): Promise<Record<RecipientState, number>> {
    const rows = await this.#db
      .selectFrom('recipients')
      .select((eb) => ['state', eb.fn.countAll<number>().as('n')])
      .groupBy('state')
      .execute();
    const counts: Record<RecipientState, number> = { queued: 0, in_flight: 0, deferred: 0, delivered: 0, failed: 0 };
    for (const r of rows) counts[r.state as RecipientState] = Number(r.n);
    return counts;
  }

  // ---- security -------------------------------------------------------------------------

  async recordSecurityEvent(event: NewSecurityEvent): Promise<void> {
    await this.#db
      .insertInto('security_events')
      .values({
        at: event.at ?? Date.now(),
        kind: event.kind,
        account: event.account ?? null,
        ip: event.ip ?? null,
        listener: event.listener ?? null,
        detail: JSON.stringify(event.detail),
      })
      .execute();
  }

  async listSecurityEvents(options: { since?: number; limit?: number } = {}): Promise<SecurityEvent[]> {
    const rows = await this.#db
      .selectFrom('security_events')
      .selectAll()
      .where('at', '>=', options.since ?? 0)
      .orderBy('id', 'desc')
      .limit(options.limit ?? 1000)
      .execute();
    return rows.reverse().map((r) => ({
      id: r.id,
      at: Number(r.at),
      kind: r.kind as SecurityEvent['kind'],
      account: r.account,
      ip: r.ip,
      listener: r.listener,
      detail: JSON.parse(r.detail) as SecurityEvent['detail'],
    }));
  }

  async recordAudit(entry: Omit<AuditEntry, 'id' | 'at'> & { at?: number }): Promise<void> {
    await this.#db
      .insertInto('audit_log')
      .values({ at: entry.at ?? Date.now(), actor: entry.actor, action: entry.action, target: entry.target, detail: JSON.stringify(entry.detail) })
      .execute();
  }

  async listAudit(options: { since?: number; limit?: number } = {}): Promise<AuditEntry[]> {
    const rows = await this.#db
      .selectFrom('audit_log')
      .selectAll()
      .where('at', '>=', options.since ?? 0)
      .orderBy('id', 'desc')
      .limit(options.limit ?? 1000)
      .execute();
    return rows.reverse().map((r) => ({ ...r, at: Number(r.at), detail: JSON.parse(r.detail) as Record<string, unknown> }));
  }

  async noteAccountNetwork(account: string, network: string, now: number): Promise<boolean> {
    const result = await this.#db
      .insertInto('account_networks')
      .values({ account: account.toLowerCase(), network, first_seen: now })
      .onConflict((oc) => oc.doNothing())
      .executeTakeFirst();
    return Number(result.numInsertedOrUpdatedRows ?? 0) > 0;
  }

  async listAccountNetworks(account: string): Promise<{ network: string; firstSeen: number }[]> {
    const rows = await this.#db
      .selectFrom('account_networks')
      .select(['network', 'first_seen'])
      .where('account', '=', account.toLowerCase())
      .orderBy('first_seen')
      .execute();
    return rows.map((r) => ({ network: r.network, firstSeen: Number(r.first_seen) }));
  }

  async usageSince(who: { account: string } | { clientIp: string }, since: number): Promise<Usage> {
    let q = this.#db
      .selectFrom('messages as m')
      .leftJoin('recipients as r', 'r.queue_id', 'm.queue_id')
      .select((eb) => [
        eb.fn.count<number>('m.queue_id').distinct().as('messages'),
        eb.fn.count<number>('r.idx').as('recipients'),
        eb.fn.min<number>('m.received_at').as('oldest'),
      ])
      .where('m.received_at', '>=', since);
    q = 'account' in who ? q.where('m.account', '=', who.account.toLowerCase()) : q.where('m.client_ip', '=', who.clientIp);
    const row = await q.executeTakeFirst();
    return {
      messages: Number(row?.messages ?? 0),
      recipients: Number(row?.recipients ?? 0),
      oldestAt: row?.oldest == null ? null : Number(row.oldest),
    };
  }

  counter(options: CounterOptions): RateLimiterAbstract {
    return new RateLimiterSQLite({
      storeClient: this.#counters,
      storeType: 'better-sqlite3',
      tableName: 'counters',
      tableCreated: true,
      keyPrefix: options.keyPrefix,
      points: options.points,
      duration: options.duration,
      blockDuration: options.blockDuration ?? 0,
    });
  }

  async close(): Promise<void> {
    // Let a scheduled group commit finish: its callers are waiting to send 250.
    while (this.#flushScheduled || this.#pending.length > 0) await new Promise((r) => setImmediate(r));
    await this.#flushing;
    await this.#db.destroy();
    this.#counters.close();
  }

  async #loadMessages(ids: string[]): Promise<QueuedMessage[]> {
    if (ids.length === 0) return [];
    const messages = await this.#db.selectFrom('messages').selectAll().where('queue_id', 'in', ids).execute();
    const recipients = await this.#db
      .selectFrom('recipients')
      .selectAll()
      .where('queue_id', 'in', ids)
      .orderBy('queue_id')
      .orderBy('idx')
      .execute();
    const byId = new Map<string, QueuedRecipient[]>();
    for (const r of recipients) {
      const list = byId.get(r.queue_id) ?? [];
      list.push(toRecipient(r));
      byId.set(r.queue_id, list);
    }
    return messages.map((m) => ({
      queueId: m.queue_id,
      sender: m.sender,
      size: Number(m.size),
      receivedAt: Number(m.received_at),
      expiresAt: Number(m.expires_at),
      origin: {
        sessionId: m.session_id,
        listener: m.listener,
        clientIp: m.client_ip,
        account: m.account ?? undefined,
        heloName: m.helo_name ?? undefined,
      },
      messageIdHeader: m.message_id_header ?? undefined,
      dsnEnvid: m.dsn_envid ?? undefined,
      dsnRet: (m.dsn_ret as 'FULL' | 'HDRS' | null) ?? undefined,
      recipients: byId.get(m.queue_id) ?? [],
    }));
  }
}

async function insertMessage(trx: Transaction<Database>, message: NewMessage): Promise<void> {
  await trx
    .insertInto('messages')
    .values({
      queue_id: message.queueId,
      sender: message.sender,
      size: message.size,
      received_at: message.receivedAt,
      expires_at: message.expiresAt,
      session_id: message.origin.sessionId,
      listener: message.origin.listener,
      client_ip: message.origin.clientIp,
      account: message.origin.account ?? null,
      helo_name: message.origin.heloName ?? null,
      message_id_header: message.messageIdHeader ?? null,
      dsn_envid: message.dsnEnvid ?? null,
      dsn_ret: message.dsnRet ?? null,
      active: 1,
    })
    .execute();
  await trx
    .insertInto('recipients')
    .values(
      message.recipients.map((r, idx) => ({
        queue_id: message.queueId,
        idx,
        address: r.address,
        domain: domainOf(r.address),
        state: 'queued',
        attempts: 0,
        next_attempt_at: message.receivedAt,
        last_code: null,
        last_response: null,
        notify: r.notify?.join(',') ?? null,
        orcpt: r.orcpt ?? null,
        updated_at: message.receivedAt,
      })),
    )
    .execute();
}

export function domainOf(address: string): string {
  return address.slice(address.lastIndexOf('@') + 1).toLowerCase();
}

function toAccount(row: AccountsTable): Account {
  return {
    address: row.address,
    passwordHash: row.password_hash,
    smtpAuth: row.smtp_auth === 1,
    enabled: row.enabled === 1,
    policy: JSON.parse(row.policy || '{}') as AccountPolicy,
    createdAt: Number(row.created_at),
    updatedAt: Number(row.updated_at),
  };
}

function toRecipient(r: RecipientsTable): QueuedRecipient {
  return {
    index: r.idx,
    address: r.address,
    domain: r.domain,
    state: r.state as RecipientState,
    attempts: r.attempts,
    nextAttemptAt: Number(r.next_attempt_at),
    lastCode: r.last_code,
    lastResponse: r.last_response,
    notify: r.notify ? r.notify.split(',') : null,
    orcpt: r.orcpt,
    updatedAt: Number(r.updated_at),
  };
}
