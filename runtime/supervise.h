/* Supervision between deployments (run by `deployctl serve`): every
 * `interval` seconds, each target's live instances are asked whether they
 * run; one that died is started again through a reconcile of the target
 * (same version, same slot, router re-applied), after a backoff that
 * doubles with each restart (1 s, 2 s, 4 s ... capped at 60 s).
 *
 * Per target, `restart` (target.h) says when:
 *   on-failure  restart unless the instance exited with status 0 (known
 *               only for instances this process started; the end of one
 *               started by another deployctl process counts as a failure)
 *   always      restart whenever it is gone
 *   never       leave it (status shows it dead)
 *
 * Nothing is done while the target's lock is held (a deployment, a
 * reconcile, another runner): the rollout owns the instances then.
 *
 * A version that cannot stay up is not restarted forever: after
 * `max_restarts` restarts within `window` seconds, the next death marks
 * the target degraded and supervision of it stops, until a new deployment
 * goes live or every live instance runs again (a reconcile by hand).
 *
 * Each restart is an event of the live deployment ("instance_restarted":
 * instance, version, pid, old_pid, exit, restarts, backoff), as are
 * "restart_failed", "degraded" (reason, restarts) and "recovered"; the
 * view (view.h) reads them back, so status and /metrics tell the same. */
#ifndef DEPLOY_SUPERVISE_H
#define DEPLOY_SUPERVISE_H

#include "service.h"

typedef struct supervise supervise;

typedef struct supervise_opts {
  double interval;        /* seconds between looks (1) */
  double backoff_max;     /* seconds (60) */
  int max_restarts;       /* within window, before degraded (5) */
  double window;          /* seconds (300) */
} supervise_opts;

int supervise_start(supervise **out, service *svc, const supervise_opts *o, char *err);
/* Restarts made since start, for one target (0 when unknown). */
long supervise_restarts(const supervise *sv, const char *target);
/* Stops looking; a restart in flight ends first (the object is freed
 * then). NULL-safe. */
void supervise_stop(supervise *sv);

#endif
