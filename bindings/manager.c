/* DeploymentManager: deploy, rollback, get_status (the specification's
 * methods) and the read-side helpers the CLI uses (history, events,
 * instances, targets). Arguments are checked here; the work is done by
 * runtime/rollout.c and runtime/target.c on the shared engine. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bindings.h"
#include "health.h"
#include "rollout.h"
#include "store.h"
#include "util.h"

typedef struct lmanager {
  lconfig *cfg;
  store *s;
  engine *e;
} lmanager;

enum { UV_CONFIG = 1, UV_STRATEGY = 2, UV_ON_EVENT = 3, UV_COUNT = 3 };

static lmanager *check_manager(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  if (!m->s)
    luaL_error(L, "deploy: this DeploymentManager was closed");
  return m;
}

static int manager_close(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  if (m->s) {
    store_close(m->s);
    m->s = NULL;
  }
  return 0;
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
  lua_pushboolean(L, r->success);
  lua_setfield(L, -2, "success");
  lua_pushstring(L, r->version);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, r->target);
  lua_setfield(L, -2, "target");
  lua_pushstring(L, r->strategy);
  lua_setfield(L, -2, "strategy");
  lua_pushnumber(L, r->duration);
  lua_setfield(L, -2, "duration");
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

/* ---- events to Lua ---- */

typedef struct run_ctx {
  lua_State *L;
  int on_event;  /* stack index of a function, or 0 */
  int on_event2; /* manager-wide handler, or 0 */
  int done;
  rollout_result res;
} run_ctx;

static void push_event(lua_State *L, const store_event *ev) {
  char ts[40];
  lua_createtable(L, 0, 6);
  lua_pushstring(L, ev->deployment_id);
  lua_setfield(L, -2, "deployment_id");
  lua_pushstring(L, ev->target);
  lua_setfield(L, -2, "target");
  lua_pushstring(L, ev->kind);
  lua_setfield(L, -2, "kind");
  lua_pushnumber(L, ev->ts);
  lua_setfield(L, -2, "ts");
  dc_iso8601(ev->ts, ts, sizeof ts);
  lua_pushstring(L, ts);
  lua_setfield(L, -2, "time");
  ljson_decode(L, ev->data);
  lua_setfield(L, -2, "data");
}

static void call_handler(lua_State *L, int fn, const store_event *ev) {
  if (!fn)
    return;
  lua_pushvalue(L, fn);
  push_event(L, ev);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "deploy: on_event handler failed: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

static void on_event(void *payload, const store_event *ev) {
  run_ctx *c = payload;
  call_handler(c->L, c->on_event, ev);
  call_handler(c->L, c->on_event2, ev);
}

static void on_done(void *payload, const rollout_result *res) {
  run_ctx *c = payload;
  c->res = *res;
  c->done = 1;
}

/* Drives the loop until the rollout has ended. Other tasks on the engine
 * progress meanwhile. */
static void run_until_done(engine *e, run_ctx *c, rollout *r) {
  sig_atomic_t seen = dc_interrupts;
  dc_rollouts_waiting++;
  while (!c->done) {
    if (dc_interrupts != seen) {
      seen = dc_interrupts;
      /* Ctrl-C: back to the old version, safely; again: still the same
       * abort, never a half-done state. */
      rollout_abort(r, "interrupted by the operator (SIGINT/SIGTERM)");
    }
    engine_run_once(e);
  }
  dc_rollouts_waiting--;
}

/* ---- deploy ---- */

static int manager_handler(lua_State *L) {
  if (lua_getiuservalue(L, 1, UV_ON_EVENT) == LUA_TFUNCTION)
    return lua_gettop(L);
  lua_pop(L, 1);
  return 0;
}

static void check_options(lua_State *L, int idx) {
  static const char *const allowed[] = {"strategy", "metadata", "on_event", NULL};
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int known = 0;
    if (lua_type(L, -2) == LUA_TSTRING)
      for (const char *const *a = allowed; *a; a++)
        known |= strcmp(*a, lua_tostring(L, -2)) == 0;
    if (!known) {
      char msg[DC_ERR_MAX];
      dc_fmt(msg, sizeof msg, "deploy: deploy: unknown option '%s' (known: strategy, metadata, on_event)",
             lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2));
      lerror(L, msg);
    }
    lua_pop(L, 1);
  }
}

/* Pushes the Deployment value (the specification's model) for a run. */
static void push_deployment(lua_State *L, const char *id, const char *target, const char *version, int strategy_idx,
                            double created_at, int metadata_idx) {
  char ts[40];
  lua_createtable(L, 0, 6);
  lua_pushstring(L, id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, target);
  lua_setfield(L, -2, "target");
  lua_pushstring(L, version);
  lua_setfield(L, -2, "version");
  lua_pushvalue(L, strategy_idx);
  lua_setfield(L, -2, "strategy");
  dc_iso8601(created_at, ts, sizeof ts);
  lua_pushstring(L, ts);
  lua_setfield(L, -2, "created_at");
  if (metadata_idx)
    lua_pushvalue(L, metadata_idx);
  else
    lua_newtable(L);
  lua_setfield(L, -2, "metadata");
}

/* Asks strategy:validate(d); false or an error refuses the deployment. */
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

static int run_rollout(lua_State *L, lmanager *m, target_config *t, const char *version, const char *kind,
                       int strategy_idx, int metadata_idx, int on_event_idx) {
  char err[DC_ERR_MAX], id[48];
  lstrategy *ls = lstrategy_test(L, strategy_idx);
  if (!ls)
    return luaL_error(L, "deploy: strategies written in Lua are run by deploy.DeploymentStrategy classes (see README)");
  double created = engine_now(m->e);
  dc_new_id(id, sizeof id);
  push_deployment(L, id, t->name, version, strategy_idx, created, metadata_idx);
  int d_idx = lua_gettop(L);
  char *metadata = metadata_idx ? ljson_encode(L, metadata_idx, "deploy: options.metadata") : NULL;
  run_ctx c;
  memset(&c, 0, sizeof c);
  c.L = L;
  c.on_event = on_event_idx;
  c.on_event2 = manager_handler(L);
  if (!strategy_accepts(L, strategy_idx, d_idx, err)) {
    free(metadata);
    refused(&c.res, t, version, ls->s->name, err);
    push_result(L, &c.res);
    return 1;
  }
  rollout_opts o = {.id = id, .created_at = created, .version = version, .kind = kind,
                    .metadata_json = metadata, .on_event = on_event, .event_payload = &c};
  rollout *r;
  int rc = rollout_start(&r, m->e, m->s, t, ls->s, &o, on_done, &c, err);
  free(metadata);
  if (rc != DC_OK) {
    refused(&c.res, t, version, ls->s->name, err);
    push_result(L, &c.res);
    return 1;
  }
  run_until_done(m->e, &c, r);
  push_result(L, &c.res);
  return 1;
}

static int manager_deploy(lua_State *L) {
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "deploy");
  const char *version = check_version(L, 3, "deploy");
  int strategy_idx = 0, metadata_idx = 0, on_event_idx = 0;
  if (!lua_isnoneornil(L, 4)) {
    if (!lua_istable(L, 4))
      return luaL_error(L, "deploy: deploy: options must be a table, got %s", luaL_typename(L, 4));
    check_options(L, 4);
    if (lua_getfield(L, 4, "strategy") != LUA_TNIL) {
      if (!lstrategy_test(L, -1) && !lua_istable(L, -1))
        return luaL_error(L, "deploy: deploy: options.strategy must be a strategy (deploy.CanaryStrategy{...}, "
                             "deploy.BlueGreenStrategy{...} or a DeploymentStrategy class), got %s",
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
  }
  if (!strategy_idx) {
    lua_getiuservalue(L, 1, UV_STRATEGY);
    strategy_idx = lua_gettop(L);
  }
  return run_rollout(L, m, t, version, "deploy", strategy_idx, metadata_idx, on_event_idx);
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
  return run_rollout(L, m, t, version, "rollback", lua_gettop(L), 0, 0);
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
      while (!w.done)
        engine_run_once(m->e);
      health = health_state_name(w.state);
    }
  }
  for (size_t i = 0; i < ls.n; i++)
    free(ls.urls[i]);
  free(ls.urls);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, t->name);
  lua_setfield(L, -2, "target");
  if (tg.current_version[0])
    lua_pushstring(L, tg.current_version);
  else
    lua_pushnil(L);
  lua_setfield(L, -2, "current_version");
  lua_pushstring(L, tg.status);
  lua_setfield(L, -2, "status");
  lua_pushstring(L, health);
  lua_setfield(L, -2, "health");
  lua_pushinteger(L, ls.count);
  lua_setfield(L, -2, "instances");
  return 1;
}

/* ---- read side for the CLI and scripts ---- */

static void push_deployment_row(lua_State *L, const store_deployment *d) {
  char ts[40];
  lua_createtable(L, 0, 16);
  lua_pushstring(L, d->id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, d->target);
  lua_setfield(L, -2, "target");
  lua_pushstring(L, d->version);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, d->from_version);
  lua_setfield(L, -2, "from_version");
  lua_pushstring(L, d->kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, d->strategy);
  lua_setfield(L, -2, "strategy");
  lua_pushstring(L, d->status);
  lua_setfield(L, -2, "status");
  dc_iso8601(d->created_at, ts, sizeof ts);
  lua_pushstring(L, ts);
  lua_setfield(L, -2, "created_at");
  lua_pushnumber(L, d->created_at);
  lua_setfield(L, -2, "started");
  lua_pushnumber(L, d->duration);
  lua_setfield(L, -2, "duration");
  lua_pushstring(L, d->user);
  lua_setfield(L, -2, "user");
  lua_pushinteger(L, d->owner_pid);
  lua_setfield(L, -2, "pid");
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
  push_event(c->L, ev);
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
  lua_pushinteger(L, in->id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, in->version);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, in->deployment_id);
  lua_setfield(L, -2, "deployment_id");
  lua_pushinteger(L, in->idx);
  lua_setfield(L, -2, "index");
  lua_pushstring(L, in->host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, in->port);
  lua_setfield(L, -2, "port");
  lua_pushinteger(L, in->pid);
  lua_setfield(L, -2, "pid");
  lua_pushstring(L, in->state);
  lua_setfield(L, -2, "state");
  lua_pushinteger(L, in->weight);
  lua_setfield(L, -2, "weight");
  lua_pushstring(L, in->server);
  lua_setfield(L, -2, "server");
  lua_pushstring(L, in->log_path);
  lua_setfield(L, -2, "log");
  lua_pushboolean(L, c->p->alive(c->p, in));
  lua_setfield(L, -2, "alive");
  lua_pushboolean(L, c->live[0] && strcmp(c->live, in->deployment_id) == 0);
  lua_setfield(L, -2, "live");
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

static int reconcile_target(lmanager *m, target_config *t, char *err) {
  wait_cb w;
  memset(&w, 0, sizeof w);
  if (target_reconcile(m->e, m->s, t, reconciled, &w, err) != 0)
    return -1;
  while (!w.done)
    engine_run_once(m->e);
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
  lmanager *m = check_manager(L);
  target_config *t = check_target(L, m, 2, "reconcile");
  char err[DC_ERR_MAX];
  if (reconcile_target(m, t, err) != 0) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* integrity_check(): SQLite's PRAGMA integrity_check on the store. */
static int manager_integrity_check(lua_State *L) {
  lmanager *m = check_manager(L);
  char err[DC_ERR_MAX];
  if (store_integrity_check(m->s, err) != 0) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int manager_state_path(lua_State *L) {
  lmanager *m = check_manager(L);
  lua_pushstring(L, store_path(m->s));
  return 1;
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
    if (t && reconcile_target(m, t, err) != 0)
      fprintf(stderr, "deploy: recovering '%s': %s\n", t->name, err);
  }
}

static int manager_new(lua_State *L) {
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
    if (strcmp(k, "strategy") && strcmp(k, "config") && strcmp(k, "on_event"))
      return luaL_error(L, "deploy: DeploymentManager has no option '%s' (known: strategy, config, on_event)",
                        lua_type(L, -2) == LUA_TSTRING ? k : luaL_typename(L, -2));
    lua_pop(L, 1);
  }
  engine *e = lengine_get(L);
  lua_getfield(L, 1, "config"); /* 2 */
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
  if (cfg->virtual_clock && engine_set_virtual(e, 1) != 0)
    return luaL_error(L, "deploy: cannot switch to the virtual clock while timers are pending");
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
      {"close", manager_close},           {NULL, NULL}};
  if (luaL_newmetatable(L, MANAGER_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, manager_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, manager_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, manager_new);
  lua_setfield(L, -2, "DeploymentManager");
}
