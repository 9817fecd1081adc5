/* The truth about one target, told the same way by `deployctl status`,
 * manager:get_status() and the API of `deployctl serve`: built from the
 * target's row, its newest deployment and that deployment's events, the
 * live deployment's events (supervision), its instance rows and its lock.
 *
 * view_build is a pure function (no I/O): serve builds views from what it
 * polls, service_describe from what it reads and checks now.
 *
 * The view is a JSON object (README "Status" documents every field):
 *   target, current_version (null before the first deployment),
 *   status, health, instances            the specification's fields, with
 *                                        their meaning: status is one of
 *                                        running | deployed | failed |
 *                                        rolling_back; instances counts
 *                                        every instance that runs
 *   state     never_deployed | healthy | progressing | paused |
 *             rolling_back | degraded | unhealthy | failed
 *   summary   one sentence: "paused at 50 %, waiting for promote"
 *   instances_by_version  [{version, role live|new|leaving, running, total}]
 *   rollout   the deployment under way (null when none): id, version,
 *             from, kind, strategy, started_at, elapsed, pct, step, steps,
 *             paused, paused_at, paused_for, paused_total, health,
 *             aborting, last_event
 *   last_deployment  the newest one that ended: id, version, from, kind,
 *             strategy, status, created_at, finished_at, duration, errors
 *   analysis  the newest analysis verdict of the newest deployment:
 *             {kind, verdict pass|fail|inconclusive|..., detail, at} or null
 *   supervision {restart, restarts, degraded, reason, last_restart_at}
 *   lock      {holder, purpose, pid, host, since, until} or null */
#ifndef DEPLOY_VIEW_H
#define DEPLOY_VIEW_H

#include <stddef.h>

#include <jansson.h>

#include "store.h"

/* What the view is built from. Pointers may be NULL where said. */
typedef struct view_input {
  const char *target;
  const store_target *row;           /* NULL: no row yet */
  const store_deployment *newest;    /* NULL: never deployed */
  const store_event *events;         /* of newest, oldest first */
  size_t nevents;
  const store_event *live_events;    /* of the live deployment when it is not newest */
  size_t nlive_events;
  const store_instance *instances;   /* every row of the target */
  size_t ninstances;
  const unsigned char *alive;        /* per instance: INSTSET_ALIVE/DEAD/UNKNOWN; NULL: rows as stored */
  const char *health;                /* the live set's health checked now, NULL: as stored */
  const store_lock *lock;            /* NULL: not locked */
  const char *restart;               /* the target's restart policy, NULL: not supervised here */
  double now;                        /* engine clock */
} view_input;

/* A new object (NULL when out of memory). */
json_t *view_build(const view_input *in);

/* The verdict an analysis event carries (its data's verdict, result or
 * status string, or ok/pass/passed/success as a boolean): "pass", "fail",
 * another word, or NULL when it names none. Events whose kind contains
 * "analysis" are analysis events. */
const char *view_analysis_verdict(const json_t *data);
int view_is_analysis(const char *kind);

#endif
