// MX resolution against a real (test) DNS server: what each kind of DNS answer means for delivery.
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { DeliveryError } from '../src/delivery/delivery-error.js';
import { MxResolver } from '../src/delivery/mx-resolver.js';
import { TestDnsServer } from './helpers/dns-server.js';

let dns: TestDnsServer;
let resolver: MxResolver;

beforeAll(async () => {
  dns = await TestDnsServer.start({
    'multi.test': {
      MX: [
        { priority: 20, exchange: 'mx-c.multi.test' },
        { priority: 5, exchange: 'mx-a.multi.test' },
        { priority: 10, exchange: 'mx-b.multi.test' },
      ],
    },
    'mx-a.multi.test': { A: ['192.0.2.1', '192.0.2.2'], AAAA: ['2001:db8::1'] },
    'mx-b.multi.test': { AAAA: ['2001:db8::2'] },
    'mx-c.multi.test': { A: ['192.0.2.3'] },
    'implicit.test': { A: ['192.0.2.10'], AAAA: ['2001:db8::10'] },
    'null.test': { MX: [{ priority: 0, exchange: '.' }] },
    'empty.test': {},
    'servfail.test': { servfail: true },
    'slow.test': { timeout: true },
    'dangling.test': { MX: [{ priority: 10, exchange: 'missing.dangling.test' }] },
    'half-broken.test': {
      MX: [
        { priority: 10, exchange: 'broken.half-broken.test' },
        { priority: 20, exchange: 'ok.half-broken.test' },
      ],
    },
    'broken.half-broken.test': { servfail: true },
    'ok.half-broken.test': { A: ['192.0.2.20'] },
    'mx-servfail.test': { MX: [{ priority: 10, exchange: 'broken.half-broken.test' }] },
  });
  resolver = new MxResolver({ servers: [dns.server], timeout: 200, tries: 1 });
});

afterAll(async () => {
  await dns.close();
});

async function failure(domain: string): Promise<DeliveryError> {
  const err = await resolver.resolveMx(domain).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DeliveryError);
  return err as DeliveryError;
}

describe('MxResolver', () => {
  test('MX hosts in preference order, with every A and AAAA address', async () => {
    const hosts = await resolver.resolveMx('multi.test');
    expect(hosts).toEqual([
      { exchange: 'mx-a.multi.test', priority: 5, A: ['192.0.2.1', '192.0.2.2'], AAAA: ['2001:db8::1'] },
      { exchange: 'mx-b.multi.test', priority: 10, A: [], AAAA: ['2001:db8::2'] },
      { exchange: 'mx-c.multi.test', priority: 20, A: ['192.0.2.3'], AAAA: [] },
    ]);
  });

  test('no MX records: the domain itself is the mail host (implicit MX)', async () => {
    expect(await resolver.resolveMx('implicit.test')).toEqual([
      { exchange: 'implicit.test', priority: 0, A: ['192.0.2.10'], AAAA: ['2001:db8::10'] },
    ]);
  });

  test('null MX fails permanently with 5.1.10', async () => {
    const err = await failure('null.test');
    expect(err.temporary).toBe(false);
    expect(err.response).toMatch(/^5\.1\.10 Recipient domain null\.test does not accept mail \(null MX/);
  });

  test('NXDOMAIN fails permanently with 5.1.2', async () => {
    const err = await failure('nowhere.test');
    expect(err.temporary).toBe(false);
    expect(err.response).toBe('5.1.2 Recipient domain nowhere.test does not exist (DNS: no such domain)');
  });

  test('a domain with neither MX nor address fails permanently with 5.4.4', async () => {
    const err = await failure('empty.test');
    expect(err.temporary).toBe(false);
    expect(err.enhanced).toBe('5.4.4');
  });

  test('SERVFAIL defers with 4.4.3', async () => {
    const err = await failure('servfail.test');
    expect(err.temporary).toBe(true);
    expect(err.response).toBe('4.4.3 DNS lookup of servfail.test (MX) failed temporarily (SERVFAIL); will retry');
  });

  test('a DNS server that never answers defers (timeout)', async () => {
    const err = await failure('slow.test');
    expect(err.temporary).toBe(true);
    expect(err.response).toContain('(timeout)');
  });

  test('MX hosts without any address: permanent when they do not exist, temporary when DNS fails', async () => {
    expect((await failure('dangling.test')).enhanced).toBe('5.4.4');
    expect((await failure('mx-servfail.test')).temporary).toBe(true);
  });

  test('a host whose lookup fails is skipped when another one resolves', async () => {
    expect(await resolver.resolveMx('half-broken.test')).toEqual([
      { exchange: 'ok.half-broken.test', priority: 20, A: ['192.0.2.20'], AAAA: [] },
    ]);
  });

  test('address literals need no DNS', async () => {
    expect(await resolver.resolveMx('[192.0.2.99]')).toEqual([{ exchange: '192.0.2.99', priority: 0, A: ['192.0.2.99'], AAAA: [] }]);
  });
});
