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

#include "analysis.h"
#include "engine.h"
#include "lutil.h"
#include "lwebhook.h"
#include "ssh.h"
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
   * is expanded only when an instance starts (its values are never kept),
   * and in a webhook secret, which only `deployctl serve` reads (other
   * commands need not have it in their environment). */
  if (strcmp(k, "command") != 0 && strcmp(k, "secret") != 0 && strstr(buf, "${")) {
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

static int bool_field(lua_State *L, int idx, const char *path, const char *k, int def) {
  char full[256];
  dc_fmt(full, sizeof full, "%s.%s", path, k);
  int t = field(L, idx, k);
  int v = def;
  if (t == LUA_TBOOLEAN)
    v = lua_toboolean(L, -1);
  else if (t != LUA_TNIL)
    fail(L, full, "must be true or false, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* provider.env = { NAME = "value", ... } as NAME=value entries (heap,
 * NULL-terminated). Every entry is checked before anything is allocated,
 * so no error is raised while the caller owns memory. */
static char **read_env(lua_State *L, int pi, const char *p, size_t *nenv) {
  *nenv = 0;
  if (!sub_table(L, pi, p, "env", 0)) {
    lua_pop(L, 1);
    return NULL;
  }
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      fail(L, p, "env must map names to strings, e.g. env = { RUST_LOG = 'info' }%s", "");
    n++;
    lua_pop(L, 1);
  }
  char **env = calloc(n + 1, sizeof *env);
  size_t k = 0;
  lua_pushnil(L);
  while (env && lua_next(L, -2)) {
    size_t len = strlen(lua_tostring(L, -2)) + strlen(lua_tostring(L, -1)) + 2;
    env[k] = malloc(len);
    if (!env[k]) {
      lua_pop(L, 2);
      break;
    }
    snprintf(env[k], len, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
    dc_secret_note_refs(lua_tostring(L, -1));
    k++;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (!env || k < n) {
    for (size_t i = 0; env && i < k; i++)
      free(env[i]);
    free(env);
    lerror(L, "deploy: out of memory reading the config");
  }
  *nenv = n;
  return env;
}

static void free_env(char **env, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(env[i]);
  free(env);
}

/* boot_limit: a number of hosts, or a share of them ("25%"). */
static void read_boot_limit(lua_State *L, int pi, const char *p, target_config *t) {
  char full[160];
  dc_fmt(full, sizeof full, "%s.boot_limit", p);
  int ty = field(L, pi, "boot_limit");
  if (ty == LUA_TNUMBER) {
    lua_Number v = lua_tonumber(L, -1);
    if (!(v >= 1 && v <= 100000) || v != (lua_Number)(int)v)
      fail(L, full, "must be a whole number of hosts (>= 1) or a percentage such as '25%%', got %s",
           lua_tostring(L, -1));
    t->boot_limit = (int)v;
  } else if (ty == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    char *end;
    double pct = strtod(s, &end);
    if (end == s || strcmp(end, "%") != 0 || !(pct > 0 && pct <= 100))
      fail(L, full, "'%s' is not a percentage of hosts: write e.g. '25%%' (0 < P <= 100), or a number of hosts", s);
    t->boot_limit_pct = pct;
  } else if (ty != LUA_TNIL) {
    fail(L, full, "must be a number of hosts or a percentage such as '25%%', got %s", luaL_typename(L, -1));
  }
  lua_pop(L, 1);
}

/* The ssh side of a target: its connections (owned by the target), the
 * boot waves. */
static void make_ssh(lua_State *L, int pi, const char *p, target_config *t, double *connect_timeout) {
  char key[1024], known[1024], cfgfile[1024], err[DC_ERR_MAX];
  ssh_opts so;
  memset(&so, 0, sizeof so);
  str_field(L, pi, p, "key", "", key, sizeof key);
  str_field(L, pi, p, "known_hosts", "", known, sizeof known);
  str_field(L, pi, p, "ssh_config", "", cfgfile, sizeof cfgfile);
  so.key_path = key[0] ? key : NULL;
  so.known_hosts = known[0] ? known : NULL;
  so.config_file = cfgfile[0] ? cfgfile : NULL;
  so.accept_new = bool_field(L, pi, p, "accept_new", 0);
  so.connect_timeout = num_field(L, pi, p, "connect_timeout", 10, 0.1, 3600);
  *connect_timeout = so.connect_timeout;
  read_boot_limit(L, pi, p, t);
  t->boot_wait = num_field(L, pi, p, "boot_wait", 0, 0, 86400);
  int rc = ssh_ctx_new(&t->ssh, lengine_get(L), &so, err);
  explicit_bzero(key, sizeof key);
  if (rc != 0)
    fail(L, p, "cannot set up ssh: %s", strncmp(err, "ssh: ", 5) == 0 ? err + 5 : err);
}

static void make_provider(lua_State *L, int idx, const char *path, target_config *t, const char *log_dir,
                          const char *tag) {
  static const char *const process_fields[] = {"kind", "command", "ports", "stop_timeout", "workdir", "env", NULL};
  static const char *const ssh_fields[] = {"kind",        "command",     "ports",      "stop_timeout", "workdir",
                                           "env",         "log_dir",     "key",        "known_hosts",  "ssh_config",
                                           "accept_new",  "connect_timeout", "boot_limit", "boot_wait", NULL};
  char p[128], kind[32], command[4096], ports[64], workdir[1024], remote_logs[1024], err[DC_ERR_MAX];
  dc_fmt(p, sizeof p, "%s.provider", path);
  sub_table(L, idx, path, "provider", 1);
  int pi = lua_gettop(L);
  str_field(L, pi, p, "kind", "process", kind, sizeof kind);
  if (strcmp(kind, "test") == 0) {
    lconfig_test_provider(L, pi, p, t);
    lua_pop(L, 1);
    return;
  }
  int ssh = strcmp(kind, "ssh") == 0;
  if (!ssh && strcmp(kind, "process") != 0)
    fail(L, p, "kind '%s' is not known (known: process, ssh, test)", kind);
  check_keys(L, pi, p, ssh ? ssh_fields : process_fields);
  int remote = t->nnodes > 1 || t->nodes[0][0];
  if (ssh && !remote)
    fail(L, path, "has provider.kind 'ssh' but no hosts: %s",
         "list them, e.g. hosts = { 'app1', 'deploy@10.0.0.5:2222' }");
  if (!ssh && remote)
    fail(L, path, "lists hosts, which the '%s' provider cannot reach: set provider.kind = 'ssh'", kind);
  str_field(L, pi, p, "command", NULL, command, sizeof command);
  if (!command[0])
    fail(L, p, "command is empty: %s", "give the shell command that starts one instance, e.g. './app --port {port}'");
  str_field(L, pi, p, "ports", "20000-20999", ports, sizeof ports);
  char pp[160];
  dc_fmt(pp, sizeof pp, "%s.ports", p);
  int port_min = 0, port_max = 0;
  parse_ports(L, pp, ports, &port_min, &port_max);
  double stop_timeout = num_field(L, pi, p, "stop_timeout", 10, 0.01, 3600);
  str_field(L, pi, p, "workdir", "", workdir, sizeof workdir);
  double connect_timeout = 0;
  if (ssh) {
    str_field(L, pi, p, "log_dir", "", remote_logs, sizeof remote_logs);
    make_ssh(L, pi, p, t, &connect_timeout);
  }
  size_t nenv;
  char **env = read_env(L, pi, p, &nenv);
  /* No Lua error from here until env is freed. */
  int rc;
  if (ssh) {
    provider_ssh_opts o = {.command = command,
                           .port_min = port_min,
                           .port_max = port_max,
                           .stop_timeout = stop_timeout,
                           .log_dir = remote_logs[0] ? remote_logs : NULL,
                           .workdir = workdir[0] ? workdir : NULL,
                           .env = (const char *const *)env,
                           .tag_prefix = tag,
                           .ssh = t->ssh,
                           .connect_timeout = connect_timeout};
    rc = provider_ssh_new(&t->provider, lengine_get(L), &o, err);
  } else {
    provider_process_opts o = {.command = command,
                               .port_min = port_min,
                               .port_max = port_max,
                               .stop_timeout = stop_timeout,
                               .log_dir = log_dir,
                               .workdir = workdir[0] ? workdir : NULL,
                               .env = (const char *const *)env,
                               .tag_prefix = tag};
    rc = provider_process_new(&t->provider, lengine_get(L), &o, err);
  }
  free_env(env, nenv);
  lua_pop(L, 1);
  if (rc != 0)
    lerror(L, err);
}

/* router = { kind = "nginx", include, upstream, conf, pid, nginx, timeout,
 * drain_timeout }: the fields runtime/nginx.c documents. */
static int make_nginx_router(lua_State *L, int ri, const char *p, engine *e, router **out, char *err) {
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
  return router_nginx_new(out, e, &o, err);
}

/* hosts = { "app1", "deploy@10.0.0.5:2222", ... }: the target's nodes. */
static void read_hosts(lua_State *L, int idx, const char *path, target_config *t) {
  char full[160], item[200], err[DC_ERR_MAX];
  dc_fmt(full, sizeof full, "%s.hosts", path);
  int ty = field(L, idx, "hosts");
  if (ty == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (ty != LUA_TTABLE)
    fail(L, full, "must be a list of ssh destinations, e.g. { 'app1', 'deploy@10.0.0.5:2222' }, got %s",
         luaL_typename(L, -1));
  lua_Integer n = luaL_len(L, -1);
  size_t keys = 0;
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    keys++;
    lua_pop(L, 1);
  }
  if (n < 1)
    fail(L, full, "is empty: %s", "list at least one host, or leave hosts out to run on this machine");
  if ((size_t)n != keys || n > 1000)
    fail(L, full, "must be a list (1 to 1000 entries, no other keys), e.g. %s", "{ 'app1', 'app2' }");
  for (lua_Integer i = 1; i <= n; i++) {
    dc_fmt(item, sizeof item, "%s[%lld]", full, (long long)i);
    if (lua_rawgeti(L, -1, i) != LUA_TSTRING)
      fail(L, item, "must be a string (an ssh destination), got %s", luaL_typename(L, -1));
    const char *dest = lua_tostring(L, -1);
    if (ssh_validate_dest(dest, err) != 0)
      fail(L, item, "is not a usable ssh destination: %s", strncmp(err, "ssh: ", 5) == 0 ? err + 5 : err);
    for (lua_Integer k = 1; k < i; k++) {
      lua_rawgeti(L, -2, k);
      int same = strcmp(lua_tostring(L, -1), dest) == 0;
      lua_pop(L, 1);
      if (same)
        fail(L, item, "'%s' is listed twice: list each host once (instances is per host)", dest);
    }
    lua_pop(L, 1);
  }
  char **nodes = calloc((size_t)n + 1, sizeof *nodes);
  for (lua_Integer i = 1; nodes && i <= n; i++) {
    lua_rawgeti(L, -1, i);
    nodes[i - 1] = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!nodes[i - 1]) {
      for (lua_Integer k = 0; k < i - 1; k++)
        free(nodes[k]);
      free(nodes);
      nodes = NULL;
    }
  }
  if (!nodes)
    lerror(L, "deploy: out of memory reading the config");
  for (size_t i = 0; i < t->nnodes; i++)
    free(t->nodes[i]);
  free(t->nodes);
  t->nodes = nodes;
  t->nnodes = (size_t)n;
  lua_pop(L, 1);
}

/* One router from the table at ri (p names it in messages), into *out.
 * Raises on a bad field; *out is set only when the router was made. */
static void make_one_router(lua_State *L, int ri, const char *p, target_config *t, int in_list, router **out) {
  static const char *const allowed[] = {"kind", "socket", "backend", "timeout", "drain_timeout", "prefix", "map", NULL};
  char kind[32], socket[1024], backend[128], prefix[32], map[512], err[DC_ERR_MAX], expanded[1024];
  engine *e = lengine_get(L);
  str_field(L, ri, p, "kind", in_list ? NULL : "none", kind, sizeof kind);
  if (strcmp(kind, "test") == 0) {
    if (in_list)
      fail(L, p, "kind '%s' cannot be one of several routers: give the test router alone, as router = { kind = "
           "'test' }", kind);
    lconfig_test_router(L, ri, p, t);
    return;
  }
  if (strcmp(kind, "none") != 0 && strcmp(kind, "haproxy") != 0 && strcmp(kind, "nginx") != 0)
    fail(L, p, "kind '%s' is not known (known: haproxy, nginx, none, test)", kind);
  if (in_list && strcmp(kind, "none") == 0)
    fail(L, p, "kind '%s' cannot be one of several routers: list the load balancers that weigh servers (haproxy, "
         "nginx), or leave routers out", kind);
  int rc;
  if (strcmp(kind, "nginx") == 0) {
    rc = make_nginx_router(L, ri, p, e, out, err);
    if (rc != 0)
      lerror(L, err);
    return;
  }
  check_keys(L, ri, p, allowed);
  if (strcmp(kind, "none") == 0) {
    rc = router_none_new(out, e, err);
  } else {
    router_haproxy_opts o;
    memset(&o, 0, sizeof o);
    str_field(L, ri, p, "socket", NULL, socket, sizeof socket);
    dc_strlcpy(expanded, socket, sizeof expanded);
    str_field(L, ri, p, "backend", NULL, backend, sizeof backend);
    if (!backend[0])
      fail(L, p, "backend is empty: %s", "name the HAProxy backend that serves this target");
    str_field(L, ri, p, "prefix", "dc_", prefix, sizeof prefix);
    str_field(L, ri, p, "map", "", map, sizeof map);
    o.socket = expanded;
    /* Over ssh, the target's own connections when it has them (one
     * master per host even when the balancer is also an app host), else
     * ssh's defaults: the user's config, agent and keys, DEPLOY_SSH_KEY. */
    if (strncmp(expanded, "ssh://", 6) == 0 && !t->ssh) {
      ssh_opts so;
      memset(&so, 0, sizeof so);
      if (ssh_ctx_new(&t->ssh, e, &so, err) != 0)
        fail(L, p, "socket over ssh: %s", strncmp(err, "ssh: ", 5) == 0 ? err + 5 : err);
    }
    o.ssh = t->ssh;
    o.backend = backend;
    o.prefix = prefix;
    o.map = map[0] ? map : NULL;
    o.timeout = num_field(L, ri, p, "timeout", 5, 0.01, 600);
    o.drain_timeout = num_field(L, ri, p, "drain_timeout", 30, 0, 3600);
    rc = router_haproxy_new(out, e, &o, err);
  }
  if (rc != 0)
    lerror(L, err);
}

/* routers = { {...}, {...} }: each is made as it is read and kept in
 * t->routers, so an error in a later one leaves nothing unowned
 * (target_config_free frees them); then one group of them all. */
static void make_routers(lua_State *L, int li, const char *path, target_config *t) {
  char full[160], item[200], err[DC_ERR_MAX];
  dc_fmt(full, sizeof full, "%s.routers", path);
  lua_Integer n = luaL_len(L, li);
  size_t keys = 0;
  lua_pushnil(L);
  while (lua_next(L, li)) {
    keys++;
    lua_pop(L, 1);
  }
  if (n < 1 || (size_t)n != keys || n > TARGET_ROUTERS_MAX)
    fail(L, full, "must be a list of 1 to 8 router tables, e.g. { { kind = 'haproxy', ... }, { kind = 'nginx', ... } }%s",
         "");
  for (lua_Integer i = 1; i <= n; i++) {
    dc_fmt(item, sizeof item, "%s[%lld]", full, (long long)i);
    if (lua_rawgeti(L, li, i) != LUA_TTABLE)
      fail(L, item, "must be a table such as { kind = 'haproxy', socket = ..., backend = ... }, got %s",
           luaL_typename(L, -1));
    router *r = NULL;
    make_one_router(L, lua_gettop(L), item, t, 1, &r);
    t->routers[t->nrouters++] = r;
    lua_pop(L, 1);
  }
  if (n == 1) {
    t->router = t->routers[0];
    return;
  }
  if (router_group_new(&t->router, lengine_get(L), t->routers, t->nrouters, err) != 0)
    lerror(L, err);
}

static void make_router(lua_State *L, int idx, const char *path, target_config *t) {
  char p[128], err[DC_ERR_MAX];
  int has_one = field(L, idx, "router") != LUA_TNIL;
  lua_pop(L, 1);
  if (sub_table(L, idx, path, "routers", 0)) {
    if (has_one)
      fail(L, path, "has both router and routers: %s",
           "keep one (routers = { {...}, {...} } for several load balancers, router = {...} for one)");
    make_routers(L, lua_gettop(L), path, t);
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  dc_fmt(p, sizeof p, "%s.router", path);
  if (!sub_table(L, idx, path, "router", 0)) {
    lua_pop(L, 1);
    if (router_none_new(&t->router, lengine_get(L), err) != 0)
      lerror(L, err);
    return;
  }
  make_one_router(L, lua_gettop(L), p, t, 0, &t->router);
  lua_pop(L, 1);
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

/* webhooks = { {...}, ... } and notify = { {...}, ... }: checked by the
 * runtime (webhook.c, notify.c), owned by the target. */
static void read_hooks(lua_State *L, int idx, const char *path, target_config *t) {
  char what[160];
  if (field(L, idx, "webhooks") != LUA_TNIL) {
    dc_fmt(what, sizeof what, "deploy: config %s.webhooks", path);
    lwebhook_read(L, lua_gettop(L), what, &t->webhooks);
  }
  lua_pop(L, 1);
  if (field(L, idx, "notify") != LUA_TNIL) {
    dc_fmt(what, sizeof what, "deploy: config %s.notify", path);
    lnotify_read(L, lua_gettop(L), what, &t->notify);
  }
  lua_pop(L, 1);
}

/* analysis = { interval, failure_limit, metrics }: checked by the one
 * parser of runtime/analysis_spec.c, and against the target's router. */
static void read_analysis(lua_State *L, int idx, const char *path, target_config *t) {
  char where[160], err[DC_ERR_MAX];
  dc_fmt(where, sizeof where, "config %s.analysis", path);
  if (!sub_table(L, idx, path, "analysis", 0)) {
    lua_pop(L, 1);
    return;
  }
  json_t *v = ljson_from(L, -1, where);
  lua_pop(L, 1);
  int rc = analysis_spec_parse(&t->analysis, v, where, err);
  json_decref(v);
  if (rc != 0)
    lerror(L, err);
  if (analysis_check_router(t->analysis, t->router, t->name, err) != 0) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: config %s.analysis: %s", path, dc_unprefix(err));
    lerror(L, msg);
  }
}

/* retain = { history, versions, logs }: each key defaults to `base` (the
 * top level's, for a target). */
static void read_retain(lua_State *L, int idx, const char *path, const target_retain *base, target_retain *r) {
  static const char *const allowed[] = {"history", "versions", "logs", NULL};
  char p[160];
  dc_fmt(p, sizeof p, "%s.retain", path[0] ? path : "");
  *r = *base;
  if (!sub_table(L, idx, path, "retain", 0)) {
    lua_pop(L, 1);
    return;
  }
  int ri = lua_gettop(L);
  check_keys(L, ri, p, allowed);
  r->history = int_field(L, ri, p, "history", base->history, 1, 1000000);
  r->versions = int_field(L, ri, p, "versions", base->versions, 1, 10000);
  r->log_mb = num_field(L, ri, p, "logs", base->log_mb, 0, 1048576);
  if (r->versions > r->history) {
    char why[200];
    dc_fmt(why, sizeof why, "versions (%d) is more than history (%d): the history is how deployctl knows a "
           "version's logs; raise history to at least %d", r->versions, r->history, r->versions);
    fail(L, p, "%s", why);
  }
  lua_pop(L, 1);
}

static void read_target(lua_State *L, lconfig *c, const char *name, int idx, const char *log_dir,
                        const char *tag, const target_retain *retain) {
  static const char *const allowed[] = {"instances", "hosts", "provider", "router", "routers", "health", "retain",
                                        "analysis", "webhooks", "notify", "restart", NULL};
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
  str_field(L, idx, path, "restart", "on-failure", t->restart, sizeof t->restart);
  if (strcmp(t->restart, "on-failure") != 0 && strcmp(t->restart, "always") != 0 && strcmp(t->restart, "never") != 0) {
    char full[160];
    dc_fmt(full, sizeof full, "%s.restart", path);
    fail(L, full, "'%s' is not known: use 'on-failure', 'always' or 'never'", t->restart);
  }
  read_hosts(L, idx, path, t);
  read_health(L, idx, path, &t->health);
  read_retain(L, idx, path, retain, &t->retain);
  make_provider(L, idx, path, t, log_dir, tag);
  make_router(L, idx, path, t);
  read_hooks(L, idx, path, t);
  read_analysis(L, idx, path, t);
}

/* ---- what `deployctl serve` reads: gitops = { {...}, ... }, serve = {...} ---- */

static void copy_str(lua_State *L, int from, int to, const char *path, const char *k, const char *def) {
  char buf[2048];
  int t = field(L, from, k);
  lua_pop(L, 1);
  if (t == LUA_TNIL && !def)
    return;
  str_field(L, from, path, k, def, buf, sizeof buf);
  lua_pushstring(L, buf);
  lua_setfield(L, to, k);
}

/* Pushes the checked copy of config.gitops: a list of { repo_url, branch,
 * path, interval, prune, secret }. */
static void read_gitops(lua_State *L, int idx) {
  static const char *const allowed[] = {"repo_url", "branch", "path", "interval", "prune", "secret", NULL};
  lua_newtable(L);
  int out = lua_gettop(L);
  if (!sub_table(L, idx, "", "gitops", 0)) {
    lua_pop(L, 1); /* the nil: the empty section stays on top */
    return;
  }
  int gi = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, gi);
  lua_pushnil(L);
  while (lua_next(L, gi)) {
    if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1 || lua_tointeger(L, -2) > n)
      fail(L, ".gitops", "must be a list of tables, e.g. gitops = { { repo_url = \"...\", branch = \"main\" } }%s", "");
    lua_pop(L, 1);
  }
  for (lua_Integer i = 1; i <= n; i++) {
    char path[64];
    dc_fmt(path, sizeof path, ".gitops[%lld]", (long long)i);
    lua_rawgeti(L, gi, i);
    int ei = lua_gettop(L);
    if (!lua_istable(L, ei))
      fail(L, path, "must be a table, got %s", luaL_typename(L, ei));
    check_keys(L, ei, path, allowed);
    lua_newtable(L);
    int oi = lua_gettop(L);
    copy_str(L, ei, oi, path, "repo_url", NULL);
    if (lua_getfield(L, oi, "repo_url") == LUA_TNIL)
      fail(L, path, "has no repo_url: %s", "add repo_url = \"https://...\" (the repository of the manifests)");
    lua_pop(L, 1);
    copy_str(L, ei, oi, path, "branch", "main");
    copy_str(L, ei, oi, path, "path", "/");
    copy_str(L, ei, oi, path, "secret", NULL);
    if (lua_getfield(L, oi, "secret") == LUA_TSTRING && lua_rawlen(L, -1) == 0)
      fail(L, path, "has an empty secret: %s",
           "give the webhook's shared secret (secret = \"${WEBHOOK_SECRET}\"), or leave secret out to take no webhooks");
    lua_pop(L, 1);
    lua_pushnumber(L, num_field(L, ei, path, "interval", 60, 0.01, 86400));
    lua_setfield(L, oi, "interval");
    lua_pushboolean(L, bool_field(L, ei, path, "prune", 0));
    lua_setfield(L, oi, "prune");
    lua_rawseti(L, out, i);
    lua_settop(L, gi);
  }
  lua_settop(L, out);
}

/* Pushes the checked copy of config.serve: { listen, tls_cert, tls_key,
 * supervise = { interval, limit, window, backoff_max } }. */
static void read_serve(lua_State *L, int idx) {
  static const char *const allowed[] = {"listen", "tls_cert", "tls_key", "supervise", NULL};
  static const char *const sup_allowed[] = {"interval", "limit", "window", "backoff_max", NULL};
  lua_newtable(L);
  int out = lua_gettop(L);
  if (!sub_table(L, idx, "", "serve", 0)) {
    lua_pop(L, 1); /* the nil: the empty section stays on top */
    return;
  }
  int si = lua_gettop(L);
  check_keys(L, si, ".serve", allowed);
  copy_str(L, si, out, ".serve", "listen", NULL);
  copy_str(L, si, out, ".serve", "tls_cert", NULL);
  copy_str(L, si, out, ".serve", "tls_key", NULL);
  if (sub_table(L, si, ".serve", "supervise", 0)) {
    int pi = lua_gettop(L);
    check_keys(L, pi, ".serve.supervise", sup_allowed);
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, num_field(L, pi, ".serve.supervise", "interval", 1, 0.05, 3600));
    lua_setfield(L, -2, "interval");
    lua_pushinteger(L, int_field(L, pi, ".serve.supervise", "limit", 5, 1, 1000));
    lua_setfield(L, -2, "limit");
    lua_pushnumber(L, num_field(L, pi, ".serve.supervise", "window", 300, 1, 86400));
    lua_setfield(L, -2, "window");
    lua_pushnumber(L, num_field(L, pi, ".serve.supervise", "backoff_max", 60, 0.1, 3600));
    lua_setfield(L, -2, "backoff_max");
    lua_setfield(L, out, "supervise");
  }
  lua_settop(L, out);
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
    dc_fmt(msg, sizeof msg, "deploy: cannot read config file '%s': %s (give --config FILE or create ./deployctl.lua)",
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
  static const char *const allowed[] = {"state", "clock", "targets", "retain", "simulate", "gitops", "serve", NULL};
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING)
    load_file(L, idx);
  else if (!lua_istable(L, idx))
    fail(L, "", "must be a table or the path of a Lua file that returns one, got %s", luaL_typename(L, idx));
  check_keys(L, idx, "(top level)", allowed);
  lconfig *c = lua_newuserdatauv(L, sizeof *c, 1);
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
  target_retain defaults = {.history = 200, .versions = 10, .log_mb = 100}, retain;
  read_retain(L, idx, "", &defaults, &retain);

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
    read_target(L, c, name, lua_gettop(L), log_dir, tag, &retain);
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
  lconfig_simulate(L, idx, c);
  lua_settop(L, ci);
  /* The sections only serve reads, kept as checked Lua tables. */
  lua_createtable(L, 0, 2);
  read_gitops(L, idx);
  lua_setfield(L, -2, "gitops");
  read_serve(L, idx);
  lua_setfield(L, -2, "serve");
  lua_setiuservalue(L, ci, 1);
  lua_settop(L, ci);
  return c;
}

/* ---- the readers, for the other config files (lconfig_test.c) ---- */

int lconfig_fail(lua_State *L, const char *path, const char *fmt, const char *a) { return fail(L, path, fmt, a); }
void lconfig_check_keys(lua_State *L, int idx, const char *path, const char *const *allowed) {
  check_keys(L, idx, path, allowed);
}
double lconfig_num(lua_State *L, int idx, const char *path, const char *k, double def, double lo, double hi) {
  return num_field(L, idx, path, k, def, lo, hi);
}
int lconfig_bool(lua_State *L, int idx, const char *path, const char *k, int def) {
  return bool_field(L, idx, path, k, def);
}
int lconfig_sub_table(lua_State *L, int idx, const char *path, const char *k, int required) {
  return sub_table(L, idx, path, k, required);
}
