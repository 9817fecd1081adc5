/* What the PostgreSQL backend (store_pg.c) offers beyond store_backend.h:
 * copying an SQLite store into it (`deployctl store migrate --to
 * postgresql://...`) and counters for tests.
 *
 * The URL: postgresql://user[:password]@host[:port]/database[?params] (or
 * postgres://). Every parameter libpq knows is passed on to it, and so are
 * the PG* environment variables and ~/.pgpass. Two are deployctl's own:
 *   lease=S    seconds a target lock lasts unless renewed (default 15)
 *   timeout=S  seconds an operation may take, waiting for a connection
 *              included (default 10)
 * The password is never part of a message or of store_location(). */
#ifndef DEPLOY_STORE_PG_H
#define DEPLOY_STORE_PG_H

#include <stddef.h>
#include <stdint.h>

#include "store_backend.h"

#define STORE_PG_LEASE_DEFAULT 15.0
#define STORE_PG_TIMEOUT_DEFAULT 10.0

/* 1 when location names a PostgreSQL store (postgresql:// or postgres://). */
int store_pg_is_url(const char *location);

typedef struct store_pg_stats {
  uint64_t connects;      /* connections that got through setup */
  uint64_t transactions;  /* write transactions committed */
  uint64_t round_trips;   /* pipeline syncs waited for (any kind) */
  uint64_t statements;    /* statements sent */
} store_pg_stats;

/* Counters of a backend opened by store_pg_open (zeros for another kind). */
void store_pg_get_stats(const store_backend *b, store_pg_stats *out);

typedef struct store_pg_import_counts {
  size_t targets, deployments, events, locks, instances, controls;
} store_pg_import_counts;

typedef void (*store_pg_import_cb)(void *payload, int rc, const char *err,
                                   const store_pg_import_counts *counts);

/* Copies every row of the SQLite store at sqlite_path (schema 1 or 2; read
 * only, left as it is) into the PostgreSQL store b, in one transaction,
 * keeping ids and sequence numbers. Refuses a PostgreSQL store that already
 * holds targets or deployments. Locks are copied with their expires_at (0 on
 * a SQLite store: already expired here, so `store_recover` interrupts a
 * deployment that was running). cb runs once, later, from the loop. Returns
 * 0 when started, or -1 with err filled (not a PostgreSQL backend, the file
 * cannot be read, out of memory). */
int store_pg_import(store_backend *b, const char *sqlite_path, store_pg_import_cb cb, void *payload,
                    char *err);

/* The whole of `deployctl store migrate --to URL`: opens the PostgreSQL
 * store at url (creating its schema), copies the SQLite store at
 * sqlite_path into it as store_pg_import does, and closes it again after
 * cb has run. Run the engine's loop until cb has run. Returns 0 when
 * started, or -1 with err filled (a bad URL, a file that cannot be read). */
int store_pg_copy_file(engine *e, const char *sqlite_path, const char *url, store_pg_import_cb cb, void *payload,
                       char *err);

#endif
