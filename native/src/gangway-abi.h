/*
 * What gangway's native parts agree on across process boundaries: the tracking shim
 * (gangway-track.so, inside the guest), the addon (inside the agent) and the synthetic
 * guest. One definition of each; the agent's TypeScript mirrors the few it needs
 * (agent/native.ts, agent/tracker/uffd-wp.ts) and a test checks them against the addon.
 */
#ifndef GANGWAY_ABI_H
#define GANGWAY_ABI_H

#include <stdint.h>

/* Memory regions one guest may have (the shim tracks at most this many files). */
#define GW_MAX_REGIONS 16u

/* The name of the shim's write-protect thread while its pass runs (uffd-wp.ts waits it out). */
#define GW_PROTECT_THREAD_NAME "gangway-wp"

/*
 * Post-copy: what the shim sends with each region's userfaultfd over the agent's socket
 * (SCM_RIGHTS, one message per region; agent side: uffdReceive).
 */
struct gw_uffd_hello {
	uint64_t start;  /* the mapping's address in the guest */
	uint64_t length; /* its length in bytes */
	uint32_t pid;
	uint32_t version; /* GW_UFFD_HELLO_VERSION */
	uint32_t region;  /* index in GANGWAY_TRACK_PATH */
	uint32_t reserved;
};
#define GW_UFFD_HELLO_VERSION 2u

#endif
