#include "webhook_hooks.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "outbox.h"
#include "util.h"

typedef struct job job;

struct webhook_hooks {
  engine *e;
  webhook_list list;
  int events_only;
  int has_events;
  int pre_done;            /* pre-rollout ran (it runs once per rollout) */
  int released;
  int jobs;                /* not freed yet: an ended one may wait for a health round */
  job *job;                /* the hook in progress */
  outbox *events;
  char version[129];       /* from the "started" event, for the event payloads */
  rollout_hooks vt;
};

/* One hook point's webhooks, called one after the other. */
struct job {
  webhook_hooks *w;
  rollout *r;
  hook_kind kind;
  double pct;
  rollout_health health;
  int has_reason;
  char reason[DC_ERR_MAX];
  rollout_hook_done done;
  size_t todo[WEBHOOK_MAX * 2];  /* indexes into w->list, in the order they run */
  size_t ntodo, at;
  webhook_call *call;
  const webhook *calling;        /* whom the call in flight asks */
  /* a gate's wait */
  int waiting;                   /* asked at least once, not answered 2xx yet */
  size_t ask_next;               /* the next rollback webhook to ask in this round */
  double since;
  long last_status;
  char last_detail[DC_ERR_MAX];
  engine_timer *timer;           /* the next round of asks, or the end of an aborted job */
  int watch;                     /* the new version's health is watched while the gate waits */
  int failures;                  /* unhealthy rounds in a row */
  engine_timer *health_timer;
  int health_out;                /* a health round in flight */
  int ended;
  int failed;                    /* after the outcome: the first failure, reported at the end */
  char err[DC_ERR_MAX];
};

static void hooks_maybe_free(webhook_hooks *w) {
  if (!w->released || w->jobs > 0)
    return;
  outbox_release(w->events);
  webhook_list_clear(&w->list);
  free(w);
}

static void job_free(job *j) {
  webhook_hooks *w = j->w;
  free(j);
  w->jobs--;
  hooks_maybe_free(w);
}

static const webhook *current(const job *j) { return &j->w->list.v[j->todo[j->at]]; }

static int after_outcome(hook_kind k) { return k == HOOK_ON_PROMOTE || k == HOOK_ON_ABORT || k == HOOK_ON_ROLLBACK; }

/* ---- what is sent, what is recorded ---- */

static json_t *payload(const job *j, const webhook *h) {
  const rollout *r = j->r;
  char ts[40];
  dc_iso8601(engine_now(j->w->e), ts, sizeof ts);
  const rollout_health *hl = &j->health;
  json_t *checks = json_pack("{s:s, s:i, s:i, s:o}", "state", hl->checked ? health_state_name(hl->state) : "unknown",
                             "ok", hl->ok, "checked", hl->checked, "detail", dc_json_text(hl->detail));
  double share = j->kind == HOOK_BEFORE_STEP ? rollout_share(r) : j->pct;
  json_t *p = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:s}", "webhook", h->name, "type",
                        webhook_type_name(h->type), "deployment", rollout_id(r), "target", rollout_target(r)->name,
                        "version", rollout_version(r), "from", rollout_from_version(r), "phase",
                        rollout_hook_name(j->kind), "share", dc_json_number(share), "checks", checks, "time", ts);
  if (!p)
    return NULL;
  if (j->kind == HOOK_BEFORE_STEP)
    json_object_set_new(p, "next_share", dc_json_number(j->pct));
  if (j->kind == HOOK_ON_PROMOTE || j->kind == HOOK_ON_ABORT)
    json_object_set_new(p, "success", json_boolean(j->kind == HOOK_ON_PROMOTE));
  if (j->has_reason)
    json_object_set_new(p, "reason", dc_json_text(j->reason));
  return p;
}

/* An event of the rollout's own (status, --json, the report show it). */
static void note(job *j, const char *kind, const webhook *h, const webhook_answer *a, json_t *extra) {
  char err[DC_ERR_MAX];
  json_t *ev = json_pack("{s:s, s:s, s:b, s:I, s:o}", "name", h->name, "type", webhook_type_name(h->type), "ok",
                         a->ok, "status", (json_int_t)a->status, "detail", dc_json_text(a->detail));
  if (!ev) {
    json_decref(extra);
    return;
  }
  if (a->attempts > 1)
    json_object_set_new(ev, "attempts", json_integer(a->attempts));
  if (extra)
    json_object_update(ev, extra);
  json_decref(extra);
  char *text = dc_json_dump(ev);
  json_decref(ev);
  if (text && rollout_log(j->r, kind, text, err) != 0)
    dc_strlcpy(err, "", sizeof err); /* an event too large to keep: the answer still counts */
  free(text);
}

/* ---- the end of a job ---- */

static void stop_waiting(job *j) {
  engine_timer_cancel(j->timer);
  j->timer = NULL;
  engine_timer_cancel(j->health_timer);
  j->health_timer = NULL;
  j->watch = 0;
  j->waiting = 0;
}

/* done runs last: it may start the next hook point at once. */
static void job_end(job *j, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  if (j->ended)
    return;
  j->ended = 1;
  stop_waiting(j);
  webhook_call_cancel(j->call);
  j->call = NULL;
  j->w->job = NULL;
  dc_strlcpy(msg, ok ? "" : err ? err : "failed", sizeof msg);
  rollout_hook_done done = j->done;
  rollout *r = j->r;
  if (!j->health_out)
    job_free(j);
  done(r, ok, ok ? NULL : msg);
}

/* ---- walking through the list ---- */

static void job_next(job *j);
static void ask_round(job *j);
static void ask_again(void *payload) { ask_round(payload); }

static void on_answer(void *payload, const webhook_answer *a);

static void start_call(job *j, const webhook *h, int retries) {
  char msg[DC_ERR_MAX];
  json_t *body = payload(j, h);
  j->calling = h;
  j->call = body ? webhook_call_start(j->w->e, h, webhook_type_name(h->type), body, retries, on_answer, j) : NULL;
  json_decref(body);
  if (!j->call) {
    dc_fmt(msg, sizeof msg, "webhook '%s' (%s) could not be sent: out of memory", h->name, webhook_type_name(h->type));
    job_end(j, 0, msg);
  }
}

static void health_tick(void *payload);

static void watch_health(job *j) {
  if (!j->watch || j->health_timer || j->health_out)
    return;
  j->health_timer = engine_timer_start(j->w->e, rollout_target(j->r)->health.interval, health_tick, j);
}

static void health_seen(void *payload, const rollout_health *h) {
  job *j = payload;
  char msg[DC_ERR_MAX];
  j->health_out = 0;
  if (j->ended) {
    job_free(j);
    return;
  }
  if (!j->watch)
    return;
  int ok = h->state == HEALTH_HEALTHY;
  j->failures = ok ? 0 : j->failures + 1;
  if (h->dead || j->failures >= rollout_target(j->r)->health.failure_threshold) {
    const webhook *g = current(j);
    dc_fmt(msg, sizeof msg, "unhealthy while webhook '%s' (%s) waited, after %d failed checks: %s", g->name,
           webhook_type_name(g->type), j->failures, h->detail);
    job_end(j, 0, msg);
    return;
  }
  watch_health(j);
}

static void health_tick(void *payload) {
  job *j = payload;
  j->health_timer = NULL;
  j->health_out = 1;
  rollout_check_health(j->r, health_seen, j);
}

static void gate_refused(job *j, const webhook *g, const webhook_answer *a) {
  /* One event when the wait begins and one each time the answer changes:
   * a gate asked every few seconds for an hour says so once. */
  if (!j->waiting || a->status != j->last_status || strcmp(a->detail, j->last_detail) != 0)
    note(j, "webhook_waiting", g, a, json_pack("{s:o}", "interval", dc_json_number(g->interval)));
  if (!j->waiting)
    j->since = engine_now(j->w->e);
  j->waiting = 1;
  j->last_status = a->status;
  dc_strlcpy(j->last_detail, a->detail, sizeof j->last_detail);
  j->ask_next = 0;
  j->timer = engine_timer_start(j->w->e, g->interval, ask_again, j);
  watch_health(j);
}

static void on_answer(void *payload, const webhook_answer *a) {
  job *j = payload;
  char msg[DC_ERR_MAX];
  const webhook *h = j->calling;
  j->call = NULL;
  if (h->type == WEBHOOK_ROLLBACK) {
    if (a->ok) {
      note(j, "webhook", h, a, json_pack("{s:b}", "rollback", 1));
      dc_fmt(msg, sizeof msg, "webhook '%s' (rollback) asked for a rollback (%s)", h->name, a->detail);
      job_end(j, 0, msg);
    } else if (webhook_is_gate(current(j)->type)) {
      ask_round(j); /* the next rollback webhook, then the gate */
    } else {
      j->at++;
      job_next(j);
    }
    return;
  }
  if (webhook_is_gate(h->type)) {
    if (!a->ok) {
      gate_refused(j, h, a);
      return;
    }
    double waited = j->waiting ? engine_now(j->w->e) - j->since : 0;
    stop_waiting(j);
    note(j, "webhook", h, a, json_pack("{s:o}", "waited", dc_json_number(dc_round_ms(waited))));
    j->at++;
    job_next(j);
    return;
  }
  note(j, "webhook", h, a, NULL);
  if (!a->ok) {
    dc_fmt(msg, sizeof msg, "webhook '%s' (%s) failed after %d attempt%s: %s", h->name, webhook_type_name(h->type),
           a->attempts, a->attempts == 1 ? "" : "s", a->detail);
    if (!after_outcome(j->kind)) {
      job_end(j, 0, msg);
      return;
    }
    if (!j->failed) {
      j->failed = 1;
      dc_strlcpy(j->err, msg, sizeof j->err);
    }
  }
  j->at++;
  job_next(j);
}

/* One round of a gate: every rollback webhook (a 2xx from one rolls
 * back), then the gate itself. */
static void ask_round(job *j) {
  webhook_hooks *w = j->w;
  j->timer = NULL;
  while (j->ask_next < w->list.n && w->list.v[j->ask_next].type != WEBHOOK_ROLLBACK)
    j->ask_next++;
  if (j->ask_next < w->list.n) {
    start_call(j, &w->list.v[j->ask_next++], 0);
    return;
  }
  start_call(j, current(j), 0);
}

static void job_next(job *j) {
  if (j->at >= j->ntodo) {
    job_end(j, !j->failed, j->failed ? j->err : NULL);
    return;
  }
  const webhook *h = current(j);
  if (webhook_is_gate(h->type)) {
    j->waiting = 0;
    j->failures = 0;
    j->ask_next = 0;
    /* Once instances of the new version run, a gate must not hold a
     * version that is failing meanwhile. */
    j->watch = j->kind == HOOK_BEFORE_STEP || j->kind == HOOK_BEFORE_PROMOTE;
    ask_round(j);
    return;
  }
  start_call(j, h, h->type == WEBHOOK_ROLLBACK ? 0 : h->retries);
}

/* ---- the rollout's side ---- */

static void add_type(job *j, webhook_type t) {
  const webhook_list *l = &j->w->list;
  for (size_t i = 0; i < l->n; i++)
    if (l->v[i].type == t)
      j->todo[j->ntodo++] = i;
}

static int has_type(const webhook_hooks *w, webhook_type t) {
  for (size_t i = 0; i < w->list.n; i++)
    if (w->list.v[i].type == t)
      return 1;
  return 0;
}

static void choose(job *j) {
  webhook_hooks *w = j->w;
  switch (j->kind) {
  case HOOK_BEFORE_DEPLOY:
    add_type(j, WEBHOOK_CONFIRM_ROLLOUT);
    return;
  case HOOK_BEFORE_STEP:
    if (!w->pre_done && j->pct > 0 && has_type(w, WEBHOOK_PRE_ROLLOUT)) {
      w->pre_done = 1;
      add_type(j, WEBHOOK_PRE_ROLLOUT);
    }
    if (j->pct > rollout_share(j->r))
      add_type(j, WEBHOOK_CONFIRM_TRAFFIC_INCREASE);
    return;
  case HOOK_ANALYSIS:
    add_type(j, WEBHOOK_ROLLOUT);
    add_type(j, WEBHOOK_ROLLBACK);
    return;
  case HOOK_BEFORE_PROMOTE:
    add_type(j, WEBHOOK_CONFIRM_PROMOTION);
    return;
  case HOOK_ON_PROMOTE:
  case HOOK_ON_ABORT:
    add_type(j, WEBHOOK_POST_ROLLOUT);
    return;
  default:
    return;
  }
}

static int hooks_run(void *payload, rollout *r, hook_kind kind, double pct, const rollout_health *health,
                     const char *reason, rollout_hook_done done) {
  webhook_hooks *w = payload;
  if (w->events_only || w->job)
    return 0;
  job *j = calloc(1, sizeof *j);
  if (!j)
    return 0;
  j->w = w;
  j->r = r;
  j->kind = kind;
  j->pct = pct;
  if (health)
    j->health = *health;
  j->has_reason = reason != NULL;
  dc_strlcpy(j->reason, reason ? reason : "", sizeof j->reason);
  j->done = done;
  choose(j);
  if (j->ntodo == 0) {
    free(j);
    return 0;
  }
  w->job = j;
  w->jobs++;
  job_next(j);
  return 1;
}

static void end_aborted(void *payload) {
  job *j = payload;
  char msg[DC_ERR_MAX];
  j->timer = NULL;
  const webhook *h = current(j);
  dc_fmt(msg, sizeof msg, "aborted while webhook '%s' (%s) %s", h->name, webhook_type_name(h->type),
         j->waiting ? "waited for a 2xx answer" : "was called");
  job_end(j, 0, msg);
}

/* An abort ends what the job waits for at once (from the loop: done is
 * never called inside rollout_abort). */
static void hooks_abort(void *payload, rollout *r) {
  webhook_hooks *w = payload;
  job *j = w->job;
  (void)r;
  if (!j || j->ended || after_outcome(j->kind))
    return;
  stop_waiting(j);
  webhook_call_cancel(j->call);
  j->call = NULL;
  j->timer = engine_timer_start(w->e, 0, end_aborted, j);
}

/* ---- events ---- */

void webhook_hooks_event(webhook_hooks *w, const store_event *ev) {
  if (!w || !w->has_events)
    return;
  char ts[40], what[128], why[DC_ERR_MAX];
  json_t *data = ev->data ? dc_json_parse(ev->data, strlen(ev->data), why, sizeof why) : NULL;
  if (strcmp(ev->kind, "started") == 0 && json_is_string(json_object_get(data, "version")))
    dc_strlcpy(w->version, json_string_value(json_object_get(data, "version")), sizeof w->version);
  dc_iso8601(ev->ts, ts, sizeof ts);
  for (size_t i = 0; i < w->list.n; i++) {
    const webhook *h = &w->list.v[i];
    if (h->type != WEBHOOK_EVENT)
      continue;
    json_t *body = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:{s:s, s:s, s:O?}}", "webhook", h->name, "type",
                             "event", "deployment", ev->deployment_id, "target", ev->target, "version", w->version,
                             "phase", "event", "event", "kind", ev->kind, "time", ts, "data", data);
    dc_fmt(what, sizeof what, "event webhook '%s'", h->name);
    outbox_post(w->events, h, "event", body, what);
  }
  json_decref(data);
}

/* ---- life ---- */

webhook_hooks *webhook_hooks_new(engine *e, const webhook_list *l, int events_only) {
  if (!l || l->n == 0)
    return NULL;
  webhook_hooks *w = calloc(1, sizeof *w);
  if (!w)
    return NULL;
  w->e = e;
  w->events_only = events_only;
  if (webhook_list_copy(&w->list, l) != 0) {
    free(w);
    return NULL;
  }
  w->has_events = has_type(w, WEBHOOK_EVENT);
  if (w->has_events && !(w->events = outbox_new(e))) {
    webhook_list_clear(&w->list);
    free(w);
    return NULL;
  }
  w->vt.run = hooks_run;
  w->vt.abort = hooks_abort;
  w->vt.payload = w;
  return w;
}

const rollout_hooks *webhook_hooks_vtable(webhook_hooks *w) { return w ? &w->vt : NULL; }

void webhook_hooks_release(webhook_hooks *w) {
  if (!w)
    return;
  w->released = 1;
  hooks_maybe_free(w);
}
