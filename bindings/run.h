/* One deployment seen from Lua: the Deployment value handed to strategies
 * and hooks, its methods (d:start, d:set_traffic, d:wait, ...), the Lua
 * strategy's coroutine and the hooks. manager.c starts runs; run.c keeps
 * them going. */
#ifndef DEPLOY_RUN_H
#define DEPLOY_RUN_H

#include "bindings.h"

typedef struct lrun_spec {
  engine *e;
  store *s;
  target_config *t;
  const char *version;
  const char *kind;          /* "deploy" or "rollback" */
  int strategy_idx;          /* built-in strategy userdata or Lua strategy table */
  int hooks_idx;             /* table of hooks from the options, or 0 */
  double hook_timeout;       /* seconds; default 30 */
  int metadata_idx;          /* table, or 0 */
  int on_event_idx;          /* function, or 0 */
  int on_event2_idx;         /* the manager's handler, or 0 */
  lmanager_done_cb cb;
  void *payload;
} lrun_spec;

/* Validates the hooks and the strategy (raising for programming mistakes),
 * asks strategy:validate(d), then starts the rollout. DC_OK: cb runs once
 * when it ends. DC_LOCKED / DC_ERROR: err says why, cb never runs, nothing
 * changed. */
int lrun_start(lua_State *L, const lrun_spec *spec, char *err);

void lrun_register(lua_State *L);
/* Pushes an event as the table handlers and manager:events() see. */
void lrun_push_event(lua_State *L, const store_event *ev);

/* Ctrl-C: every running rollout of this process aborts safely. */
void lrun_interrupt_all(const char *reason);

#endif
