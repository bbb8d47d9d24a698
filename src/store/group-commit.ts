// Group commit: work submitted during one turn of the event loop is committed together, in one
// transaction with (at most) one fsync, and each submitter's promise settles only after that.
// A burst of 50 sessions, or 50 deliveries finishing at once, then pays for a handful of commits
// instead of 50. While one batch commits, new work accumulates for the next, so batches grow
// with the load instead of commits queueing up behind each other.

/** Per item: committed (with a value), or refused alone (the rest of the batch still commits). */
export type ItemResult<R> = { ok: true; value: R } | { ok: false; error: Error };

interface Waiting<T, R> {
  item: T;
  resolve(value: R): void;
  reject(error: Error): void;
}

export class GroupCommit<T, R = void> {
  readonly #commit: (items: T[]) => Promise<ItemResult<R>[]> | ItemResult<R>[];
  #waiting: Waiting<T, R>[] = [];
  #scheduled = false;
  #chain: Promise<void> = Promise.resolve();

  /**
   * `commit` gets the batch and returns one result per item, in order. If it throws, every item
   * of the batch is rejected with that error.
   */
  constructor(commit: (items: T[]) => Promise<ItemResult<R>[]> | ItemResult<R>[]) {
    this.#commit = commit;
  }

  submit(item: T): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      this.#waiting.push({ item, resolve, reject });
      if (this.#scheduled) return;
      this.#scheduled = true;
      // setImmediate: after the I/O callbacks of this turn, so everything they submit joins.
      setImmediate(() => {
        this.#chain = this.#chain.then(() => this.#run());
      });
    });
  }

  /** Resolves once everything submitted so far is committed (or refused). */
  async drain(): Promise<void> {
    while (this.#scheduled || this.#waiting.length > 0) await new Promise((r) => setImmediate(r));
    await this.#chain;
  }

  /** Never rejects: the chain must survive a failed batch. */
  async #run(): Promise<void> {
    this.#scheduled = false;
    const batch = this.#waiting;
    this.#waiting = [];
    if (batch.length === 0) return;
    let results: ItemResult<R>[];
    try {
      results = await this.#commit(batch.map((w) => w.item));
    } catch (err) {
      for (const w of batch) w.reject(err as Error);
      return;
    }
    batch.forEach((w, i) => {
      const result = results[i];
      if (!result) w.reject(new Error('group commit returned no result for an item'));
      else if (result.ok) w.resolve(result.value);
      else w.reject(result.error);
    });
  }
}
