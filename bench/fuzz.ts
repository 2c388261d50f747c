// npm run fuzz: coverage-guided fuzzing of the parsers that face the network (peer frames,
// NBD both ways, the control API). Each target runs on a worker thread from its seeds and its
// stored corpus (test/fuzz/corpus/TARGET), for a number of inputs or seconds; every input
// must end in the parser's typed error or in a valid result, within its allocation limit and
// without hanging. Findings are written to --findings DIR and replayed with --replay FILE.
//
//   npm run fuzz [-- --target frame,control] [-- --seconds 60 | --runs N] [-- --seed S]
//                [-- --save-corpus] [-- --json]
//   npm run fuzz -- --target frame --replay FILE
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { fuzzTarget, type FuzzResult } from './fuzz/run.js';
import { TARGETS, targetNamed } from './fuzz/targets.js';

const USAGE = `usage: npm run fuzz -- [--target NAME[,NAME...]] [--seconds S | --runs N] [--seed S] [--save-corpus] [--findings DIR] [--json]
       npm run fuzz -- --target NAME --replay FILE
targets: ${TARGETS.map((t) => t.name).join(', ')}
examples:
  npm run fuzz -- --seconds 60                      # every target for a minute
  npm run fuzz -- --target nbd-request --runs 200000 --seed 7
  npm run fuzz -- --target frame --replay /tmp/gangway-fuzz-findings/frame-exception-0123abcd.bin`;

function fail(message: string): never {
  process.stderr.write(`gangway fuzz: ${message}\n${USAGE}\n`);
  process.exit(2);
}

const { values } = parseArgs({
  options: {
    target: { type: 'string' },
    seconds: { type: 'string' },
    runs: { type: 'string' },
    seed: { type: 'string' },
    'save-corpus': { type: 'boolean', default: false },
    findings: { type: 'string' },
    replay: { type: 'string' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}

const names = values.target ? values.target.split(',') : TARGETS.map((t) => t.name);
for (const name of names) if (!targetNamed(name)) fail(`--target: no target "${name}"`);

function positive(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) fail(`${flag} "${text}": a number above 0`);
  return value;
}

const repoRoot = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const corpusDir = join(repoRoot, 'test', 'fuzz', 'corpus');

if (values.replay) {
  if (names.length !== 1) fail('--replay takes one --target');
  const target = targetNamed(names[0]!)!;
  const input = readFileSync(values.replay);
  const tearDown = target.setUp ? await target.setUp() : async () => {};
  try {
    const outcome = await target.run(input);
    console.log(`${target.name}: ${input.length} bytes: ${outcome}`);
  } catch (error) {
    const expected = target.expected(error);
    console.log(`${target.name}: ${input.length} bytes: ${expected ? 'refused' : 'FINDING'}: ${error instanceof Error ? (expected ? error.message : error.stack) : String(error)}`);
    process.exitCode = expected ? 0 : 1;
  } finally {
    await tearDown();
  }
} else {
  const seconds = positive('--seconds', values.seconds);
  const runs = positive('--runs', values.runs);
  const seed = positive('--seed', values.seed) ?? Math.floor(Math.random() * 2 ** 31);
  const findingsDir = values.findings ?? join(tmpdir(), 'gangway-fuzz-findings');
  const results: FuzzResult[] = [];
  for (const name of names) {
    const result = await fuzzTarget({
      target: name,
      seed,
      maxRuns: runs ?? Number.MAX_SAFE_INTEGER,
      maxMs: (seconds ?? (runs !== undefined ? 3600 : 10)) * 1000,
      corpusDir,
      saveCorpus: values['save-corpus'],
      findingsDir,
      onProgress: (p) => {
        if (!values.json && process.stderr.isTTY) process.stderr.write(`\r\x1b[K${name}: ${p.runs} inputs, corpus ${p.corpus}, ${p.features} coverage features`);
      },
    });
    if (!values.json && process.stderr.isTTY) process.stderr.write('\r\x1b[K');
    results.push(result);
    if (!values.json) {
      const rate = result.runs / result.seconds;
      console.log(
        `${name}: ${result.runs} inputs in ${result.seconds.toFixed(1)} s (${rate.toFixed(0)}/s), corpus ${result.corpus} (${result.savedFiles} new saved), ` +
          `${result.features} coverage features, largest allocation ${result.largestAllocationBytes} B, peak RSS ${(result.peakRssBytes / 2 ** 20).toFixed(0)} MiB ` +
          `(+${(result.rssGrowthBytes / 2 ** 20).toFixed(0)} MiB), ${result.findings.length} finding${result.findings.length === 1 ? '' : 's'}`,
      );
      const outcomes = Object.entries(result.outcomes).sort((a, b) => b[1] - a[1]);
      console.log(`  outcomes: ${outcomes.slice(0, 6).map(([label, count]) => `${label} ${count}`).join(', ')}${outcomes.length > 6 ? ', ...' : ''}`);
      for (const f of result.findings) console.log(`  ${f.kind}: ${f.message.split('\n').slice(0, 4).join('\n    ')}\n    input: ${f.inputFile ?? f.inputHex ?? `${f.inputBytes} bytes`}`);
    }
  }
  const findings = results.reduce((sum, r) => sum + r.findings.length, 0);
  if (values.json) console.log(JSON.stringify({ seed, targets: results, findings }));
  else console.log(`seed ${seed}: ${findings} finding${findings === 1 ? '' : 's'}${findings > 0 ? ` (inputs in ${findingsDir}; replay: npm run fuzz -- --target T --replay FILE)` : ''}`);
  process.exitCode = findings > 0 ? 1 : 0;
}
