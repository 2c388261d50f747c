// `gangway install-unit`: the shipped systemd unit, with its ExecStart pointing at the
// installation this command runs from (this node binary, this main.js, symlinks resolved:
// `npm install -g .` links the package rather than copying it), and the documented config
// file where the unit reads it unless one is there already.
import type { Command } from 'commander';
import { chmodSync, existsSync, mkdirSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { AGENT_NODE_FLAGS } from '../node-flags.js';
import { fail } from './common.js';

export const UNIT_PATH = '/etc/systemd/system/gangway-agent.service';
export const CONFIG_PATH = '/etc/gangway/agent.yaml';

/** The unit's hardening hides these from the agent (ProtectHome=yes, PrivateTmp=yes). */
const HIDDEN_FROM_UNIT = ['/home/', '/root/', '/run/user/', '/tmp/', '/var/tmp/'];

/** The shipped unit and config: agent/systemd/ of the package, above dist/agent/cli/ or agent/cli/. */
function shippedFile(name: string): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const candidates = [resolve(here, '..', '..', '..', 'agent', 'systemd', name), resolve(here, '..', 'systemd', name)];
  const found = candidates.find((path) => existsSync(path));
  if (found === undefined) throw new GangwayError(ErrorCode.INTERNAL, `this installation has no ${name} (looked at ${candidates.join(', ')}): reinstall gangway`);
  return readFileSync(found, 'utf8');
}

export interface InstallUnitOptions {
  /** Where / is: a directory tree being built into an image, or the host itself. */
  root: string;
  dryRun: boolean;
  force: boolean;
  nodePath?: string;
  mainPath?: string;
}

type Action = 'written' | 'unchanged' | 'kept' | 'would write' | 'would keep';

export interface InstallUnitResult {
  unit: { path: string; action: Action };
  config: { path: string; action: Action };
  execStart: string;
  next: string;
}

/** The ExecStart line for this installation; refused where the unit's sandbox cannot see it. */
export function execStartFor(nodePath: string, mainPath: string): string {
  for (const [what, path] of [['node', nodePath], ['gangway', mainPath]] as const) {
    const hidden = HIDDEN_FROM_UNIT.find((prefix) => `${path}/`.startsWith(prefix));
    if (hidden !== undefined) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `${what} is at ${path}, under ${hidden.slice(0, -1)}, which the unit hides from the agent (ProtectHome=yes, PrivateTmp=yes): ` +
          'install gangway outside it (e.g. a checkout in /opt/gangway, then npm ci && npm install -g .) and run install-unit from there',
      );
    }
    if (/\s/.test(path)) throw new GangwayError(ErrorCode.BAD_REQUEST, `${what} is at "${path}": a path with white space cannot go on ExecStart unquoted; install it elsewhere`);
  }
  return `ExecStart=${nodePath} ${AGENT_NODE_FLAGS.join(' ')} ${mainPath} agent --config ${CONFIG_PATH}`;
}

/** The shipped unit with its ExecStart replaced and its install comment saying by what. */
export function unitText(template: string, execStart: string): string {
  if (!/^ExecStart=/m.test(template)) throw new GangwayError(ErrorCode.INTERNAL, 'the shipped unit has no ExecStart line');
  const body = template.replace(/^ExecStart=.*$/m, execStart).replace(/^(#[^\n]*\n)+/, '');
  return `# gangway host agent under systemd, written by \`gangway install-unit\` for the installation\n# on ExecStart; run it again after moving gangway or node.\n${body}`;
}

function place(path: string, text: string, mode: number, options: InstallUnitOptions, replace: boolean): Action {
  const current = existsSync(path) ? readFileSync(path, 'utf8') : undefined;
  if (current === text) return 'unchanged';
  if (current !== undefined && !replace) return options.dryRun ? 'would keep' : 'kept';
  if (options.dryRun) return 'would write';
  mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
  writeFileSync(path, text, { mode });
  chmodSync(path, mode);
  return 'written';
}

export function installUnit(options: InstallUnitOptions): InstallUnitResult & { unitText: string } {
  const nodePath = options.nodePath ?? realpathSync(process.execPath);
  const mainPath = options.mainPath ?? realpathSync(process.argv[1]!);
  const execStart = execStartFor(nodePath, mainPath);
  const text = unitText(shippedFile('gangway-agent.service'), execStart);
  const unitPath = join(options.root, UNIT_PATH);
  const existing = existsSync(unitPath) ? readFileSync(unitPath, 'utf8') : undefined;
  if (existing !== undefined && existing !== text && !options.force) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `${unitPath} exists and differs from what install-unit writes; --force replaces it (see the difference with --dry-run)`);
  }
  // A unit is world-readable as systemd's own are (it holds no secret); the config is the
  // operator's to edit and is never replaced, and its directory is the agent's and root's.
  const unit = place(unitPath, text, 0o644, options, true);
  const configPath = join(options.root, CONFIG_PATH);
  if (!options.dryRun && !existsSync(dirname(configPath))) mkdirSync(dirname(configPath), { recursive: true, mode: 0o750 });
  const config = place(configPath, shippedFile('agent.yaml'), 0o640, options, false);
  return {
    unit: { path: unitPath, action: unit },
    config: { path: configPath, action: config },
    execStart,
    next: 'systemctl daemon-reload && systemctl enable --now gangway-agent',
    unitText: text,
  };
}

export function addInstallUnitCommand(program: Command): void {
  program
    .command('install-unit')
    .description(`install the systemd unit (${UNIT_PATH}) with ExecStart pointing at this installation, and ${CONFIG_PATH} when missing`)
    .option('--root <dir>', 'write under this directory instead of / (an image being built)', '/')
    .option('--dry-run', 'print the unit and what would be written; write nothing')
    .option('--force', 'replace a unit that differs (the config file is never replaced)')
    .option('--json', 'print JSON')
    .action((opts: { root: string; dryRun?: boolean; force?: boolean; json?: boolean }) => {
      try {
        const { unitText: text, ...result } = installUnit({ root: resolve(opts.root), dryRun: Boolean(opts.dryRun), force: Boolean(opts.force) });
        if (opts.json) {
          console.log(JSON.stringify(opts.dryRun ? { ...result, unitText: text } : result));
          return;
        }
        if (opts.dryRun) console.log(text);
        console.log(`${result.unit.path}: ${result.unit.action}`);
        console.log(`  ${result.execStart}`);
        const kept = result.config.action === 'kept' || result.config.action === 'would keep';
        console.log(`${result.config.path}: ${result.config.action}${kept ? ' (it exists and differs from the shipped one: never replaced)' : ''}`);
        if (!opts.dryRun) console.log(`next: set listen and tls in ${CONFIG_PATH}, then ${result.next}`);
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });
}
