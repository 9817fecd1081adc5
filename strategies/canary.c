/* Canary: start the new instances, wait until healthy, then give them
 * initial_percentage of the traffic and add `increment` every `interval`
 * seconds while they stay healthy (and analysis passes). 100 % is held for
 * `interval` too, the old instances still running at weight 0, before the
 * promotion stops them: a failure there goes back in one router change.
 * Any failure aborts: traffic back to 100 % old in one step.
 *
 * Run from a Lua strategy that already moved some traffic (a 5 % dark
 * launch, then canary:execute(d)), it continues from that share: its
 * first step is the larger of initial_percentage and the share now plus
 * increment, so it never goes back down. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "strategy.h"
#include "util.h"

enum { START, WAIT_HEALTHY, FIRST_SHIFT, SHIFT, PAUSE, HOLD, BAKE, VERIFY, PROMOTE, DONE };

void canary_params_default(canary_params *p) {
  p->initial_percentage = 10;
  p->increment = 10;
  p->interval = 300;
  p->health_check_url = NULL;
  p->npause = 0;
  memset(&p->routes, 0, sizeof p->routes);
  p->analysis = NULL;
}

/* The first share this canary gives: initial_percentage, or more when the
 * rollout already serves the new version some traffic. */
static double first_share(const canary_strategy *c, double now) {
  double next = now > 0 ? now + c->increment : c->initial_percentage;
  if (next < c->initial_percentage)
    next = c->initial_percentage;
  return next > 100 ? 100 : next;
}

/* Traffic steps from the share `first` up to 100 %, both included, in
 * double: with an increment such as 1e-300 the count is far beyond an int,
 * and the share never moves (10 + 1e-300 == 10), so strategy_canary_new
 * refuses more than CANARY_MAX_STEPS before steps_from ever converts it. */
static double step_count(double first, double increment) {
  if (first >= 100)
    return 1;
  return 1 + ceil((100.0 - first) / increment - 1e-9);
}

static int steps_from(const canary_strategy *c, double first) { return (int)step_count(first, c->increment); }

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
  /* Before the first shift: every step ahead; after it, the steps taken
   * plus those left from the share now. */
  if (!run->has_old)
    run->steps = 1;
  else if (run->phase <= FIRST_SHIFT)
    run->steps = run->step + steps_from(c, first_share(c, run->pct));
  else
    run->steps = run->step + (run->pct >= 100 ? 0 : steps_from(c, run->pct + c->increment));
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
    run->phase = FIRST_SHIFT;
    return;
  case FIRST_SHIFT:
  case SHIFT: {
    /* A first deploy has nothing to compare against: all traffic at once. */
    double next = !run->has_old ? 100
                  : run->phase == FIRST_SHIFT ? first_share(c, run->pct)
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
  double steps = step_count(p->initial_percentage, p->increment);
  if (steps > CANARY_MAX_STEPS) {
    dc_fmt(err, DC_ERR_MAX,
           "deploy: CanaryStrategy increment %g takes %.4g steps from initial_percentage %g to 100 %%: at most %d "
           "are allowed (raise increment)", p->increment, steps, p->initial_percentage, CANARY_MAX_STEPS);
    return -1;
  }
  if (!(p->interval >= 0 && p->interval < 1e9)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: CanaryStrategy interval must be a number of seconds >= 0, got %g", p->interval);
    return -1;
  }
  if (strategy_check_url(p->health_check_url, "CanaryStrategy health_check_url", err) ||
      strategy_check_routes(&p->routes, "CanaryStrategy", 1, err))
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
  c->base.routes = p->routes;
  c->npause = p->npause < CANARY_MAX_PAUSES ? p->npause : CANARY_MAX_PAUSES;
  memcpy(c->pause_at, p->pause_at, sizeof c->pause_at);
  *out = &c->base;
  return 0;
}
