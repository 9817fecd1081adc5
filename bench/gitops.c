/* GitOps sync against the git CLI, on the same repository in the same run.
 *
 *   build/bench_gitops [MANIFESTS] [ROUNDS]     (default 10000 and 15)
 *
 * Builds a bare repository of MANIFESTS manifests (one commit, with git
 * fast-import), lets a gitops handle and a `git` cache clone read it once,
 * then times, as medians over ROUNDS:
 *   no-change sync   gitops_fetch when the branch has not moved
 *                    vs `git fetch`
 *   one-change sync  gitops_fetch after a commit that changes one manifest
 *                    (fetch, tree diff, read the changed blob)
 *                    vs `git fetch && git diff --name-only`
 * and prints each as ratio = ours / git's (below 1: faster than git). It
 * also checks what the gitops handle touched: nothing at all for a
 * no-change sync, exactly one blob for a one-change sync. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "gitops.h"
#include "util.h"

typedef struct bench {
  char dir[256];
  char origin[300];
  char cli[300];
  int manifests;
  int commits;
  engine e;
  gitops *g;
} bench;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "bench_gitops: %s\n", what);
  exit(1);
}

static void sh(const char *cmd) {
  if (system(cmd) != 0) {
    fprintf(stderr, "bench_gitops: command failed: %s\n", cmd);
    exit(1);
  }
}

static void manifest(FILE *f, int i, int generation) {
  char body[256];
  int n = snprintf(body, sizeof body,
                   "{\"target\": \"svc-%05d\", \"version\": \"1.%d.0\", \"strategy\": {\"kind\": \"canary\", "
                   "\"initial_percentage\": 10, \"increment\": 20, \"interval\": 60}}\n",
                   i, generation);
  fprintf(f, "M 100644 inline deploy/svc-%05d.json\ndata %d\n%s\n", i, n, body);
}

/* One commit through git fast-import: every manifest (first) or one. */
static void commit(bench *b, int only) {
  char cmd[600];
  dc_fmt(cmd, sizeof cmd, "git -C %s fast-import --quiet", b->origin);
  FILE *f = popen(cmd, "w");
  if (!f)
    die("cannot run git fast-import");
  b->commits++;
  fprintf(f, "commit refs/heads/main\ncommitter bench <bench@example.com> %d +0000\ndata 7\nchange\n",
          1700000000 + b->commits);
  if (only < 0) {
    for (int i = 0; i < b->manifests; i++)
      manifest(f, i, 0);
  } else {
    fprintf(f, "from refs/heads/main^0\n");
    manifest(f, only, b->commits);
  }
  if (pclose(f) != 0)
    die("git fast-import failed");
}

typedef struct waiter {
  int done;
  char err[DC_ERR_MAX];
  char revision[GITOPS_OID_HEX];
  size_t entries;
} waiter;

static void fetched(void *payload, gitops_update *u, const char *err) {
  waiter *w = payload;
  w->done = 1;
  if (err) {
    dc_strlcpy(w->err, err, sizeof w->err);
    return;
  }
  dc_strlcpy(w->revision, u->revision, sizeof w->revision);
  w->entries = u->n;
}

/* One sync of the gitops handle, driven on the engine's loop. */
static double our_sync(bench *b, waiter *w) {
  char err[DC_ERR_MAX];
  memset(w, 0, sizeof *w);
  double t0 = now_s();
  if (gitops_fetch(b->g, fetched, w, err) != 0)
    die(err);
  while (!w->done)
    engine_run_once(&b->e);
  double dt = now_s() - t0;
  if (w->err[0])
    die(w->err);
  return dt;
}

static double git_cli(bench *b, int with_diff) {
  char cmd[1400];
  if (with_diff)
    dc_fmt(cmd, sizeof cmd,
           "cd %s && old=$(git rev-parse refs/remotes/origin/main) && "
           "git fetch -q origin +refs/heads/main:refs/remotes/origin/main && "
           "git diff --name-only $old refs/remotes/origin/main -- deploy >/dev/null",
           b->cli);
  else
    dc_fmt(cmd, sizeof cmd, "git -C %s fetch -q origin +refs/heads/main:refs/remotes/origin/main", b->cli);
  double t0 = now_s();
  sh(cmd);
  return now_s() - t0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void setup(bench *b) {
  char cmd[1200], err[DC_ERR_MAX], url[400], cache[300];
  dc_strlcpy(b->dir, "/tmp/deployctl-bench-gitops-XXXXXX", sizeof b->dir);
  if (!mkdtemp(b->dir))
    die("mkdtemp failed");
  dc_fmt(b->origin, sizeof b->origin, "%s/origin.git", b->dir);
  dc_fmt(b->cli, sizeof b->cli, "%s/cli.git", b->dir);
  dc_fmt(cmd, sizeof cmd, "git init -q --bare %s && git -C %s symbolic-ref HEAD refs/heads/main", b->origin,
         b->origin);
  sh(cmd);
  commit(b, -1);
  dc_fmt(url, sizeof url, "file://%s", b->origin);
  dc_fmt(cmd, sizeof cmd, "git init -q --bare %s && git -C %s remote add origin %s && "
                          "git -C %s fetch -q origin +refs/heads/main:refs/remotes/origin/main",
         b->cli, b->cli, url, b->cli);
  sh(cmd);
  if (engine_init(&b->e, 0) != 0)
    die("cannot create the event loop");
  dc_fmt(cache, sizeof cache, "%s/cache", b->dir);
  gitops_opts o = {.url = url, .branch = "main", .path = "deploy", .cache_dir = cache};
  if (gitops_open(&b->g, &b->e, &o, err) != 0)
    die(err);
}

static void check(int ok, const char *what) {
  if (!ok)
    die(what);
}

int main(int argc, char **argv) {
  bench b;
  waiter w;
  memset(&b, 0, sizeof b);
  b.manifests = argc > 1 ? atoi(argv[1]) : 10000;
  int rounds = argc > 2 ? atoi(argv[2]) : 15;
  if (b.manifests < 2 || rounds < 1)
    die("usage: bench_gitops [MANIFESTS >= 2] [ROUNDS >= 1]");
  double t0 = now_s();
  setup(&b);
  printf("gitops bench: %d manifests under deploy/, %d rounds (built in %.2f s)\n", b.manifests, rounds, now_s() - t0);
  double first = our_sync(&b, &w);
  check(w.entries == (size_t)b.manifests, "the first sync did not read every manifest");
  printf("  first sync (clone + read all): %8.2f ms\n", first * 1e3);

  double *ours = calloc((size_t)rounds, sizeof *ours), *theirs = calloc((size_t)rounds, sizeof *theirs);
  for (int i = 0; i < rounds; i++) {
    ours[i] = our_sync(&b, &w);
    const gitops_stats *st = gitops_last_stats(b.g);
    check(w.entries == 0 && st->blobs_read == 0 && !st->tree_diffed && !st->downloaded,
          "a no-change sync read the tree");
    theirs[i] = git_cli(&b, 0);
  }
  double a = median(ours, rounds), g = median(theirs, rounds);
  printf("  no-change sync:  gitops %8.2f ms | git fetch              %8.2f ms | ratio %.2f\n", a * 1e3, g * 1e3,
         a / g);

  for (int i = 0; i < rounds; i++) {
    commit(&b, (i * 7919) % b.manifests);
    ours[i] = our_sync(&b, &w);
    const gitops_stats *st = gitops_last_stats(b.g);
    check(w.entries == 1 && st->blobs_read == 1 && st->tree_diffed, "a one-change sync read more than one blob");
    theirs[i] = git_cli(&b, 1);
  }
  a = median(ours, rounds);
  g = median(theirs, rounds);
  printf("  one-change sync: gitops %8.2f ms | git fetch && git diff  %8.2f ms | ratio %.2f\n", a * 1e3, g * 1e3,
         a / g);
  printf("  (no-change: 0 blobs read, no tree diff; one-change: 1 blob read)\n");
  free(ours);
  free(theirs);
  gitops_free(b.g);
  engine_close(&b.e);
  char cmd[400];
  dc_fmt(cmd, sizeof cmd, "rm -rf %s", b.dir);
  sh(cmd);
  return 0;
}
