/* A target as the runtime sees it: its provider, router, health policy and
 * the nodes its instances run on, built from the configuration by the
 * bindings. */
#ifndef DEPLOY_TARGET_H
#define DEPLOY_TARGET_H

#include "analysis_spec.h"
#include "engine.h"
#include "notify.h"
#include "provider.h"
#include "router.h"
#include "ssh.h"
#include "store.h"
#include "webhook.h"

typedef struct target_health {
  char path[256];           /* "/healthz" */
  long expect_status;       /* 200 */
  double timeout;           /* seconds per check, 2 */
  double interval;          /* seconds between checks, 1 */
  int failure_threshold;    /* consecutive failures that make it unhealthy, 3 */
  double start_timeout;     /* seconds new instances get to turn healthy, 60 */
} target_health;

#define TARGET_ROUTERS_MAX 8

/* What is kept of a target's past (retain.h). */
typedef struct target_retain {
  int history;              /* deployments kept in the store, 200 */
  int versions;             /* versions whose instance logs are kept, 10 (<= history) */
  double log_mb;            /* an instance log past this many MiB is rotated, 100; 0: never */
} target_retain;

typedef struct target_config {
  char name[64];
  int instances;            /* per node, >= 1 */
  char **nodes;             /* where instances run: "" is this machine */
  size_t nnodes;            /* >= 1 */
  provider *provider;       /* owned */
  router *router;           /* owned: the target's router, or a group of them */
  /* Each load balancer of the target, for a view of each (status): the
   * router itself, or the members of its group (owned by the group). */
  router *routers[TARGET_ROUTERS_MAX];
  size_t nrouters;
  target_health health;
  /* Boot waves: a rollout starts the new instances on this many nodes at
   * a time (0: all at once), or on this share of them (boot_limit_pct,
   * 0..100, rounded up; used when boot_limit is 0), and waits until they
   * are healthy and boot_wait seconds more before the next wave. */
  int boot_limit;
  double boot_limit_pct;
  double boot_wait;
  ssh_ctx *ssh;             /* the target's ssh connections (provider, router), owned; may be NULL */
  /* What `deployctl serve` does when a live instance dies between
   * deployments (supervise.h): "on-failure" (default), "always", "never". */
  char restart[16];
  webhook_list webhooks;    /* called by every rollout of the target (webhook_hooks.h) */
  notify_list notify;       /* told about every rollout of the target (notify.h) */
  analysis_spec *analysis;  /* measured during every hold unless the strategy has its own; owned; may be NULL */
  int simulated;            /* --simulate: scripted instances, a recording router: no analysis is measured */
  target_retain retain;
} target_config;

void target_health_default(target_health *h);
/* A target with one node, this machine; NULL when out of memory. */
target_config *target_config_new(const char *name);
void target_config_free(target_config *t); /* frees provider, router, ssh, nodes, webhooks; NULL-safe */

/* How many nodes one boot wave starts on (>= 1). */
size_t target_wave_size(const target_config *t);

/* The health URL of one instance (heap), or NULL when out of memory. */
char *target_instance_url(const target_config *t, const store_instance *i);

#endif
