// One fuzz target's loop, on a worker thread so that the thread that started it can stop it
// when an input hangs: corpus in, children out by mutation, each run through the target, kept
// when it reaches code no input reached before. Coverage is V8's own block coverage of the
// modules the target exercises (the inspector's precise coverage, counts bucketed as AFL
// does), read after every input: jazzer.js, the usual coverage-guided fuzzer for Node, ships
// a native part built for a newer glibc than Debian 12's, and this is the same feedback loop
// at about 2,500 inputs a second.
//
// Before each input its bytes go to a SharedArrayBuffer, so a hang or a crash of this thread
// still names the input that caused it.
import { Session } from 'node:inspector/promises';
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { mutate, Rng } from './mutator.js';
import { targetNamed } from './targets.js';

export interface WorkerOptions {
  target: string;
  seed: number;
  maxRuns: number;
  maxMs: number;
  /** Where the stored corpus of each target lives (DIR/TARGET/*.bin). */
  corpusDir: string;
  /** Write inputs that reached new code to the corpus directory. */
  saveCorpus: boolean;
  /** At most this many files of a target in the corpus directory. */
  maxCorpusFiles: number;
  coverage: boolean;
  /** End at the first finding (a test looking for a planted bug). */
  stopOnFinding: boolean;
  /** [0]: runs so far, [1]: the current input's length; its bytes from byte 8. */
  shared: SharedArrayBuffer;
}

export type WorkerMessage =
  | { type: 'progress'; runs: number; corpus: number; features: number }
  | { type: 'finding'; kind: 'exception' | 'allocation'; message: string; input: Uint8Array }
  | { type: 'done'; runs: number; corpus: number; features: number; savedFiles: number; largestAllocationBytes: number; outcomes: Record<string, number> };

/** The findings one target reports at most (a bug tends to show with many inputs). */
const MAX_FINDINGS = 20;
const PROGRESS_MS = 500;

function bucket(count: number): number {
  if (count <= 3) return count;
  if (count <= 7) return 4;
  if (count <= 15) return 5;
  if (count <= 31) return 6;
  if (count <= 127) return 7;
  return 8;
}

class Coverage {
  readonly features = new Set<string>();
  readonly #session = new Session();

  constructor(private readonly scripts: RegExp) {}

  async start(): Promise<void> {
    this.#session.connect();
    await this.#session.post('Profiler.enable');
    await this.#session.post('Profiler.startPreciseCoverage', { callCount: true, detailed: true });
    await this.#session.post('Profiler.takePreciseCoverage');
  }

  /** The features the last input reached that none before it did (and records them). */
  async take(): Promise<number> {
    const { result } = await this.#session.post('Profiler.takePreciseCoverage');
    let fresh = 0;
    for (const script of result) {
      if (!this.scripts.test(script.url)) continue;
      for (const fn of script.functions) {
        for (const range of fn.ranges) {
          if (range.count === 0) continue;
          const key = `${script.scriptId}:${range.startOffset}:${bucket(range.count)}`;
          if (!this.features.has(key)) {
            this.features.add(key);
            fresh++;
          }
        }
      }
    }
    return fresh;
  }

  stop(): void {
    this.#session.disconnect();
  }
}

/** The largest Buffer allocated while an input runs: a parser must allocate within its limits, whatever a length field says. */
class AllocationWatch {
  largestThisInput = 0;
  largestEver = 0;

  constructor() {
    for (const name of ['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const) {
      const original = Buffer[name].bind(Buffer) as (size: number, ...rest: unknown[]) => Buffer;
      (Buffer as unknown as Record<string, unknown>)[name] = (size: number, ...rest: unknown[]) => {
        if (size > this.largestThisInput) this.largestThisInput = size;
        return original(size, ...rest);
      };
    }
  }

  reset(): void {
    if (this.largestThisInput > this.largestEver) this.largestEver = this.largestThisInput;
    this.largestThisInput = 0;
  }
}

function loadCorpus(dir: string): Buffer[] {
  try {
    return readdirSync(dir)
      .filter((name) => name.endsWith('.bin'))
      .sort()
      .map((name) => readFileSync(join(dir, name)));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

async function main(options: WorkerOptions): Promise<void> {
  const target = targetNamed(options.target);
  if (!target) throw new Error(`no fuzz target ${options.target}`);
  const post = (message: WorkerMessage) => parentPort!.postMessage(message);
  const counters = new Int32Array(options.shared, 0, 2);
  const current = new Uint8Array(options.shared, 8);
  const rng = new Rng(options.seed);
  const tearDown = target.setUp ? await target.setUp() : async () => {};
  const coverage = options.coverage ? new Coverage(target.coverage) : undefined;
  await coverage?.start();
  const allocations = new AllocationWatch();
  const targetDir = join(options.corpusDir, target.name);
  const stored = loadCorpus(targetDir);
  let savedFiles = 0;
  let storedFiles = stored.length;
  const corpus: Buffer[] = [];
  const outcomes: Record<string, number> = {};
  const reported = new Set<string>();
  let findings = 0;
  let runs = 0;

  const execute = async (input: Buffer, fromCorpus: boolean): Promise<void> => {
    const length = Math.min(input.length, current.length);
    current.set(input.subarray(0, length));
    Atomics.store(counters, 1, length);
    let outcome: string;
    try {
      outcome = await target.run(input);
    } catch (error) {
      outcome = 'refused';
      if (!target.expected(error)) {
        const message = error instanceof Error ? `${error.constructor.name}: ${error.message}` : String(error);
        const key = message.replace(/\d+/g, 'N').slice(0, 120);
        if (!reported.has(key) && findings < MAX_FINDINGS) {
          reported.add(key);
          findings++;
          post({ type: 'finding', kind: 'exception', message: error instanceof Error ? (error.stack ?? message) : message, input: new Uint8Array(input) });
        }
      }
    }
    outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
    if (allocations.largestThisInput > target.maxAllocationBytes && findings < MAX_FINDINGS) {
      findings++;
      post({
        type: 'finding',
        kind: 'allocation',
        message: `one input made an allocation of ${allocations.largestThisInput} bytes, over the target's limit of ${target.maxAllocationBytes}`,
        input: new Uint8Array(input),
      });
    }
    allocations.reset();
    runs++;
    Atomics.store(counters, 0, runs);
    const fresh = coverage ? await coverage.take() : 0;
    if (fromCorpus || fresh > 0) {
      corpus.push(input);
      if (!fromCorpus && options.saveCorpus && storedFiles < options.maxCorpusFiles) {
        mkdirSync(targetDir, { recursive: true });
        writeFileSync(join(targetDir, `${createHash('sha1').update(input).digest('hex').slice(0, 16)}.bin`), input);
        storedFiles++;
        savedFiles++;
      }
    }
  };

  const started = performance.now();
  let lastProgress = started;
  try {
    for (const input of [...target.seeds(), ...stored]) await execute(input.subarray(0, target.maxInputBytes), true);
    while (runs < options.maxRuns && performance.now() - started < options.maxMs && !(options.stopOnFinding && findings > 0)) {
      // Newer corpus entries (the ones that reached new code) are picked more often.
      const pick = rng.below(2) === 0 ? corpus.length - 1 - rng.below(Math.min(corpus.length, 32)) : rng.below(corpus.length);
      const parent = corpus[pick]!;
      const other = corpus[rng.below(corpus.length)]!;
      const child = rng.below(64) === 0 ? Buffer.from(Array.from({ length: rng.below(64) }, () => rng.below(256))) : mutate(parent, other, rng, target.maxInputBytes);
      await execute(child, false);
      const now = performance.now();
      if (now - lastProgress >= PROGRESS_MS) {
        lastProgress = now;
        post({ type: 'progress', runs, corpus: corpus.length, features: coverage?.features.size ?? 0 });
      }
    }
  } finally {
    coverage?.stop();
    await tearDown();
  }
  post({
    type: 'done',
    runs,
    corpus: corpus.length,
    features: coverage?.features.size ?? 0,
    savedFiles,
    largestAllocationBytes: allocations.largestEver,
    outcomes,
  });
}

await main(workerData as WorkerOptions);
