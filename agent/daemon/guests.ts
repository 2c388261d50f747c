// The guests of this host as the control API sees them: started, stopped, resumed after a
// switchover in doubt, and their status (tracker, shim counters, where they came from or
// are going). Migrations move them; this is everything else done to them.
import { randomBytes } from 'node:crypto';
import { lstatSync, readFileSync, rmSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { AgentConfig } from '../daemon.js';
import { GUEST_PAGE_SIZE } from '../guest/guest-header.js';
import { launchProcessGuest, processState, regionSizesProblem, removeGuestFiles, type ProcessGuestSpec } from '../guest/process-guest.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { Logger } from '../log.js';
import type { SourceMigration } from '../migration/source.js';
import { parseShimReport } from '../tracker/uffd-wp.js';

export interface GuestServiceContext {
  config: Pick<AgentConfig, 'memoryDir' | 'tracker'>;
  registry: GuestRegistry;
  log: Logger;
  /** Is the agent shutting down? Then no guest starts. */
  shuttingDown: () => boolean;
  /** Is guest `name` leaving this host? */
  isMigrating: (name: string) => boolean;
  /** The migration of guest `name` leaving this host now, with its id. */
  outgoingOf: (name: string) => [migrationId: string, migration: Pick<SourceMigration, 'cancellable' | 'options'>] | undefined;
  /** Pages a post-copy migration arriving here still lacks (undefined once it is over). */
  incomingMissingPages: (migrationId: string) => number | undefined;
}

export class GuestService {
  constructor(private readonly context: GuestServiceContext) {}

  async startGuest(name: string, spec: ProcessGuestSpec, tap?: string): Promise<{ name: string; pid: number; memoryPath: string; memoryPaths: string[] }> {
    if (this.context.shuttingDown()) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down');
    const tapOwner = tap === undefined ? undefined : this.context.registry.list().find(({ record }) => record.tap === tap);
    if (tapOwner) throw new GangwayError(ErrorCode.BAD_REQUEST, `TAP device ${tap} is already guest ${tapOwner.record.name}'s`);
    if (spec.memoryBytes % GUEST_PAGE_SIZE !== 0) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `memory size ${spec.memoryBytes} is not a multiple of ${GUEST_PAGE_SIZE} bytes`);
    }
    const regions = spec.regionBytes ?? [spec.memoryBytes];
    const problem = regionSizesProblem(regions);
    if (problem) throw new GangwayError(ErrorCode.BAD_REQUEST, `memory regions ${regions.join(', ')}: ${problem}`);
    this.context.registry.reserve(name);
    const files = this.context.registry.filesFor(name, this.context.config.memoryDir, randomBytes(4).toString('hex'), regions.length);
    // The guest refuses a path that exists (O_EXCL): whatever is there is not ours to remove below.
    const taken = [...files.memoryPaths, files.deviceStatePath!].find((path) => lstatSync(path, { throwIfNoEntry: false }));
    if (taken) {
      this.context.registry.release(name);
      throw new GangwayError(ErrorCode.GUEST_FAILED, `${taken} exists already: something else made it; remove it or start the guest again (a new name is picked each time)`);
    }
    try {
      const launched = launchProcessGuest({ files, create: spec });
      await launched.running;
      this.context.registry.add({
        name,
        kind: 'process',
        pid: launched.pid,
        memoryBytes: spec.memoryBytes,
        pageSizeBytes: GUEST_PAGE_SIZE,
        files,
        spec,
        origin: { kind: 'started' },
        startedAt: new Date().toISOString(),
        ...(tap === undefined ? {} : { tap }),
      });
      this.context.log.info({ guest: name, pid: launched.pid, memoryBytes: spec.memoryBytes }, 'guest started');
      return { name, pid: launched.pid, memoryPath: files.memoryPaths[0]!, memoryPaths: files.memoryPaths };
    } catch (err) {
      this.context.registry.release(name);
      removeGuestFiles(files);
      throw err;
    }
  }

  async stopGuest(name: string): Promise<void> {
    const { guest } = this.context.registry.get(name);
    if (this.context.isMigrating(name)) {
      const [id, running] = this.context.outgoingOf(name) ?? [];
      // Past its switchover a migration can no longer be cancelled: then waiting is the advice.
      const cancel = id && running?.cancellable ? ` (to ${running.options.peerAddress}), or cancel it with \`gangway cancel ${id.slice(0, 8)}\`: the guest then stays on this host` : '';
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated; wait for the migration to end${cancel}`);
    }
    await guest.stop();
    // A deleted guest leaves nothing behind, its log included.
    removeGuestFiles(guest.files);
    rmSync(guest.files.logPath, { force: true });
    this.context.registry.remove(name);
    this.context.log.info({ guest: name }, 'guest stopped');
  }

  /** SIGCONT a paused guest (after a switchover left in doubt, once the operator has checked). */
  resumeGuest(name: string): void {
    const { guest, record } = this.context.registry.get(name);
    if (record.outgoing?.phase === 'postcopy') {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} runs at ${record.outgoing.to} since the post-copy switchover of migration ${record.outgoing.migrationId}; ` +
          'this paused copy holds the pages it may still lack there, so it must not run here. Check `gangway status` on the destination; ' +
          `once the guest is complete there, \`gangway guest stop ${name}\` frees this copy`,
      );
    }
    if (record.outgoing) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} may run at ${record.outgoing.to}: the commit of migration ${record.outgoing.migrationId} was sent and not confirmed. ` +
          'This agent asks the destination until it answers, then removes this copy or resumes it, so that the guest runs in exactly one place',
      );
    }
    if (record.incoming?.stranded) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} never received all of its memory from ${record.incoming.from} (${record.incoming.stranded}); resuming it would let it read missing pages as zeros`,
      );
    }
    if (this.context.isMigrating(name)) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated`);
    }
    guest.resume();
  }

  guestStatus() {
    return this.context.registry.list().map(({ record, guest }) => {
      let tracker: { kind: string; reason?: string };
      try {
        parseShimReport(readFileSync(record.files.trackReportPath, 'utf8'));
        tracker = { kind: this.context.config.tracker === 'hash-scan' ? 'hash-scan' : 'uffd-wp' };
      } catch (err) {
        tracker = { kind: 'hash-scan', reason: (err as Error).message };
      }
      let header;
      try {
        header = guest.header();
      } catch {}
      return {
        name: record.name,
        pid: record.pid,
        state: !guest.alive() ? 'dead' : guest.isPaused || processState(record.pid) === 'T' ? 'paused' : 'running',
        memoryBytes: record.memoryBytes,
        /** Region 0's file (kept for scripts written before guests had regions). */
        memoryPath: record.files.memoryPaths[0]!,
        memoryPaths: record.files.memoryPaths,
        regionBytes: guest.regions.map((region) => region.lengthBytes),
        origin: record.origin,
        tracker,
        ...(record.outgoing ? { outgoing: record.outgoing } : {}),
        ...(record.incoming ? { incoming: { ...record.incoming, missingPages: this.context.incomingMissingPages(record.incoming.migrationId) ?? record.incoming.missingPages } } : {}),
        ...(header
          ? {
              passes: header.passes,
              totalWrites: header.totalWrites,
              stalePages: header.stalePages,
              metaErrors: header.metaErrors,
              resumes: header.resumes,
              resumeCheckDone: header.resumeCheckDone,
              resumeStalePages: header.resumeStalePages,
              passesAtResume: header.passesAtResume,
              dirtyRateBytesPerSec: header.dirtyRateBytesPerSec,
              profile: header.profile,
              deviceLoads: header.deviceLoads,
              deviceSaves: header.deviceSaves,
              deviceErrors: header.deviceErrors,
            }
          : {}),
      };
    });
  }
}
