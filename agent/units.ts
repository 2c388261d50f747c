// Parsing of human quantities on the command line and in API requests: sizes ("512MiB"),
// rates ("40MiB/s") and durations ("300ms"). Errors name what was wrong and what is allowed.

const SIZE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tb: 1000 ** 4,
  tib: 1024 ** 4,
};

export class QuantityError extends Error {}

function parseWithUnits(what: string, text: string, units: Record<string, number>, allowed: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = match?.[2]?.toLowerCase() ?? '';
  const factor = match ? units[unit] : undefined;
  if (!match || factor === undefined) {
    throw new QuantityError(`${what} "${text}" is not understood: use a number with ${allowed}`);
  }
  const value = Number(match[1]) * factor;
  if (!Number.isFinite(value)) throw new QuantityError(`${what} "${text}" is too large`);
  return value;
}

/** "512MiB", "1GiB", "4096" → bytes (integer). */
export function parseBytes(text: string, what = 'size'): number {
  return Math.round(parseWithUnits(what, text, SIZE_UNITS, 'an optional unit B, KiB, MiB, GiB, TiB (or KB, MB, GB)'));
}

/** "40MiB/s", "1Gbit/s", "0" → bytes per second. */
export function parseRate(text: string, what = 'rate'): number {
  const trimmed = text.trim();
  const bits = /^(.*?)(k|m|g|t)?bit(?:s)?(?:\/s|ps)?$/i.exec(trimmed);
  if (bits) {
    const prefix = (bits[2] ?? '').toLowerCase();
    const factor = { '': 1, k: 1e3, m: 1e6, g: 1e9, t: 1e12 }[prefix] ?? 1;
    const value = Number(bits[1]);
    if (bits[1]?.trim() === '' || !Number.isFinite(value) || value < 0) {
      throw new QuantityError(`${what} "${text}" is not understood`);
    }
    return (value * factor) / 8;
  }
  const perSecond = trimmed.replace(/(\/s|ps)$/i, '');
  return parseWithUnits(what, perSecond, SIZE_UNITS, 'a size unit per second, e.g. 40MiB/s or 1Gbit/s');
}

/** "300ms", "2s", "300" (ms) → milliseconds. */
export function parseDurationMs(text: string, what = 'duration'): number {
  return parseWithUnits(what, text, { '': 1, ms: 1, s: 1000, m: 60_000, min: 60_000 }, 'a unit ms, s or min');
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatRate(bytesPerSec: number): string {
  return `${formatBytes(bytesPerSec)}/s`;
}
