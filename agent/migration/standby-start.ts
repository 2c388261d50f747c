// The destination's standby guest: started at the offer's acceptance on the regions' unnamed
// files, blocked until go() (so that the resume is one step), and watched until the
// switchover. A standby that dies or does not come up before then refuses the migration, and
// the source's guest runs on there.
import { closeSync } from 'node:fs';
import type { Logger } from 'pino';
import { ErrorCode } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import type { GuestLauncher, StandbyGuest } from '../guest/adapter.js';
import type { GuestFiles } from '../guest/process-guest.js';
import type { OfferFrame, PeerSession } from '../peer/session.js';
import type { DestinationDisks } from './destination-disks.js';
import type { DestinationPostcopy } from './destination-postcopy.js';
import type { IncomingRegion } from './destination-types.js';

export interface StandbyStart {
  offer: OfferFrame;
  files: GuestFiles;
  launcher: GuestLauncher;
  /** The regions' files, open (incoming-regions.ts). */
  regions: readonly IncomingRegion[];
  /** Post-copy at this side: the guest's fault socket, and the disks' exports it reads meanwhile. */
  postcopy: DestinationPostcopy | undefined;
  disks: DestinationDisks;
  session: () => PeerSession;
  log: Logger;
  /** The migration is over, or its switchover began (the standby's exit is then the switchover's to handle). */
  finished: () => boolean;
  switching: () => boolean;
  /** Refuses the migration: the source's guest runs on. */
  refuse: (code: ErrorCode, message: string) => void;
}

/** Starts the standby guest and watches its exit and readiness until the switchover. */
export function startStandby(start: StandbyStart): StandbyGuest {
  const { offer, files, launcher, postcopy, log } = start;
  const regionFds = start.regions.map((region) => region.fd);
  let standby: StandbyGuest;
  if (!postcopy) {
    standby = launcher.standby(files, { guest: offer.guest, regionFds });
  } else {
    const diskExportSocket = start.disks.serve();
    const guestEnd = postcopy.guestSocket();
    try {
      standby = launcher.standby(files, { guest: offer.guest, regionFds, postcopySocketFd: guestEnd, ...(diskExportSocket ? { diskExportSocket } : {}) });
    } finally {
      closeSync(guestEnd);
    }
    if (launcher.handsOverMemoryAtStart) postcopy.receiveHandoverNow();
  }
  // A standby guest that dies (a QEMU that failed to start, or was killed) ends the
  // migration before the switchover: the source's guest runs on there.
  void standby.exited.then((code) => {
    if (start.finished() || start.switching()) return;
    log.error({ pid: standby.pid, code, log: files.logPath }, "the destination's standby guest exited before the switchover");
    start.refuse(ErrorCode.GUEST_FAILED, `the guest's ${launcher.kind} process at the destination exited (${code === null ? 'killed' : `code ${code}`}) before the switchover`);
  });
  // A source that waits for it before pausing its guest hears when the standby is up (after
  // the accept: the standby starts before it is sent, and this answers no sooner than a tick
  // later), or that it will not be: the migration is refused, and the guest runs on there.
  const session = start.session();
  if (session.peer?.features.includes('standby-ready')) {
    (standby.ready ?? Promise.resolve()).then(
      () => {
        const now = start.session();
        if (!start.finished() && now.isOpen) now.send(Frame.standbyReady({ migrationId: offer.migrationId }));
      },
      (err: Error) => {
        if (start.finished() || start.switching()) return;
        log.error({ pid: standby.pid, err: err.message, log: files.logPath }, "the destination's standby guest did not come up");
        start.refuse(ErrorCode.GUEST_FAILED, `the guest's ${launcher.kind} process at the destination did not come up: ${err.message}`);
      },
    );
  }
  return standby;
}
