// The destination's side of the "process" guest: a gangway-guest started in standby on the
// memory file that is arriving (blocked on a pipe, so the resume is one write), its record
// filled from the header the guest keeps at the start of its memory.
import type { GuestLauncher } from './adapter.js';
import { GUEST_PAGE_SIZE, readGuestHeader } from './guest-header.js';
import { launchProcessGuest, specFromHeader } from './process-guest.js';

export const processLauncher: GuestLauncher = {
  kind: 'process',
  checkRegions(regions) {
    const region = regions[0];
    return regions.length === 1 && region && region.pageSizeBytes === GUEST_PAGE_SIZE ? undefined : `a process guest has one region of ${GUEST_PAGE_SIZE}-byte pages`;
  },
  standby(files, { postcopySocketFd }) {
    return launchProcessGuest({ files, standby: true, ...(postcopySocketFd === undefined ? {} : { postcopySocketFd }) });
  },
  recordPart(files) {
    // The synthetic guest's spec lives in its memory: only this kind may read it there.
    return { kind: 'process', spec: specFromHeader(readGuestHeader(files.memoryPath)) };
  },
};
