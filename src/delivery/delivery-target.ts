// The one delivery contract. The queue runner hands a message and some of its recipients to a
// DeliveryTarget and gets one result per recipient back; it never knows whether the target spoke
// SMTP to an MX host, to a static route, or (later) to an HTTP API such as Microsoft Graph. Like
// maddy's module.DeliveryTarget, adding a kind of upstream means implementing this, nothing else.
//
// A target never throws for a delivery problem: every problem becomes a per-recipient result
// (delivered, deferred or failed), so the queue decides retry or bounce from data, not exceptions.
import type { Readable } from 'node:stream';

export type TlsMode = 'none' | 'opportunistic' | 'required';

export interface DeliveryRecipient {
  /** The recipient's index in the stored message; results are matched back by it. */
  index: number;
  address: string;
}

export interface DeliveryJob {
  queueId: string;
  /** Envelope sender; '' is the null sender (MAIL FROM:<>). */
  sender: string;
  recipients: DeliveryRecipient[];
  /** Opens the stored body. Called once per SMTP transaction, so it may be called several times. */
  body: () => Readable;
  size: number;
  /** When the message expires (ms): a turn under a sending limit after this will never be taken. */
  expiresAt?: number;
  /** Aborted on shutdown: the target stops as soon as it can and reports the rest as deferred. */
  signal?: AbortSignal;
}

export type RecipientStatus = 'delivered' | 'deferred' | 'failed';

export interface RecipientResult {
  index: number;
  status: RecipientStatus;
  /** The SMTP reply code when a remote server answered; null when Postern decided (DNS, network). */
  code: number | null;
  /** Enhanced status code (RFC 3463), always set: "2.0.0", "4.4.1", "5.1.1"... */
  enhanced: string;
  /**
   * One line for the store, the logs and bounces: the remote reply as received
   * ("550 5.1.1 no such user") or Postern's own "4.4.1 Could not connect ...".
   */
  response: string;
  /** The server that gave the reply (MX or route host name), when there was one. */
  remoteMta?: string;
  remoteIp?: string;
  /**
   * Deferred without being tried: the target's own sending limits hold it until then. The queue
   * puts it back for that time without counting an attempt.
   */
  waitUntil?: number;
  /** Deferred by a server that said when to come back (throttling): retried then, not on the backoff. */
  retryAt?: number;
  /**
   * Deferred because of the upstream's configuration (refused credentials, a missing permission,
   * a hold after those), not the message or the recipient: an upstream's fallback may take it.
   */
  configurationProblem?: string;
}

/** A result before it is tied to a recipient. */
export type DeliveryOutcome = Omit<RecipientResult, 'index'>;

export interface DeliveryTarget {
  /** For logs: "mx example.com", "route relay.internal:25". */
  readonly description: string;
  deliver(job: DeliveryJob): Promise<RecipientResult[]>;
}
