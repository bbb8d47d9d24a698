// An upstream's fallback (`fallback = "NAME"`): another upstream that takes the mail this one
// could not send because of its configuration, and only that mail. Microsoft 365 over SMTP with
// Graph as the fallback keeps mail moving when a tenant switches SMTP AUTH off; a Graph upstream
// with an SMTP fallback sends the messages Graph cannot (see GRAPH_RECIPIENTS).
//
// "Because of its configuration" is what the primary marks as such (RecipientResult
// .configurationProblem): refused credentials or token, SMTP AUTH switched off, a missing
// permission, a hold after one of those. A recipient the provider refused, a message too big,
// throttling or a network fault are not: another path would not fix them, or would only move the
// same load elsewhere. What the fallback answers is the recipient's result, so a fallback that
// fails too is retried on the queue's schedule like any deferral, starting with the primary.
import type { Logger } from '../../observe/logger.js';
import type { DeliveryJob, RecipientResult } from '../delivery-target.js';
import type { UpstreamTarget } from './upstreams.js';

export class FallbackTarget implements UpstreamTarget {
  readonly #primary: UpstreamTarget;
  readonly #fallback: UpstreamTarget;
  readonly #log: Logger | undefined;

  constructor(primary: UpstreamTarget, fallback: UpstreamTarget, logger: Logger | undefined) {
    this.#primary = primary;
    this.#fallback = fallback;
    this.#log = logger?.child({ component: 'upstream', upstream: primary.name });
  }

  get key(): string {
    return this.#primary.key;
  }

  get name(): string {
    return this.#primary.name;
  }

  get description(): string {
    return this.#primary.description;
  }

  async deliver(job: DeliveryJob): Promise<RecipientResult[]> {
    const results = await this.#primary.deliver(job);
    const handOver = new Map(results.filter((r) => r.status === 'deferred' && r.configurationProblem).map((r) => [r.index, r]));
    if (handOver.size === 0 || job.signal?.aborted) return results;
    this.#log?.info(
      {
        event: 'upstream_fallback',
        queueId: job.queueId,
        fallback: this.#fallback.name,
        problem: [...handOver.values()][0]!.configurationProblem,
        recipients: handOver.size,
      },
      `upstream ${this.#primary.name} cannot send this (${[...handOver.values()][0]!.configurationProblem}): trying its fallback ${this.#fallback.name}`,
    );
    const second = await this.#fallback.deliver({ ...job, recipients: job.recipients.filter((r) => handOver.has(r.index)) });
    const byIndex = new Map(second.map((r) => [r.index, r]));
    return results.map((r) => byIndex.get(r.index) ?? r);
  }
}
