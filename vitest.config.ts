import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Integration tests start real agents and guests; two cores do not take more.
    fileParallelism: false,
    reporters: ['default'],
  },
});
