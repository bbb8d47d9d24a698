// Matching client addresses against configured networks (connectors). Built on node's BlockList,
// which does the CIDR arithmetic; IPv4 clients on a dual-stack socket arrive as ::ffff:a.b.c.d and
// are matched as IPv4.
import net from 'node:net';

export function plainIp(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m ? m[1]! : address;
}

export class NetworkList {
  readonly #list = new net.BlockList();

  constructor(networks: readonly string[]) {
    for (const network of networks) {
      const [addr, bits] = network.split('/') as [string, string | undefined];
      const family = net.isIPv6(addr) ? 'ipv6' : 'ipv4';
      if (bits === undefined) this.#list.addAddress(addr, family);
      else this.#list.addSubnet(addr, Number(bits), family);
    }
  }

  has(address: string): boolean {
    const ip = plainIp(address);
    const family = net.isIPv6(ip) ? 'ipv6' : net.isIPv4(ip) ? 'ipv4' : null;
    return family !== null && this.#list.check(ip, family);
  }
}
