// Send-as: which addresses an account may put in MAIL FROM and in the From and Sender headers.
// Its own address always; beyond that, the addresses and `*@domain` patterns in its policy.
// Office 365 refuses the rest with "550 5.7.60 SendAsDenied"; so do we.
import type { Account } from '../store/store.js';

export function maySendAs(account: Pick<Account, 'address' | 'policy'>, address: string): boolean {
  const wanted = address.trim().toLowerCase();
  if (wanted === account.address) return true;
  for (const pattern of account.policy.sendAs ?? []) {
    const p = pattern.toLowerCase();
    if (p === wanted) return true;
    if (p.startsWith('*@') && wanted.endsWith(p.slice(1)) && wanted.indexOf('@') === wanted.length - p.length + 1) return true;
  }
  return false;
}

/** True when the recipient's domain is allowed by the account's recipient policy (none = any). */
export function mayMailDomain(account: Pick<Account, 'policy'>, domain: string): boolean {
  const list = account.policy.recipientDomains;
  if (!list || list.length === 0) return true;
  const d = domain.toLowerCase().replace(/\.$/, '');
  return list.some((allowed) => {
    const a = allowed.toLowerCase();
    return a.startsWith('*.') ? d.endsWith(a.slice(1)) : d === a;
  });
}
