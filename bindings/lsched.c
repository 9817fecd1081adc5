/* The scheduler: coroutines (deploy.parallel's functions, Lua strategies'
 * execute, hooks) that wait for the engine without blocking it.
 *
 * A task waits by yielding (lua_yieldk) after handing an action to the
 * engine; the action's completion, which runs inside a libuv callback, only
 * marks the task ready. Tasks are resumed between loop iterations, never
 * inside a callback, so a task may itself start actions, and uv_run is never
 * re-entered. Code that is not in a task (a script's main chunk) waits with
 * lsched_block, which runs the loop and resumes ready tasks meanwhile. */
#include <stdlib.h>
#include <string.h>

#include "lsched.h"

#include "lutil.h"
#include "rollout.h"
#include "util.h"

#define SCHED_KEY "deploy.Scheduler"

typedef struct deferred {
  void (*fn)(lua_State *L, void *payload);
  void *payload;
  struct deferred *next;
} deferred;

struct lsched {
  ltask *ready_head, *ready_tail;
  deferred *defer_head, *defer_tail;
  int deferring;       /* a deferred call runs (and may be waiting) */
  lua_State *running;  /* the thread now driving the loop (for callbacks) */
  int in_callback;     /* inside engine_run_once */
};

static lsched *sched_get(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, SCHED_KEY) == LUA_TUSERDATA) {
    lsched *s = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return s;
  }
  lua_pop(L, 1);
  lsched *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  lua_setfield(L, LUA_REGISTRYINDEX, SCHED_KEY);
  return s;
}

#define TASKS_KEY "deploy.Tasks"

/* thread -> task, weak keys: the scheduler's own table, so that threads of
 * other libraries are never mistaken for tasks. */
static void push_tasks(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, TASKS_KEY) == LUA_TTABLE)
    return;
  lua_pop(L, 1);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, TASKS_KEY);
}

ltask *lsched_current(lua_State *L) {
  push_tasks(L);
  lua_pushthread(L);
  lua_rawget(L, -2);
  ltask *t = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return t;
}

lua_State *lsched_callback_state(lua_State *L) {
  lsched *s = sched_get(L);
  return s->running ? s->running : L;
}


/* ---- the watchdog ---- */

/* Where the hook finds its task without a table lookup: the thread's extra
 * space (a copy of the main thread's for other threads, so it is checked
 * against the task it names). */
static ltask *task_of(lua_State *co) {
  ltask *t = *(ltask **)lua_getextraspace(co);
  return t && t->co == co ? t : NULL;
}

#define WATCHDOG_COUNT 10000 /* instructions between looks at the clock */

static void watchdog(lua_State *co, lua_Debug *ar) {
  (void)ar;
  ltask *t = task_of(co);
  char msg[256];
  if (!t)
    return;
  if (dc_interrupts != t->seen_interrupts) {
    t->seen_interrupts = dc_interrupts;
    luaL_error(co, "interrupted by the operator (SIGINT/SIGTERM) while %s was running",
               t->what ? t->what : "Lua code");
  }
  double now = dc_wall_now();
  if (t->deadline > 0 && now > t->deadline) {
    dc_fmt(msg, sizeof msg, "%s timed out: still running after %g s", t->what ? t->what : "task",
           t->slice);
    lerror(co, msg);
  }
  if (t->slice > 0 && now > t->slice_end) {
    dc_fmt(msg, sizeof msg, "%s ran %g s without waiting (a loop that never yields?): it is stopped so the "
           "deployment can end safely; wait with d:wait() or deploy.sleep()",
           t->what ? t->what : "task", t->slice);
    lerror(co, msg);
  }
}

void lsched_bound(ltask *t, const char *what, double slice, double deadline) {
  t->what = what;
  t->slice = slice;
  t->deadline = deadline;
}

ltask *lsched_spawn(lua_State *L, int nargs, ltask_finish finish, void *payload) {
  ltask *t = calloc(1, sizeof *t);
  if (!t) {
    lua_pop(L, nargs + 1);
    return NULL;
  }
  lua_State *co = lua_newthread(L);
  *(ltask **)lua_getextraspace(co) = t;
  lua_sethook(co, watchdog, LUA_MASKCOUNT, WATCHDOG_COUNT);
  t->co = co;
  t->finish = finish;
  t->payload = payload;
  t->nargs = nargs;
  t->sched = sched_get(L);
  push_tasks(L);
  lua_pushvalue(L, -2);
  lua_pushlightuserdata(L, t);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the thread */
  lua_xmove(L, co, nargs + 1);             /* function and arguments */
  t->main = L;
  return t;
}

void lsched_ready(ltask *t) {
  if (!t || t->queued)
    return;
  lsched *s = t->sched;
  t->queued = 1;
  t->next = NULL;
  if (s->ready_tail)
    s->ready_tail->next = t;
  else
    s->ready_head = t;
  s->ready_tail = t;
}

static void task_release(lua_State *L, ltask *t) {
  push_tasks(L);
  lua_pushthread(t->co);
  lua_xmove(t->co, L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, t->ref);
  free(t);
}

void lsched_on_cancel(ltask *t, void (*fn)(void *), void *payload) {
  t->on_cancel = fn;
  t->cancel_payload = payload;
}

void lsched_cancel(lua_State *L, ltask *t) {
  /* A cancelled task is never resumed again. What it waits for is undone
   * when it can be; otherwise that completion finds it cancelled and frees
   * it then. */
  t->cancelled = 1;
  if (t->waiting && t->on_cancel && !t->queued) {
    t->on_cancel(t->cancel_payload);
    t->waiting = 0;
  }
  if (!t->queued && !t->running && !t->waiting)
    task_release(L, t);
}

/* Resumes one task; on its end hands its results to finish, then frees. */
static void resume(lua_State *L, ltask *t) {
  int nres = 0;
  int nargs = t->started ? 0 : t->nargs;
  t->started = 1;
  t->running = 1;
  t->waiting = 0;
  t->on_cancel = NULL;
  t->seen_interrupts = dc_interrupts;
  t->slice_end = dc_wall_now() + t->slice;
  int status = lua_resume(t->co, L, nargs, &nres);
  t->running = 0;
  if (status == LUA_YIELD && t->waiting) {
    lua_pop(t->co, nres);
    if (t->cancelled)
      task_release(L, t);
    return;
  }
  if (status == LUA_YIELD) {
    /* A yield that no deploy action asked for (coroutine.yield in a
     * strategy or a hook): nothing would ever resume it. It fails now,
     * and the rollout ends safely, instead of waiting forever. */
    lua_pop(t->co, nres);
    lua_pushfstring(t->co, "%s yielded outside a deploy action (coroutine.yield?): wait with d:wait(), "
                           "d:health() or deploy.sleep() instead",
                    t->what ? t->what : "a task");
    status = LUA_ERRRUN;
  }
  if (status != LUA_OK) {
    const char *msg = lua_tostring(t->co, -1);
    luaL_traceback(t->co, t->co, msg ? msg : "(error object is not a string)", 0);
    lua_remove(t->co, -2);
    nres = 1;
  }
  if (t->finish && !t->cancelled)
    t->finish(L, t, status, nres);
  task_release(L, t);
}


int lsched_pcall_bounded(lua_State *L, int nargs, const char *what, double slice) {
  lua_Hook old = lua_gethook(L);
  int mask = lua_gethookmask(L), count = lua_gethookcount(L);
  ltask probe;
  memset(&probe, 0, sizeof probe);
  probe.co = L;
  probe.what = what;
  probe.slice = slice;
  probe.slice_end = dc_wall_now() + slice;
  probe.seen_interrupts = dc_interrupts;
  ltask **slot = lua_getextraspace(L);
  ltask *saved = *slot;
  *slot = &probe;
  lua_sethook(L, watchdog, LUA_MASKCOUNT, WATCHDOG_COUNT);
  int rc = lua_pcall(L, nargs, 0, 0);
  *slot = saved;
  lua_sethook(L, old, mask, count);
  return rc;
}

int lsched_defer(lua_State *L, void (*fn)(lua_State *L, void *payload), void *payload) {
  lsched *s = sched_get(L);
  deferred *d = malloc(sizeof *d);
  if (!d)
    return -1;
  d->fn = fn;
  d->payload = payload;
  d->next = NULL;
  if (s->defer_tail)
    s->defer_tail->next = d;
  else
    s->defer_head = d;
  s->defer_tail = d;
  return 0;
}

/* Deferred calls first (events reach their handlers before the tasks that
 * wait for the deployment hear that it ended). */
static void run_deferred(lua_State *L, lsched *s) {
  if (s->deferring)
    return;
  s->deferring = 1;
  while (s->defer_head) {
    deferred *d = s->defer_head;
    s->defer_head = d->next;
    if (!s->defer_head)
      s->defer_tail = NULL;
    d->fn(L, d->payload);
    free(d);
  }
  s->deferring = 0;
}

void lsched_run_ready(lua_State *L) {
  lsched *s = sched_get(L);
  run_deferred(L, s);
  while (s->ready_head) {
    ltask *t = s->ready_head;
    s->ready_head = t->next;
    if (!s->ready_head)
      s->ready_tail = NULL;
    t->queued = 0;
    if (t->running)
      continue; /* it is blocked in a nested wait; that wait ends on its own */
    if (t->cancelled) {
      task_release(L, t);
      continue;
    }
    resume(L, t);
  }
}

void lsched_check_can_wait(lua_State *L) {
  if (sched_get(L)->in_callback)
    luaL_error(L, "deploy: cannot wait inside an event handler: an on_event function must return at once "
                  "(record what it needs and act after deploy() returns, or in a hook)");
}

void lsched_block(lua_State *L, volatile int *flag) {
  lsched *s = sched_get(L);
  lsched_check_can_wait(L);
  engine *e = lengine_get(L);
  lua_State *prev = s->running;
  s->running = L;
  sig_atomic_t seen = dc_interrupts;
  for (;;) {
    lsched_run_ready(L);
    if (*flag)
      break;
    if (dc_interrupts != seen) {
      /* Ctrl-C: back to the old version, safely; again: still the same
       * abort, never a half-done state. */
      seen = dc_interrupts;
      rollout_abort_all("interrupted by the operator (SIGINT/SIGTERM)");
    }
    s->in_callback = 1;
    int more = engine_run_once(e);
    s->in_callback = 0;
    if (!more && !s->ready_head && !s->defer_head && !*flag) {
      s->running = prev;
      luaL_error(L, "deploy: nothing left to wait for (a coroutine yielded outside a deploy action?)");
    }
  }
  s->running = prev;
}

int lsched_await(lua_State *L, volatile int *flag, lua_KContext ctx, lua_KFunction k) {
  ltask *t = lsched_current(L);
  if (t && lua_isyieldable(L) && !*flag) {
    t->waiting = 1;
    return lua_yieldk(L, 0, ctx, k);
  }
  lsched_block(L, flag);
  return k(L, LUA_OK, ctx);
}
