/* DeploymentStrategy (the base class, extendable from Lua), CanaryStrategy
 * and BlueGreenStrategy (C step machines wrapped in userdata). */
#include <stdlib.h>
#include <string.h>

#include "lstrategy.h"

#include "lutil.h"
#include "lwebhook.h"
#include "util.h"

#define STRATEGY_MT "deploy.BuiltinStrategy"

typedef struct lstrategy {
  strategy *s;
  webhook_list webhooks;   /* the strategy's own, checked when it was made */
} lstrategy;

strategy *lstrategy_test(lua_State *L, int idx) {
  lstrategy *ls = luaL_testudata(L, idx, STRATEGY_MT);
  return ls ? ls->s : NULL;
}

const webhook_list *lstrategy_webhooks(lua_State *L, int idx) {
  lstrategy *ls = luaL_testudata(L, idx, STRATEGY_MT);
  return ls ? &ls->webhooks : NULL;
}

static int strategy_gc(lua_State *L) {
  lstrategy *ls = luaL_checkudata(L, 1, STRATEGY_MT);
  strategy_free(ls->s);
  ls->s = NULL;
  webhook_list_clear(&ls->webhooks);
  return 0;
}

/* Reads an optional number field; raises naming the class and field. */
static double opt_number(lua_State *L, int idx, const char *cls, const char *field, double def) {
  int t = lua_getfield(L, idx, field);
  double v = def;
  if (t == LUA_TNUMBER) {
    v = lua_tonumber(L, -1);
  } else if (t != LUA_TNIL) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s %s must be a number, got %s", cls, field, luaL_typename(L, -1));
    lua_pop(L, 1);
    lerror(L, msg);
  }
  lua_pop(L, 1);
  return v;
}

static const char *opt_url(lua_State *L, int idx, const char *cls, char *buf, size_t size) {
  int t = lua_getfield(L, idx, "health_check_url");
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return NULL;
  }
  if (t != LUA_TSTRING) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s health_check_url must be a string, got %s", cls, luaL_typename(L, -1));
    lua_pop(L, 1);
    lerror(L, msg);
  }
  dc_strlcpy(buf, lua_tostring(L, -1), size);
  lua_pop(L, 1);
  return buf;
}

static void check_fields(lua_State *L, int idx, const char *cls, const char *const *allowed) {
  char fmt[128];
  dc_fmt(fmt, sizeof fmt, "deploy: %s has no parameter '%%s' (known: %%s)", cls);
  lcheck_keys(L, idx, allowed, fmt);
}

/* The strategy's hooks (a table of functions, checked when a deployment
 * uses them) live in the userdata's first user value; its webhooks,
 * checked now, in the userdata (the table as given in the second). */
static void push_strategy(lua_State *L, strategy *s, int params_idx) {
  lstrategy *ls = lua_newuserdatauv(L, sizeof *ls, 2);
  ls->s = s;
  ls->webhooks = (webhook_list){0};
  luaL_setmetatable(L, STRATEGY_MT);
  if (!params_idx)
    return;
  if (lua_getfield(L, params_idx, "webhooks") != LUA_TNIL) {
    char what[64];
    dc_fmt(what, sizeof what, "deploy: %s webhooks",
           strcmp(s->name, "canary") == 0 ? "CanaryStrategy" : "BlueGreenStrategy");
    lwebhook_read(L, lua_gettop(L), what, &ls->webhooks);
    lua_setiuservalue(L, -2, 2);
  } else {
    lua_pop(L, 1);
  }
  if (params_idx && lua_getfield(L, params_idx, "hooks") != LUA_TNIL) {
    if (!lua_istable(L, -1)) {
      char msg[DC_ERR_MAX];
      dc_fmt(msg, sizeof msg, "deploy: %s strategy hooks must be a table of functions, got %s", s->name,
             luaL_typename(L, -1));
      lua_pop(L, 1);
      lerror(L, msg);
    }
    lua_setiuservalue(L, -2, 1);
  } else {
    lua_pop(L, 1);
  }
}

void lstrategy_push(lua_State *L, strategy *s) { push_strategy(L, s, 0); }

static int read_pauses(lua_State *L, int idx, double *out, int cap) {
  int t = lua_getfield(L, idx, "pause_at");
  int n = 0;
  if (t == LUA_TNUMBER) {
    out[n++] = lua_tonumber(L, -1);
  } else if (t == LUA_TTABLE) {
    int len = (int)lua_rawlen(L, -1);
    if (len > cap)
      luaL_error(L, "deploy: CanaryStrategy pause_at has %d entries: at most %d", len, cap);
    for (int i = 1; i <= len; i++) {
      if (lua_rawgeti(L, -1, i) != LUA_TNUMBER)
        luaL_error(L, "deploy: CanaryStrategy pause_at[%d] must be a number, got %s", i, luaL_typename(L, -1));
      out[n++] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
  } else if (t != LUA_TNIL) {
    luaL_error(L, "deploy: CanaryStrategy pause_at must be a list of percentages such as {50}, got %s",
               luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  return n;
}

/* A string field of the table on top into buf ("" when nil). */
static void route_string(lua_State *L, const char *cls, const char *obj, const char *key, char *buf, size_t size) {
  int t = lua_getfield(L, -1, key);
  buf[0] = '\0';
  if (t != LUA_TNIL && t != LUA_TSTRING)
    luaL_error(L, "deploy: %s %s.%s must be a string, got %s", cls, obj, key, luaL_typename(L, -1));
  if (t == LUA_TSTRING) {
    size_t len;
    const char *v = lua_tolstring(L, -1, &len);
    if (len >= size || strlen(v) != len)
      luaL_error(L, "deploy: %s %s.%s is longer than %d bytes or holds a NUL byte", cls, obj, key, (int)size - 1);
    dc_strlcpy(buf, v, size);
  }
  lua_pop(L, 1);
}

/* Pushes params.key when it is a table with only `keys`; 0 (nothing
 * pushed) when it is nil. */
static int route_table(lua_State *L, int idx, const char *cls, const char *key, const char *const *keys,
                       const char *example) {
  int t = lua_getfield(L, idx, key);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  if (t != LUA_TTABLE)
    luaL_error(L, "deploy: %s %s must be a table such as %s, got %s", cls, key, example, luaL_typename(L, -1));
  char fmt[160];
  dc_fmt(fmt, sizeof fmt, "deploy: %s %s has no field '%%s' (known: %%s)", cls, key);
  lcheck_keys(L, lua_gettop(L), keys, fmt);
  return 1;
}

/* session_affinity = { cookie = "NAME", max_age = S } and test_route =
 * { header = "X-Canary" (or cookie = "NAME"), value = "always" }; their
 * values are checked by the strategy (strategy_check_routes). */
static void read_routes(lua_State *L, int idx, const char *cls, int affinity, route_rules *r) {
  static const char *const affinity_keys[] = {"cookie", "max_age", NULL};
  static const char *const test_keys[] = {"header", "cookie", "value", NULL};
  memset(r, 0, sizeof *r);
  if (affinity && route_table(L, idx, cls, "session_affinity", affinity_keys, "{ cookie = 'canary', max_age = 3600 }")) {
    route_string(L, cls, "session_affinity", "cookie", r->affinity_cookie, sizeof r->affinity_cookie);
    if (!r->affinity_cookie[0])
      luaL_error(L, "deploy: %s session_affinity needs a cookie name, e.g. { cookie = 'canary' }", cls);
    int t = lua_getfield(L, -1, "max_age");
    if (t != LUA_TNIL && t != LUA_TNUMBER)
      luaL_error(L, "deploy: %s session_affinity.max_age must be a number of seconds, got %s", cls,
                 luaL_typename(L, -1));
    double age = t == LUA_TNUMBER ? lua_tonumber(L, -1) : ROUTES_MAX_AGE_DEFAULT;
    /* whole numbers only: the constructor's check reports anything else */
    r->affinity_max_age = age >= 1 && age <= 31536000 && age == (double)(int)age ? (int)age : -1;
    if (r->affinity_max_age < 0)
      luaL_error(L, "deploy: %s session_affinity.max_age must be a whole number of seconds from 1 to 31536000 "
                    "(a year), got %s", cls, lua_tostring(L, -1));
    lua_pop(L, 2);
  }
  if (route_table(L, idx, cls, "test_route", test_keys, "{ header = 'X-Canary', value = 'always' }")) {
    route_string(L, cls, "test_route", "header", r->test_header, sizeof r->test_header);
    route_string(L, cls, "test_route", "cookie", r->test_cookie, sizeof r->test_cookie);
    route_string(L, cls, "test_route", "value", r->test_value, sizeof r->test_value);
    if (lua_getfield(L, -1, "value") == LUA_TNIL)
      dc_strlcpy(r->test_value, ROUTES_TEST_VALUE_DEFAULT, sizeof r->test_value);
    lua_pop(L, 2);
  }
}

static int opts_index(lua_State *L, const char *cls) {
  lua_settop(L, 1);
  if (lua_isnil(L, 1)) {
    lua_newtable(L);
    lua_replace(L, 1);
  }
  if (!lua_istable(L, 1)) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s expects a table of parameters, got %s", cls, luaL_typename(L, 1));
    lerror(L, msg);
  }
  return 1;
}

static const char *const canary_allowed[] = {"initial_percentage", "increment", "interval", "health_check_url",
                                             "pause_at", "session_affinity", "test_route", "hooks", "analysis", "webhooks",
                                             NULL};
static const char *const bluegreen_allowed[] = {"switch_delay", "scale_down_delay", "health_check_url", "test_route",
                                                "hooks", "analysis", "webhooks", NULL};

/* analysis = { ... } as JSON (one parser for Lua, config and manifests:
 * runtime/analysis_spec.c); NULL when absent. Raises for what JSON cannot
 * hold, before anything is allocated. */
static json_t *opt_analysis(lua_State *L, int idx, const char *cls) {
  char what[64];
  json_t *v = NULL;
  if (lua_getfield(L, idx, "analysis") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      luaL_error(L, "deploy: %s analysis must be a table such as { interval = 60, metrics = { ... } }, got %s", cls,
                 luaL_typename(L, -1));
    dc_fmt(what, sizeof what, "%s analysis", cls);
    v = ljson_from(L, -1, what);
  }
  lua_pop(L, 1);
  return v;
}

static int canary_new(lua_State *L) {
  const char *const *allowed = canary_allowed;
  char url[512], err[DC_ERR_MAX];
  int idx = opts_index(L, "CanaryStrategy");
  check_fields(L, idx, "CanaryStrategy", allowed);
  canary_params p;
  canary_params_default(&p);
  p.initial_percentage = opt_number(L, idx, "CanaryStrategy", "initial_percentage", p.initial_percentage);
  p.increment = opt_number(L, idx, "CanaryStrategy", "increment", p.increment);
  p.interval = opt_number(L, idx, "CanaryStrategy", "interval", p.interval);
  p.health_check_url = opt_url(L, idx, "CanaryStrategy", url, sizeof url);
  p.npause = read_pauses(L, idx, p.pause_at, CANARY_MAX_PAUSES);
  read_routes(L, idx, "CanaryStrategy", 1, &p.routes);
  json_t *analysis = opt_analysis(L, idx, "CanaryStrategy");
  p.analysis = analysis;
  strategy *s;
  int rc = strategy_canary_new(&s, &p, err);
  json_decref(analysis);
  if (rc != 0)
    return lerror(L, err);
  push_strategy(L, s, idx);
  return 1;
}

static int bluegreen_new(lua_State *L) {
  const char *const *allowed = bluegreen_allowed;
  char url[512], err[DC_ERR_MAX];
  int idx = opts_index(L, "BlueGreenStrategy");
  check_fields(L, idx, "BlueGreenStrategy", allowed);
  bluegreen_params p;
  bluegreen_params_default(&p);
  p.switch_delay = opt_number(L, idx, "BlueGreenStrategy", "switch_delay", p.switch_delay);
  p.scale_down_delay = opt_number(L, idx, "BlueGreenStrategy", "scale_down_delay", p.scale_down_delay);
  p.health_check_url = opt_url(L, idx, "BlueGreenStrategy", url, sizeof url);
  read_routes(L, idx, "BlueGreenStrategy", 0, &p.routes);
  json_t *analysis = opt_analysis(L, idx, "BlueGreenStrategy");
  p.analysis = analysis;
  strategy *s;
  int rc = strategy_bluegreen_new(&s, &p, err);
  json_decref(analysis);
  if (rc != 0)
    return lerror(L, err);
  push_strategy(L, s, idx);
  return 1;
}

strategy *lstrategy_push_bluegreen(lua_State *L, int rollback) {
  bluegreen_params p;
  char err[DC_ERR_MAX];
  strategy *s;
  bluegreen_params_default(&p);
  if (rollback)
    p.scale_down_delay = 0;
  if (strategy_bluegreen_new(&s, &p, err) != 0)
    lerror(L, err);
  push_strategy(L, s, 0);
  return s;
}

/* Fields read back: strategy.initial_percentage, .name, ... then methods. */
static int strategy_index(lua_State *L) {
  lstrategy *ls = luaL_checkudata(L, 1, STRATEGY_MT);
  const char *k = luaL_checkstring(L, 2);
  strategy *s = ls->s;
  if (strcmp(k, "name") == 0) {
    lua_pushstring(L, s->name);
    return 1;
  }
  if (strcmp(k, "hooks") == 0) {
    lua_getiuservalue(L, 1, 1);
    return 1;
  }
  if (strcmp(k, "webhooks") == 0) {
    lua_getiuservalue(L, 1, 2);
    return 1;
  }
  if (strcmp(k, "analysis") == 0) {
    if (s->analysis)
      ljson_push(L, s->analysis->json);
    else
      lua_pushnil(L);
    return 1;
  }
  if (strcmp(k, "health_check_url") == 0) {
    if (s->health_check_url[0])
      lua_pushstring(L, s->health_check_url);
    else
      lua_pushnil(L);
    return 1;
  }
  if (strcmp(k, "session_affinity") == 0 || strcmp(k, "test_route") == 0) {
    const route_rules *r = &s->routes;
    if (k[0] == 's' && routes_affinity_active(r)) {
      lua_createtable(L, 0, 2);
      lua_pushstring(L, r->affinity_cookie);
      lua_setfield(L, -2, "cookie");
      lua_pushinteger(L, r->affinity_max_age);
      lua_setfield(L, -2, "max_age");
    } else if (k[0] == 't' && routes_test_active(r)) {
      lua_createtable(L, 0, 2);
      lua_pushstring(L, r->test_header[0] ? r->test_header : r->test_cookie);
      lua_setfield(L, -2, r->test_header[0] ? "header" : "cookie");
      lua_pushstring(L, r->test_value);
      lua_setfield(L, -2, "value");
    } else {
      lua_pushnil(L);
    }
    return 1;
  }
  if (strcmp(s->name, "canary") == 0) {
    canary_strategy *c = (canary_strategy *)s;
    if (strcmp(k, "initial_percentage") == 0) {
      lpush_number(L, c->initial_percentage);
      return 1;
    }
    if (strcmp(k, "increment") == 0) {
      lpush_number(L, c->increment);
      return 1;
    }
    if (strcmp(k, "interval") == 0) {
      lpush_number(L, c->interval);
      return 1;
    }
    if (strcmp(k, "pause_at") == 0) {
      lua_createtable(L, c->npause, 0);
      for (int i = 0; i < c->npause; i++) {
        lpush_number(L, c->pause_at[i]);
        lua_rawseti(L, -2, i + 1);
      }
      return 1;
    }
  } else if (strcmp(k, "switch_delay") == 0) {
    lpush_number(L, ((bluegreen_strategy *)s)->switch_delay);
    return 1;
  } else if (strcmp(k, "scale_down_delay") == 0) {
    lpush_number(L, ((bluegreen_strategy *)s)->scale_down_delay);
    return 1;
  }
  luaL_getmetatable(L, STRATEGY_MT);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

/* validate(deployment) -> bool: the deployment names a target and a valid
 * version. The strategy's own parameters were checked at construction. */
static int strategy_validate(lua_State *L) {
  luaL_checkudata(L, 1, STRATEGY_MT);
  luaL_checktype(L, 2, LUA_TTABLE);
  char err[DC_ERR_MAX];
  lua_getfield(L, 2, "version");
  lua_getfield(L, 2, "target");
  int ok = lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING &&
           dc_validate_version(lua_tostring(L, -2), "version", err) == 0 &&
           dc_validate_target_name(lua_tostring(L, -1), err) == 0;
  lua_pushboolean(L, ok);
  return 1;
}

/* execute(deployment): the deployment object knows how to run a built-in
 * strategy (it holds the rollout); delegate to it. */
static int strategy_execute(lua_State *L) {
  luaL_checkudata(L, 1, STRATEGY_MT);
  luaL_checktype(L, 2, LUA_TTABLE);
  /* The deployment object knows how to run a built-in strategy (it holds
   * the rollout); d._run_builtin continues the rollout it drives. */
  if (lua_getfield(L, 2, "_run_builtin") != LUA_TFUNCTION)
    return luaL_error(L, "deploy: %s:execute(d) needs a deployment handed out by DeploymentManager:deploy "
                         "(call manager:deploy(target, version, { strategy = s }) instead)",
                      ((lstrategy *)lua_touserdata(L, 1))->s->name);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 1);
  lua_call(L, 2, LUA_MULTRET);
  return lua_gettop(L) - 2;
}

static int strategy_tostring(lua_State *L) {
  lstrategy *ls = luaL_checkudata(L, 1, STRATEGY_MT);
  lua_pushfstring(L, "%s strategy", ls->s->name);
  return 1;
}

/* The base class: DeploymentStrategy:extend{ name = ... } returns a class
 * whose validate/execute are written in Lua. */
static const char *const base_class_lua =
    "local Base = {}\n"
    "Base.__index = Base\n"
    "Base.name = 'strategy'\n"
    "function Base:extend(def)\n"
    "  if type(def) ~= 'table' then error('deploy: DeploymentStrategy:extend expects a table such as { name = \"ring\" }', 2) end\n"
    "  if type(def.name) ~= 'string' or def.name == '' then error('deploy: DeploymentStrategy:extend needs name = \"...\" (a non-empty string)', 2) end\n"
    "  local cls = def\n"
    "  cls.__index = cls\n"
    "  cls.is_strategy_class = true\n"
    "  setmetatable(cls, { __index = self, __call = function(c, o) return setmetatable(o or {}, c) end })\n"
    "  return cls\n"
    "end\n"
    "function Base:new(o) return setmetatable(o or {}, self) end\n"
    "function Base:validate(d) return type(d) == 'table' and type(d.version) == 'string' and d.version ~= '' end\n"
    "function Base:execute(d) error('deploy: strategy ' .. tostring(self.name) .. ' does not implement execute(d)', 2) end\n"
    "return Base\n";

void lstrategy_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"validate", strategy_validate}, {"execute", strategy_execute}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__index", strategy_index}, {"__gc", strategy_gc}, {"__tostring", strategy_tostring}, {NULL, NULL}};
  if (luaL_newmetatable(L, STRATEGY_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  static const luaL_Reg classes[] = {{"CanaryStrategy", canary_new}, {"BlueGreenStrategy", bluegreen_new}, {NULL, NULL}};
  luaL_setfuncs(L, classes, 0);
  if (luaL_loadbufferx(L, base_class_lua, strlen(base_class_lua), "=deploy.DeploymentStrategy", "t") != LUA_OK)
    lua_error(L);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "DeploymentStrategy");
}
