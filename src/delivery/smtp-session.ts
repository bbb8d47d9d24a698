// One outbound SMTP connection, opened and driven with promises. Opening walks the resolved hosts:
// mx-connect gets a TCP connection (falling back across hosts and addresses when a connect fails),
// then nodemailer's SMTPConnection takes the connected socket (`connection` option) for greeting,
// EHLO, STARTTLS and transactions (PIPELINING when offered). A host that connects but then fails
// the SMTP setup (421 greeting, greeting timeout, required TLS missing) is skipped and the next one
// is tried, via mx-connect's ignore list, so "first MX unhealthy" still delivers on the second.
//
// Nothing here throws for a delivery problem: opening returns a failure outcome, and a transaction
// returns one outcome per recipient, because per-recipient RCPT replies matter (one 550 and one 250
// in the same transaction are two different results).
//
// A ReplyWatch reads the server's replies alongside nodemailer, for two things nodemailer does not
// do (both found by test/delivery-faults.test.ts): a deadline per reply (command_timeout), and the
// 421 a server sends just before it closes the connection.
//
// Upstreams (smarthosts) add three things to the setup, all off for MX hosts and routes: implicit
// TLS (`tls: 'implicit'`, port 465 style), certificate verification (`verify`), and AUTH PLAIN or
// LOGIN after TLS (`auth`). AUTH is only ever sent on an encrypted connection: with tls 'required'
// a server that does not offer STARTTLS ends the setup before AUTH (TLS_UNAVAILABLE), and a
// plaintext session with credentials is refused here as well, whatever the caller asked.
import net from 'node:net';
import { type Readable, Transform } from 'node:stream';
import mxConnect, { type MxConnection, type MxConnectError } from 'mx-connect';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import XOAuth2 from 'nodemailer/lib/xoauth2';
import { type DeliveryError, deliveryError, parseReply } from './delivery-error.js';
import type { DeliveryOutcome, TlsMode } from './delivery-target.js';
import type { MailHost } from './mx-resolver.js';

/** The TLS modes of delivery targets, plus implicit TLS (the socket speaks TLS from the start). */
export type SessionTls = TlsMode | 'implicit';

/**
 * How the session logs in: a password (AUTH PLAIN or LOGIN), or an OAuth2 access token (AUTH
 * XOAUTH2, Microsoft 365 and Google) for the mailbox `user`.
 */
export type SessionAuth = PasswordAuth | TokenAuth;

export interface PasswordAuth {
  user: string;
  /** Called when AUTH is sent, so the password is not copied into options objects. */
  pass(): string;
}

export interface TokenAuth {
  /** The mailbox the session sends as (XOAUTH2's user=). */
  user: string;
  /**
   * The access token; `renew` when the server refused the last one. A failure to get one throws a
   * TokenFailure, which ends the setup with its outcome.
   */
  token(renew: boolean): Promise<string>;
}

/** Thrown by TokenAuth.token(): what to report instead of a login attempt. */
export class TokenFailure extends Error {
  readonly outcome: DeliveryOutcome;
  readonly problem: SetupProblem | undefined;

  constructor(outcome: DeliveryOutcome, problem?: SetupProblem) {
    super(outcome.response);
    this.outcome = outcome;
    this.problem = problem;
  }
}

/** What went wrong in the setup, when it was more than "this host did not work". */
export type SetupProblem =
  /** The server refused the credentials (535 and the like): a configuration problem. */
  | 'auth_refused'
  /** The OAuth2 token endpoint refused Postern's client credentials: a configuration problem. */
  | 'token_refused'
  /** The server offers no AUTH mechanism Postern can use. */
  | 'auth_unavailable'
  /** The server's certificate is not trusted (verification on). */
  | 'certificate'
  /** TLS is required and the server does not offer STARTTLS. */
  | 'tls_unavailable';

export interface SmtpSessionOptions {
  /** For messages: the recipient domain, the route ("relay.internal:25") or "upstream NAME". */
  destination: string;
  hosts: MailHost[];
  port: number;
  tls: SessionTls;
  /**
   * Verify the server's certificate against `ca` (PEM; default: Node's public CAs) and the host
   * name. Absent: not verified (MX and routes; see #handshake).
   */
  verify?: { ca?: string };
  /** Log in after EHLO (and TLS) with AUTH PLAIN, or LOGIN when PLAIN is not offered. */
  auth?: SessionAuth;
  /** Sent with EHLO (config.hostname). */
  heloName: string;
  /** Per address for TCP connect, and for the greeting + EHLO + STARTTLS setup. */
  connectTimeout: number;
  /**
   * Longest wait for each reply: silence (nodemailer's idle timer), or a reply that comes in too
   * slowly to complete in time (ReplyWatch). Sending the message data counts as progress.
   */
  commandTimeout: number;
  signal?: AbortSignal;
  /** Hosts that connect but fail SMTP setup before we give up (default 5). */
  maxSetupAttempts?: number;
}

export interface TransactionEnvelope {
  /** '' for the null sender. */
  from: string;
  to: string[];
  size: number;
}

export interface TransactionResult {
  /** Keyed by the address exactly as given in `to`. */
  replies: Map<string, DeliveryOutcome>;
  /** false when the connection is gone or in an unknown state. */
  reusable: boolean;
  /**
   * The connection closed or was reset before the server took any part in this transaction (no
   * reply, or only a 421): the server has nothing of the message, so it can go out on another
   * connection at once. What a kept connection looks like when the server closed it meanwhile.
   */
  untouched: boolean;
}

export type OpenResult =
  | { session: SmtpSession; failure?: undefined; problem?: undefined }
  | { session?: undefined; failure: DeliveryOutcome; problem?: SetupProblem };

/** The fields of nodemailer's errors we read. */
interface SmtpClientError extends Error {
  code?: string;
  command?: string;
  response?: string;
  responseCode?: number;
  recipient?: string;
  timeoutType?: string;
  rejectedErrors?: SmtpClientError[];
}

/**
 * nodemailer keeps the per-RCPT replies on the envelope; its error paths do not always carry them.
 * `_onData` gets every chunk the server sends, after TLS; ReplyWatch wraps it. Both are internals
 * of nodemailer 10.6 (pinned in package.json); if `_onData` goes away the watch switches itself
 * off rather than cut healthy sessions, and test/delivery-faults.test.ts fails.
 */
interface ConnectionInternals {
  _envelope?: { rejectedErrors?: SmtpClientError[] } | false;
  _onData?: (chunk: Buffer) => void;
  /** The EHLO reply's lines after the first, without codes: where the AUTH mechanisms are. */
  _ehloLines?: string[];
}

export class SmtpSession {
  readonly remoteMta: string;
  readonly remoteIp: string;
  /** "mx1.example.com[192.0.2.1]:25", for messages and logs. */
  readonly server: string;
  /** Transactions run on this connection, for the pool's reuse limit. */
  transactions = 0;
  /**
   * The last transaction did not end with the reply to the message data (a refused sender or
   * recipients, say), so the server may still hold its envelope: RSET before the next one. After
   * the final reply the server has cleared its state (RFC 5321 4.1.1.4), so no RSET is sent then:
   * one round trip less per message on a kept connection.
   */
  #needsReset = false;
  readonly #connection: SMTPConnection;
  readonly #watch: ReplyWatch;
  readonly #destination: string;
  readonly #closeTimeout: number;
  #closed = false;
  readonly #closeListeners: (() => void)[] = [];

  /** Use SmtpSession.open(). */
  private constructor(connection: SMTPConnection, watch: ReplyWatch, mx: MxConnection, options: SmtpSessionOptions) {
    this.#connection = connection;
    this.#watch = watch;
    this.#destination = options.destination;
    this.#closeTimeout = Math.min(options.commandTimeout, 2000);
    this.remoteMta = mx.hostname;
    this.remoteIp = mx.host;
    this.server = serverLabel(mx.hostname, mx.host, mx.port);
    connection.on('end', () => this.#markClosed());
  }

  get secure(): boolean {
    return this.#connection.secure;
  }

  get closed(): boolean {
    return this.#closed || this.#connection.destroyed;
  }

  /** RSET is due before the next transaction (see #needsReset). */
  get needsReset(): boolean {
    return this.#needsReset;
  }

  /**
   * Called once when the connection goes away (the server closed an idle session, QUIT, error).
   * Returns a function that removes the listener.
   */
  onClose(listener: () => void): () => void {
    if (this.closed) {
      listener();
      return () => {};
    }
    this.#closeListeners.push(listener);
    return () => {
      const i = this.#closeListeners.indexOf(listener);
      if (i >= 0) this.#closeListeners.splice(i, 1);
    };
  }

  /**
   * Connects to the first host that completes greeting, EHLO and (as the TLS mode asks) STARTTLS.
   * A failure is always "deferred": a bad server today may be fine tomorrow.
   */
  static async open(options: SmtpSessionOptions): Promise<OpenResult> {
    const maxAttempts = options.maxSetupAttempts ?? 5;
    const tried: string[] = [];
    let lastFailure: DeliveryOutcome | undefined;
    let lastProblem: SetupProblem | undefined;
    for (let attempt = 0; attempt < maxAttempts; attempt++) {
      if (options.signal?.aborted) return { failure: deliveryError('INTERRUPTED').toOutcome() };
      let mx: MxConnection;
      try {
        mx = await connectTcp(options, options.hosts, tried);
      } catch (err) {
        // Nothing left to try (or nothing reachable): the SMTP-level reason, when there was one,
        // says more than "connection refused" from the last host.
        if (lastFailure) return { failure: lastFailure, ...(lastProblem ? { problem: lastProblem } : {}) };
        // "Network error when connecting to MX server mx1[192.0.2.1] for example.com: Connection refused"
        const reason = (err as MxConnectError).message.replace(/^Network error when connecting to MX server (\S+) for [^:]+: /, '$1: ');
        return { failure: deliveryError('CONNECT_FAILED', { destination: options.destination, reason }).toOutcome() };
      }
      tried.push(mx.host);
      let result = await SmtpSession.#handshake(mx, options, options.tls);
      if ('failure' in result && options.tls === 'opportunistic' && result.tlsHandshakeFailed) {
        // Opportunistic TLS: a broken TLS stack on the server must not stop delivery. Reconnect
        // to the same address and stay in plaintext, as Postfix does at security level "may".
        const host = options.hosts.find((h) => h.exchange === mx.hostname) ?? { exchange: mx.hostname, priority: 0 };
        try {
          const again = await connectTcp(options, [{ ...host, A: net.isIPv4(mx.host) ? [mx.host] : [], AAAA: net.isIPv6(mx.host) ? [mx.host] : [] }], []);
          result = await SmtpSession.#handshake(again, options, 'none');
        } catch {
          // keep the TLS failure as the reason
        }
      }
      if ('session' in result) return { session: result.session };
      lastFailure = { ...result.failure, status: 'deferred' };
      lastProblem = result.problem;
      // Refused credentials are refused on every address of the host: trying them on the next
      // one only adds failed logins, which providers count towards locking the account.
      if (result.problem === 'auth_refused' || result.problem === 'auth_unavailable' || result.problem === 'token_refused') break;
    }
    return {
      failure: lastFailure ?? deliveryError('CONNECT_FAILED', { destination: options.destination, reason: 'no host' }).toOutcome(),
      ...(lastProblem ? { problem: lastProblem } : {}),
    };
  }

  /** Greeting, EHLO, STARTTLS (or implicit TLS) and AUTH over a connected socket. */
  static #handshake(mx: MxConnection, options: SmtpSessionOptions, tls: SessionTls): Promise<HandshakeResult> {
    const servername = net.isIP(mx.hostname) ? undefined : mx.hostname;
    const verify = options.verify;
    const connection = new SMTPConnection({
      connection: mx.socket,
      host: mx.host,
      port: mx.port,
      servername,
      name: options.heloName,
      secure: tls === 'implicit',
      ignoreTLS: tls === 'none',
      requireTLS: tls === 'required',
      opportunisticTLS: tls === 'opportunistic',
      // MX certificates are often self-signed or for another name; without DANE or MTA-STS there is
      // nothing to verify them against, so TLS here protects against passive listening only (the
      // same as Postfix's "may" and "encrypt" levels). An upstream is one known server that gets a
      // password: its certificate is verified (Postfix's "secure" level), against ca_file if set.
      tls: verify
        ? { rejectUnauthorized: true, minVersion: 'TLSv1.2', ...(verify.ca ? { ca: verify.ca } : {}), ...(servername ? { servername } : {}) }
        : { rejectUnauthorized: false, ...(servername ? { servername } : {}) },
      connectionTimeout: options.connectTimeout,
      greetingTimeout: options.connectTimeout,
      socketTimeout: options.commandTimeout,
      socketCloseTimeout: Math.min(options.commandTimeout, 2000),
      logger: false,
    });
    const server = serverLabel(mx.hostname, mx.host, mx.port);
    // nodemailer emits 'error' besides calling back; an unhandled one would crash the process.
    connection.on('error', () => {});
    const watch = new ReplyWatch(connection, options.commandTimeout);
    return new Promise((resolve) => {
      let settled = false;
      const onAbort = () => connection.close();
      const where = { remoteMta: mx.hostname, remoteIp: mx.host };
      /** Ends the setup: a session, or the error (or a failure already decided) as the outcome. */
      const finish = (err?: SmtpClientError, decided?: { failure: DeliveryOutcome; problem: SetupProblem | undefined }) => {
        if (settled) return;
        settled = true;
        watch.end();
        options.signal?.removeEventListener('abort', onAbort);
        connection.removeListener('error', onError);
        connection.removeListener('end', onEnd);
        if (!err && !decided && !connection.destroyed) {
          // A session the caller opened is the caller's to close, including on abort.
          resolve({ session: new SmtpSession(connection, watch, mx, options) });
          return;
        }
        connection.close();
        if (options.signal?.aborted) {
          resolve({ failure: deliveryError('INTERRUPTED').toOutcome(), tlsHandshakeFailed: false });
          return;
        }
        if (decided) {
          resolve({ failure: { ...decided.failure, status: 'deferred' }, tlsHandshakeFailed: false, ...(decided.problem ? { problem: decided.problem } : {}) });
          return;
        }
        const error: SmtpClientError = watch.explain(
          err ?? Object.assign(new Error('connection closed during setup'), { code: 'ECONNECTION' }),
        );
        if (error.code === 'EAUTH' && error.response) {
          // The server answered the AUTH: its reply is the outcome (held as deferred by the caller).
          const reply = parseReply(error.response);
          if (reply) {
            const failure: DeliveryOutcome = { status: 'deferred', code: reply.code, enhanced: reply.enhanced, response: reply.response, ...where };
            // 454 and other 4xx replies to AUTH are the server's temporary trouble, not our credentials.
            resolve({ failure, tlsHandshakeFailed: false, ...(reply.code >= 500 ? { problem: 'auth_refused' as const } : {}) });
            return;
          }
        }
        // A failed TLS handshake shows up as a socket error while nodemailer is still upgrading.
        const tlsHandshakeFailed =
          connection.upgrading === true || (error.code === 'ETLS' && !(error.command === 'STARTTLS' && error.responseCode));
        if (tlsHandshakeFailed) error.code = 'ETLS';
        const reason = describe(error);
        if (tlsHandshakeFailed && verify && /certificate/i.test(reason)) {
          const failure = deliveryError('CERTIFICATE_UNTRUSTED', { server, destination: options.destination, reason }).toOutcome(where);
          resolve({ failure, tlsHandshakeFailed, problem: 'certificate' });
          return;
        }
        const failure = classifyError(error, server, options.destination, mx.hostname, mx.host, 0);
        const noStarttls = error.code === 'ETLS' && error.command === 'STARTTLS' && Boolean(error.responseCode);
        resolve({ failure: { ...failure, status: 'deferred' }, tlsHandshakeFailed, ...(noStarttls ? { problem: 'tls_unavailable' as const } : {}) });
      };
      const onError = (err: SmtpClientError) => finish(err);
      const onEnd = () => finish(Object.assign(new Error('connection closed during setup'), { code: 'ECONNECTION' }));
      options.signal?.addEventListener('abort', onAbort, { once: true });
      connection.once('error', onError);
      connection.once('end', onEnd);
      connection.connect((err) => {
        if (err || !options.auth) return finish(err as SmtpClientError | undefined);
        SmtpSession.#login(connection, watch, options, server, where, finish);
      });
      // The greeting is nodemailer's to time (connect_timeout); each reply after it gets
      // command_timeout.
      watch.begin({ afterFirstReply: true });
    });
  }

  /**
   * AUTH on a session that is set up: PLAIN when the server offers it, else LOGIN (both send the
   * password as it is, which is why they only ever run over TLS). The server's refusal comes back
   * through `finish` as EAUTH with its reply.
   */
  static #login(
    connection: SMTPConnection,
    watch: ReplyWatch,
    options: SmtpSessionOptions,
    server: string,
    where: { remoteMta: string; remoteIp: string },
    finish: (err?: SmtpClientError, decided?: { failure: DeliveryOutcome; problem: SetupProblem | undefined }) => void,
  ): void {
    const auth = options.auth!;
    if (!connection.secure) {
      // Not reachable through the configuration (tls = "none" with a username is refused there);
      // kept so that no future caller can send a password in clear by mistake.
      finish(undefined, {
        failure: deliveryError('TLS_UNAVAILABLE', { destination: options.destination, server }).toOutcome(where),
        problem: 'auth_unavailable',
      });
      return;
    }
    const offered = offeredMechanisms(connection);
    // The mechanism first (PLAIN before LOGIN), then one answer for "not offered". Without the
    // EHLO lines (nodemailer does not always keep them) its own reading says whether AUTH was offered.
    const wanted = 'token' in auth ? ['XOAUTH2'] : ['PLAIN', 'LOGIN'];
    const method = offered ? wanted.find((m) => offered.includes(m)) : undefined;
    if (offered ? !method : !connection.allowsAuth) {
      const failure = deliveryError('AUTH_UNAVAILABLE', {
        destination: options.destination,
        server,
        wanted: `AUTH ${wanted.join(' or ')}`,
        offered: offered?.length ? `AUTH ${[...new Set(offered)].join(' ')}` : 'no AUTH',
      }).toOutcome(where);
      finish(undefined, { failure, problem: 'auth_unavailable' });
      return;
    }
    if ('token' in auth) {
      SmtpSession.#loginWithToken(connection, watch, auth, finish);
      return;
    }
    watch.begin();
    connection.login({ user: auth.user, pass: auth.pass(), ...(method ? { method } : {}) }, (err) => finish(err as SmtpClientError | undefined));
  }

  /**
   * AUTH XOAUTH2 as `auth.user`, with nodemailer's XOAuth2 building the SASL string from the token
   * `auth.token()` gives. A refused token is renewed and tried once more on the same connection
   * (a token revoked or cut short before its announced expiry looks exactly like this); a second
   * refusal is the server's answer. A token that cannot be had ends the setup with its own outcome.
   */
  static #loginWithToken(
    connection: SMTPConnection,
    watch: ReplyWatch,
    auth: TokenAuth,
    finish: (err?: SmtpClientError, decided?: { failure: DeliveryOutcome; problem: SetupProblem | undefined }) => void,
  ): void {
    let tokenFailure: TokenFailure | undefined;
    /** A fresh token was tried already (nodemailer renews by itself after a 334 challenge). */
    let renewed = false;
    const attempt = (renew: boolean) => {
      const oauth2 = new XOAuth2({
        user: auth.user,
        provisionCallback: (_user, renewAsked, callback) => {
          if (renew || renewAsked) renewed = true;
          auth.token(renew || renewAsked).then(
            (token) => callback(null, token),
            (err: Error) => {
              if (err instanceof TokenFailure) tokenFailure = err;
              callback(err);
            },
          );
        },
      });
      watch.begin();
      connection.login({ user: auth.user, oauth2, method: 'XOAUTH2' }, (err) => {
        const error = err as SmtpClientError | null;
        // A refusal from the token endpoint is a setup problem; the endpoint being down is not.
        if (tokenFailure) return finish(undefined, { failure: tokenFailure.outcome, problem: tokenFailure.problem });
        // Renewed only when the server says the token is no good (Exchange: 535 5.7.3). A refusal
        // that names another cause (SMTP AUTH off, 5.7.139) would only cost a second failed login.
        if (error && !renewed && error.code === 'EAUTH' && isTokenRefusal(error.response) && !connection.destroyed) {
          attempt(true);
          return;
        }
        finish(error ?? undefined);
      });
    };
    attempt(false);
  }

  /**
   * One mail transaction. Recipients the server refused keep their own RCPT reply; the others
   * get the reply to the message (the final "250 ok", or the DATA rejection), or the connection
   * problem that ended the transaction.
   */
  send(envelope: TransactionEnvelope, body: Readable): Promise<TransactionResult> {
    this.transactions++;
    this.#needsReset = true;
    const repliesBefore = this.#watch.replies;
    return new Promise((resolve) => {
      let settled = false;
      let counted: Transform | undefined;
      const finish = (err: SmtpClientError | null, info?: SMTPConnection.SentMessageInfo) => {
        if (settled) return;
        settled = true;
        this.#watch.end();
        // The transaction is over, so is the body. nodemailer does not close the stream on every
        // path: a message over the server's SIZE is refused before MAIL FROM with the stream
        // untouched, and its spool file stayed open for good (one descriptor per such message,
        // test/delivery-faults.test.ts). After a success the stream has ended and this is a no-op.
        counted?.destroy();
        this.#connection.removeListener('end', onEnd);
        if (!err) this.#needsReset = false;
        resolve(err ? this.#failedTransaction(envelope, err, repliesBefore) : this.#completedTransaction(envelope, info!));
      };
      // nodemailer closes the connection (emitting 'end') just before it calls back with the
      // reason (a 421, a timeout); the callback gets a turn first so the reason is not lost.
      const onEnd = () =>
        setImmediate(() => {
          const err: SmtpClientError = new Error('connection closed');
          err.code = 'ECONNECTION';
          finish(err);
        });
      if (this.closed) {
        body.destroy();
        return onEnd();
      }
      this.#connection.once('end', onEnd);
      this.#watch.begin();
      // The message data going out counts as progress for the reply deadline: a big message on a
      // slow link may take longer than command_timeout to send. Body problems (missing spool file)
      // reach nodemailer through `counted` and surface through the send callback as ESTREAM;
      // nodemailer destroying `counted` (connection lost) closes the body, and its file, too.
      counted = new Transform({
        transform: (chunk, _encoding, callback) => {
          this.#watch.progress();
          callback(null, chunk);
        },
      });
      // pipe with the two links pipeline() would make, not pipeline() itself: that one builds an
      // AbortController per call and aborts it at the end, a DOMException with a stack trace per
      // message, 3% of a delivery's CPU. The error listener stays after the transaction: a body
      // that fails then must not become an uncaught error.
      body.on('error', (err: Error) => counted?.destroy(err));
      counted.once('close', () => body.destroy());
      body.pipe(counted);
      this.#connection.send(
        { from: envelope.from, to: envelope.to, size: envelope.size, use8BitMime: true },
        counted,
        (err, info) => finish(err as SmtpClientError | null, info),
      );
    });
  }

  /** RSET before the next transaction (when needsReset). false: do not use the connection any more. */
  reset(): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    return new Promise((resolve) => {
      let settled = false;
      const done = (ok: boolean) => {
        if (settled) return;
        settled = true;
        this.#watch.end();
        this.#connection.removeListener('end', onEnd);
        resolve(ok);
      };
      const onEnd = () => done(false);
      this.#connection.once('end', onEnd);
      this.#watch.begin();
      this.#connection.reset((err) => {
        if (!err) this.#needsReset = false;
        done(!err);
      });
    });
  }

  /** Polite close: QUIT, then drop the socket if the server does not close it soon. */
  quit(): void {
    if (this.closed) return;
    this.#connection.quit();
    const timer = setTimeout(() => this.destroy(), this.#closeTimeout);
    timer.unref();
  }

  /** Immediate close (shutdown, abort). A transaction in progress ends as "connection lost". */
  destroy(): void {
    this.#connection.close();
    this.#markClosed();
  }

  #markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch.end();
    for (const listener of this.#closeListeners.splice(0)) listener();
  }

  #completedTransaction(envelope: TransactionEnvelope, info: SMTPConnection.SentMessageInfo): TransactionResult {
    const replies = new Map<string, DeliveryOutcome>();
    const ok = parseReply(info.response) ?? { code: 250, enhanced: '2.0.0', response: info.response || '250' };
    for (const rejected of info.rejectedErrors ?? []) this.#setRejected(replies, rejected as SmtpClientError, false);
    for (const address of envelope.to) {
      if (!replies.has(address)) replies.set(address, this.#remote(ok.code, ok.enhanced, ok.response));
    }
    return { replies, reusable: !this.closed, untouched: false };
  }

  #failedTransaction(envelope: TransactionEnvelope, failure: SmtpClientError, repliesBefore: number): TransactionResult {
    const lost = failure.code === 'ECONNECTION' || failure.code === 'ESOCKET';
    // Counted by the ReplyWatch; without it (nodemailer changed inside) nothing is assumed.
    const untouched = lost && this.#watch.enabled && this.#watch.replies === repliesBefore && !this.#watch.stalled;
    const err = this.#watch.explain(failure);
    const replies = new Map<string, DeliveryOutcome>();
    const rejectedErrors =
      err.rejectedErrors ?? ((this.#connection as unknown as ConnectionInternals)._envelope || undefined)?.rejectedErrors ?? [];
    // A definite RCPT refusal stands even when the transaction failed afterwards.
    // "503 Need mail command" to a pipelined RCPT only echoes a refused MAIL FROM, whose reply is
    // the one that says why (Exchange's "430 4.2.0 mailbox logon failure", say).
    const mailRefused = err.code === 'EENVELOPE' && /^MAIL/i.test(err.command ?? '');
    for (const rejected of rejectedErrors) this.#setRejected(replies, rejected, mailRefused);
    const outcome = classifyError(err, this.server, this.#destination, this.remoteMta, this.remoteIp, envelope.size);
    for (const address of envelope.to) if (!replies.has(address)) replies.set(address, outcome);
    // Replies to MAIL, RCPT and DATA leave the session usable (RSET before the next message);
    // anything else (timeout, lost connection, body error mid-DATA) does not.
    const reusable = (err.code === 'EENVELOPE' || err.code === 'EMESSAGE') && !this.closed;
    if (!reusable) this.destroy();
    return { replies, reusable, untouched };
  }

  #setRejected(replies: Map<string, DeliveryOutcome>, rejected: SmtpClientError, skipBadSequence: boolean): void {
    if (!rejected.recipient || !rejected.response) return;
    const reply = parseReply(rejected.response);
    if (reply && !(skipBadSequence && reply.code === 503)) replies.set(rejected.recipient, this.#remote(reply.code, reply.enhanced, reply.response));
  }

  #remote(code: number, enhanced: string, response: string): DeliveryOutcome {
    return { status: statusForCode(code), code, enhanced, response, remoteMta: this.remoteMta, remoteIp: this.remoteIp };
  }
}

/**
 * 2xx delivered, 4xx deferred, 5xx failed. 503 (bad sequence of commands) is deferred: it says
 * the session was confused, not that the message was refused (nodemailer treats it the same way).
 */
export function statusForCode(code: number): DeliveryOutcome['status'] {
  if (code >= 200 && code < 400) return 'delivered';
  if (code >= 500 && code !== 503) return 'failed';
  return 'deferred';
}

function connectTcp(options: SmtpSessionOptions, hosts: MailHost[], ignore: string[]): Promise<MxConnection> {
  return mxConnect({
    target: options.destination,
    mx: hosts.map((h) => ({ exchange: h.exchange, priority: h.priority, A: h.A, AAAA: h.AAAA })),
    port: options.port,
    maxConnectTime: options.connectTimeout,
    ignoreMXHosts: ignore,
    // Routes, private networks and the tests deliver to loopback and RFC 1918 addresses.
    dnsOptions: { ignoreIPv6: false, preferIPv6: false, blockLocalAddresses: false },
  }).then((mx) => {
    // Nagle plus the server's delayed ACK would stall each pipelined batch for ~40 ms. nodemailer
    // 10 sets it as well; ours stays so an upgrade cannot lose it (test/delivery-socket-options).
    mx.socket.setNoDelay(true);
    return mx;
  });
}

type HandshakeResult =
  | { session: SmtpSession }
  | {
      failure: DeliveryOutcome;
      /** The TLS handshake itself failed (not "STARTTLS not offered"): worth a plaintext retry. */
      tlsHandshakeFailed: boolean;
      problem?: SetupProblem;
    };

/** Turns a nodemailer error into an outcome: the remote reply when there is one, else ours. */
function classifyError(
  err: SmtpClientError,
  server: string,
  destination: string,
  remoteMta: string,
  remoteIp: string,
  size: number,
): DeliveryOutcome {
  const where = { remoteMta, remoteIp };
  if (err.code === 'ETLS' && err.command === 'STARTTLS' && err.responseCode) {
    return deliveryError('TLS_UNAVAILABLE', { destination, server }).toOutcome(where);
  }
  const reply = err.response ? parseReply(err.response) : null;
  if (reply) {
    return { status: statusForCode(reply.code), code: reply.code, enhanced: reply.enhanced, response: reply.response, ...where };
  }
  const reason = describe(err);
  let error: DeliveryError;
  switch (err.code) {
    case 'ETIMEDOUT':
      error = deliveryError('TIMEOUT', { server, reason });
      break;
    case 'ETLS':
      error = deliveryError('TLS_FAILED', { server, reason });
      break;
    case 'EPROTOCOL':
      error = deliveryError('PROTOCOL', { server, reason });
      break;
    case 'ESTREAM':
      error = deliveryError('BODY_UNREADABLE', { reason });
      break;
    case 'EMESSAGE': {
      // Raised before MAIL FROM when the message is bigger than the server's SIZE.
      const limit = /allowed (\d+)/.exec(err.message)?.[1];
      error = limit
        ? deliveryError('MESSAGE_TOO_BIG', { size, limit, server })
        : deliveryError('PROTOCOL', { server, reason });
      break;
    }
    case 'ECONNECTION':
    case 'ESOCKET':
      error = deliveryError('CONNECTION_LOST', { server, reason });
      break;
    default:
      error = deliveryError('INTERNAL', { reason });
  }
  return error.toOutcome(where);
}

function describe(err: SmtpClientError): string {
  const timeouts: Record<string, string> = {
    GREETING_TIMEOUT: 'no greeting',
    SOCKET_TIMEOUT: `no reply${err.command && err.command !== 'CONN' ? ` to ${err.command}` : ''}`,
    UPGRADE_TIMEOUT: 'TLS handshake took too long',
  };
  if (err.timeoutType && timeouts[err.timeoutType]) return timeouts[err.timeoutType]!;
  if (err.timeoutType === REPLY_TIMEOUT) return err.message;
  // OpenSSL's "80AC...:error:0A000410:SSL routines:ssl3_read_bytes:sslv3 alert handshake failure:..."
  const openssl = /SSL routines:[^:]*:([^:]+)/.exec(err.message);
  if (openssl) return openssl[1]!.trim();
  return err.message.replace(/^Error initiating TLS - /, '').split('\n')[0]!.trim();
}

function serverLabel(hostname: string, ip: string, port: number): string {
  return hostname && hostname !== ip ? `${hostname}[${ip}]:${port}` : `[${ip}]:${port}`;
}

const REPLY_TIMEOUT = 'REPLY_TIMEOUT';
/** Characters of a reply line the ReplyWatch keeps. */
const LINE_KEPT = 1000;

/**
 * Reads the server's replies next to nodemailer (it wraps the connection's `_onData`) for two jobs.
 *
 * A deadline per reply. nodemailer's socketTimeout (command_timeout) is an idle timer: any byte
 * resets it, so a server that sends its replies one byte a second held a delivery, its connection
 * slot and its socket for as long as it liked (an EHLO reply of 30 bytes took 30 s, and the
 * session went on like that). While an operation waits on the server, each complete reply must
 * now arrive within command_timeout of the previous one, or of the last chunk of message data
 * sent. A server that sends nothing at all is still nodemailer's idle timer's to catch; this one
 * fires only when bytes came in without completing a reply. It then closes the connection and the
 * operation fails as TIMEOUT ("reply not complete after ..."), deferred like any other timeout.
 *
 * The last complete reply. With PIPELINING, nodemailer handles one queued reply per event-loop
 * turn, so when a server answers "250, 250, 421" and closes at once, the close arrives first and the
 * 421 was lost: the recipients got "Connection closed unexpectedly" instead of the server's own
 * reason. A 421 means "closing the channel" whatever command it answers (RFC 5321 4.2), so when a
 * connection is lost without a reply and the last thing the server said was a 421, that 421 is the
 * outcome.
 */
class ReplyWatch {
  /** The last complete reply, lines joined with "\n" as nodemailer does. */
  lastReply: string | undefined;
  /** Complete replies so far, 421s left out (a server closing the channel took no part in anything). */
  replies = 0;
  /** Set when the deadline closed the connection. */
  stalled: SmtpClientError | undefined;
  readonly #connection: SMTPConnection;
  readonly #timeout: number;
  /** False when nodemailer's internals changed and replies cannot be read alongside it. */
  readonly enabled: boolean;
  #active = false;
  #afterFirstReply = false;
  #since = 0;
  /** Bytes received since the last complete reply. */
  #pending = 0;
  #line = '';
  #lines: string[] = [];
  #timer: NodeJS.Timeout | undefined;

  constructor(connection: SMTPConnection, timeout: number) {
    this.#connection = connection;
    this.#timeout = timeout;
    const internals = connection as unknown as ConnectionInternals;
    const onData = internals._onData;
    this.enabled = typeof onData === 'function';
    if (onData) {
      internals._onData = (chunk: Buffer) => {
        this.#feed(chunk);
        onData.call(connection, chunk);
      };
    }
  }

  /** An operation starts waiting on the server. */
  begin(options: { afterFirstReply?: boolean } = {}): void {
    if (!this.enabled) return;
    this.#active = true;
    this.#afterFirstReply = options.afterFirstReply ?? false;
    this.progress();
    this.#arm(this.#timeout);
  }

  /** The operation is over (done, failed or the connection closed). */
  end(): void {
    this.#active = false;
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** Something moved (a reply, message data going out): the deadline starts again. */
  progress(): void {
    this.#since = Date.now();
  }

  /** The error to report instead of a bare "connection lost", when there is a better one. */
  explain(err: SmtpClientError): SmtpClientError {
    if (this.stalled) return this.stalled;
    const lost = err.code === 'ECONNECTION' || err.code === 'ESOCKET';
    if (lost && !err.response && this.lastReply && /^421[ -]/.test(this.lastReply)) {
      return Object.assign(new Error('server closed the connection'), { code: 'ECONNECTION', response: this.lastReply });
    }
    return err;
  }

  #feed(chunk: Buffer): void {
    this.#pending += chunk.length;
    // Line by line with indexOf, not character by character: every character appended to a
    // string was an allocation, 5% of what the delivery thread allocated.
    for (let start = 0; ; ) {
      const newline = chunk.indexOf(0x0a, start);
      const end = newline === -1 ? chunk.length : newline;
      // Enough of a line to tell its code and keep a 421's text; nodemailer bounds the rest.
      const room = LINE_KEPT - this.#line.length;
      if (room > 0 && end > start) this.#line += chunk.toString('latin1', start, Math.min(end, start + room));
      if (newline === -1) return;
      start = newline + 1;
      const line = this.#line.replace(/\r$/, '');
      this.#line = '';
      this.#lines.push(line);
      if (/^\d{3}-/.test(line)) continue;
      this.lastReply = this.#lines.join('\n');
      if (!line.startsWith('421')) this.replies++;
      this.#lines = [];
      this.#pending = 0;
      this.#afterFirstReply = false;
      this.progress();
    }
  }

  #arm(ms: number): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#check(), ms);
  }

  #check(): void {
    this.#timer = undefined;
    if (!this.#active || this.#connection.destroyed) return;
    // The TLS handshake is nodemailer's to time (connect_timeout); the reply to the EHLO after it
    // gets its own command_timeout.
    if (this.#connection.upgrading) this.progress();
    const waited = Date.now() - this.#since;
    // Before the greeting and while nothing at all comes in, nodemailer's own timers
    // (connect_timeout, command_timeout) are in charge.
    const ours = !this.#afterFirstReply && this.#pending > 0;
    if (waited < this.#timeout || !ours) {
      this.#arm(waited < this.#timeout ? this.#timeout - waited : this.#timeout);
      return;
    }
    const seconds = `${Math.round(this.#timeout / 100) / 10} s`;
    this.stalled = Object.assign(
      new Error(`reply not complete after ${seconds} (${this.#pending} bytes of it received; the server sends too slowly)`),
      { code: 'ETIMEDOUT', timeoutType: REPLY_TIMEOUT },
    );
    this.end();
    this.#connection.close();
  }
}

/**
 * The SASL mechanisms in the EHLO reply ("AUTH LOGIN XOAUTH2", or the old "AUTH=LOGIN"), upper
 * case; undefined when nodemailer no longer keeps the EHLO lines (then its own allowsAuth decides).
 */
function offeredMechanisms(connection: SMTPConnection): string[] | undefined {
  const ehlo = (connection as unknown as ConnectionInternals)._ehloLines;
  if (!Array.isArray(ehlo)) return undefined;
  return ehlo.flatMap((line) => {
    const m = /^AUTH[\s=](.*)/i.exec(line);
    return m ? m[1]!.trim().toUpperCase().split(/[\s=]+/) : [];
  });
}

/**
 * A reply to AUTH XOAUTH2 that says the token itself was refused, so a fresh one may do: Exchange's
 * "535 5.7.3 Authentication unsuccessful", or a bare 535 with no enhanced code. Not 5.7.139 (SMTP
 * AUTH switched off) or 5.7.30 (basic auth): a new token changes nothing there.
 */
function isTokenRefusal(response: string | undefined): boolean {
  return /^535(?:[ -]5\.7\.3\b|[ -](?!\d\.\d))/.test(response ?? '');
}
