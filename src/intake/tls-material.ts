// The certificate the listeners present. When the configured files do not exist, a self-signed
// one is generated on first start (EC P-256, valid two years) so STARTTLS works out of the box;
// devices that verify certificates need a real one, and the start-up summary says so.
import fs from 'node:fs';
import path from 'node:path';
import { X509Certificate, createPrivateKey } from 'node:crypto';

export interface TlsMaterial {
  cert: string;
  key: string;
  generated: boolean;
  subject: string;
  validTo: Date;
}

export async function loadOrCreateTlsMaterial(certFile: string, keyFile: string, hostname: string): Promise<TlsMaterial> {
  const haveCert = fs.existsSync(certFile);
  const haveKey = fs.existsSync(keyFile);
  let generated = false;
  if (!haveCert && !haveKey) {
    const now = new Date();
    // Loaded only here: selfsigned and its ASN.1 stack weigh ~10 MB of memory for a one-off job.
    const { generate } = await import('selfsigned');
    const pems = await generate([{ name: 'commonName', value: hostname }], {
      keyType: 'ec',
      curve: 'P-256',
      algorithm: 'sha256',
      notBeforeDate: new Date(now.getTime() - 60_000),
      notAfterDate: new Date(now.getTime() + 2 * 365 * 86_400_000),
      extensions: [
        { name: 'basicConstraints', cA: false },
        { name: 'subjectAltName', altNames: [{ type: 2, value: hostname }] },
      ],
    });
    fs.mkdirSync(path.dirname(certFile), { recursive: true, mode: 0o700 });
    fs.mkdirSync(path.dirname(keyFile), { recursive: true, mode: 0o700 });
    fs.writeFileSync(keyFile, pems.private, { mode: 0o600 });
    fs.writeFileSync(certFile, pems.cert, { mode: 0o644 });
    generated = true;
  } else if (!haveCert || !haveKey) {
    throw new Error(
      `TLS: ${haveCert ? keyFile : certFile} is missing while ${haveCert ? certFile : keyFile} exists; provide both files (or neither, to generate a self-signed pair)`,
    );
  }
  return { ...loadTlsMaterial(certFile, keyFile), generated };
}

/** Days before expiry from which start-up and reloads warn. */
export const EXPIRY_WARNING_DAYS = 14;

/**
 * Reads and checks a certificate and its key: PEM, matching, not expired. Throws an Error naming
 * the file and the problem, which start-up prints and a reload logs (keeping the old pair).
 */
export function loadTlsMaterial(certFile: string, keyFile: string, now = new Date()): Omit<TlsMaterial, 'generated'> {
  const cert = fs.readFileSync(certFile, 'utf8');
  const key = fs.readFileSync(keyFile, 'utf8');
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (err) {
    throw new Error(`TLS: ${certFile} is not a PEM certificate: ${(err as Error).message}`);
  }
  if (!x509.checkPrivateKey(parseKey(key, keyFile))) {
    throw new Error(`TLS: the key in ${keyFile} does not belong to the certificate in ${certFile}`);
  }
  const validTo = new Date(x509.validTo);
  if (validTo.getTime() <= now.getTime()) {
    throw new Error(
      `TLS: the certificate in ${certFile} expired on ${validTo.toISOString().slice(0, 10)}; install a renewed one (or remove both files to generate a self-signed pair)`,
    );
  }
  if (new Date(x509.validFrom).getTime() > now.getTime()) {
    throw new Error(`TLS: the certificate in ${certFile} is not valid before ${new Date(x509.validFrom).toISOString()}`);
  }
  return { cert, key, subject: x509.subject.replace(/\n/g, ', '), validTo };
}

/** Whole days left, when fewer than EXPIRY_WARNING_DAYS; otherwise null. */
export function expiresSoon(material: Pick<TlsMaterial, 'validTo'>, now = new Date()): number | null {
  const days = Math.floor((material.validTo.getTime() - now.getTime()) / 86_400_000);
  return days < EXPIRY_WARNING_DAYS ? days : null;
}

function parseKey(pem: string, file: string) {
  try {
    return createPrivateKey(pem);
  } catch (err) {
    throw new Error(`TLS: ${file} is not a PEM private key: ${(err as Error).message}`);
  }
}
