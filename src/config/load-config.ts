// Finds, parses and validates the configuration. Start-up refuses a bad file with the file name,
// the key and the reason, because a relay that guesses what was meant is a relay that misroutes mail.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse as parseToml } from 'smol-toml';
import type { z } from 'zod';
import { type ListenAddress, type ParsedConfig, configSchema } from './config-schema.js';

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: string[],
  ) {
    super(`${file}: invalid configuration\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

export interface ListenerAddress extends ListenAddress {
  /** Set for the built-in defaults (587/465): the port to use when the default needs privileges. */
  fallbackPort?: number;
}

export interface Config extends Omit<ParsedConfig, 'listen' | 'tls' | 'data_dir' | 'hostname'> {
  /** The file the settings came from, or null for built-in defaults. */
  file: string | null;
  hostname: string;
  dataDir: string;
  listen: {
    submission?: ListenerAddress;
    smtps?: ListenerAddress;
    relay?: ListenerAddress;
    http?: ListenerAddress;
  };
  tls: { certFile: string; keyFile: string };
}

export const DEFAULT_CONFIG_FILE = 'postern.toml';

/**
 * `--config FILE` when given, else ./postern.toml when present, else the built-in defaults.
 */
export function loadConfig(explicitFile?: string, cwd = process.cwd()): Config {
  if (explicitFile) {
    const file = path.resolve(cwd, explicitFile);
    if (!fs.existsSync(file)) throw new ConfigError(file, ['the file does not exist']);
    return parseConfigText(fs.readFileSync(file, 'utf8'), file);
  }
  const implicit = path.resolve(cwd, DEFAULT_CONFIG_FILE);
  if (fs.existsSync(implicit)) return parseConfigText(fs.readFileSync(implicit, 'utf8'), implicit);
  return resolveConfig(configSchema.parse({}), null, cwd);
}

export function parseConfigText(text: string, file: string): Config {
  let raw: unknown;
  try {
    raw = parseToml(text);
  } catch (err) {
    throw new ConfigError(file, [`not valid TOML: ${(err as Error).message.split('\n')[0]}`]);
  }
  const result = configSchema.safeParse(raw);
  if (!result.success) throw new ConfigError(file, describeIssues(result.error));
  return resolveConfig(result.data, file, path.dirname(file));
}

function describeIssues(error: z.ZodError): string[] {
  return error.issues.map((issue) => {
    const key = issue.path.map((p) => (typeof p === 'number' ? `[${p}]` : String(p))).join('.').replace(/\.\[/g, '[');
    if (issue.code === 'unrecognized_keys') {
      const where = key ? `${key}.` : '';
      return issue.keys.map((k) => `${where}${k}: unknown key`).join('; ');
    }
    return `${key || '(top level)'}: ${issue.message}`;
  });
}

function resolveConfig(parsed: ParsedConfig, file: string | null, baseDir: string): Config {
  const dataDir = path.resolve(baseDir, parsed.data_dir);
  const underData = (p: string) => path.resolve(dataDir, p);
  const listen: Config['listen'] = parsed.listen
    ? { ...parsed.listen }
    : {
        // The defaults mimic smtp.office365.com; without privileges they fall back (see listeners).
        submission: { host: '::', port: 587, fallbackPort: 2587 },
        smtps: { host: '::', port: 465, fallbackPort: 2465 },
      };
  const { listen: _l, tls, data_dir: _d, hostname, upstream, ...rest } = parsed;
  return {
    ...rest,
    upstream: upstream.map((u) => resolveFileKeys(u, baseDir)),
    file,
    hostname: hostname ?? os.hostname(),
    dataDir,
    listen,
    tls: { certFile: underData(tls.cert), keyFile: underData(tls.key) },
  };
}

/**
 * An upstream's files (`password_file`, `ca_file`, and whatever `*_file` later kinds add) are
 * relative to the configuration file's directory, where secrets/ usually sits next to it.
 */
function resolveFileKeys<T extends object>(table: T, baseDir: string): T {
  const out = { ...table } as Record<string, unknown>;
  for (const [key, value] of Object.entries(out)) {
    if (key.endsWith('_file') && typeof value === 'string') out[key] = path.resolve(baseDir, value);
  }
  return out as unknown as T;
}
