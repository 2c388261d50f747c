// migrate's forecast line and the ETA that starts from the forecast: the forecast's time left
// in round 0, the agent's estimate once rounds give one, never running backwards.
import { describe, expect, test } from 'vitest';
import { ForecastEta, forecastFirstLine } from '../../agent/cli/forecast-eta.js';
import type { OptionSummary } from '../../agent/planner/choose.js';
import type { MigrationProgress } from '../../agent/migration/source.js';

const forecast = {
  technique: 'precopy', strategy: 'gang', totalMs: 2000, downtimeMs: 96, wireBytes: 64 * 1024 * 1024, guestStallShare: 0, workloadBytesPerSec: null, completes: true, withinBudget: true, keepsSla: true, rateBytesPerSec: 1e8,
  guests: [{ name: 'vm1', totalMs: 2000, downtimeMs: 96, wireBytes: 64 * 1024 * 1024, faults: 0, rounds: 2, ending: 'stop-and-copy after 2 rounds' }],
} as OptionSummary;

const report = (convergence?: MigrationProgress['convergence']) => ({ guest: 'vm1', convergence }) as MigrationProgress;

describe('migrate forecast', () => {
  test('the first line: who, how, time, downtime and wire bytes', () => {
    expect(forecastFirstLine(forecast)).toBe('forecast: vm1 by precopy in 2.00 s, downtime 96 ms, 64.0 MiB on the wire');
  });

  test('round 0: the forecast`s time left; then the agent`s estimate, never above what was shown', () => {
    const eta = new ForecastEta(forecast);
    expect(eta.apply(report(), 1000).suffix).toBe(' · ETA 2.00 s (forecast)');
    expect(eta.apply(report(), 1500).suffix).toBe(' · ETA 1.50 s (forecast)');
    const converging = { dirtyRateBytesPerSec: 1, predictedDowntimeMs: 50, converging: true };
    // The agent now says 3 s: more than the 1.5 s shown, so the ETA holds.
    expect(eta.apply(report({ ...converging, totalEtaMs: 3000 }), 1600).progress.convergence?.totalEtaMs).toBe(1500);
    // It says 400 ms: the correction is taken.
    expect(eta.apply(report({ ...converging, totalEtaMs: 400 }), 1700).progress.convergence?.totalEtaMs).toBe(400);
    // Not converging: nothing to say (the line says so itself).
    expect(eta.apply(report({ ...converging, converging: false, totalEtaMs: undefined }), 1800)).toMatchObject({ suffix: '' });
  });

  test('a guest the forecast does not name is shown as reported', () => {
    const eta = new ForecastEta(forecast);
    const other = { guest: 'vm2' } as MigrationProgress;
    expect(eta.apply(other, 0)).toEqual({ progress: other, suffix: '' });
  });
});
