// Child process: an SMTP server that reads every message to its end and throws it away, counting.
//
// The bench runs it in two roles. As the sink, it stands for the destination of Postern's
// [[route]] and counts what arrives, for the end-to-end figure. As the ceiling, it is a bare
// smtp-server with the same certificate, the same TLS floor and the same AUTH requirement as
// Postern's submission port but no store, no logs and no policy: the fastest a Node intake can
// take mail on this machine, which is what Postern's own figures are divided by.
//
// A third role, the durable ceiling (`durableDir` set), keeps each message instead: the body is
// appended to a SQLite table and fsync'd before the 250 (durable-append.ts), the least any intake
// that never loses an accepted message must do. Postern's figures divided by it tell what Postern
// costs beyond durability itself.
//
// It runs in its own process so that it does not share an event loop with the load generator,
// and so that its RSS and CPU time are its own.
//
// Started by run.ts with the options as JSON in argv[2]; listens on 127.0.0.1 only.
import fs from 'node:fs';
import type { SMTPServerOptions } from 'smtp-server';
import { SMTPServer } from 'smtp-server';
import { PosternSmtpServer } from '../intake/postern-smtp-server.js';
import type { DiscardServerOptions, DiscardStats, FromDiscardServer, ToDiscardServer } from './bench-ipc.js';
import { DurableAppend } from './durable-append.js';

const options = JSON.parse(process.argv[2] ?? '{}') as DiscardServerOptions;
const durable = options.durableDir ? await DurableAppend.open(options.durableDir) : undefined;
const stats: DiscardStats = { messages: 0, bytes: 0, lastAt: 0 };

function send(message: FromDiscardServer): void {
  process.send?.(message);
}

const serverOptions: SMTPServerOptions = {
  name: `${options.role}.bench.test`,
  banner: `${options.role} ready`,
  key: fs.readFileSync(options.keyFile),
  cert: fs.readFileSync(options.certFile),
  minVersion: 'TLSv1.2',
  size: options.maxSize,
  disableReverseLookup: true,
  socketTimeout: 5 * 60_000,
  logger: false,
  ...(options.tlsAndAuth
    ? {
        authMethods: ['PLAIN', 'LOGIN'],
        authOptional: false,
        onAuth(auth, _session, cb) {
          if (auth.username === options.user && auth.password === options.pass) cb(null, { user: auth.username });
          else cb(new Error('5.7.139 Authentication unsuccessful'));
        },
      }
    : { authOptional: true, disabledCommands: ['AUTH', 'STARTTLS'] }),
  onData(stream, _session, cb) {
    let bytes = 0;
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (durable) chunks.push(chunk);
    });
    stream.on('end', () => {
      if (stream.sizeExceeded) {
        cb(Object.assign(new Error('5.3.4 Message too big'), { responseCode: 552 }));
        return;
      }
      const accepted = () => {
        stats.messages++;
        stats.bytes += bytes;
        stats.lastAt = Date.now();
        cb(null, durable ? 'Ok: kept' : 'Ok: discarded');
      };
      if (!durable) return accepted();
      durable.append(Buffer.concat(chunks, bytes)).then(accepted, (err: Error) => cb(err));
    });
  },
};

const server = options.stockGreetingDelay
  ? new SMTPServer(serverOptions)
  : new PosternSmtpServer({ ...serverOptions, hideAuthBeforeTls: options.tlsAndAuth });
// A failed handshake or a reset connection must not end the process.
server.on('error', () => undefined);

server.listen(0, '127.0.0.1', () => {
  const address = server.server.address();
  if (address && typeof address === 'object') send({ type: 'listening', port: address.port });
});

process.on('message', (message: ToDiscardServer) => {
  if (message.type === 'stats') send({ type: 'stats', ...stats });
});

// The orchestrator going away (or SIGTERM from it) ends this process; nothing to keep.
process.on('disconnect', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));
