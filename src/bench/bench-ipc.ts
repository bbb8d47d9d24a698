// Messages between the bench orchestrator (run.ts) and its children over Node's IPC channel:
// the discard servers (sink and ceiling) and the load workers. One file so both ends agree.

/** How a discard server behaves. */
export interface DiscardServerOptions {
  /** Name printed in the results ("sink", "ceiling-tls", ...). */
  role: string;
  /** Offer STARTTLS and require AUTH (PLAIN/LOGIN) after it, like Postern's submission port. */
  tlsAndAuth: boolean;
  /**
   * true: stock smtp-server, which waits 100 ms before every greeting (early-talker check).
   * false: PosternSmtpServer, the same class without that wait (and with TCP_NODELAY).
   */
  stockGreetingDelay: boolean;
  certFile: string;
  keyFile: string;
  user: string;
  pass: string;
  /** Largest message accepted, bytes (SIZE). */
  maxSize: number;
  /**
   * Set: the durable ceiling. Each message is appended to a SQLite file in this directory and
   * fsync'd before the 250 (durable-append.ts) instead of being thrown away.
   */
  durableDir?: string;
}

export type ToDiscardServer = { type: 'stats' };

export interface DiscardStats {
  messages: number;
  bytes: number;
  /** Wall-clock time (Date.now()) when the last message's data ended; 0 before the first. */
  lastAt: number;
}

export type FromDiscardServer = { type: 'listening'; port: number } | ({ type: 'stats' } & DiscardStats);

export interface LoadScenario {
  port: number;
  /** 'new': connect, (STARTTLS, AUTH,) one message, QUIT, per message. 'reuse': one session, many messages. */
  mode: 'new' | 'reuse';
  /** Sessions this worker keeps busy at once. */
  concurrency: number;
  /** STARTTLS (required) and AUTH with these credentials; undefined: plain, no AUTH (relay port). */
  auth?: { user: string; pass: string };
  warmupMs: number;
  durationMs: number;
  /** Upper bound on messages this worker sends in the whole run, warm-up included. */
  maxMessages: number;
  messageSize: number;
  /** Source addresses to spread connections over (all in 127.0.0.0/8). */
  localAddresses: string[];
  /** Give up after this many failed transactions. */
  maxErrors: number;
}

export type ToLoadWorker = { type: 'run'; scenario: LoadScenario };

export interface LoadResult {
  /** Messages answered 250, warm-up and tail included (what the server holds). */
  accepted: number;
  /** Messages answered 250 inside the measurement window. */
  measured: number;
  windowMs: number;
  errors: number;
  firstErrors: string[];
  /** MAIL FROM written -> 250 after DATA, ms, measured window only. */
  transactionMs: number[];
  /** 'new' mode: TCP connect started -> 250 after DATA (greeting, EHLO, STARTTLS, AUTH included), ms. */
  sessionMs: number[];
  /** This worker's CPU during the window, in cores. */
  cpuCores: number;
}

export type FromLoadWorker =
  | { type: 'window-start' }
  | { type: 'window-end' }
  | ({ type: 'result' } & LoadResult)
  | { type: 'failed'; error: string };
