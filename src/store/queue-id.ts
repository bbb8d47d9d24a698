// Queue ids: time-ordered (so `queue list` and spool listings sort by arrival) and unguessable.
import { randomBytes } from 'node:crypto';

export function newQueueId(now = Date.now()): string {
  return now.toString(36).toUpperCase().padStart(9, '0') + randomBytes(5).toString('hex').toUpperCase();
}
