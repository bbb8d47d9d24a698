// Secrets named by the configuration (an upstream's password, later OAuth2 client secrets and
// private keys): read once at start-up from a file or an environment variable, never from the
// configuration file itself, and kept in a Secret so that a stray log call, JSON.stringify or
// util.inspect prints "[redacted]" instead of the value. Only reveal() gives the value, and only
// the code that sends it to the upstream calls it.
//
// A secret that cannot be read stops start-up with a ConfigError naming the configuration file,
// the upstream, the secret's file or variable, and the reason; the value never appears in it.
import { createPrivateKey } from 'node:crypto';
import fs from 'node:fs';
import { inspect } from 'node:util';

export class Secret {
  readonly #value: string;
  /** Where it came from, for messages: "file /etc/postern/secrets/isp.pass", "environment variable ISP_PASSWORD". */
  readonly source: string;

  constructor(value: string, source: string) {
    this.#value = value;
    this.source = source;
  }

  reveal(): string {
    return this.#value;
  }

  toString(): string {
    return '[redacted]';
  }

  toJSON(): string {
    return '[redacted]';
  }

  [inspect.custom](): string {
    return `Secret(${this.source})`;
  }
}

/** A problem reading a secret, worded to follow "upstream "isp": ". Never contains the secret. */
export class SecretError extends Error {}

/**
 * The first line of the file, without its line ending (files written with `echo` end in one).
 * A password can hold any other character, spaces included.
 */
export function readSecretFile(file: string, key: string): Secret {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new SecretError(`cannot read ${key} ${file}: ${describeFsError(err as NodeJS.ErrnoException)}`);
  }
  const value = text.replace(/\r?\n[\s\S]*$/, '');
  if (value === '') throw new SecretError(`${key} ${file} is empty (the secret is its first line)`);
  return new Secret(value, `file ${file}`);
}

export function readSecretEnv(name: string, key: string, env: NodeJS.ProcessEnv = process.env): Secret {
  const value = env[name];
  if (value === undefined) throw new SecretError(`${key}: the environment variable ${name} is not set`);
  if (value === '') throw new SecretError(`${key}: the environment variable ${name} is empty`);
  return new Secret(value, `environment variable ${name}`);
}

/** A PEM file of certificates to trust (ca_file): read and checked to hold at least one. */
export function readCertificateFile(file: string, key: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new SecretError(`cannot read ${key} ${file}: ${describeFsError(err as NodeJS.ErrnoException)}`);
  }
  if (!text.includes('-----BEGIN CERTIFICATE-----')) {
    throw new SecretError(`${key} ${file} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`);
  }
  return text;
}

/** A PEM private key (PKCS#8 or PKCS#1, unencrypted), kept as a Secret. */
export function readPrivateKeyFile(file: string, key: string): Secret {
  const text = readText(file, key);
  const pem = /-----BEGIN (RSA |EC )?PRIVATE KEY-----[\s\S]+?-----END (RSA |EC )?PRIVATE KEY-----/.exec(text)?.[0];
  if (!pem) {
    const why = text.includes('ENCRYPTED PRIVATE KEY') ? 'its private key is encrypted; Postern needs it unencrypted (and the file readable by Postern only)' : 'it holds no PEM private key ("-----BEGIN PRIVATE KEY-----")';
    throw new SecretError(`${key} ${file}: ${why}`);
  }
  try {
    createPrivateKey(pem);
  } catch (err) {
    throw new SecretError(`${key} ${file}: the private key cannot be read (${(err as Error).message})`);
  }
  return new Secret(pem, `file ${file}`);
}

export interface ServiceAccountKey {
  clientEmail: string;
  privateKeyId: string;
  privateKey: Secret;
  tokenUri: string;
}

/** A Google service account's JSON key file, as the Cloud console downloads it. */
export function readServiceAccountFile(file: string, key: string): ServiceAccountKey {
  const text = readText(file, key);
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(text) as Record<string, unknown>;
  } catch {
    throw new SecretError(`${key} ${file} is not JSON (expected the service account key file from the Google Cloud console)`);
  }
  if (json.type !== 'service_account') throw new SecretError(`${key} ${file} is not a service account key ("type": "service_account")`);
  const missing = ['client_email', 'private_key', 'private_key_id', 'token_uri'].filter((k) => typeof json[k] !== 'string' || json[k] === '');
  if (missing.length) throw new SecretError(`${key} ${file} lacks ${missing.join(', ')}`);
  try {
    createPrivateKey(json.private_key as string);
  } catch (err) {
    throw new SecretError(`${key} ${file}: its private_key cannot be read (${(err as Error).message})`);
  }
  return {
    clientEmail: json.client_email as string,
    privateKeyId: json.private_key_id as string,
    privateKey: new Secret(json.private_key as string, `file ${file}`),
    tokenUri: json.token_uri as string,
  };
}

function readText(file: string, key: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new SecretError(`cannot read ${key} ${file}: ${describeFsError(err as NodeJS.ErrnoException)}`);
  }
}

function describeFsError(err: NodeJS.ErrnoException): string {
  const reasons: Record<string, string> = {
    ENOENT: 'no such file',
    EACCES: 'permission denied (Postern runs as a user that may not read it)',
    EPERM: 'permission denied',
    EISDIR: 'it is a directory',
    ENOTDIR: 'a part of the path is not a directory',
  };
  return err.code && reasons[err.code] ? `${reasons[err.code]} (${err.code})` : err.message;
}
