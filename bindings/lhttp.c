/* deploy.http.request{ method, url, headers, body, timeout, max_body }: an
 * HTTP request on the engine's libcurl multi (runtime/httpreq.h) that
 * waits the way every deploy wait does: inside a task (a hook, a Lua
 * strategy, deploy.parallel) it yields, so other rollouts go on meanwhile;
 * outside one it runs the loop until the answer comes. Misuse raises; a
 * failure of the world returns nil, message, kind. */
#include "lhttp.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "httpreq.h"
#include "lsched.h"
#include "lutil.h"
#include "util.h"

#define REQUEST_MT "deploy.HttpRequest"

/* The wait, a userdata on the waiting thread's stack across the yield. */
typedef struct lrequest {
  int done;
  ltask *task;
  httpreq *req;            /* in flight; NULL once answered or cancelled */
  httpreq_error error;
  long status;
  double duration;
  char *message;           /* heap */
  char *body;              /* heap */
  size_t body_len;
  char **headers;          /* name, value, name, value, ...; heap */
  size_t nheaders;
  char shown[512];         /* method and redacted URL, for messages */
} lrequest;

static void answer_free(lrequest *w) {
  free(w->message);
  free(w->body);
  for (size_t i = 0; i < 2 * w->nheaders; i++)
    free(w->headers[i]);
  free(w->headers);
  w->message = w->body = NULL;
  w->headers = NULL;
  w->nheaders = 0;
}

/* A task cancelled while it waited, then collected: the request must not
 * call back into freed memory. */
static int request_gc(lua_State *L) {
  lrequest *w = luaL_checkudata(L, 1, REQUEST_MT);
  httpreq_cancel(w->req);
  w->req = NULL;
  answer_free(w);
  return 0;
}

static void on_cancel(void *payload) {
  lrequest *w = payload;
  httpreq_cancel(w->req);
  w->req = NULL;
}

static void answered(void *payload, const httpreq_response *res) {
  lrequest *w = payload;
  int oom = 0;
  w->req = NULL;
  w->error = res->error;
  w->status = res->status;
  w->duration = res->duration;
  if (res->message)
    oom |= !(w->message = strdup(res->message));
  if (res->error == HTTPREQ_OK) {
    oom |= !(w->body = malloc(res->body_len + 1));
    if (w->body) {
      memcpy(w->body, res->body, res->body_len);
      w->body[res->body_len] = '\0';
      w->body_len = res->body_len;
    }
    w->headers = calloc(2 * res->nheaders + 1, sizeof *w->headers);
    oom |= !w->headers;
    for (size_t i = 0; w->headers && i < res->nheaders; i++) {
      w->headers[2 * i] = strdup(res->headers[i].name);
      w->headers[2 * i + 1] = strdup(res->headers[i].value);
      w->nheaders = i + 1;
      oom |= !w->headers[2 * i] || !w->headers[2 * i + 1];
    }
  }
  if (oom) {
    answer_free(w);
    w->error = HTTPREQ_FAILED;
  }
  w->done = 1;
  if (w->task)
    lsched_ready(w->task);
}

/* A header seen twice is one field, its values joined by ", " (RFC 9110). */
static void push_headers(lua_State *L, const lrequest *w) {
  lua_createtable(L, 0, (int)w->nheaders);
  for (size_t i = 0; i < w->nheaders; i++) {
    const char *name = w->headers[2 * i], *value = w->headers[2 * i + 1];
    if (lua_getfield(L, -1, name) == LUA_TSTRING) {
      lua_pushliteral(L, ", ");
      lua_pushstring(L, value);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushstring(L, value);
    }
    lua_setfield(L, -2, name);
  }
}

static int request_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lrequest *w = (lrequest *)ctx;
  if (w->error != HTTPREQ_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "deploy.http.request: %s: %s", w->shown,
                    w->message ? w->message : "out of memory reading the answer");
    lua_pushstring(L, httpreq_error_name(w->error));
    answer_free(w);
    return 3;
  }
  lua_createtable(L, 0, 4);
  lset_integer(L, "status", w->status);
  push_headers(L, w);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, w->body ? w->body : "", w->body_len);
  lua_setfield(L, -2, "body");
  lset_number(L, "duration", w->duration);
  answer_free(w);
  return 1;
}

/* ---- the arguments ---- */

typedef struct req_args {
  char method[24];
  const char *url;
  httpreq_header headers[HTTPREQ_MAX_HEADERS];
  size_t nheaders;
  int has_type;
  const char *body;
  size_t body_len;
  double timeout;
  size_t max_body;
} req_args;

/* The header strings are kept alive by a table of our own on the stack
 * (a number's text would otherwise live nowhere). */
static void read_headers(lua_State *L, req_args *a) {
  if (lua_getfield(L, 1, "headers") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "deploy.http.request: headers must be a table of name = value strings, got %s",
               luaL_typename(L, -1));
  int t = lua_gettop(L);
  lua_newtable(L);
  int keep = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_type(L, -2) != LUA_TSTRING || (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
      luaL_error(L, "deploy.http.request: headers must map names to strings, e.g. { [\"X-Token\"] = \"...\" }, "
                    "got %s = %s", luaL_typename(L, -2), luaL_typename(L, -1));
    if (a->nheaders == HTTPREQ_MAX_HEADERS)
      luaL_error(L, "deploy.http.request: more than %d headers", HTTPREQ_MAX_HEADERS);
    lua_pushvalue(L, -2);
    lua_rawseti(L, keep, (lua_Integer)(2 * a->nheaders + 1));
    lua_pushstring(L, lua_tostring(L, -1)); /* a copy: converting the value in place would confuse lua_next */
    lua_rawseti(L, keep, (lua_Integer)(2 * a->nheaders + 2));
    lua_pop(L, 1);
    lua_rawgeti(L, keep, (lua_Integer)(2 * a->nheaders + 1));
    lua_rawgeti(L, keep, (lua_Integer)(2 * a->nheaders + 2));
    a->headers[a->nheaders].name = lua_tostring(L, -2);
    a->headers[a->nheaders].value = lua_tostring(L, -1);
    lua_pop(L, 2);
    if (strcasecmp(a->headers[a->nheaders].name, "content-type") == 0)
      a->has_type = 1;
    a->nheaders++;
  }
}

/* body: a string as is, or a table sent as JSON (Content-Type set unless
 * the headers name one). */
static void read_body(lua_State *L, req_args *a) {
  int t = lua_getfield(L, 1, "body");
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (t == LUA_TTABLE) {
    char *json = ljson_encode(L, lua_gettop(L), "deploy.http.request: body", HTTPREQ_MAX_BODY_LIMIT);
    lua_pushstring(L, json ? json : "null");
    free(json);
    if (!a->has_type && a->nheaders < HTTPREQ_MAX_HEADERS)
      a->headers[a->nheaders++] = (httpreq_header){"Content-Type", "application/json"};
  } else if (t != LUA_TSTRING) {
    luaL_error(L, "deploy.http.request: body must be a string (or a table, sent as JSON), got %s",
               luaL_typename(L, -1));
  }
  a->body = lua_tolstring(L, -1, &a->body_len); /* stays on the stack */
}

static double read_number(lua_State *L, const char *field, double def, double lo, double hi, const char *unit) {
  int t = lua_getfield(L, 1, field);
  double v = def;
  if (t == LUA_TNUMBER)
    v = lua_tonumber(L, -1);
  else if (t != LUA_TNIL)
    luaL_error(L, "deploy.http.request: %s must be a number of %s, got %s", field, unit, luaL_typename(L, -1));
  lua_pop(L, 1);
  if (!(v >= lo && v <= hi)) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy.http.request: %s must be between %.15g and %.15g %s, got %.15g", field, lo, hi, unit,
           v);
    lerror(L, msg);
  }
  return v;
}

static void read_args(lua_State *L, req_args *a) {
  static const char *const allowed[] = {"method", "url", "headers", "body", "timeout", "max_body", NULL};
  if (!lua_istable(L, 1))
    luaL_error(L, "deploy.http.request expects a table { url = ..., method = ..., headers = ..., body = ..., "
                  "timeout = ... }, got %s", luaL_typename(L, 1));
  lcheck_keys(L, 1, allowed, "deploy.http.request: unknown option '%s' (known: %s)");
  if (lua_getfield(L, 1, "url") != LUA_TSTRING)
    luaL_error(L, "deploy.http.request: url must be a string such as \"http://127.0.0.1:8080/hook\", got %s",
               luaL_typename(L, -1));
  size_t len;
  a->url = lua_tolstring(L, -1, &len);
  if (strlen(a->url) != len)
    luaL_error(L, "deploy.http.request: url holds a NUL byte");
  read_headers(L, a);
  read_body(L, a);
  int t = lua_getfield(L, 1, "method");
  if (t == LUA_TNIL) {
    dc_strlcpy(a->method, a->body ? "POST" : "GET", sizeof a->method);
  } else if (t == LUA_TSTRING && lua_rawlen(L, -1) < sizeof a->method) {
    dc_strlcpy(a->method, lua_tostring(L, -1), sizeof a->method);
    for (char *c = a->method; *c; c++)
      *c = (char)toupper((unsigned char)*c);
  } else {
    luaL_error(L, "deploy.http.request: method must be a string such as \"GET\" or \"POST\", got %s",
               t == LUA_TSTRING ? "a long string" : luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  a->timeout = read_number(L, "timeout", HTTPREQ_DEFAULT_TIMEOUT, 0.001, HTTPREQ_MAX_TIMEOUT, "seconds");
  double max = read_number(L, "max_body", HTTPREQ_DEFAULT_MAX_BODY, 1, HTTPREQ_MAX_BODY_LIMIT, "bytes");
  if (max != (double)(size_t)max) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy.http.request: max_body must be a whole number of bytes, got %g", max);
    lerror(L, msg);
  }
  a->max_body = (size_t)max;
}

/* The runtime's "http: " prefix: this message says where it comes from. */
static const char *unprefixed(const char *msg) {
  msg = dc_unprefix(msg);
  return strncmp(msg, "http: ", 6) == 0 ? msg + 6 : msg;
}

static int http_request(lua_State *L) {
  lsched_check_can_wait(L);
  lua_settop(L, 1);
  req_args a;
  memset(&a, 0, sizeof a);
  read_args(L, &a); /* raises: before anything starts */
  lrequest *w = lua_newuserdatauv(L, sizeof *w, 0);
  memset(w, 0, sizeof *w);
  luaL_setmetatable(L, REQUEST_MT);
  char url[480], err[DC_ERR_MAX];
  dc_redact_url(url, sizeof url, a.url);
  dc_fmt(w->shown, sizeof w->shown, "%s %s", a.method, url);
  dc_redact(w->shown);
  httpreq_opts o = {.method = a.method, .url = a.url, .headers = a.headers, .nheaders = a.nheaders,
                    .body = a.body, .body_len = a.body_len, .timeout = a.timeout, .max_body = a.max_body};
  w->task = lsched_current(L);
  int rc = httpreq_start(&w->req, lengine_get(L), &o, answered, w, err);
  if (rc == HTTPREQ_BAD_REQUEST) {
    dc_redact(err);
    return luaL_error(L, "deploy.http.request: %s", unprefixed(err));
  }
  if (rc != 0) {
    dc_redact(err);
    lua_pushnil(L);
    lua_pushfstring(L, "deploy.http.request: %s", unprefixed(err));
    lua_pushstring(L, httpreq_error_name((httpreq_error)rc));
    return 3;
  }
  if (w->task)
    lsched_on_cancel(w->task, on_cancel, w);
  return lsched_await(L, &w->done, (lua_KContext)w, request_k);
}

void lhttp_register(lua_State *L) {
  static const luaL_Reg functions[] = {{"request", http_request}, {NULL, NULL}};
  if (luaL_newmetatable(L, REQUEST_MT)) {
    lua_pushcfunction(L, request_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, functions);
  lua_setfield(L, -2, "http");
}
