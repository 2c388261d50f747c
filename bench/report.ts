// Benchmark output: a Markdown table on stdout, the JSON under bench/results/, and an SVG
// bar chart beside it.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const resultsDir = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench', 'results');

export function markdownTable(headers: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]) => `| ${cells.map(String).join(' | ')} |`;
  return [line(headers), line(headers.map(() => '---')), ...rows.map(line)].join('\n');
}

/** A horizontal bar chart, one bar per label. */
export function barChartSvg(title: string, unit: string, bars: { label: string; value: number }[]): string {
  const width = 760;
  const barHeight = 26;
  const left = 300;
  const top = 40;
  const max = Math.max(...bars.map((b) => b.value), 1e-9);
  const height = top + bars.length * (barHeight + 8) + 20;
  const escape = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const rows = bars
    .map((bar, i) => {
      const y = top + i * (barHeight + 8);
      const w = ((width - left - 90) * bar.value) / max;
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
