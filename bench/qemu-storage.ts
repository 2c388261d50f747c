// QEMU's own storage migration, the QMP steps libvirt takes for `virsh migrate
// --copy-storage-all` (non-shared storage over NBD), for the QEMU baseline
// (qemu-baseline.ts) of a VM with a disk:
//   destination (started -S -incoming defer, late-block-activate on, on an empty sparse raw
//     file of the disk's size): nbd-server-start on the migration network; block-export-add,
//     writable, of its disk node;
//   source (pause-before-switchover on): blockdev-add an NBD client node to that export;
//     blockdev-mirror of its disk node into it (sync full, QEMU's defaults otherwise:
//     background copy mode, as libvirt without VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES);
//     wait for BLOCK_JOB_READY; then `migrate` as without a disk;
//   source, at the MIGRATION event pre-switchover (the VM stopped, its disks still active):
//     block-job-cancel of the mirror (a READY mirror cancelled without force completes with
//     its target in sync), blockdev-del of the NBD node, migrate-continue;
//   destination, once the migration completed: nbd-server-stop (its export goes with it),
//     then `cont`.
// Why the pause: libvirt always turns it on (qemuMigrationParamsAlwaysOn). Ending the mirror
// after `completed` instead, as one might read libvirt's flow, crashes QEMU 7.2 whenever
// the guest wrote its disk late in the migration: the completion inactivates every block
// node, the NBD one included, and the mirror's last copy then writes into it
// (block/io.c bdrv_co_write_req_prepare: Assertion `!(bs->open_flags & BDRV_O_INACTIVE)'
// failed; seen here at 1,400 block writes/s).
import type { QmpClient, QmpEvent } from '../agent/guest/qmp.js';
import { ErrorCode } from '../protocol/errors.js';
import { QemuBaselineError } from './qemu-vm.js';

/** Where the destination serves its disk. */
export interface NbdTarget {
  host: string;
  port: number;
  exportName: string;
}

export interface MirrorReady {
  /** blockdev-mirror to BLOCK_JOB_READY. */
  readyAfterMs: number;
  /** The job's progress when it became ready: bytes processed (copied or zeroed) of its length. */
  offsetBytes: number;
  lengthBytes: number;
}

export interface MirrorDone {
  /** How the job ended: BLOCK_JOB_COMPLETED (7.2 ends a READY mirror cancelled without force so) or BLOCK_JOB_CANCELLED. */
  event: string;
  /** block-job-cancel to the job's end. */
  cancelMs: number;
  offsetBytes: number;
  lengthBytes: number;
}

const NBD_NODE = 'mig-nbd0';
const JOB_ID = 'mig-mirror0';
const JOB_END_EVENTS = ['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'];
const JOB_END_TIMEOUT_MS = 60_000;

/** Destination: serves its disk node `node` for the source's mirror to write into. */
export async function exportIncomingDisk(qmp: QmpClient, node: string, target: NbdTarget): Promise<void> {
  await qmp.exec('nbd-server-start', { addr: { type: 'inet', data: { host: target.host, port: String(target.port) } } });
  // QEMU activates the node for the export and holds back the device's write permission
  // until the VM runs, so the export may write meanwhile.
  await qmp.exec('block-export-add', { type: 'nbd', id: target.exportName, 'node-name': node, name: target.exportName, writable: true });
}

/** Destination, after the migration completed and the source's mirror ended: the export goes, the VM runs. */
export async function finishIncomingDisk(qmp: QmpClient): Promise<void> {
  await qmp.exec('nbd-server-stop');
  await qmp.cont();
}

/**
 * Source: connects to the destination's export and mirrors disk node `node` into it until
 * the job says READY (the copy caught up). Throws NON_CONVERGENCE if it does not within
 * `timeoutMs`, with the job's progress; GUEST_FAILED if the job ends first.
 */
export async function startMirror(qmp: QmpClient, node: string, target: NbdTarget, options: { timeoutMs: number; signal?: AbortSignal }): Promise<MirrorReady> {
  await qmp.exec('blockdev-add', { driver: 'nbd', 'node-name': NBD_NODE, server: { type: 'inet', host: target.host, port: String(target.port) }, export: target.exportName });
  const mark = qmp.eventMark();
  const started = performance.now();
  await qmp.exec('blockdev-mirror', { 'job-id': JOB_ID, device: node, target: NBD_NODE, sync: 'full' });
  const ofJob = (data: Record<string, unknown>) => data.device === JOB_ID;
  // One signal ends every waiter once the first answers (or the caller aborts).
  const settled = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, settled.signal]) : settled.signal;
  const wait = (name: string) => qmp.waitForEvent(name, { since: mark, predicate: ofJob, timeoutMs: options.timeoutMs, signal });
  try {
    const first = await Promise.race([wait('BLOCK_JOB_READY'), ...JOB_END_EVENTS.map(wait)]);
    if (first.event !== 'BLOCK_JOB_READY') {
      throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `QEMU's mirror of ${node} ended (${first.event}) before it was ready: ${JSON.stringify(first.data)}`);
    }
    return { readyAfterMs: performance.now() - started, offsetBytes: Number(first.data.offset), lengthBytes: Number(first.data.len) };
  } catch (err) {
    if (err instanceof QemuBaselineError || options.signal?.aborted) throw err;
    const jobs = await qmp.exec('query-block-jobs').catch((e: Error) => `query-block-jobs failed: ${e.message}`);
    throw new QemuBaselineError(ErrorCode.NON_CONVERGENCE, `QEMU's mirror of ${node} did not converge (no BLOCK_JOB_READY) within ${options.timeoutMs} ms: ${(err as Error).message}; jobs: ${JSON.stringify(jobs)}`, undefined, { cause: err });
  } finally {
    settled.abort();
  }
}

/** Source, paused before the switchover: ends the mirror with its target in sync, then drops the NBD node. */
export async function finishMirror(qmp: QmpClient, signal?: AbortSignal): Promise<MirrorDone> {
  const mark = qmp.eventMark();
  const started = performance.now();
  await qmp.exec('block-job-cancel', { device: JOB_ID });
  const ofJob = (data: Record<string, unknown>) => data.device === JOB_ID;
  const settled = new AbortController();
  const any = signal ? AbortSignal.any([signal, settled.signal]) : settled.signal;
  let end: QmpEvent;
  try {
    end = await Promise.race(JOB_END_EVENTS.map((name) => qmp.waitForEvent(name, { since: mark, predicate: ofJob, timeoutMs: JOB_END_TIMEOUT_MS, signal: any })));
  } catch (err) {
    if (signal?.aborted) throw err;
    throw new QemuBaselineError(ErrorCode.TIMEOUT, `QEMU's mirror did not end within ${JOB_END_TIMEOUT_MS} ms of block-job-cancel: ${(err as Error).message}`, undefined, { cause: err });
  } finally {
    settled.abort();
  }
  const cancelMs = performance.now() - started;
  if (end.data.error) throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `QEMU's mirror ended with an error: ${String(end.data.error)}`);
  await qmp.exec('blockdev-del', { 'node-name': NBD_NODE });
  return { event: end.event, cancelMs, offsetBytes: Number(end.data.offset), lengthBytes: Number(end.data.len) };
}
