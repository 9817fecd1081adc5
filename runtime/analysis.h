/* Measuring a rollout's analysis (analysis_spec.h): every metric of the
 * spec at once, asynchronously on the engine, each giving a value and a
 * verdict. The rollout decides what verdicts mean for the hold (rollout.c);
 * this file only measures and judges.
 *
 * Sources:
 *   haproxy     the router's per-server counters (`show stat`): the new
 *               set's difference over the window since the last reading,
 *               against ranges or against the old set's over the same
 *               window (or the last window in which the old set served);
 *   prometheus  an instant query (GET /api/v1/query) whose one value is
 *               judged by ranges; an empty answer (or NaN) is no data;
 *   http        a URL answering JSON; the number at `field` is judged;
 *   probe       `count` GETs of `path` to new and old instances side by
 *               side; latencies compared with a Mann-Whitney U test, error
 *               ratios compared directly.
 * Every request goes through the HTTP module (fetch.h) or the router;
 * nothing blocks the loop, and work in flight holds the virtual clock. */
#ifndef DEPLOY_ANALYSIS_H
#define DEPLOY_ANALYSIS_H

#include <stddef.h>

#include <jansson.h>

#include "analysis_spec.h"
#include "engine.h"
#include "router.h"

typedef struct analysis analysis;

/* One side of the comparison as the rollout has it now: the router's
 * server names and the instances' base URLs (http://host:port). */
typedef struct analysis_set {
  char **servers;
  char **urls;
  size_t n;
} analysis_set;

typedef struct analysis_sets {
  analysis_set fresh, old;
  double pct;                  /* the new version's share now: 0 skips the haproxy source */
  const char *target, *version, *from_version; /* for placeholders */
} analysis_sets;

typedef struct analysis_result {
  const analysis_metric *metric;
  analysis_verdict verdict;
  double value;                /* NAN: none */
  char detail[512];
  json_t *data;                /* the event's payload (metric, source, value, verdict, detail, ...) */
} analysis_result;

/* results are valid during the call. */
typedef void (*analysis_cb)(void *payload, const analysis_result *results, size_t n);

/* spec and rt must outlive the analysis. NULL when out of memory. */
analysis *analysis_new(const analysis_spec *spec, engine *e, router *rt);
/* A measurement in flight ends without calling back. NULL-safe. */
void analysis_free(analysis *a);

/* A hold begins: the router's counters are read now, so the next
 * measurement's window starts here. Asynchronous; a measurement asked for
 * meanwhile waits for this reading. */
void analysis_window_begin(analysis *a, const analysis_sets *s);
/* Measures every metric (the haproxy ones only when s->pct > 0); cb runs
 * once, from the loop. One measurement at a time: -1 with err while one
 * runs, or when out of memory. s is copied. */
int analysis_measure(analysis *a, const analysis_sets *s, analysis_cb cb, void *payload, char *err);
/* Ends the measurement in flight, if any, without its callback. */
void analysis_cancel(analysis *a);

void analysis_sets_clear(analysis_sets *s);

/* -1 with err when spec reads from a source the target's router cannot
 * serve (the haproxy source behind nginx or no router). */
int analysis_check_router(const analysis_spec *spec, const router *rt, const char *target, char *err);

#endif
