/* The configuration: a Lua table, or the path of a Lua file returning one.
 * Every field is checked here, with a message that names it; a target's
 * provider and router are created from it. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lconfig.h"

#include "engine.h"
#include "lutil.h"
#include "util.h"

#define LCONFIG_MT "deploy.Config"

static void lconfig_free(lconfig *c) {
  for (size_t i = 0; i < c->ntargets; i++)
    target_config_free(c->targets[i]);
  free(c->targets);
  c->targets = NULL;
  c->ntargets = 0;
}

/* Targets not taken by a service (a config that failed half-way). */
static int config_gc(lua_State *L) {
  lconfig_free(luaL_checkudata(L, 1, LCONFIG_MT));
  return 0;
}

target_config **lconfig_take_targets(lconfig *c, size_t *n) {
  target_config **t = c->targets;
  *n = c->ntargets;
  c->targets = NULL;
  c->ntargets = 0;
  return t;
}

/* ---- field readers: each raises naming the field path ---- */

static int fail(lua_State *L, const char *path, const char *fmt, const char *a) {
  char what[256], msg[DC_ERR_MAX];
  dc_fmt(what, sizeof what, fmt, a);
  dc_fmt(msg, sizeof msg, "deploy: config %s %s", path, what);
  return lerror(L, msg);
}

static void check_keys(lua_State *L, int idx, const char *path, const char *const *allowed) {
  char fmt[256];
  /* path may hold '%' only if a target name did, and names are validated */
  dc_fmt(fmt, sizeof fmt, "deploy: config %s has an unknown field '%%s' (known: %%s)", path);
  lcheck_keys(L, idx, allowed, fmt);
}

/* Pushes field `k` of the table at idx; returns its type. */
static int field(lua_State *L, int idx, const char *k) { return lua_getfield(L, idx, k); }

static const char *str_field(lua_State *L, int idx, const char *path, const char *k, const char *def,
                             char *buf, size_t size) {
  char full[256];
  dc_fmt(full, sizeof full, "%s.%s", path, k);
  int t = field(L, idx, k);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    if (!def)
      fail(L, full, "is missing: %s", "add it");
    dc_strlcpy(buf, def, size);
    return buf;
  }
  if (t != LUA_TSTRING)
    fail(L, full, "must be a string, got %s", luaL_typename(L, -1));
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (len >= size || strlen(s) != len)
    fail(L, full, "is too long or holds a NUL byte%s", "");
  dc_strlcpy(buf, s, size);
  if (dc_secret_note_refs(buf) != 0)
    fail(L, full, "%s", "could not be registered as holding secrets: out of memory");
  lua_pop(L, 1);
  /* ${NAME} is read from the environment now, except in the command, which
   * is expanded only when an instance starts (its values are never kept). */
  if (strcmp(k, "command") != 0 && strstr(buf, "${")) {
    char expanded[4096], err[DC_ERR_MAX];
    if (dc_expand_env(expanded, sizeof expanded, buf, err) != 0)
      fail(L, full, "%s", dc_unprefix(err));
    dc_strlcpy(buf, expanded, size);
  }
  return buf;
}

static double num_field(lua_State *L, int idx, const char *path, const char *k, double def, double lo,
                        double hi) {
  char full[256], range[96];
  dc_fmt(full, sizeof full, "%s.%s", path, k);
  int t = field(L, idx, k);
  double v = def;
  if (t == LUA_TNUMBER)
    v = lua_tonumber(L, -1);
  else if (t != LUA_TNIL)
    fail(L, full, "must be a number, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);
  if (!(v >= lo && v <= hi)) {
    dc_fmt(range, sizeof range, "must be between %g and %g", lo, hi);
    fail(L, full, "%s", range);
  }
  return v;
}

/* A count: a whole number, never rounded silently (1.5 instances?). */
static int int_field(lua_State *L, int idx, const char *path, const char *k, int def, int lo, int hi) {
  char full[256];
  dc_fmt(full, sizeof full, "%s.%s", path, k);
  int t = field(L, idx, k);
  /* floor, not a cast to an integer: 1e308 or NaN do not fit one (UB). */
  if (t == LUA_TNUMBER && !lua_isinteger(L, -1) && floor(lua_tonumber(L, -1)) != lua_tonumber(L, -1))
    fail(L, full, "must be a whole number, got %s", lua_tostring(L, -1));
  lua_pop(L, 1);
  return (int)num_field(L, idx, path, k, def, lo, hi);
}

static int sub_table(lua_State *L, int idx, const char *path, const char *k, int required) {
  char full[256];
  dc_fmt(full, sizeof full, "%s.%s", path, k);
  int t = field(L, idx, k);
  if (t == LUA_TNIL && !required)
    return 0;
  if (t == LUA_TNIL)
    fail(L, full, "is missing: %s", "add it as a table");
  if (t != LUA_TTABLE)
    fail(L, full, "must be a table, got %s", luaL_typename(L, -1));
  return 1;
}

/* ---- sections ---- */

static void parse_ports(lua_State *L, const char *path, const char *s, int *lo, int *hi) {
  char *end;
  errno = 0;
  long a = strtol(s, &end, 10), b;
  if (end == s || errno)
    goto bad;
  if (*end == '\0') {
    b = a;
  } else if (*end == '-') {
    const char *rest = end + 1;
    b = strtol(rest, &end, 10);
    if (end == rest || *end || errno)
      goto bad;
  } else {
    goto bad;
  }
  if (a < 1024 || b > 65535 || a > b)
    fail(L, path, "'%s' is not a usable range: write 'LOW-HIGH' with 1024 <= LOW <= HIGH <= 65535", s);
  *lo = (int)a;
  *hi = (int)b;
  return;
bad:
  fail(L, path, "'%s' is not a port range: write 'LOW-HIGH', e.g. '20000-20999'", s);
}

static void make_provider(lua_State *L, int idx, const char *path, target_config *t, const char *log_dir,
                          const char *tag) {
  static const char *const allowed[] = {"kind", "command", "ports", "stop_timeout", "workdir", "env", NULL};
  char p[128], kind[32], command[4096], ports[64], workdir[1024], err[DC_ERR_MAX];
  dc_fmt(p, sizeof p, "%s.provider", path);
  sub_table(L, idx, path, "provider", 1);
  int pi = lua_gettop(L);
  check_keys(L, pi, p, allowed);
  str_field(L, pi, p, "kind", "process", kind, sizeof kind);
  if (strcmp(kind, "process") != 0)
    fail(L, p, "kind '%s' is not known (known: process)", kind);
  str_field(L, pi, p, "command", NULL, command, sizeof command);
  if (!command[0])
    fail(L, p, "command is empty: %s", "give the shell command that starts one instance, e.g. './app --port {port}'");
  str_field(L, pi, p, "ports", "20000-20999", ports, sizeof ports);
  char pp[160];
  dc_fmt(pp, sizeof pp, "%s.ports", p);
  provider_process_opts o;
  memset(&o, 0, sizeof o);
  parse_ports(L, pp, ports, &o.port_min, &o.port_max);
  o.command = command;
  o.stop_timeout = num_field(L, pi, p, "stop_timeout", 10, 0.01, 3600);
  o.workdir = str_field(L, pi, p, "workdir", "", workdir, sizeof workdir);
  if (!workdir[0])
    o.workdir = NULL;
  o.log_dir = log_dir;
  o.tag_prefix = tag;
  /* env = { NAME = "value", ... } becomes NAME=value entries. */
  char **env = NULL;
  size_t nenv = 0;
  if (sub_table(L, pi, p, "env", 0)) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING) {
        for (size_t i = 0; i < nenv; i++)
          free(env[i]);
        free(env);
        fail(L, p, "env must map names to strings, e.g. env = { RUST_LOG = 'info' }%s", "");
      }
      char **grown = realloc(env, (nenv + 2) * sizeof *env);
      if (!grown)
        break;
      env = grown;
      size_t n = strlen(lua_tostring(L, -2)) + strlen(lua_tostring(L, -1)) + 2;
      env[nenv] = malloc(n);
      if (!env[nenv])
        break;
      snprintf(env[nenv], n, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
      dc_secret_note_refs(lua_tostring(L, -1));
      env[++nenv] = NULL;
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  o.env = (const char *const *)env;
  int rc = provider_process_new(&t->provider, lengine_get(L), &o, err);
  for (size_t i = 0; i < nenv; i++)
    free(env[i]);
  free(env);
  lua_pop(L, 1);
  if (rc != 0)
    lerror(L, err);
}

/* router = { kind = "nginx", include, upstream, conf, pid, nginx, timeout,
 * drain_timeout }: the fields runtime/nginx.c documents. */
static int make_nginx_router(lua_State *L, int ri, const char *p, engine *e, target_config *t, char *err) {
  static const char *const allowed[] = {"kind",  "include", "upstream", "conf", "pid",
                                        "nginx", "timeout", "drain_timeout", NULL};
  char include[1024], upstream[128], conf[1024], pid[1024], bin[1024];
  check_keys(L, ri, p, allowed);
  router_nginx_opts o;
  memset(&o, 0, sizeof o);
  o.include = str_field(L, ri, p, "include", NULL, include, sizeof include);
  o.upstream = str_field(L, ri, p, "upstream", NULL, upstream, sizeof upstream);
  if (!upstream[0])
    fail(L, p, "upstream is empty: %s", "name the upstream that proxy_pass uses in nginx.conf");
  o.conf = str_field(L, ri, p, "conf", NULL, conf, sizeof conf);
  o.pid = str_field(L, ri, p, "pid", NULL, pid, sizeof pid);
  o.nginx = str_field(L, ri, p, "nginx", "/usr/sbin/nginx", bin, sizeof bin);
  o.timeout = num_field(L, ri, p, "timeout", 10, 0.01, 600);
  o.drain_timeout = num_field(L, ri, p, "drain_timeout", 30, 0, 3600);
  return router_nginx_new(&t->router, e, &o, err);
}

static void make_router(lua_State *L, int idx, const char *path, target_config *t) {
  static const char *const allowed[] = {"kind", "socket", "backend", "timeout", "drain_timeout", "prefix", NULL};
  char p[128], kind[32], socket[1024], backend[128], prefix[32], err[DC_ERR_MAX], expanded[1024];
  dc_fmt(p, sizeof p, "%s.router", path);
  engine *e = lengine_get(L);
  if (!sub_table(L, idx, path, "router", 0)) {
    lua_pop(L, 1);
    if (router_none_new(&t->router, e, err) != 0)
      lerror(L, err);
    return;
  }
  int ri = lua_gettop(L);
  str_field(L, ri, p, "kind", "none", kind, sizeof kind);
  if (strcmp(kind, "none") != 0 && strcmp(kind, "haproxy") != 0 && strcmp(kind, "nginx") != 0)
    fail(L, p, "kind '%s' is not known (known: haproxy, nginx, none)", kind);
  int rc;
  if (strcmp(kind, "nginx") == 0) {
    rc = make_nginx_router(L, ri, p, e, t, err);
    lua_pop(L, 1);
    if (rc != 0)
      lerror(L, err);
    return;
  }
  check_keys(L, ri, p, allowed);
  if (strcmp(kind, "none") == 0) {
    rc = router_none_new(&t->router, e, err);
  } else {
    router_haproxy_opts o;
    memset(&o, 0, sizeof o);
    str_field(L, ri, p, "socket", NULL, socket, sizeof socket);
    dc_strlcpy(expanded, socket, sizeof expanded);
    str_field(L, ri, p, "backend", NULL, backend, sizeof backend);
    if (!backend[0])
      fail(L, p, "backend is empty: %s", "name the HAProxy backend that serves this target");
    str_field(L, ri, p, "prefix", "dc_", prefix, sizeof prefix);
    o.socket = expanded;
    o.backend = backend;
    o.prefix = prefix;
    o.timeout = num_field(L, ri, p, "timeout", 5, 0.01, 600);
    o.drain_timeout = num_field(L, ri, p, "drain_timeout", 30, 0, 3600);
    rc = router_haproxy_new(&t->router, e, &o, err);
  }
  lua_pop(L, 1);
  if (rc != 0)
    lerror(L, err);
}

static void read_health(lua_State *L, int idx, const char *path, target_health *h) {
  static const char *const allowed[] = {"path", "expect_status", "timeout", "interval",
                                        "failure_threshold", "start_timeout", NULL};
  char p[128];
  dc_fmt(p, sizeof p, "%s.health", path);
  target_health_default(h);
  if (!sub_table(L, idx, path, "health", 0)) {
    lua_pop(L, 1);
    return;
  }
  int hi = lua_gettop(L);
  check_keys(L, hi, p, allowed);
  str_field(L, hi, p, "path", "/healthz", h->path, sizeof h->path);
  if (h->path[0] != '/')
    fail(L, p, "path '%s' must start with '/'", h->path);
  h->expect_status = int_field(L, hi, p, "expect_status", 200, 100, 599);
  h->timeout = num_field(L, hi, p, "timeout", 2, 0.01, 600);
  h->interval = num_field(L, hi, p, "interval", 1, 0.001, 3600);
  h->failure_threshold = int_field(L, hi, p, "failure_threshold", 3, 1, 1000);
  h->start_timeout = num_field(L, hi, p, "start_timeout", 60, 0.01, 86400);
  lua_pop(L, 1);
}

static void read_target(lua_State *L, lconfig *c, const char *name, int idx, const char *log_dir,
                        const char *tag) {
  static const char *const allowed[] = {"instances", "provider", "router", "health", NULL};
  char path[128], err[DC_ERR_MAX];
  dc_fmt(path, sizeof path, "targets.%s", name);
  if (dc_validate_target_name(name, err) != 0)
    lerror(L, err);
  if (!lua_istable(L, idx))
    fail(L, path, "must be a table, got %s", luaL_typename(L, idx));
  check_keys(L, idx, path, allowed);
  target_config *t = target_config_new(name);
  if (!t)
    lerror(L, "deploy: out of memory");
  c->targets[c->ntargets++] = t;
  t->instances = int_field(L, idx, path, "instances", 1, 1, 64);
  read_health(L, idx, path, &t->health);
  make_provider(L, idx, path, t, log_dir, tag);
  make_router(L, idx, path, t);
}

static void resolve_state(lua_State *L, int idx, lconfig *c) {
  const char *env = getenv("DEPLOY_STATE");
  if (env && *env)
    dc_strlcpy(c->state, env, sizeof c->state);
  else
    str_field(L, idx, "", "state", ".deploy/state.db", c->state, sizeof c->state);
  if (!c->state[0])
    fail(L, ".state", "is empty: %s", "give a file path such as '.deploy/state.db'");
}

/* Loads a config file: trusted user code, like a Makefile, but text only. */
static void load_file(lua_State *L, int idx) {
  const char *path = lua_tostring(L, idx);
  char msg[DC_ERR_MAX];
  if (access(path, R_OK) != 0) {
    dc_fmt(msg, sizeof msg, "deploy: cannot read config file '%s': %s (give --config FILE or create ./deploy.lua)",
           path, strerror(errno));
    lerror(L, msg);
  }
  if (luaL_loadfilex(L, path, "t") != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK) {
    dc_fmt(msg, sizeof msg, "deploy: config file '%s' failed to load: %s", path, lua_tostring(L, -1));
    lerror(L, msg);
  }
  if (!lua_istable(L, -1)) {
    dc_fmt(msg, sizeof msg, "deploy: config file '%s' must return a table (it returned %s)", path,
           luaL_typename(L, -1));
    lerror(L, msg);
  }
  lua_replace(L, idx);
}

static void absolute(const char *path, char *out, size_t size) {
  char cwd[PATH_MAX];
  if (path[0] == '/' || !getcwd(cwd, sizeof cwd))
    dc_strlcpy(out, path, size);
  else
    dc_fmt(out, size, "%s/%s", cwd, path);
}

static int is_url(const char *state) {
  return strncmp(state, "postgresql://", 13) == 0 || strncmp(state, "postgres://", 11) == 0;
}

/* What tags each instance (DEPLOY_INSTANCE=<tag>#<id>) and where logs go:
 * the store's absolute path and its directory's logs/, or, for a database
 * URL, scheme://host[:port]/database alone (no user-info, no parameters: a
 * password there must never reach an instance's environment) and
 * .deploy/logs. */
static void store_tag(const char *state, char *tag, size_t tsize, char *log_dir, size_t lsize) {
  if (is_url(state)) {
    const char *scheme_end = strstr(state, "://") + 3;
    const char *rest = scheme_end;
    const char *slash = strchr(rest, '/');
    const char *at = strchr(rest, '@');
    if (at && (!slash || at < slash))
      rest = at + 1;
    size_t keep = strcspn(rest, "?#");
    dc_fmt(tag, tsize, "%.*s%.*s", (int)(scheme_end - state), state, (int)keep, rest);
    dc_strlcpy(log_dir, ".deploy/logs", lsize);
    return;
  }
  const char *slash = strrchr(state, '/');
  if (slash)
    dc_fmt(log_dir, lsize, "%.*s/logs", (int)(slash - state), state);
  else
    dc_strlcpy(log_dir, "logs", lsize);
  absolute(state, tag, tsize);
}

lconfig *lconfig_load(lua_State *L, int idx) {
  static const char *const allowed[] = {"state", "clock", "targets", NULL};
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING)
    load_file(L, idx);
  else if (!lua_istable(L, idx))
    fail(L, "", "must be a table or the path of a Lua file that returns one, got %s", luaL_typename(L, idx));
  check_keys(L, idx, "(top level)", allowed);
  lconfig *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  if (luaL_newmetatable(L, LCONFIG_MT)) {
    static const luaL_Reg meta[] = {{"__gc", config_gc}, {NULL, NULL}};
    luaL_setfuncs(L, meta, 0);
  }
  lua_setmetatable(L, -2);
  int ci = lua_gettop(L);
  resolve_state(L, idx, c);
  char clock[16];
  str_field(L, idx, "", "clock", "", clock, sizeof clock);
  if (clock[0] && strcmp(clock, "real") != 0 && strcmp(clock, "virtual") != 0)
    fail(L, ".clock", "'%s' is not known: use 'real' or 'virtual'", clock);
  /* Unset: whatever the process runs on (deployctl run --simulate). */
  c->virtual_clock = !clock[0] ? -1 : strcmp(clock, "virtual") == 0;

  char log_dir[1100], tag[1024];
  store_tag(c->state, tag, sizeof tag, log_dir, sizeof log_dir);

  sub_table(L, idx, "", "targets", 1);
  int ti = lua_gettop(L);
  /* The names first, into a table of our own, then each target by name:
   * reading a target may run Lua (an __index metamethod) that changes the
   * targets table, and lua_next over a table that changes may or may not
   * visit what was added (the array below has room for n). */
  lua_newtable(L);
  int ni = lua_gettop(L);
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, ti)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      fail(L, ".targets", "must map target names to tables, found a key of type %s", luaL_typename(L, -2));
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, ni, (lua_Integer)++n);
  }
  if (n == 0)
    fail(L, ".targets", "is empty: %s", "declare at least one target, e.g. targets = { production = { ... } }");
  c->targets = calloc(n, sizeof *c->targets);
  if (!c->targets)
    lerror(L, "deploy: out of memory reading the config");
  for (size_t i = 1; i <= n; i++) {
    char name[128];
    lua_rawgeti(L, ni, (lua_Integer)i);
    dc_strlcpy(name, lua_tostring(L, -1), sizeof name);
    lua_rawget(L, ti);
    read_target(L, c, name, lua_gettop(L), log_dir, tag);
    lua_pop(L, 1);
  }
  size_t now = 0;
  lua_pushnil(L);
  while (lua_next(L, ti)) {
    now++;
    lua_pop(L, 1);
  }
  if (now != n)
    fail(L, ".targets", "changed while it was read (%s)", "a metamethod added to it: build the table first");
  lua_settop(L, ci);
  return c;
}
