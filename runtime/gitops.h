/* GitOps: what a git repository says should be deployed.
 *
 * A gitops handle keeps a bare cache repository of one remote URL
 * (<cache_dir>/<hash of the redacted URL>) and fetches one branch into
 * refs/remotes/origin/<branch>, incrementally, on libuv's thread pool, so
 * the engine's loop never waits for the network. Manifests are read straight
 * from the object database (no checkout): the `*.json` blobs directly under
 * `path` in the tip's tree. After the first read only the entries a tree
 * diff names are read again, and nothing is read when the tip has not moved.
 *
 * Credentials come from the environment (DEPLOY_GIT_USERNAME and
 * DEPLOY_GIT_TOKEN for http(s), DEPLOY_GIT_SSH_KEY for ssh) or from the
 * URL's user:token part; libgit2 never sees them in a URL, and every message
 * that leaves this file has them replaced by "***".
 *
 * The plan (gitops_plan) compares what the manifests want with what the
 * store says is live. manifest.c reads the manifests, gitsync.c runs
 * syncs and watches on top of both. */
#ifndef DEPLOY_GITOPS_H
#define DEPLOY_GITOPS_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "engine.h"
#include "store.h"

/* A manifest larger than this is refused without being read. */
#define GITOPS_MAX_MANIFEST (1024 * 1024)
#define GITOPS_OID_HEX 41

typedef struct gitops gitops;

typedef struct gitops_opts {
  const char *url;       /* as given; may carry user:token@ */
  const char *branch;    /* "main" */
  const char *path;      /* "/" or "deploy/prod"; no "." or ".." parts */
  const char *cache_dir; /* where cache repositories live: ".deploy/git" */
} gitops_opts;

/* How a manifest entry changed since the previous read. */
typedef enum { GITOPS_ADDED, GITOPS_MODIFIED, GITOPS_DELETED } gitops_status;

/* Why an entry named like a manifest cannot be one. */
typedef enum {
  GITOPS_OK = 0,
  GITOPS_SYMLINK,   /* never followed: could point anywhere */
  GITOPS_TOO_LARGE, /* over GITOPS_MAX_MANIFEST, not read */
  GITOPS_NOT_FILE,  /* a submodule or other non-blob */
  GITOPS_BAD_NAME,  /* a name that leaves `path` ("..", "/") */
} gitops_problem;

typedef struct gitops_entry {
  char *file;            /* repository-relative path ("deploy/a.json"); heap */
  char oid[GITOPS_OID_HEX];
  gitops_status status;
  gitops_problem problem;
  size_t size;
  char *data;            /* NUL-terminated contents (problem == GITOPS_OK, not deleted); heap */
} gitops_entry;

/* The outcome of one fetch: the tip and the manifest entries that changed
 * since the previous successful update of this handle. */
typedef struct gitops_update {
  char revision[GITOPS_OID_HEX];
  int full;              /* 1: entries is the whole set (first read, or path reappeared) */
  gitops_entry *entries;
  size_t n;
} gitops_update;

/* Counters for benchmarks and specs: what the last update touched. */
typedef struct gitops_stats {
  int downloaded;        /* 1 when the fetch transferred objects */
  int tree_diffed;       /* 1 when a tree diff ran */
  size_t blobs_read;     /* manifest blobs read */
} gitops_stats;

/* Validates the options (branch name, path) and opens or creates the cache
 * repository. Does not touch the network. */
int gitops_open(gitops **out, engine *e, const gitops_opts *o, char *err);
/* Frees the handle; one whose fetch is still running is freed when that
 * fetch ends. NULL-safe. */
void gitops_free(gitops *g);

/* The URL with user:token replaced by "***" (safe to print and store). */
const char *gitops_url(const gitops *g);
const char *gitops_branch(const gitops *g);
const char *gitops_path(const gitops *g);   /* normalised: "" for the root */
const char *gitops_cache(const gitops *g);  /* the cache repository's directory */
const gitops_stats *gitops_last_stats(const gitops *g);


/* Fetches the branch on the thread pool and reads what changed. cb runs
 * once, on the loop: err is NULL on success (then u is filled; the callee
 * owns it only during the callback, take entries by setting u->entries to
 * NULL and u->n to 0), else a message naming the URL (redacted), the
 * branch and the fix. Returns -1 with err filled (cb will not run) when a
 * fetch of this handle is already running. */
typedef void (*gitops_fetch_cb)(void *payload, gitops_update *u, const char *err);
int gitops_fetch(gitops *g, gitops_fetch_cb cb, void *payload, char *err);
/* Ask a running fetch to stop at its next progress report. */
void gitops_cancel(gitops *g);
int gitops_busy(const gitops *g);

/* The functions above live in the git module (deploy-git.so, libgit2),
 * loaded on first use; this is its interface, checked by version when it
 * is loaded. */
#define GITOPS_API_VERSION 1
typedef struct gitops_api {
  int version;
  int (*open)(gitops **out, engine *e, const gitops_opts *o, char *err);
  void (*free)(gitops *g);
  const char *(*url)(const gitops *g);
  const char *(*branch)(const gitops *g);
  const char *(*path)(const gitops *g);
  const char *(*cache)(const gitops *g);
  const gitops_stats *(*last_stats)(const gitops *g);
  int (*busy)(const gitops *g);
  void (*cancel)(gitops *g);
  int (*fetch)(gitops *g, gitops_fetch_cb cb, void *payload, char *err);
} gitops_api;

/* ---- where a deployment came from ---- */

typedef struct gitops_provenance {
  char revision[GITOPS_OID_HEX];
  char blob[GITOPS_OID_HEX];  /* the manifest's blob id: same blob, same manifest */
  char file[512];
  char repo[1024];            /* redacted URL */
  char branch[256];
  char path[512];
} gitops_provenance;

/* The metadata JSON of a deployment made by a sync:
 * {"gitops":{"revision":..,"file":..,"repo":..,"branch":..,"path":..,"blob":..},
 *  ...the manifest's own metadata (a JSON object, or NULL)...}.
 * Returns a heap string, or NULL when out of memory. */
char *gitops_metadata_json(const gitops_provenance *p, const json_t *user);
/* Reads the provenance back from a deployment's metadata; 0 when it has
 * one, -1 when the deployment was not made by a sync. */
int gitops_provenance_read(const char *metadata_json, gitops_provenance *out);

/* ---- the plan: git against the store ---- */

typedef struct gitops_want {  /* one valid manifest */
  const char *target;
  const char *version;
  const char *file;
  const char *blob;
} gitops_want;

typedef enum { GITOPS_CREATE, GITOPS_UPDATE, GITOPS_DELETE } gitops_change_kind;
const char *gitops_change_kind_name(gitops_change_kind k);

typedef struct gitops_change {
  gitops_change_kind kind;
  char target[64];
  char from[129];             /* live version, "" none */
  char to[129];               /* wanted version, "" for delete */
  char file[512];             /* the manifest (delete: the one last synced) */
  long want;                  /* index into wants, -1 for delete */
  int pinned;                 /* a manual rollback holds it back */
  char pinned_revision[GITOPS_OID_HEX]; /* the revision rolled back from */
  int failed;                 /* this manifest blob's rollout failed here: not applied again unless retried */
  char failed_revision[GITOPS_OID_HEX]; /* the revision that rollout came from */
  char failed_id[48];         /* and its deployment */
} gitops_change;

/* One configured target as the plan sees it: its row and its history,
 * newest first. */
typedef struct gitops_plan_target {
  const store_target *row;
  const store_deployment *history;
  size_t nhistory;
} gitops_plan_target;

/* Compares the wanted versions with what the store says is live for each
 * target: create (nothing live), update (another version live, drift
 * included), delete (no manifest, something live, and this repository and
 * path deployed it before). A target whose latest deployment is a manual
 * rollback away from a deployment this repository made with the same
 * manifest blob is marked pinned. One whose latest deployment from this
 * repository and path was made from the same manifest blob and failed is
 * marked failed: git has not changed its manifest since. *out is a heap array sorted by target
 * name (free it). */
int gitops_plan(const gitops_plan_target *targets, size_t ntargets, const char *repo, const char *path,
                const gitops_want *wants, size_t nwants, gitops_change **out, size_t *nout, char *err);

#endif
