#include "target.h"

#include <math.h>
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

target_config *target_config_new(const char *name) {
  target_config *t = calloc(1, sizeof *t);
  if (!t)
    return NULL;
  t->nodes = calloc(2, sizeof *t->nodes);
  if (!t->nodes || !(t->nodes[0] = strdup(""))) {
    free(t->nodes);
    free(t);
    return NULL;
  }
  t->nnodes = 1;
  t->instances = 1;
  dc_strlcpy(t->name, name, sizeof t->name);
  target_health_default(&t->health);
  dc_strlcpy(t->restart, "on-failure", sizeof t->restart);
  t->retain = (target_retain){.history = 200, .versions = 10, .log_mb = 100};
  return t;
}

void target_config_free(target_config *t) {
  if (!t)
    return;
  if (t->provider)
    t->provider->free(t->provider);
  if (t->router)
    t->router->free(t->router);  /* a group frees its members */
  else
    for (size_t i = 0; i < t->nrouters; i++)  /* a config that failed before the group */
      t->routers[i]->free(t->routers[i]);
  /* After both: they cancel their commands, which live in it. */
  ssh_ctx_free(t->ssh);
  webhook_list_clear(&t->webhooks);
  notify_list_clear(&t->notify);
  analysis_spec_free(t->analysis);
  for (size_t i = 0; i < t->nnodes; i++)
    free(t->nodes[i]);
  free(t->nodes);
  free(t);
}

char *target_instance_url(const target_config *t, const store_instance *i) {
  const char *path = t->health.path[0] ? t->health.path : "/";
  dc_buf b = {0};
  int v6 = strchr(i->host, ':') != NULL;
  dc_buf_printf(&b, "http://%s%s%s:%d%s%s", v6 ? "[" : "", i->host, v6 ? "]" : "", i->port, path[0] == '/' ? "" : "/",
                path);
  return dc_buf_take(&b);
}

size_t target_wave_size(const target_config *t) {
  size_t n = t->nnodes;
  if (t->boot_limit > 0)
    n = (size_t)t->boot_limit;
  else if (t->boot_limit_pct > 0)
    n = (size_t)ceil((double)t->nnodes * t->boot_limit_pct / 100.0 - 1e-9);
  if (n < 1)
    n = 1;
  return n < t->nnodes ? n : t->nnodes;
}
