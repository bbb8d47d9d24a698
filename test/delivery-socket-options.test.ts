// Outbound sockets get TCP_NODELAY: with Nagle's algorithm, each pipelined batch (MAIL, RCPT...,
// DATA) waits for the server's delayed ACK, about 40 ms per transaction against some servers.
import net from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { SmtpSession } from '../src/delivery/smtp-session.js';
import { SinkServer } from './helpers/sink-server.js';

let sink: SinkServer;
afterAll(async () => sink?.close());

/** Node keeps the TCP_NODELAY state it set on a socket under an internal symbol. */
function noDelayOf(socket: net.Socket): boolean | undefined {
  const sym = Object.getOwnPropertySymbols(socket).find((s) => s.description === 'kSetNoDelay');
  return sym ? (socket as unknown as Record<symbol, boolean>)[sym] : undefined;
}

describe('outbound connections', () => {
  it('set TCP_NODELAY on the socket to the remote server', async () => {
    sink = await SinkServer.start();
    const opened = await SmtpSession.open({
      destination: 'route 127.0.0.1',
      hosts: [{ exchange: '127.0.0.1', priority: 0, A: ['127.0.0.1'], AAAA: [] }],
      port: sink.port,
      tls: 'none',
      heloName: 'relay.example.test',
      connectTimeout: 2000,
      commandTimeout: 2000,
    });
    expect(opened.failure).toBeUndefined();
    const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles();
    const outbound = handles.filter((h): h is net.Socket => h instanceof net.Socket && h.remotePort === sink.port);
    expect(outbound).toHaveLength(1);
    expect(noDelayOf(outbound[0]!)).toBe(true);
    opened.session!.destroy();
  });
});
