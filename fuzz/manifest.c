/* GitOps manifests (runtime/manifest.c) as a sync reads them: the bytes of
 * a blob handed to manifest_read, with the checks bindings/lgitops.c makes
 * (a target of the config; a built-in strategy from strategies/strategy.c,
 * or a registered name without parameters). What a valid manifest
 * promises is checked, and so is what happens next to it: its strategy is
 * run as a rollout runs it (every action succeeding) and must reach a
 * promotion, and the provenance a sync stores beside its metadata reads
 * back intact (runtime/gitplan.c). */
#include "fuzz.h"

#include <jansson.h>

#include "gitops.h"
#include "json.h"
#include "manifest.h"
#include "strategy.h"
#include "util.h"

/* The targets and registered strategies of spec/gitops_spec.lua's config. */
static const char *const targets[] = {"production", "staging", "qa", NULL};
static const char *const registered[] = {"fast", NULL};

static int in(const char *const *list, const char *s) {
  for (; *list; list++)
    if (strcmp(*list, s) == 0)
      return 1;
  return 0;
}

static int check_target(void *payload, const char *name, char *err) {
  (void)payload;
  if (in(targets, name))
    return 0;
  dc_fmt(err, DC_ERR_MAX, "'%.64s' is not a target of the manager's config (known: production, qa, staging)", name);
  return -1;
}

/* A rollout of a first version and of an update, every action succeeding:
 * a strategy that was accepted must promote, in a bounded number of steps,
 * with its share never going down or past 100 %. */
static void run_to_promotion(const strategy *st, int has_old) {
  strategy_run run;
  memset(&run, 0, sizeof run);
  run.has_old = has_old;
  run.last_ok = 1;
  for (int i = 0; i < 100000; i++) {
    strategy_action a;
    st->step(st, &run, &a);
    FUZZ_CHECK(a.kind != ACTION_ABORT);
    if (a.kind == ACTION_PROMOTE)
      return;
    if (a.kind == ACTION_TRAFFIC) {
      FUZZ_CHECK(a.pct >= run.pct && a.pct <= 100);
      run.pct = a.pct;
    }
    if (a.kind == ACTION_WAIT)
      FUZZ_CHECK(a.seconds >= 0 && a.seconds < 1e9);
  }
  fprintf(stderr, "fuzz: strategy %s accepted but still at %g %% after 100000 actions\n", st->name, run.pct);
  FUZZ_CHECK(!"an accepted strategy promotes");
}

static int check_strategy(void *payload, const json_t *obj, char *err) {
  (void)payload;
  strategy *st = NULL;
  char why[DC_ERR_MAX];
  int rc = strategy_from_json(obj, &st, why);
  if (rc < 0) {
    dc_fmt(err, DC_ERR_MAX, "field 'strategy': %s", dc_unprefix(why));
    return -1;
  }
  if (rc > 0) {
    FUZZ_CHECK(st != NULL && strategy_check(st, why) == 0);
    run_to_promotion(st, 0);
    run_to_promotion(st, 1);
    strategy_free(st);
    return 0;
  }
  const char *kind = json_string_value(json_object_get(obj, "kind"));
  if (json_object_size(obj) != 1 || !kind || !in(registered, kind)) {
    dc_fmt(err, DC_ERR_MAX, "field 'strategy.kind': '%.64s' is not canary, blue-green or a registered strategy",
           kind ? kind : "");
    return -1;
  }
  return 0;
}

static void check_valid(const manifest *m) {
  char err[DC_ERR_MAX];
  FUZZ_CHECK(in(targets, m->target));
  FUZZ_CHECK(dc_validate_version(m->version, "version", err) == 0);
  FUZZ_CHECK(m->strategy == NULL || json_is_object(m->strategy));
  if (m->metadata) {
    FUZZ_CHECK(json_is_object(m->metadata) && !json_object_get(m->metadata, "gitops"));
    char *text = dc_json_dump(m->metadata);
    FUZZ_CHECK(text && strlen(text) <= MANIFEST_METADATA_MAX);
    free(text);
  }
  /* What a sync stores: the provenance beside the manifest's metadata. */
  gitops_provenance p, back;
  memset(&p, 0, sizeof p);
  dc_strlcpy(p.revision, "0f4c1e3b9a7d2c5e8f6a1b3d5c7e9f0a2b4c6d8e", sizeof p.revision);
  dc_strlcpy(p.blob, m->oid, sizeof p.blob);
  dc_strlcpy(p.file, m->file, sizeof p.file);
  dc_strlcpy(p.repo, "https://***@git.example.com/ops/deploy-config.git", sizeof p.repo);
  dc_strlcpy(p.branch, "main", sizeof p.branch);
  dc_strlcpy(p.path, "production", sizeof p.path);
  char *meta = gitops_metadata_json(&p, m->metadata);
  FUZZ_CHECK(meta != NULL);
  FUZZ_CHECK(gitops_provenance_read(meta, &back) == 0);
  FUZZ_CHECK(memcmp(&p, &back, sizeof p) == 0);
  json_t *all = dc_json_parse(meta, strlen(meta), err, sizeof err);
  FUZZ_CHECK(all != NULL);
  FUZZ_CHECK(json_object_size(all) == 1 + (m->metadata ? json_object_size(m->metadata) : 0));
  json_decref(all);
  free(meta);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > GITOPS_MAX_MANIFEST)
    return 0; /* refused unread by the git module */
  gitops_entry en;
  memset(&en, 0, sizeof en);
  en.file = "production/web.json";
  dc_strlcpy(en.oid, "8d1a4e0f6b2c9e7a5d3f1c0b8a6e4d2c0f9b7a51", sizeof en.oid);
  en.status = GITOPS_MODIFIED;
  en.problem = GITOPS_OK;
  /* As the git module hands a blob over: its bytes, NUL-terminated. */
  en.data = fuzz_cstr(data, size);
  en.size = size;
  manifest_checks checks = {check_target, check_strategy, NULL};
  manifest m;
  FUZZ_CHECK(manifest_read(&m, &en, &checks) == 0);
  if (m.nerrors == 0)
    check_valid(&m);
  for (size_t i = 0; i < m.nerrors; i++)
    FUZZ_CHECK(strncmp(m.errors[i], "production/web.json: ", 21) == 0);
  manifest_clear(&m);
  free(en.data);
  return 0;
}
