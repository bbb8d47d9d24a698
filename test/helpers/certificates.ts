// Certificates for tests: self-signed EC pairs with chosen names and validity.
import { generate } from 'selfsigned';

export async function makeCertificate(commonName: string, validFrom: Date, validTo: Date): Promise<{ cert: string; key: string }> {
  const pems = await generate([{ name: 'commonName', value: commonName }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notBeforeDate: validFrom,
    notAfterDate: validTo,
  });
  return { cert: pems.cert, key: pems.private };
}

export const DAY = 86_400_000;
