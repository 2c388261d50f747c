// One vocabulary for ended migrations on both sides: each record state the source and the
// destination keep maps to completed, cancelled (and by whom), failed (its cause once),
// in-doubt, interrupted or stranded.
import { describe, expect, it } from 'vitest';
import { entryOf, outcomeText } from '../../agent/daemon/outcome.js';
import type { MigrationRecord } from '../../agent/daemon/records.js';
import { MigrationRecords } from '../../agent/daemon/records.js';
import type { HistoryEntry } from '../../agent/daemon/outcome.js';

const out = { direction: 'out' as const, migrationId: 'm1', guest: 'vm1', to: '10.0.0.2:7401', startedAt: '2026-12-05T21:00:00.000Z' };
const inc = { direction: 'in' as const, migrationId: 'm1', guest: 'vm1', from: 'agent-a', startedAt: '2026-12-05T21:00:00.000Z' };
const result = { migrationId: 'm1', guest: 'vm1', from: 'agent-a', pages: 10, rounds: 2, technique: 'precopy' as const };
const aborted = { code: 'GANGWAY_ERR_ABORTED', message: 'cancelled by the operator' };

describe('entryOf', () => {
  it.each<[string, Exclude<MigrationRecord, { state: 'running' | 'queued' }>, boolean, Partial<HistoryEntry>, string]>([
    ['a source cancelled by its operator', { ...out, state: 'failed', error: aborted }, true, { outcome: 'cancelled', cancelledBy: 'operator' }, 'cancelled by the operator'],
    ['a source that failed', { ...out, state: 'failed', error: { code: 'GANGWAY_ERR_NON_CONVERGENCE', message: 'pre-copy does not converge' } }, false, { outcome: 'failed' }, 'failed: pre-copy does not converge [GANGWAY_ERR_NON_CONVERGENCE]'],
    ['a source in doubt', { ...out, state: 'in-doubt', error: { code: 'GANGWAY_ERR_SWITCHOVER_IN_DOUBT', message: 'no answer' } }, false, { outcome: 'in-doubt' }, 'in-doubt: no answer [GANGWAY_ERR_SWITCHOVER_IN_DOUBT]'],
    ['a post-copy resumed after a restart', { ...out, state: 'resumed', resumed: { verified: true, pushedPages: 1, faultPages: 0 } }, false, { outcome: 'completed', technique: 'postcopy' }, 'completed'],
    ['a destination that saw the cancel', { ...inc, state: 'aborted', result: { ...result, outcome: 'aborted', reason: 'the source aborted: cancelled by the operator', sourceCode: 'GANGWAY_ERR_ABORTED' } }, false, { outcome: 'cancelled', cancelledBy: 'source' }, 'cancelled at the source'],
    ['a destination whose digests differed', { ...inc, state: 'aborted', result: { ...result, outcome: 'aborted', reason: 'memory digests differ' } }, false, { outcome: 'failed', error: { code: 'GANGWAY_ERR_ABORTED', message: 'memory digests differ' } }, 'failed: memory digests differ [GANGWAY_ERR_ABORTED]'],
    ['a destination that committed', { ...inc, state: 'committed', result: { ...result, outcome: 'committed' } }, false, { outcome: 'completed', rounds: 2, peer: 'agent-a' }, 'completed'],
    ['a stranded post-copy', { ...inc, state: 'stranded', result: { ...result, outcome: 'stranded', reason: 'session lost' } }, false, { outcome: 'stranded' }, 'stranded: session lost [GANGWAY_ERR_ABORTED]'],
  ])('%s', (_, record, cancelled, expected, text) => {
    const entry = entryOf(record, cancelled);
    expect(entry).toMatchObject(expected);
    expect(outcomeText(entry)).toBe(text);
    // The cause is said once: a cancel carries no error beside it.
    if (entry.outcome === 'cancelled') expect(entry.error).toBeUndefined();
  });
});

describe('MigrationRecords', () => {
  it('reports a start once, an end once, and lists the outcome beside the state', () => {
    const seen: string[] = [];
    const records = new MigrationRecords({ started: (r) => seen.push(`started ${r.migrationId}`), ended: (e) => seen.push(`ended ${e.migrationId} ${e.outcome}`) });
    records.set('m1', { ...out, state: 'running' });
    records.set('m1', { ...out, state: 'running' });
    records.noteCancelled('m1');
    records.set('m1', { ...out, state: 'failed', error: aborted });
    records.set('m1', { ...out, state: 'failed', error: aborted });
    expect(seen).toEqual(['started m1', 'ended m1 cancelled']);
    expect(records.newestFirst()[0]).toMatchObject({ state: 'failed', outcome: 'cancelled', cancelledBy: 'operator' });
  });
});

describe('MigrationRecords with a queue (migration.maxParallelOutbound)', () => {
  const queued = { ...out, state: 'queued' as const, queuedAt: '2026-12-05T21:00:00.000Z' };

  it('a queued migration starts when it runs, and ends once', () => {
    const seen: string[] = [];
    const records = new MigrationRecords({ started: (r) => seen.push(`started ${r.state}`), ended: (e) => seen.push(`ended ${e.outcome}`) });
    records.set('m1', queued);
    expect(seen).toEqual([]);
    records.set('m1', { ...out, state: 'running' });
    records.set('m1', { ...out, state: 'failed', error: { code: 'GANGWAY_ERR_NON_CONVERGENCE', message: 'pre-copy does not converge' } });
    expect(seen).toEqual(['started running', 'ended failed']);
  });

  it('a migration cancelled while queued ends as cancelled, never having started', () => {
    const seen: string[] = [];
    const records = new MigrationRecords({ started: () => seen.push('started'), ended: (e) => seen.push(`ended ${e.outcome} by ${e.cancelledBy}`) });
    records.set('m1', queued);
    records.noteCancelled('m1');
    records.set('m1', { ...out, state: 'failed', error: aborted });
    expect(seen).toEqual(['ended cancelled by operator']);
  });
});
