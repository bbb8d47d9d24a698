// A tiny authoritative DNS server for tests: UDP on 127.0.0.1, a random free port, answers from an
// in-memory zone the test controls. Delivery code reaches it through `delivery.dns_servers`, the
// same way maddy's integration tests use a DNS override, so MX selection, implicit MX, null MX and
// DNS failures are exercised through node:dns (c-ares) for real instead of being mocked.
//
// Semantics, per name (lower case, no trailing dot):
//   - not in the zone                 -> NXDOMAIN
//   - in the zone, type not present   -> NOERROR with no answers (NODATA)
//   - `servfail: true`                -> SERVFAIL for every type
//   - `timeout: true`                 -> never answers (the resolver times out)
// A null MX (RFC 7505) is `MX: [{ priority: 0, exchange: '.' }]`.
import dgram from 'node:dgram';
import type { AddressInfo } from 'node:net';
import dnsPacket from 'dns-packet';

export interface DnsRecords {
  MX?: { priority: number; exchange: string }[];
  A?: string[];
  AAAA?: string[];
  /** Answer SERVFAIL for this name. */
  servfail?: boolean;
  /** Never answer queries for this name. */
  timeout?: boolean;
}

export type DnsZone = Record<string, DnsRecords>;

export interface DnsQueryLog {
  name: string;
  type: string;
}

const RCODE_SERVFAIL = 2;
const RCODE_NXDOMAIN = 3;

export class TestDnsServer {
  /** Edit freely while the server runs; lookups read it on every query. */
  zone: DnsZone;
  /** Every question received, in order. */
  readonly queries: DnsQueryLog[] = [];
  readonly #socket: dgram.Socket;

  private constructor(socket: dgram.Socket, zone: DnsZone) {
    this.#socket = socket;
    this.zone = normalizeZone(zone);
  }

  static async start(zone: DnsZone = {}): Promise<TestDnsServer> {
    const socket = dgram.createSocket('udp4');
    const server = new TestDnsServer(socket, zone);
    socket.on('message', (msg, rinfo) => server.#answer(msg, rinfo));
    // A malformed packet must not take the test process down.
    socket.on('error', () => {});
    await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', () => resolve()));
    return server;
  }

  get host(): string {
    return '127.0.0.1';
  }

  get port(): number {
    return (this.#socket.address() as AddressInfo).port;
  }

  /** The `delivery.dns_servers` entry pointing at this server. */
  get server(): { host: string; port: number } {
    return { host: this.host, port: this.port };
  }

  /** Replaces or adds records for one name. */
  set(name: string, records: DnsRecords): void {
    this.zone[normalizeName(name)] = records;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.#socket.close(() => resolve()));
  }

  #answer(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    let query: dnsPacket.DecodedPacket;
    try {
      query = dnsPacket.decode(msg);
    } catch {
      return;
    }
    const question = query.questions?.[0];
    if (!question) return;
    const name = normalizeName(question.name);
    this.queries.push({ name, type: question.type });
    const records = this.zone[name];
    if (records?.timeout) return;

    let rcode = 0;
    const answers: dnsPacket.Answer[] = [];
    if (!records) {
      rcode = RCODE_NXDOMAIN;
    } else if (records.servfail) {
      rcode = RCODE_SERVFAIL;
    } else if (question.type === 'MX') {
      for (const mx of records.MX ?? []) {
        answers.push({
          type: 'MX',
          name: question.name,
          ttl: 60,
          data: { preference: mx.priority, exchange: mx.exchange === '.' ? '.' : mx.exchange },
        });
      }
    } else if (question.type === 'A' || question.type === 'AAAA') {
      for (const address of records[question.type] ?? []) {
        answers.push({ type: question.type, name: question.name, ttl: 60, data: address });
      }
    }

    const response = dnsPacket.encode({
      type: 'response',
      id: query.id,
      // QR is implied by type 'response'; AA plus the rcode in the low four bits.
      flags: dnsPacket.AUTHORITATIVE_ANSWER | (query.flag_rd ? dnsPacket.RECURSION_DESIRED : 0) | rcode,
      questions: [question],
      answers,
    });
    this.#socket.send(response, rinfo.port, rinfo.address);
  }
}

function normalizeName(name: string): string {
  return name.toLowerCase().replace(/\.$/, '');
}

function normalizeZone(zone: DnsZone): DnsZone {
  const out: DnsZone = {};
  for (const [name, records] of Object.entries(zone)) out[normalizeName(name)] = records;
  return out;
}
