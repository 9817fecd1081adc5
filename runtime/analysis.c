#include "analysis.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch.h"
#include "json.h"
#include "mannwhitney.h"
#include "util.h"

/* A backend with more of our servers than this is read in part: analysis
 * then sees the first ones only (two sets of 64 instances on 4 hosts fit). */
#define AN_MAX_SERVERS 1024

typedef struct meas meas;

/* One metric's work inside a measurement. */
typedef struct sub {
  meas *m;
  size_t i;                   /* the metric */
  /* probe */
  int round;
  double *lat_new, *lat_old;  /* ms, answered requests */
  size_t n_new, n_old;
  int err_new, err_old;       /* no answer, or a status outside 2xx/3xx */
} sub;

struct meas {
  analysis *a;                /* NULL once cancelled: end without a callback */
  engine *e;
  size_t nmetrics;
  analysis_sets s;            /* a copy */
  analysis_cb cb;
  void *payload;
  int pending;
  int started;
  int want_hap;               /* the haproxy source is measured this time */
  router_stat *cur;
  size_t ncur;
  int hap_ok;
  char hap_err[DC_ERR_MAX];
  analysis_result *res;       /* one per metric of the spec */
  int *skipped;               /* haproxy metrics while the new set has no traffic */
  sub *subs;
};

typedef struct snap_read {
  analysis *a;                /* NULL: its answer is no longer wanted */
  engine *e;
  router_stat *buf;
  size_t n;
} snap_read;

struct analysis {
  const analysis_spec *spec;
  engine *e;
  router *rt;
  router_stat *snap;          /* counters at the start of the window */
  size_t nsnap;
  int snap_valid;
  snap_read *snap_op;         /* a reading in flight */
  meas *cur;
  double *last_old;           /* per metric: the old set's value in the last window it served */
  int *has_last_old;
};

static void meas_begin(meas *m);

/* ---- sets ---- */

static void set_clear(analysis_set *s) {
  for (size_t i = 0; i < s->n; i++) {
    free(s->servers ? s->servers[i] : NULL);
    free(s->urls ? s->urls[i] : NULL);
  }
  free(s->servers);
  free(s->urls);
  memset(s, 0, sizeof *s);
}

void analysis_sets_clear(analysis_sets *s) {
  set_clear(&s->fresh);
  set_clear(&s->old);
  free((char *)s->target);
  free((char *)s->version);
  free((char *)s->from_version);
  memset(s, 0, sizeof *s);
}

static int set_copy(analysis_set *to, const analysis_set *from) {
  memset(to, 0, sizeof *to);
  to->servers = calloc(from->n + 1, sizeof *to->servers);
  to->urls = calloc(from->n + 1, sizeof *to->urls);
  if (!to->servers || !to->urls)
    return -1;
  for (size_t i = 0; i < from->n; i++) {
    to->n = i + 1;
    to->servers[i] = strdup(from->servers[i] ? from->servers[i] : "");
    to->urls[i] = strdup(from->urls[i] ? from->urls[i] : "");
    if (!to->servers[i] || !to->urls[i])
      return -1;
  }
  return 0;
}

static char *dup_or_empty(const char *s) { return strdup(s ? s : ""); }

static int sets_copy(analysis_sets *to, const analysis_sets *from) {
  memset(to, 0, sizeof *to);
  to->pct = from->pct;
  to->target = dup_or_empty(from->target);
  to->version = dup_or_empty(from->version);
  to->from_version = dup_or_empty(from->from_version);
  if (!to->target || !to->version || !to->from_version || set_copy(&to->fresh, &from->fresh) != 0 ||
      set_copy(&to->old, &from->old) != 0)
    return -1;
  return 0;
}

/* ---- life cycle ---- */

analysis *analysis_new(const analysis_spec *spec, engine *e, router *rt) {
  analysis *a = calloc(1, sizeof *a);
  if (!a)
    return NULL;
  a->spec = spec;
  a->e = e;
  a->rt = rt;
  a->last_old = calloc(spec->n + 1, sizeof *a->last_old);
  a->has_last_old = calloc(spec->n + 1, sizeof *a->has_last_old);
  if (!a->last_old || !a->has_last_old) {
    analysis_free(a);
    return NULL;
  }
  return a;
}

static void meas_release(meas *m, size_t nmetrics);

void analysis_cancel(analysis *a) {
  if (!a || !a->cur)
    return;
  meas *m = a->cur;
  a->cur = NULL;
  if (!m->started) {
    meas_release(m, m->nmetrics); /* it waited for the window's reading: nothing in flight */
    return;
  }
  m->a = NULL;
}

void analysis_free(analysis *a) {
  if (!a)
    return;
  analysis_cancel(a);
  if (a->snap_op)
    a->snap_op->a = NULL;
  free(a->snap);
  free(a->last_old);
  free(a->has_last_old);
  free(a);
}

/* ---- the window: a reading of the counters ---- */

static void snap_read_done(void *payload, const char *err) {
  snap_read *op = payload;
  analysis *a = op->a;
  engine_release(op->e);
  if (a) {
    a->snap_op = NULL;
    free(a->snap);
    a->snap = err ? NULL : op->buf;
    a->nsnap = err ? 0 : op->n;
    a->snap_valid = !err;
    if (!err)
      op->buf = NULL;
    if (a->cur && !a->cur->started)
      meas_begin(a->cur);
  }
  free(op->buf);
  free(op);
}

static int wants_counters(const analysis *a) {
  return a->rt && a->rt->stats && analysis_spec_uses(a->spec, SRC_HAPROXY);
}

void analysis_window_begin(analysis *a, const analysis_sets *s) {
  char err[DC_ERR_MAX];
  (void)s;
  if (!a || !wants_counters(a))
    return;
  if (a->snap_op)
    a->snap_op->a = NULL; /* a newer reading starts the window */
  a->snap_valid = 0;
  snap_read *op = calloc(1, sizeof *op);
  if (op)
    op->buf = calloc(AN_MAX_SERVERS, sizeof *op->buf);
  if (!op || !op->buf) {
    if (op)
      free(op->buf);
    free(op);
    a->snap_op = NULL;
    return;
  }
  op->a = a;
  op->e = a->e;
  a->snap_op = op;
  engine_hold(a->e);
  if (a->rt->stats(a->rt, op->buf, AN_MAX_SERVERS, &op->n, snap_read_done, op, err) != 0)
    snap_read_done(op, err);
}

/* ---- results ---- */

__attribute__((format(printf, 4, 5))) static void verdict(analysis_result *r, analysis_verdict v, double value,
                                                         const char *fmt, ...) {
  va_list ap;
  r->verdict = v;
  r->value = value;
  va_start(ap, fmt);
  dc_vfmt(r->detail, sizeof r->detail, fmt, ap);
  va_end(ap);
}

static void no_data(analysis_result *r, const analysis_metric *m, const char *why) {
  verdict(r, analysis_no_data_verdict(m), NAN, "no data: %s", why);
}

/* Extra fields of a result's event. */
static void extra(analysis_result *r, const char *key, json_t *v) {
  if (!r->data)
    r->data = json_object();
  if (r->data && v)
    json_object_set_new(r->data, key, v);
  else
    json_decref(v);
}

static json_t *number_or_null(double v) { return isfinite(v) ? dc_json_number(round(v * 1e6) / 1e6) : json_null(); }

/* ---- haproxy ---- */

typedef struct totals {
  double resp, r4, r5, eresp, econ;
  double rtime_weighted;      /* sum of rtime x responses in the window */
  double rtime_sum;           /* sum of rtime of servers that have one */
  int rtime_n;
  size_t found;               /* servers of the set the reading has */
} totals;

static const router_stat *find_stat(const router_stat *v, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(v[i].name, name) == 0)
      return &v[i];
  return NULL;
}

/* A counter that went down was reset (HAProxy restarted): count from 0. */
static double delta(double now, double then) { return now >= then ? now - then : now; }

static totals sum_set(const analysis *a, const meas *m, const analysis_set *set) {
  totals t;
  memset(&t, 0, sizeof t);
  for (size_t i = 0; i < set->n; i++) {
    const router_stat *now = find_stat(m->cur, m->ncur, set->servers[i]);
    if (!now)
      continue;
    const router_stat *then = find_stat(a->snap, a->nsnap, set->servers[i]);
    router_stat zero;
    memset(&zero, 0, sizeof zero);
    if (!then)
      then = &zero; /* added during the window: its counters began at 0 */
    double resp = 0;
    for (int k = 0; k < 6; k++)
      resp += delta(now->hrsp[k], then->hrsp[k]);
    t.found++;
    t.resp += resp;
    t.r4 += delta(now->hrsp[3], then->hrsp[3]);
    t.r5 += delta(now->hrsp[4], then->hrsp[4]);
    t.eresp += delta(now->eresp, then->eresp);
    t.econ += delta(now->econ, then->econ);
    t.rtime_weighted += now->rtime * resp;
    if (now->rtime > 0) {
      t.rtime_sum += now->rtime;
      t.rtime_n++;
    }
  }
  return t;
}

/* The measure of a set over the window; NAN when it has no data. */
static double measure_of(const analysis_metric *mt, const totals *t, int baseline_side) {
  double base = mt->measure == MEASURE_ERROR_RATIO ? t->resp + t->eresp + t->econ : t->resp;
  if (mt->measure == MEASURE_REQUESTS)
    return t->resp;
  if (mt->measure == MEASURE_RESPONSE_TIME) {
    if (t->resp >= mt->min_requests && t->resp > 0)
      return t->rtime_weighted / t->resp;
    /* The old set serves nothing once traffic is all new; HAProxy keeps
     * each server's average of its last requests, a fair baseline. */
    return baseline_side && t->rtime_n > 0 ? t->rtime_sum / t->rtime_n : NAN;
  }
  if (base < mt->min_requests || base <= 0)
    return NAN;
  switch (mt->measure) {
  case MEASURE_5XX_RATIO:
    return t->r5 / base;
  case MEASURE_4XX_RATIO:
    return t->r4 / base;
  case MEASURE_ERROR_RATIO:
    return (t->r5 + t->eresp + t->econ) / base;
  default:
    return NAN;
  }
}

static void judge_haproxy(analysis *a, meas *m, size_t i) {
  const analysis_metric *mt = &a->spec->metrics[i];
  analysis_result *r = &m->res[i];
  extra(r, "measure", json_string(analysis_measure_name(mt->measure)));
  if (!m->hap_ok) {
    verdict(r, VERDICT_ERROR, NAN, "cannot read HAProxy's counters: %s", dc_unprefix(m->hap_err));
    return;
  }
  if (!a->snap_valid) {
    no_data(r, mt, "no earlier reading of HAProxy's counters to measure from (the window starts now)");
    return;
  }
  totals tn = sum_set(a, m, &m->s.fresh);
  extra(r, "requests", dc_json_number(tn.resp));
  if (tn.found == 0) {
    no_data(r, mt, "HAProxy lists none of the new instances' servers");
    return;
  }
  double v = measure_of(mt, &tn, 0);
  if (isnan(v)) {
    char why[160];
    dc_fmt(why, sizeof why, "the new instances answered %g requests in the window (min_requests %d)", tn.resp,
           mt->min_requests);
    no_data(r, mt, why);
    return;
  }
  char why[400];
  if (!mt->baseline) {
    analysis_verdict vd = analysis_judge(mt, v, why, sizeof why);
    verdict(r, vd, v, "%s of the new instances: %s", analysis_measure_name(mt->measure), why);
    return;
  }
  totals to = sum_set(a, m, &m->s.old);
  double old = to.found ? measure_of(mt, &to, 1) : NAN;
  const char *from = "the same window";
  if (isnan(old) && a->has_last_old[i]) {
    old = a->last_old[i];
    from = "the last window it served";
  } else if (!isnan(old)) {
    a->last_old[i] = old;
    a->has_last_old[i] = 1;
  }
  if (isnan(old)) {
    no_data(r, mt, "the old set answered no request to compare with, in this window or before");
    return;
  }
  extra(r, "baseline", number_or_null(old));
  analysis_verdict vd = analysis_judge_baseline(mt, v, old, why, sizeof why);
  verdict(r, vd, v, "%s of the new instances against the old set's over %s: %s",
          analysis_measure_name(mt->measure), from, why);
}

static void finish_one(meas *m);

static void hap_read_done(void *payload, const char *err) {
  meas *m = payload;
  m->hap_ok = !err;
  if (err)
    dc_strlcpy(m->hap_err, err, sizeof m->hap_err);
  engine_release(m->e);
  finish_one(m);
}

/* ---- placeholders ---- */

static char *fill(const meas *m, const char *tmpl) {
  const char *pairs[] = {"version", m->s.version, "from_version", m->s.from_version, "target", m->s.target, NULL};
  return dc_expand_placeholders_dup(tmpl, pairs);
}

static void url_encode(dc_buf *b, const char *s) {
  static const char hex[] = "0123456789ABCDEF";
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
        *p == '.' || *p == '_' || *p == '~') {
      dc_buf_add(b, (const char *)p, 1);
    } else {
      char esc[3] = {'%', hex[*p >> 4], hex[*p & 15]};
      dc_buf_add(b, esc, 3);
    }
  }
}

/* ---- prometheus ---- */

static double sample_value(const json_t *pair, int *ok) {
  const char *text = json_string_value(json_array_get(pair, 1));
  char *end;
  *ok = 0;
  if (!json_is_array(pair) || json_array_size(pair) != 2 || !text)
    return NAN;
  double v = strtod(text, &end);
  *ok = end != text && *end == '\0';
  return v;
}

static void judge_prometheus(meas *m, size_t i, const fetch_result *res) {
  const analysis_metric *mt = &m->a->spec->metrics[i];
  analysis_result *r = &m->res[i];
  char perr[256], why[400];
  if (!res->ok) {
    verdict(r, VERDICT_ERROR, NAN, "Prometheus at %s did not answer: %s", mt->address, res->error);
    return;
  }
  json_t *doc = dc_json_parse(res->body, res->len, perr, sizeof perr);
  const char *status = json_string_value(json_object_get(doc, "status"));
  if (!doc || !status) {
    verdict(r, VERDICT_ERROR, NAN, "%s answered HTTP %ld without a Prometheus answer%s%s", mt->address, res->status,
            doc ? "" : ": ", doc ? "" : perr);
    json_decref(doc);
    return;
  }
  if (strcmp(status, "success") != 0) {
    const char *type = json_string_value(json_object_get(doc, "errorType"));
    const char *msg = json_string_value(json_object_get(doc, "error"));
    verdict(r, VERDICT_ERROR, NAN, "Prometheus refused the query (%s): %.300s", type ? type : "error",
            msg ? msg : "no reason given");
    json_decref(doc);
    return;
  }
  json_t *data = json_object_get(doc, "data");
  const char *type = json_string_value(json_object_get(data, "resultType"));
  json_t *result = json_object_get(data, "result");
  double v = NAN;
  int ok = 0;
  if (type && strcmp(type, "scalar") == 0) {
    v = sample_value(result, &ok);
  } else if (type && strcmp(type, "vector") == 0 && json_is_array(result)) {
    size_t n = json_array_size(result);
    extra(r, "series", json_integer((json_int_t)n));
    if (n > 1) {
      verdict(r, VERDICT_ERROR, NAN, "the query returned %zu series: aggregate them to one (sum, max, ...)", n);
      json_decref(doc);
      return;
    }
    if (n == 0) {
      json_decref(doc);
      no_data(r, mt, "the query returned no series");
      return;
    }
    v = sample_value(json_object_get(json_array_get(result, 0), "value"), &ok);
  } else {
    verdict(r, VERDICT_ERROR, NAN, "the query returned a %s: write an instant query that gives one number",
            type ? type : "result of no known type");
    json_decref(doc);
    return;
  }
  json_decref(doc);
  if (!ok) {
    verdict(r, VERDICT_ERROR, NAN, "the query's value is not a number");
    return;
  }
  if (isnan(v)) {
    no_data(r, mt, "the query's value is NaN (no samples in its range?)");
    return;
  }
  analysis_verdict vd = analysis_judge(mt, v, why, sizeof why);
  verdict(r, vd, v, "%s", why);
}

/* ---- http ---- */

/* The value at a dotted path: object keys, or array indices in digits. */
static const json_t *at_path(const json_t *v, const char *path) {
  char key[256];
  while (v && path && *path) {
    size_t n = strcspn(path, ".");
    dc_fmt(key, sizeof key, "%.*s", (int)n, path);
    if (json_is_array(v)) {
      char *end;
      unsigned long idx = strtoul(key, &end, 10);
      v = *end == '\0' && end != key ? json_array_get(v, idx) : NULL;
    } else {
      v = json_object_get(v, key);
    }
    path += n + (path[n] == '.');
  }
  return v;
}

static void judge_http(meas *m, size_t i, const fetch_result *res) {
  const analysis_metric *mt = &m->a->spec->metrics[i];
  analysis_result *r = &m->res[i];
  char perr[256], why[400];
  if (!res->ok) {
    verdict(r, VERDICT_ERROR, NAN, "%s did not answer: %s", res->url, res->error);
    return;
  }
  extra(r, "status", json_integer(res->status));
  if (res->status != mt->expect_status) {
    verdict(r, VERDICT_ERROR, NAN, "%s answered HTTP %ld (expected %ld)", res->url, res->status, mt->expect_status);
    return;
  }
  json_t *doc = dc_json_parse(res->body, res->len, perr, sizeof perr);
  if (!doc) {
    verdict(r, VERDICT_ERROR, NAN, "%s did not answer JSON: %s", res->url, perr);
    return;
  }
  const json_t *v = at_path(doc, mt->field);
  double x = NAN;
  int ok = 1;
  if (!v || json_is_null(v)) {
    json_decref(doc);
    no_data(r, mt, mt->field ? "the answer has nothing at field" : "the answer is null");
    return;
  }
  if (json_is_number(v)) {
    x = json_number_value(v);
  } else if (json_is_boolean(v)) {
    x = json_is_true(v) ? 1 : 0;
  } else if (json_is_string(v)) {
    char *end;
    x = strtod(json_string_value(v), &end);
    ok = end != json_string_value(v) && *end == '\0';
  } else {
    ok = 0;
  }
  json_decref(doc);
  if (!ok) {
    verdict(r, VERDICT_ERROR, NAN, "the value at %s is not a number or a boolean", mt->field ? mt->field : "the top");
    return;
  }
  analysis_verdict vd = analysis_judge(mt, x, why, sizeof why);
  verdict(r, vd, x, "%s", why);
}

/* ---- fetches: prometheus, http ---- */

static void fetched(void *payload, const fetch_result *res, size_t n) {
  sub *sb = payload;
  meas *m = sb->m;
  engine_release(m->e);
  if (m->a && n == 1) {
    if (m->a->spec->metrics[sb->i].source == SRC_PROMETHEUS)
      judge_prometheus(m, sb->i, res);
    else
      judge_http(m, sb->i, res);
  }
  finish_one(m);
}

static void fetch_metric(meas *m, size_t i) {
  const analysis_metric *mt = &m->a->spec->metrics[i];
  char err[DC_ERR_MAX];
  char *url = NULL;
  if (mt->source == SRC_PROMETHEUS) {
    char *query = fill(m, mt->query);
    dc_buf b = {0};
    dc_buf_add(&b, mt->address, strlen(mt->address) - (mt->address[strlen(mt->address) - 1] == '/'));
    dc_buf_puts(&b, "/api/v1/query?query=");
    url_encode(&b, query ? query : "");
    free(query);
    url = dc_buf_take(&b);
    extra(&m->res[i], "query", dc_json_text(url ? strstr(url, "?query=") + 7 : ""));
  } else {
    url = fill(m, mt->url);
  }
  if (!url) {
    verdict(&m->res[i], VERDICT_ERROR, NAN, "out of memory");
    return;
  }
  fetch_opts o = {.timeout = mt->timeout};
  const char *urls[] = {url};
  m->pending++;
  engine_hold(m->a->e);
  if (fetch_start(m->a->e, urls, 1, &o, fetched, &m->subs[i], err) != 0) {
    engine_release(m->a->e);
    m->pending--;
    verdict(&m->res[i], VERDICT_ERROR, NAN, "%s", dc_unprefix(err));
  }
  free(url);
}

/* ---- probe ---- */

static void probe_round(meas *m, sub *sb);

static int good_status(long s) { return s >= 200 && s < 400; }

static char *join(const char *a, const char *b) {
  dc_buf buf = {0};
  dc_buf_puts(&buf, a);
  dc_buf_puts(&buf, b);
  return dc_buf_take(&buf);
}

static void judge_probe(meas *m, sub *sb) {
  const analysis_metric *mt = &m->a->spec->metrics[sb->i];
  analysis_result *r = &m->res[sb->i];
  double sent = mt->count;
  double ratio_new = sb->err_new / sent, ratio_old = sb->err_old / sent;
  extra(r, "requests", json_integer(mt->count));
  extra(r, "errors_new", json_integer(sb->err_new));
  extra(r, "errors_old", json_integer(sb->err_old));
  if (ratio_new > ratio_old + mt->max_error_increase + 1e-12) {
    verdict(r, VERDICT_FAIL, NAN,
            "%d of %d requests to the new instances failed or answered an error, %d of %d to the old ones "
            "(max_error_increase %g)",
            sb->err_new, mt->count, sb->err_old, mt->count, mt->max_error_increase);
    return;
  }
  if (sb->n_new < 3 || sb->n_old < 3) {
    no_data(r, mt, "fewer than 3 answers from a set to compare latencies");
    return;
  }
  mw_result t;
  if (mw_test(sb->lat_new, sb->n_new, sb->lat_old, sb->n_old, &t) != 0) {
    verdict(r, VERDICT_ERROR, NAN, "out of memory");
    return;
  }
  double med_new = mw_median(sb->lat_new, sb->n_new), med_old = mw_median(sb->lat_old, sb->n_old);
  double limit = med_old * (1 + mt->max_increase) + mt->tolerance;
  extra(r, "baseline", number_or_null(med_old));
  extra(r, "p", number_or_null(t.p_greater));
  extra(r, "u", number_or_null(t.u));
  if (t.p_greater < 1 - mt->confidence && med_new > limit) {
    verdict(r, VERDICT_FAIL, med_new,
            "median latency %.3g ms against the old set's %.3g ms (limit %.3g ms): slower, p = %.2g by the "
            "Mann-Whitney U test",
            med_new, med_old, limit, t.p_greater);
    return;
  }
  verdict(r, VERDICT_PASS, med_new, "median latency %.3g ms against the old set's %.3g ms (limit %.3g ms), p = %.2g",
          med_new, med_old, limit, t.p_greater);
}

static void probed(void *payload, const fetch_result *res, size_t n) {
  sub *sb = payload;
  meas *m = sb->m;
  engine_release(m->e);
  if (!m->a) {
    finish_one(m);
    return;
  }
  for (size_t k = 0; k < n && k < 2; k++) {
    int ok = res[k].ok && good_status(res[k].status);
    if (k == 0) {
      sb->err_new += !ok;
      if (res[k].ok)
        sb->lat_new[sb->n_new++] = res[k].latency * 1000;
    } else {
      sb->err_old += !ok;
      if (res[k].ok)
        sb->lat_old[sb->n_old++] = res[k].latency * 1000;
    }
  }
  sb->round++;
  probe_round(m, sb);
}

/* One request to a new and one to an old instance, side by side, so both
 * meet the same moment of the machine's load; `count` rounds in turn. */
static void probe_round(meas *m, sub *sb) {
  const analysis_metric *mt = &m->a->spec->metrics[sb->i];
  char err[DC_ERR_MAX];
  if (sb->round >= mt->count) {
    judge_probe(m, sb);
    finish_one(m);
    return;
  }
  size_t k = (size_t)sb->round;
  char *urls[2] = {join(m->s.fresh.urls[k % m->s.fresh.n], mt->path), join(m->s.old.urls[k % m->s.old.n], mt->path)};
  fetch_opts o = {.timeout = mt->timeout, .fresh = 1};
  int rc = -1;
  if (urls[0] && urls[1]) {
    engine_hold(m->a->e);
    rc = fetch_start(m->a->e, (const char *const *)urls, 2, &o, probed, sb, err);
    if (rc != 0)
      engine_release(m->a->e);
  } else {
    dc_fmt(err, sizeof err, "out of memory");
  }
  free(urls[0]);
  free(urls[1]);
  if (rc != 0) {
    verdict(&m->res[sb->i], VERDICT_ERROR, NAN, "%s", dc_unprefix(err));
    finish_one(m);
  }
}

static void probe_metric(meas *m, size_t i) {
  const analysis_metric *mt = &m->a->spec->metrics[i];
  sub *sb = &m->subs[i];
  extra(&m->res[i], "path", json_string(mt->path));
  if (m->s.fresh.n == 0 || m->s.old.n == 0) {
    no_data(&m->res[i], mt, m->s.fresh.n ? "no old instance to compare with" : "no new instance runs");
    return;
  }
  sb->lat_new = calloc((size_t)mt->count, sizeof *sb->lat_new);
  sb->lat_old = calloc((size_t)mt->count, sizeof *sb->lat_old);
  if (!sb->lat_new || !sb->lat_old) {
    verdict(&m->res[i], VERDICT_ERROR, NAN, "out of memory");
    return;
  }
  m->pending++;
  probe_round(m, sb);
}

/* ---- a measurement ---- */

static void meas_free(meas *m) {
  free(m->cur);
  analysis_sets_clear(&m->s);
  free(m->skipped);
  free(m);
}

static void meas_release(meas *m, size_t nmetrics) {
  for (size_t i = 0; m->res && m->subs && i < nmetrics; i++) {
    json_decref(m->res[i].data);
    free(m->subs[i].lat_new);
    free(m->subs[i].lat_old);
  }
  free(m->res);
  free(m->subs);
  meas_free(m);
}

static json_t *event_data(const meas *m, const analysis_result *r) {
  json_t *d = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o}", "metric", r->metric->name, "source",
                        analysis_source_name(r->metric->source), "verdict", analysis_verdict_name(r->verdict),
                        "value", number_or_null(r->value), "detail", dc_json_text(r->detail), "pct",
                        dc_json_number(m->s.pct));
  if (d && r->data)
    json_object_update(d, r->data);
  return d;
}

static void meas_done(meas *m) {
  analysis *a = m->a;
  size_t n = m->nmetrics;
  if (!a) {
    meas_release(m, n);
    return;
  }
  a->cur = NULL;
  if (m->want_hap) {
    for (size_t i = 0; i < n; i++)
      if (a->spec->metrics[i].source == SRC_HAPROXY)
        judge_haproxy(a, m, i);
    /* This reading starts the next window. */
    if (m->hap_ok) {
      free(a->snap);
      a->snap = m->cur;
      a->nsnap = m->ncur;
      a->snap_valid = 1;
      m->cur = NULL;
    }
  }
  /* Only what was measured is reported. */
  analysis_result *out = calloc(n + 1, sizeof *out);
  size_t k = 0;
  for (size_t i = 0; out && i < n; i++) {
    if (m->skipped[i])
      continue;
    out[k] = m->res[i];
    out[k].data = event_data(m, &m->res[i]);
    k++;
  }
  if (out)
    m->cb(m->payload, out, k);
  for (size_t i = 0; out && i < k; i++)
    json_decref(out[i].data);
  free(out);
  meas_release(m, n);
}

static void finish_one(meas *m) {
  if (--m->pending > 0)
    return;
  meas_done(m);
}

static void meas_begin(meas *m) {
  analysis *a = m->a;
  char err[DC_ERR_MAX];
  m->started = 1;
  m->pending = 1; /* held until every metric has started */
  if (m->want_hap) {
    m->cur = calloc(AN_MAX_SERVERS, sizeof *m->cur);
    if (!m->cur) {
      dc_strlcpy(m->hap_err, "out of memory", sizeof m->hap_err);
    } else {
      m->pending++;
      engine_hold(a->e);
      if (a->rt->stats(a->rt, m->cur, AN_MAX_SERVERS, &m->ncur, hap_read_done, m, err) != 0)
        hap_read_done(m, err);
    }
  }
  for (size_t i = 0; i < a->spec->n; i++) {
    switch (a->spec->metrics[i].source) {
    case SRC_PROMETHEUS:
    case SRC_HTTP:
      fetch_metric(m, i);
      break;
    case SRC_PROBE:
      probe_metric(m, i);
      break;
    case SRC_HAPROXY:
      break;
    }
  }
  finish_one(m);
}

int analysis_measure(analysis *a, const analysis_sets *s, analysis_cb cb, void *payload, char *err) {
  if (a->cur) {
    dc_fmt(err, DC_ERR_MAX, "analysis: a measurement is under way already");
    return -1;
  }
  size_t n = a->spec->n;
  meas *m = calloc(1, sizeof *m);
  if (m) {
    m->res = calloc(n + 1, sizeof *m->res);
    m->subs = calloc(n + 1, sizeof *m->subs);
    m->skipped = calloc(n + 1, sizeof *m->skipped);
  }
  if (!m || !m->res || !m->subs || !m->skipped || sets_copy(&m->s, s) != 0) {
    if (m)
      meas_release(m, 0);
    dc_fmt(err, DC_ERR_MAX, "analysis: out of memory");
    return -1;
  }
  m->a = a;
  m->e = a->e;
  m->nmetrics = n;
  m->cb = cb;
  m->payload = payload;
  /* The new set takes no traffic yet (a blue-green before its switch):
   * HAProxy has nothing of it to count. */
  m->want_hap = wants_counters(a) && s->pct > 0;
  for (size_t i = 0; i < n; i++) {
    m->res[i].metric = &a->spec->metrics[i];
    m->res[i].value = NAN;
    m->subs[i].m = m;
    m->subs[i].i = i;
    m->skipped[i] = a->spec->metrics[i].source == SRC_HAPROXY && !m->want_hap;
  }
  a->cur = m;
  if (!a->snap_op || !m->want_hap)
    meas_begin(m);
  return 0;
}

int analysis_check_router(const analysis_spec *spec, const router *rt, const char *target, char *err) {
  for (size_t i = 0; spec && i < spec->n; i++) {
    if (spec->metrics[i].source != SRC_HAPROXY || rt->stats)
      continue;
    dc_fmt(err, DC_ERR_MAX,
           "deploy: analysis metric '%s' reads HAProxy's per-server counters, but target '%s' routes with %s, "
           "which keeps none (open-source nginx has no per-upstream counters): measure it with source "
           "'prometheus', 'probe' or 'http' there",
           spec->metrics[i].name, target, rt->kind);
    return -1;
  }
  return 0;
}
