// Flow control on the sending side: a credit window granted by the receiver (bytes it is
// ready to take; returned as it writes them), and an optional token-bucket pacer that holds
// the send rate to a cap when tc cannot (no root) or for --bandwidth.

export interface Clock {
  now(): number;
  sleep(ms: number): Promise<void>;
}

export const realClock: Clock = {
  now: () => performance.now(),
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

export class CreditWindow {
  private available: number;
  private waiters: { bytes: number; resolve: () => void; reject: (err: Error) => void }[] = [];
  private failure: Error | undefined;

  constructor(readonly windowBytes: number) {
    this.available = windowBytes;
  }

  get availableBytes(): number {
    return this.available;
  }

  /** Changes the window: the bytes on their way stay counted, what may follow grows or shrinks. */
  resize(windowBytes: number): void {
    this.available += windowBytes - this.windowBytes;
    (this as { windowBytes: number }).windowBytes = windowBytes;
    if (this.available >= this.windowBytes) for (const waiter of this.drainWaiters.splice(0)) waiter.resolve();
    while (this.waiters.length > 0) {
      const first = this.waiters[0]!;
      if (this.available < Math.min(first.bytes, this.windowBytes)) break;
      this.waiters.shift();
      this.available -= first.bytes;
      first.resolve();
    }
  }

  /** Waits until `bytes` may be sent. A frame larger than the window waits for a full window. */
  take(bytes: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const need = Math.min(bytes, this.windowBytes);
    if (this.waiters.length === 0 && this.available >= need) {
      this.available -= bytes;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.waiters.push({ bytes, resolve, reject }));
  }

  /**
   * Takes `bytes` now, even past the window (it may go below zero): for the few small
   * frames that must not wait, such as the pages a post-copy guest faulted on.
   */
  force(bytes: number): void {
    this.available -= bytes;
  }

  /** Resolves once everything sent has been credited back: the receiver has caught up. */
  drained(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.available >= this.windowBytes) return Promise.resolve();
    return new Promise((resolve, reject) => this.drainWaiters.push({ resolve, reject }));
  }

  private drainWaiters: { resolve: () => void; reject: (err: Error) => void }[] = [];

  grant(bytes: number): void {
    this.available += bytes;
    if (this.available >= this.windowBytes) for (const waiter of this.drainWaiters.splice(0)) waiter.resolve();
    while (this.waiters.length > 0) {
      const first = this.waiters[0]!;
      if (this.available < Math.min(first.bytes, this.windowBytes)) break;
      this.waiters.shift();
      this.available -= first.bytes;
      first.resolve();
    }
  }

  /** Rejects every waiter and every later take (the session is gone). */
  fail(err: Error): void {
    this.failure = err;
    for (const waiter of this.waiters.splice(0)) waiter.reject(err);
    for (const waiter of this.drainWaiters.splice(0)) waiter.reject(err);
  }
}

export class Pacer {
  private tokens: number;
  private last: number;

  /** `burstBytes` is how far ahead of the rate a sender may get (one batch, typically). */
  constructor(
    private rateBytesPerSec: number,
    private readonly burstBytes: number,
    private readonly clock: Clock = realClock,
  ) {
    this.tokens = burstBytes;
    this.last = clock.now();
  }

  get rate(): number {
    return this.rateBytesPerSec;
  }

  setRate(rateBytesPerSec: number): void {
    this.refill();
    this.rateBytesPerSec = rateBytesPerSec;
  }

  private refill(): void {
    const now = this.clock.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.last) * this.rateBytesPerSec) / 1000);
    this.last = now;
  }

  /** Waits until `bytes` fit the rate, then spends them (the balance may go negative for a big frame). */
  async take(bytes: number): Promise<void> {
    this.refill();
    if (this.tokens < 0) {
      await this.clock.sleep((-this.tokens * 1000) / this.rateBytesPerSec);
      this.refill();
    }
    this.tokens -= bytes;
  }
}

/**
 * Migrations that share a link take turns at the switchover. The one stopping its guest
 * holds the gate: the others gather no new batches until it is done (what they gathered
 * already still goes out, it is ahead in the stream), and it waits until every member's
 * frames are applied (every window drained, every channel's piece written), so its final
 * round, verification and commit have the link and the destination to themselves. Without
 * it, a gang member's final round queues behind the other members' pre-copy windows:
 * seconds on a slow link.
 */
export class SwitchoverGate {
  private holder: object | undefined;
  private readonly acquirers: { who: object; resolve: () => void }[] = [];
  private openWaiters: (() => void)[] = [];
  private readonly windows = new Set<CreditWindow>();
  private inRoundZero = 0;
  private roundZeroWaiters: (() => void)[] = [];
  /** Settles when the last member to ask for a round 0 turn has ended it. */
  private turns: Promise<void> = Promise.resolve();

  /** A member's receive window, to be drained before a switchover. */
  join(window: CreditWindow): void {
    this.windows.add(window);
  }

  leave(window: CreditWindow): void {
    this.windows.delete(window);
  }

  /** Work a member has in flight beside its window (its channels' pieces), settled before a switchover. */
  private readonly work = new Set<{ settled(): Promise<void> }>();

  joinWork(work: { settled(): Promise<void> }): void {
    this.work.add(work);
  }

  leaveWork(work: { settled(): Promise<void> }): void {
    this.work.delete(work);
  }

  /** Resolves once every member's frames so far are applied (every window drained); a failed window counts as drained. */
  async drained(): Promise<void> {
    await Promise.all([...this.windows].map((window) => window.drained().catch(() => {})));
  }

  /**
   * A member with pre-copy rounds starts: until it has sent its round 0 (or ended, when it
   * calls the returned function), no member switches over. A member that commits retires
   * its content as a source of refs (its guest runs and writes at the destination), and the
   * others would send that content again: a gang of three VMs cloned from one disk image
   * sent two of the image's three copies when one VM had committed before the others reached
   * their disks.
   */
  enterRoundZero(): () => void {
    this.inRoundZero++;
    let left = false;
    return () => {
      if (left) return;
      left = true;
      if (--this.inRoundZero === 0) for (const wake of this.roundZeroWaiters.splice(0)) wake();
    };
  }

  /**
   * A member's turn to send its round 0, after the members that asked before it; resolves to
   * the turn's end (call it exactly once, also on failure). Members that take turns send
   * their round 0s one at a time, each at the link's full rate: a member's guest dirties
   * less after its round 0 than when all share the link for all of theirs, and the one
   * before converges and switches over while the next sends. The gang's shared content goes
   * once, with the first member; the others refer to it, also once that member runs at the
   * destination (its memory stays there as resident memory, 'dedup-committed').
   */
  async roundZeroTurn(): Promise<() => void> {
    const previous = this.turns;
    let end!: () => void;
    this.turns = new Promise<void>((resolve) => (end = resolve));
    await previous;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      end();
    };
  }

  /** Resolves once no member is still sending its round 0. */
  roundZerosDone(): Promise<void> {
    if (this.inRoundZero === 0) return Promise.resolve();
    return new Promise((resolve) => this.roundZeroWaiters.push(resolve));
  }

  /** May `who` gather new batches? */
  isOpenFor(who: object): boolean {
    return this.holder === undefined || this.holder === who;
  }

  waitOpen(who: object): Promise<void> {
    if (this.isOpenFor(who)) return Promise.resolve();
    return new Promise((resolve) => this.openWaiters.push(resolve));
  }

  /**
   * Takes the gate (after earlier takers released it), then waits until every member's
   * window has drained. Returns the release; call it exactly once, also on failure. A
   * member whose window failed (its migration is over) does not hold the others up.
   */
  async acquire(who: object): Promise<() => void> {
    if (this.holder !== undefined) await new Promise<void>((resolve) => this.acquirers.push({ who, resolve }));
    // Handed over by the previous holder's release, or free.
    this.holder = who;
    const release = () => {
      if (this.holder !== who) return;
      this.holder = undefined;
      const next = this.acquirers.shift();
      if (next) {
        this.holder = next.who;
        next.resolve();
      } else {
        for (const wake of this.openWaiters.splice(0)) wake();
      }
    };
    await Promise.all([this.drained(), ...[...this.work].map((work) => work.settled().catch(() => {}))]);
    return release;
  }
}

/**
 * A fixed number of slots for work that holds memory while it runs (a session's LZ4
 * decompressions): acquire() waits for a free one, first come first served.
 */
export class Slots {
  private free: number;
  private readonly waiting: (() => void)[] = [];

  constructor(readonly count: number) {
    this.free = count;
  }

  /** Resolves with the function that gives the slot back (call it exactly once). */
  acquire(): Promise<() => void> {
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      const next = this.waiting.shift();
      if (next) next();
      else this.free++;
    };
    if (this.free > 0) {
      this.free--;
      return Promise.resolve(release);
    }
    return new Promise((resolve) => this.waiting.push(() => resolve(release)));
  }

  /** Work waiting for a slot. */
  get waitingCount(): number {
    return this.waiting.length;
  }
}
