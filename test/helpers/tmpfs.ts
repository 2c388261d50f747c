// A small tmpfs of a test's own (root), for a memory directory that fills up. Unmounting
// retries while the mount is busy: a guest process killed with SIGKILL lets go of its memory
// file only once it has exited, and a umount that raced it left the mount behind (seen once
// in CI, EBUSY). After 10 s it detaches lazily, so that the mount goes with its last user.
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { makeTempDir } from '../../agent/local-agent.js';

/** Mounts a tmpfs of `sizeMiB` on a fresh directory; returns it and its removal (unmount, then the directory). */
export async function mountTmpfs(sizeMiB: number): Promise<{ path: string; remove: () => Promise<void> }> {
  const path = makeTempDir('gangway-tmpfs-');
  try {
    await execa('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0700`, 'gangway-test', path]);
  } catch (err) {
    rmSync(path, { recursive: true, force: true });
    throw err;
  }
  const remove = async () => {
    const deadline = performance.now() + 10_000;
    while ((await execa('umount', [path], { reject: false })).exitCode !== 0) {
      if (performance.now() > deadline) {
        await execa('umount', ['-l', path], { reject: false });
        break;
      }
      await sleep(100);
    }
    rmSync(path, { recursive: true, force: true });
  };
  return { path, remove };
}
