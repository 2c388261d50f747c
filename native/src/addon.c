/*
 * gangway.node: the N-API addon of the gangway data plane.
 *
 * Implements the NativeAddon interface of agent/native.ts (that file is the contract). This
 * file is the export table; the functions live in addon/, a file per concern:
 *   region.c    regionMap / regionClose          MAP_SHARED regions of a file, optional per-page
 *                                                XXH3-128 fingerprints
 *   batch.c     regionGather / regionScatter     page batches (ENTRY_ZERO / ENTRY_DATA entries),
 *                                                optionally fingerprinting the gathered data pages
 *   dedup.c     regionCopyPages                  copy-ref entries: pages copied between regions
 *               regionFingerprints               XXH3-128 of a range of pages
 *   digest.c    regionDigest                     128-bit region digest on the libuv thread pool
 *               hash128                          XXH3-128 of a byte array
 *   pagemap.c   pagemapScan                      PAGEMAP_SCAN (userfaultfd WP_ASYNC dirty tracking)
 *   tmpfile.c   tmpfileCreate / tmpfileLink      O_TMPFILE files, named once complete
 *               punchHoles                       pages of a file become holes again
 *               fileDataRuns(Async)              the pages of a sparse file that hold data
 *   notify.c    sdNotify                         one datagram to systemd's NOTIFY_SOCKET
 *   content.c   testvmDiskBlocks                 the test kernel's disk blocks (guest-content.h)
 *   uffd.c      uffdProbe, socketPair,           post-copy: the destination guest's userfaultfd
 *               uffdReceive, uffdMonitor(Close),
 *               uffdInstall, uffdWake
 *   channel.c   channelOpen, channelAttach,       a migration's bulk pages on a TCP or TLS
 *               channelSend, channelBarrier,     connection of their own, run by a thread at
 *               channelBye, channelClose,        each end (OpenSSL as Node exports it)
 *               socketPeek
 *   pidfd.c     pidfdGetfd                       a copy of another process's descriptor (a
 *                                                restarted agent takes back a guest's uffd)
 *   napi-util.c                                  errors and argument parsing they all share
 *
 * Every argument is validated there: the agent passes data derived from untrusted peer
 * frames (regionScatter), so bad input must raise a TypeError/RangeError naming the
 * argument, never touch memory outside the region.
 *
 * Threading: everything runs on the JS thread except the bodies of regionDigest and
 * uffdReceive (on the libuv thread pool), uffdMonitor's fault thread and a channel's
 * thread; region.h says how a region outlives a digest or a channel that uses it.
 */
#include "addon/exports.h"

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  const napi_property_descriptor props[] = {
      {"channelOpen", NULL, ChannelOpen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"channelAttach", NULL, ChannelAttach, NULL, NULL, NULL, napi_enumerable, NULL},
      {"channelSend", NULL, ChannelSend, NULL, NULL, NULL, napi_enumerable, NULL},
      {"channelBarrier", NULL, ChannelBarrier, NULL, NULL, NULL, napi_enumerable, NULL},
      {"channelBye", NULL, ChannelBye, NULL, NULL, NULL, napi_enumerable, NULL},
      {"channelClose", NULL, ChannelClose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketPeek", NULL, SocketPeek, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionMap", NULL, RegionMap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionClose", NULL, RegionClose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionGather", NULL, RegionGather, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionScatter", NULL, RegionScatter, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionCopyPages", NULL, RegionCopyPages, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionApplyRefs", NULL, RegionApplyRefs, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionFingerprints", NULL, RegionFingerprints, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionTrackedFingerprints", NULL, RegionTrackedFingerprints, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionDigest", NULL, RegionDigest, NULL, NULL, NULL, napi_enumerable, NULL},
      {"hash128", NULL, Hash128, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pagemapScan", NULL, PagemapScan, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tmpfileCreate", NULL, TmpfileCreate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tmpfileLink", NULL, TmpfileLink, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sdNotify", NULL, SdNotify, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketPair", NULL, SocketPair, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdProbe", NULL, UffdProbe, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdReceive", NULL, UffdReceive, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdMonitor", NULL, UffdMonitor, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdMonitorClose", NULL, UffdMonitorClose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdInstall", NULL, UffdInstall, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdWake", NULL, UffdWake, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pidfdGetfd", NULL, PidfdGetfd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHoles", NULL, PunchHoles, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fileDataRuns", NULL, FileDataRuns, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fileDataRunsAsync", NULL, FileDataRunsAsync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"testvmDiskBlocks", NULL, TestvmDiskBlocks, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok)
    return NULL;
  return exports;
}
