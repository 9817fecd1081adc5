#include "simulate.h"

#include <errno.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store_pg.h"
#include "util.h"

/* The directories made by this process, removed at its exit. */
static char **dirs;
static size_t ndirs;

static int remove_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  remove(path);
  return 0;
}

static void remove_dirs(void) {
  for (size_t i = 0; i < ndirs; i++) {
    nftw(dirs[i], remove_one, 8, FTW_DEPTH | FTW_PHYS);
    free(dirs[i]);
  }
  free(dirs);
  dirs = NULL;
  ndirs = 0;
}

static int remember(const char *dir) {
  char **more = realloc(dirs, (ndirs + 1) * sizeof *dirs);
  if (!more)
    return -1;
  dirs = more;
  if (!(dirs[ndirs] = strdup(dir)))
    return -1;
  if (ndirs++ == 0)
    atexit(remove_dirs);
  return 0;
}

static int backup(const char *from, const char *to, char *err) {
  sqlite3 *src = NULL, *dst = NULL;
  int rc = sqlite3_open_v2(from, &src, SQLITE_OPEN_READONLY, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_open_v2(to, &dst, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_busy_timeout(src, 5000);
    sqlite3_backup *b = sqlite3_backup_init(dst, "main", src, "main");
    if (!b) {
      rc = sqlite3_errcode(dst);
    } else {
      do
        rc = sqlite3_backup_step(b, -1);
      while (rc == SQLITE_BUSY || rc == SQLITE_LOCKED);
      if (rc == SQLITE_DONE)
        rc = SQLITE_OK;
      sqlite3_backup_finish(b);
    }
  }
  if (rc != SQLITE_OK)
    dc_fmt(err, DC_ERR_MAX, "deploy: --simulate cannot copy the store '%s' to simulate on: %s", from,
           src ? sqlite3_errmsg(dst ? dst : src) : sqlite3_errstr(rc));
  sqlite3_close(src);
  sqlite3_close(dst);
  return rc == SQLITE_OK ? 0 : -1;
}

int simulate_store_copy(const char *state, char *out, size_t size, char *note, size_t nsize, char *err) {
  const char *tmp = getenv("TMPDIR");
  char dir[1024];
  dc_fmt(dir, sizeof dir, "%s/deployctl-sim-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(dir)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: --simulate cannot make a temporary directory in %s: %s (set TMPDIR)",
           tmp && *tmp ? tmp : "/tmp", strerror(errno));
    return -1;
  }
  if (remember(dir) != 0) {
    rmdir(dir);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  dc_fmt(out, size, "%s/state.db", dir);
  if (store_pg_is_url(state)) {
    dc_fmt(note, nsize, "the store is PostgreSQL: simulated from an empty history (in %s)", out);
    return 0;
  }
  if (access(state, F_OK) != 0) {
    dc_fmt(note, nsize, "no store at %s yet: simulated from an empty history", state);
    return 0;
  }
  if (backup(state, out, err) != 0)
    return -1;
  dc_fmt(note, nsize, "simulated on a copy of %s; the store itself is not written", state);
  return 0;
}
