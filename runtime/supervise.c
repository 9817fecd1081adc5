#include "supervise.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "instset.h"
#include "json.h"
#include "provider.h"
#include "record.h"
#include "util.h"

#define MAX_TIMES 64

typedef struct sup_target {
  struct supervise *sv;
  target_config *t;
  int busy;                    /* a look or a restart in flight */
  char live[48];               /* the live deployment supervised */
  double times[MAX_TIMES];     /* restarts within the window */
  int ntimes;
  int degraded;
  int pending;                 /* a death seen, its restart not done yet */
  double due;                  /* not before (backoff) */
  double backoff;
  long restarts;               /* since start */
  instset live_set, dead;
  json_t *started;             /* the reconcile's instance_started data */
} sup_target;

struct supervise {
  service *svc;
  uv_timer_t timer;
  supervise_opts o;
  sup_target *targets;
  size_t n;
  int inflight;
  int stopping;
  int closed;
};

static double now_of(const supervise *sv) { return dc_wall_now(); }

static void free_sv(supervise *sv) {
  for (size_t i = 0; i < sv->n; i++) {
    instset_clear(&sv->targets[i].live_set);
    instset_clear(&sv->targets[i].dead);
    json_decref(sv->targets[i].started);
  }
  free(sv->targets);
  service_unref(sv->svc);
  free(sv);
}

static void maybe_free(supervise *sv) {
  if (sv->stopping && sv->closed && sv->inflight == 0)
    free_sv(sv);
}

static void done(sup_target *st) {
  supervise *sv = st->sv;
  st->busy = 0;
  instset_clear(&st->live_set);
  instset_clear(&st->dead);
  sv->inflight--;
  maybe_free(sv);
}

static void record_on_live(sup_target *st, const char *kind, json_t *data) {
  record rc;
  record_init(&rc, service_engine(st->sv->svc), service_store(st->sv->svc), st->t->name, st->live, NULL);
  record_event(&rc, kind, data);
  record_clear(&rc);
}

/* "signal 9", "status 1", "status 0", or "unknown" (not our child). */
static void exit_text(const store_instance *in, char *buf, size_t size, int *clean) {
  int status = 0, sig = 0;
  *clean = 0;
  if (in->node[0] || !in->pid || !provider_process_exit_status(in->pid, in->pid_start, &status, &sig)) {
    dc_strlcpy(buf, "unknown", size);
    return;
  }
  if (sig)
    dc_fmt(buf, size, "signal %d", sig);
  else
    dc_fmt(buf, size, "status %d", status);
  *clean = sig == 0 && status == 0;
}

/* ---- the restart ---- */

static void on_reconcile_event(void *payload, const store_event *ev) {
  sup_target *st = payload;
  if (strcmp(ev->kind, "instance_started") != 0 || !ev->data)
    return;
  json_t *data = json_loads(ev->data, 0, NULL);
  if (data)
    json_array_append_new(st->started, data);
}

static const store_instance *dead_slot(const sup_target *st, int idx, const char *node) {
  for (size_t i = 0; i < st->dead.n; i++)
    if (st->dead.v[i].idx == idx && strcmp(st->dead.v[i].node, node) == 0)
      return &st->dead.v[i];
  return NULL;
}

static void reconciled(void *payload, int ok, int locked, const char *err) {
  sup_target *st = payload;
  supervise *sv = st->sv;
  if (locked || sv->stopping) {
    done(st);
    return;
  }
  double now = now_of(sv);
  size_t i;
  json_t *started;
  json_array_foreach(st->started, i, started) {
    int idx = (int)json_integer_value(json_object_get(started, "instance"));
    const char *node = json_string_value(json_object_get(started, "node"));
    const store_instance *old = dead_slot(st, idx, node ? node : "");
    char exit[32] = "unknown";
    int clean;
    if (old)
      exit_text(old, exit, sizeof exit, &clean);
    if (st->ntimes < MAX_TIMES)
      st->times[st->ntimes++] = now;
    st->restarts++;
    json_t *data = json_pack("{s:O, s:O, s:O, s:O, s:i, s:s, s:i, s:o}", "instance", json_object_get(started, "instance"),
                             "version", json_object_get(started, "version"), "pid", json_object_get(started, "pid"),
                             "port", json_object_get(started, "port"), "old_pid", old ? old->pid : 0, "exit", exit,
                             "restarts", st->ntimes, "backoff", dc_json_number(st->backoff));
    record_on_live(st, "instance_restarted", data);
  }
  if (!ok) {
    if (st->ntimes < MAX_TIMES)
      st->times[st->ntimes++] = now;
    record_on_live(st, "restart_failed", json_pack("{s:o, s:i}", "error", dc_json_text(err ? err : "failed"),
                                                   "restarts", st->ntimes));
  }
  st->pending = 0;
  json_decref(st->started);
  st->started = NULL;
  done(st);
}

static void restart(sup_target *st) {
  char err[DC_ERR_MAX];
  st->started = json_array();
  event_sink sink = {on_reconcile_event, st};
  if (service_reconcile(st->sv->svc, st->t->name, &sink, reconciled, st, err) != DC_OK)
    reconciled(st, 0, 0, err);
}

/* ---- the look ---- */

static void keep_window(sup_target *st, double now) {
  int k = 0;
  for (int i = 0; i < st->ntimes; i++)
    if (now - st->times[i] <= st->sv->o.window)
      st->times[k++] = st->times[i];
  st->ntimes = k;
}

static void inspected(void *payload, const unsigned char *alive, size_t ndead, const char *detail) {
  sup_target *st = payload;
  supervise *sv = st->sv;
  if (sv->stopping || !alive) {
    done(st);
    return;
  }
  int any_dead = 0, all_clean = 1;
  char first_exit[32] = "";
  for (size_t i = 0; i < st->live_set.n; i++) {
    if (alive[i] != INSTSET_DEAD)
      continue;
    int clean;
    char exit[32];
    exit_text(&st->live_set.v[i], exit, sizeof exit, &clean);
    if (!first_exit[0])
      dc_strlcpy(first_exit, exit, sizeof first_exit);
    all_clean &= clean;
    any_dead = 1;
    instset_push(&st->dead, &st->live_set.v[i]);
  }
  double now = now_of(sv);
  keep_window(st, now);
  if (!any_dead) {
    if (st->degraded) {
      st->degraded = 0;
      st->ntimes = 0;
      record_on_live(st, "recovered", json_pack("{s:s}", "reason", "every live instance runs again"));
    }
    st->pending = 0;
    done(st);
    return;
  }
  const char *policy = st->t->restart;
  if (st->degraded || strcmp(policy, "never") == 0 || (strcmp(policy, "on-failure") == 0 && all_clean)) {
    done(st);
    return;
  }
  if (st->ntimes >= sv->o.max_restarts) {
    char reason[DC_ERR_MAX];
    dc_fmt(reason, sizeof reason, "%s died again after %d restarts in %g s (%s): not restarted any more; fix it and "
           "run 'deployctl reconcile %s', or deploy another version", detail ? detail : "an instance", st->ntimes,
           sv->o.window, first_exit, st->t->name);
    st->degraded = 1;
    record_on_live(st, "degraded", json_pack("{s:o, s:i}", "reason", dc_json_text(reason), "restarts", st->ntimes));
    done(st);
    return;
  }
  if (!st->pending) {
    st->pending = 1;
    st->backoff = st->ntimes == 0 ? 0 : fmin(pow(2, st->ntimes - 1), sv->o.backoff_max);
    st->due = now + st->backoff;
  }
  if (now < st->due) {
    done(st);
    return;
  }
  restart(st);
}

static void rows_read(void *payload, const store_result *r) {
  sup_target *st = payload;
  char err[DC_ERR_MAX];
  instset others = {0};
  if (r->rc != DC_OK || st->sv->stopping ||
      instset_split(r->instances, r->ninstances, st->live, &st->live_set, &others) != 0 || st->live_set.n == 0) {
    instset_clear(&others);
    done(st);
    return;
  }
  instset_clear(&others);
  instset_ctx c = {service_engine(st->sv->svc), service_store(st->sv->svc), st->t, NULL};
  if (instset_inspect(&c, &st->live_set, inspected, st, err) != 0)
    done(st);
}

static void row_read(void *payload, const store_result *r) {
  sup_target *st = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK || st->sv->stopping || !r->target->live_deployment[0]) {
    done(st);
    return;
  }
  if (strcmp(st->live, r->target->live_deployment) != 0) {
    /* A new deployment went live: its record starts clean. */
    dc_strlcpy(st->live, r->target->live_deployment, sizeof st->live);
    st->degraded = 0;
    st->ntimes = 0;
    st->pending = 0;
  }
  if (store_instances(service_store(st->sv->svc), st->t->name, rows_read, st, err) != 0)
    done(st);
}

static void lock_read(void *payload, const store_result *r) {
  sup_target *st = payload;
  char err[DC_ERR_MAX];
  /* Held: a rollout or a reconcile owns the instances now. */
  if (r->rc != DC_OK || r->lock || st->sv->stopping) {
    st->pending = 0;
    done(st);
    return;
  }
  if (store_target_get(service_store(st->sv->svc), st->t->name, row_read, st, err) != 0)
    done(st);
}

static void tick(uv_timer_t *h) {
  supervise *sv = h->data;
  char err[DC_ERR_MAX];
  for (size_t i = 0; i < sv->n; i++) {
    sup_target *st = &sv->targets[i];
    if (st->busy)
      continue;
    st->busy = 1;
    sv->inflight++;
    if (store_lock_get(service_store(sv->svc), st->t->name, lock_read, st, err) != 0)
      done(st);
  }
}

int supervise_start(supervise **out, service *svc, const supervise_opts *o, char *err) {
  *out = NULL;
  supervise *sv = calloc(1, sizeof *sv);
  size_t n = service_ntargets(svc);
  if (!sv || !(sv->targets = calloc(n + 1, sizeof *sv->targets))) {
    free(sv);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  sv->svc = service_ref(svc);
  sv->n = n;
  sv->o.interval = o && o->interval > 0 ? o->interval : 1;
  sv->o.backoff_max = o && o->backoff_max > 0 ? o->backoff_max : 60;
  sv->o.max_restarts = o && o->max_restarts > 0 ? o->max_restarts : 5;
  sv->o.window = o && o->window > 0 ? o->window : 300;
  for (size_t i = 0; i < n; i++) {
    sv->targets[i].sv = sv;
    sv->targets[i].t = service_target_at(svc, i);
  }
  uv_timer_init(service_engine(svc)->loop, &sv->timer);
  sv->timer.data = sv;
  uint64_t ms = (uint64_t)(sv->o.interval * 1000);
  uv_timer_start(&sv->timer, tick, ms, ms);
  *out = sv;
  return DC_OK;
}

long supervise_restarts(const supervise *sv, const char *target) {
  for (size_t i = 0; sv && i < sv->n; i++)
    if (strcmp(sv->targets[i].t->name, target) == 0)
      return sv->targets[i].restarts;
  return 0;
}

static void timer_closed(uv_handle_t *h) {
  supervise *sv = h->data;
  sv->closed = 1;
  maybe_free(sv);
}

void supervise_stop(supervise *sv) {
  if (!sv || sv->stopping)
    return;
  sv->stopping = 1;
  uv_timer_stop(&sv->timer);
  uv_close((uv_handle_t *)&sv->timer, timer_closed);
}
