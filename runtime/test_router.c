/* The test router: serves nothing, records every apply (the servers and
 * their weights, at the engine's time) so that a spec, or --simulate,
 * reads the traffic split of each step. It weighs servers like HAProxy
 * does (not ratio_only), so a canary's shares are the same as behind a
 * real proxy, and takes the routes of a plan (it records only weights). Answers come from the loop, never from inside a call. */
#include <stdlib.h>
#include <string.h>

#include "router.h"
#include "util.h"

typedef struct test_router {
  router base;                  /* first: a router * is a test_router * */
  engine *e;
  router_test_apply *log;
  size_t n, cap;
  int closed;
  int pending;                  /* answers queued: the memory goes after the last */
} test_router;

typedef struct tr_answer {
  test_router *tr;
  router_cb cb;
  void *payload;
  router_server *out;           /* read: copy the servers now served here */
  size_t cap, *nout;
} tr_answer;

static void tr_destroy(test_router *tr) {
  for (size_t i = 0; i < tr->n; i++)
    free(tr->log[i].servers);
  free(tr->log);
  free(tr);
}

static void tr_answer_now(void *payload) {
  tr_answer *a = payload;
  test_router *tr = a->tr;
  tr->pending--;
  if (tr->closed) {
    a->cb(a->payload, "router: closed before it answered");
  } else {
    if (a->nout) {
      const router_test_apply *last = tr->n ? &tr->log[tr->n - 1] : NULL;
      size_t k = 0;
      for (; last && k < last->n && k < a->cap; k++)
        a->out[k] = last->servers[k];
      *a->nout = k;
    }
    a->cb(a->payload, NULL);
  }
  if (tr->closed && tr->pending == 0)
    tr_destroy(tr);
  free(a);
}

static int tr_queue(test_router *tr, router_cb cb, void *payload, router_server *out, size_t cap, size_t *n,
                    char *err) {
  tr_answer *a = calloc(1, sizeof *a);
  if (!a || engine_soon(tr->e, tr_answer_now, a) != 0) {
    free(a);
    dc_fmt(err, DC_ERR_MAX, "router: out of memory");
    return DC_ERROR;
  }
  a->tr = tr;
  a->cb = cb;
  a->payload = payload;
  a->out = out;
  a->cap = cap;
  a->nout = n;
  tr->pending++;
  return DC_OK;
}

static int tr_apply(router *r, const router_plan *plan, router_cb cb, void *payload, char *err) {
  test_router *tr = (test_router *)r;
  const router_server *servers = plan->servers;
  size_t n = plan->n;
  if (tr->closed) {
    dc_fmt(err, DC_ERR_MAX, "router: used after free");
    return DC_ERROR;
  }
  if (tr->n == tr->cap) {
    size_t cap = tr->cap ? tr->cap * 2 : 16;
    router_test_apply *log = realloc(tr->log, cap * sizeof *log);
    if (!log) {
      dc_fmt(err, DC_ERR_MAX, "router: out of memory");
      return DC_ERROR;
    }
    tr->log = log;
    tr->cap = cap;
  }
  router_server *copy = calloc(n ? n : 1, sizeof *copy);
  if (!copy) {
    dc_fmt(err, DC_ERR_MAX, "router: out of memory");
    return DC_ERROR;
  }
  if (n)
    memcpy(copy, servers, n * sizeof *copy);
  if (tr_queue(tr, cb, payload, NULL, 0, NULL, err) != DC_OK) {
    free(copy);
    return DC_ERROR;
  }
  tr->log[tr->n++] = (router_test_apply){.at = engine_now(tr->e), .servers = copy, .n = n};
  return DC_OK;
}

static int tr_read(router *r, router_server *out, size_t cap, size_t *n, router_cb cb, void *payload, char *err) {
  test_router *tr = (test_router *)r;
  if (tr->closed) {
    dc_fmt(err, DC_ERR_MAX, "router: used after free");
    return DC_ERROR;
  }
  return tr_queue(tr, cb, payload, out, cap, n, err);
}

static void tr_free(router *r) {
  test_router *tr = (test_router *)r;
  if (!tr || tr->closed)
    return;
  tr->closed = 1;
  if (tr->pending == 0)
    tr_destroy(tr);
}

int router_test_new(router **out, engine *e, char *err) {
  *out = NULL;
  test_router *tr = calloc(1, sizeof *tr);
  if (!tr) {
    dc_fmt(err, DC_ERR_MAX, "router: out of memory");
    return DC_ERROR;
  }
  tr->e = e;
  tr->base.version = ROUTER_VERSION;
  tr->base.kind = "test";
  tr->base.label = "test";
  /* routes beyond weights (sticky canaries, testers, maintenance) are
   * accepted, as a proxy set up for them would: a dry run of such a
   * rollout follows the same steps */
  tr->base.can_route = 1;
  tr->base.apply = tr_apply;
  tr->base.read = tr_read;
  tr->base.free = tr_free;
  *out = &tr->base;
  return DC_OK;
}

int router_test_log(const router *r, const router_test_apply **log, size_t *n) {
  *log = NULL;
  *n = 0;
  if (!r || r->apply != tr_apply)
    return DC_ERROR;
  const test_router *tr = (const test_router *)r;
  *log = tr->log;
  *n = tr->n;
  return DC_OK;
}
