/* Canary: start the new instances, wait until healthy, then give them
 * initial_percentage of the traffic and add `increment` every `interval`
 * seconds while they stay healthy (and analysis passes). 100 % is held for
 * `interval` too, the old instances still running at weight 0, before the
 * promotion stops them: a failure there goes back in one router change.
 * Any failure aborts: traffic back to 100 % old in one step. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "strategy.h"
#include "util.h"

enum { START, WAIT_HEALTHY, SHIFT, PAUSE, HOLD, BAKE, VERIFY, PROMOTE, DONE };

void canary_params_default(canary_params *p) {
  p->initial_percentage = 10;
  p->increment = 10;
  p->interval = 300;
  p->health_check_url = NULL;
  p->npause = 0;
  p->analysis = NULL;
}

static int steps_of(const canary_strategy *c) {
  if (c->initial_percentage >= 100)
    return 1;
  return 1 + (int)ceil((100.0 - c->initial_percentage) / c->increment - 1e-9);
}

static int pauses_at(const canary_strategy *c, double pct) {
  for (int i = 0; i < c->npause; i++)
    if (c->pause_at[i] > 0 && fabs(c->pause_at[i] - pct) < 1e-9)
      return 1;
  return 0;
}

static void abort_with(strategy_run *run, strategy_action *out, const char *why) {
  out->kind = ACTION_ABORT;
  if (run->pct > 0)
    dc_fmt(out->reason, sizeof out->reason, "canary aborted at %g %%: %s", run->pct, why);
  else
    dc_fmt(out->reason, sizeof out->reason, "canary aborted before any traffic moved: %s", why);
  run->phase = DONE;
}

/* After the last shift: the hold at 100 % (the bake) when there is an old
 * set to go back to and an interval to hold for; else one check. */
static int at_full(const canary_strategy *c, const strategy_run *run) {
  return run->has_old && c->interval > 0 ? BAKE : VERIFY;
}

static void canary_step(const strategy *s, strategy_run *run, strategy_action *out) {
  const canary_strategy *c = (const canary_strategy *)s;
  memset(out, 0, sizeof *out);
  run->steps = run->has_old ? steps_of(c) : 1;
  if (run->phase != START && !run->last_ok && run->phase != DONE) {
    abort_with(run, out, run->last_error);
    return;
  }
  switch (run->phase) {
  case START:
    out->kind = ACTION_START;
    run->phase = WAIT_HEALTHY;
    return;
  case WAIT_HEALTHY:
    out->kind = ACTION_WAIT_HEALTHY;
    run->phase = SHIFT;
    return;
  case SHIFT: {
    /* A first deploy has nothing to compare against: all traffic at once. */
    double next = !run->has_old ? 100
                  : run->pct <= 0 ? c->initial_percentage
                                  : run->pct + c->increment;
    out->kind = ACTION_TRAFFIC;
    out->pct = next > 100 ? 100 : next;
    run->step++;
    run->phase = pauses_at(c, out->pct) ? PAUSE : out->pct >= 100 ? at_full(c, run) : HOLD;
    return;
  }
  case PAUSE:
    out->kind = ACTION_PAUSE;
    run->phase = run->pct >= 100 ? at_full(c, run) : HOLD;
    return;
  case BAKE:
    out->kind = ACTION_WAIT;
    out->seconds = c->interval;
    run->phase = PROMOTE;
    return;
  case HOLD:
    out->kind = c->interval > 0 ? ACTION_WAIT : ACTION_VERIFY;
    out->seconds = c->interval;
    run->phase = SHIFT;
    return;
  case VERIFY:
    out->kind = ACTION_VERIFY;
    run->phase = PROMOTE;
    return;
  case PROMOTE:
    out->kind = ACTION_PROMOTE;
    run->phase = DONE;
    return;
  default:
    abort_with(run, out, "step machine ran past its end");
    return;
  }
}

static void canary_free(strategy *s) {
  analysis_spec_free(((canary_strategy *)s)->analysis);
  free(s);
}

static int check_pct(double v, const char *name, char *err) {
  if (!(v > 0 && v <= 100)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy %s must be in (0, 100], got %g", name, v);
    return -1;
  }
  return 0;
}

int strategy_canary_new(strategy **out, const canary_params *p, char *err) {
  *out = NULL;
  if (check_pct(p->initial_percentage, "initial_percentage", err) ||
      check_pct(p->increment, "increment", err))
    return -1;
  if (!(p->interval >= 0 && p->interval < 1e9)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy interval must be a number of seconds >= 0, got %g", p->interval);
    return -1;
  }
  if (strategy_check_url(p->health_check_url, "CanaryStrategy health_check_url", err))
    return -1;
  for (int i = 0; i < p->npause; i++)
    if (!(p->pause_at[i] > 0 && p->pause_at[i] <= 100)) {
      dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy pause_at[%d] must be a percentage in (0, 100], got %g", i + 1,
             p->pause_at[i]);
      return -1;
    }
  analysis_spec *an = NULL;
  if (p->analysis && analysis_spec_parse(&an, p->analysis, "CanaryStrategy analysis", err) != 0)
    return -1;
  canary_strategy *c = calloc(1, sizeof *c);
  if (!c) {
    analysis_spec_free(an);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  c->analysis = an;
  c->base.analysis = an;
  c->base.version = STRATEGY_VERSION;
  c->base.name = "canary";
  c->base.step = canary_step;
  c->base.free = canary_free;
  dc_strlcpy(c->base.health_check_url, p->health_check_url ? p->health_check_url : "", sizeof c->base.health_check_url);
  c->initial_percentage = p->initial_percentage;
  c->increment = p->increment;
  c->interval = p->interval;
  c->npause = p->npause < CANARY_MAX_PAUSES ? p->npause : CANARY_MAX_PAUSES;
  memcpy(c->pause_at, p->pause_at, sizeof c->pause_at);
  *out = &c->base;
  return 0;
}
