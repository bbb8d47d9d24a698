// mx-connect ships no types. Only the part Postern uses is declared: connect to one of an already
// resolved list of hosts (we do the DNS work ourselves, see mx-resolver.ts).
declare module 'mx-connect' {
  import type { Socket } from 'node:net';

  export interface MxConnectHost {
    exchange: string;
    priority?: number;
    A?: string[];
    AAAA?: string[];
  }

  export interface MxConnectOptions {
    /** Domain or address, used in error messages. */
    target: string;
    /** Pre-resolved hosts: mx-connect then skips its own DNS lookups. */
    mx?: MxConnectHost[];
    port?: number;
    /** Per address, in ms. */
    maxConnectTime?: number;
    localAddress?: string;
    localHostname?: string;
    /** Addresses not to try (already failed at the SMTP level). */
    ignoreMXHosts?: string[];
    /** Error reported when ignoreMXHosts leaves nothing to try. */
    mxLastError?: Error | false;
    dnsOptions?: {
      ignoreIPv6?: boolean;
      preferIPv6?: boolean;
      /** Must stay false: routes and tests point at loopback and private addresses. */
      blockLocalAddresses?: boolean;
      resolve?: unknown;
    };
    connectError?: (err: Error, delivery: unknown, options: unknown) => void;
  }

  export interface MxConnection {
    socket: Socket;
    /** MX host name. */
    hostname: string;
    /** IP address connected to. */
    host: string;
    port: number;
    localAddress: string;
    localPort: number;
  }

  /** Errors carry `response`, `category` ('network' | 'dns' | ...) and `temporary`. */
  export interface MxConnectError extends Error {
    response?: string;
    category?: string;
    temporary?: boolean;
    code?: string;
  }

  function mxConnect(options: MxConnectOptions): Promise<MxConnection>;
  export default mxConnect;
}
