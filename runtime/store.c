/* The store's front: one queue of operations per store, the group commit,
 * the callbacks, control watches and lease renewal. Backends
 * (store_sqlite.c, store_pg.c) only run operations; see store.h for the
 * contract and store_backend.h for the split.
 *
 * The group commit: a write is queued and the engine held (the virtual
 * clock may not jump past a step that is not yet durable); a uv_prepare
 * handle, which runs right before the loop would block, hands every write
 * queued since the last flush to the backend as one batch. While a batch
 * commits, new writes wait for the next one, so the busier the loop, the
 * larger the batches. Callbacks run once the batch is committed, in the
 * order the writes were queued. */
#include "store_backend.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define CONTROL_POLL_MS 200

struct store_watch {
  store *s;
  char deployment_id[48];
  store_control_cb cb;
  void *payload;
  store_watch *next;
};

/* A deployment this process began and has not finished: its lease is
 * renewed while the backend uses leases. */
typedef struct held {
  char id[48];
  struct held *next;
} held;

struct store {
  engine *e;
  store_backend *b;
  int refs;
  int closing;               /* the last reference is gone: free once idle */
  /* writes queued for the next batch, FIFO */
  store_op *queue, *queue_tail;
  size_t nqueued;
  /* the batch being committed */
  store_op **batch;
  size_t nbatch, batch_cap;
  int committing;
  int reads;                 /* reads in flight */
  int dispatching;           /* inside callbacks: free later */
  uv_prepare_t flush;
  int flush_active;
  /* control watches */
  store_watch *watches;
  uv_timer_t poll;
  int poll_active, polling;
  int64_t last_control;
  /* leases */
  held *held;
  uv_timer_t renew;
  int renew_active;
  int handles_open;
  uint64_t commits, writes;
};

/* ---- ops ---- */

void store_op_clear_results(store_op *op) {
  for (size_t i = 0; i < op->ndeployments; i++)
    store_deployment_clear(&op->deployments[i]);
  for (size_t i = 0; i < op->nevents; i++)
    store_event_clear(&op->events[i]);
  free(op->deployments);
  free(op->instances);
  free(op->events);
  free(op->controls);
  free(op->ports);
  op->deployments = NULL;
  op->instances = NULL;
  op->events = NULL;
  op->controls = NULL;
  op->ports = NULL;
  op->ndeployments = op->ninstances = op->nevents = op->ncontrols = op->nports = 0;
  op->has_target = op->has_lock = 0;
  op->out_id = 0;
  op->rc = DC_OK;
  op->err[0] = '\0';
}

void store_op_free(store_op *op) {
  if (!op)
    return;
  store_op_clear_results(op);
  store_deployment_clear(&op->dep);
  store_event_clear(&op->ev);
  free(op->fin_errors);
  free(op);
}

static void *grow(void **rows, size_t *n, size_t size) {
  /* Doubling at powers of two keeps appends amortised O(1) without a
   * separate capacity field. */
  size_t cap = 1;
  while (cap < *n + 1)
    cap *= 2;
  if ((*n & (*n - 1)) == 0 || *n == 0) {
    void *g = realloc(*rows, cap * size);
    if (!g)
      return NULL;
    *rows = g;
  }
  char *row = (char *)*rows + (*n)++ * size;
  memset(row, 0, size);
  return row;
}

store_deployment *store_op_add_deployment(store_op *op) {
  return grow((void **)&op->deployments, &op->ndeployments, sizeof *op->deployments);
}
store_instance *store_op_add_instance(store_op *op) {
  return grow((void **)&op->instances, &op->ninstances, sizeof *op->instances);
}
store_event *store_op_add_event(store_op *op) { return grow((void **)&op->events, &op->nevents, sizeof *op->events); }
store_control *store_op_add_control(store_op *op) {
  return grow((void **)&op->controls, &op->ncontrols, sizeof *op->controls);
}
int store_op_add_port(store_op *op, int port) {
  int *p = grow((void **)&op->ports, &op->nports, sizeof *op->ports);
  if (!p)
    return -1;
  *p = port;
  return 0;
}

void store_op_fail(store_op *op, int rc, const char *fmt, ...) {
  va_list ap;
  op->rc = rc;
  va_start(ap, fmt);
  dc_vfmt(op->err, sizeof op->err, fmt, ap);
  va_end(ap);
}

static void result_of(const store_op *op, store_result *r) {
  memset(r, 0, sizeof *r);
  r->rc = op->rc;
  r->err = op->rc != DC_OK ? op->err : NULL;
  r->id = op->out_id;
  r->target = op->has_target ? &op->target : NULL;
  r->lock = op->has_lock ? &op->lock : NULL;
  r->deployments = op->deployments;
  r->ndeployments = op->ndeployments;
  r->instances = op->instances;
  r->ninstances = op->ninstances;
  r->events = op->events;
  r->nevents = op->nevents;
  r->controls = op->controls;
  r->ncontrols = op->ncontrols;
  r->ports = op->ports;
  r->nports = op->nports;
}

/* ---- lifetime ---- */

static void destroy(store *s) {
  while (s->held) {
    held *h = s->held;
    s->held = h->next;
    free(h);
  }
  free(s->batch);
  s->b->free(s->b);
  free(s);
}

static int idle(const store *s) {
  return !s->committing && !s->queue && s->reads == 0 && !s->dispatching && !s->polling;
}

static void handle_closed(uv_handle_t *h) {
  store *s = h->data;
  if (--s->handles_open == 0)
    destroy(s);
}

/* The last reference went and nothing is in flight: close the handles; the
 * last close callback frees. */
static void maybe_free(store *s) {
  if (!s->closing || !idle(s) || s->handles_open == 0 || uv_is_closing((uv_handle_t *)&s->flush))
    return;
  uv_close((uv_handle_t *)&s->flush, handle_closed);
  uv_close((uv_handle_t *)&s->poll, handle_closed);
  uv_close((uv_handle_t *)&s->renew, handle_closed);
}

store *store_ref(store *s) {
  if (s)
    s->refs++;
  return s;
}

void store_unref(store *s) {
  if (!s || --s->refs > 0)
    return;
  s->closing = 1;
  while (s->watches) {
    store_watch *w = s->watches;
    s->watches = w->next;
    free(w);
  }
  maybe_free(s);
}

const char *store_location(const store *s) { return s->b->location(s->b); }
const char *store_kind(const store *s) { return s->b->kind; }
int store_pending(const store *s) { return (int)s->nqueued + (s->committing ? (int)s->nbatch : 0); }

void store_stats(const store *s, uint64_t *commits, uint64_t *writes) {
  *commits = s->commits;
  *writes = s->writes;
}

/* ---- dispatch ---- */

static void forget_held(store *s, const char *id);
static void remember_held(store *s, const char *id);

/* The front's own bookkeeping for a finished op, before its callback. */
static void observe(store *s, const store_op *op) {
  if (op->rc != DC_OK)
    return;
  /* A reconcile's lock is a lease too: renewed by its holder id. */
  if (op->kind == STORE_OP_BEGIN)
    remember_held(s, op->dep.id);
  else if (op->kind == STORE_OP_LOCK_TAKE)
    remember_held(s, op->id);
  else if (op->kind == STORE_OP_FINISH || op->kind == STORE_OP_LOCK_RELEASE)
    forget_held(s, op->id);
}

static void deliver(store *s, store_op *op) {
  store_result r;
  observe(s, op);
  result_of(op, &r);
  if (op->cb)
    op->cb(op->payload, &r);
  store_op_free(op);
}

/* ---- the group commit ---- */

static void flush_cb(uv_prepare_t *h);

static void schedule_flush(store *s) {
  if (s->flush_active)
    return;
  uv_prepare_start(&s->flush, flush_cb);
  s->flush_active = 1;
}

static void committed(void *ctx) {
  store *s = ctx;
  size_t n = s->nbatch;
  s->committing = 0;
  s->commits++;
  s->writes += n;
  s->dispatching++;
  for (size_t i = 0; i < n; i++) {
    store_op *op = s->batch[i];
    s->batch[i] = NULL;
    deliver(s, op);
    engine_release(s->e);
  }
  s->nbatch = 0;
  s->dispatching--;
  if (s->queue)
    schedule_flush(s);
  maybe_free(s);
}

static int take_batch(store *s) {
  if (s->nqueued > s->batch_cap) {
    size_t cap = s->batch_cap ? s->batch_cap : 16;
    while (cap < s->nqueued)
      cap *= 2;
    store_op **g = realloc(s->batch, cap * sizeof *g);
    if (!g)
      return -1;
    s->batch = g;
    s->batch_cap = cap;
  }
  s->nbatch = 0;
  for (store_op *op = s->queue; op; op = op->next)
    s->batch[s->nbatch++] = op;
  s->queue = s->queue_tail = NULL;
  s->nqueued = 0;
  return 0;
}

static void flush_cb(uv_prepare_t *h) {
  store *s = h->data;
  uv_prepare_stop(&s->flush);
  s->flush_active = 0;
  if (s->committing || !s->queue)
    return; /* committed() schedules the next flush */
  if (take_batch(s) != 0) {
    /* No room for the batch array: fail the writes rather than lose them
     * silently. */
    while (s->queue) {
      store_op *op = s->queue;
      s->queue = op->next;
      s->nqueued--;
      store_op_fail(op, DC_ERROR, "deploy: store: out of memory while committing");
      deliver(s, op);
      engine_release(s->e);
    }
    s->queue_tail = NULL;
    return;
  }
  s->committing = 1;
  s->b->commit(s->b, s->batch, s->nbatch, committed, s);
}

static store_op *op_new(store *s, store_op_kind kind, store_cb cb, void *payload, char *err) {
  if (!s || s->closing) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: used after it was closed");
    return NULL;
  }
  store_op *op = calloc(1, sizeof *op);
  if (!op) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return NULL;
  }
  op->kind = kind;
  op->cb = cb;
  op->payload = payload;
  op->rc = DC_OK;
  op->limit = 0;
  return op;
}

static void submit_write(store *s, store_op *op) {
  engine_hold(s->e);
  if (s->queue_tail)
    s->queue_tail->next = op;
  else
    s->queue = op;
  s->queue_tail = op;
  s->nqueued++;
  schedule_flush(s);
}

/* ---- reads ---- */

typedef struct read_ctx {
  store *s;
  store_op *op;
} read_ctx;

static void read_done(void *ctx) {
  read_ctx *rc = ctx;
  store *s = rc->s;
  s->reads--;
  s->dispatching++;
  deliver(s, rc->op);
  s->dispatching--;
  free(rc);
  engine_release(s->e);
  maybe_free(s);
}

static int submit_read(store *s, store_op *op, char *err) {
  read_ctx *rc = malloc(sizeof *rc);
  if (!rc) {
    store_op_free(op);
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return -1;
  }
  rc->s = s;
  rc->op = op;
  s->reads++;
  engine_hold(s->e);
  s->b->read(s->b, op, read_done, rc);
  return 0;
}

/* ---- the calls ---- */

#define NEW_OP(kind)                                                                                         \
  store_op *op = op_new(s, kind, cb, payload, err);                                                          \
  if (!op)                                                                                                   \
    return -1

int store_target_ensure(store *s, const char *name, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_TARGET_ENSURE);
  dc_strlcpy(op->name, name, sizeof op->name);
  submit_write(s, op);
  return 0;
}

int store_deployment_begin(store *s, const store_deployment *d, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_BEGIN);
  if (store_deployment_copy(&op->dep, d) != 0) {
    store_op_free(op);
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return -1;
  }
  submit_write(s, op);
  return 0;
}

int store_deployment_finish(store *s, const store_finish *f, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_FINISH);
  dc_strlcpy(op->id, f->id, sizeof op->id);
  dc_strlcpy(op->fin_status, f->status, sizeof op->fin_status);
  dc_strlcpy(op->fin_tstatus, f->target_status ? f->target_status : "", sizeof op->fin_tstatus);
  dc_strlcpy(op->fin_thealth, f->target_health ? f->target_health : "", sizeof op->fin_thealth);
  if (f->errors_json && !(op->fin_errors = strdup(f->errors_json))) {
    store_op_free(op);
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return -1;
  }
  op->fin = *f;
  op->fin.id = op->id;
  op->fin.status = op->fin_status;
  op->fin.errors_json = op->fin_errors;
  op->fin.target_status = f->target_status ? op->fin_tstatus : NULL;
  op->fin.target_health = f->target_health ? op->fin_thealth : NULL;
  submit_write(s, op);
  return 0;
}

int store_deployment_promote(store *s, const char *id, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_PROMOTE);
  dc_strlcpy(op->id, id, sizeof op->id);
  submit_write(s, op);
  return 0;
}

int store_event_add(store *s, const store_event *ev, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_EVENT);
  op->ev = *ev;
  op->ev.data = NULL;
  if (ev->data && !(op->ev.data = strdup(ev->data))) {
    store_op_free(op);
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return -1;
  }
  submit_write(s, op);
  return 0;
}

int store_instance_add(store *s, const store_instance *in, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_INSTANCE_ADD);
  op->inst = *in;
  submit_write(s, op);
  return 0;
}

int store_instance_update(store *s, const store_instance *in, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_INSTANCE_UPDATE);
  op->inst = *in;
  submit_write(s, op);
  return 0;
}

int store_instance_delete(store *s, int64_t id, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_INSTANCE_DELETE);
  op->id64 = id;
  submit_write(s, op);
  return 0;
}

int store_control_set(store *s, const char *target, const char *command, const char *by, store_cb cb,
                      void *payload, char *err) {
  NEW_OP(STORE_OP_CONTROL_SET);
  dc_strlcpy(op->name, target, sizeof op->name);
  dc_strlcpy(op->command, command, sizeof op->command);
  dc_strlcpy(op->by, by ? by : "", sizeof op->by);
  submit_write(s, op);
  return 0;
}

int store_lock_take(store *s, const char *target, const char *holder, const char *purpose, store_cb cb,
                    void *payload, char *err) {
  NEW_OP(STORE_OP_LOCK_TAKE);
  dc_strlcpy(op->name, target, sizeof op->name);
  dc_strlcpy(op->id, holder, sizeof op->id);
  dc_strlcpy(op->command, purpose, sizeof op->command);
  submit_write(s, op);
  return 0;
}

int store_lock_release(store *s, const char *target, const char *holder, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_LOCK_RELEASE);
  dc_strlcpy(op->name, target, sizeof op->name);
  dc_strlcpy(op->id, holder, sizeof op->id);
  submit_write(s, op);
  return 0;
}

int store_prune(store *s, const char *target, int keep, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_PRUNE);
  dc_strlcpy(op->name, target, sizeof op->name);
  op->limit = keep < 1 ? 1 : keep;
  submit_write(s, op);
  return 0;
}

int store_maintenance_set(store *s, const char *target, const store_maintenance *m, store_cb cb, void *payload,
                          char *err) {
  NEW_OP(STORE_OP_MAINTENANCE);
  dc_strlcpy(op->name, target, sizeof op->name);
  op->maint = *m;
  submit_write(s, op);
  return 0;
}

int store_recover(store *s, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_RECOVER);
  submit_write(s, op);
  return 0;
}

int store_target_get(store *s, const char *name, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_TARGET_GET);
  dc_strlcpy(op->name, name, sizeof op->name);
  return submit_read(s, op, err);
}

int store_deployment_get(store *s, const char *id, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_DEPLOYMENT_GET);
  dc_strlcpy(op->id, id, sizeof op->id);
  return submit_read(s, op, err);
}

int store_history(store *s, const char *target, int limit, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_HISTORY);
  dc_strlcpy(op->name, target ? target : "", sizeof op->name);
  op->limit = limit;
  return submit_read(s, op, err);
}

int store_events(store *s, const char *deployment_id, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_EVENTS);
  dc_strlcpy(op->id, deployment_id, sizeof op->id);
  return submit_read(s, op, err);
}

int store_instances(store *s, const char *target, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_INSTANCES);
  dc_strlcpy(op->name, target ? target : "", sizeof op->name);
  return submit_read(s, op, err);
}

int store_ports_in_use(store *s, const char *node, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_PORTS_IN_USE);
  dc_strlcpy(op->node, node ? node : "", sizeof op->node);
  return submit_read(s, op, err);
}

int store_controls(store *s, int64_t after_id, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_CONTROLS);
  op->id64 = after_id;
  return submit_read(s, op, err);
}

int store_lock_get(store *s, const char *target, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_LOCK_GET);
  dc_strlcpy(op->name, target, sizeof op->name);
  return submit_read(s, op, err);
}

int store_integrity_check(store *s, store_cb cb, void *payload, char *err) {
  NEW_OP(STORE_OP_INTEGRITY);
  return submit_read(s, op, err);
}

/* ---- control watches: one read per interval for every watcher ---- */

static void polled(void *payload, const store_result *r) {
  store *s = payload;
  s->polling = 0;
  if (r->rc == DC_OK) {
    for (size_t i = 0; i < r->ncontrols; i++) {
      const store_control *c = &r->controls[i];
      if (c->id > s->last_control)
        s->last_control = c->id;
      /* A callback may unwatch itself (or others): walk from the head
       * again after each call. */
      for (store_watch *w = s->watches; w; w = w->next) {
        if (strcmp(w->deployment_id, c->deployment_id) != 0)
          continue;
        w->cb(w->payload, c);
        break;
      }
    }
  }
  maybe_free(s);
}

static void poll_cb(uv_timer_t *t) {
  store *s = t->data;
  char err[DC_ERR_MAX];
  if (s->polling || !s->watches)
    return;
  if (store_controls(s, s->last_control, polled, s, err) == 0)
    s->polling = 1;
}

store_watch *store_controls_watch(store *s, const char *deployment_id, store_control_cb cb, void *payload,
                                  char *err) {
  if (s->closing) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: used after it was closed");
    return NULL;
  }
  store_watch *w = calloc(1, sizeof *w);
  if (!w) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return NULL;
  }
  w->s = s;
  dc_strlcpy(w->deployment_id, deployment_id, sizeof w->deployment_id);
  w->cb = cb;
  w->payload = payload;
  w->next = s->watches;
  s->watches = w;
  if (!s->poll_active) {
    uv_timer_start(&s->poll, poll_cb, CONTROL_POLL_MS, CONTROL_POLL_MS);
    s->poll_active = 1;
  }
  return w;
}

void store_controls_unwatch(store_watch *w) {
  if (!w)
    return;
  store *s = w->s;
  store_watch **pp = &s->watches;
  while (*pp && *pp != w)
    pp = &(*pp)->next;
  if (*pp)
    *pp = w->next;
  free(w);
  if (!s->watches && s->poll_active) {
    uv_timer_stop(&s->poll);
    s->poll_active = 0;
  }
}

/* ---- leases ---- */

static void lease_lost(store *s, const char *id) {
  store_control c;
  memset(&c, 0, sizeof c);
  dc_strlcpy(c.deployment_id, id, sizeof c.deployment_id);
  dc_strlcpy(c.command, "lease_lost", sizeof c.command);
  for (store_watch *w = s->watches; w; w = w->next) {
    if (strcmp(w->deployment_id, id) == 0) {
      w->cb(w->payload, &c);
      break;
    }
  }
}

typedef struct renewal {
  store *s;
  char id[48];
} renewal;

static void renewed(void *payload, const store_result *r) {
  renewal *rn = payload;
  if (r->rc == DC_LOCKED)
    lease_lost(rn->s, rn->id);
  free(rn);
}

static void renew_cb(uv_timer_t *t) {
  store *s = t->data;
  char err[DC_ERR_MAX];
  for (held *h = s->held; h; h = h->next) {
    renewal *rn = malloc(sizeof *rn);
    store_op *op = rn ? op_new(s, STORE_OP_LOCK_RENEW, renewed, rn, err) : NULL;
    if (!op) {
      free(rn);
      continue;
    }
    rn->s = s;
    dc_strlcpy(rn->id, h->id, sizeof rn->id);
    dc_strlcpy(op->id, h->id, sizeof op->id);
    submit_write(s, op);
  }
}

static void remember_held(store *s, const char *id) {
  if (s->b->lease_seconds <= 0)
    return;
  held *h = calloc(1, sizeof *h);
  if (!h)
    return; /* the lease then expires: another runner takes over, as after a crash */
  dc_strlcpy(h->id, id, sizeof h->id);
  h->next = s->held;
  s->held = h;
  if (!s->renew_active) {
    uint64_t ms = (uint64_t)(s->b->lease_seconds * 1000.0 / 3.0);
    uv_timer_start(&s->renew, renew_cb, ms ? ms : 1, ms ? ms : 1);
    s->renew_active = 1;
  }
}

static void forget_held(store *s, const char *id) {
  held **pp = &s->held;
  while (*pp && strcmp((*pp)->id, id) != 0)
    pp = &(*pp)->next;
  if (*pp) {
    held *h = *pp;
    *pp = h->next;
    free(h);
  }
  if (!s->held && s->renew_active) {
    uv_timer_stop(&s->renew);
    s->renew_active = 0;
  }
}

/* ---- opening ---- */

static int is_pg_url(const char *location) {
  return strncmp(location, "postgresql://", 13) == 0 || strncmp(location, "postgres://", 11) == 0;
}

#ifndef DEPLOY_HAVE_PG
int store_pg_open(store_backend **out, engine *e, const char *url, char *err) {
  (void)e;
  (void)url;
  *out = NULL;
  dc_fmt(err, DC_ERR_MAX, "deploy: this deployctl was built without PostgreSQL support (libpq): use a state file "
         "path, or rebuild with libpq-dev installed");
  return DC_ERROR;
}
#endif

int store_open(store **out, engine *e, const char *location, char *err) {
  *out = NULL;
  if (!location || !*location) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: no state given: set config.state (a file path or postgresql://...)");
    return DC_ERROR;
  }
  store *s = calloc(1, sizeof *s);
  if (!s) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: out of memory");
    return DC_ERROR;
  }
  int rc = is_pg_url(location) ? store_pg_open(&s->b, e, location, err) : store_sqlite_open(&s->b, e, location, err);
  if (rc != DC_OK) {
    free(s);
    return DC_ERROR;
  }
  if (s->b->version != STORE_BACKEND_VERSION) {
    dc_fmt(err, DC_ERR_MAX, "deploy: store: the %s backend has interface version %d, this build needs %d",
           s->b->kind, s->b->version, STORE_BACKEND_VERSION);
    s->b->free(s->b);
    free(s);
    return DC_ERROR;
  }
  s->e = e;
  s->refs = 1;
  uv_prepare_init(e->loop, &s->flush);
  uv_timer_init(e->loop, &s->poll);
  uv_timer_init(e->loop, &s->renew);
  s->flush.data = s->poll.data = s->renew.data = s;
  s->handles_open = 3;
  *out = s;
  return DC_OK;
}

const char *store_begin_status(const char *kind) { return strcmp(kind, "rollback") == 0 ? "rolling_back" : "running"; }

/* ---- rows ---- */

void store_deployment_clear(store_deployment *d) {
  if (!d)
    return;
  free(d->errors);
  free(d->metadata);
  memset(d, 0, sizeof *d);
}

void store_event_clear(store_event *e) {
  if (!e)
    return;
  free(e->data);
  memset(e, 0, sizeof *e);
}

int store_deployment_copy(store_deployment *dst, const store_deployment *src) {
  *dst = *src;
  dst->errors = src->errors ? strdup(src->errors) : NULL;
  dst->metadata = src->metadata ? strdup(src->metadata) : NULL;
  if ((src->errors && !dst->errors) || (src->metadata && !dst->metadata)) {
    store_deployment_clear(dst);
    return -1;
  }
  return 0;
}

/* ---- for backends ---- */

void store_op_describe(const store_op *op, char *what, size_t size) {
  switch (op->kind) {
  case STORE_OP_TARGET_ENSURE:
    dc_fmt(what, size, "cannot add target '%s'", op->name);
    return;
  case STORE_OP_BEGIN:
    dc_fmt(what, size, "cannot insert deployment '%s'", op->dep.id);
    return;
  case STORE_OP_FINISH:
    dc_fmt(what, size, "cannot finish deployment '%s'", op->fin.id && op->fin.id[0] ? op->fin.id : op->id);
    return;
  case STORE_OP_PROMOTE:
    dc_fmt(what, size, "cannot promote deployment '%s'", op->id);
    return;
  case STORE_OP_EVENT:
    dc_fmt(what, size, "cannot add event '%s' of deployment '%s'", op->ev.kind, op->ev.deployment_id);
    return;
  case STORE_OP_INSTANCE_ADD:
    dc_fmt(what, size, "cannot add instance %d of deployment '%s'", op->inst.idx, op->inst.deployment_id);
    return;
  case STORE_OP_INSTANCE_UPDATE:
    dc_fmt(what, size, "cannot update instance %lld", (long long)op->inst.id);
    return;
  case STORE_OP_INSTANCE_DELETE:
    dc_fmt(what, size, "cannot delete instance %lld", (long long)op->id64);
    return;
  case STORE_OP_CONTROL_SET:
    dc_fmt(what, size, "cannot request '%s' for target '%s'", op->command, op->name);
    return;
  case STORE_OP_RECOVER:
    dc_fmt(what, size, "cannot recover interrupted deployments");
    return;
  case STORE_OP_LOCK_RENEW:
    dc_fmt(what, size, "cannot renew the lock of deployment '%s'", op->id);
    return;
  case STORE_OP_LOCK_TAKE:
    dc_fmt(what, size, "cannot lock target '%s' for a %s", op->name, op->command);
    return;
  case STORE_OP_LOCK_RELEASE:
    dc_fmt(what, size, "cannot release the lock of target '%s'", op->name);
    return;
  case STORE_OP_PRUNE:
    dc_fmt(what, size, "cannot prune the history of target '%s'", op->name);
    return;
  case STORE_OP_MAINTENANCE:
    dc_fmt(what, size, "cannot turn maintenance of target '%s' %s", op->name, op->maint.on ? "on" : "off");
    return;
  case STORE_OP_TARGET_GET:
    dc_fmt(what, size, "cannot read target '%s'", op->name);
    return;
  case STORE_OP_DEPLOYMENT_GET:
    dc_fmt(what, size, "cannot read deployment '%s'", op->id);
    return;
  case STORE_OP_HISTORY:
    dc_fmt(what, size, "cannot read the history of target '%s'", op->name[0] ? op->name : "(all)");
    return;
  case STORE_OP_EVENTS:
    dc_fmt(what, size, "cannot read the events of deployment '%s'", op->id);
    return;
  case STORE_OP_INSTANCES:
    dc_fmt(what, size, "cannot read the instances of target '%s'", op->name[0] ? op->name : "(all)");
    return;
  case STORE_OP_PORTS_IN_USE:
    dc_fmt(what, size, "cannot read the ports in use on '%s'", op->node[0] ? op->node : "this machine");
    return;
  case STORE_OP_CONTROLS:
    dc_fmt(what, size, "cannot read operator commands");
    return;
  case STORE_OP_LOCK_GET:
    dc_fmt(what, size, "cannot read the lock of target '%s'", op->name);
    return;
  case STORE_OP_INTEGRITY:
    dc_fmt(what, size, "cannot check the integrity of the store");
    return;
  }
  dc_fmt(what, size, "unknown operation %d", (int)op->kind);
}
