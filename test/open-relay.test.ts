import fs from 'node:fs';
import { afterAll, beforeAll, it } from 'vitest';
import { RawSmtp } from './helpers/raw-smtp.js';
import { type TestPostern, startTestPostern, tempDir } from './helpers/postern-harness.js';

let t: TestPostern;
beforeAll(async () => {
  const dir = tempDir();
  t = await startTestPostern({ dir, text: `hostname = "relay.example.test"
data_dir = ${JSON.stringify(dir)}
[listen]
submission = "127.0.0.1:0"
smtps = "127.0.0.1:0"
relay = "127.0.0.1:0"
[limits]
max_message_size = 8388608
[queue]
first_retry = "1h"
max_retry_interval = "1h"
[[route]]
domains = ["*"]
host = "127.0.0.1"
port = 9
tls = "none"
[[connector]]
name = "one"
networks = ["127.0.0.1/32"]
` });
  await t.addAccount('printer@example.com', 'pw');
});
afterAll(async () => { await t?.stop(); });

it('probe', async () => {
  const lines: string[] = [];
  const c = await RawSmtp.connect(t.port('relay'), { localAddress: '127.0.0.1' });
  await c.read(); await c.command('EHLO x.example');
  const cmds: Buffer[] = [
    Buffer.from('MAIL FROM:<a\xff@b.example>\r\n', 'latin1'),
    Buffer.from('RSET\r\n'),
    Buffer.from('MAIL FROM:<a@b\xff.example>\r\n', 'latin1'),
    Buffer.from('RSET\r\n'),
    Buffer.from('MAIL FROM:<a@b.example>\r\n', 'latin1'),
    Buffer.from('RCPT TO:<v\xff\xfe@example.org>\r\n', 'latin1'),
    Buffer.from('RCPT TO:<v@exa\xc3mple.org>\r\n', 'latin1'),
    Buffer.from('RCPT TO:<v@\xed\xa0\x80.org>\r\n', 'latin1'),
    Buffer.from('RCPT TO:<v\xc0\xaf@example.org>\r\n', 'latin1'),
    Buffer.from('EHLO h\xff\xfe.example\r\n', 'latin1'),
    Buffer.from('EHLO h\x00.example\r\n', 'latin1'),
    Buffer.from('MAIL FROM:<a@b.example>\x00\r\n', 'latin1'),
    Buffer.from('\x00MAIL FROM:<a@b.example>\r\n', 'latin1'),
    Buffer.from('MAIL FROM:<a@b.example> ENVID=a\x00b\r\n', 'latin1'),
  ];
  for (const b of cmds) {
    c.write(b);
    const rep = await c.read();
    lines.push(`${JSON.stringify(b.toString('latin1'))} -> ${rep.text}`);
  }
  c.destroy();
  await new Promise((r) => setTimeout(r, 300));
  for (const q of await t.postern.store.listQueue()) lines.push(JSON.stringify(q));
  console.log(lines.join('\n'));
});
