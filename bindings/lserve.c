/* deploy.Server: `deployctl serve` from Lua (runtime/serve.c). Argument
 * checks and conversion only:
 *
 *   local server = deploy.Server{ manager = m, listen = "127.0.0.1:9753",
 *     tls_cert = nil, tls_key = nil, token = os.getenv("DEPLOY_API_TOKEN"),
 *     repos = { { sync = deploy.GitOpsSynchronizer{...}, secret = "..." } },
 *     supervise = true, poll = 0.5 }
 *   server.port          -- the port it listens on (listen "...:0" picks one)
 *   server:run()         -- until SIGINT/SIGTERM or server:stop(): "interrupted" | "stopped"
 *   server:stop()        -- from an event handler or a task
 */
#include "lserve.h"

#include <stdlib.h>
#include <string.h>

#include "lgitops.h"
#include "lmanager.h"
#include "lsched.h"
#include "lutil.h"
#include "serve.h"
#include "util.h"

#define SERVER_MT "deploy.Server"

typedef struct lserver {
  serve *srv;              /* NULL once stopped */
  int manager_ref, repos_ref;
  volatile int wake;
  int stop_requested;
  int stopped;
  sig_atomic_t seen_interrupts;
  int interrupted;
  char listen[300];
} lserver;

static lserver *check_server(lua_State *L) { return luaL_checkudata(L, 1, SERVER_MT); }

static void stopped(void *payload) {
  lserver *s = payload;
  s->stopped = 1;
  s->wake = 1;
}

static void server_release(lua_State *L, lserver *s) {
  luaL_unref(L, LUA_REGISTRYINDEX, s->manager_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, s->repos_ref);
  s->manager_ref = s->repos_ref = LUA_NOREF;
}

/* __gc / close: stops without waiting (the loop closes what is left). */
static int server_close(lua_State *L) {
  lserver *s = check_server(L);
  if (s->srv) {
    serve_stop(s->srv, NULL, NULL);
    s->srv = NULL;
  }
  server_release(L, s);
  return 0;
}

static void watch_interrupts(uv_timer_t *h) {
  lserver *s = h->data;
  if (dc_interrupts != s->seen_interrupts) {
    s->interrupted = 1;
    s->wake = 1;
  }
  if (s->stop_requested)
    s->wake = 1;
}

static void timer_closed(uv_handle_t *h) { free(h); }

static int server_run(lua_State *L) {
  lsched_check_can_wait(L);
  lserver *s = check_server(L);
  if (!s->srv)
    return luaL_error(L, "deploy: this Server was stopped");
  engine *e = lengine_get(L);
  s->seen_interrupts = dc_interrupts;
  s->interrupted = 0;
  /* Interrupts end the run cleanly instead of stopping the Lua code. */
  dc_interrupt_owners++;
  uv_timer_t *check = malloc(sizeof *check);
  if (check) {
    uv_timer_init(e->loop, check);
    check->data = s;
    uv_timer_start(check, watch_interrupts, 50, 50);
  }
  s->wake = 0;
  while (!s->wake)
    lsched_block(L, &s->wake);
  s->wake = 0;
  serve_stop(s->srv, stopped, s);
  s->srv = NULL;
  while (!s->stopped)
    lsched_block(L, &s->wake);
  if (check) {
    uv_timer_stop(check);
    uv_close((uv_handle_t *)check, timer_closed);
  }
  dc_interrupt_owners--;
  server_release(L, s);
  lua_pushstring(L, s->interrupted ? "interrupted" : "stopped");
  return 1;
}

static int server_stop(lua_State *L) {
  lserver *s = check_server(L);
  s->stop_requested = 1;
  s->wake = 1;
  return 0;
}

static int server_index(lua_State *L) {
  lserver *s = check_server(L);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "port") == 0) {
    if (!s->srv)
      return 0;
    lua_pushinteger(L, serve_port(s->srv));
    return 1;
  }
  if (strcmp(k, "listen") == 0) {
    lua_pushstring(L, s->listen);
    return 1;
  }
  luaL_getmetatable(L, SERVER_MT);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

/* "ADDR:PORT" or "[V6]:PORT" -> host, port. */
static void parse_listen(lua_State *L, const char *listen, char *host, size_t size, int *port) {
  const char *colon;
  if (listen[0] == '[') {
    const char *close = strchr(listen, ']');
    if (!close || close[1] != ':')
      luaL_error(L, "deploy: Server listen '%s' is not [IPV6]:PORT (e.g. [::1]:9753)", listen);
    dc_fmt(host, size, "%.*s", (int)(close - listen - 1), listen + 1);
    colon = close + 1;
  } else {
    colon = strrchr(listen, ':');
    if (!colon || colon == listen)
      luaL_error(L, "deploy: Server listen '%s' is not ADDRESS:PORT (e.g. 127.0.0.1:9753)", listen);
    dc_fmt(host, size, "%.*s", (int)(colon - listen), listen);
  }
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (!colon[1] || *end || p < 0 || p > 65535)
    luaL_error(L, "deploy: Server listen '%s': the port must be a number from 0 to 65535", listen);
  *port = (int)p;
}

static const char *opt_str(lua_State *L, const char *k, const char *def) {
  int t = lua_getfield(L, 1, k);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return def;
  }
  if (t != LUA_TSTRING)
    luaL_error(L, "deploy: Server %s must be a string, got %s", k, luaL_typename(L, -1));
  const char *v = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the options table */
  return v;
}

static int server_new(lua_State *L) {
  char err[DC_ERR_MAX], host[256];
  lsched_check_can_wait(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  static const char *const known[] = {"manager", "listen", "tls_cert", "tls_key", "token", "repos",
                                      "supervise", "poll", "version", NULL};
  lcheck_keys(L, 1, known, "deploy: Server has no option '%s' (known: %s)");
  if (lua_getfield(L, 1, "manager") == LUA_TNIL) /* 2 */
    return luaL_error(L, "deploy: Server needs manager = deploy.DeploymentManager{...}");
  service *svc = lmanager_service(L, 2);
  const char *listen = opt_str(L, "listen", "127.0.0.1:9753");
  int port;
  parse_listen(L, listen, host, sizeof host, &port);
  serve_opts o = {.host = host, .port = port, .tls_cert = opt_str(L, "tls_cert", NULL),
                  .tls_key = opt_str(L, "tls_key", NULL), .token = opt_str(L, "token", NULL),
                  .version = opt_str(L, "version", NULL), .supervise = 1, .max_body = SERVE_MAX_BODY};
  /* supervise: true, false, or { interval, limit, window, backoff_max }
   * (config.serve.supervise, checked by the config) */
  int st = lua_getfield(L, 1, "supervise");
  if (st == LUA_TBOOLEAN) {
    o.supervise = lua_toboolean(L, -1);
  } else if (st == LUA_TTABLE) {
    static const char *const sup_known[] = {"interval", "limit", "window", "backoff_max", NULL};
    lcheck_keys(L, lua_gettop(L), sup_known, "deploy: Server supervise has no option '%s' (known: %s)");
    lua_getfield(L, -1, "interval");
    o.supervision.interval = lua_tonumber(L, -1);
    lua_getfield(L, -2, "limit");
    o.supervision.max_restarts = (int)lua_tointeger(L, -1);
    lua_getfield(L, -3, "window");
    o.supervision.window = lua_tonumber(L, -1);
    lua_getfield(L, -4, "backoff_max");
    o.supervision.backoff_max = lua_tonumber(L, -1);
    lua_pop(L, 4);
  } else if (st != LUA_TNIL) {
    return luaL_error(L, "deploy: Server supervise must be true, false or a table, got %s", luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "poll") != LUA_TNIL) {
    o.poll = lua_tonumber(L, -1);
    if (!lua_isnumber(L, -1) || !(o.poll >= 0.05 && o.poll <= 60))
      return luaL_error(L, "deploy: Server poll must be a number of seconds from 0.05 to 60");
  }
  lua_pop(L, 1);
  /* repos: { { sync = GitOpsSynchronizer, secret = "..." }, ... } */
  int t = lua_getfield(L, 1, "repos"); /* 3 */
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
  } else if (t != LUA_TTABLE) {
    return luaL_error(L, "deploy: Server repos must be a list of { sync = GitOpsSynchronizer, secret = ... }");
  }
  size_t n = lua_rawlen(L, 3);
  serve_repo *repos = lua_newuserdatauv(L, (n + 1) * sizeof *repos, 0); /* 4: freed with the stack */
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 3, (lua_Integer)i + 1);
    if (!lua_istable(L, -1))
      return luaL_error(L, "deploy: Server repos[%d] must be a table { sync = ..., secret = ... }", (int)i + 1);
    lua_getfield(L, -1, "sync");
    repos[i].gs = lgitops_gitsync(L, lua_gettop(L));
    lua_pop(L, 1);
    if (lua_getfield(L, -1, "secret") != LUA_TNIL && !lua_isstring(L, -1))
      return luaL_error(L, "deploy: Server repos[%d].secret must be a string", (int)i + 1);
    repos[i].secret = lua_tostring(L, -1);
    lua_pop(L, 2);
  }
  o.repos = repos;
  o.nrepos = n;
  lserver *s = lua_newuserdatauv(L, sizeof *s, 0); /* 5 */
  memset(s, 0, sizeof *s);
  s->manager_ref = s->repos_ref = LUA_NOREF;
  luaL_setmetatable(L, SERVER_MT);
  dc_strlcpy(s->listen, listen, sizeof s->listen);
  if (serve_start(&s->srv, svc, &o, err) != DC_OK)
    return lerror(L, err);
  /* The manager and the synchronizers live as long as the server. */
  lua_pushvalue(L, 2);
  s->manager_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 3);
  s->repos_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

void lserve_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"run", server_run}, {"stop", server_stop}, {"close", server_close},
                                     {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__index", server_index}, {"__gc", server_close}, {"__close", server_close},
                                  {NULL, NULL}};
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, server_new);
  lua_setfield(L, -2, "Server");
}
