// An offer's admission at the destination: what it asks is checked against this agent (its
// state, the session's dedup groups, the guest kinds it takes and their limits, the guest's
// name) before anything is made for it. A refusal is a reason and a message for the peer;
// this host's own trouble (an unreadable record) goes to its log, not to the peer.
import type { Logger } from 'pino';
import { GuestKind, nameOf, RejectReason, Technique } from '../../protocol/codes.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { DestinationGroup } from '../dedup/dest-group.js';
import type { GuestLauncher } from '../guest/adapter.js';
import type { OfferFrame } from '../peer/session.js';
import type { DestinationContext } from './destination-types.js';

export type Admission =
  | { admitted: true; launcher: GuestLauncher; group: DestinationGroup | undefined }
  | { admitted: false; reason: RejectReason; message: string };

const refuse = (reason: RejectReason, message: string): Admission => ({ admitted: false, reason, message });

/**
 * Checks `offer` and, when it may come, reserves its guest's name in the registry (the caller
 * releases it if the migration is not made after all).
 */
export function admitOffer(offer: OfferFrame, ctx: DestinationContext, log: Logger): Admission {
  if (!ctx.accepting()) return refuse(RejectReason.shuttingDown, 'the destination agent is shutting down');
  const group = offer.dedup ? ctx.groups.get(offer.dedup.group) : undefined;
  if (offer.dedup && (!group || group.isClosed)) {
    return refuse(RejectReason.badSpec, `dedup group ${offer.dedup.group} is not open on this session (send dedupOpen first)`);
  }
  const launcher = ctx.launchers[offer.guest.kind];
  if (!launcher) return refuse(RejectReason.unsupported, `this agent takes no guests of kind ${nameOf(GuestKind, offer.guest.kind) ?? offer.guest.kind}`);
  if (offer.technique !== Technique.precopy && offer.dedup) {
    return refuse(RejectReason.unsupported, 'post-copy and hybrid migrations do not take part in dedup groups on this agent');
  }
  const unfit = launcher.checkOffer(offer.guest);
  if (unfit) return refuse(RejectReason.badSpec, unfit);
  if (offer.technique !== Technique.precopy && !launcher.diskExportSocket && launcher.disks?.(offer.guest).some((disk) => disk.region !== undefined)) {
    return refuse(RejectReason.unsupported, `this agent takes ${launcher.kind} guests' disks by pre-copy only: migrate with --technique precopy, or --disks none on shared storage`);
  }
  try {
    ctx.registry.reserve(offer.guest.name);
  } catch (err) {
    // This host's own trouble with the name (an unreadable record: its path and problem)
    // is for its log and its operator, not for the peer.
    if (ctx.registry.unreadableRecords().some((r) => r.name === offer.guest.name)) {
      log.error({ err: (err as Error).message }, 'offer refused: the guest name has an unreadable record here');
      return refuse(RejectReason.guestExists, `guest ${offer.guest.name} cannot be received here: this host's record of that name needs its operator`);
    }
    // The registry's "already exists on this host" reads, at the source, as the source itself.
    if (err instanceof GangwayError && err.code === ErrorCode.GUEST_EXISTS) {
      return refuse(
        RejectReason.guestExists,
        `a guest named "${offer.guest.name}" already exists at the destination: stop it there (\`gangway guest stop ${offer.guest.name}\` on that host) or migrate to another agent`,
      );
    }
    return refuse(RejectReason.guestExists, (err as Error).message);
  }
  return { admitted: true, launcher, group };
}

/**
 * Why the memory directory cannot take `neededBytes` more (its free space, less what
 * migrations under way were promised and the headroom kept free), or undefined.
 */
export function spaceShortfall(freeBytes: number, neededBytes: number, space: DestinationContext['space']): string | undefined {
  const { reservedBytes: reserved, headroomBytes: headroom } = space;
  if (freeBytes - reserved - headroom >= neededBytes) return undefined;
  return `the memory directory has ${freeBytes} bytes free, of which ${reserved} are promised to migrations under way and ${headroom} are kept free (peers.memoryHeadroom); the guest needs ${neededBytes}`;
}
