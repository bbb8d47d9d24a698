// Clients Postern did not write: swaks (Debian) and Python's smtplib, as administrators and
// scripts use them. Each sends over STARTTLS + AUTH, and the message must reach the queue.
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type TestPostern, startTestPostern } from './helpers/postern-harness.js';

const PASSWORD = 'swaks and python 2026';
let t: TestPostern;

/** Asynchronous on purpose: Postern runs in this process and must keep answering. */
function run(cmd: string, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  t = await startTestPostern({ extra: '\n[delivery]\ndns_servers = ["127.0.0.1:9"]\n' });
  await t.addAccount('printer@example.com', PASSWORD);
});

afterAll(async () => {
  await t?.stop();
});

describe('third-party clients', () => {
  it('swaks sends with --tls and --auth-user on the submission port', async () => {
    const r = await run(
      'swaks',
      [
        '--server', `127.0.0.1:${t.port('submission')}`,
        '--tls',
        '--auth', 'LOGIN',
        '--auth-user', 'printer@example.com',
        '--auth-password', PASSWORD,
        '--from', 'printer@example.com',
        '--to', 'someone@example.net',
        '--header', 'Subject: swaks test',
        '--body', 'sent by swaks',
      ],
    );
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/<~\s+250[- ]AUTH PLAIN LOGIN|<~ {2}250-AUTH PLAIN LOGIN/);
    expect(r.stdout).toMatch(/<~ {2}235 /);
    const queued = /<~ {2}250 2\.0\.0 Ok: queued as ([A-Z0-9]+)/.exec(r.stdout);
    expect(queued).not.toBeNull();
    const m = await t.postern.store.getMessage(queued![1]!);
    expect(m?.origin.account).toBe('printer@example.com');
    // The password never appears in what swaks saw from the server.
    expect(r.stdout.split('\n').filter((l) => l.startsWith('<')).join('\n')).not.toContain(PASSWORD);
  });

  it("Python's smtplib sends with starttls() and login()", async () => {
    const script = `
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', ${t.port('submission')}, timeout=20)
s.ehlo('python.local')
assert not s.has_extn('auth'), 'AUTH advertised before STARTTLS'
import ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s.starttls(context=ctx)
s.ehlo('python.local')
s.login('printer@example.com', '${PASSWORD}')
s.mail('printer@example.com'); s.rcpt('a@example.net'); s.rcpt('b@example.org')
code, reply = s.data(b'Subject: from python\\r\\n\\r\\nhello\\r\\n')
print(code, reply.decode())
s.quit()
`;
    const r = await run('python3', ['-c', script]);
    expect(r.status, r.stderr).toBe(0);
    const m = /^250 2\.0\.0 Ok: queued as ([A-Z0-9]+)$/m.exec(r.stdout);
    expect(m, r.stdout).not.toBeNull();
    const message = await t.postern.store.getMessage(m![1]!);
    expect(message?.recipients.map((x) => x.address)).toEqual(['a@example.net', 'b@example.org']);
  });
});
