// Configuration: the example works as written; every mistake names the file, key and why.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, parseConfigText } from '../src/config/load-config.js';
import { deliversInThread } from '../src/queue/delivery-thread.js';
import { tempDir } from './helpers/temp-dir.js';

export const EXAMPLE = `hostname = "relay.example.test"      # banner and EHLO name
data_dir = "./data"                  # store, spool, generated keys

[listen]
submission = "127.0.0.1:2587"        # STARTTLS, AUTH required, AUTH offered only after TLS
smtps      = "127.0.0.1:2465"        # implicit TLS, AUTH required
relay      = "127.0.0.1:2525"        # port-25 style: connectors only
http       = "127.0.0.1:8025"        # admin API, console, /metrics, /healthz (later issues)

[tls]
cert = "tls/cert.pem"                # relative paths are under data_dir; generated if absent
key  = "tls/key.pem"

[delivery]
dns_servers = ["127.0.0.1:5353"]     # default: the system's resolvers

[[route]]
domains = ["example.test"]           # recipient domains this route serves, instead of MX
host = "127.0.0.1"
port = 2526
tls  = "none"                        # none | opportunistic | required

[[connector]]
name = "printers"
networks = ["127.0.0.0/8", "192.168.1.0/24"]
`;

function problems(text: string): string[] {
  try {
    parseConfigText(text, '/etc/postern/postern.toml');
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).message).toContain('/etc/postern/postern.toml');
    return (err as ConfigError).problems;
  }
  throw new Error('expected a ConfigError');
}

describe('configuration', () => {
  it("parses the issue's example as written", () => {
    const config = parseConfigText(EXAMPLE, '/srv/postern/postern.toml');
    expect(config.hostname).toBe('relay.example.test');
    expect(config.dataDir).toBe('/srv/postern/data');
    expect(config.listen.submission).toEqual({ host: '127.0.0.1', port: 2587 });
    expect(config.listen.smtps).toEqual({ host: '127.0.0.1', port: 2465 });
    expect(config.listen.relay).toEqual({ host: '127.0.0.1', port: 2525 });
    expect(config.listen.http).toEqual({ host: '127.0.0.1', port: 8025 });
    expect(config.tls.certFile).toBe('/srv/postern/data/tls/cert.pem');
    expect(config.delivery.dns_servers).toEqual([{ host: '127.0.0.1', port: 5353 }]);
    expect(config.route).toEqual([{ domains: ['example.test'], host: '127.0.0.1', port: 2526, tls: 'none' }]);
    expect(config.connector[0]?.networks).toEqual(['127.0.0.0/8', '192.168.1.0/24']);
    // Defaults from the issue.
    expect(config.limits.max_message_size).toBe(35 * 1024 * 1024);
    expect(config.limits.max_recipients).toBe(500);
    expect(config.limits.idle_timeout).toBe(5 * 60_000);
    expect(config.queue.lifetime).toBe(5 * 86_400_000);
    expect(config.queue.max_retry_interval).toBe(3_600_000);
  });

  it('uses 587 and 465 with fallbacks when no file exists', () => {
    const dir = tempDir();
    const config = loadConfig(undefined, dir);
    expect(config.file).toBeNull();
    expect(config.listen.submission).toEqual({ host: '::', port: 587, fallbackPort: 2587 });
    expect(config.listen.smtps).toEqual({ host: '::', port: 465, fallbackPort: 2465 });
    expect(config.listen.relay).toBeUndefined();
    expect(config.dataDir).toBe(path.join(dir, 'data'));
  });

  it('reads ./postern.toml when present, and --config over it', () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'postern.toml'), 'hostname = "implicit.example"\n');
    fs.writeFileSync(path.join(dir, 'other.toml'), 'hostname = "explicit.example"\n');
    expect(loadConfig(undefined, dir).hostname).toBe('implicit.example');
    expect(loadConfig('other.toml', dir).hostname).toBe('explicit.example');
    expect(() => loadConfig('missing.toml', dir)).toThrow(/missing\.toml: invalid configuration\n {2}- the file does not exist/);
  });

  it('names an unknown key, top level or nested', () => {
    expect(problems('hostnme = "x"\n')).toEqual(['hostnme: unknown key']);
    expect(problems('[listen]\nsubmision = "127.0.0.1:2587"\n')).toEqual(['listen.submision: unknown key']);
    expect(problems('[[route]]\ndomains = ["a.example"]\nhost = "h"\nprot = 25\n')).toEqual(['route[0].prot: unknown key']);
  });

  it('names a bad value and says why', () => {
    expect(problems('[listen]\nsubmission = "localhost"\n')).toEqual([
      'listen.submission: expected "host:port" (for example "127.0.0.1:2587" or ":587"), got "localhost"',
    ]);
    expect(problems('[[connector]]\nname = "x"\nnetworks = ["10.0.0.0/33"]\n')[0]).toMatch(
      /^connector\[0\]\.networks\[0\]: expected an IP network/,
    );
    expect(problems('[[route]]\ndomains = ["a.example"]\nhost = "h"\ntls = "sometimes"\n')[0]).toMatch(/^route\[0\]\.tls: /);
    expect(problems('[limits]\nmax_recipients = "lots"\n')[0]).toMatch(/^limits\.max_recipients: .*number/);
    expect(problems('[queue]\nlifetime = "5 days"\n')[0]).toMatch(/^queue\.lifetime: expected a duration/);
    expect(problems('[queue]\nretention = "7d"\n')).toEqual(['queue.retention: must be at least "8d": the volume alerts compare the last day of mail in the store with the 7 days before it']);
    expect(parseConfigText('[queue]\nretention = "8d"\n', '/etc/postern/postern.toml').queue.retention).toBe(8 * 86_400_000);
    expect(problems('[policy]\nsecurity_events_retention = "12h"\n')).toEqual([
      'policy.security_events_retention: must be at least "1d": `postern security events` is how a person finds out what happened yesterday',
    ]);
    expect(parseConfigText('[policy]\nsecurity_events_retention = "30d"\n', '/etc/postern/postern.toml').policy.security_events_retention).toBe(30 * 86_400_000);
    expect(parseConfigText('', '/etc/postern/postern.toml').policy.security_events_retention).toBe(90 * 86_400_000);
  });

  it('names an unknown key in an upstream or a routing rule (the tables are strict too)', () => {
    const isp = '[[upstream]]\nname = "isp"\ntype = "smtp"\nhost = "mail.isp.test"\n';
    expect(problems(`${isp}pasword_file = "p"\n`)).toEqual(['upstream[0].pasword_file: unknown key']);
    expect(problems(`${isp}[[upstream_route]]\nupstream = "isp"\ndefualt = true\n`)).toEqual([
      'upstream_route[0].defualt: unknown key',
      'upstream_route[0]: give one of sender_domains, accounts, recipient_domains or default = true',
    ]);
    expect(problems(`${isp}port = 99999\n`)[0]).toMatch(/^upstream\[0\]\.port: /);
    expect(problems(`${isp}username = "u"\n`)).toEqual(['upstream[0].username: a username needs password_file or password_env']);
  });

  it('[delivery] thread: "auto" by default, a thread of its own from two cores; true and false decide outright', () => {
    const thread = (text: string) => parseConfigText(text, '/etc/postern/postern.toml').delivery.thread;
    expect(thread('')).toBe('auto');
    expect([deliversInThread('auto', 1), deliversInThread('auto', 2), deliversInThread(true, 1), deliversInThread(false, 8)]).toEqual([false, true, true, false]);
    expect(thread('[delivery]\nthread = false\n')).toBe(false);
    expect(problems('[delivery]\nthread = "yes"\n')).toEqual(['delivery.thread: expected true, false or "auto"']);
  });

  it('[delivery] thread_priority: "low" by default, "normal" on request, nothing else', () => {
    const priority = (text: string) => parseConfigText(text, '/etc/postern/postern.toml').delivery.thread_priority;
    expect(priority('')).toBe('low');
    expect(priority('[delivery]\nthread_priority = "normal"\n')).toBe('normal');
    expect(problems('[delivery]\nthread_priority = "high"\n')).toHaveLength(1);
    expect(problems('[delivery]\nthread_priority = "high"\n')[0]).toMatch(/^delivery\.thread_priority: .*"low".*"normal"/);
  });

  it('reports TOML syntax errors with the file name', () => {
    expect(problems('hostname = \n')[0]).toMatch(/^not valid TOML: /);
  });
});

describe('README', () => {
  it('shows only configuration that parses', () => {
    const readme = fs.readFileSync('README.md', 'utf8');
    const blocks = [...readme.matchAll(/```toml\n([\s\S]*?)```/g)].map((m) => m[1]!);
    expect(blocks.length).toBeGreaterThanOrEqual(2);
    for (const block of blocks) expect(() => parseConfigText(block, '/srv/postern/postern.toml')).not.toThrow();
  });
});
