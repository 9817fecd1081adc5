/* Several routers as one: a target behind two load balancers (two HAProxy,
 * HAProxy and nginx, ...) gets every plan on all of them at once.
 *
 * All or nothing. A plan marked all_or_nothing (a traffic step, a
 * promotion) either reaches every router or none: when it fails on one,
 * every router gets back the plan it served before (the last one this
 * group applied to it; for a router this group never applied anything to,
 * its servers as read just before, with the plan's maintenance), and apply
 * fails naming the router that failed, then whether the undo worked. A
 * plan that is not all_or_nothing (a retreat to the old version, a
 * repair) goes as far as it can on each router: half a retreat serves
 * fewer requests of a bad version than none.
 *
 * One plan at a time: an undo must reach the routers before the next plan
 * does. Reads run beside plans (they change nothing).
 *
 * Each member keeps its own order (haproxy.c and nginx.c queue their
 * applies), so the group only decides what each member is asked, never
 * how. */
#include "router.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

#define GROUP_READ_CAP 256   /* servers read per member (instset has fewer) */

typedef struct group group;

typedef struct member {
  router *r;
  int known;                 /* `last` is what it serves */
  router_server *last;
  size_t nlast;
  route_rules last_routes;
} member;

typedef enum { OP_APPLY, OP_READ } op_kind;
typedef enum { PH_LEARN, PH_APPLY, PH_UNDO } op_phase;

typedef struct group_op group_op;

/* One member's part of an operation: the payload of its callback. */
typedef struct slot {
  group_op *op;
  size_t i;
  int answered;
  char err[DC_ERR_MAX];      /* "" succeeded */
  router_server *buf;        /* reads: what it serves */
  size_t nbuf;
  router_server *before;     /* apply: what it served before the plan */
  size_t nbefore;
  route_rules before_routes;
  int before_known;
  int failed_step;           /* the plan failed here (before the undo) */
} slot;

struct group_op {
  group_op *next;
  group *g;
  op_kind kind;
  op_phase ph;
  router_cb cb;              /* NULL once the caller was answered */
  void *payload;
  router_plan plan;          /* servers: our copy */
  router_server *servers;
  router_server *out;        /* read */
  size_t cap, *n;
  slot *slots;
  int pending;               /* member calls not answered yet */
  int sending;               /* send_all is asking the members */
  int ready;                 /* every member answered while sending */
  char err[DC_ERR_MAX];      /* why the plan failed (before the undo) */
};

struct group {
  router base;               /* first: a router * is a group * */
  engine *e;
  member *m;
  size_t n;
  char label[64];
  uv_timer_t tick;           /* starts the next plan, and answers from the loop */
  group_op *running, *queue, *queue_tail;
  group_op *reads;
  group_op *late;            /* reads every member refused at once: ended from tick */
  int closing;
};

static void run_phase(group *g, group_op *op);
static void on_tick(uv_timer_t *t);

/* ---- small helpers ------------------------------------------------------- */

static router_server *copy_servers(const router_server *s, size_t n) {
  router_server *c = calloc(n ? n : 1, sizeof *c);
  if (c != NULL && n > 0)
    memcpy(c, s, n * sizeof *c);
  return c;
}

static void op_free(group_op *op) {
  for (size_t i = 0; op->slots != NULL && i < op->g->n; i++) {
    free(op->slots[i].buf);
    free(op->slots[i].before);
  }
  free(op->slots);
  free(op->servers);
  free(op);
}

static void unlink_op(group_op **list, group_op *op) {
  while (*list != NULL && *list != op)
    list = &(*list)->next;
  if (*list == op)
    *list = op->next;
}

/* "label: err; label: err" of the members whose slot failed. */
static void join_errors(const group *g, const group_op *op, char *out, size_t size) {
  size_t len = 0;
  out[0] = '\0';
  for (size_t i = 0; i < g->n; i++) {
    if (!op->slots[i].err[0])
      continue;
    const char *e = op->slots[i].err;
    int w = snprintf(out + len, size - len, "%s%s: %s", len ? "; " : "", g->m[i].r->label, e);
    if (w < 0 || (size_t)w >= size - len)
      break;
    len += (size_t)w;
  }
}

/* ---- the end of an operation --------------------------------------------- */

static void tell(group_op *op, const char *err) {
  router_cb cb = op->cb;
  op->cb = NULL;
  if (cb != NULL)
    cb(op->payload, err);
}

static void start_next(group *g) {
  if (g->running != NULL || g->queue == NULL || g->closing)
    return;
  g->running = g->queue;
  g->queue = g->queue->next;
  if (g->queue == NULL)
    g->queue_tail = NULL;
  g->running->next = NULL;
  /* Through the loop, so cb never runs inside apply. */
  uv_timer_start(&g->tick, on_tick, 0, 0);
}

static void apply_end(group *g, group_op *op, const char *err) {
  g->running = NULL;
  tell(op, err);
  op_free(op);
  start_next(g);
}

/* ---- member callbacks ---------------------------------------------------- */

static void member_answered(slot *s, const char *err) {
  group_op *op = s->op;
  group *g = op->g;
  s->answered = 1;
  if (err != NULL)
    dc_strlcpy(s->err, err, sizeof s->err);
  if (--op->pending > 0)
    return;
  if (op->sending) {
    op->ready = 1;   /* the caller of send_all goes on */
    return;
  }
  if (g->closing) {
    /* free answered the caller already; the last member frees the op */
    op_free(op);
    return;
  }
  run_phase(g, op);
}

static void on_member(void *payload, const char *err) { member_answered(payload, err); }

/* ---- the phases ---------------------------------------------------------- */

static void fail_slot(group_op *op, size_t i, const char *err) {
  dc_strlcpy(op->slots[i].err, err, sizeof op->slots[i].err);
  op->slots[i].answered = 1;
}

/* Sends every member its call; an immediate refusal counts as its answer. */
static void send_all(group *g, group_op *op, int (*call)(group *g, group_op *op, size_t i, char *err)) {
  char err[DC_ERR_MAX];
  op->pending = 1;   /* held until every call is out */
  op->sending = 1;
  op->ready = 0;
  for (size_t i = 0; i < g->n; i++) {
    slot *s = &op->slots[i];
    s->answered = 0;
    s->err[0] = '\0';
    op->pending++;
    int rc = call(g, op, i, err);
    if (rc == 1) {
      op->pending--;           /* nothing to ask this member */
      s->answered = 1;
    } else if (rc != DC_OK) {
      op->pending--;
      fail_slot(op, i, err);
    }
  }
  op->sending = 0;
  if (--op->pending == 0 || op->ready) {
    op->pending = 0;
    run_phase(g, op);
  }
}

static int call_read(group *g, group_op *op, size_t i, char *err) {
  slot *s = &op->slots[i];
  if (op->kind == OP_APPLY && g->m[i].known)
    return 1;
  if (s->buf == NULL && (s->buf = calloc(GROUP_READ_CAP, sizeof *s->buf)) == NULL) {
    dc_fmt(err, DC_ERR_MAX, "out of memory");
    return DC_ERROR;
  }
  router *r = g->m[i].r;
  return r->read(r, s->buf, GROUP_READ_CAP, &s->nbuf, on_member, s, err);
}

static int call_apply(group *g, group_op *op, size_t i, char *err) {
  router *r = g->m[i].r;
  return r->apply(r, &op->plan, on_member, &op->slots[i], err);
}

static int call_undo(group *g, group_op *op, size_t i, char *err) {
  slot *s = &op->slots[i];
  router *r = g->m[i].r;
  router_plan back = {.servers = s->before, .n = s->nbefore, .routes = s->before_routes};
  return r->apply(r, &back, on_member, s, err);
}

/* What each member serves now, for the undo: the last plan of ours it
 * took, else what was just read (with the plan's maintenance, which the
 * store decides; no sticky or testers' route, which only a rollout of
 * ours would have set). */
static int keep_before(group *g, group_op *op) {
  for (size_t i = 0; i < g->n; i++) {
    slot *s = &op->slots[i];
    member *m = &g->m[i];
    if (m->known) {
      s->before = copy_servers(m->last, m->nlast);
      s->nbefore = m->nlast;
      s->before_routes = m->last_routes;
    } else {
      s->before = copy_servers(s->buf, s->nbuf);
      s->nbefore = s->nbuf;
      memset(&s->before_routes, 0, sizeof s->before_routes);
      s->before_routes.maintenance = op->plan.routes.maintenance;
      dc_strlcpy(s->before_routes.maintenance_message, op->plan.routes.maintenance_message,
                 sizeof s->before_routes.maintenance_message);
      s->before_routes.retry_after = op->plan.routes.retry_after;
    }
    if (s->before == NULL)
      return DC_ERROR;
    s->before_known = 1;
  }
  return DC_OK;
}

static void remember(member *m, const router_server *servers, size_t n, const route_rules *routes) {
  router_server *c = copy_servers(servers, n);
  free(m->last);
  m->last = c;
  m->nlast = c ? n : 0;
  m->known = c != NULL;
  m->last_routes = *routes;
}

static void forget(member *m) {
  free(m->last);
  m->last = NULL;
  m->nlast = 0;
  m->known = 0;
}

static void read_end(group *g, group_op *op) {
  char err[DC_ERR_MAX];
  join_errors(g, op, err, sizeof err);
  slot *first = &op->slots[0];
  if (!err[0]) {
    size_t k = first->nbuf < op->cap ? first->nbuf : op->cap;
    if (k > 0)
      memcpy(op->out, first->buf, k * sizeof *op->out);
    *op->n = k;
  }
  unlink_op(&g->reads, op);
  tell(op, err[0] ? err : NULL);
  op_free(op);
}

static void learned(group *g, group_op *op) {
  char err[DC_ERR_MAX], msg[DC_ERR_MAX];
  join_errors(g, op, err, sizeof err);
  if (err[0]) {
    dc_fmt(msg, sizeof msg, "%s (read before the step, to be able to undo it: nothing was applied)", err);
    apply_end(g, op, msg);
    return;
  }
  if (keep_before(g, op) != DC_OK) {
    apply_end(g, op, "routers: out of memory");
    return;
  }
  op->ph = PH_APPLY;
  send_all(g, op, call_apply);
}

static void applied(group *g, group_op *op) {
  int failed = 0;
  for (size_t i = 0; i < g->n; i++) {
    if (op->slots[i].err[0]) {
      failed = 1;
      forget(&g->m[i]);
    } else {
      remember(&g->m[i], op->plan.servers, op->plan.n, &op->plan.routes);
    }
  }
  if (!failed) {
    apply_end(g, op, NULL);
    return;
  }
  join_errors(g, op, op->err, sizeof op->err);
  for (size_t i = 0; i < g->n; i++)
    op->slots[i].failed_step = op->slots[i].err[0] != '\0';
  if (!op->plan.all_or_nothing) {
    apply_end(g, op, op->err);
    return;
  }
  op->ph = PH_UNDO;
  send_all(g, op, call_undo);
}

/* The undo's outcome, said once: a router that failed the step usually
 * fails its undo too (it is unreachable, or refuses the same file), which
 * the step's error already explains; a router that took the step and
 * cannot be set back is news. */
static void undone(group *g, group_op *op) {
  char stuck[DC_ERR_MAX], msg[DC_ERR_MAX];
  size_t len = 0;
  int all = 1;
  stuck[0] = '\0';
  for (size_t i = 0; i < g->n; i++) {
    slot *s = &op->slots[i];
    if (s->err[0])
      forget(&g->m[i]);
    else
      remember(&g->m[i], s->before, s->nbefore, &s->before_routes);
    all &= !s->err[0];
    if (s->err[0] && !s->failed_step) {
      int w = snprintf(stuck + len, sizeof stuck - len, "%s%s: %s", len ? "; " : "", g->m[i].r->label, s->err);
      if (w > 0 && (size_t)w < sizeof stuck - len)
        len += (size_t)w;
    }
  }
  if (all)
    dc_fmt(msg, sizeof msg, "%s; the step was undone on every router (each is back to what it served before)",
           op->err);
  else if (stuck[0])
    dc_fmt(msg, sizeof msg, "%s; and it could not be undone on %s", op->err, stuck);
  else
    dc_fmt(msg, sizeof msg, "%s; every other router is back to what it served before", op->err);
  apply_end(g, op, msg);
}

static void run_phase(group *g, group_op *op) {
  if (op->kind == OP_READ) {
    read_end(g, op);
    return;
  }
  switch (op->ph) {
  case PH_LEARN: learned(g, op); break;
  case PH_APPLY: applied(g, op); break;
  case PH_UNDO: undone(g, op); break;
  }
}

/* The running plan's first move; answers of immediate refusals. */
static void on_tick(uv_timer_t *t) {
  group *g = t->data;
  while (g->late != NULL) {
    group_op *op = g->late;
    g->late = op->next;
    op->next = g->reads;     /* read_end unlinks it from there */
    g->reads = op;
    read_end(g, op);
  }
  group_op *op = g->running;
  if (op == NULL || op->pending > 0 || g->closing)
    return;
  int learn = 0;
  for (size_t i = 0; i < g->n; i++)
    learn |= op->plan.all_or_nothing && !g->m[i].known;
  if (learn) {
    op->ph = PH_LEARN;
    send_all(g, op, call_read);
    return;
  }
  if (op->plan.all_or_nothing && keep_before(g, op) != DC_OK) {
    apply_end(g, op, "routers: out of memory");
    return;
  }
  op->ph = PH_APPLY;
  send_all(g, op, call_apply);
}

/* ---- the interface ------------------------------------------------------- */

static group_op *op_new(group *g, op_kind kind, router_cb cb, void *payload, char *err) {
  group_op *op = calloc(1, sizeof *op);
  slot *slots = calloc(g->n, sizeof *slots);
  if (op == NULL || slots == NULL) {
    free(op);
    free(slots);
    dc_fmt(err, DC_ERR_MAX, "routers: out of memory");
    return NULL;
  }
  op->g = g;
  op->kind = kind;
  op->cb = cb;
  op->payload = payload;
  op->slots = slots;
  for (size_t i = 0; i < g->n; i++) {
    slots[i].op = op;
    slots[i].i = i;
  }
  return op;
}

static int group_apply(router *r, const router_plan *plan, router_cb cb, void *payload, char *err) {
  group *g = (group *)r;
  if (g->closing) {
    dc_fmt(err, DC_ERR_MAX, "routers: used after free");
    return DC_ERROR;
  }
  for (size_t i = 0; i < g->n; i++)
    if (router_check_plan(g->m[i].r, plan, err) != DC_OK)
      return DC_ERROR;
  group_op *op = op_new(g, OP_APPLY, cb, payload, err);
  if (op == NULL)
    return DC_ERROR;
  op->plan = *plan;
  op->servers = copy_servers(plan->servers, plan->n);
  if (op->servers == NULL) {
    op_free(op);
    dc_fmt(err, DC_ERR_MAX, "routers: out of memory");
    return DC_ERROR;
  }
  op->plan.servers = op->servers;
  if (g->queue_tail != NULL)
    g->queue_tail->next = op;
  else
    g->queue = op;
  g->queue_tail = op;
  start_next(g);
  return DC_OK;
}

static int group_read(router *r, router_server *out, size_t cap, size_t *n, router_cb cb, void *payload,
                      char *err) {
  group *g = (group *)r;
  *n = 0;
  if (g->closing) {
    dc_fmt(err, DC_ERR_MAX, "routers: used after free");
    return DC_ERROR;
  }
  group_op *op = op_new(g, OP_READ, cb, payload, err);
  if (op == NULL)
    return DC_ERROR;
  op->out = out;
  op->cap = cap;
  op->n = n;
  op->next = g->reads;
  g->reads = op;
  op->sending = 1;           /* an answer now would run inside read */
  op->pending = 1;
  for (size_t i = 0; i < g->n; i++) {
    op->pending++;
    if (call_read(g, op, i, err) != DC_OK) {
      op->pending--;
      fail_slot(op, i, err);
    }
  }
  op->sending = 0;
  if (--op->pending == 0 || op->ready) {
    op->pending = 0;
    unlink_op(&g->reads, op);
    op->next = g->late;
    g->late = op;
    uv_timer_start(&g->tick, on_tick, 0, 0);
  }
  return DC_OK;
}

static void tick_closed(uv_handle_t *h) {
  group *g = h->data;
  for (size_t i = 0; i < g->n; i++)
    free(g->m[i].last);
  free(g->m);
  free(g);
}

static const char closed_msg[] = "routers: closed before they answered";

/* Callers hear "closed" first; then the members are freed, which answers
 * every call they still had (member_answered frees the ops whose last
 * call that was); the memory goes once the loop has closed tick. */
static void group_free(router *r) {
  group *g = (group *)r;
  if (g == NULL || g->closing)
    return;
  g->closing = 1;
  group_op *pending[4] = {g->running, g->queue, g->reads, g->late};
  g->running = g->queue = g->queue_tail = g->reads = g->late = NULL;
  for (int k = 0; k < 4; k++) {
    for (group_op *op = pending[k]; op != NULL;) {
      group_op *next = k == 0 ? NULL : op->next;
      tell(op, closed_msg);
      if (op->pending == 0)
        op_free(op);  /* queued, not started: no member holds it */
      op = next;
    }
  }
  for (size_t i = 0; i < g->n; i++)
    g->m[i].r->free(g->m[i].r);
  uv_close((uv_handle_t *)&g->tick, tick_closed);
}

/* Analysis reads the counters of the first member that keeps any (an
 * HAProxy): each load balancer sees its own share of the clients, a sample
 * of the same traffic, so one of them judges the new set as well as all. */
static router *stats_member(const group *g) {
  for (size_t i = 0; i < g->n; i++)
    if (g->m[i].r->stats)
      return g->m[i].r;
  return NULL;
}

static int group_stats(router *r, router_stat *out, size_t cap, size_t *n, router_cb cb, void *payload, char *err) {
  router *m = stats_member((group *)r);
  return m->stats(m, out, cap, n, cb, payload, err);
}

int router_group_new(router **out, engine *e, router **members, size_t n, char *err) {
  *out = NULL;
  if (n < 2) {
    dc_fmt(err, DC_ERR_MAX, "routers: a group needs at least two routers, got %zu", n);
    return DC_ERROR;
  }
  for (size_t i = 0; i < n; i++) {
    if (router_check(members[i], err) != DC_OK)
      return DC_ERROR;
    if (members[i]->ratio_only) {
      dc_fmt(err, DC_ERR_MAX,
             "routers: router %s cannot weigh servers: several routers must each be haproxy or nginx", members[i]->label);
      return DC_ERROR;
    }
  }
  group *g = calloc(1, sizeof *g);
  member *m = calloc(n, sizeof *m);
  if (g == NULL || m == NULL) {
    free(g);
    free(m);
    dc_fmt(err, DC_ERR_MAX, "routers: out of memory");
    return DC_ERROR;
  }
  int can_route = 1;
  for (size_t i = 0; i < n; i++) {
    m[i].r = members[i];
    can_route &= members[i]->can_route != 0;
  }
  g->e = e;
  g->m = m;
  g->n = n;
  dc_fmt(g->label, sizeof g->label, "%zu routers", n);
  uv_timer_init(e->loop, &g->tick);
  g->tick.data = g;
  g->base.version = ROUTER_VERSION;
  g->base.kind = "group";
  g->base.label = g->label;
  g->base.can_route = can_route;
  g->base.apply = group_apply;
  g->base.read = group_read;
  g->base.free = group_free;
  g->base.stats = stats_member(g) ? group_stats : NULL;
  *out = &g->base;
  return DC_OK;
}
