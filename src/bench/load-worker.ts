// Child process: the load generator. run.ts forks one (or more, sharing the concurrency) per
// scenario, sends it a LoadScenario and gets a LoadResult back.
//
// It drives nodemailer's SMTPConnection directly, the client under nodemailer's createTransport
// (pool: false opens one SMTPConnection per message; pool: true reuses them), without the MIME
// composer: the message is prebuilt bytes, so the client spends its CPU on SMTP and TLS only.
//
//   'new'    connect, greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL/RCPT/DATA, QUIT, and wait
//            for the server to close: one device sending one scan.
//   'reuse'  one session per concurrency slot; MAIL/RCPT/DATA back to back: an app with a pool.
//
// Timing: the run has a warm-up (connections, JIT, the server's caches) and then a measurement
// window; only transactions whose 250 arrives inside the window count and are timed. Every loop
// is bounded by the window's end, by maxMessages and by maxErrors; every socket by timeouts.
import { performance } from 'node:perf_hooks';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import { BENCH_RECIPIENT, BENCH_SENDER, BenchMessage } from './bench-message.js';
import type { FromLoadWorker, LoadResult, LoadScenario, ToLoadWorker } from './bench-ipc.js';

const CONNECT_TIMEOUT_MS = 10_000;
const SOCKET_TIMEOUT_MS = 60_000;
const QUIT_TIMEOUT_MS = 5_000;
const MAX_SAMPLES = 500_000;

function send(message: FromLoadWorker, done?: () => void): void {
  process.send?.(message, undefined, {}, done);
}

class Run {
  readonly #s: LoadScenario;
  readonly #message: BenchMessage;
  readonly #start = performance.now();
  readonly #windowStart: number;
  readonly #windowEnd: number;
  #started = 0;
  #accepted = 0;
  #measured = 0;
  #errors = 0;
  readonly #firstErrors: string[] = [];
  readonly #transactionMs: number[] = [];
  readonly #sessionMs: number[] = [];
  #nextLocal = 0;
  #cpuAtWindowStart: NodeJS.CpuUsage | undefined;
  #cpuCores = 0;

  constructor(scenario: LoadScenario) {
    this.#s = scenario;
    this.#message = new BenchMessage(scenario.messageSize);
    this.#windowStart = this.#start + scenario.warmupMs;
    this.#windowEnd = this.#windowStart + scenario.durationMs;
  }

  async run(): Promise<LoadResult> {
    const marks = [
      setTimeout(() => {
        this.#cpuAtWindowStart = process.cpuUsage();
        send({ type: 'window-start' });
      }, this.#s.warmupMs),
      setTimeout(() => this.#endWindow(), this.#s.warmupMs + this.#s.durationMs),
    ];
    const slots = Array.from({ length: this.#s.concurrency }, (_, i) => (this.#s.mode === 'new' ? this.#newConnectionLoop() : this.#reuseLoop(i)));
    await Promise.all(slots);
    for (const t of marks) clearTimeout(t);
    // A run that ended early (maxMessages, errors) still reports its CPU over what it ran.
    if (!this.#cpuCores) this.#endWindow();
    return {
      accepted: this.#accepted,
      measured: this.#measured,
      windowMs: this.#s.durationMs,
      errors: this.#errors,
      firstErrors: this.#firstErrors,
      transactionMs: this.#transactionMs,
      sessionMs: this.#sessionMs,
      cpuCores: this.#cpuCores,
    };
  }

  #endWindow(): void {
    if (this.#cpuCores) return;
    const base = this.#cpuAtWindowStart ?? { user: 0, system: 0 };
    const used = process.cpuUsage(base);
    const seconds = Math.max(0.001, (Math.min(performance.now(), this.#windowEnd) - this.#windowStart) / 1000);
    this.#cpuCores = (used.user + used.system) / 1e6 / seconds;
    send({ type: 'window-end' });
  }

  #more(): boolean {
    return performance.now() < this.#windowEnd && this.#started < this.#s.maxMessages && this.#errors < this.#s.maxErrors;
  }

  #record(txStart: number, sessionStart: number | undefined): void {
    const now = performance.now();
    this.#accepted++;
    if (now < this.#windowStart || now > this.#windowEnd) return;
    this.#measured++;
    if (this.#transactionMs.length < MAX_SAMPLES) this.#transactionMs.push(now - txStart);
    if (sessionStart !== undefined && this.#sessionMs.length < MAX_SAMPLES) this.#sessionMs.push(now - sessionStart);
  }

  #fail(err: unknown): void {
    this.#errors++;
    if (this.#firstErrors.length < 5) this.#firstErrors.push((err as Error)?.message ?? String(err));
  }

  async #newConnectionLoop(): Promise<void> {
    while (this.#more()) {
      const n = this.#started++;
      const sessionStart = performance.now();
      let connection: SMTPConnection | undefined;
      try {
        connection = await this.#open();
        const txStart = performance.now();
        await sendMessage(connection, this.#message.build(n));
        this.#record(txStart, sessionStart);
        await quit(connection);
      } catch (err) {
        this.#fail(err);
        connection?.close();
      }
    }
  }

  async #reuseLoop(slot: number): Promise<void> {
    let connection: SMTPConnection | undefined;
    while (this.#more()) {
      try {
        connection ??= await this.#open();
      } catch (err) {
        this.#fail(new Error(`slot ${slot}: ${(err as Error).message}`));
        continue;
      }
      const n = this.#started++;
      const txStart = performance.now();
      try {
        await sendMessage(connection, this.#message.build(n));
        this.#record(txStart, undefined);
      } catch (err) {
        this.#fail(err);
        connection.close();
        connection = undefined;
      }
    }
    if (connection) await quit(connection);
  }

  /** Connected, and with STARTTLS and AUTH done when the scenario asks for them. */
  async #open(): Promise<SMTPConnection> {
    const { localAddresses, auth, port } = this.#s;
    const localAddress = localAddresses.length ? localAddresses[this.#nextLocal++ % localAddresses.length] : undefined;
    const connection = new SMTPConnection({
      host: '127.0.0.1',
      port,
      localAddress,
      name: 'client.bench.test',
      secure: false,
      requireTLS: auth !== undefined,
      ignoreTLS: auth === undefined,
      tls: { rejectUnauthorized: false },
      connectionTimeout: CONNECT_TIMEOUT_MS,
      greetingTimeout: CONNECT_TIMEOUT_MS,
      socketTimeout: SOCKET_TIMEOUT_MS,
      logger: false,
      debug: false,
    });
    // Errors also arrive through the callbacks below; this keeps an 'error' event from throwing.
    connection.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      const onEnd = () => reject(new Error('connection closed before the greeting'));
      connection.once('error', reject);
      connection.once('end', onEnd);
      connection.connect(() => {
        connection.off('error', reject);
        connection.off('end', onEnd);
        resolve();
      });
    });
    if (auth) {
      await new Promise<void>((resolve, reject) =>
        connection.login({ user: auth.user, pass: auth.pass, method: 'PLAIN' }, (err) => (err ? reject(err) : resolve())),
      );
    }
    return connection;
  }
}

function sendMessage(connection: SMTPConnection, message: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    connection.send({ from: BENCH_SENDER, to: [BENCH_RECIPIENT] }, message, (err, info) => {
      if (err) reject(err);
      else if (!info || info.rejected.length > 0) reject(new Error(`recipient refused: ${info?.rejectedErrors?.[0]?.message ?? ''}`));
      else resolve();
    });
  });
}

/** QUIT and wait until the server has closed the connection (as a device does before its next scan). */
function quit(connection: SMTPConnection): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      connection.close();
      resolve();
    }, QUIT_TIMEOUT_MS);
    connection.once('end', () => {
      clearTimeout(timer);
      resolve();
    });
    connection.quit();
  });
}

process.once('message', (message: ToLoadWorker) => {
  if (message.type !== 'run') return;
  new Run(message.scenario).run().then(
    (result) => send({ type: 'result', ...result }, () => process.exit(0)),
    (err: Error) => send({ type: 'failed', error: err.message }, () => process.exit(1)),
  );
});
process.on('disconnect', () => process.exit(0));
