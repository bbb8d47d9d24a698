// Which reply a storage failure deserves. The intake writes a message in two places, the spool file
// (fs errors: ENOSPC, EDQUOT, EIO...) and the SQLite store (SqliteError codes: SQLITE_FULL,
// SQLITE_BUSY, SQLITE_IOERR_...). The client gets a 4xx either way; the codes say which:
//
//   full   ENOSPC, EDQUOT, SQLITE_FULL           -> 452 4.3.1 INSUFFICIENT_STORAGE (Postfix's reply)
//   busy   SQLITE_BUSY*, SQLITE_LOCKED*           -> 451 4.3.0 STORE_BUSY (another process holds the lock)
//   other  anything else (EIO, SQLITE_IOERR, ...) -> 451 4.3.0 QUEUE_UNAVAILABLE
import { type SmtpReplyError, smtpError } from './smtp-errors.js';

export type StorageFault = 'full' | 'busy' | 'other';

const FULL = new Set(['ENOSPC', 'EDQUOT', 'SQLITE_FULL']);

/** Classifies an error from the spool or the store (or one wrapping it as `cause`). */
export function storageFault(err: unknown): StorageFault {
  for (let e = err, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code !== 'string') continue;
    if (FULL.has(code)) return 'full';
    if (/^SQLITE_(BUSY|LOCKED)(_|$)/.test(code)) return 'busy';
  }
  return 'other';
}

/** The reply for a message that could not be written (nothing of it is kept). */
export function storageReply(err: unknown): SmtpReplyError {
  const fault = storageFault(err);
  return smtpError(fault === 'full' ? 'INSUFFICIENT_STORAGE' : fault === 'busy' ? 'STORE_BUSY' : 'QUEUE_UNAVAILABLE');
}
