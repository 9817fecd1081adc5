/* deploy.parallel{ fn1, fn2, ... }: runs each function in its own coroutine
 * on the one engine, so rollouts of several targets progress side by side,
 * and returns their results in order. An error in one does not stop the
 * others; once all have finished, the errors are raised together. */
#include <stdlib.h>
#include <string.h>

#include "lparallel.h"

#include <lauxlib.h>

#include "lsched.h"
#include "util.h"

typedef struct par {
  int remaining;
  int done;          /* remaining == 0 */
  int awaiting;
  ltask *waiter;     /* when parallel itself runs inside a task */
  int results_ref;   /* table: i -> first result */
  int errors_ref;    /* table: list of messages */
} par;

typedef struct par_slot {
  par *p;
  int index;
} par_slot;

static void finished(lua_State *L, ltask *t, int status, int nres) {
  par_slot *slot = t->payload;
  par *p = slot->p;
  if (status == LUA_OK) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->results_ref);
    if (nres > 0) {
      lua_pushvalue(t->co, -nres);
      lua_xmove(t->co, L, 1);
    } else {
      lua_pushboolean(L, 1);
    }
    lua_rawseti(L, -2, slot->index);
    lua_pop(L, 1);
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->errors_ref);
    lua_pushfstring(L, "function %d: %s", slot->index, lua_tostring(t->co, -1));
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 1);
  }
  free(slot);
  if (--p->remaining == 0) {
    p->done = 1;
    if (p->awaiting)
      lsched_ready(p->waiter);
  }
}

static int parallel_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  par *p = (par *)ctx;
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->errors_ref);
  size_t nerr = lua_rawlen(L, -1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->results_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->results_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->errors_ref);
  if (nerr > 0) {
    luaL_Buffer b;
    lua_pop(L, 1);
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "deploy.parallel: ");
    for (size_t i = 1; i <= nerr; i++) {
      lua_rawgeti(L, -2, (lua_Integer)i);
      if (i > 1)
        luaL_addstring(&b, "; ");
      luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    return lua_error(L);
  }
  return 1;
}

static int deploy_parallel(lua_State *L) {
  lsched_check_can_wait(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer n = (lua_Integer)lua_rawlen(L, 1);
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, 1, i) != LUA_TFUNCTION)
      return luaL_error(L, "deploy.parallel: item %d must be a function, got %s", (int)i, luaL_typename(L, -1));
    lua_pop(L, 1);
  }
  par *p = lua_newuserdatauv(L, sizeof *p, 0); /* on the stack across a yield */
  memset(p, 0, sizeof *p);
  lua_createtable(L, (int)n, 0);
  p->results_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  p->errors_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  p->remaining = (int)n;
  p->done = n == 0;
  p->waiter = lsched_current(L);
  for (lua_Integer i = 1; i <= n; i++) {
    par_slot *slot = malloc(sizeof *slot);
    if (!slot)
      return luaL_error(L, "deploy.parallel: out of memory");
    slot->p = p;
    slot->index = (int)i;
    lua_rawgeti(L, 1, i);
    ltask *t = lsched_spawn(L, 0, finished, slot);
    if (!t) {
      free(slot);
      return luaL_error(L, "deploy.parallel: out of memory");
    }
    lsched_ready(t);
  }
  if (!p->done)
    p->awaiting = 1;
  return lsched_await(L, &p->done, (lua_KContext)p, parallel_k);
}

void lparallel_register(lua_State *L) {
  lua_pushcfunction(L, deploy_parallel);
  lua_setfield(L, -2, "parallel");
}
