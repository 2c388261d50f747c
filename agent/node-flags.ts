// How node runs gangway: every command, and the agent daemon.

/**
 * Node flags of every run of main.js, the CLI's commands included (its shebang carries them):
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
export const NODE_FLAGS = ['--single-threaded-gc', '--no-flush-bytecode'];

/**
 * The agent daemon's flags (a spawned local agent, the shipped unit and install-unit's):
 * NODE_FLAGS and --no-lazy. V8 compiles a function when it is first called; the first
 * switchover of an agent called most of its code for the first time inside the guest's
 * downtime. Compiled at load instead: the first 1 GiB post-copy switchover of a fresh agent
 * pair took 4.7-7.2 ms against 8.2-16.7 ms (6 runs each, alternated), for about 50 ms more
 * at start and 7 MiB more resident. Not on the shebang: every CLI command would pay for it
 * (`gangway --version` 700 -> 780-840 ms), and an agent run straight from a shell does
 * without it.
 */
export const AGENT_NODE_FLAGS = [...NODE_FLAGS, '--no-lazy'];
