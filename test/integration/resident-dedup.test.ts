// Resident dedup through the real protocol: a peer that opens a dedup group with resident
// content is offered the fingerprints of the guests dedup.resident lets it see, no more, and
// only dedup.residentOffersPerMinute times a minute. Agent D runs a guest started there and
// a guest migrated to it from agent S; a test client speaks to D as a peer, as S (its agent
// id) or as another agent, and checks the fingerprints it gets against D's memory files.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, RESIDENT_SLOT_FLAG } from '../../protocol/limits.js';
import { connectPeer, type GroupFrame, type PeerSession } from '../../agent/peer/session.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';

const PAGE = 4096;
const isRoot = process.getuid?.() === 0;
const skipReason = !builtAgent ? 'the agent is not built: npm run build' : !isRoot ? 'guests and their migration need root here' : undefined;

type Agent = Awaited<ReturnType<Cluster['agent']>>;
type ResidentFrame = Extract<GroupFrame, { type: 'dedupResident' }>;
type ReadyFrame = Extract<GroupFrame, { type: 'dedupReady' }>;

interface GuestInfo {
  name: string;
  memoryBytes: number;
  memoryPath: string;
}

describe.skipIf(skipReason !== undefined)(`resident dedup offers${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let cluster: Cluster | undefined;
  const sessions: PeerSession[] = [];
  afterEach(async () => {
    for (const session of sessions.splice(0)) session.close();
    await cluster?.cleanup();
    cluster = undefined;
  });

  async function agentId(agent: Agent): Promise<string> {
    const run = await cluster!.cli(agent, ['status', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    return (JSON.parse(run.stdout) as { agent: { id: string } }).agent.id;
  }

  async function guestInfo(agent: Agent, name: string): Promise<GuestInfo> {
    const guest = (await agent.status()).guests.find((g) => g.name === name);
    expect(guest, `${name} at ${agent.listen}`).toBeDefined();
    return { name, memoryBytes: guest!.memoryBytes, memoryPath: guest!.memoryPath };
  }

  async function startGuest(agent: Agent, name: string, memory: string, seed: number): Promise<void> {
    // Idle (no dirty rate), so that the memory files hold what was offered.
    const run = await cluster!.cli(agent, ['guest', 'start', name, '--memory', memory, '--image-seed', String(seed), '--seed', String(seed), '--dirty-rate', '0', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
  }

  /**
   * D with a guest started there ("local", 8 MiB) and one migrated from S ("moved", 12 MiB,
   * so the two are told apart by their sizes too).
   */
  async function hosts(env: NodeJS.ProcessEnv = {}) {
    cluster = new Cluster();
    const s = await cluster.agent('s');
    const d = await cluster.agent('d', ['--metrics-listen', '127.0.0.1:0'], env);
    const local = uniqueName('local');
    const moved = uniqueName('moved');
    await startGuest(d, local, '8MiB', 3);
    await startGuest(s, moved, '12MiB', 5);
    const run = await cluster.cli(s, ['migrate', moved, '--to', d.listen, '--json']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    return { s, d, sourceId: await agentId(s), local: await guestInfo(d, local), moved: await guestInfo(d, moved) };
  }

  async function peerOf(d: Agent, agentId: string): Promise<PeerSession> {
    const session = await connectPeer(d.listen, { agentId, features: ['lz4', 'precopy', 'dedup'], maxPayloadBytes: 8 << 20, log: pino({ level: 'silent' }) });
    sessions.push(session);
    return session;
  }

  /** Opens a resident group and collects what D offers until its dedupReady. */
  function openResident(session: PeerSession, group: string): Promise<{ resident: ResidentFrame[]; ready: ReadyFrame }> {
    return new Promise((resolve, reject) => {
      const resident: ResidentFrame[] = [];
      const timer = setTimeout(() => reject(new Error(`no dedupReady for ${group} within 30 s`)), 30_000);
      session.once('closed', (err: Error) => reject(err));
      session.onGroupFrame = (frame) => {
        if (frame.group !== group) return;
        if (frame.type === 'dedupResident') {
          // The frame's fingerprints may be a view of the receive buffer.
          resident.push({ ...frame, fingerprints: Uint8Array.from(frame.fingerprints) });
        } else if (frame.type === 'dedupReady') {
          clearTimeout(timer);
          resolve({ resident, ready: frame });
        }
      };
      session.send(Frame.dedupOpen({ group, resident: true }));
    });
  }

  /** Each slot's fingerprints, put together from its frames. */
  function slotsOf(frames: ResidentFrame[]): Map<number, { pageCount: number; fingerprints: Uint8Array; covered: number }> {
    const slots = new Map<number, { pageCount: number; fingerprints: Uint8Array; covered: number }>();
    for (const frame of frames) {
      expect((frame.slot & RESIDENT_SLOT_FLAG) >>> 0).toBe(RESIDENT_SLOT_FLAG);
      expect(frame.pageSizeBytes).toBe(PAGE);
      let slot = slots.get(frame.slot);
      if (!slot) {
        slot = { pageCount: frame.pageCount, fingerprints: new Uint8Array(frame.pageCount * FINGERPRINT_BYTES), covered: 0 };
        slots.set(frame.slot, slot);
      }
      slot.fingerprints.set(frame.fingerprints, frame.firstPage * FINGERPRINT_BYTES);
      slot.covered += frame.fingerprints.length / FINGERPRINT_BYTES;
    }
    return slots;
  }

  /** Pages of the guest's memory file whose content matches the offered fingerprints. */
  function matchingPages(guest: GuestInfo, fingerprints: Uint8Array): number {
    const native = loadNative();
    const memory = readFileSync(guest.memoryPath);
    let matching = 0;
    for (let p = 0; p < guest.memoryBytes / PAGE; p++) {
      if (native.hash128(memory.subarray(p * PAGE, (p + 1) * PAGE)).equals(fingerprints.subarray(p * FINGERPRINT_BYTES, (p + 1) * FINGERPRINT_BYTES))) matching++;
    }
    return matching;
  }

  async function residentOffersMetric(d: Agent): Promise<Record<string, number>> {
    const text = await (await fetch(`http://${(await d.status()).agent.metrics}/metrics`)).text();
    const counts: Record<string, number> = {};
    for (const match of text.matchAll(/^gangway_dedup_resident_offers_total\{outcome="([a-z-]+)"\} (\d+)$/gm)) counts[match[1]!] = Number(match[2]);
    return counts;
  }

  it("offers a peer only the guests it migrated here: another peer gets no fingerprint, S gets the moved guest's and not the local one's", async () => {
    const { d, sourceId, local, moved } = await hosts();

    const other = await openResident(await peerOf(d, 'agent-someone-else'), 'g-other');
    expect(other.resident).toEqual([]);
    expect(other.ready).toMatchObject({ residentSlots: 0, residentPages: 0 });

    const same = await openResident(await peerOf(d, sourceId), 'g-same');
    const slots = slotsOf(same.resident);
    expect(slots.size).toBe(1);
    const [slot] = [...slots.values()];
    expect(slot!.pageCount).toBe(moved.memoryBytes / PAGE);
    expect(slot!.covered).toBe(moved.memoryBytes / PAGE);
    expect(same.ready).toMatchObject({ residentSlots: 1, residentPages: moved.memoryBytes / PAGE });
    // They are the moved guest's pages (page 0, the guest's live header, may have moved on).
    expect(matchingPages(moved, slot!.fingerprints)).toBeGreaterThanOrEqual(moved.memoryBytes / PAGE - 1);
    expect(local.memoryBytes).not.toBe(moved.memoryBytes);

    // S's own migration asked too (its dedup group), when D had nothing of S's yet.
    expect(await residentOffersMetric(d)).toMatchObject({ offered: 1, 'refused-policy': 2 });
  });

  it('with dedup.resident all, offers every guest running here', async () => {
    const { d, sourceId, local, moved } = await hosts({ GANGWAY_DEDUP_RESIDENT: 'all' });
    const same = await openResident(await peerOf(d, sourceId), 'g-all');
    const slots = [...slotsOf(same.resident).values()].sort((a, b) => a.pageCount - b.pageCount);
    expect(slots.map((s) => s.pageCount)).toEqual([local.memoryBytes / PAGE, moved.memoryBytes / PAGE]);
    expect(same.ready).toMatchObject({ residentSlots: 2, residentPages: (local.memoryBytes + moved.memoryBytes) / PAGE });
    expect(matchingPages(local, slots[0]!.fingerprints)).toBeGreaterThanOrEqual(local.memoryBytes / PAGE - 1);
    expect(matchingPages(moved, slots[1]!.fingerprints)).toBeGreaterThanOrEqual(moved.memoryBytes / PAGE - 1);

    // Another peer sees them too under 'all'.
    const other = await openResident(await peerOf(d, 'agent-someone-else'), 'g-all-other');
    expect(other.ready).toMatchObject({ residentSlots: 2 });
  });

  it('gives a peer at most dedup.residentOffersPerMinute offers: the groups after that open without resident slots', async () => {
    const { d, sourceId, moved } = await hosts({ GANGWAY_DEDUP_RESIDENT_OFFERS_PER_MINUTE: '2' });
    const session = await peerOf(d, sourceId);
    const answers = [];
    for (let i = 0; i < 4; i++) answers.push(await openResident(session, `g-${i}`));
    expect(answers.map((a) => a.ready.residentSlots)).toEqual([1, 1, 0, 0]);
    expect(answers.map((a) => a.resident.length > 0)).toEqual([true, true, false, false]);
    expect(answers[1]!.ready.residentPages).toBe(moved.memoryBytes / PAGE);
    // The groups refused resident content are open all the same: closing them is fine and the session stays up.
    for (let i = 0; i < 4; i++) session.send(Frame.dedupClose({ group: `g-${i}` }));
    // The limit is per peer: another identity still gets its (empty, by the policy) answer.
    const other = await openResident(await peerOf(d, 'agent-someone-else'), 'g-other');
    expect(other.ready.residentSlots).toBe(0);
    expect(session.isOpen).toBe(true);
    expect(await residentOffersMetric(d)).toMatchObject({ offered: 2, 'rate-limited': 2 });
  });
});
