#!/usr/bin/env node
// Completes package-lock.json for `npm ci` after `npm install`.
//
// The registry this project installs from serves only the platforms it runs on, so npm
// writes no lock entry for other platforms' optional packages (esbuild, rollup and
// msgpackr-extract binaries for darwin, win32, ...), and `npm ci` then refuses the lock
// as "out of sync". This adds an entry, with the platform npm needs to skip it, for each
// optional dependency the lock lacks. Run it after every `npm install` that changes the lock.
import { readFileSync, writeFileSync } from 'node:fs';

const OS = ['darwin', 'win32', 'linux', 'android', 'freebsd', 'openbsd', 'netbsd', 'sunos', 'aix', 'openharmony'];
const CPU = ['arm64', 'x64', 'ia32', 'arm', 'riscv64', 'ppc64', 's390x', 'loong64', 'mips64el', 'wasm32'];
const path = new URL('../package-lock.json', import.meta.url);
const lock = JSON.parse(readFileSync(path, 'utf8'));
const packages = lock.packages;
let added = 0;
for (const [key, entry] of Object.entries(packages)) {
  for (const [name, version] of Object.entries(entry.optionalDependencies ?? {})) {
    const nested = `${key ? `${key}/` : ''}node_modules/${name}`;
    if (packages[nested] || packages[`node_modules/${name}`]) continue;
    const words = name.split(/[-/@]/);
    const os = OS.filter((o) => words.includes(o) || (o === 'win32' && words.includes('windows')));
    const cpu = CPU.filter((c) => words.includes(c) || (c === 'arm' && words.includes('armv7')));
    packages[`node_modules/${name}`] = {
      version,
      ...(entry.dev ? { dev: true } : {}),
      optional: true,
      // An entry whose platform cannot be told from its name is never installed.
      os: os.length ? os : ['none'],
      cpu: cpu.length ? cpu : ['none'],
    };
    added++;
  }
}
const sorted = Object.fromEntries(Object.entries(packages).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a < b ? -1 : 1)));
lock.packages = sorted;
writeFileSync(path, `${JSON.stringify(lock, null, 2)}\n`);
console.log(`package-lock.json: ${added} optional platform entries added`);
