// Intake: the SMTP listeners and the policy of a session, phase by phase.
//
//   connect  -> connection caps, which connector (relay port) the client belongs to
//   tls      -> STARTTLS done (submission) or implicit (smtps); AUTH becomes available
//   auth     -> service account, password, smtp_auth flag
//   mail     -> sender syntax; the client must be authenticated or in a connector
//   rcpt     -> recipient syntax, relay decision, recipients-per-message limit
//   data     -> streamed through DataGuard (CRLF only, size) and HeaderFixups to the spool
//   queued   -> fsync'd and committed by the store; only then the 250 reply
//
// Each refusal is an SmtpReplyError from errors/smtp-errors.ts.
import net from 'node:net';
import { finished } from 'node:stream/promises';
import type { SMTPServerAddress, SMTPServerAuthentication, SMTPServerDataStream, SMTPServerSession } from 'smtp-server';
import type { Authenticator } from '../accounts/authenticator.js';
import type { ConnectorConfig } from '../config/config-schema.js';
import type { Config, ListenerAddress } from '../config/load-config.js';
import { type SmtpReplyError, smtpError } from '../errors/smtp-errors.js';
import { storageFault, storageReply } from '../errors/storage-errors.js';
import type { Logger } from '../observe/logger.js';
import type { PolicySession, SessionPolicy } from '../policy/session-policy.js';
import { newQueueId } from '../store/queue-id.js';
import type { NewMessage, Store } from '../store/store.js';
import { DataGuard } from './data-guard.js';
import { FreeSpace } from './free-space.js';
import { HeaderFixups, receivedHeader } from './header-fixups.js';
import { NetworkList, plainIp } from './network-list.js';
import { PosternSmtpServer } from './postern-smtp-server.js';
import type { TlsMaterial } from './tls-material.js';

export type ListenerKind = 'submission' | 'smtps' | 'relay';

export interface BoundListener {
  kind: ListenerKind;
  host: string;
  port: number;
  legacy: boolean;
  /** Set when a default privileged port could not be bound and the fallback was used. */
  fellBackFrom?: number;
}

export interface IntakeOptions {
  config: Config;
  store: Store;
  authenticator: Authenticator;
  logger: Logger;
  tls: TlsMaterial;
  policy: SessionPolicy;
  /** Called after a message is durably queued (wakes the queue runner). */
  onQueued?: (queueId: string) => void;
}

interface SessionState extends PolicySession {
  listener: ListenerKind;
  log: Logger;
}

export class Intake {
  readonly #options: IntakeOptions;
  readonly #servers: { kind: ListenerKind; server: PosternSmtpServer }[] = [];
  readonly #sessions = new Map<string, SessionState>();
  readonly #perIp = new Map<string, number>();
  readonly #connectors: { config: ConnectorConfig; networks: NetworkList }[];
  readonly #space: FreeSpace;
  #accepting = true;

  constructor(options: IntakeOptions) {
    this.#options = options;
    this.#connectors = options.config.connector.map((c) => ({ config: c, networks: new NetworkList(c.networks) }));
    this.#space = new FreeSpace(options.config.dataDir, options.config.limits.min_free_space);
  }

  get openSessions(): number {
    return this.#sessions.size;
  }

  /** The sockets of open SMTP sessions (diagnostics; the tests check their options). */
  sockets(): net.Socket[] {
    return this.#servers.flatMap(({ server }) =>
      [...server.connections].map((c) => (c as unknown as { _socket: net.Socket })._socket),
    );
  }

  async start(): Promise<BoundListener[]> {
    const bound: BoundListener[] = [];
    const { listen } = this.#options.config;
    for (const kind of ['submission', 'smtps', 'relay'] as const) {
      const address = listen[kind];
      if (!address) continue;
      const server = this.#createServer(kind, address.legacy === true);
      if (kind === 'smtps') this.#capBeforeHandshake(server);
      this.#servers.push({ kind, server });
      bound.push(await bindListener(server, kind, address, this.#options.logger));
    }
    return bound;
  }

  /**
   * On the implicit-TLS port a session (and so onConnect's caps) starts only after the TLS
   * handshake, which a client can simply never finish. So raw sockets are counted per address
   * here, before smtp-server sees them, and the ones over the caps are closed at once.
   */
  #capBeforeHandshake(server: PosternSmtpServer): void {
    const { limits } = this.#options.config;
    const perIp = new Map<string, number>();
    let total = 0;
    // smtp-server's own handler must not see a refused socket at all: it is wrapped, not preceded.
    const handlers = server.server.listeners('connection') as ((socket: net.Socket) => void)[];
    server.server.removeAllListeners('connection');
    server.server.on('connection', (socket: net.Socket) => {
      const ip = plainIp(socket.remoteAddress ?? '');
      const n = perIp.get(ip) ?? 0;
      if (n >= limits.max_connections_per_ip || total >= limits.max_connections) {
        this.#options.logger.warn({ event: 'connect_refused', listener: 'smtps', ip, reason: 'cap_before_tls' }, 'connection refused before TLS: too many');
        socket.on('error', () => undefined);
        socket.destroy();
        return;
      }
      perIp.set(ip, n + 1);
      total++;
      socket.once('close', () => {
        total--;
        const left = (perIp.get(ip) ?? 1) - 1;
        if (left > 0) perIp.set(ip, left);
        else perIp.delete(ip);
      });
      for (const handler of handlers) handler.call(server.server, socket);
    });
  }

  /** Uses a new certificate and key for every new TLS handshake (renewal, SIGHUP). */
  updateTls(material: { key: string; cert: string }): void {
    for (const { server } of this.#servers) server.updateSecureContext({ key: material.key, cert: material.cert });
  }

  /** Stops accepting connections; sessions in progress may finish their current message. */
  async close(graceMs = 10_000): Promise<void> {
    this.#accepting = false;
    await Promise.all(
      this.#servers.map(
        ({ server }) =>
          new Promise<void>((resolve) => {
            (server as unknown as { options: { closeTimeout: number } }).options.closeTimeout = graceMs;
            server.close(() => resolve());
          }),
      ),
    );
  }

  #createServer(kind: ListenerKind, legacy: boolean): PosternSmtpServer {
    const { config, tls } = this.#options;
    const requiresAuth = kind !== 'relay';
    // The relay port offers AUTH only when a connector asks for it.
    const offersAuth = requiresAuth || config.connector.some((c) => c.require_auth);
    const server = new PosternSmtpServer({
      name: config.hostname,
      banner: 'Postern ready',
      secure: kind === 'smtps',
      key: tls.key,
      cert: tls.cert,
      // The legacy profile is for old devices on a LAN (the config refuses it on public
      // addresses): TLS 1.0/1.1 with their old ciphers, and AUTH before or without STARTTLS.
      minVersion: legacy ? 'TLSv1' : 'TLSv1.2',
      ...(legacy ? { ciphers: 'DEFAULT:@SECLEVEL=0' } : {}),
      allowInsecureAuth: legacy,
      hideAuthBeforeTls: !legacy,
      authMethods: ['PLAIN', 'LOGIN'],
      authOptional: !requiresAuth,
      disabledCommands: offersAuth ? [] : ['AUTH'],
      authRequiredMessage: smtpError('AUTH_REQUIRED').message,
      size: config.limits.max_message_size,
      hideSize: false,
      // PIPELINING, 8BITMIME, SMTPUTF8 and ENHANCEDSTATUSCODES are on by default; DSN is opt-in.
      hideDSN: false,
      hideENHANCEDSTATUSCODES: false,
      hideREQUIRETLS: true,
      // Reverse DNS for every client stalls each connection where DNS is slow, and a PTR name
      // proves nothing about an authenticated device. The Received header carries the IP.
      disableReverseLookup: true,
      socketTimeout: config.limits.idle_timeout,
      closeTimeout: 10_000,
      logger: false,
      onConnect: (session, cb) => cb(this.#onConnect(kind, session)),
      onSecure: (socket, session, cb) => {
        const state = this.#session(session);
        if (state) state.secure = true;
        state?.log.info(
          { event: 'tls', tls: (socket as { getProtocol?: () => string }).getProtocol?.() },
          'TLS established',
        );
        cb();
      },
      onAuth: (auth, session, cb) => {
        this.#onAuth(auth, session).then(
          (user) => cb(null, { user }),
          (err: Error) => cb(err),
        );
      },
      onMailFrom: (address, session, cb) => {
        this.#onMailFrom(address, session).then(cb, cb);
      },
      onRcptTo: (address, session, cb) => {
        this.#onRcptTo(address, session).then(cb, cb);
      },
      onData: (stream, session, cb) => {
        this.#onData(stream, session).then(
          (reply) => cb(null, reply),
          (err: Error) => cb(err),
        );
      },
      onClose: (session) => this.#onClose(session),
    });
    // Without an 'error' listener a failed TLS handshake (an old TLS 1.1 client, say) would
    // be thrown as an uncaught exception and take the whole process down.
    server.on('error', (err: Error & { code?: string; remote?: string }) => {
      this.#options.logger.info({ event: 'connection_error', listener: kind, err: err.message, code: err.code }, 'connection error');
    });
    return server;
  }

  #session(session: SMTPServerSession): SessionState | undefined {
    return this.#sessions.get(session.id);
  }

  #onConnect(kind: ListenerKind, session: SMTPServerSession): SmtpReplyError | null {
    const ip = plainIp(session.remoteAddress);
    const { limits } = this.#options.config;
    const log = this.#options.logger.child({ session: session.id, listener: kind, ip });
    if (!this.#accepting) return smtpError('SHUTTING_DOWN');
    if (this.#sessions.size >= limits.max_connections) {
      log.warn({ event: 'connect_refused', reason: 'max_connections' }, 'connection refused: server busy');
      return smtpError('SERVER_BUSY');
    }
    const fromIp = this.#perIp.get(ip) ?? 0;
    if (fromIp >= limits.max_connections_per_ip) {
      log.warn({ event: 'connect_refused', reason: 'max_connections_per_ip' }, 'connection refused: too many from this IP');
      return smtpError('TOO_MANY_CONNECTIONS', { ip });
    }
    this.#perIp.set(ip, fromIp + 1);
    const connector = kind === 'relay' ? this.#connectors.find((c) => c.networks.has(ip))?.config : undefined;
    // `transaction`: smtp-server replaces session.envelope whenever a transaction ends (RSET, EHLO,
    // STARTTLS, the DATA reply), which tells the rate limits to give back what it reserved.
    this.#sessions.set(session.id, { listener: kind, ip, connector, log, secure: kind === 'smtps', transaction: () => session.envelope });
    log.info({ event: 'connect', connector: connector?.name, port: session.localPort }, 'client connected');
    return null;
  }

  #onClose(session: SMTPServerSession): void {
    const state = this.#sessions.get(session.id);
    if (!state) return;
    this.#sessions.delete(session.id);
    this.#options.policy.closed(state);
    const left = (this.#perIp.get(state.ip) ?? 1) - 1;
    if (left > 0) this.#perIp.set(state.ip, left);
    else this.#perIp.delete(state.ip);
    state.log.info({ event: 'close' }, 'client disconnected');
  }

  async #onAuth(auth: SMTPServerAuthentication, session: SMTPServerSession): Promise<string> {
    const state = this.#session(session);
    if (!state) throw smtpError('SHUTTING_DOWN');
    const { policy, authenticator } = this.#options;
    const username = auth.username ?? '';
    const locked = await policy.beforeAuth(state, username);
    if (locked) {
      state.log.warn({ event: 'auth_refused', account: username.slice(0, 320), reason: 'locked' }, 'AUTH refused: locked out');
      throw locked;
    }
    const outcome = await authenticator.authenticate(username, auth.password ?? '');
    if (!outcome.ok) {
      // The log names the real reason; the client learns only what Office 365 would tell it.
      state.log.warn({ event: 'auth_failed', account: username.slice(0, 320), method: auth.method, reason: outcome.reason }, 'authentication failed');
      if (outcome.reason === 'smtp_auth_disabled') throw smtpError('AUTH_SMTP_DISABLED');
      await policy.authFailed(state, username, outcome.reason);
      throw smtpError('AUTH_FAILED');
    }
    const refused = await policy.afterAuth(state, outcome.account);
    if (refused) {
      state.log.warn({ event: 'auth_refused', account: outcome.address, reason: refused.errorName }, 'AUTH refused by policy');
      throw refused;
    }
    state.log.info({ event: 'auth', account: outcome.address, method: auth.method, cached: outcome.cached }, 'authenticated');
    return outcome.address;
  }

  async #onMailFrom(address: SMTPServerAddress, session: SMTPServerSession): Promise<SmtpReplyError | null> {
    const state = this.#session(session);
    if (!state) return smtpError('SHUTTING_DOWN');
    if (state.listener !== 'relay' && !session.user) return smtpError('AUTH_REQUIRED');
    if (address.address !== '' && !isValidMailbox(address.address)) {
      return smtpError('BAD_SENDER_ADDRESS', { address: printable(address.address) });
    }
    const envid = (address.args && typeof address.args.ENVID === 'string' ? address.args.ENVID : undefined) ?? session.envelope.dsn?.envid;
    if (envid && envid.length > 100) return smtpError('BAD_DSN_PARAMETER', { name: 'ENVID', max: 100 });
    // The relay port refuses outsiders per recipient (below); their MAIL is not worth a lookup.
    if (state.listener !== 'relay' || state.connector) {
      // Like Postfix (queue_minfree, SIZE): refuse before the client sends the data, and before
      // the policy, which may write to the store.
      const space = await this.#space.check(declaredSize(address));
      if (!space.ok) {
        state.log.warn({ event: 'mail_refused', from: address.address, reason: 'disk_space', available: space.available, reserve: this.#space.reserve }, 'not enough free space in data_dir');
        return smtpError('INSUFFICIENT_STORAGE');
      }
      const refused = await this.#options.policy.onMail(state, address.address);
      if (refused) {
        state.log.warn({ event: 'mail_refused', from: address.address, reason: refused.errorName }, refused.message);
        return refused;
      }
    }
    // Debug: the `queued` line carries the sender of every message that made it; refusals log their own.
    state.log.debug({ event: 'mail', from: address.address, account: session.user }, 'MAIL FROM');
    return null;
  }

  async #onRcptTo(address: SMTPServerAddress, session: SMTPServerSession): Promise<SmtpReplyError | null> {
    const state = this.#session(session);
    if (!state) return smtpError('SHUTTING_DOWN');
    if (state.listener === 'relay' && !state.connector) {
      state.log.warn({ event: 'rcpt_refused', to: address.address, reason: 'relay_denied' }, 'relaying denied');
      await this.#options.policy.relayDenied(state, address.address);
      return smtpError('RELAY_DENIED', { ip: state.ip });
    }
    if (!isValidMailbox(address.address)) return smtpError('BAD_RECIPIENT_ADDRESS', { address: printable(address.address) });
    const orcpt = address.dsn?.orcpt ?? (address.args && typeof address.args.ORCPT === 'string' ? address.args.ORCPT : '');
    if (orcpt.length > 500) return smtpError('BAD_DSN_PARAMETER', { name: 'ORCPT', max: 500 });
    const refused = await this.#options.policy.onRcpt(state, address.address, session.envelope.rcptTo.length);
    if (refused) {
      state.log.warn({ event: 'rcpt_refused', to: address.address, reason: refused.errorName }, refused.message);
      return refused;
    }
    state.log.debug({ event: 'rcpt', to: address.address }, 'RCPT TO');
    return null;
  }

  async #onData(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const state = this.#session(session);
    const { config, store } = this.#options;
    const receivedAt = Date.now();
    const queueId = newQueueId(receivedAt);
    const envelope = session.envelope;
    const sender = envelope.mailFrom ? envelope.mailFrom.address : '';
    const recipients = envelope.rcptTo;
    const tlsInfo = session.tlsOptions
      ? { version: session.tlsOptions.version ?? 'TLS', cipher: session.tlsOptions.name }
      : undefined;
    const received = receivedHeader({
      heloName: session.hostNameAppearsAs,
      clientHostname: session.clientHostname,
      clientIp: state?.ip ?? plainIp(session.remoteAddress),
      hostname: config.hostname,
      protocol: session.transmissionType,
      queueId,
      tls: tlsInfo,
      account: session.user,
      singleRecipient: recipients.length === 1 ? recipients[0]!.address : undefined,
      date: new Date(receivedAt),
    });

    let writer: ReturnType<Store['createBody']>;
    try {
      writer = store.createBody(queueId);
    } catch (err) {
      state?.log.error({ event: 'data_rejected', reason: 'storage', fault: storageFault(err), err: (err as Error).message }, 'cannot spool');
      throw storageReply(err);
    }
    const guard = new DataGuard(config.limits.max_message_size);
    const fixups = new HeaderFixups(
      received,
      config.hostname,
      new Date(receivedAt),
      state ? this.#options.policy.headerCheck(state) : undefined,
    );
    // One listener runs each chunk through the guard and the fix-ups into the body writer: no
    // stream stage per check (their pipes alone were 7.6% of the intake's allocations).
    // If the disk fails we must keep reading the client's data to its end (so the conversation
    // stays in step) while writing nothing more.
    const body = writer.stream;
    // Set from the error listener; `as` keeps TypeScript from narrowing it to null here.
    let storageError = null as Error | null;
    body.on('error', (err) => {
      storageError ??= err;
      stream.resume();
    });
    const emit = (piece: Buffer) => {
      if (storageError) return;
      // Backpressure from a spilled body's file: the client waits while the disk catches up.
      if (!body.write(piece)) {
        stream.pause();
        body.once('drain', () => stream.resume());
      }
    };
    stream.on('data', (chunk: Buffer) => {
      if (guard.accept(chunk)) fixups.take(chunk, emit);
    });
    // A message is the client's only once it sent CRLF.CRLF: should the connection close before
    // (smtp-server then destroys the data stream), what arrived is dropped, never queued.
    const complete = await finished(stream, { writable: false }).then(
      () => true,
      () => false,
    );
    if (!complete) {
      await writer.abort().catch(() => undefined);
      state?.log.info({ event: 'data_aborted', bytes: guard.bytes }, 'connection closed before the end of the message data; nothing queued');
      throw new Error('connection closed before the end of the message data');
    }
    guard.end();
    if (!guard.violation) fixups.end(emit);
    // A refused message is aborted below, never finished.
    if (!guard.violation && !fixups.rejection && !storageError) body.end();

    const violation = guard.violation;
    if (fixups.rejection && !violation) {
      await writer.abort().catch(() => undefined);
      state?.log.warn({ event: 'data_rejected', reason: fixups.rejection.errorName }, fixups.rejection.message);
      if (state) await this.#options.policy.headerRefused(state, fixups.rejection);
      throw fixups.rejection;
    }
    if (violation || storageError) {
      await writer.abort().catch(() => undefined);
      if (violation?.kind === 'too_big') {
        state?.log.warn({ event: 'data_rejected', reason: 'too_big', bytes: guard.bytes }, 'message too big');
        throw smtpError('MESSAGE_TOO_BIG', { max: violation.limit });
      }
      if (violation) {
        state?.log.warn({ event: 'data_rejected', reason: violation.kind, offset: violation.offset }, 'bare line ending');
        throw smtpError('BARE_LINE_ENDING', { kind: violation.kind === 'bare_lf' ? 'LF' : 'CR' });
      }
      state?.log.error({ event: 'data_rejected', reason: 'storage', fault: storageFault(storageError), err: storageError?.message }, 'spool write failed');
      throw storageReply(storageError);
    }
    // The disk may have filled up while the data came in: keep the reserve for the queue. This
    // message's own bytes do not count (a spilled body is on disk already; an inline one is small).
    const space = await this.#space.check(-guard.bytes);
    if (!space.ok) {
      await writer.abort().catch(() => undefined);
      state?.log.error({ event: 'data_rejected', reason: 'storage', fault: 'full', available: space.available, reserve: this.#space.reserve }, 'not enough free space in data_dir');
      throw smtpError('INSUFFICIENT_STORAGE');
    }

    const message: NewMessage = {
      queueId,
      sender,
      recipients: recipients.map((r) => ({ address: r.address, notify: r.dsn?.notify, orcpt: r.dsn?.orcpt })),
      size: 0,
      receivedAt,
      expiresAt: receivedAt + config.queue.lifetime,
      origin: {
        sessionId: session.id,
        listener: state?.listener ?? 'unknown',
        clientIp: state?.ip ?? plainIp(session.remoteAddress),
        account: session.user,
        heloName: session.hostNameAppearsAs || undefined,
      },
      messageIdHeader: fixups.messageId,
      dsnEnvid: envelope.dsn?.envid ?? undefined,
      dsnRet: (envelope.dsn?.ret as 'FULL' | 'HDRS' | null) ?? undefined,
    };
    try {
      message.size = await writer.finish();
      await store.enqueue(message);
    } catch (err) {
      await writer.abort().catch(() => undefined);
      state?.log.error({ event: 'data_rejected', reason: 'storage', fault: storageFault(err), err: (err as Error).message }, 'queue write failed');
      throw storageReply(err);
    }
    state?.log.info(
      { event: 'queued', queueId, from: sender, rcpts: recipients.length, size: message.size, messageId: fixups.messageId },
      'message queued',
    );
    if (state) this.#options.policy.queued(state, recipients.length);
    this.#options.onQueued?.(queueId);
    return `2.0.0 Ok: queued as ${queueId}`;
  }
}

/** local@domain with a plausible domain or address literal; smtp-server has checked the syntax. */
function isValidMailbox(address: string): boolean {
  // smtp-server turns invalid UTF-8 into U+FFFD: the address would not be the one that was sent.
  if (/[\u0000-\u001f\u007f\ufffd]/.test(address)) return false;
  const at = address.lastIndexOf('@');
  if (at <= 0 || at === address.length - 1) return false;
  const domain = address.slice(at + 1);
  if (domain.startsWith('[') && domain.endsWith(']')) {
    const literal = domain.slice(1, -1).replace(/^IPv6:/i, '');
    return net.isIP(literal) !== 0;
  }
  // Single-label domains are allowed: a [[route]] may serve an internal name.
  return /^(?=.{1,253}$)[\p{L}\p{N}]([\p{L}\p{N}-]{0,61}[\p{L}\p{N}])?(\.[\p{L}\p{N}]([\p{L}\p{N}-]{0,61}[\p{L}\p{N}])?)*$/u.test(domain);
}

/** The SIZE a client declared in MAIL FROM (RFC 1870), or 0. */
function declaredSize(address: SMTPServerAddress): number {
  const size = Number(address.args && typeof address.args.SIZE === 'string' ? address.args.SIZE : 0);
  return Number.isSafeInteger(size) && size > 0 ? size : 0;
}

function printable(value: string): string {
  return value.replace(/[^\x20-\x7e]/g, '?').slice(0, 200);
}

/** Binds a listener; the built-in 587/465 defaults fall back to 2587/2465 without privileges. */
async function bindListener(
  server: PosternSmtpServer,
  kind: ListenerKind,
  address: ListenerAddress,
  logger: Logger,
): Promise<BoundListener> {
  const tryListen = (host: string, port: number) =>
    new Promise<net.AddressInfo>((resolve, reject) => {
      const onError = (err: Error) => {
        server.server.off('listening', onListening);
        reject(err);
      };
      const onListening = () => {
        server.server.off('error', onError);
        resolve(server.server.address() as net.AddressInfo);
      };
      server.server.once('error', onError);
      server.server.once('listening', onListening);
      server.server.listen(port, host);
    });
  const listenAnyFamily = async (port: number) => {
    try {
      return await tryListen(address.host, port);
    } catch (err) {
      // "::" on a host without IPv6: all-interfaces means IPv4 then.
      if (address.host === '::' && (err as NodeJS.ErrnoException).code === 'EAFNOSUPPORT') return tryListen('0.0.0.0', port);
      throw err;
    }
  };
  try {
    const info = await listenAnyFamily(address.port);
    return { kind, host: info.address, port: info.port, legacy: address.legacy === true };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EACCES' && address.fallbackPort) {
      const info = await listenAnyFamily(address.fallbackPort).catch((e: Error) => {
        throw new Error(`${kind}: cannot listen on port ${address.port} (needs privileges) nor on ${address.fallbackPort}: ${e.message}`);
      });
      logger.warn(
        { event: 'listen_fallback', listener: kind, wanted: address.port, port: info.port },
        `port ${address.port} needs privileges; ${kind} listens on ${info.port} instead`,
      );
      return { kind, host: info.address, port: info.port, fellBackFrom: address.port, legacy: false };
    }
    const why =
      code === 'EADDRINUSE'
        ? 'the address is already in use (another mail server or another Postern?)'
        : code === 'EACCES'
          ? 'permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)'
          : code === 'EADDRNOTAVAIL'
            ? 'no such local address on this machine'
            : (err as Error).message;
    throw new Error(`listen.${kind}: cannot listen on ${address.host}:${address.port}: ${why}`);
  }
}
