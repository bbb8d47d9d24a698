// Table types and migrations for the embedded SQLite store. Migrations use Kysely's schema builder
// so the PostgreSQL backend can share their shape.
import { type Generated, type Kysely, type Migration, type MigrationProvider, sql } from 'kysely';

export interface AccountsTable {
  address: string;
  password_hash: string;
  smtp_auth: number;
  enabled: number;
  /** AccountPolicy as JSON. */
  policy: string;
  created_at: number;
  updated_at: number;
}

export interface MessagesTable {
  queue_id: string;
  sender: string;
  size: number;
  received_at: number;
  expires_at: number;
  session_id: string;
  listener: string;
  client_ip: string;
  account: string | null;
  helo_name: string | null;
  message_id_header: string | null;
  dsn_envid: string | null;
  dsn_ret: string | null;
  /** 1 while any recipient is not final; lets `queue list` skip finished messages cheaply. */
  active: number;
  /** How many recipients the message was queued for: the rate limits' count, read from an index. */
  recipient_count: number;
}

export interface RecipientsTable {
  queue_id: string;
  idx: number;
  address: string;
  domain: string;
  state: string;
  attempts: number;
  next_attempt_at: number;
  last_code: number | null;
  last_response: string | null;
  notify: string | null;
  orcpt: string | null;
  updated_at: number;
}

/** Bodies small enough to keep inline (see spilling-body-writer.ts); bigger ones are spool files. */
export interface BodiesTable {
  queue_id: string;
  data: Buffer;
}

export interface SecurityEventsTable {
  id: Generated<number>;
  at: number;
  kind: string;
  account: string | null;
  ip: string | null;
  listener: string | null;
  detail: string;
}

export interface AuditLogTable {
  id: Generated<number>;
  at: number;
  actor: string;
  action: string;
  target: string;
  detail: string;
}

export interface AccountNetworksTable {
  account: string;
  network: string;
  first_seen: number;
}

export interface Database {
  accounts: AccountsTable;
  messages: MessagesTable;
  recipients: RecipientsTable;
  bodies: BodiesTable;
  security_events: SecurityEventsTable;
  audit_log: AuditLogTable;
  account_networks: AccountNetworksTable;
}

const migrations: Record<string, Migration> = {
  '0001_initial': {
    async up(db: Kysely<any>) {
      await db.schema
        .createTable('accounts')
        .addColumn('address', 'text', (c) => c.primaryKey())
        .addColumn('password_hash', 'text', (c) => c.notNull())
        .addColumn('smtp_auth', 'integer', (c) => c.notNull().defaultTo(1))
        .addColumn('enabled', 'integer', (c) => c.notNull().defaultTo(1))
        .addColumn('created_at', 'bigint', (c) => c.notNull())
        .addColumn('updated_at', 'bigint', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('messages')
        .addColumn('queue_id', 'text', (c) => c.primaryKey())
        .addColumn('sender', 'text', (c) => c.notNull())
        .addColumn('size', 'bigint', (c) => c.notNull())
        .addColumn('received_at', 'bigint', (c) => c.notNull())
        .addColumn('expires_at', 'bigint', (c) => c.notNull())
        .addColumn('session_id', 'text', (c) => c.notNull())
        .addColumn('listener', 'text', (c) => c.notNull())
        .addColumn('client_ip', 'text', (c) => c.notNull())
        .addColumn('account', 'text')
        .addColumn('helo_name', 'text')
        .addColumn('message_id_header', 'text')
        .addColumn('dsn_envid', 'text')
        .addColumn('dsn_ret', 'text')
        .addColumn('active', 'integer', (c) => c.notNull().defaultTo(1))
        .execute();
      await db.schema.createIndex('messages_active').on('messages').columns(['active', 'received_at']).execute();
      await db.schema
        .createTable('recipients')
        .addColumn('queue_id', 'text', (c) => c.notNull().references('messages.queue_id').onDelete('cascade'))
        .addColumn('idx', 'integer', (c) => c.notNull())
        .addColumn('address', 'text', (c) => c.notNull())
        .addColumn('domain', 'text', (c) => c.notNull())
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
        .addColumn('next_attempt_at', 'bigint', (c) => c.notNull())
        .addColumn('last_code', 'integer')
        .addColumn('last_response', 'text')
        .addColumn('notify', 'text')
        .addColumn('orcpt', 'text')
        .addColumn('updated_at', 'bigint', (c) => c.notNull())
        .addPrimaryKeyConstraint('recipients_pk', ['queue_id', 'idx'])
        .execute();
      // The scheduler's question, "what is due?", must not scan delivered rows.
      await sql`CREATE INDEX recipients_due ON recipients (next_attempt_at) WHERE state IN ('queued', 'deferred')`.execute(
        db,
      );
      await db.schema.createIndex('recipients_state').on('recipients').column('state').execute();
    },
  },
  '0002_policy_and_security': {
    async up(db: Kysely<any>) {
      await db.schema.alterTable('accounts').addColumn('policy', 'text', (c) => c.notNull().defaultTo('{}')).execute();
      // Rate limits count what an account or a client address sent in a rolling window.
      await db.schema.createIndex('messages_account_time').on('messages').columns(['account', 'received_at']).execute();
      await db.schema.createIndex('messages_ip_time').on('messages').columns(['client_ip', 'received_at']).execute();
      await db.schema
        .createTable('security_events')
        .addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement())
        .addColumn('at', 'bigint', (c) => c.notNull())
        .addColumn('kind', 'text', (c) => c.notNull())
        .addColumn('account', 'text')
        .addColumn('ip', 'text')
        .addColumn('listener', 'text')
        .addColumn('detail', 'text', (c) => c.notNull())
        .execute();
      await db.schema.createIndex('security_events_at').on('security_events').column('at').execute();
      await db.schema
        .createTable('audit_log')
        .addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement())
        .addColumn('at', 'bigint', (c) => c.notNull())
        .addColumn('actor', 'text', (c) => c.notNull())
        .addColumn('action', 'text', (c) => c.notNull())
        .addColumn('target', 'text', (c) => c.notNull())
        .addColumn('detail', 'text', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('account_networks')
        .addColumn('account', 'text', (c) => c.notNull())
        .addColumn('network', 'text', (c) => c.notNull())
        .addColumn('first_seen', 'bigint', (c) => c.notNull())
        .addPrimaryKeyConstraint('account_networks_pk', ['account', 'network'])
        .execute();
    },
  },
  '0003_inline_bodies': {
    async up(db: Kysely<any>) {
      // Small bodies live here, written in the same transaction as their message's rows, so a
      // message costs no file create, fsync or unlink. A message without a row here has its body
      // in the spool directory. Deleting the message deletes the body with it.
      await db.schema
        .createTable('bodies')
        .addColumn('queue_id', 'text', (c) => c.primaryKey().references('messages.queue_id').onDelete('cascade'))
        .addColumn('data', 'blob', (c) => c.notNull())
        .execute();
    },
  },
  '0004_usage_from_indexes': {
    async up(db: Kysely<any>) {
      // The rate limits re-read each sender's last 24 hours every minute (policy/rate-limits.ts),
      // on the thread that serves every SMTP session. Counting recipients joined each message to
      // its recipients rows: 7.9 ms at 10,000 messages in the 24 hours, 91 ms at 100,000. With the
      // count on the message and in the index, the question is one range of one index: 0.9 and
      // 7.3 ms (docs/benchmarks.md). The backfill took 291 ms for 100,000 messages.
      await db.schema.alterTable('messages').addColumn('recipient_count', 'integer', (c) => c.notNull().defaultTo(0)).execute();
      await sql`UPDATE messages SET recipient_count = (SELECT count(*) FROM recipients r WHERE r.queue_id = messages.queue_id)`.execute(db);
      await db.schema.dropIndex('messages_account_time').execute();
      await db.schema.dropIndex('messages_ip_time').execute();
      await db.schema.createIndex('messages_account_time').on('messages').columns(['account', 'received_at', 'recipient_count']).execute();
      await db.schema.createIndex('messages_ip_time').on('messages').columns(['client_ip', 'received_at', 'recipient_count']).execute();
    },
  },
};

export const migrationProvider: MigrationProvider = {
  async getMigrations() {
    return migrations;
  },
};
