/* A rollout: one deployment of one version to one target, as a task on the
 * engine. It owns the deployment's row, lock and instances, carries out
 * the actions its strategy names (runtime/action.h), records each, and
 * always ends with the target on exactly one version: the new one
 * (promoted) or the old one (aborted).
 *
 * Every step is recorded before it acts: the deployment row and lock are
 * committed before any instance starts, an instance's row before the
 * provider starts it, the promotion before the old set stops, the end
 * before the owner hears of it. */
#ifndef DEPLOY_ROLLOUT_H
#define DEPLOY_ROLLOUT_H

#include "action.h"
#include "engine.h"
#include "health.h"
#include "record.h"
#include "store.h"
#include "target.h"
#include "util.h"
#include "webhook.h"

typedef struct rollout_result {
  int success;
  int locked;                      /* refused: another deployment holds the target */
  int recorded;                    /* a deployment row was written */
  char id[48];
  char target[64];
  char version[129];
  char strategy[64];
  double duration;                 /* engine-clock seconds */
  const char *const *errors;       /* valid during the callback */
  size_t nerrors;
} rollout_result;

/* Last health observation of the new instances. */
typedef struct rollout_health {
  health_state state;
  int checked, ok;
  int answered_bad;   /* some instance answered, with the wrong status */
  int dead;           /* some instance's process is gone: no use waiting */
  char detail[DC_ERR_MAX];
} rollout_health;

/* Hooks: code run at step boundaries: the user's Lua functions (through
 * the bindings) and the webhooks (webhook_hooks.c), the webhooks first. A
 * hook that fails before or during the rollout aborts it; on_promote,
 * on_abort and on_rollback failures are recorded as events. */
typedef enum {
  HOOK_BEFORE_DEPLOY,  /* before the first instance starts */
  HOOK_BEFORE_STEP,    /* before each traffic change (pct = the new share) */
  HOOK_AFTER_STEP,     /* after each health-gated wait (pct, health) */
  HOOK_ANALYSIS,       /* after after_step: pass or fail */
  HOOK_BEFORE_PROMOTE, /* before the new version is made current: pass or fail */
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
  /* Optional: the rollout is asked to abort while this one's hook runs
   * (deployctl abort, Ctrl-C): end it early. done still runs exactly
   * once, later, from the loop. */
  void (*abort)(void *payload, rollout *r);
  void *payload;
} rollout_hooks;

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
  event_sink sink;                 /* every event as it is recorded; emit may be NULL */
  const rollout_hooks *hooks;      /* NULL: none; must outlive the rollout */
  /* The strategy's (or a manifest's) webhooks: service_deploy adds the
   * target's and runs them all through webhook_hooks, before `hooks` at
   * each point. NULL: none. Copied. */
  const webhook_list *webhooks;
  const rollout_hooks *webhook_hooks;
} rollout_opts;

/* Records the deployment (row + lock, asynchronously) and drives st: a
 * step machine is stepped, a driver is handed the rollout. The strategy
 * and the target must outlive the rollout. Returns DC_ERROR (nothing
 * changed, cb never runs) only for a bad argument or no memory; a target
 * locked by another deployment is reported through cb, with `locked` set
 * and nothing recorded. cb runs exactly once, from the loop, when the
 * rollout has ended; the rollout frees itself after. */
int rollout_start(rollout **out, engine *e, store *s, target_config *t, strategy *st, const rollout_opts *o,
                  rollout_done_cb cb, void *payload, char *err);

/* Run one action (for a driver). ACTION_PROMOTE and ACTION_ABORT end the
 * rollout (cb runs, then the done callback). */
void rollout_action(rollout *r, const strategy_action *a, rollout_action_cb cb, void *payload);

/* For a step machine run from inside a driver (canary:execute(d) in a Lua
 * strategy): the next action of st's step machine given the run so far,
 * and the outcome of an action, recorded for its next decision. */
void rollout_next_action(rollout *r, const strategy *st, strategy_action *out);
/* Before a step machine is run from inside a driver: its progress starts
 * over, from the share the rollout is at now. */
void rollout_delegate_begin(rollout *r);
void rollout_record(rollout *r, int ok, const char *err);
int rollout_ending(const rollout *r);
const char *rollout_id(const rollout *r);
/* What a hook may tell others about the rollout (a webhook's payload). */
const char *rollout_version(const rollout *r);
const char *rollout_from_version(const rollout *r); /* "" on a first deploy */
double rollout_share(const rollout *r);              /* the new version's share now */
const target_config *rollout_target(const rollout *r);

/* Ask a running rollout to abort at its next safe point (traffic back to
 * the old version, new instances stopped). Idempotent. */
void rollout_abort(rollout *r, const char *reason);
/* Every running rollout of this process (Ctrl-C, SIGTERM). */
void rollout_abort_all(const char *reason);

/* Record a user event (Lua's d:log) against the deployment: -1 with err
 * when the payload is not a JSON object or is too large. */
int rollout_log(rollout *r, const char *kind, const char *data_json, char *err);

/* One check round of the new instances, asynchronously. */
typedef void (*rollout_health_cb)(void *payload, const rollout_health *h);
void rollout_check_health(rollout *r, rollout_health_cb cb, void *payload);

#endif
