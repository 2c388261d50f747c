// The per-host limit on outgoing migrations (migration.maxParallelOutbound, as KubeVirt's
// parallelOutboundMigrationsPerNode): a migration beyond it waits its turn, first come first
// served, instead of failing, so that a drain or many migrate commands never load the
// uplink, the guests' CPUs (dirty tracking, compression) and the destinations with more.
//
// A gang takes one slot for all its members: they move together on purpose (one session,
// one dedup group, switchovers in turn), and queueing some of them undoes that; the
// four-guest gang test sent 10% more with its last two members queued behind the first two,
// which kept dirtying the memory their siblings' refs pointed at.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';

export class MigrationSlots {
  private running = 0;
  private readonly waiting: { grant: () => void }[] = [];

  constructor(readonly limit: number) {}

  /** Migrations waiting for a slot. */
  get queued(): number {
    return this.waiting.length;
  }

  /** Would a migration asked for now have to wait? */
  get full(): boolean {
    return this.running >= this.limit;
  }

  /**
   * One slot for the `members` of a gang: the first member to ask queues for it, every
   * member waits for it, and it is freed when the last member has released (or left the
   * queue, cancelled).
   */
  gang(members: number): SlotSource {
    let taking: Promise<() => void> | undefined;
    let owed = members;
    const queueing = new AbortController();
    const settle = () => {
      if (--owed > 0 || !taking) return;
      queueing.abort();
      taking.then((release) => release(), () => {});
    };
    return {
      full: () => taking === undefined && this.full,
      acquire: (signal) => {
        taking ??= this.acquire(queueing.signal);
        const slot = taking;
        return new Promise((resolve, reject) => {
          if (signal.aborted) {
            settle();
            return reject(cancelledWhileQueued());
          }
          const onAbort = () => {
            settle();
            reject(cancelledWhileQueued());
          };
          signal.addEventListener('abort', onAbort, { once: true });
          slot.then(
            () => {
              if (signal.aborted) return;
              signal.removeEventListener('abort', onAbort);
              resolve(once(settle));
            },
            (err: unknown) => {
              signal.removeEventListener('abort', onAbort);
              reject(err);
            },
          );
        });
      },
    };
  }

  /** Slots as one migration takes them (see SlotSource). */
  single(): SlotSource {
    return { full: () => this.full, acquire: (signal) => this.acquire(signal) };
  }

  /**
   * Resolves with the slot's release (call it exactly once) when one is free; rejects with
   * ABORTED if `signal` aborts first (a cancelled migration leaves the queue).
   */
  acquire(signal: AbortSignal): Promise<() => void> {
    const release = () => {
      this.running--;
      this.waiting.shift()?.grant();
    };
    if (signal.aborted) return Promise.reject(cancelledWhileQueued());
    if (this.running < this.limit) {
      this.running++;
      return Promise.resolve(once(release));
    }
    return new Promise((resolve, reject) => {
      const entry = {
        grant: () => {
          signal.removeEventListener('abort', onAbort);
          this.running++;
          resolve(once(release));
        },
      };
      const onAbort = () => {
        const index = this.waiting.indexOf(entry);
        if (index >= 0) this.waiting.splice(index, 1);
        reject(cancelledWhileQueued());
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.waiting.push(entry);
    });
  }
}

/** Where a migration takes its slot: its own, or its gang's. */
export interface SlotSource {
  /** Would it have to wait now? */
  full(): boolean;
  /** The slot's release (call it exactly once), once there is one; rejects with ABORTED if `signal` aborts first. */
  acquire(signal: AbortSignal): Promise<() => void>;
}

function cancelledWhileQueued(): GangwayError {
  return new GangwayError(ErrorCode.ABORTED, 'cancelled while queued for a migration slot (migration.maxParallelOutbound): the guest stays here');
}

function once(release: () => void): () => void {
  let released = false;
  return () => {
    if (released) return;
    released = true;
    release();
  };
}
