// `postern account add|list|show|set|remove`: service accounts for devices and apps. A password is
// shown once, when generated, and otherwise only read from stdin; it is never echoed or logged.
import type { Command } from 'commander';
import { MIN_PASSWORD_LENGTH, generatePassword, hashPassword } from '../accounts/password.js';
import type { Account, AccountPatch } from '../store/store.js';
import { UsageError, formatTime, printJson, printTable, readStdin, withStore } from './cli-context.js';

const ADDRESS = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;

function parseOnOff(value: string, flag: string): boolean {
  const v = value.toLowerCase();
  if (['on', 'yes', 'true', '1', 'enabled'].includes(v)) return true;
  if (['off', 'no', 'false', '0', 'disabled'].includes(v)) return false;
  throw new UsageError(`${flag} takes "on" or "off", not "${value}"`);
}

async function passwordFromOptions(opts: { generate?: boolean; passwordStdin?: boolean }): Promise<{ password: string; generated: boolean } | null> {
  if (opts.generate && opts.passwordStdin) throw new UsageError('choose one of --generate and --password-stdin');
  if (opts.generate) return { password: generatePassword(), generated: true };
  if (opts.passwordStdin) {
    const password = (await readStdin()).replace(/\r?\n$/, '');
    if (password.length < MIN_PASSWORD_LENGTH) {
      throw new UsageError(`the password from stdin is too short: at least ${MIN_PASSWORD_LENGTH} characters`);
    }
    return { password, generated: false };
  }
  return null;
}

function describe(account: Account) {
  return {
    address: account.address,
    smtp_auth: account.smtpAuth,
    enabled: account.enabled,
    created: new Date(account.createdAt).toISOString(),
    updated: new Date(account.updatedAt).toISOString(),
  };
}

function requireAddress(address: string): string {
  if (!ADDRESS.test(address)) throw new UsageError(`"${address}" is not an email address (the account is identified by the address it sends as)`);
  return address.toLowerCase();
}

export function registerAccountCommands(program: Command): void {
  const account = program.command('account').description('manage the service accounts devices and apps log in with');

  account
    .command('add <address>')
    .description('create an account; the password is generated (--generate) or read from stdin (--password-stdin)')
    .option('--generate', 'generate a strong password and print it once')
    .option('--password-stdin', 'read the password from standard input')
    .option('--smtp-auth <on|off>', 'allow SMTP AUTH for this account', 'on')
    .action(async (address: string, opts: { generate?: boolean; passwordStdin?: boolean; smtpAuth: string }, cmd: Command) => {
      const addr = requireAddress(address);
      const smtpAuth = parseOnOff(opts.smtpAuth, '--smtp-auth');
      const secret = await passwordFromOptions(opts);
      if (!secret) throw new UsageError('give the password with --generate or --password-stdin');
      await withStore(cmd, async (store) => {
        if (await store.getAccount(addr)) throw new UsageError(`account ${addr} already exists (use "postern account set" to change it)`);
        await store.createAccount({ address: addr, passwordHash: await hashPassword(secret.password), smtpAuth });
      });
      process.stdout.write(`Account ${addr} created (SMTP AUTH ${smtpAuth ? 'on' : 'off'}).\n`);
      if (secret.generated) {
        process.stdout.write(`Password: ${secret.password}\nThis password is shown once. Configure the device now: username ${addr}, this password, STARTTLS on port 587.\n`);
      }
    });

  account
    .command('list')
    .description('list accounts')
    .option('--json', 'machine-readable output')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const accounts = await withStore(cmd, (store) => store.listAccounts());
      if (opts.json) return printJson(accounts.map(describe));
      if (accounts.length === 0) {
        process.stdout.write('No accounts yet. Add one: postern account add printer@example.com --generate\n');
        return;
      }
      printTable(
        ['ADDRESS', 'SMTP AUTH', 'ENABLED', 'CREATED'],
        accounts.map((a) => [a.address, a.smtpAuth ? 'on' : 'off', a.enabled ? 'yes' : 'no', formatTime(a.createdAt)]),
      );
    });

  account
    .command('show <address>')
    .description('show one account')
    .option('--json', 'machine-readable output')
    .action(async (address: string, opts: { json?: boolean }, cmd: Command) => {
      const found = await withStore(cmd, (store) => store.getAccount(address));
      if (!found) throw new UsageError(`no account ${address.toLowerCase()}`);
      const d = describe(found);
      if (opts.json) return printJson(d);
      printTable(['FIELD', 'VALUE'], Object.entries(d).map(([k, v]) => [k, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)]));
    });

  account
    .command('set <address>')
    .description('change an account: SMTP AUTH flag, enabled flag, password')
    .option('--smtp-auth <on|off>', 'allow or refuse SMTP AUTH for this account')
    .option('--enabled <on|off>', 'enable or disable the account')
    .option('--generate', 'replace the password with a generated one, printed once')
    .option('--password-stdin', 'replace the password with one read from standard input')
    .action(
      async (
        address: string,
        opts: { smtpAuth?: string; enabled?: string; generate?: boolean; passwordStdin?: boolean },
        cmd: Command,
      ) => {
        const patch: AccountPatch = {};
        if (opts.smtpAuth !== undefined) patch.smtpAuth = parseOnOff(opts.smtpAuth, '--smtp-auth');
        if (opts.enabled !== undefined) patch.enabled = parseOnOff(opts.enabled, '--enabled');
        const secret = await passwordFromOptions(opts);
        if (secret) patch.passwordHash = await hashPassword(secret.password);
        if (Object.keys(patch).length === 0) throw new UsageError('nothing to change: give --smtp-auth, --enabled, --generate or --password-stdin');
        const updated = await withStore(cmd, async (store) => {
          if (!(await store.getAccount(address))) throw new UsageError(`no account ${address.toLowerCase()}`);
          return store.updateAccount(address, patch);
        });
        const changes = [
          patch.smtpAuth !== undefined ? `SMTP AUTH ${patch.smtpAuth ? 'on' : 'off'}` : null,
          patch.enabled !== undefined ? (patch.enabled ? 'enabled' : 'disabled') : null,
          secret ? 'password changed' : null,
        ].filter(Boolean);
        process.stdout.write(`Account ${updated!.address}: ${changes.join(', ')}.\n`);
        if (secret?.generated) process.stdout.write(`Password: ${secret.password}\nThis password is shown once.\n`);
      },
    );

  account
    .command('remove <address>')
    .description('delete an account (mail it already sent stays queued)')
    .action(async (address: string, _opts: unknown, cmd: Command) => {
      const removed = await withStore(cmd, (store) => store.deleteAccount(address));
      if (!removed) throw new UsageError(`no account ${address.toLowerCase()}`);
      process.stdout.write(`Account ${address.toLowerCase()} removed.\n`);
    });
}
