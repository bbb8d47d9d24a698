// The certificate Postern and the ceilings present. The same kind Postern generates for itself
// (src/intake/tls-material.ts: EC P-256, SHA-256), because the handshake's cost depends on it: an
// RSA-2048 signature costs the server roughly 20 times an ECDSA P-256 one, and the
// new-connection-per-message scenarios do one handshake per message.
//
// selfsigned first. Should its EC path fail (it does when npm hoists a second @peculiar/asn1-x509
// next to the one @peculiar/x509 expects: "Cannot get schema for 'AlgorithmIdentifier' target"),
// the openssl command makes the same EC certificate; without openssl, selfsigned's RSA-2048. The
// result says which, and the report prints it.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { generate } from 'selfsigned';

const SUBJECT = 'postern.bench.test';

export async function writeBenchCertificate(certFile: string, keyFile: string): Promise<string> {
  const now = Date.now();
  const validity = { notBeforeDate: new Date(now - 60_000), notAfterDate: new Date(now + 90 * 86_400_000) };
  const extensions = [
    { name: 'basicConstraints' as const, cA: false },
    { name: 'subjectAltName' as const, altNames: [{ type: 2 as const, value: SUBJECT }] },
  ];
  let ecError: string;
  try {
    const pems = await generate([{ name: 'commonName', value: SUBJECT }], {
      keyType: 'ec',
      curve: 'P-256',
      algorithm: 'sha256',
      ...validity,
      extensions,
    });
    write(certFile, keyFile, pems.cert, pems.private);
    return 'EC P-256 (selfsigned)';
  } catch (err) {
    ecError = (err as Error).message;
  }
  try {
    execFileSync(
      'openssl',
      ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-sha256', '-nodes', '-days', '90',
        '-subj', `/CN=${SUBJECT}`, '-addext', `subjectAltName=DNS:${SUBJECT}`, '-keyout', keyFile, '-out', certFile],
      { stdio: 'ignore', timeout: 30_000 },
    );
    fs.chmodSync(keyFile, 0o600);
    return `EC P-256 (openssl; selfsigned's EC path failed here: ${ecError})`;
  } catch {
    const pems = await generate([{ name: 'commonName', value: SUBJECT }], { keySize: 2048, algorithm: 'sha256', ...validity, extensions });
    write(certFile, keyFile, pems.cert, pems.private);
    return `RSA-2048 (selfsigned; its EC path failed: ${ecError}; no openssl): handshakes cost more than with Postern's EC default`;
  }
}

function write(certFile: string, keyFile: string, cert: string, key: string): void {
  fs.writeFileSync(keyFile, key, { mode: 0o600 });
  fs.writeFileSync(certFile, cert);
}
