// How node runs an agent.

/**
 * Node flags an agent runs with (main.ts's shebang, the shipped unit and install-unit carry
 * the same):
 * - --single-threaded-gc: V8's concurrent GC threads compete with the page stream for a
 *   host's few cores; on the 2-core machines here, garbage collection on the main thread
 *   moved 1.0 GB/s instead of 0.6-0.9 GB/s.
 * - --no-flush-bytecode: V8 drops the bytecode of a function that has not run for 5 full
 *   collections, and a migration's page stream makes many (2,024 functions dropped between
 *   two migrations, the switchover's own among them). The switchover's code runs once per
 *   migration, so each one compiled it again inside the guest's downtime. 1 GiB post-copy,
 *   alternated twice (bench:downtime --technique postcopy --rates 0,800 --repeat 3): the
 *   first run after the warm-up 10.2 and 7.5 ms with flushing, 4.2 and 5.1 without; the
 *   worst of 12 runs 10.2 against 6.9. What is kept is the agent's own code, once.
 */
export const AGENT_NODE_FLAGS = ['--single-threaded-gc', '--no-flush-bytecode'];
