// An SMTP sink for tests: a real smtp-server on loopback (random port) that records every message
// it accepts (envelope and raw bytes) and every connection, and can be told how to misbehave:
// refuse the connection (421), refuse MAIL, RCPT for given addresses or the message after DATA,
// with any code and text, or stall (never answer) at a given step to exercise timeouts. It offers
// STARTTLS with a self-signed certificate when asked. Behaviour is a plain mutable object, so a
// test can change it between two delivery attempts.
//
// Pitfalls handled here: smtp-server needs an 'error' listener or a failed TLS handshake crashes
// the process; reverse DNS is disabled (no lookups of 127.0.0.1 in tests); close() does not wait
// the default 30 s for stalled sessions.
import type { AddressInfo } from 'node:net';
import type { Readable } from 'node:stream';
import { generate } from 'selfsigned';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';

export interface SinkReply {
  code: number;
  /** Text after the code; include an enhanced status code if you want one ("5.1.1 No such user"). */
  message: string;
}

export type SinkStallPoint = 'greeting' | 'mail' | 'rcpt' | 'data';

export interface SinkBehaviour {
  /** Answer the connection with this instead of the greeting (421 closes it). */
  connect?: SinkReply;
  mail?: SinkReply;
  /** Per recipient address, lower case. */
  rcpt?: Record<string, SinkReply>;
  /** The reply after the message data (instead of 250). */
  data?: SinkReply;
  /** Never answer at this step. */
  stall?: SinkStallPoint;
  /** Wait this long before answering the message data (a slow but working server). */
  dataDelayMs?: number;
}

export interface SinkOptions {
  /** Address to listen on (default 127.0.0.1). */
  host?: string;
  /** Port (default: a random free one). */
  port?: number;
  /** Offer STARTTLS with a self-signed certificate (default false: STARTTLS is refused). */
  starttls?: boolean;
  /** Extra TLS options for the server (ciphers, versions), to make handshakes fail on purpose. */
  tlsOptions?: Partial<SMTPServerOptions>;
  /** Do not announce PIPELINING. */
  hidePipelining?: boolean;
  /** Announce SIZE with this limit. */
  size?: number;
  behaviour?: SinkBehaviour;
}

export interface ReceivedMessage {
  /** '' for the null sender. */
  from: string;
  to: string[];
  raw: Buffer;
  /** raw as UTF-8, for assertions. */
  text: string;
  /** The session was upgraded with STARTTLS. */
  secure: boolean;
  /** 1-based number of the connection that carried it. */
  connection: number;
  heloName: string;
  /** When the message data was complete (Date.now(), ms): before any dataDelayMs and the reply. */
  receivedAt: number;
}

interface SessionState {
  connection: number;
}

let cachedCert: Promise<{ key: string; cert: string }> | undefined;

/** One self-signed certificate per test process (generating one takes a moment). */
function certificate(): Promise<{ key: string; cert: string }> {
  cachedCert ??= generate([{ name: 'commonName', value: 'sink.test' }], { keySize: 2048, notAfterDate: new Date(Date.now() + 2 * 86_400_000) }).then((pems) => ({
    key: pems.private,
    cert: pems.cert,
  }));
  return cachedCert;
}

export class SinkServer {
  /** Edit freely while the server runs. */
  behaviour: SinkBehaviour;
  readonly messages: ReceivedMessage[] = [];
  /** Connections accepted so far. */
  connections = 0;
  /** Every command-level event, for debugging a failing test: "connect #1", "rcpt b@x.test 550"... */
  readonly events: string[] = [];
  /**
   * Called the moment a message's data is complete, before the sink waits dataDelayMs and answers
   * (it then holds the message: the client has sent it all and has no reply yet). The message
   * joins `messages` later, as the sink answers 250 (not if it refuses the message).
   */
  onDataComplete: ((message: ReceivedMessage) => void) | undefined;
  readonly #server: SMTPServer;
  readonly #sessions = new Map<string, SessionState>();
  #waiters: { count: number; resolve: () => void }[] = [];

  private constructor(server: SMTPServer, behaviour: SinkBehaviour) {
    this.#server = server;
    this.behaviour = behaviour;
  }

  static async start(options: SinkOptions = {}): Promise<SinkServer> {
    const tls = options.starttls ? await certificate() : undefined;
    let sink: SinkServer | undefined;
    const server = new SMTPServer({
      ...(tls ? { key: tls.key, cert: tls.cert } : { hideSTARTTLS: true }),
      ...options.tlsOptions,
      disabledCommands: options.starttls ? ['AUTH'] : ['AUTH', 'STARTTLS'],
      authOptional: true,
      disableReverseLookup: true,
      hidePIPELINING: options.hidePipelining ?? false,
      ...(options.size ? { size: options.size } : {}),
      closeTimeout: 100,
      logger: false,
      onConnect: (session, callback) => sink!.#onConnect(session, callback),
      onMailFrom: (address, session, callback) => sink!.#onMailFrom(address.address, session, callback),
      onRcptTo: (address, session, callback) => sink!.#onRcptTo(address.address, session, callback),
      onData: (stream, session, callback) => sink!.#onData(stream, session, callback),
    });
    sink = new SinkServer(server, options.behaviour ?? {});
    // A failed TLS handshake or a client reset surfaces here; without a listener it would throw.
    server.on('error', (err) => sink!.events.push(`error ${err.message}`));
    await new Promise<void>((resolve, reject) => {
      server.server.once('error', reject);
      server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => resolve());
    });
    return sink;
  }

  get host(): string {
    return (this.#server.server.address() as AddressInfo).address;
  }

  get port(): number {
    return (this.#server.server.address() as AddressInfo).port;
  }

  /** SMTP connections open now (a connection leaves this count once its socket has closed). */
  get openConnections(): number {
    return this.#server.connections.size;
  }

  /** Resolves once `count` messages in total have been received; rejects after `timeoutMs`. */
  waitForMessages(count: number, timeoutMs = 10_000): Promise<ReceivedMessage[]> {
    if (this.messages.length >= count) return Promise.resolve(this.messages.slice());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`sink: expected ${count} messages, got ${this.messages.length} after ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter = {
        count,
        resolve: () => {
          clearTimeout(timer);
          resolve(this.messages.slice());
        },
      };
      this.#waiters.push(waiter);
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  #state(session: SMTPServerSession): SessionState {
    let state = this.#sessions.get(session.id);
    if (!state) {
      state = { connection: 0 };
      this.#sessions.set(session.id, state);
    }
    return state;
  }

  #onConnect(session: SMTPServerSession, callback: (err?: Error | null) => void): void {
    this.connections++;
    this.#state(session).connection = this.connections;
    this.events.push(`connect #${this.connections}`);
    if (this.behaviour.stall === 'greeting') return;
    if (this.behaviour.connect) return callback(replyError(this.behaviour.connect));
    callback();
  }

  #onMailFrom(address: string, _session: SMTPServerSession, callback: (err?: Error | null) => void): void {
    this.events.push(`mail <${address}>`);
    if (this.behaviour.stall === 'mail') return;
    if (this.behaviour.mail) return callback(replyError(this.behaviour.mail));
    callback();
  }

  #onRcptTo(address: string, _session: SMTPServerSession, callback: (err?: Error | null) => void): void {
    const reply = this.behaviour.rcpt?.[address.toLowerCase()];
    this.events.push(`rcpt <${address}> ${reply?.code ?? 250}`);
    if (this.behaviour.stall === 'rcpt') return;
    if (reply) return callback(replyError(reply));
    callback();
  }

  #onData(stream: Readable, session: SMTPServerSession, callback: (err?: Error | null) => void): void {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.on('end', async () => {
      this.events.push(`data ${session.envelope.rcptTo.length} rcpt`);
      if (this.behaviour.stall === 'data') return;
      const raw = Buffer.concat(chunks);
      const mailFrom = session.envelope.mailFrom;
      const message: ReceivedMessage = {
        from: mailFrom ? mailFrom.address : '',
        to: session.envelope.rcptTo.map((r) => r.address),
        raw,
        text: raw.toString('utf8'),
        secure: session.secure,
        connection: this.#state(session).connection,
        heloName: session.hostNameAppearsAs,
        receivedAt: Date.now(),
      };
      this.onDataComplete?.(message);
      if (this.behaviour.dataDelayMs) await new Promise((r) => setTimeout(r, this.behaviour.dataDelayMs));
      if (this.behaviour.data) return callback(replyError(this.behaviour.data));
      this.messages.push(message);
      for (const waiter of this.#waiters.filter((w) => this.messages.length >= w.count)) {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        waiter.resolve();
      }
      callback();
    });
  }
}

function replyError(reply: SinkReply): Error {
  const err = new Error(reply.message) as Error & { responseCode: number };
  err.responseCode = reply.code;
  return err;
}
