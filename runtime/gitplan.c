/* GitOps without git: where a deployment came from (its provenance, kept
 * in the deployment's metadata) and the plan that compares what the
 * manifests want with what the store says is live. No libgit2 here: this
 * is part of the core, while fetching lives in the git module. */
#include "gitops.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"

/* ---- provenance: the gitops part of a deployment's metadata ---- */

static const char *const prov_keys[] = {"revision", "file", "repo", "branch", "path", "blob"};

static char *prov_field(gitops_provenance *p, size_t i, size_t *size) {
  char *const fields[] = {p->revision, p->file, p->repo, p->branch, p->path, p->blob};
  const size_t sizes[] = {sizeof p->revision, sizeof p->file, sizeof p->repo,
                          sizeof p->branch,   sizeof p->path, sizeof p->blob};
  *size = sizes[i];
  return fields[i];
}

char *gitops_metadata_json(const gitops_provenance *p, const json_t *user) {
  json_t *meta = json_object(), *prov = json_object();
  int bad = !meta || !prov;
  for (size_t i = 0; !bad && i < 6; i++) {
    size_t size;
    const char *field = prov_field((gitops_provenance *)p, i, &size);
    bad = json_object_set_new(prov, prov_keys[i], dc_json_text(field)) != 0;
  }
  bad = bad || json_object_set(meta, "gitops", prov) != 0;
  /* The manifest's own metadata follows; its "gitops" key was refused. */
  const char *k;
  json_t *v;
  if (!bad && json_is_object(user)) {
    json_object_foreach((json_t *)user, k, v) {
      if (strcmp(k, "gitops") != 0 && json_object_set(meta, k, v) != 0)
        bad = 1;
    }
  }
  char *out = bad ? NULL : dc_json_dump(meta);
  json_decref(prov);
  json_decref(meta);
  return out;
}

int gitops_provenance_read(const char *json, gitops_provenance *out) {
  char err[DC_ERR_MAX];
  memset(out, 0, sizeof *out);
  if (!json)
    return -1;
  json_t *meta = dc_json_parse(json, strlen(json), err, sizeof err);
  json_t *prov = meta ? json_object_get(meta, "gitops") : NULL;
  if (!json_is_object(prov)) {
    json_decref(meta);
    return -1;
  }
  for (size_t i = 0; i < 6; i++) {
    size_t size;
    char *field = prov_field(out, i, &size);
    json_t *v = json_object_get(prov, prov_keys[i]);
    if (json_is_string(v))
      dc_strlcpy(field, json_string_value(v), size);
  }
  json_decref(meta);
  return out->revision[0] ? 0 : -1;
}

/* ---- the plan ---- */

const char *gitops_change_kind_name(gitops_change_kind k) {
  return k == GITOPS_CREATE ? "create" : k == GITOPS_UPDATE ? "update" : "delete";
}

typedef struct history_scan {
  const char *repo, *path, *blob;
  int n;
  /* pin: the newest row, and the row it rolled back from */
  int pinned;
  char rolled_from[129];
  int is_rollback;
  char pinned_revision[GITOPS_OID_HEX];
  /* delete: the last row this repository and path made */
  int managed;
  char file[512];
  /* failed: that row, made from the wanted blob, failed */
  int failed;
  char failed_revision[GITOPS_OID_HEX];
  char failed_id[48];
} history_scan;

static int same_source(const gitops_provenance *p, const history_scan *h) {
  return strcmp(p->repo, h->repo) == 0 && strcmp(p->path, h->path) == 0;
}

/* Newest first. A manual rollback pins the target when the deployment it
 * rolled back from was made by this repository with the manifest blob git
 * still wants: git has not moved on for that target. */
static int scan_pin(void *payload, const store_deployment *d) {
  history_scan *h = payload;
  gitops_provenance p;
  int from_git = gitops_provenance_read(d->metadata, &p) == 0;
  if (h->n++ == 0) {
    h->is_rollback = strcmp(d->kind, "rollback") == 0 && strcmp(d->status, "succeeded") == 0 && !from_git;
    dc_strlcpy(h->rolled_from, d->from_version, sizeof h->rolled_from);
    return !h->is_rollback;
  }
  if (strcmp(d->version, h->rolled_from) != 0 || strcmp(d->status, "succeeded") != 0)
    return 0;
  if (from_git && same_source(&p, h) && strcmp(p.blob, h->blob) == 0) {
    h->pinned = 1;
    dc_strlcpy(h->pinned_revision, p.revision, sizeof h->pinned_revision);
  }
  return 1;
}

static int scan_managed(void *payload, const store_deployment *d) {
  history_scan *h = payload;
  gitops_provenance p;
  if (gitops_provenance_read(d->metadata, &p) != 0 || !same_source(&p, h))
    return 0;
  h->managed = 1;
  dc_strlcpy(h->file, p.file, sizeof h->file);
  return 1;
}

/* Newest first, rows of other origins skipped (a manual deploy is drift
 * to repair, not a new commit): the newest row from this repository and
 * path decides. */
static int scan_failed(void *payload, const store_deployment *d) {
  history_scan *h = payload;
  gitops_provenance p;
  if (gitops_provenance_read(d->metadata, &p) != 0 || !same_source(&p, h))
    return 0;
  if (strcmp(p.blob, h->blob) == 0 && strcmp(d->status, "failed") == 0) {
    h->failed = 1;
    dc_strlcpy(h->failed_revision, p.revision, sizeof h->failed_revision);
    dc_strlcpy(h->failed_id, d->id, sizeof h->failed_id);
  }
  return 1;
}

static long find_want(const gitops_want *wants, size_t n, const char *target) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(wants[i].target, target) == 0)
      return (long)i;
  return -1;
}

static void scan(const gitops_plan_target *pt, int (*fn)(void *, const store_deployment *), history_scan *h) {
  for (size_t i = 0; i < pt->nhistory; i++) {
    /* A reconcile only repairs: it neither pins nor unpins a target. */
    if (strcmp(pt->history[i].kind, "reconcile") == 0)
      continue;
    if (fn(h, &pt->history[i]))
      return;
  }
}

/* Fills c for one target; c->target[0] stays "" when nothing differs. */
static void plan_target(const gitops_plan_target *pt, const char *repo, const char *path, const gitops_want *wants,
                        size_t nwants, gitops_change *c) {
  const store_target tg = *pt->row;
  const char *target = tg.name;
  memset(c, 0, sizeof *c);
  long w = find_want(wants, nwants, target);
  history_scan h = {.repo = repo, .path = path, .blob = w >= 0 ? wants[w].blob : ""};
  if (w >= 0 && strcmp(tg.current_version, wants[w].version) == 0)
    return;
  if (w < 0) {
    if (!tg.current_version[0])
      return; /* nothing live, nothing wanted */
    scan(pt, scan_managed, &h);
    if (!h.managed)
      return; /* deployed by other means: not ours to delete */
    c->kind = GITOPS_DELETE;
    dc_strlcpy(c->file, h.file, sizeof c->file);
  } else {
    c->kind = tg.current_version[0] ? GITOPS_UPDATE : GITOPS_CREATE;
    dc_strlcpy(c->to, wants[w].version, sizeof c->to);
    dc_strlcpy(c->file, wants[w].file, sizeof c->file);
    if (c->kind == GITOPS_UPDATE)
      scan(pt, scan_pin, &h);
    c->pinned = h.pinned;
    dc_strlcpy(c->pinned_revision, h.pinned_revision, sizeof c->pinned_revision);
    if (!c->pinned)
      scan(pt, scan_failed, &h);
    c->failed = h.failed;
    dc_strlcpy(c->failed_revision, h.failed_revision, sizeof c->failed_revision);
    dc_strlcpy(c->failed_id, h.failed_id, sizeof c->failed_id);
  }
  c->want = w;
  dc_strlcpy(c->target, target, sizeof c->target);
  dc_strlcpy(c->from, tg.current_version, sizeof c->from);
}

static int by_target(const void *a, const void *b) {
  return strcmp(((const gitops_change *)a)->target, ((const gitops_change *)b)->target);
}

int gitops_plan(const gitops_plan_target *targets, size_t ntargets, const char *repo, const char *path,
                const gitops_want *wants, size_t nwants, gitops_change **out, size_t *nout, char *err) {
  gitops_change *list = calloc(ntargets + 1, sizeof *list);
  size_t n = 0;
  *out = NULL;
  *nout = 0;
  if (!list) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  for (size_t i = 0; i < ntargets; i++) {
    plan_target(&targets[i], repo, path, wants, nwants, &list[n]);
    if (list[n].target[0])
      n++;
  }
  qsort(list, n, sizeof *list, by_target);
  *out = list;
  *nout = n;
  return 0;
}

