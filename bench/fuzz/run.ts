// Runs one fuzz target on a worker thread and watches it: an input that stops the worker for
// longer than the hang limit, or kills it (a heap beyond the worker's limit), is a finding
// named by the input the worker had published; the process's peak RSS while the target runs
// is measured here, beside the worker, every few milliseconds.
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { WorkerMessage, WorkerOptions } from './worker.js';

export interface FuzzOptions {
  target: string;
  seed: number;
  maxRuns: number;
  maxMs: number;
  corpusDir: string;
  saveCorpus?: boolean;
  maxCorpusFiles?: number;
  coverage?: boolean;
  /** End at the first finding. */
  stopOnFinding?: boolean;
  /** An input that keeps the worker from finishing it for this long is a hang. */
  hangMs?: number;
  /** The worker's heap limit: beyond it, the input that got there is a finding. */
  maxHeapMb?: number;
  /** Where findings' inputs are written (0700 directory, 0600 files); none: not written. */
  findingsDir?: string;
  onProgress?: (progress: { runs: number; corpus: number; features: number }) => void;
}

export interface Finding {
  kind: 'exception' | 'allocation' | 'hang' | 'crash';
  message: string;
  inputBytes: number;
  /** The input, as hex when it is short (the file holds it in any case). */
  inputHex?: string;
  inputFile?: string;
}

export interface FuzzResult {
  target: string;
  seed: number;
  runs: number;
  seconds: number;
  corpus: number;
  features: number;
  savedFiles: number;
  largestAllocationBytes: number;
  /** This process's peak resident set while the target ran, and its growth over the start. */
  peakRssBytes: number;
  rssGrowthBytes: number;
  outcomes: Record<string, number>;
  findings: Finding[];
}

const SHARED_INPUT_BYTES = 128 * 1024;
const RSS_SAMPLE_MS = 10;

/** The worker's module: beside this one once built; from a test running the TypeScript, the built copy. */
function workerUrl(): URL {
  const here = new URL(import.meta.url);
  return here.pathname.endsWith('.ts') ? new URL('../../dist/bench/fuzz/worker.js', here) : new URL('./worker.js', here);
}

function recordFinding(options: FuzzOptions, kind: Finding['kind'], message: string, input: Uint8Array): Finding {
  const finding: Finding = { kind, message, inputBytes: input.length, ...(input.length <= 256 ? { inputHex: Buffer.from(input).toString('hex') } : {}) };
  if (options.findingsDir) {
    mkdirSync(options.findingsDir, { recursive: true, mode: 0o700 });
    chmodSync(options.findingsDir, 0o700);
    const file = join(options.findingsDir, `${options.target}-${kind}-${createHash('sha1').update(input).digest('hex').slice(0, 12)}.bin`);
    writeFileSync(file, input, { mode: 0o600 });
    finding.inputFile = file;
  }
  return finding;
}

export function fuzzTarget(options: FuzzOptions): Promise<FuzzResult> {
  const shared = new SharedArrayBuffer(8 + SHARED_INPUT_BYTES);
  const counters = new Int32Array(shared, 0, 2);
  const current = () => new Uint8Array(shared, 8, Atomics.load(counters, 1)).slice();
  const workerOptions: WorkerOptions = {
    target: options.target,
    seed: options.seed,
    maxRuns: options.maxRuns,
    maxMs: options.maxMs,
    corpusDir: options.corpusDir,
    saveCorpus: options.saveCorpus ?? false,
    maxCorpusFiles: options.maxCorpusFiles ?? 100,
    coverage: options.coverage ?? true,
    stopOnFinding: options.stopOnFinding ?? false,
    shared,
  };
  const findings: Finding[] = [];
  const baselineRss = process.memoryUsage.rss();
  let peakRss = baselineRss;
  const started = performance.now();
  const hangMs = options.hangMs ?? 10_000;

  return new Promise((resolve, reject) => {
    const worker = new Worker(fileURLToPath(workerUrl()), {
      workerData: workerOptions,
      resourceLimits: { maxOldGenerationSizeMb: options.maxHeapMb ?? 512 },
    });
    let done: Extract<WorkerMessage, { type: 'done' }> | undefined;
    let lastRuns = -1;
    let lastChange = performance.now();
    let stopping = false;
    const sampler = setInterval(() => {
      peakRss = Math.max(peakRss, process.memoryUsage.rss());
      const runs = Atomics.load(counters, 0);
      const now = performance.now();
      if (runs !== lastRuns) {
        lastRuns = runs;
        lastChange = now;
      } else if (!stopping && now - lastChange > hangMs) {
        stopping = true;
        findings.push(recordFinding(options, 'hang', `one input kept the target busy for over ${hangMs} ms`, current()));
        void worker.terminate();
      }
    }, RSS_SAMPLE_MS);
    worker.on('message', (message: WorkerMessage) => {
      if (message.type === 'progress') options.onProgress?.(message);
      else if (message.type === 'finding') findings.push(recordFinding(options, message.kind, message.message, message.input));
      else done = message;
    });
    worker.on('error', (error) => {
      // A worker that dies of an input (its heap limit, a throw outside the target) is a
      // finding; one that cannot start at all is the fuzzer's own failure.
      if (Atomics.load(counters, 0) === 0 && Atomics.load(counters, 1) === 0) {
        clearInterval(sampler);
        reject(error);
        return;
      }
      findings.push(recordFinding(options, 'crash', `${error.name}: ${error.message}`, current()));
    });
    worker.on('exit', () => {
      clearInterval(sampler);
      peakRss = Math.max(peakRss, process.memoryUsage.rss());
      resolve({
        target: options.target,
        seed: options.seed,
        runs: done?.runs ?? Atomics.load(counters, 0),
        seconds: (performance.now() - started) / 1000,
        corpus: done?.corpus ?? 0,
        features: done?.features ?? 0,
        savedFiles: done?.savedFiles ?? 0,
        largestAllocationBytes: done?.largestAllocationBytes ?? 0,
        peakRssBytes: peakRss,
        rssGrowthBytes: peakRss - baselineRss,
        outcomes: done?.outcomes ?? {},
        findings,
      });
    });
  });
}
