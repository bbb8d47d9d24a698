// Certificates for the stand-ins, made fresh each run so no key is ever checked in:
//
//   - a private CA and a server certificate for 127.0.0.1 and the providers' host names, which
//     every stand-in presents; clients trust the CA (Postern's ca_file, nodemailer's tls.ca),
//     so certificate checking stays on, as it is in production;
//   - an RSA certificate for an Entra app registration (client assertions are RS256 or PS256,
//     so the key must be RSA).
//
// EC P-256 for the TLS certificates, as Postern's own certificate: handshakes are cheap, which the
// bench cares about. The CA is also the tests' private CA (test/helpers/upstream-server.ts).
import { generate } from 'selfsigned';

export interface StandInTls {
  /** The CA to trust (PEM). */
  ca: string;
  /** The server certificate and key the stand-ins present (PEM). */
  cert: string;
  key: string;
}

export const STANDIN_HOST_NAMES = [
  '127.0.0.1',
  'localhost',
  'login.microsoftonline.com',
  'smtp.office365.com',
  'oauth2.googleapis.com',
  'smtp.gmail.com',
];

export interface PrivateCa {
  cert: string;
  key: string;
  /** A server certificate signed by this CA for `names` (DNS names and IP addresses). */
  issue(names: string[]): Promise<{ cert: string; key: string }>;
}

/** A private CA valid two days (from a minute ago, for clock skew), the kind an organisation runs. */
export async function makePrivateCa(commonName: string): Promise<PrivateCa> {
  const notBeforeDate = new Date(Date.now() - 60_000);
  const notAfterDate = new Date(Date.now() + 2 * 86_400_000);
  const ca = await generate([{ name: 'commonName', value: commonName }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notBeforeDate,
    notAfterDate,
    extensions: [
      { name: 'basicConstraints', cA: true, critical: true },
      { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    ],
  });
  return {
    cert: ca.cert,
    key: ca.private,
    async issue(names) {
      const leaf = await generate([{ name: 'commonName', value: names[0] ?? 'localhost' }], {
        keyType: 'ec',
        curve: 'P-256',
        algorithm: 'sha256',
        notBeforeDate,
        notAfterDate,
        ca: { key: ca.private, cert: ca.cert },
        extensions: [
          { name: 'basicConstraints', cA: false },
          { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
          { name: 'extKeyUsage', serverAuth: true },
          {
            name: 'subjectAltName',
            altNames: names.map((n) => (/^[\d.]+$|:/.test(n) ? { type: 7 as const, ip: n } : { type: 2 as const, value: n })),
          },
        ],
      });
      return { cert: leaf.cert, key: leaf.private };
    },
  };
}

/** A private CA and one server certificate for `names`, which every stand-in presents. */
export async function makeStandInTls(names: string[] = STANDIN_HOST_NAMES): Promise<StandInTls> {
  const ca = await makePrivateCa('Postern Stand-in CA');
  return { ca: ca.cert, ...(await ca.issue(names)) };
}

/** A self-signed RSA-2048 certificate and its key, as uploaded to an app registration. */
export async function makeAppCertificate(commonName = 'Postern relay'): Promise<{ cert: string; key: string }> {
  const pems = await generate([{ name: 'commonName', value: commonName }], {
    keySize: 2048,
    algorithm: 'sha256',
    notBeforeDate: new Date(Date.now() - 60_000),
    notAfterDate: new Date(Date.now() + 365 * 86_400_000),
  });
  return { cert: pems.cert, key: pems.private };
}
