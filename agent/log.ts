// Structured logs: one JSON line per event on stdout (journald takes them as they are).
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string, name = 'gangway'): Logger {
  return pino({ name, level, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime });
}
