/* DeploymentManager: argument checking and conversion over the runtime's
 * deployment service (runtime/service.c), which decides everything. */
#include "lmanager.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "describe.h"
#include "lconfig.h"
#include "lsched.h"
#include "lstrategy.h"
#include "lutil.h"
#include "retain.h"
#include "util.h"

#define MANAGER_MT "deploy.DeploymentManager"

typedef struct lmanager {
  service *svc; /* a reference; NULL once closed */
} lmanager;

enum { UV_STRATEGY = 1, UV_ON_EVENT = 2, UV_STRATEGIES = 3, UV_SETTINGS = 4, UV_COUNT = 4 };

static lmanager *manager_at(lua_State *L, int idx) {
  lmanager *m = luaL_checkudata(L, idx, MANAGER_MT);
  if (!m->svc)
    luaL_error(L, "deploy: this DeploymentManager was closed");
  return m;
}

/* Closing returns at once: rollouts still running hold the service (and
 * through it the store, providers and routers) until they end. */
static int manager_close(lua_State *L) {
  lmanager *m = luaL_checkudata(L, 1, MANAGER_MT);
  service_unref(m->svc);
  m->svc = NULL;
  return 0;
}

service *lmanager_service(lua_State *L, int idx) { return manager_at(L, idx)->svc; }

/* ---- waiting for the service ---- */

/* One call's completion: the callback converts its result onto the
 * waiting thread's stack (it is blocked in C below), or keeps the error. */
typedef struct lwait {
  lua_State *L;
  int done;
  int ok;
  int locked;
  int rc;
  char err[DC_ERR_MAX];
  void *extra;
} lwait;

static void wait_for(lua_State *L, lwait *w, int rc) {
  if (rc != DC_OK)
    lerror(L, w->err);
  lsched_block(L, &w->done);
}

static void op_done(void *payload, int ok, int locked, const char *err) {
  lwait *w = payload;
  w->ok = ok;
  w->locked = locked;
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  w->done = 1;
}

/* true, or false and why: the shape of methods whose failure is an answer. */
static int push_outcome(lua_State *L, const lwait *w) {
  lua_pushboolean(L, w->ok);
  if (w->ok)
    return 1;
  lua_pushstring(L, w->err);
  if (!w->locked)
    return 2;
  lua_pushboolean(L, 1);
  return 3;
}

/* ---- arguments ---- */

static const char *check_target(lua_State *L, lmanager *m, int arg, const char *method) {
  const char *name = lcheck_string(L, arg, "target", method);
  if (!service_target(m->svc, name)) {
    char msg[DC_ERR_MAX];
    char *known = service_known(m->svc);
    dc_fmt(msg, sizeof msg, "deploy: unknown target '%.64s' (known: %s)", name,
           known && *known ? known : "none configured");
    free(known);
    lerror(L, msg);
  }
  return name;
}

static const char *check_version(lua_State *L, int arg, const char *method) {
  char err[DC_ERR_MAX], what[64];
  const char *v = lcheck_string(L, arg, "version", method);
  dc_fmt(what, sizeof what, "%s: version", method);
  if (dc_validate_version(v, what, err) != 0)
    lerror(L, err);
  return v;
}

/* ---- deploy and rollback ---- */

typedef struct deploy_wait {
  int done;
  int awaiting;
  ltask *task;
  lua_State *L;
  int result_ref;
} deploy_wait;

static void deploy_done(void *payload, const rollout_result *res) {
  deploy_wait *w = payload;
  lua_State *L = lsched_callback_state(w->L);
  lrun_push_result(L, res);
  w->result_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->done = 1;
  if (w->awaiting)
    lsched_ready(w->task);
}

static int deploy_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  deploy_wait *w = (deploy_wait *)ctx;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->result_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, w->result_ref);
  return 1;
}

static void check_options(lua_State *L, int idx) {
  static const char *const allowed[] = {"strategy", "metadata", "on_event", "hooks", "hook_timeout", NULL};
  lcheck_keys(L, idx, allowed, "deploy: manager:deploy(): unknown option '%s' (known: %s)");
}

int lmanager_push_handler(lua_State *L, int manager_idx) {
  manager_idx = lua_absindex(L, manager_idx);
  luaL_checkudata(L, manager_idx, MANAGER_MT);
  return lua_getiuservalue(L, manager_idx, UV_ON_EVENT) == LUA_TFUNCTION;
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

static const char *strategy_label(lua_State *L, int idx) {
  strategy *st = idx ? lstrategy_test(L, idx) : NULL;
  if (st)
    return st->name;
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
static int run_and_wait(lua_State *L, lrun_spec *sp) {
  char err[DC_ERR_MAX];
  deploy_wait *w = lua_newuserdatauv(L, sizeof *w, 0); /* on the stack across a yield */
  memset(w, 0, sizeof *w);
  w->task = lsched_current(L);
  w->L = L;
  w->result_ref = LUA_NOREF;
  sp->cb = deploy_done;
  sp->payload = w;
  if (lrun_start(L, sp, err) != DC_OK) {
    const char *e = err;
    rollout_result res;
    memset(&res, 0, sizeof res);
    dc_strlcpy(res.target, sp->target, sizeof res.target);
    dc_strlcpy(res.version, sp->version ? sp->version : "", sizeof res.version);
    dc_strlcpy(res.strategy, strategy_label(L, sp->strategy_idx), sizeof res.strategy);
    res.errors = &e;
    res.nerrors = 1;
    lrun_push_result(L, &res);
    return 1;
  }
  if (!w->done)
    w->awaiting = 1;
  return lsched_await(L, &w->done, (lua_KContext)w, deploy_k);
}

static int manager_deploy(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:deploy()");
  const char *version = check_version(L, 3, "manager:deploy()");
  lrun_spec sp = {.svc = m->svc, .target = target, .version = version, .kind = "deploy", .hook_timeout = 30};
  if (!lua_isnoneornil(L, 4)) {
    if (!lua_istable(L, 4))
      return luaL_error(L, "deploy: manager:deploy(): options must be a table, got %s", luaL_typename(L, 4));
    check_options(L, 4);
    if (lua_getfield(L, 4, "strategy") != LUA_TNIL) {
      if (!lstrategy_test(L, -1) && !lua_istable(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "deploy: manager:deploy(): options.strategy must be a strategy (deploy.CanaryStrategy{...}, "
                             "deploy.BlueGreenStrategy{...}, a DeploymentStrategy class or a registered name), got %s",
                          luaL_typename(L, -1));
      sp.strategy_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "metadata") != LUA_TNIL) {
      if (!lua_istable(L, -1))
        return luaL_error(L, "deploy: manager:deploy(): options.metadata must be a table, got %s", luaL_typename(L, -1));
      sp.metadata_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "on_event") != LUA_TNIL) {
      if (!lua_isfunction(L, -1))
        return luaL_error(L, "deploy: manager:deploy(): options.on_event must be a function, got %s", luaL_typename(L, -1));
      sp.on_event_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "hooks") != LUA_TNIL) {
      if (!lua_istable(L, -1))
        return luaL_error(L, "deploy: manager:deploy(): options.hooks must be a table of functions, got %s",
                          luaL_typename(L, -1));
      sp.hooks_idx = lua_gettop(L);
    }
    if (lua_getfield(L, 4, "hook_timeout") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0))
        return luaL_error(L, "deploy: manager:deploy(): options.hook_timeout must be a number of seconds > 0");
      sp.hook_timeout = lua_tonumber(L, -1);
    }
  }
  if (!sp.strategy_idx) {
    lua_getiuservalue(L, 1, UV_STRATEGY);
    sp.strategy_idx = lua_gettop(L);
  }
  sp.strategy_idx = resolve_strategy(L, 1, sp.strategy_idx);
  sp.on_event2_idx = manager_handler_idx(L, 1);
  return run_and_wait(L, &sp);
}

static void version_chosen(void *payload, int rc, const char *version, const char *err) {
  lwait *w = payload;
  w->rc = rc;
  if (version)
    dc_strlcpy(w->extra, version, 129);
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  w->done = 1;
}

static void running_rolled_back(void *payload, int rc, const store_deployment *d, const char *err) {
  lwait *w = payload;
  w->rc = rc;
  if (d)
    w->ok = store_deployment_copy(w->extra, d) == 0;
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  w->done = 1;
}

/* A deployment of the target runs with its old set warm: the rollback is
 * its abort (the service tells it, and waits for its end). 1 with the
 * result pushed; 0 when the rollback is a deployment of its own (none
 * runs, or it promoted before it heard). */
static int rollback_running(lua_State *L, lmanager *m, const char *target, const char *given) {
  store_deployment d;
  memset(&d, 0, sizeof d);
  double t0 = engine_now(service_engine(m->svc));
  lwait w = {.L = L, .extra = &d};
  wait_for(L, &w, service_rollback_running(m->svc, target, given, running_rolled_back, &w, w.err));
  if (w.rc == DC_NOTFOUND || (w.rc == DC_OK && strcmp(d.status, "succeeded") == 0)) {
    store_deployment_clear(&d);
    return 0;
  }
  rollout_result res;
  memset(&res, 0, sizeof res);
  const char *e = w.rc == DC_OK ? NULL : w.err;
  res.success = w.rc == DC_OK && w.ok;
  dc_strlcpy(res.target, target, sizeof res.target);
  dc_strlcpy(res.version, d.from_version, sizeof res.version);
  dc_strlcpy(res.strategy, "rollback", sizeof res.strategy);
  res.duration = engine_now(service_engine(m->svc)) - t0;
  res.errors = e ? &e : NULL;
  res.nerrors = e ? 1 : 0;
  lrun_push_result(L, &res);
  /* Which deployment went back: its history row says how. */
  lset_string(L, "rolled_back_deployment", d.id);
  store_deployment_clear(&d);
  return 1;
}

/* rollback(target[, version]): blue-green, to the previous version or one
 * from the history. The service chooses and checks the version: one never
 * deployed there is a mistake (raised), no previous version an answer.
 * While a deployment runs with its old set warm, it is that deployment's
 * abort instead: one router change, no restart. */
static int manager_rollback(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:rollback()");
  lua_settop(L, 3);
  const char *given = lua_isnil(L, 3) ? NULL : check_version(L, 3, "manager:rollback()");
  if (rollback_running(L, m, target, given))
    return 1;
  char version[129] = "";
  lwait w = {.L = L, .extra = version};
  wait_for(L, &w, service_rollback_version(m->svc, target, given, version_chosen, &w, w.err));
  if (w.rc == DC_NOTFOUND)
    return lerror(L, w.err);
  if (w.rc != DC_OK) {
    const char *e = w.err;
    rollout_result res;
    memset(&res, 0, sizeof res);
    dc_strlcpy(res.target, target, sizeof res.target);
    dc_strlcpy(res.version, version, sizeof res.version);
    dc_strlcpy(res.strategy, "rollback", sizeof res.strategy);
    res.errors = &e;
    res.nerrors = 1;
    lrun_push_result(L, &res);
    return 1;
  }
  lstrategy_push_bluegreen(L, 1);
  lua_pushstring(L, version); /* kept alive on the stack */
  lrun_spec sp = {.svc = m->svc, .target = target, .version = lua_tostring(L, -1), .kind = "rollback",
                  .strategy_idx = lua_gettop(L) - 1, .hook_timeout = 30};
  sp.on_event2_idx = manager_handler_idx(L, 1);
  return run_and_wait(L, &sp);
}

/* ---- status ---- */

/* The specification's fields (target, current_version, status, health,
 * instances) and beside them the rest of the target's view (view.h). */
typedef struct lstatus {
  lwait w;
  json_t *view;
} lstatus;

static void status_seen(void *payload, const json_t *view, const char *err) {
  lstatus *st = payload;
  if (!view)
    dc_strlcpy(st->w.err, err, sizeof st->w.err);
  else
    st->view = json_incref((json_t *)view);
  st->w.ok = view != NULL;
  st->w.done = 1;
}

/* The view of the target (view.h), checked now. */
static json_t *describe_now(lua_State *L, const char *method) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, method);
  lstatus st = {.w = {.L = L}};
  describe_opts o = {.check = 1};
  wait_for(L, &st.w, service_describe(m->svc, target, &o, status_seen, &st, st.w.err));
  if (!st.w.ok)
    lerror(L, st.w.err);
  return st.view;
}

/* get_status(target): the specification's DeploymentStatus, its five
 * fields only (and maintenance while it is on), read from the same view as
 * describe(), so both tell the same truth. */
static int manager_get_status(lua_State *L) {
  static const char *const fields[] = {"target", "current_version", "status", "health", "instances",
                                       "maintenance", NULL};
  json_t *view = describe_now(L, "manager:get_status()");
  json_t *out = json_object();
  for (int i = 0; fields[i]; i++) {
    json_t *v = json_object_get(view, fields[i]);
    if (v && !json_is_null(v) && !json_is_false(v))
      json_object_set(out, fields[i], v);
  }
  json_decref(view);
  ljson_push(L, out);
  json_decref(out);
  return 1;
}

/* describe(target): the whole view: state, summary, instances_by_version,
 * rollout, last_deployment, analysis, supervision, lock beside the five
 * fields (what `deployctl status --json` and the API of serve show). */
static int manager_describe(lua_State *L) {
  json_t *view = describe_now(L, "manager:describe()");
  ljson_push(L, view);
  json_decref(view);
  return 1;
}

/* ---- reading the store ---- */

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

static void push_instance_row(lua_State *L, const store_instance *in) {
  lua_createtable(L, 0, 14);
  lset_integer(L, "id", in->id);
  lset_string(L, "deployment_id", in->deployment_id);
  lset_string(L, "version", in->version);
  lset_integer(L, "index", in->idx);
  lset_string_or_nil(L, "node", in->node);
  lset_string(L, "host", in->host);
  lset_integer(L, "port", in->port);
  lset_integer(L, "pid", in->pid);
  lset_string(L, "state", in->state);
  lset_integer(L, "weight", in->weight);
  lset_string(L, "server", in->server);
  lset_string(L, "log", in->log_path);
}

typedef void (*rows_push)(lua_State *L, const store_result *r, void *extra);

typedef struct lread {
  lwait w;
  rows_push push;
} lread;

static void read_done(void *payload, const store_result *r) {
  lread *rd = payload;
  if (r->rc == DC_OK) {
    rd->push(rd->w.L, r, rd->w.extra);
    rd->w.ok = 1;
  } else {
    rd->w.rc = r->rc;
    dc_strlcpy(rd->w.err, r->err, sizeof rd->w.err);
  }
  rd->w.done = 1;
}

static void push_history(lua_State *L, const store_result *r, void *extra) {
  (void)extra;
  lua_createtable(L, (int)r->ndeployments, 0);
  for (size_t i = 0; i < r->ndeployments; i++) {
    push_deployment_row(L, &r->deployments[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static void push_one_deployment(lua_State *L, const store_result *r, void *extra) {
  (void)extra;
  push_deployment_row(L, &r->deployments[0]);
}

static void push_events(lua_State *L, const store_result *r, void *extra) {
  (void)extra;
  lua_createtable(L, (int)r->nevents, 0);
  for (size_t i = 0; i < r->nevents; i++) {
    lrun_push_event(L, &r->events[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static int read_and_wait(lua_State *L, lread *rd, int rc) {
  wait_for(L, &rd->w, rc);
  return rd->w.ok;
}

/* history(target, limit): newest first. */
static int manager_history(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:history()");
  lua_Integer limit = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, limit >= 0 && limit <= 1000000000, 3, "limit must be >= 0");
  lread rd = {.w = {.L = L}, .push = push_history};
  if (!read_and_wait(L, &rd, store_history(service_store(m->svc), target, (int)limit, read_done, &rd, rd.w.err)))
    return lerror(L, rd.w.err);
  return 1;
}

static void push_newest(lua_State *L, const store_result *r, void *extra) {
  if (r->ndeployments == 0)
    lua_pushnil(L);
  else
    push_deployment_row(L, &r->deployments[0]);
}

/* deployment(id): by id or a unique prefix of one; deployment("latest",
 * target): the target's newest. nil and why when none. */
static int manager_deployment(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  const char *id = lcheck_string(L, 2, "id", "manager:deployment()");
  if (strcmp(id, "latest") == 0) {
    if (lua_isnoneornil(L, 3))
      return luaL_error(L, "deploy: manager:deployment(\"latest\", target): 'latest' needs the target");
    const char *target = check_target(L, m, 3, "manager:deployment()");
    lread rd = {.w = {.L = L}, .push = push_newest};
    if (!read_and_wait(L, &rd, store_history(service_store(m->svc), target, 1, read_done, &rd, rd.w.err)))
      return lerror(L, rd.w.err);
    if (lua_isnil(L, -1)) {
      lua_pushfstring(L, "deploy: '%s' has no deployment yet", target);
      return 2;
    }
    return 1;
  }
  lread rd = {.w = {.L = L}, .push = push_one_deployment};
  if (!read_and_wait(L, &rd, store_deployment_get(service_store(m->svc), id, read_done, &rd, rd.w.err))) {
    /* Not found, or a prefix of several: an answer, not a failure. */
    if (rd.w.rc != DC_NOTFOUND && rd.w.rc != DC_AMBIGUOUS)
      return lerror(L, rd.w.err);
    lua_pushnil(L);
    lua_pushstring(L, rd.w.err);
    return 2;
  }
  return 1;
}

static int manager_events(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  const char *id = lcheck_string(L, 2, "id", "manager:events()");
  lread rd = {.w = {.L = L}, .push = push_events};
  if (!read_and_wait(L, &rd, store_events(service_store(m->svc), id, read_done, &rd, rd.w.err)))
    return lerror(L, rd.w.err);
  return 1;
}

/* instances(target): every instance row, with whether it is alive and live
 * (the live set) as the service reads them now. */
/* A weight as Lua sees it: nil for a router that cannot weigh, false
 * when the server is not in the proxy or the proxy cannot be read
 * (router_error says why). */
static void push_weight(lua_State *L, const router *r, int weight) {
  if (r->ratio_only)
    lua_pushnil(L);
  else if (weight >= 0)
    lua_pushinteger(L, weight);
  else
    lua_pushboolean(L, 0);
}

static void instances_seen(void *payload, const service_instance *v, size_t n, const char *router_err,
                           const service_router_view *routers, size_t nrouters, const char *err) {
  lwait *w = payload;
  lua_State *L = w->L;
  int with_router = (int)(intptr_t)w->extra;
  if (!v) {
    dc_strlcpy(w->err, err, sizeof w->err);
    w->done = 1;
    return;
  }
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_instance_row(L, &v[i].row);
    lset_boolean(L, "alive", v[i].alive);
    if (v[i].unreachable)
      lset_boolean(L, "unreachable", 1);
    lset_boolean(L, "live", v[i].live);
    if (with_router) {
      lua_pushstring(L, v[i].healthy ? "healthy" : "unhealthy");
      lua_setfield(L, -2, "health");
      if (!v[i].healthy)
        lset_string(L, "health_error", v[i].health_error);
      push_weight(L, routers[0].r, v[i].weight);
      lua_setfield(L, -2, "router_weight");
      /* one per router, in the order of manager's routers list */
      lua_createtable(L, (int)nrouters, 0);
      for (size_t k = 0; k < nrouters; k++) {
        push_weight(L, routers[k].r, v[i].weights[k]);
        lua_rawseti(L, -2, (lua_Integer)k + 1);
      }
      lua_setfield(L, -2, "router_weights");
    }
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  /* the third result: each router, and why it could not be read */
  lua_createtable(L, (int)nrouters, 0);
  for (size_t k = 0; k < nrouters; k++) {
    lua_createtable(L, 0, 3);
    lset_string(L, "kind", routers[k].r->kind);
    lset_string(L, "router", routers[k].r->label);
    if (routers[k].err)
      lset_string(L, "error", routers[k].err);
    lua_rawseti(L, -2, (lua_Integer)k + 1);
  }
  if (router_err)
    dc_strlcpy(w->err, router_err, sizeof w->err);
  w->ok = 1;
  w->done = 1;
}

static int instances(lua_State *L, int with_router) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, with_router ? "manager:live_instances()" : "manager:instances()");
  lwait w = {.L = L, .extra = (void *)(intptr_t)with_router};
  wait_for(L, &w, service_live_instances(m->svc, target, instances_seen, &w, w.err));
  if (!w.ok)
    return lerror(L, w.err);
  if (!with_router) {
    lua_pop(L, 1);       /* the routers list */
    return 1;
  }
  /* list, router_error (nil when every router was read), routers */
  lua_pushstring(L, w.err);
  if (!w.err[0]) {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  lua_insert(L, -2);
  return 3;
}

static int manager_instances(lua_State *L) { return instances(L, 0); }

/* live_instances(target): as instances(), with each instance's health
 * checked now and its weight as the router reports it now (false when the
 * router is unreachable: then router_error says why), router_weights one
 * per router; then router_error, and the routers (kind, router, error). */
static int manager_live_instances(lua_State *L) { return instances(L, 1); }

/* ---- logs ----
 *
 * Chunks are queued by the service's callbacks (inside libuv callbacks)
 * and handed to Lua between loop turns, in order. */

typedef struct lchunk {
  struct lchunk *next;
  store_instance in;
  char *text;          /* NULL: the instance's log ended */
  size_t len;
  char *err;           /* the end: why it could not be read */
} lchunk;

typedef struct llogs {
  volatile int wake;
  int done, ok;
  lchunk *head, *tail;
  char err[DC_ERR_MAX];
  int oom;
  sig_atomic_t seen_interrupts;
  int interrupted;
  service_logs *op;
} llogs;

static void logs_push(llogs *lg, const store_instance *in, const char *text, size_t len, int end, const char *err) {
  lchunk *c = calloc(1, sizeof *c);
  if (c && !end) {
    c->text = malloc(len + 1);
    if (c->text) {
      memcpy(c->text, text, len);
      c->text[len] = '\0';
      c->len = len;
    }
  }
  if (c && end && err)
    c->err = strdup(err);
  if (!c || (!end && !c->text)) {
    free(c);
    lg->oom = 1;
    return;
  }
  c->in = *in;
  if (lg->tail)
    lg->tail->next = c;
  else
    lg->head = c;
  lg->tail = c;
  lg->wake = 1;
}

static void logs_output(void *payload, const store_instance *in, const char *text, size_t len) {
  logs_push(payload, in, text, len, 0, NULL);
}

static void logs_end(void *payload, const store_instance *in, const char *err) {
  logs_push(payload, in, "", 0, 1, err);
}

static void logs_finished(void *payload, int ok, const char *err) {
  llogs *lg = payload;
  lg->done = 1;
  lg->ok = ok;
  lg->op = NULL;
  if (err)
    dc_strlcpy(lg->err, err, sizeof lg->err);
  lg->wake = 1;
}

static void logs_interrupt_check(uv_timer_t *h) {
  llogs *lg = h->data;
  if (dc_interrupts != lg->seen_interrupts && !lg->interrupted) {
    lg->interrupted = 1;
    service_logs_stop(lg->op);
    lg->wake = 1;
  }
}

static void logs_timer_closed(uv_handle_t *h) { free(h); }

static void push_log_entry(lua_State *L, const lchunk *c) {
  lua_createtable(L, 0, 8);
  lset_string_or_nil(L, "node", c->in.node);
  lset_string(L, "host", c->in.host);
  lset_string(L, "version", c->in.version);
  lset_integer(L, "instance", c->in.idx);
  lset_string(L, "server", c->in.server);
  lset_string(L, "log", c->in.log_path);
}

/* Hands one chunk to Lua: to on_output (at fn), or into the result list
 * (at list; index, at list + 1, finds an entry by server). 0, or -1 when
 * on_output raised (message on the stack). */
static int logs_deliver(lua_State *L, const lchunk *c, int fn, int list) {
  if (fn) {
    lua_pushvalue(L, fn);
    push_log_entry(L, c);
    if (c->text)
      lua_pushlstring(L, c->text, c->len);
    else
      lua_pushnil(L);
    if (c->err)
      lua_pushstring(L, c->err);
    else
      lua_pushnil(L);
    return lua_pcall(L, 3, 0, 0) == LUA_OK ? 0 : -1;
  }
  /* index[server] = the entry, with its text so far */
  if (lua_getfield(L, list + 1, c->in.server) == LUA_TNIL) {
    lua_pop(L, 1);
    push_log_entry(L, c);
    lua_pushliteral(L, "");
    lua_setfield(L, -2, "text");
    lua_pushvalue(L, -1);
    lua_setfield(L, list + 1, c->in.server);
    lua_pushvalue(L, -1);
    lua_rawseti(L, list, (lua_Integer)luaL_len(L, list) + 1);
  }
  if (c->text) {
    lua_getfield(L, -1, "text");
    lua_pushlstring(L, c->text, c->len);
    lua_concat(L, 2);
    lua_setfield(L, -2, "text");
  }
  if (c->err)
    lset_string(L, "error", c->err);
  lua_pop(L, 1);
  return 0;
}

/* logs(target, { host =, version =, lines =, follow =, on_output = }):
 * without on_output, a list of { node, host, version, instance, server,
 * log, text, error }; with it, on_output(entry, text) for each chunk as
 * it comes and on_output(entry, nil, err) at each log's end, until every
 * log ended (follow: until SIGINT/SIGTERM). */
static int manager_logs(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "logs");
  lua_settop(L, 3);
  service_logs_opts o = {.lines = 100};
  int fn = 0;
  if (!lua_isnil(L, 3)) {
    static const char *const allowed[] = {"host", "version", "lines", "follow", "on_output", NULL};
    luaL_checktype(L, 3, LUA_TTABLE);
    lcheck_keys(L, 3, allowed, "deploy: logs has no option '%s' (known: %s)");
    if (lua_getfield(L, 3, "host") != LUA_TNIL)
      o.host = lcheck_string(L, -1, "host", "logs");
    if (lua_getfield(L, 3, "version") != LUA_TNIL)
      o.version = lcheck_string(L, -1, "version", "logs");
    if (lua_getfield(L, 3, "lines") != LUA_TNIL) {
      lua_Integer n = luaL_checkinteger(L, -1);
      luaL_argcheck(L, n >= 1 && n <= 1000000, 3, "lines must be 1..1000000");
      o.lines = (int)n;
    }
    lua_getfield(L, 3, "follow");
    o.follow = lua_toboolean(L, -1);
    if (lua_getfield(L, 3, "on_output") != LUA_TNIL) {
      luaL_checktype(L, -1, LUA_TFUNCTION);
      fn = lua_gettop(L);
    }
  }
  if (o.follow && !fn)
    return luaL_error(L, "deploy: logs: follow needs on_output = function(entry, text) to hand the output to");
  lua_newtable(L);
  int list = lua_gettop(L);
  lua_newtable(L); /* list + 1: the index */
  llogs *lg = calloc(1, sizeof *lg);
  if (!lg)
    return luaL_error(L, "deploy: out of memory");
  lg->seen_interrupts = dc_interrupts;
  service_logs_cbs cbs = {.output = logs_output, .end = logs_end, .done = logs_finished, .payload = lg};
  char err[DC_ERR_MAX];
  if (service_logs_read(m->svc, target, &o, &cbs, &lg->op, err) != DC_OK) {
    free(lg);
    return lerror(L, err);
  }
  /* A follow ends on SIGINT/SIGTERM: this wait handles them. */
  dc_interrupt_owners++;
  uv_timer_t *check = malloc(sizeof *check);
  if (check) {
    uv_timer_init(lengine_get(L)->loop, check);
    check->data = lg;
    uv_timer_start(check, logs_interrupt_check, 50, 50);
  }
  int raised = 0;
  for (;;) {
    while (lg->head) {
      lchunk *c = lg->head;
      lg->head = c->next;
      if (!lg->head)
        lg->tail = NULL;
      if (!raised && logs_deliver(L, c, fn, list) != 0) {
        /* Stop reading; raise once every stream has ended. */
        raised = lua_gettop(L);
        service_logs_stop(lg->op);
      }
      free(c->text);
      free(c->err);
      free(c);
    }
    if (lg->done)
      break;
    lg->wake = 0;
    lsched_block(L, &lg->wake);
  }
  if (check) {
    uv_timer_stop(check);
    uv_close((uv_handle_t *)check, logs_timer_closed);
  }
  dc_interrupt_owners--;
  int ok = lg->ok, oom = lg->oom, interrupted = lg->interrupted;
  dc_strlcpy(err, lg->err, sizeof err);
  free(lg);
  if (raised)
    return lua_error(L);
  if (oom)
    return luaL_error(L, "deploy: out of memory reading logs");
  if (!ok) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (fn) {
    lua_pushstring(L, interrupted ? "interrupted" : "ended");
    return 1;
  }
  lua_settop(L, list);
  return 1;
}

static int manager_targets(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  size_t n = service_ntargets(m->svc);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_pushstring(L, service_target_at(m->svc, i)->name);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* reconcile(target): back on its one live version, under its lock.
 * true, or false and the reason (and true when it was locked). */
static int manager_reconcile(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:reconcile()");
  lwait w = {.L = L};
  wait_for(L, &w, service_reconcile(m->svc, target, NULL, op_done, &w, w.err));
  return push_outcome(L, &w);
}

static void retained(void *payload, const retain_result *r) {
  lwait *w = payload;
  retain_result *out = w->extra;
  *out = *r;
  out->err = NULL;
  w->ok = r->err == NULL;
  if (r->err)
    dc_strlcpy(w->err, r->err, sizeof w->err);
  w->done = 1;
}

/* prune([target]): applies the retention of one target, or of all, now
 * (it also runs after every deployment). A table of what went
 * (deployments, logs_removed, logs_rotated, bytes_freed, and error when
 * part of it could not be done). */
static int manager_prune(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *only = lua_isnoneornil(L, 2) ? NULL : check_target(L, m, 2, "manager:prune()");
  retain_result sum = {0};
  dc_buf errors = {0};
  for (size_t i = 0; i < service_ntargets(m->svc); i++) {
    const char *name = service_target_at(m->svc, i)->name;
    if (only && strcmp(only, name) != 0)
      continue;
    retain_result one = {0};
    lwait w = {.L = L, .extra = &one};
    wait_for(L, &w, retain_target(m->svc, name, retained, &w, w.err));
    sum.deployments += one.deployments;
    sum.logs_removed += one.logs_removed;
    sum.logs_rotated += one.logs_rotated;
    sum.bytes_freed += one.bytes_freed;
    if (!w.ok)
      dc_buf_printf(&errors, "%s%s: %s", errors.len ? "; " : "", name, dc_unprefix(w.err));
  }
  lua_createtable(L, 0, 5);
  lset_integer(L, "deployments", (lua_Integer)sum.deployments);
  lset_integer(L, "logs_removed", (lua_Integer)sum.logs_removed);
  lset_integer(L, "logs_rotated", (lua_Integer)sum.logs_rotated);
  lset_integer(L, "bytes_freed", (lua_Integer)sum.bytes_freed);
  if (errors.len)
    lset_string(L, "error", errors.data);
  dc_buf_free(&errors);
  return 1;
}

static void integrity_seen(void *payload, const store_result *r) {
  lwait *w = payload;
  w->ok = r->rc == DC_OK;
  if (r->err)
    dc_strlcpy(w->err, r->err, sizeof w->err);
  w->done = 1;
}

/* maintenance(target, on [, message [, retry_after]]): the load balancers
 * answer 503 with a page (on) or serve the live instances again (off).
 * true, or false, the reason and whether the target was locked. */
static int manager_maintenance(lua_State *L) {
  lsched_check_can_wait(L);
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:maintenance()");
  if (lua_type(L, 3) != LUA_TBOOLEAN)
    return luaL_error(L, "deploy: manager:maintenance(): on must be true or false, got %s", luaL_typename(L, 3));
  service_maintenance_opts o = {.on = lua_toboolean(L, 3), .retry_after = ROUTES_RETRY_AFTER_DEFAULT};
  if (!lua_isnoneornil(L, 4)) {
    if (lua_type(L, 4) != LUA_TSTRING)
      return luaL_error(L, "deploy: manager:maintenance(): message must be a string, got %s", luaL_typename(L, 4));
    if (!o.on)
      return luaL_error(L, "deploy: manager:maintenance(): a message goes with on (true), not with off");
    o.message = lua_tostring(L, 4);
  }
  if (!lua_isnoneornil(L, 5)) {
    if (lua_type(L, 5) != LUA_TNUMBER)
      return luaL_error(L, "deploy: manager:maintenance(): retry_after must be a number of seconds, got %s",
                        luaL_typename(L, 5));
    double v = lua_tonumber(L, 5);
    if (!(v >= 0 && v <= 604800) || v != (double)(int)v)
      return luaL_error(L, "deploy: manager:maintenance(): retry_after must be a whole number of seconds from 0 to "
                           "604800 (a week), got %s", lua_tostring(L, 5));
    o.retry_after = (int)v;
  }
  lwait w = {.L = L};
  wait_for(L, &w, service_maintenance(m->svc, target, &o, NULL, op_done, &w, w.err));
  return push_outcome(L, &w);
}

/* integrity_check(): the store's own consistency check. */
static int manager_integrity_check(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  lwait w = {.L = L};
  wait_for(L, &w, store_integrity_check(service_store(m->svc), integrity_seen, &w, w.err));
  return push_outcome(L, &w);
}

static void lock_seen(void *payload, const store_result *r) {
  lwait *w = payload;
  lua_State *L = w->L;
  if (r->rc != DC_OK) {
    dc_strlcpy(w->err, r->err, sizeof w->err);
  } else if (!r->lock) {
    lua_pushnil(L);
    w->ok = 1;
  } else {
    char ts[40];
    lua_createtable(L, 0, 7);
    lset_string(L, "purpose", r->lock->purpose);
    lset_string(L, "deployment_id", r->lock->deployment_id);
    lset_string(L, "host", r->lock->host);
    lset_integer(L, "pid", r->lock->pid);
    dc_iso8601(r->lock->acquired_at, ts, sizeof ts);
    lset_string(L, "since", ts);
    if (r->lock->expires_at > 0) {
      dc_iso8601(r->lock->expires_at, ts, sizeof ts);
      lset_string(L, "until", ts);
    }
    w->ok = 1;
  }
  w->done = 1;
}

/* lock(target): who holds the target now (purpose, deployment_id, host,
 * pid, since, and until for a lease), or nil. */
static int manager_lock(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  const char *target = check_target(L, m, 2, "manager:lock()");
  lwait w = {.L = L};
  wait_for(L, &w, store_lock_get(service_store(m->svc), target, lock_seen, &w, w.err));
  if (!w.ok)
    return lerror(L, w.err);
  return 1;
}

/* The config's gitops and serve sections, checked: { gitops = { ... },
 * serve = { ... } } (what `deployctl serve` runs with). */
static int manager_settings(lua_State *L) {
  manager_at(L, 1);
  lua_getiuservalue(L, 1, UV_SETTINGS);
  return 1;
}

static int manager_state_path(lua_State *L) {
  lmanager *m = manager_at(L, 1);
  lua_pushstring(L, store_location(service_store(m->svc)));
  return 1;
}

/* promote(target) / abort(target): for the rollout of the target running
 * now, in any process sharing the store. */
static int control(lua_State *L, const char *command) {
  lmanager *m = manager_at(L, 1);
  char method[32];
  dc_fmt(method, sizeof method, "manager:%s()", command);
  const char *target = check_target(L, m, 2, method);
  lwait w = {.L = L};
  wait_for(L, &w, service_control(m->svc, target, command, op_done, &w, w.err));
  return push_outcome(L, &w);
}

static int manager_promote(lua_State *L) { return control(L, "promote"); }
static int manager_abort(lua_State *L) { return control(L, "abort"); }

/* ---- named strategies ---- */

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
  manager_at(L, 1);
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
  lua_getiuservalue(L, manager_idx, UV_STRATEGIES);
  int t = lua_getfield(L, -1, name);
  lua_remove(L, -2);
  return t;
}

int lmanager_start(lua_State *L, int manager_idx, const char *target, const char *version, int strategy_idx,
                   const char *metadata_json, const webhook_list *webhooks, lrun_done_cb cb, void *payload,
                   char *err) {
  manager_idx = lua_absindex(L, manager_idx);
  if (strategy_idx)
    strategy_idx = lua_absindex(L, strategy_idx);
  lmanager *m = manager_at(L, manager_idx);
  int top = lua_gettop(L);
  if (!strategy_idx) {
    lua_getiuservalue(L, manager_idx, UV_STRATEGY);
    strategy_idx = lua_gettop(L);
  }
  lrun_spec sp = {.svc = m->svc, .target = target, .version = version, .kind = "deploy",
                  .strategy_idx = resolve_strategy(L, manager_idx, strategy_idx), .hook_timeout = 30,
                  .metadata_json = metadata_json, .webhooks = webhooks, .cb = cb, .payload = payload};
  sp.on_event2_idx = manager_handler_idx(L, manager_idx);
  int rc = lrun_start(L, &sp, err);
  lua_settop(L, top);
  return rc;
}

/* ---- construction ---- */

static void recovered(void *payload, int ok, int locked, const char *err) {
  lwait *w = payload;
  (void)locked;
  w->ok = ok;
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  w->done = 1;
}

/* Opens the store and brings back to one version every target a crashed
 * process left midway, before anything else runs. */
static void open_service(lua_State *L, lmanager *m, lconfig *cfg) {
  char err[DC_ERR_MAX];
  engine *e = lengine_get(L);
  store *s = NULL;
  if (store_open(&s, e, cfg->state, err) != 0)
    lerror(L, err);
  size_t n;
  target_config **targets = lconfig_take_targets(cfg, &n);
  int rc = service_new(&m->svc, e, s, targets, n, err);
  store_unref(s); /* the service holds its own reference */
  if (rc != DC_OK) {
    for (size_t i = 0; i < n; i++)
      target_config_free(targets[i]);
    free(targets);
    lerror(L, err);
  }
  lwait w = {.L = L};
  for (size_t i = 0; i < n; i++) {
    if (store_target_ensure(s, targets[i]->name, NULL, NULL, err) != 0)
      lerror(L, err);
  }
  wait_for(L, &w, service_recover(m->svc, recovered, &w, w.err));
  if (!w.ok)
    fprintf(stderr, "deploy: recovering interrupted deployments: %s\n", w.err);
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
  static const char *const allowed[] = {"strategy", "config", "on_event", "strategies", NULL};
  lcheck_keys(L, 1, allowed, "deploy: DeploymentManager has no option '%s' (known: %s)");
  engine *e = lengine_get(L);
  lua_getfield(L, 1, "config"); /* 2 */
  if (lua_isnil(L, 2) && lua_getfield(L, LUA_REGISTRYINDEX, "deploy.default_config") == LUA_TSTRING) {
    lua_replace(L, 2);
  } else if (lua_isnil(L, 2)) {
    lua_pop(L, 1);
  }
  if (lua_isnil(L, 2)) {
    char buf[1024];
    int legacy;
    const char *path = lconfig_default_path(L, buf, sizeof buf, &legacy);
    if (access(path, F_OK) != 0)
      return luaL_error(L, "deploy: DeploymentManager needs config = { targets = { ... } } or the path of a config "
                           "file (none given and %s does not exist)", path);
    lua_pushstring(L, path);
    lua_replace(L, 2);
  }
  lconfig *cfg = lconfig_load(L, 2); /* 3: config userdata */
  if (cfg->virtual_clock >= 0 && e->virtual_clock != cfg->virtual_clock &&
      engine_set_virtual(e, cfg->virtual_clock) != 0)
    return luaL_error(L, "deploy: cannot switch clocks (config.clock) while timers are pending");
  lua_getfield(L, 1, "strategy"); /* 4 */
  if (lua_isnil(L, 4)) {
    lua_pop(L, 1);
    lstrategy_push_bluegreen(L, 0);
  } else if (!lstrategy_test(L, 4) && !lua_istable(L, 4)) {
    return luaL_error(L, "deploy: DeploymentManager strategy must be a strategy (deploy.CanaryStrategy{...}, "
                         "deploy.BlueGreenStrategy{...} or a DeploymentStrategy class), got %s",
                      luaL_typename(L, 4));
  }
  lua_getfield(L, 1, "on_event"); /* 5 */
  if (!lua_isnil(L, 5) && !lua_isfunction(L, 5))
    return luaL_error(L, "deploy: DeploymentManager on_event must be a function, got %s", luaL_typename(L, 5));
  /* The userdata exists, closed, before the service does: an error midway
   * leaves it consistent (liolib's newprefile). */
  lmanager *m = lua_newuserdatauv(L, sizeof *m, UV_COUNT); /* 6 */
  m->svc = NULL;
  luaL_setmetatable(L, MANAGER_MT);
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
  lua_getiuservalue(L, 3, 1);
  lua_setiuservalue(L, 6, UV_SETTINGS);
  open_service(L, m, cfg);
  lua_settop(L, 6);
  return 1;
}

void lmanager_push_default(lua_State *L, const char *what_for) {
  char buf[1024];
  int legacy;
  if (lua_getfield(L, LUA_REGISTRYINDEX, "deploy.default_config") != LUA_TSTRING &&
      access(lconfig_default_path(L, buf, sizeof buf, &legacy), F_OK) != 0) {
    lua_pop(L, 1);
    luaL_error(L, "deploy: %s needs a DeploymentManager and found none: give manager = "
                  "deploy.DeploymentManager{ config = ... } to it, or write a config file (--config FILE, "
                  "$DEPLOY_CONFIG, or %s)", what_for, buf[0] == '/' ? buf : "./deployctl.lua");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, manager_new);
  lua_call(L, 0, 1);
}

void lmanager_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"deploy", manager_deploy},
      {"rollback", manager_rollback},
      {"get_status", manager_get_status},
      {"describe", manager_describe},
      {"history", manager_history},
      {"deployment", manager_deployment},
      {"events", manager_events},
      {"instances", manager_instances},
      {"live_instances", manager_live_instances},
      {"logs", manager_logs},
      {"targets", manager_targets},
      {"reconcile", manager_reconcile},
      {"maintenance", manager_maintenance},
      {"prune", manager_prune},
      {"state_path", manager_state_path},
      {"settings", manager_settings},
      {"lock", manager_lock},
      {"integrity_check", manager_integrity_check},
      {"promote", manager_promote},
      {"abort", manager_abort},
      {"register_strategy", manager_register_strategy},
      {"close", manager_close},
      {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__index", NULL}, {"__gc", manager_close}, {"__close", manager_close},
                                  {NULL, NULL}};
  if (luaL_newmetatable(L, MANAGER_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, manager_new);
  lua_setfield(L, -2, "DeploymentManager");
}
