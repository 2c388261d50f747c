// A migration's forecast beside its outcome: the error, the dirty rate the tracker measured,
// the records a followed plan hands each guest, and the history entries calibration fits.
import { describe, expect, test } from 'vitest';
import { forecastRecords, measuredDirtyRate, relativeError, type ForecastRecord } from '../../agent/planner/forecast-check.js';
import { calibratedModel, calibrationSamples } from '../../agent/daemon/forecast-inputs.js';
import { DEFAULT_FORECAST_MODEL } from '../../agent/planner/forecast.js';
import type { PlanForecast } from '../../agent/planner/choose.js';
import type { HistoryEntry } from '../../agent/daemon/outcome.js';
import { parseHistory } from '../../agent/daemon/history.js';

const record = (totalMs: number, nominalBytesPerSec = 100e6): ForecastRecord => ({ technique: 'precopy', strategy: 'gang', totalMs, downtimeMs: 40, wireBytes: 1e8, nominalBytesPerSec, faults: 0, rounds: 2 });

function entry(overrides: Partial<HistoryEntry>): HistoryEntry {
  return { migrationId: 'm', direction: 'out', guest: 'vm1', peer: '10.0.0.2:7401', startedAt: 't0', endedAt: 't1', outcome: 'completed', technique: 'precopy', totalMs: 1200, downtimeMs: 50, wireBytes: 1e8, ...overrides };
}

describe('forecast check', () => {
  test('relative error, and none without an outcome to compare with', () => {
    expect(relativeError(1200, 1000)).toBeCloseTo(0.2, 9);
    expect(relativeError(800, 1000)).toBeCloseTo(-0.2, 9);
    expect(relativeError(10, 0)).toBeNull();
    expect(relativeError(Number.POSITIVE_INFINITY, 10)).toBeNull();
  });

  test('the dirty rate the tracker measured: pages dirty after the pre-copy rounds over their time', () => {
    expect(measuredDirtyRate([
      { final: false, durationMs: 1000, dirtyPagesAfter: 256 },
      { final: false, durationMs: 1000, dirtyPagesAfter: 256 },
      { final: true, durationMs: 10, dirtyPagesAfter: 9999 },
    ])).toBe((512 * 4096 * 1000) / 2000);
    expect(measuredDirtyRate([{ final: true, durationMs: 10, dirtyPagesAfter: 1 }])).toBeUndefined();
  });

  test('the followed option hands each guest its own forecast, with the nominal rate before link efficiency', () => {
    const forecast = {
      mode: 'forecast',
      options: [],
      chosen: {
        technique: 'hybrid', strategy: 'serial', totalMs: 3000, downtimeMs: 30, wireBytes: 3e8, guestStallShare: 0, workloadBytesPerSec: null, completes: true, withinBudget: true, keepsSla: true, rateBytesPerSec: 90e6,
        guests: [
          { name: 'a', totalMs: 1000, downtimeMs: 30, wireBytes: 1e8, faults: 5, rounds: 2, ending: 'post-copy after 2 rounds' },
          { name: 'b', totalMs: 2000, downtimeMs: 20, wireBytes: 2e8, faults: 0, rounds: 3, ending: 'stop-and-copy after 3 rounds' },
        ],
      },
      why: [], measured: [], assumptions: [], model: { ...DEFAULT_FORECAST_MODEL, linkEfficiency: 0.9 }, calibration: [],
    } as PlanForecast;
    const records = forecastRecords(forecast);
    expect(records.get('a')).toEqual({ technique: 'hybrid', strategy: 'serial', totalMs: 1000, downtimeMs: 30, wireBytes: 1e8, nominalBytesPerSec: 100e6, faults: 5, rounds: 2 });
    expect(records.get('b')?.totalMs).toBe(2000);
    expect(forecastRecords({ ...forecast, chosen: null }).size).toBe(0);
  });

  test('calibration takes completed outgoing migrations with a forecast, a hybrid that went post-copy as post-copy', () => {
    const history = [
      entry({ forecast: record(1000) }),
      entry({ technique: 'hybrid', wentPostcopy: true, forecast: record(1000) }),
      entry({ forecast: undefined }),
      entry({ outcome: 'failed', forecast: record(1000) }),
      entry({ direction: 'in', forecast: record(1000) }),
    ];
    expect(calibrationSamples(history).map((s) => [s.technique, s.wentPostcopy])).toEqual([['precopy', false], ['hybrid', true]]);
    expect(calibratedModel(history.slice(0, 2)).calibration[0]).toMatch(/^the engine's defaults \(2 past migrations with a forecast here; calibration needs at least 3\)/);
  });

  test('a history with forecasts reads back; a forecast with a field missing does not', () => {
    const content = { zeroShare: 0.2, duplicateShare: 0.1, sharedShare: 0.05 };
    const good = JSON.stringify({ version: 1, entries: [entry({ forecast: record(1000), dirtyRateBytesPerSec: 1e6, wentPostcopy: false, content }), entry({ content: { zeroShare: 0 } })] });
    expect(parseHistory(good)).toEqual({ entries: [entry({ forecast: record(1000), dirtyRateBytesPerSec: 1e6, wentPostcopy: false, content }), entry({ content: { zeroShare: 0 } })] });
    expect(parseHistory(JSON.stringify({ version: 1, entries: [entry({ content: { zeroShare: 1.5 } })] }))).toMatchObject({ problem: expect.stringMatching(/zeroShare/) });
    const { faults: _, ...partial } = record(1000);
    const bad = parseHistory(JSON.stringify({ version: 1, entries: [entry({ forecast: partial as ForecastRecord })] }));
    expect(bad).toMatchObject({ problem: expect.stringMatching(/faults/) });
  });
});
