/* GitOpsSynchronizer: get_diff, sync and watch (the specification's
 * methods) on top of runtime/gitops.c. The runtime fetches and reads the
 * changed manifest blobs on the thread pool; here their JSON is decoded with
 * lua-cjson, checked field by field, folded into a table of manifests kept
 * from one fetch to the next, and changes are applied through the manager
 * (lmanager_start), every changed target at once. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "lsched.h"
#include "gitops.h"
#include "util.h"

#define GITOPS_MT "deploy.GitOpsSynchronizer"
#define GITOPS_MODULE GITOPS_MT ".module"
/* Encoded manifest metadata larger than this is refused (lua-cjson's
 * encoder must not see huge values: CVE-2022-24834). */
#define METADATA_MAX (64 * 1024)
#define BACKOFF_CAP 300.0

/* Uservalues: the manager, and the manifests read so far (file -> entry). */
enum { UV_MANAGER = 1, UV_FILES = 2, UV_COUNT = 2 };

typedef struct lgitops {
  gitops *g;
  engine *e;
  double interval;
  int prune;
  char path_given[1024];
  char revision[GITOPS_OID_HEX]; /* tip of the last update folded in */
  /* the fetch in flight */
  int fetch_done;
  gitops_update pending;
  char fetch_err[DC_ERR_MAX];
  /* watch */
  volatile int wake;
  int tick_fired;
  int interrupted;
  sig_atomic_t seen_interrupts;
} lgitops;

static lgitops *check_sync(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  if (!lg->g)
    luaL_error(L, "deploy: this GitOpsSynchronizer was closed");
  return lg;
}

static int sync_close(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  gitops_free(lg->g);
  lg->g = NULL;
  gitops_update_clear(&lg->pending);
  return 0;
}

/* ---- fetching ---- */

static void fetched(void *payload, gitops_update *u, const char *err) {
  lgitops *lg = payload;
  lg->fetch_done = 1;
  lg->wake = 1;
  dc_strlcpy(lg->fetch_err, err ? err : "", sizeof lg->fetch_err);
  if (u) { /* taken: folded into the manifests table once the wait ends */
    lg->pending = *u;
    u->entries = NULL;
    u->n = 0;
  }
}

/* Runs the loop until the fetch ends or, while watching, an interrupt. */
static void wait_fetch(lua_State *L, lgitops *lg) {
  while (!lg->fetch_done && !lg->interrupted) {
    lg->wake = 0;
    lsched_block(L, &lg->wake);
  }
}

/* ---- manifests: JSON to checked entries ---- */

static void push_module_field(lua_State *L, const char *name) {
  lua_getfield(L, LUA_REGISTRYINDEX, GITOPS_MODULE);
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
}

static const char *type_name(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TLIGHTUSERDATA)
    return "null"; /* cjson.null */
  if (lua_istable(L, idx))
    return "an object or array";
  return luaL_typename(L, idx);
}

/* Appends "file: message" to the errors list at errs. */
static void add_error(lua_State *L, int errs, const char *file, const char *msg) {
  lua_pushfstring(L, "%s: %s", file, msg);
  lua_rawseti(L, errs, (lua_Integer)lua_rawlen(L, errs) + 1);
}

static void add_errorf(lua_State *L, int errs, const char *file, const char *fmt, const char *a, const char *b) {
  char msg[DC_ERR_MAX];
  dc_fmt(msg, sizeof msg, fmt, a, b ? b : "");
  add_error(L, errs, file, msg);
}

/* Calls cjson.<fn>(value at idx) protected; pushes the result or nil and
 * fills err. */
static int cjson_call(lua_State *L, const char *fn, int idx, char *err, size_t size) {
  idx = lua_absindex(L, idx);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    dc_fmt(err, size, "lua-cjson is not installed (%s): install lua-cjson", lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushnil(L);
    return -1;
  }
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    dc_fmt(err, size, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushnil(L);
    return -1;
  }
  return 0;
}

/* Every key a string: a JSON object (an empty one is fine too). */
static int is_object(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (!lua_istable(L, idx))
    return 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int ok = lua_type(L, -2) == LUA_TSTRING;
    lua_pop(L, 1);
    if (!ok) {
      lua_pop(L, 1);
      return 0;
    }
  }
  return 1;
}

static void check_unknown_fields(lua_State *L, int obj, int errs, const char *file) {
  static const char *const known[] = {"target", "version", "strategy", "metadata", NULL};
  lua_pushnil(L);
  while (lua_next(L, obj)) {
    int ok = 0;
    for (const char *const *k = known; *k; k++)
      ok |= strcmp(*k, lua_tostring(L, -2)) == 0;
    if (!ok)
      add_errorf(L, errs, file, "unknown field '%s' (known: target, version, strategy, metadata): remove it",
                 lua_tostring(L, -2), NULL);
    lua_pop(L, 1);
  }
}

/* A string field; NULL (with an error) when missing or of another type. */
static const char *string_field(lua_State *L, int obj, int errs, const char *file, const char *key,
                                const char *field, const char *example) {
  int t = lua_getfield(L, obj, key);
  const char *s = NULL;
  if (t == LUA_TSTRING)
    s = lua_tostring(L, -1);
  else if (t == LUA_TNIL)
    add_errorf(L, errs, file, "field '%s' is missing: add it, e.g. %s", field, example);
  else
    add_errorf(L, errs, file, "field '%s' must be a string, got %s", field, type_name(L, -1));
  lua_pop(L, 1); /* still referenced by obj */
  return s;
}

static void check_target(lua_State *L, int mgr, int obj, int errs, const char *file, int entry) {
  const char *target = string_field(L, obj, errs, file, "target", "target", "\"target\": \"production\"");
  if (!target)
    return;
  if (!lmanager_target(L, mgr, target)) {
    char known[300], msg[DC_ERR_MAX];
    lmanager_known(L, mgr, known, sizeof known);
    dc_fmt(msg, sizeof msg, "field 'target': '%.64s' is not a target of the manager's config (known: %s): add it "
                            "to the config or fix the manifest", target, known[0] ? known : "none");
    add_error(L, errs, file, msg);
    return;
  }
  lua_pushstring(L, target);
  lua_setfield(L, entry, "target");
}

static void check_version(lua_State *L, int obj, int errs, const char *file, int entry) {
  char err[DC_ERR_MAX];
  const char *version = string_field(L, obj, errs, file, "version", "version", "\"version\": \"1.4.2\"");
  if (!version)
    return;
  if (dc_validate_version(version, "field 'version'", err) != 0) {
    add_error(L, errs, file, strncmp(err, "deploy: ", 8) == 0 ? err + 8 : err);
    return;
  }
  lua_pushstring(L, version);
  lua_setfield(L, entry, "version");
}

/* strategy.kind canary / blue-green: the class's own constructor checks the
 * parameters and names the bad one. */
static void builtin_strategy(lua_State *L, int strat, int errs, const char *file, int entry, const char *cls) {
  push_module_field(L, cls);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, strat)) {
    if (strcmp(lua_tostring(L, -2), "kind") == 0) {
      lua_pop(L, 1);
      continue;
    }
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_settable(L, -4);
  }
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    if (msg && strncmp(msg, "deploy: ", 8) == 0)
      msg += 8;
    add_errorf(L, errs, file, "field 'strategy': %s", msg ? msg : "invalid parameters", NULL);
    lua_pop(L, 1);
    return;
  }
  lua_setfield(L, entry, "strategy");
}

static void named_strategy(lua_State *L, int mgr, int strat, int errs, const char *file, int entry,
                           const char *kind) {
  lua_pushnil(L);
  while (lua_next(L, strat)) {
    if (strcmp(lua_tostring(L, -2), "kind") != 0)
      add_errorf(L, errs, file, "field 'strategy.%s': strategy '%s' takes no parameters in a manifest: remove it",
                 lua_tostring(L, -2), kind);
    lua_pop(L, 1);
  }
  if (lmanager_push_strategy(L, mgr, kind) == LUA_TNIL) {
    lua_pop(L, 1);
    add_errorf(L, errs, file, "field 'strategy.kind': '%.64s' is not canary, blue-green or a strategy registered "
                              "with the manager: register it (DeploymentManager{ strategies = { %.64s = ... } })",
               kind, kind);
    return;
  }
  lua_setfield(L, entry, "strategy");
}

static void check_strategy(lua_State *L, int mgr, int obj, int errs, const char *file, int entry) {
  int t = lua_getfield(L, obj, "strategy");
  int strat = lua_gettop(L);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return; /* the manager's default */
  }
  if (!is_object(L, strat)) {
    add_errorf(L, errs, file, "field 'strategy' must be an object such as {\"kind\": \"canary\"}, got %s",
               type_name(L, strat), NULL);
  } else {
    const char *kind = string_field(L, strat, errs, file, "kind", "strategy.kind", "\"kind\": \"canary\"");
    if (kind && strcmp(kind, "canary") == 0)
      builtin_strategy(L, strat, errs, file, entry, "CanaryStrategy");
    else if (kind && strcmp(kind, "blue-green") == 0)
      builtin_strategy(L, strat, errs, file, entry, "BlueGreenStrategy");
    else if (kind)
      named_strategy(L, mgr, strat, errs, file, entry, kind);
  }
  lua_settop(L, strat - 1);
}

static void check_metadata(lua_State *L, int obj, int errs, const char *file, int entry) {
  char err[DC_ERR_MAX];
  int t = lua_getfield(L, obj, "metadata");
  int meta = lua_gettop(L);
  if (t != LUA_TNIL && !is_object(L, meta)) {
    add_errorf(L, errs, file, "field 'metadata' must be an object, got %s", type_name(L, meta), NULL);
  } else if (t != LUA_TNIL && lua_getfield(L, meta, "gitops") != LUA_TNIL) {
    add_error(L, errs, file, "field 'metadata.gitops' is reserved: deployctl records the revision there; "
                             "use another name");
  } else if (t != LUA_TNIL && cjson_call(L, "encode", meta, err, sizeof err) != 0) {
    add_errorf(L, errs, file, "field 'metadata' cannot be stored: %s", err, NULL);
  } else if (t != LUA_TNIL && lua_rawlen(L, -1) > METADATA_MAX) {
    add_error(L, errs, file, "field 'metadata' is larger than 64 KiB once encoded: keep it small");
  } else if (t != LUA_TNIL) {
    lua_setfield(L, entry, "metadata");
  }
  lua_settop(L, meta - 1);
}

static const char *problem_text(gitops_problem p) {
  switch (p) {
  case GITOPS_SYMLINK:
    return "is a symbolic link: refused (a link could point outside path; commit the manifest itself)";
  case GITOPS_TOO_LARGE:
    return "is larger than 1 MiB: refused unread (split it, or trim its metadata)";
  case GITOPS_NOT_FILE:
    return "is not a regular file (a submodule?): refused";
  case GITOPS_BAD_NAME:
    return "has a name that leaves path ('/' or '..' in a tree entry): refused";
  default:
    return "cannot be read";
  }
}

/* Decodes and checks one manifest; pushes its entry table
 * { oid, file, target, version, strategy, metadata, errors }. */
static void push_manifest(lua_State *L, int self, const gitops_entry *en) {
  char err[DC_ERR_MAX];
  lua_getiuservalue(L, self, UV_MANAGER);
  int mgr = lua_gettop(L);
  lua_createtable(L, 0, 7);
  int entry = lua_gettop(L);
  lua_pushstring(L, en->oid);
  lua_setfield(L, entry, "oid");
  lua_pushstring(L, en->file);
  lua_setfield(L, entry, "file");
  lua_newtable(L);
  int errs = lua_gettop(L);
  if (en->problem != GITOPS_OK || !en->data) {
    add_error(L, errs, en->file, problem_text(en->problem));
  } else {
    lua_pushlstring(L, en->data, en->size);
    if (cjson_call(L, "decode", -1, err, sizeof err) != 0)
      add_errorf(L, errs, en->file, "not valid JSON: %s: fix the syntax", err, NULL);
    else if (!is_object(L, -1) || lua_rawlen(L, -1) > 0)
      add_error(L, errs, en->file, "must be a JSON object {\"target\": ..., \"version\": ...}");
    else {
      int obj = lua_gettop(L);
      check_unknown_fields(L, obj, errs, en->file);
      check_target(L, mgr, obj, errs, en->file, entry);
      check_version(L, obj, errs, en->file, entry);
      check_strategy(L, mgr, obj, errs, en->file, entry);
      check_metadata(L, obj, errs, en->file, entry);
    }
  }
  lua_settop(L, errs);
  if (lua_rawlen(L, errs) > 0)
    lua_setfield(L, entry, "errors");
  else
    lua_pop(L, 1);
  lua_remove(L, mgr);
}

/* Folds a fetched update into the manifests table. */
static void fold_update(lua_State *L, int self, lgitops *lg) {
  gitops_update *u = &lg->pending;
  if (u->full || lua_getiuservalue(L, self, UV_FILES) != LUA_TTABLE) {
    if (!u->full)
      lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, self, UV_FILES);
  }
  int files = lua_gettop(L);
  for (size_t i = 0; i < u->n; i++) {
    if (u->entries[i].status == GITOPS_DELETED)
      lua_pushnil(L);
    else
      push_manifest(L, self, &u->entries[i]);
    lua_setfield(L, files, u->entries[i].file);
  }
  lua_pop(L, 1);
  dc_strlcpy(lg->revision, u->revision, sizeof lg->revision);
  gitops_update_clear(u);
}

/* Fetches and folds. 0, or -1 with err filled (operational failure). */
static int refresh(lua_State *L, int self, lgitops *lg, char *err) {
  if (gitops_busy(lg->g)) /* an interrupted watch left one running */
    wait_fetch(L, lg);
  if (lg->fetch_done && !lg->fetch_err[0])
    fold_update(L, self, lg);
  lg->fetch_done = 0;
  if (lg->interrupted) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: interrupted");
    return -1;
  }
  if (gitops_fetch(lg->g, fetched, lg, err) != 0)
    return -1;
  wait_fetch(L, lg);
  if (!lg->fetch_done) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: interrupted while fetching %s", gitops_url(lg->g));
    return -1;
  }
  lg->fetch_done = 0;
  if (lg->fetch_err[0]) {
    dc_strlcpy(err, lg->fetch_err, DC_ERR_MAX);
    return -1;
  }
  fold_update(L, self, lg);
  return 0;
}

/* ---- the revision as a whole ---- */

/* What a checked revision wants. Strings point into the manifests table,
 * which stays on the stack (at `files`) while this is used. */
typedef struct wanted {
  gitops_want *wants;
  size_t n;
  int files;  /* stack index of the manifests table */
  int errors; /* stack index of the list of every error */
} wanted;

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* File names in order, so errors and duplicates read the same every time. */
static const char **sorted_files(lua_State *L, int files, size_t *n) {
  size_t cap = 16;
  const char **names = malloc(cap * sizeof *names);
  *n = 0;
  lua_pushnil(L);
  while (names && lua_next(L, files)) {
    lua_pop(L, 1);
    if (*n == cap) {
      const char **grown = realloc(names, (cap *= 2) * sizeof *names);
      if (!grown)
        break;
      names = grown;
    }
    names[(*n)++] = lua_tostring(L, -1);
  }
  if (names)
    qsort(names, *n, sizeof *names, by_name);
  return names;
}

static void copy_errors(lua_State *L, int entry, int errors) {
  if (lua_getfield(L, entry, "errors") == LUA_TTABLE) {
    for (lua_Integer i = 1; lua_rawgeti(L, -1, i) != LUA_TNIL; i++)
      lua_rawseti(L, errors, (lua_Integer)lua_rawlen(L, errors) + 1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* One manifest per target: the second file naming it is an error. */
static int duplicate(lua_State *L, wanted *w, const char *target, const char *file) {
  for (size_t i = 0; i < w->n; i++) {
    if (strcmp(w->wants[i].target, target) != 0)
      continue;
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "field 'target': '%s' is also the target of %s: keep one manifest per target", target,
           w->wants[i].file);
    add_error(L, w->errors, file, msg);
    return 1;
  }
  return 0;
}

static void want_entry(lua_State *L, wanted *w, int entry) {
  lua_getfield(L, entry, "target");
  lua_getfield(L, entry, "version");
  lua_getfield(L, entry, "file");
  lua_getfield(L, entry, "oid");
  gitops_want v = {lua_tostring(L, -4), lua_tostring(L, -3), lua_tostring(L, -2), lua_tostring(L, -1)};
  lua_pop(L, 4); /* the strings stay alive in the entry */
  if (!duplicate(L, w, v.target, v.file))
    w->wants[w->n++] = v;
}

/* Pushes the manifests table and the error list; fills w. */
static void collect_wanted(lua_State *L, int self, wanted *w) {
  memset(w, 0, sizeof *w);
  if (lua_getiuservalue(L, self, UV_FILES) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
  }
  w->files = lua_gettop(L);
  lua_newtable(L);
  w->errors = lua_gettop(L);
  size_t n;
  const char **names = sorted_files(L, w->files, &n);
  w->wants = calloc(n + 1, sizeof *w->wants);
  for (size_t i = 0; names && w->wants && i < n; i++) {
    lua_getfield(L, w->files, names[i]);
    int entry = lua_gettop(L);
    copy_errors(L, entry, w->errors);
    lua_getfield(L, entry, "errors");
    if (lua_isnil(L, -1))
      want_entry(L, w, entry);
    lua_settop(L, entry - 1);
  }
  free(names);
}

/* The configured targets, as manager:targets() lists them. */
static const char **config_targets(lua_State *L, int self, size_t *n) {
  lua_getiuservalue(L, self, UV_MANAGER);
  lua_getfield(L, -1, "targets");
  lua_insert(L, -2);
  lua_call(L, 1, 1);
  int list = lua_gettop(L);
  *n = lua_rawlen(L, list);
  const char **names = calloc(*n + 1, sizeof *names);
  for (size_t i = 0; names && i < *n; i++) {
    lua_rawgeti(L, list, (lua_Integer)i + 1);
    names[i] = lua_tostring(L, -1);
    lua_pop(L, 1); /* kept alive by the list, left on the stack */
  }
  return names;
}

/* The path as provenance records it: "/" for the root. */
static const char *source_path(const lgitops *lg) {
  const char *p = gitops_path(lg->g);
  return p[0] ? p : "/";
}

/* Plans the current revision: leaves the target list on the stack. */
static int plan(lua_State *L, int self, lgitops *lg, const wanted *w, gitops_change **out, size_t *n, char *err) {
  size_t ntargets;
  const char **targets = config_targets(L, self, &ntargets);
  lua_getiuservalue(L, self, UV_MANAGER);
  store *s = lmanager_store(L, -1);
  lua_pop(L, 1);
  int rc = gitops_plan(s, gitops_url(lg->g), source_path(lg), targets, ntargets, w->wants, w->n, out, n, err);
  free(targets);
  return rc;
}

static void set_string_or_nil(lua_State *L, int idx, const char *field, const char *s) {
  if (s && *s)
    lua_pushstring(L, s);
  else
    lua_pushnil(L);
  lua_setfield(L, idx, field);
}

static void push_change(lua_State *L, const lgitops *lg, const gitops_change *c) {
  lua_createtable(L, 0, 8);
  int t = lua_gettop(L);
  set_string_or_nil(L, t, "target", c->target);
  set_string_or_nil(L, t, "kind", gitops_change_kind_name(c->kind));
  set_string_or_nil(L, t, "from", c->from);
  set_string_or_nil(L, t, "to", c->to);
  set_string_or_nil(L, t, "revision", lg->revision);
  set_string_or_nil(L, t, "file", c->file);
  if (c->pinned) {
    lua_pushboolean(L, 1);
    lua_setfield(L, t, "pinned");
    set_string_or_nil(L, t, "pinned_revision", c->pinned_revision);
  }
}

static void push_changes(lua_State *L, const lgitops *lg, const gitops_change *c, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_change(L, lg, &c[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

/* Pushes a message joining every error of the list at idx. */
static void push_joined(lua_State *L, int list) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, list); i++) {
    if (i > 1)
      luaL_addchar(&b, '\n');
    lua_rawgeti(L, list, i);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
}

/* ---- get_diff ---- */

/* get_diff() -> list of Change, or nil, message, errors. */
static int sync_get_diff(lua_State *L) {
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  char err[DC_ERR_MAX];
  lua_settop(L, 1);
  if (refresh(L, 1, lg, err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_createtable(L, 1, 0);
    lua_pushstring(L, err);
    lua_rawseti(L, -2, 1);
    return 3;
  }
  wanted w;
  collect_wanted(L, 1, &w);
  if (lua_rawlen(L, w.errors) > 0) {
    free(w.wants);
    lua_pushnil(L);
    push_joined(L, w.errors);
    lua_pushvalue(L, w.errors);
    return 3;
  }
  gitops_change *changes;
  size_t n;
  int rc = plan(L, 1, lg, &w, &changes, &n, err);
  free(w.wants);
  if (rc != 0)
    return lerror(L, err);
  push_changes(L, lg, changes, n);
  free(changes);
  return 1;
}

/* ---- sync ---- */

typedef struct apply {
  struct apply_run *run;
  const gitops_change *change;
  int started;
  int done;
  int success;
  char strategy[64];
  char id[48];
  int nerrors;
  char errors[ROLLOUT_MAX_ERRORS][DC_ERR_MAX];
} apply;

typedef struct apply_run {
  int pending;
  int all_done;
  apply *items;
  size_t n;
} apply_run;

static void item_ended(apply *a) {
  a->done = 1;
  if (--a->run->pending == 0)
    a->run->all_done = 1;
}

static void rollout_ended(void *payload, const rollout_result *res) {
  apply *a = payload;
  a->success = res->success;
  dc_strlcpy(a->strategy, res->strategy, sizeof a->strategy);
  dc_strlcpy(a->id, res->id, sizeof a->id);
  a->nerrors = res->nerrors < ROLLOUT_MAX_ERRORS ? res->nerrors : ROLLOUT_MAX_ERRORS;
  for (int i = 0; i < a->nerrors; i++)
    dc_strlcpy(a->errors[i], res->errors[i], DC_ERR_MAX);
  item_ended(a);
}

static void prune_ended(void *payload, int ok, const char *err) {
  apply *a = payload;
  a->success = ok;
  dc_strlcpy(a->strategy, "prune", sizeof a->strategy);
  if (err) {
    a->nerrors = 1;
    dc_strlcpy(a->errors[0], err, DC_ERR_MAX);
  }
  item_ended(a);
}

static void refused(apply *a, const char *err) {
  a->success = 0;
  a->done = 1;
  a->nerrors = 1;
  dc_strlcpy(a->errors[0], err, DC_ERR_MAX);
}

static void provenance(const lgitops *lg, const gitops_change *c, const char *blob, gitops_provenance *p) {
  memset(p, 0, sizeof *p);
  dc_strlcpy(p->revision, lg->revision, sizeof p->revision);
  dc_strlcpy(p->blob, blob ? blob : "", sizeof p->blob);
  dc_strlcpy(p->file, c->file, sizeof p->file);
  dc_strlcpy(p->repo, gitops_url(lg->g), sizeof p->repo);
  dc_strlcpy(p->branch, gitops_branch(lg->g), sizeof p->branch);
  dc_strlcpy(p->path, source_path(lg), sizeof p->path);
}

static void start_prune(lua_State *L, int self, lgitops *lg, apply *a) {
  char err[DC_ERR_MAX];
  gitops_provenance p;
  provenance(lg, a->change, NULL, &p);
  char *meta = gitops_metadata_json(&p, NULL);
  lua_getiuservalue(L, self, UV_MANAGER);
  target_config *t = lmanager_target(L, -1, a->change->target);
  store *s = lmanager_store(L, -1);
  lua_pop(L, 1);
  gitops_prune_opts o = {.metadata_json = meta};
  a->run->pending++;
  if (gitops_target_prune(lg->e, s, t, &o, prune_ended, a, err) != DC_OK) {
    a->run->pending--;
    refused(a, err);
  }
  free(meta);
}

/* Starts the rollout of one create/update with its manifest's strategy
 * (nil: the manager's default) and the provenance in its metadata. */
static void start_rollout(lua_State *L, int self, lgitops *lg, const wanted *w, apply *a) {
  char err[DC_ERR_MAX];
  const gitops_want *want = &w->wants[a->change->want];
  int top = lua_gettop(L);
  lua_getiuservalue(L, self, UV_MANAGER);
  int mgr = lua_gettop(L);
  lua_getfield(L, w->files, want->file);
  lua_getfield(L, -1, "strategy");
  int strategy = lua_isnil(L, -1) ? 0 : lua_gettop(L);
  lua_getfield(L, -2, "metadata");
  gitops_provenance p;
  provenance(lg, a->change, want->blob, &p);
  char *meta = gitops_metadata_json(&p, lua_tostring(L, -1));
  a->run->pending++;
  int rc = lmanager_start(L, mgr, want->target, want->version, strategy, meta, rollout_ended, a, err);
  free(meta);
  if (rc != DC_OK) {
    a->run->pending--;
    refused(a, err);
  }
  lua_settop(L, top);
}

static void push_applied(lua_State *L, const apply *a) {
  lua_createtable(L, 0, 8);
  int t = lua_gettop(L);
  set_string_or_nil(L, t, "target", a->change->target);
  set_string_or_nil(L, t, "kind", gitops_change_kind_name(a->change->kind));
  set_string_or_nil(L, t, "from", a->change->from);
  set_string_or_nil(L, t, "version", a->change->to);
  set_string_or_nil(L, t, "file", a->change->file);
  set_string_or_nil(L, t, "strategy", a->strategy);
  set_string_or_nil(L, t, "deployment_id", a->id);
  lua_pushboolean(L, a->success);
  lua_setfield(L, t, "success");
  if (a->nerrors > 0) {
    lua_createtable(L, a->nerrors, 0);
    for (int i = 0; i < a->nerrors; i++) {
      lua_pushstring(L, a->errors[i]);
      lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, t, "errors");
  }
}

/* A new SyncResult table on the stack, filled by the steps below. */
static int push_result(lua_State *L, const lgitops *lg) {
  lua_createtable(L, 0, 8);
  int r = lua_gettop(L);
  lua_pushboolean(L, 1);
  lua_setfield(L, r, "success");
  set_string_or_nil(L, r, "revision", lg->revision);
  lua_newtable(L);
  lua_setfield(L, r, "applied");
  lua_newtable(L);
  lua_setfield(L, r, "pinned");
  lua_newtable(L);
  lua_setfield(L, r, "skipped");
  return r;
}

static void result_error(lua_State *L, int r, const char *msg) {
  lua_pushboolean(L, 0);
  lua_setfield(L, r, "success");
  if (lua_getfield(L, r, "errors") != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, r, "errors");
  }
  lua_pushstring(L, msg);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 1);
}

static void append_to(lua_State *L, int r, const char *field) {
  lua_getfield(L, r, field);
  lua_insert(L, -2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 1);
}

/* Pinned and prune-less deletes are reported, not applied. */
static int held_back(lua_State *L, int r, const lgitops *lg, const gitops_change *c) {
  if (c->pinned) {
    push_change(L, lg, c);
    lset_string(L, "reason", "pinned by a manual rollback until git changes this target's manifest");
    append_to(L, r, "pinned");
    return 1;
  }
  if (c->kind == GITOPS_DELETE && !lg->prune) {
    push_change(L, lg, c);
    lset_string(L, "reason", "the manifest is gone; prune = false keeps the target running (set prune = true)");
    append_to(L, r, "skipped");
    return 1;
  }
  return 0;
}

/* Applies every change at once and waits for all of them. */
static void apply_changes(lua_State *L, int self, lgitops *lg, const wanted *w, const gitops_change *c, size_t n,
                          int r) {
  apply_run run = {0};
  run.items = calloc(n + 1, sizeof *run.items);
  for (size_t i = 0; run.items && i < n; i++) {
    if (held_back(L, r, lg, &c[i]))
      continue;
    apply *a = &run.items[run.n++];
    a->run = &run;
    a->change = &c[i];
    if (c[i].kind == GITOPS_DELETE)
      start_prune(L, self, lg, a);
    else
      start_rollout(L, self, lg, w, a);
  }
  run.all_done = run.pending == 0;
  lsched_block(L, &run.all_done);
  for (size_t i = 0; i < run.n; i++) {
    apply *a = &run.items[i];
    push_applied(L, a);
    append_to(L, r, "applied");
    for (int k = 0; k < a->nerrors; k++) {
      char msg[DC_ERR_MAX + 80];
      dc_fmt(msg, sizeof msg, "%s: %s", a->change->target, a->errors[k]);
      result_error(L, r, msg);
    }
    if (!a->success && a->nerrors == 0)
      result_error(L, r, a->change->target);
  }
  free(run.items);
}

/* One round of a sync: fetch, check, plan, then (maybe) apply. The changes
 * list and the SyncResult stay on the stack at changes and r. */
typedef struct sync_round {
  double t0;
  int changes, r;     /* stack indices */
  int fetch_failed;
  int invalid;        /* some manifest of the revision is invalid */
  wanted w;
  gitops_change *c;
  size_t n;
  size_t actionable;  /* changes neither pinned nor held back by prune = false */
} sync_round;

static void round_begin(lua_State *L, int self, lgitops *lg, sync_round *rd) {
  char err[DC_ERR_MAX];
  memset(rd, 0, sizeof *rd);
  rd->t0 = engine_now(lg->e);
  rd->fetch_failed = refresh(L, self, lg, err) != 0;
  lua_newtable(L);
  rd->changes = lua_gettop(L);
  rd->r = push_result(L, lg);
  if (rd->fetch_failed) {
    result_error(L, rd->r, err);
    return;
  }
  collect_wanted(L, self, &rd->w);
  if (lua_rawlen(L, rd->w.errors) > 0) {
    rd->invalid = 1;
    for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, rd->w.errors); i++) {
      lua_rawgeti(L, rd->w.errors, i);
      result_error(L, rd->r, lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    return;
  }
  if (plan(L, self, lg, &rd->w, &rd->c, &rd->n, err) != 0) {
    free(rd->w.wants);
    lerror(L, err);
  }
  push_changes(L, lg, rd->c, rd->n);
  lua_replace(L, rd->changes);
  for (size_t i = 0; i < rd->n; i++)
    rd->actionable += !rd->c[i].pinned && (rd->c[i].kind != GITOPS_DELETE || lg->prune);
}

static void round_apply(lua_State *L, int self, lgitops *lg, sync_round *rd) {
  if (!rd->fetch_failed && !rd->invalid)
    apply_changes(L, self, lg, &rd->w, rd->c, rd->n, rd->r);
}

/* Leaves exactly the changes list and the SyncResult on the stack. */
static void round_end(lua_State *L, lgitops *lg, sync_round *rd) {
  free(rd->w.wants);
  free(rd->c);
  rd->w.wants = NULL;
  rd->c = NULL;
  lua_pushnumber(L, engine_now(lg->e) - rd->t0);
  lua_setfield(L, rd->r, "duration");
  lua_settop(L, rd->r);
}

static int sync_sync(lua_State *L) {
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  sync_round rd;
  lua_settop(L, 1);
  round_begin(L, 1, lg, &rd);
  round_apply(L, 1, lg, &rd);
  round_end(L, lg, &rd);
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
    if (lg->g)
      gitops_cancel(lg->g);
  }
}

static void check_closed(uv_handle_t *h) { free(h); }

/* Sleeps `delay` on the engine clock, or until interrupted. */
static void watch_sleep(lua_State *L, lgitops *lg, double delay) {
  lg->tick_fired = 0;
  engine_timer *t = engine_timer_start(lg->e, delay, tick, lg);
  while (!lg->tick_fired && !lg->interrupted) {
    lg->wake = 0;
    lsched_block(L, &lg->wake);
  }
  if (!lg->tick_fired)
    engine_timer_cancel(t);
}

typedef struct watch_state {
  char last_revision[GITOPS_OID_HEX];
  int failures;
} watch_state;

/* Whether this round has something to tell: a fetch failure, a new
 * revision (valid or not), or drift / a failed rollout to retry. */
static int worth_reporting(const lgitops *lg, const sync_round *rd, const watch_state *ws) {
  if (rd->fetch_failed)
    return 1;
  int moved = strcmp(lg->revision, ws->last_revision) != 0;
  if (rd->invalid)
    return moved; /* the same broken revision is not retried: a new commit is needed */
  return moved || rd->actionable > 0;
}

/* One poll. Pushes (changes, result) and returns 1 when the callback is to
 * hear of it, else pushes nothing and returns 0. */
static int watch_round(lua_State *L, int self, lgitops *lg, watch_state *ws) {
  sync_round rd;
  int top = lua_gettop(L);
  round_begin(L, self, lg, &rd);
  int report = worth_reporting(lg, &rd, ws);
  if (report)
    round_apply(L, self, lg, &rd);
  round_end(L, lg, &rd);
  if (!rd.fetch_failed)
    dc_strlcpy(ws->last_revision, lg->revision, sizeof ws->last_revision);
  lua_getfield(L, -1, "success");
  int ok = lua_toboolean(L, -1);
  lua_pop(L, 1);
  ws->failures = ok || rd.invalid ? 0 : ws->failures + 1;
  if (!report)
    lua_settop(L, top);
  return report;
}

/* Failures are retried after interval, 2x, 4x, ... capped at
 * max(interval, 300 s): a broken server is not hammered, and a newer
 * commit is still picked up. */
static double next_delay(const lgitops *lg, int failures) {
  double d = lg->interval;
  for (int i = 0; i < failures && i < 30; i++)
    d *= 2;
  double cap = lg->interval > BACKOFF_CAP ? lg->interval : BACKOFF_CAP;
  return failures && d > cap ? cap : d;
}

/* Calls callback(changes, result); 1 to go on, 0 when it returned false.
 * An error in the callback is raised again, once the watch is cleaned up
 * (by the caller). */
static int call_back(lua_State *L, int fn, char *err) {
  lua_pushvalue(L, fn);
  lua_insert(L, -3);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    dc_fmt(err, DC_ERR_MAX, "deploy: watch: the callback raised: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  int go_on = !(lua_isboolean(L, -1) && !lua_toboolean(L, -1));
  lua_pop(L, 1);
  return go_on;
}

static uv_timer_t *start_interrupt_check(lgitops *lg) {
  uv_timer_t *h = malloc(sizeof *h);
  if (!h)
    return NULL;
  uv_timer_init(lg->e->loop, h);
  h->data = lg;
  uv_timer_start(h, interrupt_check, 50, 50);
  return h;
}

/* watch(callback): polls until SIGINT/SIGTERM or the callback returns
 * false. Returns "interrupted" or "stopped". */
static int sync_watch(lua_State *L) {
  lsched_check_can_wait(L);
  lgitops *lg = check_sync(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  char err[DC_ERR_MAX] = "";
  watch_state ws;
  memset(&ws, 0, sizeof ws);
  lg->interrupted = 0;
  lg->seen_interrupts = dc_interrupts;
  /* The host raises a Lua error on SIGINT unless something is waiting on
   * the loop: the watch handles the interrupt itself and ends cleanly. */
  dc_rollouts_waiting++;
  uv_timer_t *check = start_interrupt_check(lg);
  int go_on = 1;
  while (go_on == 1 && !lg->interrupted) {
    if (watch_round(L, 1, lg, &ws))
      go_on = call_back(L, 2, err);
    if (go_on == 1 && !lg->interrupted)
      watch_sleep(L, lg, next_delay(lg, ws.failures));
  }
  if (check) {
    uv_timer_stop(check);
    uv_close((uv_handle_t *)check, check_closed);
  }
  dc_rollouts_waiting--;
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
  if (strcmp(k, "repo_url") == 0 && lg->g)
    lua_pushstring(L, gitops_url(lg->g));
  else if (strcmp(k, "branch") == 0 && lg->g)
    lua_pushstring(L, gitops_branch(lg->g));
  else if (strcmp(k, "path") == 0)
    lua_pushstring(L, lg->path_given);
  else if (strcmp(k, "interval") == 0)
    lpush_number(L, lg->interval);
  else if (strcmp(k, "last_fetch") == 0 && lg->g)
    push_stats(L, gitops_last_stats(lg->g));
  else if (strcmp(k, "prune") == 0)
    lua_pushboolean(L, lg->prune);
  else if (strcmp(k, "revision") == 0 && lg->revision[0])
    lua_pushstring(L, lg->revision);
  else if (strcmp(k, "revision") == 0)
    lua_pushnil(L);
  else if (strcmp(k, "manager") == 0)
    lua_getiuservalue(L, 1, UV_MANAGER);
  else if (strcmp(k, "cache") == 0 && lg->g)
    lua_pushstring(L, gitops_cache(lg->g));
  else {
    luaL_getmetatable(L, GITOPS_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, k);
  }
  return 1;
}

static int sync_tostring(lua_State *L) {
  lgitops *lg = luaL_checkudata(L, 1, GITOPS_MT);
  lua_pushfstring(L, "GitOpsSynchronizer(%s, %s, %s)", lg->g ? gitops_url(lg->g) : "closed",
                  lg->g ? gitops_branch(lg->g) : "", lg->path_given);
  return 1;
}

static void check_options(lua_State *L) {
  static const char *const known[] = {"repo_url", "branch", "path", "manager", "interval", "prune", NULL};
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    int ok = 0;
    if (lua_type(L, -2) == LUA_TSTRING)
      for (const char *const *k = known; *k; k++)
        ok |= strcmp(*k, lua_tostring(L, -2)) == 0;
    if (!ok)
      luaL_error(L, "deploy: GitOpsSynchronizer has no option '%s' (known: repo_url, branch, path, manager, "
                    "interval, prune)", lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2));
    lua_pop(L, 1);
  }
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

/* Pushes the manager option, or a DeploymentManager{} built from
 * $DEPLOY_CONFIG / ./deploy.lua when none is given. */
static void push_manager(lua_State *L) {
  if (lua_getfield(L, 1, "manager") == LUA_TNIL) {
    lua_pop(L, 1);
    push_module_field(L, "DeploymentManager");
    lua_call(L, 0, 1);
  }
  if (!luaL_testudata(L, -1, MANAGER_MT))
    luaL_error(L, "deploy: GitOpsSynchronizer manager must be a deploy.DeploymentManager, got %s",
               luaL_typename(L, -1));
}

/* The cache lives next to the store: <dir of state.db>/git. */
static void cache_dir(lua_State *L, int mgr, char *buf, size_t size) {
  const char *state = store_path(lmanager_store(L, mgr));
  const char *slash = strrchr(state, '/');
  if (slash)
    dc_fmt(buf, size, "%.*s/git", (int)(slash - state), state);
  else
    dc_strlcpy(buf, "git", size);
}

static int sync_new(lua_State *L) {
  char err[DC_ERR_MAX], cache[1100];
  lua_settop(L, 1);
  if (!lua_istable(L, 1))
    return luaL_error(L, "deploy: GitOpsSynchronizer expects a table { repo_url = ..., branch = \"main\", "
                         "path = \"/\", manager = ... }, got %s", luaL_typename(L, 1));
  check_options(L);
  const char *url = opt_string(L, "repo_url", NULL);
  if (!url || !*url)
    return luaL_error(L, "deploy: GitOpsSynchronizer needs repo_url = \"https://host/repo.git\" "
                         "(or git://, ssh://, file://)");
  const char *branch = opt_string(L, "branch", "main");
  const char *path = opt_string(L, "path", "/");
  double interval = opt_interval(L);
  int prune = opt_prune(L);
  push_manager(L); /* 2 */
  lgitops *lg = lua_newuserdatauv(L, sizeof *lg, UV_COUNT); /* 3 */
  memset(lg, 0, sizeof *lg);
  luaL_setmetatable(L, GITOPS_MT);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, 3, UV_MANAGER);
  lg->e = lmanager_engine(L, 2);
  lg->interval = interval;
  lg->prune = prune;
  dc_strlcpy(lg->path_given, path, sizeof lg->path_given);
  cache_dir(L, 2, cache, sizeof cache);
  gitops_opts o = {.url = url, .branch = branch, .path = path, .cache_dir = cache};
  if (gitops_open(&lg->g, lg->e, &o, err) != 0)
    return lerror(L, err);
  return 1;
}

void lgitops_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"get_diff", sync_get_diff}, {"sync", sync_sync}, {"watch", sync_watch},
                                     {"close", sync_close},       {NULL, NULL}};
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, GITOPS_MODULE);
  if (luaL_newmetatable(L, GITOPS_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
    lua_pushcfunction(L, sync_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, sync_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, sync_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, sync_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, sync_new);
  lua_setfield(L, -2, "GitOpsSynchronizer");
}
