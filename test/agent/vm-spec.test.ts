// A VM definition is checked on every way in, and the QEMU argument vector is built from it
// field by field: hostile definitions (as a peer's offer could carry) are refused with the
// field and the rule, and nothing of them reaches an argument.
import { describe, expect, it } from 'vitest';
import { parseVmDefinition, qemuArgs, vmRegionsProblem, type VmDefinition } from '../../agent/guest/vm-spec.js';

const MiB = 2 ** 20;
const files = { memoryPaths: ['/dev/shm/gangway-vm1-ab.mem'], qmpSocket: '/var/lib/gangway/guests/vm1.qmp', serialLog: '/var/lib/gangway/guests/vm1.serial' };
const definition: VmDefinition = { machine: 'q35', cpus: 2, accel: 'tcg', kernel: 'gangway-testvm.elf', append: 'gw.profile=os-image gw.rate=1024' };

describe('VM definitions and the QEMU command line', () => {
  it('builds one region as the machine memory backend, every value in its own argument', () => {
    expect(qemuArgs('vm1', definition, [256 * MiB], files, '/var/lib/gangway/images', false)).toEqual([
      '-name', 'guest=vm1', '-accel', 'tcg', '-nodefaults', '-no-user-config', '-display', 'none', '-smp', '2', '-m', '256M',
      '-object', 'memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/gangway-vm1-ab.mem,share=on',
      '-machine', 'q35,memory-backend=mem0',
      '-serial', 'file:/var/lib/gangway/guests/vm1.serial',
      '-qmp', 'unix:/var/lib/gangway/guests/vm1.qmp,server=on,wait=off',
      '-kernel', '/var/lib/gangway/images/gangway-testvm.elf',
      '-append', 'gw.profile=os-image gw.rate=1024',
    ]);
  });

  it('makes several regions NUMA nodes, and a destination QEMU waits for its state and its cont', () => {
    const args = qemuArgs('vm1', definition, [64 * MiB, 32 * MiB], { ...files, memoryPaths: ['/m/a', '/m/b'] }, '/images', true);
    expect(args).toContain('96M');
    expect(args.filter((a) => a.startsWith('memory-backend-file'))).toEqual([
      'memory-backend-file,id=mem0,size=64M,mem-path=/m/a,share=on',
      'memory-backend-file,id=mem1,size=32M,mem-path=/m/b,share=on',
    ]);
    expect(args.join(' ')).toContain('-machine q35 -numa node,nodeid=0,memdev=mem0 -numa node,nodeid=1,memdev=mem1');
    expect(args.slice(-3)).toEqual(['-S', '-incoming', 'defer']);
  });

  it('refuses hostile definitions, naming the field and the rule', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ ...definition, kernel: '../../etc/passwd' }, /kernel: a file name in the images directory/],
      [{ ...definition, kernel: '/boot/vmlinuz' }, /kernel: a file name/],
      [{ ...definition, kernel: '..' }, /kernel/],
      [{ ...definition, append: 'init=/bin/sh; reboot' }, /append: letters, digits/],
      [{ ...definition, append: '$(reboot)' }, /append/],
      [{ ...definition, append: 'a"b' }, /append/],
      [{ ...definition, append: 'console=ttyS0,115200' }, /append/],
      [{ ...definition, append: 'x'.repeat(1025) }, /append: at most 1024/],
      [{ ...definition, machine: 'pc-i440fx-7.2' }, /machine: must be one of: q35/],
      [{ ...definition, accel: 'hvf' }, /accel: must be one of: tcg, kvm/],
      [{ ...definition, cpus: 0 }, /cpus/],
      [{ ...definition, cpus: 1000 }, /cpus: at most 16/],
      [{ ...definition, device: 'virtio-9p-pci,fsdev=host' }, /Unrecognized key.*device/i],
      [{ machine: 'q35' }, /cpus/],
    ];
    for (const [config, message] of cases) {
      const parsed = parseVmDefinition(config);
      expect('problem' in parsed ? parsed.problem : 'accepted', JSON.stringify(config).slice(0, 80)).toMatch(message);
    }
    expect(parseVmDefinition({ ...definition })).toEqual({ definition });
  });

  it('refuses memory regions that are not whole MiB, too many, too large, or a first region too small', () => {
    expect(vmRegionsProblem([256 * MiB, 64 * MiB])).toBeUndefined();
    expect(vmRegionsProblem([256 * MiB + 4096])).toMatch(/whole MiB/);
    expect(vmRegionsProblem([8 * MiB])).toMatch(/at least 32 MiB/);
    expect(vmRegionsProblem(Array(9).fill(64 * MiB))).toMatch(/1 to 8/);
    expect(vmRegionsProblem([1024 ** 4, 1024 ** 4])).toMatch(/more than/);
    expect(() => qemuArgs('vm1', definition, [8 * MiB], files, '/images', false)).toThrow(/at least 32 MiB/);
  });

  it('refuses paths QEMU would split at a comma, a guest name it could misread, and a definition that skipped the checks', () => {
    expect(() => qemuArgs('vm1', definition, [64 * MiB], { ...files, memoryPaths: ['/m/a,share=off'] }, '/images', false)).toThrow(/without ','/);
    expect(() => qemuArgs('vm1', definition, [64 * MiB], files, 'images', false)).toThrow(/absolute path/);
    expect(() => qemuArgs('vm1,debug-threads=on', definition, [64 * MiB], files, '/images', false)).toThrow(/guest name/);
    expect(() => qemuArgs('vm1', { ...definition, kernel: '../x' }, [64 * MiB], files, '/images', false)).toThrow();
  });
});
