// Route selection: configured routes win over MX, most specific match first.
import { describe, expect, test } from 'vitest';
import { configSchema } from '../src/config/config-schema.js';
import { ConnectionPool } from '../src/delivery/connection-pool.js';
import { MxResolver } from '../src/delivery/mx-resolver.js';
import { Router } from '../src/delivery/router.js';

function router(route: unknown[]) {
  const config = { ...configSchema.parse({ route }), hostname: 'relay.test' };
  return new Router({ config, pool: new ConnectionPool({ maxConnections: 1, maxPerDestination: 1 }), resolver: new MxResolver() });
}

describe('Router', () => {
  const r = router([
    { domains: ['*.corp.test'], host: 'wild.internal', port: 2525 },
    { domains: ['corp.test', 'mail.corp.test'], host: 'exact.internal' },
    { domains: ['*.eu.corp.test'], host: 'eu.internal' },
    { domains: ['*'], host: 'smarthost.internal', port: 587, tls: 'required' },
  ]);

  test('exact domain, then the longest wildcard, then "*"', () => {
    expect(r.findRoute('corp.test')?.host).toBe('exact.internal');
    expect(r.findRoute('MAIL.corp.test')?.host).toBe('exact.internal');
    expect(r.findRoute('sales.corp.test')?.host).toBe('wild.internal');
    expect(r.findRoute('paris.eu.corp.test')?.host).toBe('eu.internal');
    expect(r.findRoute('example.org')?.host).toBe('smarthost.internal');
  });

  test('destination keys: routes by host and port, MX by domain', () => {
    expect(r.route('sales.corp.test').key).toBe('route:wild.internal:2525');
    expect(r.route('corp.test').key).toBe('route:exact.internal:25');
    expect(router([]).route('Example.ORG').key).toBe('mx:example.org');
    expect(router([]).route('example.org').target.description).toBe('mx example.org');
  });

  test('domains sharing a route share its target', () => {
    expect(r.route('corp.test').target).toBe(r.route('mail.corp.test').target);
  });
});
