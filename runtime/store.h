/* The store: deployctl's durable state, behind one interface and two
 * backends: SQLite (store_sqlite.c, a file on this machine) and PostgreSQL
 * (store_pg.c, shared by several runners). store_backend.h is what a
 * backend implements; this file is what the rest of the runtime calls.
 *
 * Every call is asynchronous from the loop's point of view: it queues an
 * operation, and its callback runs later, from the loop, never inside the
 * call. The callback's result is valid only while it runs.
 *
 * Writes: every write queued during one loop turn, by every rollout of the
 * process, is committed in one transaction (group commit) before any of
 * their callbacks runs. A caller that waits for its callback before acting
 * never acts on an unrecorded step, and a hundred rollouts side by side pay
 * for one commit, not a hundred. Each write runs in its own savepoint: one
 * that fails (a target locked by another runner) is undone and reported
 * alone; a failed commit fails every write of the batch.
 *
 * Reads never open a write transaction; they see what was committed when
 * they run. Operator commands (promote, abort) are rows read by the runner
 * that holds the deployment: polling them writes nothing.
 *
 * Schema (version 3; `meta.schema_version` says which one a store has):
 *   targets(name PK, current_version, previous_version, live_deployment,
 *           status, health, updated_at, maintenance, maintenance_message,
 *           maintenance_retry_after, maintenance_since, maintenance_by)
 *   deployments(seq PK, id UNIQUE, target, version, from_version,
 *           kind deploy|rollback, strategy, status, created_at, finished_at,
 *           duration, errors JSON, metadata JSON, owner_pid, owner_start,
 *           owner_host, user)
 *   events(id PK, deployment_id, target, ts, kind, data JSON)
 *   locks(target PK, deployment_id, purpose deploy|reconcile, pid,
 *           pid_start, host, acquired_at, expires_at)
 *   instances(id PK, target, deployment_id, version, idx, node, host, port,
 *           handle, pid, pid_start, state, weight, server, log_path,
 *           started_at)
 *   controls(id PK, deployment_id, target, command, requested_at,
 *           requested_by)
 *
 * Strings in the rows below are fixed-size where their size is a real
 * limit (validated names, versions and ids) and always NUL-terminated; JSON
 * columns are heap strings passed through as text. */
#ifndef DEPLOY_STORE_H
#define DEPLOY_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

#define STORE_SCHEMA_VERSION 3

typedef struct store store;

typedef struct store_target {
  char name[64];
  char current_version[129];   /* "" when never deployed */
  char previous_version[129];  /* "" when none */
  char live_deployment[48];    /* deployment whose instances serve, "" none */
  char status[16];             /* running | deployed | failed | rolling_back */
  char health[16];             /* healthy | degraded | unhealthy */
  double updated_at;
  /* Maintenance (schema 3): the load balancers answer 503 with a page. */
  int maintenance;
  char maintenance_message[512]; /* "" the default text */
  int maintenance_retry_after;   /* seconds */
  double maintenance_since;      /* epoch seconds (wall clock), 0 when off */
  char maintenance_by[128];      /* user@host */
} store_target;

/* What store_maintenance_set writes on a target's row. */
typedef struct store_maintenance {
  int on;
  char message[512];
  int retry_after;
  double since;
  char by[128];
} store_maintenance;

typedef struct store_deployment {
  char id[48];
  int64_t seq;                 /* insertion order, assigned by the store */
  char target[64];
  char version[129];
  char from_version[129];      /* version live when it started, "" none
                                  (begin fills it in when left empty) */
  char kind[16];               /* deploy | rollback */
  char strategy[64];           /* strategy name */
  char status[16];             /* running | succeeded | failed | interrupted */
  double created_at;           /* epoch seconds (engine clock) */
  double finished_at;          /* 0 while running */
  double duration;             /* seconds */
  char *errors;                /* JSON array of strings, or NULL; heap */
  char *metadata;              /* JSON object, or NULL; heap */
  int owner_pid;
  uint64_t owner_start;        /* dc_proc_start_time(owner_pid) */
  char owner_host[64];
  char user[128];              /* user@host */
} store_deployment;

typedef struct store_event {
  int64_t id;
  char deployment_id[48];
  char target[64];
  double ts;                   /* epoch seconds (engine clock: may be virtual) */
  char kind[48];
  char *data;                  /* JSON object or NULL; heap */
} store_event;

typedef struct store_instance {
  int64_t id;                  /* assigned by store_instance_add */
  char target[64];
  char deployment_id[48];
  char version[129];
  int idx;                     /* 0..n-1 inside its deployment */
  char node[256];              /* where it runs: "" this machine, else an ssh destination */
  char host[256];              /* the address routed to and health-checked */
  int port;                    /* 0 until started */
  char handle[128];            /* the provider's identity of it, "" until started */
  int pid;                     /* for people: 0 until started */
  uint64_t pid_start;
  char state[16];              /* starting | running | stopping | stopped */
  int weight;                  /* router weight wanted for it (0..256) */
  char server[64];             /* router server name, e.g. "dc_12" */
  char log_path[512];
  double started_at;
} store_instance;

typedef struct store_lock {
  char target[64];
  char deployment_id[48];      /* the holder: a deployment, or a reconcile's own id */
  char purpose[16];            /* deploy | reconcile */
  int pid;
  uint64_t pid_start;
  char host[64];
  double acquired_at;
  double expires_at;           /* 0: held while its owner process lives */
} store_lock;

typedef struct store_control {
  int64_t id;                  /* increasing: a runner acts on each once */
  char deployment_id[48];      /* the deployment it is for, never "the target's next" */
  char target[64];
  char command[16];            /* promote | abort */
  double requested_at;
  char requested_by[128];
} store_control;

/* The end of a deployment (store_deployment_finish). */
typedef struct store_finish {
  const char *id;
  const char *status;          /* succeeded | failed */
  const char *errors_json;     /* JSON array of strings, or NULL */
  double finished_at, duration;
  int promoted;                /* also make it the target's live deployment */
  const char *target_status;   /* NULL: unchanged */
  const char *target_health;   /* NULL: unchanged */
} store_finish;

/* What an operation came back with. Lists are valid only during the
 * callback; copy what must outlive it. */
typedef struct store_result {
  int rc;                      /* DC_OK, DC_LOCKED, DC_NOTFOUND, DC_AMBIGUOUS or DC_ERROR */
  const char *err;             /* why, when rc != DC_OK: names the thing and the fix */
  int64_t id;                  /* instance_add: the new id; control_set: the control's */
  const store_target *target;  /* target_get; deployment_begin: the target as locked */
  const store_lock *lock;      /* lock_get (NULL when not locked) */
  const store_deployment *deployments; /* deployment_get (1), history, recover, control_set (1) */
  size_t ndeployments;
  const store_instance *instances;     /* instances; deployment_begin: the target's */
  size_t ninstances;
  const store_event *events;
  size_t nevents;
  const store_control *controls;
  size_t ncontrols;
  const int *ports;            /* ports_in_use */
  size_t nports;
} store_result;

typedef void (*store_cb)(void *payload, const store_result *r);

/* Opens (creating it as needed) and migrates the store at `location`: a
 * file path for SQLite, or "postgresql://..." / "postgres://...".
 * Refuses a store written by a newer deployctl, or one that is not a
 * deployctl store, with a message that says so. The store holds one
 * reference; store_unref drops it. */
int store_open(store **out, engine *e, const char *location, char *err);
/* Every user of the store (a manager, a running rollout) holds a reference;
 * the store closes when the last one goes, after its queued writes are
 * committed. NULL-safe. */
store *store_ref(store *s);
void store_unref(store *s);
/* For messages: the file path, or the URL with its password removed. */
const char *store_location(const store *s);
const char *store_kind(const store *s); /* "sqlite", "postgresql" */
/* Writes queued or committing: the engine loop has work while this is > 0. */
int store_pending(const store *s);
/* Test hook: counts of committed transactions and of writes in them. */
void store_stats(const store *s, uint64_t *commits, uint64_t *writes);

/* Every function below returns 0 once the operation is queued (cb then runs
 * exactly once, later, from the loop; cb may be NULL), or -1 with err
 * filled when it could not even be queued (out of memory, store closed). */

/* ---- writes (group-committed) ---- */

/* Adds a row for the target unless it has one (status "deployed", health
 * "unhealthy", no version). */
int store_target_ensure(store *s, const char *name, store_cb cb, void *payload, char *err);
/* The start of a deployment, atomically: refuses with DC_LOCKED (err names
 * the holder: deployment id, pid, host, since when) when another live owner
 * holds the target's lock (a lock whose owner is gone is taken over and its
 * deployment marked interrupted); otherwise takes the lock, inserts the
 * deployment row (status "running") and sets the target's status. The
 * result carries the target row and every instance row of the target as
 * they were when the lock was taken. */
int store_deployment_begin(store *s, const store_deployment *d, store_cb cb, void *payload, char *err);
/* The target status a deployment of that kind sets as it begins:
 * "running", or "rolling_back" for a rollback. For backends. */
const char *store_begin_status(const char *kind);
/* The target's lock for work that is not a deployment (a reconcile, which
 * only repairs and leaves no history row), under the id `holder`: refused
 * with DC_LOCKED as store_deployment_begin is; the result carries the
 * target row and its instance rows as they were when the lock was taken. */
int store_lock_take(store *s, const char *target, const char *holder, const char *purpose, store_cb cb,
                    void *payload, char *err);
int store_lock_release(store *s, const char *target, const char *holder, store_cb cb, void *payload, char *err);
/* The end: status, errors, duration; the lock released; the target's status
 * and health written as given; promoted != 0 also promotes (as below). */
int store_deployment_finish(store *s, const store_finish *f, store_cb cb, void *payload, char *err);
/* The promotion alone: previous_version, current_version and
 * live_deployment, committed before the old instances are stopped. */
int store_deployment_promote(store *s, const char *id, store_cb cb, void *payload, char *err);
int store_event_add(store *s, const store_event *ev, store_cb cb, void *payload, char *err);
int store_instance_add(store *s, const store_instance *in, store_cb cb, void *payload, char *err);
/* Writes node, host, port, handle, pid, pid_start, state, weight, server,
 * log_path and started_at of in->id (DC_NOTFOUND when it is gone). */
int store_instance_update(store *s, const store_instance *in, store_cb cb, void *payload, char *err);
/* Deleting an instance that is already gone is not an error. */
int store_instance_delete(store *s, int64_t id, store_cb cb, void *payload, char *err);
/* An operator command for the deployment of `target` that is running now,
 * checked and written in one transaction: DC_NOTFOUND ("no deployment of
 * 'x' is running") when none is. The control names that deployment, so a
 * command that arrives as it ends never reaches the next one. The result's
 * deployments[0] is the deployment it was given to. */
int store_control_set(store *s, const char *target, const char *command, const char *by, store_cb cb,
                      void *payload, char *err);
/* Deployments marked running whose owner is gone (a dead process on this
 * machine; an expired lease on a shared store): each is marked
 * "interrupted" with an event, its lock released and its target's status
 * set back ("deployed", or "failed" when nothing was ever promoted). The
 * result lists them, so the caller can bring each target back to one
 * version. */
int store_recover(store *s, store_cb cb, void *payload, char *err);

/* Maintenance on or off for a target (DC_NOTFOUND when it has no row).
 * The caller holds the target's lock (service.c takes it), so no rollout
 * reads the flag while it changes. */
int store_maintenance_set(store *s, const char *target, const store_maintenance *m, store_cb cb, void *payload,
                          char *err);

/* Retention: deletes the target's deployments beyond the newest `keep`
 * (keep >= 1), with their events and operator commands, never the live
 * one, the one a rollback would go back to (the newest succeeded one of
 * the previous version), a running one, or one with instance rows. The
 * result's id is the number of deployments deleted. */
int store_prune(store *s, const char *target, int keep, store_cb cb, void *payload, char *err);

/* ---- reads ---- */

int store_target_get(store *s, const char *name, store_cb cb, void *payload, char *err); /* DC_NOTFOUND */
/* One deployment by id, or by a unique prefix of one (DC_NOTFOUND;
 * DC_AMBIGUOUS naming the candidates when the prefix is not unique). */
int store_deployment_get(store *s, const char *id, store_cb cb, void *payload, char *err);
/* Newest first; target NULL: every target; limit <= 0: all. */
int store_history(store *s, const char *target, int limit, store_cb cb, void *payload, char *err);
/* Oldest first. */
int store_events(store *s, const char *deployment_id, store_cb cb, void *payload, char *err);
/* Every instance row of a target (any deployment, any state), id order;
 * target NULL: of every target. */
int store_instances(store *s, const char *target, store_cb cb, void *payload, char *err);
/* Ports held by instance rows on `node` that are not stopped. */
int store_ports_in_use(store *s, const char *node, store_cb cb, void *payload, char *err);
/* Controls with an id above after_id, oldest first. */
int store_controls(store *s, int64_t after_id, store_cb cb, void *payload, char *err);
int store_lock_get(store *s, const char *target, store_cb cb, void *payload, char *err);
/* The backend's own consistency check (SQLite: PRAGMA integrity_check). */
int store_integrity_check(store *s, store_cb cb, void *payload, char *err);

/* ---- operator commands, as a subscription ---- */

/* cb runs once for every control given to deployment_id from now on (the
 * store polls with one read per interval for all its watchers together,
 * whatever their number). */
typedef struct store_watch store_watch;
typedef void (*store_control_cb)(void *payload, const store_control *c);
store_watch *store_controls_watch(store *s, const char *deployment_id, store_control_cb cb, void *payload,
                                  char *err);
void store_controls_unwatch(store_watch *w); /* NULL-safe; cb never runs after it */

/* Frees the heap members of a row (NULL-safe, leaves it zeroed). */
void store_deployment_clear(store_deployment *d);
void store_event_clear(store_event *e);
/* Deep copy (errors and metadata duplicated); -1 when out of memory. */
int store_deployment_copy(store_deployment *dst, const store_deployment *src);

#endif
