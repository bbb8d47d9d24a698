// A smarthost for tests: a real smtp-server on loopback that wants AUTH (PLAIN and LOGIN by
// default) and records every login attempt (method, username, whether the password was right,
// whether the session was encrypted), every command, and every message with its raw bytes and the
// user who sent it. TLS is STARTTLS, implicit (port-465 style) or refused ("none": STARTTLS is
// answered 502 and AUTH is allowed in clear, so a client that fell back to plaintext would be
// seen doing it). Certificates come from test/helpers/certificates.ts or makeTestCa() below.
//
// Like sink-server.ts: an 'error' listener so failed handshakes do not crash the test, no reverse
// DNS, and a short close timeout.
import type { AddressInfo } from 'node:net';
import type { Readable } from 'node:stream';
import { type PrivateCa, makePrivateCa } from '../../src/standins/standin-certificates.js';
import { SMTPServer, type SMTPServerAuthentication, type SMTPServerSession } from 'smtp-server';

export interface UpstreamReply {
  code: number;
  message: string;
}

export interface UpstreamServerOptions {
  /** username -> password; a login with anything else gets 535. */
  users?: Record<string, string>;
  /** Mechanisms offered (default PLAIN and LOGIN); [] offers no AUTH at all. */
  authMethods?: string[];
  /** Mail without AUTH is accepted (default false: 530 at MAIL FROM). */
  authOptional?: boolean;
  tls?: 'starttls' | 'implicit' | 'none';
  /** The server's certificate (required for starttls and implicit). */
  certificate?: { cert: string; key: string };
  /** Replies to RCPT TO, per address (lower case). */
  rcpt?: Record<string, UpstreamReply>;
}

export interface LoginAttempt {
  method: string;
  username: string;
  ok: boolean;
  secure: boolean;
}

export interface UpstreamMessage {
  from: string;
  to: string[];
  raw: Buffer;
  text: string;
  secure: boolean;
  /** The user the session logged in as. */
  user: string | undefined;
}

export class UpstreamServer {
  readonly logins: LoginAttempt[] = [];
  readonly messages: UpstreamMessage[] = [];
  /** "connect", "auth PLAIN relay@x ok", "mail <a@b>", "rcpt <c@d>"... */
  readonly events: string[] = [];
  connections = 0;
  /** Most connections open at the same time. */
  maxConcurrent = 0;
  readonly #server: SMTPServer;
  #open = 0;

  private constructor(server: SMTPServer) {
    this.#server = server;
  }

  static async start(options: UpstreamServerOptions = {}): Promise<UpstreamServer> {
    const tls = options.tls ?? 'starttls';
    if (tls !== 'none' && !options.certificate) throw new Error('upstream server: TLS needs a certificate');
    let upstream: UpstreamServer | undefined;
    const authMethods = options.authMethods ?? ['PLAIN', 'LOGIN'];
    const disabled = [...(tls === 'none' ? ['STARTTLS'] : []), ...(authMethods.length === 0 ? ['AUTH'] : [])];
    const server = new SMTPServer({
      ...(options.certificate ? { key: options.certificate.key, cert: options.certificate.cert } : {}),
      secure: tls === 'implicit',
      disabledCommands: disabled,
      ...(tls === 'none' ? { hideSTARTTLS: true, allowInsecureAuth: true } : {}),
      ...(authMethods.length > 0 ? { authMethods } : {}),
      authOptional: options.authOptional ?? false,
      disableReverseLookup: true,
      closeTimeout: 100,
      logger: false,
      onConnect: (_session, callback) => {
        upstream!.connections++;
        upstream!.events.push('connect');
        callback();
      },
      onAuth: (auth: SMTPServerAuthentication, session: SMTPServerSession, callback) => {
        const ok = auth.username !== undefined && options.users?.[auth.username] === auth.password;
        upstream!.logins.push({ method: auth.method, username: auth.username ?? '', ok, secure: session.secure });
        upstream!.events.push(`auth ${auth.method} ${auth.username} ${ok ? 'ok' : 'refused'}`);
        if (ok) return callback(null, { user: auth.username });
        callback(Object.assign(new Error('5.7.8 Authentication credentials invalid'), { responseCode: 535 }));
      },
      onMailFrom: (address, _session, callback) => {
        upstream!.events.push(`mail <${address.address}>`);
        callback();
      },
      onRcptTo: (address, _session, callback) => {
        const reply = options.rcpt?.[address.address.toLowerCase()];
        upstream!.events.push(`rcpt <${address.address}> ${reply?.code ?? 250}`);
        if (reply) return callback(Object.assign(new Error(reply.message), { responseCode: reply.code }));
        callback();
      },
      onData: (stream: Readable, session: SMTPServerSession, callback) => {
        const chunks: Buffer[] = [];
        stream.on('data', (chunk: Buffer) => chunks.push(chunk));
        stream.on('end', () => {
          const raw = Buffer.concat(chunks);
          const from = session.envelope.mailFrom;
          upstream!.messages.push({
            from: from ? from.address : '',
            to: session.envelope.rcptTo.map((r) => r.address),
            raw,
            text: raw.toString('utf8'),
            secure: session.secure,
            user: session.user as string | undefined,
          });
          callback();
        });
      },
    });
    upstream = new UpstreamServer(server);
    server.on('error', (err) => upstream!.events.push(`error ${err.message}`));
    server.server.on('connection', (socket) => {
      upstream!.#open++;
      upstream!.maxConcurrent = Math.max(upstream!.maxConcurrent, upstream!.#open);
      socket.once('close', () => upstream!.#open--);
    });
    await new Promise<void>((resolve, reject) => {
      server.server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    return upstream;
  }

  get port(): number {
    return (this.#server.server.address() as AddressInfo).port;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

export type TestCa = PrivateCa;

/** A private CA, the kind an organisation runs for its internal mail relay. */
export function makeTestCa(commonName = 'Postern Test CA'): Promise<TestCa> {
  return makePrivateCa(commonName);
}
