// Who can reach the control socket: the state dir is 0750 and owned by the agent's user, the
// socket is 0660 and owned by that user and the control group. The socket is bound under a
// umask that leaves it 0600, so there is no moment when it is open to more than that.
import { chmodSync, chownSync, mkdirSync, statSync } from 'node:fs';
import type { Server } from 'node:net';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { ControlGroup } from './group.js';

/** What the state dir may allow at most: the agent's user everything, the control group to read and search. */
const STATE_DIR_MODE = 0o750;
const SOCKET_MODE = 0o660;
/** sockaddr_un.sun_path holds 108 bytes, the terminating NUL included. */
const MAX_SOCKET_PATH_BYTES = 107;

export interface StateDirChange {
  modeBefore?: number;
  gidBefore?: number;
}

/**
 * Creates the state dir (0750) or tightens an existing one: nothing for others, no group
 * write; with a control group, that group owns it and may search it (to reach the socket).
 * Refuses a dir another non-root user owns: that user could swap the socket for their own.
 */
export function secureStateDir(dir: string, group: ControlGroup | undefined): StateDirChange {
  mkdirSync(dir, { recursive: true, mode: STATE_DIR_MODE });
  const stat = statSync(dir);
  if (!stat.isDirectory()) throw new GangwayError(ErrorCode.BAD_REQUEST, `state dir ${dir} is not a directory`);
  const uid = process.getuid?.() ?? 0;
  if (stat.uid !== uid && stat.uid !== 0) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `state dir ${dir} belongs to uid ${stat.uid}, not to this agent (uid ${uid}): that user could replace the control socket; use a dir of this user's`);
  }
  const change: StateDirChange = {};
  const mode = stat.mode & 0o777;
  const wanted = (mode & STATE_DIR_MODE) | 0o700 | (group ? 0o010 : 0);
  if (mode !== wanted) {
    chmodSync(dir, wanted);
    change.modeBefore = mode;
  }
  if (group && stat.gid !== group.gid) {
    chownTo(dir, stat.uid, group, 'the state dir');
    change.gidBefore = stat.gid;
  }
  return change;
}

function chownTo(path: string, uid: number, group: ControlGroup, what: string): void {
  try {
    chownSync(path, uid, group.gid);
  } catch (err) {
    const name = group.name ? `${group.name} (gid ${group.gid})` : `gid ${group.gid}`;
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      `cannot give ${what} ${path} to control.group ${name}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message} (the agent must run as root or be a member of the group)`,
    );
  }
}

export function checkSocketPath(socketPath: string): void {
  if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH_BYTES) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `control socket path ${socketPath} is over ${MAX_SOCKET_PATH_BYTES} bytes (a unix socket limit): use a shorter state dir`);
  }
}

/** Binds `server` on `socketPath` 0600, then hands it to the control group and opens it to 0660. */
export function listenUnixSocket(server: Server, socketPath: string, group: ControlGroup | undefined): Promise<void> {
  checkSocketPath(socketPath);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    // bind(2) happens inside listen(), synchronously, so the umask covers exactly that call.
    const umask = process.umask(0o177);
    try {
      server.listen(socketPath, () => {
        server.off('error', reject);
        try {
          if (group) chownTo(socketPath, process.getuid?.() ?? 0, group, 'the control socket');
          chmodSync(socketPath, SOCKET_MODE);
          resolve();
        } catch (err) {
          server.close();
          reject(err);
        }
      });
    } finally {
      process.umask(umask);
    }
  });
}
