// Which metadata contexts a query names. The spec (Metadata querying) and QEMU's
// docs/interop/nbd.rst give the rules we follow:
//  - NBD_OPT_SET_META_CONTEXT selects exact names only. `base:` (an empty leaf) "MUST be
//    ignored" there, and so are names the export does not offer and queries of unknown
//    namespaces.
//  - NBD_OPT_LIST_META_CONTEXT with no query lists everything the export offers; a query
//    ending in ':' is a wildcard over its prefix (`base:`, `qemu:`, `qemu:dirty-bitmap:`);
//    any other query matches the context of that exact name.
import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP_PREFIX } from './constants.js';

/** The contexts of `available` that `queries` select (SET), each once, in query order. */
export function selectContexts(available: readonly string[], queries: readonly string[]): string[] {
  const selected: string[] = [];
  for (const query of queries) {
    if (query.endsWith(':') || !available.includes(query) || selected.includes(query)) continue;
    selected.push(query);
  }
  return selected;
}

/** The contexts of `available` that `queries` list (LIST), each once. */
export function listContexts(available: readonly string[], queries: readonly string[]): string[] {
  if (queries.length === 0) return [...available];
  const listed: string[] = [];
  for (const query of queries) {
    if (!query.includes(':')) continue;
    for (const name of available) {
      const matches = query.endsWith(':') ? name.startsWith(query) : name === query;
      if (matches && !listed.includes(name)) listed.push(name);
    }
  }
  return listed;
}

/** Whether `name` is a context our server can be asked to offer (for checking an export's list). */
export function isKnownContextName(name: string): boolean {
  return (
    name === BASE_ALLOCATION ||
    name === QEMU_ALLOCATION_DEPTH ||
    (name.startsWith(QEMU_DIRTY_BITMAP_PREFIX) && name.length > QEMU_DIRTY_BITMAP_PREFIX.length)
  );
}

export function dirtyBitmapContext(bitmapName: string): string {
  return `${QEMU_DIRTY_BITMAP_PREFIX}${bitmapName}`;
}
