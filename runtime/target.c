#include "target.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

void target_health_default(target_health *h) {
  dc_strlcpy(h->path, "/healthz", sizeof h->path);
  h->expect_status = 200;
  h->timeout = 2;
  h->interval = 1;
  h->failure_threshold = 3;
  h->start_timeout = 60;
}

void target_config_free(target_config *t) {
  if (!t)
    return;
  if (t->provider)
    t->provider->free(t->provider);
  if (t->router)
    t->router->free(t->router);
  free(t);
}

void target_instance_url(const target_config *t, const store_instance *i, char *buf, size_t size) {
  const char *path = t->health.path[0] ? t->health.path : "/";
  dc_fmt(buf, size, "http://%s:%d%s%s", i->host, i->port, path[0] == '/' ? "" : "/", path);
}

/* ---- reconcile ---- */

typedef struct reconcile {
  engine *e;
  store *s;
  target_config *t;
  target_cb cb;
  void *payload;
  store_target tg;
  store_instance *live, *other;
  size_t nlive, nother;
  int pending;
  char err[DC_ERR_MAX];
} reconcile;

static int grow_push(store_instance **arr, size_t *n, const store_instance *in) {
  store_instance *g = realloc(*arr, (*n + 1) * sizeof *g);
  if (!g)
    return -1;
  *arr = g;
  g[(*n)++] = *in;
  return 0;
}

static int collect(void *payload, const store_instance *in) {
  reconcile *rc = payload;
  int live = rc->tg.live_deployment[0] && strcmp(in->deployment_id, rc->tg.live_deployment) == 0;
  return grow_push(live ? &rc->live : &rc->other, live ? &rc->nlive : &rc->nother, in) != 0;
}

static void finish(reconcile *rc) {
  target_cb cb = rc->cb;
  void *payload = rc->payload;
  char err[DC_ERR_MAX];
  dc_strlcpy(err, rc->err, sizeof err);
  free(rc->live);
  free(rc->other);
  free(rc);
  cb(payload, err[0] ? err : NULL);
}

static void other_stopped(void *payload, const char *err);

typedef struct stop_ctx {
  reconcile *rc;
  int64_t id;
} stop_ctx;

static void other_stopped(void *payload, const char *err) {
  stop_ctx *sc = payload;
  reconcile *rc = sc->rc;
  char e2[DC_ERR_MAX];
  if (err && !rc->err[0])
    dc_strlcpy(rc->err, err, sizeof rc->err);
  if (!err)
    store_instance_delete(rc->s, sc->id, e2);
  free(sc);
  if (--rc->pending == 0)
    finish(rc);
}

static void routed(void *payload, const char *err) {
  reconcile *rc = payload;
  char e2[DC_ERR_MAX];
  if (err)
    dc_fmt(rc->err, sizeof rc->err, "deploy: cannot restore the router of '%s': %s", rc->t->name, err);
  rc->pending = 1;
  for (size_t i = 0; i < rc->nother; i++) {
    stop_ctx *sc = calloc(1, sizeof *sc);
    sc->rc = rc;
    sc->id = rc->other[i].id;
    rc->pending++;
    if (rc->t->provider->stop(rc->t->provider, &rc->other[i], other_stopped, sc, e2) != 0) {
      free(sc);
      rc->pending--;
    }
  }
  if (--rc->pending == 0)
    finish(rc);
}

/* An instance row whose pid was never written (deployctl died right after
 * the spawn) is found again through its DEPLOY_INSTANCE tag. */
static void adopt_unrecorded(reconcile *rc, store_instance *in) {
  char tag[600], err[DC_ERR_MAX];
  if (in->pid > 0)
    return;
  dc_fmt(tag, sizeof tag, "%s#%lld", rc->t->tag_prefix, (long long)in->id);
  int pid = provider_find_instance_pid(tag);
  if (pid > 0) {
    in->pid = pid;
    in->pid_start = dc_proc_start_time(pid);
    store_instance_update(rc->s, in, err);
  }
}

static int restart_dead(reconcile *rc, store_instance *in, char *err) {
  provider *p = rc->t->provider;
  if (p->alive(p, in))
    return 0;
  /* Marked stopped first so that its own port counts as free again; a port
   * taken meanwhile by something else gets a new one. */
  dc_strlcpy(in->state, "stopped", sizeof in->state);
  if (store_instance_update(rc->s, in, err) != 0 || p->allocate(p, rc->s, in, err) != 0 ||
      p->start(p, in, err) != 0)
    return -1;
  return store_instance_update(rc->s, in, err);
}

int target_reconcile(engine *e, store *s, target_config *t, target_cb cb, void *payload, char *err) {
  reconcile *rc = calloc(1, sizeof *rc);
  if (!rc) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  rc->e = e;
  rc->s = s;
  rc->t = t;
  rc->cb = cb;
  rc->payload = payload;
  if (store_target_get(s, t->name, &rc->tg, err) != 0 || store_instances(s, t->name, collect, rc, err) != 0) {
    free(rc->live);
    free(rc->other);
    free(rc);
    return -1;
  }
  router_server *servers = calloc(rc->nlive + 1, sizeof *servers);
  size_t n = 0;
  for (size_t i = 0; i < rc->nlive; i++)
    adopt_unrecorded(rc, &rc->live[i]);
  for (size_t i = 0; i < rc->nother; i++)
    adopt_unrecorded(rc, &rc->other[i]);
  for (size_t i = 0; i < rc->nlive; i++) {
    store_instance *in = &rc->live[i];
    if (restart_dead(rc, in, rc->err) != 0)
      continue;
    dc_strlcpy(servers[n].name, in->server, sizeof servers[n].name);
    dc_strlcpy(servers[n].host, in->host, sizeof servers[n].host);
    servers[n].port = in->port;
    servers[n++].weight = in->weight > 0 ? in->weight : 1;
  }
  int rc_apply = t->router->apply(t->router, servers, n, routed, rc, err);
  free(servers);
  if (rc_apply != 0)
    routed(rc, err);
  return 0;
}
