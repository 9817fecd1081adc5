/* Retention: what deployctl keeps of a target's past, within the limits of
 * its config (`retain = { history, versions, logs }`): old deployments and
 * their events are deleted from the store, old versions' instance logs
 * from wherever the instances ran, and logs past a size are rotated.
 * Never the live version's or the previous one's (what a rollback goes
 * back to), nor anything a running deployment uses. */
#ifndef DEPLOY_RETAIN_H
#define DEPLOY_RETAIN_H

#include <stddef.h>
#include <stdint.h>

#include "service.h"

typedef struct retain_result {
  size_t deployments;   /* history rows deleted (with their events) */
  size_t logs_removed;  /* log files deleted */
  size_t logs_rotated;
  uint64_t bytes_freed; /* of the deleted log files */
  const char *err;      /* what could not be done, or NULL */
} retain_result;

typedef void (*retain_cb)(void *payload, const retain_result *r);

/* Applies the target's retention; cb once, from the loop. Runs after every
 * deployment and rollback (service.c), and on demand (manager:prune,
 * `deployctl prune`). */
int retain_target(service *svc, const char *target, retain_cb cb, void *payload, char *err);

#endif
