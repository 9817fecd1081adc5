#include "rollout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <math.h>

enum monitor_mode {
  MON_NONE,
  MON_HEALTHY, /* until every new instance is healthy, or start_timeout */
  MON_GATED,   /* for a duration; failure_threshold consecutive failures fail */
  MON_VERIFY,  /* until one healthy round; failure_threshold failures fail */
};

struct rollout {
  engine *e;
  store *s;
  target_config *t;
  const strategy *st;
  char id[48];
  char version[129];
  char from_version[129];
  char kind[16];
  char strategy_name[64];
  double started;
  rollout_event_cb on_event;
  void *event_payload;
  rollout_done_cb done;
  void *done_payload;
  strategy_run run;

  store_instance *old;    /* the live set: serves until promotion */
  size_t nold;
  store_instance *fresh;  /* the new version's instances */
  size_t nfresh, fresh_cap;
  store_instance *strays; /* leftovers of earlier runs: stopped at the end */
  size_t nstray;

  int abort_requested;
  char abort_reason[DC_ERR_MAX];
  int ending;             /* promote or abort under way */

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
  int mon_failures;
  rollout_health health;
  rollout_health_cb health_cb;
  void *health_payload;

  int stops_pending;
  int promoted;
  void (*after_healthy)(rollout *r); /* instead of completing WAIT_HEALTHY */
  double ratio_pct;                  /* router "none": the share being reached */
  rollout_result result;

  /* hooks */
  const rollout_hooks *hooks;
  void (*hook_next)(rollout *r, int ok, const char *err);
  double abort_pct;       /* the new version's share when the abort began */

  /* operator commands (promote / abort), polled in real time */
  uv_timer_t *ctl_timer;
  double control_poll;
  int paused;

  int promoting;          /* the old set is being stopped after promotion */
  int routed_new;         /* the router once gave the new version traffic */
  int abort_attempts;     /* router applies tried while aborting */
  int rounds;             /* health rounds in flight */
  int freed_later;        /* ended; free when the last round comes back */
};

static void run_step(rollout *r);
static void end_rollout(rollout *r);
static void complete(rollout *r, int ok, const char *err);
static void step_passed(rollout *r);

static const char *const hook_names[HOOK_COUNT] = {"before_deploy", "before_step", "after_step", "analysis",
                                                   "on_promote",    "on_abort",    "on_rollback"};

const char *rollout_hook_name(hook_kind k) { return k < HOOK_COUNT ? hook_names[k] : "hook"; }

/* ---- events ---- */

void rollout_record_event(store *s, double ts, const char *deployment_id, const char *target, const char *kind,
                          const char *raw_json, rollout_event_cb cb, void *payload) {
  char err[DC_ERR_MAX], data_buf[4 * DC_ERR_MAX];
  const char *data_json = NULL;
  if (raw_json) {
    dc_strlcpy(data_buf, raw_json, sizeof data_buf);
    dc_redact(data_buf, sizeof data_buf);
    data_json = data_buf;
  }
  /* An event that cannot be stored is reported but does not stop a rollout
   * half-way: the deployment row and the router remain the truth. */
  if (store_event_add(s, deployment_id, target, ts, kind, data_json, err) != 0)
    fprintf(stderr, "%s\n", err);
  if (!cb)
    return;
  store_event ev;
  memset(&ev, 0, sizeof ev);
  dc_strlcpy(ev.deployment_id, deployment_id, sizeof ev.deployment_id);
  dc_strlcpy(ev.target, target, sizeof ev.target);
  dc_strlcpy(ev.kind, kind, sizeof ev.kind);
  ev.ts = ts;
  ev.data = (char *)data_json;
  cb(payload, &ev);
}

static void emit(rollout *r, const char *kind, const char *raw_json) {
  rollout_record_event(r->s, engine_now(r->e), r->id, r->t->name, kind, raw_json, r->on_event, r->event_payload);
}

static void add_error(rollout *r, const char *msg) {
  if (r->result.nerrors < ROLLOUT_MAX_ERRORS) {
    char *slot = r->result.errors[r->result.nerrors++];
    dc_strlcpy(slot, msg, DC_ERR_MAX);
    dc_redact(slot, DC_ERR_MAX);
  }
}

/* ---- hooks ---- */

static void hook_finished(rollout *r, int ok, const char *err) {
  void (*next)(rollout *, int, const char *) = r->hook_next;
  r->hook_next = NULL;
  next(r, ok, err);
}

/* Runs the user's hook of that kind if there is one, then next(ok, err). */
static void with_hook(rollout *r, hook_kind k, double pct, const char *reason,
                      void (*next)(rollout *r, int ok, const char *err)) {
  r->hook_next = next;
  if (r->hooks && r->hooks->run &&
      r->hooks->run(r->hooks->payload, r, k, pct, &r->health, reason, hook_finished))
    return;
  r->hook_next = NULL;
  next(r, 1, NULL);
}

/* A hook that fails once the outcome is decided cannot change it. */
static void note_hook_failure(rollout *r, hook_kind k, const char *err) {
  char data[DC_ERR_MAX + 64], why[DC_ERR_MAX];
  dc_json_string(why, sizeof why, err ? err : "failed");
  dc_fmt(data, sizeof data, "{\"hook\":\"%s\",\"error\":%s}", rollout_hook_name(k), why);
  emit(r, "hook_failed", data);
}

/* ---- operator commands ---- */

static void ctl_closed(uv_handle_t *h) { free(h); }

static void ctl_stop(rollout *r) {
  if (!r->ctl_timer)
    return;
  uv_timer_stop(r->ctl_timer);
  uv_close((uv_handle_t *)r->ctl_timer, ctl_closed);
  r->ctl_timer = NULL;
}

/* Takes a pending "promote" or "abort" for this target ("" when none). */
static void take_control(rollout *r, char *cmd, size_t size) {
  char err[DC_ERR_MAX];
  cmd[0] = '\0';
  if (store_control_take(r->s, r->t->name, cmd, size, err) != 0)
    cmd[0] = '\0';
}

static void put_back_control(rollout *r, const char *cmd) {
  char err[DC_ERR_MAX];
  store_control_set(r->s, r->t->name, cmd, "deployctl", err);
}

static void pause_poll(uv_timer_t *h) {
  rollout *r = h->data;
  char cmd[32], data[128];
  take_control(r, cmd, sizeof cmd);
  if (strcmp(cmd, "promote") == 0) {
    ctl_stop(r);
    r->paused = 0;
    dc_fmt(data, sizeof data, "{\"pct\":%g,\"command\":\"promote\"}", r->run.pct);
    emit(r, "resumed", data);
    complete(r, 1, NULL);
  } else if (strcmp(cmd, "abort") == 0) {
    ctl_stop(r);
    r->paused = 0;
    complete(r, 0, "aborted by the operator (deployctl abort) during the pause");
  }
}

static void act_pause(rollout *r) {
  char data[128];
  dc_fmt(data, sizeof data, "{\"pct\":%g}", r->run.pct);
  emit(r, "paused", data);
  r->paused = 1;
  r->ctl_timer = malloc(sizeof *r->ctl_timer);
  uv_timer_init(r->e->loop, r->ctl_timer);
  r->ctl_timer->data = r;
  uint64_t ms = (uint64_t)(r->control_poll * 1000.0);
  uv_timer_start(r->ctl_timer, pause_poll, 0, ms ? ms : 1);
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

static void complete(rollout *r, int ok, const char *err) {
  r->after_healthy = NULL;
  r->act_ok = ok;
  if (!ok)
    dc_strlcpy(r->act_err, err ? err : "failed", sizeof r->act_err);
  r->mon = MON_NONE;
  r->timer = engine_timer_start(r->e, 0, complete_now, r);
}

/* ---- health rounds ---- */

typedef struct check_round {
  rollout *r;
  size_t n;
  char **urls;
} check_round;

static void round_free(check_round *rd) {
  for (size_t i = 0; i < rd->n; i++)
    free(rd->urls[i]);
  free(rd->urls);
  free(rd);
}

static int dead_instance(rollout *r, char *detail, size_t size) {
  for (size_t i = 0; i < r->nfresh; i++) {
    store_instance *in = &r->fresh[i];
    if (in->pid > 0 && !r->t->provider->alive(r->t->provider, in)) {
      dc_fmt(detail, size, "instance %d of %s (pid %d, port %d) exited; see %s", in->idx,
             r->version, in->pid, in->port, in->log_path);
      return 1;
    }
  }
  return 0;
}

static void round_done(void *payload, const health_result *res, size_t n) {
  check_round *rd = payload;
  rollout *r = rd->r;
  rollout_health *h = &r->health;
  memset(h, 0, sizeof *h);
  h->checked = (int)n;
  for (size_t i = 0; i < n; i++) {
    if (res[i].ok)
      h->ok++;
    else if (res[i].status > 0)
      h->answered_bad = 1;
    if (!res[i].ok && !h->detail[0])
      dc_fmt(h->detail, sizeof h->detail, "%s: %s", res[i].url, res[i].error);
  }
  h->state = health_classify(res, n);
  if (dead_instance(r, h->detail, sizeof h->detail))
    h->state = HEALTH_UNHEALTHY;
  round_free(rd);
  engine_release(r->e);
  r->rounds--;
  rollout_health_cb cb = r->health_cb;
  r->health_cb = NULL;
  if (r->freed_later) {
    /* The rollout ended while this round was out (a hook's d:health()). */
    if (cb)
      cb(r->health_payload, h);
    if (r->rounds == 0)
      free(r);
    return;
  }
  if (cb)
    cb(r->health_payload, h);
}

void rollout_check_health(rollout *r, rollout_health_cb cb, void *payload) {
  char err[DC_ERR_MAX];
  check_round *rd = calloc(1, sizeof *rd);
  size_t cap = r->nfresh * 2;
  rd->r = r;
  rd->urls = calloc(cap ? cap : 1, sizeof *rd->urls);
  for (size_t i = 0; i < r->nfresh; i++) {
    char url[768];
    target_instance_url(r->t, &r->fresh[i], url, sizeof url);
    rd->urls[rd->n++] = strdup(url);
    if (r->st && r->st->health_check_url[0]) {
      char port[16];
      dc_fmt(port, sizeof port, "%d", r->fresh[i].port);
      const char *pairs[] = {"host", r->fresh[i].host, "port", port, "target", r->t->name,
                             "version", r->version, NULL};
      dc_expand_placeholders(url, sizeof url, r->st->health_check_url, pairs);
      rd->urls[rd->n++] = strdup(url);
    }
  }
  r->health_cb = cb;
  r->health_payload = payload;
  r->rounds++;
  engine_hold(r->e);
  health_opts o = {.timeout = r->t->health.timeout, .expect_status = r->t->health.expect_status};
  if (health_check_start(r->e, (const char *const *)rd->urls, rd->n, &o, round_done, rd, err) != 0) {
    health_result none;
    memset(&none, 0, sizeof none);
    none.url = "health";
    dc_strlcpy(none.error, err, sizeof none.error);
    round_done(rd, &none, 1);
  }
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
  if (r->mon != MON_HEALTHY && r->mon_deadline - now < next)
    next = r->mon_deadline - now;
  if (next < 0)
    next = 0;
  r->timer = engine_timer_start(r->e, next, monitor_tick, r);
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
   * failure; an instance that answers with the wrong status is. */
  int counted = !ok && (r->mon != MON_HEALTHY || h->answered_bad);
  if (counted) {
    r->mon_failures++;
    char data[DC_ERR_MAX + 64], detail[DC_ERR_MAX];
    dc_json_string(detail, sizeof detail, h->detail);
    dc_fmt(data, sizeof data, "{\"state\":\"%s\",\"consecutive\":%d,\"ok\":%d,\"checked\":%d,\"detail\":%s}",
           health_state_name(h->state), r->mon_failures, h->ok, h->checked, detail);
    emit(r, "health_failed", data);
  } else if (r->mon == MON_HEALTHY) {
    r->mon_failures = 0;
  }
  switch (r->mon) {
  case MON_HEALTHY:
    if (ok) {
      char data[64];
      dc_fmt(data, sizeof data, "{\"checked\":%d}", h->checked);
      emit(r, "healthy", data);
      if (r->after_healthy) {
        void (*next)(rollout *) = r->after_healthy;
        r->after_healthy = NULL;
        r->mon = MON_NONE;
        next(r);
        return;
      }
      complete(r, 1, NULL);
    } else if (strstr(h->detail, " exited; see ")) {
      complete(r, 0, h->detail);
    } else if (r->mon_failures >= r->t->health.failure_threshold) {
      dc_fmt(msg, sizeof msg, "new instances of %s unhealthy after %d consecutive failed checks: %s", r->version,
             r->mon_failures, h->detail);
      complete(r, 0, msg);
    } else if (now >= r->mon_deadline) {
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
    if (r->mon_failures >= r->t->health.failure_threshold || strstr(h->detail, " exited; see ")) {
      dc_fmt(msg, sizeof msg, "unhealthy after %d consecutive failed checks: %s", r->mon_failures, h->detail);
      complete(r, 0, msg);
    } else if (r->mon == MON_VERIFY && ok) {
      char data[64];
      dc_fmt(data, sizeof data, "{\"checked\":%d}", h->checked);
      emit(r, "verified", data);
      step_passed(r);
    } else if (r->mon == MON_GATED && now >= r->mon_deadline) {
      step_passed(r);
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
  r->mon = MON_NONE;
  with_hook(r, HOOK_AFTER_STEP, r->run.pct, NULL, after_step_done);
}

/* Operator commands seen while waiting: abort at any moment; promote ends
 * a timed wait early (the next step comes now). */
static int monitor_controls(rollout *r) {
  char cmd[32];
  take_control(r, cmd, sizeof cmd);
  if (strcmp(cmd, "abort") == 0) {
    rollout_abort(r, "aborted by the operator (deployctl abort)");
    complete(r, 0, r->abort_reason);
    return 1;
  }
  if (strcmp(cmd, "promote") == 0) {
    if (r->mon == MON_GATED) {
      char data[96];
      dc_fmt(data, sizeof data, "{\"pct\":%g,\"command\":\"promote\"}", r->run.pct);
      emit(r, "resumed", data);
      step_passed(r);
      return 1;
    }
    put_back_control(r, cmd);
  }
  return 0;
}

static void monitor_tick(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  if (monitor_controls(r))
    return;
  rollout_check_health(r, monitor_observed, r);
}

static void monitor_start(rollout *r, enum monitor_mode mode, double seconds) {
  r->mon = mode;
  r->mon_failures = 0;
  r->mon_deadline = engine_now(r->e) + seconds;
  if (mode == MON_GATED) {
    if (seconds <= 0) {
      step_passed(r);
      return;
    }
    monitor_schedule(r);
    return;
  }
  monitor_tick(r);
}

/* ---- START ---- */

static int start_one(rollout *r, int idx, char *err) {
  store_instance *in = &r->fresh[r->nfresh];
  memset(in, 0, sizeof *in);
  dc_strlcpy(in->target, r->t->name, sizeof in->target);
  dc_strlcpy(in->deployment_id, r->id, sizeof in->deployment_id);
  dc_strlcpy(in->version, r->version, sizeof in->version);
  dc_strlcpy(in->state, "starting", sizeof in->state);
  in->idx = idx;
  provider *p = r->t->provider;
  if (p->allocate(p, r->s, in, err) != 0)
    return -1;
  if (store_instance_add(r->s, in, err) != 0)
    return -1;
  r->nfresh++;
  dc_fmt(in->server, sizeof in->server, "dc_%lld", (long long)in->id);
  if (p->start(p, in, err) != 0) {
    char ignored[DC_ERR_MAX];
    dc_strlcpy(in->state, "stopped", sizeof in->state);
    store_instance_update(r->s, in, ignored);
    return -1;
  }
  if (store_instance_update(r->s, in, err) != 0)
    return -1;
  char data[512];
  dc_fmt(data, sizeof data, "{\"instance\":%d,\"host\":\"%s\",\"port\":%d,\"pid\":%d,\"server\":\"%s\"}",
         in->idx, in->host, in->port, in->pid, in->server);
  emit(r, "instance_started", data);
  return 0;
}

/* Without a router that can weigh servers, the new version's share follows
 * the instance ratio (as Argo Rollouts does without a mesh): one new
 * instance first, more as the share grows, the old set whole until
 * promotion. */
static int by_ratio(const rollout *r) { return strcmp(r->t->router->kind, "none") == 0 && r->nold > 0; }

static int grow_fresh(rollout *r, size_t n) {
  if (r->nfresh + n <= r->fresh_cap)
    return 0;
  size_t cap = r->nfresh + n;
  store_instance *grown = realloc(r->fresh, cap * sizeof *grown);
  if (!grown)
    return -1;
  r->fresh = grown;
  r->fresh_cap = cap;
  return 0;
}

static void act_start(rollout *r, int n) {
  char err[DC_ERR_MAX];
  if (n <= 0 && by_ratio(r) && r->nfresh == 0)
    n = 1;
  /* Starting what is already there is a no-op, so a built-in strategy can
   * take over from a Lua strategy that started the instances itself. */
  if (n <= 0) {
    n = r->t->instances - (int)r->nfresh;
    if (n <= 0) {
      complete(r, 1, NULL);
      return;
    }
  }
  if (grow_fresh(r, (size_t)n) != 0) {
    complete(r, 0, "deploy: out of memory");
    return;
  }
  int base = (int)r->nfresh;
  for (int i = 0; i < n; i++) {
    if (start_one(r, base + i, err) != 0) {
      complete(r, 0, err);
      return;
    }
  }
  complete(r, 1, NULL);
}

/* ---- TRAFFIC ---- */

typedef struct traffic {
  rollout *r;
  double pct;
  int w_old, w_new;
} traffic;

static size_t build_servers(rollout *r, router_server *out, int w_old, int w_new,
                            int with_old, int with_new) {
  size_t n = 0;
  for (size_t i = 0; with_old && i < r->nold; i++) {
    dc_strlcpy(out[n].name, r->old[i].server, sizeof out[n].name);
    dc_strlcpy(out[n].host, r->old[i].host, sizeof out[n].host);
    out[n].port = r->old[i].port;
    out[n++].weight = w_old;
  }
  for (size_t i = 0; with_new && i < r->nfresh; i++) {
    dc_strlcpy(out[n].name, r->fresh[i].server, sizeof out[n].name);
    dc_strlcpy(out[n].host, r->fresh[i].host, sizeof out[n].host);
    out[n].port = r->fresh[i].port;
    out[n++].weight = w_new;
  }
  return n;
}

static void split(rollout *r, double pct, int *w_old, int *w_new) {
  if (r->nold == 0) {
    *w_old = 0;
    *w_new = pct > 0 ? 1 : 0;
    return;
  }
  router_split_weights(pct, (int)r->nold, (int)r->nfresh, w_old, w_new);
}

static void save_weights(rollout *r, int w_old, int w_new) {
  char err[DC_ERR_MAX];
  for (size_t i = 0; i < r->nold; i++) {
    r->old[i].weight = w_old;
    store_instance_update(r->s, &r->old[i], err);
  }
  for (size_t i = 0; i < r->nfresh; i++) {
    r->fresh[i].weight = w_new;
    store_instance_update(r->s, &r->fresh[i], err);
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
  save_weights(r, tr->w_old, tr->w_new);
  char data[256];
  dc_fmt(data, sizeof data, "{\"pct\":%g,\"weight_old\":%d,\"weight_new\":%d,\"old\":%zu,\"new\":%zu,\"step\":%d,\"steps\":%d}",
         tr->pct, tr->w_old, tr->w_new, r->nold, r->nfresh, r->run.step, r->run.steps);
  emit(r, "traffic", data);
  free(tr);
  complete(r, 1, NULL);
}

static void traffic_now(rollout *r, double pct);

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

static void act_traffic(rollout *r, double pct) {
  with_hook(r, HOOK_BEFORE_STEP, pct, NULL, before_step_done);
}

static void ratio_reached(rollout *r) {
  char data[256];
  double pct = r->ratio_pct;
  double effective = 100.0 * (double)r->nfresh / (double)(r->nfresh + r->nold);
  r->run.pct = pct;
  dc_fmt(data, sizeof data,
         "{\"pct\":%g,\"effective\":%.2f,\"weight_old\":1,\"weight_new\":1,\"old\":%zu,\"new\":%zu,"
         "\"step\":%d,\"steps\":%d,\"router\":\"none\"}",
         pct, effective, r->nold, r->nfresh, r->run.step, r->run.steps);
  emit(r, "traffic", data);
  complete(r, 1, NULL);
}

static void traffic_by_ratio(rollout *r, double pct) {
  char err[DC_ERR_MAX];
  int total = r->t->instances;
  size_t want = pct <= 0 ? 0 : (size_t)ceil(total * pct / 100.0 - 1e-9);
  if (pct > 0 && want < 1)
    want = 1;
  r->ratio_pct = pct;
  if (want <= r->nfresh) {
    ratio_reached(r);
    return;
  }
  size_t more = want - r->nfresh;
  if (grow_fresh(r, more) != 0) {
    complete(r, 0, "deploy: out of memory");
    return;
  }
  int base = (int)r->nfresh;
  for (size_t i = 0; i < more; i++) {
    if (start_one(r, base + (int)i, err) != 0) {
      complete(r, 0, err);
      return;
    }
  }
  r->after_healthy = ratio_reached;
  monitor_start(r, MON_HEALTHY, r->t->health.start_timeout);
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
  if (r->nfresh == 0 && pct > 0) {
    complete(r, 0, "cannot send traffic to the new version: no instance of it was started");
    return;
  }
  traffic *tr = calloc(1, sizeof *tr);
  tr->r = r;
  tr->pct = pct;
  split(r, pct, &tr->w_old, &tr->w_new);
  router_server *servers = calloc(r->nold + r->nfresh + 1, sizeof *servers);
  /* A server at weight 0 stays registered (it may get traffic back); only
   * promotion and abort retire a whole set. */
  size_t n = build_servers(r, servers, tr->w_old, tr->w_new, 1, 1);
  engine_hold(r->e);
  int rc = r->t->router->apply(r->t->router, servers, n, traffic_applied, tr, err);
  free(servers);
  if (rc != 0) {
    engine_release(r->e);
    free(tr);
    complete(r, 0, err);
  }
}

/* ---- stopping a set of instances ---- */

typedef struct stopping {
  rollout *r;
  store_instance inst;
  void (*then)(rollout *r);
} stopping;

static void stopped_one(void *payload, const char *err) {
  stopping *sp = payload;
  rollout *r = sp->r;
  engine_release(r->e);
  char e2[DC_ERR_MAX], data[DC_ERR_MAX + 300];
  if (err && r->promoting) {
    /* The new version serves already: a stubborn old process is worth an
     * event, not a failed deployment. */
    char why[DC_ERR_MAX];
    dc_json_string(why, sizeof why, err);
    dc_fmt(data, sizeof data, "{\"pid\":%d,\"error\":%s}", sp->inst.pid, why);
    emit(r, "stop_failed", data);
  } else if (err) {
    add_error(r, err);
  } else {
    store_instance_delete(r->s, sp->inst.id, e2);
  }
  dc_fmt(data, sizeof data, "{\"version\":\"%s\",\"instance\":%d,\"pid\":%d,\"port\":%d}", sp->inst.version,
         sp->inst.idx, sp->inst.pid, sp->inst.port);
  emit(r, "instance_stopped", data);
  void (*then)(rollout *) = sp->then;
  free(sp);
  if (--r->stops_pending == 0)
    then(r);
}

/* Stops every instance in both sets; `then` runs once all are gone. */
static void stop_sets(rollout *r, store_instance *a, size_t na, store_instance *b, size_t nb,
                      void (*then)(rollout *r)) {
  char err[DC_ERR_MAX];
  r->stops_pending = 1; /* held until every stop is issued */
  for (size_t k = 0; k < na + nb; k++) {
    store_instance *in = k < na ? &a[k] : &b[k - na];
    stopping *sp = calloc(1, sizeof *sp);
    sp->r = r;
    sp->inst = *in;
    sp->then = then;
    dc_strlcpy(in->state, "stopping", sizeof in->state);
    store_instance_update(r->s, in, err);
    r->stops_pending++;
    engine_hold(r->e);
    if (r->t->provider->stop(r->t->provider, in, stopped_one, sp, err) != 0) {
      engine_release(r->e);
      add_error(r, err);
      free(sp);
      r->stops_pending--;
    }
  }
  if (--r->stops_pending == 0)
    then(r);
}

/* ---- PROMOTE ---- */

static void on_promote_done(rollout *r, int ok, const char *err) {
  if (!ok)
    note_hook_failure(r, HOOK_ON_PROMOTE, err);
  end_rollout(r);
}

static void promoted_stopped(rollout *r) {
  r->promoted = 1;
  with_hook(r, HOOK_ON_PROMOTE, 100, NULL, on_promote_done);
}

static void act_abort(rollout *r, const char *reason);

static void promote_applied(void *payload, const char *err) {
  rollout *r = payload;
  char msg[DC_ERR_MAX];
  engine_release(r->e);
  if (err) {
    dc_fmt(msg, sizeof msg, "cannot promote %s: %s", r->version, err);
    act_abort(r, msg);
    return;
  }
  /* Committed before anything old stops: from here on, a crash recovers
   * to the new version. */
  if (store_deployment_promote(r->s, r->id, msg) != 0) {
    act_abort(r, msg);
    return;
  }
  r->promoting = 1;
  char data[320];
  dc_fmt(data, sizeof data, "{\"version\":\"%s\",\"from\":\"%s\"}", r->version, r->from_version);
  emit(r, "promoted", data);
  stop_sets(r, r->old, r->nold, r->strays, r->nstray, promoted_stopped);
}

static void act_promote(rollout *r) {
  char err[DC_ERR_MAX];
  int w_old, w_new;
  if (r->nfresh == 0) {
    act_abort(r, "nothing to promote: no instance of the new version was started");
    return;
  }
  r->ending = 1;
  split(r, 100, &w_old, &w_new);
  if (w_new == 0)
    w_new = 1;
  router_server *servers = calloc(r->nfresh + 1, sizeof *servers);
  size_t n = build_servers(r, servers, 0, w_new, 0, 1);
  engine_hold(r->e);
  int rc = r->t->router->apply(r->t->router, servers, n, promote_applied, r, err);
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

static void aborted_stopped(rollout *r) {
  with_hook(r, HOOK_ON_ABORT, r->abort_pct, r->result.nerrors ? r->result.errors[0] : "aborted", on_abort_done);
}

static void on_rollback_done(rollout *r, int ok, const char *err) {
  if (!ok)
    note_hook_failure(r, HOOK_ON_ROLLBACK, err);
  stop_sets(r, r->fresh, r->nfresh, r->strays, r->nstray, aborted_stopped);
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
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "while returning traffic to the old version: %s", err);
    add_error(r, msg);
    /* If the proxy ever sent the new instances traffic, it may still: they
     * keep running, as strays the next rollout or reconcile stops. */
    if (r->routed_new) {
      aborted_stopped(r);
      return;
    }
  } else {
    r->run.pct = 0;
    save_weights(r, r->nold ? 1 : 0, 0);
    if (r->abort_pct > 0 && r->nold > 0) {
      char data[64];
      dc_fmt(data, sizeof data, "{\"from_pct\":%g}", r->abort_pct);
      emit(r, "rolled_back", data);
      with_hook(r, HOOK_ON_ROLLBACK, r->abort_pct, NULL, on_rollback_done);
      return;
    }
  }
  stop_sets(r, r->fresh, r->nfresh, r->strays, r->nstray, aborted_stopped);
}

static void act_abort(rollout *r, const char *reason) {
  char err[DC_ERR_MAX], data[DC_ERR_MAX + 64], why[DC_ERR_MAX];
  r->ending = 1;
  r->abort_pct = r->run.pct;
  ctl_stop(r);
  add_error(r, reason);
  dc_json_string(why, sizeof why, reason);
  dc_fmt(data, sizeof data, "{\"reason\":%s,\"pct\":%g}", why, r->run.pct);
  emit(r, "aborted", data);
  (void)err;
  abort_apply(r);
}

static void abort_apply(rollout *r) {
  char err[DC_ERR_MAX];
  router_server *servers = calloc(r->nold + 1, sizeof *servers);
  /* Equal weights on the old set: 100 % back in one step. */
  size_t n = build_servers(r, servers, 1, 0, 1, 0);
  engine_hold(r->e);
  int rc = r->t->router->apply(r->t->router, servers, n, abort_applied, r, err);
  free(servers);
  if (rc != 0)
    abort_applied(r, err);
}

/* ---- the end ---- */

static void end_rollout(rollout *r) {
  char err[DC_ERR_MAX], errors[ROLLOUT_MAX_ERRORS * DC_ERR_MAX + 16];
  double now = engine_now(r->e);
  r->result.success = r->promoted && r->result.nerrors == 0;
  r->result.duration = now - r->started;
  size_t len = 0;
  errors[len++] = '[';
  for (int i = 0; i < r->result.nerrors; i++) {
    char item[DC_ERR_MAX + 8];
    dc_json_string(item, sizeof item, r->result.errors[i]);
    len += (size_t)snprintf(errors + len, sizeof errors - len, "%s%s", i ? "," : "", item);
    if (len >= sizeof errors - 2)
      break;
  }
  dc_fmt(errors + len, sizeof errors - len, "]");
  const char *status = r->promoted ? "succeeded" : "failed";
  const char *tstatus = r->promoted ? "deployed" : "failed";
  const char *thealth = r->promoted ? health_state_name(r->health.state) : (r->nold ? "healthy" : "unhealthy");
  /* The promotion itself was committed by store_deployment_promote. */
  if (store_deployment_finish(r->s, r->id, status, r->result.nerrors ? errors : NULL, now,
                              r->result.duration, 0, tstatus, thealth, err) != 0)
    add_error(r, err);
  char data[128];
  dc_fmt(data, sizeof data, "{\"success\":%s,\"duration\":%.3f}", r->result.success ? "true" : "false",
         r->result.duration);
  emit(r, "finished", data);

  /* The action that ended the rollout hears of it first (a Lua strategy
   * resumes), then the owner of the rollout. */
  r->act_ok = r->promoted;
  if (!r->promoted)
    dc_strlcpy(r->act_err, r->result.nerrors ? r->result.errors[0] : "aborted", sizeof r->act_err);
  rollout_action_cb cb = r->act_cb;
  r->act_cb = NULL;
  if (cb)
    cb(r->act_payload, r->act_ok, r->act_ok ? NULL : r->act_err);
  ctl_stop(r);
  if (r->done)
    r->done(r->done_payload, &r->result);
  free(r->old);
  free(r->fresh);
  free(r->strays);
  r->old = r->fresh = r->strays = NULL;
  if (r->rounds > 0) {
    r->freed_later = 1;
    return;
  }
  free(r);
}

/* ---- actions ---- */

void rollout_action(rollout *r, const strategy_action *a, rollout_action_cb cb, void *payload) {
  /* One action at a time: a refusal must not touch the one in progress. */
  if (r->ending || r->hook_next) {
    if (cb)
      cb(payload, 0, r->ending ? "the deployment is ending" : "actions cannot be started from a hook");
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
    if (r->nfresh == 0) {
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
}

static void stepped(void *payload, int ok, const char *err) {
  rollout *r = payload;
  if (r->ending)
    return;
  r->run.last_ok = ok;
  dc_strlcpy(r->run.last_error, err ? err : "", sizeof r->run.last_error);
  run_step(r);
}

static void run_step(rollout *r) {
  strategy_action a;
  r->st->step(r->st, &r->run, &a);
  rollout_action(r, &a, stepped, r);
}

static void begin_after_hook(rollout *r, int ok, const char *err) {
  char msg[DC_ERR_MAX];
  rollout_action_cb cb = r->act_cb;
  void *payload = r->act_payload;
  r->act_cb = NULL;
  if (!ok)
    dc_fmt(msg, sizeof msg, "before_deploy hook failed: %s", err ? err : "returned false");
  cb(payload, ok, ok ? NULL : msg);
}

void rollout_begin(rollout *r, rollout_action_cb cb, void *payload) {
  r->act_cb = cb;
  r->act_payload = payload;
  with_hook(r, HOOK_BEFORE_DEPLOY, 0, NULL, begin_after_hook);
}

static void steps_begun(void *payload, int ok, const char *err) {
  rollout *r = payload;
  if (!ok) {
    strategy_action a;
    memset(&a, 0, sizeof a);
    a.kind = ACTION_ABORT;
    dc_strlcpy(a.reason, err, sizeof a.reason);
    rollout_action(r, &a, stepped, r);
    return;
  }
  run_step(r);
}

static void begin_steps(void *payload) {
  rollout *r = payload;
  r->timer = NULL;
  rollout_begin(r, steps_begun, r);
}

void rollout_next_action(rollout *r, const strategy *st, strategy_action *out) { st->step(st, &r->run, out); }

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
  if (r->paused) {
    ctl_stop(r);
    r->paused = 0;
    complete(r, 0, r->abort_reason);
    return;
  }
  /* A pending wait ends now instead of at its deadline. */
  if (r->mon != MON_NONE && r->timer && !r->health_cb) {
    engine_timer_cancel(r->timer);
    r->timer = NULL;
    complete(r, 0, r->abort_reason);
  }
}

void rollout_log(rollout *r, const char *kind, const char *data_json) { emit(r, kind, data_json); }


/* ---- start ---- */

typedef struct sets {
  rollout *r;
  const char *live;
  char err[DC_ERR_MAX];
  int failed;
} sets;

static int push(store_instance **arr, size_t *n, const store_instance *in) {
  store_instance *grown = realloc(*arr, (*n + 1) * sizeof *grown);
  if (!grown)
    return -1;
  *arr = grown;
  grown[(*n)++] = *in;
  return 0;
}

static int classify_instance(void *payload, const store_instance *in) {
  sets *st = payload;
  rollout *r = st->r;
  int live = st->live[0] && strcmp(in->deployment_id, st->live) == 0 && strcmp(in->state, "stopped") != 0;
  if (push(live ? &r->old : &r->strays, live ? &r->nold : &r->nstray, in) != 0) {
    st->failed = 1;
    return 1;
  }
  return 0;
}

int rollout_start(rollout **out, engine *e, store *s, target_config *t, const strategy *st,
                  const rollout_opts *o, rollout_done_cb cb, void *payload, char *err) {
  *out = NULL;
  if (dc_validate_version(o->version, "version", err) != 0)
    return DC_ERROR;
  store_target tg;
  if (store_target_get(s, t->name, &tg, err) != 0)
    return DC_ERROR;
  rollout *r = calloc(1, sizeof *r);
  if (!r) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return DC_ERROR;
  }
  r->e = e;
  r->s = s;
  r->t = t;
  r->st = st;
  r->done = cb;
  r->done_payload = payload;
  r->on_event = o->on_event;
  r->event_payload = o->event_payload;
  r->hooks = o->hooks;
  r->control_poll = o->control_poll > 0 ? o->control_poll : 0.2;
  if (o->id && *o->id)
    dc_strlcpy(r->id, o->id, sizeof r->id);
  else
    dc_new_id(r->id, sizeof r->id);
  dc_strlcpy(r->version, o->version, sizeof r->version);
  dc_strlcpy(r->from_version, tg.current_version, sizeof r->from_version);
  dc_strlcpy(r->kind, o->kind ? o->kind : "deploy", sizeof r->kind);
  dc_strlcpy(r->strategy_name, o->strategy_name ? o->strategy_name : (st ? st->name : "custom"),
             sizeof r->strategy_name);
  r->started = o->created_at > 0 ? o->created_at : engine_now(e);
  r->run.last_ok = 1;

  store_deployment d;
  memset(&d, 0, sizeof d);
  dc_strlcpy(d.id, r->id, sizeof d.id);
  dc_strlcpy(d.target, t->name, sizeof d.target);
  dc_strlcpy(d.version, r->version, sizeof d.version);
  dc_strlcpy(d.from_version, tg.current_version, sizeof d.from_version);
  dc_strlcpy(d.kind, r->kind, sizeof d.kind);
  dc_strlcpy(d.strategy, r->strategy_name, sizeof d.strategy);
  dc_strlcpy(d.status, "running", sizeof d.status);
  d.created_at = r->started;
  d.metadata = (char *)o->metadata_json;
  d.owner_pid = (int)getpid();
  d.owner_start = dc_proc_start_time(d.owner_pid);
  gethostname(d.owner_host, sizeof d.owner_host - 1);
  dc_whoami(d.user, sizeof d.user);
  int rc = store_deployment_begin(s, &d, err);
  if (rc != 0) {
    free(r);
    return rc;
  }
  dc_strlcpy(r->result.id, r->id, sizeof r->result.id);
  dc_strlcpy(r->result.target, t->name, sizeof r->result.target);
  dc_strlcpy(r->result.version, r->version, sizeof r->result.version);
  dc_strlcpy(r->result.strategy, r->strategy_name, sizeof r->result.strategy);

  sets sc = {.r = r, .live = tg.live_deployment};
  if (store_instances(s, t->name, classify_instance, &sc, err) != 0 || sc.failed) {
    if (sc.failed)
      dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    store_deployment_finish(s, r->id, "failed", NULL, engine_now(e), 0, 0, "failed", "unhealthy", sc.err);
    free(r->old);
    free(r->strays);
    free(r);
    return DC_ERROR;
  }
  r->run.has_old = r->nold > 0;
  char data[600], v[160], from[160];
  dc_json_string(v, sizeof v, r->version);
  dc_json_string(from, sizeof from, r->from_version);
  dc_fmt(data, sizeof data, "{\"version\":%s,\"from\":%s,\"strategy\":\"%s\",\"kind\":\"%s\",\"user\":\"%s\"}", v,
         from, r->strategy_name, r->kind, d.user);
  emit(r, "started", data);
  *out = r;
  if (st)
    r->timer = engine_timer_start(e, 0, begin_steps, r);
  return DC_OK;
}
