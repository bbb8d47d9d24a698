// The Microsoft 365 upstream under its limits: 1,000 messages from one device through Postern to
// the Exchange Online stand-in (src/standins/), over XOAUTH2 with a token from the Entra stand-in.
// Exchange allows a mailbox 30 messages a minute; here every window is 100 times shorter on both
// sides (Postern's `time_scale = 0.01`, the stand-in's 600 ms window), so the run takes about 20 s
// instead of 33 minutes and the limit is 50 messages a second.
//
// Figures: how many messages arrived, how many Postern deferred or failed, how many the stand-in
// counted over its limits (messages per window, connections, recipients), and the achieved rate
// against the limit. The rate leaves out the first window's burst (the limit allows it at once):
// (arrived - limit) / (last arrival - first arrival), which is the limit exactly when every later
// window is full and no fuller.
import fs from 'node:fs';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { Office365SmtpStandIn } from '../standins/office365-smtp.js';
import { IdentityStandIn } from '../standins/identity-platform.js';
import { makeStandInTls } from '../standins/standin-certificates.js';
import { BENCH_SENDER } from './bench-message.js';
import { PosternProcess, type PosternSettings } from './postern-process.js';

export interface UpstreamBenchFigures {
  messages: number;
  /** Messages per window and the window, as the stand-in enforces them (scaled). */
  limit: { messages: number; windowMs: number; timeScale: number };
  arrived: number;
  deferred: number;
  failed: number;
  /** Messages Postern held back for their turn ("waiting" log lines; one message may wait twice). */
  waits: number;
  violations: { connections: number; messages: number; recipients: number };
  maxConcurrentConnections: number;
  tokenRequests: number;
  /** First to last arrival at the stand-in. */
  spanMs: number;
  achievedPerSecond: number;
  limitPerSecond: number;
  /** achieved / limit. */
  ratio: number;
  /**
   * Arrival gap between each message and the one `limit` messages later, less the window: how late
   * each window starts (median and 90th percentile, ms). Postern counts a send from when its
   * delivery finished, so each window starts at least one delivery time late.
   */
  windowLateMs: { p50: number; p90: number; max: number };
  /** Submitting the 1,000 messages to Postern (all accepted before most have left). */
  submitMs: number;
}

const TENANT = 'bench.onmicrosoft.com';
const CLIENT_ID = '00000000-0000-4000-8000-00000000be00';
const SECRET = 'bench-client-secret-value';
const WINDOW_MS = 600;
const PER_WINDOW = 30;
const TIME_SCALE = 0.01;

export async function runUpstreamBench(
  base: Omit<PosternSettings, 'dir' | 'extraConfig'> & { dir: string },
  account: { user: string; pass: string },
  messages = 1000,
  say: (line: string) => void = () => {},
): Promise<UpstreamBenchFigures> {
  const dir = path.join(base.dir, 'upstream');
  fs.mkdirSync(dir, { recursive: true });
  const tls = await makeStandInTls();
  const identity = new IdentityStandIn({ certificate: tls });
  await identity.start();
  identity.registerApp({ tenant: TENANT, clientId: CLIENT_ID, clientSecret: SECRET });
  const exchange = new Office365SmtpStandIn({
    certificate: tls,
    identity,
    mailboxes: [account.user],
    limits: { messagesPerWindow: PER_WINDOW, windowMs: WINDOW_MS, connectionsPerMailbox: 3, recipientsPerDay: 10_000 },
  });
  await exchange.start();
  fs.writeFileSync(path.join(dir, 'ca.pem'), tls.ca);
  fs.writeFileSync(path.join(dir, 'm365.secret'), `${SECRET}\n`, { mode: 0o600 });

  const extraConfig = `
[[upstream]]
name = "m365"
type = "microsoft365"
tenant = "${TENANT}"
client_id = "${CLIENT_ID}"
client_secret_file = "m365.secret"
authority = "${identity.url}"
smtp = "127.0.0.1:${exchange.port}"
ca_file = "ca.pem"
[upstream.limits]
time_scale = ${TIME_SCALE}

[[upstream_route]]
upstream = "m365"
default = true
`;
  let postern: PosternProcess | undefined;
  try {
    postern = await PosternProcess.start({ ...base, dir, extraConfig }, account);
    say(`upstream bench: Postern pid ${postern.pid}, Exchange stand-in ${exchange.port}, ${messages} messages`);
    const transport = nodemailer.createTransport({
      host: '127.0.0.1',
      port: postern.ports.submission,
      secure: false,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: account.user, pass: account.pass },
      pool: true,
      maxConnections: 10,
      maxMessages: Infinity,
    });
    const started = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: 10 }, async () => {
        while (next < messages) {
          const i = next++;
          await transport.sendMail({
            envelope: { from: BENCH_SENDER, to: [`r${i}@fabrikam.bench`] },
            raw: `From: <${BENCH_SENDER}>\r\nTo: <r${i}@fabrikam.bench>\r\nSubject: upstream bench ${i}\r\n\r\nMessage ${i}.\r\n`,
          });
        }
      }),
    );
    const submitMs = performance.now() - started;
    transport.close();
    // At 50 a second, 1,000 take 20 s; allow three times that before calling it stuck.
    const deadline = Date.now() + (messages / (PER_WINDOW / WINDOW_MS)) * 3 + 10_000;
    while (exchange.messages.length < messages && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const events = countEvents(postern.logFile);
    const arrivals = exchange.messages.map((m) => m.receivedAt).sort((a, b) => a - b);
    const spanMs = arrivals.length > 1 ? arrivals.at(-1)! - arrivals[0]! : 0;
    const limitPerSecond = (PER_WINDOW / WINDOW_MS) * 1000;
    const achievedPerSecond = spanMs > 0 ? ((arrivals.length - PER_WINDOW) / spanMs) * 1000 : 0;
    const late = arrivals.slice(PER_WINDOW).map((t, i) => t - arrivals[i]! - WINDOW_MS).sort((a, b) => a - b);
    const at = (p: number) => (late.length ? late[Math.min(late.length - 1, Math.floor(p * late.length))]! : 0);
    return {
      messages,
      limit: { messages: PER_WINDOW, windowMs: WINDOW_MS, timeScale: TIME_SCALE },
      arrived: arrivals.length,
      deferred: events.deferred ?? 0,
      failed: (events.failed ?? 0) + (events.expired ?? 0),
      waits: events.waiting ?? 0,
      violations: { ...exchange.violations },
      maxConcurrentConnections: Math.max(0, ...Object.values(exchange.maxConcurrent)),
      tokenRequests: identity.requests.length,
      spanMs,
      achievedPerSecond,
      limitPerSecond,
      ratio: achievedPerSecond / limitPerSecond,
      windowLateMs: { p50: at(0.5), p90: at(0.9), max: late.at(-1) ?? 0 },
      submitMs,
    };
  } finally {
    await postern?.stop();
    await exchange.close();
    await identity.close();
  }
}

/** Delivery log events by name ("delivered", "deferred", "waiting"...), from Postern's JSON log. */
function countEvents(logFile: string): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
    const m = /"event":"(delivered|deferred|failed|expired|waiting)"/.exec(line);
    if (m) counts[m[1]!] = (counts[m[1]!] ?? 0) + 1;
  }
  return counts;
}

export function formatUpstreamFigures(f: UpstreamBenchFigures): string {
  const v = f.violations;
  return [
    `Microsoft 365 upstream (stand-in, windows x${f.limit.timeScale}: ${f.limit.messages} messages per ${f.limit.windowMs} ms, 3 connections):`,
    `  ${f.messages} submitted in ${(f.submitMs / 1000).toFixed(1)} s; ${f.arrived} arrived, ${f.deferred} deferred, ${f.failed} failed; ${f.waits} waits for a slot`,
    `  over the limit at the stand-in: ${v.messages} messages, ${v.connections} connections, ${v.recipients} recipients; most connections at once ${f.maxConcurrentConnections}; ${f.tokenRequests} token request(s)`,
    `  achieved ${f.achievedPerSecond.toFixed(1)}/s against a limit of ${f.limitPerSecond.toFixed(1)}/s = ${(f.ratio * 100).toFixed(1)}% (first to last arrival ${(f.spanMs / 1000).toFixed(1)} s)`,
    `  each message arrived ${f.windowLateMs.p50.toFixed(0)} ms (median; p90 ${f.windowLateMs.p90.toFixed(0)} ms, at most ${f.windowLateMs.max.toFixed(0)} ms) more than a window after the one ${f.limit.messages} before it`,
  ].join('\n');
}
