// The JS side of channels: which hellos the destination attaches (the migration's secret, the
// session's certificate, a pre-copy still taking pages, at most MAX_CHANNELS_PER_MIGRATION),
// a failed channel failing its migration, and the source's cutting of a round into pieces.
import { describe, expect, it } from 'vitest';
import { ErrorCode, GangwayError, type ProtocolError } from '../../protocol/errors.js';
import { IncomingChannels, MAX_CHANNELS_PER_MIGRATION } from '../../agent/migration/incoming-channels.js';
import { pieces, SourceChannels } from '../../agent/migration/source-channels.js';
import type { Lane } from '../../agent/migration/lanes.js';
import type { Channel } from '../../agent/peer/channel.js';
import type { RegionHandle } from '../../agent/native.js';

const SECRET = Buffer.alloc(32, 7);
const CERT = 'a'.repeat(64);

/** A stand-in for a native channel: records attaches, closes when told. */
function fakeChannel(): Channel & { attached: RegionHandle[] | undefined; end: (failure?: GangwayError) => void } {
  let resolveClosed!: () => void;
  const fake = {
    attached: undefined as RegionHandle[] | undefined,
    pagesWritten: 0,
    failed: undefined as GangwayError | undefined,
    closed: new Promise<void>((resolve) => (resolveClosed = resolve)),
    attach(regions: RegionHandle[]) {
      fake.attached = regions;
    },
    close() {
      fake.end();
      return fake.closed;
    },
    end(failure?: GangwayError) {
      fake.failed ??= failure ?? new GangwayError(ErrorCode.ABORTED, 'the channel closed');
      resolveClosed();
    },
  };
  return fake as unknown as Channel & { attached: RegionHandle[] | undefined; end: (failure?: GangwayError) => void };
}

function setup(refusal?: string) {
  const failures: ProtocolError[] = [];
  const regions = [{ __brand: 'RegionHandle' }] as unknown as RegionHandle[];
  const channels = new IncomingChannels({
    migrationId: 'm-1',
    secretMatches: (presented) => Buffer.from(presented).equals(SECRET),
    peerSha256: () => CERT,
    refusal: () => refusal,
    regions: () => regions,
    fail: (err) => failures.push(err),
  });
  return { channels, failures, regions };
}

describe('a destination attaching channels', () => {
  it('attaches a channel with the secret and the session certificate, and counts its pages', async () => {
    const { channels, regions } = setup();
    const channel = fakeChannel();
    expect(channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, channel)).toBeUndefined();
    expect(channel.attached).toBe(regions);
    channel.pagesWritten = 300;
    expect(channels.pagesWritten).toBe(300);
    channel.end();
    await channel.closed;
    await Promise.resolve();
    expect(channels.pagesWritten).toBe(300);
  });

  it.each([
    ['the wrong secret', { secret: Buffer.alloc(32, 8), peerSha256: CERT }, /wrong secret/],
    ['another certificate', { secret: SECRET, peerSha256: 'b'.repeat(64) }, /not the one the source's session presented/],
    ['no certificate where the session had one', { secret: SECRET, peerSha256: undefined }, /not the one/],
  ])('refuses %s, attaching nothing', (_name, hello, why) => {
    const { channels } = setup();
    const channel = fakeChannel();
    expect(channels.attach({ migrationId: 'm-1', ...hello }, channel)).toMatch(why);
    expect(channel.attached).toBeUndefined();
  });

  it("refuses while the migration takes no pages, and beyond its limit", () => {
    expect(setup('migration m-1 takes no more pages').channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, fakeChannel())).toMatch(/takes no more pages/);
    const { channels } = setup();
    for (let i = 0; i < MAX_CHANNELS_PER_MIGRATION; i++) expect(channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, fakeChannel())).toBeUndefined();
    expect(channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, fakeChannel())).toMatch(/has 4 channels already/);
  });

  it('once closed (the switchover began) it ends its channels and takes no more', async () => {
    const { channels, failures } = setup();
    const first = fakeChannel();
    channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, first);
    channels.close();
    await first.closed;
    expect(first.failed?.code).toBe(ErrorCode.ABORTED);
    expect(channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, fakeChannel())).toMatch(/takes no more channels/);
    await Promise.resolve();
    expect(failures).toEqual([]);
  });

  it('a channel that fails fails the migration; one closed as asked does not', async () => {
    const { channels, failures } = setup();
    const good = fakeChannel();
    const bad = fakeChannel();
    channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, good);
    channels.attach({ migrationId: 'm-1', secret: SECRET, peerSha256: CERT }, bad);
    good.end();
    bad.end(new GangwayError(ErrorCode.PEER_UNREACHABLE, 'channel: pages for region 5, the guest has 1'));
    await Promise.all([good.closed, bad.closed]);
    await Promise.resolve();
    expect(failures.map((f) => f.message)).toEqual(['channel: pages for region 5, the guest has 1']);
  });
});

describe("the source's pieces of a round", () => {
  it('cuts runs into pieces of at most maxPages, keeping every page once and in order', () => {
    const runs = Uint32Array.of(0, 5, 10, 1, 20, 12);
    const cut = pieces(runs, 4);
    expect(cut.map((p) => [...p])).toEqual([[0, 4], [4, 1, 10, 1, 20, 2], [22, 4], [26, 4], [30, 2]]);
    const pages = cut.flatMap((p) => [...p].flatMap((v, i, a) => (i % 2 === 0 ? Array.from({ length: a[i + 1]! }, (_, k) => v + k) : [])));
    expect(pages).toEqual([0, 1, 2, 3, 4, 10, ...Array.from({ length: 12 }, (_, k) => 20 + k)]);
    expect(pieces(new Uint32Array(0), 4)).toEqual([]);
  });

  it('cuts 16 MiB pieces, and a 4 MiB probe off the front of one (the rest stays one piece)', () => {
    const lane = { region: { pageSizeBytes: 4096 } } as unknown as Lane;
    expect(SourceChannels.pieceRuns(lane, Uint32Array.of(0, 10_000)).map((p) => [...p])).toEqual([[0, 4096], [4096, 4096], [8192, 1808]]);
    // Raw's rate unknown or slow: 4 MiB; 400 MB/s: 25 ms of it (10 MB); fast: a whole 16 MiB piece.
    expect(SourceChannels.probeRuns(lane, Uint32Array.of(0, 3000, 5000, 1000), undefined).map((p) => [...p])).toEqual([[0, 1024], [1024, 1976, 5000, 1000]]);
    expect(SourceChannels.probeRuns(lane, Uint32Array.of(0, 4096), 400e6).map((p) => [...p])).toEqual([[0, 2441], [2441, 1655]]);
    expect(SourceChannels.probeRuns(lane, Uint32Array.of(0, 5000), 4e9).map((p) => [...p])).toEqual([[0, 4096], [4096, 904]]);
    expect(SourceChannels.probeRuns(lane, Uint32Array.of(7, 10), undefined).map((p) => [...p])).toEqual([[7, 10]]);
  });
});
