/* Instance sets: the life-cycle steps every operation on a target shares
 * (rollouts, reconcile and recovery, GitOps prunes), written once.
 *
 * Starting and stopping follow one rule: the store knows first. A row is
 * added (and committed) before the provider starts the instance, so a
 * crash in between leaves a row through which the instance is found again;
 * a row is marked "stopping" before the provider is asked to stop it. */
#ifndef DEPLOY_INSTSET_H
#define DEPLOY_INSTSET_H

#include <stddef.h>

#include "record.h"
#include "router.h"
#include "store.h"
#include "target.h"

typedef struct instset {
  store_instance *v;
  size_t n, cap;
} instset;

int instset_push(instset *s, const store_instance *in); /* -1 when out of memory */
void instset_clear(instset *s);

/* Splits a target's rows into its live set (the live deployment's rows
 * that are not stopped) and every other row. -1 when out of memory. */
int instset_split(const store_instance *rows, size_t n, const char *live_deployment, instset *live, instset *others);

/* The router's view of a set: one server per instance at `weight`;
 * out has room for s->n entries. Returns how many were written. */
size_t instset_servers(const instset *s, int weight, router_server *out);

/* What the operations work with: where to record, what to act on. */
typedef struct instset_ctx {
  engine *e;
  store *s;
  target_config *t;
  record *rc;               /* the deployment the events belong to */
} instset_ctx;

/* err: NULL, or the first failure (valid during the call). */
typedef void (*instset_cb)(void *payload, const char *err);

/* Rows for `per_node` new instances of a deployment's version on each of
 * the target's nodes, indices from first_idx on (state "starting"). */
int instset_plan(const target_config *t, const char *deployment_id, const char *version, int per_node, int first_idx,
                 instset *out);

/* Starts one instance per template row (target, deployment_id, version,
 * node and idx filled), appending each row to `into` as it is added
 * (failed ones stay, marked stopped, for the caller to clean up). An
 * "instance_started" event each. cb once, from the loop, when all are
 * running or have failed. */
int instset_start(const instset_ctx *c, instset *into, const instset *templates, instset_cb cb, void *payload,
                  char *err);

/* Stops every instance of `set` (copied: the caller may free it at once),
 * removing their rows; an "instance_stopped" event each, "stop_failed"
 * when the provider could not. cb once, from the loop, when all are done. */
int instset_stop(const instset_ctx *c, const instset *set, instset_cb cb, void *payload, char *err);

/* Asks the provider whether each instance of `set` runs. alive[i] says it
 * for set->v[i]: INSTSET_ALIVE, INSTSET_DEAD, or INSTSET_UNKNOWN when the
 * provider could not tell (its host unreachable); dead is the number not
 * known to run (dead or unknown); detail describes the first of them
 * ("instance 1 of 2.0 (pid 123, port 20001) exited; see <log>", or
 * "instance 2 of 2.0 on app2: <why the provider could not tell>"). cb
 * once, from the loop. */
enum { INSTSET_DEAD = 0, INSTSET_ALIVE = 1, INSTSET_UNKNOWN = 2 };
typedef void (*instset_alive_cb)(void *payload, const unsigned char *alive, size_t dead, const char *detail);
int instset_inspect(const instset_ctx *c, const instset *set, instset_alive_cb cb, void *payload, char *err);

#endif
