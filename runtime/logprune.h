/* Retention for instance logs: both providers keep an instance's output in
 * <dir>/<target>-<version>-<index>.log. Old versions' logs are deleted and
 * a log grown past a size is rotated, on this machine (process.c) the same
 * way the remote agent does it on a host (ssh_agent.sh, verb prune). */
#ifndef DEPLOY_LOGPRUNE_H
#define DEPLOY_LOGPRUNE_H

#include <stddef.h>
#include <stdint.h>

typedef struct logprune_stats {
  size_t removed;   /* files deleted */
  size_t rotated;   /* logs rotated */
  uint64_t freed;   /* bytes of the deleted files */
} logprune_stats;

/* A log written less than this many seconds ago is never deleted: an
 * instance another runner started a moment ago may be writing it. */
#define LOGPRUNE_MIN_AGE 10

/* In dir: deletes target's logs (and their rotated .1) of the versions in
 * drop, unless written within LOGPRUNE_MIN_AGE seconds; rotates every
 * other log of the target over max_bytes (0: never): copied to <log>.1,
 * then truncated, so an instance appending to it writes on (what it
 * writes between the copy and the truncation is lost, as with
 * logrotate's copytruncate). A missing dir is not an error. Blocking: run
 * it off the loop. 0, or -1 with err. */
int logprune_dir(const char *dir, const char *target, const char *const *drop, size_t ndrop, uint64_t max_bytes,
                 logprune_stats *st, char *err);

#endif
