// The forecast model's constants fitted to this host's past migrations (STATE/history.json
// keeps each migration's forecast beside its outcome), so forecasts improve with use, as seed
// paper 001 proposes for its prediction of migration times. Pure: samples in, model out.
//
// What is fitted, and why these:
// - setupMs and linkEfficiency, by ordinary least squares over every completed sample:
//   the time the guest spent moving (total less downtime, less the post-copy fault stalls the
//   current model charges) against the time its wire bytes take at the nominal rate,
//   y = setupMs + x / linkEfficiency. Both are linear in the unknowns (the intercept and
//   1/efficiency), so a closed-form fit is enough; they are the two constants the total time
//   depends on most, and they say what the link really gives this host's migrations.
// - switchoverMs: the mean downtime of the samples that went post-copy (post-copy's downtime
//   is the fixed switchover cost alone, so it is measured there without the final round).
// - faultOverheadMs: least squares through the origin of what post-copy samples took beyond
//   the fitted transfer (y − setupMs − x / linkEfficiency) against their forecast fault count.
// A constant keeps its current value when the history has too few samples for it
// (MIN_SAMPLES, or no spread in x), and every fit is clamped to a plausible range, so one odd
// migration cannot make the planner absurd.
import { DEFAULT_FORECAST_MODEL, type ForecastModel } from './forecast.js';

/** One past migration: what was forecast for it and what happened. */
export interface CalibrationSample {
  technique: 'precopy' | 'postcopy' | 'hybrid';
  /** Whether it went post-copy (post-copy, or a hybrid that switched). */
  wentPostcopy: boolean;
  totalMs: number;
  downtimeMs: number;
  /** The bytes it really sent. */
  wireBytes: number;
  /** The nominal rate the forecast assumed (before link efficiency), bytes/s. */
  nominalBytesPerSec: number;
  /** The faults the forecast counted for it. */
  forecastFaults: number;
}

export interface Calibration {
  model: ForecastModel;
  samples: number;
  /** The constants fitted, with the sample counts; the others kept their values. */
  fitted: string[];
}

export const MIN_SAMPLES = 3;

const BOUNDS: Record<keyof ForecastModel, [number, number]> = {
  linkEfficiency: [0.05, 1],
  setupMs: [0, 10_000],
  switchoverMs: [1, 10_000],
  faultOverheadMs: [0, 100],
};

export function calibrate(samples: readonly CalibrationSample[], start: ForecastModel = DEFAULT_FORECAST_MODEL): Calibration {
  const usable = samples.filter((s) => s.totalMs > 0 && s.nominalBytesPerSec > 0 && s.wireBytes > 0 && Number.isFinite(s.totalMs));
  const model = { ...start };
  const fitted: string[] = [];

  const postcopy = usable.filter((s) => s.wentPostcopy);
  if (postcopy.length >= MIN_SAMPLES) {
    model.switchoverMs = clamp('switchoverMs', mean(postcopy.map((s) => s.downtimeMs)));
    fitted.push(`switchoverMs from ${postcopy.length} post-copy downtimes`);
  }

  const points = usable.map((s) => ({
    x: (s.wireBytes / s.nominalBytesPerSec) * 1000,
    y: s.totalMs - s.downtimeMs - s.forecastFaults * start.faultOverheadMs,
  }));
  const line = leastSquares(points);
  if (line && line.slope > 0) {
    model.setupMs = clamp('setupMs', line.intercept);
    model.linkEfficiency = clamp('linkEfficiency', 1 / line.slope);
    fitted.push(`setupMs and linkEfficiency from ${points.length} migrations`);
  }

  const faulting = postcopy.filter((s) => s.forecastFaults > 0);
  if (faulting.length >= MIN_SAMPLES) {
    let sxy = 0;
    let sxx = 0;
    for (const s of faulting) {
      const transferMs = (s.wireBytes / s.nominalBytesPerSec / model.linkEfficiency) * 1000;
      const beyond = s.totalMs - s.downtimeMs - model.setupMs - transferMs;
      sxy += beyond * s.forecastFaults;
      sxx += s.forecastFaults * s.forecastFaults;
    }
    model.faultOverheadMs = clamp('faultOverheadMs', sxy / sxx);
    fitted.push(`faultOverheadMs from ${faulting.length} post-copy migrations`);
  }
  return { model, samples: usable.length, fitted };
}

/** y = intercept + slope·x by ordinary least squares; undefined with too few points or no spread in x. */
export function leastSquares(points: readonly { x: number; y: number }[]): { intercept: number; slope: number } | undefined {
  if (points.length < MIN_SAMPLES) return undefined;
  const mx = mean(points.map((p) => p.x));
  const my = mean(points.map((p) => p.y));
  let sxy = 0;
  let sxx = 0;
  for (const p of points) {
    sxy += (p.x - mx) * (p.y - my);
    sxx += (p.x - mx) * (p.x - mx);
  }
  // Points at one x say nothing about the slope.
  if (sxx <= 1e-9 * Math.max(1, mx * mx)) return undefined;
  const slope = sxy / sxx;
  return { intercept: my - slope * mx, slope };
}

function mean(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0) / values.length;
}

function clamp(name: keyof ForecastModel, value: number): number {
  const [low, high] = BOUNDS[name];
  return Math.min(Math.max(value, low), high);
}
