/* GitOpsSynchronizer: get_diff, sync and watch (the specification's
 * methods), argument checking and conversion over runtime/gitsync.c. What
 * the runtime cannot know is answered here through its callbacks: which
 * strategies exist (built-in ones from strategies/, names registered with
 * the manager) and how to start a rollout with one (the manager's). */
#include "lgitops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gitsync.h"
#include "json.h"
#include "lmanager.h"
#include "lsched.h"
#include "lstrategy.h"
#include "lutil.h"
#include "util.h"

#define GITOPS_MT "deploy.GitOpsSynchronizer"

typedef struct lgitops {
  gitsync *gs;
  lua_State *L;            /* the thread that created it: callbacks run Lua on it */
  int manager_ref;         /* the DeploymentManager */
  char path_given[1024];
  /* Made from repo_url, branch, path alone (the specification's
   * constructor), it finds its manager at the first call that needs one:
   * until then gs is NULL and these say what to build. */
  char url[2048], branch[256];
  double interval;
  int prune, closed;
  /* the round in flight */
  int done;
  int report_ref;          /* the converted report, in the registry */
  /* watch */
  volatile int wake;
  int tick_fired;
  int interrupted;
  sig_atomic_t seen_interrupts;
} lgitops;

static void build(lua_State *L, lgitops *lg, int manager_idx);

/* The URL as the synchronizer shows it before it is built: a password or
 * token in its user-info replaced by *** (as gitops_url does). */
static void push_redacted_url(lua_State *L, const char *url) {
  const char *scheme = strstr(url, "://");
  const char *host = scheme ? scheme + 3 : url;
  const char *at = strchr(host, '@'), *slash = strchr(host, '/');
  if (!scheme || !at || (slash && slash < at)) {
    lua_pushstring(L, url);
    return;
  }
  const char *colon = memchr(host, ':', (size_t)(at - host));
  if (colon)
    lua_pushfstring(L, "%s***%s", lua_pushlstring(L, url, (size_t)(colon + 1 - url)), at);
  else
    lua_pushfstring(L, "%s***%s", lua_pushlstring(L, url, (size_t)(host - url)), at);
  lua_remove(L, -2);
}

static lgitops *check_sync(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  if (lg->closed)
    luaL_error(L, "deploy: this GitOpsSynchronizer was closed");
  if (!lg->gs) {
    int top = lua_gettop(L);
    /* Raises, naming the synchronizer and the two ways to give it a
     * manager, when there is no config file either. */
    lmanager_push_default(L, "GitOpsSynchronizer");
    build(L, lg, lua_gettop(L));
    lua_settop(L, top);
  }
  return lg;
}

static int sync_close(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  lg->closed = 1;
  gitsync_free(lg->gs);
  lg->gs = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, lg->manager_ref);
  lg->manager_ref = LUA_NOREF;
  return 0;
}

/* ---- the runtime's questions ---- */

static lua_State *cb_state(lgitops *lg) { return lsched_callback_state(lg->L); }

static void push_manager(lgitops *lg, lua_State *L) { lua_rawgeti(L, LUA_REGISTRYINDEX, lg->manager_ref); }

static int check_target(void *payload, const char *name, char *err) {
  lgitops *lg = payload;
  lua_State *L = cb_state(lg);
  push_manager(lg, L);
  service *svc = lmanager_service(L, -1);
  lua_pop(L, 1);
  if (service_target(svc, name))
    return 0;
  char *known = service_known(svc);
  dc_fmt(err, DC_ERR_MAX, "'%.64s' is not a target of the manager's config (known: %s): add it to the config or fix "
         "the manifest", name, known && *known ? known : "none");
  free(known);
  return -1;
}

/* Pushes the manifest's strategy (a built-in one made from its object, or
 * the registered class), or nil with err. Its webhooks are not the
 * strategy's business: the runtime reads them (start_deploy). */
static int push_strategy_of(lgitops *lg, lua_State *L, const json_t *obj, char *err);

static int push_strategy(lgitops *lg, lua_State *L, const json_t *obj, char *err) {
  if (!json_object_get(obj, "webhooks"))
    return push_strategy_of(lg, L, obj, err);
  json_t *rest = json_copy((json_t *)obj);
  if (!rest) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  json_object_del(rest, "webhooks");
  int rc = push_strategy_of(lg, L, rest, err);
  json_decref(rest);
  return rc;
}

static int push_strategy_of(lgitops *lg, lua_State *L, const json_t *obj, char *err) {
  strategy *st = NULL;
  char why[DC_ERR_MAX];
  int rc = strategy_from_json(obj, &st, why);
  if (rc < 0) {
    dc_fmt(err, DC_ERR_MAX, "field 'strategy': %s", dc_unprefix(why));
    return -1;
  }
  if (rc > 0) {
    lstrategy_push(L, st);
    return 0;
  }
  const char *kind = json_string_value(json_object_get(obj, "kind"));
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    if (strcmp(key, "kind") != 0) {
      dc_fmt(err, DC_ERR_MAX, "field 'strategy.%s': strategy '%s' takes no parameters in a manifest: remove it", key,
             kind);
      return -1;
    }
  }
  push_manager(lg, L);
  int t = lmanager_push_strategy(L, -1, kind);
  lua_remove(L, -2);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    dc_fmt(err, DC_ERR_MAX, "field 'strategy.kind': '%.64s' is not canary, blue-green or a strategy registered with "
           "the manager: register it (DeploymentManager{ strategies = { %.64s = ... } })", kind, kind);
    return -1;
  }
  return 0;
}

static int check_strategy(void *payload, const json_t *obj, char *err) {
  lgitops *lg = payload;
  lua_State *L = cb_state(lg);
  if (push_strategy(lg, L, obj, err) != 0)
    return -1;
  lua_pop(L, 1);
  return 0;
}

static int start_deploy(void *payload, const char *target, const char *version, const json_t *obj,
                        const char *metadata_json, rollout_done_cb done, void *done_payload, char *err) {
  lgitops *lg = payload;
  lua_State *L = cb_state(lg);
  int top = lua_gettop(L);
  push_manager(lg, L);
  int mgr = lua_gettop(L);
  int strategy_idx = 0;
  webhook_list hooks = {0};
  if (obj) {
    char field[64], why[DC_ERR_MAX];
    json_t *list = json_object_get(obj, "webhooks");
    if (list && webhook_list_from_json(&hooks, list, WEBHOOK_FROM_GIT, field, sizeof field, why) != 0) {
      dc_fmt(err, DC_ERR_MAX, "field 'strategy.%s': %s", field, why);
      lua_settop(L, top);
      return DC_ERROR;
    }
    if (push_strategy(lg, L, obj, err) != 0) {
      webhook_list_clear(&hooks);
      lua_settop(L, top);
      return DC_ERROR;
    }
    strategy_idx = lua_gettop(L);
  }
  int rc = lmanager_start(L, mgr, target, version, strategy_idx, metadata_json, hooks.n ? &hooks : NULL, done,
                          done_payload, err);
  webhook_list_clear(&hooks);
  lua_settop(L, top);
  return rc;
}

/* The events of prunes go to the manager's handler like any other, from
 * the scheduler (a handler may wait). */
typedef struct prune_event {
  lgitops *lg;
  store_event ev;
} prune_event;

static void deliver_prune_event(lua_State *L, void *payload) {
  prune_event *pe = payload;
  lgitops *lg = pe->lg;
  if (lg->manager_ref != LUA_NOREF) {
    push_manager(lg, L);
    int has = lmanager_push_handler(L, -1);
    lua_remove(L, -2);
    if (has) {
      lrun_push_event(L, &pe->ev);
      if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        fprintf(stderr, "deploy: on_event handler failed: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
      }
    } else {
      lua_pop(L, 1);
    }
  }
  store_event_clear(&pe->ev);
  free(pe);
}

static void on_prune_event(void *payload, const store_event *ev) {
  lgitops *lg = payload;
  prune_event *pe = calloc(1, sizeof *pe);
  if (!pe)
    return;
  pe->lg = lg;
  pe->ev = *ev;
  pe->ev.data = ev->data ? strdup(ev->data) : NULL;
  if (lsched_defer(lg->L, deliver_prune_event, pe) != 0) {
    free(pe->ev.data);
    free(pe);
  }
}

/* ---- reports to Lua ---- */

static void push_change(lua_State *L, const gitsync *gs, const gitops_change *c) {
  lua_createtable(L, 0, 8);
  lset_string_or_nil(L, "target", c->target);
  lset_string_or_nil(L, "kind", gitops_change_kind_name(c->kind));
  lset_string_or_nil(L, "from", c->from);
  lset_string_or_nil(L, "to", c->to);
  lset_string_or_nil(L, "revision", gitsync_revision(gs));
  lset_string_or_nil(L, "file", c->file);
  if (c->pinned) {
    lset_boolean(L, "pinned", 1);
    lset_string_or_nil(L, "pinned_revision", c->pinned_revision);
  }
  if (c->failed) {
    lset_boolean(L, "failed", 1);
    lset_string_or_nil(L, "failed_revision", c->failed_revision);
    lset_string_or_nil(L, "failed_deployment", c->failed_id);
  }
}

static void push_changes(lua_State *L, const gitsync *gs, const gitops_change *c, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_change(L, gs, &c[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static void push_held(lua_State *L, const gitsync *gs, const gitsync_held *h, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_change(L, gs, h[i].change);
    lset_string(L, "reason", h[i].reason);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static void push_applied(lua_State *L, const gitsync_applied *a) {
  lua_createtable(L, 0, 8);
  lset_string_or_nil(L, "target", a->change->target);
  lset_string_or_nil(L, "kind", gitops_change_kind_name(a->change->kind));
  lset_string_or_nil(L, "from", a->change->from);
  lset_string_or_nil(L, "version", a->change->to);
  lset_string_or_nil(L, "file", a->change->file);
  lset_string_or_nil(L, "strategy", a->strategy);
  lset_string_or_nil(L, "deployment_id", a->id);
  lset_boolean(L, "success", a->success);
  if (a->nerrors > 0) {
    lpush_strings(L, a->errors, a->nerrors);
    lua_setfield(L, -2, "errors");
  }
}

/* Pushes { changes, result } as one table (the round's Lua view). */
static void push_report(lua_State *L, const gitsync *gs, const gitsync_report *rep) {
  lua_createtable(L, 0, 4);
  push_changes(L, gs, rep->changes, rep->nchanges);
  lua_setfield(L, -2, "changes");
  lua_createtable(L, 0, 8);
  lset_boolean(L, "success", rep->success);
  lset_string_or_nil(L, "revision", rep->revision);
  lua_createtable(L, (int)rep->napplied, 0);
  for (size_t i = 0; i < rep->napplied; i++) {
    push_applied(L, &rep->applied[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "applied");
  push_held(L, gs, rep->pinned, rep->npinned);
  lua_setfield(L, -2, "pinned");
  push_held(L, gs, rep->skipped, rep->nskipped);
  lua_setfield(L, -2, "skipped");
  push_held(L, gs, rep->held, rep->nheld);
  lua_setfield(L, -2, "held");
  if (rep->nerrors) {
    lpush_strings(L, rep->errors, rep->nerrors);
    lua_setfield(L, -2, "errors");
  }
  lset_number(L, "duration", rep->duration);
  lua_setfield(L, -2, "result");
  lset_boolean(L, "report", rep->report);
  lset_boolean(L, "invalid", rep->invalid);
  lset_boolean(L, "fetch_failed", rep->fetch_failed);
}

static void round_done(void *payload, const gitsync_report *rep) {
  lgitops *lg = payload;
  lua_State *L = cb_state(lg);
  push_report(L, lg->gs, rep);
  lg->report_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lg->done = 1;
  lg->wake = 1;
}

typedef int (*round_fn)(gitsync *gs, gitsync_cb cb, void *payload, char *err);

/* Runs one round to its end and pushes its report table. */
static void run_round(lua_State *L, lgitops *lg, round_fn fn) {
  char err[DC_ERR_MAX];
  lg->done = 0;
  lg->report_ref = LUA_NOREF;
  if (fn(lg->gs, round_done, lg, err) != DC_OK)
    lerror(L, err);
  while (!lg->done) {
    lg->wake = 0;
    lsched_block(L, &lg->wake);
    if (lg->interrupted)
      gitsync_cancel(lg->gs); /* the round still ends, and is reported */
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, lg->report_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, lg->report_ref);
}

/* ---- get_diff, sync ---- */

/* get_diff() -> list of Change, or nil, message, errors. */
static int sync_get_diff(lua_State *L) {
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  lua_settop(L, 1);
  run_round(L, lg, gitsync_diff);
  int rep = lua_gettop(L);
  lua_getfield(L, rep, "result");
  lua_getfield(L, -1, "errors");
  if (!lua_isnil(L, -1)) {
    int errs = lua_gettop(L);
    luaL_Buffer b;
    lua_pushnil(L);
    luaL_buffinit(L, &b);
    for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, errs); i++) {
      if (i > 1)
        luaL_addchar(&b, '\n');
      lua_rawgeti(L, errs, i);
      luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    lua_pushvalue(L, errs);
    return 3;
  }
  lua_getfield(L, rep, "changes");
  return 1;
}

/* sync([{ retry = true }]) -> SyncResult. retry: apply again what a
 * failed rollout holds back. */
static int sync_sync(lua_State *L) {
  static const char *const allowed[] = {"retry", NULL};
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  lua_settop(L, 2);
  int retry = 0;
  if (!lua_isnil(L, 2)) {
    if (!lua_istable(L, 2))
      return luaL_error(L, "deploy: sync(options): options must be a table such as { retry = true }, got %s",
                        luaL_typename(L, 2));
    lcheck_keys(L, 2, allowed, "deploy: sync(options): unknown option '%s' (known: %s)");
    int t = lua_getfield(L, 2, "retry");
    if (t != LUA_TNIL && t != LUA_TBOOLEAN)
      return luaL_error(L, "deploy: sync(options): retry must be true or false, got %s", luaL_typename(L, -1));
    retry = lua_toboolean(L, -1);
  }
  lua_settop(L, 1);
  run_round(L, lg, retry ? gitsync_sync_retry : gitsync_sync);
  lua_getfield(L, -1, "result");
  return 1;
}

/* ---- watch ---- */

static void tick(void *payload) {
  lgitops *lg = payload;
  lg->tick_fired = 1;
  lg->wake = 1;
}

/* SIGINT/SIGTERM reach the host, which counts them in dc_interrupts; this
 * real-time check wakes the waiting loop to see them. */
static void interrupt_check(uv_timer_t *h) {
  lgitops *lg = h->data;
  if (dc_interrupts != lg->seen_interrupts) {
    lg->interrupted = 1;
    lg->wake = 1;
    if (lg->gs)
      gitsync_cancel(lg->gs);
  }
}

static void check_closed(uv_handle_t *h) { free(h); }

/* Sleeps `delay` on the engine clock, or until interrupted. */
static void watch_sleep(lua_State *L, lgitops *lg, engine *e, double delay) {
  lg->tick_fired = 0;
  engine_timer *t = engine_timer_start(e, delay, tick, lg);
  while (!lg->tick_fired && !lg->interrupted) {
    lg->wake = 0;
    lsched_block(L, &lg->wake);
  }
  if (!lg->tick_fired)
    engine_timer_cancel(t);
}

/* Calls callback(changes, result); 1 to go on, 0 when it returned false,
 * -1 when it raised (err says so; raised again once the watch is cleaned
 * up). */
static int call_back(lua_State *L, int fn, int rep, char *err) {
  lua_pushvalue(L, fn);
  lua_getfield(L, rep, "changes");
  lua_getfield(L, rep, "result");
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    dc_fmt(err, DC_ERR_MAX, "deploy: watch: the callback raised: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  int go_on = !(lua_isboolean(L, -1) && !lua_toboolean(L, -1));
  lua_pop(L, 1);
  return go_on;
}

/* watch(callback): polls until SIGINT/SIGTERM or the callback returns
 * false. Returns "interrupted" or "stopped". */
static int sync_watch(lua_State *L) {
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  char err[DC_ERR_MAX] = "";
  engine *e = lengine_get(L);
  lg->interrupted = 0;
  lg->seen_interrupts = dc_interrupts;
  /* The host stops Lua on SIGINT unless a wait owns interrupts: the watch
   * handles them itself and ends cleanly. */
  dc_interrupt_owners++;
  uv_timer_t *check = malloc(sizeof *check);
  if (check) {
    uv_timer_init(e->loop, check);
    check->data = lg;
    uv_timer_start(check, interrupt_check, 50, 50);
  }
  int go_on = 1;
  while (go_on == 1 && !lg->interrupted) {
    run_round(L, lg, gitsync_watch_round);
    lua_getfield(L, -1, "report");
    int report = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (report && !lg->interrupted)
      go_on = call_back(L, 2, lua_gettop(L), err);
    lua_settop(L, 2);
    if (go_on == 1 && !lg->interrupted)
      watch_sleep(L, lg, e, gitsync_next_delay(lg->gs));
  }
  if (check) {
    uv_timer_stop(check);
    uv_close((uv_handle_t *)check, check_closed);
  }
  dc_interrupt_owners--;
  int interrupted = lg->interrupted;
  lg->interrupted = 0;
  if (go_on < 0)
    return lerror(L, err);
  lua_pushstring(L, interrupted ? "interrupted" : "stopped");
  return 1;
}

/* ---- fields and construction ---- */

/* What the last fetch touched: specs and benchmarks check that a
 * no-change sync reads nothing and a one-change sync one blob. */
static void push_stats(lua_State *L, const gitops_stats *st) {
  lua_createtable(L, 0, 3);
  lset_boolean(L, "downloaded", st->downloaded);
  lset_boolean(L, "tree_diffed", st->tree_diffed);
  lset_integer(L, "blobs_read", (lua_Integer)st->blobs_read);
}

static int sync_index(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  const char *k = luaL_checkstring(L, 2);
  const gitops *g = lg->gs ? gitsync_gitops(lg->gs) : NULL;
  if (strcmp(k, "repo_url") == 0 && g)
    lua_pushstring(L, gitops_url(g));
  else if (strcmp(k, "repo_url") == 0 && !lg->closed)
    push_redacted_url(L, lg->url);
  else if (strcmp(k, "branch") == 0 && g)
    lua_pushstring(L, gitops_branch(g));
  else if (strcmp(k, "branch") == 0 && !lg->closed)
    lua_pushstring(L, lg->branch);
  else if (strcmp(k, "path") == 0)
    lua_pushstring(L, lg->path_given);
  else if (strcmp(k, "interval") == 0 && lg->gs)
    lpush_number(L, gitsync_interval(lg->gs));
  else if (strcmp(k, "last_fetch") == 0 && g)
    push_stats(L, gitops_last_stats(g));
  else if (strcmp(k, "prune") == 0 && lg->gs)
    lua_pushboolean(L, gitsync_prune(lg->gs));
  else if (strcmp(k, "revision") == 0 && lg->gs && gitsync_revision(lg->gs)[0])
    lua_pushstring(L, gitsync_revision(lg->gs));
  else if (strcmp(k, "revision") == 0)
    lua_pushnil(L);
  else if (strcmp(k, "manager") == 0)
    push_manager(lg, L);
  else if (strcmp(k, "cache") == 0 && g)
    lua_pushstring(L, gitops_cache(g));
  else {
    luaL_getmetatable(L, GITOPS_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, k);
  }
  return 1;
}

static int sync_tostring(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  const gitops *g = lg->gs ? gitsync_gitops(lg->gs) : NULL;
  if (!g && !lg->closed) {
    push_redacted_url(L, lg->url);
    lua_pushfstring(L, "GitOpsSynchronizer(%s, %s, %s)", lua_tostring(L, -1), lg->branch, lg->path_given);
    return 1;
  }
  lua_pushfstring(L, "GitOpsSynchronizer(%s, %s, %s)", g ? gitops_url(g) : "closed", g ? gitops_branch(g) : "",
                  lg->path_given);
  return 1;
}

static const char *opt_string(lua_State *L, const char *field, const char *def) {
  int t = lua_getfield(L, 1, field);
  lua_pop(L, 1);
  if (t == LUA_TNIL)
    return def;
  if (t != LUA_TSTRING)
    luaL_error(L, "deploy: GitOpsSynchronizer %s must be a string, got %s", field, lua_typename(L, t));
  lua_getfield(L, 1, field);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (strlen(s) != len)
    luaL_error(L, "deploy: GitOpsSynchronizer %s holds a NUL byte: use only printable characters", field);
  lua_pop(L, 1); /* kept alive by the options table */
  return s;
}

static double opt_interval(lua_State *L) {
  int t = lua_getfield(L, 1, "interval");
  double v = t == LUA_TNIL ? 60 : lua_tonumber(L, -1);
  if (t != LUA_TNIL && t != LUA_TNUMBER)
    luaL_error(L, "deploy: GitOpsSynchronizer interval must be a number of seconds, got %s", luaL_typename(L, -1));
  if (!(v > 0) || !isfinite(v) || v > 1e7)
    luaL_error(L, "deploy: GitOpsSynchronizer interval must be > 0 seconds (e.g. 60), got %f", v);
  lua_pop(L, 1);
  return v;
}

static int opt_prune(lua_State *L) {
  int t = lua_getfield(L, 1, "prune");
  int v = lua_toboolean(L, -1);
  if (t != LUA_TNIL && t != LUA_TBOOLEAN)
    luaL_error(L, "deploy: GitOpsSynchronizer prune must be true or false, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* The cache lives next to the store: <dir of state.db>/git; a database
 * store keeps it under .deploy/git. */
static void cache_dir(const char *state, char *buf, size_t size) {
  const char *slash = strrchr(state, '/');
  if (strstr(state, "://"))
    dc_strlcpy(buf, ".deploy/git", size);
  else if (slash)
    dc_fmt(buf, size, "%.*s/git", (int)(slash - state), state);
  else
    dc_strlcpy(buf, "git", size);
}

static int sync_new(lua_State *L) {
  lua_settop(L, 1);
  if (!lua_istable(L, 1))
    return luaL_error(L, "deploy: GitOpsSynchronizer expects a table { repo_url = ..., branch = \"main\", "
                         "path = \"/\", manager = ... }, got %s", luaL_typename(L, 1));
  static const char *const known[] = {"repo_url", "branch", "path", "manager", "interval", "prune", NULL};
  lcheck_keys(L, 1, known, "deploy: GitOpsSynchronizer has no option '%s' (known: %s)");
  const char *url = opt_string(L, "repo_url", NULL);
  if (!url || !*url)
    return luaL_error(L, "deploy: GitOpsSynchronizer needs repo_url = \"https://host/repo.git\" "
                         "(or git://, ssh://, file://)");
  const char *branch = opt_string(L, "branch", "main");
  const char *path = opt_string(L, "path", "/");
  double interval = opt_interval(L);
  int prune = opt_prune(L);
  if (strlen(url) >= sizeof ((lgitops *)0)->url || strlen(branch) >= sizeof ((lgitops *)0)->branch ||
      strlen(path) >= sizeof ((lgitops *)0)->path_given)
    return luaL_error(L, "deploy: GitOpsSynchronizer repo_url, branch or path is too long");
  int manager = lua_getfield(L, 1, "manager") != LUA_TNIL; /* 2 */
  if (manager)
    lmanager_service(L, 2); /* raises unless it is an open DeploymentManager */
  lgitops *lg = lua_newuserdatauv(L, sizeof *lg, 0); /* 3 */
  memset(lg, 0, sizeof *lg);
  lg->manager_ref = LUA_NOREF;
  luaL_setmetatable(L, GITOPS_MT);
  lg->L = L;
  dc_strlcpy(lg->path_given, path, sizeof lg->path_given);
  dc_strlcpy(lg->url, url, sizeof lg->url);
  dc_strlcpy(lg->branch, branch, sizeof lg->branch);
  lg->interval = interval;
  lg->prune = prune;
  /* With a manager, everything is checked now; without, at the first
   * call that needs one (the default config's manager). */
  if (manager)
    build(L, lg, 2);
  return 1;
}

gitsync *lgitops_gitsync(lua_State *L, int idx) {
  lgitops *lg = luaL_testudata(L, idx, GITOPS_MT);
  if (!lg)
    luaL_error(L, "deploy: a GitOpsSynchronizer was expected, got %s", luaL_typename(L, idx));
  if (lg->closed)
    luaL_error(L, "deploy: this GitOpsSynchronizer was closed");
  if (!lg->gs) /* built at its first use when made without a manager */
    luaL_error(L, "deploy: this GitOpsSynchronizer has no manager yet: give it manager = ...");
  return lg->gs;
}

static void build(lua_State *L, lgitops *lg, int manager_idx) {
  char err[DC_ERR_MAX], cache[1100];
  service *svc = lmanager_service(L, manager_idx);
  lua_pushvalue(L, manager_idx);
  lg->manager_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  cache_dir(store_location(service_store(svc)), cache, sizeof cache);
  gitsync_opts o = {.url = lg->url, .branch = lg->branch, .path = lg->path_given, .cache_dir = cache,
                    .interval = lg->interval, .prune = lg->prune, .checks = {check_target, check_strategy, lg},
                    .deploy = start_deploy, .payload = lg, .sink = {on_prune_event, lg}};
  if (gitsync_new(&lg->gs, svc, &o, err) != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, lg->manager_ref);
    lg->manager_ref = LUA_NOREF;
    lerror(L, err);
  }
}

void lgitops_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"get_diff", sync_get_diff}, {"sync", sync_sync}, {"watch", sync_watch},
                                     {"close", sync_close},       {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__index", sync_index},
                                  {"__gc", sync_close},
                                  {"__close", sync_close},
                                  {"__tostring", sync_tostring},
                                  {NULL, NULL}};
  if (luaL_newmetatable(L, GITOPS_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, sync_new);
  lua_setfield(L, -2, "GitOpsSynchronizer");
}
