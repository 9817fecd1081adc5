/* What every router shares: the exact weight split, the checks, and the
 * router that does nothing (traffic needs no split). The HAProxy router is
 * haproxy.c, nginx's nginx.c, several routers as one router_group.c. */
#include "router.h"

#include <math.h>
#include <stdlib.h>

#include "util.h"

#define ROUTER_WEIGHT_MAX 256

static long long gcd_ll(long long a, long long b) {
  while (b != 0) {
    long long t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* Rounds x * 256 / max to the nearest integer, never below 1: a group that
 * is meant to get traffic must keep a non-zero weight after scaling. */
static int scale_weight(long long x, long long max) {
  long long w = (x * ROUTER_WEIGHT_MAX * 2 + max) / (max * 2);
  return w < 1 ? 1 : (int)w;
}

void router_split_weights(double pct, int n_old, int n_new, int *w_old,
                          int *w_new) {
  /* Integer hundredths of a percent, so 33.33 % is exact and the gcd works. */
  long long p = isnan(pct) ? 0 : llround(pct * 100.0);
  if (p < 0)
    p = 0;
  if (p > 10000)
    p = 10000;
  if (p == 0) {
    *w_new = 0;
    *w_old = 1;
    return;
  }
  if (p == 10000) {
    *w_old = 0;
    *w_new = 1;
    return;
  }
  /* An empty group's weight applies to no server; 1 keeps "both >= 1". */
  if (n_new <= 0 || n_old <= 0) {
    *w_old = 1;
    *w_new = 1;
    return;
  }
  /* n_new servers at a and n_old at b give the new group
   * n_new*a / (n_new*a + n_old*b) = p / 10000 exactly. */
  long long a = p * n_old;
  long long b = (10000 - p) * n_new;
  long long g = gcd_ll(a, b);
  a /= g;
  b /= g;
  long long max = a > b ? a : b;
  if (max > ROUTER_WEIGHT_MAX) {
    *w_new = scale_weight(a, max);
    *w_old = scale_weight(b, max);
  } else {
    *w_new = (int)a;
    *w_old = (int)b;
  }
}

int router_check(const router *r, char *err) {
  if (!r) {
    dc_fmt(err, DC_ERR_MAX, "deploy: no router given");
    return DC_ERROR;
  }
  if (r->version != ROUTER_VERSION) {
    dc_fmt(err, DC_ERR_MAX, "deploy: router '%s' was built for interface version %d, this deployctl has %d",
           r->kind ? r->kind : "?", r->version, ROUTER_VERSION);
    return DC_ERROR;
  }
  if (!r->kind || !r->label || !r->apply || !r->read || !r->free) {
    dc_fmt(err, DC_ERR_MAX, "deploy: router '%s' lacks one of label, apply, read, free", r->kind ? r->kind : "?");
    return DC_ERROR;
  }
  return DC_OK;
}

int router_check_plan(const router *r, const router_plan *plan, char *err) {
  if (r->can_route || !routes_any(&plan->routes))
    return DC_OK;
  const char *what = plan->routes.maintenance            ? "maintenance (a 503 page)"
                     : routes_affinity_active(&plan->routes) ? "sticky canaries (session_affinity)"
                                                            : "routes for testers (test_route)";
  dc_fmt(err, DC_ERR_MAX,
         "deploy: router %s cannot do %s: it needs an nginx router, or an haproxy router with router.map "
         "(README, \"Routing beyond weights\")",
         r->label, what);
  return DC_ERROR;
}

/* ---- router_none --------------------------------------------------------- */

/* A pending answer: router_none answers at once, but from the loop, never
 * from inside apply/read (the caller may not be ready for its callback). */
typedef struct none_call {
  struct none_call *next;
  router_cb cb;
  void *payload;
  size_t *n;   /* read: set to 0 when answered */
} none_call;

typedef struct none_router {
  router base;   /* first: a router * is a none_router * */
  uv_timer_t tick;
  none_call *head, *tail;
  int closing;
} none_router;

static void none_tick(uv_timer_t *t) {
  none_router *nr = t->data;
  /* Pop one at a time: a callback may queue another call, or free us. */
  while (nr->head != NULL && !nr->closing) {
    none_call *c = nr->head;
    nr->head = c->next;
    if (nr->head == NULL)
      nr->tail = NULL;
    if (c->n != NULL)
      *c->n = 0;
    router_cb cb = c->cb;
    void *payload = c->payload;
    free(c);
    cb(payload, NULL);
  }
}

static int none_queue(none_router *nr, router_cb cb, void *payload, size_t *n,
                      char *err) {
  if (nr->closing) {
    dc_fmt(err, DC_ERR_MAX, "router: used after free");
    return DC_ERROR;
  }
  none_call *c = calloc(1, sizeof *c);
  if (c == NULL) {
    dc_fmt(err, DC_ERR_MAX, "router: out of memory");
    return DC_ERROR;
  }
  c->cb = cb;
  c->payload = payload;
  c->n = n;
  if (nr->tail != NULL)
    nr->tail->next = c;
  else
    nr->head = c;
  nr->tail = c;
  uv_timer_start(&nr->tick, none_tick, 0, 0);
  return DC_OK;
}

static int none_apply(router *r, const router_plan *plan, router_cb cb,
                      void *payload, char *err) {
  if (router_check_plan(r, plan, err) != DC_OK)
    return DC_ERROR;
  return none_queue((none_router *)r, cb, payload, NULL, err);
}

static int none_read(router *r, router_server *out, size_t cap, size_t *n,
                     router_cb cb, void *payload, char *err) {
  (void)out;
  (void)cap;
  return none_queue((none_router *)r, cb, payload, n, err);
}

static void none_closed(uv_handle_t *h) {
  free(h->data);
}

static void none_free(router *r) {
  none_router *nr = (none_router *)r;
  if (nr == NULL || nr->closing)
    return;
  nr->closing = 1;
  /* Whoever waits is told now; the memory goes once the loop closed tick. */
  while (nr->head != NULL) {
    none_call *c = nr->head;
    nr->head = c->next;
    router_cb cb = c->cb;
    void *payload = c->payload;
    free(c);
    cb(payload, "router: closed before it answered");
  }
  nr->tail = NULL;
  uv_close((uv_handle_t *)&nr->tick, none_closed);
}

int router_none_new(router **out, engine *e, char *err) {
  *out = NULL;
  none_router *nr = calloc(1, sizeof *nr);
  if (nr == NULL) {
    dc_fmt(err, DC_ERR_MAX, "router: out of memory");
    return DC_ERROR;
  }
  int rc = uv_timer_init(e->loop, &nr->tick);
  if (rc < 0) {
    dc_fmt(err, DC_ERR_MAX, "router: cannot create a timer: %s",
           uv_strerror(rc));
    free(nr);
    return DC_ERROR;
  }
  nr->tick.data = nr;
  nr->base.version = ROUTER_VERSION;
  nr->base.kind = "none";
  nr->base.label = "none";
  nr->base.ratio_only = 1;
  nr->base.apply = none_apply;
  nr->base.read = none_read;
  nr->base.free = none_free;
  *out = &nr->base;
  return DC_OK;
}
