// The embedded default store: SQLite (WAL) for rows and small bodies, a file spool for big bodies.
//
// Durability: `enqueue` resolves only after the message's rows and its body are on disk. Rows and
// inline bodies commit in one transaction, and the WAL is fsync'd after the COMMIT, off the event
// loop (wal-sync.ts), before the promise resolves; a spilled body's file was fsync'd by BodyWriter.finish() and the spool directory is fsync'd before
// the rows that point at it commit. Nothing the 250 depends on is in memory only.
//
// Group commit (group-commit.ts): `enqueue` calls arriving in the same turn of the event loop share
// one transaction, one fsync of the WAL and (only if some have file bodies) one fsync of the spool
// directory. `recordOutcomes` calls are grouped the same way, in transactions of their own.
//
// Delivery bookkeeping (claimDue, recordOutcomes) commits with synchronous=NORMAL, no fsync: if a
// power cut loses it, recipients are delivered again, never lost (see #commitOutcomes). WAL
// commits are ordered, so the next WAL fsync makes those earlier ones durable as well. Cold paths
// (accounts, security events, queue commands) run at the connection's synchronous=FULL.
//
// Hot paths (enqueue, claimDue, recordOutcomes, nextDueAt, getAccount, readBody) use statements
// prepared once on the raw better-sqlite3 handle (sqlite-statements.ts); the rest goes through
// Kysely. All multi-statement transactions use the raw handle: Kysely here only runs single
// statements (each its own implicit transaction), so the two never nest on the shared connection.
import path from 'node:path';
import { Readable } from 'node:stream';
import BetterSqlite3 from 'better-sqlite3';
import { type RateLimiterAbstract, RateLimiterSQLite } from 'rate-limiter-flexible';
import { Kysely, Migrator, SqliteDialect } from 'kysely';
import { FileSpool } from '../file-spool.js';
import { GroupCommit, type ItemResult } from '../group-commit.js';
import { type FinishedBody, SpillingBodyWriter } from '../spilling-body-writer.js';
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
import { type AccountsTable, type Database, type MessagesTable, type RecipientsTable, migrationProvider } from './sqlite-schema.js';
import { type SqliteStatements, prepareStatements } from './sqlite-statements.js';
import { WalSync } from './wal-sync.js';

const PENDING: RecipientState[] = ['queued', 'deferred'];
const NOT_FINAL: RecipientState[] = ['queued', 'deferred', 'in_flight'];

/** How long a cold-path statement (accounts, security events, queue commands) waits for a lock. */
const COLD_BUSY_TIMEOUT_MS = 5000;
/**
 * Hot paths (enqueue, claim, outcomes) never let SQLite sleep on the event loop when another
 * connection holds the write lock (busy_timeout 0): they wait asynchronously, 1 ms and doubling,
 * and try again, until HOT_BUSY_DEADLINE_MS; after that the caller gets SQLITE_BUSY (the intake
 * answers 451 4.3.0). The other connection is most often this process's own delivery thread,
 * whose transactions take well under a millisecond.
 */
const HOT_BUSY_TIMEOUT_MS = 0;
const HOT_BUSY_DEADLINE_MS = 5000;

/** Bodies up to this size are kept inline in the database; bigger ones spill to the spool. */
export const INLINE_BODY_MAX = 64 * 1024;

export interface SqliteStoreOptions {
  /** Directory holding postern.db and spool/. */
  dataDir: string;
  /** Largest body kept inline in the database, in bytes (default INLINE_BODY_MAX). */
  inlineBodyMax?: number;
  /** Checkpoint the WAL automatically from this connection (default true; see open-store.ts). */
  checkpoints?: boolean;
}

interface OutcomeCall {
  queueId: string;
  outcomes: RecipientOutcome[];
  now: number;
}

interface ClaimedRows {
  message: MessagesTable;
  recipients: RecipientsTable[];
}

/** What recordOutcomes found for one message: still open, or final with its body inline or a file. */
type OutcomeEffect = 'open' | 'final_inline' | 'final_file';

export async function openSqliteStore(options: SqliteStoreOptions): Promise<SqliteStore> {
  const spool = new FileSpool(path.join(options.dataDir, 'spool'));
  const databaseFile = path.join(options.dataDir, 'postern.db');
  const sqlite = new BetterSqlite3(databaseFile);
  try {
    // The first statement that reads the file: a damaged or foreign file fails here.
    sqlite.pragma('journal_mode = WAL');
  } catch (err) {
    sqlite.close();
    throw new Error(`cannot open the store ${databaseFile}: ${(err as Error).message}. Nothing was changed; restore it from a backup or move it away to start with an empty queue`);
  }
  // FULL: a commit is on disk when it returns. The hot paths relax it to NORMAL and, where the
  // commit must be durable, fsync the WAL off the event loop (see SqliteStore.#hot).
  sqlite.pragma('synchronous = FULL');
  sqlite.pragma('foreign_keys = ON');
  // 0: this connection never checkpoints; another one (the delivery thread's) does.
  if (options.checkpoints === false) sqlite.pragma('wal_autocheckpoint = 0');
  // Statement and savepoint journals (a group commit has a savepoint per message) in memory: they
  // are small, and as temp files they would bring back the file create/unlink churn.
  sqlite.pragma('temp_store = MEMORY');
  // The CLI writes to the same file while the server runs. Cold paths wait up to 5 s for its
  // lock; the hot paths wait in short, asynchronous steps instead (SqliteStore.#hot).
  sqlite.pragma(`busy_timeout = ${COLD_BUSY_TIMEOUT_MS}`);
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
  const wal = await WalSync.open(databaseFile);
  return new SqliteStore({ db, sqlite, spool, counters, wal, inlineBodyMax: options.inlineBodyMax ?? INLINE_BODY_MAX });
}

export class SqliteStore implements Store {
  readonly kind = 'sqlite' as const;
  readonly #db: Kysely<Database>;
  /** The same connection as #db, without Kysely: for the prepared hot-path statements. */
  readonly #sqlite: BetterSqlite3.Database;
  readonly #sql: SqliteStatements;
  readonly #spool: FileSpool;
  readonly #counters: BetterSqlite3.Database;
  /** #counters as rate-limiter-flexible sees it (see withStatementCache). */
  readonly #countersClient: StatementCachingClient;
  /** fsyncs the WAL after hot-path commits, off the event loop. */
  readonly #wal: WalSync;
  readonly #inlineBodyMax: number;
  /**
   * Bodies whose writer has finished and whose message is not enqueued yet: the bytes of an
   * inline body (at most #inlineBodyMax each), or null for a body in the spool. Entries are added
   * by finish(), not createBody(), so a writer abandoned mid-body holds nothing here.
   */
  readonly #finishedBodies = new Map<string, FinishedBody>();
  readonly #enqueues: GroupCommit<NewMessage>;
  readonly #outcomes: GroupCommit<OutcomeCall>;
  readonly #enqueueBatch: BatchTransaction<NewMessage, void>;
  readonly #outcomeBatch: BatchTransaction<OutcomeCall, OutcomeEffect>;
  readonly #claim: BetterSqlite3.Transaction<(now: number, limit: number) => ClaimedRows[]>;

  constructor(options: {
    db: Kysely<Database>;
    sqlite: BetterSqlite3.Database;
    spool: FileSpool;
    counters: BetterSqlite3.Database;
    wal: WalSync;
    inlineBodyMax?: number;
  }) {
    this.#db = options.db;
    this.#sqlite = options.sqlite;
    this.#spool = options.spool;
    this.#counters = options.counters;
    this.#countersClient = withStatementCache(options.counters);
    this.#wal = options.wal;
    this.#inlineBodyMax = options.inlineBodyMax ?? INLINE_BODY_MAX;
    const sql = prepareStatements(this.#sqlite);
    this.#sql = sql;

    this.#enqueueBatch = batchTransaction(this.#sqlite, (message: NewMessage) => {
      insertMessage(sql, message);
      const inline = this.#finishedBodies.get(message.queueId)?.inline;
      if (inline != null) sql.insertBody.run(message.queueId, inline);
    });

    this.#outcomeBatch = batchTransaction(this.#sqlite, ({ queueId, outcomes, now }: OutcomeCall): OutcomeEffect => {
      for (const o of outcomes) {
        sql.recordOutcome.run({
          queue_id: queueId,
          idx: o.index,
          state: o.state,
          attempt: o.countsAsAttempt === false ? 0 : 1,
          code: o.code,
          response: o.response,
          next_attempt_at: o.nextAttemptAt ?? now,
          now,
        });
      }
      if (sql.hasOpenRecipients.get(queueId) !== undefined) return 'open';
      // Every recipient is final: the body goes, in this same transaction when it is inline.
      sql.deactivateMessage.run(queueId);
      return sql.deleteBody.run(queueId).changes > 0 ? 'final_inline' : 'final_file';
    });

    this.#claim = this.#sqlite.transaction((now: number, limit: number) => {
      // The oldest due recipients first, until `limit` distinct messages; the iterator stops
      // reading the index there (its statement must be done before the UPDATEs run).
      const ids = new Set<string>();
      for (const id of sql.dueQueueIds.iterate(now)) {
        ids.add(id);
        if (ids.size >= limit) break;
      }
      const claimed: ClaimedRows[] = [];
      for (const id of ids) {
        // RETURNING: exactly the rows this call moved to in_flight. Recipients of the same message
        // already in flight (claimed earlier, still being delivered) are not handed out again.
        const recipients = sql.claimRecipients.all(now, id, now);
        const message = recipients.length > 0 ? sql.selectMessage.get(id) : undefined;
        if (message) claimed.push({ message, recipients: recipients.sort((a, b) => a.idx - b.idx) });
      }
      return claimed;
    });

    this.#enqueues = new GroupCommit((messages) => this.#commitEnqueues(messages));
    this.#outcomes = new GroupCommit((calls) => this.#commitOutcomes(calls));
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

  /** Called at every AUTH: a prepared statement. */
  async getAccount(address: string): Promise<Account | undefined> {
    const row = this.#sql.selectAccount.get(address.toLowerCase());
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
    this.#spool.pathFor(queueId); // validates the id now, as the file spool always did
    return new SpillingBodyWriter({
      queueId,
      spool: this.#spool,
      threshold: this.#inlineBodyMax,
      onFinished: (id, body) => this.#finishedBodies.set(id, body),
      onAborted: (id) => this.#finishedBodies.delete(id),
    });
  }

  /** The inline body from its row, else the spool file. Problems surface as stream errors. */
  readBody(queueId: string): Readable {
    let row: { data: Buffer } | undefined;
    try {
      row = this.#sql.selectBody.get(queueId);
    } catch (err) {
      return new Readable({
        read() {
          this.destroy(err as Error);
        },
      });
    }
    if (row) {
      // One chunk, pushed at the first read: Readable.from would run an async iterator for it.
      const data = row.data;
      return new Readable({
        read() {
          this.push(data);
          this.push(null);
        },
      });
    }
    return this.#spool.read(queueId);
  }

  enqueue(message: NewMessage): Promise<void> {
    return this.#enqueues.submit(message);
  }

  /**
   * One group commit of enqueues. A message whose body is a file (or unknown to this store: a
   * caller that wrote it some other way) needs the spool directory fsync'd first, so the file's
   * directory entry is as durable as the row pointing at it; a batch of inline bodies skips that.
   */
  async #commitEnqueues(messages: NewMessage[]): Promise<ItemResult<void>[]> {
    const inSpool = (m: NewMessage) => this.#finishedBodies.get(m.queueId)?.inline == null;
    const results: (ItemResult<void> | undefined)[] = messages.map(() => undefined);
    if (messages.some(inSpool)) {
      try {
        await this.#spool.syncDirectory();
      } catch (err) {
        // Those bodies are not durable: refuse their messages, commit the inline ones.
        messages.forEach((m, i) => {
          if (inSpool(m)) results[i] = { ok: false, error: err as Error };
        });
      }
    }
    const ready = messages.filter((_, i) => results[i] === undefined);
    // Committed at NORMAL, then the WAL is fsync'd on the thread pool; only then do the callers
    // hear "committed". An fsync error refuses the whole batch: its rows are in the database but
    // may not be on disk, so the client must not get a 250 (if it sends again, the message may be
    // delivered twice, never lost).
    let committed = ready.length > 0 ? await this.#hot(() => this.#enqueueBatch(ready)) : [];
    if (committed.some((r) => r.ok)) {
      try {
        await this.#wal.sync();
      } catch (err) {
        committed = committed.map(() => ({ ok: false, error: err as Error }));
      }
    }
    let next = 0;
    return messages.map((m, i) => {
      const result = results[i] ?? committed[next++]!;
      // Committed: the body is in the database or its file is durable; forget the buffer. A
      // refused message keeps its entry until the caller's abort().
      if (result.ok) this.#finishedBodies.delete(m.queueId);
      return result;
    });
  }

  async claimDue(now: number, limit: number): Promise<QueuedMessage[]> {
    if (limit <= 0) return [];
    // IMMEDIATE: take the write lock before reading, so another process (the CLI) cannot change
    // the rows between our SELECT and UPDATE. Within this process better-sqlite3 is synchronous,
    // so two claimDue calls never interleave. Relaxed: a claim lost in a power cut only means
    // releaseInFlight would have put the recipients back anyway.
    const claimed = await this.#hot(() => this.#claim.immediate(now, limit));
    return claimed.map(({ message, recipients }) => toQueuedMessage(message, recipients.map(toRecipient)));
  }

  recordOutcomes(queueId: string, outcomes: RecipientOutcome[], now: number): Promise<void> {
    return this.#outcomes.submit({ queueId, outcomes, now });
  }

  /**
   * One group commit of delivery outcomes, at synchronous=NORMAL: COMMIT does not wait for an
   * fsync. Why that is safe: in WAL mode a NORMAL commit survives a crash of the process (kill -9)
   * and can be lost only with the OS or the power, and then it is lost whole. A lost outcome
   * leaves its recipients as they were before the attempt: in_flight, which releaseInFlight undoes
   * at the next start (or due, if the claim was lost too), so they are delivered again:
   * at-least-once, a possible duplicate, never lost mail. A lost "final" also keeps the inline
   * body, since its DELETE was in the same transaction. The next FULL commit (any enqueue) fsyncs
   * the WAL, and with it these frames too.
   * One exception: a message whose body is a file and whose last recipient becomes final gets its
   * file unlinked after the commit, and an unlink can reach the disk before a NORMAL commit does;
   * the message would then come back without a body. So when a batch finished such a message, the
   * WAL is fsync'd before any file is unlinked.
   */
  async #commitOutcomes(calls: OutcomeCall[]): Promise<ItemResult<void>[]> {
    const results = await this.#hot(() => this.#outcomeBatch(calls));
    if (results.some((r) => r.ok && r.value === 'final_file')) {
      // Should the fsync fail, the files stay; releaseInFlight removes those of finished messages
      // at the next start.
      const synced = await this.#wal.sync().then(
        () => true,
        () => false,
      );
      if (!synced) return results.map((r) => (r.ok ? { ok: true, value: undefined } : r));
    }
    const removals: Promise<void>[] = [];
    calls.forEach((c, i) => {
      const result = results[i]!;
      // A failed unlink is not the caller's failure (the outcome is committed); releaseInFlight
      // removes the files of finished messages at the next start.
      if (result.ok && result.value === 'final_file') removals.push(this.#spool.remove(c.queueId).catch(() => undefined));
    });
    await Promise.all(removals);
    return results.map((r) => (r.ok ? { ok: true, value: undefined } : r));
  }

  /**
   * Runs `fn`, one hot-path transaction begun with BEGIN IMMEDIATE, with synchronous=NORMAL and a
   * busy timeout of 0, then puts the cold-path settings back. Why:
   * - NORMAL: COMMIT does not fsync on the event loop; the callers that need durability (enqueue)
   *   fsync the WAL afterwards on the thread pool (wal-sync.ts). FULL is the setting at every other
   *   moment, so every cold-path write is fsync'd at COMMIT.
   * - IMMEDIATE and no busy timeout: while another connection (the delivery thread, the CLI, a
   *   backup, a person with the sqlite3 shell) holds the write lock, the whole batch fails at
   *   BEGIN at once instead of each item blocking the event loop for up to 5 s; it is retried
   *   after an asynchronous pause, so every SMTP session keeps being served meanwhile.
   * The pragmas may change between transactions on a connection; `fn` is synchronous, so nothing
   * else runs on the connection in between.
   */
  async #hot<T>(fn: () => T): Promise<T> {
    const deadline = Date.now() + HOT_BUSY_DEADLINE_MS;
    for (let pause = 1; ; pause = Math.min(pause * 2, 100)) {
      this.#sqlite.exec(`PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = ${HOT_BUSY_TIMEOUT_MS}`);
      try {
        return fn();
      } catch (err) {
        if (!isBusy(err) || Date.now() + pause > deadline) throw err;
      } finally {
        this.#sqlite.exec(`PRAGMA synchronous = FULL; PRAGMA busy_timeout = ${COLD_BUSY_TIMEOUT_MS}`);
      }
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
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
    const due = this.#sql.nextDueAt.get();
    return due == null ? null : Number(due);
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
    // An inline body goes with the row (ON DELETE CASCADE, same statement); a file is removed
    // after (a no-op when the body was inline).
    const result = await this.#db.deleteFrom('messages').where('queue_id', '=', queueId).executeTakeFirst();
    await this.#spool.remove(queueId);
    return Number(result.numDeletedRows) > 0;
  }

  async purgeFinished(before: number, limit: number): Promise<number> {
    // `active` is 0 once every recipient is final (and the body is gone with it); the
    // messages_active index (active, received_at) finds the oldest ones without a scan. The
    // recipients go by ON DELETE CASCADE.
    const oldest = this.#db
      .selectFrom('messages')
      .select('queue_id')
      .where('active', '=', 0)
      .where('received_at', '<', before)
      .orderBy('received_at')
      .limit(limit);
    const result = await this.#db.deleteFrom('messages').where('queue_id', 'in', oldest).executeTakeFirst();
    return Number(result.numDeletedRows);
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

  async purgeSecurityEvents(before: number, limit: number): Promise<number> {
    const oldest = this.#db.selectFrom('security_events').select('id').where('at', '<', before).orderBy('at').limit(limit);
    const result = await this.#db.deleteFrom('security_events').where('id', 'in', oldest).executeTakeFirst();
    return Number(result.numDeletedRows);
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
    // One range of messages_account_time or messages_ip_time, which hold the recipient count too
    // (migration 0004): the table and the recipients are not read.
    let q = this.#db
      .selectFrom('messages')
      .select((eb) => [
        eb.fn.countAll<number>().as('messages'),
        eb.fn.sum<number>('recipient_count').as('recipients'),
        eb.fn.min<number>('received_at').as('oldest'),
      ])
      .where('received_at', '>=', since);
    q = 'account' in who ? q.where('account', '=', who.account.toLowerCase()) : q.where('client_ip', '=', who.clientIp);
    const row = await q.executeTakeFirst();
    return {
      messages: Number(row?.messages ?? 0),
      recipients: Number(row?.recipients ?? 0),
      oldestAt: row?.oldest == null ? null : Number(row.oldest),
    };
  }

  counter(options: CounterOptions): RateLimiterAbstract {
    return new RateLimiterSQLite({
      storeClient: this.#countersClient,
      storeType: 'better-sqlite3',
      tableName: 'counters',
      tableCreated: true,
      keyPrefix: options.keyPrefix,
      points: options.points,
      duration: options.duration,
      blockDuration: options.blockDuration ?? 0,
    });
  }

  /**
   * Checkpoints the WAL: SQLite's automatic checkpoint only runs when this connection commits, and
   * the delivery side may sit idle while the intake (which does not checkpoint, see open-store.ts)
   * keeps writing. PASSIVE never waits for other readers or writers; what it cannot copy now, the
   * next call does. With nothing new in the WAL it costs next to nothing.
   */
  async housekeeping(): Promise<void> {
    this.#sqlite.pragma('wal_checkpoint(PASSIVE)');
  }

  /**
   * `shrink_memory` frees every page of the connection's cache that no statement holds. Measured
   * on 2026-11-29: 30,000 messages queued and delivered through one store, 96 MB resident after a
   * full collection and malloc_trim, 77 MB with this first; `postern serve` with delivery in the
   * main thread (one connection), after the bench's load, glibc's heap 8.5 MB against 25.2. With
   * the delivery thread the two connections empty each other's caches at nearly every commit (a
   * WAL change by another connection resets a cache), so there it gives back little.
   */
  releaseMemory(): void {
    this.#sqlite.pragma('shrink_memory');
    this.#counters.pragma('shrink_memory');
  }

  async close(): Promise<void> {
    // Let scheduled group commits finish: their callers are waiting (to send 250, for one).
    await this.#enqueues.drain();
    await this.#outcomes.drain();
    this.#finishedBodies.clear();
    await this.#wal.close();
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
    return messages.map((m) => toQueuedMessage(m, byId.get(m.queue_id) ?? []));
  }
}

function insertMessage(sql: SqliteStatements, message: NewMessage): void {
  sql.insertMessage.run({
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
    recipient_count: message.recipients.length,
  });
  message.recipients.forEach((r, idx) => {
    sql.insertRecipient.run({
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
    });
  });
}

/** Another connection holds the lock: worth trying again. */
function isBusy(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED' || (typeof code === 'string' && code.startsWith('SQLITE_BUSY_'));
}

/** One BEGIN IMMEDIATE transaction for a batch, with a result per item. */
type BatchTransaction<T, R> = (items: T[]) => ItemResult<R>[];

/**
 * A batch runs as one plain transaction; only when one of its items fails is it rolled back and
 * run again with a savepoint per item, so that the failing item is refused alone and the rest
 * commit. Why not the savepoints every time: they cost about a third of an enqueue's SQL (a batch
 * of 20 inline 4 KiB messages in one process: 65 against 47 us per message with better-sqlite3
 * alone, 113 against 97 us through the whole store), and an item fails almost never (a duplicate
 * queue id, a constraint a bug broke). A busy lock fails the first BEGIN and is thrown as it is,
 * for #hot to retry; so is a failure of the second run as a whole (COMMIT on a full disk, say),
 * which the group commit hands to every item.
 */
function batchTransaction<T, R>(db: BetterSqlite3.Database, one: (item: T) => R): BatchTransaction<T, R> {
  const together = db.transaction((items: T[]) => items.map((item): ItemResult<R> => ({ ok: true, value: one(item) })));
  const alone = db.transaction(one);
  const separately = db.transaction((items: T[]) => items.map((item) => attempt(() => alone(item))));
  return (items) => {
    try {
      return together.immediate(items);
    } catch (err) {
      if (isBusy(err)) throw err;
      return separately.immediate(items);
    }
  };
}

/** Runs one item of a batch: its error is its own. */
function attempt<R>(fn: () => R): ItemResult<R> {
  try {
    return { ok: true, value: fn() };
  } catch (err) {
    return { ok: false, error: err as Error };
  }
}

function toQueuedMessage(m: MessagesTable, recipients: QueuedRecipient[]): QueuedMessage {
  return {
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
    recipients,
  };
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

/** The two methods of a better-sqlite3 connection that RateLimiterSQLite calls. */
interface StatementCachingClient {
  prepare(sql: string): BetterSqlite3.Statement;
  transaction<F extends (...args: never[]) => unknown>(fn: F): BetterSqlite3.Transaction<F>;
}

/**
 * RateLimiterSQLite prepares its SQL again on every call: two compilations per AUTH (the lockout
 * looks at the address and at the username), 4% of the CPU of a new connection. Its statements
 * are a handful of fixed texts, so each is prepared once here and reused.
 */
function withStatementCache(db: BetterSqlite3.Database): StatementCachingClient {
  const statements = new Map<string, BetterSqlite3.Statement>();
  return {
    prepare(sql) {
      let statement = statements.get(sql);
      if (!statement) {
        statement = db.prepare(sql);
        statements.set(sql, statement);
      }
      return statement;
    },
    transaction: (fn) => db.transaction(fn),
  };
}
