// The fuzzer's mutations: what AFL and libFuzzer do to an input from the corpus (flip a bit,
// set a byte to an interesting value, insert, erase, duplicate, splice with another input,
// overwrite a 16/32-bit word with a length-like value), several per child. Lengths near the
// limits the decoders check (0, 1, 2^n, 2^n +- 1, the u32 maximum) are what finds an
// off-by-one in a length check, so the word mutations draw from them.

/** mulberry32: a seeded 32-bit PRNG, so a run is replayed from its seed. */
export class Rng {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return n <= 1 ? 0 : this.next() % n;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)]!;
  }
}

const INTERESTING_8 = [0, 1, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40];
const INTERESTING_32 = [0, 1, 2, 3, 4, 7, 8, 15, 16, 28, 32, 64, 127, 128, 255, 256, 4095, 4096, 4097, 65535, 65536, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff, 1 << 20, 1 << 25, (1 << 25) + 1];

type Mutation = (input: Buffer, rng: Rng, other: Buffer) => Buffer;

const MUTATIONS: Mutation[] = [
  // flip a bit
  (input, rng) => {
    if (input.length === 0) return input;
    const out = Buffer.from(input);
    out[rng.below(out.length)]! ^= 1 << rng.below(8);
    return out;
  },
  // a random byte
  (input, rng) => {
    if (input.length === 0) return Buffer.from([rng.below(256)]);
    const out = Buffer.from(input);
    out[rng.below(out.length)] = rng.below(256);
    return out;
  },
  // an interesting byte
  (input, rng) => {
    if (input.length === 0) return input;
    const out = Buffer.from(input);
    out[rng.below(out.length)] = rng.pick(INTERESTING_8);
    return out;
  },
  // an interesting 32-bit word, big- or little-endian (lengths in the NBD and frame prefixes are BE)
  (input, rng) => {
    if (input.length < 4) return input;
    const out = Buffer.from(input);
    const at = rng.below(out.length - 3);
    const value = rng.pick(INTERESTING_32) >>> 0;
    if (rng.below(2) === 0) out.writeUInt32BE(value, at);
    else out.writeUInt32LE(value, at);
    return out;
  },
  // an interesting 16-bit word
  (input, rng) => {
    if (input.length < 2) return input;
    const out = Buffer.from(input);
    out.writeUInt16BE(rng.pick(INTERESTING_32) & 0xffff, rng.below(out.length - 1));
    return out;
  },
  // add to or subtract from a byte
  (input, rng) => {
    if (input.length === 0) return input;
    const out = Buffer.from(input);
    const at = rng.below(out.length);
    out[at] = (out[at]! + (rng.below(2) === 0 ? 1 : -1) * (1 + rng.below(16))) & 0xff;
    return out;
  },
  // insert random bytes
  (input, rng) => {
    const at = rng.below(input.length + 1);
    const extra = Buffer.alloc(1 + rng.below(16));
    for (let i = 0; i < extra.length; i++) extra[i] = rng.below(256);
    return Buffer.concat([input.subarray(0, at), extra, input.subarray(at)]);
  },
  // erase a range
  (input, rng) => {
    if (input.length < 2) return input;
    const at = rng.below(input.length);
    const length = 1 + rng.below(Math.min(64, input.length - at));
    return Buffer.concat([input.subarray(0, at), input.subarray(at + length)]);
  },
  // duplicate a range (repeated frames, repeated options)
  (input, rng) => {
    if (input.length === 0) return input;
    const at = rng.below(input.length);
    const length = 1 + rng.below(Math.min(256, input.length - at));
    const to = rng.below(input.length + 1);
    return Buffer.concat([input.subarray(0, to), input.subarray(at, at + length), input.subarray(to)]);
  },
  // cut short
  (input, rng) => (input.length === 0 ? input : input.subarray(0, rng.below(input.length))),
  // splice: a head of this input and a tail of another
  (input, rng, other) => Buffer.concat([input.subarray(0, rng.below(input.length + 1)), other.subarray(rng.below(other.length + 1))]),
];

/** A child of `input`: 1 to 4 mutations (one of them possibly a splice with `other`), at most `maxLengthBytes` long. */
export function mutate(input: Buffer, other: Buffer, rng: Rng, maxLengthBytes: number): Buffer {
  let out = input;
  const count = 1 + rng.below(4);
  for (let i = 0; i < count; i++) out = rng.pick(MUTATIONS)(out, rng, other);
  return out.length > maxLengthBytes ? out.subarray(0, maxLengthBytes) : out;
}

/** Cuts `input` into chunks whose sizes come from `rng` (1 byte to the whole): decoders must not care where a stream is cut. */
export function chunked(input: Buffer, rng: Rng): Buffer[] {
  if (rng.below(4) === 0) return [input];
  const out: Buffer[] = [];
  let at = 0;
  const small = rng.below(2) === 0;
  while (at < input.length) {
    const size = 1 + (small ? rng.below(8) : rng.below(Math.max(1, input.length >> 1)));
    out.push(input.subarray(at, at + size));
    at += size;
  }
  return out;
}
