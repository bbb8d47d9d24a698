// The `postern` command as a person runs it: real processes, real files, exit codes and output.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
import { openStore } from '../src/store/open-store.js';
import { newQueueId } from '../src/store/queue-id.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { BIN, killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { tempDir } from './helpers/temp-dir.js';

function run(args: string[], options: { cwd: string; input?: string }) {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: options.cwd, input: options.input ?? '', encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function writeConfig(dir: string, extra = ''): string {
  const file = path.join(dir, 'postern.toml');
  fs.writeFileSync(
    file,
    `hostname = "relay.example.test"
data_dir = "./data"

[listen]
submission = "127.0.0.1:0"
${extra}`,
  );
  return file;
}

afterAll(() => killAllServeProcesses());

interface AuditJson {
  id: number;
  at: string;
  actor: string;
  action: string;
  target: string;
  detail: Record<string, unknown>;
}

/** Queues a message straight into the store of a Postern that is not running. */
async function seedMessage(dataDir: string, sender: string, recipients: string[]): Promise<string> {
  const store = await openStore(dataDir);
  try {
    const at = Date.now();
    const queueId = newQueueId(at);
    const writer = store.createBody(queueId);
    writer.stream.end('Subject: held\r\n\r\nbody\r\n');
    await store.enqueue({
      queueId,
      sender,
      recipients: recipients.map((address) => ({ address })),
      size: await writer.finish(),
      receivedAt: at,
      expiresAt: at + 5 * 86_400_000,
      origin: { sessionId: 'seeded', listener: 'submission', clientIp: '127.0.0.1', account: sender },
    });
    return queueId;
  } finally {
    await store.close();
  }
}

const serve = (cwd: string) => startServeProcess({ cwd });

describe('postern account', () => {
  it('adds with a generated password shown once, lists, shows, sets and removes', () => {
    const dir = tempDir();
    writeConfig(dir);
    const add = run(['account', 'add', 'Printer@Example.com', '--generate'], { cwd: dir });
    expect(add.status).toBe(0);
    expect(add.stdout).toMatch(/^Account printer@example\.com created \(SMTP AUTH on\)\.\nPassword: [A-Za-z0-9]{24}\n/);
    const password = /Password: (\S+)/.exec(add.stdout)![1]!;

    const list = run(['account', 'list'], { cwd: dir });
    expect(list.stdout).toMatch(/ADDRESS\s+SMTP AUTH\s+ENABLED\s+CREATED\nprinter@example\.com\s+on\s+yes\s+/);
    expect(list.stdout).not.toContain(password);

    const show = run(['account', 'show', 'printer@example.com', '--json'], { cwd: dir });
    const shown = JSON.parse(show.stdout) as Record<string, unknown>;
    expect(shown).toMatchObject({ address: 'printer@example.com', smtp_auth: true, enabled: true });
    expect(show.stdout).not.toContain(password);
    expect(show.stdout).not.toContain('argon2');

    const set = run(['account', 'set', 'printer@example.com', '--smtp-auth', 'off'], { cwd: dir });
    expect(set.stdout).toBe('Account printer@example.com: SMTP AUTH off.\n');
    expect(JSON.parse(run(['account', 'show', 'printer@example.com', '--json'], { cwd: dir }).stdout).smtp_auth).toBe(false);

    const dup = run(['account', 'add', 'printer@example.com', '--generate'], { cwd: dir });
    expect(dup.status).toBe(2);
    expect(dup.stderr).toMatch(/already exists/);

    const removed = run(['account', 'remove', 'Printer@Example.com'], { cwd: dir });
    expect(removed.stdout).toBe('Account printer@example.com removed.\n');
    expect(run(['account', 'show', 'printer@example.com'], { cwd: dir }).status).toBe(2);
    const again = run(['account', 'remove', 'printer@example.com'], { cwd: dir });
    expect([again.status, again.stderr]).toEqual([2, 'postern: no account printer@example.com\n']);

    // Every change is on record, the removal included (once: the failed second attempt changed nothing).
    const audit = JSON.parse(run(['security', 'audit', '--json'], { cwd: dir }).stdout) as AuditJson[];
    expect(audit.map((a) => [a.action, a.target])).toEqual([
      ['account.add', 'printer@example.com'],
      ['account.set', 'printer@example.com'],
      ['account.remove', 'printer@example.com'],
    ]);
    expect(audit[2]!.actor).toMatch(/^cli:\S+$/);
    expect(audit[2]!.detail).toEqual({});
  });

  it('reads a password from stdin and refuses a short one', () => {
    const dir = tempDir();
    writeConfig(dir);
    const short = run(['account', 'add', 'cam@example.com', '--password-stdin'], { cwd: dir, input: 'short\n' });
    expect(short.status).toBe(2);
    expect(short.stderr).toContain('too short: at least 8 characters');
    const ok = run(['account', 'add', 'cam@example.com', '--password-stdin'], { cwd: dir, input: 'a long enough password\n' });
    expect(ok.status).toBe(0);
    expect(ok.stdout).not.toContain('a long enough password');
    expect(ok.stdout).not.toContain('Password:');
    const none = run(['account', 'add', 'x@example.com'], { cwd: dir });
    expect(none.stderr).toContain('--generate or --password-stdin');
  });

  it('works while the server runs: an account added by the CLI can log in at once', async () => {
    const dir = tempDir();
    writeConfig(dir);
    const server = await serve(dir);
    const add = run(['account', 'add', 'app@example.com', '--password-stdin'], { cwd: dir, input: 'app password 1234\n' });
    expect(add.status).toBe(0);
    const transport = nodemailer.createTransport({
      host: '127.0.0.1',
      port: server.ports.submission!,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: 'app@example.com', pass: 'app password 1234' },
    });
    expect(await transport.verify()).toBe(true);
    run(['account', 'set', 'app@example.com', '--smtp-auth', 'off'], { cwd: dir });
    const refused = await transport.verify().catch((e: { response?: string }) => e.response);
    expect(refused).toMatch(/^535 5\.7\.139 /);
    expect(await server.stop()).toBe(0);
  });
});

describe('postern serve', () => {
  it('prints a start-up summary and generates a self-signed certificate on first start', async () => {
    const dir = tempDir();
    writeConfig(dir);
    const server = await serve(dir);
    expect(server.stderr()).toMatch(/Postern ready as relay\.example\.test/);
    expect(server.stderr()).toMatch(/submission\s+127\.0\.0\.1:\d+\s+STARTTLS, then AUTH/);
    expect(server.stderr()).toContain('generated a self-signed certificate');
    expect(server.stderr()).toContain('npx postern account add printer@example.com --generate');
    expect(fs.existsSync(path.join(dir, 'data/tls/cert.pem'))).toBe(true);
    expect(fs.statSync(path.join(dir, 'data/tls/key.pem')).mode & 0o077).toBe(0);
    expect(await server.stop()).toBe(0);
  });

  it('stops with the file, key and reason on a bad config', () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'postern.toml'), '[listen]\nsubmision = "127.0.0.1:2587"\n');
    const r = run(['serve'], { cwd: dir });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`${path.join(dir, 'postern.toml')}: invalid configuration`);
    expect(r.stderr).toContain('listen.submision: unknown key');
  });

  it('fails clearly when an explicitly configured port is taken, without falling back', async () => {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const dir = tempDir();
      fs.writeFileSync(path.join(dir, 'postern.toml'), `data_dir = "./data"\n[listen]\nsubmission = "127.0.0.1:${port}"\n`);
      const r = run(['serve'], { cwd: dir });
      expect(r.status).toBe(1);
      expect(r.stderr).toContain(`listen.submission: cannot listen on 127.0.0.1:${port}: the address is already in use`);
    } finally {
      blocker.close();
    }
  });
});

describe('default ports without privileges', () => {
  it('falls back from 587/465 to 2587/2465 and says how to get 587', async () => {
    const dir = tempDir();
    // Root without CAP_NET_BIND_SERVICE: binding 587 fails with EACCES, as for an ordinary user.
    const server = await startServeProcess({ cwd: dir, prefix: ['setpriv', '--bounding-set=-net_bind_service'] });
    const err = server.stderr();
    expect(err).toMatch(/submission\s+\S+:2587\s+STARTTLS/);
    expect(err).toMatch(/smtps\s+\S+:2465\s+implicit TLS/);
    expect(err).toContain('port 587 needs privileges; using 2587. For 587: run as root, or `sudo setcap cap_net_bind_service=+ep');
    expect(err).toContain('config: built-in defaults');
    expect(await server.stop()).toBe(0);
  });
});

describe('account policy and the audit log', () => {
  it('sets policy options, shows them, and records every change with who made it', () => {
    const dir = tempDir();
    writeConfig(dir);
    run(['account', 'add', 'app@example.com', '--generate'], { cwd: dir });
    const cam = run(['account', 'add', 'cam@example.com', '--generate', '--recipient-domains', 'example.com', '--max-connections', '1'], { cwd: dir });
    expect(cam.status).toBe(0);
    expect(JSON.parse(run(['account', 'show', 'cam@example.com', '--json'], { cwd: dir }).stdout)).toMatchObject({
      recipient_domains: ['example.com'],
      limits: { maxConnections: 1 },
    });
    const set = run(
      ['account', 'set', 'app@example.com', '--send-as', 'noreply@example.com,*@alerts.example.com', '--recipient-domains', 'example.com', '--messages-per-minute', '120', '--networks', '10.0.0.0/8'],
      { cwd: dir },
    );
    expect(set.stdout).toBe('Account app@example.com: policy updated.\n');
    const shown = JSON.parse(run(['account', 'show', 'app@example.com', '--json'], { cwd: dir }).stdout) as Record<string, unknown>;
    expect(shown).toMatchObject({
      send_as: ['app@example.com', 'noreply@example.com', '*@alerts.example.com'],
      recipient_domains: ['example.com'],
      networks: ['10.0.0.0/8'],
      limits: { messagesPerMinute: 120 },
    });
    run(['account', 'set', 'app@example.com', '--messages-per-minute', 'default', '--recipient-domains', ''], { cwd: dir });
    const after = JSON.parse(run(['account', 'show', 'app@example.com', '--json'], { cwd: dir }).stdout) as Record<string, unknown>;
    expect(after).toMatchObject({ recipient_domains: 'any', limits: {} });
    expect(run(['account', 'set', 'app@example.com', '--send-as', 'not an address'], { cwd: dir }).stderr).toContain('--send-as: "not an address" is not an address or *@domain');
    expect(run(['account', 'set', 'app@example.com', '--max-connections', '0'], { cwd: dir }).status).toBe(2);
    run(['account', 'set', 'app@example.com', '--smtp-auth', 'off'], { cwd: dir });

    const audit = JSON.parse(run(['security', 'audit', '--json'], { cwd: dir }).stdout) as { actor: string; action: string; target: string; detail: Record<string, unknown> }[];
    const own = audit.filter((a) => a.target === 'app@example.com');
    expect(own.map((a) => a.action)).toEqual(['account.add', 'account.set', 'account.set', 'account.set']);
    expect(audit.every((a) => a.actor.startsWith('cli:'))).toBe(true);
    expect(own[3]!.detail).toEqual({ smtp_auth: false });
    expect(audit.find((a) => a.target === 'cam@example.com')?.detail).toMatchObject({ policy: { recipientDomains: ['example.com'] } });
    expect(JSON.stringify(audit)).not.toMatch(/argon2|Password:/);
    expect(run(['security', 'events'], { cwd: dir }).stdout).toMatch(/^No security events since /);
  });
});

describe('postern queue retry and delete are audited', () => {
  it('records who retried or deleted what, and nothing for a queue id that does not exist', async () => {
    const dir = tempDir();
    writeConfig(dir);
    const data = path.join(dir, 'data');
    const first = await seedMessage(data, 'app@example.com', ['a@example.net', 'b@example.net']);
    const second = await seedMessage(data, 'app@example.com', ['c@example.net']);

    expect(run(['queue', 'retry', first], { cwd: dir }).stdout).toBe('2 recipient(s) scheduled for delivery now.\n');
    expect(run(['queue', 'retry', '--all'], { cwd: dir }).stdout).toBe('3 recipient(s) scheduled for delivery now.\n');
    expect(run(['queue', 'delete', second], { cwd: dir }).stdout).toBe(`Message ${second} deleted.\n`);
    const missing = run(['queue', 'delete', second], { cwd: dir });
    expect([missing.status, missing.stderr]).toEqual([2, `postern: no message ${second} in the queue\n`]);
    expect(run(['queue', 'retry', 'NOSUCHID'], { cwd: dir }).status).toBe(2);

    const audit = JSON.parse(run(['security', 'audit', '--json'], { cwd: dir }).stdout) as AuditJson[];
    expect(audit.map((a) => [a.action, a.target, a.detail])).toEqual([
      ['queue.retry', first, { recipients: 2 }],
      ['queue.retry', 'all', { recipients: 3 }],
      [
        'queue.delete',
        second,
        { sender: 'app@example.com', recipients: ['c@example.net'], pending: 1, account: 'app@example.com', received: expect.stringMatching(/^\d{4}-\d\d-\d\dT/) },
      ],
    ]);
    for (const a of audit) expect(a.actor).toMatch(/^cli:\S+$/);
    const table = run(['security', 'audit'], { cwd: dir }).stdout;
    expect(table).toMatch(/^TIME\s+WHO\s+ACTION\s+TARGET\s+DETAIL\n/);
    expect(table).toMatch(new RegExp(`\\n\\S+ \\S+\\s+cli:\\S+\\s+queue\\.delete\\s+${second}\\s+\\{"sender":"app@example\\.com"`));
  });
});

describe('postern security events', () => {
  it('lists real events from a running Postern, as a table and as JSON, and filters them with --since', async () => {
    const dir = tempDir();
    writeConfig(dir);
    const server = await serve(dir);
    for (const user of ['printer@example.com', 'ghost@example.com']) {
      const { client, auth } = await RawSmtp.submission(server.ports.submission!, user, 'wrong password');
      expect(auth.text).toBe('535 5.7.8 Authentication unsuccessful, the username or password is wrong');
      client.destroy();
    }
    expect(await server.stop()).toBe(0);
    // One older event, written the way Postern writes them.
    const store = await openStore(path.join(dir, 'data'));
    await store.recordSecurityEvent({
      kind: 'lockout',
      account: 'old@example.com',
      ip: '192.0.2.7',
      listener: 'submission',
      detail: { message: 'AUTH locked for account old@example.com for 15 min after repeated failures', by: 'account' },
      at: Date.now() - 3 * 86_400_000,
    });
    await store.close();

    const table = run(['security', 'events'], { cwd: dir });
    expect(table.status).toBe(0);
    const lines = table.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^TIME\s+KIND\s+ACCOUNT\s+ADDRESS\s+LISTENER\s+WHAT$/);
    expect(lines.slice(1)).toHaveLength(2);
    expect(lines[1]).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\s+auth_failed\s+printer@example\.com\s+127\.0\.0\.1\s+submission\s+Failed AUTH for printer@example\.com from 127\.0\.0\.1 on submission$/);
    expect(lines[2]).toMatch(/\s+auth_failed\s+ghost@example\.com\s+127\.0\.0\.1\s+submission\s+Failed AUTH for ghost@example\.com from 127\.0\.0\.1 on submission$/);
    expect(table.stdout).not.toContain('old@example.com');
    expect(table.stdout).not.toContain('wrong password');

    const json = JSON.parse(run(['security', 'events', '--json'], { cwd: dir }).stdout) as Record<string, unknown>[];
    expect(json).toEqual([
      {
        id: expect.any(Number),
        at: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
        kind: 'auth_failed',
        account: 'printer@example.com',
        ip: '127.0.0.1',
        listener: 'submission',
        detail: { message: 'Failed AUTH for printer@example.com from 127.0.0.1 on submission', reason: 'bad_credentials' },
      },
      {
        id: expect.any(Number),
        at: expect.any(String),
        kind: 'auth_failed',
        account: 'ghost@example.com',
        ip: '127.0.0.1',
        listener: 'submission',
        detail: { message: 'Failed AUTH for ghost@example.com from 127.0.0.1 on submission', reason: 'bad_credentials' },
      },
    ]);
    expect(Date.now() - Date.parse(json[0]!.at as string)).toBeLessThan(3_600_000);

    const kinds = (since: string) =>
      (JSON.parse(run(['security', 'events', '--since', since, '--json'], { cwd: dir }).stdout) as { kind: string; account: string }[]).map((e) => `${e.kind} ${e.account}`);
    expect(kinds('30m')).toEqual(['auth_failed printer@example.com', 'auth_failed ghost@example.com']);
    expect(kinds('2d')).toEqual(['auth_failed printer@example.com', 'auth_failed ghost@example.com']);
    expect(kinds('4d')).toEqual(['lockout old@example.com', 'auth_failed printer@example.com', 'auth_failed ghost@example.com']);
    expect(kinds('all')).toEqual(kinds('4d'));
    expect(run(['security', 'events', '--since', '4d'], { cwd: dir }).stdout).toMatch(
      /\s+lockout\s+old@example\.com\s+192\.0\.2\.7\s+submission\s+AUTH locked for account old@example\.com for 15 min after repeated failures\n/,
    );
    const bad = run(['security', 'events', '--since', '2x'], { cwd: dir });
    expect([bad.status, bad.stdout, bad.stderr]).toEqual([2, '', 'postern: --since takes a duration such as 30m, 12h or 7d (or "all"), not "2x"\n']);
    // A period with nothing in it says so, naming when it starts.
    const fresh = tempDir();
    writeConfig(fresh);
    expect(run(['security', 'events', '--since', '12h'], { cwd: fresh }).stdout).toMatch(/^No security events since \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\.\n$/);
  });
});
