// gangway-testvm, the multiboot test kernel, booted in QEMU under TCG with its RAM in a
// /dev/shm memory-backend file: the tests read the kernel's status block and pages from
// that file while it runs, corrupt pages while QEMU is stopped (SIGSTOP), and check that
// the kernel's own checks find them.
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { compressSync } from 'lz4-napi';
import { afterEach, describe, expect, it } from 'vitest';
import { testvmMissing } from '../../agent/native.js';
import {
  TESTVM_PAGE_SIZE,
  TESTVM_RANGE_START,
  TESTVM_STATUS_ADDR,
  TESTVM_STATUS_BYTES,
  parseTestvmStatus,
  readTestvmHotPages,
  readTestvmStatus,
  readTestvmVersions,
  requestTestvmFullCheck,
  type TestvmStatus,
} from '../../agent/guest/testvm-status.js';
import { bootTestvm, QEMU, serialLog, status, stopTestvms, TESTVM_MEMORY_MIB, type Vm } from '../helpers/testvm-qemu.js';
import { waitFor } from '../helpers/wait.js';

const MEMORY_MIB = TESTVM_MEMORY_MIB;
const MiB = 1 << 20;
const PAGE = TESTVM_PAGE_SIZE;
const BOOT_TIMEOUT_MS = 12_000;

function findSkipReason(): string | undefined {
  const qemu = spawnSync(QEMU, ['--version'], { encoding: 'utf8' });
  if (qemu.error || qemu.status !== 0) return `${QEMU} is not installed (Debian: apt-get install qemu-system-x86)`;
  return testvmMissing();
}
const skipReason = findSkipReason();

const boot = (append: string): Vm => bootTestvm(append);

/** Waits for `ready` on COM1 (failing at once if QEMU exits) and returns the status then. */
async function waitReady(vm: Vm): Promise<TestvmStatus> {
  await waitFor(
    'the kernel to print ready',
    () => {
      if (vm.exitCode !== undefined) throw new Error(`${QEMU} exited (${vm.exitCode}): ${vm.stderr}\n${serialLog(vm)}`);
      return /^ready$/m.test(serialLog(vm));
    },
    BOOT_TIMEOUT_MS,
  );
  return status(vm);
}

function threadStates(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return stat.charAt(stat.lastIndexOf(')') + 2);
  });
}

/** SIGSTOP to the QEMU this test started; returns once every thread of it has stopped. */
async function freeze(vm: Vm): Promise<void> {
  process.kill(vm.pid, 'SIGSTOP');
  await waitFor('QEMU to stop', () => threadStates(vm.pid).every((s) => s === 'T'), 5_000);
}

function thaw(vm: Vm): void {
  process.kill(vm.pid, 'SIGCONT');
}

function readRange(vm: Vm, s: TestvmStatus): Buffer {
  const buf = Buffer.alloc(s.pageCount * PAGE);
  const fd = openSync(vm.memPath, 'r');
  try {
    let done = 0;
    while (done < buf.length) done += readSync(fd, buf, done, buf.length - done, s.rangeStartAddr + done);
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** Flips 8 bytes of the page at guest-physical `addr` in the memory file. */
function corruptPage(vm: Vm, addr: number): void {
  const fd = openSync(vm.memPath, 'r+');
  try {
    const bytes = Buffer.alloc(8);
    readSync(fd, bytes, 0, 8, addr + 100);
    for (let i = 0; i < 8; i++) bytes[i] = (bytes[i] ?? 0) ^ 0xa5;
    writeSync(fd, bytes, 0, 8, addr + 100);
  } finally {
    closeSync(fd);
  }
}

function isZero(page: Buffer): boolean {
  for (let i = 0; i < page.length; i += 8) if (page.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

/** A minimal QMP client: commands in, their `return` out (events are skipped). */
class Qmp {
  private buffered = '';
  private waiting: ((line: string) => void)[] = [];
  private lines: string[] = [];

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8').on('data', (chunk: string) => {
      this.buffered += chunk;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        const line = this.buffered.slice(0, nl);
        this.buffered = this.buffered.slice(nl + 1);
        const waiter = this.waiting.shift();
        if (waiter) waiter(line);
        else this.lines.push(line);
      }
    });
  }

  static async connect(path: string): Promise<Qmp> {
    const socket = createConnection(path);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const qmp = new Qmp(socket);
    await qmp.nextLine(); // greeting
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  private nextLine(): Promise<string> {
    const line = this.lines.shift();
    return line !== undefined ? Promise.resolve(line) : new Promise((resolve) => this.waiting.push(resolve));
  }

  async execute(command: string): Promise<unknown> {
    this.socket.write(`${JSON.stringify({ execute: command })}\n`);
    for (;;) {
      const reply = JSON.parse(await this.nextLine()) as { return?: unknown; error?: { desc: string } };
      if (reply.error) throw new Error(`QMP ${command}: ${reply.error.desc}`);
      if ('return' in reply) return reply.return;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

afterEach(async (ctx) => {
  await stopTestvms(ctx.task.result?.state === 'fail');
});

/** A block as status.h lays it out, with every field distinct. */
function sampleBlock(): Buffer {
  const b = Buffer.alloc(TESTVM_STATUS_BYTES);
  b.write('GWVMSTAT', 0, 'latin1');
  b.writeUInt32LE(2, 8); // layout
  b.writeUInt32LE(2, 12); // running
  b.writeUInt32LE(6, 16); // seq
  b.writeUInt32LE(4096, 20);
  b.writeBigUInt64LE(BigInt(TESTVM_RANGE_START), 24);
  b.writeBigUInt64LE(12256n, 32);
  b.writeBigUInt64LE(0xfedcba9876543210n, 40);
  b.writeBigUInt64LE(7n, 48);
  b.writeUInt32LE(2, 56); // os-image
  b.writeUInt32LE(600, 60);
  b.writeUInt32LE(250, 64);
  b.writeUInt32LE(3082, 68);
  b.writeBigUInt64LE(0xffffffffffffffffn, 72); // gw.rate=max
  b.writeBigUInt64LE(0x400000n, 80);
  b.writeBigUInt64LE(0x40c000n, 88);
  b.writeBigUInt64LE(2_098_455_817n, 96);
  b.writeBigUInt64LE(9812n, 104);
  b.writeBigUInt64LE(3n, 112);
  b.writeBigUInt64LE(9970n, 120);
  b.writeBigUInt64LE(9971n, 128);
  b.writeBigUInt64LE(0n, 136);
  b.writeBigUInt64LE(0x20b9000n, 144);
  b.writeBigUInt64LE(0n, 152); // no stale page yet
  b.writeUInt32LE(1, 160);
  b.writeUInt32LE(0, 164);
  b.writeUInt32LE(4, 168); // no request pending
  b.writeUInt32LE(4, 172);
  b.writeBigUInt64LE(12256n, 176);
  b.writeBigUInt64LE(0n, 184);
  // Layout 2: the disk.
  b.writeUInt32LE(2, 192); // running
  b.writeUInt32LE(4096, 196);
  b.writeBigUInt64LE(64n << 20n, 200);
  b.writeBigUInt64LE(16384n, 208);
  b.writeBigUInt64LE(4096n, 216);
  b.writeBigUInt64LE(256n, 224);
  b.writeBigUInt64LE(400n, 232);
  b.writeBigUInt64LE(0xc00000n, 240);
  b.writeBigUInt64LE(9n, 248);
  b.writeBigUInt64LE(2311n, 256);
  b.writeBigUInt64LE(250n, 264);
  b.writeBigUInt64LE(6500n, 272);
  b.writeBigUInt64LE(1n, 280);
  b.writeBigUInt64LE(77n, 288);
  b.writeBigUInt64LE(0n, 296); // block 0 is a block
  b.writeBigUInt64LE(0xffffffffffffffffn, 304); // no write in flight
  b.writeUInt32LE(10, 312);
  b.writeUInt32LE(3, 316);
  b.writeBigUInt64LE(4290n, 320);
  b.writeBigUInt64LE(1n, 328);
  return b;
}

describe('the testvm status block (no VM)', () => {
  it('parses every field of status.h at its offset', () => {
    const block = sampleBlock();
    const withLead = Buffer.concat([Buffer.alloc(TESTVM_STATUS_ADDR), block]);
    const s = parseTestvmStatus(withLead, TESTVM_STATUS_ADDR);
    expect(s).toStrictEqual({
      layoutVersion: 2,
      state: 'running',
      seq: 6,
      pageSizeBytes: 4096,
      rangeStartAddr: TESTVM_RANGE_START,
      pageCount: 12256,
      seed: 0xfedcba9876543210n,
      imageSeed: 7n,
      profile: 'os-image',
      sharedPermille: 600,
      hotPermille: 250,
      hotPageCount: 3082,
      dirtyRateBytesPerSec: Infinity,
      versionTableAddr: 0x400000,
      hotListAddr: 0x40c000,
      tscHz: 2_098_455_817,
      uptimeMs: 9812,
      passes: 3,
      pagesWritten: 9970,
      pagesChecked: 9971,
      stalePages: 0,
      lastWrittenAddr: 0x20b9000,
      lastStaleAddr: undefined,
      resumes: 1,
      metaErrors: 0,
      checkRequest: 4,
      checkDone: 4,
      checkPages: 12256,
      checkStalePages: 0,
      disk: {
        state: 'running',
        blockSizeBytes: 4096,
        capacityBytes: 64 * MiB,
        blockCount: 16384,
        baseBlocks: 4096,
        hotBlocks: 256,
        rateBlocksPerSec: 400,
        versionTableAddr: 0xc00000,
        passes: 9,
        writes: 2311,
        blocksWritten: 250,
        blocksChecked: 6500,
        staleBlocks: 1,
        lastWrittenBlock: 77,
        lastStaleBlock: 0,
        inflightBlock: undefined,
        inflightVersion: 10,
        errors: 3,
        checkBlocks: 4290,
        checkStaleBlocks: 1,
      },
    });
  });

  it('reads a layout-1 block (a kernel from before the disk) without disk fields', () => {
    const old = sampleBlock().subarray(0, 192);
    old.writeUInt32LE(1, 8);
    const s = parseTestvmStatus(old);
    expect(s).toMatchObject({ layoutVersion: 1, pageCount: 12256, checkPages: 12256 });
    expect(s.disk).toBeUndefined();
  });

  it('refuses a block without the magic, of another layout, or cut short', () => {
    const noMagic = sampleBlock();
    noMagic.write('GWGUEST1', 0, 'latin1');
    expect(() => parseTestvmStatus(noMagic)).toThrow(/no GWVMSTAT block/);
    const newer = sampleBlock();
    newer.writeUInt32LE(3, 8);
    expect(() => parseTestvmStatus(newer)).toThrow(/layout 3/);
    expect(() => parseTestvmStatus(sampleBlock().subarray(0, TESTVM_STATUS_BYTES - 1))).toThrow(/do not hold/);
  });

  it('gives back a torn copy (odd seq) after its attempts, and requests a check as check_done + 1', () => {
    const path = join(tmpdir(), `gangway-testvm-status-${process.pid}-${randomBytes(6).toString('hex')}`);
    const block = sampleBlock();
    block.writeUInt32LE(7, 16); // stopped mid-update
    writeFileSync(path, Buffer.concat([Buffer.alloc(TESTVM_STATUS_ADDR), block]));
    try {
      expect(readTestvmStatus(path, TESTVM_STATUS_ADDR, 3).seq).toBe(7);
      expect(requestTestvmFullCheck(path)).toBe(5);
      expect(readTestvmStatus(path, TESTVM_STATUS_ADDR, 3)).toMatchObject({ checkRequest: 5, checkDone: 4 });
    } finally {
      rmSync(path, { force: true });
    }
  });
});

describe.skipIf(skipReason !== undefined)(`gangway-testvm under QEMU TCG${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  it('rewrites its hot set at the dirty rate with no stale page, and a full check finds none', async () => {
    const vm = boot('gw.profile=os-image gw.seed=1 gw.hot=50 gw.rate=2048');
    const first = await waitReady(vm);
    const hostStart = performance.now();
    expect(first).toMatchObject({
      state: 'running',
      pageSizeBytes: PAGE,
      rangeStartAddr: TESTVM_RANGE_START,
      profile: 'os-image',
      seed: 1n,
      imageSeed: 0n,
      sharedPermille: 0,
      hotPermille: 50,
      dirtyRateBytesPerSec: 2048 * 1024,
      stalePages: 0,
      metaErrors: 0,
      disk: { state: 'none', writes: 0 },
    });
    // The range runs to the end of the RAM region (QEMU keeps a little at the top of 64 MiB).
    expect(first.rangeStartAddr + first.pageCount * PAGE).toBeLessThanOrEqual(MEMORY_MIB * MiB);
    expect(first.pageCount).toBeGreaterThan((MEMORY_MIB - 17) * (MiB / PAGE));
    expect(first.hotPageCount / first.pageCount).toBeGreaterThan(0.04);
    expect(first.hotPageCount / first.pageCount).toBeLessThan(0.06);

    const later = await waitFor(
      '3 s of the kernel running',
      () => {
        const s = status(vm);
        return s.uptimeMs >= first.uptimeMs + 3000 && s;
      },
      10_000,
    );
    const hostSec = (performance.now() - hostStart) / 1000;
    const guestSec = (later.uptimeMs - first.uptimeMs) / 1000;
    // The TSC's rate was measured against the PIT: its seconds are the host's.
    expect(guestSec / hostSec).toBeGreaterThan(0.8);
    expect(guestSec / hostSec).toBeLessThan(1.2);
    const pagesPerSec = (later.pagesWritten - first.pagesWritten) / guestSec;
    // Below the knob only as far as a loaded host starves the TCG guest (as testvm-disk's blocks).
    expect(pagesPerSec).toBeGreaterThan(512 * 0.6);
    expect(pagesPerSec).toBeLessThan(512 * 1.1);
    expect(later.passes).toBeGreaterThanOrEqual(first.passes + 2);
    expect(later.stalePages).toBe(0);
    expect(later.pagesChecked).toBeGreaterThanOrEqual(later.pagesWritten);
    expect(serialLog(vm)).toMatch(/^t=\d+ pass=\d+ writes=\d+ stale=0$/m);

    const request = requestTestvmFullCheck(vm.memPath);
    const checked = await waitFor(
      'the full check',
      () => {
        const s = status(vm);
        return s.checkDone === request && s;
      },
      10_000,
    );
    expect(checked).toMatchObject({ checkPages: first.pageCount, checkStalePages: 0, stalePages: 0, metaErrors: 0 });
    expect(serialLog(vm)).toContain(`check ${request}: pages=${first.pageCount} stale=0`);

    // os-image pages are text-like: LZ4 roughly halves them.
    const range = readRange(vm, checked);
    const ratio = compressSync(range).length / range.length;
    expect(ratio).toBeGreaterThan(0.3);
    expect(ratio).toBeLessThan(0.8);
  });

  it('a page corrupted while QEMU is stopped is found by the rewrite and by the full check', async () => {
    const vm = boot('gw.profile=os-image gw.seed=3 gw.hot=50 gw.rate=2048');
    await waitReady(vm);
    await waitFor('some writes', () => status(vm).pagesWritten >= 50);

    // A hot page: the one written last, which the next pass rewrites (checking it first).
    await freeze(vm);
    const hotPage = readTestvmStatus(vm.memPath).lastWrittenAddr;
    expect(hotPage).toBeGreaterThanOrEqual(TESTVM_RANGE_START);
    corruptPage(vm, hotPage);
    thaw(vm);
    const found = await waitFor(
      'the rewrite to find the corrupted page',
      () => {
        const s = status(vm);
        return s.stalePages > 0 && s;
      },
      10_000,
    );
    expect(found).toMatchObject({ stalePages: 1, lastStaleAddr: hotPage });
    expect(serialLog(vm)).toContain(`stale page 0x${hotPage.toString(16)}:`);

    // A cold page, which only a full check reads; the hot one was rewritten whole since.
    await freeze(vm);
    const stopped = readTestvmStatus(vm.memPath);
    // The version table is the kernel's write count, page by page (one more if QEMU stopped
    // between a page's new version and the count).
    const versionSum = readTestvmVersions(vm.memPath, stopped).reduce((sum, v) => sum + v, 0);
    expect(versionSum - stopped.pagesWritten).toBeGreaterThanOrEqual(0);
    expect(versionSum - stopped.pagesWritten).toBeLessThanOrEqual(1);
    const hot = new Set(readTestvmHotPages(vm.memPath, stopped));
    let coldPage = stopped.rangeStartAddr / PAGE;
    while (hot.has(coldPage)) coldPage++;
    const coldAddr = coldPage * PAGE;
    corruptPage(vm, coldAddr);
    const request = requestTestvmFullCheck(vm.memPath);
    thaw(vm);
    const checked = await waitFor(
      'the full check',
      () => {
        const s = status(vm);
        return s.checkDone === request && s;
      },
      10_000,
    );
    expect(checked).toMatchObject({ checkPages: stopped.pageCount, checkStalePages: 1, lastStaleAddr: coldAddr, metaErrors: 0 });
    expect(checked.stalePages).toBe(2);
    expect(serialLog(vm)).toContain(`check ${request}: pages=${stopped.pageCount} stale=1`);
  });

  it('the zero profile leaves nine pages in ten zero, and writes nothing at rate 0', async () => {
    const vm = boot('gw.profile=zero gw.seed=5');
    const first = await waitReady(vm);
    expect(first).toMatchObject({ profile: 'zero', dirtyRateBytesPerSec: 0, pagesWritten: 0 });
    const range = readRange(vm, first);
    let zero = 0;
    for (let p = 0; p < first.pageCount; p++) if (isZero(range.subarray(p * PAGE, (p + 1) * PAGE))) zero++;
    expect(zero / first.pageCount).toBeGreaterThan(0.87);
    expect(zero / first.pageCount).toBeLessThan(0.93);
    await sleep(1200);
    const later = status(vm);
    expect(later.uptimeMs).toBeGreaterThan(first.uptimeMs + 1000);
    expect(later.pagesWritten).toBe(0);
  });

  it('the random profile is incompressible', async () => {
    const vm = boot('gw.profile=random gw.seed=9 gw.rate=1024');
    const first = await waitReady(vm);
    expect(first.profile).toBe('random');
    const range = readRange(vm, first);
    expect(compressSync(range).length).toBeGreaterThanOrEqual(range.length);
    const counts = new Array<number>(256).fill(0);
    for (const byte of range) counts[byte] = (counts[byte] ?? 0) + 1;
    const entropyBits = counts.reduce((h, n) => (n ? h - (n / range.length) * Math.log2(n / range.length) : h), 0);
    expect(entropyBits).toBeGreaterThan(7.99);
  });

  it('two VMs of one image seed share its blocks at the shared fraction', async () => {
    const a = boot('gw.profile=os-image gw.seed=1 gw.image_seed=7 gw.shared=600');
    const b = boot('gw.profile=os-image gw.seed=2 gw.image_seed=7 gw.shared=600');
    const [sa, sb] = [await waitReady(a), await waitReady(b)];
    const pageHashes = (vm: Vm, s: TestvmStatus) => {
      const range = readRange(vm, s);
      const hashes: string[] = [];
      for (let p = 0; p < s.pageCount; p++) {
        const page = range.subarray(p * PAGE, (p + 1) * PAGE);
        if (!isZero(page)) hashes.push(createHash('sha256').update(page).digest('hex'));
      }
      return hashes;
    };
    const inB = new Set(pageHashes(b, sb));
    const ofA = pageHashes(a, sa);
    const shared = ofA.filter((h) => inB.has(h)).length / ofA.length;
    expect(shared).toBeGreaterThan(0.55);
    expect(shared).toBeLessThan(0.65);
  });

  it('counts a QEMU stop of a few seconds as a resume (the RTC runs on, the TSC does not)', async () => {
    const vm = boot('gw.profile=random gw.hot=50 gw.rate=1024');
    await waitReady(vm);
    const qmp = await Qmp.connect(vm.qmpPath);
    try {
      await qmp.execute('stop');
      await sleep(4000);
      await qmp.execute('cont');
    } finally {
      qmp.close();
    }
    const resumed = await waitFor(
      'the kernel to see the stop',
      () => {
        const s = status(vm);
        return s.resumes > 0 && s;
      },
      5_000,
    );
    expect(resumed).toMatchObject({ resumes: 1, stalePages: 0 });
    expect(serialLog(vm)).toMatch(/^resume: the RTC moved \d+ s while the TSC moved \d+ s/m);
  });

  it('refuses unknown keys and bad values, said on COM1', async () => {
    const vm = boot('gw.hot=2000 gw.bogus=1 gw.seed=1 gw.seed=2');
    await waitFor('the kernel to give up', () => /^failed: halted$/m.test(serialLog(vm)), BOOT_TIMEOUT_MS);
    const log = serialLog(vm);
    expect(log).toContain("error: gw.hot='2000': expected a whole per-mille, 0..1000");
    expect(log).toContain("error: unknown parameter 'gw.bogus'");
    expect(log).toContain('error: gw.seed is given twice');
    expect(log).not.toMatch(/^ready$/m);
    expect(status(vm).state).toBe('failed');
  });
});
