// Help that teaches: examples under every command's --help, and every default shown one way,
// "(default: 512MiB)", in the units a person types. applyHelp runs once over the finished
// command tree, so a command added anywhere gets the same treatment; test/integration/cli-help
// fails for a command without examples here, or with a default shown as raw bytes.
import type { Command, Help } from 'commander';
import { allCommands, commandPath, optionHelpText } from './command-tree.js';

/** By command path (the words after `gangway`); a line's comment says what it does. */
export const EXAMPLES: Record<string, readonly string[]> = {
  '': [
    'gangway agent --config /etc/gangway/agent.yaml         # the agent, one per host',
    'gangway guest start vm1 --memory 512MiB --dirty-rate 40MiB/s',
    'gangway migrate vm1 --to 10.0.0.2:7401                 # live, pre-copy',
    'gangway status',
    'gangway help migrate                                   # a command\'s options and examples',
  ],
  agent: [
    'gangway agent --config /etc/gangway/agent.yaml',
    'gangway agent --config /etc/gangway/agent.yaml --check-config   # print the merged settings, run nothing',
    'gangway agent --listen 127.0.0.1:7401 --insecure-plaintext-loopback --state-dir /tmp/gw-a',
    'gangway agent --config FILE --control-group gangway --metrics-listen 127.0.0.1:9401',
    'gangway agent --config FILE --uplink eth0 --link-capacity 10Gbit/s   # measure and shape the uplink',
  ],
  guest: ['gangway guest start vm1 --memory 512MiB --dirty-rate 40MiB/s', 'gangway guest stop vm1', 'gangway guest resume vm1'],
  'guest start': [
    'gangway guest start vm1 --memory 512MiB --dirty-rate 40MiB/s --profile os-image',
    'gangway guest start vm2 --memory 256MiB,256MiB             # two memory regions, a file each',
    'gangway guest start vm3 --memory 1GiB --image-seed 7 --shared 0.6   # 60% of its pages from image 7',
    'gangway guest start idle1 --memory 64MiB --profile zero    # idle: --dirty-rate defaults to 0',
  ],
  'guest stop': ['gangway guest stop vm1', 'gangway guest stop vm1 --json'],
  'guest resume': ['gangway guest resume vm1            # e.g. after a switchover left in doubt'],
  vm: ['gangway vm start vm1 --memory 512MiB --kernel gangway-testvm.elf', 'gangway vm start --help'],
  'vm start': [
    'gangway vm start vm1 --memory 512MiB --kernel gangway-testvm.elf',
    'gangway vm start web1 --memory 1GiB --kernel vmlinuz --append "console=ttyS0" --tap tap-web1',
    'gangway vm start vm2 --memory 256MiB,256MiB --cpus 2 --accel auto \\',
    '    --kernel gangway-testvm.elf --append "gw.profile=os-image gw.rate=4096"',
    'gangway vm start db1 --memory 1GiB --kernel vmlinuz --disk db1.raw   # a raw file of vm.disksDir',
    'gangway vm start os1 --memory 1GiB --disk os1.raw  # no --kernel: boots from its first disk',
    'gangway migrate vm1 vm2 --to 10.0.0.2:7401        # a gang, dedup across the VMs',
    'gangway migrate db1 --to 10.0.0.2:7401            # its disk moves too (--disks none: shared storage)',
    'gangway guest stop vm1                             # quits QEMU, deletes the VM\'s memory',
    '',
    'The kernel is a file name of the agent\'s images directory (vm.imagesDir, --vm-images-dir),',
    'never a path: a destination agent boots the same name from its own directory. Without',
    '--kernel the BIOS boots the first disk\'s boot sector.',
  ],
  migrate: [
    'gangway migrate vm1 --to 10.0.0.2:7401',
    'gangway migrate vm1 --to 10.0.0.2:7401 --downtime-ms 100 --bandwidth 1Gbit/s',
    'gangway migrate vm1 vm2 vm3 --to 10.0.0.2:7401              # a gang: one session, dedup across them',
    'gangway migrate vm1 --to 10.0.0.2:7401 --technique postcopy  # moves at once, pages follow',
    'gangway migrate vm1 --to 10.0.0.2:7401 --technique hybrid --postcopy-after-rounds 5',
    'gangway migrate db1 --to 10.0.0.2:7401 --disks none         # shared storage: the disk stays',
    'gangway migrate vm1 --to 10.0.0.2:7401 --detach --json      # prints the ids, returns',
  ],
  plan: ['gangway plan vm1 vm2 --to 10.0.0.2:7401', 'gangway plan vm1 --to 10.0.0.2:7401 --downtime-ms 50   # the options that hold a 50 ms downtime', 'gangway plan vm1 --to 10.0.0.2:7401 --priority high --json'],
  traffic: ['gangway traffic', 'gangway traffic --json'],
  history: ['gangway history                     # ended migrations, both directions, newest first', 'gangway history --json | jq \'.entries[] | select(.outcome != "completed")\''],
  events: ['gangway events                      # one line per event until Ctrl-C', 'gangway events --json > events.ndjson   # NDJSON for scripts'],
  watch: ['gangway migrate vm1 --to 10.0.0.2:7401 --detach', 'gangway watch 3f2a9c1e              # follows it to its end: exit 0 completed, 130 cancelled, 1 failed', 'gangway watch 3f2a --json'],
  drain: [
    'gangway drain --to 10.0.0.2:7401,10.0.0.3:7401 --dry-run   # what would go where, and how',
    'gangway drain --to 10.0.0.2:7401,10.0.0.3:7401             # every guest off this host; Ctrl-C cancels',
    'gangway drain --to 10.0.0.2:7401 --max-parallel 1 --priority low --json',
  ],
  'migrate-set': [
    'gangway migrate-set 3f2a9c1e --bandwidth 2Gbit/s          # from its next batch (virsh migrate-setspeed)',
    'gangway migrate-set 3f2a --downtime-ms 1000               # from its next round (virsh migrate-setmaxdowntime)',
    'gangway migrate-set 3f2a --bandwidth 200MiB/s --downtime-ms 500 --json',
  ],
  postcopy: ['gangway migrate vm1 --to 10.0.0.2:7401 --technique hybrid --detach', 'gangway postcopy 3f2a9c1e            # post-copy at the next round boundary (QEMU migrate-start-postcopy)'],
  cancel: ['gangway cancel 3f2a9c1e            # an id from `gangway status`, or a unique prefix of one'],
  status: ['gangway status', 'gangway status --json', 'gangway status --control 127.0.0.1:7400 --token-file /var/lib/gangway/control.token'],
  certs: ['gangway certs init --dir /etc/gangway/tls', 'gangway certs issue host-a --dir /etc/gangway/tls --san 10.0.0.1'],
  'certs init': ['gangway certs init --dir /etc/gangway/tls', 'gangway certs init --dir ./tls --days 365 --json'],
  'certs issue': [
    'gangway certs issue host-a --dir /etc/gangway/tls --san 10.0.0.1',
    'gangway certs issue host-b --dir /etc/gangway/tls --san 10.0.0.2 --san host-b.example --days 90',
  ],
  demo: ['gangway demo', 'gangway demo --technique postcopy       # needs root', 'gangway demo --vm --json                 # a QEMU VM (qemu-system-x86)'],
  completion: [
    'gangway completion bash > /etc/bash_completion.d/gangway',
    'source <(gangway completion bash)          # this shell only',
    'gangway completion zsh > "${fpath[1]}/_gangway"',
  ],
  man: ['gangway man | man -l -', 'gangway man > /usr/local/share/man/man1/gangway.1', 'gangway man --json    # the commands and options as JSON'],
  'install-unit': [
    'gangway install-unit --dry-run          # print the unit and where it would go',
    'gangway install-unit                    # /etc/systemd/system/gangway-agent.service (+ /etc/gangway/agent.yaml)',
    'gangway install-unit --root /tmp/image  # into a directory tree (an image being built)',
  ],
};

/** The text under a command's help, or undefined for a command without examples. */
export function examplesText(path: string): string | undefined {
  const lines = EXAMPLES[path];
  if (lines === undefined) return undefined;
  return `\nExamples:\n${lines.map((line) => (line === '' ? '' : `  ${line}`)).join('\n')}`;
}

/** Examples and the default style on every command of the tree; call once, before parse. */
export function applyHelp(program: Command): void {
  for (const command of allCommands(program)) {
    command.configureHelp({ optionDescription: optionHelpText } satisfies Partial<Help>);
    const examples = examplesText(commandPath(command));
    if (examples !== undefined) command.addHelpText('after', examples);
  }
}
