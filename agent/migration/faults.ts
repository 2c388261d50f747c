// Fault injection for tests that must hit a point no timing can (GANGWAY_FAULT_* variables).
import type { Logger } from 'pino';

/**
 * Fault injection for restart tests (GANGWAY_FAULT_CRASH=point): the agent dies here as
 * with kill -9, at a point a test could not hit by timing.
 */
export function faultCrash(point: string, log: Logger): void {
  if (process.env.GANGWAY_FAULT_CRASH !== point) return;
  log.error({ point }, 'fault injection: the agent dies here (GANGWAY_FAULT_CRASH)');
  process.kill(process.pid, 'SIGKILL');
}
