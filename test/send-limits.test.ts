// The sliding-window planner behind upstream sending limits (src/delivery/upstreams/send-limits.ts),
// on a clock the test moves: a burst is planned at exactly the allowed rate, a reserved slot
// belongs to its message, several windows combine, and the 80% budget warning fires once.
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import type { DeliveryJob } from '../src/delivery/delivery-target.js';
import { MailboxGate } from '../src/delivery/upstreams/mailbox-gate.js';
import { type BudgetWarning, SendLimits, type WindowLimit } from '../src/delivery/upstreams/send-limits.js';

const MINUTE = 60_000;
const perMinute = (n: number): WindowLimit => ({ label: `${n} messages a minute`, limit: n, windowMs: MINUTE, unit: 'messages' });

/**
 * Sends every queued message as soon as the planner allows, like the queue would (the earliest due
 * first), each arriving `latency` after it went; returns when each went and arrived.
 */
function drain(limits: SendLimits, identity: string, ids: string[], recipients = 1, latency: (id: string) => number = () => 0): { id: string; at: number; arrived: number }[] {
  const sent: { id: string; at: number; arrived: number }[] = [];
  const due = new Map<string, number>(ids.map((id) => [id, 0]));
  // Deliveries under way, settled once the clock passes their arrival.
  const flying: { id: string; arrived: number }[] = [];
  for (let guard = 0; due.size > 0 && guard < 100_000; guard++) {
    const [id, at] = [...due.entries()].sort((a, b) => a[1] - b[1])[0]!;
    for (const f of flying.splice(0)) {
      if (f.arrived <= at) limits.settle(identity, f.id, f.arrived);
      else flying.push(f);
    }
    const admission = limits.admit(identity, id, recipients, at);
    if (admission.go) {
      const arrived = at + latency(id);
      sent.push({ id, at, arrived });
      flying.push({ id, arrived });
      due.delete(id);
    } else {
      expect(admission.at).toBeGreaterThan(at);
      due.set(id, admission.at);
    }
  }
  return sent;
}

/** Most sends in any window of `windowMs` (ending at each send). */
function maxInWindow(times: number[], windowMs: number): number {
  let max = 0;
  for (const t of times) max = Math.max(max, times.filter((s) => s > t - windowMs && s <= t).length);
  return max;
}

describe('send limits', () => {
  it('lets a burst of 100 go at 30 a minute: never more than 30 in any minute, and no slower', () => {
    const limits = new SendLimits([perMinute(30)]);
    const ids = Array.from({ length: 100 }, (_, i) => `q${i}`);
    const sent = drain(limits, 'printer@contoso.com', ids).map((s) => s.at);
    expect(sent).toHaveLength(100);
    expect(maxInWindow(sent, MINUTE)).toBe(30);
    // 30 at once (the limit allows it), then the backlog one every 2 s (a minute / 30).
    expect(sent.filter((t) => t === 0)).toHaveLength(30);
    const backlog = sent.filter((t) => t > 0).sort((a, b) => a - b);
    expect(backlog[0]).toBe(MINUTE);
    for (let i = 1; i < backlog.length; i++) expect(backlog[i]! - backlog[i - 1]!).toBe(2000);
    expect(Math.max(...sent)).toBe(MINUTE + 69 * 2000);
  });

  it('a retried message is a second send: what the provider counted stays counted', () => {
    const limits = new SendLimits([{ label: '10 recipients a day', limit: 10, windowMs: 86_400_000, unit: 'recipients' }]);
    expect(limits.admit('a@x', 'm', 8, 0)).toEqual({ go: true });
    limits.settle('a@x', 'm', 0);
    // One of its recipients was deferred and comes back alone.
    expect(limits.admit('a@x', 'm', 1, 1000)).toEqual({ go: true });
    limits.settle('a@x', 'm', 1000);
    expect(limits.admit('a@x', 'n', 8, 2000)).toMatchObject({ go: false, at: 86_400_000 });
  });

  it('a message sent as several transactions counts as several messages', () => {
    const limits = new SendLimits([perMinute(5)]);
    expect(limits.admit('a@x', 'big', 1200, 0, 3)).toEqual({ go: true });
    limits.settle('a@x', 'big', 0);
    expect(limits.admit('a@x', 'b', 1, 1, 2)).toEqual({ go: true });
    limits.settle('a@x', 'b', 1);
    expect(limits.admit('a@x', 'c', 1, 2)).toMatchObject({ go: false, at: MINUTE });
  });

  it('a cancelled reservation no longer holds later mail back', () => {
    const limits = new SendLimits([perMinute(1)]);
    expect(limits.admit('a@x', '1', 1, 0)).toEqual({ go: true });
    limits.settle('a@x', '1', 0);
    expect(limits.admit('a@x', 'gone', 1, 10)).toMatchObject({ go: false, at: MINUTE });
    limits.cancel('a@x', 'gone');
    expect(limits.admit('a@x', 'next', 1, 20)).toMatchObject({ go: false, at: MINUTE });
    expect(limits.admit('a@x', 'next', 1, MINUTE)).toEqual({ go: true });
  });

  it('keeps a reserved slot for its message: asked early it waits, asked at the slot it goes', () => {
    const limits = new SendLimits([perMinute(1)]);
    expect(limits.admit('a@x', 'first', 1, 0)).toEqual({ go: true });
    limits.settle('a@x', 'first', 0);
    const second = limits.admit('a@x', 'second', 1, 10);
    expect(second).toMatchObject({ go: false, at: MINUTE });
    // Claimed again early (a "queue retry"): still its slot, nobody else's.
    expect(limits.admit('a@x', 'second', 1, 30_000)).toMatchObject({ go: false, at: MINUTE });
    const third = limits.admit('a@x', 'third', 1, 30_000);
    expect(third).toMatchObject({ go: false, at: 2 * MINUTE });
    expect(limits.admit('a@x', 'second', 1, MINUTE)).toEqual({ go: true });
    limits.settle('a@x', 'second', MINUTE);
    expect(limits.admit('a@x', 'third', 1, 2 * MINUTE)).toEqual({ go: true });
  });

  it('keeps mailboxes apart', () => {
    const limits = new SendLimits([perMinute(1)]);
    expect(limits.admit('a@x', '1', 1, 0)).toEqual({ go: true });
    expect(limits.admit('B@x', '2', 1, 0)).toEqual({ go: true });
    limits.settle('b@x', '2', 0);
    expect(limits.admit('b@X', '3', 1, 0)).toMatchObject({ go: false, at: MINUTE });
  });

  it('counts recipients in a recipient window, and combines it with the message window', () => {
    const day = 86_400_000;
    const limits = new SendLimits([
      perMinute(30),
      { label: '100 recipients a day', limit: 100, windowMs: day, unit: 'recipients', budget: true },
    ]);
    // 40 recipients per message: two fit in the day, the third waits for the first to leave it.
    expect(limits.admit('a@x', '1', 40, 0)).toEqual({ go: true });
    limits.settle('a@x', '1', 0);
    expect(limits.admit('a@x', '2', 40, 1000)).toEqual({ go: true });
    limits.settle('a@x', '2', 1000);
    expect(limits.admit('a@x', '3', 40, 2000)).toMatchObject({ go: false, at: day, limit: { unit: 'recipients' } });
  });

  it('warns once when a daily budget reaches 80%, and again after it fell below', () => {
    const warnings: BudgetWarning[] = [];
    const day = 86_400_000;
    const limits = new SendLimits([{ label: '10 recipients a day', limit: 10, windowMs: day, unit: 'recipients', budget: true }], (w) => warnings.push(w));
    const send = (id: string, at: number) => {
      expect(limits.admit('a@x', id, 1, at)).toEqual({ go: true });
      limits.settle('a@x', id, at);
    };
    for (let i = 0; i < 7; i++) send(`m${i}`, i);
    expect(warnings).toHaveLength(0);
    send('m7', 7);
    expect(warnings).toEqual([{ identity: 'a@x', limit: expect.objectContaining({ limit: 10 }), used: 8 }]);
    send('m8', 8);
    expect(warnings).toHaveLength(1);
    // A day later the window is empty: below 80% again, so the next climb warns anew.
    for (let i = 0; i < 8; i++) send(`n${i}`, day + 100 + i);
    expect(warnings).toHaveLength(2);
  });

  it('lets a message with more recipients than the whole limit go alone, when the window is empty', () => {
    const limits = new SendLimits([{ label: '10 recipients a minute', limit: 10, windowMs: MINUTE, unit: 'recipients' }]);
    expect(limits.admit('a@x', 'small', 5, 0)).toEqual({ go: true });
    limits.settle('a@x', 'small', 0);
    expect(limits.admit('a@x', 'huge', 50, 1)).toMatchObject({ go: false, at: MINUTE });
    expect(limits.admit('a@x', 'huge', 50, MINUTE)).toEqual({ go: true });
  });

  it('counts a send from when it reached the provider: a slow first delivery moves the next window', () => {
    const limits = new SendLimits([perMinute(2)]);
    expect(limits.admit('a@x', '1', 1, 0)).toEqual({ go: true });
    expect(limits.admit('a@x', '2', 1, 0)).toEqual({ go: true });
    // Planned while both are in flight: the earliest slot is a minute on.
    expect(limits.admit('a@x', '3', 1, 10)).toMatchObject({ go: false, at: MINUTE + 10 });
    // They arrived at 5 s and 0.1 s: at its slot the third would make 3 in the minute ending
    // then, so it waits for the earlier arrival to leave the window (60.1 s), not longer.
    limits.settle('a@x', '1', 5000);
    limits.settle('a@x', '2', 100);
    const back = limits.admit('a@x', '3', 1, MINUTE + 10);
    expect(back).toMatchObject({ go: false, at: MINUTE + 100 });
    expect(limits.admit('a@x', '3', 1, MINUTE + 100)).toEqual({ go: true });
  });

  it('a message in flight counts until it is settled, whatever the time', () => {
    const limits = new SendLimits([perMinute(1)]);
    expect(limits.admit('a@x', 'slow', 1, 0)).toEqual({ go: true });
    expect(limits.admit('a@x', 'next', 1, 2 * MINUTE)).toMatchObject({ go: false });
    limits.settle('a@x', 'slow', 2 * MINUTE);
    expect(limits.admit('a@x', 'next', 1, 3 * MINUTE)).toEqual({ go: true });
  });

  it('under random delivery latency the arrivals never exceed the limit in any window', () => {
    const limits = new SendLimits([perMinute(30)]);
    let seed = 7;
    const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const latencies = new Map<string, number>();
    const ids = Array.from({ length: 300 }, (_, i) => `q${i}`);
    for (const id of ids) latencies.set(id, Math.floor(random() * 8000));
    const sent = drain(limits, 'a@x', ids, 1, (id) => latencies.get(id)!);
    expect(sent).toHaveLength(300);
    expect(maxInWindow(sent.map((s) => s.arrived).sort((a, b) => a - b), MINUTE)).toBeLessThanOrEqual(30);
    // And not much slower than the limit: 300 at 30 a minute is 9 minutes plus latency.
    expect(Math.max(...sent.map((s) => s.arrived))).toBeLessThan(11 * MINUTE);
  });
});

describe('mailbox gate', () => {
  const job = (queueId: string, expiresAt?: number): DeliveryJob => ({
    queueId,
    sender: 'a@x',
    recipients: [{ index: 0, address: 'r@y' }],
    body: () => Readable.from([]),
    size: 10,
    ...(expiresAt !== undefined ? { expiresAt } : {}),
  });

  it('gives back the slot of a message whose turn comes after it expires, so the mail behind it goes sooner', async () => {
    let now = 0;
    const gate = new MailboxGate({ name: 'm365', mailbox: undefined, limits: [perMinute(1)], log: undefined, now: () => now, events: undefined });
    expect(await gate.turn(job('first'), 'a@x', 1, 1)).toBeUndefined();
    gate.settle('a@x', job('first'));
    // Its turn would be a minute from now; it expires in 30 s: told to wait, slot not kept.
    const expiring = await gate.turn(job('expiring', 30_000), 'a@x', 1, 1);
    expect(expiring?.[0]).toMatchObject({ status: 'deferred', waitUntil: MINUTE });
    // The next message gets the turn the expiring one would have held.
    now = 10;
    const next = await gate.turn(job('next'), 'a@x', 1, 1);
    expect(next?.[0]?.waitUntil).toBe(MINUTE);
  });

  it('keeps the slot of a message that will still be there for it', async () => {
    let now = 0;
    const gate = new MailboxGate({ name: 'm365', mailbox: undefined, limits: [perMinute(1)], log: undefined, now: () => now, events: undefined });
    expect(await gate.turn(job('first'), 'a@x', 1, 1)).toBeUndefined();
    gate.settle('a@x', job('first'));
    expect((await gate.turn(job('second', 10 * MINUTE), 'a@x', 1, 1))?.[0]?.waitUntil).toBe(MINUTE);
    now = 10;
    expect((await gate.turn(job('third'), 'a@x', 1, 1))?.[0]?.waitUntil).toBe(2 * MINUTE);
  });
});
