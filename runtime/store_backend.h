/* What a store backend implements (cf. libgit2's sys/odb_backend.h): a
 * versioned struct of function pointers. store.c owns the queue, the group
 * commit, the callbacks and the lifetime; a backend only runs operations.
 *
 * An operation (store_op) is a request and its result in one struct: the
 * front fills the arguments, the backend fills the result fields and the
 * owned lists, the front hands the result to the caller and frees the op.
 *
 * Threads: a backend may run commit and read on libuv's thread pool or on
 * its own connection's socket; it calls `done` on the loop's thread, once
 * per call. The front never has more than one commit in flight per store,
 * and never frees a backend with a call in flight. */
#ifndef DEPLOY_STORE_BACKEND_H
#define DEPLOY_STORE_BACKEND_H

#include "store.h"
#include "util.h"

#define STORE_BACKEND_VERSION 1

typedef enum {
  /* writes: run by commit(), each in its own savepoint */
  STORE_OP_TARGET_ENSURE,     /* name */
  STORE_OP_BEGIN,             /* dep -> target, instances */
  STORE_OP_FINISH,            /* fin (+ id) */
  STORE_OP_PROMOTE,           /* id */
  STORE_OP_EVENT,             /* ev */
  STORE_OP_INSTANCE_ADD,      /* inst -> id */
  STORE_OP_INSTANCE_UPDATE,   /* inst */
  STORE_OP_INSTANCE_DELETE,   /* id64 */
  STORE_OP_CONTROL_SET,       /* name (target), command, by -> id, deployments[0] */
  STORE_OP_RECOVER,           /* -> deployments */
  STORE_OP_LOCK_RENEW,        /* id: extend the lease; DC_LOCKED when it was lost */
  STORE_OP_LOCK_TAKE,         /* name, id (holder), command (purpose) -> target, instances */
  STORE_OP_LOCK_RELEASE,      /* name, id (holder) */
  STORE_OP_PRUNE,             /* name, limit (deployments kept) -> out_id (deployments deleted) */
  STORE_OP_MAINTENANCE,       /* name, maint */
  STORE_OP_WRITE_COUNT,       /* not an operation: the first read kind */
  /* reads: run by read(), no write transaction */
  STORE_OP_TARGET_GET = STORE_OP_WRITE_COUNT, /* name -> target */
  STORE_OP_DEPLOYMENT_GET,    /* id (or prefix) -> deployments[0] */
  STORE_OP_HISTORY,           /* name ("" all), limit -> deployments */
  STORE_OP_EVENTS,            /* id -> events */
  STORE_OP_INSTANCES,         /* name ("" all) -> instances */
  STORE_OP_PORTS_IN_USE,      /* node -> ports */
  STORE_OP_CONTROLS,          /* id64 (after) -> controls */
  STORE_OP_LOCK_GET,          /* name -> lock (NULL when none) */
  STORE_OP_INTEGRITY,         /* -> rc */
} store_op_kind;

static inline int store_op_is_write(store_op_kind k) { return k < STORE_OP_WRITE_COUNT; }

typedef struct store_op store_op;
struct store_op {
  store_op_kind kind;

  /* ---- arguments ---- */
  char name[64];               /* a target */
  char id[48];                 /* a deployment (or a prefix of one) */
  char node[256];
  char command[16];
  char by[128];
  int64_t id64;                /* an instance id; controls: after this id */
  int limit;
  store_deployment dep;        /* BEGIN (errors, metadata: heap, owned by the op) */
  store_finish fin;            /* FINISH (strings point into fin_buf) */
  char *fin_errors;            /* FINISH: heap copy of fin.errors_json */
  char fin_status[16], fin_tstatus[16], fin_thealth[16];
  store_event ev;              /* EVENT (data: heap, owned by the op) */
  store_instance inst;         /* INSTANCE_ADD / INSTANCE_UPDATE */
  store_maintenance maint;     /* MAINTENANCE */

  /* ---- results, filled by the backend ---- */
  int rc;                      /* DC_OK unless set */
  char err[DC_ERR_MAX];
  int64_t out_id;
  int has_target;
  store_target target;
  int has_lock;
  store_lock lock;
  store_deployment *deployments; /* heap arrays; rows' heap members owned too */
  size_t ndeployments;
  store_instance *instances;
  size_t ninstances;
  store_event *events;
  size_t nevents;
  store_control *controls;
  size_t ncontrols;
  int *ports;
  size_t nports;

  /* ---- the front's ---- */
  store_cb cb;
  void *payload;
  store_op *next;
};

/* Appends a zeroed row to an op's result list; NULL when out of memory
 * (the backend then fails the op with "out of memory"). */
store_deployment *store_op_add_deployment(store_op *op);
store_instance *store_op_add_instance(store_op *op);
store_event *store_op_add_event(store_op *op);
store_control *store_op_add_control(store_op *op);
int store_op_add_port(store_op *op, int port);
/* Drops an op's results (its rows, rc, err), as before it ran: a backend
 * that runs an op again (after a reconnection) starts from there. */
void store_op_clear_results(store_op *op);
/* Frees an op with its arguments and results (store.c's, and a test
 * driver's). */
void store_op_free(store_op *op);
/* What an operation is, for "deploy: store: <what>: <why>": the same
 * words from every backend. */
void store_op_describe(const store_op *op, char *what, size_t size);
/* Sets rc and a message, "deploy: store: <what>: <why>". */
void store_op_fail(store_op *op, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

typedef void (*store_backend_done)(void *ctx);

typedef struct store_backend store_backend;
struct store_backend {
  int version;                 /* STORE_BACKEND_VERSION */
  const char *kind;            /* "sqlite", "postgresql" */
  /* 0: a lock is held while its owner process lives (one machine).
   * Otherwise locks are leases of this many seconds (a store shared by
   * several machines): BEGIN sets expires_at, the front queues a
   * LOCK_RENEW for each running deployment every lease_seconds / 3, and a
   * renewal answered DC_LOCKED (the lease expired and another runner took
   * the target) reaches the deployment's control watchers as the command
   * "lease_lost": it stops acting at once. */
  double lease_seconds;
  /* Runs every write of ops[0..n) in one transaction, each inside its own
   * savepoint, and fills each op's result; when the transaction as a whole
   * fails, every op fails with that error. done(ctx) once, on the loop. */
  void (*commit)(store_backend *b, store_op **ops, size_t n, store_backend_done done, void *ctx);
  /* Runs one read; done(ctx) once, on the loop. */
  void (*read)(store_backend *b, store_op *op, store_backend_done done, void *ctx);
  /* For messages: a path, or a URL without its password. */
  const char *(*location)(const store_backend *b);
  /* Called only when no call is in flight. */
  void (*free)(store_backend *b);
};

/* Backends. Each opens (creating, migrating) synchronously, or starts
 * connecting and runs queued calls once connected. */
int store_sqlite_open(store_backend **out, engine *e, const char *path, char *err);
int store_pg_open(store_backend **out, engine *e, const char *url, char *err);

/* The deployments STORE_OP_PRUNE keeps for target ?1 whatever their age:
 * the newest ?2, the live one, the newest succeeded one of the previous
 * version (what a rollback goes back to), running ones, and any that has
 * instance rows or holds the lock. One SELECT of ids (NULLs filtered out),
 * valid in SQLite and PostgreSQL alike (?N is written $N there). */
/* What a lock's holder is doing, for "target locked: '<t>' is being ..." */
static inline const char *store_lock_doing(const char *purpose) {
  return purpose[0] == 'r' ? "reconciled" : purpose[0] == 'm' ? "switched in or out of maintenance" : purpose;
}

#define STORE_PRUNE_KEEP(P1, P2)                                                                             \
  "SELECT id FROM (SELECT id FROM deployments WHERE target = " P1 " ORDER BY seq DESC LIMIT " P2 ") AS newest " \
  "UNION SELECT live_deployment FROM targets WHERE name = " P1 " "                                           \
  "UNION SELECT id FROM (SELECT d.id FROM deployments d JOIN targets t ON t.name = d.target "                 \
  "WHERE d.target = " P1 " AND d.version = t.previous_version AND d.status = 'succeeded' "                    \
  "ORDER BY d.seq DESC LIMIT 1) AS previous "                                                                \
  "UNION SELECT id FROM deployments WHERE target = " P1 " AND status = 'running' "                            \
  "UNION SELECT deployment_id FROM instances WHERE target = " P1 " "                                          \
  "UNION SELECT deployment_id FROM locks WHERE target = " P1

#endif
