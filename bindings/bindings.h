/* Lua <-> C glue shared by the binding files. No business logic here: the
 * bindings check arguments, convert values and call runtime/ and
 * strategies/. */
#ifndef DEPLOY_BINDINGS_H
#define DEPLOY_BINDINGS_H

#include <lauxlib.h>
#include <lua.h>

#include "engine.h"
#include "rollout.h"
#include "store.h"
#include "strategy.h"
#include "target.h"

#define DEPLOY_VERSION "0.1.0"

#define ENGINE_MT "deploy.Engine"
#define MANAGER_MT "deploy.DeploymentManager"
#define STRATEGY_MT "deploy.BuiltinStrategy"

/* The one engine of this Lua state (created on first use, closed when the
 * state closes). */
engine *lengine_get(lua_State *L);

/* Built-in strategy userdata. */
typedef struct lstrategy {
  strategy *s;
} lstrategy;
lstrategy *lstrategy_test(lua_State *L, int idx);
void lstrategy_register(lua_State *L);  /* fields on the module at -1 */
/* Pushes a new BlueGreenStrategy with defaults (used for rollbacks). */
strategy *lstrategy_push_bluegreen(lua_State *L);

void lmanager_register(lua_State *L);
void lhealth_register(lua_State *L);
void lparallel_register(lua_State *L);
void lgitops_register(lua_State *L);

/* Configuration. */
typedef struct lconfig {
  char state[1024];        /* store path */
  int virtual_clock;       /* 1 virtual, 0 real, -1 not set (keep the engine's) */
  size_t ntargets;
  target_config **targets; /* owned */
} lconfig;
/* Reads the config (table at idx, or a path to a Lua file returning one);
 * raises a Lua error naming the field on bad input. On return the config is
 * owned by the userdata pushed on the stack (freed by its __gc) */
lconfig *lconfig_load(lua_State *L, int idx, engine *e);
void lconfig_free(lconfig *c);
target_config *lconfig_target(lconfig *c, const char *name);
/* "known: a, b" list for error messages. */
void lconfig_known(const lconfig *c, char *buf, size_t size);

/* ---- the manager, for other bindings (GitOps, parallel) ---- */

typedef void (*lmanager_done_cb)(void *payload, const rollout_result *res);
/* Starts a deployment of `target` through the DeploymentManager at
 * manager_idx, with the strategy at strategy_idx (a built-in strategy, a
 * DeploymentStrategy class or instance; 0 for the manager's default),
 * recording metadata_json (a JSON object or NULL) in the deployment row.
 * Does not run the loop: cb runs once, from the loop, when the deployment
 * has ended. Returns DC_OK, or DC_LOCKED / DC_ERROR with err filled (then cb
 * never runs and nothing was changed). Raises a Lua error for a programming
 * mistake (unknown target, bad version). */
int lmanager_start(lua_State *L, int manager_idx, const char *target, const char *version, int strategy_idx,
                   const char *metadata_json, lmanager_done_cb cb, void *payload, char *err);
/* Pushes the strategy registered with the manager under `name` (see
 * DeploymentManager{ strategies = { ring = Ring } } and
 * manager:register_strategy), or nil; returns the pushed type. */
int lmanager_push_strategy(lua_State *L, int manager_idx, const char *name);
/* The manager's store, engine and target configurations (raises if idx is
 * not an open DeploymentManager). */
store *lmanager_store(lua_State *L, int manager_idx);
engine *lmanager_engine(lua_State *L, int manager_idx);
target_config *lmanager_target(lua_State *L, int manager_idx, const char *name); /* NULL if unknown */
void lmanager_known(lua_State *L, int manager_idx, char *buf, size_t size);

/* ---- waiting without blocking other work ----
 * Runs the loop until *flag becomes nonzero, resuming coroutines of
 * deploy.parallel and Lua strategies whose waits completed meanwhile. Must
 * not be called from inside an event handler (raises if it is). */
void lsched_block(lua_State *L, volatile int *flag);

/* Raises unless every key of the table at idx is one of `allowed`
 * (NULL-terminated). fmt gets the offending key, then the known ones:
 * "deploy: CanaryStrategy has no parameter '%s' (known: %s)". */
void lcheck_keys(lua_State *L, int idx, const char *const *allowed, const char *fmt);

/* t[key] = v for the table on top of the stack. */
void lset_string(lua_State *L, const char *key, const char *v);
void lset_integer(lua_State *L, const char *key, lua_Integer v);
void lset_number(lua_State *L, const char *key, lua_Number v);
void lset_boolean(lua_State *L, const char *key, int v);

/* Pushes an integer when v is integral (10, not 10.0), else a float. */
void lpush_number(lua_State *L, double v);

/* Raise with a message built in a stack buffer (never with heap memory
 * still owned by the C frame). */
int lerror(lua_State *L, const char *msg);

/* Encodes the value at idx as JSON with lua-cjson (pushes nothing; result
 * copied into a heap string the caller frees). Raises on values cjson
 * refuses. NULL for nil. */
char *ljson_encode(lua_State *L, int idx, const char *what);
/* Decodes JSON text and pushes the value (nil for NULL). */
void ljson_decode(lua_State *L, const char *json);

#endif
