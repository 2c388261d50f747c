// A guest arriving by migration gets its files unnamed (O_TMPFILE) and names them at its
// switchover, just before its record is journaled. An agent killed between the two leaves
// named files that no record names, in directories other programs share (the memory
// directory, the VM disks' directory), so nothing there is removed by its name alone.
//
// The note closes that gap: written when the migration is accepted (outside the downtime),
// it lists each file the switchover will name with the inode it has now. The next start of
// the agent removes a listed path only while it still is that inode and no record, of a
// guest alive or dead, names it: exactly the files that migration made and never handed to
// a guest. The note goes when the migration ends, whichever way.
import { fstatSync, lstatSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { z } from 'zod';

const NOTE_SUFFIX = '.arriving';

const noteSchema = z.object({
  files: z.array(z.object({ path: z.string().refine(isAbsolute), dev: z.string().regex(/^\d+$/), ino: z.string().regex(/^\d+$/) })).max(4096),
});

/** The note's path for guest `name` in the guests directory `dir` (one arrival per name: it is reserved). */
function notePath(dir: string, name: string): string {
  return join(dir, `${name}${NOTE_SUFFIX}`);
}

/** Notes the files an arrival will name: `path` is where, `fd` the unnamed file's descriptor now. */
export function writeArrivalNote(dir: string, name: string, files: readonly { path: string; fd: number }[]): void {
  const note = {
    files: files.map(({ path, fd }) => {
      const stat = fstatSync(fd, { bigint: true });
      return { path, dev: stat.dev.toString(), ino: stat.ino.toString() };
    }),
  };
  const path = notePath(dir, name);
  const tmp = `${path}.tmp`;
  rmSync(tmp, { force: true });
  writeFileSync(tmp, JSON.stringify(note), { mode: 0o600, flag: 'wx' });
  renameSync(tmp, path);
}

/** The arrival ended (its guest's record names its files now, or they went unnamed). */
export function removeArrivalNote(dir: string, name: string): void {
  rmSync(notePath(dir, name), { force: true });
}

/**
 * After a restart: removes the files the notes left in `dir` list that are still the inode
 * noted and that no path of `named` is, then the notes. Returns the files removed and the
 * notes that could not be read (removed too: what they listed stays).
 */
export function sweepArrivalNotes(dir: string, named: ReadonlySet<string>): { removed: string[]; unreadable: string[] } {
  const removed: string[] = [];
  const unreadable: string[] = [];
  for (const file of readdirSync(dir)) {
    if (!file.endsWith(NOTE_SUFFIX)) continue;
    const note = join(dir, file);
    let parsed;
    try {
      parsed = noteSchema.safeParse(JSON.parse(readFileSync(note, 'utf8')));
    } catch {
      parsed = undefined;
    }
    if (!parsed?.success) unreadable.push(file);
    else {
      for (const { path, dev, ino } of parsed.data.files) {
        if (named.has(path)) continue;
        try {
          const stat = lstatSync(path, { bigint: true });
          if (!stat.isFile() || stat.dev.toString() !== dev || stat.ino.toString() !== ino) continue;
          rmSync(path);
          removed.push(path);
        } catch {}
      }
    }
    rmSync(note, { force: true });
  }
  return { removed, unreadable };
}
