// Settings changed on a running migration (gangway migrate-set, gangway postcopy): which
// phase takes which change, and the engine reading them at its next batch and round, driven
// through the in-memory destination with a clock that moves only as the engine reads it.
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../protocol/errors.js';
import type { Clock } from '../../agent/migration/flow.js';
import { postcopyRefusal, settingsRefusal } from '../../agent/migration/mid-flight.js';
import { SourceMigration, type SourceOptions } from '../../agent/migration/source.js';
import type { SourcePhase } from '../../agent/migration/source-state.js';
import { summaryText } from '../../agent/cli/format.js';
import { MemoryDestination, MemoryGuest } from '../helpers/memory-migration.js';

const log = pino({ level: 'silent' });
const PAGE = 4096;

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
    migrationId: 'm-mid-flight',
    peerAddress: 'memory',
    downtimeBudgetMs: 600_000,
    maxRounds: 30,
    maxWireBytes: 2 ** 40,
    force: false,
    codec: 'raw',
    tracker: 'uffd-wp',
    batchBytes: 16 * 1024,
    digestBytesPerSec: 1e12,
    commitTimeoutMs: 5_000,
    clock: steppingClock(),
    openRegion: guest.openRegion,
    ...overrides,
  };
}

/** A guest of 64 pages of text that writes 3 pages before every collect while it runs; `onCollect` sees the collect's number. */
function writingGuest(onCollect: (collects: number) => void = () => {}): MemoryGuest {
  const guest = new MemoryGuest('g1', [64 * PAGE], Buffer.alloc(0));
  const memory = guest.memories[0]!;
  for (let page = 0; page < 64; page++) memory.fill(`page ${page} `, page * PAGE, (page + 1) * PAGE);
  let collects = 0;
  guest.trackers[0]!.beforeCollect = () => {
    if (guest.paused) return;
    collects++;
    for (let k = 0; k < 3; k++) guest.write(0, (collects * 7 + k * 5) % 64, (collects * 31 + k) & 0xff);
    onCollect(collects);
  };
  return guest;
}

describe('settingsRefusal', () => {
  const PHASES: [SourcePhase, boolean][] = [
    ['offering', true],
    ['precopy', true],
    ['stopping', false],
    ['verifying', false],
    ['committing', false],
    ['postcopy-switch', false],
    ['committed', false],
    ['failed', false],
    ['in-doubt', false],
    ['interrupted', false],
  ];
  it.each(PHASES)('%s: changes taken = %s', (phase, taken) => {
    expect(settingsRefusal(phase, { downtimeMs: 10 }, true) === undefined).toBe(taken);
    expect(settingsRefusal(phase, { bandwidthBytesPerSec: 1e6 }, false) === undefined).toBe(taken);
  });
  it('post-copy takes a new rate for a pacer it has, nothing else', () => {
    expect(settingsRefusal('postcopy', { bandwidthBytesPerSec: 1e6 }, true)).toBeUndefined();
    expect(settingsRefusal('postcopy', { bandwidthBytesPerSec: 1e6 }, false)).toMatch(/without a --bandwidth cap/);
    expect(settingsRefusal('postcopy', { downtimeMs: 10 }, true)).toMatch(/no downtime left/);
    expect(settingsRefusal('committing', { downtimeMs: 10 }, true)).toMatch(/at its switchover \(committing\)/);
    expect(settingsRefusal('committed', { downtimeMs: 10 }, true)).toBe('is over (committed)');
  });
});

describe('postcopyRefusal', () => {
  const base = { phase: 'precopy' as SourcePhase, technique: 'hybrid' as const, peerCanPostcopy: true, peerAddress: '10.0.0.2:7401' };
  it('a hybrid in pre-copy to a destination that can post-copy switches', () => {
    expect(postcopyRefusal(base)).toBeUndefined();
    expect(postcopyRefusal({ ...base, phase: 'offering' })).toBeUndefined();
  });
  it('refuses a pre-copy offer, a destination without post-copy, post-copy, the switchover and the end', () => {
    expect(postcopyRefusal({ ...base, technique: 'precopy' })).toMatch(/offered to 10.0.0.2:7401 as pre-copy.*--technique hybrid/);
    expect(postcopyRefusal({ ...base, peerCanPostcopy: false })).toMatch(/cannot run post-copy.*'postcopy' feature/);
    expect(postcopyRefusal({ ...base, technique: 'postcopy' })).toBe('is already in post-copy');
    expect(postcopyRefusal({ ...base, phase: 'postcopy' })).toBe('is already in post-copy');
    expect(postcopyRefusal({ ...base, phase: 'stopping' })).toMatch(/at its switchover \(stopping\)/);
    expect(postcopyRefusal({ ...base, phase: 'failed' })).toBe('is over (failed)');
  });
});

describe('a running migration takes new settings', () => {
  it('a downtime budget raised mid-flight lets a pre-copy that could not meet the old one stop at the next decision', async () => {
    let migration: SourceMigration | undefined;
    let changedAtCollect = 0;
    const guest = writingGuest((collects) => {
      if (collects !== 3) return;
      changedAtCollect = collects;
      const answer = migration!.changeSettings({ downtimeMs: 600_000 });
      expect(answer.previous).toEqual({ bandwidthBytesPerSec: null, downtimeMs: 1 });
      expect(answer.current).toEqual({ bandwidthBytesPerSec: null, downtimeMs: 600_000 });
    });
    migration = new SourceMigration(guest, new MemoryDestination(), options(guest, { downtimeBudgetMs: 1, maxRounds: 1000 }), log);
    const summary = await migration.run();
    expect(changedAtCollect).toBe(3);
    // Rounds 0-1 decided under 1 ms and went on; round 2's decision took the new budget.
    expect(summary.rounds.map((r) => r.final)).toEqual([false, false, false, true]);
    expect(summary.rounds[1]!.decision).toMatch(/budget 1 ms/);
    expect(summary.rounds[2]!.decision).toMatch(/final round fits the budget: .*budget 600000 ms/);
    expect(summary).toMatchObject({ downtimeBudgetMs: 600_000, downtimeBudgetMet: true });
    expect(summary.operatorChanges).toEqual([{ afterMs: expect.any(Number), downtimeMs: 600_000 }]);
    expect(summaryText(summary)).toMatch(/\n {2}changed {6}downtime budget 600000 ms at /);
  });

  it('without the change the same migration runs into its round limit (the test above is not vacuous)', async () => {
    const guest = writingGuest();
    const migration = new SourceMigration(guest, new MemoryDestination(), options(guest, { downtimeBudgetMs: 1, maxRounds: 5 }), log);
    await expect(migration.run()).rejects.toMatchObject({ code: ErrorCode.NON_CONVERGENCE });
  });

  it('a first --bandwidth given before round 0 paces it: the round takes the time its bytes need at that rate', async () => {
    const rate = 100_000;
    const guest = writingGuest();
    const migration = new SourceMigration(guest, new MemoryDestination(), options(guest), log);
    expect(migration.changeSettings({ bandwidthBytesPerSec: rate }).previous.bandwidthBytesPerSec).toBeNull();
    const summary = await migration.run();
    const round0 = summary.rounds[0]!;
    // One batch of burst (16 KiB) goes ahead of the rate; the rest waits on the pacer.
    expect(round0.durationMs).toBeGreaterThanOrEqual(((round0.wireBytes - 2 * 16 * 1024) / rate) * 1000);
    expect(summary.bandwidthBytesPerSec).toBe(rate);
    expect(summary.operatorChanges).toEqual([{ afterMs: expect.any(Number), bandwidthBytesPerSec: rate }]);

    const unpaced = writingGuest();
    const plain = await new SourceMigration(unpaced, new MemoryDestination(), options(unpaced), log).run();
    expect(plain.rounds[0]!.durationMs).toBeLessThan(round0.durationMs / 10);
    expect(plain.bandwidthBytesPerSec).toBeUndefined();
  });

  it('a paced round costs its wire bytes: LZ4 batches take the pacer what they put on the link, not what they decompress to', async () => {
    const rate = 100_000;
    const round0 = async (codec: 'raw' | 'lz4') => {
      const guest = writingGuest();
      return (await new SourceMigration(guest, new MemoryDestination(), options(guest, { codec, bandwidthBytesPerSec: rate }), log).run()).rounds[0]!;
    };
    const raw = await round0('raw');
    const lz4 = await round0('lz4');
    // The text pages compress to a fraction: the same cap moves them that much faster.
    expect(lz4.wireBytes).toBeLessThan(raw.wireBytes / 4);
    expect(lz4.durationMs).toBeLessThan(raw.durationMs / 3);
    // Held to the cap all the same (one batch of burst ahead of it).
    expect(lz4.durationMs).toBeGreaterThanOrEqual(((lz4.wireBytes - 2 * 16 * 1024) / rate) * 1000);
  });

  it('a new rate for a paced migration takes effect at its next batch: a faster rate shortens the later rounds', async () => {
    let migration: SourceMigration | undefined;
    const guest = writingGuest((collects) => {
      if (collects === 1) migration!.changeSettings({ bandwidthBytesPerSec: 1e9 });
    });
    migration = new SourceMigration(guest, new MemoryDestination(), options(guest, { bandwidthBytesPerSec: 50_000, downtimeBudgetMs: 1, maxRounds: 4, force: true }), log);
    const summary = await migration.run();
    expect(summary.bandwidthBytesPerSec).toBe(1e9);
    // Round 0 (256 KiB at 50 kB/s) took seconds; the rounds after it a few batches at 1 GB/s.
    expect(summary.rounds[0]!.durationMs).toBeGreaterThan(4_000);
    for (const round of summary.rounds.slice(1)) expect(round.durationMs).toBeLessThan(100);
  });

  it('refuses a change once the migration is over, and post-copy for a pre-copy offer', async () => {
    const guest = writingGuest();
    const migration = new SourceMigration(guest, new MemoryDestination({ features: ['repair', 'postcopy'] }), options(guest), log);
    expect(() => migration.requestPostcopy()).toThrow(/was offered to memory as pre-copy/);
    await migration.run();
    expect(() => migration.changeSettings({ downtimeMs: 5 })).toThrow(/migration m-mid-flight of g1 is over \(committed\)/);
    expect(() => migration.requestPostcopy()).toThrow(/is over \(committed\)/);
  });
});
