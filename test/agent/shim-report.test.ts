// The tracking shim's report, as the agent reads it: a guest that arrived by post-copy
// writes `postcopy=1` after its `ok` (its mapping tracks writes as well), and must be tracked
// by uffd-wp like any other, not fall back to hash-scan.
import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../protocol/errors.js';
import { parseShimReport } from '../../agent/tracker/uffd-wp.js';

describe('parseShimReport', () => {
  it('reads an ok report, with or without postcopy=1', () => {
    expect(parseShimReport('ok start=0x7f00aa000000 length=16777216 pid=4242\n')).toEqual({ startAddress: 0x7f00aa000000n, lengthBytes: 16777216, pid: 4242 });
    expect(parseShimReport('ok start=0x7f00aa000000 length=4096 pid=7 postcopy=1\n')).toEqual({ startAddress: 0x7f00aa000000n, lengthBytes: 4096, pid: 7 });
    expect(parseShimReport('ok start=0x7f00aa000000 length=4096 pid=7 postcopy=1 uffd=5\n')).toEqual({ startAddress: 0x7f00aa000000n, lengthBytes: 4096, pid: 7, uffdFd: 5 });
  });

  it('turns an error report or anything else into a tracker error that says what the shim said', () => {
    expect(() => parseShimReport('error stage=register errno=22 message=Invalid argument\n')).toThrow(
      expect.objectContaining({ code: ErrorCode.TRACKER, message: 'the tracking shim could not register uffd-wp: stage=register errno=22 message=Invalid argument' }),
    );
    for (const junk of ['', 'ok start=0x10 length=4096', 'ok start=0x10 length=4096 pid=1 postcopy=2', 'ok start=zz length=1 pid=1']) {
      expect(() => parseShimReport(junk), junk).toThrow(expect.objectContaining({ code: ErrorCode.TRACKER }));
    }
  });
});
