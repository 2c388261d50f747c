// Undo steps a test registers as it builds things up (links, agents, mounts): after each test,
// newest first, every one run even when an earlier one fails (a failed test's state is
// unknown, and the next test must start clean).
import { afterEach } from 'vitest';

export type Cleanup = () => Promise<unknown> | unknown;

/** The list to push a test's undo steps on; call it inside a describe. */
export function cleanupsAfterEach(): Cleanup[] {
  const cleanups: Cleanup[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) {
      try {
        await cleanup();
      } catch {}
    }
  });
  return cleanups;
}
