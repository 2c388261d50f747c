#!/usr/bin/env node
// Builds native/ with node-gyp against the headers of the Node that runs this script,
// never downloading them: node-gyp would otherwise fetch a header tarball.
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { buildTestvm } from './testvm/build.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.npm_config_nodedir || resolve(dirname(process.execPath), '..');
const header = join(nodeDir, 'include', 'node', 'node_api.h');
if (!existsSync(header)) {
  console.error(
    `native build: Node's headers are missing (looked for ${header}).\n` +
      'Install the headers that match this Node (Debian: apt-get install libnode-dev, or the\n' +
      'nodejs package that ships /usr/include/node), or set npm_config_nodedir to their prefix.',
  );
  process.exit(1);
}
const require = createRequire(import.meta.url);
const gyp = require.resolve('node-gyp/bin/node-gyp.js');
const result = spawnSync(process.execPath, [gyp, 'rebuild', `--nodedir=${nodeDir}`, '--jobs=2'], {
  cwd: here,
  stdio: 'inherit',
});
if (result.status !== 0) process.exit(result.status ?? 1);
// After node-gyp, whose rebuild empties build/: the multiboot test kernel (skipped, with the
// reason, where gcc cannot build 32-bit code).
try {
  buildTestvm();
} catch (err) {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
}
