#include "lwebhook.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lutil.h"
#include "util.h"

/* The list at idx: a sequence of tables and nothing else. Returns its length. */
static lua_Integer check_list(lua_State *L, int idx, const char *what, const char *example) {
  char msg[DC_ERR_MAX];
  if (!lua_istable(L, idx)) {
    dc_fmt(msg, sizeof msg, "%s must be a list of tables such as %s, got %s", what, example, luaL_typename(L, idx));
    lerror(L, msg);
  }
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx), keys = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    keys++;
    lua_pop(L, 1);
  }
  if (keys != n) {
    dc_fmt(msg, sizeof msg, "%s must be a list (entries 1..n, no other keys) such as %s", what, example);
    lerror(L, msg);
  }
  return n;
}

/* Field k of the entry at idx: a string (NULL when absent), raising after
 * clear(owner) when it is anything else. */
typedef void (*clear_fn)(void *owner);

static int raise_entry(lua_State *L, const char *what, lua_Integer i, const char *field, const char *text,
                       clear_fn clear, void *owner) {
  char msg[DC_ERR_MAX];
  clear(owner);
  dc_fmt(msg, sizeof msg, "%s[%lld]%s%s %s", what, (long long)i, field[0] ? "." : "", field, text);
  return lerror(L, msg);
}

static const char *str(lua_State *L, int idx, const char *k, const char *what, lua_Integer i, clear_fn clear,
                       void *owner) {
  int t = lua_getfield(L, idx, k);
  lua_pop(L, 1); /* the string stays alive in the entry */
  if (t == LUA_TNIL)
    return NULL;
  if (t != LUA_TSTRING) {
    char text[128];
    dc_fmt(text, sizeof text, "must be a string, got %s", lua_typename(L, t));
    raise_entry(L, what, i, k, text, clear, owner);
  }
  lua_getfield(L, idx, k);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  lua_pop(L, 1);
  if (strlen(s) != len)
    raise_entry(L, what, i, k, "holds a NUL byte", clear, owner);
  return s;
}

static double num(lua_State *L, int idx, const char *k, const char *what, lua_Integer i, clear_fn clear,
                  void *owner) {
  int t = lua_getfield(L, idx, k);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (t == LUA_TNIL)
    return NAN;
  if (t != LUA_TNUMBER) {
    char text[128];
    dc_fmt(text, sizeof text, "must be a number, got %s", lua_typename(L, t));
    raise_entry(L, what, i, k, text, clear, owner);
  }
  if (isnan(v))
    raise_entry(L, what, i, k, "must be a number, got NaN", clear, owner);
  return v;
}

static void check_entry(lua_State *L, int idx, const char *what, lua_Integer i, const char *const *allowed,
                        const char *example, clear_fn clear, void *owner) {
  char text[DC_ERR_MAX], known[256] = "";
  if (!lua_istable(L, idx)) {
    dc_fmt(text, sizeof text, "must be a table such as %s, got %s", example, luaL_typename(L, idx));
    raise_entry(L, what, i, "", text, clear, owner);
  }
  for (const char *const *a = allowed; *a; a++)
    dc_fmt(known + strlen(known), sizeof known - strlen(known), "%s%s", a == allowed ? "" : ", ", *a);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int ok = lua_type(L, -2) == LUA_TSTRING;
    for (const char *const *a = allowed; ok && *a; a++)
      if (strcmp(*a, lua_tostring(L, -2)) == 0)
        ok = 2;
    if (ok != 2) {
      dc_fmt(text, sizeof text, "has an unknown field '%s' (known: %s)",
             lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2), known);
      raise_entry(L, what, i, "", text, clear, owner);
    }
    lua_pop(L, 1);
  }
}

static void clear_webhooks(void *owner) { webhook_list_clear(owner); }
static void clear_notify(void *owner) { notify_list_clear(owner); }

#define WEBHOOK_EXAMPLE "{ name = \"qa-gate\", type = \"confirm-promotion\", url = \"https://ci.example/gate\" }"
#define NOTIFY_EXAMPLE "{ url = \"${SLACK_WEBHOOK_URL}\", format = \"slack\", severity = \"warning\" }"

void lwebhook_read(lua_State *L, int idx, const char *what, webhook_list *out) {
  static const char *const allowed[] = {"name", "type", "url", "secret", "timeout", "retries", "interval", NULL};
  idx = lua_absindex(L, idx);
  lua_Integer n = check_list(L, idx, what, "{ " WEBHOOK_EXAMPLE " }");
  for (lua_Integer i = 1; i <= n; i++) {
    char field[64], err[DC_ERR_MAX];
    lua_rawgeti(L, idx, i);
    int e = lua_gettop(L);
    check_entry(L, e, what, i, allowed, WEBHOOK_EXAMPLE, clear_webhooks, out);
    webhook_spec s = {.name = str(L, e, "name", what, i, clear_webhooks, out),
                      .type = str(L, e, "type", what, i, clear_webhooks, out),
                      .url = str(L, e, "url", what, i, clear_webhooks, out),
                      .secret = str(L, e, "secret", what, i, clear_webhooks, out),
                      .timeout = num(L, e, "timeout", what, i, clear_webhooks, out),
                      .retries = num(L, e, "retries", what, i, clear_webhooks, out),
                      .interval = num(L, e, "interval", what, i, clear_webhooks, out)};
    if (webhook_add(out, &s, WEBHOOK_TRUSTED, field, sizeof field, err) != 0)
      raise_entry(L, what, i, field, err, clear_webhooks, out);
    lua_pop(L, 1);
  }
}

void lnotify_read(lua_State *L, int idx, const char *what, notify_list *out) {
  static const char *const allowed[] = {"url", "format", "severity", "secret", "timeout", "retries", NULL};
  idx = lua_absindex(L, idx);
  lua_Integer n = check_list(L, idx, what, "{ " NOTIFY_EXAMPLE " }");
  for (lua_Integer i = 1; i <= n; i++) {
    char field[64], err[DC_ERR_MAX];
    lua_rawgeti(L, idx, i);
    int e = lua_gettop(L);
    check_entry(L, e, what, i, allowed, NOTIFY_EXAMPLE, clear_notify, out);
    notify_spec s = {.url = str(L, e, "url", what, i, clear_notify, out),
                     .format = str(L, e, "format", what, i, clear_notify, out),
                     .severity = str(L, e, "severity", what, i, clear_notify, out),
                     .secret = str(L, e, "secret", what, i, clear_notify, out),
                     .timeout = num(L, e, "timeout", what, i, clear_notify, out),
                     .retries = num(L, e, "retries", what, i, clear_notify, out)};
    if (notify_add(out, &s, field, sizeof field, err) != 0)
      raise_entry(L, what, i, field, err, clear_notify, out);
    lua_pop(L, 1);
  }
}
