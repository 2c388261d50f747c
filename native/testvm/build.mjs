#!/usr/bin/env node
// Builds gangway-testvm, the multiboot test kernel, into native/build/testvm/ with gcc -m32
// and ld (no make, no shell: every command is an argument array). native/build.mjs runs it
// after node-gyp. A machine whose gcc cannot build 32-bit freestanding code (or whose ld has
// no elf_i386) gets no kernel: the reason goes to stdout and to skipped.txt, which the
// tests show when they skip, and the rest of the build goes on. A compile error in the
// kernel itself fails the build.
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const nativeDir = dirname(here);
export const testvmOutDir = join(nativeDir, 'build', 'testvm');
export const testvmKernelPath = join(testvmOutDir, 'gangway-testvm.elf');
export const testvmSkippedPath = join(testvmOutDir, 'skipped.txt');

const SOURCES = ['boot.S', 'kmain.c', 'params.c', 'hw.c', 'libc.c', 'virtio-blk.c', 'disk.c'];
const CFLAGS = [
  '-m32',
  '-ffreestanding',
  '-nostdlib',
  '-fno-pic',
  '-fno-pie',
  '-fno-stack-protector',
  '-mno-sse',
  '-O2',
  '-std=gnu11',
  '-Wall',
  '-Wextra',
  '-fno-strict-aliasing',
  '-fno-asynchronous-unwind-tables',
  // libc.c's loops would otherwise become calls to the memcpy and memset they define.
  '-fno-tree-loop-distribute-patterns',
];

function run(command, args, options = {}) {
  const result = spawnSync(command, args, { encoding: 'utf8', ...options });
  const output = `${result.stdout ?? ''}${result.stderr ?? ''}`.trim();
  if (result.error) return { ok: false, why: `${command}: ${result.error.message}` };
  if (result.status !== 0) return { ok: false, why: `${command} ${args.join(' ')} exited ${result.status}: ${output}` };
  return { ok: true, output };
}

/** Why this machine cannot build the kernel, or undefined if it can. */
function cannotBuild() {
  const gcc = run('gcc', ['--version']);
  if (!gcc.ok) return `gcc is missing: ${gcc.why}`;
  const include = run('gcc', ['-m32', '-print-file-name=include']);
  if (!include.ok) return `gcc cannot build 32-bit code (-m32): ${include.why}`;
  const probe = run('gcc', [...CFLAGS, '-nostdinc', '-isystem', include.output, '-x', 'c', '-c', '-o', '/dev/null', '-'], {
    input: '#include <stdint.h>\nuint64_t probe(uint64_t x) { return x * 3; }\n',
  });
  if (!probe.ok) return `gcc cannot compile freestanding 32-bit code (-m32): ${probe.why}`;
  const ld = run('ld', ['-V']);
  if (!ld.ok) return `ld is missing or failed: ${ld.why}`;
  if (!/\belf_i386\b/.test(ld.output)) return 'ld does not support the elf_i386 emulation (ld -V does not list it)';
  return undefined;
}

/** Builds the kernel; returns its path, or undefined when skipped (the reason said). */
export function buildTestvm() {
  rmSync(testvmOutDir, { recursive: true, force: true });
  mkdirSync(join(testvmOutDir, 'obj'), { recursive: true });
  const why = cannotBuild();
  if (why) {
    console.log(`native build: skipping the test kernel (gangway-testvm): ${why}`);
    writeFileSync(testvmSkippedPath, `${why}\n`);
    return undefined;
  }
  const include = run('gcc', ['-m32', '-print-file-name=include']).output;
  const objects = [];
  for (const source of SOURCES) {
    const object = join(testvmOutDir, 'obj', `${source}.o`);
    const compiled = run('gcc', [
      ...CFLAGS,
      // Only gcc's freestanding headers and the kernel's own: no host libc header may leak in.
      '-nostdinc',
      '-isystem',
      include,
      '-I',
      join(here, 'include'),
      '-I',
      here,
      '-I',
      join(nativeDir, 'src'),
      '-c',
      join(here, source),
      '-o',
      object,
    ]);
    if (!compiled.ok) throw new Error(`gangway-testvm: ${compiled.why}`);
    if (compiled.output) console.log(compiled.output);
    objects.push(object);
  }
  const linked = run('ld', ['-m', 'elf_i386', '-T', join(here, 'link.ld'), '-nostdlib', '-o', testvmKernelPath, ...objects]);
  if (!linked.ok) throw new Error(`gangway-testvm: ${linked.why}`);
  console.log(`native build: built ${testvmKernelPath}`);
  return testvmKernelPath;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  try {
    buildTestvm();
  } catch (err) {
    console.error(err instanceof Error ? err.message : err);
    process.exit(1);
  }
}
