/* A rollout: one deployment of one version to one target, as a task on the
 * engine. It owns the deployment's row, lock and instances, carries out the
 * actions its strategy names, records each in the store as an event, and
 * always ends with the target on exactly one version: the new one
 * (promoted) or the old one (aborted). */
#ifndef DEPLOY_ROLLOUT_H
#define DEPLOY_ROLLOUT_H

#include "engine.h"
#include "health.h"
#include "store.h"
#include "strategy.h"
#include "target.h"
#include "util.h"

#define ROLLOUT_MAX_ERRORS 8

typedef struct rollout rollout;

typedef struct rollout_result {
  int success;
  char id[48];
  char target[64];
  char version[129];
  char strategy[64];
  double duration;                 /* engine-clock seconds */
  int nerrors;
  char errors[ROLLOUT_MAX_ERRORS][DC_ERR_MAX];
} rollout_result;

typedef void (*rollout_event_cb)(void *payload, const store_event *ev);
typedef void (*rollout_done_cb)(void *payload, const rollout_result *res);
/* Outcome of one action run by rollout_action (ok, or why not). */
typedef void (*rollout_action_cb)(void *payload, int ok, const char *err);

typedef struct rollout_opts {
  const char *id;                  /* preassigned deployment id, or NULL */
  double created_at;               /* preassigned creation time, or 0 */
  const char *version;
  const char *kind;                /* "deploy" (default) or "rollback" */
  const char *strategy_name;       /* recorded name; default: the strategy's */
  const char *metadata_json;       /* JSON object or NULL */
  rollout_event_cb on_event;       /* every event, after it is stored */
  void *event_payload;
} rollout_opts;

/* Records the deployment (row + lock) and, when st is not NULL, starts
 * driving st's step machine. With st == NULL the caller drives the rollout
 * itself through rollout_action() and ends it with rollout_finish() (this is
 * how Lua strategies run). Returns DC_LOCKED (err says who holds the target)
 * or DC_ERROR without having changed anything; on DC_OK `cb` runs exactly
 * once, when the rollout has ended, and the rollout frees itself after. */
int rollout_start(rollout **out, engine *e, store *s, target_config *t,
                  const strategy *st, const rollout_opts *o,
                  rollout_done_cb cb, void *payload, char *err);

/* Run one action (for externally driven rollouts). ACTION_PROMOTE and
 * ACTION_ABORT end the rollout (cb runs, then the done callback). */
void rollout_action(rollout *r, const strategy_action *a,
                    rollout_action_cb cb, void *payload);

/* Ask a running rollout to abort at its next safe point (traffic back to
 * the old version, new instances stopped). Idempotent. */
void rollout_abort(rollout *r, const char *reason);

/* Record a user event (Lua's d:log) against the deployment. */
void rollout_log(rollout *r, const char *kind, const char *data_json);

const char *rollout_id(const rollout *r);
double rollout_pct(const rollout *r);
const strategy_run *rollout_run_state(const rollout *r);

/* Last health observation of the new instances. */
typedef struct rollout_health {
  health_state state;
  int checked, ok;
  int answered_bad;   /* some instance answered, with the wrong status */
  char detail[DC_ERR_MAX];
} rollout_health;
/* One check round of the new instances, asynchronously. */
typedef void (*rollout_health_cb)(void *payload, const rollout_health *h);
void rollout_check_health(rollout *r, rollout_health_cb cb, void *payload);

#endif
