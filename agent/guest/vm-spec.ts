// A QEMU VM's definition as gangway runs it, and the QEMU argument vector built from it.
//
// A definition comes from an operator (CLI, control API) or from a peer's offer, and is
// checked the same way on every way in: machine types and accelerators from allowlists,
// bounded counts and sizes, a kernel named as a file of the configured images directory
// (never a path), a kernel command line in a conservative alphabet. The argument vector is
// then built here field by field and handed to QEMU without a shell: nothing a peer sends
// becomes a command line, a path or an option string as it came.
import { isAbsolute, join } from 'node:path';
import { z } from 'zod';
import { GUEST_NAME_PATTERN } from './guest-name.js';

export const VM_MACHINES = ['q35'] as const;
/** The NIC models a VM may have (one NIC, backed by a TAP device on each host). */
export const VM_NICS = ['virtio-net-pci', 'e1000'] as const;
/** QEMU's own locally administered prefix, lower case. */
const MAC = /^52:54:00(:[0-9a-f]{2}){3}$/;
/** An interface name (IFNAMSIZ: at most 15 characters). */
const TAP = /^[A-Za-z0-9_.-]{1,15}$/;
export const VM_ACCELS = ['tcg', 'kvm'] as const;
export const MAX_VM_CPUS = 16;
/** Memory regions of a VM: NUMA nodes, a memory-backend-file each. */
export const MAX_VM_REGIONS = 8;
/** Region sizes are whole MiB (QEMU's -m and NUMA node sizes), at least this much for region 0 (the test kernel works from 16 MiB up). */
export const VM_REGION_ALIGN_BYTES = 1024 * 1024;
export const MIN_VM_FIRST_REGION_BYTES = 32 * 1024 * 1024;
export const MAX_VM_MEMORY_BYTES = 1024 ** 4;
const KERNEL_FILE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Disks of a VM: virtio-blk devices on raw files of the agent's disks directory. */
export const MAX_VM_DISKS = 4;
/** A disk is tracked, sent and deduplicated in blocks of this size (memory's page size: disk blocks dedup against pages). */
export const VM_DISK_BLOCK_BYTES = 4096;
/** A disk's size is a whole number of blocks, at most this many bytes (block numbers are 32-bit). */
export const MAX_VM_DISK_BYTES = 2 ** 32 * VM_DISK_BLOCK_BYTES - VM_DISK_BLOCK_BYTES;
/**
 * The disks one migration moves, in all. A destination keeps a 16-byte fingerprint of every
 * block it receives (the switchover's digest and dedup come from them): 512 GiB of disk
 * costs it 2 GiB of memory for the migration's length, which is where a peer's offer stops.
 */
export const MAX_MOVED_DISK_BYTES = 512 * 1024 ** 3;
const diskFile = () =>
  z
    .string({ error: "must be the disk's file name in the disks directory" })
    .regex(KERNEL_FILE, "a file name in the disks directory: letters, digits, '.', '_', '-', no '/'")
    .optional();
/** Printable, no quotes, no shell or QEMU option metacharacters: key=value words as a kernel reads them. */
const APPEND = /^[A-Za-z0-9 ._:=+/-]*$/;
export const MAX_APPEND_LENGTH = 1024;

/** What a VM is, apart from its memory (its regions travel as the offer's regions). */
export const VmDefinitionSchema = z.strictObject({
  machine: z.enum(VM_MACHINES, { error: `must be one of: ${VM_MACHINES.join(', ')}` }),
  cpus: z.number({ error: `must be a whole number from 1 to ${MAX_VM_CPUS}` }).int(`must be a whole number from 1 to ${MAX_VM_CPUS}`).min(1, `must be a whole number from 1 to ${MAX_VM_CPUS}`).max(MAX_VM_CPUS, `at most ${MAX_VM_CPUS}`),
  accel: z.enum(VM_ACCELS, { error: `must be one of: ${VM_ACCELS.join(', ')}` }),
  /** Absent: the VM boots from its first disk (the BIOS reads its boot sector). */
  kernel: z.string({ error: 'must be the kernel\'s file name in the images directory' }).regex(KERNEL_FILE, "a file name in the images directory: letters, digits, '.', '_', '-', no '/'").refine((name) => name !== '.' && name !== '..', 'not . or ..').optional(),
  append: z.string({ error: "must be the kernel's command line (text, may be empty)" }).max(MAX_APPEND_LENGTH, `at most ${MAX_APPEND_LENGTH} characters`).regex(APPEND, "letters, digits, spaces and . _ : = + / - only (no quotes, commas or shell characters)"),
  /** One NIC of this model, its MAC travelling with the VM (each host backs it with a TAP device of its own). */
  nic: z.enum(VM_NICS, { error: `must be one of: ${VM_NICS.join(', ')}` }).optional(),
  mac: z.string({ error: 'must be a MAC address' }).regex(MAC, 'a MAC address 52:54:00:xx:xx:xx (lower-case hex)').optional(),
  /** Disks, in order (virtio-blk devices): file names in each host's disks directory. */
  disk0: diskFile(),
  disk1: diskFile(),
  disk2: diskFile(),
  disk3: diskFile(),
});
export type VmDefinition = z.infer<typeof VmDefinitionSchema>;
/** A VM as its record keeps it: the definition and its memory regions' sizes. */
export type VmSpec = VmDefinition & { regionBytes: number[] };

const DISK_KEYS = ['disk0', 'disk1', 'disk2', 'disk3'] as const;

/** The VM's disk files, in device order. */
export function vmDisks(definition: Pick<VmDefinition, (typeof DISK_KEYS)[number]>): string[] {
  const disks: string[] = [];
  for (const key of DISK_KEYS) {
    const file = definition[key];
    if (file === undefined) break;
    disks.push(file);
  }
  return disks;
}

/** The definition fields naming these disk files. */
export function vmDiskFields(files: readonly string[]): Partial<Record<(typeof DISK_KEYS)[number], string>> {
  if (files.length > MAX_VM_DISKS) throw new RangeError(`at most ${MAX_VM_DISKS} disks, not ${files.length}`);
  return Object.fromEntries(files.map((file, i) => [DISK_KEYS[i]!, file]));
}

/** Disks come in order (disk1 only with disk0, ...), each file once. */
export function vmDisksProblem(definition: Pick<VmDefinition, (typeof DISK_KEYS)[number]>): string | undefined {
  const disks = vmDisks(definition);
  const stray = DISK_KEYS.slice(disks.length).find((key) => definition[key] !== undefined);
  if (stray) return `${stray}: given without disk${disks.length}`;
  const twice = disks.find((file, i) => disks.indexOf(file) !== i);
  if (twice) return `disk file ${twice} is named twice`;
  return undefined;
}

/** The region name of disk i in an offer. */
export const diskRegionName = (index: number): string => `disk${index}`;

/** Why a disk of `sizeBytes` cannot be a VM's, or undefined. */
export function vmDiskSizeProblem(sizeBytes: number): string | undefined {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) return `a disk of ${sizeBytes} bytes: a disk has a positive size`;
  if (sizeBytes % VM_DISK_BLOCK_BYTES !== 0) return `a disk of ${sizeBytes} bytes: its size must be a multiple of ${VM_DISK_BLOCK_BYTES} bytes (qemu-img resize it)`;
  if (sizeBytes > MAX_VM_DISK_BYTES) return `a disk of ${sizeBytes} bytes: at most ${MAX_VM_DISK_BYTES}`;
  return undefined;
}

/** Why these region sizes cannot be a VM's memory, or undefined. */
export function vmRegionsProblem(regionBytes: readonly number[]): string | undefined {
  if (regionBytes.length < 1 || regionBytes.length > MAX_VM_REGIONS) return `a VM has 1 to ${MAX_VM_REGIONS} memory regions, not ${regionBytes.length}`;
  const odd = regionBytes.find((size) => !Number.isSafeInteger(size) || size <= 0 || size % VM_REGION_ALIGN_BYTES !== 0);
  if (odd !== undefined) return `a region of ${odd} bytes: VM memory regions are whole MiB`;
  if (regionBytes[0]! < MIN_VM_FIRST_REGION_BYTES) return `the first region has ${regionBytes[0]} bytes; a VM needs at least ${MIN_VM_FIRST_REGION_BYTES / 2 ** 20} MiB there`;
  const total = regionBytes.reduce((sum, size) => sum + size, 0);
  if (total > MAX_VM_MEMORY_BYTES) return `${total} bytes of memory in all, more than ${MAX_VM_MEMORY_BYTES}`;
  return undefined;
}

/** A definition as the offer's config carries it (flat strings and numbers), checked. */
export function parseVmDefinition(config: Record<string, unknown>): { definition: VmDefinition } | { problem: string } {
  const result = VmDefinitionSchema.safeParse(config);
  if (!result.success) return { problem: result.error.issues.map((issue) => `${issue.path.join('.') || 'definition'}: ${issue.message}`).join('; ') };
  const problem = vmNicProblem(result.data) ?? vmDisksProblem(result.data) ?? vmBootProblem(result.data);
  return problem ? { problem } : { definition: result.data };
}

/** A VM boots a kernel, or without one its first disk; a kernel command line needs a kernel. */
export function vmBootProblem(definition: Pick<VmDefinition, 'kernel' | 'append' | 'disk0'>): string | undefined {
  if (definition.kernel === undefined && definition.disk0 === undefined) return 'kernel: a VM boots a kernel (--kernel) or, without one, its first disk (--disk)';
  if (definition.kernel === undefined && definition.append !== '') return 'append: a kernel command line needs a kernel (--kernel); a VM booting from its disk has its own';
  return undefined;
}

/** A NIC needs its MAC, and a MAC its NIC. */
export function vmNicProblem(definition: Pick<VmDefinition, 'nic' | 'mac'>): string | undefined {
  if (definition.nic && !definition.mac) return `nic: a ${definition.nic} needs its mac`;
  if (definition.mac && !definition.nic) return 'mac: given without a nic';
  return undefined;
}

/** A MAC address for a new VM's NIC: QEMU's prefix and three random bytes. */
export function randomVmMac(random: (bytes: number) => Buffer): string {
  return `52:54:00:${[...random(3)].map((byte) => byte.toString(16).padStart(2, '0')).join(':')}`;
}

/** Where a VM's files are, all chosen by this agent. */
export interface VmFiles {
  memoryPaths: string[];
  qmpSocket: string;
  serialLog: string;
  /** The TAP device backing the VM's NIC on this host (a definition with a nic needs one). */
  tap?: string;
  /** The files of the VM's disks, in the definition's order. */
  diskPaths?: readonly string[];
  /**
   * Disks the VM reaches through its agent's NBD exports instead of their files (a
   * destination in post-copy of disks): disk i is the export diskRegionName(i) on `socket`.
   */
  diskExports?: { socket: string; disks: readonly number[] };
}

/**
 * A path this agent chose, as QEMU will read it inside an option string. QEMU splits some of
 * those at ',' (and escapes by doubling) and not others (-serial file:...), so a path with a
 * comma is refused rather than escaped one way or the other.
 */
function qemuPath(path: string, what: string): string {
  if (!isAbsolute(path) || /[,\n\0]/.test(path)) throw new RangeError(`${what} ${JSON.stringify(path)} must be an absolute path without ',' (QEMU reads it inside an option list)`);
  return path;
}

/**
 * The argument vector for qemu-system-x86_64. `incoming`: a destination's QEMU, started
 * ahead of the switchover, that takes its device state later (migrate-incoming) and runs only
 * on `cont` (-S). `imagesDir` is where kernels are; the kernel is joined to it by name.
 */
export function qemuArgs(name: string, definition: VmDefinition, regionBytes: readonly number[], files: VmFiles, imagesDir: string, incoming: boolean): string[] {
  const problem = vmRegionsProblem(regionBytes);
  if (problem) throw new RangeError(problem);
  if (regionBytes.length !== files.memoryPaths.length) throw new RangeError(`${regionBytes.length} regions, ${files.memoryPaths.length} memory files`);
  // Everything is checked again here: this function is the last step before exec.
  if (!GUEST_NAME_PATTERN.test(name)) throw new RangeError(`guest name ${JSON.stringify(name)} is not allowed`);
  const vm = VmDefinitionSchema.parse(definition);
  const total = regionBytes.reduce((sum, size) => sum + size, 0);
  const args = ['-name', `guest=${name}`, '-accel', vm.accel, '-nodefaults', '-no-user-config', '-display', 'none', '-smp', String(vm.cpus), '-m', `${total / 2 ** 20}M`];
  regionBytes.forEach((bytes, i) => {
    args.push('-object', `memory-backend-file,id=mem${i},size=${bytes / 2 ** 20}M,mem-path=${qemuPath(files.memoryPaths[i]!, 'memory file')},share=on`);
  });
  if (regionBytes.length === 1) args.push('-machine', `${vm.machine},memory-backend=mem0`);
  else {
    args.push('-machine', vm.machine);
    regionBytes.forEach((_, i) => args.push('-numa', `node,nodeid=${i},memdev=mem${i}`));
  }
  args.push(
    '-serial', `file:${qemuPath(files.serialLog, 'serial log')}`,
    '-qmp', `unix:${qemuPath(files.qmpSocket, 'QMP socket')},server=on,wait=off`,
  );
  const bootProblem = vmBootProblem(vm);
  if (bootProblem) throw new RangeError(bootProblem);
  if (vm.kernel !== undefined) args.push('-kernel', qemuPath(join(qemuPath(imagesDir, 'images directory'), vm.kernel), 'kernel'), '-append', vm.append);
  const nicProblem = vmNicProblem(vm);
  if (nicProblem) throw new RangeError(nicProblem);
  if (vm.nic) {
    if (files.tap === undefined || !TAP.test(files.tap)) throw new RangeError(`a VM with a NIC needs a TAP device (got ${JSON.stringify(files.tap)})`);
    args.push('-netdev', `tap,id=net0,ifname=${files.tap},script=no,downscript=no`, '-device', `${vm.nic},netdev=net0,mac=${vm.mac}`);
  }
  const disks = vmDisks(vm);
  const disksProblem = vmDisksProblem(vm);
  if (disksProblem) throw new RangeError(disksProblem);
  if ((files.diskPaths?.length ?? 0) !== disks.length) throw new RangeError(`${disks.length} disks, ${files.diskPaths?.length ?? 0} disk files`);
  disks.forEach((_, i) => {
    const path = qemuPath(files.diskPaths![i]!, 'disk file');
    // Node names are gangway's (vmDiskNodes): the tracker, the NBD export and the clean-up
    // after a crash find the disk by them. No O_DIRECT (cache.direct=off): the agent reads
    // the file through the page cache and must see every write QEMU completed. A discard
    // (guest TRIM) becomes a hole: sparse stays sparse.
    const nodes = vmDiskNodes(i);
    // Through the agent's export: the raw node's file is an NBD client node, switched to the
    // file node (as below) once the disk is complete here.
    const fileNode = files.diskExports?.disks.includes(i)
      ? `driver=nbd,server.type=unix,server.path=${qemuPath(files.diskExports.socket, 'disk export socket')},export=${diskRegionName(i)},node-name=${nodes.export}`
      : `driver=file,filename=${path},node-name=${nodes.file},cache.direct=off,discard=unmap`;
    const fileName = files.diskExports?.disks.includes(i) ? nodes.export : nodes.file;
    args.push(
      '-blockdev', fileNode,
      '-blockdev', `driver=raw,file=${fileName},node-name=${nodes.format},discard=unmap`,
      // Without a kernel the BIOS boots the first disk.
      '-device', `virtio-blk-pci,drive=${nodes.format},id=${nodes.device}${i === 0 && vm.kernel === undefined ? ',bootindex=0' : ''}`,
    );
  });
  if (incoming) args.push('-S', '-incoming', 'defer');
  return args;
}

/**
 * QEMU's names for disk i of a VM: its file node, its raw format node (the device's drive),
 * its device, and the NBD client node that stands for the file node while the disk arrives
 * by post-copy.
 */
export function vmDiskNodes(index: number): { file: string; format: string; device: string; export: string } {
  return { file: `gw-file${index}`, format: `gw-disk${index}`, device: `gw-vd${index}`, export: `gw-nbd${index}` };
}

/** Where the destination agent serves a VM's disks during their post-copy, beside its QMP socket. */
export const vmDiskExportSocket = (qmpSocketPath: string): string => qmpSocketPath.replace(/\.qmp$/, '.disks');

/** Where a VM's QEMU serves NBD to its agent during a disk migration (the source's dirty bitmaps), beside its QMP socket. */
export const vmNbdSocketPath = (qmpSocketPath: string): string => qmpSocketPath.replace(/\.qmp$/, '.nbd');

/** Every socket of a VM beside (and with) its QMP socket: what goes with the VM. */
export function vmSocketPaths(qmpSocketPath: string): string[] {
  const state = vmStateSockets(qmpSocketPath);
  return [qmpSocketPath, state.in, state.out, vmNbdSocketPath(qmpSocketPath), vmDiskExportSocket(qmpSocketPath)];
}

/** The longest path a unix socket may have (sun_path holds 108 bytes with its NUL). */
export const MAX_SOCKET_PATH_BYTES = 107;

/**
 * The sockets a VM's device state goes through, next to its QMP socket: `out` where this
 * agent listens while the VM saves its state (a source), `in` where the VM listens for the
 * state it loads (a destination).
 */
export function vmStateSockets(qmpSocketPath: string): { out: string; in: string } {
  const base = qmpSocketPath.replace(/\.qmp$/, '');
  return { out: `${base}.state-out`, in: `${base}.state-in` };
}

/** Why a VM's sockets cannot live at this QMP socket path, or undefined. */
export function vmSocketPathProblem(qmpSocketPath: string): string | undefined {
  const longest = vmStateSockets(qmpSocketPath).out;
  if (Buffer.byteLength(longest) > MAX_SOCKET_PATH_BYTES) {
    return `the VM's sockets (${longest}) would be longer than the ${MAX_SOCKET_PATH_BYTES} bytes a unix socket path may have: choose a shorter state directory`;
  }
  return undefined;
}

/** What `--accel` may say: an accelerator, or auto (KVM where /dev/kvm can be used, else TCG). */
export type AccelChoice = VmDefinition['accel'] | 'auto';

/** Can this process use KVM (is /dev/kvm there and open to it)? The reason when not. */
export function kvmProblem(open: (path: string) => void): string | undefined {
  try {
    open('/dev/kvm');
    return undefined;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? 'this host has no /dev/kvm' : `/dev/kvm cannot be opened (${code ?? (err as Error).message})`;
  }
}
