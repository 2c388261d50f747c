// Running the system tools the traffic adapters drive (iptables, tc), optionally inside a
// network namespace. A failure is an adapter error that names the whole command line, its
// exit code and stderr, so "`tc class change dev mig0 ...` failed with exit code 2: RTNETLINK
// answers: No such file or directory" reaches the log instead of a bare "exit code 2".
import { execa } from 'execa';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';

/** Runs `cmd args...` (behind the runner's prefix) and resolves to its stdout. */
export type Runner = (cmd: string, args: string[]) => Promise<string>;

/** A command a traffic adapter ran failed: `command`, `exitCode` and `stderr` say what went wrong. */
export class CommandError extends GangwayError {
  constructor(
    readonly command: readonly string[],
    /** undefined when the command did not exit by itself (not found, timed out, killed). */
    readonly exitCode: number | undefined,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(
      ErrorCode.HOST_COMMAND,
      `\`${command.join(' ')}\` failed${exitCode === undefined ? '' : ` with exit code ${exitCode}`}: ${stderr.trim() || 'no output on stderr'}`,
      options,
    );
    this.name = 'CommandError';
  }
}

/** iptables and tc answer in milliseconds; one that hangs (a held xtables lock) must not hang the agent. */
const COMMAND_TIMEOUT_MS = 10_000;

/** A runner for `[...prefix, cmd, ...args]`; prefix e.g. `['ip', 'netns', 'exec', NS]`. */
export function runner(prefix: string[] = []): Runner {
  return async (cmd, args) => {
    const command = [...prefix, cmd, ...args];
    const result = await execa(command[0]!, command.slice(1), { reject: false, timeout: COMMAND_TIMEOUT_MS, stdin: 'ignore' });
    if (result.failed) {
      throw new CommandError(command, result.exitCode, result.stderr || (result.shortMessage ?? ''), { cause: result.cause });
    }
    return result.stdout;
  };
}
