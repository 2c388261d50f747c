/* The N-API functions addon.c's export table names, by the file that defines each. */
#ifndef GANGWAY_ADDON_EXPORTS_H
#define GANGWAY_ADDON_EXPORTS_H

#include "napi-util.h"

/* region.c */
napi_value RegionMap(napi_env env, napi_callback_info info);
napi_value RegionClose(napi_env env, napi_callback_info info);
/* batch.c */
napi_value RegionGather(napi_env env, napi_callback_info info);
napi_value RegionScatter(napi_env env, napi_callback_info info);
/* dedup.c */
napi_value RegionCopyPages(napi_env env, napi_callback_info info);
napi_value RegionApplyRefs(napi_env env, napi_callback_info info);
napi_value RegionFingerprints(napi_env env, napi_callback_info info);
napi_value RegionTrackedFingerprints(napi_env env, napi_callback_info info);
/* digest.c */
napi_value RegionDigest(napi_env env, napi_callback_info info);
napi_value Hash128(napi_env env, napi_callback_info info);
/* pagemap.c */
napi_value PagemapScan(napi_env env, napi_callback_info info);
/* tmpfile.c */
napi_value TmpfileCreate(napi_env env, napi_callback_info info);
napi_value TmpfileLink(napi_env env, napi_callback_info info);
napi_value PunchHoles(napi_env env, napi_callback_info info);
napi_value FileDataRuns(napi_env env, napi_callback_info info);
napi_value FileDataRunsAsync(napi_env env, napi_callback_info info);
/* content.c */
napi_value TestvmDiskBlocks(napi_env env, napi_callback_info info);
/* notify.c */
napi_value SdNotify(napi_env env, napi_callback_info info);
/* uffd.c */
napi_value UffdProbe(napi_env env, napi_callback_info info);
napi_value SocketPair(napi_env env, napi_callback_info info);
napi_value UffdReceive(napi_env env, napi_callback_info info);
napi_value UffdMonitor(napi_env env, napi_callback_info info);
napi_value UffdMonitorClose(napi_env env, napi_callback_info info);
napi_value UffdInstall(napi_env env, napi_callback_info info);
napi_value UffdWake(napi_env env, napi_callback_info info);
/* channel.c */
napi_value ChannelOpen(napi_env env, napi_callback_info info);
napi_value ChannelAttach(napi_env env, napi_callback_info info);
napi_value ChannelSend(napi_env env, napi_callback_info info);
napi_value ChannelBarrier(napi_env env, napi_callback_info info);
napi_value ChannelBye(napi_env env, napi_callback_info info);
napi_value ChannelClose(napi_env env, napi_callback_info info);
napi_value SocketPeek(napi_env env, napi_callback_info info);
/* pidfd.c */
napi_value PidfdGetfd(napi_env env, napi_callback_info info);

#endif
