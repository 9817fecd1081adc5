/* Blue-green: start green beside blue, wait until healthy, wait
 * switch_delay, move 100 % of the traffic in one step, verify, keep blue
 * running (at weight 0) for scale_down_delay while green is watched, then
 * promote (blue stops). Green never healthy: blue keeps the traffic.
 * Unhealthy after the switch, in that window included: straight back to
 * blue in one step, a router change, no restart. */
#include <stdlib.h>
#include <string.h>

#include "strategy.h"
#include "util.h"

enum { START, WAIT_HEALTHY, DELAY, SWITCH, VERIFY, SCALE_DOWN_DELAY, PROMOTE, DONE };

void bluegreen_params_default(bluegreen_params *p) {
  p->switch_delay = 0;
  p->scale_down_delay = 30; /* Argo Rollouts' scaleDownDelaySeconds */
  p->health_check_url = NULL;
  memset(&p->routes, 0, sizeof p->routes);
  p->analysis = NULL;
}

static void bluegreen_step(const strategy *s, strategy_run *run, strategy_action *out) {
  const bluegreen_strategy *b = (const bluegreen_strategy *)s;
  memset(out, 0, sizeof *out);
  run->steps = 1;
  if (run->phase != START && !run->last_ok && run->phase != DONE) {
    out->kind = ACTION_ABORT;
    if (run->pct > 0)
      dc_fmt(out->reason, sizeof out->reason, "green failed after the switch, traffic returned to blue: %s", run->last_error);
    else
      dc_fmt(out->reason, sizeof out->reason, "green not switched to: %s", run->last_error);
    run->phase = DONE;
    return;
  }
  switch (run->phase) {
  case START:
    out->kind = ACTION_START;
    run->phase = WAIT_HEALTHY;
    return;
  case WAIT_HEALTHY:
    out->kind = ACTION_WAIT_HEALTHY;
    run->phase = b->switch_delay > 0 ? DELAY : SWITCH;
    return;
  case DELAY:
    out->kind = ACTION_WAIT;
    out->seconds = b->switch_delay;
    run->phase = SWITCH;
    return;
  case SWITCH:
    out->kind = ACTION_TRAFFIC;
    out->pct = 100;
    run->step = 1;
    run->phase = VERIFY;
    return;
  case VERIFY:
    out->kind = ACTION_VERIFY;
    /* A first deploy has no blue to keep warm. */
    run->phase = run->has_old && b->scale_down_delay > 0 ? SCALE_DOWN_DELAY : PROMOTE;
    return;
  case SCALE_DOWN_DELAY:
    out->kind = ACTION_WAIT;
    out->seconds = b->scale_down_delay;
    run->phase = PROMOTE;
    return;
  case PROMOTE:
    out->kind = ACTION_PROMOTE;
    run->phase = DONE;
    return;
  default:
    out->kind = ACTION_ABORT;
    dc_fmt(out->reason, sizeof out->reason, "blue-green step machine ran past its end");
    return;
  }
}

static void bluegreen_free(strategy *s) {
  analysis_spec_free(((bluegreen_strategy *)s)->analysis);
  free(s);
}

int strategy_bluegreen_new(strategy **out, const bluegreen_params *p, char *err) {
  *out = NULL;
  if (!(p->switch_delay >= 0 && p->switch_delay < 1e9)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: BlueGreenStrategy switch_delay must be a number of seconds >= 0, got %g", p->switch_delay);
    return -1;
  }
  if (!(p->scale_down_delay >= 0 && p->scale_down_delay < 1e9)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: BlueGreenStrategy scale_down_delay must be a number of seconds >= 0, got %g",
           p->scale_down_delay);
    return -1;
  }
  if (strategy_check_url(p->health_check_url, "BlueGreenStrategy health_check_url", err) ||
      strategy_check_routes(&p->routes, "BlueGreenStrategy", 0, err))
    return -1;
  analysis_spec *an = NULL;
  if (p->analysis && analysis_spec_parse(&an, p->analysis, "BlueGreenStrategy analysis", err) != 0)
    return -1;
  bluegreen_strategy *b = calloc(1, sizeof *b);
  if (!b) {
    analysis_spec_free(an);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  b->analysis = an;
  b->base.analysis = an;
  b->base.version = STRATEGY_VERSION;
  b->base.name = "blue-green";
  b->base.step = bluegreen_step;
  b->base.free = bluegreen_free;
  dc_strlcpy(b->base.health_check_url, p->health_check_url ? p->health_check_url : "", sizeof b->base.health_check_url);
  b->switch_delay = p->switch_delay;
  b->base.routes = p->routes;
  b->scale_down_delay = p->scale_down_delay;
  *out = &b->base;
  return 0;
}
