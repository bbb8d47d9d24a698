// `postern account add|list|show|set|remove`: service accounts for devices and apps. A password is
// shown once, when generated, and otherwise only read from stdin; it is never echoed or logged.
import type { Command } from 'commander';
import { MIN_PASSWORD_LENGTH, generatePassword, hashPassword } from '../accounts/password.js';
import { NetworkList } from '../intake/network-list.js';
import type { Account, AccountLimits, AccountPatch, AccountPolicy } from '../store/store.js';
import { UsageError, actor, formatTime, printJson, printTable, readStdin, withStore } from './cli-context.js';

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
  const p = account.policy;
  return {
    address: account.address,
    smtp_auth: account.smtpAuth,
    enabled: account.enabled,
    send_as: [account.address, ...(p.sendAs ?? [])],
    recipient_domains: p.recipientDomains ?? 'any',
    rewrite_from: p.rewriteFrom ?? false,
    networks: p.networks ?? 'any',
    limits: p.limits ?? {},
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

  const add = account
    .command('add <address>')
    .description('create an account; the password is generated (--generate) or read from stdin (--password-stdin)')
    .option('--generate', 'generate a strong password and print it once')
    .option('--password-stdin', 'read the password from standard input')
    .option('--smtp-auth <on|off>', 'allow SMTP AUTH for this account', 'on');
  withPolicyOptions(add).action(async (address: string, opts: SetOptions & { smtpAuth: string }, cmd: Command) => {
    const addr = requireAddress(address);
    const smtpAuth = parseOnOff(opts.smtpAuth, '--smtp-auth');
    const policy = policyOptionsGiven(opts) ? applyPolicyOptions({}, opts) : undefined;
    const secret = await passwordFromOptions(opts);
    if (!secret) throw new UsageError('give the password with --generate or --password-stdin');
    await withStore(cmd, async (store) => {
      if (await store.getAccount(addr)) throw new UsageError(`account ${addr} already exists (use "postern account set" to change it)`);
      await store.createAccount({ address: addr, passwordHash: await hashPassword(secret.password), smtpAuth, policy });
      await store.recordAudit({ actor: actor(), action: 'account.add', target: addr, detail: { smtp_auth: smtpAuth, ...(policy ? { policy } : {}) } });
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
      const show = (v: unknown): string =>
        typeof v === 'boolean' ? (v ? 'on' : 'off') : Array.isArray(v) ? v.join(', ') : typeof v === 'object' && v ? JSON.stringify(v) : String(v);
      printTable(['FIELD', 'VALUE'], Object.entries(d).map(([k, v]) => [k, show(v)]));
    });

  const set = account
    .command('set <address>')
    .description('change an account: SMTP AUTH flag, enabled flag, password')
    .option('--smtp-auth <on|off>', 'allow or refuse SMTP AUTH for this account')
    .option('--enabled <on|off>', 'enable or disable the account')
    .option('--generate', 'replace the password with a generated one, printed once')
    .option('--password-stdin', 'replace the password with one read from standard input');
  withPolicyOptions(set).action(async (address: string, opts: SetOptions, cmd: Command) => {
      const patch: AccountPatch = {};
      if (opts.smtpAuth !== undefined) patch.smtpAuth = parseOnOff(opts.smtpAuth, '--smtp-auth');
      if (opts.enabled !== undefined) patch.enabled = parseOnOff(opts.enabled, '--enabled');
      const secret = await passwordFromOptions(opts);
      if (secret) patch.passwordHash = await hashPassword(secret.password);
      const policyChanges = policyOptionsGiven(opts);
      if (Object.keys(patch).length === 0 && !policyChanges) {
        throw new UsageError('nothing to change: give --smtp-auth, --enabled, --generate, --password-stdin or a policy option (see --help)');
      }
      const updated = await withStore(cmd, async (store) => {
        const current = await store.getAccount(address);
        if (!current) throw new UsageError(`no account ${address.toLowerCase()}`);
        if (policyChanges) patch.policy = applyPolicyOptions(current.policy, opts);
        const result = await store.updateAccount(address, patch);
        await store.recordAudit({
          actor: actor(),
          action: 'account.set',
          target: current.address,
          detail: {
            ...(patch.smtpAuth !== undefined ? { smtp_auth: patch.smtpAuth } : {}),
            ...(patch.enabled !== undefined ? { enabled: patch.enabled } : {}),
            ...(secret ? { password: 'changed' } : {}),
            ...(patch.policy ? { policy: { before: current.policy, after: patch.policy } } : {}),
          },
        });
        return result;
      });
      const changes = [
        patch.smtpAuth !== undefined ? `SMTP AUTH ${patch.smtpAuth ? 'on' : 'off'}` : null,
        patch.enabled !== undefined ? (patch.enabled ? 'enabled' : 'disabled') : null,
        secret ? 'password changed' : null,
        policyChanges ? 'policy updated' : null,
      ].filter(Boolean);
      process.stdout.write(`Account ${updated!.address}: ${changes.join(', ')}.\n`);
      if (secret?.generated) process.stdout.write(`Password: ${secret.password}\nThis password is shown once.\n`);
  });

  account
    .command('remove <address>')
    .description('delete an account (mail it already sent stays queued)')
    .action(async (address: string, _opts: unknown, cmd: Command) => {
      const removed = await withStore(cmd, async (store) => {
        const done = await store.deleteAccount(address);
        if (done) await store.recordAudit({ actor: actor(), action: 'account.remove', target: address.toLowerCase(), detail: {} });
        return done;
      });
      if (!removed) throw new UsageError(`no account ${address.toLowerCase()}`);
      process.stdout.write(`Account ${address.toLowerCase()} removed.\n`);
    });
}

/** The policy options `add` and `set` share. */
function withPolicyOptions(command: Command): Command {
  return command
    .option('--send-as <list>', 'other addresses or *@domain patterns it may send as, comma-separated ("" for none)')
    .option('--recipient-domains <list>', 'the only recipient domains it may send to, comma-separated ("" for any)')
    .option('--rewrite-from <on|off>', 'replace a From it may not use with its own address (original in Reply-To)')
    .option('--networks <list>', 'the only client networks (CIDR) it may log in from, comma-separated ("" for any)')
    .option('--messages-per-minute <n>', 'its own limit ("default" for the [limits] value)')
    .option('--recipients-per-day <n>', 'its own limit over a rolling 24 hours ("default" for the [limits] value)')
    .option('--max-recipients <n>', 'recipients per message ("default" for the [limits] value)')
    .option('--max-connections <n>', 'connections at once ("default" for the [limits] value)');
}

interface SetOptions {
  smtpAuth?: string;
  enabled?: string;
  generate?: boolean;
  passwordStdin?: boolean;
  sendAs?: string;
  recipientDomains?: string;
  rewriteFrom?: string;
  networks?: string;
  messagesPerMinute?: string;
  recipientsPerDay?: string;
  maxRecipients?: string;
  maxConnections?: string;
}

const LIMIT_OPTIONS = [
  ['messagesPerMinute', 'messagesPerMinute', '--messages-per-minute'],
  ['recipientsPerDay', 'recipientsPerDay', '--recipients-per-day'],
  ['maxRecipients', 'recipientsPerMessage', '--max-recipients'],
  ['maxConnections', 'maxConnections', '--max-connections'],
] as const;

function policyOptionsGiven(opts: SetOptions): boolean {
  return [opts.sendAs, opts.recipientDomains, opts.rewriteFrom, opts.networks, ...LIMIT_OPTIONS.map(([k]) => opts[k])].some(
    (v) => v !== undefined,
  );
}

function list(value: string): string[] {
  return value
    .split(',')
    .map((v) => v.trim().toLowerCase())
    .filter(Boolean);
}

/** The new policy: the current one with the given options applied; "" clears a list. */
function applyPolicyOptions(current: AccountPolicy, opts: SetOptions): AccountPolicy {
  const next: AccountPolicy = { ...current, limits: { ...current.limits } };
  if (opts.sendAs !== undefined) {
    const values = list(opts.sendAs);
    for (const v of values) if (!/^(\*|[^\s@]+)@[^\s@]+\.[^\s@]+$/.test(v)) throw new UsageError(`--send-as: "${v}" is not an address or *@domain`);
    next.sendAs = values.length ? values : undefined;
  }
  if (opts.recipientDomains !== undefined) {
    const values = list(opts.recipientDomains);
    next.recipientDomains = values.length ? values : undefined;
  }
  if (opts.rewriteFrom !== undefined) next.rewriteFrom = parseOnOff(opts.rewriteFrom, '--rewrite-from') || undefined;
  if (opts.networks !== undefined) {
    const values = list(opts.networks);
    try {
      new NetworkList(values);
    } catch {
      throw new UsageError(`--networks: expected networks such as 192.168.1.0/24, got "${opts.networks}"`);
    }
    next.networks = values.length ? values : undefined;
  }
  const limits: AccountLimits = next.limits ?? {};
  for (const [option, key, flag] of LIMIT_OPTIONS) {
    const value = opts[option];
    if (value === undefined) continue;
    if (value === 'default') {
      delete limits[key];
      continue;
    }
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${flag} takes a positive whole number or "default", not "${value}"`);
    limits[key] = n;
  }
  next.limits = Object.keys(limits).length ? limits : undefined;
  return JSON.parse(JSON.stringify(next)) as AccountPolicy;
}
