// The guest kinds this agent can receive, by the offer's GuestKind: one line per kind.
import { GuestKind } from '../../protocol/codes.js';
import type { Logger } from '../log.js';
import type { LauncherTable } from './adapter.js';
import { processLauncher } from './process-launcher.js';
import type { QemuSettings } from './qemu-guest.js';
import { qemuLauncher } from './qemu-launcher.js';

export function launcherTable(vm: QemuSettings, log?: Logger): LauncherTable {
  return { [GuestKind.process]: processLauncher, [GuestKind.qemu]: qemuLauncher(vm, log) };
}
