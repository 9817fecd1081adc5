/* GitOps syncs on the deployment service: fetch the branch (gitops.c),
 * read and check the manifests that changed (manifest.c), plan against the
 * store, and apply every change at once: a rollout per created or updated
 * target, a prune per deleted one (with prune on). A revision in which any
 * manifest is invalid applies nothing.
 *
 * Starting a rollout needs a strategy, and strategies live above the
 * runtime (strategies/, Lua), so it is a callback of the caller's. */
#ifndef DEPLOY_GITSYNC_H
#define DEPLOY_GITSYNC_H

#include <stddef.h>

#include <jansson.h>

#include "gitops.h"
#include "manifest.h"
#include "record.h"
#include "rollout.h"
#include "service.h"

typedef struct gitsync gitsync;

typedef struct gitsync_opts {
  const char *url;
  const char *branch;      /* "main" */
  const char *path;        /* "/" */
  const char *cache_dir;   /* where the bare cache lives */
  double interval;         /* seconds between polls of a watch */
  int prune;               /* stop targets whose manifest is gone */
  manifest_checks checks;  /* target/strategy checks; payload is the caller's */
  /* Starts the rollout of one change: strategy is the manifest's object
   * (NULL: the manager's default), metadata_json carries the provenance.
   * DC_OK: done runs once when the rollout ends. Else err (done never
   * runs). */
  int (*deploy)(void *payload, const char *target, const char *version, const json_t *strategy,
                const char *metadata_json, rollout_done_cb done, void *done_payload, char *err);
  void *payload;
  event_sink sink;         /* the events of prunes */
} gitsync_opts;

/* Takes a reference to svc. Opens (or creates) the cache; no network. */
int gitsync_new(gitsync **out, service *svc, const gitsync_opts *o, char *err);
/* A round in flight finishes first (its callback still runs). NULL-safe. */
void gitsync_free(gitsync *gs);

typedef struct gitsync_applied {
  const gitops_change *change;
  int success;
  char strategy[64];
  char id[48];
  const char *const *errors;
  size_t nerrors;
} gitsync_applied;

typedef struct gitsync_held {
  const gitops_change *change;
  const char *reason;
} gitsync_held;

/* What one round found and did; valid during the callback. */
typedef struct gitsync_report {
  int success;
  const char *revision;            /* "" before the first fetch */
  int fetch_failed;
  int invalid;                     /* a manifest of the revision is invalid */
  const gitops_change *changes;    /* the plan */
  size_t nchanges;
  const gitsync_applied *applied;  /* what was started, and how it ended */
  size_t napplied;
  const gitsync_held *pinned;      /* held back by a manual rollback */
  size_t npinned;
  const gitsync_held *skipped;     /* deletes held back by prune = false */
  size_t nskipped;
  const gitsync_held *held;        /* held back because their rollout failed before (an error each) */
  size_t nheld;
  const char *const *errors;       /* every error: fetch, manifests, rollouts */
  size_t nerrors;
  double duration;                 /* engine-clock seconds */
  int report;                      /* watch: worth telling the callback */
} gitsync_report;

typedef void (*gitsync_cb)(void *payload, const gitsync_report *rep);

/* Fetch, read, plan: nothing applied. */
int gitsync_diff(gitsync *gs, gitsync_cb cb, void *payload, char *err);
/* Fetch, read, plan, apply everything, wait for every rollout. A change
 * whose rollout failed before, from the same manifest blob, is not applied
 * again: it is held (an error of the round) until a commit changes that
 * manifest... */
int gitsync_sync(gitsync *gs, gitsync_cb cb, void *payload, char *err);
/* ...or an operator asks for it again with this one. */
int gitsync_sync_retry(gitsync *gs, gitsync_cb cb, void *payload, char *err);
/* One poll of a watch: applies only when there is something to tell (a
 * new revision, valid or not; drift), and says so in rep->report. A broken
 * revision, or a failed rollout, is not retried: a new commit is needed. */
int gitsync_watch_round(gitsync *gs, gitsync_cb cb, void *payload, char *err);
/* Seconds to the next poll: the interval, doubled per failed fetch in a
 * row, capped at max(interval, 300 s). A failed rollout does not slow the
 * polls: the commit that fixes it is seen within one interval. */
double gitsync_next_delay(const gitsync *gs);
/* Stops a fetch in flight at its next progress report. */
void gitsync_cancel(gitsync *gs);
int gitsync_busy(const gitsync *gs);

const gitops *gitsync_gitops(const gitsync *gs);
const char *gitsync_revision(const gitsync *gs); /* "" before the first fetch */
double gitsync_interval(const gitsync *gs);
int gitsync_prune(const gitsync *gs);

#endif
