#include "view.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "instset.h"
#include "json.h"
#include "util.h"

int view_is_analysis(const char *kind) { return kind && strstr(kind, "analysis") != NULL; }

const char *view_analysis_verdict(const json_t *data) {
  static const char *const words[] = {"verdict", "result", "status", NULL};
  static const char *const flags[] = {"ok", "pass", "passed", "success", NULL};
  if (!json_is_object(data))
    return NULL;
  for (size_t i = 0; words[i]; i++) {
    const char *s = json_string_value(json_object_get(data, words[i]));
    if (s && *s)
      return s;
  }
  for (size_t i = 0; flags[i]; i++) {
    json_t *b = json_object_get(data, flags[i]);
    if (json_is_boolean(b))
      return json_is_true(b) ? "pass" : "fail";
  }
  return NULL;
}

static const char *detail_of(const json_t *data) {
  static const char *const keys[] = {"reason", "detail", "message", "error", NULL};
  for (size_t i = 0; keys[i]; i++) {
    const char *s = json_string_value(json_object_get(data, keys[i]));
    if (s && *s)
      return s;
  }
  return NULL;
}

static json_t *iso(double t) {
  char buf[40];
  if (t <= 0)
    return json_null();
  dc_iso8601(t, buf, sizeof buf);
  return json_string(buf);
}

static json_t *str_or_null(const char *s) { return s && *s ? dc_json_text(s) : json_null(); }

static json_t *parse_data(const store_event *ev) {
  if (!ev->data)
    return NULL;
  return json_loads(ev->data, 0, NULL);
}

static double num(const json_t *data, const char *key, double dflt) {
  json_t *v = json_object_get(data, key);
  return json_is_number(v) ? json_number_value(v) : dflt;
}

/* ---- the rollout under way, from its events ---- */

typedef struct run_facts {
  double pct;
  int step, steps;
  int paused;
  double paused_at_pct, paused_since, paused_total;
  int aborting;
  char abort_reason[256];
  char health[64];
  char last_event[48];
  double last_ts;
  json_t *analysis;        /* owned */
} run_facts;

static void read_events(const store_event *evs, size_t n, run_facts *f) {
  for (size_t i = 0; i < n; i++) {
    const store_event *ev = &evs[i];
    json_t *data = parse_data(ev);
    dc_strlcpy(f->last_event, ev->kind, sizeof f->last_event);
    f->last_ts = ev->ts;
    if (strcmp(ev->kind, "traffic") == 0) {
      f->pct = num(data, "pct", f->pct);
      f->step = (int)num(data, "step", f->step);
      f->steps = (int)num(data, "steps", f->steps);
    } else if (strcmp(ev->kind, "paused") == 0) {
      f->paused = 1;
      f->paused_since = ev->ts;
      f->paused_at_pct = num(data, "pct", f->pct);
    } else if (strcmp(ev->kind, "resumed") == 0) {
      if (f->paused)
        f->paused_total += ev->ts - f->paused_since;
      f->paused = 0;
    } else if (strcmp(ev->kind, "healthy") == 0 || strcmp(ev->kind, "verified") == 0) {
      dc_strlcpy(f->health, "healthy", sizeof f->health);
    } else if (strcmp(ev->kind, "health_failed") == 0) {
      const char *st = json_string_value(json_object_get(data, "state"));
      dc_strlcpy(f->health, st ? st : "unhealthy", sizeof f->health);
    } else if (strcmp(ev->kind, "aborted") == 0) {
      f->aborting = 1;
      const char *why = json_string_value(json_object_get(data, "reason"));
      dc_strlcpy(f->abort_reason, why ? why : "", sizeof f->abort_reason);
    } else if (view_is_analysis(ev->kind)) {
      const char *verdict = view_analysis_verdict(data);
      if (verdict) {
        json_decref(f->analysis);
        const char *detail = detail_of(data);
        f->analysis = json_pack("{s:s, s:o, s:o, s:o, s:o}", "kind", ev->kind, "verdict", dc_json_text(verdict),
                                "detail", str_or_null(detail), "at", iso(ev->ts), "data",
                                data ? json_incref(data) : json_null());
      }
    }
    json_decref(data);
  }
}

/* ---- supervision, from the live deployment's events ---- */

typedef struct sup_facts {
  int restarts;
  int degraded;
  char reason[256];
  double last_restart;
} sup_facts;

static void read_supervision(const store_event *evs, size_t n, sup_facts *s) {
  for (size_t i = 0; i < n; i++) {
    const store_event *ev = &evs[i];
    if (strcmp(ev->kind, "instance_restarted") == 0) {
      s->restarts++;
      s->last_restart = ev->ts;
    } else if (strcmp(ev->kind, "degraded") == 0) {
      json_t *data = parse_data(ev);
      const char *why = json_string_value(json_object_get(data, "reason"));
      s->degraded = 1;
      dc_strlcpy(s->reason, why ? why : "", sizeof s->reason);
      json_decref(data);
    } else if (strcmp(ev->kind, "recovered") == 0) {
      s->degraded = 0;
      s->reason[0] = '\0';
    }
  }
}

/* ---- instances by version ---- */

static const char *role_of(const store_instance *in, const char *live, const char *running) {
  if (live && *live && strcmp(in->deployment_id, live) == 0 && strcmp(in->state, "stopping") != 0)
    return "live";
  if (running && *running && strcmp(in->deployment_id, running) == 0 && strcmp(in->state, "stopping") != 0)
    return "new";
  return "leaving";
}

static int instance_runs(const view_input *in, size_t i) {
  if (strcmp(in->instances[i].state, "stopped") == 0)
    return 0;
  if (in->alive)
    return in->alive[i] == INSTSET_ALIVE;
  return strcmp(in->instances[i].state, "running") == 0;
}

static json_t *count_instances(const view_input *in, const char *live, const char *running, int *total_running) {
  json_t *list = json_array();
  *total_running = 0;
  for (size_t i = 0; i < in->ninstances; i++) {
    const store_instance *r = &in->instances[i];
    if (strcmp(r->state, "stopped") == 0)
      continue;
    const char *role = role_of(r, live, running);
    int runs = instance_runs(in, i);
    *total_running += runs;
    json_t *entry = NULL;
    size_t k;
    json_t *e;
    json_array_foreach(list, k, e) {
      if (strcmp(json_string_value(json_object_get(e, "version")), r->version) == 0 &&
          strcmp(json_string_value(json_object_get(e, "role")), role) == 0)
        entry = e;
    }
    if (!entry) {
      entry = json_pack("{s:s, s:s, s:i, s:i}", "version", r->version, "role", role, "running", 0, "total", 0);
      json_array_append_new(list, entry);
    }
    json_object_set_new(entry, "running", json_integer(json_integer_value(json_object_get(entry, "running")) + runs));
    json_object_set_new(entry, "total", json_integer(json_integer_value(json_object_get(entry, "total")) + 1));
  }
  return list;
}

static json_t *deployment_json(const store_deployment *d) {
  json_t *errors = d->errors ? json_loads(d->errors, 0, NULL) : NULL;
  return json_pack("{s:s, s:s, s:o, s:s, s:s, s:s, s:o, s:o, s:o, s:o}", "id", d->id, "version", d->version, "from",
                   str_or_null(d->from_version), "kind", d->kind, "strategy", d->strategy, "status", d->status,
                   "created_at", iso(d->created_at), "finished_at", iso(d->finished_at), "duration",
                   dc_json_number(dc_round_ms(d->duration)), "errors", errors ? errors : json_null());
}

static json_t *lock_json(const store_lock *l) {
  return json_pack("{s:s, s:s, s:i, s:s, s:o, s:o}", "holder", l->deployment_id, "purpose", l->purpose, "pid", l->pid,
                   "host", l->host, "since", iso(l->acquired_at), "until", iso(l->expires_at));
}

static const char *first_error(const store_deployment *d, char *buf, size_t size) {
  buf[0] = '\0';
  json_t *errors = d && d->errors ? json_loads(d->errors, 0, NULL) : NULL;
  const char *s = json_string_value(json_array_get(errors, 0));
  if (s) {
    /* The first line: errors may carry a traceback. */
    size_t n = strcspn(s, "\n");
    dc_fmt(buf, size, "%.*s", (int)(n < 200 ? n : 200), s);
  }
  json_decref(errors);
  return buf;
}

static void pct_text(char *buf, size_t size, double pct) {
  if (pct == floor(pct))
    dc_fmt(buf, size, "%.0f", pct);
  else
    dc_fmt(buf, size, "%g", pct);
}

json_t *view_build(const view_input *in) {
  const store_target *row = in->row;
  const store_deployment *newest = in->newest;
  const char *current = row ? row->current_version : "";
  const char *live = row ? row->live_deployment : "";
  int running = newest && strcmp(newest->status, "running") == 0;
  run_facts f = {0};
  if (newest)
    read_events(in->events, in->nevents, &f);
  sup_facts sup = {0};
  if (live[0] && newest && strcmp(newest->id, live) == 0)
    read_supervision(in->events, in->nevents, &sup);
  else
    read_supervision(in->live_events, in->nlive_events, &sup);
  int nrunning = 0;
  json_t *counts = count_instances(in, live, running ? newest->id : NULL, &nrunning);

  /* The specification's status and health, with their meaning: a target
   * whose rollout failed but whose old version still serves is deployed
   * (the failure is in last_deployment), not failed. */
  const char *status = row ? row->status : "deployed";
  if (strcmp(status, "failed") == 0 && current[0])
    status = "deployed";
  if (running)
    status = strcmp(newest->kind, "rollback") == 0 ? "rolling_back" : "running";
  const char *health = in->health ? in->health : row ? row->health : "unhealthy";
  if (sup.degraded && strcmp(health, "healthy") == 0)
    health = "degraded";

  const char *state;
  char summary[512], err1[256], pct[32];
  const store_deployment *last = newest && !running ? newest : NULL;
  if (!current[0] && !newest) {
    state = "never_deployed";
    dc_fmt(summary, sizeof summary, "never deployed");
  } else if (running) {
    pct_text(pct, sizeof pct, f.paused ? f.paused_at_pct : f.pct);
    if (f.aborting) {
      state = "rolling_back";
      dc_fmt(summary, sizeof summary, "rolling back from %s to %s: %s", newest->version,
             current[0] ? current : "nothing", f.abort_reason[0] ? f.abort_reason : "aborted");
    } else if (f.paused) {
      state = "paused";
      dc_fmt(summary, sizeof summary, "paused at %s %%, waiting for promote", pct);
    } else if (strcmp(newest->kind, "rollback") == 0) {
      state = "rolling_back";
      dc_fmt(summary, sizeof summary, "rolling back to %s (%s)", newest->version, newest->strategy);
    } else {
      state = "progressing";
      if (f.steps > 0)
        dc_fmt(summary, sizeof summary, "%s of %s at %s %% (step %d/%d)%s%s%s", newest->strategy, newest->version,
               pct, f.step, f.steps, current[0] ? ", " : "", current[0] ? current : "",
               current[0] ? " serving the rest" : "");
      else
        dc_fmt(summary, sizeof summary, "%s of %s: starting (%s)", newest->strategy, newest->version,
               f.last_event[0] ? f.last_event : "begun");
    }
  } else if (!current[0] && strcmp(newest->status, "succeeded") == 0) {
    /* A deployment to nothing that succeeded: the target was stopped on
     * purpose (a GitOps prune), not broken. */
    state = "stopped";
    dc_fmt(summary, sizeof summary, "stopped (%s, %s): nothing serves, as asked", newest->strategy, newest->id);
  } else if (!current[0]) {
    state = "failed";
    dc_fmt(summary, sizeof summary, "nothing serves: the deployment of %s %s: %s", newest->version,
           strcmp(newest->status, "interrupted") == 0 ? "was interrupted" : "failed",
           first_error(newest, err1, sizeof err1));
  } else {
    if (sup.degraded) {
      state = "degraded";
      dc_fmt(summary, sizeof summary, "serving %s, degraded: %s", current, sup.reason);
    } else if (strcmp(health, "healthy") == 0) {
      state = "healthy";
      dc_fmt(summary, sizeof summary, "serving %s on %d instance%s, healthy", current, nrunning,
             nrunning == 1 ? "" : "s");
    } else {
      state = strcmp(health, "degraded") == 0 ? "degraded" : "unhealthy";
      dc_fmt(summary, sizeof summary, "serving %s, %s (%d instance%s running)", current, health, nrunning,
             nrunning == 1 ? "" : "s");
    }
    if (last && strcmp(last->status, "succeeded") != 0 && strcmp(last->version, current) != 0) {
      size_t len = strlen(summary);
      dc_fmt(summary + len, sizeof summary - len, "; the last deployment (%s, %s) %s: %s", last->version, last->id,
             last->status, first_error(last, err1, sizeof err1));
    }
  }

  json_t *v = json_object();
  json_object_set_new(v, "target", json_string(in->target));
  json_object_set_new(v, "current_version", str_or_null(current));
  json_object_set_new(v, "status", json_string(status));
  json_object_set_new(v, "health", json_string(health));
  json_object_set_new(v, "instances", json_integer(nrunning));
  json_object_set_new(v, "state", json_string(state));
  json_object_set_new(v, "summary", dc_json_text(summary));
  json_object_set_new(v, "instances_by_version", counts);
  if (running) {
    double elapsed = in->now - newest->created_at;
    json_t *ro = json_pack("{s:s, s:s, s:o, s:s, s:s, s:o, s:o, s:o, s:i, s:i, s:b, s:o, s:o, s:o, s:o, s:b, s:o}",
                           "id", newest->id, "version", newest->version, "from", str_or_null(newest->from_version),
                           "kind", newest->kind, "strategy", newest->strategy, "started_at", iso(newest->created_at),
                           "elapsed", dc_json_number(dc_round_ms(elapsed > 0 ? elapsed : 0)), "pct",
                           dc_json_number(f.paused ? f.paused_at_pct : f.pct), "step", f.step, "steps", f.steps,
                           "paused", f.paused, "paused_at", f.paused ? iso(f.paused_since) : json_null(), "paused_for",
                           dc_json_number(f.paused ? dc_round_ms(in->now - f.paused_since) : 0), "paused_total",
                           dc_json_number(dc_round_ms(f.paused_total + (f.paused ? in->now - f.paused_since : 0))),
                           "health", str_or_null(f.health), "aborting", f.aborting, "last_event",
                           str_or_null(f.last_event));
    json_object_set_new(v, "rollout", ro);
  } else {
    json_object_set_new(v, "rollout", json_null());
  }
  json_object_set_new(v, "last_deployment", last ? deployment_json(last) : json_null());
  json_object_set_new(v, "analysis", f.analysis ? f.analysis : json_null());
  json_object_set_new(v, "supervision",
                      json_pack("{s:o, s:i, s:b, s:o, s:o}", "restart", str_or_null(in->restart), "restarts",
                                sup.restarts, "degraded", sup.degraded, "reason", str_or_null(sup.reason),
                                "last_restart_at", iso(sup.last_restart)));
  json_object_set_new(v, "lock", in->lock ? lock_json(in->lock) : json_null());
  /* As get_status has it (deployctl maintenance): absent, or who turned
   * it on, when, and what the router answers meanwhile. */
  if (row && row->maintenance) {
    json_object_set_new(v, "maintenance",
                        json_pack("{s:o, s:i, s:o, s:s}", "message", str_or_null(row->maintenance_message),
                                  "retry_after", row->maintenance_retry_after, "since", iso(row->maintenance_since),
                                  "by", row->maintenance_by));
  } /* absent when off, as get_status has it */
  return v;
}
