// The HTTPS server under the stand-ins that play web endpoints (the identity platform's token
// endpoints, Microsoft Graph): loopback only, any free port, a client that breaks the handshake
// dropped without taking the server down, and a close that does not wait for keep-alive sockets.
import type { IncomingMessage, ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';

export class LoopbackHttps {
  readonly #server: https.Server;

  private constructor(server: https.Server) {
    this.#server = server;
  }

  static async start(certificate: { cert: string; key: string }, handle: (req: IncomingMessage, res: ServerResponse) => Promise<void>): Promise<LoopbackHttps> {
    const server = https.createServer({ cert: certificate.cert, key: certificate.key }, (req, res) => {
      void handle(req, res);
    });
    server.on('clientError', (_err, socket) => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    return new LoopbackHttps(server);
  }

  /** https://127.0.0.1:PORT */
  get url(): string {
    return `https://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  close(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.#server.close(() => resolve());
      this.#server.closeAllConnections();
    });
  }
}
