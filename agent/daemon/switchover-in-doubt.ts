// Guests left at their switchover (the commit was sent, or post-copy started) by a lost
// confirmation or a restart: the destination is asked what became of them, and this paused
// copy goes, resumes, serves the rest of its post-copy, or stays and says why.
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Whereabouts } from '../../protocol/codes.js';
import { Frame } from '../../protocol/index.js';
import type { AgentConfig } from '../daemon.js';
import type { GuestRecord, GuestRegistry } from '../guest/registry.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics.js';
import { SourceMigration } from '../migration/source.js';
import type { MigrationRecords } from './records.js';
import type { SessionPool } from './session-pool.js';

/** The options of a SourceMigration that only serves the rest of a post-copy (they are not used). */
const MIGRATION_OPTION_DEFAULTS = {
  downtimeBudgetMs: 300,
  maxRounds: 1,
  force: false,
  codec: 'auto',
  commitTimeoutMs: 30_000,
} as const;

export interface InDoubtContext {
  config: Pick<AgentConfig, 'tracker' | 'batchBytes' | 'postcopyReattachMs'>;
  registry: GuestRegistry;
  log: Logger;
  metrics: AgentMetrics;
  records: MigrationRecords;
  sessions: Pick<SessionPool, 'session'>;
  /** XXH3-128 throughput on this host, measured at start, for the convergence policy. */
  digestBytesPerSec: () => number;
  /** Is the agent shutting down? Then no switchover is asked after. */
  shuttingDown: () => boolean;
  /** Is guest `name` leaving this host, or queued to? Then its migration, not this, settles it. */
  isMigrating: (name: string) => boolean;
  /** The migrations leaving here (OutboundMigrations'): a resumed post-copy is one while it runs. */
  outgoing: Pick<Map<string, SourceMigration>, 'set' | 'delete'>;
}

export class InDoubtSwitchovers {
  /** The guests being resolved now: one loop a guest. */
  private readonly resolving = new Set<string>();

  constructor(private readonly context: InDoubtContext) {}

  /** Asks `to` what became of `migrationId` (a short-lived handler on the session). */
  private async askWhereabouts(to: string, migrationId: string): Promise<Whereabouts> {
    const session = await this.context.sessions.session(to);
    return new Promise<Whereabouts>((resolve, reject) => {
      const timer = setTimeout(() => {
        session.unregister(migrationId);
        reject(new GangwayError(ErrorCode.TIMEOUT, `no answer from ${to} within 10 s`));
      }, 10_000);
      session.register(migrationId, {
        onFrame: (frame) => {
          if (frame.type !== 'migrationAnswer') return;
          clearTimeout(timer);
          session.unregister(migrationId);
          resolve((frame as ReturnType<typeof Frame.migrationAnswer>).whereabouts);
        },
        onSessionClosed: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
      session.send(Frame.migrationQuery({ migrationId }));
    });
  }

  /**
   * Serves the rest of a post-copy this agent was in the middle of when it stopped. True
   * once the destination holds every page (this copy is then gone).
   */
  private async resumePostcopy(name: string, out: NonNullable<GuestRecord['outgoing']>): Promise<boolean> {
    const hosted = this.context.registry.get(name).guest;
    // The disks that moved with it are regions of the migration too (the destination lacks their blocks as well).
    const moved = out.movedDisks ?? [];
    const movedRegions = hosted.forMigration?.({ disks: 'all' }).regions.filter((region) => region.sparse && moved.includes(region.path)).map((region) => region.name) ?? [];
    const guest = movedRegions.length > 0 ? hosted.forMigration!({ disks: movedRegions }) : hosted;
    const log = this.context.log.child({ migrationId: out.migrationId, guest: name, to: out.to });
    const session = await this.context.sessions.session(out.to);
    const migration = new SourceMigration(
      guest,
      session,
      {
        ...MIGRATION_OPTION_DEFAULTS,
        migrationId: out.migrationId,
        peerAddress: out.to,
        maxWireBytes: 3 * guest.regions.reduce((sum, region) => sum + region.lengthBytes, 0),
        tracker: this.context.config.tracker,
        batchBytes: this.context.config.batchBytes,
        digestBytesPerSec: this.context.digestBytesPerSec(),
        metrics: this.context.metrics,
        technique: 'postcopy',
        ...(out.secret ? { secret: Buffer.from(out.secret, 'hex') } : {}),
        reconnect: () => this.context.sessions.session(out.to),
        reconnectWindowMs: this.context.config.postcopyReattachMs,
        registry: this.context.registry,
      },
      log,
    );
    this.context.outgoing.set(out.migrationId, migration);
    log.warn('post-copy was under way when this agent stopped: serving the pages the destination still lacks');
    try {
      const result = await migration.resumePostcopy();
      this.context.registry.remove(name);
      this.context.records.set(out.migrationId, { direction: 'out', state: 'resumed', migrationId: out.migrationId, guest: name, to: out.to, startedAt: out.since, resumed: result });
      return true;
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      log.error({ err: message }, 'serving the rest of the post-copy failed; this paused copy stays');
      this.context.registry.update(name, { outgoing: { ...out, interrupted: message.slice(0, 300) } });
      return false;
    } finally {
      this.context.outgoing.delete(out.migrationId);
    }
  }

  /**
   * A guest marked as at its switchover (the commit was sent, or post-copy started) with
   * nobody driving the migration any more (this agent restarted, or the confirmation was
   * lost): ask the destination until it answers. Running there: this paused copy goes.
   * Unknown there: the guest never ran there, so it resumes here. Receiving or stranded
   * there: this copy holds what the destination lacks; it stays paused, and says so.
   */
  async resolve(name: string): Promise<void> {
    if (this.resolving.has(name)) return;
    this.resolving.add(name);
    try {
      let delay = 500;
      while (!this.context.shuttingDown()) {
        let entry;
        try {
          entry = this.context.registry.get(name);
        } catch {
          return;
        }
        const out = entry.record.outgoing;
        if (!out || this.context.isMigrating(name)) return;
        if (out.phase === 'paused') {
          // Neither the commit nor the post-copy switch went out: it cannot run there.
          this.context.log.warn({ guest: name, to: out.to, migrationId: out.migrationId }, 'the agent stopped while this guest was paused for a switchover that never reached the destination; it resumes here');
          this.context.registry.update(name, { outgoing: undefined });
          await entry.guest.resume();
          return;
        }
        let whereabouts: Whereabouts | undefined;
        try {
          whereabouts = await this.askWhereabouts(out.to, out.migrationId);
        } catch (err) {
          this.context.log.info({ guest: name, to: out.to, err: (err as Error).message }, 'switchover in doubt: the destination does not answer yet');
        }
        if (whereabouts === Whereabouts.running) {
          this.context.log.warn({ guest: name, to: out.to, migrationId: out.migrationId }, 'switchover resolved: the guest runs at the destination; this paused copy is removed');
          await entry.guest.discard();
          for (const path of out.movedDisks ?? []) rmSync(path, { force: true });
          this.context.registry.remove(name);
          return;
        }
        if (whereabouts === Whereabouts.unknown) {
          this.context.log.warn({ guest: name, to: out.to, migrationId: out.migrationId }, 'switchover resolved: the guest never ran at the destination; it resumes here');
          this.context.registry.update(name, { outgoing: undefined });
          await entry.guest.resume();
          return;
        }
        if (whereabouts === Whereabouts.receiving && out.phase === 'postcopy') {
          // The guest runs there and waits for pages only this copy holds: serve them.
          if (await this.resumePostcopy(name, out)) return;
        }
        if (whereabouts === Whereabouts.receiving || whereabouts === Whereabouts.stranded) {
          const why =
            whereabouts === Whereabouts.stranded
              ? 'the destination gave up waiting for its missing pages'
              : 'the destination runs the guest and waits for pages this copy holds';
          this.context.log.error({ guest: name, to: out.to, migrationId: out.migrationId }, `post-copy interrupted: ${why}; this paused copy stays`);
          this.context.registry.update(name, { outgoing: { ...out, interrupted: why } });
          return;
        }
        await sleep(delay, undefined, { ref: false });
        delay = Math.min(delay * 2, 10_000);
      }
    } finally {
      this.resolving.delete(name);
    }
  }
}
