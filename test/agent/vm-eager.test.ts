// The pages a VM's post-copy sends before its switch: the option-ROM window that QEMU's
// device-state load reads (kvmvapic), so that the load does not fault inside the downtime.
import { describe, expect, it } from 'vitest';
import { MigratingVm, type DiskVm } from '../../agent/guest/qemu-disks.js';
import { QemuGuest } from '../../agent/guest/qemu-guest.js';
import type { VmSpec } from '../../agent/guest/vm-spec.js';

const MiB = 1024 * 1024;

function vm(regionBytes: number[]): QemuGuest {
  const spec = { machine: 'q35', accel: 'tcg', cpus: 1, regionBytes } as unknown as VmSpec;
  const files = { memoryPaths: regionBytes.map((_, i) => `/nonexistent/mem${i}`), logPath: '/nonexistent/log', qmpSocketPath: '/nonexistent/qmp', trackReportPath: '/nonexistent/track' };
  return new QemuGuest('vm1', 1, files, spec);
}

describe('a VM post-copy sends the option-ROM window before the switch', () => {
  it('pages 0xC0-0xDF of the region at guest-physical 0, none of the others', () => {
    const eager = vm([256 * MiB, 128 * MiB]).eagerRuns();
    expect(eager.map((runs) => Array.from(runs))).toEqual([[0xc0, 0x20], []]);
  });

  it('through a migrating view with disks: the VM\'s for its memory, none for a disk (its blocks are fetched as the guest asks)', () => {
    const guest = vm([64 * MiB]);
    const view = new MigratingVm(guest as unknown as DiskVm, [{ index: 0, file: 'd0.img', path: '/nonexistent/d0.img', sizeBytes: 16 * MiB }]);
    expect(view.regions).toHaveLength(2);
    expect(view.eagerRuns().map((runs) => Array.from(runs))).toEqual([[0xc0, 0x20], []]);
  });
});
