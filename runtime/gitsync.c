#include "gitsync.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"

#define BACKOFF_CAP 300.0

typedef enum { ROUND_DIFF, ROUND_SYNC, ROUND_WATCH } round_mode;

typedef struct round round;

struct gitsync {
  service *svc;
  gitops *g;
  gitsync_opts o;
  manifest *files;          /* every manifest of the revision, by file name */
  size_t nfiles, files_cap;
  char revision[GITOPS_OID_HEX];
  char last_revision[GITOPS_OID_HEX]; /* watch: the revision last reported */
  int failures;             /* watch: failed fetches in a row (the backoff) */
  round *round;             /* the one in flight */
  int freed;                /* gitsync_free came while a round ran */
};

typedef struct applied_item {
  gitsync_applied a;
  char **errors;
  round *rd;
} applied_item;

struct round {
  gitsync *gs;
  round_mode mode;
  int retry;                /* apply again what a failed rollout holds back */
  gitsync_cb cb;
  void *payload;
  double t0;
  int fetch_failed, invalid, report;
  char **errors;
  size_t nerrors;
  gitops_want *wants;
  size_t nwants;
  /* the plan's inputs: each configured target's row and history */
  gitops_plan_target *inputs;
  store_target *rows;
  store_deployment **hist;
  size_t ntargets;
  int pending;
  char read_err[DC_ERR_MAX];
  gitops_change *changes;
  size_t nchanges;
  applied_item *applied;
  size_t napplied;
  gitsync_held *pinned, *skipped, *held;
  size_t npinned, nskipped, nheld;
  size_t actionable;        /* changes neither pinned, held back by prune = false, nor failed before */
  int outstanding;
  engine_timer *timer;
};

/* ---- small helpers ---- */

static void add_error(round *rd, const char *msg) {
  char **g = realloc(rd->errors, (rd->nerrors + 1) * sizeof *g);
  if (!g)
    return;
  rd->errors = g;
  rd->errors[rd->nerrors] = strdup(msg ? msg : "failed");
  if (rd->errors[rd->nerrors]) {
    dc_redact(rd->errors[rd->nerrors]);
    rd->nerrors++;
  }
}

static const char *source_path(const gitsync *gs) {
  const char *p = gitops_path(gs->g);
  return p[0] ? p : "/";
}

const gitops *gitsync_gitops(const gitsync *gs) { return gs->g; }
const char *gitsync_revision(const gitsync *gs) { return gs->revision; }
double gitsync_interval(const gitsync *gs) { return gs->o.interval; }
int gitsync_prune(const gitsync *gs) { return gs->o.prune; }
int gitsync_busy(const gitsync *gs) { return gs->round != NULL; }
void gitsync_cancel(gitsync *gs) { gitops_cancel(gs->g); }

double gitsync_next_delay(const gitsync *gs) {
  double d = gs->o.interval;
  for (int i = 0; i < gs->failures && i < 30; i++)
    d *= 2;
  double cap = gs->o.interval > BACKOFF_CAP ? gs->o.interval : BACKOFF_CAP;
  return gs->failures && d > cap ? cap : d;
}

/* ---- the manifests of the revision ---- */

static long find_file(const gitsync *gs, const char *file) {
  for (size_t i = 0; i < gs->nfiles; i++)
    if (strcmp(gs->files[i].file, file) == 0)
      return (long)i;
  return -1;
}

static void drop_file(gitsync *gs, size_t i) {
  manifest_clear(&gs->files[i]);
  memmove(&gs->files[i], &gs->files[i + 1], (gs->nfiles - i - 1) * sizeof *gs->files);
  gs->nfiles--;
}

static int by_file(const void *a, const void *b) {
  return strcmp(((const manifest *)a)->file, ((const manifest *)b)->file);
}

/* Folds a fetched update into the manifests: only the entries the tree
 * diff named are read again. */
static int fold(gitsync *gs, const gitops_update *u) {
  if (u->full) {
    while (gs->nfiles > 0)
      drop_file(gs, gs->nfiles - 1);
  }
  for (size_t i = 0; i < u->n; i++) {
    const gitops_entry *en = &u->entries[i];
    long at = find_file(gs, en->file);
    if (at >= 0)
      drop_file(gs, (size_t)at);
    if (en->status == GITOPS_DELETED)
      continue;
    if (gs->nfiles == gs->files_cap) {
      size_t cap = gs->files_cap ? gs->files_cap * 2 : 16;
      manifest *g = realloc(gs->files, cap * sizeof *g);
      if (!g)
        return -1;
      gs->files = g;
      gs->files_cap = cap;
    }
    if (manifest_read(&gs->files[gs->nfiles], en, &gs->o.checks) != 0)
      return -1;
    gs->nfiles++;
  }
  /* Errors and duplicates read the same every time. */
  qsort(gs->files, gs->nfiles, sizeof *gs->files, by_file);
  dc_strlcpy(gs->revision, u->revision, sizeof gs->revision);
  return 0;
}

/* What the revision wants, one target per manifest; every error of every
 * manifest (a second manifest for one target is an error of its own). */
static int collect_wanted(round *rd) {
  gitsync *gs = rd->gs;
  rd->wants = calloc(gs->nfiles + 1, sizeof *rd->wants);
  if (!rd->wants)
    return -1;
  for (size_t i = 0; i < gs->nfiles; i++) {
    const manifest *m = &gs->files[i];
    for (size_t k = 0; k < m->nerrors; k++)
      add_error(rd, m->errors[k]);
    if (m->nerrors)
      continue;
    int dup = 0;
    for (size_t k = 0; k < rd->nwants && !dup; k++) {
      if (strcmp(rd->wants[k].target, m->target) != 0)
        continue;
      char msg[DC_ERR_MAX];
      char *a = dc_printable(m->file), *b = dc_printable(rd->wants[k].file);
      dc_fmt(msg, sizeof msg, "%s: field 'target': '%s' is also the target of %s: keep one manifest per target",
             a ? a : "?", m->target, b ? b : "?");
      free(a);
      free(b);
      add_error(rd, msg);
      dup = 1;
    }
    if (!dup)
      rd->wants[rd->nwants++] = (gitops_want){m->target, m->version, m->file, m->oid};
  }
  rd->invalid = rd->nerrors > 0;
  return 0;
}

static const manifest *manifest_of(const gitsync *gs, const char *file) {
  long i = find_file(gs, file);
  return i >= 0 ? &gs->files[i] : NULL;
}

/* ---- the end of a round ---- */

static void round_free(round *rd) {
  for (size_t i = 0; i < rd->nerrors; i++)
    free(rd->errors[i]);
  free(rd->errors);
  free(rd->wants);
  for (size_t i = 0; i < rd->ntargets; i++) {
    for (size_t k = 0; rd->hist && k < rd->inputs[i].nhistory; k++)
      store_deployment_clear(&rd->hist[i][k]);
    if (rd->hist)
      free(rd->hist[i]);
  }
  free(rd->hist);
  free(rd->rows);
  free(rd->inputs);
  free(rd->changes);
  for (size_t i = 0; i < rd->napplied; i++) {
    for (size_t k = 0; k < rd->applied[i].a.nerrors; k++)
      free(rd->applied[i].errors[k]);
    free(rd->applied[i].errors);
  }
  free(rd->applied);
  free(rd->pinned);
  free(rd->skipped);
  free(rd->held);
  free(rd);
}

static void destroy(gitsync *gs) {
  while (gs->nfiles > 0)
    drop_file(gs, gs->nfiles - 1);
  free(gs->files);
  gitops_free(gs->g);
  service_unref(gs->svc);
  free(gs);
}

static int worth_reporting(const round *rd) {
  const gitsync *gs = rd->gs;
  if (rd->fetch_failed)
    return 1;
  int moved = strcmp(gs->revision, gs->last_revision) != 0;
  if (rd->invalid)
    return moved; /* the same broken revision is not retried: a new commit is needed */
  return moved || rd->actionable > 0;
}

static void finish(round *rd) {
  gitsync *gs = rd->gs;
  gitsync_report rep;
  memset(&rep, 0, sizeof rep);
  /* Each failed rollout's errors, prefixed with its target. */
  for (size_t i = 0; i < rd->napplied; i++) {
    const gitsync_applied *a = &rd->applied[i].a;
    for (size_t k = 0; k < a->nerrors; k++) {
      char msg[DC_ERR_MAX + 80];
      dc_fmt(msg, sizeof msg, "%s: %s", a->change->target, a->errors[k]);
      add_error(rd, msg);
    }
    if (!a->success && a->nerrors == 0)
      add_error(rd, a->change->target);
  }
  rep.success = rd->nerrors == 0;
  rep.revision = gs->revision;
  rep.fetch_failed = rd->fetch_failed;
  rep.invalid = rd->invalid;
  rep.changes = rd->changes;
  rep.nchanges = rd->nchanges;
  gitsync_applied *applied = calloc(rd->napplied + 1, sizeof *applied);
  for (size_t i = 0; applied && i < rd->napplied; i++)
    applied[i] = rd->applied[i].a;
  rep.applied = applied;
  rep.napplied = applied ? rd->napplied : 0;
  rep.pinned = rd->pinned;
  rep.npinned = rd->npinned;
  rep.skipped = rd->skipped;
  rep.nskipped = rd->nskipped;
  rep.held = rd->held;
  rep.nheld = rd->nheld;
  rep.errors = (const char *const *)rd->errors;
  rep.nerrors = rd->nerrors;
  rep.duration = engine_now(service_engine(gs->svc)) - rd->t0;
  rep.report = rd->report;
  if (rd->mode == ROUND_WATCH) {
    if (!rd->fetch_failed)
      dc_strlcpy(gs->last_revision, gs->revision, sizeof gs->last_revision);
    /* Only fetching backs off: a failed rollout is not applied again
     * anyway, and the commit that fixes it must be seen at once. */
    gs->failures = rd->fetch_failed ? gs->failures + 1 : 0;
  }
  gs->round = NULL;
  rd->cb(rd->payload, &rep);
  free(applied);
  round_free(rd);
  if (gs->freed)
    destroy(gs);
}

/* ---- applying ---- */

static gitsync_held *hold(gitsync_held **list, size_t *n, const gitops_change *c, const char *reason) {
  gitsync_held *g = realloc(*list, (*n + 1) * sizeof *g);
  if (!g)
    return NULL;
  *list = g;
  g[*n].change = c;
  g[*n].reason = reason;
  return &g[(*n)++];
}

/* Pinned and prune-less deletes are reported, not applied; a change whose
 * rollout failed before is held (and is an error: git and the target
 * disagree) unless the round retries. */
static int held_back(round *rd, const gitops_change *c) {
  if (c->pinned) {
    hold(&rd->pinned, &rd->npinned, c, "pinned by a manual rollback until git changes this target's manifest");
    return 1;
  }
  if (c->failed && !rd->retry) {
    char msg[DC_ERR_MAX + 256];
    char *file = dc_printable(c->file);
    hold(&rd->held, &rd->nheld, c,
         "its rollout of this manifest failed: not applied again until a commit changes the manifest, or a sync "
         "retries it (deployctl sync --retry)");
    dc_fmt(msg, sizeof msg, "%s: %s from %s not applied again: its rollout failed (deployment %s, revision %.12s); "
           "commit a change to %s, or run 'deployctl sync --retry'", c->target, c->to, file ? file : "?",
           c->failed_id, c->failed_revision, file ? file : "the manifest");
    free(file);
    add_error(rd, msg);
    return 1;
  }
  if (c->kind == GITOPS_DELETE && !rd->gs->o.prune) {
    hold(&rd->skipped, &rd->nskipped, c,
         "the manifest is gone; prune = false keeps the target running (set prune = true)");
    return 1;
  }
  return 0;
}

static void item_errors(applied_item *it, const char *const *errors, size_t n) {
  it->errors = calloc(n + 1, sizeof *it->errors);
  for (size_t i = 0; it->errors && i < n; i++) {
    it->errors[i] = strdup(errors[i]);
    if (it->errors[i])
      it->a.nerrors++;
  }
  it->a.errors = (const char *const *)it->errors;
}

static void item_ended(round *rd) {
  if (--rd->outstanding == 0)
    finish(rd);
}

static void rollout_ended(void *payload, const rollout_result *res) {
  applied_item *it = payload;
  it->a.success = res->success;
  dc_strlcpy(it->a.strategy, res->strategy, sizeof it->a.strategy);
  dc_strlcpy(it->a.id, res->id, sizeof it->a.id);
  item_errors(it, res->errors, res->nerrors);
  item_ended(it->rd);
}

static void prune_ended(void *payload, int ok, int locked, const char *err) {
  applied_item *it = payload;
  (void)locked;
  it->a.success = ok;
  dc_strlcpy(it->a.strategy, "prune", sizeof it->a.strategy);
  if (err)
    item_errors(it, &err, 1);
  item_ended(it->rd);
}

static void provenance(const gitsync *gs, const gitops_change *c, const char *blob, gitops_provenance *p) {
  memset(p, 0, sizeof *p);
  dc_strlcpy(p->revision, gs->revision, sizeof p->revision);
  dc_strlcpy(p->blob, blob ? blob : "", sizeof p->blob);
  dc_strlcpy(p->file, c->file, sizeof p->file);
  dc_strlcpy(p->repo, gitops_url(gs->g), sizeof p->repo);
  dc_strlcpy(p->branch, gitops_branch(gs->g), sizeof p->branch);
  dc_strlcpy(p->path, source_path(gs), sizeof p->path);
}

static void start_change(round *rd, applied_item *it) {
  gitsync *gs = rd->gs;
  const gitops_change *c = it->a.change;
  char err[DC_ERR_MAX];
  gitops_provenance p;
  const manifest *m = c->kind == GITOPS_DELETE ? NULL : manifest_of(gs, c->file);
  provenance(gs, c, m ? m->oid : NULL, &p);
  char *meta = gitops_metadata_json(&p, m ? m->metadata : NULL);
  int rc;
  rd->outstanding++;
  if (!meta) {
    dc_fmt(err, sizeof err, "deploy: out of memory");
    rc = DC_ERROR;
  } else if (c->kind == GITOPS_DELETE) {
    rc = service_prune(gs->svc, c->target, meta, &gs->o.sink, prune_ended, it, err);
  } else {
    rc = gs->o.deploy(gs->o.payload, c->target, c->to, m ? m->strategy : NULL, meta, rollout_ended, it, err);
  }
  free(meta);
  if (rc != DC_OK) {
    const char *e = err;
    it->a.success = 0;
    item_errors(it, &e, 1);
    rd->outstanding--;
  }
}

/* Applies every change at once; finish runs when all have ended. */
static void apply(round *rd) {
  rd->applied = calloc(rd->nchanges + 1, sizeof *rd->applied);
  if (!rd->applied) {
    add_error(rd, "deploy: out of memory");
    finish(rd);
    return;
  }
  rd->outstanding = 1; /* held until every change is started */
  for (size_t i = 0; i < rd->nchanges; i++) {
    if (held_back(rd, &rd->changes[i]))
      continue;
    applied_item *it = &rd->applied[rd->napplied++];
    it->rd = rd;
    it->a.change = &rd->changes[i];
    start_change(rd, it);
  }
  item_ended(rd);
}

/* ---- planning ---- */

static void planned(round *rd) {
  gitsync *gs = rd->gs;
  char err[DC_ERR_MAX];
  if (rd->read_err[0]) {
    add_error(rd, rd->read_err);
    finish(rd);
    return;
  }
  if (gitops_plan(rd->inputs, rd->ntargets, gitops_url(gs->g), source_path(gs), rd->wants, rd->nwants, &rd->changes,
                  &rd->nchanges, err) != 0) {
    add_error(rd, err);
    finish(rd);
    return;
  }
  for (size_t i = 0; i < rd->nchanges; i++)
    rd->actionable += !rd->changes[i].pinned && (!rd->changes[i].failed || rd->retry) &&
                      (rd->changes[i].kind != GITOPS_DELETE || gs->o.prune);
  rd->report = rd->mode != ROUND_WATCH || worth_reporting(rd);
  if (rd->mode == ROUND_SYNC || (rd->mode == ROUND_WATCH && rd->report))
    apply(rd);
  else
    finish(rd);
}

typedef struct input_read {
  round *rd;
  size_t i;
} input_read;

static void input_done(round *rd) {
  if (--rd->pending == 0)
    planned(rd);
}

static void target_read(void *payload, const store_result *r) {
  input_read *ir = payload;
  round *rd = ir->rd;
  if (r->rc != DC_OK && !rd->read_err[0])
    dc_strlcpy(rd->read_err, r->err, sizeof rd->read_err);
  else if (r->rc == DC_OK)
    rd->rows[ir->i] = *r->target;
  free(ir);
  input_done(rd);
}

static void history_read(void *payload, const store_result *r) {
  input_read *ir = payload;
  round *rd = ir->rd;
  if (r->rc != DC_OK && !rd->read_err[0])
    dc_strlcpy(rd->read_err, r->err, sizeof rd->read_err);
  rd->hist[ir->i] = calloc(r->ndeployments + 1, sizeof **rd->hist);
  for (size_t k = 0; r->rc == DC_OK && rd->hist[ir->i] && k < r->ndeployments; k++) {
    if (store_deployment_copy(&rd->hist[ir->i][k], &r->deployments[k]) != 0)
      break;
    rd->inputs[ir->i].nhistory = k + 1;
  }
  rd->inputs[ir->i].history = rd->hist[ir->i];
  free(ir);
  input_done(rd);
}

static void read_inputs(round *rd) {
  gitsync *gs = rd->gs;
  store *s = service_store(gs->svc);
  char err[DC_ERR_MAX];
  rd->ntargets = service_ntargets(gs->svc);
  rd->inputs = calloc(rd->ntargets + 1, sizeof *rd->inputs);
  rd->rows = calloc(rd->ntargets + 1, sizeof *rd->rows);
  rd->hist = calloc(rd->ntargets + 1, sizeof *rd->hist);
  if (!rd->inputs || !rd->rows || !rd->hist) {
    add_error(rd, "deploy: out of memory");
    finish(rd);
    return;
  }
  rd->pending = 1;
  for (size_t i = 0; i < rd->ntargets; i++) {
    const char *name = service_target_at(gs->svc, i)->name;
    rd->inputs[i].row = &rd->rows[i];
    for (int step = 0; step < 2; step++) {
      input_read *ir = malloc(sizeof *ir);
      if (!ir) {
        dc_strlcpy(rd->read_err, "deploy: out of memory", sizeof rd->read_err);
        continue;
      }
      *ir = (input_read){rd, i};
      rd->pending++;
      int rc = step == 0 ? store_target_get(s, name, target_read, ir, err)
                         : store_history(s, name, 0, history_read, ir, err);
      if (rc != 0) {
        free(ir);
        rd->pending--;
        dc_strlcpy(rd->read_err, err, sizeof rd->read_err);
      }
    }
  }
  input_done(rd);
}

/* ---- fetching ---- */

static void fetched(void *payload, gitops_update *u, const char *err) {
  round *rd = payload;
  if (err) {
    rd->fetch_failed = 1;
    add_error(rd, err);
    rd->report = 1;
    finish(rd);
    return;
  }
  if (fold(rd->gs, u) != 0 || collect_wanted(rd) != 0) {
    add_error(rd, "deploy: out of memory");
    finish(rd);
    return;
  }
  if (rd->invalid) {
    rd->report = rd->mode != ROUND_WATCH || worth_reporting(rd);
    finish(rd);
    return;
  }
  read_inputs(rd);
}

static void fetch_refused(void *payload) {
  round *rd = payload;
  rd->timer = NULL;
  rd->report = 1;
  finish(rd);
}

static int start_round(gitsync *gs, round_mode mode, int retry, gitsync_cb cb, void *payload, char *err) {
  if (gs->round) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: a sync of %s is already running: wait for it", gitops_url(gs->g));
    return DC_ERROR;
  }
  round *rd = calloc(1, sizeof *rd);
  if (!rd) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  rd->gs = gs;
  rd->mode = mode;
  rd->retry = retry;
  rd->cb = cb;
  rd->payload = payload;
  rd->t0 = engine_now(service_engine(gs->svc));
  gs->round = rd;
  char ferr[DC_ERR_MAX];
  if (gitops_fetch(gs->g, fetched, rd, ferr) != 0) {
    /* Reported like any failed fetch, from the loop. */
    rd->fetch_failed = 1;
    add_error(rd, ferr);
    rd->timer = engine_timer_start(service_engine(gs->svc), 0, fetch_refused, rd);
  }
  return DC_OK;
}

int gitsync_diff(gitsync *gs, gitsync_cb cb, void *payload, char *err) {
  return start_round(gs, ROUND_DIFF, 0, cb, payload, err);
}

int gitsync_sync(gitsync *gs, gitsync_cb cb, void *payload, char *err) {
  return start_round(gs, ROUND_SYNC, 0, cb, payload, err);
}

int gitsync_sync_retry(gitsync *gs, gitsync_cb cb, void *payload, char *err) {
  return start_round(gs, ROUND_SYNC, 1, cb, payload, err);
}

int gitsync_watch_round(gitsync *gs, gitsync_cb cb, void *payload, char *err) {
  return start_round(gs, ROUND_WATCH, 0, cb, payload, err);
}

/* ---- construction ---- */

int gitsync_new(gitsync **out, service *svc, const gitsync_opts *o, char *err) {
  *out = NULL;
  if (!o->deploy) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: no way to start a rollout was given");
    return DC_ERROR;
  }
  gitsync *gs = calloc(1, sizeof *gs);
  if (!gs) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  gitops_opts go = {.url = o->url, .branch = o->branch, .path = o->path, .cache_dir = o->cache_dir};
  if (gitops_open(&gs->g, service_engine(svc), &go, err) != 0) {
    free(gs);
    return DC_ERROR;
  }
  gs->svc = service_ref(svc);
  gs->o = *o;
  /* The strings live in the gitops handle from here on. */
  gs->o.url = gs->o.branch = gs->o.path = gs->o.cache_dir = NULL;
  *out = gs;
  return DC_OK;
}

void gitsync_free(gitsync *gs) {
  if (!gs)
    return;
  if (gs->round) {
    gs->freed = 1;
    gitops_cancel(gs->g);
    return;
  }
  destroy(gs);
}
