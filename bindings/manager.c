/* DeploymentManager: deploy, rollback, get_status (the specification's
 * methods) and the read-side helpers the CLI uses (history, events,
 * instances, targets). Arguments are checked here; the work is done by
 * runtime/rollout.c and runtime/target.c on the shared engine. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bindings.h"
#include "run.h"
#include "lsched.h"
#include "health.h"
#include "rollout.h"
#include "store.h"
#include "util.h"

typedef struct lmanager {
  lconfig *cfg;
  store *s;
  engine *e;
} lmanager;

enum { UV_CONFIG = 1, UV_STRATEGY = 2, UV_ON_EVENT = 3, UV_STRATEGIES = 4, UV_COUNT = 4 };

static lmanager *check_manager(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  if (!m->s)
    luaL_error(L, "deploy: this DeploymentManager was closed");
  return m;
}

static int manager_close(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  if (m->s && dc_rollouts_waiting > 0)
    return luaL_error(L, "deploy: close(): a deployment is still running in this process");
  store_close(m->s);
  m->s = NULL;
  return 0;
}

/* A rollout still running while the state closes (after an error) keeps
 * using the store: it stays open, the process is ending anyway. */
static int manager_gc(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  if (dc_rollouts_waiting == 0) {
    store_close(m->s);
    m->s = NULL;
  }
  return 0;
}

/* true, or false and why: the shape of methods whose failure is an answer. */
static int push_outcome(lua_State *L, int rc, const char *err) {
  lua_pushboolean(L, rc == 0);
  if (rc == 0)
    return 1;
  lua_pushstring(L, err);
  return 2;
}

/* ---- arguments ---- */

static const char *check_string_arg(lua_State *L, int arg, const char *name, const char *method) {
  if (lua_type(L, arg) != LUA_TSTRING) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s: %s must be a string, got %s", method, name, luaL_typename(L, arg));
    lerror(L, msg);
  }
  size_t len;
  const char *s = lua_tolstring(L, arg, &len);
  if (strlen(s) != len) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s: %s holds a NUL byte: use only printable characters", method, name);
    lerror(L, msg);
  }
  return s;
}

static target_config *check_target(lua_State *L, lmanager *m, int arg, const char *method) {
  const char *name = check_string_arg(L, arg, "target", method);
  target_config *t = lconfig_target(m->cfg, name);
  if (!t) {
    char msg[DC_ERR_MAX], known[300];
    lconfig_known(m->cfg, known, sizeof known);
    dc_fmt(msg, sizeof msg, "deploy: unknown target '%.64s' (known: %s)", name, known[0] ? known : "none configured");
    lerror(L, msg);
  }
  return t;
}

static const char *check_version(lua_State *L, int arg, const char *method) {
  char err[DC_ERR_MAX], what[64];
  const char *v = check_string_arg(L, arg, "version", method);
  dc_fmt(what, sizeof what, "%s: version", method);
  if (dc_validate_version(v, what, err) != 0)
    lerror(L, err);
  return v;
}

/* ---- results ---- */

static void push_result(lua_State *L, const rollout_result *r) {
  lua_createtable(L, 0, 6);
  lset_boolean(L, "success", r->success);
  lset_string(L, "version", r->version);
  lset_string(L, "target", r->target);
  lset_string(L, "strategy", r->strategy);
  lset_number(L, "duration", r->duration);
  if (r->nerrors > 0) {
    lua_createtable(L, r->nerrors, 0);
    for (int i = 0; i < r->nerrors; i++) {
      lua_pushstring(L, r->errors[i]);
      lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "errors");
  }
}

static void refused(rollout_result *res, const target_config *t, const char *version, const char *strategy,
                    const char *err) {
  memset(res, 0, sizeof *res);
  dc_strlcpy(res->target, t->name, sizeof res->target);
  dc_strlcpy(res->version, version, sizeof res->version);
  dc_strlcpy(res->strategy, strategy, sizeof res->strategy);
  res->nerrors = 1;
  dc_strlcpy(res->errors[0], err, DC_ERR_MAX);
}

/* ---- deploy ---- */

typedef struct deploy_wait {
  int done;
  int awaiting;
  ltask *task;
  rollout_result res;
} deploy_wait;

static void deploy_done(void *payload, const rollout_result *res) {
  deploy_wait *w = payload;
  w->res = *res;
  w->done = 1;
  if (w->awaiting)
    lsched_ready(w->task);
}

static int deploy_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  push_result(L, &((deploy_wait *)ctx)->res);
  return 1;
}

static void check_options(lua_State *L, int idx) {
  static const char *const allowed[] = {"strategy", "metadata", "on_event", "hooks", "hook_timeout", NULL};
  lcheck_keys(L, idx, allowed, "deploy: deploy: unknown option '%s' (known: %s)");
}

static int manager_handler_idx(lua_State *L, int manager_idx) {
  if (lua_getiuservalue(L, manager_idx, UV_ON_EVENT) == LUA_TFUNCTION)
    return lua_gettop(L);
  lua_pop(L, 1);
  return 0;
}

/* A strategy given by name: one registered with the manager. */
static int resolve_strategy(lua_State *L, int manager_idx, int idx) {
  if (lua_type(L, idx) != LUA_TSTRING)
    return idx;
  const char *name = lua_tostring(L, idx);
  if (lmanager_push_strategy(L, manager_idx, name) == LUA_TNIL)
    luaL_error(L, "deploy: no strategy named '%s' is registered with this manager "
                  "(register it with manager:register_strategy(name, strategy))", name);
  return lua_gettop(L);
}

static int start_run(lua_State *L, lmanager *m, int manager_idx, target_config *t, const char *version,
                     const char *kind, int strategy_idx, int metadata_idx, const char *metadata_json, int on_event_idx,
                     int hooks_idx, double hook_timeout, lmanager_done_cb cb, void *payload, char *err) {
  if (!strategy_idx) {
    lua_getiuservalue(L, manager_idx, UV_STRATEGY);
    strategy_idx = lua_gettop(L);
  }
  strategy_idx = resolve_strategy(L, manager_idx, strategy_idx);
  if (!metadata_idx && metadata_json) {
    ljson_decode(L, metadata_json);
    metadata_idx = lua_istable(L, -1) ? lua_gettop(L) : 0;
  }
  lrun_spec sp = {.e = m->e, .s = m->s, .t = t, .version = version, .kind = kind,
                  .strategy_idx = strategy_idx, .hooks_idx = hooks_idx, .hook_timeout = hook_timeout,
                  .metadata_idx = metadata_idx, .on_event_idx = on_event_idx,
                  .on_event2_idx = manager_handler_idx(L, manager_idx), .cb = cb, .payload = payload};
  return lrun_start(L, &sp, err);
}

static const char *strategy_label(lua_State *L, int idx) {
  lstrategy *ls = idx ? lstrategy_test(L, idx) : NULL;
  if (ls)
    return ls->s->name;
  if (idx && lua_istable(L, idx)) {
    lua_getfield(L, idx, "name");
    const char *n = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (n)
      return n;
  }
  return "custom";
}

/* Starts the run and waits for it: yields inside a coroutine task (so
 * deploy.parallel rolls targets out side by side), else runs the loop. */
static int deploy_and_wait(lua_State *L, lmanager *m, target_config *t, const char *version, const char *kind,
                           int strategy_idx, int metadata_idx, int on_event_idx, int hooks_idx, double hook_timeout) {
  char err[DC_ERR_MAX];
  deploy_wait *w = lua_newuserdatauv(L, sizeof *w, 0); /* on the stack across a yield */
  memset(w, 0, sizeof *w);
  w->task = lsched_current(L);
  int rc = start_run(L, m, 1, t, version, kind, strategy_idx, metadata_idx, NULL, on_event_idx, hooks_idx,
                     hook_timeout, deploy_done, w, err);
  if (rc != DC_OK) {
    if (!strategy_idx) {
      lua_getiuservalue(L, 1, UV_STRATEGY);
      strategy_idx = lua_gettop(L);
    }
    refused(&w->res, t, version, strategy_label(L, strategy_idx), err);
    push_result(L, &w->res);
    return 1;
  }
  if (!w->done)
    w->awaiting = 1;
  return lsched_await(L, &w->done, (lua_KContext)w, deploy_k);
}

static int manager_deploy(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "deploy");
  const char *version = check_version(L, 3, "deploy");
  int strategy_idx = 0, metadata_idx = 0, on_event_idx = 0, hooks_idx = 0;
  double hook_timeout = 30;
  if (!lua_isnoneornil(L, 4)) {
    if (!lua_istable(L, 4))
      return luaL_error(L, "deploy: deploy: options must be a table, got %s", luaL_typename(L, 4));
    check_options(L, 4);
    if (lua_getfield(L, 4, "strategy") != LUA_TNIL) {
      if (!lstrategy_test(L, -1) && !lua_istable(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "deploy: deploy: options.strategy must be a strategy (deploy.CanaryStrategy{...}, "
                             "deploy.BlueGreenStrategy{...}, a DeploymentStrategy class or a registered name), got %s",
                          luaL_typename(L, -1));
      strategy_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "metadata") != LUA_TNIL) {
      if (!lua_istable(L, -1))
        return luaL_error(L, "deploy: deploy: options.metadata must be a table, got %s", luaL_typename(L, -1));
      metadata_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "on_event") != LUA_TNIL) {
      if (!lua_isfunction(L, -1))
        return luaL_error(L, "deploy: deploy: options.on_event must be a function, got %s", luaL_typename(L, -1));
      on_event_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "hooks") != LUA_TNIL) {
      if (!lua_istable(L, -1))
        return luaL_error(L, "deploy: deploy: options.hooks must be a table of functions, got %s",
                          luaL_typename(L, -1));
      hooks_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "hook_timeout") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0))
        return luaL_error(L, "deploy: deploy: options.hook_timeout must be a number of seconds > 0");
      hook_timeout = lua_tonumber(L, -1);
    }
  }
  return deploy_and_wait(L, m, t, version, "deploy", strategy_idx, metadata_idx, on_event_idx, hooks_idx,
                         hook_timeout);
}

/* ---- rollback ---- */

typedef struct versions {
  const char *want;
  int found;
  char list[400];
  size_t len;
} versions;

static int collect_version(void *payload, const store_deployment *d) {
  versions *v = payload;
  if (strcmp(d->status, "succeeded") != 0)
    return 0;
  if (strcmp(d->version, v->want) == 0)
    v->found = 1;
  if (!strstr(v->list, d->version) && v->len < sizeof v->list - 140)
    v->len += (size_t)snprintf(v->list + v->len, sizeof v->list - v->len, "%s%s", v->len ? ", " : "", d->version);
  return 0;
}

static int manager_rollback(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "rollback");
  char err[DC_ERR_MAX];
  store_target tg;
  if (store_target_get(m->s, t->name, &tg, err) != 0)
    return lerror(L, err);
  const char *version;
  lua_settop(L, 3);
  if (lua_isnil(L, 3)) {
    if (!tg.previous_version[0]) {
      rollout_result res;
      dc_fmt(err, sizeof err, "deploy: '%s' has no previous version to roll back to: name one with rollback(target, version)",
             t->name);
      refused(&res, t, tg.current_version, "rollback", err);
      push_result(L, &res);
      return 1;
    }
    lua_pushstring(L, tg.previous_version);
    lua_replace(L, 3);
  }
  version = check_version(L, 3, "rollback");
  versions v = {.want = version};
  if (store_history(m->s, t->name, 0, collect_version, &v, err) != 0)
    return lerror(L, err);
  if (!v.found) {
    dc_fmt(err, sizeof err, "deploy: rollback: version '%s' was never deployed successfully to '%s' (known: %s)", version,
           t->name, v.len ? v.list : "none");
    return lerror(L, err);
  }
  lstrategy_push_bluegreen(L);
  return deploy_and_wait(L, m, t, version, "rollback", lua_gettop(L), 0, 0, 0, 30);
}

/* ---- status ---- */

typedef struct live_set {
  const char *live;
  provider *p;
  int count;
  char **urls;
  size_t n, cap;
  const target_config *t;
} live_set;

static int count_live(void *payload, const store_instance *in) {
  live_set *ls = payload;
  if (!ls->live[0] || strcmp(in->deployment_id, ls->live) != 0 || !ls->p->alive(ls->p, in))
    return 0;
  ls->count++;
  if (ls->n == ls->cap) {
    size_t cap = ls->cap ? ls->cap * 2 : 8;
    char **g = realloc(ls->urls, cap * sizeof *g);
    if (!g)
      return 1;
    ls->urls = g;
    ls->cap = cap;
  }
  char url[768];
  target_instance_url(ls->t, in, url, sizeof url);
  ls->urls[ls->n++] = strdup(url);
  return 0;
}

typedef struct health_wait {
  int done;
  health_state state;
} health_wait;

static void health_seen(void *payload, const health_result *r, size_t n) {
  health_wait *w = payload;
  w->state = health_classify(r, n);
  w->done = 1;
}

static int manager_get_status(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "get_status");
  char err[DC_ERR_MAX];
  store_target tg;
  if (store_target_get(m->s, t->name, &tg, err) != 0)
    return lerror(L, err);
  live_set ls = {.live = tg.live_deployment, .p = t->provider, .t = t};
  if (store_instances(m->s, t->name, count_live, &ls, err) != 0)
    return lerror(L, err);
  const char *health = tg.health;
  /* Outside a rollout the health is read live; during one, the rollout's
   * last observation is the truth. */
  if (strcmp(tg.status, "running") != 0 && strcmp(tg.status, "rolling_back") != 0) {
    health_wait w = {0};
    health_opts o = {.timeout = t->health.timeout, .expect_status = t->health.expect_status};
    if (health_check_start(m->e, (const char *const *)ls.urls, ls.n, &o, health_seen, &w, err) == 0) {
      lsched_block(L, &w.done);
      health = health_state_name(w.state);
    }
  }
  for (size_t i = 0; i < ls.n; i++)
    free(ls.urls[i]);
  free(ls.urls);
  lua_createtable(L, 0, 5);
  lset_string(L, "target", t->name);
  if (tg.current_version[0])
    lua_pushstring(L, tg.current_version);
  else
    lua_pushnil(L);
  lua_setfield(L, -2, "current_version");
  lset_string(L, "status", tg.status);
  lset_string(L, "health", health);
  lset_integer(L, "instances", ls.count);
  return 1;
}

/* ---- read side for the CLI and scripts ---- */

static void push_deployment_row(lua_State *L, const store_deployment *d) {
  char ts[40];
  lua_createtable(L, 0, 16);
  lset_string(L, "id", d->id);
  lset_string(L, "target", d->target);
  lset_string(L, "version", d->version);
  lset_string(L, "from_version", d->from_version);
  lset_string(L, "kind", d->kind);
  lset_string(L, "strategy", d->strategy);
  lset_string(L, "status", d->status);
  dc_iso8601(d->created_at, ts, sizeof ts);
  lset_string(L, "created_at", ts);
  lset_number(L, "started", d->created_at);
  lset_number(L, "duration", d->duration);
  lset_string(L, "user", d->user);
  lset_integer(L, "pid", d->owner_pid);
  ljson_decode(L, d->errors);
  lua_setfield(L, -2, "errors");
  ljson_decode(L, d->metadata);
  lua_setfield(L, -2, "metadata");
}

typedef struct list_ctx {
  lua_State *L;
  int n;
} list_ctx;

static int history_row(void *payload, const store_deployment *d) {
  list_ctx *c = payload;
  push_deployment_row(c->L, d);
  lua_rawseti(c->L, -2, ++c->n);
  return 0;
}

static int manager_history(lua_State *L) {
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "history");
  lua_Integer limit = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, limit >= 0, 3, "limit must be >= 0");
  char err[DC_ERR_MAX];
  list_ctx c = {L, 0};
  lua_newtable(L);
  if (store_history(m->s, t->name, (int)limit, history_row, &c, err) != 0)
    return lerror(L, err);
  return 1;
}

static int manager_deployment(lua_State *L) {
  lmanager *m = check_manager(L);
  const char *id = check_string_arg(L, 2, "deployment id", "deployment");
  store_deployment d;
  char err[DC_ERR_MAX];
  memset(&d, 0, sizeof d);
  int rc = store_deployment_get(m->s, id, &d, err);
  if (rc == DC_NOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc != 0)
    return lerror(L, err);
  push_deployment_row(L, &d);
  store_deployment_clear(&d);
  return 1;
}

static int event_row(void *payload, const store_event *ev) {
  list_ctx *c = payload;
  lrun_push_event(c->L, ev);
  lua_rawseti(c->L, -2, ++c->n);
  return 0;
}

static int manager_events(lua_State *L) {
  lmanager *m = check_manager(L);
  const char *id = check_string_arg(L, 2, "deployment id", "events");
  char err[DC_ERR_MAX];
  list_ctx c = {L, 0};
  lua_newtable(L);
  if (store_events(m->s, id, event_row, &c, err) != 0)
    return lerror(L, err);
  return 1;
}

typedef struct inst_ctx {
  lua_State *L;
  int n;
  const char *live;
  provider *p;
} inst_ctx;

static int instance_row(void *payload, const store_instance *in) {
  inst_ctx *c = payload;
  lua_State *L = c->L;
  lua_createtable(L, 0, 10);
  lset_integer(L, "id", in->id);
  lset_string(L, "version", in->version);
  lset_string(L, "deployment_id", in->deployment_id);
  lset_integer(L, "index", in->idx);
  lset_string(L, "host", in->host);
  lset_integer(L, "port", in->port);
  lset_integer(L, "pid", in->pid);
  lset_string(L, "state", in->state);
  lset_integer(L, "weight", in->weight);
  lset_string(L, "server", in->server);
  lset_string(L, "log", in->log_path);
  lset_boolean(L, "alive", c->p->alive(c->p, in));
  lset_boolean(L, "live", c->live[0] && strcmp(c->live, in->deployment_id) == 0);
  lua_rawseti(L, -2, ++c->n);
  return 0;
}

static int manager_instances(lua_State *L) {
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "instances");
  char err[DC_ERR_MAX];
  store_target tg;
  if (store_target_get(m->s, t->name, &tg, err) != 0)
    return lerror(L, err);
  inst_ctx c = {L, 0, tg.live_deployment, t->provider};
  lua_newtable(L);
  if (store_instances(m->s, t->name, instance_row, &c, err) != 0)
    return lerror(L, err);
  return 1;
}

/* live_instances(target): every instance of the target with its health
 * checked now and its weight as the router reports it now (nil when the
 * router is unreachable: then router_error says why). */
typedef struct live_read {
  int done;
  char err[DC_ERR_MAX];
} live_read;

static void router_read_done(void *payload, const char *err) {
  live_read *lr = payload;
  if (err)
    dc_strlcpy(lr->err, err, sizeof lr->err);
  lr->done = 1;
}

typedef struct live_health {
  int done;
  lua_State *L;
  int list_idx;
} live_health;

static void live_health_done(void *payload, const health_result *r, size_t n) {
  live_health *lh = payload;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(lh->L, lh->list_idx, (lua_Integer)i + 1);
    lua_pushstring(lh->L, r[i].ok ? "healthy" : "unhealthy");
    lua_setfield(lh->L, -2, "health");
    if (!r[i].ok) {
      lua_pushstring(lh->L, r[i].error);
      lua_setfield(lh->L, -2, "health_error");
    }
    lua_pop(lh->L, 1);
  }
  lh->done = 1;
}

static int manager_live_instances(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "live_instances");
  char err[DC_ERR_MAX];
  lua_settop(L, 2);
  manager_instances(L); /* 3: the list */
  int list = 3;
  size_t n = lua_rawlen(L, list);
  router_server servers[256];
  size_t nservers = 0;
  live_read lr;
  memset(&lr, 0, sizeof lr);
  if (t->router->read(t->router, servers, 256, &nservers, router_read_done, &lr, err) != 0)
    router_read_done(&lr, err);
  lsched_block(L, &lr.done);
  char **urls = calloc(n ? n : 1, sizeof *urls);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, list, (lua_Integer)i + 1);
    lua_getfield(L, -1, "host");
    lua_getfield(L, -2, "port");
    lua_getfield(L, -3, "server");
    char url[600];
    dc_fmt(url, sizeof url, "http://%s:%d%s", lua_tostring(L, -3), (int)lua_tointeger(L, -2), t->health.path);
    urls[i] = strdup(url);
    const char *name = lua_tostring(L, -1);
    int weight = -1;
    for (size_t k = 0; k < nservers; k++)
      if (name && strcmp(servers[k].name, name) == 0)
        weight = servers[k].weight;
    lua_pop(L, 3);
    if (strcmp(t->router->kind, "none") == 0) {
      lua_pushnil(L);
    } else if (weight >= 0) {
      lua_pushinteger(L, weight);
    } else {
      lua_pushboolean(L, 0); /* not in the proxy */
    }
    lua_setfield(L, -2, "router_weight");
    lua_pop(L, 1);
  }
  live_health lh = {0, L, list};
  health_opts o = {.timeout = t->health.timeout, .expect_status = t->health.expect_status};
  if (health_check_start(m->e, (const char *const *)urls, n, &o, live_health_done, &lh, err) == 0)
    lsched_block(L, &lh.done);
  for (size_t i = 0; i < n; i++)
    free(urls[i]);
  free(urls);
  lua_settop(L, list);
  if (lr.err[0]) {
    lua_pushstring(L, lr.err);
    return 2;
  }
  return 1;
}

static int manager_targets(lua_State *L) {
  lmanager *m = check_manager(L);
  lua_createtable(L, (int)m->cfg->ntargets, 0);
  for (size_t i = 0; i < m->cfg->ntargets; i++) {
    lua_pushstring(L, m->cfg->targets[i]->name);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

typedef struct wait_cb {
  int done;
  char err[DC_ERR_MAX];
} wait_cb;

static void reconciled(void *payload, const char *err) {
  wait_cb *w = payload;
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  w->done = 1;
}

static int reconcile_target(lua_State *L, lmanager *m, target_config *t, char *err) {
  wait_cb w;
  memset(&w, 0, sizeof w);
  if (target_reconcile(m->e, m->s, t, reconciled, &w, err) != 0)
    return -1;
  lsched_block(L, &w.done);
  if (w.err[0]) {
    dc_strlcpy(err, w.err, DC_ERR_MAX);
    return -1;
  }
  return 0;
}

/* reconcile(target): bring the target back to its one live version (restart
 * dead instances, re-add what a restarted HAProxy forgot, stop strays).
 * Returns true, or false and the reason. */
static int manager_reconcile(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "reconcile");
  char err[DC_ERR_MAX];
  return push_outcome(L, reconcile_target(L, m, t, err), err);
}

/* integrity_check(): SQLite's PRAGMA integrity_check on the store. */
static int manager_integrity_check(lua_State *L) {
  lmanager *m = check_manager(L);
  char err[DC_ERR_MAX];
  return push_outcome(L, store_integrity_check(m->s, err), err);
}

static int manager_state_path(lua_State *L) {
  lmanager *m = check_manager(L);
  lua_pushstring(L, store_path(m->s));
  return 1;
}

/* ---- operator commands and named strategies ---- */

/* promote(target) / abort(target): for a rollout running in any process
 * (paused, or waiting between steps), through the store. */
static int control(lua_State *L, const char *command) {
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, command);
  char err[DC_ERR_MAX], who[128];
  store_target tg;
  if (store_target_get(m->s, t->name, &tg, err) != 0)
    return lerror(L, err);
  if (strcmp(tg.status, "running") != 0 && strcmp(tg.status, "rolling_back") != 0) {
    lua_pushboolean(L, 0);
    lua_pushfstring(L, "no deployment of '%s' is running (status: %s)", t->name, tg.status);
    return 2;
  }
  dc_whoami(who, sizeof who);
  if (store_control_set(m->s, t->name, command, who, err) != 0)
    return lerror(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

static int manager_promote(lua_State *L) { return control(L, "promote"); }
static int manager_abort(lua_State *L) { return control(L, "abort"); }

static void check_named_strategy(lua_State *L, int idx, const char *name) {
  if (lstrategy_test(L, idx))
    return;
  if (lua_istable(L, idx)) {
    lua_getfield(L, idx, "execute");
    int ok = lua_isfunction(L, -1);
    lua_pop(L, 1);
    if (ok)
      return;
  }
  luaL_error(L, "deploy: strategy '%s' must be a built-in strategy or a DeploymentStrategy class, got %s", name,
             luaL_typename(L, idx));
}

static int manager_register_strategy(lua_State *L) {
  check_manager(L);
  const char *name = luaL_checkstring(L, 2);
  char err[DC_ERR_MAX];
  if (dc_validate_target_name(name, err) != 0)
    return luaL_error(L, "deploy: register_strategy: name '%s' must be a simple word ([A-Za-z0-9_-])", name);
  check_named_strategy(L, 3, name);
  lua_getiuservalue(L, 1, UV_STRATEGIES);
  lua_pushvalue(L, 3);
  lua_setfield(L, -2, name);
  return 0;
}

int lmanager_push_strategy(lua_State *L, int manager_idx, const char *name) {
  manager_idx = lua_absindex(L, manager_idx);
  luaL_checkudata(L, manager_idx, MANAGER_MT);
  if (strcmp(name, "canary") == 0 || strcmp(name, "blue-green") == 0) {
    lua_getiuservalue(L, manager_idx, UV_STRATEGIES);
    if (lua_getfield(L, -1, name) != LUA_TNIL) {
      lua_remove(L, -2);
      return lua_type(L, -1);
    }
    lua_pop(L, 2);
    lua_pushnil(L);
    return LUA_TNIL;
  }
  lua_getiuservalue(L, manager_idx, UV_STRATEGIES);
  int t = lua_getfield(L, -1, name);
  lua_remove(L, -2);
  return t;
}

static lmanager *manager_at(lua_State *L, int idx) {
  lmanager *m = luaL_checkudata(L, idx, MANAGER_MT);
  if (!m->s)
    luaL_error(L, "deploy: this DeploymentManager was closed");
  return m;
}

store *lmanager_store(lua_State *L, int idx) { return manager_at(L, idx)->s; }
engine *lmanager_engine(lua_State *L, int idx) { return manager_at(L, idx)->e; }
target_config *lmanager_target(lua_State *L, int idx, const char *name) {
  return lconfig_target(manager_at(L, idx)->cfg, name);
}
void lmanager_known(lua_State *L, int idx, char *buf, size_t size) { lconfig_known(manager_at(L, idx)->cfg, buf, size); }

int lmanager_start(lua_State *L, int manager_idx, const char *target, const char *version, int strategy_idx,
                   const char *metadata_json, lmanager_done_cb cb, void *payload, char *err) {
  manager_idx = lua_absindex(L, manager_idx);
  if (strategy_idx)
    strategy_idx = lua_absindex(L, strategy_idx);
  lmanager *m = manager_at(L, manager_idx);
  int top = lua_gettop(L);
  target_config *t = lconfig_target(m->cfg, target);
  if (!t) {
    char known[300];
    lconfig_known(m->cfg, known, sizeof known);
    luaL_error(L, "deploy: unknown target '%s' (known: %s)", target, known);
  }
  if (dc_validate_version(version, "version", err) != 0)
    lerror(L, err);
  int rc = start_run(L, m, manager_idx, t, version, "deploy", strategy_idx, 0, metadata_json, 0, 0, 30, cb,
                     payload, err);
  lua_settop(L, top);
  return rc;
}

/* ---- construction ---- */

typedef struct recovered {
  lmanager *m;
  char targets[64][64];
  int n;
} recovered;

static int note_recovered(void *payload, const store_deployment *d) {
  recovered *r = payload;
  for (int i = 0; i < r->n; i++)
    if (strcmp(r->targets[i], d->target) == 0)
      return 0;
  if (r->n < 64)
    dc_strlcpy(r->targets[r->n++], d->target, sizeof r->targets[0]);
  return 0;
}

static void open_store(lua_State *L, lmanager *m) {
  char err[DC_ERR_MAX];
  if (store_open(&m->s, m->cfg->state, err) != 0)
    lerror(L, err);
  for (size_t i = 0; i < m->cfg->ntargets; i++)
    if (store_target_ensure(m->s, m->cfg->targets[i]->name, err) != 0)
      lerror(L, err);
  /* A deployment whose process died is marked interrupted, and its target
   * goes back to one consistent version before anything else runs. */
  recovered rec = {.m = m};
  if (store_recover(m->s, note_recovered, &rec, err) != 0)
    lerror(L, err);
  for (int i = 0; i < rec.n; i++) {
    target_config *t = lconfig_target(m->cfg, rec.targets[i]);
    if (t && reconcile_target(L, m, t, err) != 0)
      fprintf(stderr, "deploy: recovering '%s': %s\n", t->name, err);
  }
}

static int manager_new(lua_State *L) {
  lsched_check_can_wait(L);
  lua_settop(L, 1);
  if (lua_isnil(L, 1)) {
    lua_newtable(L);
    lua_replace(L, 1);
  }
  if (!lua_istable(L, 1))
    return luaL_error(L, "deploy: DeploymentManager expects a table { strategy = ..., config = ... }, got %s",
                      luaL_typename(L, 1));
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
    if (strcmp(k, "strategy") && strcmp(k, "config") && strcmp(k, "on_event") && strcmp(k, "strategies"))
      return luaL_error(L, "deploy: DeploymentManager has no option '%s' (known: strategy, config, on_event, strategies)",
                        lua_type(L, -2) == LUA_TSTRING ? k : luaL_typename(L, -2));
    lua_pop(L, 1);
  }
  engine *e = lengine_get(L);
  lua_getfield(L, 1, "config"); /* 2 */
  if (lua_isnil(L, 2) && lua_getfield(L, LUA_REGISTRYINDEX, "deploy.default_config") == LUA_TSTRING) {
    lua_replace(L, 2);
  } else if (lua_isnil(L, 2)) {
    lua_pop(L, 1);
  }
  if (lua_isnil(L, 2)) {
    const char *path = getenv("DEPLOY_CONFIG");
    if (!path || !*path)
      path = "deploy.lua";
    if (access(path, F_OK) != 0)
      return luaL_error(L, "deploy: DeploymentManager needs config = { targets = { ... } } or the path of a config "
                           "file (none given and %s does not exist)", path);
    lua_pushstring(L, path);
    lua_replace(L, 2);
  }
  lconfig *cfg = lconfig_load(L, 2, e); /* 3: config userdata */
  if (cfg->virtual_clock >= 0 && e->virtual_clock != cfg->virtual_clock &&
      engine_set_virtual(e, cfg->virtual_clock) != 0)
    return luaL_error(L, "deploy: cannot switch clocks (config.clock) while timers are pending");
  lua_getfield(L, 1, "strategy"); /* 4 */
  if (lua_isnil(L, 4)) {
    lua_pop(L, 1);
    lstrategy_push_bluegreen(L);
  } else if (!lstrategy_test(L, 4) && !lua_istable(L, 4)) {
    return luaL_error(L, "deploy: DeploymentManager strategy must be a strategy (deploy.CanaryStrategy{...}, "
                         "deploy.BlueGreenStrategy{...} or a DeploymentStrategy class), got %s",
                      luaL_typename(L, 4));
  }
  lua_getfield(L, 1, "on_event"); /* 5 */
  if (!lua_isnil(L, 5) && !lua_isfunction(L, 5))
    return luaL_error(L, "deploy: DeploymentManager on_event must be a function, got %s", luaL_typename(L, 5));
  lmanager *m = lua_newuserdatauv(L, sizeof *m, UV_COUNT); /* 6 */
  memset(m, 0, sizeof *m);
  m->cfg = cfg;
  m->e = e;
  luaL_setmetatable(L, MANAGER_MT);
  lua_pushvalue(L, 3);
  lua_setiuservalue(L, 6, UV_CONFIG);
  lua_pushvalue(L, 4);
  lua_setiuservalue(L, 6, UV_STRATEGY);
  lua_pushvalue(L, 5);
  lua_setiuservalue(L, 6, UV_ON_EVENT);
  lua_newtable(L);
  if (lua_getfield(L, 1, "strategies") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      return luaL_error(L, "deploy: DeploymentManager strategies must be a table { name = strategy }, got %s",
                        luaL_typename(L, -1));
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING)
        return luaL_error(L, "deploy: DeploymentManager strategies must be keyed by name");
      check_named_strategy(L, lua_gettop(L), lua_tostring(L, -2));
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_settable(L, -5);
    }
  }
  lua_pop(L, 1);
  lua_setiuservalue(L, 6, UV_STRATEGIES);
  open_store(L, m);
  lua_settop(L, 6);
  return 1;
}

void lmanager_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"deploy", manager_deploy},       {"rollback", manager_rollback},   {"get_status", manager_get_status},
      {"history", manager_history},     {"deployment", manager_deployment}, {"events", manager_events},
      {"instances", manager_instances}, {"targets", manager_targets},     {"reconcile", manager_reconcile},
      {"state_path", manager_state_path}, {"integrity_check", manager_integrity_check},
      {"promote", manager_promote},       {"abort", manager_abort},
      {"live_instances", manager_live_instances},
      {"register_strategy", manager_register_strategy},
      {"close", manager_close},           {NULL, NULL}};
  if (luaL_newmetatable(L, MANAGER_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, manager_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, manager_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, manager_new);
  lua_setfield(L, -2, "DeploymentManager");
}
