// Table types and migrations for the embedded SQLite store. Migrations use Kysely's schema builder
// so the PostgreSQL backend can share their shape.
import { type Kysely, type Migration, type MigrationProvider, sql } from 'kysely';

export interface AccountsTable {
  address: string;
  password_hash: string;
  smtp_auth: number;
  enabled: number;
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

export interface Database {
  accounts: AccountsTable;
  messages: MessagesTable;
  recipients: RecipientsTable;
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
};

export const migrationProvider: MigrationProvider = {
  async getMigrations() {
    return migrations;
  },
};
