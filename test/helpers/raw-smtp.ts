// A line-level SMTP client for tests that must send exactly the bytes they mean (bare LF, pipelined
// commands, AUTH before STARTTLS), which nodemailer would tidy up.
import net from 'node:net';
import tls from 'node:tls';

export interface Reply {
  code: number;
  lines: string[];
  /** The whole reply text, lines joined with \n, codes included. */
  text: string;
}

export class RawSmtp {
  #socket: net.Socket | tls.TLSSocket;
  #buffer = '';
  #waiters: (() => void)[] = [];
  #closed = false;

  private constructor(socket: net.Socket | tls.TLSSocket) {
    this.#socket = socket;
    this.#attach(socket);
  }

  static async connect(port: number, options: { tls?: boolean; host?: string; localAddress?: string } = {}): Promise<RawSmtp> {
    const host = options.host ?? '127.0.0.1';
    const socket = options.tls
      ? tls.connect({
          host,
          port,
          rejectUnauthorized: false,
          minVersion: 'TLSv1.2',
          // A chosen source address needs a TCP socket of our own underneath.
          ...(options.localAddress ? { socket: net.connect({ host, port, localAddress: options.localAddress }) } : {}),
        })
      : net.connect({ host, port, localAddress: options.localAddress });
    await new Promise<void>((resolve, reject) => {
      socket.once(options.tls ? 'secureConnect' : 'connect', () => resolve());
      socket.once('error', reject);
    });
    return new RawSmtp(socket);
  }

  /** A device's opening on the submission port: greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN. */
  static async submission(port: number, user: string, password: string, options: { localAddress?: string } = {}): Promise<{ client: RawSmtp; greeting: Reply; auth: Reply }> {
    const client = await RawSmtp.connect(port, options);
    const greeting = await client.read();
    await client.command('EHLO device.local');
    await client.startTls();
    await client.command('EHLO device.local');
    const auth = await client.authPlain(user, password);
    return { client, greeting, auth };
  }

  get localPort(): number | undefined {
    return this.#socket.localPort;
  }

  get closed(): boolean {
    return this.#closed;
  }

  #attach(socket: net.Socket | tls.TLSSocket): void {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.#buffer += chunk;
      this.#wake();
    });
    socket.on('close', () => {
      this.#closed = true;
      this.#wake();
    });
    socket.on('error', () => undefined);
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }

  /** Reads one complete (possibly multi-line) reply. */
  async read(timeoutMs = 10_000): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = /^((?:\d{3}-[^\r\n]*\r\n)*)(\d{3})(?: [^\r\n]*)?\r\n/.exec(this.#buffer);
      if (m) {
        this.#buffer = this.#buffer.slice(m[0].length);
        const lines = m[0].split('\r\n').filter(Boolean);
        return { code: Number(m[2]), lines, text: lines.join('\n') };
      }
      if (this.#closed) throw new Error(`connection closed; unread: ${JSON.stringify(this.#buffer)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms; unread: ${JSON.stringify(this.#buffer)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  write(data: string | Buffer): void {
    this.#socket.write(data);
  }

  async command(line: string): Promise<Reply> {
    this.write(`${line}\r\n`);
    return this.read();
  }

  /** STARTTLS, then the handshake; `options` can make it fail on purpose (old TLS versions). */
  async startTls(options: tls.ConnectionOptions = {}): Promise<void> {
    const reply = await this.command('STARTTLS');
    if (reply.code !== 220) throw new Error(`STARTTLS refused: ${reply.text}`);
    const plain = this.#socket;
    plain.removeAllListeners('data');
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false, minVersion: 'TLSv1.2', ...options });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    this.#socket = secure;
    this.#buffer = '';
    this.#attach(secure);
  }

  async authPlain(user: string, password: string): Promise<Reply> {
    return this.command(`AUTH PLAIN ${Buffer.from(`\0${user}\0${password}`).toString('base64')}`);
  }

  /** Sends DATA, then the raw body bytes followed by the terminator, and returns the final reply. */
  async data(body: string | Buffer, terminator = '\r\n.\r\n'): Promise<Reply> {
    const go = await this.command('DATA');
    if (go.code !== 354) return go;
    this.write(Buffer.concat([Buffer.isBuffer(body) ? body : Buffer.from(body), Buffer.from(terminator)]));
    return this.read();
  }

  async quit(): Promise<void> {
    if (!this.#closed) {
      this.write('QUIT\r\n');
      await this.read().catch(() => undefined);
    }
    this.#socket.destroy();
  }

  destroy(): void {
    this.#socket.destroy();
  }
}
