// Calibration of the forecast's constants from past migrations: a history made by a known
// model gives that model back; too little history changes nothing; odd samples are bounded.
import { describe, expect, test } from 'vitest';
import { calibrate, leastSquares, MIN_SAMPLES, type CalibrationSample } from '../../agent/planner/calibrate.js';
import { DEFAULT_FORECAST_MODEL, type ForecastModel } from '../../agent/planner/forecast.js';

const MB = 1e6;
const TRUE_MODEL: ForecastModel = { linkEfficiency: 0.7, setupMs: 240, switchoverMs: 55, faultOverheadMs: 0.8 };

/** A migration as a host with TRUE_MODEL would have run it (the starting model's fault overhead is the true one, so only the fit is tested). */
function sample(wireBytes: number, nominalBytesPerSec: number, postcopy: boolean, faults = 0, precopyDowntimeMs = 80): CalibrationSample {
  const downtimeMs = postcopy ? TRUE_MODEL.switchoverMs : precopyDowntimeMs;
  const transferMs = (wireBytes / (nominalBytesPerSec * TRUE_MODEL.linkEfficiency)) * 1000;
  return {
    technique: postcopy ? 'postcopy' : 'precopy',
    wentPostcopy: postcopy,
    totalMs: TRUE_MODEL.setupMs + transferMs + downtimeMs + faults * TRUE_MODEL.faultOverheadMs,
    downtimeMs,
    wireBytes,
    nominalBytesPerSec,
    forecastFaults: faults,
  };
}

describe('calibrate', () => {
  test('a history made by a known model gives its constants back', () => {
    const history = [
      sample(128 * MB, 100 * MB, false, 0, 70),
      sample(256 * MB, 100 * MB, false, 0, 120),
      sample(64 * MB, 50 * MB, false, 0, 40),
      sample(300 * MB, 125 * MB, true, 2000),
      sample(100 * MB, 125 * MB, true, 500),
      sample(200 * MB, 60 * MB, true, 4000),
    ];
    const { model, samples, fitted } = calibrate(history, { ...DEFAULT_FORECAST_MODEL, faultOverheadMs: TRUE_MODEL.faultOverheadMs });
    expect(samples).toBe(6);
    expect(model.linkEfficiency).toBeCloseTo(TRUE_MODEL.linkEfficiency, 6);
    expect(model.setupMs).toBeCloseTo(TRUE_MODEL.setupMs, 4);
    expect(model.switchoverMs).toBeCloseTo(TRUE_MODEL.switchoverMs, 6);
    expect(model.faultOverheadMs).toBeCloseTo(TRUE_MODEL.faultOverheadMs, 6);
    expect(fitted).toEqual(['switchoverMs from 3 post-copy downtimes', 'setupMs and linkEfficiency from 6 migrations', 'faultOverheadMs from 3 post-copy migrations']);
  });

  test(`fewer than ${MIN_SAMPLES} migrations change nothing`, () => {
    const history = [sample(128 * MB, 100 * MB, true, 100), sample(256 * MB, 100 * MB, true, 100)];
    expect(calibrate(history)).toEqual({ model: DEFAULT_FORECAST_MODEL, samples: 2, fitted: [] });
  });

  test('migrations all of one size say nothing of the link: efficiency and set-up stay', () => {
    const history = [sample(128 * MB, 100 * MB, false), sample(128 * MB, 100 * MB, false), sample(128 * MB, 100 * MB, false)];
    const { model, fitted } = calibrate(history);
    expect(model.linkEfficiency).toBe(DEFAULT_FORECAST_MODEL.linkEfficiency);
    expect(model.setupMs).toBe(DEFAULT_FORECAST_MODEL.setupMs);
    expect(fitted).toEqual([]);
  });

  test('samples without a rate or bytes (failed, or forecast without a link) are left out', () => {
    const history = [sample(128 * MB, 100 * MB, false), { ...sample(128 * MB, 100 * MB, false), nominalBytesPerSec: 0 }, { ...sample(1, 1, false), wireBytes: 0 }];
    expect(calibrate(history).samples).toBe(1);
  });

  test('an absurd history is held to plausible constants', () => {
    // Migrations that took far longer than their bytes at any rate would: efficiency is held at its floor.
    const slow = [1, 2, 3].map((i) => ({ ...sample(i * 100 * MB, 100 * MB, false), totalMs: i * 1e7 }));
    const { model } = calibrate(slow);
    expect(model.linkEfficiency).toBe(0.05);
    expect(model.setupMs).toBeGreaterThanOrEqual(0);
  });

  test('least squares: an exact line, and none from points at one x', () => {
    expect(leastSquares([{ x: 0, y: 1 }, { x: 1, y: 3 }, { x: 2, y: 5 }])).toEqual({ intercept: 1, slope: 2 });
    expect(leastSquares([{ x: 1, y: 1 }, { x: 1, y: 3 }, { x: 1, y: 5 }])).toBeUndefined();
    expect(leastSquares([{ x: 0, y: 1 }, { x: 1, y: 3 }])).toBeUndefined();
  });
});
