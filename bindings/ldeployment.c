/* The Deployment value and the life of one run from Lua: event handlers,
 * hooks (each a coroutine with a timeout), and Lua strategies (execute(d)
 * in a coroutine whose d:* methods hand actions to the rollout and yield).
 * A Lua strategy reaches the runtime as a strategy vtable whose drive()
 * starts that coroutine: the rollout does not know it is Lua. */
#include "ldeployment.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lsched.h"
#include "lstrategy.h"
#include "lutil.h"
#include "lwebhook.h"
#include "util.h"

#define DEPLOYMENT_MT "deploy.Deployment"
#define RUNREF_MT "deploy.RunRef"

typedef struct lrun lrun;
typedef struct lrunref {
  lrun *run;
} lrunref;

struct lrun {
  strategy drv;            /* first: a Lua strategy drives the rollout through it */
  char name[64];           /* drv.name */
  lua_State *L;            /* the thread that started it */
  engine *e;
  rollout *r;              /* NULL once the rollout has ended */
  int refs;                /* the rollout, plus each live task of ours */
  lrunref *ud;             /* d._run: cleared when the run is freed */
  int d_ref, strategy_ref, hooks_ref, handler_ref, handler2_ref;
  double hook_timeout;
  lrun_done_cb cb;
  void *payload;
  int is_lua;
  ltask *strategy_task;

  /* the action a task waits for */
  int act_done, act_ok, awaiting;
  ltask *waiter;
  char act_err[DC_ERR_MAX];
  rollout_health health;

  /* the hook in progress */
  ltask *hook_task;
  rollout_hook_done hook_done;
  rollout *hook_r;
  hook_kind hook_kind;
  engine_timer *hook_timer;
  char hook_what[64];       /* "hook before_step", for the watchdog's messages */

  /* a built-in strategy run from a Lua strategy */
  const strategy *builtin;
  int builtin_final;

  rollout_hooks hooks;     /* lives as long as the rollout (the run outlives it) */
};

static void unref_all(lua_State *L, lrun *run) {
  int *refs[] = {&run->d_ref, &run->strategy_ref, &run->hooks_ref, &run->handler_ref, &run->handler2_ref};
  for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++) {
    luaL_unref(L, LUA_REGISTRYINDEX, *refs[i]);
    *refs[i] = LUA_NOREF;
  }
}

static void run_unref(lua_State *L, lrun *run) {
  if (--run->refs > 0)
    return;
  if (run->ud)
    run->ud->run = NULL;
  unref_all(L, run);
  free(run);
}

static lua_State *cb_state(lrun *run) { return lsched_callback_state(run->L); }

/* ---- events ---- */

void lrun_push_event(lua_State *L, const store_event *ev) {
  char ts[40];
  lua_createtable(L, 0, 6);
  lset_string(L, "deployment_id", ev->deployment_id);
  lset_string(L, "target", ev->target);
  lset_string(L, "kind", ev->kind);
  lset_number(L, "ts", ev->ts);
  dc_iso8601(ev->ts, ts, sizeof ts);
  lset_string(L, "time", ts);
  ljson_decode(L, ev->data);
  lua_setfield(L, -2, "data");
}

void lrun_push_result(lua_State *L, const rollout_result *r) {
  lua_createtable(L, 0, 7);
  lset_boolean(L, "success", r->success);
  lset_string(L, "version", r->version);
  lset_string(L, "target", r->target);
  lset_string(L, "strategy", r->strategy);
  lset_number(L, "duration", r->duration);
  if (r->locked)
    lset_boolean(L, "locked", 1);
  if (r->nerrors > 0) {
    lpush_strings(L, r->errors, r->nerrors);
    lua_setfield(L, -2, "errors");
  }
}

static void call_handler(lua_State *L, int ref, const store_event *ev, double limit) {
  if (ref == LUA_NOREF || ref == LUA_REFNIL)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lrun_push_event(L, ev);
  if (lsched_pcall_bounded(L, 1, "an on_event handler", limit) != LUA_OK) {
    fprintf(stderr, "deploy: on_event handler failed: %s\n", luaL_tolstring(L, -1, NULL));
    lua_pop(L, 2);
  }
}

/* An event on its way to the handlers: they run from the scheduler, not
 * inside the loop callback that recorded it, so a handler may read the
 * store (m:instances()) or the router. */
typedef struct pending_event {
  lrun *run;
  store_event ev;
} pending_event;

static void deliver_event(lua_State *L, void *payload) {
  pending_event *pe = payload;
  call_handler(L, pe->run->handler_ref, &pe->ev, pe->run->hook_timeout);
  call_handler(L, pe->run->handler2_ref, &pe->ev, pe->run->hook_timeout);
  run_unref(L, pe->run);
  store_event_clear(&pe->ev);
  free(pe);
}

static void on_event(void *payload, const store_event *ev) {
  lrun *run = payload;
  if (run->handler_ref == LUA_NOREF && run->handler2_ref == LUA_NOREF)
    return;
  pending_event *pe = calloc(1, sizeof *pe);
  if (!pe)
    return;
  pe->run = run;
  pe->ev = *ev;
  pe->ev.data = ev->data ? strdup(ev->data) : NULL;
  run->refs++;
  if (lsched_defer(run->L, deliver_event, pe) != 0) {
    run->refs--;
    free(pe->ev.data);
    free(pe);
  }
}

/* ---- the end of the rollout ---- */

static void on_done(void *payload, const rollout_result *res) {
  lrun *run = payload;
  run->r = NULL;
  if (run->cb)
    run->cb(run->payload, res);
  run_unref(cb_state(run), run);
}

/* ---- hooks ---- */

/* Indexed by hook_kind (rollout.h). */
static const char *const hook_names[] = {"before_deploy", "before_step", "after_step", "analysis", "before_promote",
                                         "on_promote",    "on_abort",    "on_rollback", NULL};

static void push_health(lua_State *L, const rollout_health *h) {
  lua_createtable(L, 0, 4);
  lset_string(L, "state", health_state_name(h->state));
  lset_integer(L, "ok", h->ok);
  lset_integer(L, "checked", h->checked);
  if (h->detail[0]) {
    lset_string(L, "detail", h->detail);
  }
}

static void hook_ends(lrun *run, lua_State *L, int ok, const char *err) {
  engine_timer_cancel(run->hook_timer);
  run->hook_timer = NULL;
  run->hook_task = NULL;
  rollout_hook_done done = run->hook_done;
  rollout *r = run->hook_r;
  run->hook_done = NULL;
  if (done)
    done(r, ok, err);
  run_unref(L, run);
}

/* Text from Lua (an error, a reason) with secrets redacted, as a Lua
 * string on co's stack: redacted before any buffer could cut a secret in
 * half, where it would no longer be recognised. */
static const char *redacted(lua_State *co, int idx) {
  const char *s = lua_tostring(co, idx);
  char *copy = strdup(s ? s : "(error object is not a string)");
  if (!copy)
    return "(out of memory)";
  dc_redact(copy);
  lua_pushstring(co, copy);
  free(copy);
  return lua_tostring(co, -1);
}

/* The error a task ended with, as a message: "<prefix> raised: <error>",
 * or the error alone when the scheduler wrote it and it already names the
 * task (a foreign yield, the watchdog), so no message says it twice. */
static void raised(ltask *t, const char *prefix, char *msg, size_t n) {
  const char *e = redacted(t->co, -1);
  if (t->what && strncmp(e, t->what, strlen(t->what)) == 0)
    dc_strlcpy(msg, e, n);
  else
    dc_fmt(msg, n, "%s raised: %s", prefix, e);
}

/* false (or "fail") fails a hook; for analysis the second value says why. */
static void hook_finished(lua_State *L, ltask *t, int status, int nres) {
  lrun *run = t->payload;
  char msg[DC_ERR_MAX];
  const char *name = hook_names[run->hook_kind];
  if (status != LUA_OK) {
    char prefix[64];
    dc_fmt(prefix, sizeof prefix, "hook %s", name);
    raised(t, prefix, msg, sizeof msg);
    hook_ends(run, L, 0, msg);
    return;
  }
  int failed = 0;
  if (nres >= 1) {
    int first = lua_gettop(t->co) - nres + 1;
    failed = (lua_type(t->co, first) == LUA_TBOOLEAN && !lua_toboolean(t->co, first)) ||
             (lua_type(t->co, first) == LUA_TSTRING && strcmp(lua_tostring(t->co, first), "fail") == 0);
    if (failed && nres >= 2 && lua_type(t->co, first + 1) == LUA_TSTRING)
      dc_fmt(msg, sizeof msg, "hook %s said fail: %s", name, redacted(t->co, first + 1));
    else if (failed)
      dc_fmt(msg, sizeof msg, "hook %s returned false", name);
  }
  hook_ends(run, L, !failed, failed ? msg : NULL);
}

static void hook_timed_out(void *payload) {
  lrun *run = payload;
  char msg[DC_ERR_MAX];
  lua_State *L = cb_state(run);
  run->hook_timer = NULL;
  if (run->hook_task)
    lsched_cancel(L, run->hook_task);
  dc_fmt(msg, sizeof msg, "hook %s timed out after %g s", hook_names[run->hook_kind], run->hook_timeout);
  hook_ends(run, L, 0, msg);
}

static int push_hook_args(lua_State *L, lrun *run, hook_kind kind, double pct, const rollout_health *h,
                          const char *reason) {
  switch (kind) {
  case HOOK_BEFORE_STEP:
  case HOOK_ON_ROLLBACK:
    lpush_number(L, pct);
    break;
  case HOOK_AFTER_STEP:
    lpush_number(L, pct);
    push_health(L, h);
    break;
  case HOOK_ON_ABORT:
    lua_pushstring(L, reason ? reason : "aborted");
    break;
  default:
    break;
  }
  int n = kind == HOOK_AFTER_STEP ? 2 : (kind == HOOK_BEFORE_STEP || kind == HOOK_ON_ROLLBACK || kind == HOOK_ON_ABORT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, run->d_ref);
  return n + 1;
}

static int hooks_run(void *payload, rollout *r, hook_kind kind, double pct, const rollout_health *h,
                     const char *reason, rollout_hook_done done) {
  lrun *run = payload;
  run->r = r;
  if (run->hooks_ref == LUA_NOREF)
    return 0;
  lua_State *L = cb_state(run);
  lua_rawgeti(L, LUA_REGISTRYINDEX, run->hooks_ref);
  if (lua_getfield(L, -1, hook_names[kind]) != LUA_TFUNCTION) {
    lua_pop(L, 2);
    return 0;
  }
  lua_remove(L, -2);
  int nargs = push_hook_args(L, run, kind, pct, h, reason);
  ltask *t = lsched_spawn(L, nargs, hook_finished, run);
  if (!t) {
    done(r, 0, "out of memory starting the hook");
    return 1;
  }
  run->refs++;
  run->hook_task = t;
  run->hook_done = done;
  run->hook_r = r;
  run->hook_kind = kind;
  run->hook_timer = engine_timer_start(run->e, run->hook_timeout, hook_timed_out, run);
  /* A hook that never yields cannot be stopped by the timer: the
   * watchdog bounds its run, its waits included. */
  dc_fmt(run->hook_what, sizeof run->hook_what, "hook %s", hook_names[kind]);
  lsched_bound(t, run->hook_what, run->hook_timeout, dc_wall_now() + run->hook_timeout);
  lsched_ready(t);
  return 1;
}

static const rollout_hooks lua_hooks = {hooks_run, NULL, NULL};

/* ---- d:* actions ---- */

static lrun *check_run(lua_State *L, const char *method) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "_run");
  lrunref *ref = luaL_testudata(L, -1, RUNREF_MT);
  lua_pop(L, 1);
  if (!ref)
    luaL_error(L, "deploy: d:%s(): d is not a Deployment handed out by DeploymentManager:deploy", method);
  if (!ref->run || !ref->run->r)
    luaL_error(L, "deploy: d:%s(): this deployment has already ended", method);
  return ref->run;
}

/* Actions that move the rollout belong to the strategy's execute(d);
 * hooks may look (d:health(), d:log()) but not steer. */
static lrun *check_task_run(lua_State *L, const char *method) {
  lrun *run = check_run(L, method);
  ltask *t = lsched_current(L);
  if (!t)
    luaL_error(L, "deploy: d:%s() waits for the engine: call it from the strategy's execute(d)", method);
  if (strcmp(method, "health") != 0 && t != run->strategy_task)
    luaL_error(L, "deploy: d:%s() can only be called from the strategy's execute(d), not from a hook", method);
  if (run->waiter)
    luaL_error(L, "deploy: d:%s(): another action of this deployment is still in progress", method);
  return run;
}

static void action_done(void *payload, int ok, const char *err) {
  lrun *run = payload;
  run->act_ok = ok;
  dc_strlcpy(run->act_err, err ? err : "", sizeof run->act_err);
  run->act_done = 1;
  ltask *waiter = run->waiter;
  run->waiter = NULL;
  if (run->awaiting)
    lsched_ready(waiter);
}

static int action_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lrun *run = (lrun *)ctx;
  run->waiter = NULL;
  run->awaiting = 0;
  lua_pushboolean(L, run->act_ok);
  if (run->act_ok)
    return 1;
  lua_pushstring(L, run->act_err);
  return 2;
}

static int start_action(lua_State *L, lrun *run, const strategy_action *a, lua_KFunction k) {
  ltask *t = lsched_current(L);
  run->waiter = t;
  run->act_done = 0;
  run->awaiting = 0;
  rollout_action(run->r, a, action_done, run);
  if (!run->act_done)
    run->awaiting = 1;
  return lsched_await(L, &run->act_done, (lua_KContext)run, k);
}

/* d:start(n) starts the new instances and returns once they are healthy
 * (true), or false and why. */
static int start_then_healthy(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lrun *run = (lrun *)ctx;
  run->waiter = NULL;
  run->awaiting = 0;
  if (!run->act_ok || !run->r)
    return action_k(L, LUA_OK, ctx);
  strategy_action a = {.kind = ACTION_WAIT_HEALTHY};
  return start_action(L, run, &a, action_k);
}

static int d_start(lua_State *L) {
  lrun *run = check_task_run(L, "start");
  lua_Integer n = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, n >= 0 && n <= 64, 2, "instances must be between 1 and 64");
  strategy_action a = {.kind = ACTION_START, .seconds = (double)n};
  return start_action(L, run, &a, start_then_healthy);
}

static int d_set_traffic(lua_State *L) {
  lrun *run = check_task_run(L, "set_traffic");
  if (lua_type(L, 2) != LUA_TNUMBER)
    return luaL_error(L, "deploy: d:set_traffic(pct): pct must be a number in 0..100, got %s", luaL_typename(L, 2));
  double pct = lua_tonumber(L, 2);
  if (!(pct >= 0 && pct <= 100))
    return luaL_error(L, "deploy: d:set_traffic(pct): pct must be in 0..100, got %f", pct);
  strategy_action a = {.kind = ACTION_TRAFFIC, .pct = pct};
  return start_action(L, run, &a, action_k);
}

static int d_wait(lua_State *L) {
  lrun *run = check_task_run(L, "wait");
  if (lua_type(L, 2) != LUA_TNUMBER || !(lua_tonumber(L, 2) >= 0))
    return luaL_error(L, "deploy: d:wait(seconds): seconds must be a number >= 0");
  strategy_action a = {.kind = ACTION_WAIT, .seconds = lua_tonumber(L, 2)};
  return start_action(L, run, &a, action_k);
}

static int d_pause(lua_State *L) {
  lrun *run = check_task_run(L, "pause");
  strategy_action a = {.kind = ACTION_PAUSE};
  return start_action(L, run, &a, action_k);
}

static int d_promote(lua_State *L) {
  lrun *run = check_task_run(L, "promote");
  strategy_action a = {.kind = ACTION_PROMOTE};
  return start_action(L, run, &a, action_k);
}

static int d_abort(lua_State *L) {
  lrun *run = check_task_run(L, "abort");
  strategy_action a = {.kind = ACTION_ABORT};
  luaL_optstring(L, 2, NULL);
  dc_strlcpy(a.reason, lua_isnoneornil(L, 2) ? "aborted by the strategy" : redacted(L, 2), sizeof a.reason);
  return start_action(L, run, &a, action_k);
}

static void health_done(void *payload, const rollout_health *h) {
  lrun *run = payload;
  run->health = *h;
  run->act_ok = 1;
  run->act_done = 1;
  ltask *waiter = run->waiter;
  run->waiter = NULL;
  if (run->awaiting)
    lsched_ready(waiter);
  /* the round held the run: a hook cut off meanwhile may be gone */
  run_unref(cb_state(run), run);
}

static int health_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lrun *run = (lrun *)ctx;
  run->waiter = NULL;
  run->awaiting = 0;
  push_health(L, &run->health);
  return 1;
}

static int d_health(lua_State *L) {
  lrun *run = check_task_run(L, "health");
  ltask *t = lsched_current(L);
  run->waiter = t;
  run->act_done = 0;
  run->awaiting = 0;
  run->refs++;
  rollout_check_health(run->r, health_done, run);
  if (!run->act_done)
    run->awaiting = 1;
  (void)t;
  return lsched_await(L, &run->act_done, (lua_KContext)run, health_k);
}

static int d_log(lua_State *L) {
  lrun *run = check_run(L, "log");
  char *json = NULL, err[DC_ERR_MAX];
  if (lua_type(L, 2) == LUA_TSTRING) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "message");
    json = ljson_encode(L, -1, "d:log(event)", RECORD_EVENT_MAX);
  } else if (lua_type(L, 2) == LUA_TTABLE) {
    json = ljson_encode(L, 2, "d:log(event)", RECORD_EVENT_MAX);
    if (json && json[0] != '{') {
      free(json);
      return luaL_error(L, "deploy: d:log(event): event must be a table of fields, not a list");
    }
  } else {
    return luaL_error(L, "deploy: d:log(event): event must be a string or a table, got %s", luaL_typename(L, 2));
  }
  int rc = rollout_log(run->r, "log", json, err);
  free(json);
  if (rc != 0)
    return lerror(L, err);
  return 0;
}

/* ---- a built-in strategy inside a Lua strategy: canary:execute(d) ---- */

static int builtin_step(lua_State *L, lrun *run);

static int builtin_after(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lrun *run = (lrun *)ctx;
  run->waiter = NULL;
  run->awaiting = 0;
  if (run->builtin_final || !run->r) {
    run->builtin = NULL;
    lua_pushboolean(L, run->act_ok && run->builtin_final == 1);
    if (run->act_ok && run->builtin_final == 1)
      return 1;
    lua_pushstring(L, run->act_err[0] ? run->act_err : "aborted");
    return 2;
  }
  rollout_record(run->r, run->act_ok, run->act_ok ? NULL : run->act_err);
  return builtin_step(L, run);
}

/* The step machine's PROMOTE is not carried out: a delegated execute
 * returns true to its caller, whose strategy goes on (a hold, a pause);
 * the rollout promotes when the outermost execute(d) returns, or on
 * d:promote(). */
static int builtin_step(lua_State *L, lrun *run) {
  strategy_action a;
  rollout_next_action(run->r, run->builtin, &a);
  if (a.kind == ACTION_PROMOTE) {
    run->builtin = NULL;
    lua_pushboolean(L, 1);
    return 1;
  }
  if (a.kind == ACTION_ABORT)
    run->builtin_final = 2;
  return start_action(L, run, &a, builtin_after);
}

static int d_run_builtin(lua_State *L) {
  lrun *run = check_task_run(L, "execute");
  strategy *st = lstrategy_test(L, 2);
  if (!st)
    return luaL_error(L, "deploy: only built-in strategies run through d._run_builtin");
  run->builtin = st;
  run->builtin_final = 0;
  rollout_delegate_begin(run->r);
  lua_settop(L, 2); /* keeps the strategy alive while it runs */
  return builtin_step(L, run);
}

/* ---- the Lua strategy's coroutine ---- */

static void ignore_action(void *payload, int ok, const char *err) {
  (void)payload;
  (void)ok;
  (void)err;
}

static void end_with(lrun *run, action_kind kind, const char *reason) {
  if (!run->r || rollout_ending(run->r))
    return;
  strategy_action a;
  memset(&a, 0, sizeof a);
  a.kind = kind;
  if (reason)
    dc_strlcpy(a.reason, reason, sizeof a.reason);
  rollout_action(run->r, &a, ignore_action, NULL);
}

/* execute(d) returning normally promotes; false or an error aborts. */
static void strategy_finished(lua_State *L, ltask *t, int status, int nres) {
  lrun *run = t->payload;
  char msg[DC_ERR_MAX];
  run->strategy_task = NULL;
  if (status != LUA_OK) {
    raised(t, "strategy execute(d)", msg, sizeof msg);
    end_with(run, ACTION_ABORT, msg);
  } else {
    int first = lua_gettop(t->co) - nres + 1;
    if (nres >= 1 && lua_type(t->co, first) == LUA_TBOOLEAN && !lua_toboolean(t->co, first)) {
      dc_fmt(msg, sizeof msg, "strategy execute(d) returned false%s%s", nres >= 2 ? ": " : "",
             nres >= 2 && lua_isstring(t->co, first + 1) ? redacted(t->co, first + 1) : "");
      end_with(run, ACTION_ABORT, msg);
    } else {
      end_with(run, ACTION_PROMOTE, NULL);
    }
  }
  run_unref(L, run);
}

/* The rollout hands itself over once it is recorded and before_deploy
 * passed: execute(d) starts as a coroutine. */
static void lua_drive(strategy *s, rollout *r) {
  lrun *run = (lrun *)s;
  run->r = r;
  lua_State *L = cb_state(run);
  lua_rawgeti(L, LUA_REGISTRYINDEX, run->strategy_ref);
  lua_getfield(L, -1, "execute");
  lua_insert(L, -2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, run->d_ref);
  run->strategy_task = lsched_spawn(L, 2, strategy_finished, run);
  if (!run->strategy_task) {
    end_with(run, ACTION_ABORT, "out of memory starting the strategy's execute(d)");
    return;
  }
  run->refs++;
  /* A strategy stuck in a loop that never waits is stopped (and the
   * rollout aborted safely) after hook_timeout seconds without a wait. */
  lsched_bound(run->strategy_task, "strategy execute(d)", run->hook_timeout, 0);
  lsched_ready(run->strategy_task);
}

/* ---- starting ---- */

static void check_hooks(lua_State *L, int idx, const char *where) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int known = 0;
    if (lua_type(L, -2) == LUA_TSTRING)
      for (int i = 0; hook_names[i]; i++)
        known |= strcmp(hook_names[i], lua_tostring(L, -2)) == 0;
    if (!known)
      luaL_error(L, "deploy: %s.%s is not a hook (known: before_deploy, before_step, after_step, analysis, "
                    "before_promote, on_promote, on_abort, on_rollback)",
                 where, lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2));
    if (!lua_isfunction(L, -1))
      luaL_error(L, "deploy: %s.%s must be a function, got %s", where, lua_tostring(L, -2), luaL_typename(L, -1));
    lua_pop(L, 1);
  }
}

/* Pushes the hooks in force: the strategy's, overridden by the options'. */
static int push_hooks(lua_State *L, int strategy_idx, int hooks_idx) {
  lua_newtable(L);
  int merged = lua_gettop(L), any = 0;
  int t;
  if (lstrategy_test(L, strategy_idx))
    t = lua_getiuservalue(L, strategy_idx, 1);
  else
    t = lua_getfield(L, strategy_idx, "hooks");
  if (t == LUA_TTABLE) {
    check_hooks(L, lua_gettop(L), "strategy.hooks");
    for (int i = 0; hook_names[i]; i++) {
      if (lua_getfield(L, -1, hook_names[i]) != LUA_TNIL) {
        lua_setfield(L, merged, hook_names[i]);
        any = 1;
      } else {
        lua_pop(L, 1);
      }
    }
  } else if (t != LUA_TNIL && t != LUA_TNONE) {
    luaL_error(L, "deploy: strategy.hooks must be a table, got %s", luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  if (hooks_idx) {
    check_hooks(L, hooks_idx, "options.hooks");
    for (int i = 0; hook_names[i]; i++) {
      if (lua_getfield(L, hooks_idx, hook_names[i]) != LUA_TNIL) {
        lua_setfield(L, merged, hook_names[i]);
        any = 1;
      } else {
        lua_pop(L, 1);
      }
    }
  }
  return any;
}

static void drv_free(strategy *s) { (void)s; /* the run owns it */ }

static void push_deployment(lua_State *L, lrun *run, const char *id, const char *target, const char *version,
                            int strategy_idx, double created_at, int metadata_idx) {
  char ts[40];
  lua_createtable(L, 0, 7);
  lset_string(L, "id", id);
  lset_string(L, "target", target);
  lset_string(L, "version", version);
  lua_pushvalue(L, strategy_idx);
  lua_setfield(L, -2, "strategy");
  dc_iso8601(created_at, ts, sizeof ts);
  lset_string(L, "created_at", ts);
  if (metadata_idx)
    lua_pushvalue(L, metadata_idx);
  else
    lua_newtable(L);
  lua_setfield(L, -2, "metadata");
  lrunref *ref = lua_newuserdatauv(L, sizeof *ref, 0);
  ref->run = run;
  run->ud = ref;
  luaL_setmetatable(L, RUNREF_MT);
  lua_setfield(L, -2, "_run");
  luaL_setmetatable(L, DEPLOYMENT_MT);
}

static int strategy_accepts(lua_State *L, int strategy_idx, int d_idx, char *err) {
  lua_getfield(L, strategy_idx, "validate");
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    return 1;
  }
  lua_pushvalue(L, strategy_idx);
  lua_pushvalue(L, d_idx);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    dc_fmt(err, DC_ERR_MAX, "strategy validate(d) raised: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return 0;
  }
  int ok = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (!ok)
    dc_fmt(err, DC_ERR_MAX, "strategy refused the deployment: validate(d) returned false");
  return ok;
}

static const char *strategy_name(lua_State *L, int idx, char *buf, size_t size) {
  strategy *st = lstrategy_test(L, idx);
  if (st)
    return st->name;
  lua_getfield(L, idx, "name");
  dc_strlcpy(buf, lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "custom", size);
  lua_pop(L, 1);
  return buf;
}

/* The webhooks of this run: the strategy's (a built-in one's, checked
 * when it was made; a Lua class's `webhooks` field, checked now, raising),
 * with the spec's (a manifest's) over them. */
static int strategy_webhooks(lua_State *L, const lrun_spec *sp, strategy *builtin, webhook_list *out, char *err) {
  webhook_list own = {0};
  const webhook_list *base = builtin ? lstrategy_webhooks(L, sp->strategy_idx) : &own;
  if (!builtin) {
    if (lua_getfield(L, sp->strategy_idx, "webhooks") != LUA_TNIL)
      lwebhook_read(L, lua_gettop(L), "deploy: strategy webhooks", &own);
    lua_pop(L, 1);
  }
  int rc = webhook_list_merge(out, base, sp->webhooks, err);
  webhook_list_clear(&own);
  return rc;
}

int lrun_start(lua_State *L, const lrun_spec *sp, char *err) {
  int top = lua_gettop(L);
  char id[48], name[64];
  strategy *builtin = lstrategy_test(L, sp->strategy_idx);
  if (!builtin) {
    if (!lua_istable(L, sp->strategy_idx))
      luaL_error(L, "deploy: a strategy must be deploy.CanaryStrategy{...}, deploy.BlueGreenStrategy{...} or a "
                    "DeploymentStrategy class, got %s",
                 luaL_typename(L, sp->strategy_idx));
    lua_getfield(L, sp->strategy_idx, "execute");
    if (!lua_isfunction(L, -1))
      luaL_error(L, "deploy: strategy '%s' has no execute(d) method", strategy_name(L, sp->strategy_idx, name, sizeof name));
    lua_pop(L, 1);
  }
  int any_hooks = push_hooks(L, sp->strategy_idx, sp->hooks_idx);
  int hooks_idx = lua_gettop(L);
  /* May raise (what JSON cannot hold): before anything is allocated. */
  char *metadata = sp->metadata_idx ? ljson_encode(L, sp->metadata_idx, "options.metadata", 64 * 1024)
                                    : sp->metadata_json ? strdup(sp->metadata_json) : NULL;
  webhook_list webhooks;
  if (strategy_webhooks(L, sp, builtin, &webhooks, err) != 0) {
    free(metadata);
    lua_settop(L, top);
    return DC_ERROR;
  }
  lrun *run = calloc(1, sizeof *run);
  if (!run) {
    free(metadata);
    webhook_list_clear(&webhooks);
    return luaL_error(L, "deploy: out of memory");
  }
  run->L = L;
  run->e = service_engine(sp->svc);
  run->refs = 1;
  run->hook_timeout = sp->hook_timeout > 0 ? sp->hook_timeout : 30;
  run->cb = sp->cb;
  run->payload = sp->payload;
  run->is_lua = builtin == NULL;
  run->d_ref = run->strategy_ref = run->hooks_ref = run->handler_ref = run->handler2_ref = LUA_NOREF;
  double created = engine_now(run->e);
  dc_new_id(id, sizeof id);
  push_deployment(L, run, id, sp->target, sp->version, sp->strategy_idx, created, sp->metadata_idx);
  int d_idx = lua_gettop(L);
  if (!strategy_accepts(L, sp->strategy_idx, d_idx, err)) {
    run->ud->run = NULL;
    free(run);
    free(metadata);
    webhook_list_clear(&webhooks);
    lua_settop(L, top);
    return DC_ERROR;
  }
  run->d_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, sp->strategy_idx);
  run->strategy_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (any_hooks) {
    lua_pushvalue(L, hooks_idx);
    run->hooks_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if (sp->on_event_idx) {
    lua_pushvalue(L, sp->on_event_idx);
    run->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if (sp->on_event2_idx) {
    lua_pushvalue(L, sp->on_event2_idx);
    run->handler2_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  rollout_opts o = {.id = id, .created_at = created, .version = sp->version, .kind = sp->kind,
                    .strategy_name = strategy_name(L, sp->strategy_idx, name, sizeof name),
                    .metadata_json = metadata, .sink = {on_event, run}, .webhooks = &webhooks};
  if (any_hooks) {
    run->hooks = lua_hooks;
    run->hooks.payload = run;
    o.hooks = &run->hooks;
  }
  dc_strlcpy(run->name, o.strategy_name, sizeof run->name);
  run->drv.version = STRATEGY_VERSION;
  run->drv.name = run->name;
  run->drv.drive = lua_drive;
  run->drv.free = drv_free;
  strategy *st = builtin ? builtin : &run->drv;
  int rc = service_deploy(sp->svc, sp->target, st, &o, on_done, run, &run->r, err);
  free(metadata);
  webhook_list_clear(&webhooks);
  if (rc != DC_OK) {
    run->ud->run = NULL;
    unref_all(L, run);
    free(run);
    lua_settop(L, top);
    return rc;
  }
  lua_settop(L, top);
  return DC_OK;
}

void ldeployment_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"start", d_start},     {"set_traffic", d_set_traffic},
                                     {"wait", d_wait},       {"health", d_health},
                                     {"promote", d_promote}, {"abort", d_abort},
                                     {"pause", d_pause},     {"log", d_log},
                                     {"_run_builtin", d_run_builtin}, {NULL, NULL}};
  if (luaL_newmetatable(L, DEPLOYMENT_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "Deployment");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  luaL_newmetatable(L, RUNREF_MT);
  lua_pop(L, 1);
}
