// Base images as resident content (dedup.baseImages): raw files VMs' disks were cloned from,
// kept in a directory the operator names. Every peer that asks for resident content is
// offered their blocks, whatever dedup.resident says of guests: the operator put them there
// to be shared, and a VM cloned from one of them then arrives with the blocks it shares
// copied from the file here instead of sent. Like a resident guest's, a base image's
// fingerprints only steer the copies: each copied block is checked against them, so a file
// changed since costs blocks sent again, never a wrong one.
import { lstatSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { MAX_VM_DISK_BYTES, VM_DISK_BLOCK_BYTES } from '../guest/vm-spec.js';
import type { ResidentGuest } from './resident-cache.js';

/** Base images offered at most (in name order): each is a slot of every group that asks. */
export const MAX_BASE_IMAGES = 16;

/** The name a base image's content goes by in logs and the cache (no guest is named so: guest names have no ':'). */
export const baseImageName = (file: string): string => `base:${file}`;

/**
 * The base images of `dir` as resident content: its regular files (not symlinks, not
 * directories) of a whole number of 4 KiB blocks, sparse, the first MAX_BASE_IMAGES by name.
 * `skipped` says why a file was left out; `problem`, why the directory could not be read.
 */
export function baseImageContent(dir: string): { images: ResidentGuest[]; skipped: string[]; problem?: string } {
  let names: string[];
  try {
    names = readdirSync(dir).sort();
  } catch (err) {
    return { images: [], skipped: [], problem: `dedup.baseImages ${dir} cannot be read: ${(err as Error).message}` };
  }
  const images: ResidentGuest[] = [];
  const skipped: string[] = [];
  for (const file of names) {
    const path = join(dir, file);
    const stats = lstatSync(path, { throwIfNoEntry: false });
    if (!stats?.isFile()) {
      skipped.push(`${file}: not a regular file`);
      continue;
    }
    if (stats.size === 0 || stats.size % VM_DISK_BLOCK_BYTES !== 0 || stats.size > MAX_VM_DISK_BYTES) {
      skipped.push(`${file}: ${stats.size} bytes, not a whole number of ${VM_DISK_BLOCK_BYTES}-byte blocks up to ${MAX_VM_DISK_BYTES}`);
      continue;
    }
    if (images.length === MAX_BASE_IMAGES) {
      skipped.push(`${file}: more than ${MAX_BASE_IMAGES} base images`);
      continue;
    }
    images.push({ name: baseImageName(file), pid: 0, memoryPath: path, memoryBytes: stats.size, pageSizeBytes: VM_DISK_BLOCK_BYTES, sparse: true });
  }
  return { images, skipped };
}
