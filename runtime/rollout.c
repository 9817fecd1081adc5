#include "rollout.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "analysis.h"
#include "instset.h"
#include "json.h"

enum monitor_mode {
  MON_NONE,
  MON_HEALTHY, /* until every new instance is healthy, or start_timeout */
  MON_GATED,   /* for a duration; failure_threshold consecutive failures fail */
  MON_VERIFY,  /* until one healthy round; failure_threshold failures fail */
};

struct rollout {
  engine *e;
  store *s;                /* a reference of ours */
  target_config *t;
  strategy *st;
  record rc;
  char version[129];
  char from_version[129];
  char kind[16];
  char strategy_name[64];
  char *metadata;
  double started;
  rollout_done_cb done;
  void *done_payload;
  strategy_run run;
  int recorded;            /* the deployment row and lock are committed */
  int locked;

  instset old;             /* the live set: serves until promotion */
  instset fresh;           /* the new version's instances */
  instset strays;          /* leftovers of earlier runs: stopped at the end */

  int abort_requested;
  char abort_reason[DC_ERR_MAX];
  int ending;              /* promote or abort under way */

  /* the action in progress */
  strategy_action act;
  rollout_action_cb act_cb;
  void *act_payload;
  int act_ok;
  char act_err[DC_ERR_MAX];
  engine_timer *timer;

  /* health monitoring */
  enum monitor_mode mon;
  double mon_deadline;
  /* MON_HEALTHY on the virtual clock with instances that start in real
   * time: the engine is held and rounds run on real timers until they are
   * up (real_deadline: wall seconds). */
  int real_wait;
  double real_deadline;
  int mon_failures;
  rollout_health health;
  rollout_health_cb health_cb;
  void *health_payload;
  int rounds;              /* health rounds in flight */
  /* the last liveness answer, reused for provider->inspect_every */
  int alive_seen;
  uint64_t alive_at;       /* uv_now ms */
  size_t alive_n;          /* new instances it covered */
  size_t alive_dead;
  char alive_detail[DC_ERR_MAX];
  int freed_later;         /* ended; free when the last round comes back */

  int promoted;
  void (*after_healthy)(rollout *r); /* instead of completing WAIT_HEALTHY */
  double ratio_pct;                  /* router "none": the share being reached */

  /* hooks: the webhooks', then the user's (hook_stage counts through them) */
  const rollout_hooks *hooks;
  const rollout_hooks *webhook_hooks;
  const rollout_hooks *hook_running;
  void (*hook_next)(rollout *r, int ok, const char *err);
  hook_kind hook_kind;
  double hook_pct;
  int hook_stage, hook_failed, has_hook_reason;
  char hook_reason[DC_ERR_MAX];
  char hook_err[DC_ERR_MAX];
  double abort_pct;        /* the new version's share when the abort began */

  /* operator commands */
  store_watch *watch;
  int paused;
  int promote_pending;     /* a promote that came while no wait was on */
  int lease_lost;

  /* boot waves: the rows of a START not started yet, a wave at a time */
  instset waves;
  size_t wave_next;        /* first row of waves of the next wave */
  int wave, nwaves;
  size_t wave_rows;        /* rows per wave */
  void (*after_start)(rollout *r); /* after_healthy of the START as a whole */

  /* preflight */
  int preflight_pending;
  char preflight_err[DC_ERR_MAX];
  router_server probe;     /* the router's read needs somewhere to write */
  size_t nprobe;

  /* analysis (analysis.h), measured during every gated wait (a hold) */
  const analysis_spec *an_spec;       /* the strategy's, else the target's; NULL: none */
  analysis *an;
  const analysis_spec *an_made_for;   /* the spec an was made for */
  int *an_failures;                   /* failed measurements per metric, over the rollout */
  engine_timer *an_timer;             /* the next measurement of this hold */
  int an_running;                     /* a measurement is in flight */
  int an_final;                       /* the hold's time is up: it passes when this one does */
  int an_paused;                      /* an inconclusive verdict waits for an operator */
  int an_passed;                      /* passed while a health round was out: the round ends the hold */
  char an_failed[DC_ERR_MAX];         /* failed while a health round was out: the same */

  int routed_new;          /* the router once gave the new version traffic */
  int tested;              /* testers' route set up (once the new version is healthy) */
  route_rules maintenance; /* the target's maintenance as the lock was taken (its fields only) */
  int abort_attempts;      /* router applies tried while aborting */
  rollout *next_active, *prev_active;
};

static void run_step(rollout *r);
static void end_rollout(rollout *r);
static void complete(rollout *r, int ok, const char *err);
static void step_passed(rollout *r);
static void act_abort(rollout *r, const char *reason);

static const char *const hook_names[HOOK_COUNT] = {"before_deploy",  "before_step", "after_step",
                                                   "analysis",       "before_promote", "on_promote",
                                                   "on_abort",       "on_rollback"};

const char *rollout_hook_name(hook_kind k) { return k < HOOK_COUNT ? hook_names[k] : "hook"; }
const char *rollout_id(const rollout *r) { return r->rc.id; }
const char *rollout_version(const rollout *r) { return r->version; }
const char *rollout_from_version(const rollout *r) { return r->from_version; }
double rollout_share(const rollout *r) { return r->run.pct; }
const target_config *rollout_target(const rollout *r) { return r->t; }

/* ---- the running rollouts of this process (Ctrl-C aborts them all) ---- */

static rollout *active;

static void active_add(rollout *r) {
  dc_interrupt_owners++;
  r->next_active = active;
  if (active)
    active->prev_active = r;
  active = r;
}

static void active_remove(rollout *r) {
  dc_interrupt_owners--;
  if (r->prev_active)
    r->prev_active->next_active = r->next_active;
  else if (active == r)
    active = r->next_active;
  if (r->next_active)
    r->next_active->prev_active = r->prev_active;
  r->next_active = r->prev_active = NULL;
}

void rollout_abort_all(const char *reason) {
  for (rollout *r = active; r; r = r->next_active)
    rollout_abort(r, reason);
}

/* ---- events ---- */

static instset_ctx ctx_of(rollout *r) {
  instset_ctx c = {r->e, r->s, r->t, &r->rc};
  return c;
}

static void emit(rollout *r, const char *kind, json_t *data) { record_event(&r->rc, kind, data); }

int rollout_log(rollout *r, const char *kind, const char *data_json, char *err) {
  return record_event_text(&r->rc, kind, data_json, err);
}

/* ---- hooks ---- */

/* A hook that fails once the outcome is decided cannot change it. */
static void note_hook_failure(rollout *r, hook_kind k, const char *err) {
  emit(r, "hook_failed",
       json_pack("{s:s, s:o}", "hook", rollout_hook_name(k), "error", dc_json_text(err ? err : "failed")));
}

static int outcome_decided(hook_kind k) { return k == HOOK_ON_PROMOTE || k == HOOK_ON_ABORT || k == HOOK_ON_ROLLBACK; }

static void hook_stage(rollout *r);

/* Before the outcome the first failure decides, and the hooks after it do
 * not run; once it is decided, each failure is recorded and every hook
 * still runs. */
static void hook_stage_done(rollout *r, int ok, const char *err) {
  r->hook_running = NULL;
  if (ok) {
    hook_stage(r);
    return;
  }
  if (outcome_decided(r->hook_kind)) {
    note_hook_failure(r, r->hook_kind, err);
    hook_stage(r);
    return;
  }
  r->hook_failed = 1;
  dc_strlcpy(r->hook_err, err ? err : "failed", sizeof r->hook_err);
  r->hook_stage = 2;
  hook_stage(r);
}

static void hook_stage(rollout *r) {
  while (!r->hook_failed && r->hook_stage < 2) {
    const rollout_hooks *h = r->hook_stage++ == 0 ? r->webhook_hooks : r->hooks;
    if (!h || !h->run)
      continue;
    r->hook_running = h;
    if (h->run(h->payload, r, r->hook_kind, r->hook_pct, &r->health, r->has_hook_reason ? r->hook_reason : NULL,
               hook_stage_done))
      return;
    r->hook_running = NULL;
  }
  char err[DC_ERR_MAX];
  int ok = !r->hook_failed;
  dc_strlcpy(err, r->hook_err, sizeof err); /* next may start the next hook */
  void (*next)(rollout *, int, const char *) = r->hook_next;
  r->hook_next = NULL;
  next(r, ok, ok ? NULL : err);
}

/* Runs the webhooks and the user's hook of that kind, if there are any,
 * then next(ok, err). */
static void with_hook(rollout *r, hook_kind k, double pct, const char *reason,
                      void (*next)(rollout *r, int ok, const char *err)) {
  r->hook_next = next;
  r->hook_kind = k;
  r->hook_pct = pct;
  r->hook_stage = 0;
  r->hook_failed = 0;
  r->hook_err[0] = '\0';
  r->has_hook_reason = reason != NULL;
  dc_strlcpy(r->hook_reason, reason ? reason : "", sizeof r->hook_reason);
  hook_stage(r);
}

/* ---- completing an action, always from the loop ---- */

static void complete_now(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  rollout_action_cb cb = r->act_cb;
  r->act_cb = NULL;
  if (cb)
    cb(r->act_payload, r->act_ok, r->act_ok ? NULL : r->act_err);
}

static void an_stop(rollout *r);

/* Leaves a real-time wait for starting instances: the virtual clock may
 * move again. */
static void real_wait_end(rollout *r) {
  if (!r->real_wait)
    return;
  r->real_wait = 0;
  engine_release(r->e);
}

/* The outcome reaches the strategy at the next turn, after the handlers of
 * this turn's events ran: a handler that reacts to "traffic" (makes the
 * version unhealthy, samples the split) sees the step before the next one
 * starts, as it would if it ran inside the event. */
static void complete(rollout *r, int ok, const char *err) {
  an_stop(r);
  real_wait_end(r);
  r->after_healthy = NULL;
  r->act_ok = ok;
  if (!ok)
    dc_strlcpy(r->act_err, err ? err : "failed", sizeof r->act_err);
  r->mon = MON_NONE;
  r->paused = 0;
  if (engine_soon(r->e, complete_now, r) != 0)
    r->timer = engine_timer_start(r->e, 0, complete_now, r);
}

/* ---- operator commands ---- */

static json_t *pct_json(double pct, const char *command) {
  return command ? json_pack("{s:o, s:s}", "pct", dc_json_number(pct), "command", command)
                 : json_pack("{s:o}", "pct", dc_json_number(pct));
}

static void on_control(void *payload, const store_control *c) {
  rollout *r = payload;
  if (strcmp(c->command, "lease_lost") == 0) {
    /* Another runner holds the target now: not one more step from us. */
    r->lease_lost = 1;
    rollout_abort(r, "the lock's lease expired (database unreachable?) and another runner took the target over: "
                     "this runner stopped acting on it");
    return;
  }
  if (strcmp(c->command, "abort") == 0) {
    rollout_abort(r, r->paused ? "aborted by the operator (deployctl abort) during the pause"
                               : "aborted by the operator (deployctl abort)");
    return;
  }
  if (strcmp(c->command, "rollback") == 0) {
    /* While the rollout runs, the old set runs too: going back is the
     * abort's one router change. */
    char why[DC_ERR_MAX];
    dc_fmt(why, sizeof why,
           "rolled back by the operator (deployctl rollback) at %g %%: the instances of %s were still running, "
           "traffic went back to them in one router change",
           r->run.pct, r->from_version[0] ? r->from_version : "the old version");
    rollout_abort(r, why);
    return;
  }
  if (strcmp(c->command, "promote") != 0 || r->ending)
    return;
  if (r->paused) {
    r->paused = 0;
    emit(r, "resumed", pct_json(r->run.pct, "promote"));
    complete(r, 1, NULL);
  } else if (r->mon == MON_GATED && !r->health_cb) {
    /* No timer: an analysis pause on the virtual clock, or the hold's last
     * measurement in flight (step_passed ends it). */
    engine_timer_cancel(r->timer);
    r->timer = NULL;
    emit(r, "resumed", pct_json(r->run.pct, "promote"));
    step_passed(r);
  } else {
    r->promote_pending = 1; /* taken by the next pause or wait */
  }
}

static void act_pause(rollout *r) {
  emit(r, "paused", pct_json(r->run.pct, NULL));
  r->paused = 1;
  if (r->promote_pending) {
    r->promote_pending = 0;
    r->paused = 0;
    emit(r, "resumed", pct_json(r->run.pct, "promote"));
    complete(r, 1, NULL);
  }
}

/* ---- health rounds ---- */

typedef struct check_round {
  rollout *r;
  rollout_health_cb cb;      /* whoever asked for this round (rounds may overlap) */
  void *cb_payload;
  size_t n;
  size_t inspected;          /* new instances the liveness look covers */
  char **urls;
  char **nodes;              /* the host of each url's instance ("" this machine) */
  int waiting;               /* the health checks and the liveness look */
  size_t dead;
  char dead_detail[DC_ERR_MAX];
  health_result *results;
  size_t nresults;
} check_round;

static void round_free(check_round *rd) {
  for (size_t i = 0; i < rd->n; i++) {
    free(rd->urls[i]);
    free(rd->nodes ? rd->nodes[i] : NULL);
  }
  free(rd->urls);
  free(rd->nodes);
  for (size_t i = 0; i < rd->nresults; i++)
    free((char *)rd->results[i].url);
  free(rd->results);
  free(rd);
}

static void round_end(check_round *rd) {
  if (--rd->waiting > 0)
    return;
  rollout *r = rd->r;
  rollout_health *h = &r->health;
  memset(h, 0, sizeof *h);
  h->checked = (int)rd->nresults;
  for (size_t i = 0; i < rd->nresults; i++) {
    const health_result *res = &rd->results[i];
    if (res->ok)
      h->ok++;
    else if (res->status > 0)
      h->answered_bad = 1;
    const char *node = i < rd->n && rd->nodes && rd->nodes[i] ? rd->nodes[i] : "";
    if (!res->ok && !h->detail[0] && node[0])
      dc_fmt(h->detail, sizeof h->detail, "%s (host '%s'): %s", res->url, node, res->error);
    else if (!res->ok && !h->detail[0])
      dc_fmt(h->detail, sizeof h->detail, "%s: %s", res->url, res->error);
  }
  h->state = health_classify(rd->results, rd->nresults);
  if (rd->dead) {
    h->state = HEALTH_UNHEALTHY;
    h->dead = 1;
    dc_strlcpy(h->detail, rd->dead_detail, sizeof h->detail);
  }
  rollout_health_cb cb = rd->cb;
  void *payload = rd->cb_payload;
  round_free(rd);
  engine_release(r->e);
  r->rounds--;
  if (r->health_cb == cb && r->health_payload == payload)
    r->health_cb = NULL;
  if (cb)
    cb(payload, h);
  /* The rollout ended while this round was out (a hook's d:health()). */
  if (r->freed_later && r->rounds == 0)
    free(r);
}

static void round_checked(void *payload, const health_result *res, size_t n) {
  check_round *rd = payload;
  rd->results = calloc(n ? n : 1, sizeof *rd->results);
  for (size_t i = 0; rd->results && i < n; i++) {
    rd->results[i] = res[i];
    rd->results[i].url = strdup(res[i].url ? res[i].url : "health");
  }
  rd->nresults = rd->results ? n : 0;
  round_end(rd);
}

static void round_alive(void *payload, const unsigned char *alive, size_t dead, const char *detail) {
  check_round *rd = payload;
  rollout *r = rd->r;
  (void)alive;
  rd->dead = dead;
  dc_strlcpy(rd->dead_detail, detail ? detail : "", sizeof rd->dead_detail);
  r->alive_seen = 1;
  r->alive_at = uv_now(r->e->loop);
  r->alive_n = rd->inspected;
  r->alive_dead = dead;
  dc_strlcpy(r->alive_detail, rd->dead_detail, sizeof r->alive_detail);
  round_end(rd);
}

/* The last liveness answer still stands (see provider.inspect_every). */
static int alive_fresh(const rollout *r) {
  double every = r->t->provider->inspect_every;
  return every > 0 && r->alive_seen && r->alive_n == r->fresh.n &&
         uv_now(r->e->loop) - r->alive_at < (uint64_t)(every * 1000);
}

static int add_url(check_round *rd, size_t cap, char *url, const char *node) {
  char *n = strdup(node);
  if (!url || !n || rd->n >= cap) {
    free(url);
    free(n);
    return -1;
  }
  rd->nodes[rd->n] = n;
  rd->urls[rd->n++] = url;
  return 0;
}

void rollout_check_health(rollout *r, rollout_health_cb cb, void *payload) {
  char err[DC_ERR_MAX];
  check_round *rd = calloc(1, sizeof *rd);
  size_t cap = r->fresh.n * 2 + 1;
  if (rd) {
    rd->urls = calloc(cap, sizeof *rd->urls);
    rd->nodes = calloc(cap, sizeof *rd->nodes);
  }
  r->health_cb = cb;
  r->health_payload = payload;
  r->rounds++;
  engine_hold(r->e);
  if (!rd || !rd->urls || !rd->nodes) {
    if (rd) {
      free(rd->urls);
      free(rd->nodes);
    }
    free(rd);
    r->rounds--;
    engine_release(r->e);
    rollout_health h = {.state = HEALTH_UNHEALTHY, .detail = "health: out of memory"};
    r->health_cb = NULL;
    r->health = h;
    cb(payload, &r->health);
    return;
  }
  rd->r = r;
  rd->cb = cb;
  rd->cb_payload = payload;
  for (size_t i = 0; i < r->fresh.n; i++) {
    const store_instance *in = &r->fresh.v[i];
    add_url(rd, cap, target_instance_url(r->t, in), in->node);
    if (r->st && r->st->health_check_url[0]) {
      char port[16];
      dc_fmt(port, sizeof port, "%d", in->port);
      const char *pairs[] = {"host", in->host, "port", port, "target", r->t->name, "version", r->version, NULL};
      add_url(rd, cap, dc_expand_placeholders_dup(r->st->health_check_url, pairs), in->node);
    }
  }
  int look = !alive_fresh(r);
  rd->waiting = look ? 2 : 1;
  if (!look) {
    rd->dead = r->alive_dead;
    dc_strlcpy(rd->dead_detail, r->alive_detail, sizeof rd->dead_detail);
  }
  health_opts o = {.timeout = r->t->health.timeout, .expect_status = r->t->health.expect_status};
  if (health_check_start(r->e, (const char *const *)rd->urls, rd->n, &o, round_checked, rd, err) != 0) {
    health_result none;
    memset(&none, 0, sizeof none);
    none.url = "health";
    dc_strlcpy(none.error, err, sizeof none.error);
    round_checked(rd, &none, 1);
  }
  if (!look)
    return;
  rd->inspected = r->fresh.n;
  instset_ctx c = ctx_of(r);
  if (instset_inspect(&c, &r->fresh, round_alive, rd, err) != 0)
    round_alive(rd, NULL, 0, NULL);
}

/* ---- analysis during a hold ----
 *
 * A gated wait (ACTION_WAIT) is a hold: the analysis measures every
 * analysis.interval from its start, and once more when its time is up;
 * the hold passes only when that last measurement passed. A metric that
 * failed more than failure_limit times in the rollout fails the hold (the
 * rollout aborts); an inconclusive one pauses it, health still watched,
 * until the operator promotes (the hold passes) or aborts. */

static void an_start(rollout *r);
static void monitor_schedule(rollout *r);

static void an_stop(rollout *r) {
  engine_timer_cancel(r->an_timer);
  r->an_timer = NULL;
  if (r->an_running)
    analysis_cancel(r->an);
  r->an_running = r->an_final = r->an_paused = r->an_passed = 0;
  r->an_failed[0] = '\0';
}

static char *base_url(const store_instance *in) {
  dc_buf b = {0};
  dc_buf_printf(&b, strchr(in->host, ':') ? "http://[%s]:%d" : "http://%s:%d", in->host, in->port);
  return dc_buf_take(&b);
}

/* The sets as they are now (new instances that run, the old set). */
static int an_sets(rollout *r, analysis_sets *s) {
  memset(s, 0, sizeof *s);
  const instset *sets[2] = {&r->fresh, &r->old};
  analysis_set *out[2] = {&s->fresh, &s->old};
  for (int k = 0; k < 2; k++) {
    out[k]->servers = calloc(sets[k]->n + 1, sizeof(char *));
    out[k]->urls = calloc(sets[k]->n + 1, sizeof(char *));
    if (!out[k]->servers || !out[k]->urls)
      goto oom;
    for (size_t i = 0; i < sets[k]->n; i++) {
      const store_instance *in = &sets[k]->v[i];
      if (k == 0 && strcmp(in->state, "running") != 0)
        continue;
      size_t j = out[k]->n++;
      out[k]->servers[j] = strdup(in->server);
      out[k]->urls[j] = base_url(in);
      if (!out[k]->servers[j] || !out[k]->urls[j])
        goto oom;
    }
  }
  s->pct = r->run.pct;
  s->target = strdup(r->t->name);
  s->version = strdup(r->version);
  s->from_version = strdup(r->from_version);
  if (s->target && s->version && s->from_version)
    return 0;
oom:
  analysis_sets_clear(s);
  return -1;
}

/* The hold ends now, with the verdict of analysis; a health round in
 * flight ends it instead when it comes back. */
static void an_conclude(rollout *r, int ok, const char *msg) {
  if (r->health_cb) {
    if (ok)
      r->an_passed = 1;
    else
      dc_strlcpy(r->an_failed, msg, sizeof r->an_failed);
    return;
  }
  engine_timer_cancel(r->timer);
  r->timer = NULL;
  if (ok)
    step_passed(r);
  else
    complete(r, 0, msg);
}

static void an_schedule(rollout *r);

static void an_measured(void *payload, const analysis_result *res, size_t n) {
  rollout *r = payload;
  char failed[DC_ERR_MAX] = "", unsure[DC_ERR_MAX] = "";
  r->an_running = 0;
  for (size_t i = 0; i < n; i++) {
    size_t idx = (size_t)(res[i].metric - r->an_spec->metrics);
    int bad = res[i].verdict == VERDICT_FAIL || res[i].verdict == VERDICT_ERROR;
    if (bad)
      r->an_failures[idx]++;
    json_t *data = json_deep_copy(res[i].data);
    if (data) {
      json_object_set_new(data, "failures", json_integer(r->an_failures[idx]));
      json_object_set_new(data, "failure_limit", json_integer(r->an_spec->failure_limit));
    }
    emit(r, "analysis", data);
    if (bad && r->an_failures[idx] > r->an_spec->failure_limit && !failed[0])
      dc_fmt(failed, sizeof failed, "analysis failed: metric '%s' (%s) failed %d time%s (failure_limit %d): %s",
             res[i].metric->name, analysis_source_name(res[i].metric->source), r->an_failures[idx],
             r->an_failures[idx] == 1 ? "" : "s", r->an_spec->failure_limit, res[i].detail);
    else if (res[i].verdict == VERDICT_INCONCLUSIVE && !unsure[0])
      dc_fmt(unsure, sizeof unsure, "analysis inconclusive: metric '%s' (%s): %s", res[i].metric->name,
             analysis_source_name(res[i].metric->source), res[i].detail);
  }
  if (r->mon != MON_GATED)
    return;
  if (r->abort_requested) {
    an_conclude(r, 0, r->abort_reason);
  } else if (failed[0]) {
    an_conclude(r, 0, failed);
  } else if (r->promote_pending) {
    r->promote_pending = 0;
    emit(r, "resumed", pct_json(r->run.pct, "promote"));
    an_conclude(r, 1, NULL);
  } else if (unsure[0]) {
    r->an_paused = 1;
    emit(r, "paused", json_pack("{s:o, s:o}", "pct", dc_json_number(r->run.pct), "reason", dc_json_text(unsure)));
    /* The hold's end may have stopped the health rounds: they go on. */
    if (!r->timer && !r->health_cb && !r->e->virtual_clock)
      monitor_schedule(r);
  } else if (r->an_final) {
    an_conclude(r, 1, NULL);
  } else {
    an_schedule(r);
  }
}

static void an_start(rollout *r) {
  char err[DC_ERR_MAX], msg[DC_ERR_MAX];
  analysis_sets sets;
  if (an_sets(r, &sets) != 0) {
    an_conclude(r, 0, "analysis: out of memory");
    return;
  }
  int rc = analysis_measure(r->an, &sets, an_measured, r, err);
  analysis_sets_clear(&sets);
  if (rc != 0) {
    dc_fmt(msg, sizeof msg, "analysis could not measure: %s", err);
    an_conclude(r, 0, msg);
    return;
  }
  r->an_running = 1;
}

static void an_tick(void *payload) {
  rollout *r = payload;
  r->an_timer = NULL;
  if (r->mon == MON_GATED && !r->an_paused && !r->an_running)
    an_start(r);
}

/* The next measurement inside the hold; none falls on its end, which
 * measures anyway. */
static void an_schedule(rollout *r) {
  double left = r->mon_deadline - engine_now(r->e);
  if (r->an_spec->interval < left - 1e-6)
    r->an_timer = engine_timer_start(r->e, r->an_spec->interval, an_tick, r);
}

static void an_hold_begin(rollout *r) {
  char err[DC_ERR_MAX];
  if (!r->an_spec)
    return;
  if (analysis_check_router(r->an_spec, r->t->router, r->t->name, err) != 0) {
    dc_strlcpy(r->an_failed, dc_unprefix(err), sizeof r->an_failed);
    return;
  }
  if (r->an && r->an_made_for != r->an_spec) {
    analysis_free(r->an);
    r->an = NULL;
  }
  if (!r->an) {
    free(r->an_failures);
    r->an = analysis_new(r->an_spec, r->e, r->t->router);
    r->an_failures = calloc(r->an_spec->n + 1, sizeof *r->an_failures);
    r->an_made_for = r->an_spec;
    if (!r->an || !r->an_failures) {
      dc_strlcpy(r->an_failed, "analysis: out of memory", sizeof r->an_failed);
      return;
    }
  }
  analysis_sets sets;
  if (an_sets(r, &sets) == 0) {
    analysis_window_begin(r->an, &sets);
    analysis_sets_clear(&sets);
  }
  an_schedule(r);
}

/* The hold's time is up: one last measurement covers its end. */
static void hold_ended(rollout *r) {
  if (!r->an_spec) {
    step_passed(r);
    return;
  }
  r->an_final = 1;
  if (!r->an_running)
    an_start(r);
}

/* ---- monitoring: WAIT_HEALTHY, WAIT, VERIFY ---- */

static void monitor_tick(void *payload);

static void monitor_schedule(rollout *r) {
  double now = engine_now(r->e);
  double next = r->t->health.interval;
  /* On the virtual clock a 300 s wait would mean thousands of real checks;
   * twenty rounds per wait keep the gate meaningful and the run fast. */
  if (r->e->virtual_clock && r->mon == MON_GATED && r->act.seconds / 20 > next)
    next = r->act.seconds / 20;
  /* An analysis pause outlasts the hold: health is watched on. */
  if (r->mon != MON_HEALTHY && !r->an_paused && r->mon_deadline - now < next)
    next = r->mon_deadline - now;
  if (next < 0)
    next = 0;
  r->timer = r->real_wait ? engine_timer_start_real(r->e, next, monitor_tick, r)
                          : engine_timer_start(r->e, next, monitor_tick, r);
}

static json_t *health_json(const rollout_health *h, int consecutive) {
  return json_pack("{s:s, s:i, s:i, s:i, s:o}", "state", health_state_name(h->state), "consecutive", consecutive, "ok",
                   h->ok, "checked", h->checked, "detail", dc_json_text(h->detail));
}

/* The new version is healthy: what waited for it goes on. */
static void healthy_go_on(rollout *r) {
  if (r->after_healthy) {
    void (*next)(rollout *) = r->after_healthy;
    r->after_healthy = NULL;
    next(r);
    return;
  }
  complete(r, 1, NULL);
}

static void split(rollout *r, double pct, int *w_old, int *w_new);
static size_t running_fresh(const rollout *r);
static router_server *build_servers(rollout *r, int w_old, int w_new, int with_old, int with_new, size_t *n);
static router_plan plan_of(const rollout *r, const router_server *servers, size_t n, int with_routes,
                           int all_or_nothing);

static void testers_routed(void *payload, const char *err) {
  rollout *r = payload;
  char msg[DC_ERR_MAX];
  engine_release(r->e);
  if (err) {
    dc_fmt(msg, sizeof msg, "cannot route testers to %s: %s", r->version, err);
    complete(r, 0, msg);
    return;
  }
  /* Testers reach the new instances from now on: an abort whose router
   * fails keeps them running. */
  r->routed_new = 1;
  const route_rules *t = &r->st->routes;
  emit(r, "test_route", json_pack("{s:s, s:s, s:s, s:i}", t->test_header[0] ? "header" : "cookie",
                                  t->test_header[0] ? t->test_header : t->test_cookie, "value", t->test_value,
                                  "version", r->version, "new", (int)running_fresh(r)));
  if (r->abort_requested) {
    complete(r, 0, r->abort_reason);
    return;
  }
  healthy_go_on(r);
}

/* Testers' requests reach the new version as soon as it is healthy, while
 * everyone else's share stays where it is. */
static void route_testers(rollout *r) {
  char err[DC_ERR_MAX];
  int w_old, w_new;
  size_t n;
  r->tested = 1;
  split(r, r->run.pct, &w_old, &w_new);
  router_server *servers = build_servers(r, w_old, w_new, 1, 1, &n);
  if (!servers) {
    complete(r, 0, "deploy: out of memory");
    return;
  }
  engine_hold(r->e);
  router_plan plan = plan_of(r, servers, n, 1, 1);
  int rc = r->t->router->apply(r->t->router, &plan, testers_routed, r, err);
  free(servers);
  if (rc != 0)
    testers_routed(r, err);
}

static void monitor_observed(void *payload, const rollout_health *h) {
  rollout *r = payload;
  char msg[DC_ERR_MAX];
  double now = engine_now(r->e);
  if (r->abort_requested) {
    complete(r, 0, r->abort_reason);
    return;
  }
  int ok = h->state == HEALTH_HEALTHY;
  /* While new instances start, "connection refused" is expected and not a
   * failure; an instance that answers with the wrong status, or dies, is. */
  int counted = !ok && (r->mon != MON_HEALTHY || h->answered_bad || h->dead);
  if (counted) {
    r->mon_failures++;
    emit(r, "health_failed", health_json(h, r->mon_failures));
  } else if (r->mon == MON_HEALTHY) {
    r->mon_failures = 0;
  }
  switch (r->mon) {
  case MON_HEALTHY:
    if (ok) {
      emit(r, "healthy", json_pack("{s:i}", "checked", h->checked));
      r->mon = MON_NONE;
      /* the instances are up: the virtual clock may move again (the
       * testers' apply holds the engine itself) */
      real_wait_end(r);
      if (!r->tested && routes_test_active(&r->st->routes) && running_fresh(r) > 0) {
        route_testers(r);
        return;
      }
      healthy_go_on(r);
    } else if (h->dead) {
      complete(r, 0, h->detail);
    } else if (r->mon_failures >= r->t->health.failure_threshold) {
      dc_fmt(msg, sizeof msg, "new instances of %s unhealthy after %d consecutive failed checks: %s", r->version,
             r->mon_failures, h->detail);
      complete(r, 0, msg);
    } else if (r->real_wait ? dc_wall_now() >= r->real_deadline : now >= r->mon_deadline) {
      dc_fmt(msg, sizeof msg, "new instances of %s not healthy after %g s: %s", r->version,
             r->t->health.start_timeout, h->detail);
      complete(r, 0, msg);
    } else {
      monitor_schedule(r);
    }
    return;
  case MON_GATED:
  case MON_VERIFY:
    if (ok)
      r->mon_failures = 0;
    if (r->mon_failures >= r->t->health.failure_threshold || h->dead) {
      dc_fmt(msg, sizeof msg, "unhealthy after %d consecutive failed checks: %s", r->mon_failures, h->detail);
      complete(r, 0, msg);
    } else if (r->mon == MON_VERIFY && ok) {
      emit(r, "verified", json_pack("{s:i}", "checked", h->checked));
      step_passed(r);
    } else if (r->mon == MON_VERIFY) {
      monitor_schedule(r);
    } else if (r->an_failed[0]) {
      dc_strlcpy(msg, r->an_failed, sizeof msg);
      complete(r, 0, msg);
    } else if (r->promote_pending) {
      r->promote_pending = 0;
      emit(r, "resumed", pct_json(r->run.pct, "promote"));
      step_passed(r);
    } else if (r->an_passed) {
      step_passed(r);
    } else if (r->an_paused) {
      if (!r->e->virtual_clock)
        monitor_schedule(r);
    } else if (now >= r->mon_deadline) {
      hold_ended(r);
    } else {
      monitor_schedule(r);
    }
    return;
  default:
    return;
  }
}

static void step_hooks_done(rollout *r, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  if (!ok) {
    dc_fmt(msg, sizeof msg, "analysis failed: %s", err ? err : "the analysis hook said fail");
    complete(r, 0, msg);
    return;
  }
  complete(r, 1, NULL);
}

static void after_step_done(rollout *r, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  if (!ok) {
    dc_fmt(msg, sizeof msg, "after_step hook failed: %s", err ? err : "returned false");
    complete(r, 0, msg);
    return;
  }
  with_hook(r, HOOK_ANALYSIS, r->run.pct, NULL, step_hooks_done);
}

/* A health-gated wait that ended well: after_step, then analysis. */
static void step_passed(rollout *r) {
  an_stop(r);
  r->mon = MON_NONE;
  with_hook(r, HOOK_AFTER_STEP, r->run.pct, NULL, after_step_done);
}

static void monitor_tick(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  rollout_check_health(r, monitor_observed, r);
}

static void monitor_start(rollout *r, enum monitor_mode mode, double seconds) {
  r->mon = mode;
  r->mon_failures = 0;
  r->mon_deadline = engine_now(r->e) + seconds;
  if (mode == MON_HEALTHY && r->e->virtual_clock && !r->t->provider->on_engine_clock && !r->real_wait) {
    /* A process takes the real time it takes to listen: the virtual clock
     * must not run start_timeout out meanwhile (holding it also keeps
     * rollouts simulated side by side on one timeline). */
    r->real_wait = 1;
    r->real_deadline = dc_wall_now() + seconds;
    engine_hold(r->e);
  }
  if (mode == MON_GATED) {
    if (seconds <= 0 || r->promote_pending) {
      if (r->promote_pending) {
        r->promote_pending = 0;
        emit(r, "resumed", pct_json(r->run.pct, "promote"));
      }
      step_passed(r);
      return;
    }
    /* All traffic is new, the old set still runs: the bake. */
    if (r->run.pct >= 100 && r->old.n > 0)
      emit(r, "bake", json_pack("{s:o, s:o, s:i}", "pct", dc_json_number(r->run.pct), "seconds",
                                dc_json_number(seconds), "old", (int)r->old.n));
    monitor_schedule(r);
    an_hold_begin(r);
    return;
  }
  monitor_tick(r);
}

/* ---- START ---- */

/* Without a router that can weigh servers, the new version's share follows
 * the instance ratio (as Argo Rollouts does without a mesh): one new
 * instance first, more as the share grows, the old set whole until
 * promotion. */
static int by_ratio(const rollout *r) { return r->t->router->ratio_only && r->old.n > 0; }

static void started_set(void *payload, const char *err) {
  rollout *r = payload;
  if (err)
    complete(r, 0, err);
  else if (r->after_healthy)
    monitor_start(r, MON_HEALTHY, r->t->health.start_timeout);
  else
    complete(r, 1, NULL);
}

/* ---- boot waves ----
 *
 * With a boot limit, the new instances start on that many hosts at a time
 * (Kamal's boot.limit): a wave's hosts start theirs, the rollout waits
 * until every new instance is healthy, then boot_wait seconds, then the
 * next wave. A wave that fails ends the START: later waves never start. */

static void wave_start(rollout *r);

static void wave_waited(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  if (r->abort_requested) {
    complete(r, 0, r->abort_reason);
    return;
  }
  wave_start(r);
}

static void wave_healthy(rollout *r) {
  if (r->abort_requested) {
    complete(r, 0, r->abort_reason);
    return;
  }
  if (r->t->boot_wait > 0) {
    emit(r, "boot_wait", json_pack("{s:o, s:i}", "seconds", dc_json_number(r->t->boot_wait), "next_wave", r->wave + 1));
    r->timer = engine_timer_start(r->e, r->t->boot_wait, wave_waited, r);
    return;
  }
  wave_start(r);
}

static void wave_started(void *payload, const char *err) {
  rollout *r = payload;
  if (err || r->wave_next >= r->waves.n) {
    /* The last wave (or a failed one): the START ends as a whole. */
    r->after_healthy = r->after_start;
    r->after_start = NULL;
    instset_clear(&r->waves);
    started_set(r, err);
    return;
  }
  r->after_healthy = wave_healthy;
  monitor_start(r, MON_HEALTHY, r->t->health.start_timeout);
}

static void wave_start(rollout *r) {
  char err[DC_ERR_MAX];
  size_t from = r->wave_next, to = from + r->wave_rows;
  if (to > r->waves.n)
    to = r->waves.n;
  r->wave_next = to;
  r->wave++;
  json_t *hosts = json_array();
  for (size_t i = from; i < to; i++) {
    const char *node = r->waves.v[i].node;
    if (i == from || strcmp(node, r->waves.v[i - 1].node) != 0)
      json_array_append_new(hosts, dc_json_text(node));
  }
  emit(r, "boot_wave", json_pack("{s:i, s:i, s:o, s:i}", "wave", r->wave, "waves", r->nwaves, "hosts", hosts,
                                 "instances", (int)(to - from)));
  instset one = {r->waves.v + from, to - from, to - from};
  instset_ctx c = ctx_of(r);
  if (instset_start(&c, &r->fresh, &one, wave_started, r, err) != 0)
    wave_started(r, err);
}

/* Starts `per_node` more instances on every node, in waves when the
 * target has a boot limit below its number of nodes. */
static void start_more(rollout *r, int per_node) {
  char err[DC_ERR_MAX];
  instset plan = {0};
  instset_ctx c = ctx_of(r);
  size_t per_wave = target_wave_size(r->t);
  if (instset_plan(r->t, r->rc.id, r->version, per_node, (int)r->fresh.n, &plan) != 0) {
    complete(r, 0, "deploy: out of memory");
  } else if (per_wave < r->t->nnodes) {
    /* The plan lists the rows node by node, per_node each. */
    instset_clear(&r->waves);
    r->waves = plan;
    memset(&plan, 0, sizeof plan);
    r->wave_next = 0;
    r->wave = 0;
    r->nwaves = (int)((r->t->nnodes + per_wave - 1) / per_wave);
    r->wave_rows = per_wave * (size_t)per_node;
    r->after_start = r->after_healthy;
    r->after_healthy = NULL;
    wave_start(r);
  } else if (instset_start(&c, &r->fresh, &plan, started_set, r, err) != 0) {
    complete(r, 0, err);
  }
  instset_clear(&plan);
}

static size_t running_fresh(const rollout *r) {
  size_t n = 0;
  for (size_t i = 0; i < r->fresh.n; i++)
    n += strcmp(r->fresh.v[i].state, "running") == 0;
  return n;
}

static void act_start(rollout *r, int n) {
  if (n <= 0 && by_ratio(r) && r->fresh.n == 0)
    n = 1;
  /* Starting what is already there is a no-op, so a built-in strategy can
   * take over from a Lua strategy that started the instances itself. */
  if (n <= 0) {
    n = r->t->instances - (int)(running_fresh(r) / r->t->nnodes);
    if (n <= 0) {
      complete(r, 1, NULL);
      return;
    }
  }
  start_more(r, n);
}

/* ---- TRAFFIC ---- */

typedef struct traffic {
  rollout *r;
  double pct;
  int w_old, w_new;
  int pending;             /* weight writes not yet committed */
  char err[DC_ERR_MAX];    /* the first that failed */
} traffic;

/* The servers of the old set at w_old and the new set at w_new (a set
 * left out when its flag is 0); heap, n entries. */
static router_server *build_servers(rollout *r, int w_old, int w_new, int with_old, int with_new, size_t *n) {
  router_server *out = calloc(r->old.n + r->fresh.n + 1, sizeof *out);
  *n = 0;
  if (!out)
    return NULL;
  if (with_old)
    *n += instset_servers(&r->old, w_old, out);
  if (with_new) {
    /* Only instances that run are routed to. */
    for (size_t i = 0; i < r->fresh.n; i++) {
      if (strcmp(r->fresh.v[i].state, "running") != 0)
        continue;
      instset one = {&r->fresh.v[i], 1, 1};
      *n += instset_servers(&one, w_new, out + *n);
      out[*n - 1].fresh = 1;
    }
  }
  return out;
}

/* The plan for servers: the target's maintenance always; the strategy's
 * routes (sticky canaries, testers) while the rollout runs (with_routes),
 * never at its end, when everyone moves to the version that stays. */
static router_plan plan_of(const rollout *r, const router_server *servers, size_t n, int with_routes,
                           int all_or_nothing) {
  router_plan p = {.servers = servers, .n = n, .all_or_nothing = all_or_nothing};
  p.routes = r->maintenance;
  if (with_routes) {
    const route_rules *st = &r->st->routes;
    dc_strlcpy(p.routes.affinity_cookie, st->affinity_cookie, sizeof p.routes.affinity_cookie);
    p.routes.affinity_max_age = st->affinity_max_age;
    dc_strlcpy(p.routes.affinity_token, r->rc.id, sizeof p.routes.affinity_token);
    dc_strlcpy(p.routes.test_header, st->test_header, sizeof p.routes.test_header);
    dc_strlcpy(p.routes.test_cookie, st->test_cookie, sizeof p.routes.test_cookie);
    dc_strlcpy(p.routes.test_value, st->test_value, sizeof p.routes.test_value);
  }
  return p;
}

static void split(rollout *r, double pct, int *w_old, int *w_new) {
  if (r->old.n == 0) {
    *w_old = 0;
    *w_new = pct > 0 ? 1 : 0;
    return;
  }
  router_split_weights(pct, (int)r->old.n, (int)running_fresh(r), w_old, w_new);
}

/* The weights wanted, recorded on the rows for reconcile and status. */
static void save_weights(rollout *r, int w_old, int w_new) {
  char err[DC_ERR_MAX];
  for (size_t i = 0; i < r->old.n; i++) {
    r->old.v[i].weight = w_old;
    store_instance_update(r->s, &r->old.v[i], NULL, NULL, err);
  }
  for (size_t i = 0; i < r->fresh.n; i++) {
    if (strcmp(r->fresh.v[i].state, "running") != 0)
      continue;
    r->fresh.v[i].weight = w_new;
    store_instance_update(r->s, &r->fresh.v[i], NULL, NULL, err);
  }
}

static void traffic_applied(void *payload, const char *err) {
  traffic *tr = payload;
  rollout *r = tr->r;
  engine_release(r->e);
  if (err) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "cannot set traffic to %g %%: %s", tr->pct, err);
    free(tr);
    complete(r, 0, msg);
    return;
  }
  r->run.pct = tr->pct;
  if (tr->w_new > 0)
    r->routed_new = 1;
  emit(r, "traffic",
       json_pack("{s:o, s:i, s:i, s:i, s:i, s:i, s:i}", "pct", dc_json_number(tr->pct), "weight_old", tr->w_old, "weight_new",
                 tr->w_new, "old", (int)r->old.n, "new", (int)running_fresh(r), "step", r->run.step, "steps",
                 r->run.steps));
  free(tr);
  complete(r, 1, NULL);
}

static void traffic_now(rollout *r, double pct);
static void record_weights(rollout *r, traffic *tr);

static void before_step_done(rollout *r, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  if (r->abort_requested) {
    complete(r, 0, r->abort_reason);
    return;
  }
  if (!ok) {
    dc_fmt(msg, sizeof msg, "before_step hook failed at %g %%: %s", r->act.pct, err ? err : "returned false");
    complete(r, 0, msg);
    return;
  }
  traffic_now(r, r->act.pct);
}

static void act_traffic(rollout *r, double pct) { with_hook(r, HOOK_BEFORE_STEP, pct, NULL, before_step_done); }

static void ratio_reached(rollout *r) {
  double pct = r->ratio_pct;
  size_t n = running_fresh(r);
  double effective = 100.0 * (double)n / (double)(n + r->old.n);
  r->run.pct = pct;
  emit(r, "traffic",
       json_pack("{s:o, s:o, s:i, s:i, s:i, s:i, s:i, s:i, s:s}", "pct", dc_json_number(pct), "effective",
                 dc_json_number(round(effective * 100) / 100), "weight_old", 1, "weight_new", 1, "old", (int)r->old.n, "new", (int)n,
                 "step", r->run.step, "steps", r->run.steps, "router", r->t->router->kind));
  complete(r, 1, NULL);
}

static void traffic_by_ratio(rollout *r, double pct) {
  int total = r->t->instances;
  size_t want = pct <= 0 ? 0 : (size_t)ceil(total * pct / 100.0 - 1e-9);
  if (pct > 0 && want < 1)
    want = 1;
  r->ratio_pct = pct;
  size_t have = running_fresh(r) / r->t->nnodes;
  if (want <= have) {
    ratio_reached(r);
    return;
  }
  r->after_healthy = ratio_reached;
  start_more(r, (int)(want - have));
}

static void traffic_now(rollout *r, double pct) {
  char err[DC_ERR_MAX];
  if (!(pct >= 0 && pct <= 100)) {
    dc_fmt(err, sizeof err, "traffic percentage %g is outside 0..100", pct);
    complete(r, 0, err);
    return;
  }
  if (by_ratio(r)) {
    traffic_by_ratio(r, pct);
    return;
  }
  if (running_fresh(r) == 0 && pct > 0) {
    complete(r, 0, "cannot send traffic to the new version: no instance of it was started");
    return;
  }
  traffic *tr = calloc(1, sizeof *tr);
  if (!tr) {
    complete(r, 0, "deploy: out of memory");
    return;
  }
  tr->r = r;
  tr->pct = pct;
  split(r, pct, &tr->w_old, &tr->w_new);
  record_weights(r, tr);
}

/* The weights are committed, so a crash from here on knows what the router
 * was asked: now the router. A server at weight 0 stays registered (it may
 * get traffic back); only promotion and abort retire a whole set. */
static void traffic_apply(traffic *tr) {
  rollout *r = tr->r;
  char err[DC_ERR_MAX];
  size_t n = 0;
  router_server *servers = build_servers(r, tr->w_old, tr->w_new, 1, 1, &n);
  if (!servers) {
    free(tr);
    complete(r, 0, "deploy: out of memory");
    return;
  }
  engine_hold(r->e);
  router_plan plan = plan_of(r, servers, n, 1, 1);
  int rc = r->t->router->apply(r->t->router, &plan, traffic_applied, tr, err);
  free(servers);
  if (rc != 0) {
    engine_release(r->e);
    free(tr);
    complete(r, 0, err);
  }
}

static void weight_recorded(void *payload, const store_result *res) {
  traffic *tr = payload;
  if (res->rc != DC_OK && !tr->err[0])
    dc_strlcpy(tr->err, res->err, sizeof tr->err);
  if (--tr->pending > 0)
    return;
  if (tr->err[0]) {
    /* Not one step the store cannot record: the traffic stays as it was
     * and the strategy hears why (it aborts, safely). */
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "traffic not moved to %g %%: the step could not be recorded: %s", tr->pct, tr->err);
    rollout *r = tr->r;
    free(tr);
    complete(r, 0, msg);
    return;
  }
  traffic_apply(tr);
}

/* Every instance row gets the weight the router is about to be given,
 * committed before the router is touched. */
static void record_weights(rollout *r, traffic *tr) {
  char err[DC_ERR_MAX];
  tr->pending = 1; /* held until every write is queued */
  for (size_t k = 0; k < r->old.n + r->fresh.n; k++) {
    int is_old = k < r->old.n;
    store_instance *in = is_old ? &r->old.v[k] : &r->fresh.v[k - r->old.n];
    if (!is_old && strcmp(in->state, "running") != 0)
      continue;
    in->weight = is_old ? tr->w_old : tr->w_new;
    tr->pending++;
    if (store_instance_update(r->s, in, weight_recorded, tr, err) != 0) {
      tr->pending--;
      if (!tr->err[0])
        dc_strlcpy(tr->err, err, sizeof tr->err);
    }
  }
  store_result done = {.rc = DC_OK};
  weight_recorded(tr, &done);
}

/* ---- PROMOTE ---- */

static void on_promote_done(rollout *r, int ok, const char *err) {
  if (!ok)
    note_hook_failure(r, HOOK_ON_PROMOTE, err);
  end_rollout(r);
}

/* The new version serves already: a stubborn old process is worth an event
 * (instset records it), not a failed deployment. */
static void promoted_stopped(void *payload, const char *err) {
  rollout *r = payload;
  (void)err;
  with_hook(r, HOOK_ON_PROMOTE, 100, NULL, on_promote_done);
}

static void stop_then(rollout *r, const instset *a, const instset *b, instset_cb then) {
  char err[DC_ERR_MAX];
  instset both = {0};
  for (size_t i = 0; i < a->n; i++)
    instset_push(&both, &a->v[i]);
  for (size_t i = 0; b && i < b->n; i++)
    instset_push(&both, &b->v[i]);
  instset_ctx c = ctx_of(r);
  if (instset_stop(&c, &both, then, r, err) != 0) {
    record_error(&r->rc, err);
    then(r, err);
  }
  instset_clear(&both);
}

static void promotion_recorded(void *payload, const store_result *res) {
  rollout *r = payload;
  char msg[DC_ERR_MAX];
  if (res->rc != DC_OK) {
    dc_fmt(msg, sizeof msg, "cannot record the promotion of %s: %s", r->version, res->err);
    act_abort(r, msg);
    return;
  }
  /* Committed before anything old stops: from here on, a crash recovers
   * to the new version. */
  r->promoted = 1;
  emit(r, "promoted", json_pack("{s:s, s:s}", "version", r->version, "from", r->from_version));
  stop_then(r, &r->old, &r->strays, promoted_stopped);
}

static void promote_applied(void *payload, const char *err) {
  rollout *r = payload;
  char msg[DC_ERR_MAX];
  engine_release(r->e);
  if (err) {
    dc_fmt(msg, sizeof msg, "cannot promote %s: %s", r->version, err);
    act_abort(r, msg);
    return;
  }
  if (store_deployment_promote(r->s, r->rc.id, promotion_recorded, r, msg) != 0)
    act_abort(r, msg);
}

static void promote_now(rollout *r);

static void before_promote_done(rollout *r, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  if (r->abort_requested) {
    act_abort(r, r->abort_reason);
    return;
  }
  if (!ok) {
    dc_fmt(msg, sizeof msg, "not promoted: %s", err ? err : "the before_promote hook said no");
    act_abort(r, msg);
    return;
  }
  promote_now(r);
}

/* The before_promote hooks (a confirm-promotion webhook) may hold the
 * promotion; the rollout can still be aborted meanwhile. */
static void act_promote(rollout *r) {
  if (running_fresh(r) == 0) {
    act_abort(r, "nothing to promote: no instance of the new version was started");
    return;
  }
  with_hook(r, HOOK_BEFORE_PROMOTE, r->run.pct, NULL, before_promote_done);
}

static void promote_now(rollout *r) {
  char err[DC_ERR_MAX];
  int w_old, w_new;
  r->ending = 1;
  split(r, 100, &w_old, &w_new);
  if (w_new == 0)
    w_new = 1;
  size_t n;
  router_server *servers = build_servers(r, 0, w_new, 0, 1, &n);
  if (!servers) {
    act_abort(r, "deploy: out of memory");
    return;
  }
  engine_hold(r->e);
  router_plan plan = plan_of(r, servers, n, 0, 1);
  int rc = r->t->router->apply(r->t->router, &plan, promote_applied, r, err);
  free(servers);
  if (rc != 0)
    promote_applied(r, err);
}

/* ---- ABORT ---- */

static void on_abort_done(rollout *r, int ok, const char *err) {
  if (!ok)
    note_hook_failure(r, HOOK_ON_ABORT, err);
  end_rollout(r);
}

static void aborted_stopped(void *payload, const char *err) {
  rollout *r = payload;
  if (err)
    record_error(&r->rc, err);
  with_hook(r, HOOK_ON_ABORT, r->abort_pct, r->rc.nerrors ? r->rc.errors[0] : "aborted", on_abort_done);
}

static void on_rollback_done(rollout *r, int ok, const char *err) {
  if (!ok)
    note_hook_failure(r, HOOK_ON_ROLLBACK, err);
  stop_then(r, &r->fresh, &r->strays, aborted_stopped);
}

static void abort_apply(rollout *r);

static void abort_retry(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  abort_apply(r);
}

static void abort_applied(void *payload, const char *err) {
  rollout *r = payload;
  engine_release(r->e);
  if (err && ++r->abort_attempts < 4) {
    /* The proxy may be restarting: try again before giving up. */
    r->timer = engine_timer_start(r->e, 0.25 * r->abort_attempts, abort_retry, r);
    return;
  }
  if (err) {
    /* If the proxy ever sent the new instances traffic, it may still: they
     * keep running, as strays the next rollout or reconcile stops. */
    if (r->routed_new)
      record_errorf(&r->rc,
                    "while returning traffic to the old version: %s; the new instances keep running, as the "
                    "router may still send them traffic: run 'deployctl reconcile %s' once it answers",
                    err, r->t->name);
    else
      record_errorf(&r->rc, "while returning traffic to the old version: %s", err);
    if (r->routed_new) {
      aborted_stopped(r, NULL);
      return;
    }
  } else {
    r->run.pct = 0;
    save_weights(r, r->old.n ? 1 : 0, 0);
    if (r->abort_pct > 0 && r->old.n > 0) {
      emit(r, "rolled_back", json_pack("{s:o}", "from_pct", dc_json_number(r->abort_pct)));
      with_hook(r, HOOK_ON_ROLLBACK, r->abort_pct, NULL, on_rollback_done);
      return;
    }
  }
  stop_then(r, &r->fresh, &r->strays, aborted_stopped);
}

static void act_abort(rollout *r, const char *reason) {
  r->ending = 1;
  r->abort_pct = r->run.pct;
  r->paused = 0;
  record_error(&r->rc, reason);
  emit(r, "aborted", json_pack("{s:o, s:o}", "reason", dc_json_text(reason), "pct", dc_json_number(r->run.pct)));
  if (r->lease_lost) {
    /* The target is another runner's now: its recovery brings it back to
     * one version. Touching the router or the instances could only fight
     * it. */
    end_rollout(r);
    return;
  }
  abort_apply(r);
}

static void abort_apply(rollout *r) {
  char err[DC_ERR_MAX];
  size_t n;
  /* Equal weights on the old set: 100 % back in one step. */
  router_server *servers = build_servers(r, 1, 0, 1, 0, &n);
  if (!servers) {
    abort_applied(r, "deploy: out of memory");
    return;
  }
  engine_hold(r->e);
  router_plan plan = plan_of(r, servers, n, 0, 0);
  int rc = r->t->router->apply(r->t->router, &plan, abort_applied, r, err);
  free(servers);
  if (rc != 0)
    abort_applied(r, err);
}

/* ---- the end ---- */

static void release(rollout *r) {
  an_stop(r);
  analysis_free(r->an);
  r->an = NULL;
  free(r->an_failures);
  r->an_failures = NULL;
  store_controls_unwatch(r->watch);
  r->watch = NULL;
  active_remove(r);
  instset_clear(&r->old);
  instset_clear(&r->fresh);
  instset_clear(&r->strays);
  instset_clear(&r->waves);
  record_clear(&r->rc);
  free(r->metadata);
  store_unref(r->s);
  r->s = NULL;
  if (r->rounds > 0) {
    r->freed_later = 1;
    return;
  }
  free(r);
}

static void report(rollout *r) {
  rollout_result res;
  memset(&res, 0, sizeof res);
  res.success = r->promoted && r->rc.nerrors == 0 && !r->rc.oom;
  res.locked = r->locked;
  res.recorded = r->recorded;
  dc_strlcpy(res.id, r->rc.id, sizeof res.id);
  dc_strlcpy(res.target, r->t->name, sizeof res.target);
  dc_strlcpy(res.version, r->version, sizeof res.version);
  dc_strlcpy(res.strategy, r->strategy_name, sizeof res.strategy);
  res.duration = engine_now(r->e) - r->started;
  res.errors = (const char *const *)r->rc.errors;
  res.nerrors = r->rc.nerrors;
  /* The action that ended the rollout hears of it first (a Lua strategy
   * resumes), then the owner of the rollout. */
  r->act_ok = res.success;
  if (!res.success)
    dc_strlcpy(r->act_err, r->rc.nerrors ? r->rc.errors[0] : "aborted", sizeof r->act_err);
  rollout_action_cb cb = r->act_cb;
  r->act_cb = NULL;
  if (cb)
    cb(r->act_payload, r->act_ok, r->act_ok ? NULL : r->act_err);
  if (r->done)
    r->done(r->done_payload, &res);
  release(r);
}

static void finish_recorded(void *payload, const store_result *res) {
  rollout *r = payload;
  if (res->rc != DC_OK)
    record_error(&r->rc, res->err);
  report(r);
}

static void end_rollout(rollout *r) {
  char err[DC_ERR_MAX];
  double now = engine_now(r->e);
  store_controls_unwatch(r->watch);
  r->watch = NULL;
  if (r->lease_lost) {
    /* Not ours to finish: the runner that took the target over records
     * the interruption. */
    report(r);
    return;
  }
  /* Queued before the end itself: when the end is committed, so is every
   * event, and whoever reads the history after hearing the result sees it
   * whole. */
  emit(r, "finished",
       json_pack("{s:b, s:o}", "success", r->promoted && r->rc.nerrors == 0, "duration", dc_json_number(dc_round_ms(now - r->started))));
  char *errors = record_errors_json(&r->rc);
  store_finish f = {.id = r->rc.id,
                    .status = r->promoted ? "succeeded" : "failed",
                    .errors_json = errors,
                    .finished_at = now,
                    .duration = now - r->started,
                    .promoted = 0, /* committed by the promotion itself */
                    .target_status = r->promoted ? "deployed" : "failed",
                    .target_health = r->promoted ? health_state_name(r->health.state)
                                                 : (r->old.n ? "healthy" : "unhealthy")};
  int rc = store_deployment_finish(r->s, &f, finish_recorded, r, err);
  free(errors);
  if (rc != 0) {
    store_result res = {.rc = DC_ERROR, .err = err};
    finish_recorded(r, &res);
  }
}

/* ---- actions ---- */

void rollout_action(rollout *r, const strategy_action *a, rollout_action_cb cb, void *payload) {
  /* One action at a time: a refusal must not touch the one in progress. */
  if (r->ending || r->hook_next || !r->recorded) {
    if (cb)
      cb(payload, 0,
         r->ending ? "the deployment is ending" : !r->recorded ? "the deployment is not recorded yet"
                                                               : "actions cannot be started from a hook");
    return;
  }
  r->act = *a;
  r->act_cb = cb;
  r->act_payload = payload;
  if (r->abort_requested && a->kind != ACTION_ABORT) {
    r->act.kind = ACTION_ABORT;
    dc_strlcpy(r->act.reason, r->abort_reason, sizeof r->act.reason);
  }
  switch (r->act.kind) {
  case ACTION_START:
    act_start(r, (int)r->act.seconds);
    return;
  case ACTION_PAUSE:
    act_pause(r);
    return;
  case ACTION_WAIT_HEALTHY:
    if (r->fresh.n == 0) {
      complete(r, 0, "no new instance to wait for: start them first");
      return;
    }
    monitor_start(r, MON_HEALTHY, r->t->health.start_timeout);
    return;
  case ACTION_WAIT:
    monitor_start(r, MON_GATED, r->act.seconds);
    return;
  case ACTION_VERIFY:
    monitor_start(r, MON_VERIFY, r->t->health.start_timeout);
    return;
  case ACTION_TRAFFIC:
    act_traffic(r, r->act.pct);
    return;
  case ACTION_PROMOTE:
    act_promote(r);
    return;
  case ACTION_ABORT:
    act_abort(r, r->act.reason[0] ? r->act.reason : "aborted");
    return;
  }
  complete(r, 0, "unknown action");
}

static void stepped(void *payload, int ok, const char *err) {
  rollout *r = payload;
  if (r->ending)
    return;
  rollout_record(r, ok, err);
  run_step(r);
}

static void run_step(rollout *r) {
  strategy_action a;
  r->st->step(r->st, &r->run, &a);
  rollout_action(r, &a, stepped, r);
}

static void begin_after_hook(rollout *r, int ok, const char *err) {
  /* An abort that ended the hook's wait (a confirm-rollout gate) is the
   * reason, not the hook failing because of it. */
  if (!ok && !r->abort_requested) {
    strategy_action a;
    memset(&a, 0, sizeof a);
    a.kind = ACTION_ABORT;
    dc_fmt(a.reason, sizeof a.reason, "before_deploy hook failed: %s", err ? err : "returned false");
    rollout_action(r, &a, r->st->step ? stepped : NULL, r);
    return;
  }
  if (r->abort_requested) {
    strategy_action a = {.kind = ACTION_ABORT};
    dc_strlcpy(a.reason, r->abort_reason, sizeof a.reason);
    rollout_action(r, &a, r->st->step ? stepped : NULL, r);
    return;
  }
  if (r->st->step)
    run_step(r);
  else
    r->st->drive(r->st, r);
}

/* Before anything starts: the router answers (a read of what it serves),
 * and every host can take instances (the provider's preflight, for
 * providers that have one). Either failing ends the rollout with nothing
 * started, its error naming what failed: the proxy, or each host. */
static void preflight_step(rollout *r, const char *err) {
  if (err)
    dc_fmt(r->preflight_err + strlen(r->preflight_err), sizeof r->preflight_err - strlen(r->preflight_err), "%s%s",
           r->preflight_err[0] ? "; " : "", dc_unprefix(err));
  engine_release(r->e);
  if (--r->preflight_pending > 0)
    return;
  if (r->preflight_err[0]) {
    strategy_action a;
    memset(&a, 0, sizeof a);
    a.kind = ACTION_ABORT;
    dc_fmt(a.reason, sizeof a.reason, "preflight failed, nothing was started: %s", r->preflight_err);
    rollout_action(r, &a, r->st->step ? stepped : NULL, r);
    return;
  }
  if (r->t->provider->preflight) {
    json_t *hosts = json_array();
    for (size_t i = 0; i < r->t->nnodes; i++)
      json_array_append_new(hosts, dc_json_text(r->t->nodes[i]));
    emit(r, "preflight", json_pack("{s:o}", "hosts", hosts));
  }
  with_hook(r, HOOK_BEFORE_DEPLOY, 0, NULL, begin_after_hook);
}

static void preflight_hosts(void *payload, const char *err) { preflight_step(payload, err); }
static void preflight_router(void *payload, const char *err) { preflight_step(payload, err); }

static void preflight_nothing(void *payload) { preflight_step(payload, NULL); }

static void preflight(rollout *r) {
  char err[DC_ERR_MAX];
  provider *p = r->t->provider;
  router *rt = r->t->router;
  /* nginx's include is a local file the router owns: a read that finds it
   * edited by hand is no reason not to start (apply rewrites it, and
   * `nginx -t` checks everything else before any reload). */
  int read_router = strcmp(rt->kind, "nginx") != 0;
  r->preflight_pending = (p->preflight ? 1 : 0) + (read_router ? 1 : 0);
  r->preflight_err[0] = '\0';
  if (r->preflight_pending == 0) {
    /* nothing to ask: go on from the loop, as an answer would */
    engine_hold(r->e);
    r->preflight_pending = 1;
    if (engine_soon(r->e, preflight_nothing, r) != 0)
      preflight_step(r, NULL);
    return;
  }
  if (read_router) {
    engine_hold(r->e);
    if (rt->read(rt, &r->probe, 1, &r->nprobe, preflight_router, r, err) != 0)
      preflight_router(r, err);
  }
  if (!p->preflight)
    return;
  engine_hold(r->e);
  if (p->preflight(p, (const char *const *)r->t->nodes, r->t->nnodes, preflight_hosts, r, err) != 0)
    preflight_hosts(r, err);
}

void rollout_next_action(rollout *r, const strategy *st, strategy_action *out) {
  /* canary:execute(d) in a Lua strategy: its analysis, unless the Lua
   * strategy declared one of its own. */
  if (st->analysis && !r->st->analysis && !r->t->simulated)
    r->an_spec = st->analysis;
  st->step(st, &r->run, out);
}

void rollout_delegate_begin(rollout *r) {
  /* The step machine starts from its beginning; the share, and whether an
   * old version serves, stay what the rollout has now. */
  r->run.phase = 0;
  r->run.last_ok = 1;
  r->run.last_error[0] = '\0';
  r->run.step = 0;
}

void rollout_record(rollout *r, int ok, const char *err) {
  r->run.last_ok = ok;
  dc_strlcpy(r->run.last_error, err ? err : "", sizeof r->run.last_error);
}

int rollout_ending(const rollout *r) { return r->ending; }

void rollout_abort(rollout *r, const char *reason) {
  if (r->abort_requested || r->ending)
    return;
  r->abort_requested = 1;
  dc_strlcpy(r->abort_reason, reason && *reason ? reason : "aborted by the operator", sizeof r->abort_reason);
  /* A hook that waits (a confirm-* webhook) ends its wait. */
  if (r->hook_running && r->hook_running->abort)
    r->hook_running->abort(r->hook_running->payload, r);
  if (r->paused) {
    r->paused = 0;
    complete(r, 0, r->abort_reason);
    return;
  }
  /* A pending wait ends now instead of at its deadline (a hold may have
   * no timer: paused for an operator, or its last measurement out). */
  if (r->mon != MON_NONE && !r->health_cb && (r->timer || r->mon == MON_GATED)) {
    engine_timer_cancel(r->timer);
    r->timer = NULL;
    complete(r, 0, r->abort_reason);
  }
}

/* ---- start ---- */

static void begun(void *payload, const store_result *res) {
  rollout *r = payload;
  char err[DC_ERR_MAX];
  if (res->rc != DC_OK) {
    r->locked = res->rc == DC_LOCKED;
    record_error(&r->rc, res->err);
    report(r);
    return;
  }
  r->recorded = 1;
  dc_strlcpy(r->from_version, res->target->current_version, sizeof r->from_version);
  r->maintenance.maintenance = res->target->maintenance;
  dc_strlcpy(r->maintenance.maintenance_message, res->target->maintenance_message,
             sizeof r->maintenance.maintenance_message);
  r->maintenance.retry_after = res->target->maintenance_retry_after;
  if (instset_split(res->instances, res->ninstances, res->target->live_deployment, &r->old, &r->strays) != 0) {
    record_error(&r->rc, "deploy: out of memory");
    r->ending = 1;
    end_rollout(r);
    return;
  }
  r->run.has_old = r->old.n > 0;
  char user[128];
  dc_whoami(user, sizeof user);
  emit(r, "started",
       json_pack("{s:s, s:s, s:o, s:s, s:o}", "version", r->version, "from", r->from_version, "strategy",
                 dc_json_text(r->strategy_name), "kind", r->kind, "user", dc_json_text(user)));
  r->watch = store_controls_watch(r->s, r->rc.id, on_control, r, err);
  if (!r->watch)
    fprintf(stderr, "%s: operator commands will not reach this rollout\n", err);
  preflight(r);
}

int rollout_start(rollout **out, engine *e, store *s, target_config *t, strategy *st, const rollout_opts *o,
                  rollout_done_cb cb, void *payload, char *err) {
  *out = NULL;
  if (dc_validate_version(o->version, "version", err) != 0 || strategy_check(st, err) != 0)
    return DC_ERROR;
  router_plan asks = {.routes = st->routes};
  if (router_check_plan(t->router, &asks, err) != 0)
    return DC_ERROR;
  /* A dry run measures nothing: its instances are scripted. */
  const analysis_spec *an_spec = t->simulated ? NULL : st->analysis ? st->analysis : t->analysis;
  if (analysis_check_router(an_spec, t->router, t->name, err) != 0)
    return DC_ERROR;
  rollout *r = calloc(1, sizeof *r);
  if (!r || (o->metadata_json && !(r->metadata = strdup(o->metadata_json)))) {
    free(r);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  r->e = e;
  r->s = store_ref(s);
  r->t = t;
  r->st = st;
  r->done = cb;
  r->done_payload = payload;
  r->hooks = o->hooks;
  r->webhook_hooks = o->webhook_hooks;
  r->an_spec = an_spec;
  record_init(&r->rc, e, s, t->name, o->id, &o->sink);
  dc_strlcpy(r->version, o->version, sizeof r->version);
  dc_strlcpy(r->kind, o->kind ? o->kind : "deploy", sizeof r->kind);
  dc_strlcpy(r->strategy_name, o->strategy_name ? o->strategy_name : st->name, sizeof r->strategy_name);
  r->started = o->created_at > 0 ? o->created_at : engine_now(e);
  r->run.last_ok = 1;
  store_deployment d;
  record_row(&r->rc, &d, r->version, r->kind, r->strategy_name, r->started, r->metadata);
  if (store_deployment_begin(s, &d, begun, r, err) != 0) {
    record_clear(&r->rc);
    store_unref(r->s);
    free(r->metadata);
    free(r);
    return DC_ERROR;
  }
  active_add(r);
  *out = r;
  return DC_OK;
}
