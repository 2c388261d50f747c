// A VM definition as a peer's offer brings it: every field is checked before anything is
// started, kernels are file names resolved inside the images directory (a link out of it is
// refused), and the argument vector is built field by field (a hostile string stays one
// argument, never an option list or a shell command).
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { GuestKind } from '../../protocol/codes.js';
import type { GuestSpec } from '../../protocol/frames.js';
import { resolveKernel, vmConfig } from '../../agent/guest/qemu-guest.js';
import { vmDiskPlaces, vmSpecOfOffer } from '../../agent/guest/qemu-launcher.js';
import { parseGuestRecord } from '../../agent/guest/record.js';
import { parseVmDefinition, qemuArgs, vmSocketPathProblem, vmStateSockets, type VmDefinition } from '../../agent/guest/vm-spec.js';

const MiB = 1024 * 1024;
const root = mkdtempSync(join(tmpdir(), 'gangway-vm-offer-'));
const imagesDir = join(root, 'images');
mkdirSync(imagesDir);
writeFileSync(join(imagesDir, 'k.elf'), 'kernel');
writeFileSync(join(root, 'secret'), 'not a kernel');
symlinkSync(join(root, 'secret'), join(imagesDir, 'escape'));
symlinkSync(join(imagesDir, 'k.elf'), join(imagesDir, 'alias'));
mkdirSync(join(imagesDir, 'dir'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const disksDir = join(root, 'disks');
mkdirSync(disksDir);
writeFileSync(join(disksDir, 'shared.raw'), '');
const settings = { binary: 'qemu-system-x86_64', imagesDir, disksDir };
const definition: VmDefinition = { machine: 'q35', cpus: 1, accel: 'tcg', kernel: 'k.elf', append: 'gw.profile=random gw.rate=64' };
const noKvm = () => 'this host has no /dev/kvm';

function offer(config: Record<string, string | number | boolean>, regions: GuestSpec['regions'] = [{ name: 'ram', lengthBytes: 64 * MiB, pageSizeBytes: 4096 }]): GuestSpec {
  return { name: 'vm1', kind: GuestKind.qemu, regions, config };
}

function problemOf(guest: GuestSpec): string {
  const result = vmSpecOfOffer(guest, settings, noKvm);
  if (!('problem' in result)) throw new Error(`accepted: ${JSON.stringify(result)}`);
  return result.problem;
}

describe('a VM offered by a peer', () => {
  it('is taken when every field passes, with its regions as the spec', () => {
    expect(vmSpecOfOffer(offer(definition), settings, noKvm)).toEqual({ spec: { ...definition, regionBytes: [64 * MiB] } });
    const two = offer(definition, [
      { name: 'ram', lengthBytes: 64 * MiB, pageSizeBytes: 4096 },
      { name: 'ram1', lengthBytes: 32 * MiB, pageSizeBytes: 4096 },
    ]);
    expect(vmSpecOfOffer(two, settings, noKvm)).toEqual({ spec: { ...definition, regionBytes: [64 * MiB, 32 * MiB] } });
    // A link inside the images directory is the kernel it leads to.
    expect('spec' in vmSpecOfOffer(offer({ ...definition, kernel: 'alias' }), settings, noKvm)).toBe(true);
  });

  it.each([
    ['a path up and out', { kernel: '../secret' }, /kernel: a file name in the images directory/],
    ['an absolute path', { kernel: '/etc/passwd' }, /kernel: a file name/],
    ['a link out of the directory', { kernel: 'escape' }, /kernel escape is not in this agent's images directory/],
    ['a kernel that is not there', { kernel: 'nothere.elf' }, /not in this agent's images directory/],
    ['a directory', { kernel: 'dir' }, /not in this agent's images directory/],
    ['shell metacharacters in append', { append: 'gw.seed=1; rm -rf /' }, /append: letters, digits, spaces/],
    ['a command substitution in append', { append: '$(reboot)' }, /append/],
    ['a comma in append (a QEMU option list)', { append: 'console=ttyS0,115200' }, /append/],
    ['a quote in append', { append: 'a"b' }, /append/],
    ['a newline in append', { append: 'a\nb' }, /append/],
    ['an append too long', { append: 'a'.repeat(1025) }, /append: at most 1024/],
    ['an unknown machine type', { machine: 'microvm' }, /machine: must be one of: q35/],
    ['a machine with options', { machine: 'q35,accel=kvm' }, /machine/],
    ['an unknown accelerator', { accel: 'hvf' }, /accel: must be one of: tcg, kvm/],
    ['KVM where there is none', { accel: 'kvm' }, /runs under KVM and this host has no \/dev\/kvm/],
    ['absurd CPUs', { cpus: 100000 }, /cpus: at most 16/],
    ['fractional CPUs', { cpus: 1.5 }, /cpus: must be a whole number/],
    ['CPUs as text', { cpus: '2' }, /cpus: must be a whole number/],
    ['a device smuggled in', { device: 'virtio-net-pci,netdev=n0' }, /Unrecognized key.*device|device/],
    ['an unknown NIC model', { nic: 'vhost-user', mac: '52:54:00:00:00:01' }, /nic: must be one of: virtio-net-pci, e1000/],
    ['a NIC model with options', { nic: 'e1000,romfile=/etc/shadow', mac: '52:54:00:00:00:01' }, /nic: must be one of/],
    ['a NIC without its MAC', { nic: 'e1000' }, /a e1000 needs its mac/],
    ['a MAC without a NIC', { mac: '52:54:00:00:00:01' }, /mac: given without a nic/],
    ['a MAC with an option list', { nic: 'e1000', mac: '52:54:00:00:00:01,romfile=x' }, /mac: a MAC address 52:54:00/],
  ] as const)('is refused for %s', (_what, change, problem) => {
    expect(problemOf(offer({ ...definition, ...change } as Record<string, string | number>))).toMatch(problem);
  });

  it('is refused for regions a VM cannot have', () => {
    const region = (name: string, lengthBytes: number, pageSizeBytes = 4096) => ({ name, lengthBytes, pageSizeBytes });
    expect(problemOf(offer(definition, [region('ram', 64 * MiB + 4096)]))).toMatch(/whole MiB/);
    expect(problemOf(offer(definition, [region('ram', 2 * 1024 ** 4)]))).toMatch(/more than/);
    expect(problemOf(offer(definition, [region('ram', 8 * MiB)]))).toMatch(/first region has .* at least 32 MiB/);
    expect(problemOf(offer(definition, Array.from({ length: 9 }, (_, i) => region(i === 0 ? 'ram' : `ram${i}`, 32 * MiB))))).toMatch(/1 to 8 memory regions/);
    expect(problemOf(offer(definition, [region('ram', 64 * MiB, 2 * MiB)]))).toMatch(/4096-byte pages/);
    expect(problemOf(offer(definition, [region('rom', 64 * MiB)]))).toMatch(/ram, ram1/);
    expect(problemOf(offer(definition, []))).toMatch(/1 to 8 memory regions/);
  });

  it('reaches QEMU as separate arguments, the append as one, never through a shell', () => {
    const spec: VmDefinition = { ...definition, append: 'gw.seed=1 gw.rate=max' };
    const files = { memoryPaths: ['/dev/shm/m0'], qmpSocket: '/run/g/x.qmp', serialLog: '/run/g/x.console' };
    const args = qemuArgs('vm1', spec, [64 * MiB], files, imagesDir, true);
    expect(args[args.indexOf('-append') + 1]).toBe('gw.seed=1 gw.rate=max');
    expect(args[args.indexOf('-kernel') + 1]).toBe(join(imagesDir, 'k.elf'));
    expect(args.slice(-3)).toEqual(['-S', '-incoming', 'defer']);
    expect(() => qemuArgs('vm1', { ...spec, append: 'a,b' }, [64 * MiB], files, imagesDir, false)).toThrow();
    expect(() => qemuArgs('-vm', spec, [64 * MiB], files, imagesDir, false)).toThrow(/not allowed/);
    expect(() => qemuArgs('vm1', spec, [64 * MiB], { ...files, memoryPaths: ['/dev/shm/a,share=off'] }, imagesDir, false)).toThrow(/without ','/);
  });

  it('resolves kernels only inside the images directory', () => {
    expect(resolveKernel(imagesDir, 'k.elf')).toBe(join(imagesDir, 'k.elf'));
    expect(() => resolveKernel(imagesDir, 'escape')).toThrow(/leads out of the images directory/);
    expect(() => resolveKernel(join(root, 'none'), 'k.elf')).toThrow(/images directory .* cannot be used.*vm.imagesDir/);
  });

  it('travels as the definition alone, and its sockets fit a unix socket path', () => {
    expect(vmConfig(definition)).toEqual(definition);
    // A NIC travels with its MAC (the destination's device state expects both).
    const nic: VmDefinition = { ...definition, nic: 'virtio-net-pci', mac: '52:54:00:0a:78:5f' };
    expect(vmConfig(nic)).toEqual(nic);
    expect(vmSpecOfOffer(offer(vmConfig(nic)), settings, noKvm)).toEqual({ spec: { ...nic, regionBytes: [64 * MiB] } });
    expect(vmStateSockets('/s/guests/ab12cd34.qmp')).toEqual({ out: '/s/guests/ab12cd34.state-out', in: '/s/guests/ab12cd34.state-in' });
    expect(vmSocketPathProblem('/s/guests/ab12cd34.qmp')).toBeUndefined();
    expect(vmSocketPathProblem(`/${'d'.repeat(100)}/ab12cd34.qmp`)).toMatch(/longer than the 107 bytes.*shorter state directory/);
  });
});

describe("a VM's disks in an offer", () => {
  const ram = { name: 'ram', lengthBytes: 64 * MiB, pageSizeBytes: 4096 };
  const disk = (name: string, lengthBytes = 256 * MiB, pageSizeBytes = 4096) => ({ name, lengthBytes, pageSizeBytes });

  it('takes disks that arrive (regions after the memory) and disks on shared storage (no region, the file is here)', () => {
    const moving = offer({ ...definition, disk0: 'new.raw' }, [ram, disk('disk0')]);
    expect(vmSpecOfOffer(moving, settings, noKvm)).toEqual({ spec: { ...definition, disk0: 'new.raw', regionBytes: [64 * MiB] } });
    expect(vmDiskPlaces(moving, settings)).toEqual([{ path: join(disksDir, 'new.raw'), region: 1 }]);
    const mixed = offer({ ...definition, disk0: 'shared.raw', disk1: 'new.raw' }, [ram, disk('disk1')]);
    expect('spec' in vmSpecOfOffer(mixed, settings, noKvm)).toBe(true);
    expect(vmDiskPlaces(mixed, settings)).toEqual([{ path: join(disksDir, 'shared.raw') }, { path: join(disksDir, 'new.raw'), region: 1 }]);
  });

  it('refuses a disk that would overwrite a file, a shared disk that is not here, and disk regions that do not match the definition', () => {
    expect(problemOf(offer({ ...definition, disk0: 'shared.raw' }, [ram, disk('disk0')]))).toMatch(/disk shared.raw already exists in this agent's disks directory/);
    expect(problemOf(offer({ ...definition, disk0: 'gone.raw' }, [ram]))).toMatch(/disk gone.raw does not move with the VM and is not in this agent's disks directory/);
    expect(problemOf(offer({ ...definition, disk0: 'a.raw' }, [ram, disk('disk1')]))).toMatch(/the VM's disks are disk0..disk0, in order/);
    expect(problemOf(offer({ ...definition, disk0: 'a.raw', disk1: 'b.raw' }, [ram, disk('disk1'), disk('disk0')]))).toMatch(/in order, after its memory/);
    expect(problemOf(offer({ ...definition, disk0: 'a.raw' }, [ram, disk('disk0', 256 * MiB, 65536)]))).toMatch(/65536-byte blocks, not 4096/);
    expect(problemOf(offer({ ...definition, disk0: 'a.raw' }, [ram, disk('disk0', 4096 * 3 + 512)]))).toMatch(/must be a multiple of 4096/);
    expect(problemOf(offer({ ...definition, disk1: 'a.raw' }, [ram]))).toMatch(/disk1: given without disk0/);
    expect(problemOf(offer({ ...definition, disk0: 'a.raw', disk1: 'a.raw' }, [ram]))).toMatch(/named twice/);
    expect(problemOf(offer({ ...definition, disk0: '../etc/passwd' }, [ram]))).toMatch(/disk0: a file name in the disks directory/);
    // What the destination would keep a fingerprint of is bounded: 2 x 300 GiB is over.
    expect(problemOf(offer({ ...definition, disk0: 'a.raw', disk1: 'b.raw' }, [ram, disk('disk0', 300 * 1024 ** 3), disk('disk1', 300 * 1024 ** 3)]))).toMatch(/at most 549755813888 in one migration/);
  });

  it('puts each disk on the command line as a file node, a raw node and a virtio-blk device, by gangway\'s node names', () => {
    const args = qemuArgs('vm1', { ...definition, disk0: 'd.raw' }, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c', diskPaths: ['/disks/d.raw'] }, imagesDir, false);
    expect(args).toContain('driver=file,filename=/disks/d.raw,node-name=gw-file0,cache.direct=off,discard=unmap');
    expect(args).toContain('driver=raw,file=gw-file0,node-name=gw-disk0,discard=unmap');
    expect(args).toContain('virtio-blk-pci,drive=gw-disk0,id=gw-vd0');
    expect(() => qemuArgs('vm1', { ...definition, disk0: 'd.raw' }, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c' }, imagesDir, false)).toThrow(/1 disks, 0 disk files/);
    expect(() => qemuArgs('vm1', { ...definition, disk0: 'd.raw' }, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c', diskPaths: ['/disks/a,b.raw'] }, imagesDir, false)).toThrow(/without ','/);
  });

  it('boots a VM without a kernel from its first disk, and refuses one with neither, or a command line without a kernel', () => {
    const { kernel: _kernel, ...diskBoot } = { ...definition, disk0: 'os.raw', append: '' };
    const args = qemuArgs('vm1', diskBoot, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c', diskPaths: ['/disks/os.raw'] }, imagesDir, false);
    expect(args).not.toContain('-kernel');
    expect(args).not.toContain('-append');
    expect(args).toContain('virtio-blk-pci,drive=gw-disk0,id=gw-vd0,bootindex=0');
    expect(parseVmDefinition({ ...diskBoot })).toEqual({ definition: diskBoot });
    const { disk0: _disk, ...neither } = diskBoot;
    expect(parseVmDefinition(neither)).toEqual({ problem: expect.stringMatching(/a VM boots a kernel \(--kernel\) or, without one, its first disk/) });
    expect(parseVmDefinition({ ...diskBoot, append: 'console=ttyS0' })).toEqual({ problem: expect.stringMatching(/a kernel command line needs a kernel/) });
    expect(() => qemuArgs('vm1', neither, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c' }, imagesDir, false)).toThrow(/boots a kernel/);
    // With a kernel, no disk boots.
    expect(qemuArgs('vm1', { ...definition, disk0: 'd.raw' }, [64 * MiB], { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c', diskPaths: ['/disks/d.raw'] }, imagesDir, false)).toContain('virtio-blk-pci,drive=gw-disk0,id=gw-vd0');
  });

  it("puts a disk that arrives by post-copy behind the agent's NBD export (an nbd node under the raw node), the others on their files", () => {
    const files = { memoryPaths: ['/dev/shm/m'], qmpSocket: '/s/q.qmp', serialLog: '/s/c', diskPaths: ['/proc/self/fd/5', '/disks/shared.raw'], diskExports: { socket: '/s/q.disks', disks: [0] } };
    const args = qemuArgs('vm1', { ...definition, disk0: 'd.raw', disk1: 'shared.raw' }, [64 * MiB], files, imagesDir, true);
    expect(args).toContain('driver=nbd,server.type=unix,server.path=/s/q.disks,export=disk0,node-name=gw-nbd0');
    expect(args).toContain('driver=raw,file=gw-nbd0,node-name=gw-disk0,discard=unmap');
    expect(args).toContain('driver=file,filename=/disks/shared.raw,node-name=gw-file1,cache.direct=off,discard=unmap');
    expect(args.some((arg) => arg.includes('gw-file0'))).toBe(false);
    expect(() => qemuArgs('vm1', { ...definition, disk0: 'd.raw' }, [64 * MiB], { ...files, diskPaths: ['/proc/self/fd/5'], diskExports: { socket: '/s/a,b.disks', disks: [0] } }, imagesDir, true)).toThrow(/without ','/);
  });
});

describe('a VM record read back from disk', () => {
  const record = {
    name: 'vm1',
    kind: 'qemu',
    pid: 1234,
    memoryBytes: 64 * MiB,
    pageSizeBytes: 4096,
    files: { memoryPaths: ['/dev/shm/gangway-vm1-1.mem'], trackReportPath: '/s/vm1-1.track', logPath: '/s/vm1.log', qmpSocketPath: '/s/1.qmp', consolePath: '/s/vm1-1.console' },
    spec: { ...definition, regionBytes: [64 * MiB] },
    origin: { kind: 'started' },
    startedAt: '2026-12-05T12:00:00.000Z',
  };

  it('is read with its definition', () => {
    const parsed = parseGuestRecord(JSON.stringify(record), 'vm1.json');
    expect(parsed).toEqual({ record });
  });

  it("says which of its definition's fields are wrong, listing a VM's fields", () => {
    const bad = { ...record, spec: { ...record.spec, machine: 'pc', cpus: undefined, profile: 'os-image' } };
    const parsed = parseGuestRecord(JSON.stringify(bad), 'vm1.json');
    expect('problem' in parsed && parsed.problem).toMatch(/'spec.machine' must be one of: q35 \(got "pc"\)/);
    expect('problem' in parsed && parsed.problem).toMatch(/'spec.cpus' is missing \(it must be a whole number from 1 to 16\)/);
    expect('problem' in parsed && parsed.problem).toMatch(/'spec.profile' is not a field of 'spec' \(allowed: machine, cpus, accel, kernel, append, nic, mac, disk0, disk1, disk2, disk3, regionBytes\)/);
  });
});
