// Opens many plain TCP connections to an SMTP port and waits for each greeting: the state of a
// server with that many devices connected and silent (a printer that opened a session and is
// still scanning). Connections are opened in batches so the listen backlog is never the limit,
// and spread over several 127.0.0.x source addresses so ephemeral ports never are.
import net from 'node:net';

export interface IdleConnections {
  greeted: number;
  failed: number;
  firstError?: string;
  close(): Promise<void>;
}

export async function openIdleConnections(
  port: number,
  count: number,
  localAddresses: string[],
  options: { batch?: number; timeoutMs?: number } = {},
): Promise<IdleConnections> {
  const batch = options.batch ?? 100;
  const timeoutMs = options.timeoutMs ?? 15_000;
  const sockets: net.Socket[] = [];
  let greeted = 0;
  let failed = 0;
  let firstError: string | undefined;

  const openOne = (i: number) =>
    new Promise<void>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port, localAddress: localAddresses[i % localAddresses.length] });
      sockets.push(socket);
      let buffer = '';
      let done = false;
      const timer = setTimeout(() => finish(new Error('no greeting in time')), timeoutMs);
      const finish = (err?: Error) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        socket.off('data', onData);
        if (err) {
          failed++;
          firstError ??= err.message;
          socket.destroy();
        } else {
          greeted++;
        }
        resolve();
      };
      const onData = (chunk: Buffer) => {
        buffer += chunk.toString('latin1');
        if (!buffer.includes('\r\n')) return;
        finish(buffer.startsWith('220') ? undefined : new Error(`greeting was: ${buffer.trim().slice(0, 120)}`));
      };
      socket.on('data', onData);
      socket.once('error', (err) => finish(err));
      // Keep an 'error' listener for the socket's whole life (a reset after the greeting).
      socket.on('error', () => undefined);
    });

  for (let start = 0; start < count; start += batch) {
    const n = Math.min(batch, count - start);
    await Promise.all(Array.from({ length: n }, (_, j) => openOne(start + j)));
  }

  return {
    greeted,
    failed,
    firstError,
    async close() {
      await Promise.all(
        sockets.map(
          (s) =>
            new Promise<void>((resolve) => {
              if (s.destroyed) return resolve();
              s.once('close', () => resolve());
              s.destroy();
            }),
        ),
      );
    },
  };
}
