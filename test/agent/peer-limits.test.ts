// The pieces behind the peer limits, without sockets: the peers/dedup settings and their
// errors, the slots that bound a session's decompressions, the credit cost that bounds a
// migration's receive memory, and the agent id a certificate stands for.
import { describe, expect, it } from 'vitest';
import { configFromEnv, PEER_LIMIT_DEFAULTS, resolveDedupPolicy, resolvePeerLimits } from '../../agent/config.js';
import { Slots } from '../../agent/migration/flow.js';
import { creditCost } from '../../agent/migration/page-sender.js';
import { agentIdOf } from '../../agent/peer/allowlist.js';

describe('peers and dedup settings', () => {
  it('takes every limit from the environment, in its units', () => {
    const layer = configFromEnv({
      GANGWAY_PEERS_MAX_SESSIONS_PER_PEER: '2',
      GANGWAY_PEERS_MAX_INCOMING_PER_PEER: '3',
      GANGWAY_PEERS_MAX_INCOMING: '9',
      GANGWAY_PEERS_MAX_GROUPS_PER_SESSION: '5',
      GANGWAY_PEERS_HANDSHAKE_TIMEOUT: '2s',
      GANGWAY_PEERS_REQUESTS_PER_SECOND: '7',
      GANGWAY_PEERS_REQUEST_BURST: '70',
      GANGWAY_PEERS_MEMORY_HEADROOM: '1GiB',
      GANGWAY_PEERS_DECOMPRESSIONS_PER_SESSION: '2',
      GANGWAY_PEERS_MAX_DEVICE_STATE: '1MiB',
      GANGWAY_DEDUP_RESIDENT: 'none',
      GANGWAY_DEDUP_BASE_IMAGES: '/var/lib/gangway/base',
    });
    expect(resolvePeerLimits(layer.peers)).toEqual({
      maxSessionsPerPeer: 2,
      maxIncomingPerPeer: 3,
      maxIncoming: 9,
      maxGroupsPerSession: 5,
      handshakeTimeoutMs: 2000,
      requestsPerSecond: 7,
      requestBurst: 70,
      memoryHeadroomBytes: 2 ** 30,
      decompressionsPerSession: 2,
      maxDeviceStateBytes: 2 ** 20,
    });
    expect(resolveDedupPolicy(layer.dedup)).toMatchObject({ resident: 'none', baseImagesDir: '/var/lib/gangway/base' });
    expect(() => configFromEnv({ GANGWAY_DEDUP_BASE_IMAGES: 'base' })).toThrow(/GANGWAY_DEDUP_BASE_IMAGES.*absolute path/);
  });

  it('has safe defaults', () => {
    expect(resolvePeerLimits(undefined)).toEqual(PEER_LIMIT_DEFAULTS);
    expect(resolveDedupPolicy(undefined)).toEqual({ resident: 'from-peer', residentOffersPerMinute: 60, residentMaxAgeMs: 30_000 });
  });

  it('names the variable, the value and what is allowed', () => {
    expect(() => configFromEnv({ GANGWAY_PEERS_MAX_INCOMING: 'many' })).toThrow(/GANGWAY_PEERS_MAX_INCOMING must be a whole number from 1 to 4096 \(got "many"\)/);
    expect(() => configFromEnv({ GANGWAY_PEERS_MAX_SESSIONS_PER_PEER: '0' })).toThrow(/GANGWAY_PEERS_MAX_SESSIONS_PER_PEER must be at least 1/);
    expect(() => configFromEnv({ GANGWAY_PEERS_HANDSHAKE_TIMEOUT: '10ms' })).toThrow(/GANGWAY_PEERS_HANDSHAKE_TIMEOUT must be at least 100ms/);
    expect(() => configFromEnv({ GANGWAY_DEDUP_RESIDENT: 'everyone' })).toThrow(/GANGWAY_DEDUP_RESIDENT/);
    expect(() => resolvePeerLimits({ maxIncomingPerPeer: 20, maxIncoming: 10 })).toThrow(/'peers.maxIncomingPerPeer' \(20\) is above 'peers.maxIncoming' \(10\)/);
  });
});

describe('Slots', () => {
  it('never runs more than its count at once, and serves waiters in order', async () => {
    const slots = new Slots(2);
    const order: number[] = [];
    let running = 0;
    let most = 0;
    await Promise.all(
      Array.from({ length: 8 }, async (_, i) => {
        const release = await slots.acquire();
        running++;
        most = Math.max(most, running);
        order.push(i);
        await new Promise((resolve) => setTimeout(resolve, 2));
        running--;
        release();
      }),
    );
    expect(most).toBe(2);
    expect(order).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(slots.waitingCount).toBe(0);
  });

  it('gives a slot back once however often release is called', async () => {
    const slots = new Slots(1);
    const release = await slots.acquire();
    release();
    release();
    await slots.acquire();
    let second = false;
    void slots.acquire().then(() => (second = true));
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(second).toBe(false);
  });
});

describe('creditCost', () => {
  it('counts what a payload decompresses to, so credit bounds the receiver memory', () => {
    // 16 MiB of pages in a 64 KiB LZ4 payload costs 16 MiB, not 64 KiB.
    expect(creditCost(65_536, 16 * 2 ** 20, 1)).toBe(16 * 2 ** 20 + 12 + 256);
    // Raw: the payload is the pages.
    expect(creditCost(4096, 4096, 1)).toBe(4096 + 12 + 256);
    // Zero runs and refs carry no payload: their entries are what they cost.
    expect(creditCost(0, 0, 100)).toBe(1200 + 256);
  });
});

describe('agentIdOf', () => {
  it('is the CN, or sha256: and the fingerprint without one', () => {
    expect(agentIdOf({ commonName: 'host-a', sha256: 'ab'.repeat(32) })).toBe('host-a');
    expect(agentIdOf({ commonName: undefined, sha256: 'ab'.repeat(32) })).toBe(`sha256:${'ab'.repeat(32)}`);
  });
});
