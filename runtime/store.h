/* The store: deployctl's durable state in SQLite (WAL, synchronous=FULL).
 *
 * Every function that writes runs one `BEGIN IMMEDIATE` transaction (with a
 * busy_timeout), so a transition is all or nothing and two processes never
 * interleave writes. A process killed at any moment leaves a store that
 * store_recover() and the next run make consistent again.
 *
 * Tables (schema version 1; `meta.schema_version` says which one a file has):
 *   targets(name PK, current_version, previous_version, live_deployment,
 *           status, health, updated_at)
 *   deployments(id PK, seq AUTOINCREMENT, target, version, from_version,
 *           kind deploy|rollback, strategy, status, created_at, finished_at,
 *           duration, errors JSON, metadata JSON, owner_pid, owner_start,
 *           owner_host, user)
 *   events(id PK AUTOINCREMENT, deployment_id, target, ts, kind, data JSON)
 *   locks(target PK, deployment_id, pid, pid_start, host, acquired_at)
 *   instances(id PK AUTOINCREMENT, target, deployment_id, version, idx,
 *           host, port, pid, pid_start, state, weight, server, log_path,
 *           started_at)
 *   controls(target PK, command, requested_at, requested_by)
 *
 * Strings in the structs below are fixed-size and always NUL-terminated.
 * JSON columns are passed through as text; the store does not parse them. */
#ifndef DEPLOY_STORE_H
#define DEPLOY_STORE_H

#include <stddef.h>
#include <stdint.h>

#define STORE_SCHEMA_VERSION 1

typedef struct store store;

typedef struct store_target {
  char name[64];
  char current_version[129];   /* "" when never deployed */
  char previous_version[129];  /* "" when none */
  char live_deployment[48];    /* deployment whose instances serve, "" none */
  char status[16];             /* running | deployed | failed | rolling_back */
  char health[16];             /* healthy | degraded | unhealthy */
  double updated_at;
} store_target;

typedef struct store_deployment {
  char id[48];
  int64_t seq;                 /* insertion order, assigned by the store */
  char target[64];
  char version[129];
  char from_version[129];      /* version live when it started, "" none */
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
  char host[64];               /* "127.0.0.1" for the process provider */
  int port;
  int pid;                     /* 0 until started */
  uint64_t pid_start;
  char state[16];              /* starting | running | stopping | stopped */
  int weight;                  /* router weight wanted for it (0..256) */
  char server[64];             /* router server name, e.g. "dc_12" */
  char log_path[512];
  double started_at;
} store_instance;

typedef struct store_lock {
  char target[64];
  char deployment_id[48];
  int pid;
  uint64_t pid_start;
  char host[64];
  double acquired_at;
} store_lock;

/* Free the heap members of a row (NULL-safe, leaves the struct zeroed). */
void store_deployment_clear(store_deployment *d);
void store_event_clear(store_event *e);

/* Open (creating directories and the file as needed) and migrate. Refuses a
 * file whose schema is newer than this build, or that is not a deployctl
 * store, with a message that says so. */
int store_open(store **out, const char *path, char *err);
void store_close(store *s);  /* NULL-safe */
const char *store_path(const store *s);

/* Ensure a row exists for each configured target (status "deployed",
 * health "unhealthy", versions ""). Existing rows are kept. */
int store_target_ensure(store *s, const char *name, char *err);
int store_target_get(store *s, const char *name, store_target *out, char *err); /* DC_NOTFOUND */

/* The start of a deployment, in one transaction: fails with DC_LOCKED (err
 * names the holder: deployment id, pid, host, since when) when another live
 * process holds the target's lock; a lock whose owner is dead is taken over.
 * Otherwise inserts the lock, the deployment row (status "running") and sets
 * the target's status ("running", or "rolling_back" for kind rollback). */
int store_deployment_begin(store *s, const store_deployment *d, char *err);

/* The end of a deployment, in one transaction: sets its status, errors
 * (JSON or NULL), finished_at and duration; releases the lock; updates the
 * target. When promoted != 0 the target's previous_version becomes its
 * current_version, current_version becomes d->version and live_deployment
 * d->id. target_status/target_health are written as given. */
int store_deployment_finish(store *s, const char *id, const char *status,
                            const char *errors_json, double finished_at,
                            double duration, int promoted,
                            const char *target_status,
                            const char *target_health, char *err);

/* The promotion alone (previous_version, current_version, live_deployment
 * as finish with promoted != 0 would set them), without ending the
 * deployment: committed before the old instances are stopped. */
int store_deployment_promote(store *s, const char *id, char *err);

int store_deployment_get(store *s, const char *id, store_deployment *out, char *err); /* DC_NOTFOUND */
/* Newest first; limit <= 0 means all. cb returns nonzero to stop. The row is
 * valid only during the callback. */
typedef int (*store_deployment_cb)(void *payload, const store_deployment *d);
int store_history(store *s, const char *target, int limit,
                  store_deployment_cb cb, void *payload, char *err);

int store_event_add(store *s, const char *deployment_id, const char *target,
                    double ts, const char *kind, const char *data_json,
                    char *err);
/* Oldest first. */
typedef int (*store_event_cb)(void *payload, const store_event *e);
int store_events(store *s, const char *deployment_id, store_event_cb cb,
                 void *payload, char *err);

int store_instance_add(store *s, store_instance *inst, char *err); /* sets inst->id */
/* Writes pid, pid_start, state, weight, server, port, started_at of inst->id. */
int store_instance_update(store *s, const store_instance *inst, char *err);
int store_instance_delete(store *s, int64_t id, char *err);
/* Every instance row of a target (any deployment, any state), id order. */
typedef int (*store_instance_cb)(void *payload, const store_instance *i);
int store_instances(store *s, const char *target, store_instance_cb cb,
                    void *payload, char *err);
/* Ports in use by any instance row in the store (for allocation). */
int store_port_in_use(store *s, int port, int *in_use, char *err);

/* Deployments marked running whose owner process is gone: each is marked
 * "interrupted" (errors say so), an "interrupted" event is added, its lock
 * is released and the target's status goes back to "deployed" (or "failed"
 * when nothing was ever promoted). cb sees each one after the commit, so the
 * caller can stop its instances and repair the router. */
int store_recover(store *s, store_deployment_cb cb, void *payload, char *err);

/* Operator commands for a paused rollout ("promote", "abort"), written by
 * one process and taken (read and deleted) by the one running it. */
int store_control_set(store *s, const char *target, const char *command,
                      const char *by, char *err);
/* out gets "" when nothing is pending. */
int store_control_take(store *s, const char *target, char *out, size_t size,
                       char *err);

/* PRAGMA integrity_check; 0 when "ok". */
int store_integrity_check(store *s, char *err);

#endif
