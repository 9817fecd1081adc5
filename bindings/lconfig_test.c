/* The config sections of the test provider and router (users' specs,
 * deploy.testing) and of --simulate, which puts them in place of every
 * target's real provider and router and runs on a copy of the store. */
#include <stdlib.h>
#include <string.h>

#include "lconfig.h"
#include "lconfig_read.h"

#include <lauxlib.h>

#include "lutil.h"
#include "simulate.h"
#include "util.h"

static const char *const script_fields[] = {"start_time", "unhealthy", "unhealthy_after", "error_rate", "crash_after",
                                            NULL};

/* One script: the fields of the table at idx. */
static void read_script(lua_State *L, int idx, const char *path, provider_test_script *s) {
  s->start_time = lconfig_num(L, idx, path, "start_time", s->start_time, 0, 1e8);
  s->unhealthy = lconfig_bool(L, idx, path, "unhealthy", s->unhealthy);
  s->unhealthy_after = lconfig_num(L, idx, path, "unhealthy_after", s->unhealthy_after, -1, 1e8);
  s->error_rate = lconfig_num(L, idx, path, "error_rate", s->error_rate, 0, 1);
  s->crash_after = lconfig_num(L, idx, path, "crash_after", s->crash_after, -1, 1e8);
}

/* The scripts of a section (provider, or simulate): its own fields for
 * every version, and versions = { ["1.2"] = { ... } } for some. The
 * arrays are Lua userdata (left on the stack): a raise frees them. */
typedef struct scripts {
  provider_test_opts o;
  const char **versions;
  provider_test_script *v;
} scripts;

static void read_scripts(lua_State *L, int idx, const char *path, const char *const *allowed, double start_time,
                         scripts *out) {
  char vp[256];
  memset(out, 0, sizeof *out);
  lconfig_check_keys(L, idx, path, allowed);
  provider_test_script_default(&out->o.script);
  out->o.script.start_time = start_time;
  read_script(L, idx, path, &out->o.script);
  if (!lconfig_sub_table(L, idx, path, "versions", 0)) {
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_pushnil(L);
    return;
  }
  int vi = lua_gettop(L);
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, vi)) {
    dc_fmt(vp, sizeof vp, "%s.versions", path);
    if (lua_type(L, -2) != LUA_TSTRING || !lua_istable(L, -1))
      lconfig_fail(L, vp, "must map versions to scripts, e.g. versions = { ['2.0.1'] = { unhealthy_after = 30 } }%s",
                   "");
    n++;
    lua_pop(L, 1);
  }
  if (n > 1000)
    lconfig_fail(L, path, "versions lists more than 1000 versions%s", "");
  out->versions = lua_newuserdatauv(L, (n ? n : 1) * sizeof *out->versions, 0);
  out->v = lua_newuserdatauv(L, (n ? n : 1) * sizeof *out->v, 0);
  size_t k = 0;
  lua_pushnil(L);
  while (lua_next(L, vi)) {
    dc_fmt(vp, sizeof vp, "%s.versions['%.128s']", path, lua_tostring(L, -2));
    lconfig_check_keys(L, lua_gettop(L), vp, script_fields);
    out->v[k] = out->o.script;
    read_script(L, lua_gettop(L), vp, &out->v[k]);
    out->versions[k] = lua_tostring(L, -2); /* the key stays in the table below */
    k++;
    lua_pop(L, 1);
  }
  lua_remove(L, vi); /* the scripts keep their keys alive through the config table */
  out->o.versions = out->versions;
  out->o.scripts = out->v;
  out->o.n = n;
}

static void make(lua_State *L, target_config *t, const provider_test_opts *o) {
  char err[DC_ERR_MAX];
  if (provider_test_new(&t->provider, lengine_get(L), o, err) != 0)
    lerror(L, err);
}

void lconfig_test_provider(lua_State *L, int pi, const char *path, target_config *t) {
  static const char *const allowed[] = {"kind", "start_time", "unhealthy", "unhealthy_after", "error_rate",
                                        "crash_after", "versions", NULL};
  int top = lua_gettop(L);
  scripts s;
  read_scripts(L, pi, path, allowed, 0, &s);
  make(L, t, &s.o);
  lua_settop(L, top);
}

void lconfig_test_router(lua_State *L, int ri, const char *path, target_config *t) {
  static const char *const allowed[] = {"kind", NULL};
  char err[DC_ERR_MAX];
  lconfig_check_keys(L, ri, path, allowed);
  if (router_test_new(&t->router, lengine_get(L), err) != 0)
    lerror(L, err);
}

int lconfig_simulating(lua_State *L) {
  int on = lua_getfield(L, LUA_REGISTRYINDEX, "deploy.simulate") != LUA_TNIL && lua_toboolean(L, -1);
  lua_pop(L, 1);
  return on;
}

void lconfig_simulate(lua_State *L, int idx, lconfig *c) {
  static const char *const allowed[] = {"start_time", "unhealthy", "unhealthy_after", "error_rate", "crash_after",
                                        "versions", NULL};
  char err[DC_ERR_MAX], copy[1024], note[DC_ERR_MAX];
  int top = lua_gettop(L);
  scripts s;
  int has = lconfig_sub_table(L, idx, "", "simulate", 0);
  if (has) {
    read_scripts(L, lua_gettop(L), ".simulate", allowed, 1, &s);
  } else {
    memset(&s, 0, sizeof s);
    provider_test_script_default(&s.o.script);
    s.o.script.start_time = 1;
  }
  if (!lconfig_simulating(L)) {
    lua_settop(L, top);
    return;
  }
  s.o.adopt = 1;
  int declared = 0, told = 0;
  for (size_t i = 0; i < c->ntargets; i++) {
    target_config *t = c->targets[i];
    t->simulated = 1;
    declared |= t->analysis != NULL;
    told |= t->webhooks.n > 0 || t->notify.n > 0;
    t->provider->free(t->provider);
    t->provider = NULL;
    t->router->free(t->router);  /* a group frees its members */
    t->router = NULL;
    t->nrouters = 0;             /* the test router is the only view */
    ssh_ctx_free(t->ssh);
    t->ssh = NULL;
    make(L, t, &s.o);
    if (router_test_new(&t->router, lengine_get(L), err) != 0)
      lerror(L, err);
  }
  if (simulate_store_copy(c->state, copy, sizeof copy, note, sizeof note, err) != 0)
    lerror(L, err);
  dc_strlcpy(c->state, copy, sizeof c->state);
  c->virtual_clock = 1; /* whatever the file says: a dry run never waits */
  if (declared) {
    /* Scripted instances serve no real traffic: numbers measured from
     * them would judge nothing. */
    size_t len = strlen(note);
    dc_fmt(note + len, sizeof note - len, "; analysis is not measured in a dry run");
  }
  if (told) {
    size_t len = strlen(note);
    dc_fmt(note + len, sizeof note - len, "; webhooks and notifications are not sent (gates pass)");
  }
  lua_pushstring(L, note);
  lua_setfield(L, LUA_REGISTRYINDEX, "deploy.simulate_note");
  lua_settop(L, top);
}
