/* Routers split a target's traffic between instance sets. A router is
 * declarative: router->apply makes the proxy serve exactly the plan's
 * servers with the plan's weights and routes, and nothing else of ours:
 *   1. servers missing from the proxy are added (in maintenance), their
 *      address set, then enabled;
 *   2. weights that go up are set before weights that go down, so no moment
 *      has every server at weight 0;
 *   3. the routes beyond weights (routes.h: sticky cookies, testers'
 *      header or cookie, maintenance) are set to what the plan says, and
 *      any route of ours the plan no longer names is taken away;
 *   4. servers of ours that the list no longer names are retired without a
 *      failed request: weight 0, state drain, wait until they have no
 *      session left (up to drain_timeout), state maint, del server (retried
 *      while connections are still attached).
 * Because every apply compares with what the proxy has now, a proxy that
 * was restarted and forgot our servers gets them back on the next apply.
 * Those are HAProxy's steps (haproxy.c); nginx.c reaches the same end by
 * rewriting the include it owns and reloading nginx, whose graceful
 * reload is the drain. router_group.c is several routers as one: a plan
 * goes to all of them at once.
 *
 * The interface follows libgit2's sys/odb_backend.h: a versioned struct of
 * function pointers, `free` required. Version 2: apply takes a plan
 * (servers, routes, all_or_nothing), servers say which are fresh, and a
 * router has a label and says whether it can route beyond weights. */
#ifndef DEPLOY_ROUTER_H
#define DEPLOY_ROUTER_H

#include <stddef.h>
#include "engine.h"
#include "routes.h"

#define ROUTER_VERSION 2

typedef struct router_server {
  char name[64];     /* e.g. "dc_12": the router only ever touches names with its prefix */
  char host[64];
  int port;
  int weight;        /* 0..256 */
  int fresh;         /* an instance of the version being rolled out: testers'
                      * requests and sticky clients are sent to these */
} router_server;

/* What apply makes the proxy serve. */
typedef struct router_plan {
  const router_server *servers;
  size_t n;
  route_rules routes;  /* zeroed: weights only (every route of ours off) */
  /* Several routers (router_group.c): when the plan fails on one, every
   * router is set back to what it served before, and apply fails naming
   * the router. 0: each router gets as far as it can (a retreat to the
   * old version, a repair). A single router ignores it. */
  int all_or_nothing;
} router_plan;
/* One server's counters as the proxy keeps them (HAProxy's `show stat`,
 * notes/haproxy.md). Counts only grow: analysis takes the difference of
 * two reads. */
typedef struct router_stat {
  char name[64];
  double hrsp[6];    /* responses 1xx, 2xx, 3xx, 4xx, 5xx, other */
  double eresp;      /* response errors (the server closed, a bad answer) */
  double econ;       /* connection errors */
  double rtime;      /* ms: average response time over its last 1024 requests */
} router_stat;

/* err is NULL on success, else the reason (valid during the callback). */
typedef void (*router_cb)(void *payload, const char *err);

typedef struct router router;
struct router {
  int version;
  const char *kind;  /* "haproxy", "nginx", "none", "group" */
  /* For messages: the kind and where it is, e.g. "haproxy
   * /run/haproxy/admin.sock (backend app)"; valid while the router is. */
  const char *label;
  /* The router cannot weigh servers (router none): a canary's share then
   * follows the instance ratio. */
  int ratio_only;
  /* The router carries out plan->routes (sticky cookies, testers' routes,
   * maintenance); one that cannot refuses a plan that asks for them. */
  int can_route;
  /* Asynchronous; cb runs exactly once, from the loop. Returns -1 with err
   * filled only for an immediate refusal (then cb does not run). The plan
   * is copied: the caller may free it once apply returns. */
  int (*apply)(router *r, const router_plan *plan, router_cb cb,
               void *payload, char *err);
  /* Live view of what the proxy serves (for status): fills up to cap
   * entries of ours and *n; weights as read back from the proxy. cb style,
   * asynchronous. */
  int (*read)(router *r, router_server *out, size_t cap, size_t *n,
              router_cb cb, void *payload, char *err);
  void (*free)(router *r);
  /* Optional (NULL: the proxy keeps no per-server counters, as nginx
   * without modules): the counters of our servers, up to cap entries, as
   * read; asynchronous like read. */
  int (*stats)(router *r, router_stat *out, size_t cap, size_t *n,
               router_cb cb, void *payload, char *err);
};

typedef struct ssh_ctx ssh_ctx;

typedef struct router_haproxy_opts {
  const char *socket;        /* the `stats socket ... level admin`: a path of this machine,
                                tcp://ADDR:PORT, or ssh://HOST/path (a path on HOST) */
  ssh_ctx *ssh;              /* for ssh://: the connections to use (must outlive the router) */
  const char *backend;       /* backend declared with balance roundrobin */
  const char *prefix;        /* server-name prefix we own; default "dc_" */
  double timeout;            /* per command, seconds; default 5 */
  double drain_timeout;      /* seconds to wait for sessions to end; default 30 */
  const char *map;           /* the map file haproxy.cfg loads for deployctl's
                              * routes (README), as HAProxy names it; NULL:
                              * weights only */
} router_haproxy_opts;

/* -1 with err naming the router when its version or shape is wrong. */
int router_check(const router *r, char *err);

/* -1 with err naming the router when plan->routes ask for what it cannot
 * do (a router that cannot route). */
int router_check_plan(const router *r, const router_plan *plan, char *err);

/* Creates the router; does not connect yet. */
int router_haproxy_new(router **out, engine *e, const router_haproxy_opts *o,
                       char *err);
typedef struct router_nginx_opts {
  const char *include;       /* absolute path of the file the router owns,
                              * included at http level of conf */
  const char *upstream;      /* the upstream that file declares */
  const char *conf;          /* absolute path of the main nginx.conf */
  const char *pid;           /* absolute path of its 'pid' file */
  const char *nginx;         /* binary; default "/usr/sbin/nginx" */
  double timeout;            /* nginx -T, then the reload's confirmation,
                              * seconds each; default 10 */
  double drain_timeout;      /* seconds to wait for the old workers to
                              * finish their requests when servers leave;
                              * default 30 */
} router_nginx_opts;

/* Creates the router (nginx.c); touches no file and no process yet. */
int router_nginx_new(router **out, engine *e, const router_nginx_opts *o,
                     char *err);
/* Several routers as one (router_group.c), taking ownership of members
 * [0..n) (n >= 2, each can weigh servers): apply runs on all of them at
 * once and fails naming each router that failed; read reads all of them
 * and returns the first one's servers, failing naming each router that
 * could not be read. The members stay usable, for a view of each, until
 * the group is freed (which frees them). */
int router_group_new(router **out, engine *e, router **members, size_t n, char *err);

/* Traffic needs no split (a single instance set, or the split follows the
 * instance ratio): apply succeeds at once. */
int router_none_new(router **out, engine *e, char *err);

/* The test router (test_router.c): weighs servers and records every
 * apply, touching no proxy. For users' specs and --simulate. */
typedef struct router_test_apply {
  double at;                 /* engine clock */
  router_server *servers;
  size_t n;
} router_test_apply;

int router_test_new(router **out, engine *e, char *err);
/* What a test router was asked to serve, oldest first (valid until the
 * next apply or free). -1 when r is not a test router. */
int router_test_log(const router *r, const router_test_apply **log, size_t *n);

/* The exact split of notes/haproxy.md: share pct (0..100) to n_new servers
 * and the rest to n_old, equal weights inside a group, each weight 0..256.
 * pct 0: new weights 0; pct 100: old weights 0; otherwise both >= 1. */
void router_split_weights(double pct, int n_old, int n_new, int *w_old,
                          int *w_new);

#ifdef DEPLOY_FUZZ
/* Only in the fuzzing build (cmake -DDEPLOY_FUZZ=ON, fuzz/haproxy.c): the
 * router's readers of HAProxy's answers, run on given text instead of a
 * socket. The "show servers state" answer is planned against want as an
 * apply plans it (each step handed to step), the "show stat" answer is
 * read as the drain step reads it, and the third answer is checked as a
 * command's answer is. Answers are modified in place, as the router does.
 * Returns -1 with err when want or the state answer is refused, else 0. */
typedef struct haproxy_fuzz_result {
  size_t nlive;          /* our servers in the state answer */
  size_t nsteps;         /* steps of the plan */
  long busy;             /* sessions on the servers retired; -1 refused, -2 no drain */
  int ok_empty, ok_add, ok_addr;  /* the third answer as each kind of success */
  int stats_rc;          /* the second answer read as analysis reads it: 0, or -1 refused */
  size_t nstats;         /* our servers' rows in it */
  router_stat stats[16];
} haproxy_fuzz_result;
typedef void (*haproxy_fuzz_step_cb)(void *payload, const char *server, const char *command);
int haproxy_fuzz_answers(const char *backend, const char *prefix, const router_server *want, size_t nwant,
                         char *state, char *stat, char *answer, haproxy_fuzz_step_cb step, void *payload,
                         haproxy_fuzz_result *out, char *err);
/* The nginx router's readers (runtime/nginx.c): its include file as
 * read() and apply read it back (0 with the servers, which the caller
 * frees, when it is exactly what the router writes; -1 with err), and
 * the one-line summary of nginx -T's stderr that errors quote. */
int nginx_fuzz_include(const char *upstream, const char *sock, const char *text, size_t len,
                       router_server **out, size_t *nout, char *err);
void nginx_fuzz_message(const char *text, char *out, size_t size);
#endif

#endif
