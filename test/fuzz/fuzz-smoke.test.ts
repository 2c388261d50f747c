// A bounded run of every fuzz target (npm run fuzz), from its seeds and its stored corpus:
// each input ends in the parser's typed error or a valid result, within the parser's
// allocation limit, without hanging, and the process's resident set stays bounded. And the
// fuzzer's own check: it finds the bugs planted in the planted-* targets, a thrown TypeError
// behind a branch only coverage leads to, and an endless loop.
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { fuzzTarget } from '../../bench/fuzz/run.js';
import { TARGETS } from '../../bench/fuzz/targets.js';

const corpusDir = resolve(import.meta.dirname, 'corpus');
const findingsDir = mkdtempSync(join(tmpdir(), 'gangway-fuzz-test-'));
afterAll(() => rmSync(findingsDir, { recursive: true, force: true }));

/** Per target: enough to pass through the stored corpus and mutate it for a while, bounded in time on a loaded machine. */
const SMOKE_RUNS = 3000;
const SMOKE_MS = 6000;
/** What one target may add to the process's resident set: a parser that buffers what a length field says would go far past it. */
const MAX_RSS_GROWTH_BYTES = 160 * 2 ** 20;

describe('fuzz targets, a bounded run each', () => {
  for (const target of TARGETS) {
    test(`${target.name}: no finding, allocations and memory within bounds`, async () => {
      const result = await fuzzTarget({ target: target.name, seed: 20261205, maxRuns: SMOKE_RUNS, maxMs: SMOKE_MS, corpusDir, findingsDir });
      expect(result.findings).toEqual([]);
      // Every stored input ran, and mutations of them after.
      expect(result.runs).toBeGreaterThan(readdirSync(join(corpusDir, target.name)).length + target.seeds().length);
      // The coverage feedback works: inputs reached code the seeds did not.
      expect(result.features).toBeGreaterThan(0);
      expect(result.largestAllocationBytes).toBeLessThanOrEqual(target.maxAllocationBytes);
      expect(result.rssGrowthBytes).toBeLessThan(MAX_RSS_GROWTH_BYTES);
    }, 60_000);
  }
});

describe('the fuzzer finds planted bugs', () => {
  test('a TypeError behind a length of 0xffff in a record of the second type', async () => {
    const result = await fuzzTarget({ target: 'planted-throw', seed: 1, maxRuns: 200_000, maxMs: 40_000, corpusDir, findingsDir, stopOnFinding: true });
    expect(result.findings).toHaveLength(1);
    expect(result.findings[0]!.kind).toBe('exception');
    expect(result.findings[0]!.message).toContain('planted: a length the check forgot');
    // The input that triggers it is written down, to be replayed.
    const input = Buffer.from(result.findings[0]!.inputHex!, 'hex');
    expect(readdirSync(findingsDir).some((name) => name.startsWith('planted-throw-exception-'))).toBe(true);
    let at = 0;
    let found = false;
    while (at + 3 <= input.length) {
      if (input[at] === 2 && input.readUInt16BE(at + 1) === 0xffff) found = true;
      at += 3 + input.readUInt16BE(at + 1);
    }
    expect(found).toBe(true);
  }, 60_000);

  test('an endless loop is a hang, named by its input, and the worker is stopped', async () => {
    const result = await fuzzTarget({ target: 'planted-hang', seed: 1, maxRuns: 200_000, maxMs: 40_000, corpusDir, findingsDir, hangMs: 1500 });
    expect(result.findings).toHaveLength(1);
    expect(result.findings[0]!.kind).toBe('hang');
    const input = Buffer.from(result.findings[0]!.inputHex!, 'hex');
    expect(input.includes(0x48)).toBe(true);
  }, 60_000);
});
