// The hot paths' SQL, prepared once per connection and reused.
//
// Why not Kysely here: Kysely's SQLite driver has better-sqlite3 prepare every statement again on
// every call, and its builder and driver layers cost more than the query itself. recordOutcomes
// measured about 260 us of CPU through Kysely against 16 us as prepared statements, on a thread
// that also serves every SMTP session. Kysely stays for migrations and the cold queries
// (`queue list`, the CLI, security events), where readability matters more.
//
// State lists are SQL literals, never parameters, and the due queries name their index: SQLite
// can use the partial index `recipients_due ... WHERE state IN ('queued', 'deferred')` only when
// the query's WHERE visibly implies the index's, which bound parameters never do. Without
// `INDEXED BY` the planner still preferred `recipients_state` (scanning every pending row, and
// sorting them); with it a bound state list would fail loudly ("no query solution") instead of
// silently scanning.
import type BetterSqlite3 from 'better-sqlite3';
import type { AccountsTable, MessagesTable, RecipientsTable } from './sqlite-schema.js';

export interface OutcomeRow {
  queue_id: string;
  idx: number;
  state: string;
  /** 1 when the outcome counts as an attempt, else 0. */
  attempt: number;
  code: number | null;
  response: string;
  next_attempt_at: number;
  now: number;
}

export type SqliteStatements = ReturnType<typeof prepareStatements>;

export function prepareStatements(db: BetterSqlite3.Database) {
  return {
    // ---- enqueue
    insertMessage: db.prepare<[MessagesTable]>(
      `INSERT INTO messages (queue_id, sender, size, received_at, expires_at, session_id, listener, client_ip,
         account, helo_name, message_id_header, dsn_envid, dsn_ret, active, recipient_count)
       VALUES (@queue_id, @sender, @size, @received_at, @expires_at, @session_id, @listener, @client_ip,
         @account, @helo_name, @message_id_header, @dsn_envid, @dsn_ret, @active, @recipient_count)`,
    ),
    insertRecipient: db.prepare<[RecipientsTable]>(
      `INSERT INTO recipients (queue_id, idx, address, domain, state, attempts, next_attempt_at, last_code,
         last_response, notify, orcpt, updated_at)
       VALUES (@queue_id, @idx, @address, @domain, @state, @attempts, @next_attempt_at, @last_code,
         @last_response, @notify, @orcpt, @updated_at)`,
    ),
    insertBody: db.prepare<[string, Buffer]>('INSERT INTO bodies (queue_id, data) VALUES (?, ?)'),

    // ---- bodies
    selectBody: db.prepare<[string], { data: Buffer }>('SELECT data FROM bodies WHERE queue_id = ?'),
    hasInlineBody: db.prepare<[string], { one: 1 }>('SELECT 1 AS one FROM bodies WHERE queue_id = ?'),
    deleteBody: db.prepare<[string]>('DELETE FROM bodies WHERE queue_id = ?'),

    // ---- claimDue: oldest due first, straight from the partial index (no sort)
    dueQueueIds: db
      .prepare<[number], string>(
        `SELECT queue_id FROM recipients INDEXED BY recipients_due
         WHERE state IN ('queued', 'deferred') AND next_attempt_at <= ?
         ORDER BY next_attempt_at`,
      )
      .pluck(),
    /** Claims a message's due recipients and returns exactly the rows it changed. */
    claimRecipients: db.prepare<[number, string, number], RecipientsTable>(
      `UPDATE recipients SET state = 'in_flight', updated_at = ?
       WHERE queue_id = ? AND state IN ('queued', 'deferred') AND next_attempt_at <= ?
       RETURNING *`,
    ),
    selectMessage: db.prepare<[string], MessagesTable>('SELECT * FROM messages WHERE queue_id = ?'),

    // ---- recordOutcomes
    recordOutcome: db.prepare<[OutcomeRow]>(
      `UPDATE recipients SET state = @state, attempts = attempts + @attempt, last_code = @code,
         last_response = @response, next_attempt_at = @next_attempt_at, updated_at = @now
       WHERE queue_id = @queue_id AND idx = @idx`,
    ),
    hasOpenRecipients: db
      .prepare<[string], 1>(
        `SELECT 1 FROM recipients WHERE queue_id = ? AND state IN ('queued', 'deferred', 'in_flight') LIMIT 1`,
      )
      .pluck(),
    deactivateMessage: db.prepare<[string]>('UPDATE messages SET active = 0 WHERE queue_id = ?'),

    // ---- scheduler and AUTH
    nextDueAt: db
      .prepare<[], number | null>(
        `SELECT MIN(next_attempt_at) FROM recipients INDEXED BY recipients_due WHERE state IN ('queued', 'deferred')`,
      )
      .pluck(),
    selectAccount: db.prepare<[string], AccountsTable>('SELECT * FROM accounts WHERE address = ?'),
    // No PRAGMA here: SQLite applies `PRAGMA synchronous = ...` while preparing it, so a cached
    // pragma statement would take effect once, at prepare time, and never again (see #hot in sqlite-store.ts).
  };
}
