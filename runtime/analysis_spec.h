/* Analysis as declared: `analysis = { interval, failure_limit, metrics }`
 * on a strategy, a target or a GitOps manifest's strategy object, checked
 * field by field here (one parser for all three: Lua tables come as JSON),
 * and the rule that turns a measured value into a verdict.
 *
 * A metric's value is judged by ranges, never by an expression evaluated
 * from user text: `success = { max = 0.01 }` passes when the value is at
 * most 0.01; `failure = { min = 0.05 }` fails when it is at least 0.05.
 * With both, failure is looked at first, and a value in neither range is
 * inconclusive (the rollout pauses for an operator). A baseline comparison
 * (`baseline = { max_increase = 0.2, tolerance = 5 }`) fails when the new
 * set's value is above old * (1 + max_increase) + tolerance. */
#ifndef DEPLOY_ANALYSIS_SPEC_H
#define DEPLOY_ANALYSIS_SPEC_H

#include <stddef.h>

#include <jansson.h>

#define ANALYSIS_MAX_METRICS 16

typedef enum { SRC_HAPROXY, SRC_PROMETHEUS, SRC_PROBE, SRC_HTTP } analysis_source;

/* What the haproxy source reads from HAProxy's per-server counters. */
typedef enum {
  MEASURE_5XX_RATIO,     /* hrsp_5xx / responses, over the window */
  MEASURE_4XX_RATIO,     /* hrsp_4xx / responses */
  MEASURE_ERROR_RATIO,   /* (hrsp_5xx + eresp + econ) / (responses + eresp + econ) */
  MEASURE_RESPONSE_TIME, /* rtime: ms, HAProxy's average over the last 1024 requests */
  MEASURE_REQUESTS,      /* responses over the window */
} analysis_measure_kind;

typedef enum { NODATA_FAIL, NODATA_PASS, NODATA_INCONCLUSIVE } analysis_no_data;

typedef enum { VERDICT_PASS, VERDICT_FAIL, VERDICT_INCONCLUSIVE, VERDICT_ERROR } analysis_verdict;

/* min <= v <= max, each bound optional (at least one is set). */
typedef struct analysis_range {
  int set;
  int has_min, has_max;
  double min, max;
} analysis_range;

typedef struct analysis_metric {
  char name[64];
  analysis_source source;
  analysis_range success, failure;
  int baseline;               /* judged against the old set instead of ranges */
  double max_increase;        /* baseline: relative, 0.2 = 20 % worse */
  double tolerance;           /* baseline: absolute slack, in the measure's unit */
  analysis_no_data no_data;
  double timeout;             /* seconds per request */
  /* haproxy */
  analysis_measure_kind measure;
  int min_requests;           /* fewer responses in the window: no data */
  /* prometheus */
  char *address;              /* http(s)://host:port */
  char *query;                /* PromQL; {version} {from_version} {target} filled */
  /* http */
  char *url;                  /* placeholders as in query */
  char *field;                /* dotted path into the JSON answer; NULL: the answer itself */
  long expect_status;
  /* probe */
  char *path;
  int count;                  /* requests to each set */
  double confidence;          /* of the Mann-Whitney U test */
  double max_error_increase;  /* new error ratio above old's by more: fail */
} analysis_metric;

typedef struct analysis_spec {
  double interval;            /* seconds between measurements during a hold */
  int failure_limit;          /* failed measurements of one metric tolerated */
  size_t n;
  analysis_metric *metrics;
  json_t *json;               /* as declared (read back by Lua) */
} analysis_spec;

/* Checks obj and builds the spec. where names it in messages
 * ("CanaryStrategy analysis", "config targets.production.analysis");
 * -1 with err naming the field and the accepted values. */
int analysis_spec_parse(analysis_spec **out, const json_t *obj, const char *where, char *err);
void analysis_spec_free(analysis_spec *s); /* NULL-safe */
/* 1 when some metric reads from src. */
int analysis_spec_uses(const analysis_spec *s, analysis_source src);

const char *analysis_source_name(analysis_source s);
const char *analysis_measure_name(analysis_measure_kind m);
const char *analysis_verdict_name(analysis_verdict v);

/* The verdict of value v by m's ranges; why says which bound decided
 * ("0.3 >= failure min 0.05"). */
analysis_verdict analysis_judge(const analysis_metric *m, double v, char *why, size_t size);
/* The verdict of a baseline comparison: new against old. */
analysis_verdict analysis_judge_baseline(const analysis_metric *m, double v_new, double v_old, char *why,
                                         size_t size);
/* What a measurement without data counts as. */
analysis_verdict analysis_no_data_verdict(const analysis_metric *m);

#endif
