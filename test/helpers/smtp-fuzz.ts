// Tools for the abuse and fuzz tests: a byte-level SMTP wire that can switch to TLS at any moment
// (RawSmtp always sends STARTTLS itself, so it cannot pipeline commands behind it), a seeded PRNG,
// and random and mutated SMTP sessions with a runner that records every reply it got.
import net from 'node:net';
import tls from 'node:tls';

/** One reply as it came off the wire. */
export interface WireReply {
  code: number;
  text: string;
}

/**
 * A client socket that sends exactly the bytes it is given and parses replies as they arrive.
 * `upgrade()` starts TLS on the current socket without sending anything first.
 */
export class SmtpWire {
  #socket: net.Socket | tls.TLSSocket;
  #buffer = '';
  #replies: WireReply[] = [];
  #taken = 0;
  #waiters: (() => void)[] = [];
  #closed = false;
  /** Every byte of every reply, for messages when a test fails. */
  transcript = '';

  private constructor(socket: net.Socket | tls.TLSSocket) {
    this.#socket = socket;
    this.#attach(socket);
  }

  static async connect(
    port: number,
    options: { tls?: boolean; localAddress?: string; timeoutMs?: number } = {},
  ): Promise<SmtpWire> {
    // tls.connect passes localAddress on to net.connect; its option type does not list it.
    const tlsOptions: tls.ConnectionOptions & { localAddress?: string } = {
      host: '127.0.0.1',
      port,
      localAddress: options.localAddress,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    };
    const socket = options.tls ? tls.connect(tlsOptions) : net.connect({ host: '127.0.0.1', port, localAddress: options.localAddress });
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error('connect timed out'));
      }, options.timeoutMs ?? 5000);
      socket.once(options.tls ? 'secureConnect' : 'connect', () => {
        clearTimeout(timer);
        resolve();
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
    return new SmtpWire(socket);
  }

  get closed(): boolean {
    return this.#closed;
  }

  get encrypted(): boolean {
    return this.#socket instanceof tls.TLSSocket;
  }

  get localPort(): number | undefined {
    return this.#socket.localPort;
  }

  /** All replies parsed so far (including those already returned by `read`). */
  get replies(): readonly WireReply[] {
    return this.#replies;
  }

  /** Bytes received that do not (yet) form a complete reply. */
  get unparsed(): string {
    return this.#buffer;
  }

  #attach(socket: net.Socket | tls.TLSSocket): void {
    socket.on('data', (chunk: Buffer) => {
      const text = chunk.toString('latin1');
      this.transcript += text;
      this.#buffer += text;
      this.#parse();
      this.#wake();
    });
    socket.on('close', () => {
      this.#closed = true;
      this.#wake();
    });
    socket.on('error', () => undefined);
  }

  #parse(): void {
    for (;;) {
      const m = /^((?:\d{3}-[^\r\n]*\r\n)*)(\d{3})(?: [^\r\n]*)?\r\n/.exec(this.#buffer);
      if (!m) return;
      this.#buffer = this.#buffer.slice(m[0].length);
      const lines = m[0].split('\r\n').filter(Boolean);
      this.#replies.push({ code: Number(m[2]), text: lines.join('\n') });
    }
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }

  /** Waits until something arrives, the socket closes, or `ms` pass. */
  async #waitForEvent(ms: number): Promise<void> {
    if (ms <= 0) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      this.#waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /** The next reply not yet returned by `read`. */
  async read(timeoutMs = 10_000): Promise<WireReply> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const next = this.#replies[this.#taken];
      if (next) {
        this.#taken++;
        return next;
      }
      if (this.#closed) throw new Error(`connection closed; unread: ${JSON.stringify(this.#buffer.slice(0, 300))}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms; unread: ${JSON.stringify(this.#buffer.slice(0, 300))}`);
      await this.#waitForEvent(left);
    }
  }

  /** Replies not yet returned by `read`, without waiting. */
  drain(): WireReply[] {
    const out = this.#replies.slice(this.#taken);
    this.#taken = this.#replies.length;
    return out;
  }

  /** Waits until `count` replies in all have arrived (or the socket closed, or the time is up). */
  async waitForReplies(count: number, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.#replies.length < count && !this.#closed && Date.now() < deadline) await this.#waitForEvent(deadline - Date.now());
    return this.#replies.length >= count;
  }

  /** Waits until nothing has arrived for `quietMs`, the socket closed, or `timeoutMs` passed. */
  async settle(quietMs: number, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.#closed || Date.now() >= deadline) return;
      const before = this.transcript.length;
      await this.#waitForEvent(Math.min(quietMs, deadline - Date.now()));
      if (this.transcript.length === before && !this.#closed) return;
    }
  }

  /** Resolves true once the server has closed the connection, false after `timeoutMs`. */
  async waitClosed(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#closed && Date.now() < deadline) await this.#waitForEvent(deadline - Date.now());
    return this.#closed;
  }

  write(data: string | Buffer): void {
    if (!this.#closed && !this.#socket.destroyed) this.#socket.write(data);
  }

  /** Writes `line` + CRLF and returns the next reply. */
  async command(line: string, timeoutMs?: number): Promise<WireReply> {
    this.write(`${line}\r\n`);
    return this.read(timeoutMs);
  }

  /** TLS handshake on the current socket; sends nothing before it (the caller sent STARTTLS). */
  async upgrade(timeoutMs = 5000): Promise<void> {
    const plain = this.#socket;
    plain.removeAllListeners('data');
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false, minVersion: 'TLSv1.2' });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('TLS handshake timed out')), timeoutMs);
      secure.once('secureConnect', () => {
        clearTimeout(timer);
        resolve();
      });
      secure.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
    this.#socket = secure;
    this.#buffer = '';
    this.#attach(secure);
  }

  destroy(): void {
    this.#socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness

/** mulberry32: small, fast, and the same sequence for the same seed on every machine. */
export class Prng {
  #state: number;
  constructor(seed: number) {
    this.#state = seed >>> 0;
  }
  /** Uniform in [0, 1). */
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
}

// ---------------------------------------------------------------------------------------------
// Sessions

/** One step of a scripted session: bytes to write, or "upgrade to TLS if the server said 220". */
export type Step = { kind: 'bytes'; data: Buffer } | { kind: 'starttls' };

export type FuzzPort = 'relay' | 'submission' | 'smtps';

export interface FuzzSession {
  index: number;
  port: FuzzPort;
  /** Which template it came from and which mutations were applied, for the failure message. */
  label: string;
  steps: Step[];
}

export interface SessionOutcome {
  index: number;
  label: string;
  port: FuzzPort;
  localAddress: string;
  /** Queue ids the server announced with "250 2.0.0 Ok: queued as ID". */
  announced: string[];
  replies: number;
  /** The session hit its time bound and the client gave up (closed the socket itself). */
  cut: boolean;
  /** Connecting or the TLS handshake failed; nothing else happened. */
  connectError?: string;
  transcript: string;
}

const bytes = (s: string): Buffer => Buffer.from(s, 'latin1');
const line = (s: string): Step => ({ kind: 'bytes', data: bytes(`${s}\r\n`) });

function authPlain(user: string, password: string): string {
  return `AUTH PLAIN ${Buffer.from(`\0${user}\0${password}`).toString('base64')}`;
}

function messageBody(prng: Prng, n: number, from: string): string {
  const lines = [`Subject: fuzz ${n}`, `From: <${from}>`, 'To: <rcpt@example.net>', ''];
  const count = 1 + prng.int(6);
  for (let i = 0; i < count; i++) lines.push(`line ${i} ${'x'.repeat(prng.int(80))}`);
  if (prng.chance(0.2)) lines.push('.leading dot, stuffed below');
  return `${lines.map((l) => (l.startsWith('.') ? `.${l}` : l)).join('\r\n')}\r\n`;
}

/** A valid session for `port`; `account` is used on the ports that need AUTH. */
export function validSession(prng: Prng, port: FuzzPort, n: number, account: { user: string; password: string }): Step[] {
  const steps: Step[] = [line(`EHLO fuzz${n}.example`)];
  if (port === 'submission') {
    steps.push({ kind: 'starttls' }, line(`EHLO fuzz${n}.example`));
  }
  if (port !== 'relay') steps.push(line(authPlain(account.user, account.password)));
  // An account may only send as itself (send-as policy); a connector client may use any sender.
  const from = port === 'relay' ? `sender${n}@example.com` : account.user;
  const transactions = 1 + (prng.chance(0.25) ? 1 : 0);
  for (let tx = 0; tx < transactions; tx++) {
    steps.push(line(`MAIL FROM:<${from}>`));
    const rcpts = 1 + prng.int(3);
    for (let r = 0; r < rcpts; r++) steps.push(line(`RCPT TO:<rcpt${r}.${n}@example.net>`));
    steps.push(line('DATA'));
    steps.push({ kind: 'bytes', data: bytes(messageBody(prng, n, from)) });
    steps.push(line('.'));
  }
  steps.push(line('QUIT'));
  return steps;
}

/** Commands a mutation may insert anywhere. */
const DICTIONARY = [
  'RSET',
  'NOOP',
  'DATA',
  'QUIT',
  'STARTTLS',
  'HELO x',
  'EHLO',
  'EHLO again.example',
  'MAIL FROM:<>',
  'MAIL FROM:<a@b.example> SIZE=99999999999',
  'MAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8',
  'RCPT TO:<x@y.example>',
  'RCPT TO:<x@y.example> NOTIFY=NEVER',
  'RCPT TO:<postmaster>',
  'RCPT TO:<"q@q"@y.example>',
  'RCPT TO:<a%b@y.example>',
  'AUTH LOGIN',
  'AUTH PLAIN',
  'AUTH PLAIN AAAA',
  'AUTH XOAUTH2 dXNlcj0=',
  '*',
  'BDAT 10 LAST',
  'VRFY root',
  'EXPN list',
  'HELP',
  'XCLIENT ADDR=127.0.0.1',
  'PROXY TCP4 127.0.0.1 127.0.0.1 1 2',
  'GET / HTTP/1.1',
  '.',
  '..',
  '',
];

function randomBytes(prng: Prng, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = prng.pick([0x00, 0x0d, 0x0a, 0xff, 0x2e, 0x20, 0x41 + prng.int(26), prng.int(256)]);
  return b;
}

/** Applies one random mutation in place; returns its name. */
function mutate(prng: Prng, steps: Step[]): string {
  const byteSteps = steps.map((s, i) => [s, i] as const).filter(([s]) => s.kind === 'bytes') as [
    { kind: 'bytes'; data: Buffer },
    number,
  ][];
  const anyByteStep = () => prng.pick(byteSteps);
  let choice = prng.int(11);
  // Flips, insertions and splits need a byte step; without one, insert a command instead.
  if (byteSteps.length === 0 && (choice === 0 || choice === 1 || choice === 9)) choice = 6;
  switch (choice) {
    case 0: {
      // flip one byte
      const [s] = anyByteStep();
      if (s.data.length === 0) return 'flip(empty)';
      const copy = Buffer.from(s.data);
      const at = prng.int(copy.length);
      copy[at] = copy[at]! ^ (1 << prng.int(8));
      s.data = copy;
      return `flip@${at}`;
    }
    case 1: {
      // insert CR, LF, NUL or 0xFF
      const [s] = anyByteStep();
      const at = prng.int(s.data.length + 1);
      const ins = Buffer.from([prng.pick([0x0d, 0x0a, 0x00, 0xff])]);
      s.data = Buffer.concat([s.data.subarray(0, at), ins, s.data.subarray(at)]);
      return `insert${ins[0]!.toString(16)}@${at}`;
    }
    case 2: {
      // truncate the session
      const keep = 1 + prng.int(steps.length);
      steps.splice(keep);
      const last = steps[steps.length - 1];
      if (last?.kind === 'bytes' && last.data.length > 1 && prng.chance(0.5)) last.data = last.data.subarray(0, prng.int(last.data.length));
      return `truncate@${keep}`;
    }
    case 3: {
      // duplicate a step
      const i = prng.int(steps.length);
      steps.splice(i, 0, steps[i]!);
      return `dup${i}`;
    }
    case 4: {
      // drop a step
      const i = prng.int(steps.length);
      steps.splice(i, 1);
      return `drop${i}`;
    }
    case 5: {
      // swap two steps (random command order)
      const i = prng.int(steps.length);
      const j = prng.int(steps.length);
      [steps[i], steps[j]] = [steps[j]!, steps[i]!];
      return `swap${i},${j}`;
    }
    case 6: {
      // insert a dictionary command
      const i = prng.int(steps.length + 1);
      const word = prng.pick(DICTIONARY);
      steps.splice(i, 0, line(word));
      return `cmd(${word})@${i}`;
    }
    case 7: {
      // random garbage bytes
      const i = prng.int(steps.length + 1);
      steps.splice(i, 0, { kind: 'bytes', data: randomBytes(prng, 1 + prng.int(64)) });
      return `garbage@${i}`;
    }
    case 8: {
      // pipeline: merge a run of byte steps into one write
      const i = prng.int(steps.length);
      let j = i;
      const parts: Buffer[] = [];
      while (j < steps.length && steps[j]!.kind === 'bytes' && parts.length < 6) parts.push((steps[j++] as { data: Buffer }).data);
      if (parts.length < 2) return 'merge(none)';
      steps.splice(i, parts.length, { kind: 'bytes', data: Buffer.concat(parts) });
      return `merge${i}x${parts.length}`;
    }
    case 9: {
      // split one write into two (a different TCP segmentation)
      const [s, i] = anyByteStep();
      if (s.data.length < 2) return 'split(short)';
      const at = 1 + prng.int(s.data.length - 1);
      steps.splice(i, 1, { kind: 'bytes', data: s.data.subarray(0, at) }, { kind: 'bytes', data: s.data.subarray(at) });
      return `split${i}@${at}`;
    }
    default: {
      // an over-long line
      const i = prng.int(steps.length + 1);
      const len = prng.pick([600, 5000, 20_000]);
      steps.splice(i, 0, line(`${prng.pick(['NOOP ', 'MAIL FROM:<', 'RCPT TO:<', 'EHLO '])}${'z'.repeat(len)}`));
      return `long${len}@${i}`;
    }
  }
}

/** A session built from scratch: random dictionary commands and garbage. */
function randomSession(prng: Prng): Step[] {
  const steps: Step[] = [];
  const n = 1 + prng.int(12);
  for (let i = 0; i < n; i++) {
    steps.push(prng.chance(0.75) ? line(prng.pick(DICTIONARY)) : { kind: 'bytes', data: randomBytes(prng, 1 + prng.int(40)) });
  }
  return steps;
}

/**
 * `count` sessions over the given ports: about 15% valid, 15% random, the rest valid sessions with
 * one to four mutations.
 */
export function makeSessions(
  prng: Prng,
  count: number,
  ports: readonly FuzzPort[],
  account: { user: string; password: string },
): FuzzSession[] {
  const sessions: FuzzSession[] = [];
  for (let index = 0; index < count; index++) {
    const port = ports[index % ports.length]!;
    const roll = prng.next();
    let steps: Step[];
    let label: string;
    if (roll < 0.15) {
      steps = validSession(prng, port, index, account);
      label = 'valid';
    } else if (roll < 0.3) {
      steps = randomSession(prng);
      label = 'random';
    } else {
      steps = validSession(prng, port, index, account);
      const names: string[] = [];
      const mutations = 1 + prng.int(4);
      for (let m = 0; m < mutations && steps.length > 0; m++) names.push(mutate(prng, steps));
      label = `mutated[${names.join(' ')}]`;
    }
    sessions.push({ index, port, label, steps });
  }
  return sessions;
}

/** A distinct loopback source address per session, so a queued message names its session. */
export function sessionAddress(index: number): string {
  if (index < 0 || index >= 250 * 250) throw new Error(`no loopback address for session ${index}`);
  return `127.1.${Math.floor(index / 250)}.${(index % 250) + 1}`;
}

const QUEUED = /^250 2\.0\.0 Ok: queued as (\S+)/;

/**
 * Plays one session against `portNumber` within `budgetMs`: each write is followed by a short wait
 * for the server's answer; a `starttls` step upgrades only if the server answered 220. At the end
 * the client sends QUIT and waits for the server to close; if the budget runs out first the client
 * closes the socket itself and the session counts as cut.
 */
export async function playSession(session: FuzzSession, portNumber: number, budgetMs: number): Promise<SessionOutcome> {
  const localAddress = sessionAddress(session.index);
  const deadline = Date.now() + budgetMs;
  const outcome: SessionOutcome = {
    index: session.index,
    label: session.label,
    port: session.port,
    localAddress,
    announced: [],
    replies: 0,
    cut: false,
    transcript: '',
  };
  let wire: SmtpWire;
  try {
    wire = await SmtpWire.connect(portNumber, { tls: session.port === 'smtps', localAddress, timeoutMs: Math.min(5000, budgetMs) });
  } catch (err) {
    outcome.connectError = (err as Error).message;
    return outcome;
  }
  const left = () => deadline - Date.now();
  try {
    await wire.waitForReplies(1, Math.min(2000, left()));
    for (const step of session.steps) {
      if (wire.closed || left() <= 0) break;
      if (step.kind === 'bytes') {
        const before = wire.replies.length;
        wire.write(step.data);
        // Most commands are answered in well under 20 ms; message data gets no answer.
        await wire.waitForReplies(before + 1, Math.min(20, left()));
      } else {
        const before = wire.replies.length;
        wire.write('STARTTLS\r\n');
        await wire.waitForReplies(before + 1, Math.min(1000, left()));
        const last = wire.replies[wire.replies.length - 1];
        if (wire.replies.length > before && last?.code === 220 && !wire.encrypted) {
          try {
            await wire.upgrade(Math.max(1, Math.min(3000, left())));
          } catch {
            break;
          }
        }
      }
    }
    if (!wire.closed && left() > 0) {
      // Answers to what was pipelined, then QUIT.
      await wire.settle(50, Math.min(1000, left()));
      wire.write('QUIT\r\n');
      await wire.waitClosed(Math.max(0, Math.min(300, left())));
    }
    if (!wire.closed && left() > 0) {
      // Still open: the session probably left the server in DATA, where QUIT was message text.
      // End the message and quit again, so the session ends with the server's last word rather
      // than with the client hanging up on a message the server may be about to accept.
      wire.write('\r\n.\r\nQUIT\r\n');
      await wire.waitClosed(Math.max(0, Math.min(2000, left())));
    }
    outcome.cut = !wire.closed;
  } finally {
    wire.destroy();
  }
  outcome.replies = wire.replies.length;
  outcome.transcript = wire.transcript;
  for (const r of wire.replies) {
    const m = QUEUED.exec(r.text);
    if (m) outcome.announced.push(m[1]!);
  }
  return outcome;
}

/** Runs `tasks` with at most `limit` in flight. */
export async function runLimited<T, R>(items: readonly T[], limit: number, task: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await task(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/** Connections a test file opens, destroyed after each test (call closeAll from afterEach), even when an assertion failed midway. */
export class ConnectionTracker {
  readonly #open: { destroy(): void }[] = [];

  track<T extends { destroy(): void }>(connection: T): T {
    this.#open.push(connection);
    return connection;
  }

  async connect(port: number, options: { tls?: boolean; localAddress?: string } = {}): Promise<SmtpWire> {
    return this.track(await SmtpWire.connect(port, options));
  }

  closeAll(): void {
    for (const c of this.#open.splice(0)) c.destroy();
  }
}
