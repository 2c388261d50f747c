// What this build of gangway is: the package's version, and the peer protocol it speaks. The
// CLI (--version), the agent's status and the gangway_build_info metric say the same.
import { readFileSync } from 'node:fs';
import { PROTOCOL_VERSION } from '../protocol/limits.js';

function packageVersion(): string {
  // dist/agent/version.js and agent/version.ts are both two levels below package.json.
  for (const relative of ['../../package.json', '../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(relative, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'gangway' && typeof pkg.version === 'string') return pkg.version;
    } catch {}
  }
  return 'unknown';
}

export const GANGWAY_VERSION = packageVersion();
export { PROTOCOL_VERSION };

/** "0.1.0 (protocol 3, node v20.20.2)" */
export const VERSION_TEXT = `${GANGWAY_VERSION} (protocol ${PROTOCOL_VERSION}, node ${process.version})`;
