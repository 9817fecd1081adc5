/* The SQLite store backend: a file on this machine (WAL, synchronous=FULL).
 *
 *   - Writes: the front hands over one batch per loop turn; it runs on
 *     libuv's thread pool (the fsync never stalls the loop) on the write
 *     connection, as one BEGIN IMMEDIATE transaction with a SAVEPOINT per
 *     operation, so one refused operation is undone alone.
 *   - Reads: on the loop's thread, on a second connection. In WAL mode a
 *     reader never waits for a writer and reads committed pages from the
 *     cache; its completion is still delivered from the loop, never inside
 *     the call.
 *   - SQL is static text with bound parameters, never formatted with data.
 *   - Locks are held while their owner process lives: a lock whose owner's
 *     pid (same host) is gone is taken over. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "store_backend.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

/* "DPLY" in the SQLite header: tells our files from other programs'. */
#define APP_ID 0x44504c59
#define PATH_SIZE 4096
#define WHAT_SIZE 256
/* How long a writer waits for another process's transaction. */
#define BUSY_TIMEOUT_MS 10000

typedef struct done_item {
  store_backend_done done;
  void *ctx;
  struct done_item *next;
} done_item;

typedef struct sqlite_backend {
  store_backend base;      /* first */
  engine *e;
  sqlite3 *wdb;            /* writes, on the thread pool */
  sqlite3 *rdb;            /* reads, on the loop */
  char path[PATH_SIZE];
  char host[64];
  /* the batch on the thread pool */
  uv_work_t work;
  store_op **ops;
  size_t nops;
  store_backend_done commit_done;
  void *commit_ctx;
  /* read completions waiting for the loop */
  uv_idle_t idle;
  done_item *done_head, *done_tail;
} sqlite_backend;

/* ---- schema ---------------------------------------------------------- */

/* SQLite has AUTOINCREMENT only on the INTEGER PRIMARY KEY, so in
 * deployments `seq` is that key and `id` is UNIQUE NOT NULL. */
static const char SCHEMA_V1[] =
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);"
    "CREATE TABLE targets("
    " name TEXT PRIMARY KEY,"
    " current_version TEXT NOT NULL DEFAULT '',"
    " previous_version TEXT NOT NULL DEFAULT '',"
    " live_deployment TEXT NOT NULL DEFAULT '',"
    " status TEXT NOT NULL DEFAULT 'deployed',"
    " health TEXT NOT NULL DEFAULT 'unhealthy',"
    " updated_at REAL NOT NULL DEFAULT 0);"
    "CREATE TABLE deployments("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id TEXT NOT NULL UNIQUE,"
    " target TEXT NOT NULL REFERENCES targets(name),"
    " version TEXT NOT NULL,"
    " from_version TEXT NOT NULL DEFAULT '',"
    " kind TEXT NOT NULL DEFAULT 'deploy',"
    " strategy TEXT NOT NULL DEFAULT '',"
    " status TEXT NOT NULL,"
    " created_at REAL NOT NULL DEFAULT 0,"
    " finished_at REAL NOT NULL DEFAULT 0,"
    " duration REAL NOT NULL DEFAULT 0,"
    " errors TEXT,"
    " metadata TEXT,"
    " owner_pid INTEGER NOT NULL DEFAULT 0,"
    " owner_start INTEGER NOT NULL DEFAULT 0,"
    " owner_host TEXT NOT NULL DEFAULT '',"
    " user TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX deployments_by_target ON deployments(target, seq);"
    "CREATE INDEX deployments_by_status ON deployments(status);"
    "CREATE TABLE events("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " deployment_id TEXT NOT NULL,"
    " target TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " kind TEXT NOT NULL,"
    " data TEXT);"
    "CREATE INDEX events_by_deployment ON events(deployment_id, id);"
    "CREATE TABLE locks("
    " target TEXT PRIMARY KEY REFERENCES targets(name),"
    " deployment_id TEXT NOT NULL REFERENCES deployments(id),"
    " pid INTEGER NOT NULL,"
    " pid_start INTEGER NOT NULL,"
    " host TEXT NOT NULL,"
    " acquired_at REAL NOT NULL);"
    "CREATE TABLE instances("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " target TEXT NOT NULL,"
    " deployment_id TEXT NOT NULL,"
    " version TEXT NOT NULL,"
    " idx INTEGER NOT NULL,"
    " host TEXT NOT NULL,"
    " port INTEGER NOT NULL,"
    " pid INTEGER NOT NULL DEFAULT 0,"
    " pid_start INTEGER NOT NULL DEFAULT 0,"
    " state TEXT NOT NULL,"
    " weight INTEGER NOT NULL DEFAULT 0,"
    " server TEXT NOT NULL DEFAULT '',"
    " log_path TEXT NOT NULL DEFAULT '',"
    " started_at REAL NOT NULL DEFAULT 0);"
    "CREATE INDEX instances_by_target ON instances(target, id);"
    "CREATE INDEX instances_by_port ON instances(port);"
    "CREATE TABLE controls("
    " target TEXT PRIMARY KEY,"
    " command TEXT NOT NULL,"
    " requested_at REAL NOT NULL,"
    " requested_by TEXT NOT NULL DEFAULT '');"
    "INSERT INTO meta(key, value) VALUES('application', 'deployctl');"
    "PRAGMA application_id = 1146113113;"; /* APP_ID */

/* v2: instances say where they run (node) and carry their provider's
 * handle; a lock says what it is for (a reconcile holds one without a
 * deployment row, so it no longer references deployments) and may expire;
 * a control names the deployment it is for and is a row of its own, read
 * without being deleted. A v1 control still pending belonged to a process
 * that is gone: it is dropped. */
static const char SCHEMA_V2[] =
    "ALTER TABLE instances ADD COLUMN node TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE instances ADD COLUMN handle TEXT NOT NULL DEFAULT '';"
    "UPDATE instances SET handle = pid || ':' || pid_start WHERE pid > 0;"
    "DROP INDEX instances_by_port;"
    "CREATE INDEX instances_by_node_port ON instances(node, port);"
    "CREATE TABLE locks2("
    " target TEXT PRIMARY KEY REFERENCES targets(name),"
    " deployment_id TEXT NOT NULL,"
    " purpose TEXT NOT NULL DEFAULT 'deploy',"
    " pid INTEGER NOT NULL,"
    " pid_start INTEGER NOT NULL,"
    " host TEXT NOT NULL,"
    " acquired_at REAL NOT NULL,"
    " expires_at REAL NOT NULL DEFAULT 0);"
    "INSERT INTO locks2(target, deployment_id, pid, pid_start, host, acquired_at) "
    " SELECT target, deployment_id, pid, pid_start, host, acquired_at FROM locks;"
    "DROP TABLE locks;"
    "ALTER TABLE locks2 RENAME TO locks;"
    "DROP TABLE controls;"
    "CREATE TABLE controls("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " deployment_id TEXT NOT NULL,"
    " target TEXT NOT NULL,"
    " command TEXT NOT NULL,"
    " requested_at REAL NOT NULL,"
    " requested_by TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX controls_by_deployment ON controls(deployment_id, id);";

/* v3: a target may be in maintenance (its load balancers answer 503). */
static const char SCHEMA_V3[] =
    "ALTER TABLE targets ADD COLUMN maintenance INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE targets ADD COLUMN maintenance_message TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE targets ADD COLUMN maintenance_retry_after INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE targets ADD COLUMN maintenance_since REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE targets ADD COLUMN maintenance_by TEXT NOT NULL DEFAULT '';";

/* migrations[n] takes a file from schema n to n + 1; a new schema version
 * appends a step here and never edits an old one. */
static const char *const migrations[] = {SCHEMA_V1, SCHEMA_V2, SCHEMA_V3};

_Static_assert(sizeof migrations / sizeof migrations[0] == STORE_SCHEMA_VERSION,
               "one migration step per schema version");

#define DEPLOYMENT_COLS                                                                                      \
  "id, seq, target, version, from_version, kind, strategy, status, created_at, finished_at, duration, "    \
  "errors, metadata, owner_pid, owner_start, owner_host, user"
#define TARGET_COLS                                                                                          \
  "name, current_version, previous_version, live_deployment, status, health, updated_at, maintenance, "     \
  "maintenance_message, maintenance_retry_after, maintenance_since, maintenance_by"
#define EVENT_COLS "id, deployment_id, target, ts, kind, data"
#define INSTANCE_COLS                                                                                        \
  "id, target, deployment_id, version, idx, host, port, pid, pid_start, state, weight, server, log_path, "  \
  "started_at, node, handle"
#define LOCK_COLS "target, deployment_id, pid, pid_start, host, acquired_at, expires_at, purpose"
#define CONTROL_COLS "id, deployment_id, target, command, requested_at, requested_by"

/* ---- errors ------------------------------------------------------------ */

static const char *nz(const char *p) { return p ? p : ""; }

/* An I/O error that came without a useful errno (a failed fsync, a journal
 * the kernel aborted): creating a file beside the store says what the disk
 * does now (EROFS: it turned read-only; ENOSPC: it is full). */
static int probe_dir(const char *path, int sys) {
  char probe[4096];
  const char *slash = strrchr(path, '/');
  if (slash)
    dc_fmt(probe, sizeof probe, "%.*s/.deployctl-probe-%d", (int)(slash - path), path, (int)getpid());
  else
    dc_fmt(probe, sizeof probe, ".deployctl-probe-%d", (int)getpid());
  int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd >= 0) {
    close(fd);
    unlink(probe);
    return sys;
  }
  return errno == EROFS || errno == ENOSPC || errno == EDQUOT || errno == EIO ? errno : sys;
}

/* `what` names the operation; SQLite's message says why. Must run before
 * any rollback, which resets it. */
static int db_fail(sqlite3 *db, char *err, const char *what) {
  int code = sqlite3_extended_errcode(db), sys = sqlite3_system_errno(db);
  const char *path = sqlite3_db_filename(db, "main");
  const char *hint = "";
  char sysmsg[160] = "", buf[128];
  /* SQLite says "disk I/O error" for most of what a disk does wrong: the
   * system's own reason says which, and what to do about it. */
  if ((code & 0xff) == SQLITE_IOERR && sys != 0)
    dc_fmt(sysmsg, sizeof sysmsg, " (%s)", strerror_r(sys, buf, sizeof buf)); /* GNU: thread-safe */
  if ((code & 0xff) == SQLITE_IOERR && (sys == 0 || sys == EIO) && path && *path)
    sys = probe_dir(path, sys);
  if ((code & 0xff) == SQLITE_FULL || sys == ENOSPC || sys == EDQUOT)
    hint = ": the disk is full: free space on it";
  else if ((code & 0xff) == SQLITE_READONLY || sys == EROFS)
    hint = ": the disk is read-only: check it (dmesg), and remount it read-write";
  else if ((code & 0xff) == SQLITE_BUSY)
    hint = ": another process has held the store's write lock for over 10 s (a stuck sqlite3 shell?)";
  else if ((code & 0xff) == SQLITE_IOERR)
    hint = ": check the disk (dmesg)";
  dc_errf(err, "deploy: store %s: %s: %s%s%s", path && *path ? path : "(memory)", what, sqlite3_errmsg(db), sysmsg,
          hint);
  return DC_ERROR;
}

/* ---- statements --------------------------------------------------------- */

/* Binds parameters 1..n from a type string: s text (NULL binds ''), j text
 * or NULL (JSON columns), i int, I int64_t, u uint64_t, d double. */
static int bind_args(sqlite3_stmt *st, const char *types, va_list ap) {
  int rc = SQLITE_OK;
  for (int i = 0; types[i] != '\0' && rc == SQLITE_OK; i++) {
    int at = i + 1;
    const char *text;
    switch (types[i]) {
    case 's':
      rc = sqlite3_bind_text(st, at, nz(va_arg(ap, const char *)), -1, SQLITE_TRANSIENT);
      break;
    case 'j':
      text = va_arg(ap, const char *);
      rc = text ? sqlite3_bind_text(st, at, text, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, at);
      break;
    case 'i':
      rc = sqlite3_bind_int(st, at, va_arg(ap, int));
      break;
    case 'I':
      rc = sqlite3_bind_int64(st, at, (sqlite3_int64)va_arg(ap, int64_t));
      break;
    case 'u': /* pid start times fit in 63 bits; stored as INTEGER */
      rc = sqlite3_bind_int64(st, at, (sqlite3_int64)va_arg(ap, uint64_t));
      break;
    case 'd':
      rc = sqlite3_bind_double(st, at, va_arg(ap, double));
      break;
    default:
      rc = SQLITE_MISUSE;
    }
  }
  return rc;
}

static sqlite3_stmt *vquery(sqlite3 *db, char *err, const char *what, const char *sql, const char *types,
                            va_list ap) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
    db_fail(db, err, what);
    return NULL;
  }
  if (bind_args(st, types, ap) != SQLITE_OK) {
    db_fail(db, err, what);
    sqlite3_finalize(st);
    return NULL;
  }
  return st;
}

/* A prepared statement with its parameters bound, or NULL with err set. */
static sqlite3_stmt *query(sqlite3 *db, char *err, const char *what, const char *sql, const char *types, ...) {
  va_list ap;
  va_start(ap, types);
  sqlite3_stmt *st = vquery(db, err, what, sql, types, ap);
  va_end(ap);
  return st;
}

/* Runs a statement whose rows, if any, are not needed. */
static int run(sqlite3 *db, char *err, const char *what, const char *sql, const char *types, ...) {
  va_list ap;
  va_start(ap, types);
  sqlite3_stmt *st = vquery(db, err, what, sql, types, ap);
  va_end(ap);
  if (!st)
    return DC_ERROR;
  int rc = sqlite3_step(st);
  while (rc == SQLITE_ROW)
    rc = sqlite3_step(st);
  if (rc != SQLITE_DONE)
    db_fail(db, err, what);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? DC_OK : DC_ERROR;
}

/* For queries of at most one row: 1 when there is one, 0 when none. */
static int step_row(sqlite3 *db, sqlite3_stmt *st, char *err, const char *what) {
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW)
    return 1;
  if (rc == SQLITE_DONE)
    return 0;
  return db_fail(db, err, what);
}

static int exec(sqlite3 *db, const char *sql) { return sqlite3_exec(db, sql, NULL, NULL, NULL); }

/* ---- reading rows ------------------------------------------------------- */

static void col_text(sqlite3_stmt *st, int i, char *dst, size_t size) {
  const unsigned char *v = sqlite3_column_text(st, i);
  dc_strlcpy(dst, v ? (const char *)v : "", size);
}

/* Heap copy of a nullable column; -1 only when out of memory. */
static int col_dup(sqlite3_stmt *st, int i, char **out) {
  *out = NULL;
  if (sqlite3_column_type(st, i) == SQLITE_NULL)
    return 0;
  const unsigned char *v = sqlite3_column_text(st, i);
  if (v)
    *out = strdup((const char *)v);
  return *out ? 0 : -1;
}

static int read_deployment(sqlite3_stmt *st, store_deployment *d) {
  col_text(st, 0, d->id, sizeof d->id);
  d->seq = sqlite3_column_int64(st, 1);
  col_text(st, 2, d->target, sizeof d->target);
  col_text(st, 3, d->version, sizeof d->version);
  col_text(st, 4, d->from_version, sizeof d->from_version);
  col_text(st, 5, d->kind, sizeof d->kind);
  col_text(st, 6, d->strategy, sizeof d->strategy);
  col_text(st, 7, d->status, sizeof d->status);
  d->created_at = sqlite3_column_double(st, 8);
  d->finished_at = sqlite3_column_double(st, 9);
  d->duration = sqlite3_column_double(st, 10);
  d->owner_pid = sqlite3_column_int(st, 13);
  d->owner_start = (uint64_t)sqlite3_column_int64(st, 14);
  col_text(st, 15, d->owner_host, sizeof d->owner_host);
  col_text(st, 16, d->user, sizeof d->user);
  if (col_dup(st, 11, &d->errors) != 0 || col_dup(st, 12, &d->metadata) != 0)
    return -1;
  return 0;
}

static void read_target(sqlite3_stmt *st, store_target *t) {
  col_text(st, 0, t->name, sizeof t->name);
  col_text(st, 1, t->current_version, sizeof t->current_version);
  col_text(st, 2, t->previous_version, sizeof t->previous_version);
  col_text(st, 3, t->live_deployment, sizeof t->live_deployment);
  col_text(st, 4, t->status, sizeof t->status);
  col_text(st, 5, t->health, sizeof t->health);
  t->updated_at = sqlite3_column_double(st, 6);
  t->maintenance = sqlite3_column_int(st, 7);
  col_text(st, 8, t->maintenance_message, sizeof t->maintenance_message);
  t->maintenance_retry_after = sqlite3_column_int(st, 9);
  t->maintenance_since = sqlite3_column_double(st, 10);
  col_text(st, 11, t->maintenance_by, sizeof t->maintenance_by);
}

static int read_event(sqlite3_stmt *st, store_event *e) {
  e->id = sqlite3_column_int64(st, 0);
  col_text(st, 1, e->deployment_id, sizeof e->deployment_id);
  col_text(st, 2, e->target, sizeof e->target);
  e->ts = sqlite3_column_double(st, 3);
  col_text(st, 4, e->kind, sizeof e->kind);
  return col_dup(st, 5, &e->data);
}

static void read_instance(sqlite3_stmt *st, store_instance *i) {
  i->id = sqlite3_column_int64(st, 0);
  col_text(st, 1, i->target, sizeof i->target);
  col_text(st, 2, i->deployment_id, sizeof i->deployment_id);
  col_text(st, 3, i->version, sizeof i->version);
  i->idx = sqlite3_column_int(st, 4);
  col_text(st, 5, i->host, sizeof i->host);
  i->port = sqlite3_column_int(st, 6);
  i->pid = sqlite3_column_int(st, 7);
  i->pid_start = (uint64_t)sqlite3_column_int64(st, 8);
  col_text(st, 9, i->state, sizeof i->state);
  i->weight = sqlite3_column_int(st, 10);
  col_text(st, 11, i->server, sizeof i->server);
  col_text(st, 12, i->log_path, sizeof i->log_path);
  i->started_at = sqlite3_column_double(st, 13);
  col_text(st, 14, i->node, sizeof i->node);
  col_text(st, 15, i->handle, sizeof i->handle);
}

static void read_lock(sqlite3_stmt *st, store_lock *l) {
  col_text(st, 0, l->target, sizeof l->target);
  col_text(st, 1, l->deployment_id, sizeof l->deployment_id);
  l->pid = sqlite3_column_int(st, 2);
  l->pid_start = (uint64_t)sqlite3_column_int64(st, 3);
  col_text(st, 4, l->host, sizeof l->host);
  l->acquired_at = sqlite3_column_double(st, 5);
  l->expires_at = sqlite3_column_double(st, 6);
  col_text(st, 7, l->purpose, sizeof l->purpose);
}

static void read_control(sqlite3_stmt *st, store_control *c) {
  c->id = sqlite3_column_int64(st, 0);
  col_text(st, 1, c->deployment_id, sizeof c->deployment_id);
  col_text(st, 2, c->target, sizeof c->target);
  col_text(st, 3, c->command, sizeof c->command);
  c->requested_at = sqlite3_column_double(st, 4);
  col_text(st, 5, c->requested_by, sizeof c->requested_by);
}

/* Every row of st into the op's list of that kind; finalizes st. */
typedef enum { ROWS_DEPLOYMENTS, ROWS_INSTANCES, ROWS_EVENTS, ROWS_CONTROLS, ROWS_PORTS } rows_kind;

static int collect(sqlite3 *db, sqlite3_stmt *st, store_op *op, rows_kind kind, const char *what) {
  int rc = DC_OK;
  if (!st)
    return DC_ERROR;
  for (;;) {
    int step = sqlite3_step(st);
    if (step == SQLITE_DONE)
      break;
    if (step != SQLITE_ROW) {
      rc = db_fail(db, op->err, what);
      break;
    }
    int oom = 0;
    switch (kind) {
    case ROWS_DEPLOYMENTS: {
      store_deployment *d = store_op_add_deployment(op);
      oom = !d || read_deployment(st, d) != 0;
      break;
    }
    case ROWS_INSTANCES: {
      store_instance *i = store_op_add_instance(op);
      if (i)
        read_instance(st, i);
      oom = !i;
      break;
    }
    case ROWS_EVENTS: {
      store_event *e = store_op_add_event(op);
      oom = !e || read_event(st, e) != 0;
      break;
    }
    case ROWS_CONTROLS: {
      store_control *c = store_op_add_control(op);
      if (c)
        read_control(st, c);
      oom = !c;
      break;
    }
    case ROWS_PORTS:
      oom = store_op_add_port(op, sqlite3_column_int(st, 0)) != 0;
      break;
    }
    if (oom) {
      dc_errf(op->err, "deploy: store: %s: out of memory", what);
      rc = DC_ERROR;
      break;
    }
  }
  sqlite3_finalize(st);
  return rc;
}

/* ---- the operations ------------------------------------------------------ */

static int get_deployment(sqlite3 *db, const char *id, store_deployment *out, char *err, const char *what) {
  sqlite3_stmt *st = query(db, err, what, "SELECT " DEPLOYMENT_COLS " FROM deployments WHERE id = ?", "s", id);
  if (!st)
    return DC_ERROR;
  int rc = step_row(db, st, err, what);
  if (rc == 1 && read_deployment(st, out) != 0) {
    dc_errf(err, "deploy: store: %s: out of memory", what);
    rc = DC_ERROR;
  }
  sqlite3_finalize(st);
  if (rc == 0)
    dc_errf(err, "deploy: store: unknown deployment '%s'", nz(id));
  if (rc < 0)
    store_deployment_clear(out);
  return rc == 1 ? DC_OK : rc == 0 ? DC_NOTFOUND : DC_ERROR;
}

static int get_target(sqlite3 *db, const char *name, store_target *out, char *err, const char *what) {
  sqlite3_stmt *st = query(db, err, what, "SELECT " TARGET_COLS " FROM targets WHERE name = ?", "s", name);
  if (!st)
    return DC_ERROR;
  int rc = step_row(db, st, err, what);
  if (rc == 1)
    read_target(st, out);
  sqlite3_finalize(st);
  if (rc == 0)
    dc_errf(err, "deploy: store: unknown target '%s'", nz(name));
  return rc == 1 ? DC_OK : rc == 0 ? DC_NOTFOUND : DC_ERROR;
}

/* A process on another host cannot be checked from here: it counts as
 * alive, so a shared state file never loses a running deployment's lock. */
static int owner_alive(const sqlite_backend *b, int pid, uint64_t start, const char *host) {
  if (host[0] != '\0' && strcmp(host, b->host) != 0)
    return 1;
  return pid > 0 && dc_proc_alive(pid, start);
}

/* What recovery does to one deployment whose owner is gone. A deployment
 * no longer running is left as it is. */
static int interrupt_deployment(sqlite3 *db, const char *id, int pid, char *err, const char *what) {
  char errors[128], data[64];
  dc_fmt(errors, sizeof errors, "[\"interrupted: deployctl (pid %d) stopped during the deployment\"]", pid);
  dc_fmt(data, sizeof data, "{\"pid\":%d}", pid);
  double now = dc_wall_now();
  if (run(db, err, what,
          "UPDATE deployments SET status = 'interrupted', errors = ?1, finished_at = ?2, duration = CASE WHEN "
          "created_at > 0 AND ?2 > created_at THEN ?2 - created_at ELSE 0 END WHERE id = ?3 AND status = 'running'",
          "sds", errors, now, id) != DC_OK)
    return DC_ERROR;
  if (sqlite3_changes(db) == 0)
    return run(db, err, what, "DELETE FROM locks WHERE deployment_id = ?", "s", id);
  if (run(db, err, what,
          "INSERT INTO events(deployment_id, target, ts, kind, data) SELECT id, target, ?, 'interrupted', ? FROM "
          "deployments WHERE id = ?",
          "dss", now, data, id) != DC_OK ||
      run(db, err, what, "DELETE FROM locks WHERE deployment_id = ?", "s", id) != DC_OK)
    return DC_ERROR;
  return run(db, err, what,
             "UPDATE targets SET status = CASE WHEN current_version <> '' THEN 'deployed' ELSE 'failed' END, "
             "updated_at = ? WHERE name = (SELECT target FROM deployments WHERE id = ?)",
             "ds", now, id);
}

/* DC_LOCKED when a live owner holds the target; a dead holder's deployment
 * is interrupted and its lock removed. */
static int check_lock(sqlite_backend *b, const char *target, char *err, const char *what) {
  sqlite3 *db = b->wdb;
  store_lock l;
  memset(&l, 0, sizeof l);
  sqlite3_stmt *st = query(db, err, what, "SELECT " LOCK_COLS " FROM locks WHERE target = ?", "s", target);
  if (!st)
    return DC_ERROR;
  int rc = step_row(db, st, err, what);
  if (rc == 1)
    read_lock(st, &l);
  sqlite3_finalize(st);
  if (rc <= 0)
    return rc == 0 ? DC_OK : DC_ERROR;
  if (owner_alive(b, l.pid, l.pid_start, l.host)) {
    char since[32];
    dc_iso8601(l.acquired_at, since, sizeof since);
    if (strcmp(l.purpose, "deploy") != 0)
      dc_errf(err, "target locked: '%s' is being %s (pid %d on %s, since %s): wait for it to finish", target,
              store_lock_doing(l.purpose), l.pid, l.host, since);
    else
      dc_errf(err, "target locked: '%s' is being deployed by deployment %s (pid %d on %s, since %s): wait for it "
                   "to finish",
              target, l.deployment_id, l.pid, l.host, since);
    return DC_LOCKED;
  }
  if (interrupt_deployment(db, l.deployment_id, l.pid, err, what) != DC_OK)
    return DC_ERROR;
  return run(db, err, what, "DELETE FROM locks WHERE target = ?", "s", target);
}

/* A lock held while its owner process lives (a dead one is taken over by
 * check_lock). */
static int insert_lock(sqlite_backend *b, const char *target, const char *holder, const char *purpose, int pid,
                       uint64_t start, const char *host, char *err, const char *what) {
  return run(b->wdb, err, what,
             "INSERT INTO locks(target, deployment_id, purpose, pid, pid_start, host, acquired_at, expires_at) "
             "VALUES(?, ?, ?, ?, ?, ?, ?, 0)",
             "sssiusd", target, holder, purpose, pid, start, host, dc_wall_now());
}

/* The snapshot work under a lock starts from, read under that lock. */
static int read_snapshot(sqlite3 *db, store_op *op, const char *target, const char *what) {
  if (get_target(db, target, &op->target, op->err, what) != DC_OK)
    return DC_ERROR;
  op->has_target = 1;
  return collect(db,
                 query(db, op->err, what, "SELECT " INSTANCE_COLS " FROM instances WHERE target = ? ORDER BY id", "s",
                       target),
                 op, ROWS_INSTANCES, what);
}

static int op_begin(sqlite_backend *b, store_op *op, const char *what) {
  sqlite3 *db = b->wdb;
  store_deployment *d = &op->dep;
  int rc = get_target(db, d->target, &op->target, op->err, what);
  if (rc != DC_OK)
    return rc;
  /* The version it starts from is the one live as the lock is taken. */
  if (!d->from_version[0])
    dc_strlcpy(d->from_version, op->target.current_version, sizeof d->from_version);
  rc = check_lock(b, d->target, op->err, what);
  if (rc != DC_OK)
    return rc;
  /* Callers normally fill the owner; one left empty is this process. */
  int pid = d->owner_pid > 0 ? d->owner_pid : (int)getpid();
  uint64_t start = d->owner_pid > 0 ? d->owner_start : dc_proc_start_time(pid);
  const char *host = d->owner_host[0] ? d->owner_host : b->host;
  const char *kind = d->kind[0] ? d->kind : "deploy";
  double now = dc_wall_now();
  if (run(db, op->err, what,
          "INSERT INTO deployments(id, target, version, from_version, kind, strategy, status, created_at, "
          "finished_at, duration, errors, metadata, owner_pid, owner_start, owner_host, user) "
          "VALUES(?, ?, ?, ?, ?, ?, 'running', ?, 0, 0, ?, ?, ?, ?, ?, ?)",
          "ssssssdjjiuss", d->id, d->target, d->version, d->from_version, kind, d->strategy, d->created_at,
          d->errors, d->metadata, pid, start, host, d->user) != DC_OK ||
      insert_lock(b, d->target, d->id, "deploy", pid, start, host, op->err, what) != DC_OK ||
      run(db, op->err, what, "UPDATE targets SET status = ?, updated_at = ? WHERE name = ?", "sds",
          store_begin_status(kind), now, d->target) != DC_OK)
    return DC_ERROR;
  return read_snapshot(db, op, d->target, what);
}

static int op_lock_take(sqlite_backend *b, store_op *op, const char *what) {
  int rc = get_target(b->wdb, op->name, &op->target, op->err, what);
  if (rc == DC_OK)
    rc = check_lock(b, op->name, op->err, what);
  int pid = (int)getpid();
  if (rc == DC_OK)
    rc = insert_lock(b, op->name, op->id, op->command, pid, dc_proc_start_time(pid), b->host, op->err, what);
  return rc == DC_OK ? read_snapshot(b->wdb, op, op->name, what) : rc;
}

/* Promotion shifts current to previous, except when the same version is
 * deployed again: then previous keeps the version a rollback would want. */
static int promote_steps(sqlite3 *db, const char *id, char *err, const char *what) {
  store_deployment d;
  memset(&d, 0, sizeof d);
  int rc = get_deployment(db, id, &d, err, what);
  if (rc == DC_OK)
    rc = run(db, err, what,
             "UPDATE targets SET previous_version = CASE WHEN current_version = ?1 THEN previous_version ELSE "
             "current_version END, current_version = ?1, live_deployment = ?2 WHERE name = ?3",
             "sss", d.version, id, d.target);
  store_deployment_clear(&d);
  return rc;
}

static int op_finish(sqlite3 *db, store_op *op, const char *what) {
  const store_finish *f = &op->fin;
  store_deployment d;
  memset(&d, 0, sizeof d);
  int rc = get_deployment(db, f->id, &d, op->err, what);
  if (rc != DC_OK)
    return rc;
  char target[sizeof d.target];
  dc_strlcpy(target, d.target, sizeof target);
  store_deployment_clear(&d);
  if (run(db, op->err, what, "UPDATE deployments SET status = ?, errors = ?, finished_at = ?, duration = ? WHERE id = ?",
          "sjdds", f->status, f->errors_json, f->finished_at, f->duration, f->id) != DC_OK)
    return DC_ERROR;
  if (f->promoted && promote_steps(db, f->id, op->err, what) != DC_OK)
    return DC_ERROR;
  if (run(db, op->err, what,
          "UPDATE targets SET status = coalesce(?, status), health = coalesce(?, health), updated_at = ? "
          "WHERE name = ?",
          "jjds", f->target_status, f->target_health, dc_wall_now(), target) != DC_OK)
    return DC_ERROR;
  return run(db, op->err, what, "DELETE FROM locks WHERE target = ? AND deployment_id = ?", "ss", target, f->id);
}

static int op_control_set(sqlite3 *db, store_op *op, const char *what) {
  store_deployment *d = store_op_add_deployment(op);
  if (!d) {
    dc_errf(op->err, "deploy: store: %s: out of memory", what);
    return DC_ERROR;
  }
  sqlite3_stmt *st = query(db, op->err, what,
                           "SELECT " DEPLOYMENT_COLS " FROM deployments WHERE target = ? AND status = 'running' "
                           "ORDER BY seq DESC LIMIT 1",
                           "s", op->name);
  if (!st)
    return DC_ERROR;
  int rc = step_row(db, st, op->err, what);
  if (rc == 1 && read_deployment(st, d) != 0)
    rc = -1;
  sqlite3_finalize(st);
  if (rc < 0)
    return DC_ERROR;
  if (rc == 0) {
    op->ndeployments = 0;
    dc_errf(op->err, "no deployment of '%s' is running: nothing to %s", op->name, op->command);
    return DC_NOTFOUND;
  }
  if (run(db, op->err, what,
          "INSERT INTO controls(deployment_id, target, command, requested_at, requested_by) VALUES(?, ?, ?, ?, ?)",
          "sssds", d->id, op->name, op->command, dc_wall_now(), op->by) != DC_OK)
    return DC_ERROR;
  op->out_id = sqlite3_last_insert_rowid(db);
  return DC_OK;
}

static int op_recover(sqlite_backend *b, store_op *op, const char *what) {
  sqlite3 *db = b->wdb;
  store_op running;
  memset(&running, 0, sizeof running);
  int rc = collect(db,
                   query(db, op->err, what,
                         "SELECT " DEPLOYMENT_COLS " FROM deployments WHERE status = 'running' ORDER BY seq", ""),
                   &running, ROWS_DEPLOYMENTS, what);
  if (rc != DC_OK)
    dc_strlcpy(op->err, running.err, sizeof op->err);
  for (size_t i = 0; rc == DC_OK && i < running.ndeployments; i++) {
    const store_deployment *d = &running.deployments[i];
    if (owner_alive(b, d->owner_pid, d->owner_start, d->owner_host))
      continue;
    rc = interrupt_deployment(db, d->id, d->owner_pid, op->err, what);
    store_deployment *row = rc == DC_OK ? store_op_add_deployment(op) : NULL;
    if (rc == DC_OK && !row) {
      dc_errf(op->err, "deploy: store: %s: out of memory", what);
      rc = DC_ERROR;
    }
    if (rc == DC_OK)
      rc = get_deployment(db, d->id, row, op->err, what);
  }
  for (size_t i = 0; i < running.ndeployments; i++)
    store_deployment_clear(&running.deployments[i]);
  free(running.deployments);
  return rc;
}

/* Events and commands first, then the rows: the same kept set each time
 * (nothing else writes inside the transaction). */
static int op_prune(sqlite3 *db, store_op *op, const char *what) {
  static const char *const deletes[] = {
      "DELETE FROM events WHERE target = ?1 AND deployment_id NOT IN "
      "(SELECT id FROM (" STORE_PRUNE_KEEP("?1", "?2") ") WHERE id IS NOT NULL)",
      "DELETE FROM controls WHERE target = ?1 AND deployment_id NOT IN "
      "(SELECT id FROM (" STORE_PRUNE_KEEP("?1", "?2") ") WHERE id IS NOT NULL)",
      "DELETE FROM deployments WHERE target = ?1 AND id NOT IN "
      "(SELECT id FROM (" STORE_PRUNE_KEEP("?1", "?2") ") WHERE id IS NOT NULL)",
  };
  for (size_t i = 0; i < sizeof deletes / sizeof *deletes; i++)
    if (run(db, op->err, what, deletes[i], "si", op->name, op->limit) != DC_OK)
      return DC_ERROR;
  op->out_id = sqlite3_changes(db);
  return DC_OK;
}

static int op_instance_add(sqlite3 *db, store_op *op, const char *what) {
  const store_instance *in = &op->inst;
  int rc = run(db, op->err, what,
               "INSERT INTO instances(target, deployment_id, version, idx, node, host, port, handle, pid, pid_start, "
               "state, weight, server, log_path, started_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               "sssissisiusissd", in->target, in->deployment_id, in->version, in->idx, in->node, in->host, in->port,
               in->handle, in->pid, in->pid_start, in->state, in->weight, in->server, in->log_path, in->started_at);
  if (rc == DC_OK)
    op->out_id = sqlite3_last_insert_rowid(db);
  return rc;
}

static int op_instance_update(sqlite3 *db, store_op *op, const char *what) {
  const store_instance *in = &op->inst;
  int rc = run(db, op->err, what,
               "UPDATE instances SET node = ?, host = ?, port = ?, handle = ?, pid = ?, pid_start = ?, state = ?, "
               "weight = ?, server = ?, log_path = ?, started_at = ? WHERE id = ?",
               "ssisiusissdI", in->node, in->host, in->port, in->handle, in->pid, in->pid_start, in->state,
               in->weight, in->server, in->log_path, in->started_at, in->id);
  if (rc == DC_OK && sqlite3_changes(db) == 0) {
    dc_errf(op->err, "deploy: store: unknown instance %lld", (long long)in->id);
    return DC_NOTFOUND;
  }
  return rc;
}

static int op_maintenance(sqlite3 *db, store_op *op, const char *what) {
  const store_maintenance *m = &op->maint;
  int rc = run(db, op->err, what,
               "UPDATE targets SET maintenance = ?, maintenance_message = ?, maintenance_retry_after = ?, "
               "maintenance_since = ?, maintenance_by = ?, updated_at = ? WHERE name = ?",
               "isidsds", m->on, m->message, m->retry_after, m->since, m->by, dc_wall_now(), op->name);
  if (rc == DC_OK && sqlite3_changes(db) == 0) {
    dc_errf(op->err, "deploy: store: unknown target '%s'", op->name);
    return DC_NOTFOUND;
  }
  return rc;
}

/* One write, inside the batch's transaction (on the thread pool). */
static int run_write(sqlite_backend *b, store_op *op, const char *what) {
  sqlite3 *db = b->wdb;
  switch (op->kind) {
  case STORE_OP_TARGET_ENSURE:
    return run(db, op->err, what,
               "INSERT INTO targets(name, status, health, updated_at) VALUES(?, 'deployed', 'unhealthy', ?) "
               "ON CONFLICT(name) DO NOTHING",
               "sd", op->name, dc_wall_now());
  case STORE_OP_BEGIN:
    return op_begin(b, op, what);
  case STORE_OP_FINISH:
    return op_finish(db, op, what);
  case STORE_OP_PROMOTE:
    return promote_steps(db, op->id, op->err, what);
  case STORE_OP_EVENT:
    return run(db, op->err, what, "INSERT INTO events(deployment_id, target, ts, kind, data) VALUES(?, ?, ?, ?, ?)",
               "ssdsj", op->ev.deployment_id, op->ev.target, op->ev.ts, op->ev.kind, op->ev.data);
  case STORE_OP_INSTANCE_ADD:
    return op_instance_add(db, op, what);
  case STORE_OP_INSTANCE_UPDATE:
    return op_instance_update(db, op, what);
  case STORE_OP_INSTANCE_DELETE:
    return run(db, op->err, what, "DELETE FROM instances WHERE id = ?", "I", op->id64);
  case STORE_OP_CONTROL_SET:
    return op_control_set(db, op, what);
  case STORE_OP_RECOVER:
    return op_recover(b, op, what);
  case STORE_OP_LOCK_RENEW:
    return DC_OK; /* locks here live as long as their owner: nothing expires */
  case STORE_OP_LOCK_TAKE:
    return op_lock_take(b, op, what);
  case STORE_OP_LOCK_RELEASE:
    return run(db, op->err, what, "DELETE FROM locks WHERE target = ? AND deployment_id = ?", "ss", op->name, op->id);
  case STORE_OP_PRUNE:
    return op_prune(db, op, what);
  case STORE_OP_MAINTENANCE:
    return op_maintenance(db, op, what);
  default:
    dc_errf(op->err, "deploy: store: %s: not a write", what);
    return DC_ERROR;
  }
}

/* ---- the batch, on the thread pool ---- */

static void fail_all(sqlite_backend *b, const char *msg) {
  for (size_t i = 0; i < b->nops; i++) {
    b->ops[i]->rc = DC_ERROR;
    dc_strlcpy(b->ops[i]->err, msg, sizeof b->ops[i]->err);
    /* A result that never committed must not be used. */
    b->ops[i]->out_id = 0;
  }
}

static void commit_work(uv_work_t *w) {
  sqlite_backend *b = w->data;
  sqlite3 *db = b->wdb;
  char msg[DC_ERR_MAX];
  if (exec(db, "BEGIN IMMEDIATE") != SQLITE_OK) {
    db_fail(db, msg, "cannot start a transaction");
    fail_all(b, msg);
    return;
  }
  for (size_t i = 0; i < b->nops; i++) {
    store_op *op = b->ops[i];
    char what[WHAT_SIZE];
    store_op_describe(op, what, sizeof what);
    if (exec(db, "SAVEPOINT op") != SQLITE_OK) {
      op->rc = db_fail(db, op->err, what);
      continue;
    }
    op->rc = run_write(b, op, what);
    if (op->rc != DC_OK)
      exec(db, "ROLLBACK TO op");
    exec(db, "RELEASE op");
  }
  if (exec(db, "COMMIT") != SQLITE_OK) {
    db_fail(db, msg, "cannot commit");
    if (!sqlite3_get_autocommit(db))
      exec(db, "ROLLBACK");
    fail_all(b, msg);
  }
}

static void commit_after(uv_work_t *w, int status) {
  sqlite_backend *b = w->data;
  (void)status;
  store_backend_done done = b->commit_done;
  void *ctx = b->commit_ctx;
  b->commit_done = NULL;
  b->ops = NULL;
  b->nops = 0;
  done(ctx);
}

static void sq_commit(store_backend *base, store_op **ops, size_t n, store_backend_done done, void *ctx) {
  sqlite_backend *b = (sqlite_backend *)base;
  b->ops = ops;
  b->nops = n;
  b->commit_done = done;
  b->commit_ctx = ctx;
  b->work.data = b;
  if (uv_queue_work(b->e->loop, &b->work, commit_work, commit_after) != 0) {
    /* Without the thread pool, commit on the loop: late beats lost. */
    commit_work(&b->work);
    commit_after(&b->work, 0);
  }
}

/* ---- reads, on the loop ---- */

static void idle_cb(uv_idle_t *h) {
  sqlite_backend *b = h->data;
  /* Completions queued by a callback run in a later pass. */
  done_item *list = b->done_head;
  b->done_head = b->done_tail = NULL;
  uv_idle_stop(&b->idle);
  while (list) {
    done_item *d = list;
    list = d->next;
    d->done(d->ctx);
    free(d);
  }
}

static int later(sqlite_backend *b, store_backend_done done, void *ctx) {
  done_item *d = malloc(sizeof *d);
  if (!d)
    return -1;
  d->done = done;
  d->ctx = ctx;
  d->next = NULL;
  if (b->done_tail)
    b->done_tail->next = d;
  else
    b->done_head = d;
  b->done_tail = d;
  uv_idle_start(&b->idle, idle_cb);
  return 0;
}

/* Ids are "d" + hex: anything else cannot be a prefix of one, and must not
 * reach LIKE, where '%' and '_' mean something. */
static int id_prefix_ok(const char *s) {
  if (!*s)
    return 0;
  for (; *s; s++)
    if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f') || *s == 'd'))
      return 0;
  return 1;
}

static int read_deployment_by_prefix(sqlite3 *db, store_op *op, const char *what) {
  if (!id_prefix_ok(op->id)) {
    dc_errf(op->err, "deploy: no deployment '%s': ids look like d0194c1a2b3c4d5e6f (see 'deployctl history TARGET')",
            op->id);
    return DC_NOTFOUND;
  }
  int rc = collect(db,
                   query(db, op->err, what,
                         "SELECT " DEPLOYMENT_COLS " FROM deployments WHERE id = ?1 OR id LIKE ?1 || '%' "
                         "ORDER BY id = ?1 DESC, seq DESC LIMIT 6",
                         "s", op->id),
                   op, ROWS_DEPLOYMENTS, what);
  if (rc != DC_OK)
    return rc;
  if (op->ndeployments == 0) {
    dc_errf(op->err, "deploy: store: unknown deployment '%s'", op->id);
    return DC_NOTFOUND;
  }
  if (op->ndeployments > 1 && strcmp(op->deployments[0].id, op->id) != 0) {
    char list[300] = "";
    size_t len = 0;
    for (size_t i = 0; i < op->ndeployments && i < 5; i++)
      len += (size_t)snprintf(list + len, len < sizeof list ? sizeof list - len : 0, "%s%s", i ? ", " : "",
                              op->deployments[i].id);
    dc_errf(op->err, "deploy: '%s' names more than one deployment (%s%s): give more of the id", op->id, list,
            op->ndeployments > 5 ? ", ..." : "");
    return DC_AMBIGUOUS;
  }
  for (size_t i = 1; i < op->ndeployments; i++)
    store_deployment_clear(&op->deployments[i]);
  op->ndeployments = 1;
  return DC_OK;
}

static int run_read(sqlite_backend *b, store_op *op, const char *what) {
  sqlite3 *db = b->rdb;
  sqlite3_stmt *st;
  int rc;
  switch (op->kind) {
  case STORE_OP_TARGET_GET:
    rc = get_target(db, op->name, &op->target, op->err, what);
    op->has_target = rc == DC_OK;
    return rc;
  case STORE_OP_DEPLOYMENT_GET:
    return read_deployment_by_prefix(db, op, what);
  case STORE_OP_HISTORY:
    /* LIMIT -1 is SQLite's "no limit". */
    st = query(db, op->err, what,
               "SELECT " DEPLOYMENT_COLS " FROM deployments WHERE ?1 = '' OR target = ?1 ORDER BY seq DESC LIMIT ?2",
               "si", op->name, op->limit > 0 ? op->limit : -1);
    return collect(db, st, op, ROWS_DEPLOYMENTS, what);
  case STORE_OP_EVENTS:
    st = query(db, op->err, what, "SELECT " EVENT_COLS " FROM events WHERE deployment_id = ? ORDER BY id", "s",
               op->id);
    return collect(db, st, op, ROWS_EVENTS, what);
  case STORE_OP_INSTANCES:
    st = query(db, op->err, what,
               "SELECT " INSTANCE_COLS " FROM instances WHERE ?1 = '' OR target = ?1 ORDER BY id", "s", op->name);
    return collect(db, st, op, ROWS_INSTANCES, what);
  case STORE_OP_PORTS_IN_USE:
    /* A stopped instance's port is free again, even while its row is kept. */
    st = query(db, op->err, what,
               "SELECT DISTINCT port FROM instances WHERE node = ? AND port > 0 AND state <> 'stopped' ORDER BY port",
               "s", op->node);
    return collect(db, st, op, ROWS_PORTS, what);
  case STORE_OP_CONTROLS:
    st = query(db, op->err, what, "SELECT " CONTROL_COLS " FROM controls WHERE id > ? ORDER BY id", "I", op->id64);
    return collect(db, st, op, ROWS_CONTROLS, what);
  case STORE_OP_LOCK_GET:
    st = query(db, op->err, what, "SELECT " LOCK_COLS " FROM locks WHERE target = ?", "s", op->name);
    if (!st)
      return DC_ERROR;
    rc = step_row(db, st, op->err, what);
    if (rc == 1)
      read_lock(st, &op->lock);
    op->has_lock = rc == 1;
    sqlite3_finalize(st);
    return rc < 0 ? DC_ERROR : DC_OK;
  case STORE_OP_INTEGRITY: {
    char result[256] = "";
    st = query(db, op->err, what, "PRAGMA integrity_check", "");
    if (!st)
      return DC_ERROR;
    rc = step_row(db, st, op->err, what);
    if (rc == 1)
      col_text(st, 0, result, sizeof result);
    sqlite3_finalize(st);
    if (rc < 0)
      return DC_ERROR;
    if (strcmp(result, "ok") == 0)
      return DC_OK;
    dc_errf(op->err, "deploy: state file %s is damaged (integrity check: %s): restore a backup or move it away",
            b->path, result);
    return DC_ERROR;
  }
  default:
    dc_errf(op->err, "deploy: store: %s: not a read", what);
    return DC_ERROR;
  }
}

static void sq_read(store_backend *base, store_op *op, store_backend_done done, void *ctx) {
  sqlite_backend *b = (sqlite_backend *)base;
  char what[WHAT_SIZE];
  store_op_describe(op, what, sizeof what);
  /* One read transaction, so multi-statement reads see one snapshot. */
  if (exec(b->rdb, "BEGIN") != SQLITE_OK) {
    op->rc = db_fail(b->rdb, op->err, what);
  } else {
    op->rc = run_read(b, op, what);
    exec(b->rdb, "COMMIT");
  }
  if (later(b, done, ctx) != 0) {
    /* Cannot defer: complete now rather than never. */
    done(ctx);
  }
}

static const char *sq_location(const store_backend *base) { return ((const sqlite_backend *)base)->path; }

static void idle_closed(uv_handle_t *h) {
  sqlite_backend *b = h->data;
  sqlite3_close(b->rdb);
  sqlite3_close(b->wdb);
  free(b);
}

/* Every op finalizes its statements; sqlite3_close then never fails with
 * SQLITE_BUSY. The idle handle is closed first: its memory is ours. */
static void sq_free(store_backend *base) {
  sqlite_backend *b = (sqlite_backend *)base;
  while (b->done_head) {
    done_item *d = b->done_head;
    b->done_head = d->next;
    d->done(d->ctx);
    free(d);
  }
  uv_close((uv_handle_t *)&b->idle, idle_closed);
}

/* ---- opening --------------------------------------------------------- */

/* mkdir -p of the directory that holds path. */
static int make_parent_dirs(const char *path, char *err) {
  char dir[PATH_SIZE];
  dc_strlcpy(dir, path, sizeof dir);
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir)
    return DC_OK;
  *slash = '\0';
  for (char *p = dir + 1;; p++) {
    if (*p != '/' && *p != '\0')
      continue;
    char c = *p;
    *p = '\0';
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
      dc_errf(err, "deploy: cannot create directory '%s' for state file %s: %s: check its permissions or point "
                   "config.state elsewhere",
              dir, path, strerror(errno));
      return DC_ERROR;
    }
    *p = c;
    if (c == '\0')
      return DC_OK;
  }
}

/* The first read is where SQLite finds out whether the file is a database
 * at all, so its errors get the most specific message. */
static int open_fail(sqlite3 *db, const char *path, char *err) {
  if (sqlite3_errcode(db) == SQLITE_NOTADB)
    dc_errf(err, "deploy: state file %s is not a SQLite database: move it away or point config.state elsewhere",
            path);
  else
    dc_errf(err, "deploy: cannot open state file %s: %s: check the path and its permissions", path,
            sqlite3_errmsg(db));
  return DC_ERROR;
}

static int read_int(sqlite3 *db, const char *path, const char *sql, int *out, char *err) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return open_fail(db, path, err);
  int rc = sqlite3_step(st);
  *out = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  if (rc != SQLITE_ROW && rc != SQLITE_DONE)
    open_fail(db, path, err);
  sqlite3_finalize(st);
  return rc == SQLITE_ROW || rc == SQLITE_DONE ? DC_OK : DC_ERROR;
}

/* A missing meta table or row means a damaged file; any other failure
 * (busy, I/O) is reported as it is. */
static int read_meta_version(sqlite3 *db, const char *path, int *version, char *err) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = 'schema_version'", -1, &st, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_step(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE && rc != SQLITE_ERROR) {
    open_fail(db, path, err);
    sqlite3_finalize(st);
    return DC_ERROR;
  }
  const unsigned char *v = rc == SQLITE_ROW ? sqlite3_column_text(st, 0) : NULL;
  char *end = NULL;
  long n = v ? strtol((const char *)v, &end, 10) : -1;
  int valid = v && *end == '\0' && n >= 1 && n <= 1000000;
  sqlite3_finalize(st); /* frees v */
  if (!valid) {
    dc_errf(err, "deploy: state file %s is damaged (no valid schema version in its meta table): restore a backup "
                 "or move it away",
            path);
    return DC_ERROR;
  }
  *version = (int)n;
  return DC_OK;
}

/* The schema version of the open file: 0 for a new, empty file. Refuses
 * files of other programs and of newer deployctl builds. Read-only, so a
 * refused file is left exactly as it was. */
static int read_schema_version(sqlite3 *db, const char *path, int *version, char *err) {
  int app_id = 0, tables = 0;
  if (read_int(db, path, "PRAGMA application_id", &app_id, err) != DC_OK ||
      read_int(db, path, "SELECT count(*) FROM sqlite_master WHERE type = 'table'", &tables, err) != DC_OK)
    return DC_ERROR;
  *version = 0;
  if (app_id == 0 && tables == 0)
    return DC_OK;
  if (app_id != APP_ID) {
    dc_errf(err, "deploy: state file %s is not a deployctl store (it is a SQLite database of another program): "
                 "point config.state elsewhere",
            path);
    return DC_ERROR;
  }
  if (read_meta_version(db, path, version, err) != DC_OK)
    return DC_ERROR;
  if (*version > STORE_SCHEMA_VERSION) {
    dc_errf(err, "deploy: state file %s was written by a newer deployctl (schema %d, this build knows %d): upgrade "
                 "deployctl or point config.state elsewhere",
            path, *version, STORE_SCHEMA_VERSION);
    return DC_ERROR;
  }
  return DC_OK;
}

static int set_wal(sqlite3 *db, char *mode, size_t size) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_step(st);
  if (rc == SQLITE_ROW)
    col_text(st, 0, mode, size);
  sqlite3_finalize(st);
  return rc;
}

/* Switching to WAL needs an exclusive lock and SQLite returns SQLITE_BUSY
 * at once, without the busy handler, while another process holds the file
 * (two runs creating the store together): retry up to the busy timeout. */
static int set_wal_retrying(sqlite3 *db, char *mode, size_t size) {
  const struct timespec pause = {0, 10 * 1000 * 1000};
  int rc = set_wal(db, mode, size);
  for (int waited = 0; (rc & 0xff) == SQLITE_BUSY && waited < BUSY_TIMEOUT_MS; waited += 10) {
    nanosleep(&pause, NULL);
    rc = set_wal(db, mode, size);
  }
  return rc;
}

static int configure(sqlite3 *db, const char *path, char *err) {
  char mode[16] = "";
  if (set_wal_retrying(db, mode, sizeof mode) != SQLITE_ROW)
    return open_fail(db, path, err);
  /* Only WAL + synchronous=FULL keeps committed transactions across a power
   * loss; an in-memory database (no file name) has no journal to speak of. */
  const char *file = sqlite3_db_filename(db, "main");
  if (strcmp(mode, "wal") != 0 && file && file[0] != '\0') {
    dc_errf(err, "deploy: state file %s cannot use WAL journaling (got '%s'): put it on a local filesystem", path,
            mode);
    return DC_ERROR;
  }
  if (exec(db, "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON") != SQLITE_OK)
    return open_fail(db, path, err);
  return DC_OK;
}

/* Runs inside the migration transaction: the version is read again there,
 * because another process may have created the schema since we looked. */
static int migrate_steps(sqlite3 *db, const char *path, char *err) {
  int version = 0;
  if (read_schema_version(db, path, &version, err) != DC_OK)
    return DC_ERROR;
  for (; version < STORE_SCHEMA_VERSION; version++) {
    char what[WHAT_SIZE];
    dc_fmt(what, sizeof what, "cannot migrate state file %s from schema %d to %d", path, version, version + 1);
    if (exec(db, migrations[version]) != SQLITE_OK)
      return db_fail(db, err, what);
    if (run(db, err, what,
            "INSERT INTO meta(key, value) VALUES('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value = "
            "excluded.value",
            "i", version + 1) != DC_OK)
      return DC_ERROR;
  }
  return DC_OK;
}

static int migrate(sqlite3 *db, const char *path, char *err) {
  if (exec(db, "BEGIN IMMEDIATE") != SQLITE_OK)
    return db_fail(db, err, "cannot migrate the state file");
  int rc = migrate_steps(db, path, err);
  if (rc == DC_OK && exec(db, "COMMIT") != SQLITE_OK)
    rc = db_fail(db, err, "cannot migrate the state file");
  if (rc != DC_OK && !sqlite3_get_autocommit(db))
    exec(db, "ROLLBACK");
  return rc;
}

static int open_conn(sqlite3 **db, const char *path, char *err) {
  int rc = sqlite3_open_v2(path, db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
  if (rc != SQLITE_OK && !*db) {
    dc_errf(err, "deploy: cannot open state file %s: out of memory", path);
    return DC_ERROR;
  }
  if (rc != SQLITE_OK)
    return open_fail(*db, path, err);
  /* The busy timeout is set before the first read: another process may be
   * in the middle of creating the schema. */
  sqlite3_busy_timeout(*db, BUSY_TIMEOUT_MS);
  sqlite3_extended_result_codes(*db, 1);
  return DC_OK;
}

static int open_db(sqlite_backend *b, char *err) {
  if (open_conn(&b->wdb, b->path, err) != DC_OK)
    return DC_ERROR;
  /* One read transaction, so the checks see one snapshot even while another
   * process commits the schema between them. */
  if (exec(b->wdb, "BEGIN") != SQLITE_OK)
    return open_fail(b->wdb, b->path, err);
  int version = 0;
  int rc = read_schema_version(b->wdb, b->path, &version, err);
  exec(b->wdb, "ROLLBACK");
  if (rc != DC_OK || configure(b->wdb, b->path, err) != DC_OK)
    return DC_ERROR;
  if (version < STORE_SCHEMA_VERSION && migrate(b->wdb, b->path, err) != DC_OK)
    return DC_ERROR;
  if (open_conn(&b->rdb, b->path, err) != DC_OK)
    return DC_ERROR;
  return exec(b->rdb, "PRAGMA foreign_keys=ON") == SQLITE_OK ? DC_OK : open_fail(b->rdb, b->path, err);
}

int store_sqlite_open(store_backend **out, engine *e, const char *path, char *err) {
  *out = NULL;
  if (strlen(path) >= PATH_SIZE) {
    dc_errf(err, "deploy: state file path is too long (%zu bytes, at most %d): point config.state elsewhere",
            strlen(path), PATH_SIZE - 1);
    return DC_ERROR;
  }
  sqlite_backend *b = calloc(1, sizeof *b);
  if (!b) {
    dc_errf(err, "deploy: cannot open state file %s: out of memory", path);
    return DC_ERROR;
  }
  dc_strlcpy(b->path, path, sizeof b->path);
  char host[256] = "";
  if (gethostname(host, sizeof host) != 0)
    host[0] = '\0';
  host[sizeof host - 1] = '\0';
  dc_strlcpy(b->host, host, sizeof b->host);
  if (make_parent_dirs(path, err) != DC_OK || open_db(b, err) != DC_OK) {
    sqlite3_close(b->rdb);
    sqlite3_close(b->wdb);
    free(b);
    return DC_ERROR;
  }
  b->e = e;
  uv_idle_init(e->loop, &b->idle);
  b->idle.data = b;
  b->base.version = STORE_BACKEND_VERSION;
  b->base.kind = "sqlite";
  b->base.lease_seconds = 0;
  b->base.commit = sq_commit;
  b->base.read = sq_read;
  b->base.location = sq_location;
  b->base.free = sq_free;
  *out = &b->base;
  return DC_OK;
}
