// The last lines of a guest's log (its stderr, QEMU's messages), for an error message.
import { readFileSync } from 'node:fs';

/** The last `lines` lines of the file at `path`, joined with ' | '; empty when there is none. */
export function logTail(path: string, lines = 3): string {
  try {
    return readFileSync(path, 'utf8').trim().split('\n').slice(-lines).join(' | ');
  } catch {
    return '';
  }
}
