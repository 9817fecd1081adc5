/* /metrics: the Prometheus text format (version 0.0.4), every name
 * prefixed deployctl_, made from serve's views and counters (README
 * "Metrics" lists each with its labels). Label values are escaped as the
 * format says: backslash, double quote and newline. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve_int.h"
#include "util.h"

static void label(dc_buf *b, const char *v) {
  for (const char *p = v ? v : ""; *p; p++) {
    if (*p == '\\' || *p == '"')
      dc_buf_printf(b, "\\%c", *p);
    else if (*p == '\n')
      dc_buf_puts(b, "\\n");
    else
      dc_buf_add(b, p, 1);
  }
}

static void head(dc_buf *b, const char *name, const char *type, const char *help) {
  dc_buf_printf(b, "# HELP deployctl_%s %s\n# TYPE deployctl_%s %s\n", name, help, name, type);
}

/* deployctl_NAME{target="t"[,k="v"]} value */
static void sample(dc_buf *b, const char *name, const char *target, const char *k, const char *v, double value) {
  dc_buf_printf(b, "deployctl_%s{target=\"", name);
  label(b, target);
  if (k) {
    dc_buf_printf(b, "\",%s=\"", k);
    label(b, v);
  }
  dc_buf_printf(b, "\"} %.17g\n", value);
}

static const char *str(const json_t *o, const char *k) { return json_string_value(json_object_get(o, k)); }
static double num(const json_t *o, const char *k) {
  json_t *v = json_object_get(o, k);
  return json_is_number(v) ? json_number_value(v) : 0;
}

static const char *const states[] = {"never_deployed", "stopped", "healthy", "progressing", "paused", "rolling_back",
                                     "degraded",       "unhealthy", "failed", NULL};
static const char *const results[] = {"succeeded", "failed", "interrupted"};

char *serve_metrics_text(serve *s) {
  dc_buf b = {0};
  head(&b, "live_version_info", "gauge", "The version a target serves (1 for the live one).");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *v = s->targets[i].view;
    const char *cur = str(v, "current_version");
    if (cur)
      sample(&b, "live_version_info", s->targets[i].t->name, "version", cur, 1);
  }
  head(&b, "rollout_share_percent", "gauge",
       "Share of traffic of the version being rolled out (0 when no rollout runs).");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *ro = json_object_get(s->targets[i].view, "rollout");
    sample(&b, "rollout_share_percent", s->targets[i].t->name, NULL, NULL, json_is_object(ro) ? num(ro, "pct") : 0);
  }
  head(&b, "rollout_step", "gauge", "Step of the rollout under way (0 when none).");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *ro = json_object_get(s->targets[i].view, "rollout");
    sample(&b, "rollout_step", s->targets[i].t->name, NULL, NULL, json_is_object(ro) ? num(ro, "step") : 0);
  }
  head(&b, "target_state", "gauge", "The target's state: 1 for the one it is in (phase of a rollout included).");
  for (size_t i = 0; i < s->n; i++) {
    const char *st = str(s->targets[i].view, "state");
    for (size_t k = 0; states[k]; k++)
      sample(&b, "target_state", s->targets[i].t->name, "state", states[k], st && strcmp(st, states[k]) == 0);
  }
  head(&b, "target_healthy", "gauge", "1 when the target's live version is healthy.");
  for (size_t i = 0; i < s->n; i++) {
    const char *h = str(s->targets[i].view, "health");
    sample(&b, "target_healthy", s->targets[i].t->name, NULL, NULL, h && strcmp(h, "healthy") == 0);
  }
  head(&b, "instances", "gauge", "Instances that run, by version and role (live, new, leaving).");
  for (size_t i = 0; i < s->n; i++) {
    size_t k;
    json_t *e;
    json_array_foreach(json_object_get(s->targets[i].view, "instances_by_version"), k, e) {
      dc_buf_puts(&b, "deployctl_instances{target=\"");
      label(&b, s->targets[i].t->name);
      dc_buf_puts(&b, "\",version=\"");
      label(&b, str(e, "version"));
      dc_buf_puts(&b, "\",role=\"");
      label(&b, str(e, "role"));
      dc_buf_printf(&b, "\"} %g\n", num(e, "running"));
    }
  }
  head(&b, "lock_held", "gauge", "1 while a deployment or a reconcile holds the target's lock.");
  for (size_t i = 0; i < s->n; i++)
    sample(&b, "lock_held", s->targets[i].t->name, NULL, NULL, json_is_object(json_object_get(s->targets[i].view, "lock")));
  head(&b, "deployments_total", "counter", "Deployments that ended, by result (from the history).");
  for (size_t i = 0; i < s->n; i++)
    for (int k = 0; k < 3; k++)
      sample(&b, "deployments_total", s->targets[i].t->name, "result", results[k], (double)s->targets[i].results[k]);
  head(&b, "rollout_duration_seconds", "histogram", "How long deployments took, start to end.");
  for (size_t i = 0; i < s->n; i++) {
    const serve_target *st = &s->targets[i];
    for (int k = 0; k < SERVE_NBUCKETS; k++) {
      dc_buf_puts(&b, "deployctl_rollout_duration_seconds_bucket{target=\"");
      label(&b, st->t->name);
      dc_buf_printf(&b, "\",le=\"%g\"} %ld\n", serve_buckets[k], st->buckets[k]);
    }
    dc_buf_puts(&b, "deployctl_rollout_duration_seconds_bucket{target=\"");
    label(&b, st->t->name);
    dc_buf_printf(&b, "\",le=\"+Inf\"} %ld\n", st->durations_count);
    sample(&b, "rollout_duration_seconds_sum", st->t->name, NULL, NULL, st->durations_sum);
    sample(&b, "rollout_duration_seconds_count", st->t->name, NULL, NULL, (double)st->durations_count);
  }
  head(&b, "rollout_elapsed_seconds", "gauge", "Seconds since the rollout under way began (0 when none).");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *ro = json_object_get(s->targets[i].view, "rollout");
    sample(&b, "rollout_elapsed_seconds", s->targets[i].t->name, NULL, NULL, json_is_object(ro) ? num(ro, "elapsed") : 0);
  }
  head(&b, "rollout_paused", "gauge", "1 while the rollout under way waits for promote.");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *ro = json_object_get(s->targets[i].view, "rollout");
    sample(&b, "rollout_paused", s->targets[i].t->name, NULL, NULL,
           json_is_object(ro) && json_is_true(json_object_get(ro, "paused")));
  }
  head(&b, "rollout_pause_seconds", "gauge", "Seconds the rollout under way has spent paused, in all.");
  for (size_t i = 0; i < s->n; i++) {
    const json_t *ro = json_object_get(s->targets[i].view, "rollout");
    sample(&b, "rollout_pause_seconds", s->targets[i].t->name, NULL, NULL,
           json_is_object(ro) ? num(ro, "paused_total") : 0);
  }
  head(&b, "health_check_failures_total", "counter", "Failed health checks during rollouts, since serve started.");
  for (size_t i = 0; i < s->n; i++)
    sample(&b, "health_check_failures_total", s->targets[i].t->name, NULL, NULL, (double)s->targets[i].health_failures);
  head(&b, "analysis_verdicts_total", "counter", "Analysis verdicts of rollouts, by verdict, since serve started.");
  for (size_t i = 0; i < s->n; i++) {
    const char *verdict;
    json_t *n;
    int any = 0;
    json_object_foreach(s->targets[i].verdicts, verdict, n) {
      sample(&b, "analysis_verdicts_total", s->targets[i].t->name, "verdict", verdict, (double)json_integer_value(n));
      any = 1;
    }
    if (!any) {
      sample(&b, "analysis_verdicts_total", s->targets[i].t->name, "verdict", "pass", 0);
      sample(&b, "analysis_verdicts_total", s->targets[i].t->name, "verdict", "fail", 0);
    }
  }
  head(&b, "instance_restarts_total", "counter", "Live instances restarted by supervision, since serve started.");
  for (size_t i = 0; i < s->n; i++)
    sample(&b, "instance_restarts_total", s->targets[i].t->name, NULL, NULL,
           (double)supervise_restarts(s->sv, s->targets[i].t->name));
  head(&b, "target_degraded", "gauge", "1 when supervision gave up on the live version (it cannot stay up).");
  for (size_t i = 0; i < s->n; i++)
    sample(&b, "target_degraded", s->targets[i].t->name, NULL, NULL,
           json_is_true(json_object_get(json_object_get(s->targets[i].view, "supervision"), "degraded")));
  static const char *const hook_results[HOOK_RESULTS] = {"accepted", "ignored", "unauthorized", "replayed", "bad"};
  static const char *const hook_kinds[HOOK_KINDS] = {"github", "gitlab", "generic"};
  head(&b, "webhooks_total", "counter", "Push webhooks received, by source and result.");
  for (int k = 0; k < HOOK_KINDS; k++)
    for (int r = 0; r < HOOK_RESULTS; r++)
      dc_buf_printf(&b, "deployctl_webhooks_total{source=\"%s\",result=\"%s\"} %ld\n", hook_kinds[k], hook_results[r],
                    s->hooks[k][r]);
  head(&b, "http_requests_total", "counter", "HTTP requests served.");
  dc_buf_printf(&b, "deployctl_http_requests_total %ld\n", s->requests);
  if (b.oom) {
    dc_buf_free(&b);
    return NULL;
  }
  return dc_buf_take(&b);
}
