// Progress as a migration reports it and the CLI prints it: the disks apart, with an ETA that
// never goes up.
import { describe, expect, it } from 'vitest';
import { progressLine } from '../../agent/cli/format.js';
import { liveProgressLine, ProgressThrottle } from '../../agent/cli/observe-format.js';
import { NonIncreasingEta, ProgressReporter } from '../../agent/migration/rounds.js';
import type { MigrationProgress, SourceRun } from '../../agent/migration/source-types.js';

const MiB = 1024 * 1024;

describe('NonIncreasingEta', () => {
  it('takes each estimate that is lower and holds the last one when a new one is higher', () => {
    const eta = new NonIncreasingEta();
    expect(eta.value).toBeUndefined();
    expect([5000, 4000, 6000, 4500, 1000, 0, 20].map((ms) => eta.update(ms))).toEqual([5000, 4000, 4000, 4000, 1000, 0, 0]);
    expect(eta.value).toBe(0);
  });
});

describe('progressLine', () => {
  const base: MigrationProgress = {
    migrationId: 'm',
    guest: 'vm1',
    phase: 'precopy',
    round: 2,
    roundPages: 3000,
    roundPagesSent: 1500,
    percent: 50,
    rateBytesPerSec: 100 * MiB,
    etaMs: 60,
    wireBytes: 300 * MiB,
  };

  it("shows the disks' blocks, their rate and their ETA apart from the round's", () => {
    const line = progressLine({ ...base, disk: { roundBlocks: 2000, roundBlocksSent: 500, rateBytesPerSec: 20 * MiB, etaMs: 1500, blocksSent: 70_000 } });
    expect(line).toBe('vm1: round 2 · 50.0% of 3000 pages (disks 25% of 2000 blocks at 20.0 MiB/s, ETA 1.50 s) · 100.0 MiB/s · round ETA 60.0 ms · wire 300.0 MiB');
    expect(progressLine(base)).not.toMatch(/disks/);
  });

  it("shows the whole migration's ETA once the policy has one, and 'not converging' instead of a round's ETA when it says so", () => {
    const converging = { dirtyRateBytesPerSec: 10 * MiB, predictedDowntimeMs: 50, converging: true, totalEtaMs: 4200 };
    expect(progressLine({ ...base, convergence: converging })).toBe('vm1: round 2 · 50.0% of 3000 pages · 100.0 MiB/s · dirty 10.0 MiB/s · ETA 4.20 s · wire 300.0 MiB');
    // The report of the KubeVirt-style complaint: a round's 3.27 s on a migration that never converges.
    const line = progressLine({ ...base, etaMs: 3270, convergence: { ...converging, converging: false, totalEtaMs: undefined } });
    expect(line).toContain('not converging');
    expect(line).not.toMatch(/ETA/);
  });
});

describe('the whole migration in progress reports', () => {
  const makeReporter = () => {
    let nowMs = 0;
    const emitted: MigrationProgress[] = [];
    const run = { clock: { now: () => nowMs }, options: { migrationId: 'm' }, guest: { name: 'vm1' }, state: { phase: 'precopy' }, emitProgress: (p: MigrationProgress) => emitted.push(p) } as unknown as SourceRun;
    return { reporter: new ProgressReporter(run), emitted, at: (ms: number) => (nowMs = ms) };
  };

  it('has no whole ETA before round 0 ends, then one that never goes up, and none while not converging', () => {
    const { reporter, emitted, at } = makeReporter();
    reporter.startRound(0);
    at(1000);
    reporter.report(0, 1000, 500, 4096, 0, 2 * MiB);
    expect(emitted[0]!.convergence).toBeUndefined();
    expect(emitted[0]!.wireRateBytesPerSec).toBe(2 * MiB);
    // Round 1 sends 2,048,000 B/s (500 pages of 4 KiB in 1 s); the guest dirties a quarter of that.
    reporter.decided(512_000, { predictedDowntimeMs: 40, converging: true });
    reporter.startRound(4 * MiB);
    at(2000);
    reporter.report(1, 1000, 500, 4096, 1000, 6 * MiB);
    const first = emitted[1]!.convergence!;
    // 500 pages left at that rate = 1000 ms, / (1 - 0.25) = 1333 ms, + 40 ms downtime.
    expect(first.totalEtaMs).toBeCloseTo(1000 / 0.75 + 40, 0);
    expect(first).toMatchObject({ dirtyRateBytesPerSec: 512_000, predictedDowntimeMs: 40, converging: true });
    // The guest dirties faster: the estimate would go up; it holds.
    reporter.decided(1024 * 1024, { predictedDowntimeMs: 80, converging: true });
    at(2100);
    reporter.report(1, 1000, 520, 4096, 1000, 6 * MiB);
    expect(emitted[2]!.convergence!.totalEtaMs).toBe(first.totalEtaMs);
    reporter.decided(4 * MiB, { predictedDowntimeMs: 900, converging: false });
    at(2200);
    reporter.report(2, 1000, 600, 4096, 2000, 7 * MiB);
    expect(emitted[3]!.convergence).toMatchObject({ converging: false, totalEtaMs: undefined });
    expect(liveProgressLine(emitted[3]!)).toMatch(/dirty 4\.0 MiB\/s, expected downtime 900\.0 ms, not converging/);
    expect(liveProgressLine(emitted[1]!)).toMatch(/^vm1: round 1, 50\.0% of 1000 pages; memory 2\.0 MiB\/s, wire 2\.0 MiB\/s, dirty 500\.0 KiB\/s, expected downtime 40\.0 ms, ETA 1\.37 s; 6\.0 MiB sent$/);
  });
});

describe('ProgressThrottle', () => {
  const p = (round: number, phase: MigrationProgress['phase'] = 'precopy') => ({ migrationId: 'm', round, phase }) as MigrationProgress;

  it('lets a line through every interval, and at once when a round or phase starts', () => {
    const throttle = new ProgressThrottle(2000);
    expect([0, 500, 1999, 2000, 2100].map((ms) => throttle.take(p(0), ms))).toEqual([true, false, false, true, false]);
    expect(throttle.take(p(1), 2200)).toBe(true);
    expect(throttle.take(p(1), 2300)).toBe(false);
    expect(throttle.take(p(1, 'stopping'), 2400)).toBe(true);
  });
});
