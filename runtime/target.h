/* A target as the runtime sees it: its provider, router and health policy,
 * built from the configuration by the bindings. And the one repair
 * operation every crash path ends in: target_reconcile. */
#ifndef DEPLOY_TARGET_H
#define DEPLOY_TARGET_H

#include "engine.h"
#include "provider.h"
#include "router.h"
#include "store.h"

typedef struct target_health {
  char path[256];           /* "/healthz" */
  long expect_status;       /* 200 */
  double timeout;           /* seconds per check, 2 */
  double interval;          /* seconds between checks, 1 */
  int failure_threshold;    /* consecutive failures that make it unhealthy, 3 */
  double start_timeout;     /* seconds new instances get to turn healthy, 60 */
} target_health;

typedef struct target_config {
  char name[64];
  int instances;            /* per version, >= 1 */
  provider *provider;       /* owned */
  router *router;           /* owned */
  target_health health;
  char tag_prefix[512];     /* absolute store path, for DEPLOY_INSTANCE tags */
} target_config;

void target_health_default(target_health *h);
void target_config_free(target_config *t); /* frees provider and router; NULL-safe */

/* The health URL of one instance. */
void target_instance_url(const target_config *t, const store_instance *i,
                         char *buf, size_t size);

typedef void (*target_cb)(void *payload, const char *err);

/* Bring the target back to exactly one version, its live one (the store's
 * live_deployment): instances of the live set that died are started again,
 * the router serves the live set only (re-adding what a restarted HAProxy
 * forgot), every other instance of the target is stopped and its row
 * removed. Used after a crash, and by `deployctl status --repair`.
 * Asynchronous; cb once. */
int target_reconcile(engine *e, store *s, target_config *t, target_cb cb,
                     void *payload, char *err);

#endif
