// Queue ids: time-ordered (so `queue list` and spool listings sort by arrival) and unguessable.
//
// The random part comes from randomUUID, which Node serves from a cache it refills 128 ids at a
// time: randomBytes went to OpenSSL on every call, 2% of the intake's CPU under load (two calls per
// message, with the Message-ID).
import { randomUUID } from 'node:crypto';

export function newQueueId(now = Date.now()): string {
  // The first 8 hex digits of a version 4 UUID and the two after its dash are all random: 40 bits.
  const random = randomUUID();
  return now.toString(36).toUpperCase().padStart(9, '0') + (random.slice(0, 8) + random.slice(9, 11)).toUpperCase();
}
