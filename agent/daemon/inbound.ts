// Migrations arriving here: offers accepted within the peers.* limits, each session's dedup
// groups (with the resident guests a peer may see), a post-copy's source coming back on a new
// session, and what this agent answers a source that lost track of a migration it sent here.
import { statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, GangwayError, ProtocolCloseCode, ProtocolError } from '../../protocol/errors.js';
import { RejectReason, Whereabouts } from '../../protocol/codes.js';
import { Frame } from '../../protocol/index.js';
import type { AgentConfig } from '../daemon.js';
import { DestinationGroup } from '../dedup/dest-group.js';
import { ResidentOffers } from '../dedup/resident-policy.js';
import { baseImageContent } from '../dedup/base-images.js';
import type { LauncherTable } from '../guest/adapter.js';
import type { GuestRecord, GuestRegistry } from '../guest/registry.js';
import { VM_DISK_BLOCK_BYTES } from '../guest/vm-spec.js';
import type { ResidentGuest } from '../dedup/resident-cache.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics.js';
import type { Channel, ChannelHelloIn } from '../peer/channel.js';
import { DestinationMigration, secretsMatch } from '../migration/destination.js';
import { TakenBackPostcopy } from '../migration/postcopy-takeover.js';
import { loadNative } from '../native.js';
import type { GroupFrame, OfferFrame, PeerSession } from '../peer/session.js';
import type { TrafficService } from '../traffic/service.js';
import type { SessionShare } from './peer-server.js';
import type { MigrationRecord, MigrationRecords } from './records.js';

export interface InboundContext {
  config: Pick<AgentConfig, 'memoryDir' | 'creditBytes' | 'maxPayloadBytes' | 'postcopyReattachMs' | 'peers' | 'dedup'>;
  registry: GuestRegistry;
  /** The guest kinds this agent takes. */
  launchers: LauncherTable;
  log: Logger;
  metrics: AgentMetrics;
  records: MigrationRecords;
  /** Is the agent taking new migrations? (Not once it is shutting down.) */
  accepting: () => boolean;
  /** Is guest `name` leaving this host? Resident dedup offers no such guest. */
  isMigrating: (name: string) => boolean;
  /** The peer port, once it listens: an incoming migration's inbound reservation is for it. */
  peerPort: () => number;
  /** The traffic service, once the agent has started it. */
  traffic: () => Pick<TrafficService, 'holdInbound'>;
  /** A peer hit one of the peers.* limits (or broke the credit or identity rules): counted. */
  onLimit: (limit: string) => void;
}

/** A migration arriving here: one offered to this run of the agent, or a post-copy taken back after a restart. */
type ArrivingMigration = Pick<DestinationMigration, 'from' | 'missingPages' | 'promisedBytes' | 'verdict' | 'secret' | 'done' | 'isSource' | 'reattach'> &
  Partial<Pick<DestinationMigration, 'attachChannel'>>;

export class InboundMigrations {
  private readonly incoming = new Map<string, ArrivingMigration>();

  constructor(private readonly context: InboundContext) {}

  /** Migrations arriving here now. */
  get count(): number {
    return this.incoming.size;
  }

  /** Post-copy migrations arriving here now: their guests run here and wait for pages. */
  get postcopyCount(): number {
    return [...this.incoming.values()].filter((m) => m.missingPages !== undefined).length;
  }

  /** Pages a post-copy migration arriving here still lacks (undefined once it is over). */
  missingPages(migrationId: string): number | undefined {
    return this.incoming.get(migrationId)?.missingPages;
  }

  /** Resident dedup's policy, limiter and shared fingerprints; made at the first resident request. */
  private residentOffers: ResidentOffers | undefined;

  /** dedupOpen / dedupClose from a source: the groups of one session. */
  onGroupFrame(frame: GroupFrame, session: PeerSession, groups: Map<string, DestinationGroup>): void {
    if (frame.type === 'dedupClose') {
      const group = groups.get(frame.group);
      groups.delete(frame.group);
      void group?.close();
      return;
    }
    if (frame.type !== 'dedupOpen') {
      throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `${frame.type} is sent by a destination, not to one`);
    }
    if (groups.has(frame.group)) throw new ProtocolError(ErrorCode.PROTOCOL, `dedup group ${frame.group} is already open`);
    const maxGroups = this.context.config.peers.maxGroupsPerSession;
    if (groups.size >= maxGroups) {
      this.context.onLimit('groups');
      throw new ProtocolError(ErrorCode.LIMIT, `more than ${maxGroups} dedup groups open on one session (peers.maxGroupsPerSession)`, { closeCode: ProtocolCloseCode.policy });
    }
    const group = new DestinationGroup(frame.group, this.context.log.child({ group: frame.group }));
    groups.set(frame.group, group);
    let offered: Promise<{ slots: number; pages: number }> = Promise.resolve({ slots: 0, pages: 0 });
    if (frame.resident) {
      // Only the guests dedup.resident lets this peer see (see resident-policy.ts), at most
      // dedup.residentOffersPerMinute times a minute; a group refused them still opens.
      const resident = (this.residentOffers ??= new ResidentOffers(this.context.config.dedup));
      const entries = this.context.registry.list();
      const bases = this.baseImages();
      resident.fingerprints.retain([
        ...entries.flatMap(({ record }) => [...record.files.memoryPaths, ...(record.files.diskPaths ?? [])].map((memoryPath) => ({ name: record.name, pid: record.pid, memoryPath }))),
        ...bases,
      ]);
      const peer = session.peer?.agentId;
      const candidates = entries.map(({ record, guest }) => ({ name: record.name, origin: record.origin, migrating: this.context.isMigrating(record.name), alive: guest.alive(), record }));
      const decision = resident.decide(peer, candidates, bases.length);
      this.context.metrics.dedupResidentOffers.inc({ outcome: decision.outcome });
      if (decision.warn) {
        this.context.log.warn({ peer, offersPerMinute: this.context.config.dedup.residentOffersPerMinute }, 'the peer asked for more resident offers than dedup.residentOffersPerMinute: its groups get no resident slots until its oldest offer is a minute old');
      }
      // Each memory region of a resident guest is content of its own, and so is each of its
      // disks (a VM cloned from the same base image as one arriving holds most of its
      // blocks), and each base image.
      const guests = decision.outcome !== 'offered' ? [] : [
        ...decision.guests.flatMap(({ record }) => {
          const sizes = record.spec.regionBytes ?? [record.memoryBytes];
          const memory = record.files.memoryPaths.map((memoryPath, i) => ({ name: record.name, pid: record.pid, memoryPath, memoryBytes: sizes[i]!, pageSizeBytes: record.pageSizeBytes }));
          return [...memory, ...residentDisks(record)];
        }),
        ...bases,
      ];
      if (guests.length > 0) offered = group.offerResident(session, guests, resident.fingerprints);
    }
    offered.then(
      ({ slots, pages }) => {
        if (session.isOpen) session.send(Frame.dedupReady({ group: frame.group, residentSlots: slots, residentPages: pages }));
      },
      (err: Error) => session.fail(new GangwayError(ErrorCode.INTERNAL, `offering resident content failed: ${err.message}`)),
    );
  }

  /** What was said of the base images directory last (each problem is logged once, not at every group). */
  private baseImagesNote = '';

  /** The base images this agent offers (dedup.baseImages), read now. */
  private baseImages(): ResidentGuest[] {
    const dir = this.context.config.dedup.baseImagesDir;
    if (!dir) return [];
    const { images, skipped, problem } = baseImageContent(dir);
    const note = JSON.stringify([problem, skipped]);
    if (note !== this.baseImagesNote) {
      this.baseImagesNote = note;
      if (problem) this.context.log.warn({ problem }, 'no base images offered');
      else if (skipped.length > 0) this.context.log.warn({ dir, skipped }, 'base images left out of resident offers');
    }
    return images;
  }

  /** The verdicts of post-copy migrations that ended here, for a source that reconnects to ask. */
  private readonly postcopyVerdicts = new Map<string, { from: string; secret: Uint8Array; frame: ReturnType<typeof Frame.verified> }>();

  /**
   * A source whose session broke during post-copy carries on here: the migration takes the
   * new session if it is waiting for its source. A post-copy that already completed answers
   * with its verdict, which the source may not have received. Only the agent the migration
   * was accepted from, presenting the migration's secret, may do either; anyone else gets the
   * same answer as for an id that does not exist, which names no agent.
   */
  onReattach(frame: ReturnType<typeof Frame.reattach>, session: PeerSession): void {
    const { migrationId, secret } = frame;
    const refuse = (message: string) => session.send(Frame.abort({ migrationId, code: ErrorCode.UNEXPECTED_FRAME, message }));
    const migration = this.incoming.get(migrationId);
    if (migration?.isSource(session, secret)) {
      const refusal = migration.reattach(session);
      if (refusal) refuse(refusal);
      return;
    }
    const verdict = this.postcopyVerdicts.get(migrationId);
    if (verdict && verdict.from === session.peerId && secretsMatch(secret, verdict.secret)) {
      session.send(verdict.frame);
      return;
    }
    if (migration || verdict) {
      this.context.onLimit('reattach');
      this.context.log.warn({ migrationId, peer: session.peerId }, 'refused a reattach: not the source of that migration, or the wrong secret');
    }
    refuse(`no post-copy migration ${migrationId} that this agent may carry on waits here`);
  }

  /** A channel's hello: the migration it names attaches it, or the reason it is refused (the same for an id that does not exist). */
  onChannel(hello: ChannelHelloIn, channel: Channel): string | undefined {
    const migration = this.incoming.get(hello.migrationId);
    if (!migration?.attachChannel) return `no migration ${hello.migrationId} takes channels here`;
    return migration.attachChannel(hello, channel);
  }

  onOffer(offer: OfferFrame, session: PeerSession, shared: SessionShare): void {
    if (this.incoming.has(offer.migrationId) || this.context.records.has(offer.migrationId)) {
      // A replayed or duplicated id would mix two streams.
      session.send(Frame.reject({ migrationId: offer.migrationId, reason: RejectReason.badSpec, message: 'duplicate migration id' }));
      return;
    }
    // Each accepted offer is a process, a memory file and its share of the receive memory:
    // a peer gets a bounded number of them, and all peers together too.
    const limits = this.context.config.peers;
    const arriving = [...this.incoming.values()];
    const fromPeer = arriving.filter((m) => m.from === session.peerId).length;
    const busy =
      fromPeer >= limits.maxIncomingPerPeer
        ? `this agent already receives ${fromPeer} migrations from this peer (peers.maxIncomingPerPeer = ${limits.maxIncomingPerPeer}): offer it again once one ends`
        : arriving.length >= limits.maxIncoming
          ? `this agent already receives ${arriving.length} migrations (peers.maxIncoming = ${limits.maxIncoming}): offer it again once one ends`
          : undefined;
    if (busy) {
      this.context.onLimit(fromPeer >= limits.maxIncomingPerPeer ? 'incoming-per-peer' : 'incoming');
      this.context.log.warn({ migrationId: offer.migrationId, peer: session.peerId, reason: busy }, 'offer refused');
      this.context.metrics.migrations.inc({ direction: 'in', outcome: 'rejected', technique: 'precopy' });
      session.send(Frame.reject({ migrationId: offer.migrationId, reason: RejectReason.busy, message: busy }));
      return;
    }
    const migration = DestinationMigration.start(offer, session, {
      registry: this.context.registry,
      launchers: this.context.launchers,
      memoryDir: this.context.config.memoryDir,
      creditBytes: this.context.config.creditBytes,
      maxPayloadBytes: this.context.config.maxPayloadBytes,
      log: this.context.log,
      accepting: this.context.accepting,
      metrics: this.context.metrics,
      groups: shared.groups,
      reattachWindowMs: this.context.config.postcopyReattachMs,
      space: { reservedBytes: arriving.reduce((sum, m) => sum + m.promisedBytes, 0), headroomBytes: limits.memoryHeadroomBytes },
      maxDeviceStateBytes: limits.maxDeviceStateBytes,
      decompressions: shared.decompressions,
      onLimit: (limit) => this.context.onLimit(limit),
    });
    if (!migration) {
      this.context.metrics.migrations.inc({ direction: 'in', outcome: 'rejected', technique: 'precopy' });
      return;
    }
    this.context.metrics.migrationsActive.inc({ direction: 'in' });
    // The source's plan reserved bandwidth at a priority: reserve this host's inbound side too.
    const inbound = offer.priority
      ? this.context.traffic().holdInbound({ localPort: this.context.peerPort(), priority: offer.priority }).then(
          (hold) => {
            if (hold.applied) this.context.log.info({ migrationId: offer.migrationId, reason: hold.reason }, 'inbound bandwidth reserved for the incoming migration');
            else this.context.log.info({ migrationId: offer.migrationId, reason: hold.reason }, 'inbound bandwidth not reserved');
            return hold;
          },
          (err: Error) => {
            this.context.log.warn({ err: err.message }, 'reserving inbound bandwidth failed');
            return undefined;
          },
        )
      : undefined;
    void migration.done.finally(() => void inbound?.then((hold) => hold?.stop()).catch(() => {}));
    const record: Extract<MigrationRecord, { direction: 'in' }> = {
      direction: 'in',
      state: 'running',
      migrationId: offer.migrationId,
      guest: offer.guest.name,
      from: session.peer?.agentId ?? 'unknown',
      startedAt: new Date().toISOString(),
    };
    this.track(migration, record);
  }

  /**
   * Guest `name` was arriving by post-copy when the previous run of this agent ended: takes
   * it back (postcopy-takeover.ts) and waits for its source to reattach. When it cannot, the
   * guest is stranded here, paused, with the reason in its record.
   */
  takeBack(name: string): void {
    const { record: guestRecord } = this.context.registry.get(name);
    const incoming = guestRecord.incoming!;
    let migration: TakenBackPostcopy;
    try {
      migration = TakenBackPostcopy.takeBack(name, {
        registry: this.context.registry,
        native: loadNative(),
        log: this.context.log,
        metrics: this.context.metrics,
        creditBytes: this.context.config.creditBytes,
        maxPayloadBytes: this.context.config.maxPayloadBytes,
        reattachWindowMs: this.context.config.postcopyReattachMs,
      });
    } catch (err) {
      const reason = `this agent restarted during post-copy and could not take it back: ${(err as Error).message}`;
      this.context.log.error({ guest: name, migrationId: incoming.migrationId, reason }, 'post-copy stranded');
      try {
        process.kill(guestRecord.pid, 'SIGSTOP');
      } catch {}
      const { secret: _, ...kept } = incoming;
      this.context.registry.add({ ...guestRecord, incoming: { ...kept, stranded: reason } });
      return;
    }
    this.context.metrics.migrationsActive.inc({ direction: 'in' });
    this.track(migration, { direction: 'in', state: 'running', migrationId: incoming.migrationId, guest: name, from: incoming.from, startedAt: new Date().toISOString() });
  }

  /** Keeps `migration` among those arriving, and its record and verdict once it ends. */
  private track(migration: ArrivingMigration, record: Extract<MigrationRecord, { direction: 'in' }>): void {
    this.incoming.set(record.migrationId, migration);
    this.context.records.set(record.migrationId, record);
    void migration.done.then((result) => {
      this.incoming.delete(record.migrationId);
      if (migration.verdict) {
        this.postcopyVerdicts.set(record.migrationId, { from: record.from, secret: migration.secret, frame: migration.verdict });
        // The last few are enough: a source asks right after it reconnects.
        for (const id of this.postcopyVerdicts.keys()) {
          if (this.postcopyVerdicts.size <= 64) break;
          this.postcopyVerdicts.delete(id);
        }
      }
      this.context.metrics.migrationsActive.dec({ direction: 'in' });
      this.context.metrics.migrations.inc({ direction: 'in', outcome: result.outcome, technique: result.technique });
      this.context.records.set(record.migrationId, { ...record, state: result.outcome, result });
      this.context.records.trim();
    });
  }

  /**
   * What became of migration `migrationId` here, for a source that lost track of it. Only
   * the agent the migration came from is told: anyone else hears `unknown`, as for an id
   * that never existed, so an answer reveals nothing of other peers' migrations.
   */
  async answerQuery(migrationId: string, session: PeerSession): Promise<void> {
    const running = this.incoming.get(migrationId);
    // A switchover under way here is answered once it is over (it ends within seconds).
    if (running && running.from === session.peerId && running.missingPages === undefined) {
      await Promise.race([running.done, sleep(30_000, undefined, { ref: false })]);
    }
    let whereabouts: Whereabouts = Whereabouts.unknown;
    for (const { record, guest } of this.context.registry.list()) {
      if (record.origin.kind !== 'migrated' || record.origin.migrationId !== migrationId || record.origin.from !== session.peerId || !guest.alive()) continue;
      whereabouts = record.incoming?.stranded ? Whereabouts.stranded : record.incoming ? Whereabouts.receiving : Whereabouts.running;
    }
    if (session.isOpen) session.send(Frame.migrationAnswer({ migrationId, whereabouts }));
  }
}

/** A resident VM's disks as content to offer: 4 KiB blocks, sparse (a disk that cannot be read now is left out). */
function residentDisks(record: GuestRecord): ResidentGuest[] {
  return (record.files.diskPaths ?? []).flatMap((path) => {
    const size = statSync(path, { throwIfNoEntry: false })?.size ?? 0;
    if (size <= 0 || size % VM_DISK_BLOCK_BYTES !== 0) return [];
    return [{ name: record.name, pid: record.pid, memoryPath: path, memoryBytes: size, pageSizeBytes: VM_DISK_BLOCK_BYTES, sparse: true }];
  });
}
