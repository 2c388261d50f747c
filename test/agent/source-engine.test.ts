// The source engine, rounds to commit, driven through the in-memory destination: no sockets,
// no addon. A guest of two regions with a device state; its writes between rounds are what
// the trackers report; the destination decodes every frame and holds what it was sent.
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../protocol/errors.js';
import { DroppingTracker } from '../../agent/migration/faults.js';
import type { Clock } from '../../agent/migration/flow.js';
import { SourceMigration, type SourceOptions } from '../../agent/migration/source.js';
import type { GuestRegistry } from '../../agent/guest/registry.js';
import { summaryText } from '../../agent/cli/format.js';
import { MemoryDestination, MemoryGuest } from '../helpers/memory-migration.js';

const log = pino({ level: 'silent' });
const PAGE = 4096;

/** A fake clock: time moves only as the engine reads it (0.1 ms a reading), and sleeps pass at once. */
function steppingClock(): Clock {
  let now = 0;
  return {
    now: () => (now += 0.1),
    sleep: async (ms) => {
      now += ms;
    },
  };
}

function options(guest: MemoryGuest, overrides: Partial<SourceOptions> = {}): SourceOptions {
  return {
    migrationId: 'm-unit',
    peerAddress: 'memory',
    downtimeBudgetMs: 600_000,
    maxRounds: 30,
    maxWireBytes: 2 ** 40,
    force: false,
    codec: 'auto',
    tracker: 'uffd-wp',
    batchBytes: 256 * 1024,
    digestBytesPerSec: 1e12,
    commitTimeoutMs: 5_000,
    clock: steppingClock(),
    openRegion: guest.openRegion,
    ...overrides,
  };
}

/** A guest of two regions (64 and 32 pages), some of each page zero, some text, some random. */
function guestWithContent(deviceState = Buffer.from('device state: counters 1 2 3')): MemoryGuest {
  const guest = new MemoryGuest('g1', [64 * PAGE, 32 * PAGE], deviceState);
  for (const [region, memory] of guest.memories.entries()) {
    for (let page = 0; page < memory.length / PAGE; page++) {
      if (page % 3 === 0) continue; // zero
      memory.fill(`region ${region} page ${page} `, page * PAGE, (page + 1) * PAGE);
    }
  }
  return guest;
}

/** Writes a few pages of each region whenever the trackers collect, while the guest runs. */
function keepWriting(guest: MemoryGuest): { writes: number } {
  const state = { writes: 0 };
  guest.trackers[0]!.beforeCollect = () => {
    if (guest.paused) return;
    state.writes++;
    for (const [region, memory] of guest.memories.entries()) {
      const pages = memory.length / PAGE;
      for (let k = 0; k < 3; k++) guest.write(region, (state.writes * 7 + k * 5 + region) % pages, (state.writes * 31 + k) & 0xff);
    }
  };
  return state;
}

function expectSameMemory(guest: MemoryGuest, destination: MemoryDestination): void {
  expect(destination.memories).toHaveLength(guest.memories.length);
  guest.memories.forEach((memory, i) => expect(destination.memories[i]!.equals(memory), `region ${i}`).toBe(true));
}

describe('source engine through the in-memory destination', () => {
  it('moves every region and the device state: rounds while the guest writes, then stop-and-copy, verify and commit', async () => {
    const guest = guestWithContent();
    const writing = keepWriting(guest);
    const destination = new MemoryDestination();
    const migration = new SourceMigration(guest, destination, options(guest, { downtimeBudgetMs: 1, maxRounds: 3, force: true }), log);
    const summary = await migration.run();

    expect(writing.writes).toBeGreaterThanOrEqual(3);
    expectSameMemory(guest, destination);
    expect(destination.deviceState?.equals(guest.deviceState)).toBe(true);
    expect(summary.deviceStateBytes).toBe(guest.deviceState.length);
    expect(summary.digests).toHaveLength(2);
    expect(summary.memoryBytes).toBe(96 * PAGE);
    expect(summary.forced).toBe(true);
    // A budget of 1 ms cannot be met: the summary says so (and the log warns).
    expect(summary).toMatchObject({ downtimeBudgetMs: 1, downtimeBudgetMet: false });
    expect(summaryText(summary)).toMatch(/downtime .*; budget \S+ ms EXCEEDED\n/);
    expect(summary.rounds.map((r) => r.final)).toEqual([false, false, false, true]);
    expect(summary.rounds[0]!.pages).toBe(96);
    expect(summary.rounds[0]!.zeroPages).toBe(22 + 11); // pages 0, 3, 6, ... of each region
    expect(summary.rounds[1]!.pages).toBe(6); // three writes in each region
    expect(summary.repairedPages).toBe(0);
    expect(destination.committed).toBe(true);
    expect(guest.pauses).toBe(1);
    expect(guest.resumes).toBe(0);
    expect(guest.discarded).toBe(true);
    expect(migration.phase).toBe('committed');
    // Everything the migration opened is closed.
    expect(guest.readers.every((reader) => reader.closed)).toBe(true);
    expect(guest.trackers.every((tracker) => tracker.closed)).toBe(true);
    // One roundEnd per round (not per region), pages before it.
    expect(destination.frames.filter((type) => type === 'roundEnd')).toHaveLength(4);
  });

  it('stops after round 0 when the final round fits the budget', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination();
    const summary = await new SourceMigration(guest, destination, options(guest), log).run();
    expect(summary.rounds).toHaveLength(2);
    expect(summary.rounds[0]!.decision).toMatch(/final round fits the budget/);
    expect(summary.forced).toBe(false);
    expect(summary).toMatchObject({ downtimeBudgetMs: 600_000, downtimeBudgetMet: true });
    expect(summaryText(summary)).toMatch(/; budget \S+ (ms|s) met\n/);
    expectSameMemory(guest, destination);
  });

  it('fails at a limit without --force, and the guest runs on, never paused', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination();
    const migration = new SourceMigration(guest, destination, options(guest, { downtimeBudgetMs: 1, maxRounds: 2 }), log);
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.NON_CONVERGENCE, message: expect.stringMatching(/does not converge.*The guest keeps running on this host/) });
    expect(guest.pauses).toBe(0);
    expect(guest.paused).toBe(false);
    expect(migration.phase).toBe('failed');
    expect(destination.aborted?.code).toBe(ErrorCode.NON_CONVERGENCE);
    expect(guest.readers.every((reader) => reader.closed)).toBe(true);
  });

  it('catches a dirty bit the tracker dropped with the digests, and repairs the page inside the downtime', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination();
    const migration = new SourceMigration(
      guest,
      destination,
      options(guest, { downtimeBudgetMs: 1, maxRounds: 2, force: true, wrapTracker: (tracker, index) => (index === 1 ? new DroppingTracker(tracker, 2, log) : tracker) }),
      log,
    );
    const summary = await migration.run();
    expect(summary.repairedPages).toBe(2);
    expect(summary.rounds.at(-1)!.pages).toBe(2); // the repair round: exactly the dropped pages
    expectSameMemory(guest, destination);
    expect(destination.committed).toBe(true);
  });

  it('without repair on the destination, a dropped dirty bit fails the migration at the digests and the guest resumes here', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination({ features: [] });
    const migration = new SourceMigration(guest, destination, options(guest, { downtimeBudgetMs: 1, maxRounds: 2, force: true, wrapTracker: (tracker) => new DroppingTracker(tracker, 1, log) }), log);
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.DIGEST_MISMATCH });
    expect(guest.pauses).toBe(1);
    expect(guest.resumes).toBe(1);
    expect(guest.paused).toBe(false);
    expect(guest.discarded).toBe(false);
    expect(destination.committed).toBe(false);
  });

  it('journals the commit record while the destination checks its digests, and a mismatch after it clears the record as it resumes the guest', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination({ features: [] });
    const registry = new RecordingRegistry(guest.name);
    const migration = new SourceMigration(
      guest,
      destination,
      options(guest, { downtimeBudgetMs: 1, maxRounds: 2, force: true, registry: registry.asRegistry(), wrapTracker: (tracker) => new DroppingTracker(tracker, 1, log) }),
      log,
    );
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.DIGEST_MISMATCH });
    // 'commit' was written before the verdict came (its write overlaps the destination's check) ...
    expect(registry.phases).toEqual(['paused', 'commit', undefined]);
    expect(destination.committed).toBe(false);
    // ... and the failure cleared it: the guest runs here again, and nothing says otherwise.
    expect(registry.record.outgoing).toBeUndefined();
    expect(guest.resumes).toBe(1);
  });

  it("with 'standby-ready', the guest pauses only once the destination says its standby is up", async () => {
    const guest = guestWithContent();
    // Longer than a pre-copy of this small guest takes to reach its switchover.
    const destination = new MemoryDestination({ features: ['repair', 'standby-ready'], standbyReady: 400 });
    const migration = new SourceMigration(guest, destination, options(guest), log);
    const started = performance.now();
    const summary = await migration.run();
    expect(summary.verified).toBe(true);
    expect(performance.now() - started).toBeGreaterThanOrEqual(400);
    const pausedAt = destination.frames.indexOf('pause');
    expect(pausedAt).toBeGreaterThan(0);
    expect(destination.framesBeforeStandbyReady).toBeDefined();
    expect(pausedAt).toBeGreaterThanOrEqual(destination.framesBeforeStandbyReady!);
    // The rounds went on meanwhile: it held back the pause only.
    expect(destination.framesBeforeStandbyReady!).toBeGreaterThan(2);
  });

  it("a destination whose standby does not come up ends the migration before the pause, and the guest runs on", async () => {
    const guest = guestWithContent();
    const destination = new MemoryDestination({ features: ['repair', 'standby-ready'], standbyReady: 'fails' });
    const migration = new SourceMigration(guest, destination, options(guest), log);
    await expect(migration.run()).rejects.toMatchObject({ message: expect.stringMatching(/did not come up/) });
    expect(guest.pauses).toBe(0);
    expect(destination.frames).not.toContain('pause');
  });

  it('a sink that fails in the middle of round 0 ends the migration, and the source guest runs on', async () => {
    const guest = guestWithContent();
    const destination = new MemoryDestination({ breakAfterPages: 40 });
    const migration = new SourceMigration(guest, destination, options(guest, { batchBytes: 16 * PAGE }), log);
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.PEER_GONE, message: expect.stringMatching(/failed during precopy.*keeps running on this host/) });
    expect(guest.pauses).toBe(0);
    expect(migration.phase).toBe('failed');
    expect(destination.pagesReceived).toBeLessThan(96);
    expect(guest.readers.every((reader) => reader.closed)).toBe(true);
    expect(guest.trackers.every((tracker) => tracker.closed)).toBe(true);
  });

  it('a destination that refuses the device state fails the migration at the switchover, and the paused guest resumes here', async () => {
    // The refusal lands while the source reads its digests: the verify it then sends meets a
    // failed link. That must reject the migration, not escape as an unhandled rejection.
    const guest = guestWithContent();
    const destination = new MemoryDestination({ refuseDeviceState: true });
    const migration = new SourceMigration(guest, destination, options(guest), log);
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.LIMIT, message: expect.stringMatching(/device state of \d+ bytes is over/) });
    expect(guest.pauses).toBe(1);
    expect(guest.resumes).toBe(1);
    expect(guest.paused).toBe(false);
    expect(destination.committed).toBe(false);
    expect(migration.phase).toBe('failed');
  });

  it('cancel before the commit stops at the next step and resumes a paused guest', async () => {
    const guest = guestWithContent();
    keepWriting(guest);
    const destination = new MemoryDestination();
    const migration = new SourceMigration(guest, destination, options(guest, { downtimeBudgetMs: 1, maxRounds: 50, force: true }), log);
    const running = migration.run();
    migration.once('progress', () => migration.cancel('test cancel'));
    await expect(running).rejects.toMatchObject({ code: ErrorCode.ABORTED });
    expect(guest.paused).toBe(false);
    expect(destination.committed).toBe(false);
    expect(destination.aborted?.message).toMatch(/test cancel/);
  });

  it('refuses dedup slots that do not match the regions', () => {
    const guest = guestWithContent();
    expect(() => new SourceMigration(guest, new MemoryDestination(), options(guest, { dedup: { group: {} as never, slots: [0] } }), log)).toThrow(/1 dedup slots for 2 regions/);
  });
});

/**
 * A guest registry that keeps one record in memory and the outgoing phase of every update,
 * in order (undefined: the outgoing mark was cleared).
 */
class RecordingRegistry {
  record: { name: string; outgoing?: { phase: string } };
  readonly phases: (string | undefined)[] = [];

  constructor(name: string) {
    this.record = { name };
  }

  asRegistry(): GuestRegistry {
    const fake = {
      get: () => ({ record: this.record }),
      update: (_name: string, patch: { outgoing?: { phase: string } }) => {
        this.record = { ...this.record, ...patch };
        if ('outgoing' in patch) {
          if (patch.outgoing === undefined) delete this.record.outgoing;
          this.phases.push(patch.outgoing?.phase);
        }
      },
    };
    return fake as unknown as GuestRegistry;
  }
}
