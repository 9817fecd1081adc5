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

/* A rollback while a deployment of the target runs (in any process
 * sharing the store): its old set still runs, so the rollback is that
 * deployment's abort, one router change, no restart. The deployment is
 * told (a "rollback" operator command) and cb runs once it has ended, with
 * its final row. cb gets DC_NOTFOUND (nothing written) when no deployment
 * of the target runs, when the running one has no old version to go back
 * to, or when `version` (NULL: any) is not the version it came from: the
 * rollback is then a deployment of its own. */
typedef void (*service_warm_cb)(void *payload, int rc, const store_deployment *d, const char *err);
int service_rollback_running(service *svc, const char *target, const char *version, service_warm_cb cb,
                             void *payload, char *err);

/* ---- repair ---- */

/* Brings the target back to exactly its live version, under its lock
 * (recorded as a deployment of kind "reconcile"): live instances that died
 * are started again, the router serves the live set only (putting back
 * what a restarted proxy forgot), every other instance is stopped. Refused
 * (locked) while a deployment of the target runs. */
int service_reconcile(service *svc, const char *target, const event_sink *sink, service_cb cb, void *payload,
                      char *err);

/* Maintenance on or off, under the target's lock (refused, locked, while
 * a deployment runs): the store says it first, then every router answers
 * 503 with the page (on) or serves the live instances again (off), the
 * instances left as they are. A router that fails puts every router and
 * the store back as they were. It lasts until turned off: reconcile,
 * recovery and rollouts keep it. Events reach the sink only. */
typedef struct service_maintenance_opts {
  int on;
  const char *message;         /* NULL or "": the default text */
  int retry_after;             /* seconds, for Retry-After */
} service_maintenance_opts;
int service_maintenance(service *svc, const char *target, const service_maintenance_opts *o, const event_sink *sink,
                        service_cb cb, void *payload, char *err);

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
  int maintenance;             /* the load balancers answer 503 */
  char maintenance_message[512];
  int maintenance_retry_after;
  double maintenance_since;    /* epoch seconds */
  char maintenance_by[128];
} service_status;

/* Outside a rollout the health is checked now; during one, the rollout's
 * last observation is the truth. */
typedef void (*service_status_cb)(void *payload, const service_status *st, const char *err);
int service_get_status(service *svc, const char *target, service_status_cb cb, void *payload, char *err);

typedef struct service_instance {
  store_instance row;
  int alive;                   /* the provider says it runs */
  int unreachable;             /* the provider could not tell (its host did not answer) */
  int live;                    /* it belongs to the live deployment */
  int weight;                  /* as the router has it: -1 absent, -2 the router cannot tell */
  int weights[TARGET_ROUTERS_MAX]; /* the same for each router of the target (target_config.routers) */
  int healthy;                 /* answered its health check */
  char health_error[256];
} service_instance;

/* Every instance of the target with its process, router weights and
 * health read now. router_err: why routers could not be read, each named
 * ("<label>: <why>; ..."; one router's own words when it is the only
 * one); their weights are -2. routers: each router and its error. */
/* Each router of the target as read (target_config.routers order). */
typedef struct service_router_view {
  const router *r;
  const char *err;             /* why it could not be read, NULL when it was */
} service_router_view;
typedef void (*service_instances_cb)(void *payload, const service_instance *v, size_t n, const char *router_err,
                                     const service_router_view *routers, size_t nrouters, const char *err);
int service_live_instances(service *svc, const char *target, service_instances_cb cb, void *payload, char *err);

/* ---- logs ---- */

/* Which instances' logs: host (a node of the target, NULL every one) and
 * version (NULL every version that has instances); the last `lines` lines
 * of each, then with follow what they write, until service_logs_stop. */
typedef struct service_logs_opts {
  const char *host;
  const char *version;
  int lines;
  int follow;
} service_logs_opts;

typedef struct service_logs service_logs;
/* A chunk of one instance's log (text valid during the call). */
typedef void (*service_logs_output_cb)(void *payload, const store_instance *in, const char *text, size_t len);
/* One instance's log ended; err: why it could not be read. */
typedef void (*service_logs_end_cb)(void *payload, const store_instance *in, const char *err);
/* Every log ended: ok, or err says why none could be read (an unknown
 * host, no instance matched). The handle is gone after this. */
typedef void (*service_logs_done_cb)(void *payload, int ok, const char *err);

typedef struct service_logs_cbs {
  service_logs_output_cb output;
  service_logs_end_cb end;
  service_logs_done_cb done;
  void *payload;
} service_logs_cbs;

/* *out (may be NULL) is valid until done runs. */
int service_logs_read(service *svc, const char *target, const service_logs_opts *o, const service_logs_cbs *cbs,
                      service_logs **out, char *err);
/* Ends every follow; the end and done callbacks run, from the loop. */
void service_logs_stop(service_logs *l);

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
