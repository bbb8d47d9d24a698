// Service-account passwords: argon2id hashes only (OWASP's parameters: 19 MiB, 2 passes), and a
// generator for strong passwords that survive being typed into a printer's web form.
import { randomInt } from 'node:crypto';
import { Algorithm, hash, verify } from '@node-rs/argon2';

const ARGON2_OPTIONS = { algorithm: Algorithm.Argon2id, memoryCost: 19456, timeCost: 2, parallelism: 1 } as const;

/** Letters and digits without look-alikes (0/O, 1/l/I): read off a screen, typed on a keypad. */
const ALPHABET = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789';

// Microsoft 365's default minimum, so a printer's existing password can move over as it is.
export const MIN_PASSWORD_LENGTH = 8;

export function hashPassword(password: string): Promise<string> {
  return hash(password, ARGON2_OPTIONS);
}

export async function verifyPassword(passwordHash: string, password: string): Promise<boolean> {
  try {
    return await verify(passwordHash, password);
  } catch {
    return false;
  }
}

/** 24 characters from a 57-symbol alphabet: about 140 bits. */
export function generatePassword(length = 24): string {
  let out = '';
  for (let i = 0; i < length; i++) out += ALPHABET[randomInt(ALPHABET.length)];
  return out;
}

/** A hash of a random password, verified against when the account does not exist so both paths cost the same. */
let decoyHash: Promise<string> | undefined;
export function decoyPasswordHash(): Promise<string> {
  decoyHash ??= hashPassword(generatePassword());
  return decoyHash;
}
