#include "service.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "health.h"
#include "instset.h"
#include "json.h"
#include "notify.h"
#include "retain.h"
#include "util.h"
#include "webhook_hooks.h"

struct service {
  engine *e;
  store *s;
  target_config **targets; /* sorted by name */
  size_t n;
  int refs;
};

static int by_name(const void *a, const void *b) {
  return strcmp((*(target_config *const *)a)->name, (*(target_config *const *)b)->name);
}

int service_new(service **out, engine *e, store *s, target_config **targets, size_t n, char *err) {
  *out = NULL;
  for (size_t i = 0; i < n; i++) {
    if (provider_check(targets[i]->provider, err) != 0 || router_check(targets[i]->router, err) != 0)
      return DC_ERROR;
    if (targets[i]->nrouters == 0) { /* one router: the view of it is itself */
      targets[i]->routers[0] = targets[i]->router;
      targets[i]->nrouters = 1;
    }
  }
  service *svc = calloc(1, sizeof *svc);
  if (!svc) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  svc->e = e;
  svc->s = store_ref(s);
  svc->targets = targets;
  svc->n = n;
  svc->refs = 1;
  qsort(targets, n, sizeof *targets, by_name);
  *out = svc;
  return DC_OK;
}

service *service_ref(service *svc) {
  svc->refs++;
  return svc;
}

void service_unref(service *svc) {
  if (!svc || --svc->refs > 0)
    return;
  for (size_t i = 0; i < svc->n; i++)
    target_config_free(svc->targets[i]);
  free(svc->targets);
  store_unref(svc->s);
  free(svc);
}

engine *service_engine(const service *svc) { return svc->e; }
store *service_store(const service *svc) { return svc->s; }
size_t service_ntargets(const service *svc) { return svc->n; }
target_config *service_target_at(const service *svc, size_t i) { return i < svc->n ? svc->targets[i] : NULL; }

target_config *service_target(const service *svc, const char *name) {
  for (size_t i = 0; i < svc->n; i++)
    if (strcmp(svc->targets[i]->name, name) == 0)
      return svc->targets[i];
  return NULL;
}

char *service_known(const service *svc) {
  dc_buf b = {0};
  for (size_t i = 0; i < svc->n; i++)
    dc_buf_printf(&b, "%s%s", i ? ", " : "", svc->targets[i]->name);
  return dc_buf_take(&b);
}

static target_config *check_target(const service *svc, const char *name, char *err) {
  target_config *t = service_target(svc, name);
  if (!t) {
    char *known = service_known(svc);
    dc_fmt(err, DC_ERR_MAX, "deploy: unknown target '%.64s' (known: %s)", name,
           known && *known ? known : "none configured");
    free(known);
  }
  return t;
}

/* ---- deploy ---- */

/* What a rollout of the service carries besides itself: the webhooks
 * (the target's and the strategy's) and the target's notifications, both
 * fed every event before the caller's sink sees it. */
typedef struct run_ref {
  service *svc;
  rollout_done_cb cb;
  void *payload;
  webhook_hooks *hooks;    /* NULL: no webhook */
  notifier *notify;        /* NULL: nobody to tell */
  event_sink sink;         /* the caller's */
  rollout **handle;        /* the caller's pointer to the rollout, cleared as it ends */
  rollout_result res;      /* a copy, held while the retention runs */
  char **errors;
} run_ref;

static void run_event(void *payload, const store_event *ev) {
  run_ref *rr = payload;
  webhook_hooks_event(rr->hooks, ev);
  notifier_event(rr->notify, ev);
  if (rr->sink.emit)
    rr->sink.emit(rr->sink.payload, ev);
}

static void run_free(run_ref *rr) {
  webhook_hooks_release(rr->hooks);
  notifier_release(rr->notify);
  service_unref(rr->svc);
  free(rr);
}

/* The target's webhooks with the strategy's over them (same name: the
 * strategy's); a rollback runs only the event ones. */
static int run_extras(run_ref *rr, const target_config *t, const rollout_opts *o, rollout_opts *out, char *err) {
  *out = *o;
  rr->sink = o->sink;
  out->sink = (event_sink){run_event, rr};
  /* A dry run tells nobody and asks nobody: its gates pass, as they would
   * with every receiver answering 2xx. */
  if (t->simulated) {
    out->webhook_hooks = NULL;
    return 0;
  }
  webhook_list all;
  if (webhook_list_merge(&all, &t->webhooks, o->webhooks, err) != 0)
    return -1;
  int events_only = o->kind && strcmp(o->kind, "rollback") == 0;
  rr->hooks = webhook_hooks_new(rr->svc->e, &all, events_only);
  int oom = all.n > 0 && !rr->hooks;
  webhook_list_clear(&all);
  rr->notify = notifier_new(rr->svc->e, &t->notify);
  if (oom || (t->notify.n > 0 && !rr->notify)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  out->webhook_hooks = webhook_hooks_vtable(rr->hooks);
  return 0;
}

static void run_report(run_ref *rr) {
  rr->res.errors = (const char *const *)rr->errors;
  if (rr->cb)
    rr->cb(rr->payload, &rr->res);
  for (size_t i = 0; i < rr->res.nerrors; i++)
    free(rr->errors[i]);
  free(rr->errors);
  run_free(rr);
}

static void retained(void *payload, const retain_result *r) {
  /* Retention never fails a deployment: the next one tries again. */
  if (r->err)
    fprintf(stderr, "deployctl: retention: %s\n", r->err);
  run_report(payload);
}

/* After every deployment that ran (not one refused as locked), what is
 * past the target's retention goes, before the caller hears of the end:
 * whoever deploys next finds the store and the logs within their limits. */
static void run_done(void *payload, const rollout_result *res) {
  run_ref *rr = payload;
  char err[DC_ERR_MAX];
  /* The rollout is gone once this returns, while the caller hears of the
   * end only after the retention: its handle must not outlive the rollout. */
  if (rr->handle)
    *rr->handle = NULL;
  rr->res = *res;
  rr->res.nerrors = 0;
  rr->errors = res->nerrors ? calloc(res->nerrors, sizeof *rr->errors) : NULL;
  for (size_t i = 0; rr->errors && i < res->nerrors; i++)
    if ((rr->errors[i] = strdup(res->errors[i])) != NULL)
      rr->res.nerrors++;
  if (!res->recorded || retain_target(rr->svc, res->target, retained, rr, err) != DC_OK) {
    if (res->recorded)
      fprintf(stderr, "deployctl: retention: %s\n", err);
    run_report(rr);
  }
}

int service_deploy(service *svc, const char *target, strategy *st, const rollout_opts *o, rollout_done_cb cb,
                   void *payload, rollout **out, char *err) {
  rollout *r = NULL;
  target_config *t = check_target(svc, target, err);
  if (!t)
    return DC_ERROR;
  run_ref *rr = calloc(1, sizeof *rr);
  if (!rr) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  rr->svc = service_ref(svc);
  rr->cb = cb;
  rr->payload = payload;
  rr->handle = out;
  rollout_opts with;
  if (run_extras(rr, t, o, &with, err) != 0 || rollout_start(&r, svc->e, svc->s, t, st, &with, run_done, rr, err) != DC_OK) {
    run_free(rr);
    return DC_ERROR;
  }
  if (out)
    *out = r;
  return DC_OK;
}

/* ---- rollback: which version ---- */

typedef struct rollback_req {
  service *svc;
  char target[64];
  char version[129];       /* "" previous */
  store_target tg;
  service_version_cb cb;
  void *payload;
} rollback_req;

static void rollback_answer(rollback_req *rq, int rc, const char *version, const char *err) {
  rq->cb(rq->payload, rc, version, err);
  service_unref(rq->svc);
  free(rq);
}

static void history_read(void *payload, const store_result *r) {
  rollback_req *rq = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    rollback_answer(rq, DC_ERROR, NULL, r->err);
    return;
  }
  const char *want = rq->version[0] ? rq->version : rq->tg.previous_version;
  dc_buf known = {0};
  int found = 0;
  for (size_t i = 0; i < r->ndeployments; i++) {
    const store_deployment *d = &r->deployments[i];
    if (strcmp(d->status, "succeeded") != 0 || strcmp(d->kind, "reconcile") == 0 || !d->version[0])
      continue;
    found |= strcmp(d->version, want) == 0;
    if (!known.data || !strstr(known.data, d->version))
      dc_buf_printf(&known, "%s%s", known.len ? ", " : "", d->version);
  }
  if (!found)
    dc_fmt(err, sizeof err, "deploy: rollback: version '%s' was never deployed successfully to '%s' (known: %s)", want,
           rq->target, known.len ? known.data : "none");
  dc_buf_free(&known);
  rollback_answer(rq, found ? DC_OK : DC_NOTFOUND, want, found ? NULL : err);
}

static void rollback_target_read(void *payload, const store_result *r) {
  rollback_req *rq = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    rollback_answer(rq, DC_ERROR, NULL, r->err);
    return;
  }
  rq->tg = *r->target;
  if (!rq->version[0] && !rq->tg.previous_version[0]) {
    dc_fmt(err, sizeof err,
           "deploy: '%s' has no previous version to roll back to: name one with rollback(target, version)", rq->target);
    rollback_answer(rq, DC_ERROR, rq->tg.current_version, err);
    return;
  }
  if (store_history(rq->svc->s, rq->target, 0, history_read, rq, err) != 0)
    rollback_answer(rq, DC_ERROR, NULL, err);
}

int service_rollback_version(service *svc, const char *target, const char *version, service_version_cb cb,
                             void *payload, char *err) {
  if (!check_target(svc, target, err))
    return DC_ERROR;
  if (version && dc_validate_version(version, "rollback: version", err) != 0)
    return DC_ERROR;
  rollback_req *rq = calloc(1, sizeof *rq);
  if (!rq) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  rq->svc = service_ref(svc);
  dc_strlcpy(rq->target, target, sizeof rq->target);
  dc_strlcpy(rq->version, version ? version : "", sizeof rq->version);
  rq->cb = cb;
  rq->payload = payload;
  if (store_target_get(svc->s, target, rollback_target_read, rq, err) != 0) {
    service_unref(svc);
    free(rq);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- operations under the lock: reconcile, prune ---- */

typedef struct locked_op locked_op;
typedef void (*locked_step)(locked_op *op);

struct locked_op {
  service *svc;
  target_config *t;
  record rc;
  double started;
  store_target tg;
  instset live, others, dead;
  int promote;             /* prune: the row's version becomes current */
  int lock_only;           /* reconcile: a lock, no deployment row */
  route_rules routes;      /* what route_live gives the router besides the servers */
  int all_or_nothing;
  void (*routed_then)(locked_op *op, const char *err); /* after route_live */
  store_maintenance maint, maint_before;             /* maintenance: wanted, and as it was */
  service_cb cb;
  void *payload;
  char *metadata;
};

static instset_ctx op_ctx(locked_op *op) {
  instset_ctx c = {op->svc->e, op->svc->s, op->t, &op->rc};
  return c;
}

static void op_free(locked_op *op) {
  instset_clear(&op->live);
  instset_clear(&op->others);
  instset_clear(&op->dead);
  record_clear(&op->rc);
  free(op->metadata);
  service_unref(op->svc);
  free(op);
}

static void op_finished(void *payload, const store_result *r) {
  locked_op *op = payload;
  if (r->rc != DC_OK)
    record_error(&op->rc, r->err);
  int ok = op->rc.nerrors == 0;
  dc_buf msg = {0};
  for (size_t i = 0; i < op->rc.nerrors; i++)
    dc_buf_printf(&msg, "%s%s", i ? "; " : "", op->rc.errors[i]);
  op->cb(op->payload, ok, 0, ok ? NULL : msg.data ? msg.data : "failed");
  dc_buf_free(&msg);
  op_free(op);
}

static void op_finish(locked_op *op) {
  char err[DC_ERR_MAX];
  double now = engine_now(op->svc->e);
  int ok = op->rc.nerrors == 0;
  /* Before the end itself, so that it is committed with it. */
  record_event(&op->rc, "finished", json_pack("{s:b, s:o}", "success", ok, "duration", dc_json_number(dc_round_ms(now - op->started))));
  if (op->lock_only) {
    if (store_lock_release(op->svc->s, op->t->name, op->rc.id, op_finished, op, err) != 0) {
      store_result res = {.rc = DC_ERROR, .err = err};
      op_finished(op, &res);
    }
    return;
  }
  char *errors = record_errors_json(&op->rc);
  store_finish f = {.id = op->rc.id,
                    .status = ok ? "succeeded" : "failed",
                    .errors_json = errors,
                    .finished_at = now,
                    .duration = now - op->started,
                    .promoted = op->promote && ok,
                    .target_status = op->promote ? "deployed" : NULL,
                    .target_health = op->promote && ok ? "unhealthy" : NULL};
  int rc = store_deployment_finish(op->svc->s, &f, op_finished, op, err);
  free(errors);
  if (rc != 0) {
    store_result res = {.rc = DC_ERROR, .err = err};
    op_finished(op, &res);
  }
}

static void others_stopped(void *payload, const char *err) {
  locked_op *op = payload;
  if (err)
    record_error(&op->rc, err);
  op_finish(op);
}

static void stop_others(locked_op *op) {
  char err[DC_ERR_MAX];
  instset_ctx c = op_ctx(op);
  /* The dead live instances that were replaced go with the others. */
  for (size_t i = 0; i < op->dead.n; i++)
    instset_push(&op->others, &op->dead.v[i]);
  if (instset_stop(&c, &op->others, others_stopped, op, err) != 0)
    others_stopped(op, err);
}

static void reconcile_routed(locked_op *op, const char *err) {
  if (err) {
    record_errorf(&op->rc, "deploy: cannot restore the router of '%s': %s", op->t->name, err);
    /* Instances the router may still send traffic to keep running. */
    op_finish(op);
    return;
  }
  stop_others(op);
}

static void routed(void *payload, const char *err) {
  locked_op *op = payload;
  engine_release(op->svc->e);
  op->routed_then(op, err);
}

/* The target's maintenance as its row says, for the router. */
static void maintenance_routes(route_rules *r, const store_target *tg) {
  memset(r, 0, sizeof *r);
  r->maintenance = tg->maintenance;
  dc_strlcpy(r->maintenance_message, tg->maintenance_message, sizeof r->maintenance_message);
  r->retry_after = tg->maintenance_retry_after;
}

static void route_live(locked_op *op) {
  char err[DC_ERR_MAX];
  router_server *servers = calloc(op->live.n + 1, sizeof *servers);
  size_t n = 0;
  if (!servers) {
    record_error(&op->rc, "deploy: out of memory");
    op_finish(op);
    return;
  }
  for (size_t i = 0; i < op->live.n; i++) {
    if (strcmp(op->live.v[i].state, "running") != 0)
      continue;
    instset one = {&op->live.v[i], 1, 1};
    n += instset_servers(&one, op->live.v[i].weight > 0 ? op->live.v[i].weight : 1, servers + n);
  }
  engine_hold(op->svc->e);
  router_plan plan = {.servers = servers, .n = n, .routes = op->routes, .all_or_nothing = op->all_or_nothing};
  int rc = op->t->router->apply(op->t->router, &plan, routed, op, err);
  free(servers);
  if (rc != 0)
    routed(op, err);
}

static void replaced(void *payload, const char *err) {
  locked_op *op = payload;
  if (err)
    record_error(&op->rc, err);
  route_live(op);
}

/* Which live instances died: they are replaced by new instances of the
 * same deployment, version, node and index. */
static void live_inspected(void *payload, const unsigned char *alive, size_t ndead, const char *detail) {
  locked_op *op = payload;
  char err[DC_ERR_MAX];
  if (ndead == 0 || !alive) {
    route_live(op);
    return;
  }
  /* The dead rows leave the live set; their replacements join it. One
   * whose host could not be asked stays as it is: replacing it there is
   * not possible, and elsewhere would put the version twice on a host
   * once it is back. */
  instset still = {0};
  int unknown = 0;
  for (size_t i = 0; i < op->live.n; i++) {
    unknown |= alive[i] == INSTSET_UNKNOWN;
    instset_push(alive[i] != INSTSET_DEAD ? &still : &op->dead, &op->live.v[i]);
  }
  instset_clear(&op->live);
  op->live = still;
  if (unknown)
    record_errorf(&op->rc, "deploy: live instances of '%s' could not be checked, and were left as they are: %s; "
                  "run 'deployctl reconcile %s' again once the host is back", op->t->name, detail ? detail : "",
                  op->t->name);
  if (op->dead.n == 0) {
    route_live(op);
    return;
  }
  instset_ctx c = op_ctx(op);
  if (instset_start(&c, &op->live, &op->dead, replaced, op, err) != 0)
    replaced(op, err);
}

static void live_check(locked_op *op) {
  char err[DC_ERR_MAX];
  instset_ctx c = op_ctx(op);
  if (instset_inspect(&c, &op->live, live_inspected, op, err) != 0) {
    record_error(&op->rc, err);
    route_live(op);
  }
}

static void reconcile_begun(void *payload, const store_result *r) {
  locked_op *op = payload;
  if (r->rc != DC_OK) {
    op->cb(op->payload, 0, r->rc == DC_LOCKED, r->err);
    op_free(op);
    return;
  }
  op->tg = *r->target;
  maintenance_routes(&op->routes, &op->tg);
  op->routed_then = reconcile_routed;
  if (instset_split(r->instances, r->ninstances, op->tg.live_deployment, &op->live, &op->others) != 0) {
    record_error(&op->rc, "deploy: out of memory");
    op_finish(op);
    return;
  }
  record_event(&op->rc, "started",
               json_pack("{s:s, s:s, s:s, s:s}", "version", op->tg.current_version, "from", op->tg.current_version,
                         "strategy", "reconcile", "kind", "reconcile"));
  live_check(op);
}

static locked_op *locked_op_new(service *svc, target_config *t, int lock_only, const event_sink *sink, service_cb cb,
                                void *payload, char *err) {
  locked_op *op = calloc(1, sizeof *op);
  if (!op) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  op->svc = service_ref(svc);
  op->t = t;
  op->cb = cb;
  op->payload = payload;
  op->started = engine_now(svc->e);
  op->lock_only = lock_only;
  /* A reconcile only repairs: no history row, its events only reach the
   * sink. */
  record_init(&op->rc, svc->e, lock_only ? NULL : svc->s, t->name, NULL, sink);
  return op;
}

static int locked_op_begin(locked_op *op, const char *version, const char *kind, const char *strategy,
                           store_cb begun, char *err) {
  store_deployment d;
  record_row(&op->rc, &d, version, kind, strategy, op->started, op->metadata);
  if (store_deployment_begin(op->svc->s, &d, begun, op, err) != 0) {
    op_free(op);
    return DC_ERROR;
  }
  return DC_OK;
}

int service_reconcile(service *svc, const char *target, const event_sink *sink, service_cb cb, void *payload,
                      char *err) {
  target_config *t = check_target(svc, target, err);
  if (!t)
    return DC_ERROR;
  locked_op *op = locked_op_new(svc, t, 1, sink, cb, payload, err);
  if (!op)
    return DC_ERROR;
  if (store_lock_take(svc->s, t->name, op->rc.id, "reconcile", reconcile_begun, op, err) != 0) {
    op_free(op);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- prune ---- */

static void prune_stopped(void *payload, const char *err) {
  locked_op *op = payload;
  if (err)
    record_error(&op->rc, err);
  op_finish(op);
}

static void prune_routed(void *payload, const char *err) {
  locked_op *op = payload;
  char e2[DC_ERR_MAX];
  engine_release(op->svc->e);
  if (err) {
    record_errorf(&op->rc, "deploy: cannot take '%s' out of its router: %s", op->t->name, err);
    op_finish(op);
    return;
  }
  instset_ctx c = op_ctx(op);
  for (size_t i = 0; i < op->live.n; i++)
    instset_push(&op->others, &op->live.v[i]);
  if (instset_stop(&c, &op->others, prune_stopped, op, e2) != 0)
    prune_stopped(op, e2);
}

static void prune_begun(void *payload, const store_result *r) {
  locked_op *op = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    op->cb(op->payload, 0, r->rc == DC_LOCKED, r->err);
    op_free(op);
    return;
  }
  op->tg = *r->target;
  op->promote = 1;
  if (instset_split(r->instances, r->ninstances, op->tg.live_deployment, &op->live, &op->others) != 0) {
    record_error(&op->rc, "deploy: out of memory");
    op_finish(op);
    return;
  }
  record_event(&op->rc, "started",
               json_pack("{s:s, s:s, s:s, s:s}", "kind", "prune", "from", op->tg.current_version, "version", "",
                         "strategy", "prune"));
  engine_hold(op->svc->e);
  router_plan plan = {.servers = NULL, .n = 0};
  maintenance_routes(&plan.routes, &op->tg);
  if (op->t->router->apply(op->t->router, &plan, prune_routed, op, err) != 0)
    prune_routed(op, err);
}

int service_prune(service *svc, const char *target, const char *metadata_json, const event_sink *sink, service_cb cb,
                  void *payload, char *err) {
  target_config *t = check_target(svc, target, err);
  if (!t)
    return DC_ERROR;
  locked_op *op = locked_op_new(svc, t, 0, sink, cb, payload, err);
  if (!op)
    return DC_ERROR;
  if (metadata_json && !(op->metadata = strdup(metadata_json))) {
    op_free(op);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  return locked_op_begin(op, "", "deploy", "prune", prune_begun, err);
}


/* ---- maintenance ---- */

static void maintenance_put_back(void *payload, const store_result *r) {
  locked_op *op = payload;
  if (r->rc != DC_OK)
    record_errorf(&op->rc, "deploy: and the state could not be set back: %s (run 'deployctl maintenance %s %s')",
                  r->err, op->t->name, op->maint_before.on ? "on" : "off");
  op_finish(op);
}

static void maintenance_routed(locked_op *op, const char *err) {
  char e2[DC_ERR_MAX];
  if (err) {
    /* Every router is back where it was (all or nothing): the state too. */
    record_errorf(&op->rc, "deploy: maintenance of '%s' not turned %s: %s", op->t->name, op->maint.on ? "on" : "off",
                  err);
    if (store_maintenance_set(op->svc->s, op->t->name, &op->maint_before, maintenance_put_back, op, e2) != 0) {
      store_result res = {.rc = DC_ERROR, .err = e2};
      maintenance_put_back(op, &res);
    }
    return;
  }
  record_event(&op->rc, "maintenance",
               json_pack("{s:b, s:o, s:i}", "on", op->maint.on, "message", dc_json_text(op->maint.message),
                         "retry_after", op->maint.retry_after));
  op_finish(op);
}

static void maintenance_recorded(void *payload, const store_result *r) {
  locked_op *op = payload;
  if (r->rc != DC_OK) {
    record_error(&op->rc, r->err);
    op_finish(op);
    return;
  }
  route_live(op);
}

static void maintenance_begun(void *payload, const store_result *r) {
  locked_op *op = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    op->cb(op->payload, 0, r->rc == DC_LOCKED, r->err);
    op_free(op);
    return;
  }
  op->tg = *r->target;
  op->maint_before.on = op->tg.maintenance;
  dc_strlcpy(op->maint_before.message, op->tg.maintenance_message, sizeof op->maint_before.message);
  op->maint_before.retry_after = op->tg.maintenance_retry_after;
  op->maint_before.since = op->tg.maintenance_since;
  dc_strlcpy(op->maint_before.by, op->tg.maintenance_by, sizeof op->maint_before.by);
  memset(&op->routes, 0, sizeof op->routes);
  op->routes.maintenance = op->maint.on;
  dc_strlcpy(op->routes.maintenance_message, op->maint.message, sizeof op->routes.maintenance_message);
  op->routes.retry_after = op->maint.retry_after;
  op->all_or_nothing = 1;
  op->routed_then = maintenance_routed;
  if (instset_split(r->instances, r->ninstances, op->tg.live_deployment, &op->live, &op->others) != 0) {
    record_error(&op->rc, "deploy: out of memory");
    op_finish(op);
    return;
  }
  /* The store first: a crash from here on finds the flag, and recovery
   * puts every router where the flag says. */
  if (store_maintenance_set(op->svc->s, op->t->name, &op->maint, maintenance_recorded, op, err) != 0) {
    record_error(&op->rc, err);
    op_finish(op);
  }
}

int service_maintenance(service *svc, const char *target, const service_maintenance_opts *o, const event_sink *sink,
                        service_cb cb, void *payload, char *err) {
  target_config *t = check_target(svc, target, err);
  if (!t)
    return DC_ERROR;
  const char *message = o->message ? o->message : "";
  if (routes_check_message(message, "maintenance message", err) != DC_OK ||
      routes_check_retry_after(o->retry_after, "maintenance retry_after", err) != DC_OK)
    return DC_ERROR;
  router_plan asks = {.routes = {.maintenance = 1}};
  if (o->on && router_check_plan(t->router, &asks, err) != DC_OK)
    return DC_ERROR;
  locked_op *op = locked_op_new(svc, t, 1, sink, cb, payload, err);
  if (!op)
    return DC_ERROR;
  op->maint.on = o->on;
  if (o->on) {
    dc_strlcpy(op->maint.message, message, sizeof op->maint.message);
    op->maint.retry_after = o->retry_after;
    op->maint.since = dc_wall_now();
    dc_whoami(op->maint.by, sizeof op->maint.by);
  }
  if (store_lock_take(svc->s, t->name, op->rc.id, "maintenance", maintenance_begun, op, err) != 0) {
    op_free(op);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- recovery ---- */

typedef struct recovery {
  service *svc;
  int pending;
  dc_buf errors;
  service_cb cb;
  void *payload;
} recovery;

static void recovery_step_done(recovery *rv) {
  if (--rv->pending > 0)
    return;
  int ok = rv->errors.len == 0;
  rv->cb(rv->payload, ok, 0, ok ? NULL : rv->errors.data);
  dc_buf_free(&rv->errors);
  service_unref(rv->svc);
  free(rv);
}

static void target_recovered(void *payload, int ok, int locked, const char *err) {
  recovery *rv = payload;
  /* Locked: another process took the target meanwhile; its rollout (or its
   * own recovery) brings it to one version. */
  if (!ok && !locked)
    dc_buf_printf(&rv->errors, "%s%s", rv->errors.len ? "; " : "", err);
  recovery_step_done(rv);
}

static void interrupted_read(void *payload, const store_result *r) {
  recovery *rv = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    dc_buf_puts(&rv->errors, r->err);
    recovery_step_done(rv);
    return;
  }
  for (size_t i = 0; i < r->ndeployments; i++) {
    const char *target = r->deployments[i].target;
    int seen = 0;
    for (size_t k = 0; k < i; k++)
      seen |= strcmp(r->deployments[k].target, target) == 0;
    if (seen || !service_target(rv->svc, target))
      continue;
    rv->pending++;
    if (service_reconcile(rv->svc, target, NULL, target_recovered, rv, err) != DC_OK)
      target_recovered(rv, 0, 0, err);
  }
  recovery_step_done(rv);
}

int service_recover(service *svc, service_cb cb, void *payload, char *err) {
  recovery *rv = calloc(1, sizeof *rv);
  if (!rv) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  rv->svc = service_ref(svc);
  rv->cb = cb;
  rv->payload = payload;
  rv->pending = 1;
  if (store_recover(svc->s, interrupted_read, rv, err) != 0) {
    service_unref(svc);
    free(rv);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- status ---- */

typedef struct status_req {
  service *svc;
  target_config *t;
  service_status st;
  char live[48];           /* the live deployment */
  int running;             /* a rollout is under way: its observation stands */
  instset rows, live_set, others;
  unsigned char *alive;
  char **urls;
  size_t nurls;
  service_status_cb cb;
  service_instances_cb icb;
  void *payload;
  /* live_instances: one read per router of the target */
  service_instance *v;
  struct router_view {
    struct status_req *sr;
    router_server *servers;
    size_t n;
    char err[DC_ERR_MAX];
  } views[TARGET_ROUTERS_MAX];
  int pending;
} status_req;

static void status_free(status_req *sr) {
  for (size_t i = 0; i < sr->nurls; i++)
    free(sr->urls[i]);
  free(sr->urls);
  free(sr->alive);
  free(sr->v);
  for (size_t i = 0; i < TARGET_ROUTERS_MAX; i++)
    free(sr->views[i].servers);
  instset_clear(&sr->rows);
  instset_clear(&sr->live_set);
  instset_clear(&sr->others);
  service_unref(sr->svc);
  free(sr);
}

static void status_fail(status_req *sr, const char *err) {
  if (sr->cb)
    sr->cb(sr->payload, NULL, err);
  else
    sr->icb(sr->payload, NULL, 0, NULL, NULL, 0, err);
  status_free(sr);
}

static void status_checked(void *payload, const health_result *res, size_t n) {
  status_req *sr = payload;
  dc_strlcpy(sr->st.health, health_state_name(health_classify(res, n)), sizeof sr->st.health);
  sr->cb(sr->payload, &sr->st, NULL);
  status_free(sr);
}

static void status_alive(void *payload, const unsigned char *alive, size_t dead, const char *detail) {
  status_req *sr = payload;
  char err[DC_ERR_MAX];
  (void)dead;
  (void)detail;
  sr->urls = calloc(sr->live_set.n + 1, sizeof *sr->urls);
  if (!sr->urls) {
    status_fail(sr, "deploy: out of memory");
    return;
  }
  for (size_t i = 0; alive && i < sr->live_set.n; i++) {
    if (alive[i] != INSTSET_ALIVE)
      continue;
    sr->st.instances++;
    sr->urls[sr->nurls] = target_instance_url(sr->t, &sr->live_set.v[i]);
    sr->nurls += sr->urls[sr->nurls] != NULL;
  }
  if (sr->running) {
    sr->cb(sr->payload, &sr->st, NULL);
    status_free(sr);
    return;
  }
  health_opts o = {.timeout = sr->t->health.timeout, .expect_status = sr->t->health.expect_status};
  if (health_check_start(sr->svc->e, (const char *const *)sr->urls, sr->nurls, &o, status_checked, sr, err) != 0)
    status_fail(sr, err);
}

static void status_rows(void *payload, const store_result *r);

static void status_target(void *payload, const store_result *r) {
  status_req *sr = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    status_fail(sr, r->err);
    return;
  }
  dc_strlcpy(sr->st.target, r->target->name, sizeof sr->st.target);
  dc_strlcpy(sr->st.current_version, r->target->current_version, sizeof sr->st.current_version);
  dc_strlcpy(sr->st.status, r->target->status, sizeof sr->st.status);
  dc_strlcpy(sr->st.health, r->target->health, sizeof sr->st.health);
  sr->st.maintenance = r->target->maintenance;
  dc_strlcpy(sr->st.maintenance_message, r->target->maintenance_message, sizeof sr->st.maintenance_message);
  sr->st.maintenance_retry_after = r->target->maintenance_retry_after;
  sr->st.maintenance_since = r->target->maintenance_since;
  dc_strlcpy(sr->st.maintenance_by, r->target->maintenance_by, sizeof sr->st.maintenance_by);
  dc_strlcpy(sr->live, r->target->live_deployment, sizeof sr->live);
  sr->running = strcmp(r->target->status, "running") == 0 || strcmp(r->target->status, "rolling_back") == 0;
  if (store_instances(sr->svc->s, sr->t->name, status_rows, sr, err) != 0)
    status_fail(sr, err);
}

static status_req *status_new(service *svc, const char *target, char *err) {
  target_config *t = check_target(svc, target, err);
  if (!t)
    return NULL;
  status_req *sr = calloc(1, sizeof *sr);
  if (!sr) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  sr->svc = service_ref(svc);
  sr->t = t;
  return sr;
}

int service_get_status(service *svc, const char *target, service_status_cb cb, void *payload, char *err) {
  status_req *sr = status_new(svc, target, err);
  if (!sr)
    return DC_ERROR;
  sr->cb = cb;
  sr->payload = payload;
  if (store_target_get(svc->s, target, status_target, sr, err) != 0) {
    status_free(sr);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- every instance, read live ---- */

static void instances_done(status_req *sr) {
  if (--sr->pending > 0)
    return;
  dc_buf errs = {0};
  for (size_t k = 0; k < sr->t->nrouters; k++)
    if (sr->views[k].err[0])
      dc_buf_printf(&errs, "%s%s: %s", errs.len ? "; " : "", sr->t->routers[k]->label, sr->views[k].err);
  for (size_t i = 0; i < sr->rows.n; i++) {
    service_instance *si = &sr->v[i];
    for (size_t k = 0; k < sr->t->nrouters; k++) {
      const struct router_view *rv = &sr->views[k];
      /* A router without weights has no servers to read back. */
      si->weights[k] = -2;
      if (rv->err[0] || sr->t->routers[k]->ratio_only)
        continue;
      si->weights[k] = -1;
      for (size_t j = 0; j < rv->n; j++)
        if (strcmp(rv->servers[j].name, si->row.server) == 0)
          si->weights[k] = rv->servers[j].weight;
    }
    si->weight = si->weights[0];
  }
  /* One router: its own words, as before there could be several. */
  const char *router_err = sr->t->nrouters == 1 && sr->views[0].err[0] ? sr->views[0].err : errs.data;
  service_router_view views[TARGET_ROUTERS_MAX];
  for (size_t k = 0; k < sr->t->nrouters; k++) {
    views[k].r = sr->t->routers[k];
    views[k].err = sr->views[k].err[0] ? sr->views[k].err : NULL;
  }
  sr->icb(sr->payload, sr->v, sr->rows.n, router_err, views, sr->t->nrouters, NULL);
  dc_buf_free(&errs);
  status_free(sr);
}

static void instances_routed(void *payload, const char *err) {
  struct router_view *rv = payload;
  if (err)
    dc_strlcpy(rv->err, err, sizeof rv->err);
  instances_done(rv->sr);
}

static void instances_checked(void *payload, const health_result *res, size_t n) {
  status_req *sr = payload;
  for (size_t i = 0; i < n && i < sr->rows.n; i++) {
    sr->v[i].healthy = res[i].ok;
    if (!res[i].ok)
      dc_strlcpy(sr->v[i].health_error, res[i].error, sizeof sr->v[i].health_error);
  }
  instances_done(sr);
}

static void instances_alive(void *payload, const unsigned char *alive, size_t dead, const char *detail) {
  status_req *sr = payload;
  (void)dead;
  (void)detail;
  for (size_t i = 0; alive && i < sr->rows.n; i++) {
    sr->v[i].alive = alive[i] == INSTSET_ALIVE;
    sr->v[i].unreachable = alive[i] == INSTSET_UNKNOWN;
  }
  instances_done(sr);
}

static void instance_rows(status_req *sr, const store_result *r) {
  char err[DC_ERR_MAX];
  const char *live = sr->live;
  sr->v = calloc(r->ninstances + 1, sizeof *sr->v);
  sr->urls = calloc(r->ninstances + 1, sizeof *sr->urls);
  int oom = !sr->v || !sr->urls;
  for (size_t k = 0; k < sr->t->nrouters; k++) {
    sr->views[k].sr = sr;
    oom |= (sr->views[k].servers = calloc(256, sizeof *sr->views[k].servers)) == NULL;
  }
  if (oom) {
    status_fail(sr, "deploy: out of memory");
    return;
  }
  for (size_t i = 0; i < r->ninstances; i++) {
    instset_push(&sr->rows, &r->instances[i]);
    sr->v[i].row = r->instances[i];
    sr->v[i].live = live[0] && strcmp(r->instances[i].deployment_id, live) == 0;
    sr->urls[i] = target_instance_url(sr->t, &r->instances[i]);
    sr->nurls += sr->urls[i] != NULL;
  }
  sr->pending = 3 + (int)sr->t->nrouters; /* each router, liveness, health, and this function */
  for (size_t k = 0; k < sr->t->nrouters; k++) {
    router *rt = sr->t->routers[k];
    struct router_view *rv = &sr->views[k];
    if (rt->read(rt, rv->servers, 256, &rv->n, instances_routed, rv, err) != 0)
      instances_routed(rv, err);
  }
  instset_ctx c = {sr->svc->e, sr->svc->s, sr->t, NULL};
  if (instset_inspect(&c, &sr->rows, instances_alive, sr, err) != 0)
    instances_alive(sr, NULL, 0, NULL);
  health_opts o = {.timeout = sr->t->health.timeout, .expect_status = sr->t->health.expect_status};
  if (sr->nurls != sr->rows.n ||
      health_check_start(sr->svc->e, (const char *const *)sr->urls, sr->nurls, &o, instances_checked, sr, err) != 0)
    instances_done(sr);
  instances_done(sr);
}

static void status_rows(void *payload, const store_result *r) {
  status_req *sr = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    status_fail(sr, r->err);
    return;
  }
  if (sr->icb) {
    instance_rows(sr, r);
    return;
  }
  if (instset_split(r->instances, r->ninstances, sr->live, &sr->live_set, &sr->others) != 0) {
    status_fail(sr, "deploy: out of memory");
    return;
  }
  instset_ctx c = {sr->svc->e, sr->svc->s, sr->t, NULL};
  if (instset_inspect(&c, &sr->live_set, status_alive, sr, err) != 0)
    status_fail(sr, err);
}

static void instances_target(void *payload, const store_result *r) {
  status_req *sr = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    status_fail(sr, r->err);
    return;
  }
  dc_strlcpy(sr->live, r->target->live_deployment, sizeof sr->live);
  if (store_instances(sr->svc->s, sr->t->name, status_rows, sr, err) != 0)
    status_fail(sr, err);
}

int service_live_instances(service *svc, const char *target, service_instances_cb cb, void *payload, char *err) {
  status_req *sr = status_new(svc, target, err);
  if (!sr)
    return DC_ERROR;
  sr->icb = cb;
  sr->payload = payload;
  if (store_target_get(svc->s, target, instances_target, sr, err) != 0) {
    status_free(sr);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- logs ---- */

typedef struct log_stream {
  struct service_logs *l;
  store_instance in;
  provider_stream *ps;
  int open;
} log_stream;

struct service_logs {
  service *svc;
  target_config *t;
  service_logs_opts o;
  char host[256], version[129];
  service_logs_cbs cbs;
  log_stream *streams;
  size_t n;
  int pending;
  int stopping;
  char err[DC_ERR_MAX];
};

static void logs_done(service_logs *l) {
  if (--l->pending > 0)
    return;
  l->cbs.done(l->cbs.payload, l->err[0] == '\0', l->err[0] ? l->err : NULL);
  free(l->streams);
  service_unref(l->svc);
  free(l);
}

static void log_chunk(void *payload, const char *text, size_t len, int done, const char *err) {
  log_stream *ls = payload;
  service_logs *l = ls->l;
  if (len > 0)
    l->cbs.output(l->cbs.payload, &ls->in, text, len);
  if (!done)
    return;
  ls->open = 0;
  ls->ps = NULL;
  l->cbs.end(l->cbs.payload, &ls->in, err);
  logs_done(l);
}

static void logs_rows(void *payload, const store_result *r) {
  service_logs *l = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    dc_strlcpy(l->err, r->err, sizeof l->err);
    logs_done(l);
    return;
  }
  l->streams = calloc(r->ninstances + 1, sizeof *l->streams);
  if (!l->streams) {
    dc_fmt(l->err, sizeof l->err, "deploy: out of memory");
    logs_done(l);
    return;
  }
  for (size_t i = 0; i < r->ninstances; i++) {
    const store_instance *in = &r->instances[i];
    if (strcmp(in->state, "stopped") == 0 || (l->host[0] && strcmp(in->node, l->host) != 0) ||
        (l->version[0] && strcmp(in->version, l->version) != 0))
      continue;
    log_stream *ls = &l->streams[l->n++];
    ls->l = l;
    ls->in = *in;
  }
  if (l->n == 0)
    dc_fmt(l->err, sizeof l->err, "deploy: no instance of '%s'%s%s%s%s runs: nothing to read (see deployctl status %s)",
           l->t->name, l->version[0] ? " at version " : "", l->version, l->host[0] ? " on host " : "", l->host,
           l->t->name);
  provider *p = l->t->provider;
  for (size_t i = 0; i < l->n && !l->stopping; i++) {
    log_stream *ls = &l->streams[i];
    l->pending++;
    ls->open = 1;
    if (p->logs(p, &ls->in, l->o.lines, l->o.follow, log_chunk, ls, &ls->ps, err) != 0) {
      ls->open = 0;
      l->cbs.end(l->cbs.payload, &ls->in, err);
      logs_done(l);
    }
  }
  logs_done(l);
}

int service_logs_read(service *svc, const char *target, const service_logs_opts *o, const service_logs_cbs *cbs,
                      service_logs **out, char *err) {
  if (out)
    *out = NULL;
  target_config *t = check_target(svc, target, err);
  if (!t)
    return DC_ERROR;
  if (o->host && *o->host) {
    int known = 0;
    for (size_t i = 0; i < t->nnodes; i++)
      known |= strcmp(t->nodes[i], o->host) == 0;
    if (!known) {
      dc_buf b = {0};
      for (size_t i = 0; i < t->nnodes; i++)
        dc_buf_printf(&b, "%s%s", i ? ", " : "", t->nodes[i][0] ? t->nodes[i] : "this machine");
      dc_fmt(err, DC_ERR_MAX, "deploy: '%.200s' is not a host of '%s' (its hosts: %s)", o->host, target,
             b.data ? b.data : "");
      dc_buf_free(&b);
      return DC_ERROR;
    }
  }
  if (o->version && *o->version && dc_validate_version(o->version, "logs: version", err) != 0)
    return DC_ERROR;
  service_logs *l = calloc(1, sizeof *l);
  if (!l) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  l->svc = service_ref(svc);
  l->t = t;
  l->o = *o;
  l->cbs = *cbs;
  dc_strlcpy(l->host, o->host ? o->host : "", sizeof l->host);
  dc_strlcpy(l->version, o->version ? o->version : "", sizeof l->version);
  l->pending = 1;
  if (store_instances(svc->s, t->name, logs_rows, l, err) != 0) {
    service_unref(svc);
    free(l);
    return DC_ERROR;
  }
  if (out)
    *out = l;
  return DC_OK;
}

void service_logs_stop(service_logs *l) {
  if (!l || l->stopping)
    return;
  l->stopping = 1;
  provider *p = l->t->provider;
  for (size_t i = 0; i < l->n; i++)
    if (l->streams[i].open && l->streams[i].ps)
      p->logs_stop(p, l->streams[i].ps);
}

/* ---- rollback inside a warm window ---- */

#define WARM_POLL_S 0.1

typedef struct warm_req {
  service *svc;
  char target[64];
  char version[129];       /* "" any */
  char id[48];             /* the running deployment */
  service_warm_cb cb;
  void *payload;
  int told;                /* the rollback command is written */
} warm_req;

static void warm_end(warm_req *w, int rc, const store_deployment *d, const char *err) {
  w->cb(w->payload, rc, d, err);
  service_unref(w->svc);
  free(w);
}

/* Its runner is a process of this machine that is gone: nobody would act
 * on the command (the next deployment recovers the target instead). */
static int owner_gone(const store_deployment *d) {
  char host[64] = "";
  if (gethostname(host, sizeof host - 1) != 0 || strcmp(host, d->owner_host) != 0)
    return 0;
  return d->owner_pid <= 0 || !dc_proc_alive(d->owner_pid, d->owner_start);
}

static void warm_poll(void *payload);

/* Watches the deployment until it has ended. */
static void warm_row(void *payload, const store_result *r) {
  warm_req *w = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK || r->ndeployments < 1) {
    warm_end(w, r->rc == DC_OK ? DC_ERROR : r->rc, NULL, r->err ? r->err : "deployment not found");
    return;
  }
  const store_deployment *d = &r->deployments[0];
  if (!w->told) {
    /* Only a deployment that has an old set to go back to, the one asked for. */
    char who[128];
    if (strcmp(d->status, "running") != 0 || strcmp(d->kind, "deploy") != 0 || !d->from_version[0] ||
        (w->version[0] && strcmp(w->version, d->from_version) != 0) || owner_gone(d)) {
      warm_end(w, DC_NOTFOUND, NULL, NULL);
      return;
    }
    dc_whoami(who, sizeof who);
    /* Its answer is the deployment's end, watched below. */
    if (store_control_set(w->svc->s, w->target, "rollback", who, NULL, NULL, err) != 0) {
      warm_end(w, DC_ERROR, NULL, err);
      return;
    }
    w->told = 1;
  } else if (strcmp(d->status, "running") != 0) {
    warm_end(w, DC_OK, d, NULL);
    return;
  }
  if (!engine_timer_start(w->svc->e, WARM_POLL_S, warm_poll, w))
    warm_end(w, DC_ERROR, NULL, "deploy: out of memory");
}

static void warm_poll(void *payload) {
  warm_req *w = payload;
  char err[DC_ERR_MAX];
  if (store_deployment_get(w->svc->s, w->id, warm_row, w, err) != 0)
    warm_end(w, DC_ERROR, NULL, err);
}

static void warm_lock(void *payload, const store_result *r) {
  warm_req *w = payload;
  if (r->rc != DC_OK || !r->lock || strcmp(r->lock->purpose, "deploy") != 0) {
    warm_end(w, r->rc == DC_OK || r->rc == DC_NOTFOUND ? DC_NOTFOUND : r->rc, NULL, r->err);
    return;
  }
  dc_strlcpy(w->id, r->lock->deployment_id, sizeof w->id);
  warm_poll(w);
}

int service_rollback_running(service *svc, const char *target, const char *version, service_warm_cb cb,
                             void *payload, char *err) {
  if (!check_target(svc, target, err))
    return DC_ERROR;
  warm_req *w = calloc(1, sizeof *w);
  if (!w) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  w->svc = service_ref(svc);
  dc_strlcpy(w->target, target, sizeof w->target);
  dc_strlcpy(w->version, version ? version : "", sizeof w->version);
  w->cb = cb;
  w->payload = payload;
  if (store_lock_get(svc->s, target, warm_lock, w, err) != 0) {
    service_unref(svc);
    free(w);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ---- operator commands ---- */

typedef struct control_req {
  service *svc;
  service_cb cb;
  void *payload;
} control_req;

static void control_set(void *payload, const store_result *r) {
  control_req *cr = payload;
  cr->cb(cr->payload, r->rc == DC_OK, 0, r->rc == DC_OK ? NULL : r->err);
  service_unref(cr->svc);
  free(cr);
}

int service_control(service *svc, const char *target, const char *command, service_cb cb, void *payload, char *err) {
  char who[128];
  if (!check_target(svc, target, err))
    return DC_ERROR;
  control_req *cr = calloc(1, sizeof *cr);
  if (!cr) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  cr->svc = service_ref(svc);
  cr->cb = cb;
  cr->payload = payload;
  dc_whoami(who, sizeof who);
  if (store_control_set(svc->s, target, command, who, control_set, cr, err) != 0) {
    service_unref(svc);
    free(cr);
    return DC_ERROR;
  }
  return DC_OK;
}
