// Matching client addresses against configured networks (connectors). Built on node's BlockList,
// which does the CIDR arithmetic; IPv4 clients on a dual-stack socket arrive as ::ffff:a.b.c.d and
// are matched as IPv4.
import net from 'node:net';

export function plainIp(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m ? m[1]! : address;
}

/** Answers remembered per NetworkList; past this many addresses the memory starts over. */
const REMEMBERED_ADDRESSES = 4096;

export class NetworkList {
  readonly #list = new net.BlockList();
  /**
   * Answers by client address. BlockList.check builds a SocketAddress on every call, which was
   * 1.6% of the relay port's CPU with a new connection per message; devices come back from the
   * same few addresses, and the networks never change after start-up.
   */
  readonly #answers = new Map<string, boolean>();

  constructor(networks: readonly string[]) {
    for (const network of networks) {
      const [addr, bits] = network.split('/') as [string, string | undefined];
      const family = net.isIPv6(addr) ? 'ipv6' : 'ipv4';
      if (bits === undefined) this.#list.addAddress(addr, family);
      else this.#list.addSubnet(addr, Number(bits), family);
    }
  }

  has(address: string): boolean {
    const known = this.#answers.get(address);
    if (known !== undefined) return known;
    const ip = plainIp(address);
    const family = net.isIPv6(ip) ? 'ipv6' : net.isIPv4(ip) ? 'ipv4' : null;
    const answer = family !== null && this.#list.check(ip, family);
    if (this.#answers.size >= REMEMBERED_ADDRESSES) this.#answers.clear();
    this.#answers.set(address, answer);
    return answer;
  }
}
