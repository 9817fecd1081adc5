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

/* Last health observation of the new instances. */
typedef struct rollout_health {
  health_state state;
  int checked, ok;
  int answered_bad;   /* some instance answered, with the wrong status */
  char detail[DC_ERR_MAX];
} rollout_health;

/* Hooks: user code run at step boundaries (Lua functions, through the
 * bindings). A hook that fails before or during the rollout aborts it;
 * on_promote, on_abort and on_rollback failures are recorded as events. */
typedef enum {
  HOOK_BEFORE_DEPLOY,  /* before the first instance starts */
  HOOK_BEFORE_STEP,    /* before each traffic change (pct = the new share) */
  HOOK_AFTER_STEP,     /* after each health-gated wait (pct, health) */
  HOOK_ANALYSIS,       /* after after_step: pass or fail */
  HOOK_ON_PROMOTE,
  HOOK_ON_ABORT,
  HOOK_ON_ROLLBACK,    /* traffic was returned to the old version */
  HOOK_COUNT
} hook_kind;

const char *rollout_hook_name(hook_kind k);

typedef void (*rollout_hook_done)(rollout *r, int ok, const char *err);
typedef struct rollout_hooks {
  /* Starts the hook of that kind if there is one: returns 1 and calls done
   * exactly once, later, from the loop; or returns 0 when there is none. */
  int (*run)(void *payload, rollout *r, hook_kind kind, double pct, const rollout_health *health,
             const char *reason, rollout_hook_done done);
  void *payload;
} rollout_hooks;

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
  const rollout_hooks *hooks;      /* NULL: none; must outlive the rollout */
  double control_poll;             /* seconds between checks for operator
                                      commands (promote/abort); default 0.2 */
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

/* For externally driven rollouts: run the before_deploy hook, then cb(ok).
 * The rollout may be driven only after cb said ok; when it says not ok,
 * end the rollout with ACTION_ABORT. */
void rollout_begin(rollout *r, rollout_action_cb cb, void *payload);

/* For a built-in strategy run from inside an externally driven rollout
 * (canary:execute(d) in a Lua strategy): the next action of st's step
 * machine, given the run so far; and the outcome of an action, recorded
 * for the step machine's next decision. */
void rollout_next_action(rollout *r, const strategy *st, strategy_action *out);
void rollout_record(rollout *r, int ok, const char *err);
int rollout_ending(const rollout *r);

/* Ask a running rollout to abort at its next safe point (traffic back to
 * the old version, new instances stopped). Idempotent. */
void rollout_abort(rollout *r, const char *reason);

/* Stores an event (secrets redacted) and hands it to cb: how every
 * deployment-like operation (rollouts, GitOps prunes) records its steps. */
void rollout_record_event(store *s, double ts, const char *deployment_id, const char *target, const char *kind,
                          const char *data_json, rollout_event_cb cb, void *payload);

/* Record a user event (Lua's d:log) against the deployment. */
void rollout_log(rollout *r, const char *kind, const char *data_json);


/* One check round of the new instances, asynchronously. */
typedef void (*rollout_health_cb)(void *payload, const rollout_health *h);
void rollout_check_health(rollout *r, rollout_health_cb cb, void *payload);

#endif
