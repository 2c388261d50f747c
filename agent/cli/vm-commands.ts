// `gangway vm ...`: QEMU VMs on the local agent. A VM is a guest like any other once started:
// `gangway migrate`, `status`, `guest stop` and `guest resume` take it by name.
import { Option, type Command } from 'commander';
import { MAX_APPEND_LENGTH, MAX_VM_CPUS, vmRegionsProblem, VM_ACCELS, VM_MACHINES, VM_NICS } from '../guest/vm-spec.js';
import { parseBytesList, QuantityError } from '../units.js';
import { arg, clientFor, fail, number, tapDevice, withControlOptions } from './common.js';

export function addVmCommands(program: Command): void {
  const vm = program.command('vm').description('QEMU VMs on the local agent (their RAM moves through the agents, their device state through QEMU)');
  withControlOptions(vm.command('start <name>'))
    .description('start a QEMU VM whose RAM the agent can track and move (memory-backend files in the memory dir)')
    .addOption(
      new Option('--memory <sizes>', 'RAM, whole MiB, e.g. 512MiB; several regions (NUMA nodes, a memory file each) as 256MiB,256MiB')
        .argParser(
          arg((text) => {
            const sizes = parseBytesList(text, '--memory');
            const problem = vmRegionsProblem(sizes);
            if (problem) throw new QuantityError(`--memory "${text}": ${problem}`);
            return sizes;
          }),
        )
        .default([512 * 1024 * 1024], '512MiB'),
    )
    .option('--kernel <file>', "a multiboot or Linux kernel: its file name in the agent's images directory (without it the VM boots from its first --disk)")
    .option('--append <text>', `the kernel's command line (letters, digits, spaces and . _ : = + / -; at most ${MAX_APPEND_LENGTH})`, '')
    .option('--cpus <n>', 'virtual CPUs', number('--cpus', 1, MAX_VM_CPUS, true), 1)
    .addOption(new Option('--accel <accel>', 'tcg (emulation, everywhere), kvm (needs a usable /dev/kvm), auto (kvm where /dev/kvm opens, else tcg; the answer says which)').choices([...VM_ACCELS, 'auto']).default('auto'))
    .addOption(new Option('--machine <type>', 'QEMU machine type').choices([...VM_MACHINES]).default('q35'))
    .addOption(new Option('--nic <model>', 'the NIC on --tap (a destination backs it with a TAP device of its own, on vm.bridge)').choices([...VM_NICS]))
    .option('--disk <file>', "a raw disk (virtio-blk): a file of the agent's disks directory (vm.disksDir), by name or path; repeat for more (at most 4)", (value: string, previous: string[] = []) => [...previous, value])
    .option('--tap <device>', "the TAP device behind the VM's NIC (a virtio-net-pci unless --nic says otherwise), where its traffic is measured", tapDevice)
    .option('--json', 'print JSON')
    .action(async (name: string, opts) => {
      try {
        if (opts.kernel === undefined && !opts.disk) {
          throw new QuantityError("a VM boots a kernel or a disk: pass --kernel FILE (a file of the agent's images directory), or --disk FILE with a boot sector");
        }
        if (opts.kernel?.includes('/')) {
          throw new QuantityError(`--kernel "${opts.kernel}": give the kernel's file name in the agent's images directory (vm.imagesDir), not a path; copy the kernel there first`);
        }
        const result = await clientFor(opts).call<{ name: string; pid: number; accel: string; accelNote?: string; memoryPaths: string[]; diskPaths?: string[]; qmpSocket: string; console: string }>('POST', '/v1/vms', {
          name,
          definition: { machine: opts.machine, cpus: opts.cpus, accel: opts.accel, ...(opts.kernel !== undefined ? { kernel: opts.kernel } : {}), append: opts.append, ...(opts.nic ? { nic: opts.nic } : {}) },
          regionBytes: opts.memory,
          ...(opts.disk ? { disks: opts.disk } : {}),
          ...(opts.tap ? { tap: opts.tap } : {}),
        });
        if (opts.json) console.log(JSON.stringify(result));
        else {
          console.log(`VM ${result.name} running (QEMU pid ${result.pid}, accel ${result.accelNote ?? result.accel})`);
          console.log(`  memory  ${result.memoryPaths.join(', ')}`);
          if (result.diskPaths) console.log(`  disks   ${result.diskPaths.join(', ')}`);
          console.log(`  console ${result.console}`);
        }
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });
}
