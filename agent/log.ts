// Structured logs: one JSON line per event on stdout, the level by name ("warn", not 40) so
// that a reader needs no table. Under systemd, when stdout is the journal, each line starts
// with its syslog priority (<4> for warn), which journald strips and keeps as the entry's
// PRIORITY: `journalctl -u gangway -p warning` then shows warnings and worse.
import { fstatSync } from 'node:fs';
import { pino, type DestinationStream, type Level, type Logger } from 'pino';

export type { Logger };

/** syslog priorities (sd-daemon.h SD_ERR ... SD_DEBUG) of pino's levels. */
const PRIORITY_OF: Record<Level, number> = { fatal: 2, error: 3, warn: 4, info: 6, debug: 7, trace: 7 };

/**
 * Is `fd` the journal's stream? sd-daemon's rule: JOURNAL_STREAM holds "DEVICE:INODE" of the
 * stream systemd connected, and only a descriptor with that device and inode is it (the
 * variable is inherited by children whose stdout went elsewhere, e.g. a pipe or a file).
 */
export function isJournalStream(fd: number, env: NodeJS.ProcessEnv = process.env): boolean {
  const match = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!match) return false;
  try {
    // bigint: an inode may be above 2^53.
    const stat = fstatSync(fd, { bigint: true });
    return stat.dev === BigInt(match[1]!) && stat.ino === BigInt(match[2]!);
  } catch {
    return false;
  }
}

/** stdout, each line prefixed with its level's syslog priority (one stream per level, each line to the highest that takes it). */
function journalDestination(): DestinationStream {
  const stdout = pino.destination({ dest: 1, sync: true });
  const levels: Level[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'];
  return pino.multistream(
    levels.map((level) => ({ level, stream: { write: (line: string) => stdout.write(`<${PRIORITY_OF[level]}>${line}`) } })),
    { dedupe: true },
  );
}

export function createLogger(level: string, name = 'gangway'): Logger {
  const options = {
    name,
    level,
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label: string) => ({ level: label }) },
  };
  return isJournalStream(1) ? pino(options, journalDestination()) : pino(options);
}
