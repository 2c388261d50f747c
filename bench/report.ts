// Benchmark output: a Markdown table on stdout, the JSON under bench/results/, and an SVG
// bar chart beside it; and the helpers every benchmark needs.
import { closeSync, mkdirSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const resultsDir = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench', 'results');

export function markdownTable(headers: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]) => `| ${cells.map(String).join(' | ')} |`;
  return [line(headers), line(headers.map(() => '---')), ...rows.map(line)].join('\n');
}

/**
 * A horizontal bar chart, one bar per label. `logScale`: bar lengths follow log10(1 + value),
 * for figures that span milliseconds to seconds in one chart (the labels keep the values).
 */
export function barChartSvg(title: string, unit: string, bars: { label: string; value: number }[], options: { logScale?: boolean } = {}): string {
  const width = 760;
  const barHeight = 26;
  const left = 300;
  const top = 40;
  const scale = options.logScale ? (v: number) => Math.log10(1 + Math.max(0, v)) : (v: number) => v;
  const max = Math.max(...bars.map((b) => scale(b.value)), 1e-9);
  const height = top + bars.length * (barHeight + 8) + 20;
  const escape = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const rows = bars
    .map((bar, i) => {
      const y = top + i * (barHeight + 8);
      const w = ((width - left - 90) * scale(bar.value)) / max;
      return (
        `<text x="${left - 8}" y="${y + 18}" text-anchor="end" font-size="13">${escape(bar.label)}</text>` +
        `<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" fill="#3b7dd8"/>` +
        `<text x="${(left + w + 6).toFixed(1)}" y="${y + 18}" font-size="13">${bar.value.toFixed(2)} ${escape(unit)}</text>`
      );
    })
    .join('\n');
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif">
<text x="10" y="24" font-size="16" font-weight="bold">${escape(title)}</text>
${rows}
</svg>
`;
}

export function writeResults(name: string, json: unknown, svg?: string): string {
  mkdirSync(resultsDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const path = join(resultsDir, `${name}-${stamp}.json`);
  writeFileSync(path, `${JSON.stringify(json, null, 2)}\n`);
  if (svg) writeFileSync(path.replace(/\.json$/, '.svg'), svg);
  return path;
}

export const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/**
 * On a VM whose host backs guest memory lazily (this one: ~2.8 s per GiB on first touch,
 * ~0.4 s after), the first run would measure the host's page faults, which a baseline run
 * later never takes. Touch and free as much memory as the runs will allocate, so every run
 * uses backed memory; returns the time it took.
 *
 * Freed memory stays backed only for a while: with the balloon's free page reporting (this
 * VM: page_reporting_order=11 on the kernel's command line) the kernel hands free 8 MiB
 * blocks back to the host about 2 s after they were freed, and they are cold again. A
 * bench that must measure a run on backed memory touches it just before (the kernel gives
 * the pages it freed last out first).
 */
export function prefaultMemory(bytes: number): number {
  const path = `/dev/shm/gangway-bench-prefault-${process.pid}`;
  const chunk = Buffer.alloc(4 * 1024 * 1024);
  const started = performance.now();
  const fd = openSync(path, 'w');
  try {
    for (let written = 0; written < bytes; written += chunk.length) writeSync(fd, chunk);
  } finally {
    closeSync(fd);
    rmSync(path, { force: true });
  }
  return performance.now() - started;
}
