// The legacy listener profile: for old devices on a LAN that cannot do STARTTLS or TLS 1.2.
import tls from 'node:tls';
import { describe, expect, it } from 'vitest';
import { parseConfigText } from '../src/config/load-config.js';
import { RawSmtp } from './helpers/raw-smtp.js';
import { startTestPostern } from './helpers/postern-harness.js';
import { tempDir } from './helpers/temp-dir.js';

const PASSWORD = 'old printer password';

function legacyConfig(dir: string): string {
  return `hostname = "relay.example.test"
data_dir = "${dir}"
[listen]
submission = { address = "127.0.0.1:0", legacy = true }
smtps = { address = "127.0.0.1:0", legacy = true }
relay = "127.0.0.1:0"
[delivery]
dns_servers = ["127.0.0.1:9"]
`;
}

function tls11Handshake(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT:@SECLEVEL=0' });
    s.on('secureConnect', () => {
      const protocol = s.getProtocol() ?? '';
      s.destroy();
      resolve(protocol);
    });
    s.on('error', (e: NodeJS.ErrnoException) => resolve(`error ${e.code}`));
  });
}

describe('legacy listener profile', () => {
  it('allows AUTH without TLS and TLS 1.1 on a legacy listener, and warns at start-up', async () => {
    const dir = tempDir();
    const t = await startTestPostern({ dir, text: legacyConfig(dir) });
    try {
      await t.addAccount('old-printer@example.com', PASSWORD);
      const c = await RawSmtp.connect(t.port('submission'));
      await c.read();
      const ehlo = await c.command('EHLO old-printer.local');
      expect(ehlo.text).toMatch(/250[- ]AUTH PLAIN LOGIN/);
      expect((await c.authPlain('old-printer@example.com', PASSWORD)).code).toBe(235);
      expect((await c.command('MAIL FROM:<old-printer@example.com>')).code).toBe(250);
      await c.quit();
      expect(await tls11Handshake(t.port('smtps'))).toBe('TLSv1.1');
      expect(t.logs().find((l) => l.event === 'legacy_listener' && l.listener === 'submission')).toBeTruthy();
      expect(t.postern.listeners.find((l) => l.kind === 'relay')?.legacy).toBe(false);
    } finally {
      await t.stop();
    }
  });

  it('is off by default: the same client is refused on an ordinary listener', async () => {
    const t = await startTestPostern();
    try {
      expect(await tls11Handshake(t.port('smtps'))).toMatch(/^error /);
      const c = await RawSmtp.connect(t.port('submission'));
      await c.read();
      expect((await c.command('EHLO old-printer.local')).text).not.toMatch(/AUTH/);
      expect((await c.authPlain('x@example.com', PASSWORD)).code).toBe(538);
      await c.quit();
    } finally {
      await t.stop();
    }
  });

  it('must be bound to a loopback or private address', () => {
    for (const address of ['0.0.0.0:587', '[::]:587', '203.0.113.5:587']) {
      expect(() => parseConfigText(`[listen]\nsubmission = { address = "${address}", legacy = true }\n`, '/etc/postern.toml')).toThrow(
        /listen\.submission: legacy = true allows passwords without TLS, so it needs a loopback or private LAN address/,
      );
    }
    expect(() => parseConfigText('[listen]\nsubmission = { address = "192.168.1.10:587", legacy = true }\n', '/etc/postern.toml')).not.toThrow();
  });
});
