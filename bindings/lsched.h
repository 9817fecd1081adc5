/* Coroutine tasks driven by the engine (see lsched.c). */
#ifndef DEPLOY_SCHED_H
#define DEPLOY_SCHED_H

#include <lauxlib.h>
#include <lua.h>

typedef struct ltask ltask;
typedef struct lsched lsched;
/* Called once when the task's function returned (status LUA_OK, nres
 * results on t->co's stack) or raised (status != LUA_OK, a traceback on
 * t->co's stack). Not called for a cancelled task. */
typedef void (*ltask_finish)(lua_State *L, ltask *t, int status, int nres);

struct ltask {
  lua_State *co;
  lua_State *main;
  lsched *sched;
  int ref;
  int nargs;
  int started, running, queued, cancelled;
  int waiting;   /* yielded in lsched_await: something will ready it */
  ltask_finish finish;
  void *payload;
  ltask *next;
  void (*on_cancel)(void *); /* undoes what the task waits for (a timer) */
  void *cancel_payload;
  /* The watchdog (an instruction-count hook, as for hooks): */
  double slice;          /* seconds it may run between two waits; 0: no bound */
  double deadline;       /* wall time by which it must have finished; 0: none */
  const char *what;      /* "strategy execute(d)", "hook before_step": for messages */
  double slice_end;      /* this resume's bound */
  int seen_interrupts;   /* dc_interrupts when it was resumed */
};

/* The function and nargs arguments on top of L become a task (popped); it
 * does not run until lsched_ready. NULL when out of memory (they are
 * popped all the same): callers inside loop callbacks cannot raise. */
ltask *lsched_spawn(lua_State *L, int nargs, ltask_finish finish, void *payload);
void lsched_ready(ltask *t);                 /* resume it at the next chance (from callbacks) */
/* Bounds a task the engine runs (a strategy, a hook): it fails with an
 * error naming `what` when it runs more than `slice` seconds without
 * waiting, when `deadline` (wall time, 0: none) passes, or when
 * SIGINT/SIGTERM arrives while it runs. */
void lsched_bound(ltask *t, const char *what, double slice, double deadline);
void lsched_cancel(lua_State *L, ltask *t);  /* never resume it again */
/* What to undo if the task is cancelled while it waits (cleared when it is
 * resumed). Without it, a cancelled task lives until its wait completes. */
void lsched_on_cancel(ltask *t, void (*fn)(void *), void *payload);
ltask *lsched_current(lua_State *L);         /* the task running as L, or NULL */
void lsched_run_ready(lua_State *L);
/* The thread to call Lua on from inside engine callbacks. */
lua_State *lsched_callback_state(lua_State *L);
/* Raises the "cannot wait inside an event handler" error when called from
 * inside a loop callback: call it before starting any work that will be
 * waited for, so nothing is left half-started. */
void lsched_check_can_wait(lua_State *L);
/* Waits until *flag: yields when L is a task (the completion must call
 * lsched_ready on it), else runs the loop. Then returns k(L, LUA_OK, ctx). */
int lsched_await(lua_State *L, volatile int *flag, lua_KContext ctx, lua_KFunction k);
/* Runs the function and nargs arguments on top of L (popped) under the
 * watchdog of a task: at most `slice` seconds, interrupts raise. The
 * results are dropped; an error is returned as LUA_ERRRUN with the message
 * on L's stack. For the Lua calls the engine makes outside tasks (event
 * handlers). */
int lsched_pcall_bounded(lua_State *L, int nargs, const char *what, double slice);

/* Calls fn(L, payload) at the scheduler's next chance, outside any loop
 * callback (so fn may wait), in the order they were deferred, one at a
 * time: a deferred call that waits never sees the next one run inside its
 * wait. -1 when out of memory (fn will not run). */
int lsched_defer(lua_State *L, void (*fn)(lua_State *L, void *payload), void *payload);

/* Runs the loop until *flag becomes nonzero, resuming tasks whose waits
 * completed meanwhile. Raises when called from inside an event handler. */
void lsched_block(lua_State *L, volatile int *flag);

#endif
