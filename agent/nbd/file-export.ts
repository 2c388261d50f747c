// A raw file served as an NBD export: pread/pwrite through one FileHandle.
//
// Allocation (base:allocation) comes from the data, not from the file system: Node has no
// lseek(SEEK_DATA/SEEK_HOLE) (fs has no whence beyond position), nor FIEMAP, and we do not
// add a native addon for it. So block status reads the range and reports every all-zero
// 4 KiB granule as NBD_STATE_HOLE | NBD_STATE_ZERO and every other one as allocated (flags 0).
// That is safe under the spec's rules: HOLE clear is the promise ("writing here will not
// fail with ENOSPC") and we make it only for granules that hold data, which must be
// allocated; HOLE set promises nothing, and ZERO is true. A file with no blocks at all
// (fstat) is one hole without reading. The cost: a block status reads what it reports on,
// at most BLOCK_STATUS_SCAN_BYTES per request (the client asks again from where it ends).
//
// WRITE_ZEROES writes zeroes whether or not NO_HOLE is set: punching a hole needs
// fallocate(FALLOC_FL_PUNCH_HOLE), which no Node built-in reaches. TRIM is not offered for
// the same reason (a TRIM that discards nothing is legal, but would advertise a capability
// we do not have). FLUSH and FUA are fdatasync.
import { type FileHandle, open } from 'node:fs/promises';
import { AllocationFlag, BASE_ALLOCATION } from '../../protocol/nbd/index.js';
import type { Extent, NbdExport } from './export.js';
import { ZERO_GRANULE_BYTES, ZEROES, isZero } from './zeroes.js';

/** Most a block status request reads (a qemu-img map of a 64 MiB test image is one request). */
export const BLOCK_STATUS_SCAN_BYTES = 64 * 1024 * 1024;
/** Buffer of one read while scanning, and of one write of zeroes. */
const IO_BYTES = ZEROES.length;

export interface FileExportOptions {
  name: string;
  description?: string;
  readOnly?: boolean;
}

export class FileExport implements NbdExport {
  readonly name: string;
  readonly description: string | undefined;
  readonly readOnly: boolean;
  readonly minBlockBytes = 1;
  readonly metaContexts: readonly string[] = [];
  readonly write: NbdExport['write'];
  readonly writeZeroes: NbdExport['writeZeroes'];

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly sizeBytes: number,
    options: FileExportOptions,
  ) {
    this.name = options.name;
    this.description = options.description;
    this.readOnly = options.readOnly ?? false;
    // Read-only exports have no write methods at all, so the server cannot be talked into one.
    this.write = this.readOnly ? undefined : (offset, data, o) => this.#write(offset, data, o.fua);
    this.writeZeroes = this.readOnly ? undefined : (offset, length, o) => this.#writeZeroes(offset, length, o.fua);
  }

  /** Opens a regular file; its size now is the export's size. */
  static async open(path: string, options: FileExportOptions): Promise<FileExport> {
    const handle = await open(path, options.readOnly ? 'r' : 'r+');
    try {
      const stat = await handle.stat();
      if (!stat.isFile()) throw new Error(`${path} is not a regular file`);
      return new FileExport(path, handle, stat.size, options);
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(lengthBytes);
    await this.#readInto(out, offsetBytes);
    return out;
  }

  async #readInto(out: Buffer, offsetBytes: number): Promise<void> {
    let done = 0;
    while (done < out.length) {
      const { bytesRead } = await this.handle.read(out, done, out.length - done, offsetBytes + done);
      if (bytesRead === 0) {
        // The file shrank under us: past its end it reads as it would have, zeroes.
        out.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async #write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offsetBytes + done);
      done += bytesWritten;
    }
    if (fua) await this.handle.datasync();
  }

  async #writeZeroes(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    for (let done = 0; done < lengthBytes; ) {
      const n = Math.min(IO_BYTES, lengthBytes - done);
      const { bytesWritten } = await this.handle.write(ZEROES, 0, n, offsetBytes + done);
      done += bytesWritten;
    }
    if (fua) await this.handle.datasync();
  }

  async flush(): Promise<void> {
    await this.handle.datasync();
  }

  async blockStatus(context: string, offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (context !== BASE_ALLOCATION) throw Object.assign(new Error(`no context ${context}`), { code: 'EINVAL' });
    const length = Math.min(lengthBytes, this.sizeBytes - offsetBytes);
    const stat = await this.handle.stat();
    if (stat.blocks === 0) return [{ lengthBytes: length, flags: AllocationFlag.hole | AllocationFlag.zero }];
    return this.#scan(offsetBytes, Math.min(length, BLOCK_STATUS_SCAN_BYTES));
  }

  /** Extents of [offset, +length) by content, granule by granule (aligned to absolute offsets). */
  async #scan(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    const add = (n: number, flags: number) => {
      const last = extents.at(-1);
      if (last !== undefined && last.flags === flags) last.lengthBytes += n;
      else extents.push({ lengthBytes: n, flags });
    };
    const buffer = Buffer.allocUnsafe(Math.min(IO_BYTES, lengthBytes));
    const end = offsetBytes + lengthBytes;
    for (let at = offsetBytes; at < end; ) {
      // Reads end on a granule boundary so no granule straddles two reads.
      const n = Math.min(end, Math.floor((at + IO_BYTES) / ZERO_GRANULE_BYTES) * ZERO_GRANULE_BYTES) - at;
      const view = buffer.subarray(0, n);
      await this.#readInto(view, at);
      for (let g = 0; g < n; ) {
        const next = Math.min(n, (Math.floor((at + g) / ZERO_GRANULE_BYTES) + 1) * ZERO_GRANULE_BYTES - at);
        const zero = isZero(view.subarray(g, next));
        add(next - g, zero ? AllocationFlag.hole | AllocationFlag.zero : 0);
        g = next;
      }
      at += n;
    }
    return extents;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
