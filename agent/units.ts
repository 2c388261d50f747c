// Parsing of human quantities on the command line and in API requests: sizes ("512MiB"),
// rates ("40MiB/s", "1Gbit/s") and durations ("300ms"). Errors name what was wrong and what
// is allowed.
//
// One rule makes a rate or a size unambiguous: B is bytes, "bit" or "bps" is bits (as tc,
// iperf3 and NIC speeds write them). What could be read both ways is refused with both
// readings spelled out, never guessed: "10Mb", "10MB" or "10Mb/s" as a rate, a bare number
// as a size ("64" is not taken as 64 bytes; a memory of 64 bytes is never what was meant).

export class QuantityError extends Error {}

const NUMBER = /^\s*(\d+(?:\.\d+)?)\s*([A-Za-z/]*)\s*$/;

/** SI prefix (k, M, G, T; either case) with an optional binary 'i': its factor, or undefined. */
function prefixFactor(prefix: string, binary: boolean): number | undefined {
  const power = { '': 0, k: 1, m: 2, g: 3, t: 4 }[prefix.toLowerCase()];
  if (power === undefined) return undefined;
  return (binary ? 1024 : 1000) ** power;
}

/** The prefix as it is usually written: k, M, G, T (and Ki, Mi, Gi, Ti). */
function canonicalPrefix(prefix: string, binary: boolean): string {
  const p = prefix.toLowerCase() === 'k' ? (binary ? 'K' : 'k') : prefix.toUpperCase();
  return binary ? `${p}i` : p;
}

function checkedValue(what: string, text: string, value: number): number {
  if (!Number.isFinite(value)) throw new QuantityError(`${what} "${text}" is too large`);
  return value;
}

const SIZE_RULE = 'use a number with a unit B, KiB, MiB, GiB, TiB (binary; K, M, G, T alike) or KB, MB, GB, TB (decimal)';

/** "512MiB", "1GiB", "512M" (MiB, as qemu reads it), "4096B", "0" → bytes (integer). */
export function parseBytes(text: string, what = 'size'): number {
  const match = NUMBER.exec(text);
  if (!match) throw new QuantityError(`${what} "${text}" is not understood: ${SIZE_RULE}`);
  const number = Number(match[1]);
  const unit = match[2]!;
  if (unit === '') {
    if (number === 0) return 0;
    throw new QuantityError(`${what} "${text}" has no unit: did you mean ${match[1]}MiB? (a number alone is not read as bytes; write ${match[1]}B for that)`);
  }
  // 512M, 1G: binary, as qemu -m and most tools read a lone prefix.
  const lone = /^([kKmMgGtT])$/.exec(unit);
  if (lone) return Math.round(checkedValue(what, text, number * prefixFactor(lone[1]!, true)!));
  const bytes = /^([kKmMgGtT]?)(i?)B$/.exec(unit);
  if (bytes) return Math.round(checkedValue(what, text, number * prefixFactor(bytes[1]!, bytes[2] === 'i')!));
  const bits = /^([kKmMgGtT]?)(i?)(b|bits?)$/.exec(unit);
  if (bits) {
    const prefix = canonicalPrefix(bits[1]!, bits[2] === 'i');
    const binaryToo = bits[1] !== '' && bits[2] === '' ? ` or ${match[1]}${canonicalPrefix(bits[1]!, true)}B` : '';
    throw new QuantityError(`${what} "${text}" is in bits (b): sizes are in bytes (B): did you mean ${match[1]}${prefix}B${binaryToo}?`);
  }
  throw new QuantityError(`${what} "${text}" is not understood: ${SIZE_RULE}`);
}

/** "256MiB,256MiB": sizes separated by commas, each as parseBytes reads it. */
export function parseBytesList(text: string, what = 'size'): number[] {
  const parts = text.split(',');
  if (parts.some((part) => part.trim() === '')) throw new QuantityError(`${what} "${text}" has an empty item: write sizes separated by commas, e.g. 256MiB,256MiB`);
  return parts.map((part) => parseBytes(part.trim(), what));
}

const RATE_RULE = 'use e.g. 100MiB/s or 100MB/s (bytes), 1Gbit/s or 1Gbps (bits)';

/**
 * "40MiB/s", "40MB/s" (bytes); "1Gbit/s", "1Gbps", "100mbit" (bits, tc's spelling); "0" →
 * bytes per second. "10Mb", "10MB", "10Mb/s", "10MBps" and a bare "10" are refused with
 * both readings.
 */
export function parseRate(text: string, what = 'rate'): number {
  const match = NUMBER.exec(text);
  if (!match) throw new QuantityError(`${what} "${text}" is not understood: ${RATE_RULE}`);
  const digits = match[1]!;
  const number = Number(digits);
  const unit = match[2]!;
  if (unit === '' && number === 0) return 0;
  // Bits: Mbit/s, Mbits/s, Mbit (tc), Mbps, Mibit/s.
  const bits = /^([kKmMgGtT]?)(i?)(?:[bB]its?(?:\/s)?|bps)$/.exec(unit);
  if (bits) return checkedValue(what, text, (number * prefixFactor(bits[1]!, bits[2] === 'i')!) / 8);
  // Bytes: MB/s, MiB/s, kB/s, B/s: a capital B, and per second.
  const bytes = /^([kKmMgGtT]?)(i?)B\/s$/.exec(unit);
  if (bytes) return checkedValue(what, text, number * prefixFactor(bytes[1]!, bytes[2] === 'i')!);
  // Either reading is plausible: a size without /s (MB, MiB, Mb), a lowercase b per second
  // (Mb/s, often typed for MB/s), MBps, a lone prefix or no unit at all.
  const ambiguous = /^([kKmMgGtT]?)(i?)(B|b)?(\/s|ps)?$/.exec(unit);
  if (ambiguous && (ambiguous[3] !== undefined || ambiguous[1] !== '' || ambiguous[4] === undefined)) {
    const binary = ambiguous[2] === 'i';
    const prefix = ambiguous[1] === '' && ambiguous[3] === undefined ? 'M' : canonicalPrefix(ambiguous[1]!, binary);
    if (ambiguous[3] === 'B' && binary && ambiguous[4] === undefined) {
      throw new QuantityError(`${what} "${text}" is a size, not a rate: did you mean ${digits}${prefix}B/s?`);
    }
    const why = unit === '' ? 'has no unit' : 'could be bits or bytes per second';
    throw new QuantityError(`${what} "${text}" ${why}: did you mean ${digits}${prefix}bit/s (bits) or ${digits}${prefix}B/s (bytes)?`);
  }
  throw new QuantityError(`${what} "${text}" is not understood: ${RATE_RULE}`);
}

/** "300ms", "2s", "300" (ms) → milliseconds. */
export function parseDurationMs(text: string, what = 'duration'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const factor = match ? ({ '': 1, ms: 1, s: 1000, m: 60_000, min: 60_000 } as Record<string, number>)[match[2]!.toLowerCase()] : undefined;
  if (!match || factor === undefined) throw new QuantityError(`${what} "${text}" is not understood: use a number with a unit ms, s or min`);
  return checkedValue(what, text, Number(match[1]) * factor);
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
