// "Password checks run in constant time per attempt" (issue 3), checked without a stopwatch: every
// attempt that is not a cache hit runs exactly one real argon2id verification with the same cost
// parameters, whether the account exists, is disabled, has SMTP AUTH off, or the password is wrong.
// The cost of argon2 is set by those parameters, so equal parameters mean equal work. (A cache hit
// needs the right password for an enabled account, so it reveals nothing to a guesser.)
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Authenticator } from '../src/accounts/authenticator.js';
import { hashPassword, verifyPassword } from '../src/accounts/password.js';
import { openStore } from '../src/store/open-store.js';
import type { Store } from '../src/store/store.js';
import { tempDir } from './helpers/temp-dir.js';

const PASSWORD = 'correct-horse-battery';

/** `$argon2id$v=19$m=19456,t=2,p=1$salt$hash` -> `argon2id v=19 m=19456,t=2,p=1`. */
function costOf(phc: string): string {
  const [, algorithm, version, params] = phc.split('$');
  return `${algorithm} ${version} ${params}`;
}

describe('authenticator: the same work for every attempt', () => {
  let store: Store;
  const checks: string[] = [];
  let auth: Authenticator;

  beforeAll(async () => {
    store = await openStore(tempDir());
    const passwordHash = await hashPassword(PASSWORD);
    await store.createAccount({ address: 'printer@example.com', passwordHash });
    await store.createAccount({ address: 'off@example.com', passwordHash });
    await store.updateAccount('off@example.com', { enabled: false });
    await store.createAccount({ address: 'noauth@example.com', passwordHash, smtpAuth: false });
    auth = new Authenticator(store, {
      cacheTtlMs: 60_000,
      verify: (hash, password) => {
        checks.push(costOf(hash));
        return verifyPassword(hash, password);
      },
    });
  });
  afterAll(() => store.close());

  async function attempt(user: string, password: string): Promise<{ outcome: string; verifications: string[] }> {
    checks.length = 0;
    const result = await auth.authenticate(user, password);
    return { outcome: result.ok ? 'ok' : result.reason, verifications: [...checks] };
  }

  it('one argon2id verification with the same parameters, whoever asks', async () => {
    const attempts = {
      unknownAccount: await attempt('nobody@example.com', PASSWORD),
      wrongPassword: await attempt('printer@example.com', 'wrong-password-1'),
      disabledRightPassword: await attempt('off@example.com', PASSWORD),
      disabledWrongPassword: await attempt('off@example.com', 'wrong-password-2'),
      smtpAuthOffRightPassword: await attempt('noauth@example.com', PASSWORD),
      smtpAuthOffWrongPassword: await attempt('noauth@example.com', 'wrong-password-3'),
      rightPassword: await attempt('printer@example.com', PASSWORD),
    };
    expect(Object.fromEntries(Object.entries(attempts).map(([k, v]) => [k, v.outcome]))).toEqual({
      unknownAccount: 'bad_credentials',
      wrongPassword: 'bad_credentials',
      disabledRightPassword: 'account_disabled',
      disabledWrongPassword: 'bad_credentials',
      smtpAuthOffRightPassword: 'smtp_auth_disabled',
      smtpAuthOffWrongPassword: 'bad_credentials',
      rightPassword: 'ok',
    });
    const costs = Object.values(attempts).map((a) => a.verifications);
    for (const c of costs) expect(c).toHaveLength(1);
    expect(new Set(costs.flat())).toEqual(new Set(['argon2id v=19 m=19456,t=2,p=1']));
  });

  it('skips argon2 only for the right password of an enabled account seen within the cache TTL', async () => {
    await attempt('printer@example.com', PASSWORD);
    expect(await attempt('printer@example.com', PASSWORD)).toEqual({ outcome: 'ok', verifications: [] });
    // A wrong guess right after is never served from the cache.
    expect(await attempt('printer@example.com', 'wrong-password-4')).toEqual({ outcome: 'bad_credentials', verifications: ['argon2id v=19 m=19456,t=2,p=1'] });
  });
});
