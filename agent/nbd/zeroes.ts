// Zero detection, shared by the server (READ replies send zero granules as holes) and the
// file export (base:allocation by content).

/** A page: the unit in which Linux file systems allocate, and so the size of a hole worth reporting. */
export const ZERO_GRANULE_BYTES = 4096;

const COMPARE_BYTES = 1024 * 1024;
/** Never written: compared against, and written from by the file export's WRITE_ZEROES. */
export const ZEROES: Buffer = Buffer.alloc(COMPARE_BYTES);

/** Whether every byte is 0 (memcmp against a zero buffer, a megabyte at a time). */
export function isZero(bytes: Uint8Array): boolean {
  for (let at = 0; at < bytes.length; at += COMPARE_BYTES) {
    const part = bytes.subarray(at, Math.min(bytes.length, at + COMPARE_BYTES));
    if (Buffer.compare(part, ZEROES.subarray(0, part.length)) !== 0) return false;
  }
  return true;
}
