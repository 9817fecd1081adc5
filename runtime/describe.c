/* service_describe: reads what a target's view (view.h) is made of, and
 * with `check` asks the provider which instances run and the live ones
 * for their health, now. One read after the other; nothing is written. */
#include "describe.h"

#include <stdlib.h>
#include <string.h>

#include "health.h"
#include "instset.h"
#include "util.h"

typedef struct describe_req {
  service *svc;
  target_config *t;
  int check;
  const char *restart;     /* the target's policy */
  describe_cb cb;
  void *payload;
  int have_row, have_newest, have_lock;
  store_target row;
  store_deployment newest;
  store_event *events, *live_events;
  size_t nevents, nlive_events;
  store_instance *instances;
  size_t ninstances;
  store_lock lock;
  unsigned char *alive;
  char health[16];
  int have_health;
  size_t dead_live;        /* live instances found dead: never healthy */
  char **urls;
  size_t nurls;
} describe_req;

static void free_events(store_event *v, size_t n) {
  for (size_t i = 0; i < n; i++)
    store_event_clear(&v[i]);
  free(v);
}

static void req_free(describe_req *d) {
  store_deployment_clear(&d->newest);
  free_events(d->events, d->nevents);
  free_events(d->live_events, d->nlive_events);
  free(d->instances);
  free(d->alive);
  for (size_t i = 0; i < d->nurls; i++)
    free(d->urls[i]);
  free(d->urls);
  service_unref(d->svc);
  free(d);
}

static void fail(describe_req *d, const char *err) {
  d->cb(d->payload, NULL, err);
  req_free(d);
}

static void finish(describe_req *d) {
  view_input in = {.target = d->t->name,
                   .row = d->have_row ? &d->row : NULL,
                   .newest = d->have_newest ? &d->newest : NULL,
                   .events = d->events,
                   .nevents = d->nevents,
                   .live_events = d->live_events,
                   .nlive_events = d->nlive_events,
                   .instances = d->instances,
                   .ninstances = d->ninstances,
                   .alive = d->alive,
                   .health = d->have_health ? d->health : NULL,
                   .lock = d->have_lock ? &d->lock : NULL,
                   .restart = d->restart,
                   .now = engine_now(service_engine(d->svc))};
  json_t *v = view_build(&in);
  if (!v) {
    fail(d, "deploy: out of memory");
    return;
  }
  d->cb(d->payload, v, NULL);
  json_decref(v);
  req_free(d);
}

static int copy_events(const store_result *r, store_event **out, size_t *n) {
  *out = calloc(r->nevents + 1, sizeof **out);
  if (!*out)
    return -1;
  for (size_t i = 0; i < r->nevents; i++) {
    (*out)[i] = r->events[i];
    (*out)[i].data = r->events[i].data ? strdup(r->events[i].data) : NULL;
  }
  *n = r->nevents;
  return 0;
}

/* ---- checks now: which instances run, how healthy the live set is ---- */

static void checked(void *payload, const health_result *res, size_t n) {
  describe_req *d = payload;
  health_state h = health_classify(res, n);
  /* A live instance that is dead counts: two of three serving is not a
   * healthy target. */
  if (d->dead_live > 0 && h == HEALTH_HEALTHY)
    h = HEALTH_DEGRADED;
  dc_strlcpy(d->health, health_state_name(h), sizeof d->health);
  d->have_health = 1;
  finish(d);
}

static void inspected(void *payload, const unsigned char *alive, size_t dead, const char *detail) {
  describe_req *d = payload;
  char err[DC_ERR_MAX];
  if (alive) {
    d->alive = malloc(d->ninstances + 1);
    if (d->alive)
      memcpy(d->alive, alive, d->ninstances);
  }
  int running = d->have_newest && strcmp(d->newest.status, "running") == 0;
  /* During a rollout its own last observation stands. */
  if (running || !d->have_row || !d->row.live_deployment[0]) {
    finish(d);
    return;
  }
  d->urls = calloc(d->ninstances + 1, sizeof *d->urls);
  if (!d->urls) {
    fail(d, "deploy: out of memory");
    return;
  }
  for (size_t i = 0; i < d->ninstances; i++) {
    const store_instance *in = &d->instances[i];
    if (strcmp(in->deployment_id, d->row.live_deployment) != 0 || strcmp(in->state, "running") != 0)
      continue;
    if (d->alive && d->alive[i] != INSTSET_ALIVE) {
      d->dead_live++;
      continue;
    }
    d->urls[d->nurls] = target_instance_url(d->t, in);
    d->nurls += d->urls[d->nurls] != NULL;
  }
  if (d->nurls == 0) { /* nothing of the live version runs */
    checked(d, NULL, 0);
    return;
  }
  health_opts o = {.timeout = d->t->health.timeout, .expect_status = d->t->health.expect_status};
  if (health_check_start(service_engine(d->svc), (const char *const *)d->urls, d->nurls, &o, checked, d, err) != 0)
    fail(d, err);
}

static void check_now(describe_req *d) {
  char err[DC_ERR_MAX];
  instset set = {0};
  for (size_t i = 0; i < d->ninstances; i++)
    if (instset_push(&set, &d->instances[i]) != 0) {
      instset_clear(&set);
      fail(d, "deploy: out of memory");
      return;
    }
  instset_ctx c = {service_engine(d->svc), service_store(d->svc), d->t, NULL};
  int rc = instset_inspect(&c, &set, inspected, d, err);
  instset_clear(&set);
  if (rc != 0)
    fail(d, err);
}

/* ---- the reads ---- */

static void lock_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  if (r->rc != DC_OK) {
    fail(d, r->err);
    return;
  }
  if (r->lock) {
    d->lock = *r->lock;
    d->have_lock = 1;
  }
  if (d->check)
    check_now(d);
  else
    finish(d);
}

static void instances_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    fail(d, r->err);
    return;
  }
  d->instances = calloc(r->ninstances + 1, sizeof *d->instances);
  if (!d->instances) {
    fail(d, "deploy: out of memory");
    return;
  }
  if (r->ninstances)
    memcpy(d->instances, r->instances, r->ninstances * sizeof *d->instances);
  d->ninstances = r->ninstances;
  if (store_lock_get(service_store(d->svc), d->t->name, lock_read, d, err) != 0)
    fail(d, err);
}

static void read_instances(describe_req *d) {
  char err[DC_ERR_MAX];
  if (store_instances(service_store(d->svc), d->t->name, instances_read, d, err) != 0)
    fail(d, err);
}

static void live_events_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  if (r->rc != DC_OK || copy_events(r, &d->live_events, &d->nlive_events) != 0) {
    fail(d, r->rc != DC_OK ? r->err : "deploy: out of memory");
    return;
  }
  read_instances(d);
}

static void events_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK || copy_events(r, &d->events, &d->nevents) != 0) {
    fail(d, r->rc != DC_OK ? r->err : "deploy: out of memory");
    return;
  }
  const char *live = d->have_row ? d->row.live_deployment : "";
  if (live[0] && strcmp(live, d->newest.id) != 0) {
    if (store_events(service_store(d->svc), live, live_events_read, d, err) != 0)
      fail(d, err);
    return;
  }
  read_instances(d);
}

static void history_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    fail(d, r->err);
    return;
  }
  if (r->ndeployments == 0) {
    const char *live = d->have_row ? d->row.live_deployment : "";
    if (live[0] && store_events(service_store(d->svc), live, live_events_read, d, err) != 0)
      fail(d, err);
    else if (!live[0])
      read_instances(d);
    return;
  }
  if (store_deployment_copy(&d->newest, &r->deployments[0]) != 0) {
    fail(d, "deploy: out of memory");
    return;
  }
  d->have_newest = 1;
  if (store_events(service_store(d->svc), d->newest.id, events_read, d, err) != 0)
    fail(d, err);
}

static void target_read(void *payload, const store_result *r) {
  describe_req *d = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK && r->rc != DC_NOTFOUND) {
    fail(d, r->err);
    return;
  }
  if (r->rc == DC_OK) {
    d->row = *r->target;
    d->have_row = 1;
  }
  if (store_history(service_store(d->svc), d->t->name, 1, history_read, d, err) != 0)
    fail(d, err);
}

int service_describe(service *svc, const char *target, const describe_opts *o, describe_cb cb, void *payload,
                     char *err) {
  target_config *t = service_target(svc, target);
  if (!t) {
    char *known = service_known(svc);
    dc_fmt(err, DC_ERR_MAX, "deploy: unknown target '%.64s' (known: %s)", target,
           known && *known ? known : "none configured");
    free(known);
    return DC_ERROR;
  }
  describe_req *d = calloc(1, sizeof *d);
  if (!d) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  d->svc = service_ref(svc);
  d->t = t;
  d->check = o && o->check;
  d->restart = t->restart;
  d->cb = cb;
  d->payload = payload;
  if (store_target_get(service_store(svc), target, target_read, d, err) != 0) {
    req_free(d);
    return DC_ERROR;
  }
  return DC_OK;
}
