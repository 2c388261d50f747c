// bench:index-memory — the dedup content index at gang scale: bytes per location, and the
// rates of set and lookup (single and batched) at 32M locations, beside the memory latency of
// this host measured in the same run (what every lookup ultimately waits for) and a
// Map<hex string, location> baseline at the largest size a Map reaches comfortably.
//
//   node --expose-gc dist/bench/index-memory.js [--locations N] [--json] [--dry]
import { ContentIndex, FINGERPRINT_BYTES, fmix32 } from '../agent/dedup/content-index.js';
import { barChartSvg, markdownTable, writeResults } from './report.js';
import { benchArgs } from './args.js';

const USAGE = `usage: npm run bench:index -- [--locations N] [--json] [--dry]
  the dedup index's memory per location
examples:
  npm run bench:index -- --locations 4194304`;

const values = benchArgs('bench:index', USAGE, {
  options: {
    locations: { type: 'string' },
    json: { type: 'boolean', default: false },
    /** Print only; write nothing under bench/results. */
    dry: { type: 'boolean', default: false },
  },
});
const locations = Number(values.locations ?? 32 * 2 ** 20);
const BATCH = 256; // pages per 1 MiB batch
const PROBES = 1 << 21;
const MAP_ENTRIES = 4 * 2 ** 20;

function log(line: string) {
  if (!values.json) console.error(line);
}

/** Fingerprint of content `id` of `stream` into slot `k` of `words`; ids never collide. */
function writeFp(words: Int32Array, k: number, id: number, stream: number): void {
  const at = 4 * k;
  words[at] = fmix32(id ^ Math.imul(stream, 0x3c6ef372));
  words[at + 1] = fmix32(id + Math.imul(stream + 1, 0x9e3779b9));
  words[at + 2] = fmix32(Math.imul(id, 0x27d4eb2f) ^ stream);
  words[at + 3] = fmix32((id ^ 0x55555555) + stream);
}

let rngState = 0x2545f491;
function random(): number {
  rngState ^= rngState << 13;
  rngState ^= rngState >>> 17;
  rngState ^= rngState << 5;
  return rngState >>> 0;
}

interface Row {
  name: string;
  nsPerOp: number;
}
const rows: Row[] = [];
function record(name: string, ops: number, ms: number): void {
  const nsPerOp = (ms * 1e6) / ops;
  rows.push({ name, nsPerOp });
  log(`${name}: ${nsPerOp.toFixed(0)} ns/op, ${(1e3 / nsPerOp).toFixed(2)} M/s`);
}

function memoryLatency(): void {
  const words = 1 << 28; // 1 GiB, the size of the index at 32M locations
  const memory = new Int32Array(words);
  for (let i = 0; i < words; i += 1024) memory[i] = i;
  const reads = 1 << 22;
  const at = new Int32Array(reads);
  for (let i = 0; i < reads; i++) at[i] = random() & (words - 1);
  let sum = 0;
  let start = performance.now();
  for (let i = 0; i < reads; i++) sum += memory[at[i]!]!;
  record('memory: independent random reads over 1 GiB', reads, performance.now() - start);
  let chain = 0;
  start = performance.now();
  for (let i = 0; i < reads; i++) chain = memory[(at[i]! ^ chain) & (words - 1)]! & 1;
  record('memory: dependent random reads over 1 GiB', reads, performance.now() - start);
  if (sum + chain === 0.5) log('');
}

function contentIndex(): { bytesPerLocation: number } {
  const index = new ContentIndex({ locationCapacity: locations });
  const bytesPerLocation = index.memoryBytes / locations;
  log(`content index: ${locations} locations, ${(index.memoryBytes / 2 ** 20).toFixed(0)} MiB, ${bytesPerLocation.toFixed(2)} bytes/location`);
  const batch = new Uint8Array(BATCH * FINGERPRINT_BYTES);
  const words = new Int32Array(batch.buffer);
  const found = new Int32Array(BATCH);
  const batchLocations = new Int32Array(BATCH);

  let ms = 0;
  for (let first = 0; first < locations; first += BATCH) {
    const count = Math.min(BATCH, locations - first);
    for (let k = 0; k < count; k++) writeFp(words, k, first + k, 1);
    const start = performance.now();
    for (let k = 0; k < count; k++) index.set(first + k, batch, k * FINGERPRINT_BYTES);
    ms += performance.now() - start;
  }
  record('set, distinct contents, ascending locations', locations, ms);

  for (const [name, stream] of [
    ['present', 1],
    ['absent', 2],
  ] as const) {
    let single = 0;
    let batched = 0;
    let wrong = 0;
    // Fresh fingerprints for each mode: a second pass over the same ones would run from cache.
    const ids = new Int32Array(BATCH);
    const generate = () => {
      for (let k = 0; k < BATCH; k++) {
        ids[k] = random() % locations;
        writeFp(words, k, ids[k]!, stream);
      }
    };
    const verify = () => {
      for (let k = 0; k < BATCH; k++) if (found[k] !== (stream === 1 ? ids[k] : -1)) wrong++;
    };
    for (let done = 0; done < PROBES; done += BATCH) {
      generate();
      let start = performance.now();
      for (let k = 0; k < BATCH; k++) found[k] = index.lookup(batch, k * FINGERPRINT_BYTES);
      single += performance.now() - start;
      verify();
      generate();
      start = performance.now();
      index.lookupBatch(batch, 0, BATCH, found);
      batched += performance.now() - start;
      verify();
    }
    if (wrong > 0) throw new Error(`${wrong} wrong ${name} lookups`);
    record(`lookup, ${name}`, PROBES, single);
    record(`lookupBatch of ${BATCH}, ${name}`, PROBES, batched);
  }

  // The sender's step: half of the pages duplicates of contents already there, half new; on
  // runs of ascending locations (a region streamed in order) and on random locations.
  for (const ascending of [true, false]) {
    const order = ascending ? 'ascending locations' : 'random locations';
    const generate = () => {
      const start = random() % (locations - BATCH);
      for (let k = 0; k < BATCH; k++) {
        batchLocations[k] = ascending ? start + k : random() % locations;
        writeFp(words, k, random() % locations, 1 + (k & 1) * 2);
      }
    };
    ms = 0;
    for (let done = 0; done < PROBES; done += BATCH) {
      generate();
      const start = performance.now();
      index.lookupThenSetBatch(batchLocations, batch, 0, BATCH, found);
      ms += performance.now() - start;
    }
    record(`lookupThenSetBatch of ${BATCH}, ${order}`, PROBES, ms);
    ms = 0;
    for (let done = 0; done < PROBES; done += BATCH) {
      generate();
      const start = performance.now();
      for (let k = 0; k < BATCH; k++) {
        found[k] = index.lookup(batch, k * FINGERPRINT_BYTES);
        index.set(batchLocations[k]!, batch, k * FINGERPRINT_BYTES);
      }
      ms += performance.now() - start;
    }
    record(`lookup + set one by one, ${order}`, PROBES, ms);
  }
  return { bytesPerLocation };
}

function mapBaseline(): { bytesPerEntry: number | undefined } {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  const before = process.memoryUsage().heapUsed;
  const map = new Map<string, number>();
  const fp = Buffer.alloc(FINGERPRINT_BYTES);
  const words = new Int32Array(fp.buffer, fp.byteOffset, 4);
  const start = performance.now();
  for (let i = 0; i < MAP_ENTRIES; i++) {
    writeFp(words, 0, i, 1);
    map.set(fp.toString('hex'), i);
  }
  record(`Map<hex, location>, set, ${MAP_ENTRIES} entries`, MAP_ENTRIES, performance.now() - start);
  gc?.();
  const bytesPerEntry = gc ? (process.memoryUsage().heapUsed - before) / MAP_ENTRIES : undefined;
  log(`Map<hex, location>: ${bytesPerEntry === undefined ? 'run with --expose-gc to measure' : bytesPerEntry.toFixed(1)} bytes/entry (key to one location only, no reverse map)`);
  let hits = 0;
  const lookupStart = performance.now();
  for (let i = 0; i < PROBES; i++) {
    writeFp(words, 0, random() % MAP_ENTRIES, 1);
    if (map.get(fp.toString('hex')) !== undefined) hits++;
  }
  record('Map<hex, location>, get, present', PROBES, performance.now() - lookupStart);
  if (hits !== PROBES) throw new Error('Map baseline lost entries');
  return { bytesPerEntry };
}

memoryLatency();
const { bytesPerLocation } = contentIndex();
const { bytesPerEntry } = mapBaseline();
const result = { locations, bytesPerLocation, mapBytesPerEntry: bytesPerEntry, rows };
const svg = barChartSvg(`content index at ${locations} locations (${bytesPerLocation.toFixed(1)} B/location)`, 'ns/op', rows.map((row) => ({ label: row.name, value: row.nsPerOp })));
const path = values.dry ? undefined : writeResults('index-memory', result, svg);
if (values.json) console.log(JSON.stringify(result));
else {
  console.log(markdownTable(['operation', 'ns/op', 'M ops/s'], rows.map((row) => [row.name, row.nsPerOp.toFixed(0), (1e3 / row.nsPerOp).toFixed(2)])));
  if (path) console.log(`\nresults: ${path}`);
}
