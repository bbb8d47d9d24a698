// smtp-server, made to answer in someone else's words. A stand-in for Exchange Online or Gmail
// has to greet, list extensions and reply the way they do (their EHLO list, no AUTH before
// STARTTLS, "235 2.7.0 Authentication successful", "250 2.1.0 Sender OK"…), because Postern's
// upstream code reads those replies. smtp-server has its own texts and no option for most of
// them, so every reply it is about to send goes through the stand-in's dialect: a function that
// gets the code, the lines and the connection and returns the provider's reply, or nothing to keep
// smtp-server's (with a generic enhanced status code added: both providers advertise
// ENHANCEDSTATUSCODES, so every reply must carry one).
//
// Also, as src/intake/postern-smtp-server.ts does for Postern itself: no 100 ms "early talker"
// pause before the greeting (neither provider has one, and the bench would measure it), and
// TCP_NODELAY. And a way from a session back to its connection, for the TLS version and for the
// dialect's per-connection ids.
import type net from 'node:net';
import type tls from 'node:tls';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';

export interface OutgoingReply {
  code: number;
  /** The reply's text lines, without the code. */
  lines: string[];
  /** smtp-server's context: 'MAIL_FROM_OK', 'RCPT_TO_OK', 'DATA_OK'…, false for the greeting and HELO/EHLO. */
  context: string | false | undefined;
}

export interface Reply {
  code: number;
  lines: string[];
}

/** Returns the provider's version of a reply, or undefined to keep smtp-server's. */
export type Dialect = (reply: OutgoingReply, connection: SMTPConnection) => Reply | undefined;

const ENHANCED = /^[245]\.\d{1,3}\.\d{1,3}(\s|$)/;

/** Whether a reply's text already starts with an enhanced status code ("5.7.3 …"). */
export function hasEnhancedCode(reply: { lines: string[] }): boolean {
  return ENHANCED.test(reply.lines[0] ?? '');
}

/** A reply as it goes on the wire, lines joined with \r\n: "535 5.7.3 Authentication unsuccessful". */
export function replyText(reply: Reply): string {
  return reply.lines.map((line, i) => `${reply.code}${i < reply.lines.length - 1 ? '-' : ' '}${line}`).join('\r\n');
}

/** The TLS protocol a connection negotiated ('TLSv1.2'…), or undefined before STARTTLS. */
export function tlsProtocol(connection: SMTPConnection | undefined): string | undefined {
  if (!connection?.secure) return undefined;
  return (connection._socket as tls.TLSSocket).getProtocol?.() ?? undefined;
}

export class StandInSmtpServer extends SMTPServer {
  readonly #dialect: Dialect;
  readonly #connections = new Map<string, SMTPConnection>();

  /** Listens on 127.0.0.1, any free port. */
  async listenLoopback(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.listen(0, '127.0.0.1', () => resolve());
    });
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  stop(): Promise<void> {
    return new Promise<void>((resolve) => this.close(() => resolve()));
  }

  constructor(options: SMTPServerOptions, dialect: Dialect) {
    // smtp-server adds no enhanced codes of its own: the dialect writes them all.
    super({ ...options, hideENHANCEDSTATUSCODES: true });
    this.#dialect = dialect;
  }

  /** The connection a session belongs to, while it is open. */
  connectionOf(session: SMTPServerSession): SMTPConnection | undefined {
    return this.#connections.get(session.id);
  }

  override connect(socket: net.Socket | tls.TLSSocket, socketOptions?: any): void {
    socket.setNoDelay(true);
    const connection = new SMTPConnection(this, socket, socketOptions);
    this.connections.add(connection);
    this.#connections.set(connection.id, connection);
    // The raw socket closes last (after STARTTLS it is under the TLS socket).
    socket.once('close', () => setImmediate(() => this.#connections.delete(connection.id)));
    const self = this as unknown as { _onError(err: Error): void; _onClientConnect(data: unknown): void };
    connection.on('error', (err: Error) => self._onError(err));
    connection.on('connect', (data: unknown) => self._onClientConnect(data));

    const send = connection.send.bind(connection);
    connection.send = (code, data, context) => {
      const lines = data === undefined || data === null ? [] : Array.isArray(data) ? data : String(data).split(/\r?\n/);
      const reply = this.#dialect({ code, lines, context }, connection) ?? withEnhancedCode({ code, lines }, context);
      send(reply.code, reply.lines.length > 1 ? reply.lines : (reply.lines[0] ?? ''), false);
    };

    // smtp-server's init() is `_setListeners(() => setTimeout(connectionReady, 100))`: keep all but the timer.
    connection._setListeners(() => connection.connectionReady());
  }
}

/** smtp-server's own text, with the generic enhanced code of its class in front if it has none. */
function withEnhancedCode(reply: Reply, context: string | false | undefined): Reply {
  if (context === false || (reply.code >= 300 && reply.code < 400)) return reply;
  if (hasEnhancedCode(reply)) return reply;
  const enhanced = `${Math.floor(reply.code / 100)}.0.0`;
  return { code: reply.code, lines: reply.lines.length === 0 ? [enhanced] : reply.lines.map((l) => `${enhanced} ${l.replace(/^Error: /, '')}`) };
}
