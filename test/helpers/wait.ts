import { setTimeout as sleep } from 'node:timers/promises';

/** Polls `probe` every 5 ms until it returns a value (not undefined or false). */
export async function waitFor<T>(what: string, probe: () => T | undefined | false, timeoutMs = 10_000): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = probe();
    // An async probe's promise is never undefined: it would pass at once, checking nothing.
    if (value instanceof Promise) throw new Error(`waitFor(${what}): the probe returned a promise; use waitForAsync`);
    if (value !== undefined && value !== false) return value;
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** As waitFor, for a probe that has to await (an agent's status): polls every 20 ms. */
export async function waitForAsync<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value;
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
