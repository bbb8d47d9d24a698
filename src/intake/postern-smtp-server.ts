// smtp-server, adjusted where its defaults are wrong for a submission relay. Every adjustment is
// here, in one place, each with its reason and a test (test/intake-protocol.test.ts):
//
// 1. No 100 ms wait before the greeting. smtp-server delays every greeting to catch "early
//    talkers" (spam bots that send before the banner). Our clients are authenticated devices and
//    allow-listed networks, and the delay caps one device sending one message per connection at
//    ~9 messages/s. There is no option for it, so `connect()` starts the session without it.
// 2. TCP_NODELAY on every accepted socket: without it, Nagle's algorithm meets the client's
//    delayed ACK and each multi-packet reply stalls ~40 ms. smtp-server 3.21 sets it too; we set
//    it here as well so an upgrade cannot lose it silently, and a test checks the socket.
// 3. AUTH is not advertised before TLS (smtp-server lists it in EHLO on a cleartext connection
//    even though it refuses to run it there). Clients that see AUTH may send the password in clear.
// 4. Replies whose text already starts with an enhanced status code (our SmtpReplyError texts)
//    are sent as they are, instead of getting smtp-server's generic code put in front.
// 5. smtp-server's "538 Error: Must issue a STARTTLS command first" becomes the registry's
//    AUTH_NEEDS_TLS reply, which says what to change on the device.
// 6. The idle timeout counts complete commands, not bytes: smtp-server re-arms it on any byte, so
//    a client trickling one byte a second (slowloris) would hold its connection forever. A sweep
//    closes sessions with no complete command line within the timeout, the way smtp-server's own
//    timeout does (421), except while DATA streams or a handler is still working.
// 7. Each connection's id (the `session` of every log line) is drawn from randomUUID's cache, not
//    with randomBytes: that went to OpenSSL once per connection, 1 to 2% of a new connection's
//    CPU. The same 80 random bits, in smtp-server's form (16 base-32 characters).
// 8. Replies go out in one write per connection and turn of the event loop, as Redis writes its
//    replies just before it waits for more input, and as RFC 2920 section 3.2 allows a server to
//    do. A client that pipelines MAIL, RCPT and DATA gets its three replies in one segment instead
//    of three: smtp-server writes each reply on its own, and on this VM every write that wakes a
//    waiting client cost about 30 us (from CPU profiles), a quarter of the intake's main thread on
//    reused connections. Measured in four alternating pairs of 3 s runs (relay port, reused
//    connections, c=50, 2 cores): Postern's accepted messages 2,552 -> 2,918/s (medians) and its
//    CPU per message 545 -> 474 us; the bare server alone 6 to 35% less CPU per message.
//    A 220 (the greeting, STARTTLS's go-ahead) goes out at once, with whatever was held before it:
//    STARTTLS wraps the socket in TLS right after its 220, and the cleartext reply must be on the
//    wire before that, not left to the wrapped socket's buffer (Node happens to write it in order
//    today; the tests pass either way, so this is insurance). Replies before a close need nothing:
//    smtp-server closes with socket.end(), which writes what is held first.
import { randomUUID } from 'node:crypto';
import type net from 'node:net';
import type tls from 'node:tls';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import { smtpError } from '../errors/smtp-errors.js';

const ENHANCED_PREFIX = /^[245]\.\d{1,3}\.\d{1,3} /;

export interface PosternSmtpServerOptions extends SMTPServerOptions {
  /** Keep AUTH out of EHLO until the connection is encrypted (unless insecure AUTH is allowed). */
  hideAuthBeforeTls?: boolean;
}

type InternalConnection = SMTPConnection & {
  secure: boolean;
  _handlerPending: boolean;
  _parser?: { _dataMode?: boolean };
  _closing: boolean;
  _socket: net.Socket;
  _onCommand(command: Buffer, callback: () => void): void;
  _onTimeout(): void;
  _setListeners(done: () => void): void;
  connectionReady(): void;
  send(code: number, data?: string | string[], context?: string | false): void;
};

export class PosternSmtpServer extends SMTPServer {
  readonly #hideAuthBeforeTls: boolean;
  readonly #idleMs: number;
  readonly #lastCommand = new WeakMap<SMTPConnection, number>();
  readonly #sweep: NodeJS.Timeout;
  /** Sockets corked since this turn of the event loop began writing replies (8). */
  readonly #corked = new Set<net.Socket>();

  constructor(options: PosternSmtpServerOptions) {
    const { hideAuthBeforeTls, ...rest } = options;
    super(rest);
    this.#hideAuthBeforeTls = hideAuthBeforeTls ?? false;
    this.#idleMs = options.socketTimeout ?? 60_000;
    this.#sweep = setInterval(() => this.#closeTricklers(), Math.min(1000, this.#idleMs / 2));
    this.#sweep.unref();
  }

  override close(callback?: () => void): void {
    clearInterval(this.#sweep);
    super.close(callback);
  }

  #closeTricklers(): void {
    const now = Date.now();
    for (const c of this.connections as Set<InternalConnection>) {
      const last = this.#lastCommand.get(c);
      if (last === undefined || now - last < this.#idleMs || c._closing) continue;
      if (c._handlerPending || c._parser?._dataMode) continue;
      this.#lastCommand.set(c, now);
      c._onTimeout();
    }
  }

  /** Holds a reply for the end of this turn of the event loop, or writes what waits now (8). */
  #hold(connection: InternalConnection, code: number): void {
    const socket = connection._socket;
    if (code === 220) {
      if (this.#corked.delete(socket)) socket.uncork();
      return;
    }
    if (this.#corked.has(socket) || !socket.writable) return;
    socket.cork();
    this.#corked.add(socket);
    // The first socket held on this turn schedules the flush for all of them. (Should an earlier
    // flush still be pending, it finds what it finds and the later one nothing: harmless.)
    if (this.#corked.size > 1) return;
    setImmediate(() => {
      for (const held of this.#corked) held.uncork();
      this.#corked.clear();
    });
  }

  /** smtp-server's step between accepting a socket and connect(): the PROXY header, and the id (7). */
  override _handleProxy(socket: net.Socket, callback: Parameters<SMTPServer['_handleProxy']>[1]): void {
    if (this.options.useProxy) {
      super._handleProxy(socket, callback);
      return;
    }
    const ignore = Boolean(this.options.ignoredHosts?.includes(socket.remoteAddress ?? ''));
    const socketOptions = { id: connectionId(), ignore };
    setImmediate(() => callback(null, socketOptions));
  }

  override connect(socket: net.Socket | tls.TLSSocket, socketOptions?: any): void {
    socket.setNoDelay(true);
    const connection = new SMTPConnection(this, socket, socketOptions) as InternalConnection;
    this.connections.add(connection);
    const self = this as unknown as { _onError(err: Error): void; _onClientConnect(data: unknown): void };
    connection.on('error', (err: Error) => self._onError(err));
    connection.on('connect', (data: unknown) => self._onClientConnect(data));

    const send = connection.send.bind(connection);
    const hideAuth = this.#hideAuthBeforeTls;
    connection.send = (code, data, context) => {
      if (hideAuth && !connection.secure && Array.isArray(data)) {
        data = data.filter((line) => !/^AUTH\b/i.test(line));
      }
      if (code === 538) data = smtpError('AUTH_NEEDS_TLS').message;
      if (typeof data === 'string' && ENHANCED_PREFIX.test(data)) context = false;
      this.#hold(connection, code);
      send(code, data, context);
    };

    this.#lastCommand.set(connection, Date.now());
    const onCommand = connection._onCommand.bind(connection);
    connection._onCommand = (command, callback) => {
      this.#lastCommand.set(connection, Date.now());
      onCommand(command, callback);
    };

    // smtp-server's init() is `_setListeners(() => setTimeout(connectionReady, 100))`; we keep
    // everything but the timer. Connection caps are enforced in onConnect with a proper reply.
    connection._setListeners(() => connection.connectionReady());
  }
}

/** 80 random bits of a UUID (leaving out its version and variant digits), as smtp-server writes its ids. */
function connectionId(): string {
  const hex = randomUUID().replace(/-/g, '');
  return BigInt(`0x${hex.slice(0, 12)}${hex.slice(17, 25)}`).toString(32).padStart(16, '0');
}
