// A running server as an administrator handles it: `postern queue ...` against a live queue, and
// SIGTERM while a delivery is in progress.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, describe, expect, it } from 'vitest';
import { openStore } from '../src/store/open-store.js';
import { BIN, killAllServeProcesses, startServeProcess } from './helpers/serve-process.js';
import { sinkRouteToml } from './helpers/postern-harness.js';
import { SinkServer } from './helpers/sink-server.js';
import { tempDir } from './helpers/temp-dir.js';
import { waitFor } from './helpers/wait-for.js';

afterAll(() => killAllServeProcesses());

function postern(dir: string, args: string[]) {
  // spawnSync is fine here: the server is another process.
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function writeConfig(dir: string, sinkPort: number, queue: string): void {
  fs.writeFileSync(
    path.join(dir, 'postern.toml'),
    `hostname = "relay.example.test"
data_dir = "./data"

[listen]
relay = "127.0.0.1:0"

[queue]
${queue}

${sinkRouteToml('example.test', sinkPort)}`,
  );
}

async function send(port: number, to: string, subject: string): Promise<string> {
  const info = await nodemailer
    .createTransport({ host: '127.0.0.1', port, ignoreTLS: true })
    .sendMail({ from: 'app@example.test', to, subject, text: subject });
  return /queued as (\S+)/.exec(info.response)![1]!;
}

describe('postern queue against a running server', () => {
  it('lists and shows deferred mail, retries one message now and deletes another', async () => {
    const sink = await SinkServer.start({ behaviour: { data: { code: 451, message: '4.3.2 Mailbox busy, try later' } } });
    const dir = tempDir();
    // A long first retry: only `queue retry` can make the message go out during the test.
    writeConfig(dir, sink.port, 'first_retry = "1h"');
    const server = await startServeProcess({ cwd: dir });
    try {
      const keep = await send(server.ports.relay!, 'keep@example.test', 'to retry');
      const drop = await send(server.ports.relay!, 'drop@example.test', 'to delete');
      await waitFor(() => sink.events.filter((e) => e.startsWith('data')).length >= 2, 20_000, 'two deferrals');
      await new Promise((r) => setTimeout(r, 300));

      const list = postern(dir, ['queue', 'list']);
      expect(list.status).toBe(0);
      expect(list.stdout).toMatch(/QUEUE ID\s+RECEIVED\s+SIZE\s+FROM\s+PENDING\s+NEXT ATTEMPT\s+LAST REPLY/);
      expect(list.stdout).toMatch(new RegExp(`${keep}\\s.*app@example\\.test\\s+1/1\\s.*451 4\\.3\\.2 Mailbox busy`));
      expect(list.stdout).toContain(drop);
      expect(list.stdout).toContain('2 message(s); recipients: 0 queued, 0 in flight, 2 deferred');

      const show = postern(dir, ['queue', 'show', keep, '--json']);
      const shown = JSON.parse(show.stdout) as { sender: string; recipients: { address: string; state: string; attempts: number; lastResponse: string }[] };
      expect(shown.sender).toBe('app@example.test');
      expect(shown.recipients).toEqual([
        expect.objectContaining({ address: 'keep@example.test', state: 'deferred', attempts: 1, lastResponse: expect.stringMatching(/^451 4\.3\.2/) }),
      ]);

      expect(postern(dir, ['queue', 'delete', drop]).stdout).toBe(`Message ${drop} deleted.\n`);
      sink.behaviour.data = undefined;
      expect(postern(dir, ['queue', 'retry', keep]).stdout).toBe('1 recipient(s) scheduled for delivery now.\n');
      // The runner looks at the store at least every 10 s; it finds the message due now.
      await sink.waitForMessages(1, 15_000);
      expect(sink.messages.map((m) => m.to)).toEqual([['keep@example.test']]);
      await waitFor(() => postern(dir, ['queue', 'list']).stdout === 'The queue is empty.\n', 5000, 'empty queue');
      expect(postern(dir, ['queue', 'show', 'NOSUCHID']).stderr).toBe('postern: no message NOSUCHID in the queue\n');
      expect(postern(dir, ['queue', 'retry']).status).toBe(2);
    } finally {
      await server.stop();
      await sink.close();
    }
  });
});

describe('SIGTERM', () => {
  it('stops accepting, lets the delivery in progress finish, and closes the store cleanly', async () => {
    const sink = await SinkServer.start({ behaviour: { dataDelayMs: 1500 } });
    const dir = tempDir();
    writeConfig(dir, sink.port, 'first_retry = "1h"');
    const server = await startServeProcess({ cwd: dir });
    const port = server.ports.relay!;
    const queueId = await send(port, 'slow@example.test', 'slow remote');
    await waitFor(() => sink.events.some((e) => e.startsWith('data')), 20_000, 'delivery in progress');
    const exit = server.stop();
    // New connections are refused once the signal is handled.
    await new Promise((r) => setTimeout(r, 300));
    const refused = await new Promise<string>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.on('connect', () => {
        s.destroy();
        resolve('connected');
      });
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
    });
    expect(refused).toBe('ECONNREFUSED');
    expect(await exit).toBe(0);
    expect(sink.messages.map((m) => m.to)).toEqual([['slow@example.test']]);
    expect(server.stdout()).toContain('"event":"stopped"');
    // The store opens without recovery work: nothing in flight, the recipient delivered.
    const store = await openStore(path.join(dir, 'data'));
    try {
      const m = await store.getMessage(queueId);
      expect(m?.recipients[0]?.state).toBe('delivered');
      expect((await store.countRecipients()).in_flight).toBe(0);
    } finally {
      await store.close();
    }
    await sink.close();
  });
});
