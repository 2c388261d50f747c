// What every client command of the CLI shares: reaching the agent (its state dir's socket, or
// the loopback control port with a token), parsing option values with a reason, failing with
// the error's code (and as JSON with --json).
import { InvalidArgumentError, Option, type Command } from 'commander';
import { resolve } from 'node:path';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { CONFIG_DEFAULTS, INTERFACE_NAME_PATTERN } from '../config.js';
import { ControlClient } from '../control/client.js';
import { QuantityError } from '../units.js';

export const DEFAULT_STATE_DIR = CONFIG_DEFAULTS.stateDir;

/** Wraps a parser so commander reports "option '--x <v>' argument 'v' is invalid. <why>". */
export function arg<T>(parse: (text: string) => T): (text: string) => T {
  return (text) => {
    try {
      return parse(text);
    } catch (err) {
      throw new InvalidArgumentError(err instanceof Error ? err.message : String(err));
    }
  };
}

export const number = (what: string, min: number, max: number, integer = false) =>
  arg((text) => {
    const value = Number(text);
    if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
      throw new QuantityError(`${what} must be ${integer ? 'an integer' : 'a number'} from ${min} to ${max}`);
    }
    return value;
  });

export const stateDirOption = () =>
  new Option('--state-dir <dir>', 'the agent state directory (its control socket lives there)')
    .env('GANGWAY_STATE_DIR')
    .default(DEFAULT_STATE_DIR);

/** How a client command reaches the agent: the state dir's socket, or --control with a token. */
export function withControlOptions(command: Command): Command {
  return command
    .addOption(stateDirOption())
    .addOption(new Option('--control <host:port>', "the agent's loopback control port (control.listen) instead of the socket").env('GANGWAY_CONTROL'))
    .addOption(new Option('--token-file <file>', 'with --control: the token file').env('GANGWAY_TOKEN_FILE').default(undefined, 'STATE_DIR/control.token'));
}

export function clientFor(opts: { stateDir: string; control?: string; tokenFile?: string }): ControlClient {
  if (opts.control === undefined || opts.control === '') {
    if (opts.tokenFile) throw new GangwayError(ErrorCode.BAD_REQUEST, '--token-file is for --control HOST:PORT (the unix socket takes no token)');
    return new ControlClient(resolve(opts.stateDir));
  }
  return ControlClient.tcp(opts.control, resolve(opts.tokenFile || `${resolve(opts.stateDir)}/control.token`));
}

export function fail(err: unknown, json: boolean): never {
  const code = err instanceof GangwayError ? err.code : ErrorCode.INTERNAL;
  const message = err instanceof Error ? err.message : String(err);
  if (json) process.stdout.write(`${JSON.stringify({ error: { code, message } })}\n`);
  process.stderr.write(`gangway: ${message} [${code}]\n`);
  process.exit(1);
}

/** --tap: an interface name (the guest's TAP device). */
export const tapDevice = arg((text) => {
  if (!INTERFACE_NAME_PATTERN.test(text)) throw new QuantityError(`"${text}" is not an interface name: use 1 to 15 letters, digits, '_', '.' or '-'`);
  return text;
});
