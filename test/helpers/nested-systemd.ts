// A real systemd, as PID 1 of PID, mount and cgroup namespaces of the test's own, for tests
// of what gangway does under systemd on a host whose PID 1 is not systemd (CI machines).
//
// It is kept from touching the host: /run is its own tmpfs, its cgroups are a subtree the
// test creates (and removes), it starts one target that pulls in nothing, and the units
// that would act on the shared file system (tmpfiles wipes /tmp at boot, sysusers, sysctl,
// utmp, journald's files) are masked. Units the test starts say DefaultDependencies=no.
// stop() SIGKILLs its PID 1, which takes every process of the namespace with it.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';

const SYSTEMD = '/lib/systemd/systemd';
const MASKED = [
  'sysinit.target',
  'systemd-tmpfiles-setup.service',
  'systemd-tmpfiles-setup-dev.service',
  'systemd-tmpfiles-clean.timer',
  'systemd-sysusers.service',
  'systemd-sysctl.service',
  'systemd-update-utmp.service',
  'systemd-journald.service',
  'systemd-journald.socket',
  'systemd-journald-dev-log.socket',
  'systemd-journald-audit.socket',
  'systemd-journal-flush.service',
  'systemd-remount-fs.service',
  'systemd-modules-load.service',
  'systemd-random-seed.service',
  'systemd-udevd.service',
  'systemd-udev-trigger.service',
  'systemd-logind.service',
];

/** The cgroup hierarchies systemd uses here, as host paths: the v1 name=systemd one and v2's. */
function hierarchies(): { v1: string | undefined; v2: string } | undefined {
  if (existsSync('/sys/fs/cgroup/cgroup.controllers')) return { v1: undefined, v2: '/sys/fs/cgroup' };
  if (existsSync('/sys/fs/cgroup/systemd/cgroup.procs') && existsSync('/sys/fs/cgroup/unified/cgroup.procs')) {
    return { v1: '/sys/fs/cgroup/systemd', v2: '/sys/fs/cgroup/unified' };
  }
  return undefined;
}

/** Why a nested systemd cannot run here, or undefined when it can. */
export function nestedSystemdProblem(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (namespaces, cgroups)';
  if (!existsSync(SYSTEMD)) return `needs systemd (${SYSTEMD}; Debian package systemd)`;
  for (const tool of ['/usr/bin/unshare', '/usr/bin/nsenter', '/usr/bin/systemd-run', '/usr/bin/systemctl']) {
    if (!existsSync(tool)) return `needs ${tool}`;
  }
  if (!hierarchies()) return 'needs cgroup2, or the hybrid layout (name=systemd and unified)';
  return undefined;
}

export interface NestedSystemd {
  /** Its PID 1, as the host sees it. */
  pid: number;
  /** Runs a command inside its namespaces (systemctl, systemd-run, cat /proc/PID/...). */
  run(args: string[], timeoutMs?: number): Promise<{ exitCode: number | undefined; stdout: string; stderr: string }>;
  /** The cgroup directory (host path, v2 or name=systemd) of a unit or slice path under its root. */
  cgroupDir(relative: string): string;
  stop(): Promise<void>;
}

export async function startNestedSystemd(dir: string): Promise<NestedSystemd> {
  const layout = hierarchies()!;
  const group = `gangway-test-systemd-${process.pid}-${Date.now().toString(36)}`;
  const roots = [layout.v1, layout.v2].filter((root): root is string => root !== undefined).map((root) => join(root, group));
  for (const root of roots) mkdirSync(root);
  const inner = join(dir, 'nested-systemd.sh');
  const mountCgroups = layout.v1
    ? 'mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\nmkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified\nmount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd\nmount -t cgroup2 cgroup2 /sys/fs/cgroup/unified'
    : 'mount -t cgroup2 cgroup2 /sys/fs/cgroup';
  writeFileSync(
    inner,
    `set -e
mount -t tmpfs -o mode=755 tmpfs /run
${mountCgroups}
mkdir -p /run/systemd/system
printf '[Unit]\\nDescription=gangway test\\nDefaultDependencies=no\\n' > /run/systemd/system/gangway-test.target
for unit in ${MASKED.join(' ')}; do ln -s /dev/null /run/systemd/system/$unit; done
exec env container=gangway-test ${SYSTEMD} --system --unit=gangway-test.target --log-target=console --log-level=warning
`,
    { mode: 0o700 },
  );
  // The outer shell moves itself into the subtree, so that the cgroup namespace's root is it.
  const enter = roots.map((root) => `echo $$ > ${root}/cgroup.procs`).join('; ');
  const outer: ChildProcess = spawn('/bin/sh', ['-c', `${enter}; exec unshare --pid --fork --mount --mount-proc --cgroup --propagation private /bin/sh ${inner}`], {
    stdio: ['ignore', 'ignore', 'ignore'],
    detached: true,
  });
  const cleanupCgroups = async () => {
    for (const root of roots) await removeCgroupTree(root);
  };
  let pid: number | undefined;
  const stop = async () => {
    const victims = [pid, outer.pid].filter((p): p is number => p !== undefined);
    for (const victim of victims) {
      try {
        process.kill(victim, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    await cleanupCgroups();
  };
  try {
    const deadline = Date.now() + 20_000;
    // unshare's child (PID 1 inside) is systemd once it has exec'd.
    while (pid === undefined) {
      if (Date.now() > deadline) throw new Error('the nested systemd did not start within 20 s');
      if (outer.exitCode !== null) throw new Error(`unshare exited with code ${outer.exitCode}`);
      const children = readFileSync(`/proc/${outer.pid}/task/${outer.pid}/children`, 'utf8').trim();
      const child = Number(children.split(' ')[0]);
      if (child > 0 && readFileSync(`/proc/${child}/comm`, 'utf8').trim() === 'systemd') pid = child;
      else await sleep(50);
    }
    const nested: NestedSystemd = {
      pid,
      async run(args, timeoutMs = 30_000) {
        const result = await execa('nsenter', ['-t', String(pid), '-m', '-p', ...args], { reject: false, timeout: timeoutMs });
        return { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr };
      },
      cgroupDir: (relative) => join(roots[0]!, relative),
      stop,
    };
    for (;;) {
      const state = await nested.run(['systemctl', 'is-system-running']);
      if (/^(running|degraded)$/m.test(state.stdout)) break;
      if (Date.now() > deadline) throw new Error(`the nested systemd is not up within 20 s: ${state.stdout} ${state.stderr}`);
      await sleep(100);
    }
    return nested;
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Removes a cgroup directory and its children once their processes are gone (bounded). */
async function removeCgroupTree(root: string): Promise<void> {
  if (!existsSync(root)) return;
  const deadline = Date.now() + 10_000;
  const dirs: string[] = [];
  const walk = (path: string) => {
    for (const entry of readdirSync(path)) {
      const child = join(path, entry);
      if (statSync(child, { throwIfNoEntry: false })?.isDirectory()) walk(child);
    }
    dirs.push(path);
  };
  walk(root);
  for (const path of dirs) {
    for (;;) {
      try {
        rmdirSync(path);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') break;
        // EBUSY while its processes are still exiting.
        if (Date.now() > deadline) throw new Error(`cgroup ${path} still busy after 10 s: ${(err as Error).message}`);
        await sleep(50);
      }
    }
  }
}
