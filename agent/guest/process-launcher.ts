// The destination's side of the "process" guest: a gangway-guest started in standby on the
// memory files that are arriving (blocked on a pipe, so the resume is one write), its device
// state handed over as the file it reads when it resumes, and its record filled from the
// header the guest keeps at the start of its first region.
import { rmSync, writeFileSync } from 'node:fs';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import type { GuestLauncher } from './adapter.js';
import { GUEST_MAX_REGIONS, GUEST_PAGE_SIZE, readGuestHeader } from './guest-header.js';
import { launchProcessGuest, specFromHeader } from './process-guest.js';

export const processLauncher: GuestLauncher = {
  kind: 'process',
  checkOffer({ regions }) {
    if (regions.length < 1 || regions.length > GUEST_MAX_REGIONS || regions.some((region) => region.pageSizeBytes !== GUEST_PAGE_SIZE)) {
      return `a process guest has 1 to ${GUEST_MAX_REGIONS} regions of ${GUEST_PAGE_SIZE}-byte pages`;
    }
    return undefined;
  },
  standby(files, { guest, postcopySocketFd }) {
    // gangway-guest maps its memory files by name, after go(): the commit has named them.
    return launchProcessGuest({ name: guest.name, files, standby: true, ...(postcopySocketFd === undefined ? {} : { postcopySocketFd }) });
  },
  async loadDeviceState(_guest, files, state) {
    const path = files.deviceStatePath;
    if (!path) throw new GangwayError(ErrorCode.INTERNAL, 'a process guest started without a device-state path');
    // Never through a file or link someone else left at the path: it goes first, then 'wx'.
    rmSync(path, { force: true });
    writeFileSync(path, state, { mode: 0o600, flag: 'wx' });
  },
  recordPart(files) {
    // The synthetic guest's spec lives in its memory: only this kind may read it there.
    return { kind: 'process', spec: specFromHeader(readGuestHeader(files.memoryPaths[0]!)) };
  },
};
