// The constants that cross process boundaries are defined once in C (native/src/gangway-abi.h,
// guest-layout.h); the few the agent needs are mirrored in TypeScript. This test reads the
// headers and holds the two sides together.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { MAX_REGIONS } from '../../protocol/limits.js';
import { GUEST_MAX_REGIONS, GUEST_PAGE_SIZE } from '../../agent/guest/guest-header.js';
import { PROTECT_THREAD_NAME } from '../../agent/tracker/uffd-wp.js';
import { TESTVM_DISK_BLOCK_BYTES, TESTVM_DISK_MAX_BLOCKS } from '../../agent/guest/testvm-disk.js';
import { TESTVM_RANGE_START, TESTVM_STATUS_ADDR, TESTVM_STATUS_LAYOUT } from '../../agent/guest/testvm-status.js';

const header = (name: string) => readFileSync(fileURLToPath(new URL(`../../native/src/${name}`, import.meta.url)), 'utf8');
const testvmHeader = (name: string) => readFileSync(fileURLToPath(new URL(`../../native/testvm/${name}`, import.meta.url)), 'utf8');

function define(text: string, name: string): string {
  const match = new RegExp(`^#define ${name} (.+)$`, 'm').exec(text);
  if (!match) throw new Error(`${name} is not defined`);
  return match[1]!.trim();
}

describe('the native ABI as TypeScript sees it', () => {
  it('region limits agree: the shim, the guest, the protocol', () => {
    const abi = header('gangway-abi.h');
    expect(Number.parseInt(define(abi, 'GW_MAX_REGIONS'), 10)).toBe(MAX_REGIONS);
    expect(Number.parseInt(define(header('guest-layout.h'), 'GUEST_MAX_REGIONS'), 10)).toBe(GUEST_MAX_REGIONS);
    expect(GUEST_MAX_REGIONS).toBe(MAX_REGIONS);
  });

  it("the write-protect thread's name and the guest's page size agree", () => {
    expect(define(header('gangway-abi.h'), 'GW_PROTECT_THREAD_NAME')).toBe(JSON.stringify(PROTECT_THREAD_NAME));
    expect(Number.parseInt(define(header('guest-layout.h'), 'GUEST_PAGE_SIZE'), 10)).toBe(GUEST_PAGE_SIZE);
  });

  it("the test kernel's status block and disk constants agree with their readers", () => {
    const status = testvmHeader('status.h');
    const hex = (name: string) => Number.parseInt(define(status, name).replace(/u$/, ''), 16);
    expect(Number.parseInt(define(status, 'TESTVM_STATUS_LAYOUT'), 10)).toBe(TESTVM_STATUS_LAYOUT);
    expect(hex('TESTVM_STATUS_ADDR')).toBe(TESTVM_STATUS_ADDR);
    expect(hex('TESTVM_RANGE_START')).toBe(TESTVM_RANGE_START);
    expect(Number.parseInt(define(status, 'TESTVM_DISK_BLOCK_SIZE'), 10)).toBe(TESTVM_DISK_BLOCK_BYTES);
    // A u32 version per block from TESTVM_DISK_TABLE_ADDR to the range.
    expect((TESTVM_RANGE_START - hex('TESTVM_DISK_TABLE_ADDR')) / 4).toBe(TESTVM_DISK_MAX_BLOCKS);
  });
});
