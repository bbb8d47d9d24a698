// Network faults on delivery (issue 4, point 4): remote servers that accept the connection and
// never answer, answer one byte a second, drop the connection in the middle of DATA, reply 421 in
// the middle of a session, or advertise STARTTLS and then fail the handshake; DNS that times out or
// returns SERVFAIL. Real sockets on 127.0.0.1 only.
//
// Every case checks three things:
//   1. the recipient is deferred (not failed, not delivered), the reply or Postern's own status
//      text is kept in the store, and the next attempt is scheduled by the backoff;
//   2. no worker stays stuck: the runner's deliveries and connection slots go back to zero, and a
//      following message to a healthy sink is delivered (with concurrency 1 a leaked slot would
//      block it);
//   3. no socket or file handle leaks: this process's open file descriptors (and the sockets
//      among them) are counted before the fault and again once the pool's idle timeout has closed
//      the idle connection to the healthy sink. Both ends of every connection live in this
//      process, so a socket left open on either side shows up.
//
// What delivery-smtp.test.ts already covers (the basic DNS deferrals, a greeting stall on
// smtp-server, opportunistic fallback after a cipher mismatch) is not repeated here.
import fs from 'node:fs';
import net from 'node:net';
import { afterAll, describe, expect, test } from 'vitest';
import type { QueuedRecipient } from '../src/store/store.js';
import { type Harness, type HarnessOptions, MINUTE, recipient, settled, useDeliveryHarness, zoneFor } from './helpers/delivery-harness.js';
import type { DnsZone } from './helpers/dns-server.js';
import type { SinkServer } from './helpers/sink-server.js';
import { waitFor } from './helpers/wait-for.js';

const { setup, startSink, afterRunner } = useDeliveryHarness();

// ---- a scripted SMTP server ----------------------------------------------------------------

/** What the server does at one step. */
type Fault =
  /** A reply; CRLF is added ("250 ok", or several lines joined with \r\n). */
  | string
  /** The reply, one byte a second. */
  | { trickle: string }
  /** Bytes as given, nothing added. */
  | { raw: string }
  /** Never send anything again (the connection stays open until the client closes it). */
  | 'silent'
  /** Reset the connection at once. */
  | 'drop'
  /** Close our side (FIN). */
  | 'close';

type Step = Fault | Fault[];

interface Script {
  greeting?: Step;
  /** Advertise STARTTLS in the EHLO reply. */
  starttls?: boolean;
  /** Advertise SIZE with this limit. */
  size?: number;
  ehlo?: Step;
  /** The reply to STARTTLS; no TLS is ever started, so end it with 'silent', 'drop' or 'close'. */
  starttlsReply?: Step;
  /** The reply to MAIL, or a function of the transaction's number on this connection (from 1). */
  mail?: Step | ((transaction: number) => Step | undefined);
  rcpt?: Step | ((address: string) => Step | undefined);
  /** The reply to DATA; by default 354, or 554 when no recipient was accepted (as Postfix does). */
  data?: Step;
  /** 'drop': reset the connection as soon as the first line of the message data arrives. */
  body?: 'drop';
  /** The reply after the final dot. */
  dataEnd?: Step;
}

const TRICKLE_INTERVAL_MS = 1000;

/**
 * A raw SMTP server on 127.0.0.1 that follows a script per connection: a normal ESMTP session
 * unless a step says otherwise. Each connection's socket is destroyed when the client goes away,
 * so a socket still open at the end is the client's doing.
 */
class ScriptedServer {
  connections = 0;
  readonly transcript: string[] = [];
  readonly messages: { connection: number; from: string; to: string[]; size: number }[] = [];
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();

  private constructor(server: net.Server) {
    this.#server = server;
  }

  static async start(script: (connection: number) => Script): Promise<ScriptedServer> {
    const server = net.createServer();
    const scripted = new ScriptedServer(server);
    server.on('connection', (socket) => {
      const n = ++scripted.connections;
      scripted.#sockets.add(socket);
      socket.on('error', () => socket.destroy());
      socket.on('close', () => scripted.#sockets.delete(socket));
      void scripted.#serve(socket, n, script(n)).catch(() => socket.destroy());
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    afterRunner(() => scripted.close());
    return scripted;
  }

  get port(): number {
    return (this.#server.address() as net.AddressInfo).port;
  }

  /** Server-side sockets still open. */
  get openSockets(): number {
    return this.#sockets.size;
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  async #serve(socket: net.Socket, n: number, script: Script): Promise<void> {
    const lines = new LineReader(socket);
    const log = (line: string) => this.transcript.push(`${n} ${line}`);
    /** false: stop serving this connection. */
    const run = async (step: Step | undefined, fallback: Step): Promise<boolean> => {
      for (const fault of [step ?? fallback].flat()) {
        if (socket.destroyed) return false;
        if (fault === 'silent') return false;
        if (fault === 'drop') {
          log('S: <reset>');
          socket.resetAndDestroy();
          return false;
        }
        if (fault === 'close') {
          log('S: <close>');
          socket.end();
          return false;
        }
        if (typeof fault === 'string') {
          log(`S: ${fault}`);
          socket.write(`${fault}\r\n`);
        } else if ('raw' in fault) {
          log(`S: <raw ${JSON.stringify(fault.raw)}>`);
          socket.write(fault.raw);
        } else {
          log(`S: <trickle ${JSON.stringify(fault.trickle)}>`);
          await trickle(socket, `${fault.trickle}\r\n`);
        }
      }
      return true;
    };

    if (!(await run(script.greeting, '220 fault.test ESMTP'))) return;
    let from = '';
    let to: string[] = [];
    let transactions = 0;
    for (;;) {
      const line = await lines.next();
      if (line === null) return;
      log(`C: ${line}`);
      const verb = line.split(' ', 1)[0]!.toUpperCase();
      let ok = true;
      switch (verb) {
        case 'EHLO': {
          const extensions = [
            'fault.test',
            'PIPELINING',
            '8BITMIME',
            ...(script.starttls ? ['STARTTLS'] : []),
            ...(script.size ? [`SIZE ${script.size}`] : []),
          ];
          ok = await run(script.ehlo, extensions.map((e, i) => `250${i === extensions.length - 1 ? ' ' : '-'}${e}`).join('\r\n'));
          break;
        }
        case 'HELO':
          ok = await run(script.ehlo, '250 fault.test');
          break;
        case 'STARTTLS':
          ok = await run(script.starttlsReply, '454 4.7.0 TLS not available');
          break;
        case 'MAIL':
          from = /<([^>]*)>/.exec(line)?.[1] ?? '';
          to = [];
          transactions++;
          ok = await run(typeof script.mail === 'function' ? script.mail(transactions) : script.mail, '250 2.1.0 Ok');
          break;
        case 'RCPT': {
          const address = /<([^>]*)>/.exec(line)?.[1] ?? '';
          const step = typeof script.rcpt === 'function' ? script.rcpt(address) : script.rcpt;
          if (!step || step === '250 2.1.5 Ok') to.push(address);
          ok = await run(step, '250 2.1.5 Ok');
          break;
        }
        case 'DATA': {
          if (script.data === undefined && to.length === 0) {
            ok = await run(undefined, '554 5.5.1 Error: no valid recipients');
            break;
          }
          ok = await run(script.data, '354 End data with <CR><LF>.<CR><LF>');
          if (!ok || (script.data !== undefined && !String([script.data].flat()[0]).startsWith('354'))) break;
          let size = 0;
          for (;;) {
            const bodyLine = await lines.next();
            if (bodyLine === null) return;
            if (script.body === 'drop') {
              log('S: <reset mid-DATA>');
              socket.resetAndDestroy();
              return;
            }
            if (bodyLine === '.') break;
            size += bodyLine.length + 2;
          }
          log(`C: <${size} bytes>`);
          ok = await run(script.dataEnd, '250 2.0.0 Ok: queued');
          if (ok && script.dataEnd === undefined) this.messages.push({ connection: n, from, to, size });
          break;
        }
        case 'RSET':
        case 'NOOP':
          ok = await run(undefined, '250 2.0.0 Ok');
          break;
        case 'QUIT':
          await run(undefined, '221 2.0.0 Bye');
          socket.end();
          return;
        default:
          ok = await run(undefined, '500 5.5.2 Unrecognised command');
      }
      if (!ok) return;
    }
  }
}

/** Lines from a socket, CRLF removed; null once the socket has closed. */
class LineReader {
  #buffer = '';
  #closed = false;
  #waiting: (() => void) | undefined;

  constructor(socket: net.Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => {
      this.#buffer += chunk;
      this.#wake();
    });
    socket.on('close', () => {
      this.#closed = true;
      this.#wake();
    });
  }

  async next(): Promise<string | null> {
    for (;;) {
      const i = this.#buffer.indexOf('\n');
      if (i >= 0) {
        const line = this.#buffer.slice(0, i).replace(/\r$/, '');
        this.#buffer = this.#buffer.slice(i + 1);
        return line;
      }
      if (this.#closed) return null;
      await new Promise<void>((resolve) => {
        this.#waiting = resolve;
      });
    }
  }

  #wake(): void {
    const resolve = this.#waiting;
    this.#waiting = undefined;
    resolve?.();
  }
}

/** Writes `text` one byte per TRICKLE_INTERVAL_MS; stops when the socket closes. */
async function trickle(socket: net.Socket, text: string): Promise<void> {
  for (const byte of Buffer.from(text, 'latin1')) {
    if (socket.destroyed || !socket.writable) return;
    socket.write(Buffer.of(byte));
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, TRICKLE_INTERVAL_MS);
      function done() {
        clearTimeout(timer);
        socket.removeListener('close', done);
        resolve();
      }
      socket.once('close', done);
    });
  }
}

// ---- open handles ---------------------------------------------------------------------------

interface Handles {
  fds: number;
  /** "socket:[inode]" for each socket descriptor. */
  sockets: string[];
}

/** This process's open file descriptors, and the sockets among them. */
function openHandles(): Handles {
  const dir = '/proc/self/fd';
  let fds = 0;
  const sockets: string[] = [];
  for (const fd of fs.readdirSync(dir)) {
    let target: string;
    try {
      target = fs.readlinkSync(`${dir}/${fd}`);
    } catch {
      continue; // the descriptor readdirSync itself used, closed by now
    }
    fds++;
    if (target.startsWith('socket:')) sockets.push(target);
  }
  return { fds, sockets };
}

/** Counts seen per case, printed at the end (the issue wants them written down). */
const observed: { name: string; before: Handles; during?: Handles; after: Handles }[] = [];
afterAll(() => {
  const rows = observed.map(
    (o) => `  ${o.name}: fds ${o.before.fds} -> ${o.during ? `${o.during.fds} (during) -> ` : ''}${o.after.fds}, sockets ${o.before.sockets.length} -> ${o.during ? `${o.during.sockets.length} -> ` : ''}${o.after.sockets.length}`,
  );
  console.info(`open file descriptors before and after each fault:\n${rows.join('\n')}`);
});

// ---- the common part of every case -----------------------------------------------------------

const HEALTHY_DOMAIN = 'healthy.test';

interface FaultHarness extends Harness {
  healthy: SinkServer;
  /** Taken after setup, before the faulty delivery. */
  before: Handles;
}

/**
 * A harness whose runner also has a route to a healthy sink (for the "no stuck worker" check),
 * one delivery at a time unless `config.delivery.concurrency` says otherwise, and a short pool
 * idle timeout so the handle count can be taken soon after.
 */
async function faultSetup(options: HarnessOptions = {}): Promise<FaultHarness> {
  const healthy = await startSink();
  const config = options.config ?? {};
  const h = await setup({
    connectionIdleTimeout: 300,
    ...options,
    config: {
      ...config,
      delivery: { concurrency: 1, ...config.delivery },
      route: [{ domains: [HEALTHY_DOMAIN], host: '127.0.0.1', port: healthy.port, tls: 'none' }, ...(config.route ?? [])],
    },
  });
  return { ...h, healthy, before: openHandles() };
}

/** Deferred after one attempt, with `response` kept and the next attempt set by the backoff. */
function expectDeferred(r: QueuedRecipient, response: string | RegExp, enqueuedAt: number): void {
  expect(r.state, `${r.address}: ${r.lastResponse}`).toBe('deferred');
  expect(r.attempts).toBe(1);
  if (typeof response === 'string') expect(r.lastResponse).toBe(response);
  else expect(r.lastResponse).toMatch(response);
  // queue.first_retry is 1 minute by default, minus up to 10 % jitter.
  expect(r.nextAttemptAt).toBeGreaterThanOrEqual(enqueuedAt + 0.9 * MINUTE - 10);
  expect(r.nextAttemptAt).toBeLessThanOrEqual(Date.now() + MINUTE);
}

/**
 * No stuck worker: the runner is idle again, and the next message (to the healthy sink) goes
 * through. Then no leak: once the idle connection to the healthy sink is closed, the descriptor
 * and socket counts are back where they were before the fault.
 */
async function expectRecovered(h: FaultHarness, name: string, servers: { openSockets: number }[] = []): Promise<void> {
  await waitFor(() => {
    const a = h.runner.activity;
    return a.deliveries === 0 && a.connectionsInUse === 0;
  }, 5000, 'the runner to be idle');
  const during = openHandles();

  const queueId = await h.enqueue({ sender: 'app@client.test', recipients: [`after@${HEALTHY_DOMAIN}`] });
  expect(recipient(await settled(h, queueId), `after@${HEALTHY_DOMAIN}`).state).toBe('delivered');
  expect(h.healthy.messages.map((m) => m.to)).toContainEqual([`after@${HEALTHY_DOMAIN}`]);

  await waitFor(() => {
    const a = h.runner.activity;
    return a.deliveries === 0 && a.connectionsInUse === 0 && a.idleConnections === 0 && servers.every((s) => s.openSockets === 0);
  }, 5000, 'idle connections to close');
  // The last socket closes a moment after the pool lets go of it (QUIT, then the server's FIN).
  const after = await waitFor(() => {
    const now = openHandles();
    return now.fds <= h.before.fds && now.sockets.length <= h.before.sockets.length ? now : undefined;
  }, 5000, 'descriptors to be closed').catch(() => openHandles());
  observed.push({ name, before: h.before, during, after });
  expect(after.sockets, 'sockets still open').toEqual(h.before.sockets);
  expect(after.fds, 'file descriptors still open').toBe(h.before.fds);
}

// ---- cases -----------------------------------------------------------------------------------

describe('a server that accepts the connection and never answers', () => {
  test('silent from the start: deferred when connect_timeout runs out (no greeting)', async () => {
    const server = await ScriptedServer.start(() => ({ greeting: 'silent' }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port, config: { delivery: { connect_timeout: '500ms' } } });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, `4.4.2 Timed out talking to mx.dest.test[127.0.0.1]:${server.port}: no greeting`, at);
    expect(r.lastCode).toBeNull();
    expect(server.connections).toBe(1);
    await expectRecovered(h, 'silent from the start', [server]);
  });

  test('greets, then never answers MAIL: deferred when command_timeout runs out', async () => {
    const server = await ScriptedServer.start(() => ({ mail: 'silent' }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port, config: { delivery: { command_timeout: '500ms' } } });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, new RegExp(`^4\\.4\\.2 Timed out talking to mx\\.dest\\.test\\[127\\.0\\.0\\.1\\]:${server.port}: no reply`), at);
    await expectRecovered(h, 'silent after the greeting', [server]);
  });
});

describe('a server that answers one byte a second', () => {
  test('a trickled greeting: deferred when connect_timeout runs out', async () => {
    const server = await ScriptedServer.start(() => ({ greeting: { trickle: '220 trickle.test ESMTP at one byte a second' } }));
    // command_timeout above the byte interval: nodemailer's idle timer never fires, connect_timeout does.
    const h = await faultSetup({
      zone: zoneFor('dest.test'),
      mxPort: server.port,
      config: { delivery: { connect_timeout: '1500ms', command_timeout: '3s' } },
    });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, `4.4.2 Timed out talking to mx.dest.test[127.0.0.1]:${server.port}: no greeting`, at);
    await expectRecovered(h, 'trickled greeting', [server]);
  });

  test('a trickled session: deferred when a reply takes longer than command_timeout, although bytes keep coming', async () => {
    // The greeting ("220" and CRLF: 5 bytes, 4 s) fits in connect_timeout; every reply after it
    // takes longer than command_timeout although the server is never silent for that long.
    const slow = (text: string) => ({ trickle: text });
    const server = await ScriptedServer.start(() => ({
      greeting: slow('220'),
      ehlo: slow('250 trickle.test'),
      mail: slow('250 2.1.0 Ok'),
      rcpt: slow('250 2.1.5 Ok'),
      data: slow('354 Go ahead'),
      dataEnd: slow('250 2.0.0 Ok'),
    }));
    const h = await faultSetup({
      zone: zoneFor('dest.test'),
      mxPort: server.port,
      config: { delivery: { connect_timeout: '8s', command_timeout: '2500ms' } },
    });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId, 15_000), 'a@dest.test');
    expectDeferred(
      r,
      new RegExp(
        `^4\\.4\\.2 Timed out talking to mx\\.dest\\.test\\[127\\.0\\.0\\.1\\]:${server.port}: reply not complete after 2\\.5 s \\(\\d+ bytes of it received; the server sends too slowly\\)$`,
      ),
      at,
    );
    // Cut off during the reply to EHLO: no transaction was started.
    expect(server.transcript).toContain('1 C: EHLO relay.test');
    expect(server.transcript.filter((l) => l.startsWith('1 C: MAIL'))).toEqual([]);
    expect(server.messages).toHaveLength(0);
    await expectRecovered(h, 'trickled replies', [server]);
  }, 30_000);
});

describe('a server that drops the connection during DATA', () => {
  test('reset in the middle of the message data: deferred (connection lost), spool file closed', async () => {
    const server = await ScriptedServer.start(() => ({ body: 'drop' }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    // 4 MiB: more than the socket buffers hold, so Postern is still writing when the reset comes.
    const line = `${'x'.repeat(998)}\r\n`;
    const body = `From: <app@client.test>\r\nTo: <a@dest.test>\r\nSubject: big\r\n\r\n${line.repeat(4096)}`;
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'], body });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, new RegExp(`^4\\.4\\.2 Connection to mx\\.dest\\.test\\[127\\.0\\.0\\.1\\]:${server.port} lost: `), at);
    expect(r.lastCode).toBeNull();
    expect(server.messages).toHaveLength(0);
    await expectRecovered(h, 'reset mid-DATA', [server]);
  });

  test('closed after the final dot, before the reply: deferred (connection lost)', async () => {
    const server = await ScriptedServer.start(() => ({ dataEnd: 'close' }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, new RegExp(`^4\\.4\\.2 Connection to mx\\.dest\\.test\\[127\\.0\\.0\\.1\\]:${server.port} lost: `), at);
    await expectRecovered(h, 'closed before the final reply', [server]);
  });
});

describe('a server that replies 421 in the middle of the session', () => {
  test('421 to a RCPT after another was accepted: both recipients deferred with the 421', async () => {
    const server = await ScriptedServer.start(() => ({
      rcpt: (address) => (address === 'b@dest.test' ? ['421 4.3.2 Service shutting down', 'close'] : undefined),
    }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test', 'b@dest.test'] });
    const m = await settled(h, queueId);
    for (const address of ['a@dest.test', 'b@dest.test']) {
      const r = recipient(m, address);
      expectDeferred(r, '421 4.3.2 Service shutting down', at);
      expect(r.lastCode).toBe(421);
    }
    expect(server.messages).toHaveLength(0);
    await expectRecovered(h, '421 to RCPT', [server]);
  });

  test('421 to DATA after the recipients were accepted: every recipient deferred with the 421', async () => {
    const server = await ScriptedServer.start(() => ({ data: ['421 4.3.2 Service shutting down', 'close'] }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test', 'b@dest.test'] });
    const m = await settled(h, queueId);
    for (const address of ['a@dest.test', 'b@dest.test']) {
      const r = recipient(m, address);
      expectDeferred(r, '421 4.3.2 Service shutting down', at);
      expect(r.lastCode).toBe(421);
    }
    await expectRecovered(h, '421 to DATA', [server]);
  });

  test('421 to the end of the message data: deferred, not delivered', async () => {
    const server = await ScriptedServer.start(() => ({ dataEnd: ['421 4.4.2 Connection timed out, closing', 'close'] }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    const at = Date.now();
    const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expectDeferred(r, '421 4.4.2 Connection timed out, closing', at);
    expect(r.lastCode).toBe(421);
    await expectRecovered(h, '421 to the final dot', [server]);
  });
});

/** The verbs the client sent on connection `n`, in order (message data left out). */
function commandsOn(server: ScriptedServer, n: number): string[] {
  return server.transcript
    .filter((l) => l.startsWith(`${n} C: `) && !l.startsWith(`${n} C: <`))
    .map((l) => l.slice(`${n} C: `.length).split(' ')[0]!.toUpperCase());
}

describe('a kept connection', () => {
  // Kept open for the next message to the same place (the pool's idle timeout), a connection can
  // be closed by the server at the moment it is used again: the server's own idle timeout.
  test.each(['close', 'drop'] as const)(
    'the server ends it (%s) as the next message begins: sent at once on a new connection, not deferred',
    async (fault) => {
      const server = await ScriptedServer.start((n) => (n === 1 ? { mail: (t) => (t === 2 ? fault : undefined) } : {}));
      const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port, connectionIdleTimeout: 30_000 });
      const first = await h.enqueue({ sender: 'app@client.test', recipients: ['a@dest.test'] });
      expect(recipient(await settled(h, first), 'a@dest.test').state).toBe('delivered');
      const second = await h.enqueue({ sender: 'app@client.test', recipients: ['b@dest.test'] });
      const r = recipient(await settled(h, second), 'b@dest.test');
      expect(r.state).toBe('delivered');
      expect(r.attempts).toBe(1);
      expect(server.messages.map((m) => [m.connection, m.to])).toEqual([
        [1, ['a@dest.test']],
        [2, ['b@dest.test']],
      ]);
      // The second message went straight to MAIL on the kept connection: no RSET after a
      // transaction that ended with the server's reply to the message data.
      expect(commandsOn(server, 1)).toEqual(['EHLO', 'MAIL', 'RCPT', 'DATA', 'MAIL']);
      await expectRecovered(h, `kept connection, ${fault}`, [server]);
    },
  );

  test('after a transaction the server refused, the next message on it starts with RSET', async () => {
    const server = await ScriptedServer.start(() => ({
      rcpt: (address) => (address.startsWith('nobody') ? '550 5.1.1 No such user' : undefined),
    }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port, connectionIdleTimeout: 30_000 });
    const refused = await h.enqueue({ sender: 'app@client.test', recipients: ['nobody@dest.test'] });
    expect(recipient(await settled(h, refused), 'nobody@dest.test').state).toBe('failed');
    const next = await h.enqueue({ sender: 'app@client.test', recipients: ['b@dest.test'] });
    expect(recipient(await settled(h, next), 'b@dest.test').state).toBe('delivered');
    // (The bounce for nobody@ goes to client.test on a connection of its own.)
    expect(commandsOn(server, 1).slice(0, 8)).toEqual(['EHLO', 'MAIL', 'RCPT', 'DATA', 'RSET', 'MAIL', 'RCPT', 'DATA']);
    expect(server.transcript).toContain('1 S: 554 5.5.1 Error: no valid recipients');
    await expectRecovered(h, 'RSET after a refusal', [server]);
  });
});

describe('a server whose SIZE is below the message', () => {
  test('fails at once (5.3.4) without a transaction, and the spool file is closed', async () => {
    const server = await ScriptedServer.start(() => ({ size: 100_000 }));
    const h = await faultSetup({ zone: zoneFor('dest.test'), mxPort: server.port });
    // 200 KiB: past the store's inline limit, so the body is read from a spool file.
    const body = `From: <app@client.test>\r\nTo: <a@dest.test>\r\nSubject: big\r\n\r\n${`${'y'.repeat(998)}\r\n`.repeat(200)}`;
    const queueId = await h.enqueue({ sender: '', recipients: ['a@dest.test'], body });
    const r = recipient(await settled(h, queueId), 'a@dest.test');
    expect(r.state).toBe('failed');
    expect(r.lastResponse).toMatch(/^5\.3\.4 Message size \d+ bytes exceeds the limit of 100000 bytes announced by /);
    expect(server.transcript.filter((l) => / C: (MAIL|RCPT|DATA)/.test(l))).toEqual([]);
    await expectRecovered(h, 'SIZE below the message', [server]);
  });
});

describe('STARTTLS advertised, then the handshake fails', () => {
  const READY = '220 2.0.0 Ready to start TLS';
  const handshakeFaults: { name: string; reply: Step }[] = [
    { name: 'plaintext instead of a TLS handshake', reply: [READY, { raw: 'this is not TLS\r\n' }, 'silent'] },
    { name: 'connection reset after the 220', reply: [READY, 'drop'] },
    { name: 'no handshake at all (silent after the 220)', reply: [READY, 'silent'] },
  ];

  describe('tls = "required" on a route: deferred (4.7.5), never sent in plaintext', () => {
    test('TLS alert: no cipher in common', async () => {
      const sink = await startSink({ starttls: true, tlsOptions: { maxVersion: 'TLSv1.2', ciphers: 'PSK-AES128-CBC-SHA' } });
      const h = await faultSetup({ config: { route: [{ domains: ['secure.test'], host: '127.0.0.1', port: sink.port, tls: 'required' }] } });
      const at = Date.now();
      const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@secure.test'] });
      const r = recipient(await settled(h, queueId), 'a@secure.test');
      expectDeferred(r, new RegExp(`^4\\.7\\.5 TLS handshake with \\[127\\.0\\.0\\.1\\]:${sink.port} failed: `), at);
      expect(sink.connections).toBe(1);
      expect(sink.messages).toHaveLength(0);
      await expectRecovered(h, 'required TLS: no shared cipher');
    });

    for (const { name, reply } of handshakeFaults) {
      test(name, async () => {
        const server = await ScriptedServer.start(() => ({ starttls: true, starttlsReply: reply }));
        const h = await faultSetup({
          config: {
            delivery: { connect_timeout: '700ms' },
            route: [{ domains: ['secure.test'], host: '127.0.0.1', port: server.port, tls: 'required' }],
          },
        });
        const at = Date.now();
        const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@secure.test'] });
        const r = recipient(await settled(h, queueId), 'a@secure.test');
        expectDeferred(r, new RegExp(`^4\\.7\\.5 TLS handshake with \\[127\\.0\\.0\\.1\\]:${server.port} failed: `), at);
        expect(server.connections).toBe(1);
        expect(server.transcript.filter((l) => / C: (MAIL|RCPT|DATA)/.test(l))).toEqual([]);
        await expectRecovered(h, `required TLS: ${name}`, [server]);
      });
    }
  });

  describe('opportunistic TLS on a route: delivered in plaintext on a second connection', () => {
    for (const { name, reply } of handshakeFaults) {
      test(name, async () => {
        const server = await ScriptedServer.start((n) => (n === 1 ? { starttls: true, starttlsReply: reply } : { starttls: true }));
        const h = await faultSetup({
          config: {
            delivery: { connect_timeout: '700ms' },
            route: [{ domains: ['maybe.test'], host: '127.0.0.1', port: server.port, tls: 'opportunistic' }],
          },
        });
        const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@maybe.test'] });
        const r = recipient(await settled(h, queueId), 'a@maybe.test');
        expect(r.state, r.lastResponse ?? '').toBe('delivered');
        expect(server.connections).toBe(2);
        expect(server.messages).toEqual([expect.objectContaining({ connection: 2, to: ['a@maybe.test'] })]);
        // The plaintext session did not try STARTTLS again.
        expect(server.transcript.filter((l) => l === '2 C: STARTTLS')).toEqual([]);
        await expectRecovered(h, `opportunistic TLS: ${name}`, [server]);
      });
    }

    test('the plaintext retry fails too: deferred, not failed', async () => {
      const server = await ScriptedServer.start((n) => (n === 1 ? { starttls: true, starttlsReply: [READY, 'drop'] } : { greeting: 'drop' }));
      const h = await faultSetup({ config: { route: [{ domains: ['maybe.test'], host: '127.0.0.1', port: server.port, tls: 'opportunistic' }] } });
      const at = Date.now();
      const queueId = await h.enqueue({ sender: 'app@client.test', recipients: ['a@maybe.test'] });
      const r = recipient(await settled(h, queueId), 'a@maybe.test');
      expectDeferred(r, /^4\.\d\.\d /, at);
      expect(server.connections).toBe(2);
      await expectRecovered(h, 'opportunistic TLS: plaintext retry fails', [server]);
    });
  });
});

describe('DNS that times out or fails: many deliveries at once, nothing left behind', () => {
  const dnsFaults: { name: string; zone: DnsZone; response: RegExp }[] = [
    { name: 'MX query times out', zone: { 'dest.test': { timeout: true } }, response: /^4\.4\.3 DNS lookup of dest\.test \(MX\) failed temporarily \(timeout\); will retry$/ },
    { name: 'MX query SERVFAIL', zone: { 'dest.test': { servfail: true } }, response: /^4\.4\.3 DNS lookup of dest\.test \(MX\) failed temporarily \(SERVFAIL\); will retry$/ },
    {
      name: 'MX found, its address lookups time out',
      zone: { 'dest.test': { MX: [{ priority: 10, exchange: 'mx.dest.test' }] }, 'mx.dest.test': { timeout: true } },
      response: /^4\.4\.3 DNS lookup of mx\.dest\.test failed temporarily \(A{1,4}: timeout\); will retry$/,
    },
  ];

  for (const { name, zone, response } of dnsFaults) {
    test(name, async () => {
      // Nothing listens on the MX port: if DNS ever answered, the delivery would fail differently.
      const h = await faultSetup({ zone, mxPort: 9, config: { delivery: { concurrency: 4 } } });
      const at = Date.now();
      const ids = await Promise.all(
        Array.from({ length: 8 }, (_, i) => h.enqueue({ sender: 'app@client.test', recipients: [`u${i}@dest.test`] })),
      );
      for (const [i, id] of ids.entries()) expectDeferred(recipient(await settled(h, id), `u${i}@dest.test`), response, at);
      await expectRecovered(h, `DNS: ${name}`);
    });
  }
});
