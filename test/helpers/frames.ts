import { encodeFrame, type Frame } from '../../protocol/index.js';

/** A frame's bytes on the wire, prefix, header and payload in one buffer. */
export function wire(frame: Frame): Buffer {
  const [head, payload] = encodeFrame(frame);
  return payload === undefined ? head : Buffer.concat([head, payload]);
}

/** Typed arrays compared by content and kind, whatever their class (Buffer or not) or offset. */
export function plain(value: unknown): unknown {
  if (value instanceof Uint32Array) return { u32: Array.from(value) };
  if (value instanceof Uint8Array) return { bytes: Buffer.from(value.buffer, value.byteOffset, value.length).toString('hex') };
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === 'object' && value !== null) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}
