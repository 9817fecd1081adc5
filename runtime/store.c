/* The store: deployctl's durable state in SQLite. See store.h for the
 * contract; the invariants this file keeps are:
 *   - every write is one BEGIN IMMEDIATE transaction, rolled back on any
 *     error, so a transition is all or nothing;
 *   - SQL is static text with bound parameters, never formatted with data;
 *   - no statement is open while a caller's callback runs (rows are
 *     buffered first), so callbacks may write to the store and no read
 *     snapshot is held while they work. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup, gethostname, mkdir */
#endif

#include "store.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "util.h"

/* "DPLY" in the SQLite header: tells our files from other programs'. */
#define APP_ID 0x44504c59
#define PATH_SIZE 4096
#define WHAT_SIZE 256

/* How long a writer waits for another process's transaction. */
#define BUSY_TIMEOUT_MS 10000

struct store {
  sqlite3 *db;
  char path[PATH_SIZE];
  /* This machine, as owner_host is written, to tell local lock owners
   * (whose pids can be checked) from remote ones (which cannot). */
  char host[64];
};

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

/* migrations[n] takes a file from schema n to n + 1; a new schema version
 * appends a step here and never edits an old one. */
static const char *const migrations[] = {SCHEMA_V1};

_Static_assert(sizeof migrations / sizeof migrations[0] == STORE_SCHEMA_VERSION,
               "one migration step per schema version");

#define DEPLOYMENT_COLS                                                      \
  "id, seq, target, version, from_version, kind, strategy, status, "        \
  "created_at, finished_at, duration, errors, metadata, owner_pid, "        \
  "owner_start, owner_host, user"
#define TARGET_COLS                                                          \
  "name, current_version, previous_version, live_deployment, status, "      \
  "health, updated_at"
#define EVENT_COLS "id, deployment_id, target, ts, kind, data"
#define INSTANCE_COLS                                                        \
  "id, target, deployment_id, version, idx, host, port, pid, pid_start, "   \
  "state, weight, server, log_path, started_at"
#define LOCK_COLS "target, deployment_id, pid, pid_start, host, acquired_at"

/* ---- errors ------------------------------------------------------------ */

static const char *nz(const char *p) {
  return p ? p : "";
}

static void set_err(char *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void set_err(char *err, const char *fmt, ...) {
  if (!err)
    return;
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(err, DC_ERR_MAX, fmt, ap);
  va_end(ap);
}

/* `what` names the operation ("cannot insert deployment 'd1'"); SQLite's
 * message says why. Must run before any rollback, which resets it. */
static int db_fail(store *s, char *err, const char *what) {
  set_err(err, "deploy: store: %s: %s", what, sqlite3_errmsg(s->db));
  return DC_ERROR;
}

/* ---- statements ---------------------------------------------------------- */

/* Binds parameters 1..n from a type string: s text (NULL binds ''), j text
 * or NULL (JSON columns), i int, I int64_t, u uint64_t, d double. */
static int bind_args(sqlite3_stmt *st, const char *types, va_list ap) {
  int rc = SQLITE_OK;
  for (int i = 0; types[i] != '\0' && rc == SQLITE_OK; i++) {
    int at = i + 1;
    const char *text;
    switch (types[i]) {
    case 's':
      rc = sqlite3_bind_text(st, at, nz(va_arg(ap, const char *)), -1,
                             SQLITE_TRANSIENT);
      break;
    case 'j':
      text = va_arg(ap, const char *);
      rc = text ? sqlite3_bind_text(st, at, text, -1, SQLITE_TRANSIENT)
                : sqlite3_bind_null(st, at);
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

static sqlite3_stmt *vquery(store *s, char *err, const char *what,
                            const char *sql, const char *types, va_list ap) {
  if (!s || !s->db) {
    set_err(err, "deploy: store: %s: the store is not open", what);
    return NULL;
  }
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK) {
    db_fail(s, err, what);
    return NULL;
  }
  if (bind_args(st, types, ap) != SQLITE_OK) {
    db_fail(s, err, what);
    sqlite3_finalize(st);
    return NULL;
  }
  return st;
}

/* A prepared statement with its parameters bound, or NULL with err set. */
static sqlite3_stmt *query(store *s, char *err, const char *what,
                           const char *sql, const char *types, ...) {
  va_list ap;
  va_start(ap, types);
  sqlite3_stmt *st = vquery(s, err, what, sql, types, ap);
  va_end(ap);
  return st;
}

/* Runs a statement whose rows, if any, are not needed. */
static int run(store *s, char *err, const char *what, const char *sql,
               const char *types, ...) {
  va_list ap;
  va_start(ap, types);
  sqlite3_stmt *st = vquery(s, err, what, sql, types, ap);
  va_end(ap);
  if (!st)
    return DC_ERROR;
  int rc = sqlite3_step(st);
  while (rc == SQLITE_ROW)
    rc = sqlite3_step(st);
  if (rc != SQLITE_DONE)
    db_fail(s, err, what);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? DC_OK : DC_ERROR;
}

/* For queries of at most one row: 1 when there is one, 0 when none. */
static int step_row(store *s, sqlite3_stmt *st, char *err, const char *what) {
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW)
    return 1;
  if (rc == SQLITE_DONE)
    return 0;
  return db_fail(s, err, what);
}

/* ---- transactions -------------------------------------------------------- */

/* IMMEDIATE takes the write lock up front (waiting up to the busy timeout):
 * a deferred BEGIN that reads and then writes can fail with SQLITE_BUSY
 * without waiting at all. */
static int tx_begin(store *s, char *err, const char *what) {
  if (!s || !s->db) {
    set_err(err, "deploy: store: %s: the store is not open", what);
    return DC_ERROR;
  }
  if (sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
    return db_fail(s, err, what);
  return DC_OK;
}

/* Commits when rc is DC_OK, otherwise rolls back; returns rc, or DC_ERROR
 * when the commit itself fails. */
static int tx_end(store *s, int rc, char *err, const char *what) {
  if (rc == DC_OK) {
    if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK)
      return DC_OK;
    rc = db_fail(s, err, what);
  }
  if (!sqlite3_get_autocommit(s->db))
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
  return rc;
}

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

/* Row readers take void * so collect() can fill any row type; they return
 * -1 only when out of memory. */
static int read_deployment(sqlite3_stmt *st, void *row) {
  store_deployment *d = row;
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

static int read_target(sqlite3_stmt *st, void *row) {
  store_target *t = row;
  col_text(st, 0, t->name, sizeof t->name);
  col_text(st, 1, t->current_version, sizeof t->current_version);
  col_text(st, 2, t->previous_version, sizeof t->previous_version);
  col_text(st, 3, t->live_deployment, sizeof t->live_deployment);
  col_text(st, 4, t->status, sizeof t->status);
  col_text(st, 5, t->health, sizeof t->health);
  t->updated_at = sqlite3_column_double(st, 6);
  return 0;
}

static int read_event(sqlite3_stmt *st, void *row) {
  store_event *e = row;
  e->id = sqlite3_column_int64(st, 0);
  col_text(st, 1, e->deployment_id, sizeof e->deployment_id);
  col_text(st, 2, e->target, sizeof e->target);
  e->ts = sqlite3_column_double(st, 3);
  col_text(st, 4, e->kind, sizeof e->kind);
  return col_dup(st, 5, &e->data);
}

static int read_instance(sqlite3_stmt *st, void *row) {
  store_instance *i = row;
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
  return 0;
}

static int read_lock(sqlite3_stmt *st, void *row) {
  store_lock *l = row;
  col_text(st, 0, l->target, sizeof l->target);
  col_text(st, 1, l->deployment_id, sizeof l->deployment_id);
  l->pid = sqlite3_column_int(st, 2);
  l->pid_start = (uint64_t)sqlite3_column_int64(st, 3);
  col_text(st, 4, l->host, sizeof l->host);
  l->acquired_at = sqlite3_column_double(st, 5);
  return 0;
}

typedef int (*row_reader)(sqlite3_stmt *st, void *row);

static void clear_deployment(void *row) {
  store_deployment_clear(row);
}

static void clear_event(void *row) {
  store_event_clear(row);
}

/* Rows buffered between reading them and handing them to a callback. */
typedef struct rowbuf {
  char *rows;
  size_t n, cap, size; /* size: bytes per row */
} rowbuf;

/* A new zeroed row at the end of buf, or NULL when out of memory. */
static void *rowbuf_add(rowbuf *buf) {
  if (buf->n == buf->cap) {
    size_t cap = buf->cap ? buf->cap * 2 : 16;
    char *rows = realloc(buf->rows, cap * buf->size);
    if (!rows)
      return NULL;
    buf->rows = rows;
    buf->cap = cap;
  }
  void *row = buf->rows + buf->n * buf->size;
  memset(row, 0, buf->size);
  buf->n++;
  return row;
}

static void rowbuf_free(rowbuf *buf, void (*clear)(void *row)) {
  for (size_t i = 0; clear && i < buf->n; i++)
    clear(buf->rows + i * buf->size);
  free(buf->rows);
  buf->rows = NULL;
  buf->n = buf->cap = 0;
}

/* Reads every row of st into buf and finalizes st. On failure the rows
 * read so far stay in buf for the caller to free. */
static int collect(store *s, sqlite3_stmt *st, rowbuf *buf, row_reader read,
                   char *err, const char *what) {
  int rc = DC_OK;
  for (;;) {
    int step = sqlite3_step(st);
    if (step == SQLITE_DONE)
      break;
    if (step != SQLITE_ROW) {
      rc = db_fail(s, err, what);
      break;
    }
    void *row = rowbuf_add(buf);
    if (!row || read(st, row) != 0) {
      set_err(err, "deploy: store: %s: out of memory", what);
      rc = DC_ERROR;
      break;
    }
  }
  sqlite3_finalize(st);
  return rc;
}

/* Reads the single row of a query into out: DC_OK, DC_NOTFOUND (err not
 * set: the caller knows what was missing) or DC_ERROR. */
static int fetch_one(store *s, sqlite3_stmt *st, void *out, row_reader read,
                     char *err, const char *what) {
  if (!st)
    return DC_ERROR;
  int rc = step_row(s, st, err, what);
  if (rc == 1 && read(st, out) != 0) {
    set_err(err, "deploy: store: %s: out of memory", what);
    rc = DC_ERROR;
  }
  sqlite3_finalize(st);
  if (rc < 0)
    return DC_ERROR;
  return rc == 1 ? DC_OK : DC_NOTFOUND;
}

static int get_deployment(store *s, const char *id, store_deployment *out,
                          char *err, const char *what) {
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " DEPLOYMENT_COLS
                           " FROM deployments WHERE id = ?",
                           "s", id);
  int rc = fetch_one(s, st, out, read_deployment, err, what);
  if (rc == DC_ERROR)
    store_deployment_clear(out);
  if (rc == DC_NOTFOUND)
    set_err(err, "deploy: store: unknown deployment '%s'", nz(id));
  return rc;
}

void store_deployment_clear(store_deployment *d) {
  if (!d)
    return;
  free(d->errors);
  free(d->metadata);
  memset(d, 0, sizeof *d);
}

void store_event_clear(store_event *e) {
  if (!e)
    return;
  free(e->data);
  memset(e, 0, sizeof *e);
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
      set_err(err, "deploy: cannot create directory '%s' for state file %s: "
              "%s: check its permissions or point config.state elsewhere",
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
static int open_fail(store *s, char *err) {
  int code = sqlite3_errcode(s->db);
  if (code == SQLITE_NOTADB)
    set_err(err, "deploy: state file %s is not a SQLite database: move it "
            "away or point config.state elsewhere", s->path);
  else
    set_err(err, "deploy: cannot open state file %s: %s: check the path and "
            "its permissions", s->path, sqlite3_errmsg(s->db));
  return DC_ERROR;
}

static int read_int(store *s, const char *sql, int *out, char *err) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK)
    return open_fail(s, err);
  int rc = sqlite3_step(st);
  *out = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  if (rc != SQLITE_ROW && rc != SQLITE_DONE)
    open_fail(s, err);
  sqlite3_finalize(st);
  return rc == SQLITE_ROW || rc == SQLITE_DONE ? DC_OK : DC_ERROR;
}

/* A missing meta table or row means a damaged file; any other failure
 * (busy, I/O) is reported as it is. */
static int read_meta_version(store *s, int *version, char *err) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(
      s->db, "SELECT value FROM meta WHERE key = 'schema_version'", -1, &st,
      NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_step(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE && rc != SQLITE_ERROR) {
    open_fail(s, err);
    sqlite3_finalize(st);
    return DC_ERROR;
  }
  const unsigned char *v = rc == SQLITE_ROW ? sqlite3_column_text(st, 0) : NULL;
  char *end = NULL;
  long n = v ? strtol((const char *)v, &end, 10) : -1;
  int valid = v && *end == '\0' && n >= 1 && n <= 1000000;
  sqlite3_finalize(st); /* frees v */
  if (!valid) {
    set_err(err, "deploy: state file %s is damaged (no valid schema version "
            "in its meta table): restore a backup or move it away", s->path);
    return DC_ERROR;
  }
  *version = (int)n;
  return DC_OK;
}

/* The schema version of the open file: 0 for a new, empty file. Refuses
 * files of other programs and of newer deployctl builds. Read-only, so a
 * refused file is left exactly as it was. */
static int read_schema_version(store *s, int *version, char *err) {
  int app_id = 0, tables = 0;
  if (read_int(s, "PRAGMA application_id", &app_id, err) != DC_OK ||
      read_int(s, "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
               &tables, err) != DC_OK)
    return DC_ERROR;
  *version = 0;
  if (app_id == 0 && tables == 0)
    return DC_OK;
  if (app_id != APP_ID) {
    set_err(err, "deploy: state file %s is not a deployctl store (it is a "
            "SQLite database of another program): point config.state "
            "elsewhere", s->path);
    return DC_ERROR;
  }
  if (read_meta_version(s, version, err) != DC_OK)
    return DC_ERROR;
  if (*version > STORE_SCHEMA_VERSION) {
    set_err(err, "deploy: state file %s was written by a newer deployctl "
            "(schema %d, this build knows %d): upgrade deployctl or point "
            "config.state elsewhere", s->path, *version, STORE_SCHEMA_VERSION);
    return DC_ERROR;
  }
  return DC_OK;
}

static int set_wal(store *s, char *mode, size_t size) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
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
static int set_wal_retrying(store *s, char *mode, size_t size) {
  const struct timespec pause = {0, 10 * 1000 * 1000};
  int rc = set_wal(s, mode, size);
  for (int waited = 0; (rc & 0xff) == SQLITE_BUSY && waited < BUSY_TIMEOUT_MS;
       waited += 10) {
    nanosleep(&pause, NULL);
    rc = set_wal(s, mode, size);
  }
  return rc;
}

static int configure(store *s, char *err) {
  char mode[16] = "";
  if (set_wal_retrying(s, mode, sizeof mode) != SQLITE_ROW)
    return open_fail(s, err);
  /* Only WAL + synchronous=FULL keeps committed transactions across a power
   * loss; an in-memory database (no file name) has no journal to speak of. */
  const char *file = sqlite3_db_filename(s->db, "main");
  if (strcmp(mode, "wal") != 0 && file && file[0] != '\0') {
    set_err(err, "deploy: state file %s cannot use WAL journaling (got "
            "'%s'): put it on a local filesystem", s->path, mode);
    return DC_ERROR;
  }
  if (sqlite3_exec(s->db, "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON",
                   NULL, NULL, NULL) != SQLITE_OK)
    return open_fail(s, err);
  return DC_OK;
}

/* Runs inside the migration transaction: the version is read again there,
 * because another process may have created the schema since we looked. */
static int migrate_steps(store *s, char *err) {
  int version = 0;
  if (read_schema_version(s, &version, err) != DC_OK)
    return DC_ERROR;
  for (; version < STORE_SCHEMA_VERSION; version++) {
    char what[WHAT_SIZE];
    dc_fmt(what, sizeof what, "cannot migrate state file %s from schema %d "
           "to %d", s->path, version, version + 1);
    if (sqlite3_exec(s->db, migrations[version], NULL, NULL, NULL) != SQLITE_OK)
      return db_fail(s, err, what);
    if (run(s, err, what,
            "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            "i", version + 1) != DC_OK)
      return DC_ERROR;
  }
  return DC_OK;
}

static int migrate(store *s, char *err) {
  const char *what = "cannot migrate the state file";
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  return tx_end(s, migrate_steps(s, err), err, what);
}

static int open_db(store *s, char *err) {
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
  int rc = sqlite3_open_v2(s->path, &s->db, flags, NULL);
  if (rc != SQLITE_OK && !s->db) {
    set_err(err, "deploy: cannot open state file %s: out of memory", s->path);
    return DC_ERROR;
  }
  if (rc != SQLITE_OK)
    return open_fail(s, err);
  /* The busy timeout is set before the first read: another process may be
   * in the middle of creating the schema. */
  sqlite3_busy_timeout(s->db, BUSY_TIMEOUT_MS);
  sqlite3_extended_result_codes(s->db, 1);
  /* One read transaction, so the checks see one snapshot even while another
   * process commits the schema between them. */
  if (sqlite3_exec(s->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
    return open_fail(s, err);
  int version = 0;
  rc = read_schema_version(s, &version, err);
  sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
  if (rc != DC_OK)
    return DC_ERROR;
  if (configure(s, err) != DC_OK)
    return DC_ERROR;
  return version < STORE_SCHEMA_VERSION ? migrate(s, err) : DC_OK;
}

int store_open(store **out, const char *path, char *err) {
  if (out)
    *out = NULL;
  if (!out || !path || !path[0]) {
    set_err(err, "deploy: store: no state file given: set config.state");
    return DC_ERROR;
  }
  if (strlen(path) >= PATH_SIZE) {
    set_err(err, "deploy: state file path is too long (%zu bytes, at most "
            "%d): point config.state elsewhere", strlen(path), PATH_SIZE - 1);
    return DC_ERROR;
  }
  store *s = calloc(1, sizeof *s);
  if (!s) {
    set_err(err, "deploy: cannot open state file %s: out of memory", path);
    return DC_ERROR;
  }
  dc_strlcpy(s->path, path, sizeof s->path);
  char host[256] = "";
  if (gethostname(host, sizeof host) != 0)
    host[0] = '\0';
  host[sizeof host - 1] = '\0';
  dc_strlcpy(s->host, host, sizeof s->host);
  if (make_parent_dirs(path, err) != DC_OK || open_db(s, err) != DC_OK) {
    store_close(s);
    return DC_ERROR;
  }
  *out = s;
  return DC_OK;
}

void store_close(store *s) {
  if (!s)
    return;
  if (s->db) {
    /* Every function finalizes its own statements; this is a safety net so
     * sqlite3_close never fails with SQLITE_BUSY and leaks the handle. */
    sqlite3_stmt *st = sqlite3_next_stmt(s->db, NULL);
    while (st) {
      sqlite3_finalize(st);
      st = sqlite3_next_stmt(s->db, NULL);
    }
    sqlite3_close(s->db);
  }
  free(s);
}

const char *store_path(const store *s) {
  return s ? s->path : "";
}

/* ---- targets ----------------------------------------------------------- */

int store_target_ensure(store *s, const char *name, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot add target '%s'", nz(name));
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what,
               "INSERT INTO targets(name, status, health, updated_at) "
               "VALUES(?, 'deployed', 'unhealthy', ?) "
               "ON CONFLICT(name) DO NOTHING",
               "sd", name, dc_wall_now());
  return tx_end(s, rc, err, what);
}

int store_target_get(store *s, const char *name, store_target *out,
                     char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot read target '%s'", nz(name));
  memset(out, 0, sizeof *out);
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " TARGET_COLS " FROM targets WHERE name = ?",
                           "s", name);
  int rc = fetch_one(s, st, out, read_target, err, what);
  if (rc == DC_NOTFOUND)
    set_err(err, "deploy: store: unknown target '%s'", nz(name));
  return rc;
}

/* ---- deployments --------------------------------------------------------- */

/* A process on another host cannot be checked from here: it counts as
 * alive, so a shared state file never loses a running deployment's lock. */
static int owner_alive(const store *s, int pid, uint64_t start,
                       const char *host) {
  if (host[0] != '\0' && strcmp(host, s->host) != 0)
    return 1;
  return pid > 0 && dc_proc_alive(pid, start);
}

/* What store_recover does to one deployment whose owner is gone, inside the
 * caller's transaction. A deployment no longer running is left as it is. */
static int interrupt_deployment(store *s, const char *id, int pid, char *err,
                                const char *what) {
  char errors[128];
  dc_fmt(errors, sizeof errors,
         "[\"interrupted: deployctl (pid %d) stopped during the deployment\"]",
         pid);
  char data[64];
  dc_fmt(data, sizeof data, "{\"pid\":%d}", pid);
  double now = dc_wall_now();
  if (run(s, err, what,
          "UPDATE deployments SET status = 'interrupted', errors = ?1, "
          "finished_at = ?2, duration = CASE WHEN created_at > 0 AND "
          "?2 > created_at THEN ?2 - created_at ELSE 0 END "
          "WHERE id = ?3 AND status = 'running'",
          "sds", errors, now, id) != DC_OK)
    return DC_ERROR;
  if (sqlite3_changes(s->db) == 0)
    return run(s, err, what, "DELETE FROM locks WHERE deployment_id = ?", "s",
               id);
  if (run(s, err, what,
          "INSERT INTO events(deployment_id, target, ts, kind, data) "
          "SELECT id, target, ?, 'interrupted', ? FROM deployments "
          "WHERE id = ?",
          "dss", now, data, id) != DC_OK ||
      run(s, err, what, "DELETE FROM locks WHERE deployment_id = ?", "s",
          id) != DC_OK)
    return DC_ERROR;
  return run(s, err, what,
             "UPDATE targets SET status = CASE WHEN current_version <> '' "
             "THEN 'deployed' ELSE 'failed' END, updated_at = ? "
             "WHERE name = (SELECT target FROM deployments WHERE id = ?)",
             "ds", now, id);
}

/* DC_LOCKED when a live process holds the target; a dead holder's
 * deployment is interrupted and its lock removed. */
static int check_lock(store *s, const char *target, char *err,
                      const char *what) {
  store_lock l;
  memset(&l, 0, sizeof l);
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " LOCK_COLS " FROM locks WHERE target = ?",
                           "s", target);
  int rc = fetch_one(s, st, &l, read_lock, err, what);
  if (rc != DC_OK)
    return rc == DC_NOTFOUND ? DC_OK : DC_ERROR;
  if (owner_alive(s, l.pid, l.pid_start, l.host)) {
    char since[32];
    dc_iso8601(l.acquired_at, since, sizeof since);
    set_err(err, "target locked: '%s' is being deployed by deployment %s "
            "(pid %d on %s, since %s): wait for it to finish",
            target, l.deployment_id, l.pid, l.host, since);
    return DC_LOCKED;
  }
  if (interrupt_deployment(s, l.deployment_id, l.pid, err, what) != DC_OK)
    return DC_ERROR;
  return run(s, err, what, "DELETE FROM locks WHERE target = ?", "s", target);
}

static int target_exists(store *s, const char *name, char *err,
                         const char *what) {
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT 1 FROM targets WHERE name = ?", "s", name);
  if (!st)
    return DC_ERROR;
  int rc = step_row(s, st, err, what);
  sqlite3_finalize(st);
  if (rc == 0)
    set_err(err, "deploy: store: unknown target '%s'", nz(name));
  return rc == 1 ? DC_OK : DC_ERROR;
}

static int begin_steps(store *s, const store_deployment *d, char *err,
                       const char *what) {
  if (target_exists(s, d->target, err, what) != DC_OK)
    return DC_ERROR;
  int rc = check_lock(s, d->target, err, what);
  if (rc != DC_OK)
    return rc;
  /* Callers normally fill the owner; one left empty is this process. */
  int pid = d->owner_pid > 0 ? d->owner_pid : (int)getpid();
  uint64_t start = d->owner_pid > 0 ? d->owner_start : dc_proc_start_time(pid);
  const char *host = d->owner_host[0] ? d->owner_host : s->host;
  const char *kind = d->kind[0] ? d->kind : "deploy";
  if (run(s, err, what,
          "INSERT INTO deployments(id, target, version, from_version, kind, "
          "strategy, status, created_at, finished_at, duration, errors, "
          "metadata, owner_pid, owner_start, owner_host, user) "
          "VALUES(?, ?, ?, ?, ?, ?, 'running', ?, 0, 0, ?, ?, ?, ?, ?, ?)",
          "ssssssdjjiuss", d->id, d->target, d->version, d->from_version,
          kind, d->strategy, d->created_at, d->errors, d->metadata, pid,
          start, host, d->user) != DC_OK)
    return DC_ERROR;
  if (run(s, err, what,
          "INSERT INTO locks(target, deployment_id, pid, pid_start, host, "
          "acquired_at) VALUES(?, ?, ?, ?, ?, ?)",
          "ssiusd", d->target, d->id, pid, start, host, dc_wall_now()) != DC_OK)
    return DC_ERROR;
  const char *status = strcmp(kind, "rollback") == 0 ? "rolling_back"
                                                     : "running";
  return run(s, err, what,
             "UPDATE targets SET status = ?, updated_at = ? WHERE name = ?",
             "sds", status, dc_wall_now(), d->target);
}

int store_deployment_begin(store *s, const store_deployment *d, char *err) {
  if (!d) {
    set_err(err, "deploy: store: cannot insert a deployment: none given");
    return DC_ERROR;
  }
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot insert deployment '%s'", d->id);
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  return tx_end(s, begin_steps(s, d, err, what), err, what);
}

typedef struct finish_args {
  const char *id, *status, *errors_json;
  double finished_at, duration;
  int promoted;
  const char *target_status, *target_health;
} finish_args;

/* Promotion shifts current to previous, except when the same version is
 * deployed again: then previous keeps the version a rollback would want. */
static int finish_steps(store *s, const finish_args *a, char *err,
                        const char *what) {
  store_deployment d;
  memset(&d, 0, sizeof d);
  int rc = get_deployment(s, a->id, &d, err, what);
  if (rc != DC_OK)
    return rc;
  char target[sizeof d.target], version[sizeof d.version];
  dc_strlcpy(target, d.target, sizeof target);
  dc_strlcpy(version, d.version, sizeof version);
  store_deployment_clear(&d);
  double now = dc_wall_now();
  if (run(s, err, what,
          "UPDATE deployments SET status = ?, errors = ?, finished_at = ?, "
          "duration = ? WHERE id = ?",
          "sjdds", a->status, a->errors_json, a->finished_at, a->duration,
          a->id) != DC_OK)
    return DC_ERROR;
  if (a->promoted &&
      run(s, err, what,
          "UPDATE targets SET previous_version = CASE WHEN current_version "
          "= ?1 THEN previous_version ELSE current_version END, "
          "current_version = ?1, live_deployment = ?2 WHERE name = ?3",
          "sss", version, a->id, target) != DC_OK)
    return DC_ERROR;
  if (run(s, err, what,
          "UPDATE targets SET status = coalesce(?, status), "
          "health = coalesce(?, health), updated_at = ? WHERE name = ?",
          "jjds", a->target_status, a->target_health, now, target) != DC_OK)
    return DC_ERROR;
  return run(s, err, what,
             "DELETE FROM locks WHERE target = ? AND deployment_id = ?", "ss",
             target, a->id);
}

int store_deployment_finish(store *s, const char *id, const char *status,
                            const char *errors_json, double finished_at,
                            double duration, int promoted,
                            const char *target_status,
                            const char *target_health, char *err) {
  finish_args a = {id, status, errors_json, finished_at, duration,
                   promoted, target_status, target_health};
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot finish deployment '%s'", nz(id));
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  return tx_end(s, finish_steps(s, &a, err, what), err, what);
}

/* The promotion on its own, committed before the old instances stop: a
 * crash after it recovers to the new version, never to a stopped one. */
int store_deployment_promote(store *s, const char *id, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot promote deployment '%s'", nz(id));
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  store_deployment d;
  memset(&d, 0, sizeof d);
  int rc = get_deployment(s, id, &d, err, what);
  if (rc == DC_OK)
    rc = run(s, err, what,
             "UPDATE targets SET previous_version = CASE WHEN current_version "
             "= ?1 THEN previous_version ELSE current_version END, "
             "current_version = ?1, live_deployment = ?2 WHERE name = ?3",
             "sss", d.version, id, d.target);
  store_deployment_clear(&d);
  return tx_end(s, rc, err, what);
}

int store_deployment_get(store *s, const char *id, store_deployment *out,
                         char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot read deployment '%s'", nz(id));
  memset(out, 0, sizeof *out);
  return get_deployment(s, id, out, err, what);
}

/* Each row is copied to the stack for the callback and freed after it. */
static void deliver_deployments(rowbuf *buf, store_deployment_cb cb,
                                void *payload) {
  store_deployment *rows = (store_deployment *)(void *)buf->rows;
  int stop = 0;
  for (size_t i = 0; i < buf->n; i++) {
    store_deployment row = rows[i];
    if (!stop && cb)
      stop = cb(payload, &row);
    store_deployment_clear(&row);
  }
  rowbuf_free(buf, NULL);
}

/* NULL target: the history of every target. */
int store_history(store *s, const char *target, int limit,
                  store_deployment_cb cb, void *payload, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot read the history of target '%s'",
         nz(target));
  rowbuf buf = {NULL, 0, 0, sizeof(store_deployment)};
  /* LIMIT -1 is SQLite's "no limit". */
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " DEPLOYMENT_COLS " FROM deployments "
                           "WHERE ?1 IS NULL OR target = ?1 "
                           "ORDER BY seq DESC LIMIT ?2",
                           "ji", target, limit > 0 ? limit : -1);
  if (!st)
    return DC_ERROR;
  if (collect(s, st, &buf, read_deployment, err, what) != DC_OK) {
    rowbuf_free(&buf, clear_deployment);
    return DC_ERROR;
  }
  deliver_deployments(&buf, cb, payload);
  return DC_OK;
}

/* ---- events -------------------------------------------------------------- */

int store_event_add(store *s, const char *deployment_id, const char *target,
                    double ts, const char *kind, const char *data_json,
                    char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot add event '%s' of deployment '%s'",
         nz(kind), nz(deployment_id));
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what,
               "INSERT INTO events(deployment_id, target, ts, kind, data) "
               "VALUES(?, ?, ?, ?, ?)",
               "ssdsj", deployment_id, target, ts, kind, data_json);
  return tx_end(s, rc, err, what);
}

int store_events(store *s, const char *deployment_id, store_event_cb cb,
                 void *payload, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot read the events of deployment '%s'",
         nz(deployment_id));
  rowbuf buf = {NULL, 0, 0, sizeof(store_event)};
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " EVENT_COLS " FROM events "
                           "WHERE deployment_id = ? ORDER BY id",
                           "s", deployment_id);
  if (!st)
    return DC_ERROR;
  if (collect(s, st, &buf, read_event, err, what) != DC_OK) {
    rowbuf_free(&buf, clear_event);
    return DC_ERROR;
  }
  store_event *rows = (store_event *)(void *)buf.rows;
  int stop = 0;
  for (size_t i = 0; i < buf.n; i++) {
    store_event row = rows[i];
    if (!stop && cb)
      stop = cb(payload, &row);
    store_event_clear(&row);
  }
  rowbuf_free(&buf, NULL);
  return DC_OK;
}

/* ---- instances ----------------------------------------------------------- */

int store_instance_add(store *s, store_instance *inst, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot add instance %d of deployment '%s'",
         inst->idx, inst->deployment_id);
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what,
               "INSERT INTO instances(target, deployment_id, version, idx, "
               "host, port, pid, pid_start, state, weight, server, log_path, "
               "started_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               "sssisiiusissd", inst->target, inst->deployment_id,
               inst->version, inst->idx, inst->host, inst->port, inst->pid,
               inst->pid_start, inst->state, inst->weight, inst->server,
               inst->log_path, inst->started_at);
  int64_t id = rc == DC_OK ? sqlite3_last_insert_rowid(s->db) : 0;
  rc = tx_end(s, rc, err, what);
  if (rc == DC_OK) /* only once committed: a rolled-back id would be reused */
    inst->id = id;
  return rc;
}

int store_instance_update(store *s, const store_instance *inst, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot update instance %lld",
         (long long)inst->id);
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what,
               "UPDATE instances SET pid = ?, pid_start = ?, state = ?, "
               "weight = ?, server = ?, port = ?, started_at = ? WHERE id = ?",
               "iusisidI", inst->pid, inst->pid_start, inst->state,
               inst->weight, inst->server, inst->port, inst->started_at,
               inst->id);
  if (rc == DC_OK && sqlite3_changes(s->db) == 0) {
    set_err(err, "deploy: store: unknown instance %lld", (long long)inst->id);
    rc = DC_NOTFOUND;
  }
  return tx_end(s, rc, err, what);
}

/* Deleting an instance that is already gone is not an error. */
int store_instance_delete(store *s, int64_t id, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot delete instance %lld", (long long)id);
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what, "DELETE FROM instances WHERE id = ?", "I", id);
  return tx_end(s, rc, err, what);
}

int store_instances(store *s, const char *target, store_instance_cb cb,
                    void *payload, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot read the instances of target '%s'",
         nz(target));
  rowbuf buf = {NULL, 0, 0, sizeof(store_instance)};
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " INSTANCE_COLS " FROM instances "
                           "WHERE target = ? ORDER BY id",
                           "s", target);
  if (!st)
    return DC_ERROR;
  if (collect(s, st, &buf, read_instance, err, what) != DC_OK) {
    rowbuf_free(&buf, NULL);
    return DC_ERROR;
  }
  store_instance *rows = (store_instance *)(void *)buf.rows;
  for (size_t i = 0; cb && i < buf.n; i++) {
    store_instance row = rows[i];
    if (cb(payload, &row) != 0)
      break;
  }
  rowbuf_free(&buf, NULL);
  return DC_OK;
}

/* A stopped instance's port is free again, even while its row is kept. */
int store_port_in_use(store *s, int port, int *in_use, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot check whether port %d is in use", port);
  *in_use = 0;
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT 1 FROM instances WHERE port = ? "
                           "AND state <> 'stopped' LIMIT 1",
                           "i", port);
  if (!st)
    return DC_ERROR;
  int rc = step_row(s, st, err, what);
  sqlite3_finalize(st);
  if (rc < 0)
    return DC_ERROR;
  *in_use = rc;
  return DC_OK;
}

/* ---- recovery ------------------------------------------------------------ */

/* Interrupts every running deployment whose owner is gone and reads the
 * updated rows into done, all inside the caller's transaction. */
static int recover_steps(store *s, rowbuf *done, char *err, const char *what) {
  rowbuf running = {NULL, 0, 0, sizeof(store_deployment)};
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT " DEPLOYMENT_COLS " FROM deployments "
                           "WHERE status = 'running' ORDER BY seq",
                           "");
  int rc = st ? collect(s, st, &running, read_deployment, err, what)
              : DC_ERROR;
  store_deployment *rows = (store_deployment *)(void *)running.rows;
  for (size_t i = 0; rc == DC_OK && i < running.n; i++) {
    const store_deployment *d = &rows[i];
    if (owner_alive(s, d->owner_pid, d->owner_start, d->owner_host))
      continue;
    rc = interrupt_deployment(s, d->id, d->owner_pid, err, what);
    store_deployment *row = rc == DC_OK ? rowbuf_add(done) : NULL;
    if (rc == DC_OK && !row) {
      set_err(err, "deploy: store: %s: out of memory", what);
      rc = DC_ERROR;
    }
    if (rc == DC_OK)
      rc = get_deployment(s, d->id, row, err, what);
  }
  rowbuf_free(&running, clear_deployment);
  return rc;
}

int store_recover(store *s, store_deployment_cb cb, void *payload, char *err) {
  const char *what = "cannot recover interrupted deployments";
  rowbuf done = {NULL, 0, 0, sizeof(store_deployment)};
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = tx_end(s, recover_steps(s, &done, err, what), err, what);
  if (rc != DC_OK) {
    rowbuf_free(&done, clear_deployment);
    return rc;
  }
  /* After the commit, so what the callback repairs is already on disk. */
  deliver_deployments(&done, cb, payload);
  return DC_OK;
}

/* ---- controls ------------------------------------------------------------ */

int store_control_set(store *s, const char *target, const char *command,
                      const char *by, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot request '%s' for target '%s'",
         nz(command), nz(target));
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = run(s, err, what,
               "INSERT INTO controls(target, command, requested_at, "
               "requested_by) VALUES(?, ?, ?, ?) ON CONFLICT(target) DO "
               "UPDATE SET command = excluded.command, "
               "requested_at = excluded.requested_at, "
               "requested_by = excluded.requested_by",
               "ssds", target, command, dc_wall_now(), by);
  return tx_end(s, rc, err, what);
}

static int take_steps(store *s, const char *target, char *out, size_t size,
                      char *err, const char *what) {
  sqlite3_stmt *st = query(s, err, what,
                           "SELECT command FROM controls WHERE target = ?",
                           "s", target);
  if (!st)
    return DC_ERROR;
  int rc = step_row(s, st, err, what);
  if (rc == 1)
    col_text(st, 0, out, size);
  sqlite3_finalize(st);
  if (rc != 1)
    return rc < 0 ? DC_ERROR : DC_OK;
  return run(s, err, what, "DELETE FROM controls WHERE target = ?", "s",
             target);
}

int store_control_take(store *s, const char *target, char *out, size_t size,
                       char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot take the pending command of target '%s'",
         nz(target));
  char command[128] = "";
  if (tx_begin(s, err, what) != DC_OK)
    return DC_ERROR;
  int rc = take_steps(s, target, command, sizeof command, err, what);
  rc = tx_end(s, rc, err, what);
  /* Written only once committed, so a failed take never reports a command
   * that is still pending. */
  if (out)
    dc_strlcpy(out, rc == DC_OK ? command : "", size);
  return rc;
}

/* ---- integrity ----------------------------------------------------------- */

int store_integrity_check(store *s, char *err) {
  char what[WHAT_SIZE];
  dc_fmt(what, sizeof what, "cannot check the integrity of %s", store_path(s));
  sqlite3_stmt *st = query(s, err, what, "PRAGMA integrity_check", "");
  if (!st)
    return DC_ERROR;
  char result[256] = "";
  int rc = step_row(s, st, err, what);
  if (rc == 1)
    col_text(st, 0, result, sizeof result);
  sqlite3_finalize(st);
  if (rc < 0)
    return DC_ERROR;
  if (strcmp(result, "ok") == 0)
    return DC_OK;
  set_err(err, "deploy: state file %s is damaged (integrity check: %s): "
          "restore a backup or move it away", s->path, result);
  return DC_ERROR;
}
