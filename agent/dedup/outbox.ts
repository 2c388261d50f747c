// A dedup group's one order (source-group.ts says why refs rest on it): places taken as
// frames are planned, used in turn as they reach the session.
/**
 * The group's frames go out in the order their content was planned. take() reserves a
 * place; turn(t) resolves when every earlier place was used (done) or given up (drop).
 */
export class Outbox {
  private next = 0;
  private issued = 0;
  private readonly waiting = new Map<number, () => void>();
  private readonly dropped = new Set<number>();
  /** sentThrough's waiters. */
  private readonly through: { ticket: number; resolve: () => void }[] = [];

  take(): number {
    return this.issued++;
  }

  turn(ticket: number): Promise<void> {
    if (ticket === this.next) return Promise.resolve();
    return new Promise((resolve) => this.waiting.set(ticket, resolve));
  }

  done(ticket: number): void {
    if (ticket !== this.next) throw new Error(`outbox: ticket ${ticket} finished out of turn (next is ${this.next})`);
    this.advance();
  }

  drop(ticket: number): void {
    if (ticket === this.next) this.advance();
    else if (ticket > this.next) this.dropped.add(ticket);
  }

  /** The place the next take() gives. */
  get nextTicket(): number {
    return this.issued;
  }

  /** Resolves once every place up to `ticket` was used or given up. */
  sentThrough(ticket: number): Promise<void> {
    if (ticket < this.next) return Promise.resolve();
    return new Promise((resolve) => this.through.push({ ticket, resolve }));
  }

  private advance(): void {
    this.next++;
    while (this.dropped.delete(this.next)) this.next++;
    if (this.through.length > 0) {
      const waiting = this.through.splice(0);
      for (const w of waiting) {
        if (w.ticket < this.next) w.resolve();
        else this.through.push(w);
      }
    }
    const wake = this.waiting.get(this.next);
    if (wake) {
      this.waiting.delete(this.next);
      wake();
    }
  }
}
