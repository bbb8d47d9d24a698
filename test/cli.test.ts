// The `postern` command as a person runs it: real processes, real files, exit codes and output.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
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

    const removed = run(['account', 'remove', 'printer@example.com'], { cwd: dir });
    expect(removed.stdout).toBe('Account printer@example.com removed.\n');
    expect(run(['account', 'show', 'printer@example.com'], { cwd: dir }).status).toBe(2);
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
