#include "analysis_spec.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Where a message points: "CanaryStrategy analysis.metrics[2] (latency)". */
typedef struct ctx {
  const char *where;
  char at[192];
  char *err;
} ctx;

__attribute__((format(printf, 2, 3))) static int bad(ctx *c, const char *fmt, ...) {
  char what[DC_ERR_MAX];
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(what, sizeof what, fmt, ap);
  va_end(ap);
  dc_fmt(c->err, DC_ERR_MAX, "deploy: %s%s %s", c->where, c->at, what);
  return -1;
}

static const char *type_of(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    return "a table";
  case JSON_ARRAY:
    return "a list";
  case JSON_STRING:
    return "a string";
  case JSON_INTEGER:
  case JSON_REAL:
    return "a number";
  case JSON_TRUE:
  case JSON_FALSE:
    return "a boolean";
  default:
    return "null";
  }
}

static int known_keys(ctx *c, const json_t *obj, const char *const *allowed) {
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    int ok = 0;
    for (const char *const *a = allowed; *a && !ok; a++)
      ok = strcmp(*a, key) == 0;
    if (!ok) {
      dc_buf b = {0};
      for (const char *const *a = allowed; *a; a++)
        dc_buf_printf(&b, "%s%s", a == allowed ? "" : ", ", *a);
      char *list = dc_buf_take(&b);
      int rc = bad(c, "has no field '%s' (known: %s)", key, list ? list : "?");
      free(list);
      return rc;
    }
  }
  return 0;
}

/* A number field in [lo, hi]; absent: def. whole: no fraction allowed. */
static int number(ctx *c, const json_t *obj, const char *key, double def, double lo, double hi, int whole,
                  double *out) {
  json_t *v = json_object_get(obj, key);
  *out = def;
  if (!v)
    return 0;
  if (!json_is_number(v))
    return bad(c, "%s must be a number, got %s", key, type_of(v));
  double x = json_number_value(v);
  if (whole && x != floor(x))
    return bad(c, "%s must be a whole number, got %g", key, x);
  if (!(x >= lo && x <= hi))
    return bad(c, "%s must be between %g and %g, got %g", key, lo, hi, x);
  *out = x;
  return 0;
}

/* A string field; absent: NULL (or an error when required). */
static int string(ctx *c, const json_t *obj, const char *key, int required, size_t max, const char **out) {
  json_t *v = json_object_get(obj, key);
  *out = NULL;
  if (!v) {
    if (required)
      return bad(c, "needs %s", key);
    return 0;
  }
  if (!json_is_string(v))
    return bad(c, "%s must be a string, got %s", key, type_of(v));
  const char *s = json_string_value(v);
  if (!*s)
    return bad(c, "%s is empty", key);
  if (json_string_length(v) > max || strlen(s) != json_string_length(v))
    return bad(c, "%s is longer than %zu bytes (or holds a NUL byte)", key, max);
  for (const char *p = s; *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f)
      return bad(c, "%s holds a control character", key);
  *out = s;
  return 0;
}

static int dup_string(ctx *c, const char *s, char **out) {
  *out = s ? strdup(s) : NULL;
  if (s && !*out)
    return bad(c, "could not be kept: out of memory");
  return 0;
}

/* http(s)://host..., without spaces or quotes. */
static int url_field(ctx *c, const json_t *obj, const char *key, int required, const char **out) {
  if (string(c, obj, key, required, 1000, out) != 0)
    return -1;
  if (!*out)
    return 0;
  const char *s = *out, *rest = NULL;
  if (strncmp(s, "http://", 7) == 0)
    rest = s + 7;
  else if (strncmp(s, "https://", 8) == 0)
    rest = s + 8;
  if (!rest || !*rest || *rest == '/' || *rest == ':' || strpbrk(s, " \t\"<>\\^`|"))
    return bad(c, "%s '%.200s' is not a URL: write http://host:port/...", key, s);
  return 0;
}

static int range(ctx *c, const json_t *obj, const char *key, analysis_range *r) {
  static const char *const allowed[] = {"min", "max", NULL};
  json_t *v = json_object_get(obj, key);
  memset(r, 0, sizeof *r);
  if (!v)
    return 0;
  if (!json_is_object(v))
    return bad(c, "%s must be a table such as { max = 0.01 } or { min = 0.9, max = 1 }, got %s", key, type_of(v));
  char at[sizeof c->at];
  memcpy(at, c->at, sizeof at);
  dc_fmt(c->at + strlen(c->at), sizeof c->at - strlen(c->at), ".%s", key);
  int rc = known_keys(c, v, allowed);
  memcpy(c->at, at, sizeof at);
  if (rc)
    return rc;
  json_t *lo = json_object_get(v, "min"), *hi = json_object_get(v, "max");
  if (!lo && !hi)
    return bad(c, "%s needs min, max or both, e.g. { max = 0.01 }", key);
  if ((lo && !json_is_number(lo)) || (hi && !json_is_number(hi)))
    return bad(c, "%s min and max must be numbers", key);
  r->set = 1;
  r->has_min = lo != NULL;
  r->has_max = hi != NULL;
  r->min = lo ? json_number_value(lo) : 0;
  r->max = hi ? json_number_value(hi) : 0;
  if (r->has_min && r->has_max && r->min > r->max)
    return bad(c, "%s min %g is above its max %g", key, r->min, r->max);
  return 0;
}

/* baseline = { max_increase, tolerance } or true (the defaults). */
static int baseline(ctx *c, const json_t *obj, analysis_metric *m, double tolerance_default) {
  static const char *const allowed[] = {"max_increase", "tolerance", NULL};
  json_t *v = json_object_get(obj, "baseline");
  m->max_increase = 0.2;
  m->tolerance = tolerance_default;
  if (!v)
    return 0;
  if (json_is_true(v)) {
    m->baseline = 1;
    return 0;
  }
  if (!json_is_object(v))
    return bad(c, "baseline must be a table such as { max_increase = 0.2, tolerance = 5 }, got %s", type_of(v));
  char at[sizeof c->at];
  memcpy(at, c->at, sizeof at);
  dc_fmt(c->at + strlen(c->at), sizeof c->at - strlen(c->at), ".baseline");
  int rc = known_keys(c, v, allowed) || number(c, v, "max_increase", 0.2, 0, 1000, 0, &m->max_increase) ||
           number(c, v, "tolerance", tolerance_default, 0, 1e9, 0, &m->tolerance);
  memcpy(c->at, at, sizeof at);
  if (rc)
    return -1;
  m->baseline = 1;
  return 0;
}

static int no_data(ctx *c, const json_t *obj, analysis_metric *m) {
  const char *s;
  if (string(c, obj, "no_data", 0, 32, &s) != 0)
    return -1;
  m->no_data = NODATA_FAIL;
  if (!s || strcmp(s, "fail") == 0)
    return 0;
  if (strcmp(s, "pass") == 0)
    m->no_data = NODATA_PASS;
  else if (strcmp(s, "inconclusive") == 0)
    m->no_data = NODATA_INCONCLUSIVE;
  else
    return bad(c, "no_data '%s' is not known (known: fail, pass, inconclusive)", s);
  return 0;
}

static int name_char(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
         ch == '-' || ch == '.';
}

static int name_ok(const char *s) {
  for (; *s; s++)
    if (!name_char(*s))
      return 0;
  return 1;
}

static const char *const source_names[] = {"haproxy", "prometheus", "probe", "http"};
static const char *const measure_names[] = {"5xx_ratio", "4xx_ratio", "error_ratio", "response_time", "requests"};

const char *analysis_source_name(analysis_source s) {
  return (unsigned)s < sizeof source_names / sizeof *source_names ? source_names[s] : "?";
}

const char *analysis_measure_name(analysis_measure_kind m) {
  return (unsigned)m < sizeof measure_names / sizeof *measure_names ? measure_names[m] : "?";
}

const char *analysis_verdict_name(analysis_verdict v) {
  switch (v) {
  case VERDICT_PASS:
    return "pass";
  case VERDICT_FAIL:
    return "fail";
  case VERDICT_INCONCLUSIVE:
    return "inconclusive";
  case VERDICT_ERROR:
    return "error";
  }
  return "error";
}

static int ranges(ctx *c, const json_t *obj, analysis_metric *m, int required) {
  if (range(c, obj, "success", &m->success) || range(c, obj, "failure", &m->failure))
    return -1;
  if (required && !m->success.set && !m->failure.set)
    return bad(c, "needs success, failure or both, e.g. success = { max = 0.01 }");
  return 0;
}

static int parse_haproxy(ctx *c, const json_t *obj, analysis_metric *m) {
  static const char *const allowed[] = {"name",    "source",  "no_data",  "timeout", "measure",
                                        "min_requests", "success", "failure", "baseline", NULL};
  const char *measure;
  double min_requests;
  if (known_keys(c, obj, allowed) || string(c, obj, "measure", 1, 32, &measure))
    return -1;
  size_t i = 0;
  while (i < sizeof measure_names / sizeof *measure_names && strcmp(measure_names[i], measure) != 0)
    i++;
  if (i == sizeof measure_names / sizeof *measure_names)
    return bad(c, "measure '%s' is not known (known: 5xx_ratio, 4xx_ratio, error_ratio, response_time, requests)",
               measure);
  m->measure = (analysis_measure_kind)i;
  if (number(c, obj, "min_requests", 1, 0, 1e9, 1, &min_requests) ||
      baseline(c, obj, m, m->measure == MEASURE_RESPONSE_TIME ? 5 : 0.01) || ranges(c, obj, m, 0))
    return -1;
  m->min_requests = (int)min_requests;
  if (m->baseline && m->measure == MEASURE_REQUESTS)
    return bad(c, "measure 'requests' cannot be compared with the old set (its share of traffic differs): "
                  "give success or failure instead");
  if (m->baseline && (m->success.set || m->failure.set))
    return bad(c, "gives both baseline and success/failure: judge it one way");
  if (!m->baseline && !m->success.set && !m->failure.set)
    return bad(c, "needs a condition: success = { max = 0.01 }, failure = { ... }, or baseline = { max_increase = 0.2 }");
  return 0;
}

static int parse_prometheus(ctx *c, const json_t *obj, analysis_metric *m) {
  static const char *const allowed[] = {"name", "source", "no_data", "timeout", "address",
                                        "query", "success", "failure", NULL};
  const char *address, *query;
  if (known_keys(c, obj, allowed) || url_field(c, obj, "address", 1, &address) ||
      string(c, obj, "query", 1, 4096, &query) || ranges(c, obj, m, 1))
    return -1;
  return dup_string(c, address, &m->address) || dup_string(c, query, &m->query);
}

static int parse_http(ctx *c, const json_t *obj, analysis_metric *m) {
  static const char *const allowed[] = {"name", "source", "no_data", "timeout", "url",
                                        "field", "expect_status", "success", "failure", NULL};
  const char *url, *field;
  double status;
  if (known_keys(c, obj, allowed) || url_field(c, obj, "url", 1, &url) || string(c, obj, "field", 0, 255, &field) ||
      number(c, obj, "expect_status", 200, 100, 599, 1, &status) || ranges(c, obj, m, 1))
    return -1;
  if (field) {
    for (const char *p = field; *p; p++)
      if (!name_char(*p) || (*p == '.' && (p == field || p[1] == '.' || p[1] == '\0')))
        return bad(c, "field '%s' is not a path such as 'data.score' or 'checks.0.ok'", field);
  }
  m->expect_status = (long)status;
  return dup_string(c, url, &m->url) || dup_string(c, field, &m->field);
}

static int parse_probe(ctx *c, const json_t *obj, analysis_metric *m) {
  static const char *const allowed[] = {"name",       "source",   "no_data",            "timeout", "path",
                                        "count",      "confidence", "max_error_increase", "baseline", NULL};
  const char *path;
  double count;
  if (known_keys(c, obj, allowed) || string(c, obj, "path", 0, 255, &path) ||
      number(c, obj, "count", 20, 3, 1000, 1, &count) ||
      number(c, obj, "confidence", 0.95, 0.5, 0.9999, 0, &m->confidence) ||
      number(c, obj, "max_error_increase", 0.05, 0, 1, 0, &m->max_error_increase) || baseline(c, obj, m, 5))
    return -1;
  if (path && (path[0] != '/' || strpbrk(path, " \t\"<>\\^`{|}")))
    return bad(c, "path '%s' must start with '/' and hold no spaces, e.g. '/'", path);
  m->baseline = 1;
  m->count = (int)count;
  return dup_string(c, path ? path : "/", &m->path);
}

static int parse_metric(ctx *c, const json_t *obj, analysis_metric *m) {
  const char *name, *source;
  if (!json_is_object(obj))
    return bad(c, "must be a table such as { name = 'errors', source = 'haproxy', ... }, got %s", type_of(obj));
  if (string(c, obj, "name", 1, sizeof m->name - 1, &name))
    return -1;
  if (!name_ok(name))
    return bad(c, "name '%s' may only hold letters, digits, '_', '-' and '.'", name);
  dc_strlcpy(m->name, name, sizeof m->name);
  dc_fmt(c->at + strlen(c->at), sizeof c->at - strlen(c->at), " (%s)", name);
  if (string(c, obj, "source", 1, 32, &source))
    return -1;
  size_t i = 0;
  while (i < sizeof source_names / sizeof *source_names && strcmp(source_names[i], source) != 0)
    i++;
  if (i == sizeof source_names / sizeof *source_names)
    return bad(c, "source '%s' is not known (known: haproxy, prometheus, probe, http)", source);
  m->source = (analysis_source)i;
  if (number(c, obj, "timeout", m->source == SRC_PROBE ? 2 : 5, 0.001, 60, 0, &m->timeout) || no_data(c, obj, m))
    return -1;
  switch (m->source) {
  case SRC_HAPROXY:
    return parse_haproxy(c, obj, m);
  case SRC_PROMETHEUS:
    return parse_prometheus(c, obj, m);
  case SRC_HTTP:
    return parse_http(c, obj, m);
  case SRC_PROBE:
    return parse_probe(c, obj, m);
  }
  return -1;
}

void analysis_spec_free(analysis_spec *s) {
  if (!s)
    return;
  for (size_t i = 0; i < s->n; i++) {
    analysis_metric *m = &s->metrics[i];
    free(m->address);
    free(m->query);
    free(m->url);
    free(m->field);
    free(m->path);
  }
  free(s->metrics);
  json_decref(s->json);
  free(s);
}

int analysis_spec_parse(analysis_spec **out, const json_t *obj, const char *where, char *err) {
  static const char *const allowed[] = {"interval", "failure_limit", "metrics", NULL};
  ctx c = {.where = where, .err = err};
  double limit;
  *out = NULL;
  if (!json_is_object(obj)) {
    bad(&c, "must be a table such as { interval = 60, metrics = { ... } }, got %s", type_of(obj));
    return -1;
  }
  analysis_spec *s = calloc(1, sizeof *s);
  if (!s) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  if (known_keys(&c, obj, allowed) || number(&c, obj, "interval", 60, 0.001, 86400, 0, &s->interval) ||
      number(&c, obj, "failure_limit", 0, 0, 1000, 1, &limit))
    goto fail;
  s->failure_limit = (int)limit;
  json_t *metrics = json_object_get(obj, "metrics");
  if (!metrics || (json_is_object(metrics) && json_object_size(metrics) == 0) ||
      (json_is_array(metrics) && json_array_size(metrics) == 0)) {
    bad(&c, "needs metrics: a list such as { { name = 'errors', source = 'haproxy', measure = '5xx_ratio', "
            "success = { max = 0.01 } } }");
    goto fail;
  }
  if (!json_is_array(metrics)) {
    bad(&c, "metrics must be a list of tables, got %s", type_of(metrics));
    goto fail;
  }
  if (json_array_size(metrics) > ANALYSIS_MAX_METRICS) {
    bad(&c, "has %zu metrics: at most %d", json_array_size(metrics), ANALYSIS_MAX_METRICS);
    goto fail;
  }
  s->metrics = calloc(json_array_size(metrics), sizeof *s->metrics);
  if (!s->metrics) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    goto fail;
  }
  size_t i;
  json_t *v;
  json_array_foreach(metrics, i, v) {
    dc_fmt(c.at, sizeof c.at, ".metrics[%zu]", i + 1);
    s->n = i + 1;
    if (parse_metric(&c, v, &s->metrics[i]) != 0)
      goto fail;
    for (size_t k = 0; k < i; k++)
      if (strcmp(s->metrics[k].name, s->metrics[i].name) == 0) {
        bad(&c, "has the name of metrics[%zu]: give each metric its own name", k + 1);
        goto fail;
      }
  }
  s->json = json_deep_copy(obj);
  if (!s->json) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    goto fail;
  }
  *out = s;
  return 0;
fail:
  analysis_spec_free(s);
  return -1;
}

int analysis_spec_uses(const analysis_spec *s, analysis_source src) {
  for (size_t i = 0; s && i < s->n; i++)
    if (s->metrics[i].source == src)
      return 1;
  return 0;
}

/* ---- judging ---- */

static int in_range(const analysis_range *r, double v) {
  return (!r->has_min || v >= r->min) && (!r->has_max || v <= r->max);
}

static void describe(char *buf, size_t size, const analysis_range *r) {
  if (r->has_min && r->has_max)
    dc_fmt(buf, size, "between %g and %g", r->min, r->max);
  else if (r->has_min)
    dc_fmt(buf, size, ">= %g", r->min);
  else
    dc_fmt(buf, size, "<= %g", r->max);
}

analysis_verdict analysis_judge(const analysis_metric *m, double v, char *why, size_t size) {
  char s[96], f[96];
  describe(s, sizeof s, &m->success);
  describe(f, sizeof f, &m->failure);
  if (m->failure.set && in_range(&m->failure, v)) {
    dc_fmt(why, size, "%g is in the failure range (%s)", v, f);
    return VERDICT_FAIL;
  }
  if (!m->success.set) {
    dc_fmt(why, size, "%g is outside the failure range (%s)", v, f);
    return VERDICT_PASS;
  }
  if (in_range(&m->success, v)) {
    dc_fmt(why, size, "%g is in the success range (%s)", v, s);
    return VERDICT_PASS;
  }
  if (m->failure.set) {
    dc_fmt(why, size, "%g is in neither range (success %s, failure %s)", v, s, f);
    return VERDICT_INCONCLUSIVE;
  }
  dc_fmt(why, size, "%g is outside the success range (%s)", v, s);
  return VERDICT_FAIL;
}

analysis_verdict analysis_judge_baseline(const analysis_metric *m, double v_new, double v_old, char *why,
                                         size_t size) {
  double limit = v_old * (1 + m->max_increase) + m->tolerance;
  if (v_new > limit) {
    dc_fmt(why, size, "%g is above the old set's %g x %g + %g = %g", v_new, v_old, 1 + m->max_increase, m->tolerance,
           limit);
    return VERDICT_FAIL;
  }
  dc_fmt(why, size, "%g is within the old set's %g x %g + %g = %g", v_new, v_old, 1 + m->max_increase, m->tolerance,
         limit);
  return VERDICT_PASS;
}

analysis_verdict analysis_no_data_verdict(const analysis_metric *m) {
  switch (m->no_data) {
  case NODATA_PASS:
    return VERDICT_PASS;
  case NODATA_INCONCLUSIVE:
    return VERDICT_INCONCLUSIVE;
  case NODATA_FAIL:
    break;
  }
  return VERDICT_FAIL;
}
