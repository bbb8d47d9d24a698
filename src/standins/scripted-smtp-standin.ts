// What the two SMTP stand-ins (office365-smtp.ts, gmail-smtp.ts) share besides their dialects: a
// StandInSmtpServer on loopback, the records tests read (messages, logins, connections), replies a
// test scripts in advance (scripted-replies.ts) for MAIL FROM and RCPT TO, and the message read
// whole before it is judged. A subclass gives the server its name, SIZE, AUTH methods and TLS
// settings, and decides AUTH (onAuth), the message (onMessage, where it takes the 'data' script)
// and the words of every reply (dialect).
import { buffer } from 'node:stream/consumers';
import type { SMTPServerAuthentication, SMTPServerAuthenticationResponse, SMTPServerOptions, SMTPServerSession } from 'smtp-server';
import type { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import { ScriptedReplies, type ScriptedReply, type ScriptPoint } from './scripted-replies.js';
import type { StandInLogin, StandInMessage } from './smtp-records.js';
import { StandInSmtpServer, type OutgoingReply, type Reply } from './standin-smtp-server.js';

/** smtp-server's options a stand-in chooses (name, size, authMethods, TLS); the handlers are the base's. */
export type StandInServerOptions = Omit<SMTPServerOptions, 'onConnect' | 'onAuth' | 'onMailFrom' | 'onRcptTo' | 'onData' | 'onClose'>;

export type AuthCallback = (err: Error | null | undefined, response?: SMTPServerAuthenticationResponse) => void;
export type DataCallback = (err?: Error | null, message?: string) => void;

export abstract class ScriptedSmtpStandIn {
  readonly messages: StandInMessage[] = [];
  readonly logins: StandInLogin[] = [];
  /** Connections accepted so far. */
  connections = 0;
  readonly #server: StandInSmtpServer;
  readonly #scripts = new ScriptedReplies();

  constructor(options: StandInServerOptions) {
    this.#server = new StandInSmtpServer(
      {
        ...options,
        authOptional: false,
        disableReverseLookup: true,
        closeTimeout: 100,
        logger: false,
        onConnect: (_session, callback) => {
          this.connections++;
          callback();
        },
        onAuth: (auth, session, callback) => this.onAuth(auth, session, callback),
        onMailFrom: (_address, session, callback) => callback(this.takeScript('mail', session.user as string | undefined) ?? null),
        onRcptTo: (_address, session, callback) => callback(this.takeScript('rcpt', session.user as string | undefined) ?? null),
        onData: (stream, session, callback) => {
          buffer(stream).then(
            (raw) => this.onMessage(raw, stream.sizeExceeded, session, callback),
            (err: Error) => callback(err),
          );
        },
        onClose: (session) => this.onClose(session),
      },
      (reply, connection) => this.dialect(reply, connection),
    );
    this.#server.on('error', () => undefined);
  }

  start(): Promise<void> {
    return this.#server.listenLoopback();
  }

  get host(): string {
    return '127.0.0.1';
  }

  get port(): number {
    return this.#server.port;
  }

  close(): Promise<void> {
    return this.#server.stop();
  }

  /** The next `times` matching commands get this reply (see scripted-replies.ts). */
  script(reply: ScriptedReply): void {
    this.#scripts.add(reply);
  }

  /** Scripted replies not used yet. */
  get pendingScripts(): number {
    return this.#scripts.pending;
  }

  /** The reply scripted for this command, if any (uses it up). */
  protected takeScript(at: ScriptPoint, mailbox: string | undefined): (Error & { responseCode: number }) | undefined {
    return this.#scripts.take(at, mailbox);
  }

  /** The connection a session belongs to, while it is open. */
  protected connectionOf(session: SMTPServerSession): SMTPConnection | undefined {
    return this.#server.connectionOf(session);
  }

  protected abstract onAuth(auth: SMTPServerAuthentication, session: SMTPServerSession, callback: AuthCallback): void;

  /** The message, read whole; sizeExceeded: it was bigger than the SIZE the server advertises. */
  protected abstract onMessage(raw: Buffer, sizeExceeded: boolean, session: SMTPServerSession, callback: DataCallback): void;

  /** The provider's version of a reply smtp-server is about to send (see standin-smtp-server.ts). */
  protected abstract dialect(reply: OutgoingReply, connection: SMTPConnection): Reply | undefined;

  /** The connection closed. */
  protected onClose(_session: SMTPServerSession): void {}
}

/**
 * A provider's per-connection id (Gmail's "t66sm6271302pjb.45", Exchange's "08DD…"), made on first
 * use and the same for the rest of the connection; without a connection, a new one each time.
 */
export class ConnectionIds {
  readonly #ids = new WeakMap<SMTPConnection, string>();
  readonly #make: () => string;

  constructor(make: () => string) {
    this.#make = make;
  }

  of(connection: SMTPConnection | undefined): string {
    let id = connection ? this.#ids.get(connection) : undefined;
    if (id === undefined) {
      id = this.#make();
      if (connection) this.#ids.set(connection, id);
    }
    return id;
  }
}
