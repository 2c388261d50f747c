// gangway drain: every guest off this host, spread over the peers named. The guests are
// dealt to the peers in turn (by name, so a re-run deals the same way); for each peer the
// one decision of --technique auto (follow-plan.ts, as `gangway plan` prints it) chooses the
// technique, the order and whether that peer takes its guests together (gang) or one at a
// time (serial). At most maxParallel migrations run at once; above the agent's
// migration.maxParallelOutbound the rest wait in its queue. While the drain runs the host
// refuses new guests and arriving migrations: a host being emptied must not fill up again.
// Every guest ends as moved (to which peer) or stayed here (and why); cancel stops the
// drain: running migrations are cancelled and the guests not yet moved stay here.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { Logger } from '../log.js';
import type { MigrationProgress } from '../migration/source.js';
import { planAnswer, type PlanAnswer } from '../planner/plan-answer.js';
import type { Priority } from '../planner/planner.js';
import type { OutboundMigrations } from './outbound.js';
import { MIGRATE_DEFAULTS } from '../control/client.js';

export interface DrainRequest {
  /** The peers' addresses (HOST:PORT), in the order guests are dealt to them. */
  to: string[];
  /** Migrations at once; default migration.maxParallelOutbound. */
  maxParallel?: number;
  /** Default: the agent's traffic.priority. */
  priority?: Priority;
  /** Plan only: nothing moves and the host is not marked as draining. */
  dryRun?: boolean;
}

export interface DrainPlan {
  maxParallel: number;
  /** In the order they start (as far as maxParallel and serial peers allow). */
  guests: { name: string; to: string; technique: 'precopy' | 'postcopy' | 'hybrid' }[];
  /** What `gangway plan GUESTS --to PEER` says for each peer's share. */
  peers: PlanAnswer[];
  /** Guests that cannot move at all (a post-copy still arriving, dead), with why. */
  unmovable: { guest: string; reason: string }[];
}

export type DrainOutcome =
  | { guest: string; moved: true; to: string; migrationId: string; technique: string; downtimeMs: number }
  | { guest: string; moved: false; to: string | null; error: { code: string; message: string } };

export interface DrainSummary {
  dryRun: boolean;
  cancelled: boolean;
  plan: DrainPlan;
  /** Every guest of the plan and every unmovable one, in the order they ended. */
  outcomes: DrainOutcome[];
  moved: number;
  stayed: number;
}

export type DrainEvent = { type: 'plan'; plan: DrainPlan } | { type: 'progress'; progress: MigrationProgress } | { type: 'guest'; outcome: DrainOutcome };

export interface DrainContext {
  registry: GuestRegistry;
  outbound: Pick<OutboundMigrations, 'decide' | 'migrate' | 'cancelGuest'>;
  /** migration.maxParallelOutbound. */
  maxParallelOutbound: number;
  log: Logger;
}

export class HostDrain {
  private running: { cancel: AbortController; to: string[] } | undefined;

  constructor(private readonly context: DrainContext) {}

  /** Why this host takes no new guest or arriving migration now, or undefined. */
  refusal(): string | undefined {
    if (!this.running) return undefined;
    return `this host is being drained (gangway drain --to ${this.running.to.join(',')}): it takes no new guests until the drain ends; use another host`;
  }

  /** Throws the refusal, for guest start and vm start. */
  refuseNewGuest(): void {
    const refusal = this.refusal();
    if (refusal) throw new GangwayError(ErrorCode.DRAINING, refusal);
  }

  /** Cancels the running drain; false when there is none. */
  cancel(): boolean {
    if (!this.running) return false;
    this.context.log.warn('drain cancelled: running migrations are cancelled, the guests not moved stay here');
    this.running.cancel.abort();
    return true;
  }

  async run(request: DrainRequest, onEvent: (event: DrainEvent) => void): Promise<DrainSummary> {
    if (this.running) throw new GangwayError(ErrorCode.BAD_REQUEST, `a drain is already running (to ${this.running.to.join(',')}): cancel it first (Ctrl-C in its gangway drain)`);
    const cancel = new AbortController();
    // Marked before planning, so that no guest arrives while the plan is made.
    if (!request.dryRun) this.running = { cancel, to: request.to };
    try {
      const plan = await this.plan(request);
      onEvent({ type: 'plan', plan });
      const outcomes: DrainOutcome[] = plan.unmovable.map(({ guest, reason }) => ({ guest, moved: false as const, to: null, error: { code: ErrorCode.BAD_REQUEST, message: reason } }));
      for (const outcome of outcomes) onEvent({ type: 'guest', outcome });
      if (!request.dryRun) {
        this.context.log.info({ to: request.to, guests: plan.guests.length, maxParallel: plan.maxParallel }, 'drain started');
        await this.execute(plan, request.priority, cancel.signal, (outcome) => {
          outcomes.push(outcome);
          onEvent({ type: 'guest', outcome });
        }, onEvent);
      }
      const moved = outcomes.filter((o) => o.moved).length;
      this.context.log.info({ moved, stayed: outcomes.length - moved, cancelled: cancel.signal.aborted }, request.dryRun ? 'drain planned (dry run)' : 'drain ended');
      return { dryRun: request.dryRun ?? false, cancelled: cancel.signal.aborted, plan, outcomes, moved, stayed: outcomes.length - moved };
    } finally {
      if (this.running?.cancel === cancel) this.running = undefined;
    }
  }

  /** Deals the guests to the peers and asks the one decision for each peer's share. */
  private async plan(request: DrainRequest): Promise<DrainPlan> {
    if (new Set(request.to).size !== request.to.length) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to names a peer twice: ${request.to.join(',')}`);
    const maxParallel = request.maxParallel ?? this.context.maxParallelOutbound;
    const unmovable: DrainPlan['unmovable'] = [];
    const movable: string[] = [];
    for (const { record, guest } of this.context.registry.list().sort((a, b) => a.record.name.localeCompare(b.record.name))) {
      if (record.incoming) unmovable.push({ guest: record.name, reason: `still receiving its memory from ${record.incoming.from} (post-copy): it cannot move yet` });
      else if (record.outgoing) unmovable.push({ guest: record.name, reason: `left at its switchover to ${record.outgoing.to}: the agent is finding out where it runs` });
      else if (!guest.alive()) unmovable.push({ guest: record.name, reason: 'it is not running' });
      else movable.push(record.name);
    }
    const share = new Map<string, string[]>(request.to.map((peer) => [peer, []]));
    movable.forEach((name, i) => share.get(request.to[i % request.to.length]!)!.push(name));
    const peers: PlanAnswer[] = [];
    for (const [to, guests] of share) {
      if (guests.length === 0) continue;
      const { followed, plan } = await this.context.outbound.decide({ guests, to, strategy: 'gang', ...(request.priority ? { priority: request.priority } : {}) });
      peers.push(planAnswer(to, followed, plan));
    }
    // Interleaved: each peer's first guest, then each one's second, ... in each peer's order.
    const guests: DrainPlan['guests'] = [];
    for (let round = 0; peers.some((p) => p.guests.length > round); round++) {
      for (const peer of peers) {
        const guest = peer.guests[round];
        if (guest) guests.push({ name: guest.name, to: peer.to, technique: guest.technique });
      }
    }
    return { maxParallel, guests, peers, unmovable };
  }

  /** Runs the plan: at most maxParallel at once, one at a time to a peer whose decision is serial. */
  private execute(plan: DrainPlan, priority: Priority | undefined, signal: AbortSignal, onOutcome: (outcome: DrainOutcome) => void, onEvent: (event: DrainEvent) => void): Promise<void> {
    const serialPeers = new Set(plan.peers.filter((p) => p.strategy === 'serial').map((p) => p.to));
    const pending = [...plan.guests];
    const busyPeers = new Map<string, number>();
    const moving = new Set<string>();
    const onAbort = () => {
      for (const name of moving) this.context.outbound.cancelGuest(name);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    return new Promise<void>((resolve) => {
      const pump = () => {
        while (!signal.aborted && moving.size < plan.maxParallel) {
          const index = pending.findIndex((g) => !(serialPeers.has(g.to) && (busyPeers.get(g.to) ?? 0) > 0));
          if (index < 0) break;
          const [guest] = pending.splice(index, 1);
          moving.add(guest!.name);
          busyPeers.set(guest!.to, (busyPeers.get(guest!.to) ?? 0) + 1);
          void this.moveOne(guest!, priority, onEvent)
            .then(onOutcome)
            .finally(() => {
              moving.delete(guest!.name);
              busyPeers.set(guest!.to, busyPeers.get(guest!.to)! - 1);
              pump();
            });
        }
        if (moving.size > 0) return;
        if (signal.aborted) {
          for (const guest of pending.splice(0)) {
            onOutcome({ guest: guest.name, moved: false, to: guest.to, error: { code: ErrorCode.ABORTED, message: 'the drain was cancelled before it moved: it stays here' } });
          }
        }
        if (pending.length === 0) {
          signal.removeEventListener('abort', onAbort);
          resolve();
        }
      };
      pump();
    });
  }

  private async moveOne(guest: DrainPlan['guests'][number], priority: Priority | undefined, onEvent: (event: DrainEvent) => void): Promise<DrainOutcome> {
    try {
      const summary = await this.context.outbound.migrate(
        {
          // The settings `gangway migrate` gives a request by default, one guest at a time.
          ...MIGRATE_DEFAULTS,
          guests: [guest.name],
          to: guest.to,
          strategy: 'serial',
          // The technique the decision chose for it (what the plan event said), not asked again.
          technique: guest.technique,
          ...(priority ? { priority } : {}),
        },
        (progress) => onEvent({ type: 'progress', progress }),
      );
      const moved = summary.guests[0]!;
      return { guest: guest.name, moved: true, to: guest.to, migrationId: moved.migrationId, technique: moved.technique, downtimeMs: moved.downtimeMs };
    } catch (err) {
      const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, String(err));
      this.context.log.warn({ guest: guest.name, to: guest.to, err: error.message }, 'drain: the guest stays here');
      return { guest: guest.name, moved: false, to: guest.to, error: { code: error.code, message: error.message } };
    }
  }
}
