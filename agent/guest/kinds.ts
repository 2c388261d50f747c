// The guest kinds this agent can receive, by the offer's GuestKind: one line per kind.
import { GuestKind } from '../../protocol/codes.js';
import type { LauncherTable } from './adapter.js';
import { processLauncher } from './process-launcher.js';

export const LAUNCHERS: LauncherTable = { [GuestKind.process]: processLauncher };
