/* deploy.health.check{ urls = {...}, timeout = 2, expect_status = 200 }:
 * concurrent checks through libcurl multi, on the shared engine. */
#include <stdlib.h>
#include <string.h>

#include "lhealth.h"

#include "health.h"
#include "lsched.h"
#include "lutil.h"
#include "util.h"

typedef struct check_ctx {
  lua_State *L;
  int done;
} check_ctx;

static void checked(void *payload, const health_result *r, size_t n) {
  check_ctx *c = payload;
  lua_State *L = c->L;
  int ok = 0;
  lua_createtable(L, 0, 4);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_createtable(L, 0, 5);
    lset_string(L, "url", r[i].url);
    lset_boolean(L, "ok", r[i].ok);
    lset_integer(L, "status", r[i].status);
    lset_number(L, "latency", r[i].latency);
    if (!r[i].ok) {
      lset_string(L, "error", r[i].error);
    }
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    ok += r[i].ok;
  }
  lua_setfield(L, -2, "results");
  lset_string(L, "state", health_state_name(health_classify(r, n)));
  lset_integer(L, "ok", ok);
  lset_integer(L, "total", (lua_Integer)n);
  c->done = 1;
}

static int health_check(lua_State *L) {
  lsched_check_can_wait(L);
  char err[DC_ERR_MAX];
  luaL_argexpected(L, lua_istable(L, 1), 1, "table { urls = {...}, timeout = s, expect_status = n }");
  lua_settop(L, 1);
  if (lua_getfield(L, 1, "urls") != LUA_TTABLE)
    return luaL_error(L, "deploy: health.check: urls must be a list of URLs, got %s", luaL_typename(L, -1));
  size_t n = lua_rawlen(L, 2);
  if (n > 100000)
    return luaL_error(L, "deploy: health.check: %d URLs is too many (at most 100000)", (int)n);
  health_opts o = {.timeout = 2, .expect_status = 200};
  if (lua_getfield(L, 1, "timeout") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0 && lua_tonumber(L, -1) <= 600))
      return luaL_error(L, "deploy: health.check: timeout must be a number of seconds in (0, 600]");
    o.timeout = lua_tonumber(L, -1);
  }
  if (lua_getfield(L, 1, "expect_status") != LUA_TNIL) {
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 100 || lua_tointeger(L, -1) > 599)
      return luaL_error(L, "deploy: health.check: expect_status must be an HTTP status (100..599)");
    o.expect_status = (long)lua_tointeger(L, -1);
  }
  const char **urls = calloc(n ? n : 1, sizeof *urls);
  for (size_t i = 0; i < n; i++) {
    if (lua_rawgeti(L, 2, (lua_Integer)i + 1) != LUA_TSTRING) {
      free(urls);
      return luaL_error(L, "deploy: health.check: urls[%d] must be a string, got %s", (int)i + 1,
                        luaL_typename(L, -1));
    }
    urls[i] = lua_tostring(L, -1); /* anchored on the stack until the check ends */
  }
  check_ctx c = {L, 0};
  engine *e = lengine_get(L);
  int rc = health_check_start(e, urls, n, &o, checked, &c, err);
  free(urls);
  if (rc != 0)
    return lerror(L, err);
  while (!c.done)
    engine_run_once(e);
  return 1;
}

void lhealth_register(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, health_check);
  lua_setfield(L, -2, "check");
  lua_setfield(L, -2, "health");
}
