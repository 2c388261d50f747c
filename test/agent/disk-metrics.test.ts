// A disk's blocks are counted in the migration metrics and, apart, in the disk metrics.
import { describe, expect, it } from 'vitest';
import { AgentMetrics } from '../../agent/metrics.js';
import { emptyCounters } from '../../agent/migration/page-sender.js';

async function value(metrics: AgentMetrics, name: string, kind: string): Promise<number> {
  const metric = (await metrics.registry.getMetricsAsJSON()).find((m) => m.name === name);
  return (metric?.values.find((v) => v.labels.kind === kind)?.value as number | undefined) ?? 0;
}

describe('disk metrics', () => {
  it("count a disk's batches in both, and memory's in the migration metrics only", async () => {
    const metrics = new AgentMetrics();
    const batch = { ...emptyCounters(), dataPages: 3, zeroPages: 2, refPages: 1, rawBytes: 3 * 4096, wireBytes: 5000 };
    metrics.batchSent(emptyCounters(), batch, 4096, true);
    metrics.batchSent(emptyCounters(), batch, 4096, false);
    expect(await value(metrics, 'gangway_migration_bytes_total', 'wire')).toBe(10_000);
    expect(await value(metrics, 'gangway_disk_bytes_total', 'wire')).toBe(5000);
    expect(await value(metrics, 'gangway_disk_bytes_total', 'data')).toBe(3 * 4096);
    expect(await value(metrics, 'gangway_disk_bytes_total', 'zero')).toBe(2 * 4096);
    expect(await value(metrics, 'gangway_disk_blocks_total', 'ref')).toBe(1);
    expect(await value(metrics, 'gangway_migration_pages_total', 'data')).toBe(6);
  });
});
