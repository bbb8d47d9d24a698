// Certificates: an expired one stops start-up, one about to expire is announced, and a renewed
// pair is picked up without a restart and without dropping connections.
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { describe, expect, it } from 'vitest';
import { DAY, makeCertificate } from './helpers/certificates.js';
import { startTestPostern, testConfigText } from './helpers/postern-harness.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { startServeProcess } from './helpers/serve-process.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

function install(dir: string, pair: { cert: string; key: string }): void {
  fs.mkdirSync(path.join(dir, 'tls'), { recursive: true });
  // Written beside and renamed over, as renewal tools do.
  fs.writeFileSync(path.join(dir, 'tls/key.pem.new'), pair.key);
  fs.writeFileSync(path.join(dir, 'tls/cert.pem.new'), pair.cert);
  fs.renameSync(path.join(dir, 'tls/key.pem.new'), path.join(dir, 'tls/key.pem'));
  fs.renameSync(path.join(dir, 'tls/cert.pem.new'), path.join(dir, 'tls/cert.pem'));
}

/** The subject CN the smtps listener presents to a new connection. */
function presentedName(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false }, () => {
      const cn = s.getPeerCertificate().subject?.CN ?? '';
      s.destroy();
      resolve(Array.isArray(cn) ? cn.join(',') : cn);
    });
    s.on('error', reject);
  });
}

describe('TLS certificates', () => {
  it('refuses to start with an expired certificate, naming the file and the date', async () => {
    const dir = tempDir();
    install(dir, await makeCertificate('old.example.test', new Date(Date.now() - 400 * DAY), new Date(Date.now() - DAY)));
    await expect(startTestPostern({ dir })).rejects.toThrow(
      new RegExp(`^TLS: the certificate in ${path.join(dir, 'tls/cert.pem').replace(/[.]/g, '\\.')} expired on \\d{4}-\\d\\d-\\d\\d; install a renewed one`),
    );
  });

  it('warns when the certificate expires within 14 days', async () => {
    const dir = tempDir();
    install(dir, await makeCertificate('soon.example.test', new Date(Date.now() - DAY), new Date(Date.now() + 5 * DAY + 3_600_000)));
    const t = await startTestPostern({ dir });
    try {
      expect(t.logs().find((l) => l.event === 'tls_expiring')).toMatchObject({ daysLeft: 5 });
    } finally {
      await t.stop();
    }
  });

  it('picks up a renewed pair when the files change, keeps open connections, and ignores a bad pair', async () => {
    const dir = tempDir();
    install(dir, await makeCertificate('first.example.test', new Date(Date.now() - DAY), new Date(Date.now() + 90 * DAY)));
    const t = await startTestPostern({ dir });
    try {
      expect(await presentedName(t.port('smtps'))).toBe('first.example.test');
      const open = await RawSmtp.connect(t.port('submission'));
      await open.read();
      await open.command('EHLO device.local');
      await open.startTls();

      install(dir, await makeCertificate('renewed.example.test', new Date(Date.now() - DAY), new Date(Date.now() + 90 * DAY)));
      await waitFor(() => t.logs().some((l) => l.event === 'tls_reloaded'), 10_000, 'reload');
      expect(await presentedName(t.port('smtps'))).toBe('renewed.example.test');
      expect((await open.command('NOOP')).code).toBe(250);
      await open.quit();

      // A key that does not belong to the certificate: logged, and the renewed pair stays.
      const stray = await makeCertificate('stray.example.test', new Date(Date.now() - DAY), new Date(Date.now() + 90 * DAY));
      fs.writeFileSync(path.join(dir, 'tls/key.pem'), stray.key);
      await waitFor(() => t.logs().some((l) => l.event === 'tls_reload_failed'), 10_000, 'failed reload');
      expect(String(t.logs().find((l) => l.event === 'tls_reload_failed')?.err)).toContain('does not belong to the certificate');
      expect(await presentedName(t.port('smtps'))).toBe('renewed.example.test');
    } finally {
      await t.stop();
    }
  });

  it('reloads on SIGHUP', async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'postern.toml'), testConfigText(dir));
    const server = await startServeProcess({ cwd: dir, args: ['--config', path.join(dir, 'postern.toml')] });
    try {
      install(dir, await makeCertificate('hup.example.test', new Date(Date.now() - DAY), new Date(Date.now() + 90 * DAY)));
      server.child.kill('SIGHUP');
      await waitFor(() => server.stdout().includes('"event":"tls_reloaded","reason":"SIGHUP"'), 10_000, 'SIGHUP reload');
      expect(await presentedName(server.ports.smtps!)).toBe('hup.example.test');
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });
});
