/* The deployment service: everything a DeploymentManager does, free of
 * Lua. It owns the targets (their providers and routers) and a reference
 * to the store; every rollout, reconcile and prune it starts holds a
 * reference to it, so closing the manager that made it returns at once
 * while its rollouts run to their end.
 *
 * Policies live here, once: which version a rollback goes to, how a target
 * is brought back to its one live version (reconcile, recovery after a
 * crash), what status and health a target reports, how a GitOps prune
 * stops a target. Strategies come from the caller (strategies/ and Lua
 * are above the runtime). */
#ifndef DEPLOY_SERVICE_H
#define DEPLOY_SERVICE_H

#include <stddef.h>

#include "action.h"
#include "engine.h"
#include "record.h"
#include "rollout.h"
#include "store.h"
#include "target.h"

typedef struct service service;

/* Takes a reference to s and ownership of targets[0..n) (sorted by name
 * here). The service starts with one reference. */
int service_new(service **out, engine *e, store *s, target_config **targets, size_t n, char *err);
service *service_ref(service *svc);
void service_unref(service *svc); /* NULL-safe */

engine *service_engine(const service *svc);
store *service_store(const service *svc);
target_config *service_target(const service *svc, const char *name); /* NULL when unknown */
size_t service_ntargets(const service *svc);
target_config *service_target_at(const service *svc, size_t i);
/* "a, b, c" for messages (heap; NULL when out of memory). */
char *service_known(const service *svc);

/* Outcomes of operations that are not rollouts. ok, or err says why;
 * locked: refused because another deployment holds the target. */
typedef void (*service_cb)(void *payload, int ok, int locked, const char *err);

/* ---- deployments ---- */

/* A rollout of version to target with strategy st (which must outlive it).
 * Same contract as rollout_start; the rollout holds the service. */
int service_deploy(service *svc, const char *target, strategy *st, const rollout_opts *o, rollout_done_cb cb,
                   void *payload, rollout **out, char *err);

/* Which version a rollback goes to: `version`, or (NULL) the target's
 * previous one, which must have been deployed successfully to the target
 * before. cb: DC_OK with the version; DC_NOTFOUND when the version was
 * never deployed there (err lists the known ones); DC_ERROR when there is
 * no previous version or the store failed. The rollout itself is a
 * service_deploy of kind "rollback". */
typedef void (*service_version_cb)(void *payload, int rc, const char *version, const char *err);
int service_rollback_version(service *svc, const char *target, const char *version, service_version_cb cb,
                             void *payload, char *err);

/* ---- repair ---- */

/* Brings the target back to exactly its live version, under its lock
 * (recorded as a deployment of kind "reconcile"): live instances that died
 * are started again, the router serves the live set only (putting back
 * what a restarted proxy forgot), every other instance is stopped. Refused
 * (locked) while a deployment of the target runs. */
int service_reconcile(service *svc, const char *target, const event_sink *sink, service_cb cb, void *payload,
                      char *err);

/* After a crash: every deployment whose owner is gone is marked
 * interrupted, and each of its targets reconciled. cb once, when all are;
 * err joins what could not be repaired. */
int service_recover(service *svc, service_cb cb, void *payload, char *err);

/* ---- reading ---- */

typedef struct service_status {
  char target[64];
  char current_version[129];   /* "" before the first deployment */
  char status[16];             /* running | deployed | failed | rolling_back */
  char health[16];             /* healthy | degraded | unhealthy */
  int instances;               /* live instances that run */
} service_status;

/* Outside a rollout the health is checked now; during one, the rollout's
 * last observation is the truth. */
typedef void (*service_status_cb)(void *payload, const service_status *st, const char *err);
int service_get_status(service *svc, const char *target, service_status_cb cb, void *payload, char *err);

typedef struct service_instance {
  store_instance row;
  int alive;                   /* the provider says it runs */
  int live;                    /* it belongs to the live deployment */
  int weight;                  /* as the router has it: -1 absent, -2 the router cannot tell */
  int healthy;                 /* answered its health check */
  char health_error[256];
} service_instance;

/* Every instance of the target with its process, router weight and health
 * read now. router_err: why the router could not be read (weights -2). */
typedef void (*service_instances_cb)(void *payload, const service_instance *v, size_t n, const char *router_err,
                                     const char *err);
int service_live_instances(service *svc, const char *target, service_instances_cb cb, void *payload, char *err);

/* ---- operator commands ---- */

/* promote / abort for the deployment of the target running now, in any
 * process, on any machine sharing the store. */
int service_control(service *svc, const char *target, const char *command, service_cb cb, void *payload, char *err);

/* ---- GitOps ---- */

/* Stops every instance of the target and records it as a deployment
 * (strategy "prune", version "") that leaves nothing live; the pruned
 * version becomes the previous one, so a rollback can bring it back. */
int service_prune(service *svc, const char *target, const char *metadata_json, const event_sink *sink, service_cb cb,
                  void *payload, char *err);

#endif
